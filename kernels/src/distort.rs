//! DF-DPO distortion operators (paper section 5.1): a real clip is the winner, a distorted copy of it
//! the loser. Temporal ops reorder frames, spatial ops degrade pixels, hybrid does one of each; a
//! curriculum changes the operator mix and strength every K steps (Algorithm 1, line 15-17).

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

use crate::rng::randn;
use crate::{KernelError, Result};

/// Largest share of the frames a partial shuffle may permute ("m - k <= 0.2 T" in section 5.1).
pub const SHUFFLE_MAX_FRAC: f32 = 0.2;

/// The clip's (frames, channels, height, width), or a shape error naming `op`.
fn clip_dims(op: &'static str, clip: &Tensor) -> Result<(usize, usize, usize, usize)> {
    match clip.dims() {
        &[t, c, h, w] if t > 0 && c > 0 && h > 0 && w > 0 => Ok((t, c, h, w)),
        d => Err(KernelError::shape(
            op,
            format!("clip is {d:?}, expected nonempty [frames, channels, height, width]"),
        )),
    }
}

/// `clip` with its frames reordered: output frame t is input frame `src[t]`.
fn reorder_frames(clip: &Tensor, src: &[usize]) -> Result<Tensor> {
    let idx: Vec<u32> = src.iter().map(|&i| i as u32).collect();
    let idx = Tensor::from_vec(idx, src.len(), clip.device())?;
    Ok(clip.index_select(&idx, 0)?)
}

/// Global reversal (eq. 4, phi(t) = T + 1 - t): frame t of the output is frame T-1-t of `clip`.
///
/// `clip`: [T, C, H, W]; returns the same shape.
pub fn global_reversal(clip: &Tensor) -> Result<Tensor> {
    let (t, ..) = clip_dims("global_reversal", clip)?;
    let src: Vec<usize> = (0..t).rev().collect();
    reorder_frames(clip, &src)
}

/// Which frames a partial shuffle moved: output frame `start + i` is input frame `start + perm[i]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShuffleInfo {
    /// First frame of the permuted block.
    pub start: usize,
    /// Number of frames in the block (>= 2).
    pub len: usize,
    /// Permutation of `0..len`, never the identity.
    pub perm: Vec<usize>,
}

/// Partial shuffle (eq. 4, P(t)): permute the frames inside one random block of consecutive frames,
/// leave every other frame untouched.
///
/// The block length is uniform in `2..=max(2, floor(max_frac * T))` and its start uniform over the
/// positions where it fits. The permutation is uniform over the non-identity permutations (drawn
/// again while it is the identity), so the output always differs in frame order from `clip`. For
/// T < 10 at `max_frac = 0.2` the block has 2 frames, which is more than 0.2 T but the smallest
/// shuffle that changes anything.
///
/// `clip`: [T, C, H, W]. Errors: `max_frac` outside (0, 1]; fewer than 2 frames (parameter
/// `clip frames`: a single frame has no order to break).
pub fn partial_shuffle(
    clip: &Tensor,
    max_frac: f32,
    rng: &mut StdRng,
) -> Result<(Tensor, ShuffleInfo)> {
    let (t, ..) = clip_dims("partial_shuffle", clip)?;
    if !(max_frac > 0.0 && max_frac <= 1.0) {
        return Err(KernelError::param(
            "max_frac",
            max_frac,
            "must be in (0, 1]",
        ));
    }
    if t < 2 {
        return Err(KernelError::param(
            "clip frames",
            t,
            "partial shuffle needs at least 2 frames",
        ));
    }
    // floor(max_frac * T) <= T because max_frac <= 1, and 2 <= T, so the block always fits.
    let max_len = ((max_frac as f64 * t as f64).floor() as usize).clamp(2, t);
    let len = rng.random_range(2..=max_len);
    let start = rng.random_range(0..=t - len);
    let identity: Vec<usize> = (0..len).collect();
    let mut perm = identity.clone();
    // P(identity) = 1/len! <= 1/2, so this ends after 2 draws on average.
    while perm == identity {
        perm.shuffle(rng);
    }
    let mut src: Vec<usize> = (0..t).collect();
    for (i, &p) in perm.iter().enumerate() {
        src[start + i] = start + p;
    }
    let out = reorder_frames(clip, &src)?;
    Ok((out, ShuffleInfo { start, len, perm }))
}

/// Normalised 1-D Gaussian weights exp(-k^2 / (2 sigma^2)) for k in -radius..=radius.
fn gaussian_weights(sigma: f32, radius: usize) -> Vec<f32> {
    let s2 = 2.0 * (sigma as f64) * (sigma as f64);
    let r = radius as i64;
    let w: Vec<f64> = (-r..=r).map(|k| (-((k * k) as f64) / s2).exp()).collect();
    let total: f64 = w.iter().sum();
    w.iter().map(|&x| (x / total) as f32).collect()
}

/// Source indices of a half-sample symmetric extension of `0..n` by `radius` on each side:
/// ... 1 0 | 0 1 ... n-1 | n-1 n-2 ... The extension is periodic with period 2n, so it is defined
/// for any radius, also one larger than n.
fn reflect_indices(n: usize, radius: usize, device: &Device) -> Result<Tensor> {
    let (n_i, r_i) = (n as i64, radius as i64);
    let idx: Vec<u32> = (-r_i..n_i + r_i)
        .map(|i| {
            let m = i.rem_euclid(2 * n_i);
            (if m < n_i { m } else { 2 * n_i - 1 - m }) as u32
        })
        .collect();
    Ok(Tensor::from_vec(idx, n + 2 * radius, device)?)
}

