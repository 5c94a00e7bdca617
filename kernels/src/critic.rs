//! The distributional critic of VRPO stage 1: F_phi(c | x_n, n, cond), the CDF of the final reward
//! on a fixed grid c_1 < ... < c_M, monotone by construction; its loss (CRPS + BCE + TV, paper
//! Algorithm 2), the post hoc value V = log sum_m pi_m exp(lambda c_m), and the Table 7 metrics.

use candle_core::{DType, Module, Tensor};
use candle_nn::{Embedding, Init, Linear, VarBuilder};

use crate::denoiser::time_embedding;
use crate::{KernelError, Result};

/// A small default for the `eps` of the BCE logs and of the bin masses (paper, Algorithm 2).
pub const DEFAULT_EPS: f64 = 1e-6;

/// Half-width of the initial logit ramp of [`CdfCritic`]: at initialisation the pre-sigmoid CDF
/// runs from about -4 at c_1 to about +4 at c_M, i.e. a spread-out CDF over the whole grid rather
/// than one that is already saturated (50 increments of softplus(0) = 0.69 would reach logit 34).
pub const INIT_LOGIT_SPAN: f64 = 4.0;

// ---------------------------------------------------------------------------------------------
// Encoders
// ---------------------------------------------------------------------------------------------

/// The swappable trunk of a critic: (x_n, n, cond) -> features.
pub trait CriticEncoder: Send + Sync {
    /// x: [batch, ...] states (all non-batch dims are flattened), n: [batch] f32 training indices,
    /// cond: optional [batch] u32 class ids. Returns features [batch, feat_dim()].
    fn encode(&self, x: &Tensor, n: &Tensor, cond: Option<&Tensor>) -> Result<Tensor>;
    /// Width of the features `encode` returns.
    fn feat_dim(&self) -> usize;
}

fn default_hidden() -> usize {
    128
}
fn default_depth() -> usize {
    3
}
fn default_time_dim() -> usize {
    32
}

/// Shape of an [`MlpEncoder`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlpEncoderConfig {
    /// Number of elements of one state x (the product of its non-batch dims).
    pub in_dim: usize,
    /// Hidden width, which is also the feature width.
    #[serde(default = "default_hidden")]
    pub hidden: usize,
    /// Number of Linear + SiLU layers (>= 1).
    #[serde(default = "default_depth")]
    pub depth: usize,
    /// Width of the sinusoidal time embedding (even, > 0).
    #[serde(default = "default_time_dim")]
    pub time_dim: usize,
    /// Number of classes for conditioning (0 = unconditional).
    #[serde(default)]
    pub classes: usize,
}

impl MlpEncoderConfig {
    /// Check every field; the error names the offending key.
    pub fn validate(&self) -> Result<()> {
        if self.in_dim == 0 {
            return Err(KernelError::param(
                "critic.encoder.in_dim",
                self.in_dim,
                "must be positive",
            ));
        }
        if self.hidden == 0 {
            return Err(KernelError::param(
                "critic.encoder.hidden",
                self.hidden,
                "must be positive",
            ));
        }
        if self.depth == 0 {
            return Err(KernelError::param(
                "critic.encoder.depth",
                self.depth,
                "must be at least 1",
            ));
        }
        if self.time_dim == 0 || self.time_dim % 2 != 0 {
            return Err(KernelError::param(
                "critic.encoder.time_dim",
                self.time_dim,
                "must be even and positive (sin/cos pairs)",
            ));
        }
        Ok(())
    }
}

/// concat(flattened x, time embedding (+ class embedding)) -> `depth` x (Linear, SiLU).
pub struct MlpEncoder {
    cfg: MlpEncoderConfig,
    layers: Vec<Linear>,
    class_emb: Option<Embedding>,
    dtype: DType,
}

impl MlpEncoder {
    /// Build the encoder with its variables in `vb` (names `l0..l{depth-1}`, `class`).
    pub fn new(cfg: MlpEncoderConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let mut layers = Vec::with_capacity(cfg.depth);
        let mut width = cfg.in_dim + cfg.time_dim;
        for i in 0..cfg.depth {
            layers.push(candle_nn::linear(
                width,
                cfg.hidden,
                vb.pp(format!("l{i}")),
            )?);
            width = cfg.hidden;
        }
        let class_emb = if cfg.classes > 0 {
            Some(candle_nn::embedding(
                cfg.classes,
                cfg.time_dim,
                vb.pp("class"),
            )?)
        } else {
            None
        };
        Ok(Self {
            dtype: vb.dtype(),
            cfg,
            layers,
            class_emb,
        })
    }

    /// The configuration this encoder was built with.
    pub fn config(&self) -> &MlpEncoderConfig {
        &self.cfg
    }
}

impl CriticEncoder for MlpEncoder {
    fn encode(&self, x: &Tensor, n: &Tensor, cond: Option<&Tensor>) -> Result<Tensor> {
        const OP: &str = "MlpEncoder::encode";
        if x.rank() < 2 {
            return Err(KernelError::shape(
                OP,
                format!(
                    "x is {:?}, expected [batch, ...] with at least 2 dims",
                    x.dims()
                ),
            ));
        }
        let batch = x.dim(0)?;
        let x = x.flatten_from(1)?; // [batch, in_dim]
        if x.dim(1)? != self.cfg.in_dim {
            return Err(KernelError::shape(
                OP,
                format!(
                    "x has {} elements per row, expected in_dim = {}",
                    x.dim(1)?,
                    self.cfg.in_dim
                ),
            ));
        }
        if n.dims() != [batch] {
            return Err(KernelError::shape(
                OP,
                format!("n is {:?}, expected [{batch}]", n.dims()),
            ));
        }
        let mut temb = time_embedding(n, self.cfg.time_dim)?.to_dtype(self.dtype)?; // [batch, time_dim]
        match (&self.class_emb, cond) {
            (Some(emb), Some(c)) => {
                if c.dims() != [batch] {
                    return Err(KernelError::shape(
                        OP,
                        format!("cond is {:?}, expected [{batch}]", c.dims()),
                    ));
                }
                // Out-of-range class ids are an error (candle's index-select on the CPU, a
                // host check on CUDA), not a panic.
                temb = (temb + crate::denoiser::class_embedding(emb, c)?)?;
            }
            (None, None) => {}
            (Some(_), None) => {
                return Err(KernelError::param(
                    "critic.encoder.cond",
                    "None",
                    format!(
                        "the encoder is class-conditioned (classes = {})",
                        self.cfg.classes
                    ),
                ))
            }
            (None, Some(_)) => {
                return Err(KernelError::param(
                    "critic.encoder.cond",
                    "Some",
                    "the encoder is unconditional (classes = 0); it would silently ignore cond",
                ))
            }
        }
        let mut h = Tensor::cat(&[&x.to_dtype(self.dtype)?, &temb], 1)?; // [batch, in_dim + time_dim]
        for l in &self.layers {
            h = crate::fused::silu(&crate::fused::linear_layer(l, &h)?)?;
        }
        Ok(h) // [batch, hidden]
    }

    fn feat_dim(&self) -> usize {
        self.cfg.hidden
    }
}

// ---------------------------------------------------------------------------------------------
// Grid
// ---------------------------------------------------------------------------------------------

/// The reward grid c_1 < ... < c_M on which the CDF is evaluated. It should cover the rewards:
/// a reward above c_M has the all-zero step CDF as its target, whose bin masses are uniform.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CdfGrid {
    /// The grid points, finite and strictly increasing. Every function here re-checks this.
    pub c: Vec<f64>,
}

