//! Trainable denoisers behind the `Denoiser` trait: an MLP for low-dimensional data, a small
//! class-conditioned conv U-Net for images, a factorised spatio-temporal net for clips.

pub mod mlp;
pub mod unet;
pub mod video;
pub mod video_mixer;

pub use mlp::{MlpConfig, MlpDenoiser};
pub use unet::{UNetConfig, UNetDenoiser};
pub use video::{VideoConfig, VideoDenoiser};
pub use video_mixer::{MixerConfig, VideoMixer};

use crate::error::{KernelError, Result};

/// The checks the conv denoisers share: `channels` 1 or 3, `base` in 1..=512, `time_dim` even and
/// positive. `keys` name the three fields in the error (e.g. `["video.channels", ...]`).
pub(crate) fn validate_widths(
    keys: [&'static str; 3],
    channels: usize,
    base: usize,
    time_dim: usize,
) -> Result<()> {
    if channels != 1 && channels != 3 {
        return Err(KernelError::param(keys[0], channels, "must be 1 or 3"));
    }
    if base == 0 || base > 512 {
        return Err(KernelError::param(keys[1], base, "must be in 1..=512"));
    }
    if time_dim == 0 || time_dim % 2 != 0 {
        return Err(KernelError::param(
            keys[2],
            time_dim,
            "must be even and positive",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::validate_widths;
    use crate::error::KernelError;

    const KEYS: [&str; 3] = ["m.channels", "m.base", "m.time_dim"];

    /// Which key a failing check names (hand-chosen bad values, one per field).
    fn failing_key(channels: usize, base: usize, time_dim: usize) -> Option<&'static str> {
        match validate_widths(KEYS, channels, base, time_dim) {
            Ok(()) => None,
            Err(KernelError::Param { name, .. }) => Some(name),
            Err(e) => panic!("unexpected error {e}"),
        }
    }

    #[test]
    fn width_checks_name_the_bad_field() {
        assert_eq!(failing_key(1, 8, 32), None);
        assert_eq!(failing_key(3, 512, 2), None);
        assert_eq!(failing_key(2, 8, 32), Some("m.channels"));
        assert_eq!(failing_key(1, 0, 32), Some("m.base"));
        assert_eq!(failing_key(1, 513, 32), Some("m.base"));
        assert_eq!(failing_key(1, 8, 0), Some("m.time_dim"));
        assert_eq!(failing_key(1, 8, 31), Some("m.time_dim"));
    }
}