/// Separable Gaussian blur over height and width, per frame and channel (the blur of G in eq. 5).
///
/// Kernel radius ceil(3 sigma), weights exp(-k^2 / (2 sigma^2)) normalised to sum 1. Borders use
/// half-sample symmetric reflection (`... b a | a b c ... | c b ...`, scipy.ndimage `reflect`,
/// OpenCV `BORDER_REFLECT`), repeated when the radius exceeds the image. With that padding the
/// blurred signal is the restriction of a periodic, mirror-symmetric convolution, so the mean of
/// each frame and channel is preserved exactly (up to float rounding) and no energy leaks in or out
/// at the borders. `sigma = 0` returns the clip unchanged.
///
/// `clip`: [T, C, H, W]; returns the same shape. Errors: `sigma` negative or not finite.
pub fn gaussian_blur(clip: &Tensor, sigma: f32) -> Result<Tensor> {
    let (t, c, h, w) = clip_dims("gaussian_blur", clip)?;
    if !(sigma.is_finite() && sigma >= 0.0) {
        return Err(KernelError::param(
            "sigma",
            sigma,
            "blur sigma must be finite and >= 0",
        ));
    }
    let radius = (3.0 * sigma as f64).ceil() as usize;
    if radius == 0 {
        return Ok(clip.clone());
    }
    let dev = clip.device();
    let k = 2 * radius + 1;
    let weights = gaussian_weights(sigma, radius);
    let kh = Tensor::from_vec(weights.clone(), (1, 1, k, 1), dev)?.to_dtype(clip.dtype())?;
    let kw = Tensor::from_vec(weights, (1, 1, 1, k), dev)?.to_dtype(clip.dtype())?;
    // Every (frame, channel) plane is one single-channel image: [T*C, 1, H, W].
    let x = clip.reshape((t * c, 1, h, w))?;
    let x = x.index_select(&reflect_indices(h, radius, dev)?, 2)?; // [T*C, 1, H+2r, W]
    let x = x.conv2d(&kh, 0, 1, 1, 1)?; // [T*C, 1, H, W]
    let x = x.index_select(&reflect_indices(w, radius, dev)?, 3)?; // [T*C, 1, H, W+2r]
    let x = x.conv2d(&kw, 0, 1, 1, 1)?; // [T*C, 1, H, W]
    Ok(x.reshape((t, c, h, w))?)
}

/// Colour shift (the colour part of G in eq. 5): `scale * clip + shift[c]`, the same offset for every
/// frame and pixel of channel c. `scale = 1` is a pure shift, which moves the mean of channel c by
/// exactly `shift[c]`; the scale is a contrast change about 0 (the middle of [-1, 1]).
///
/// `clip`: [T, C, H, W], `shift`: C values. Errors: `shift` of the wrong length, non-finite values.
pub fn colour_shift(clip: &Tensor, shift: &[f32], scale: f32) -> Result<Tensor> {
    let (_, c, ..) = clip_dims("colour_shift", clip)?;
    if shift.len() != c {
        return Err(KernelError::shape(
            "colour_shift",
            format!("shift has {} values for {c} channels", shift.len()),
        ));
    }
    if let Some(s) = shift.iter().find(|s| !s.is_finite()) {
        return Err(KernelError::param("shift", s, "must be finite"));
    }
    if !scale.is_finite() {
        return Err(KernelError::param("scale", scale, "must be finite"));
    }
    let offset =
        Tensor::from_vec(shift.to_vec(), (1, c, 1, 1), clip.device())?.to_dtype(clip.dtype())?;
    let scaled = if scale == 1.0 {
        clip.clone()
    } else {
        clip.affine(scale as f64, 0.0)?
    };
    Ok(scaled.broadcast_add(&offset)?)
}

/// Largest per-channel colour offset at `strength` in [0, 1]: 0.05 + 0.45 * strength (0.5 at 1).
pub fn colour_magnitude(strength: f32) -> f32 {
    0.05 + 0.45 * strength
}

/// Gaussian blur sigma (pixels) at `strength` in [0, 1]: 0.5 + 2.5 * strength.
pub fn blur_sigma(strength: f32) -> f32 {
    0.5 + 2.5 * strength
}

/// Pixel-noise sigma at `strength` in [0, 1]: 0.05 + 0.45 * strength (data in [-1, 1]).
pub fn noise_sigma(strength: f32) -> f32 {
    0.05 + 0.45 * strength
}

/// A colour shift with random per-channel offsets and scale 1. Each channel's offset has a random
/// sign and a magnitude uniform in [0.5, 1] * `colour_magnitude(strength)`, so even the weakest shift
/// is visible. Returns the shifted clip and the offsets.
///
/// `clip`: [T, C, H, W]. Errors: `strength` outside [0, 1].
pub fn random_colour_shift(
    clip: &Tensor,
    strength: f32,
    rng: &mut StdRng,
) -> Result<(Tensor, Vec<f32>)> {
    let (_, c, ..) = clip_dims("random_colour_shift", clip)?;
    check_strength(strength)?;
    let m = colour_magnitude(strength);
    let shift: Vec<f32> = (0..c)
        .map(|_| {
            let sign = if rng.random_bool(0.5) { 1.0 } else { -1.0 };
            sign * m * (0.5 + 0.5 * rng.random::<f32>())
        })
        .collect();
    let out = colour_shift(clip, &shift, 1.0)?;
    Ok((out, shift))
}

/// Pixel noise (epsilon_t in eq. 5): `clip + sigma * z`, z i.i.d. N(0, 1) drawn from `rng`.
/// `sigma = 0` returns the clip unchanged and draws nothing.
///
/// `clip`: [T, C, H, W]; returns the same shape. Errors: `sigma` negative or not finite.
pub fn pixel_noise(clip: &Tensor, sigma: f32, rng: &mut StdRng) -> Result<Tensor> {
    clip_dims("pixel_noise", clip)?;
    if !(sigma.is_finite() && sigma >= 0.0) {
        return Err(KernelError::param(
            "sigma",
            sigma,
            "noise sigma must be finite and >= 0",
        ));
    }
    if sigma == 0.0 {
        return Ok(clip.clone());
    }
    let z = randn(rng, clip.shape(), clip.device())?.to_dtype(clip.dtype())?;
    Ok((clip + z.affine(sigma as f64, 0.0)?)?)
}

/// Hybrid distortion (eq. 6, G(v_phi(t)) + eps): one temporal op (global reversal or partial
/// shuffle, equally likely) and then one spatial op (blur, colour shift or noise, equally likely)
/// at `strength`. The detail names both, e.g. `reverse; blur sigma=1.750`.
///
/// `clip`: [T, C, H, W]. Errors: as the chosen operators, and `strength` outside [0, 1].
pub fn hybrid(clip: &Tensor, strength: f32, rng: &mut StdRng) -> Result<Applied> {
    check_strength(strength)?;
    let temporal = if rng.random_bool(0.5) {
        Distortion::Reverse
    } else {
        Distortion::Shuffle
    };
    let spatial =
        [Distortion::Blur, Distortion::ColourShift, Distortion::Noise][rng.random_range(0..3usize)];
    let first = temporal.apply(clip, strength, rng)?;
    let second = spatial.apply(&first.clip, strength, rng)?;
    Ok(Applied {
        clip: second.clip,
        op: Distortion::Hybrid,
        detail: format!("{}; {}", first.detail, second.detail),
    })
}