impl CdfGrid {
    /// A grid from explicit points (finite, strictly increasing, at least one).
    pub fn new(c: Vec<f64>) -> Result<Self> {
        let g = Self { c };
        g.validate()?;
        Ok(g)
    }

    /// `m` evenly spaced points from `lo` to `hi`, both ends included. `m = 1` gives the single
    /// point `lo`.
    pub fn uniform(lo: f64, hi: f64, m: usize) -> Result<Self> {
        if m == 0 {
            return Err(KernelError::param("critic.grid.m", m, "must be at least 1"));
        }
        if !lo.is_finite() || !hi.is_finite() {
            return Err(KernelError::param(
                "critic.grid",
                format!("[{lo}, {hi}]"),
                "ends must be finite",
            ));
        }
        if m == 1 {
            return Self::new(vec![lo]);
        }
        if lo >= hi {
            return Err(KernelError::param(
                "critic.grid",
                format!("[{lo}, {hi}]"),
                "needs lo < hi when m > 1",
            ));
        }
        let step = (hi - lo) / (m - 1) as f64;
        let mut c: Vec<f64> = (0..m).map(|k| lo + step * k as f64).collect();
        c[m - 1] = hi; // exact end, whatever the rounding of lo + step * (m - 1)
        Self::new(c)
    }

    /// Check the invariants (non-empty, finite, strictly increasing).
    pub fn validate(&self) -> Result<()> {
        if self.c.is_empty() {
            return Err(KernelError::param(
                "critic.grid",
                "[]",
                "needs at least one point",
            ));
        }
        if let Some(v) = self.c.iter().find(|v| !v.is_finite()) {
            return Err(KernelError::param(
                "critic.grid",
                v,
                "points must be finite",
            ));
        }
        if let Some(w) = self.c.windows(2).find(|w| w[0] >= w[1]) {
            return Err(KernelError::param(
                "critic.grid",
                format!("{} >= {}", w[0], w[1]),
                "points must be strictly increasing",
            ));
        }
        Ok(())
    }

    /// Number of points M.
    pub fn len(&self) -> usize {
        self.c.len()
    }

    /// True for an (invalid) empty grid.
    pub fn is_empty(&self) -> bool {
        self.c.is_empty()
    }
}

// ---------------------------------------------------------------------------------------------
// The critic
// ---------------------------------------------------------------------------------------------

/// softplus(x) = ln(1 + e^x), computed as relu(x) + ln(1 + e^-|x|) so that e^x never overflows.
fn softplus(x: &Tensor) -> Result<Tensor> {
    let tail = x.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?;
    Ok((x.relu()? + tail)?)
}

/// F_phi(c_m | x, n, cond) for m = 1..M: encoder -> Linear(feat, M) -> monotone logits -> sigmoid.
///
/// The head's outputs z are read as a first logit l_1 = z_1 and increments: l_m = l_{m-1} +
/// softplus(z_m) >= l_{m-1}, then F_m = sigmoid(l_m). So F_1 <= ... <= F_M for every input and
/// every weight, and F lies in (0, 1) (in f32 it rounds to exactly 0 or 1 beyond |l| ~ 17, which
/// the eps of the BCE and of the bin masses absorb).
pub struct CdfCritic {
    encoder: Box<dyn CriticEncoder>,
    head: Linear,
    offset: Tensor, // [1, M], fixed: the initial logit ramp (see INIT_LOGIT_SPAN)
    grid: CdfGrid,
}

impl CdfCritic {
    /// A critic on `grid` over `encoder`'s features; the head's variables live in `vb.pp("head")`.
    pub fn new(encoder: Box<dyn CriticEncoder>, grid: CdfGrid, vb: VarBuilder) -> Result<Self> {
        grid.validate()?;
        let m = grid.len();
        let feat = encoder.feat_dim();
        if feat == 0 {
            return Err(KernelError::param(
                "critic.encoder.feat_dim",
                feat,
                "must be positive",
            ));
        }
        // Zero weights: at initialisation every input gets the same CDF (the ramp below) whatever
        // the scale of the features, which a random head would turn into saturated logits (50
        // increments). The head's weights get a gradient from the first step, the trunk from the
        // second.
        let hv = vb.pp("head");
        let w = hv.get_with_hints((m, feat), "weight", Init::Const(0.0))?;
        let b = hv.get_with_hints(m, "bias", Init::Const(0.0))?;
        let head = Linear::new(w, Some(b));
        // A constant added to the head's output (a reparametrised bias): l_1 starts near -span and
        // each increment near 2 span / (M - 1), so the initial CDF ramps over the whole grid.
        let mut off = vec![-INIT_LOGIT_SPAN; m];
        if m > 1 {
            let inc = 2.0 * INIT_LOGIT_SPAN / (m - 1) as f64;
            let inv_softplus = inc.exp_m1().ln(); // softplus^-1(inc) = ln(e^inc - 1)
            off[1..].iter_mut().for_each(|o| *o = inv_softplus);
        }
        let offset = Tensor::from_vec(off, (1, m), vb.device())?.to_dtype(vb.dtype())?;
        Ok(Self {
            encoder,
            head,
            offset,
            grid,
        })
    }

    /// The grid the CDF is evaluated on.
    pub fn grid(&self) -> &CdfGrid {
        &self.grid
    }

    /// The trunk.
    pub fn encoder(&self) -> &dyn CriticEncoder {
        self.encoder.as_ref()
    }

    /// Pre-sigmoid CDF logits l: [batch, M], non-decreasing along M.
    pub fn logits(&self, x: &Tensor, n: &Tensor, cond: Option<&Tensor>) -> Result<Tensor> {
        let h = self.encoder.encode(x, n, cond)?; // [batch, feat]
        let z = self.head.forward(&h)?.broadcast_add(&self.offset)?; // [batch, M]
        let m = self.grid.len();
        let mut acc = z.narrow(1, 0, 1)?; // [batch, 1]
        let mut cols = Vec::with_capacity(m);
        cols.push(acc.clone());
        if m > 1 {
            let inc = softplus(&z.narrow(1, 1, m - 1)?)?; // [batch, M - 1], >= 0
                                                          // A running sum rather than candle's cumsum (a matmul with a triangular matrix):
                                                          // fl(a + b) >= a for b >= 0, so monotonicity survives rounding exactly, whereas a
                                                          // matmul sums each column in an order the BLAS chooses.
            for j in 0..m - 1 {
                acc = (acc + inc.narrow(1, j, 1)?)?;
                cols.push(acc.clone());
            }
        }
        Ok(Tensor::cat(&cols, 1)?)
    }

    /// The CDF F_phi(c_m | x, n, cond): [batch, M], in (0, 1), non-decreasing along M.
    pub fn cdf(&self, x: &Tensor, n: &Tensor, cond: Option<&Tensor>) -> Result<Tensor> {
        Ok(candle_nn::ops::sigmoid(&self.logits(x, n, cond)?)?)
    }

    /// The post hoc value V_phi(x, n; lambda) = log sum_m pi_m exp(lambda c_m): [batch]. See
    /// [`value_from_cdf`].
    pub fn value(
        &self,
        x: &Tensor,
        n: &Tensor,
        cond: Option<&Tensor>,
        lambda: f64,
        eps: f64,
    ) -> Result<Tensor> {
        value_from_cdf(&self.cdf(x, n, cond)?, &self.grid, lambda, eps)
    }
}

