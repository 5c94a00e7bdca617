//! Measurements of a clip `[T, C, H, W]` (f32, any value range) that the DF-DPO eval applies to real
//! and generated clips: the tracked blob's arrow of time and smoothness, sharpness and residual noise,
//! and their averages over a set of clips. Pure numbers from tensors: no I/O, no clip generation.
//!
//! Positions are in pixels: `x` is the column, `y` the row (downwards), pixel (row i, column j) has
//! its centre at (x=j, y=i).
//! - `blob_track`: per frame, the luminance (channel mean) minus a robust background plane; the
//!   centroid of the residual above 3 robust noise sigmas.
//! - `arrow_of_time`: friction = speed decreases (normalised least-squares slope of speed vs t below
//!   -0.2); bounce = the highest point of the first half of the clip is higher than that of the
//!   second half by more than 0.5 px. Both rules flip sign under time reversal.
//! - `smoothness` = 1 / (1 + mean |second difference|^2 / mean |first difference|^2) of the track:
//!   in (0, 1], higher is smoother.
//! - `sharpness` = mean squared 5-point Laplacian (higher is sharper);
//!   `noise_level` = Immerkaer's robust noise sigma (MAD of a plane-cancelling 3x3 high-pass).

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::{KernelError, Result};

/// Friction rule: the normalised speed slope must be below this (a 20 % drop over the clip).
const FRICTION_SLOPE: f32 = -0.2;
/// Friction rule: the blob must end at least this far (px) from where it started; centroid jitter
/// of a still object (noise) adds path length but hardly any net displacement.
const MIN_TRAVEL_PX: f32 = 1.0;
/// Bounce rule: the first half's highest point must beat the second half's by this much (px).
const BOUNCE_MARGIN_PX: f32 = 0.5;
/// Motion classifier: vertical travel against the net direction must exceed this (px) ...
const RETURN_MIN_PX: f32 = 0.75;
/// ... and this share of the vertical path, for a track to count as bouncing.
const RETURN_MIN_FRAC: f32 = 0.1;

/// The kind of motion in a procedural clip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Motion {
    /// A blob sliding and slowing down under friction.
    Friction,
    /// A ball bouncing and losing height at each bounce.
    Bounce,
    /// Half friction, half bounce (even / odd clip index).
    #[default]
    Mixed,
}

/// (T, C, H, W).
type Dims4 = (usize, usize, usize, usize);

/// (T, C, H, W) and the values of a `[T, C, H, W]` clip.
fn clip_values(op: &'static str, clip: &Tensor) -> Result<(Dims4, Vec<f32>)> {
    let dims = match clip.dims() {
        &[t, c, h, w] if t > 0 && c > 0 && h > 0 && w > 0 => (t, c, h, w),
        d => {
            return Err(KernelError::shape(
                op,
                format!("expected a nonempty clip [frames, channels, height, width], got {d:?}"),
            ))
        }
    };
    let v = clip.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok((dims, v))
}

/// (planes, H, W) and the values of a tensor whose last two dims are H and W (rank >= 2).
fn plane_values(op: &'static str, x: &Tensor) -> Result<((usize, usize, usize), Vec<f32>)> {
    let d = x.dims();
    if d.len() < 2 {
        return Err(KernelError::shape(
            op,
            format!("expected a frame or clip [..., height, width], got {d:?}"),
        ));
    }
    let (h, w) = (d[d.len() - 2], d[d.len() - 1]);
    if h < 3 || w < 3 {
        return Err(KernelError::shape(
            op,
            format!("frames must be at least 3x3 for a 3x3 filter, got {d:?}"),
        ));
    }
    let planes = d[..d.len() - 2].iter().product::<usize>();
    if planes == 0 {
        return Err(KernelError::shape(op, format!("empty tensor {d:?}")));
    }
    let v = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(((planes, h, w), v))
}

/// Median of `v` (reorders it); 0 for an empty slice.
fn median(v: &mut [f32]) -> f32 {
    if v.is_empty() {
        return 0.0;
    }
    let mid = v.len() / 2;
    let (_, m, _) = v.select_nth_unstable_by(mid, |a, b| a.total_cmp(b));
    *m
}