fn check_strength(strength: f32) -> Result<()> {
    if (0.0..=1.0).contains(&strength) {
        Ok(())
    } else {
        Err(KernelError::param(
            "strength",
            strength,
            "must be in [0, 1]",
        ))
    }
}

/// One DF-DPO distortion operator. Serialised in snake_case: `reverse`, `shuffle`, `blur`,
/// `colour_shift`, `noise`, `hybrid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Distortion {
    /// Global reversal (frame t -> T-1-t).
    Reverse,
    /// Partial shuffle of a block of at most 0.2 T frames.
    Shuffle,
    /// Gaussian blur, sigma = `blur_sigma(strength)`.
    Blur,
    /// Random per-channel colour offset, magnitude up to `colour_magnitude(strength)`.
    ColourShift,
    /// Pixel noise N(0, sigma^2), sigma = `noise_sigma(strength)`.
    Noise,
    /// One temporal and one spatial op together.
    Hybrid,
}

/// A distorted clip and what was done to it.
#[derive(Debug, Clone)]
pub struct Applied {
    /// The distorted clip, [T, C, H, W].
    pub clip: Tensor,
    /// The operator that was applied.
    pub op: Distortion,
    /// Its drawn parameters in words, for logs (e.g. `shuffle start=3 len=3 perm=[2, 0, 1]`).
    pub detail: String,
}

impl Distortion {
    /// Every operator, in declaration order.
    pub const ALL: [Distortion; 6] = [
        Distortion::Reverse,
        Distortion::Shuffle,
        Distortion::Blur,
        Distortion::ColourShift,
        Distortion::Noise,
        Distortion::Hybrid,
    ];

    /// The serialised name (`reverse`, `colour_shift`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            Distortion::Reverse => "reverse",
            Distortion::Shuffle => "shuffle",
            Distortion::Blur => "blur",
            Distortion::ColourShift => "colour_shift",
            Distortion::Noise => "noise",
            Distortion::Hybrid => "hybrid",
        }
    }

    /// Whether the op breaks frame order (reverse, shuffle, and hybrid, which contains one).
    pub fn is_temporal(&self) -> bool {
        matches!(
            self,
            Distortion::Reverse | Distortion::Shuffle | Distortion::Hybrid
        )
    }

    /// Whether the op degrades pixels (blur, colour shift, noise, and hybrid, which contains one).
    pub fn is_spatial(&self) -> bool {
        matches!(
            self,
            Distortion::Blur | Distortion::ColourShift | Distortion::Noise | Distortion::Hybrid
        )
    }

    /// Distort one clip [T, C, H, W] at `strength` in [0, 1] (1 = strongest, easiest to tell apart).
    ///
    /// Strength maps to parameters as: blur sigma = 0.5 + 2.5 s; noise sigma = 0.05 + 0.45 s;
    /// colour offsets up to 0.05 + 0.45 s per channel; reversal has no parameter; the shuffle
    /// block is always at most 0.2 T frames (the paper's bound), whatever the strength.
    pub fn apply(&self, clip: &Tensor, strength: f32, rng: &mut StdRng) -> Result<Applied> {
        check_strength(strength)?;
        let (clip, detail) = match self {
            Distortion::Reverse => (global_reversal(clip)?, "reverse".to_string()),
            Distortion::Shuffle => {
                let (out, info) = partial_shuffle(clip, SHUFFLE_MAX_FRAC, rng)?;
                let detail = format!(
                    "shuffle start={} len={} perm={:?}",
                    info.start, info.len, info.perm
                );
                (out, detail)
            }
            Distortion::Blur => {
                let sigma = blur_sigma(strength);
                (
                    gaussian_blur(clip, sigma)?,
                    format!("blur sigma={sigma:.3}"),
                )
            }
            Distortion::ColourShift => {
                let (out, shift) = random_colour_shift(clip, strength, rng)?;
                (out, format!("colour_shift shift={shift:.3?}"))
            }
            Distortion::Noise => {
                let sigma = noise_sigma(strength);
                (
                    pixel_noise(clip, sigma, rng)?,
                    format!("noise sigma={sigma:.3}"),
                )
            }
            Distortion::Hybrid => return hybrid(clip, strength, rng),
        };
        Ok(Applied {
            clip,
            op: *self,
            detail,
        })
    }

    /// Distort every clip of a batch [B, T, C, H, W] in turn, drawing from the same `rng`, so each
    /// clip gets its own parameters. Returns the distorted batch and one detail per clip.
    pub fn apply_batch(
        &self,
        batch: &Tensor,
        strength: f32,
        rng: &mut StdRng,
    ) -> Result<(Tensor, Vec<String>)> {
        let b = match batch.dims() {
            &[b, ..] if batch.rank() == 5 && b > 0 => b,
            d => {
                return Err(KernelError::shape(
                    "Distortion::apply_batch",
                    format!("batch is {d:?}, expected nonempty [batch, frames, channels, h, w]"),
                ))
            }
        };
        let mut clips = Vec::with_capacity(b);
        let mut details = Vec::with_capacity(b);
        for i in 0..b {
            let applied = self.apply(&batch.get(i)?, strength, rng)?;
            clips.push(applied.clip);
            details.push(applied.detail);
        }
        Ok((Tensor::stack(&clips, 0)?, details))
    }
}

impl std::fmt::Display for Distortion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Distortion {
    type Err = KernelError;

    /// Parse a serialised name (`reverse`, `shuffle`, `blur`, `colour_shift`, `noise`, `hybrid`).
    fn from_str(s: &str) -> Result<Self> {
        Distortion::ALL
            .into_iter()
            .find(|d| d.name() == s)
            .ok_or_else(|| {
                KernelError::param(
                    "distortion",
                    s,
                    "expected reverse, shuffle, blur, colour_shift, noise or hybrid",
                )
            })
    }
}