// ---------------------------------------------------------------------------------------------
// Losses (paper, Algorithm 2, steps 6-9)
// ---------------------------------------------------------------------------------------------

/// Check that f is [B, M] for the grid's M and y is [B]; returns (B, M).
fn check_fy(op: &'static str, f: &Tensor, y: &Tensor, grid: &CdfGrid) -> Result<(usize, usize)> {
    grid.validate()?;
    let (b, m) = check_f(op, f)?;
    if m != grid.len() {
        return Err(KernelError::shape(
            op,
            format!("f has {m} columns but the grid has {} points", grid.len()),
        ));
    }
    if y.dims() != [b] {
        return Err(KernelError::shape(
            op,
            format!("y is {:?}, expected [{b}]", y.dims()),
        ));
    }
    Ok((b, m))
}

/// Check that f is a non-empty [B, M]; returns (B, M).
fn check_f(op: &'static str, f: &Tensor) -> Result<(usize, usize)> {
    match *f.dims() {
        [b, m] if b > 0 && m > 0 => Ok((b, m)),
        _ => Err(KernelError::shape(
            op,
            format!("f is {:?}, expected non-empty [batch, M]", f.dims()),
        )),
    }
}

fn check_eps(eps: f64) -> Result<()> {
    if !eps.is_finite() || eps < 0.0 {
        return Err(KernelError::param(
            "critic.eps",
            eps,
            "must be finite and >= 0",
        ));
    }
    Ok(())
}

/// The step CDF of point masses at y: 1{c_m >= y_i}, [B, M] in `dtype` (y: [B]). The comparison
/// is made in f64, so it agrees exactly with [`bucket_of`].
pub fn step_cdf(y: &Tensor, grid: &CdfGrid, dtype: DType) -> Result<Tensor> {
    grid.validate()?;
    if y.rank() != 1 {
        return Err(KernelError::shape(
            "step_cdf",
            format!("y is {:?}, expected [batch]", y.dims()),
        ));
    }
    let c = Tensor::from_slice(&grid.c, (1, grid.len()), y.device())?; // [1, M] f64
    let y = y.to_dtype(DType::F64)?.unsqueeze(1)?; // [B, 1]
    Ok(c.broadcast_ge(&y)?.to_dtype(dtype)?)
}

/// CRPS on the grid (Algorithm 2, step 6): (1/B) sum_i sum_m (F_m^i - 1{c_m >= y_i})^2. A sum
/// over the M points, a mean over the batch. f: [B, M], y: [B]; returns a scalar.
pub fn crps_loss(f: &Tensor, y: &Tensor, grid: &CdfGrid) -> Result<Tensor> {
    check_fy("crps_loss", f, y, grid)?;
    let target = step_cdf(y, grid, f.dtype())?; // [B, M]
    Ok((f - target)?.sqr()?.sum(1)?.mean(0)?)
}

/// Binary cross-entropy of the CDF on the grid (Algorithm 2, step 7):
/// -(1/B) sum_i sum_m [1{c_m >= y_i} log(F_m^i + eps) + (1 - 1{c_m >= y_i}) log(1 - F_m^i + eps)].
/// f: [B, M], y: [B]; returns a scalar. Use eps > 0 for training: with eps = 0 a saturated F
/// gives an infinite loss.
pub fn bce_loss(f: &Tensor, y: &Tensor, grid: &CdfGrid, eps: f64) -> Result<Tensor> {
    check_fy("bce_loss", f, y, grid)?;
    check_eps(eps)?;
    let target = step_cdf(y, grid, DType::U8)?; // [B, M], 1 where c_m >= y_i
    let log_f = f.affine(1.0, eps)?.log()?; // log(F + eps)
    let log_1mf = f.affine(-1.0, 1.0 + eps)?.log()?; // log(1 - F + eps)
                                                     // A select rather than t log F + (1 - t) log(1 - F): 0 * (-inf) would be NaN when eps = 0.
    let ll = target.where_cond(&log_f, &log_1mf)?; // [B, M]
    Ok(ll.sum(1)?.mean(0)?.neg()?)
}

/// Total-variation smoothness (Algorithm 2, step 8): (1/B) sum_i (1/(M-1)) sum_m |F_{m+1} - F_m|.
/// f: [B, M]; returns a scalar (0 when M = 1). For a monotone F the sum telescopes to
/// (F_M - F_1) / (M - 1), so on [`CdfCritic`] this term only pulls F_M and F_1 together.
pub fn tv_loss(f: &Tensor) -> Result<Tensor> {
    let (_, m) = check_f("tv_loss", f)?;
    if m == 1 {
        return Ok(Tensor::zeros((), f.dtype(), f.device())?);
    }
    let d = (f.narrow(1, 1, m - 1)? - f.narrow(1, 0, m - 1)?)?; // [B, M - 1]
    Ok(d.abs()?
        .sum(1)?
        .mean(0)?
        .affine(1.0 / (m - 1) as f64, 0.0)?)
}

/// Weights of the three critic losses (Algorithm 2, step 9; DESIGN: 0.7 CRPS + 0.3 BCE + small TV).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CriticLossWeights {
    /// Weight of the CRPS term.
    pub crps: f64,
    /// Weight of the BCE term.
    pub bce: f64,
    /// Weight of the total-variation term.
    pub tv: f64,
}

impl Default for CriticLossWeights {
    fn default() -> Self {
        Self {
            crps: 0.7,
            bce: 0.3,
            tv: 0.01,
        }
    }
}

impl CriticLossWeights {
    /// Every weight finite and >= 0; the error names the key.
    pub fn validate(&self) -> Result<()> {
        for (name, w) in [
            ("critic.loss.crps", self.crps),
            ("critic.loss.bce", self.bce),
            ("critic.loss.tv", self.tv),
        ] {
            if !w.is_finite() || w < 0.0 {
                return Err(KernelError::param(name, w, "must be finite and >= 0"));
            }
        }
        Ok(())
    }
}

/// The critic loss and its parts, all scalar tensors; `total` carries the gradient.
#[derive(Debug, Clone)]
pub struct CriticLoss {
    /// w_crps CRPS + w_bce BCE + w_tv TV.
    pub total: Tensor,
    /// Unweighted CRPS.
    pub crps: Tensor,
    /// Unweighted BCE.
    pub bce: Tensor,
    /// Unweighted TV.
    pub tv: Tensor,
}

/// [`CriticLoss`] as numbers, for logging.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CriticLossValues {
    /// Weighted total.
    pub total: f32,
    /// Unweighted CRPS.
    pub crps: f32,
    /// Unweighted BCE.
    pub bce: f32,
    /// Unweighted TV.
    pub tv: f32,
}

impl CriticLoss {
    /// Copy the four scalars to the host (one device sync each).
    pub fn values(&self) -> Result<CriticLossValues> {
        let v = |t: &Tensor| -> Result<f32> { Ok(t.to_dtype(DType::F32)?.to_scalar::<f32>()?) };
        Ok(CriticLossValues {
            total: v(&self.total)?,
            crps: v(&self.crps)?,
            bce: v(&self.bce)?,
            tv: v(&self.tv)?,
        })
    }
}

