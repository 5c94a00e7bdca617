//! Gates of a video model: does it make the data's objects at all? A DF-DPO result on a reference
//! that has not learned the data is not a result (DESIGN.md), so every model is measured on
//! - `single_blob`: the share of frames holding exactly one blob of the data's size;
//! - `track_continuity`: the share of consecutive-frame pairs (all T - 1 of every clip) where both
//!   frames hold one such blob and it moved no farther than the data's blobs ever move.
//!
//! "The data's size" and "farther than the data moves" are fitted on the real clips
//! (`BlobGate::fit`): a blob is a 4-connected component of the background-removed luminance above
//! half the real frames' median peak; its area must lie in [0.5 x p5, 1.5 x p95] of the real blobs'
//! areas, and a step must be at most 1.25 x the real clips' 99th-percentile step + 0.5 px.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::clip_metrics::frame_residuals;
use crate::{KernelError, Result};

/// One connected component above the threshold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Blob {
    /// Pixels in the component.
    pub area: usize,
    /// Centroid (column, row), weighted by the residual above the threshold.
    pub cx: f32,
    pub cy: f32,
}

/// The components of a residual frame `resid` [h * w] above `threshold` (4-connectivity).
pub fn blobs(resid: &[f32], w: usize, threshold: f32) -> Vec<Blob> {
    let h = resid.len().checked_div(w).unwrap_or(0);
    let mut seen = vec![false; resid.len()];
    let mut out = Vec::new();
    let mut stack = Vec::new();
    for start in 0..resid.len() {
        if seen[start] || resid[start] <= threshold {
            continue;
        }
        seen[start] = true;
        stack.push(start);
        let (mut area, mut sw, mut sx, mut sy) = (0usize, 0.0f64, 0.0f64, 0.0f64);
        while let Some(k) = stack.pop() {
            let (i, j) = (k / w, k % w);
            let wt = (resid[k] - threshold) as f64;
            area += 1;
            sw += wt;
            sx += wt * j as f64;
            sy += wt * i as f64;
            let mut visit = |n: usize| {
                if !seen[n] && resid[n] > threshold {
                    seen[n] = true;
                    stack.push(n);
                }
            };
            if i > 0 {
                visit(k - w);
            }
            if i + 1 < h {
                visit(k + w);
            }
            if j > 0 {
                visit(k - 1);
            }
            if j + 1 < w {
                visit(k + 1);
            }
        }
        out.push(Blob {
            area,
            cx: (sx / sw.max(1e-12)) as f32,
            cy: (sy / sw.max(1e-12)) as f32,
        });
    }
    out
}

/// The thresholds fitted on real clips.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BlobGate {
    /// Residual luminance a blob pixel exceeds.
    pub threshold: f32,
    /// Smallest and largest blob area (pixels) of the data's size.
    pub min_area: usize,
    pub max_area: usize,
    /// Largest consecutive-frame step (pixels) of a continuous track.
    pub max_step: f32,
}

/// `single_blob` and `track_continuity` of a set of clips.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GateStats {
    pub single_blob: f32,
    pub track_continuity: f32,
}

fn percentile(v: &mut [f32], q: f32) -> f32 {
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() - 1) as f32 * q).round() as usize;
    v[i.min(v.len() - 1)]
}

fn clip_count(op: &'static str, clips: &Tensor) -> Result<usize> {
    match clips.dims() {
        &[n, ..] if clips.rank() == 5 && n > 0 => Ok(n),
        d => Err(KernelError::shape(
            op,
            format!("expected clips [n >= 1, frames, channels, height, width], got {d:?}"),
        )),
    }
}

impl BlobGate {
    /// Fit the gate on real clips `[n, T, C, H, W]`, each frame of which holds one blob.
    pub fn fit(real: &Tensor) -> Result<Self> {
        let n = clip_count("BlobGate::fit", real)?;
        let mut frames = Vec::new();
        for i in 0..n {
            frames.push(frame_residuals("BlobGate::fit", &real.get(i)?)?);
        }
        let mut peaks: Vec<f32> = frames
            .iter()
            .flat_map(|(f, _)| {
                f.iter()
                    .map(|(r, _)| r.iter().cloned().fold(f32::MIN, f32::max))
            })
            .collect();
        let threshold = 0.5 * percentile(&mut peaks, 0.5);
        if !(threshold.is_finite() && threshold > 0.0) {
            return Err(KernelError::param(
                "BlobGate::fit",
                threshold,
                "the real clips show no blob above their background",
            ));
        }
        let (mut areas, mut steps) = (Vec::new(), Vec::new());
        for (clip, w) in &frames {
            let mut prev: Option<Blob> = None;
            for (resid, _) in clip {
                let b = blobs(resid, *w, threshold);
                let one = (b.len() == 1).then(|| b[0]);
                if let Some(b) = one {
                    areas.push(b.area as f32);
                    if let Some(p) = prev {
                        steps.push(((b.cx - p.cx).powi(2) + (b.cy - p.cy).powi(2)).sqrt());
                    }
                }
                prev = one;
            }
        }
        if areas.is_empty() {
            return Err(KernelError::param(
                "BlobGate::fit",
                "0 frames",
                "no real frame holds exactly one blob",
            ));
        }
        let min_area = (0.5 * percentile(&mut areas, 0.05)).floor().max(1.0) as usize;
        let max_area = (1.5 * percentile(&mut areas, 0.95)).ceil() as usize;
        let max_step = if steps.is_empty() {
            0.5
        } else {
            1.25 * percentile(&mut steps, 0.99) + 0.5
        };
        Ok(Self {
            threshold,
            min_area,
            max_area,
            max_step,
        })
    }