/// Least-squares plane a + b x + c y through the pixels where `mask` is set; None if singular.
fn fit_plane(lum: &[f32], mask: &[bool], h: usize, w: usize) -> Option<[f64; 3]> {
    // Normal equations A^T A p = A^T z with rows (1, x, y).
    let mut m = [[0.0f64; 3]; 3];
    let mut r = [0.0f64; 3];
    for i in 0..h {
        for j in 0..w {
            let k = i * w + j;
            if !mask[k] {
                continue;
            }
            let a = [1.0, j as f64, i as f64];
            for p in 0..3 {
                for q in 0..3 {
                    m[p][q] += a[p] * a[q];
                }
                r[p] += a[p] * lum[k] as f64;
            }
        }
    }
    solve3(m, r)
}

/// Solves a 3x3 system by Gaussian elimination with partial pivoting.
fn solve3(mut m: [[f64; 3]; 3], mut r: [f64; 3]) -> Option<[f64; 3]> {
    let scale = m.iter().flatten().fold(0.0f64, |a, &b| a.max(b.abs()));
    for col in 0..3 {
        let piv = (col..3).max_by(|&a, &b| m[a][col].abs().total_cmp(&m[b][col].abs()))?;
        if m[piv][col].abs() <= 1e-9 * scale.max(1e-300) {
            return None;
        }
        m.swap(col, piv);
        r.swap(col, piv);
        let pivot = m[col];
        for row in col + 1..3 {
            let f = m[row][col] / pivot[col];
            for (x, p) in m[row].iter_mut().zip(pivot).skip(col) {
                *x -= f * p;
            }
            r[row] -= f * r[col];
        }
    }
    let mut x = [0.0f64; 3];
    for row in (0..3).rev() {
        let s: f64 = (row + 1..3).map(|k| m[row][k] * x[k]).sum();
        x[row] = (r[row] - s) / m[row][row];
    }
    Some(x)
}

/// Residual of one luminance frame against its robust background plane, and the robust noise sigma.
///
/// Three rounds: fit a plane to the background mask (all pixels at first), then keep as background
/// the pixels whose residual is at most median + max(3 sigma, 1e-3), sigma = 1.4826 MAD of the
/// background residuals. A blob covering under half the frame drops out of the mask in the first
/// round, so a constant or linear-gradient background is removed exactly on clean frames.
fn background_residual(lum: &[f32], h: usize, w: usize) -> (Vec<f32>, f32) {
    let mut mask = vec![true; h * w];
    let mut resid: Vec<f32> = lum.to_vec();
    let mut sigma = 0.0f32;
    for _ in 0..3 {
        let plane = fit_plane(lum, &mask, h, w).unwrap_or_else(|| {
            // Degenerate geometry (a single row or column): a constant background.
            let (s, n) = lum
                .iter()
                .zip(&mask)
                .filter(|(_, &m)| m)
                .fold((0.0f64, 0usize), |(s, n), (&v, _)| (s + v as f64, n + 1));
            [s / n.max(1) as f64, 0.0, 0.0]
        });
        for i in 0..h {
            for j in 0..w {
                let k = i * w + j;
                let bg = plane[0] + plane[1] * j as f64 + plane[2] * i as f64;
                resid[k] = (lum[k] as f64 - bg) as f32;
            }
        }
        let mut bgr: Vec<f32> = resid
            .iter()
            .zip(&mask)
            .filter(|(_, &m)| m)
            .map(|(&r, _)| r)
            .collect();
        let med = median(&mut bgr);
        let mut dev: Vec<f32> = bgr.iter().map(|r| (r - med).abs()).collect();
        sigma = 1.4826 * median(&mut dev);
        let cut = med + (3.0 * sigma).max(1e-3);
        let new_mask: Vec<bool> = resid.iter().map(|&r| r <= cut).collect();
        // Keep at least 3 background pixels so the next plane fit is defined.
        if new_mask.iter().filter(|&&m| m).count() >= 3 {
            mask = new_mask;
        }
    }
    (resid, sigma)
}