/// The critic's training loss (Algorithm 2, step 9): w.crps CRPS + w.bce BCE(eps) + w.tv TV.
/// f: [B, M] (e.g. [`CdfCritic::cdf`]), y: [B] rewards of the same rows.
pub fn critic_loss(
    f: &Tensor,
    y: &Tensor,
    grid: &CdfGrid,
    weights: &CriticLossWeights,
    eps: f64,
) -> Result<CriticLoss> {
    weights.validate()?;
    let crps = crps_loss(f, y, grid)?;
    let bce = bce_loss(f, y, grid, eps)?;
    let tv = tv_loss(f)?;
    let total = ((crps.affine(weights.crps, 0.0)? + bce.affine(weights.bce, 0.0)?)?
        + tv.affine(weights.tv, 0.0)?)?;
    Ok(CriticLoss {
        total,
        crps,
        bce,
        tv,
    })
}

// ---------------------------------------------------------------------------------------------
// Post hoc value (paper, Algorithm 2, step 12)
// ---------------------------------------------------------------------------------------------

/// Unnormalised bin masses (F_m - F_{m-1})_+ + eps with F_0 = 0: [B, M].
fn raw_masses(f: &Tensor, eps: f64) -> Result<Tensor> {
    let (_, m) = check_f("bin_masses", f)?;
    check_eps(eps)?;
    let d = if m == 1 {
        f.clone()
    } else {
        let rest = (f.narrow(1, 1, m - 1)? - f.narrow(1, 0, m - 1)?)?; // [B, M - 1]
        Tensor::cat(&[&f.narrow(1, 0, 1)?, &rest], 1)? // [B, M]
    };
    Ok(d.relu()?.affine(1.0, eps)?)
}

/// Bin masses pi_m = ((F_m - F_{m-1})_+ + eps) / sum_l ((F_l - F_{l-1})_+ + eps), F_0 = 0
/// (Algorithm 2, step 12): [B, M], rows sum to 1. pi_m is the mass of (c_{m-1}, c_m] (of
/// (-inf, c_1] for m = 1). The mass above the grid, 1 - F_M, is dropped by the normalisation
/// (the paper's choice), so the grid must reach the largest rewards. With eps = 0 a row with
/// F identically 0 has no mass and gives NaN; use eps > 0 on network outputs.
pub fn bin_masses(f: &Tensor, eps: f64) -> Result<Tensor> {
    let w = raw_masses(f, eps)?; // [B, M]
    Ok(w.broadcast_div(&w.sum_keepdim(1)?)?)
}

/// Post hoc value V = log sum_m pi_m exp(lambda c_m) (Algorithm 2, step 12): [B].
///
/// Computed as a log-sum-exp of a_m = log pi_m + lambda c_m with the row maximum subtracted, so
/// lambda c_m in the hundreds does not overflow (exp(89) already overflows f32). Bins with
/// pi_m = 0 (only possible with eps = 0) give a_m = -inf and drop out exactly. lambda may be any
/// finite number, and may change after training. With eps > 0 the top bin always keeps mass at
/// least eps / (1 + M eps), so V / lambda -> c_M as lambda -> inf whatever the prediction.
pub fn value_from_cdf(f: &Tensor, grid: &CdfGrid, lambda: f64, eps: f64) -> Result<Tensor> {
    let (_, m) = check_f("value_from_cdf", f)?;
    grid.validate()?;
    if m != grid.len() {
        return Err(KernelError::shape(
            "value_from_cdf",
            format!("f has {m} columns but the grid has {} points", grid.len()),
        ));
    }
    if !lambda.is_finite() {
        return Err(KernelError::param(
            "critic.lambda",
            lambda,
            "must be finite",
        ));
    }
    if f.device().is_cuda() {
        // tilt's fused kernel (kernels/cuda/value.cu): the same function, one pass per row.
        return crate::cuda::value_lse(f, grid, lambda, eps);
    }
    let w = raw_masses(f, eps)?; // [B, M]
    let log_z = w.sum_keepdim(1)?.log()?; // [B, 1], normaliser of pi
    let lc: Vec<f64> = grid.c.iter().map(|c| lambda * c).collect();
    let lc = Tensor::from_vec(lc, (1, m), f.device())?.to_dtype(f.dtype())?; // [1, M]
    let a = w.log()?.broadcast_add(&lc)?; // [B, M], log w_m + lambda c_m
    let a_max = a.max_keepdim(1)?; // [B, 1]
    let lse = (a.broadcast_sub(&a_max)?.exp()?.sum_keepdim(1)?.log()? + a_max)?; // [B, 1]
    Ok((lse - log_z)?.squeeze(1)?)
}

// ---------------------------------------------------------------------------------------------
// Metrics (paper, Table 7)
// ---------------------------------------------------------------------------------------------

/// The bin a reward falls in: the first m (0-based) with c_m >= y, i.e. y in (c_{m-1}, c_m],
/// matching [`bin_masses`]. A y above c_M (or NaN) is clamped to the last bin, M - 1; a y at or
/// below c_1 is bin 0.
pub fn bucket_of(y: f64, grid: &CdfGrid) -> usize {
    grid.c
        .iter()
        .position(|&c| c >= y)
        .unwrap_or(grid.c.len().saturating_sub(1))
}

/// Host copies of f ([B, M]) and y ([B]) in f64, with the buckets of y.
fn host_fy(
    op: &'static str,
    f: &Tensor,
    y: &Tensor,
    grid: &CdfGrid,
) -> Result<(Vec<Vec<f64>>, Vec<usize>)> {
    check_fy(op, f, y, grid)?;
    let ys = y.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    if let Some(v) = ys.iter().find(|v| !v.is_finite()) {
        return Err(KernelError::param(
            "critic.reward",
            v,
            "rewards must be finite",
        ));
    }
    let buckets = ys.iter().map(|&v| bucket_of(v, grid)).collect();
    Ok((f.to_dtype(DType::F64)?.to_vec2::<f64>()?, buckets))
}

/// Share of rows whose true bucket (see [`bucket_of`]) is among the k largest bin masses
/// (F_m - F_{m-1})_+. Ties are ranked by bin index (the lower index first), so a flat prediction
/// scores only by luck of position, never by the tie. f: [B, M], y: [B].
pub fn topk_accuracy(f: &Tensor, y: &Tensor, grid: &CdfGrid, k: usize) -> Result<f64> {
    if k == 0 {
        return Err(KernelError::param("critic.topk", k, "must be at least 1"));
    }
    let (rows, buckets) = host_fy("topk_accuracy", f, y, grid)?;
    let mut hits = 0usize;
    for (row, &b) in rows.iter().zip(&buckets) {
        let mass: Vec<f64> = (0..row.len())
            .map(|m| (row[m] - if m == 0 { 0.0 } else { row[m - 1] }).max(0.0))
            .collect();
        let rank = (0..mass.len())
            .filter(|&l| mass[l] > mass[b] || (mass[l] == mass[b] && l < b))
            .count();
        if rank < k {
            hits += 1;
        }
    }
    Ok(hits as f64 / rows.len() as f64)
}

/// Mean over rows of -ln pi_{bucket(y)} with pi = [`bin_masses`]`(f, eps)` (the paper's Table 7
/// "CE"). f: [B, M], y: [B].
pub fn cross_entropy(f: &Tensor, y: &Tensor, grid: &CdfGrid, eps: f64) -> Result<f64> {
    let (_, buckets) = host_fy("cross_entropy", f, y, grid)?;
    let pi = bin_masses(f, eps)?.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    let total: f64 = pi.iter().zip(&buckets).map(|(row, &b)| -row[b].ln()).sum();
    Ok(total / pi.len() as f64)
}