    /// The blob of a frame when it holds exactly one, of the data's size.
    fn single(&self, resid: &[f32], w: usize) -> Option<Blob> {
        match blobs(resid, w, self.threshold)[..] {
            [b] if (self.min_area..=self.max_area).contains(&b.area) => Some(b),
            _ => None,
        }
    }

    /// `single_blob` and `track_continuity` of clips `[n, T, C, H, W]`.
    pub fn measure(&self, clips: &Tensor) -> Result<GateStats> {
        let n = clip_count("BlobGate::measure", clips)?;
        let (mut frames, mut single, mut pairs, mut continuous) = (0usize, 0usize, 0usize, 0usize);
        for i in 0..n {
            let (clip, w) = frame_residuals("BlobGate::measure", &clips.get(i)?)?;
            let found: Vec<Option<Blob>> = clip.iter().map(|(r, _)| self.single(r, w)).collect();
            frames += found.len();
            single += found.iter().filter(|b| b.is_some()).count();
            for pair in found.windows(2) {
                pairs += 1;
                if let [Some(a), Some(b)] = pair {
                    let step = ((b.cx - a.cx).powi(2) + (b.cy - a.cy).powi(2)).sqrt();
                    continuous += usize::from(step <= self.max_step);
                }
            }
        }
        Ok(GateStats {
            single_blob: single as f32 / frames.max(1) as f32,
            track_continuity: continuous as f32 / pairs.max(1) as f32,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Clips [n, T, 1, 16, 16] on a flat 0.2 background, with a 3x3 block of +1 whose top-left
    /// corner is `corners[i][t]` in frame t of clip i (None: no block in that frame).
    fn clips(corners: &[Vec<Option<(usize, usize)>>]) -> Tensor {
        let (s, t) = (16, corners[0].len());
        let mut v = Vec::new();
        for clip in corners {
            for &c in clip {
                for i in 0..s {
                    for j in 0..s {
                        let inside = c.is_some_and(|(c0, r0)| {
                            (c0..c0 + 3).contains(&j) && (r0..r0 + 3).contains(&i)
                        });
                        v.push(if inside { 1.2f32 } else { 0.2 });
                    }
                }
            }
        }
        Tensor::from_vec(v, (corners.len(), t, 1, s, s), &Device::Cpu).unwrap()
    }

    fn sliding(start: usize, n: usize) -> Vec<Option<(usize, usize)>> {
        (0..n).map(|t| Some((start + t, 5))).collect()
    }

    #[test]
    fn components_by_hand() {
        // Two separate blocks (areas 4 and 1) and a diagonal neighbour that is not 4-connected.
        let w = 6;
        let mut r = vec![0.0f32; 36];
        for k in [0, 1, 6, 7, 20, 27] {
            r[k] = 1.0;
        }
        let b = blobs(&r, w, 0.5);
        let mut areas: Vec<usize> = b.iter().map(|b| b.area).collect();
        areas.sort();
        assert_eq!(areas, vec![1, 1, 4]);
        // The 2x2 block's centroid is (0.5, 0.5).
        let big = b.iter().find(|b| b.area == 4).unwrap();
        assert!((big.cx - 0.5).abs() < 1e-6 && (big.cy - 0.5).abs() < 1e-6);
        assert!(blobs(&r, w, 2.0).is_empty());
    }

    #[test]
    fn gate_fitted_on_sliding_blocks_passes_them_and_catches_gaps_and_jumps() {
        // Real: 4 clips of 8 frames, a 3x3 block sliding one column per frame (area 9, step 1).
        let real = clips(&[sliding(1, 8), sliding(2, 8), sliding(3, 8), sliding(4, 8)]);
        let g = BlobGate::fit(&real).unwrap();
        assert!((0.4..=0.6).contains(&g.threshold), "{g:?}");
        assert!(
            g.min_area <= 9 && g.max_area >= 9 && g.max_area <= 14,
            "{g:?}"
        );
        assert!((1.0..=2.0).contains(&g.max_step), "{g:?}");
        let s = g.measure(&real).unwrap();
        assert_eq!((s.single_blob, s.track_continuity), (1.0, 1.0));
        // One frame empty of 8: 7/8 single; pairs 2-3 and 3-4 broken of 7: 5/7 continuous.
        let mut gap = sliding(1, 8);
        gap[3] = None;
        let s = g.measure(&clips(&[gap])).unwrap();
        assert!((s.single_blob - 7.0 / 8.0).abs() < 1e-6, "{s:?}");
        assert!((s.track_continuity - 5.0 / 7.0).abs() < 1e-6, "{s:?}");
        // A block that jumps 8 columns between frames 4 and 5: every frame single, 6/7 continuous.
        let mut jump = sliding(1, 8);
        for c in jump.iter_mut().skip(5) {
            *c = c.map(|(c0, r0)| (c0 - 4, r0 + 8).min((12, 12)));
        }
        let s = g.measure(&clips(&[jump])).unwrap();
        assert_eq!(s.single_blob, 1.0);
        assert!((s.track_continuity - 6.0 / 7.0).abs() < 1e-6, "{s:?}");
        // Two blocks in every frame: no frame counts.
        let two: Tensor = (clips(&[sliding(1, 8)])
            + clips(&[(0..8).map(|_| Some((10, 11))).collect()]))
        .unwrap()
        .affine(1.0, -0.2)
        .unwrap();
        let s = g.measure(&two).unwrap();
        assert_eq!((s.single_blob, s.track_continuity), (0.0, 0.0));
    }

    #[test]
    fn flat_real_clips_cannot_fit_a_gate() {
        let flat = clips(&[vec![None; 4]]);
        assert!(BlobGate::fit(&flat).is_err());
        assert!(BlobGate::fit(&flat.get(0).unwrap()).is_err());
    }
}