/// Per-frame centre (x = column, y = row, pixels) of the bright object in a clip `[T, C, H, W]`.
///
/// Per frame: luminance = mean over channels; subtract the robust background plane (see
/// `background_residual`, which also gives the robust noise sigma s of the background); the centre is
/// the centroid of the weights max(0, residual - 3 s). On a clean frame s is 0 and the weights are the
/// blob itself; with Gaussian noise, 3 s keeps all but ~0.1 % of the background pixels out. A frame
/// with no pixel above the threshold (no object) gets the position of its brightest residual pixel.
pub fn blob_track(clip: &Tensor) -> Result<Vec<(f32, f32)>> {
    let (frames, w) = frame_residuals("blob_track", clip)?;
    let mut track = Vec::with_capacity(frames.len());
    for (resid, sigma) in frames {
        let thr = 3.0 * sigma;
        let (mut sw, mut sx, mut sy) = (0.0f64, 0.0f64, 0.0f64);
        for (k, &r) in resid.iter().enumerate() {
            let wt = (r - thr) as f64;
            if wt > 0.0 {
                sw += wt;
                sx += wt * (k % w) as f64;
                sy += wt * (k / w) as f64;
            }
        }
        if sw > 1e-12 {
            track.push(((sx / sw) as f32, (sy / sw) as f32));
        } else {
            let k = resid
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(k, _)| k);
            track.push(((k % w) as f32, (k / w) as f32));
        }
    }
    Ok(track)
}

/// A frame's background-removed luminance [H * W] and its background noise sigma.
pub(crate) type FrameResidual = (Vec<f32>, f32);

/// Per frame of a clip `[T, C, H, W]`: the luminance (channel mean) minus its fitted background
/// plane, row-major [H * W], and the background's robust noise sigma; plus the width W.
pub(crate) fn frame_residuals(
    op: &'static str,
    clip: &Tensor,
) -> Result<(Vec<FrameResidual>, usize)> {
    let ((t, c, h, w), v) = clip_values(op, clip)?;
    let hw = h * w;
    let mut out = Vec::with_capacity(t);
    for f in 0..t {
        let frame = &v[f * c * hw..(f + 1) * c * hw];
        let mut lum = vec![0.0f32; hw];
        for ch in frame.chunks(hw) {
            for (l, &x) in lum.iter_mut().zip(ch) {
                *l += x / c as f32;
            }
        }
        out.push(background_residual(&lum, h, w));
    }
    Ok((out, w))
}

/// Friction or bounce, from a track alone (time-symmetric: a reversed track gets the same answer).
///
/// Bounce when the motion is mostly vertical (vertical path > horizontal path) and goes back and
/// forth: the vertical distance travelled against the net vertical direction, (P_y - |N_y|) / 2 with
/// P_y = sum |dy| and N_y = y_last - y_first, exceeds both 0.75 px and 10 % of P_y. A sliding blob
/// moves on a straight line, so that distance is 0 (up to jitter); a bouncing ball rises after every
/// bounce, at least e^2 of its drop.
pub fn classify_motion(track: &[(f32, f32)]) -> Motion {
    if track.len() < 2 {
        return Motion::Friction;
    }
    let (mut px, mut py) = (0.0f32, 0.0f32);
    for p in track.windows(2) {
        px += (p[1].0 - p[0].0).abs();
        py += (p[1].1 - p[0].1).abs();
    }
    let ny = (track[track.len() - 1].1 - track[0].1).abs();
    let back = 0.5 * (py - ny);
    if py > px && back > RETURN_MIN_PX && back > RETURN_MIN_FRAC * py {
        Motion::Bounce
    } else {
        Motion::Friction
    }
}

/// Friction rule: speed s_t = |p_{t+1} - p_t| decreases. The least-squares slope b of s_t against t,
/// normalised to a relative change over the clip, beta = b (T - 2) / mean(s), must be below -0.2,
/// and the blob must end at least 1 px from its start (a still, jittering blob is not sliding).
fn friction_obeys(track: &[(f32, f32)]) -> bool {
    let speeds: Vec<f64> = track
        .windows(2)
        .map(|p| ((p[1].0 - p[0].0) as f64).hypot((p[1].1 - p[0].1) as f64))
        .collect();
    let n = speeds.len();
    if n < 2 {
        return false;
    }
    let (first, last) = (track[0], track[track.len() - 1]);
    let travel = ((last.0 - first.0) as f64).hypot((last.1 - first.1) as f64);
    if travel < MIN_TRAVEL_PX as f64 {
        return false;
    }
    let path: f64 = speeds.iter().sum();
    let mean = path / n as f64;
    let t_mean = (n - 1) as f64 / 2.0;
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for (t, s) in speeds.iter().enumerate() {
        let dt = t as f64 - t_mean;
        sxy += dt * (s - mean);
        sxx += dt * dt;
    }
    let beta = sxy / sxx * (n - 1) as f64 / mean;
    beta < FRICTION_SLOPE as f64
}

