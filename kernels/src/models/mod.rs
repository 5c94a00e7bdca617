//! Trainable denoisers behind the `Denoiser` trait: an MLP for low-dimensional data, a small
//! class-conditioned conv U-Net for images, a factorised spatio-temporal net for clips.

pub mod mlp;
pub mod unet;
pub mod video;

pub use mlp::{MlpConfig, MlpDenoiser};
pub use unet::{UNetConfig, UNetDenoiser};
pub use video::{VideoConfig, VideoDenoiser};