/// The seam the VRPO critic role scores endpoints through: V(x, n; lambda), [batch]. Implemented by
/// the learned `CdfCritic` and by the exact value of the analytic mixture (`mixture::ExactValue`).
pub trait ValueCritic: Send + Sync {
    /// `x`: [batch, ...]; `n`: [batch] f32 training indices; returns V: [batch].
    fn value(&self, x: &Tensor, n: &Tensor, cond: Option<&Tensor>, lambda: f64) -> Result<Tensor>;
}

impl ValueCritic for CdfCritic {
    fn value(&self, x: &Tensor, n: &Tensor, cond: Option<&Tensor>, lambda: f64) -> Result<Tensor> {
        CdfCritic::value(self, x, n, cond, lambda, DEFAULT_EPS)
    }
}

/// The "average score" ablation of the paper ("w/o OVF"): V_mean(x, n; lambda) = lambda
/// sum_m pi_m c_m = lambda E[r | x] from the same CDF, instead of the optimal value
/// log E[exp(lambda r) | x]. By Jensen V_mean <= V; they agree to first order in lambda, and
/// differ where the reward given x is spread out.
pub struct MeanValue<C: DistributionalCritic + ?Sized>(pub std::sync::Arc<C>);

/// lambda sum_m pi_m c_m for CDF rows `f` [B, M]: [B].
pub fn mean_value_from_cdf(f: &Tensor, grid: &CdfGrid, lambda: f64, eps: f64) -> Result<Tensor> {
    let (_, m) = check_f("mean_value_from_cdf", f)?;
    grid.validate()?;
    if m != grid.len() {
        return Err(KernelError::shape(
            "mean_value_from_cdf",
            format!("f has {m} columns but the grid has {} points", grid.len()),
        ));
    }
    let pi = bin_masses(f, eps)?; // [B, M]
    let c = Tensor::from_vec(grid.c.clone(), (m, 1), f.device())?.to_dtype(f.dtype())?;
    Ok((pi.matmul(&c)?.squeeze(1)? * lambda)?)
}

impl<C: DistributionalCritic + ?Sized> ValueCritic for MeanValue<C> {
    fn value(&self, x: &Tensor, n: &Tensor, cond: Option<&Tensor>, lambda: f64) -> Result<Tensor> {
        mean_value_from_cdf(&self.0.cdf(x, n, cond)?, self.0.grid(), lambda, DEFAULT_EPS)
    }
}

/// A critic that predicts the CDF of the final reward on a grid as well as V: what the held-out
/// report scores (CRPS, CE, top-k, calibration) next to the value. Implemented by `CdfCritic`.
pub trait DistributionalCritic: ValueCritic {
    /// The reward grid c_1 < ... < c_M the CDF is predicted on.
    fn grid(&self) -> &CdfGrid;
    /// F(c_m | x, n): [batch, M], nondecreasing in m. `x`: [batch, ...]; `n`: [batch] f32.
    fn cdf(&self, x: &Tensor, n: &Tensor, cond: Option<&Tensor>) -> Result<Tensor>;
}

impl DistributionalCritic for CdfCritic {
    fn grid(&self) -> &CdfGrid {
        CdfCritic::grid(self)
    }
    fn cdf(&self, x: &Tensor, n: &Tensor, cond: Option<&Tensor>) -> Result<Tensor> {
        CdfCritic::cdf(self, x, n, cond)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{rand_uniform, randn, rng_for};
    use candle_core::{Device, Var};
    use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};

    fn enc_cfg(in_dim: usize, classes: usize) -> MlpEncoderConfig {
        MlpEncoderConfig {
            in_dim,
            hidden: 32,
            depth: 2,
            time_dim: 16,
            classes,
        }
    }

    fn critic(vm: &VarMap, cfg: MlpEncoderConfig, grid: CdfGrid) -> CdfCritic {
        let d = Device::Cpu;
        let vb = crate::testutil::vb(vm, 1, &d);
        let enc = MlpEncoder::new(cfg, vb.pp("enc")).unwrap();
        CdfCritic::new(Box::new(enc), grid, vb.pp("critic")).unwrap()
    }

    fn t2(rows: &[&[f64]]) -> Tensor {
        let m = rows[0].len();
        let v: Vec<f64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_vec(v, (rows.len(), m), &Device::Cpu).unwrap()
    }

    fn t1(v: &[f32]) -> Tensor {
        Tensor::from_slice(v, v.len(), &Device::Cpu).unwrap()
    }

    fn scalar(t: &Tensor) -> f64 {
        t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
    }

    fn assert_monotone(f: &[Vec<f32>], open: bool) {
        for row in f {
            for w in row.windows(2) {
                assert!(w[0] <= w[1], "not monotone: {} > {}", w[0], w[1]);
            }
            for &v in row {
                if open {
                    assert!(v > 0.0 && v < 1.0, "F = {v} outside (0, 1)");
                } else {
                    assert!((0.0..=1.0).contains(&v), "F = {v} outside [0, 1]");
                }
            }
        }
    }

    #[test]
    fn cdf_head_is_monotone_and_in_unit_interval() {
        // Expected: monotone by construction (softplus increments, running sum, sigmoid) for any
        // input and any weights. At the default init (zero head) every row is the logistic ramp
        // over [-4, 4], so strictly inside (0, 1); with random weights of moderate size the
        // logits stay well inside |l| < 17, where f32 sigmoid does not round to 0 or 1.
        let d = Device::Cpu;
        let grid = CdfGrid::uniform(-2.0, 3.0, 50).unwrap();
        for seed in 0..4u64 {
            let mut rng = rng_for(seed, 1, 0);
            let classes = if seed % 2 == 0 { 0 } else { 3 };
            let vm = VarMap::new();
            let c = critic(&vm, enc_cfg(4, classes), grid.clone());
            // x is [256, 2, 2]: the encoder flattens the non-batch dims.
            let x = randn(&mut rng, (256, 2, 2), &d).unwrap();
            let n = rand_uniform(&mut rng, 256, &d)
                .unwrap()
                .affine(1000.0, 0.0)
                .unwrap();
            let ids: Vec<u32> = (0..256u32).map(|i| i % 3).collect();
            let cond = (classes > 0).then(|| Tensor::from_vec(ids, 256, &d).unwrap());
            let f = c.cdf(&x, &n, cond.as_ref()).unwrap();
            assert_eq!(f.dims(), [256, 50]);
            let rows = f.to_vec2::<f32>().unwrap();
            assert_monotone(&rows, true);
            assert!(
                (rows[0][0] - 1.0 / (1.0 + 4f32.exp())).abs() < 1e-6,
                "init ramp starts at sigmoid(-4)"
            );

            // Random init: each weight matrix ~ N(0, 1 / fan_in), each bias ~ N(0, 0.1^2) (seeded),
            // so the head's outputs are O(1); then 20x larger, which saturates many outputs:
            // still monotone, and in [0, 1].
            for (scale, open) in [(1.0, true), (20.0, false)] {
                for var in vm.all_vars() {
                    let std = match *var.dims() {
                        [_, fan_in] => 1.0 / (fan_in as f64).sqrt(),
                        _ => 0.1,
                    };
                    let t = randn(&mut rng, var.shape(), &d).unwrap();
                    var.set(&t.affine(scale * std, 0.0).unwrap()).unwrap();
                }
                let rows = c
                    .cdf(&x, &n, cond.as_ref())
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap();
                assert_monotone(&rows, open);
                if open {
                    assert!(rows[0] != rows[1], "rows should depend on the input");
                }
            }
        }
    }