/// Bounce rule: with k = floor(T / 2), the highest point (smallest row y) of frames 0..k is higher
/// than that of frames T-k..T by more than 0.5 px: the ball never again reaches its drop height.
fn bounce_obeys(track: &[(f32, f32)]) -> bool {
    let k = track.len() / 2;
    if k == 0 {
        return false;
    }
    let top = |s: &[(f32, f32)]| s.iter().map(|p| p.1).fold(f32::INFINITY, f32::min);
    let first = top(&track[..k]);
    let second = top(&track[track.len() - k..]);
    second - first > BOUNCE_MARGIN_PX
}

/// Does the clip `[T, C, H, W]` move forward in the data's time? Tracks the object (`blob_track`),
/// takes the kind from `kind_hint` (`Friction` or `Bounce`) or, for `None` / `Mixed`, from
/// `classify_motion`, and applies that kind's rule (friction: speed decreasing, normalised slope
/// < -0.2, and at least 1 px from the first to the last position; bounce: the first-half apex higher
/// than the second-half apex by more than 0.5 px). Both rules change sign under time reversal, so a
/// clip and its reverse are never both true. Clips of fewer than 3 frames give false.
///
/// Measured on 200 generated clips (tests `arrow_of_time_*`): 100 % true on real clips and 0 % on
/// the same clips reversed, with and without the hint; with N(0, 0.3^2) pixel noise 96.5 % / 2 %.
/// Chance level (frames in random order, or pure noise): 35-40 %; a still, noisy blob: 0 %.
pub fn arrow_of_time(clip: &Tensor, kind_hint: Option<Motion>) -> Result<bool> {
    Ok(track_arrow(&blob_track(clip)?, kind_hint))
}

/// `arrow_of_time` on a track.
fn track_arrow(track: &[(f32, f32)], kind_hint: Option<Motion>) -> bool {
    if track.len() < 3 {
        return false;
    }
    let kind = match kind_hint {
        Some(Motion::Friction) => Motion::Friction,
        Some(Motion::Bounce) => Motion::Bounce,
        _ => classify_motion(track),
    };
    match kind {
        Motion::Bounce => bounce_obeys(track),
        _ => friction_obeys(track),
    }
}

/// Smoothness of the tracked motion of a clip `[T, C, H, W]`, in (0, 1], higher is smoother:
/// 1 / (1 + R), R = mean_t |p_{t+1} - 2 p_t + p_{t-1}|^2 / (mean_t |p_{t+1} - p_t|^2 + 1e-4 px^2).
/// R is scale-free: a friction clip has R = mu^2 (about 0.02-0.09), a swapped pair of frames adds
/// second differences as large as the first differences. Clips of fewer than 3 frames give 1.
pub fn smoothness(clip: &Tensor) -> Result<f32> {
    let track = blob_track(clip)?;
    Ok(track_smoothness(&track))
}

fn track_smoothness(track: &[(f32, f32)]) -> f32 {
    if track.len() < 3 {
        return 1.0;
    }
    let sq = |a: f32, b: f32| (a * a + b * b) as f64;
    let d1: f64 = track
        .windows(2)
        .map(|p| sq(p[1].0 - p[0].0, p[1].1 - p[0].1))
        .sum::<f64>()
        / (track.len() - 1) as f64;
    let d2: f64 = track
        .windows(3)
        .map(|p| {
            sq(
                p[2].0 - 2.0 * p[1].0 + p[0].0,
                p[2].1 - 2.0 * p[1].1 + p[0].1,
            )
        })
        .sum::<f64>()
        / (track.len() - 2) as f64;
    (1.0 / (1.0 + d2 / (d1 + 1e-4))) as f32
}