/// One curriculum stage: which operators to draw (with relative weights) and at what strength.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CurriculumStage {
    /// Operators and their relative weights (> 0), e.g. `[["reverse", 2.0], ["blur", 1.0]]`.
    pub ops: Vec<(Distortion, f32)>,
    /// Strength in [0, 1] passed to `Distortion::apply` (1 = strongest, easiest).
    pub strength: f32,
}

/// A curriculum over distortion operators (Algorithm 1, "UpdateDistortionOperators" every K
/// steps): stage `min(step / every, stages.len() - 1)` is active at `step`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Curriculum {
    /// K: learner steps per stage (>= 1). Default 1000.
    pub every: u64,
    /// The stages in order; the last one stays active forever. Default: `default_schedule()`.
    pub stages: Vec<CurriculumStage>,
}

impl Default for Curriculum {
    fn default() -> Self {
        Self::default_schedule()
    }
}

/// Strictly positive and finite.
fn positive(w: f32) -> bool {
    w.is_finite() && w > 0.0
}

impl Curriculum {
    /// The default three-stage schedule, K = 1000 steps per stage, from coarse to subtle artifacts:
    ///
    /// | stage | steps       | strength | ops (weight)                                                  |
    /// |-------|-------------|----------|---------------------------------------------------------------|
    /// | easy  | [0, K)      | 1.0      | reverse 2, blur 1, colour_shift 1, noise 1                    |
    /// | mid   | [K, 2K)     | 0.6      | reverse 1, shuffle 2, blur 1, colour_shift 1, noise 1, hybrid 1 |
    /// | hard  | [2K, ...)   | 0.25     | reverse 1, shuffle 2, blur 1, colour_shift 1, noise 1, hybrid 2 |
    ///
    /// Easy: strong spatial damage and whole-clip reversal, which are obvious. Mid: partial shuffles
    /// (local disorder) enter and hybrids appear. Hard: weak spatial damage, so the model must tell
    /// pairs apart by small block shuffles and coupled temporal-spatial artifacts.
    pub fn default_schedule() -> Self {
        use Distortion::*;
        Curriculum {
            every: 1000,
            stages: vec![
                CurriculumStage {
                    ops: vec![
                        (Reverse, 2.0),
                        (Blur, 1.0),
                        (ColourShift, 1.0),
                        (Noise, 1.0),
                    ],
                    strength: 1.0,
                },
                CurriculumStage {
                    ops: vec![
                        (Reverse, 1.0),
                        (Shuffle, 2.0),
                        (Blur, 1.0),
                        (ColourShift, 1.0),
                        (Noise, 1.0),
                        (Hybrid, 1.0),
                    ],
                    strength: 0.6,
                },
                CurriculumStage {
                    ops: vec![
                        (Reverse, 1.0),
                        (Shuffle, 2.0),
                        (Blur, 1.0),
                        (ColourShift, 1.0),
                        (Noise, 1.0),
                        (Hybrid, 2.0),
                    ],
                    strength: 0.25,
                },
            ],
        }
    }

    /// The default schedule's K and stage strengths, but every stage draws uniformly from `kinds`
    /// (duplicates count once). For the ablations: temporal-only `[Reverse, Shuffle]`,
    /// spatial-only `[Blur, ColourShift, Noise]`, hybrid-only `[Hybrid]`. Errors: `kinds` empty.
    pub fn only(kinds: &[Distortion]) -> Result<Self> {
        let mut uniq: Vec<Distortion> = Vec::with_capacity(kinds.len());
        for &k in kinds {
            if !uniq.contains(&k) {
                uniq.push(k);
            }
        }
        if uniq.is_empty() {
            return Err(KernelError::param(
                "kinds",
                "[]",
                "need at least one distortion",
            ));
        }
        let mut c = Self::default_schedule();
        for stage in &mut c.stages {
            stage.ops = uniq.iter().map(|&k| (k, 1.0)).collect();
        }
        Ok(c)
    }