    #[test]
    fn encoder_rejects_bad_inputs() {
        // Expected: shape / parameter errors, never panics (STYLE: no unwrap on data shapes).
        let d = Device::Cpu;
        let grid = CdfGrid::uniform(0.0, 1.0, 5).unwrap();
        let vm = VarMap::new();
        let c = critic(&vm, enc_cfg(2, 0), grid);
        let n = Tensor::zeros(4, DType::F32, &d).unwrap();
        assert!(c
            .cdf(&Tensor::zeros((4, 3), DType::F32, &d).unwrap(), &n, None)
            .is_err());
        assert!(c
            .cdf(&Tensor::zeros(4, DType::F32, &d).unwrap(), &n, None)
            .is_err());
        let x = Tensor::zeros((4, 2), DType::F32, &d).unwrap();
        assert!(c
            .cdf(&x, &Tensor::zeros(3, DType::F32, &d).unwrap(), None)
            .is_err());
        let cond = Tensor::zeros(4, DType::U32, &d).unwrap();
        assert!(c.cdf(&x, &n, Some(&cond)).is_err());
        assert!(c.cdf(&x, &n, None).is_ok());
        let bad = MlpEncoderConfig {
            time_dim: 7,
            ..enc_cfg(2, 0)
        };
        assert!(bad.validate().is_err());
        // Out-of-range class id: candle's index-select error.
        let vm = VarMap::new();
        let c = critic(&vm, enc_cfg(2, 3), CdfGrid::uniform(0.0, 1.0, 5).unwrap());
        let cond = Tensor::full(7u32, 4, &d).unwrap();
        assert!(c.cdf(&x, &n, Some(&cond)).is_err());
        assert!(c.cdf(&x, &n, None).is_err());
    }

    #[test]
    fn grid_construction_and_validation() {
        // Expected: c_k = lo + k (hi - lo) / (m - 1), ends exact (hand computation).
        let g = CdfGrid::uniform(15.0, 25.0, 5).unwrap();
        assert_eq!(g.c, vec![15.0, 17.5, 20.0, 22.5, 25.0]);
        let g = CdfGrid::uniform(0.1, 0.7, 50).unwrap();
        assert_eq!((g.c[0], g.c[49], g.len()), (0.1, 0.7, 50));
        assert_eq!(CdfGrid::uniform(3.0, 4.0, 1).unwrap().c, vec![3.0]);
        assert!(CdfGrid::uniform(0.0, 1.0, 0).is_err());
        assert!(CdfGrid::uniform(1.0, 1.0, 2).is_err());
        assert!(CdfGrid::uniform(2.0, 1.0, 3).is_err());
        assert!(CdfGrid::uniform(0.0, f64::INFINITY, 3).is_err());
        assert!(CdfGrid::new(vec![0.0, 0.0]).is_err());
        assert!(CdfGrid::new(vec![]).is_err());
    }

    #[test]
    fn crps_of_exact_step_cdf_is_zero_and_hand_case() {
        // Expected: CRPS(1{c >= y}, y) = 0 by definition (Algorithm 2, step 6).
        let grid = CdfGrid::uniform(0.0, 1.0, 3).unwrap(); // c = [0, 0.5, 1]
        let y = t1(&[0.25, -1.0, 0.5, 2.0]);
        let step = step_cdf(&y, &grid, DType::F64).unwrap();
        assert_eq!(
            step.to_vec2::<f64>().unwrap(),
            vec![
                vec![0.0, 1.0, 1.0],
                vec![1.0, 1.0, 1.0],
                vec![0.0, 1.0, 1.0],
                vec![0.0, 0.0, 0.0]
            ]
        );
        assert_eq!(scalar(&crps_loss(&step, &y, &grid).unwrap()), 0.0);

        // Hand case: row 1, y = 0.25 -> target [0, 1, 1], F = [0.2, 0.5, 0.9]:
        //   0.2^2 + 0.5^2 + 0.1^2 = 0.04 + 0.25 + 0.01 = 0.30;
        // row 2, y = -1 -> target [1, 1, 1], F = [0.1, 0.1, 0.1]: 3 * 0.9^2 = 2.43.
        // Sum over m, mean over rows: (0.30 + 2.43) / 2 = 1.365.
        let f = t2(&[&[0.2, 0.5, 0.9], &[0.1, 0.1, 0.1]]);
        let y = t1(&[0.25, -1.0]);
        let v = scalar(&crps_loss(&f, &y, &grid).unwrap());
        assert!((v - 1.365).abs() < 1e-12, "crps {v}");

        // Wrong M or wrong batch: shape errors.
        let g4 = CdfGrid::uniform(0.0, 1.0, 4).unwrap();
        assert!(crps_loss(&f, &y, &g4).is_err());
        assert!(crps_loss(&f, &t1(&[0.0]), &grid).is_err());
    }

    #[test]
    fn bce_tv_and_total_on_hand_case() {
        let grid = CdfGrid::uniform(0.0, 1.0, 3).unwrap(); // c = [0, 0.5, 1]
        let f = t2(&[&[0.2, 0.5, 0.9], &[0.5, 0.1, 0.3]]);
        let y = t1(&[0.25, 0.75]); // targets [0, 1, 1] and [0, 0, 1]
                                   // BCE (Algorithm 2, step 7), eps = 0, by hand:
                                   //   row 1: -(ln 0.8 + ln 0.5 + ln 0.9), row 2: -(ln 0.5 + ln 0.9 + ln 0.3), mean of both.
        let r1 = -(0.8f64.ln() + 0.5f64.ln() + 0.9f64.ln());
        let r2 = -(0.5f64.ln() + 0.9f64.ln() + 0.3f64.ln());
        let v = scalar(&bce_loss(&f, &y, &grid, 0.0).unwrap());
        assert!((v - (r1 + r2) / 2.0).abs() < 1e-12, "bce {v}");
        // Same with eps = 1e-3 inside each log.
        let e = 1e-3;
        let r1 = -((0.8f64 + e).ln() + (0.5f64 + e).ln() + (0.9f64 + e).ln());
        let r2 = -((0.5f64 + e).ln() + (0.9f64 + e).ln() + (0.3f64 + e).ln());
        let v = scalar(&bce_loss(&f, &y, &grid, e).unwrap());
        assert!((v - (r1 + r2) / 2.0).abs() < 1e-12, "bce eps {v}");
        // Saturated F with eps = 0 is +inf, not NaN (select, not 0 * -inf).
        let sat = t2(&[&[0.0, 1.0, 1.0]]);
        assert_eq!(
            scalar(&bce_loss(&sat, &t1(&[-1.0]), &grid, 0.0).unwrap()),
            f64::INFINITY
        );

        // TV (step 8) by hand: row 1 (0.3 + 0.4) / 2 = 0.35, row 2 (0.4 + 0.2) / 2 = 0.3; mean 0.325.
        let v = scalar(&tv_loss(&f).unwrap());
        assert!((v - 0.325).abs() < 1e-12, "tv {v}");
        assert_eq!(scalar(&tv_loss(&t2(&[&[0.3], &[0.6]])).unwrap()), 0.0);

        // Total (step 9) = 0.7 CRPS + 0.3 BCE + 0.01 TV with the parts above. CRPS by hand:
        // row 1 0.30 (see the CRPS test), row 2: 0.5^2 + 0.1^2 + 0.7^2 = 0.75; mean 0.525.
        let w = CriticLossWeights::default();
        let loss = critic_loss(&f, &y, &grid, &w, 1e-3).unwrap();
        let want = 0.7 * 0.525 + 0.3 * (r1 + r2) / 2.0 + 0.01 * 0.325;
        assert!(
            (scalar(&loss.total) - want).abs() < 1e-12,
            "total {}",
            scalar(&loss.total)
        );
        let vals = loss.values().unwrap();
        assert!((vals.crps as f64 - 0.525).abs() < 1e-6);
        assert!(critic_loss(&f, &y, &grid, &CriticLossWeights { tv: -1.0, ..w }, 1e-3).is_err());

        // The total is differentiable: gradients w.r.t. F exist and are finite.
        let fv = Var::from_tensor(&f).unwrap();
        let loss = critic_loss(fv.as_tensor(), &y, &grid, &w, 1e-3).unwrap();
        let g = loss.total.backward().unwrap();
        let gf = g.get(fv.as_tensor()).unwrap().to_vec2::<f64>().unwrap();
        assert!(gf.iter().flatten().all(|v| v.is_finite()));
        // d CRPS / d F_11 = 2 (F - t) / B = 2 * 0.2 / 2 = 0.2; d BCE / d F_11 = 1 / (1 - F + e) / B
        // (target 0); d TV / d F_11 = -sign(0.3) / (M - 1) / B = -0.25. Weighted:
        let want = 0.7 * 0.2 + 0.3 * 0.5 / (0.8 + e) + 0.01 * (-0.25);
        assert!(
            (gf[0][0] - want).abs() < 1e-12,
            "grad {} vs {want}",
            gf[0][0]
        );
    }