/// Sharpness of a frame `[.., H, W]` (any rank >= 2, e.g. `[H, W]`, `[C, H, W]`, `[T, C, H, W]`):
/// the mean over planes and interior pixels of the squared 5-point Laplacian
/// (4 x_{i,j} - x_{i-1,j} - x_{i+1,j} - x_{i,j-1} - x_{i,j+1})^2. Higher is sharper; zero on
/// constant or linear-gradient frames. Noise raises it too, which is why `noise_level` is reported
/// next to it.
pub fn sharpness(x: &Tensor) -> Result<f32> {
    let ((planes, h, w), v) = plane_values("sharpness", x)?;
    let mut acc = 0.0f64;
    for p in v.chunks(h * w).take(planes) {
        for i in 1..h - 1 {
            for j in 1..w - 1 {
                let k = i * w + j;
                let lap = 4.0 * p[k] - p[k - w] - p[k + w] - p[k - 1] - p[k + 1];
                acc += (lap as f64) * (lap as f64);
            }
        }
    }
    Ok((acc / (planes * (h - 2) * (w - 2)) as f64) as f32)
}

/// Residual noise sigma of a frame `[.., H, W]` (any rank >= 2), Immerkaer's estimator made robust:
/// the high-pass N = [1 -2 1; -2 4 -2; 1 -2 1] (the product of two second differences, so it is 0 on
/// any background a + b x + c y + d x y) is applied at every interior pixel of every plane, and
/// sigma = 1.4826 median(|N * x|) / 6 (6 = the L2 norm of N, so i.i.d. N(0, s^2) noise gives s).
/// The median ignores sparse structure such as the blob's edges: a clean procedural clip gives 0,
/// the same clip plus N(0, s^2) pixel noise gives s (within ~10 %).
pub fn noise_level(x: &Tensor) -> Result<f32> {
    let ((planes, h, w), v) = plane_values("noise_level", x)?;
    let mut resp = Vec::with_capacity(planes * (h - 2) * (w - 2));
    for p in v.chunks(h * w).take(planes) {
        for i in 1..h - 1 {
            for j in 1..w - 1 {
                let k = i * w + j;
                let (up, dn) = (k - w, k + w);
                let r = p[up - 1] - 2.0 * p[up] + p[up + 1] - 2.0 * p[k - 1] + 4.0 * p[k]
                    - 2.0 * p[k + 1]
                    + p[dn - 1]
                    - 2.0 * p[dn]
                    + p[dn + 1];
                resp.push(r.abs());
            }
        }
    }
    Ok(1.4826 * median(&mut resp) / 6.0)
}

/// The four measurements of one clip.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ClipMeasures {
    /// `arrow_of_time`.
    pub arrow: bool,
    /// `smoothness`, higher is smoother.
    pub smoothness: f32,
    /// `sharpness`, mean squared Laplacian.
    pub sharpness: f32,
    /// `noise_level`, residual noise sigma.
    pub noise: f32,
}

/// All measurements of one clip `[T, C, H, W]` (one tracking pass for both temporal measures).
pub fn measure_clip(clip: &Tensor, kind_hint: Option<Motion>) -> Result<ClipMeasures> {
    let track = blob_track(clip)?;
    Ok(ClipMeasures {
        arrow: track_arrow(&track, kind_hint),
        smoothness: track_smoothness(&track),
        sharpness: sharpness(clip)?,
        noise: noise_level(clip)?,
    })
}

/// Measurements averaged over a set of clips: what the eval reports per model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct VideoStats {
    /// Share of clips whose motion obeys the arrow of time (0..1).
    pub temporal: f32,
    /// Mean `smoothness` (higher is smoother).
    pub smoothness: f32,
    /// Mean `sharpness` (mean squared Laplacian).
    pub sharpness: f32,
    /// Mean `noise_level` (residual noise sigma).
    pub noise: f32,
}