    /// Check the curriculum; the error names the offending key (and stage / op index in its reason).
    pub fn validate(&self) -> Result<()> {
        if self.every == 0 {
            return Err(KernelError::param("curriculum.every", 0, "must be >= 1"));
        }
        if self.stages.is_empty() {
            return Err(KernelError::param(
                "curriculum.stages",
                "[]",
                "need at least one stage",
            ));
        }
        for (i, s) in self.stages.iter().enumerate() {
            if !(0.0..=1.0).contains(&s.strength) {
                return Err(KernelError::param(
                    "curriculum.stages.strength",
                    s.strength,
                    format!("stages[{i}].strength must be in [0, 1]"),
                ));
            }
            if s.ops.is_empty() {
                return Err(KernelError::param(
                    "curriculum.stages.ops",
                    "[]",
                    format!("stages[{i}].ops needs at least one operator"),
                ));
            }
            for (j, &(op, w)) in s.ops.iter().enumerate() {
                if !positive(w) {
                    return Err(KernelError::param(
                        "curriculum.stages.ops.weight",
                        w,
                        format!("stages[{i}].ops[{j}] ({op}) weight must be finite and > 0"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The active stage at learner `step`: index `min(step / every, stages.len() - 1)`.
    ///
    /// # Panics
    /// If `stages` is empty; `validate()` rejects that, so validate a curriculum after building or
    /// deserialising it. `every = 0` is treated as 1.
    pub fn stage_at(&self, step: u64) -> (usize, &CurriculumStage) {
        let last = self.stages.len() - 1;
        let idx = usize::try_from(step / self.every.max(1)).map_or(last, |i| i.min(last));
        (idx, &self.stages[idx])
    }

    /// Draw the operator for `step` with probability proportional to its weight in the active
    /// stage, and return it with the stage's strength. Errors: as `validate()`.
    pub fn sample_op(&self, step: u64, rng: &mut StdRng) -> Result<(Distortion, f32)> {
        self.validate()?;
        let (_, stage) = self.stage_at(step);
        Ok((draw_weighted(&stage.ops, rng), stage.strength))
    }

    /// Draw an operator for `step` (as `sample_op`) and apply it to `clip` [T, C, H, W].
    pub fn distort(&self, step: u64, clip: &Tensor, rng: &mut StdRng) -> Result<Applied> {
        let (op, strength) = self.sample_op(step, rng)?;
        op.apply(clip, strength, rng)
    }
}

/// One operator drawn from `ops` with probability proportional to its weight (non-empty, weights
/// positive: the callers validate).
fn draw_weighted<W: Copy + Into<f64>>(ops: &[(Distortion, W)], rng: &mut StdRng) -> Distortion {
    let total: f64 = ops.iter().map(|&(_, w)| w.into()).sum();
    let u = rng.random::<f64>() * total;
    let mut acc = 0.0;
    for &(op, w) in ops {
        acc += w.into();
        if u < acc {
            return op;
        }
    }
    // Only reached when rounding puts u at the very top of the last interval.
    ops[ops.len() - 1].0
}

/// A training set whose arrow of time is wrong at a known rate: exactly `round(share * n)` of the
/// clips `[n, T, C, H, W]`, chosen uniformly without replacement, are replaced by copies edited
/// with an operator drawn from `ops` (weights need not sum to 1) at strength 1. Returns the new
/// set and the sorted indices of the replaced clips. `share` in [0, 1]; `ops` non-empty with
/// positive weights.
pub fn corrupt_share(
    clips: &Tensor,
    share: f64,
    ops: &[(Distortion, f64)],
    rng: &mut StdRng,
) -> Result<(Tensor, Vec<usize>)> {
    if !(0.0..=1.0).contains(&share) {
        return Err(KernelError::param(
            "corrupt share",
            share,
            "must be in [0, 1]",
        ));
    }
    if ops.is_empty() || ops.iter().any(|&(_, w)| !(w.is_finite() && w > 0.0)) {
        return Err(KernelError::param(
            "corrupt ops",
            format!("{ops:?}"),
            "need at least one operator, every weight positive",
        ));
    }
    let n = clips.dim(0)?;
    let k = (share * n as f64).round() as usize;
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(rng);
    let mut chosen = order[..k].to_vec();
    chosen.sort_unstable();
    let mut rows = Vec::with_capacity(n);
    let mut next = chosen.iter().peekable();
    for i in 0..n {
        let clip = clips.get(i)?;
        if next.peek() == Some(&&i) {
            next.next();
            let op = draw_weighted(ops, rng);
            rows.push(op.apply(&clip, 1.0, rng)?.clip);
        } else {
            rows.push(clip);
        }
    }
    Ok((Tensor::stack(&rows, 0)?, chosen))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::rng_for;

    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// corrupt_share replaces exactly round(share * n) clips, each by its own reversal (the only
    /// op listed), and leaves the rest bit for bit; share 0 changes nothing; bad input is refused.
    #[test]
    fn corrupt_share_replaces_exactly_the_share() {
        let d = Device::Cpu;
        let clips = Tensor::arange(0f32, (10 * 4 * 2) as f32, &d)
            .unwrap()
            .reshape((10, 4, 1, 1, 2))
            .unwrap();
        let mut rng = rng_for(1, 0, 0);
        let (out, idx) =
            corrupt_share(&clips, 0.34, &[(Distortion::Reverse, 1.0)], &mut rng).unwrap();
        assert_eq!(idx.len(), 3);
        assert!(idx.windows(2).all(|w| w[0] < w[1]));
        for i in 0..10 {
            let (a, b) = (clips.get(i).unwrap(), out.get(i).unwrap());
            let want = if idx.contains(&i) {
                global_reversal(&a).unwrap()
            } else {
                a
            };
            assert_eq!(flat(&b), flat(&want), "clip {i}");
        }
        let (same, none) =
            corrupt_share(&clips, 0.0, &[(Distortion::Shuffle, 1.0)], &mut rng).unwrap();
        assert!(none.is_empty());
        assert_eq!(flat(&same), flat(&clips));
        assert!(corrupt_share(&clips, 1.5, &[(Distortion::Reverse, 1.0)], &mut rng).is_err());
        assert!(corrupt_share(&clips, 0.5, &[], &mut rng).is_err());
        assert!(corrupt_share(&clips, 0.5, &[(Distortion::Reverse, 0.0)], &mut rng).is_err());
    }

    /// A clip [T, C, H, W] of standard normals, fixed by `seed`.
    fn clip(t: usize, c: usize, h: usize, w: usize, seed: u64) -> Tensor {
        randn(&mut rng_for(seed, 99, 0), (t, c, h, w), &Device::Cpu).unwrap()
    }

    /// Per-(frame, channel) means of a clip [T, C, H, W] in f64.
    fn plane_means(t: &Tensor) -> Vec<f64> {
        let (tt, c, h, w) = t.dims4().unwrap();
        let v = flat(t);
        let n = h * w;
        (0..tt * c)
            .map(|p| v[p * n..(p + 1) * n].iter().map(|&x| x as f64).sum::<f64>() / n as f64)
            .collect()
    }

    #[test]
    fn reversal_twice_is_identity_and_maps_t_to_last_minus_t() {
        // Involution: phi(phi(t)) = t for phi(t) = T-1-t (eq. 4), so bitwise equality.
        let x = clip(7, 3, 4, 5, 1);
        let twice = global_reversal(&global_reversal(&x).unwrap()).unwrap();
        assert_eq!(flat(&x), flat(&twice));
        // Hand case: T = 4, frame t filled with the value t -> output frame t holds 3 - t.
        let frames: Vec<f32> = (0..4).flat_map(|t| vec![t as f32; 2 * 2 * 2]).collect();
        let x = Tensor::from_vec(frames, (4, 2, 2, 2), &Device::Cpu).unwrap();
        let r = flat(&global_reversal(&x).unwrap());
        for t in 0..4 {
            assert!(r[t * 8..(t + 1) * 8].iter().all(|&v| v == (3 - t) as f32));
        }
    }

    #[test]
    fn partial_shuffle_moves_only_one_small_block() {
        // Section 5.1: one block of at most 0.2 T frames is permuted; here T = 16 so
        // len <= max(2, floor(3.2)) = 3. Frame t carries the value t in its first pixel and noise
        // elsewhere, so each output frame's origin can be read off and compared bitwise.
        let t = 16;
        let x = clip(t, 2, 3, 3, 5);
        let x = x
            .slice_assign(
                &[0..t, 0..1, 0..1, 0..1],
                &Tensor::arange(0f32, t as f32, &Device::Cpu)
                    .unwrap()
                    .reshape((t, 1, 1, 1))
                    .unwrap(),
            )
            .unwrap();
        let frame_len = 2 * 3 * 3;
        let xv = flat(&x);
        let mut lens_seen = [false; 4];
        for seed in 0..300 {
            let (y, info) =
                partial_shuffle(&x, SHUFFLE_MAX_FRAC, &mut rng_for(seed, 0, 0)).unwrap();
            let yv = flat(&y);
            assert!((2..=3).contains(&info.len), "len {}", info.len);
            assert!(info.start + info.len <= t);
            lens_seen[info.len] = true;
            let src: Vec<usize> = (0..t).map(|f| yv[f * frame_len] as usize).collect();
            for f in 0..t {
                let out = &yv[f * frame_len..(f + 1) * frame_len];
                let inside = f >= info.start && f < info.start + info.len;
                let expected_src = if inside {
                    info.start + info.perm[f - info.start]
                } else {
                    f
                };
                assert_eq!(src[f], expected_src, "seed {seed} frame {f}");
                // Whole frame bitwise equal to its source frame (unchanged outside the block).
                assert_eq!(
                    out,
                    &xv[expected_src * frame_len..(expected_src + 1) * frame_len]
                );
            }
            let mut block: Vec<usize> = src[info.start..info.start + info.len].to_vec();
            assert!(
                block.iter().enumerate().any(|(i, &s)| s != info.start + i),
                "identity"
            );
            block.sort_unstable();
            assert_eq!(
                block,
                (info.start..info.start + info.len).collect::<Vec<_>>()
            );
        }
        // Both allowed lengths occur (uniform over {2, 3}, P(missing one in 300) = 2^-299).
        assert!(lens_seen[2] && lens_seen[3]);
    }

    #[test]
    fn partial_shuffle_rejects_bad_inputs_naming_them() {
        // A single frame has no order; max_frac must be in (0, 1] (documented contract).
        let one = clip(1, 1, 2, 2, 0);
        let e = partial_shuffle(&one, 0.2, &mut rng_for(0, 0, 0))
            .unwrap_err()
            .to_string();
        assert!(e.contains("clip frames"), "{e}");
        let e = partial_shuffle(&clip(8, 1, 2, 2, 0), 0.0, &mut rng_for(0, 0, 0))
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_frac"), "{e}");
        // T = 2: the only non-identity permutation is the swap.
        let two = clip(2, 1, 2, 2, 3);
        let (y, info) = partial_shuffle(&two, 0.2, &mut rng_for(0, 0, 0)).unwrap();
        assert_eq!(
            info,
            ShuffleInfo {
                start: 0,
                len: 2,
                perm: vec![1, 0]
            }
        );
        assert_eq!(flat(&y), flat(&global_reversal(&two).unwrap()));
    }

    #[test]
    fn blur_preserves_plane_means() {
        // Half-sample symmetric reflection makes the blur a periodic, mirror-symmetric convolution
        // with a kernel summing to 1, so each plane's mean is preserved exactly in real arithmetic.
        // Tolerance 1e-4: f32 rounding over <= 31 taps per pass on N(0,1) data is ~1e-6.
        // sigma = 5 has radius 15 > H = 13, which exercises the repeated reflection.
        let x = clip(3, 3, 13, 17, 2);
        let m0 = plane_means(&x);
        for sigma in [0.7f32, 1.5, 5.0] {
            let m1 = plane_means(&gaussian_blur(&x, sigma).unwrap());
            for (a, b) in m0.iter().zip(&m1) {
                assert!((a - b).abs() < 1e-4, "sigma {sigma}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn blur_matches_a_direct_reference() {
        // Direct f64 evaluation of sum_{i,j} w_i w_j x[refl(h+i), refl(w+j)] with the documented
        // half-sample reflection, including a radius (ceil(3 * 2.2) = 7) larger than W = 5.
        // Tolerance 1e-5: two f32 passes of <= 15 taps on N(0,1) data round at ~1e-6.
        let (h, w) = (6usize, 5usize);
        let x = clip(1, 1, h, w, 12);
        let xv = flat(&x);
        let refl = |i: i64, n: usize| {
            let m = i.rem_euclid(2 * n as i64);
            (if m < n as i64 {
                m
            } else {
                2 * n as i64 - 1 - m
            }) as usize
        };
        for sigma in [0.6f32, 2.2] {
            let r = (3.0 * sigma).ceil() as i64;
            let g: Vec<f64> = (-r..=r)
                .map(|k| (-(k * k) as f64 / (2.0 * (sigma as f64).powi(2))).exp())
                .collect();
            let z: f64 = g.iter().sum();
            let yv = flat(&gaussian_blur(&x, sigma).unwrap());
            for a in 0..h {
                for b in 0..w {
                    let mut acc = 0.0;
                    for i in -r..=r {
                        for j in -r..=r {
                            let wgt = g[(i + r) as usize] * g[(j + r) as usize] / (z * z);
                            acc +=
                                wgt * xv[refl(a as i64 + i, h) * w + refl(b as i64 + j, w)] as f64;
                        }
                    }
                    let got = yv[a * w + b] as f64;
                    assert!(
                        (got - acc).abs() < 1e-5,
                        "sigma {sigma} ({a},{b}): {got} vs {acc}"
                    );
                }
            }
        }
    }

    #[test]
    fn blur_of_constant_is_constant_and_sigma_zero_is_identity() {
        // Normalised weights: sum_k w_k * c = c (up to f32 rounding of the weights, ~1e-7).
        let x = (Tensor::ones((2, 3, 9, 11), candle_core::DType::F32, &Device::Cpu).unwrap()
            * 0.37)
            .unwrap();
        for v in flat(&gaussian_blur(&x, 2.0).unwrap()) {
            assert!((v - 0.37).abs() < 1e-6, "{v}");
        }
        // Radius ceil(3 * 0) = 0: documented identity.
        let y = clip(2, 2, 4, 4, 3);
        assert_eq!(flat(&y), flat(&gaussian_blur(&y, 0.0).unwrap()));
        assert!(gaussian_blur(&y, -1.0)
            .unwrap_err()
            .to_string()
            .contains("sigma"));
    }

    #[test]
    fn blur_kills_a_checkerboard() {
        // (-1)^(h+w) sits at the Nyquist frequency on both axes; the sampled Gaussian's response
        // there is ~2 exp(-pi^2 sigma^2 / 2) ~ 0.014 per axis at sigma = 1 (Poisson summation).
        // Border rows keep at most the centre weight w0 ~ 0.4 per axis under the reflection, so
        // over 32x32 the variance ratio is ~ (mean a^2)^2 ~ (0.013)^2 ~ 2e-4; assert < 1e-3.
        let (h, w) = (32, 32);
        let v: Vec<f32> = (0..h * w)
            .map(|i| if (i / w + i % w) % 2 == 0 { 1.0 } else { -1.0 })
            .collect();
        let x = Tensor::from_vec(v, (1, 1, h, w), &Device::Cpu).unwrap();
        let var = |t: &Tensor| {
            let v = flat(t);
            let m = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
            v.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / v.len() as f64
        };
        let ratio = var(&gaussian_blur(&x, 1.0).unwrap()) / var(&x);
        assert!(ratio < 1e-3, "variance ratio {ratio}"); // measured 1.1e-4
    }

    #[test]
    fn noise_has_the_requested_moments() {
        // 100k N(0, 0.3^2) values (4 x 3 x 100 x 83 = 99.6k): std's relative standard error is
        // 1/sqrt(2n) ~ 0.22%, so 1% is ~4.5 SE; the mean's SE is 0.3/sqrt(n) ~ 1e-3, bound 5e-3.
        let x = Tensor::zeros((4, 3, 100, 83), candle_core::DType::F32, &Device::Cpu).unwrap();
        let v = flat(&pixel_noise(&x, 0.3, &mut rng_for(4, 0, 0)).unwrap());
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let std = (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        assert!(mean.abs() < 5e-3, "mean {mean}");
        assert!((std / 0.3 - 1.0).abs() < 0.01, "std {std}");
    }

    #[test]
    fn colour_shift_moves_channel_means_by_the_shift() {
        // mean(x + s_c) = mean(x) + s_c per channel (linearity); 1e-5 covers f32 rounding.
        let x = clip(3, 3, 8, 8, 6);
        let shift = [0.25f32, -0.1, 0.4];
        let y = colour_shift(&x, &shift, 1.0).unwrap();
        let (m0, m1) = (plane_means(&x), plane_means(&y));
        for p in 0..9 {
            let s = shift[p % 3] as f64;
            assert!((m1[p] - m0[p] - s).abs() < 1e-5, "plane {p}");
        }
        // Wrong number of offsets is a shape error.
        assert!(colour_shift(&x, &[0.1, 0.2], 1.0).is_err());
        // Random variant: |shift_c| in [0.5, 1] * colour_magnitude(s) (its documented range).
        let (_, s) = random_colour_shift(&x, 1.0, &mut rng_for(1, 0, 0)).unwrap();
        assert!(s.iter().all(|v| (0.25..=0.5).contains(&v.abs())), "{s:?}");
    }

    #[test]
    fn same_seed_same_clip_other_seed_other_clip() {
        // Reproducibility contract: all randomness comes from the passed StdRng.
        let x = clip(10, 3, 6, 6, 7);
        for op in Distortion::ALL {
            let a = flat(&op.apply(&x, 0.5, &mut rng_for(1, 2, 3)).unwrap().clip);
            let b = flat(&op.apply(&x, 0.5, &mut rng_for(1, 2, 3)).unwrap().clip);
            assert_eq!(a, b, "{op}");
            if matches!(op, Distortion::Reverse | Distortion::Blur) {
                continue; // deterministic operators
            }
            // Some other seed must give another clip (a single pair can collide for shuffle or
            // hybrid, whose parameter spaces are small, so look at 8 seeds).
            let differs = (10..18)
                .any(|s| flat(&op.apply(&x, 0.5, &mut rng_for(s, 2, 3)).unwrap().clip) != a);
            assert!(differs, "{op}");
        }
    }

    #[test]
    fn hybrid_does_one_temporal_and_one_spatial_op() {
        // Eq. 6: G(v_phi(t)) + eps, the detail names the temporal op first, then the spatial one.
        let x = clip(10, 3, 6, 6, 8);
        for seed in 0..20 {
            let a = Distortion::Hybrid
                .apply(&x, 0.5, &mut rng_for(seed, 0, 0))
                .unwrap();
            assert_eq!(a.op, Distortion::Hybrid);
            let (t, s) = a.detail.split_once("; ").expect("two parts");
            assert!(t == "reverse" || t.starts_with("shuffle "), "{}", a.detail);
            assert!(
                s.starts_with("blur ") || s.starts_with("colour_shift ") || s.starts_with("noise "),
                "{}",
                a.detail
            );
            assert_ne!(flat(&a.clip), flat(&x));
        }
    }

    #[test]
    fn apply_batch_equals_per_clip_apply_with_one_rng() {
        // Definition of apply_batch: clip i is distorted with the rng state after clips 0..i.
        let xs = randn(&mut rng_for(9, 0, 0), (3, 6, 2, 4, 4), &Device::Cpu).unwrap();
        let (y, details) = Distortion::Noise
            .apply_batch(&xs, 0.3, &mut rng_for(1, 0, 0))
            .unwrap();
        assert_eq!(details.len(), 3);
        let mut rng = rng_for(1, 0, 0);
        for i in 0..3 {
            let one = Distortion::Noise
                .apply(&xs.get(i).unwrap(), 0.3, &mut rng)
                .unwrap();
            assert_eq!(flat(&one.clip), flat(&y.get(i).unwrap()));
        }
        assert!(Distortion::Noise
            .apply_batch(&xs.get(0).unwrap(), 0.3, &mut rng)
            .is_err());
    }

    #[test]
    fn serde_names_and_strength_checks() {
        // Names fixed by the brief / DESIGN.md config vocabulary; serde's own string deserializer
        // reads unit variants, so no format crate is needed.
        use serde::de::value::{Error as DeError, StrDeserializer};
        use serde::Deserialize;
        let names = [
            "reverse",
            "shuffle",
            "blur",
            "colour_shift",
            "noise",
            "hybrid",
        ];
        for (op, name) in Distortion::ALL.iter().zip(names) {
            let de = Distortion::deserialize(StrDeserializer::<DeError>::new(name)).unwrap();
            assert_eq!(de, *op);
            assert_eq!(op.name(), name);
            assert_eq!(name.parse::<Distortion>().unwrap(), *op);
        }
        assert!("colour".parse::<Distortion>().is_err());
        let x = clip(4, 1, 2, 2, 0);
        let e = Distortion::Blur
            .apply(&x, 1.5, &mut rng_for(0, 0, 0))
            .unwrap_err()
            .to_string();
        assert!(e.contains("strength"), "{e}");
    }

    fn stages(n: usize) -> Vec<CurriculumStage> {
        (0..n)
            .map(|_| CurriculumStage {
                ops: vec![(Distortion::Reverse, 1.0)],
                strength: 0.5,
            })
            .collect()
    }

    #[test]
    fn stage_at_boundaries() {
        // Hand cases for index = min(step / every, 2) with every = 100 and 3 stages.
        let c = Curriculum {
            every: 100,
            stages: stages(3),
        };
        for (step, idx) in [
            (0, 0),
            (99, 0),
            (100, 1),
            (199, 1),
            (200, 2),
            (10_000, 2),
            (u64::MAX, 2),
        ] {
            assert_eq!(c.stage_at(step).0, idx, "step {step}");
        }
        // Default schedule: K = 1000, strengths 1.0 / 0.6 / 0.25 (its doc table).
        let d = Curriculum::default();
        d.validate().unwrap();
        assert_eq!(d.stage_at(999).1.strength, 1.0);
        assert_eq!(d.stage_at(1000).1.strength, 0.6);
        assert_eq!(d.stage_at(5000).1.strength, 0.25);
    }

    #[test]
    fn sampled_frequencies_match_weights() {
        // Weights 1:2:3:4 -> probabilities 0.1..0.4. Over 10k draws the largest standard error is
        // sqrt(0.4 * 0.6 / 1e4) ~ 0.0049; tolerance 0.02 is ~4 SE.
        use Distortion::*;
        let c = Curriculum {
            every: 10,
            stages: vec![
                CurriculumStage {
                    ops: vec![(Blur, 5.0)],
                    strength: 1.0,
                },
                CurriculumStage {
                    ops: vec![(Reverse, 1.0), (Shuffle, 2.0), (Noise, 3.0), (Hybrid, 4.0)],
                    strength: 0.3,
                },
            ],
        };
        let mut rng = rng_for(11, 0, 0);
        let n = 10_000;
        let mut counts = [0usize; 4];
        for _ in 0..n {
            let (op, s) = c.sample_op(25, &mut rng).unwrap();
            assert_eq!(s, 0.3);
            let k = [Reverse, Shuffle, Noise, Hybrid]
                .iter()
                .position(|&o| o == op)
                .unwrap();
            counts[k] += 1;
        }
        for (k, &cnt) in counts.iter().enumerate() {
            let p = (k + 1) as f64 / 10.0;
            assert!((cnt as f64 / n as f64 - p).abs() < 0.02, "op {k}: {cnt}");
        }
        // Stage 0 has a single op.
        assert_eq!(c.sample_op(3, &mut rng).unwrap(), (Blur, 1.0));
    }

    #[test]
    fn validate_names_the_bad_key() {
        // Each case breaks one rule of validate()'s documented contract.
        let good = Curriculum {
            every: 10,
            stages: stages(3),
        };
        good.validate().unwrap();
        let err = |c: &Curriculum| c.validate().unwrap_err().to_string();

        let mut c = good.clone();
        c.every = 0;
        assert!(err(&c).contains("curriculum.every"), "{}", err(&c));

        let mut c = good.clone();
        c.stages.clear();
        assert!(err(&c).contains("curriculum.stages"), "{}", err(&c));

        let mut c = good.clone();
        c.stages[1].ops.clear();
        let e = err(&c);
        assert!(
            e.contains("curriculum.stages.ops") && e.contains("stages[1]"),
            "{e}"
        );

        let mut c = good.clone();
        c.stages[0].ops.push((Distortion::Blur, -1.0));
        let e = err(&c);
        assert!(
            e.contains("curriculum.stages.ops.weight") && e.contains("stages[0].ops[1]"),
            "{e}"
        );

        let mut c = good.clone();
        c.stages[2].ops[0].1 = f32::NAN;
        assert!(err(&c).contains("stages[2].ops[0]"), "{}", err(&c));

        let mut c = good.clone();
        c.stages[2].strength = 1.5;
        let e = err(&c);
        assert!(
            e.contains("curriculum.stages.strength") && e.contains("stages[2]"),
            "{e}"
        );

        // sample_op refuses an invalid curriculum instead of panicking.
        let mut c = good;
        c.stages.clear();
        assert!(c.sample_op(0, &mut rng_for(0, 0, 0)).is_err());
    }

    #[test]
    fn only_restricts_every_stage_to_the_given_kinds() {
        // Ablations: temporal-only, spatial-only, hybrid-only keep K and the stage strengths of
        // the default schedule; duplicates count once; an empty list is an error naming `kinds`.
        use Distortion::*;
        let d = Curriculum::default_schedule();
        let t = Curriculum::only(&[Reverse, Shuffle, Reverse]).unwrap();
        t.validate().unwrap();
        assert_eq!(t.every, d.every);
        for (a, b) in t.stages.iter().zip(&d.stages) {
            assert_eq!(a.ops, vec![(Reverse, 1.0), (Shuffle, 1.0)]);
            assert_eq!(a.strength, b.strength);
        }
        let mut rng = rng_for(3, 0, 0);
        let s = Curriculum::only(&[Blur, ColourShift, Noise]).unwrap();
        for step in [0, 1500, 9000] {
            for _ in 0..50 {
                let (op, _) = s.sample_op(step, &mut rng).unwrap();
                assert!(op.is_spatial() && !op.is_temporal());
                let (op, _) = t.sample_op(step, &mut rng).unwrap();
                assert!(op.is_temporal() && !op.is_spatial());
            }
        }
        assert!(Hybrid.is_temporal() && Hybrid.is_spatial());
        let e = Curriculum::only(&[]).unwrap_err().to_string();
        assert!(e.contains("kinds"), "{e}");
    }
}