    #[test]
    fn bin_masses_hand_case() {
        // Expected (Algorithm 2, step 12), eps = 0: F = [0.1, 0.7, 0.6, 0.8] -> increments
        // [0.1, 0.6, -0.1 -> 0, 0.2], total 0.9 -> pi = [1/9, 6/9, 0, 2/9]. The remaining
        // 1 - F_M = 0.2 is dropped by the normalisation.
        let f = t2(&[&[0.1, 0.7, 0.6, 0.8]]);
        let pi = bin_masses(&f, 0.0).unwrap().to_vec2::<f64>().unwrap();
        let want = [1.0 / 9.0, 6.0 / 9.0, 0.0, 2.0 / 9.0];
        for (a, b) in pi[0].iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{:?}", pi[0]);
        }
        // eps = 0.1: (x + 0.1) / (0.9 + 4 * 0.1) (the paper's denominator + M eps).
        let pi = bin_masses(&f, 0.1).unwrap().to_vec2::<f64>().unwrap();
        let want = [0.2 / 1.3, 0.7 / 1.3, 0.1 / 1.3, 0.3 / 1.3];
        for (a, b) in pi[0].iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{:?}", pi[0]);
        }
        assert!(bin_masses(&f, -1.0).is_err());
    }

    #[test]
    fn value_of_one_bin_distribution_is_lambda_c() {
        // Expected: pi = delta_j gives V = log exp(lambda c_j) = lambda c_j exactly (eps = 0).
        let grid = CdfGrid::uniform(-1.0, 2.0, 7).unwrap(); // c = -1, -0.5, ..., 2
        for j in 0..7 {
            let row: Vec<f64> = (0..7).map(|m| if m >= j { 1.0 } else { 0.0 }).collect();
            let f = t2(&[&row]);
            for lambda in [-3.0, 0.0, 0.5, 10.0] {
                let v = value_from_cdf(&f, &grid, lambda, 0.0)
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()[0];
                assert!(
                    (v - lambda * grid.c[j]).abs() < 1e-12,
                    "j {j} lambda {lambda}: {v}"
                );
            }
        }
    }

    #[test]
    fn value_limits_in_lambda() {
        // pi = [0.1, 0.2, 0.3, 0.3, 0.1] on c = [1, 1.25, 1.5, 1.75, 2] (F = cumulative sums).
        let grid = CdfGrid::uniform(1.0, 2.0, 5).unwrap();
        let pi = [0.1, 0.2, 0.3, 0.3, 0.1];
        let cum: Vec<f64> = pi
            .iter()
            .scan(0.0, |s, p| {
                *s += p;
                Some(*s)
            })
            .collect();
        let f = t2(&[&cum]);
        let v = |lambda: f64| {
            value_from_cdf(&f, &grid, lambda, 0.0)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()[0]
        };

        // Large lambda: pi_M e^{lambda c_M} <= sum_m pi_m e^{lambda c_m} <= e^{lambda c_M}, so
        // c_M + ln(pi_M) / lambda <= V / lambda <= c_M. At lambda = 200: within 0.0116 of c_M = 2.
        let r = v(200.0) / 200.0;
        assert!(
            r <= 2.0 + 1e-12 && r >= 2.0 + 0.1f64.ln() / 200.0 - 1e-12,
            "V/lambda {r}"
        );

        // Monotone sweep: V is increasing (V' = tilted mean of c > 0 as all c > 0) and V / lambda
        // is increasing (V convex with V(0) = 0).
        let lambdas = [
            0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0,
        ];
        let vs: Vec<f64> = lambdas.iter().map(|&l| v(l)).collect();
        for i in 1..vs.len() {
            assert!(vs[i] > vs[i - 1], "V not increasing at {}", lambdas[i]);
            assert!(vs[i] / lambdas[i] >= vs[i - 1] / lambdas[i - 1] - 1e-12);
        }

        // Small lambda: V = lambda mean + lambda^2 var / 2 + O(lambda^3) (cumulant expansion).
        let mean: f64 = pi.iter().zip(&grid.c).map(|(p, c)| p * c).sum();
        let var: f64 = pi
            .iter()
            .zip(&grid.c)
            .map(|(p, c)| p * (c - mean).powi(2))
            .sum();
        let l = 1e-2;
        let err = (v(l) - (l * mean + l * l * var / 2.0)).abs();
        // Third cumulant term: |kappa_3| lambda^3 / 6 <= 0.5^3 * 1e-6 / 6 ~ 2e-8.
        assert!(err < 1e-7, "second-order error {err}");
        assert!((v(l) / l - mean).abs() < 1e-3);
    }

    #[test]
    fn value_does_not_overflow() {
        // Expected: with lambda c = 500 (f32 exp overflows past 88.7) V stays finite and obeys
        // the bounds of the previous test: 500 + ln(pi_M) <= V <= 500. With lambda = -100 the
        // largest term is the bottom bin: -100 + ln(pi_1) <= V <= -100.
        let grid = CdfGrid::uniform(1.0, 5.0, 50).unwrap();
        let cum: Vec<f32> = (1..=50).map(|m| m as f32 / 50.0).collect(); // pi_m = 1/50
        let f = Tensor::from_vec(cum, (1, 50), &Device::Cpu).unwrap();
        let hi = value_from_cdf(&f, &grid, 100.0, DEFAULT_EPS)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0];
        assert!(
            hi.is_finite() && hi <= 500.0 + 1e-3 && hi >= 500.0 + (1.0f32 / 50.0).ln() - 1e-3,
            "{hi}"
        );
        let lo = value_from_cdf(&f, &grid, -100.0, DEFAULT_EPS)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0];
        assert!(
            lo.is_finite() && lo <= -100.0 + 1e-3 && lo >= -100.0 + (1.0f32 / 50.0).ln() - 1e-3,
            "{lo}"
        );
        assert!(value_from_cdf(&f, &grid, f64::NAN, 0.0).is_err());
    }

    #[test]
    fn buckets_topk_and_cross_entropy_hand_case() {
        // bucket_of by its definition (first c_m >= y, clamped): c = [0, 1, 2, 3].
        let grid = CdfGrid::uniform(0.0, 3.0, 4).unwrap();
        assert_eq!(bucket_of(-5.0, &grid), 0);
        assert_eq!(bucket_of(0.0, &grid), 0);
        assert_eq!(bucket_of(0.5, &grid), 1);
        assert_eq!(bucket_of(1.0, &grid), 1);
        assert_eq!(bucket_of(2.5, &grid), 3);
        assert_eq!(bucket_of(99.0, &grid), 3);

        // Masses [0.1, 0.6, 0.2, 0.1] in every row (F = [0.1, 0.7, 0.9, 1.0]).
        // y = 0.5 -> bucket 1 (mass 0.6, rank 0): top-1 and top-3 hit.
        // y = 1.7 -> bucket 2 (mass 0.2, rank 1): top-3 hit only.
        // y = 2.5 -> bucket 3 (mass 0.1, behind 0.6, 0.2 and the tied 0.1 of bin 0: rank 3): miss.
        // So top-1 = 1/3, top-3 = 2/3, top-4 = 1.
        let row: &[f64] = &[0.1, 0.7, 0.9, 1.0];
        let f = t2(&[row, row, row]);
        let y = t1(&[0.5, 1.7, 2.5]);
        assert!((topk_accuracy(&f, &y, &grid, 1).unwrap() - 1.0 / 3.0).abs() < 1e-12);
        assert!((topk_accuracy(&f, &y, &grid, 3).unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(topk_accuracy(&f, &y, &grid, 4).unwrap(), 1.0);
        assert!(topk_accuracy(&f, &y, &grid, 0).is_err());
        // CE (Table 7), eps = 0: -(ln 0.6 + ln 0.2 + ln 0.1) / 3.
        let want = -(0.6f64.ln() + 0.2f64.ln() + 0.1f64.ln()) / 3.0;
        let ce = cross_entropy(&f, &y, &grid, 0.0).unwrap();
        assert!((ce - want).abs() < 1e-12, "ce {ce} vs {want}");
        assert!(cross_entropy(&f, &t1(&[0.5, f32::NAN, 1.0]), &grid, 0.0).is_err());
    }

    #[test]
    fn critic_learns_a_conditional_cdf() {
        // x ~ U(-1, 1), y = x + 0.05 N(0, 1), n fixed. Reference points for the CRPS (sum over
        // the 31 grid points of [-1.5, 1.5], spacing 0.1):
        //   - the best x-blind CDF (the marginal of y, ~uniform on [-1, 1]) scores about
        //     sum_m F(c_m)(1 - F(c_m)) ~ 20 * 1/6 ~ 3.3 (computed below from the data);
        //   - the true conditional CDF scores about sum_m Phi(1 - Phi) ~ (integral of
        //     Phi(1 - Phi) = sigma / sqrt(pi)) / spacing = 0.05 / 1.772 / 0.1 ~ 0.28.
        // Tolerance: after 400 AdamW steps (measured: 3.36 before, 0.30 after, 1.5 s in release)
        // the held-out CRPS must be below 0.5 (within 1.8x of the optimum), below 0.3x the
        // x-blind score and below 0.2x its initial value.
        let d = Device::Cpu;
        let grid = CdfGrid::uniform(-1.5, 1.5, 31).unwrap();
        let vm = VarMap::new();
        let c = critic(&vm, enc_cfg(1, 0), grid.clone());
        let data = |seed: u64, b: usize| {
            let mut rng = rng_for(seed, 2, 0);
            let x = rand_uniform(&mut rng, (b, 1), &d)
                .unwrap()
                .affine(2.0, -1.0)
                .unwrap();
            let y = (x.squeeze(1).unwrap()
                + randn(&mut rng, b, &d).unwrap().affine(0.05, 0.0).unwrap())
            .unwrap();
            (x, y)
        };
        let n = Tensor::full(500f32, 256, &d).unwrap();
        let (xe, ye) = data(999, 256);
        let crps_eval = || scalar(&crps_loss(&c.cdf(&xe, &n, None).unwrap(), &ye, &grid).unwrap());

        // x-blind baseline: the empirical marginal CDF of the held-out y, the same for every row.
        let ys = ye.to_vec1::<f32>().unwrap();
        let marg: Vec<f64> = grid
            .c
            .iter()
            .map(|&cm| ys.iter().filter(|&&v| (v as f64) <= cm).count() as f64 / ys.len() as f64)
            .collect();
        let fm = Tensor::from_vec(marg.repeat(256), (256, grid.len()), &d).unwrap();
        let blind = scalar(&crps_loss(&fm, &ye, &grid).unwrap());

        let before = crps_eval();
        let params = ParamsAdamW {
            lr: 1e-2,
            weight_decay: 0.0,
            ..Default::default()
        };
        let mut opt = AdamW::new(vm.all_vars(), params).unwrap();
        let w = CriticLossWeights::default();
        for step in 0..400 {
            let (x, y) = data(step, 256);
            let loss =
                critic_loss(&c.cdf(&x, &n, None).unwrap(), &y, &grid, &w, DEFAULT_EPS).unwrap();
            opt.backward_step(&loss.total).unwrap();
        }
        let after = crps_eval();
        assert!(after < 0.5, "CRPS after {after}, optimum ~0.28");
        assert!(
            after < 0.3 * blind,
            "CRPS after {after}, x-blind {blind}, before {before}"
        );
        assert!(after < 0.2 * before, "CRPS after {after}, before {before}");
        // The learned CDF is sharp: top-3 bucket accuracy well above the 3/31 of a flat guess.
        let top3 = topk_accuracy(&c.cdf(&xe, &n, None).unwrap(), &ye, &grid, 3).unwrap();
        assert!(top3 > 0.6, "top-3 {top3}");
    }

    #[test]
    fn mean_value_is_lambda_times_the_mean_and_below_the_optimal_value() {
        // Grid c = (0, 1, 2); F = (0.2, 0.7, 1.0) -> pi = (0.2, 0.5, 0.3) (eps = 0), mean = 1.1.
        let g = CdfGrid::new(vec![0.0, 1.0, 2.0]).unwrap();
        let f = Tensor::new(&[[0.2f32, 0.7, 1.0]], &Device::Cpu).unwrap();
        let v = mean_value_from_cdf(&f, &g, 2.0, 0.0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!((v[0] - 2.2).abs() < 1e-5, "{v:?}");
        // Jensen: lambda E[r] <= log E[exp(lambda r)] = log(0.2 + 0.5 e^2 + 0.3 e^4).
        let opt = value_from_cdf(&f, &g, 2.0, 0.0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want = (0.2f64 + 0.5 * 2f64.exp() + 0.3 * 4f64.exp()).ln();
        assert!((opt[0] as f64 - want).abs() < 1e-4, "{opt:?} vs {want}");
        assert!(v[0] < opt[0]);
    }
}