/// Averages of `measure_clip` over clips `[n, T, C, H, W]` (n >= 1).
pub fn video_stats(clips: &Tensor, kind_hint: Option<Motion>) -> Result<VideoStats> {
    let n = match clips.dims() {
        &[n, ..] if clips.rank() == 5 && n > 0 => n,
        d => {
            return Err(KernelError::shape(
                "video_stats",
                format!("expected clips [n >= 1, frames, channels, height, width], got {d:?}"),
            ))
        }
    };
    let (mut arrow, mut sm, mut sh, mut no) = (0usize, 0.0f64, 0.0f64, 0.0f64);
    for i in 0..n {
        let m = measure_clip(&clips.get(i)?, kind_hint)?;
        arrow += m.arrow as usize;
        sm += m.smoothness as f64;
        sh += m.sharpness as f64;
        no += m.noise as f64;
    }
    let nf = n as f64;
    Ok(VideoStats {
        temporal: (arrow as f64 / nf) as f32,
        smoothness: (sm / nf) as f32,
        sharpness: (sh / nf) as f32,
        noise: (no / nf) as f32,
    })
}

/// `video_stats` of real clips `[n, T, C, H, W]` without a kind hint (the motion kind is classified
/// per clip), the reference that generated clips are compared against.
pub fn reference_stats(clips: &Tensor) -> Result<VideoStats> {
    video_stats(clips, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A clip [T, C, 12, 12]: background plane 0.3 + 0.02 x - 0.01 y in every channel, plus a
    /// 2x2 block of +1 with its top-left pixel at (col, row) = `corners[t]` in frame t.
    fn block_clip(corners: &[(usize, usize)], channels: usize) -> Tensor {
        let s = 12;
        let mut v = Vec::with_capacity(corners.len() * channels * s * s);
        for &(c0, r0) in corners {
            for _ in 0..channels {
                for i in 0..s {
                    for j in 0..s {
                        let bg = 0.3 + 0.02 * j as f32 - 0.01 * i as f32;
                        let blob = (r0..r0 + 2).contains(&i) && (c0..c0 + 2).contains(&j);
                        v.push(bg + if blob { 1.0 } else { 0.0 });
                    }
                }
            }
        }
        Tensor::from_vec(v, (corners.len(), channels, s, s), &Device::Cpu).unwrap()
    }

    fn plane(h: usize, w: usize, f: impl Fn(usize, usize) -> f32) -> Tensor {
        let v: Vec<f32> = (0..h * w).map(|k| f(k / w, k % w)).collect();
        Tensor::from_vec(v, (h, w), &Device::Cpu).unwrap()
    }

    #[test]
    fn arrow_of_time_is_false_without_motion_or_frames() {
        // (Moved from src/video.rs; the two-frame clip is now hand-made instead of generated.)
        // A static clip has no speed change and no second-half apex drop: both rules say false.
        let still = Tensor::zeros((10, 1, 16, 16), DType::F32, &Device::Cpu).unwrap();
        for hint in [None, Some(Motion::Friction), Some(Motion::Bounce)] {
            assert!(!arrow_of_time(&still, hint).unwrap());
        }
        // Fewer than 3 frames: false, whatever the motion.
        let two = block_clip(&[(2, 2), (6, 6)], 1);
        assert!(!arrow_of_time(&two, None).unwrap());
        // Wrong rank is an error, not a panic.
        let five = Tensor::zeros((2, 3, 1, 16, 16), DType::F32, &Device::Cpu).unwrap();
        assert!(arrow_of_time(&five, None).is_err());
        assert!(sharpness(&Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap()).is_err());
        assert!(noise_level(&Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap()).is_err());
        assert!(video_stats(&still, None).is_err());
    }

    #[test]
    fn median_and_solve3_hand_cases() {
        // Upper median for even lengths: sorted (1, 2, 3, 4) -> index 2 -> 3.
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 3.0);
        assert_eq!(median(&mut []), 0.0);
        // [[2,1,0],[1,3,1],[0,1,4]] (1, 2, 3) = (4, 10, 14).
        let m = [[2.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 1.0, 4.0]];
        let x = solve3(m, [4.0, 10.0, 14.0]).unwrap();
        for (a, b) in x.iter().zip([1.0, 2.0, 3.0]) {
            assert!((a - b).abs() < 1e-12, "{x:?}");
        }
        // Row 3 = row 1 + row 2: singular.
        let s = [[1.0, 2.0, 3.0], [0.0, 1.0, 1.0], [1.0, 3.0, 4.0]];
        assert!(solve3(s, [1.0, 1.0, 2.0]).is_none());
    }

    #[test]
    fn background_residual_removes_a_plane_and_keeps_the_blob() {
        // lum = 0.3 + 0.02 x - 0.01 y + 1 on a 2x2 block: after the robust rounds the plane is fitted
        // on the background only, so the residual is 0 there and exactly 1 on the block, sigma 0.
        let clip = block_clip(&[(5, 3)], 1);
        let v = clip.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (resid, sigma) = background_residual(&v, 12, 12);
        assert!(sigma < 1e-5, "sigma {sigma}");
        for (k, r) in resid.iter().enumerate() {
            let (i, j) = (k / 12, k % 12);
            let want = if (3..5).contains(&i) && (5..7).contains(&j) {
                1.0
            } else {
                0.0
            };
            assert!((r - want).abs() < 1e-5, "pixel ({i}, {j}): {r}");
        }
        // fit_plane on the full mask of a pure plane returns its coefficients (a, b, c).
        let p = plane(6, 7, |i, j| 0.3 + 0.02 * j as f32 - 0.01 * i as f32);
        let pv = p.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let c = fit_plane(&pv, &[true; 42], 6, 7).unwrap();
        for (a, b) in c.iter().zip([0.3, 0.02, -0.01]) {
            assert!((a - b).abs() < 1e-6, "{c:?}");
        }
    }

    #[test]
    fn blob_track_finds_the_block_centre() {
        // The centroid of a 2x2 block with top-left (col, row) is (col + 0.5, row + 0.5); the
        // channel mean of identical channels is the channel itself.
        let corners = [(1, 2), (4, 3), (8, 8)];
        let track = blob_track(&block_clip(&corners, 3)).unwrap();
        assert_eq!(track.len(), 3);
        for (p, &(c, r)) in track.iter().zip(&corners) {
            let want = (c as f32 + 0.5, r as f32 + 0.5);
            assert!(
                (p.0 - want.0).abs() < 1e-4 && (p.1 - want.1).abs() < 1e-4,
                "{p:?} vs {want:?}"
            );
        }
    }

    #[test]
    fn classify_motion_hand_tracks() {
        // Horizontal slide: no vertical path at all.
        let slide = [(0.0, 5.0), (1.0, 5.0), (2.0, 5.0), (3.0, 5.0)];
        assert_eq!(classify_motion(&slide), Motion::Friction);
        // y = 0, 4, 8, 4, 6: P_y = 14, N_y = 6, back = (14 - 6) / 2 = 4 > 0.75 and > 1.4; P_x = 0.
        let bounce = [(3.0, 0.0), (3.0, 4.0), (3.0, 8.0), (3.0, 4.0), (3.0, 6.0)];
        assert_eq!(classify_motion(&bounce), Motion::Bounce);
        let mut back = bounce;
        back.reverse();
        assert_eq!(classify_motion(&back), Motion::Bounce);
        assert_eq!(classify_motion(&[(1.0, 1.0)]), Motion::Friction);
    }

    #[test]
    fn friction_and_bounce_rules_flip_under_reversal() {
        // Friction: speeds 4, 3, 2.25, 1.6875, 1.265625 (v0 = 4, mu = 0.25) along x. Slope of s vs t
        // (t_mean = 2): sum (t - 2) s = -8 - 3 + 1.6875 + 2.53125 = -6.78125, sum (t - 2)^2 = 10,
        // mean s = 2.440625, beta = -0.678125 * 4 / 2.440625 = -1.111 < -0.2. Reversed: +1.111.
        let mut x = 0.0f32;
        let mut slide = vec![];
        for s in [4.0, 3.0, 2.25, 1.6875, 1.265625, 0.0] {
            slide.push((x, 5.0));
            x += s;
        }
        assert!(friction_obeys(&slide));
        assert!(track_arrow(&slide, Some(Motion::Friction)));
        let mut rev = slide.clone();
        rev.reverse();
        assert!(!friction_obeys(&rev));
        // A still blob jittering by 0.1 px travels < 1 px: not friction.
        let jitter = [(5.0, 5.0), (5.1, 5.0), (5.0, 5.0), (5.05, 5.0)];
        assert!(!friction_obeys(&jitter));
        // Bounce: rows 0, 5, 10, 6, 4, 8: first-half top 0, second-half top 4, 4 - 0 > 0.5.
        let ball = [
            (2.0, 0.0),
            (2.0, 5.0),
            (2.0, 10.0),
            (2.0, 6.0),
            (2.0, 4.0),
            (2.0, 8.0),
        ];
        assert!(bounce_obeys(&ball));
        assert!(track_arrow(&ball, None)); // classified as bounce: P_y = 5+5+4+2+4 = 20 > P_x = 0
        let mut up = ball;
        up.reverse();
        assert!(!bounce_obeys(&up));
        assert!(!track_arrow(&up, Some(Motion::Bounce)));
    }

    #[test]
    fn smoothness_hand_cases() {
        // Constant velocity: no second differences, smoothness 1.
        let line: Vec<(f32, f32)> = (0..6).map(|t| (t as f32, 2.0 * t as f32)).collect();
        assert!((track_smoothness(&line) - 1.0).abs() < 1e-6);
        // x = 0, 1, 3: mean |d1|^2 = (1 + 4) / 2 = 2.5, mean |d2|^2 = 1,
        // smoothness = 1 / (1 + 1 / (2.5 + 1e-4)) = 2.5001 / 3.5001.
        let s = track_smoothness(&[(0.0, 0.0), (1.0, 0.0), (3.0, 0.0)]);
        assert!((s as f64 - 2.5001 / 3.5001).abs() < 1e-6, "{s}");
        assert_eq!(track_smoothness(&[(0.0, 0.0), (9.0, 9.0)]), 1.0);
    }

    #[test]
    fn sharpness_and_noise_of_a_spike() {
        // One 1 at the centre of a 5x5 zero plane; interior = 3x3 pixels. Laplacian: 4 at the
        // centre, -1 at its 4 neighbours, 0 at the diagonals: (16 + 4) / 9.
        let spike = plane(5, 5, |i, j| if (i, j) == (2, 2) { 1.0 } else { 0.0 });
        let s = sharpness(&spike).unwrap();
        assert!((s - 20.0 / 9.0).abs() < 1e-6, "{s}");
        // Rank does not matter: [1, 1, 5, 5] gives the same.
        let s4 = sharpness(&spike.reshape((1, 1, 5, 5)).unwrap()).unwrap();
        assert_eq!(s, s4);
        // High-pass responses |N| over the 3x3 interior: 1 2 1 / 2 4 2 / 1 2 1, median 2,
        // sigma = 1.4826 * 2 / 6.
        let n = noise_level(&spike).unwrap();
        assert!((n - 1.4826 * 2.0 / 6.0).abs() < 1e-6, "{n}");
        // a + b x + c y + d x y is cancelled exactly by both filters (up to f32 rounding).
        let bilinear = plane(8, 9, |i, j| {
            let (x, y) = (j as f32, i as f32);
            0.1 + 0.03 * x - 0.02 * y + 0.004 * x * y
        });
        assert!(noise_level(&bilinear).unwrap() < 1e-6);
        let ramp = plane(8, 9, |i, j| 0.1 + 0.03 * j as f32 - 0.02 * i as f32);
        assert!(sharpness(&ramp).unwrap() < 1e-10);
    }

    #[test]
    fn video_stats_is_the_mean_of_measure_clip() {
        // Two hand clips: a block sliding right with shrinking steps (3, 2, 1 px), and a still one.
        let a = block_clip(&[(0, 5), (3, 5), (5, 5), (6, 5)], 1);
        let b = block_clip(&[(5, 5); 4], 1);
        let ma = measure_clip(&a, None).unwrap();
        let mb = measure_clip(&b, None).unwrap();
        // Speeds 3, 2, 1 decrease: forward; the still block travels 0 px: not.
        assert!(ma.arrow && !mb.arrow);
        let clips = Tensor::stack(&[a, b], 0).unwrap();
        let st = video_stats(&clips, None).unwrap();
        assert_eq!(st.temporal, 0.5);
        let mean = |x: f32, y: f32| ((x as f64 + y as f64) / 2.0) as f32;
        assert_eq!(st.smoothness, mean(ma.smoothness, mb.smoothness));
        assert_eq!(st.sharpness, mean(ma.sharpness, mb.sharpness));
        assert_eq!(st.noise, mean(ma.noise, mb.noise));
        assert_eq!(reference_stats(&clips).unwrap(), st);
    }
}
