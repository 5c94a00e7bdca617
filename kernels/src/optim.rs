//! AdamW with decoupled weight decay (Loshchilov & Hutter, 2019) whose whole state — moments and
//! step counter — can be saved to and restored from safetensors, so a resumed run continues
//! bit-for-bit; plus gradient averaging for synchronous data-parallel learners.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::{KernelError, Result};

/// Hyper-parameters of [`AdamW`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWConfig {
    /// Learning rate (step size), `>= 0`.
    pub lr: f64,
    /// Decay rate of the first-moment estimate, in `[0, 1)`.
    pub beta1: f64,
    /// Decay rate of the second-moment estimate, in `[0, 1)`.
    pub beta2: f64,
    /// Added to `sqrt(vhat)` in the denominator, `> 0`.
    pub eps: f64,
    /// Decoupled weight decay: each step first shrinks `theta` by `lr * weight_decay * theta`.
    pub weight_decay: f64,
    /// Clip the global L2 norm of all gradients to this value before the update; `0` turns it off.
    pub grad_clip: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            grad_clip: 0.0,
        }
    }
}

impl AdamWConfig {
    /// Check every field; the error names the first bad one.
    pub fn validate(&self) -> Result<()> {
        let finite_nonneg = |name: &'static str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(KernelError::param(name, v, "must be finite and >= 0"))
            }
        };
        finite_nonneg("lr", self.lr)?;
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(KernelError::param(name, b, "must lie in [0, 1)"));
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(KernelError::param(
                "eps",
                self.eps,
                "must be finite and > 0",
            ));
        }
        finite_nonneg("weight_decay", self.weight_decay)?;
        finite_nonneg("grad_clip", self.grad_clip)
    }
}

/// What one optimiser step saw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepInfo {
    /// Global L2 norm of the gradients before clipping (vars without a gradient contribute 0).
    pub grad_norm: f64,
    /// Whether the gradients were scaled down to `grad_clip`.
    pub clipped: bool,
}

/// AdamW over a fixed list of named variables. Unlike `candle_nn::AdamW` its moment estimates and
/// step counter are reachable ([`AdamW::state_tensors`]) and persistable ([`AdamW::save_state`],
/// [`AdamW::load_state`]).
#[derive(Debug)]
pub struct AdamW {
    vars: Vec<(String, Var)>,
    /// First-moment estimates, one per var, same shape and dtype.
    m: Vec<Tensor>,
    /// Second-moment estimates, one per var, same shape and dtype.
    v: Vec<Tensor>,
    t: u64,
    cfg: AdamWConfig,
}

/// Largest step count that survives the round trip through an f64 tensor exactly.
const MAX_EXACT_T: u64 = 1 << 53;

impl AdamW {
    /// An optimiser over `vars` (names must be unique; they key the saved state), with zero
    /// moments and step counter 0. Every var must have a float dtype.
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        cfg.validate()?;
        let mut seen = HashSet::new();
        let mut m = Vec::with_capacity(vars.len());
        let mut v = Vec::with_capacity(vars.len());
        for (name, var) in &vars {
            if !seen.insert(name.as_str()) {
                return Err(KernelError::param("vars", name, "duplicate variable name"));
            }
            if !var.dtype().is_float() {
                return Err(KernelError::param(
                    "vars",
                    name,
                    format!("dtype {:?} is not a float type", var.dtype()),
                ));
            }
            m.push(var.zeros_like()?);
            v.push(var.zeros_like()?);
        }
        Ok(Self {
            vars,
            m,
            v,
            t: 0,
            cfg,
        })
    }

    /// One step with the gradients of `grads`. A var without a gradient in `grads` is left
    /// unchanged, and so are its moments (it is not even weight-decayed); the step counter still
    /// advances.
    pub fn step(&mut self, grads: &GradStore) -> Result<StepInfo> {
        let ordered = self.grads_in_order(grads);
        self.step_with(&ordered)
    }

    /// One step with one gradient per var, in the order of [`AdamW::vars`] (e.g. the output of
    /// [`average_grads`]). `None` leaves that var and its moments unchanged. If the global
    /// gradient norm is not finite, nothing is changed (not even the step counter) and an error
    /// is returned, so the caller may skip the batch.
    pub fn step_with(&mut self, grads: &[Option<Tensor>]) -> Result<StepInfo> {
        if grads.len() != self.vars.len() {
            return Err(KernelError::shape(
                "AdamW::step_with",
                format!(
                    "{} gradients for {} variables",
                    grads.len(),
                    self.vars.len()
                ),
            ));
        }
        // Check every gradient before touching any state, so a bad one leaves the optimiser whole.
        for ((name, var), g) in self.vars.iter().zip(grads) {
            if let Some(g) = g {
                if g.shape() != var.shape() {
                    return Err(KernelError::shape(
                        "AdamW::step_with",
                        format!(
                            "gradient of {name} has shape {:?}, the variable {:?}",
                            g.dims(),
                            var.dims()
                        ),
                    ));
                }
            }
        }
        // The global norm where the gradients are (for replicas on `learner.devices`, the
        // leader's device, where they were averaged): every replica then clips by the same bits,
        // whatever its own device's reduction order. One read-back for all of them (on a GPU
        // each read-back is a synchronisation).
        let present: Vec<&Tensor> = grads.iter().flatten().collect();
        let sq_sum: f64 = f64_sums(&present, |g| g.sqr())?.iter().sum();
        // A replica's gradients may come averaged on another device (`learner.devices`): each
        // moves to its variable's device (no copy when it is there already).
        let moved = self
            .vars
            .iter()
            .zip(grads)
            .map(|((_, var), g)| g.as_ref().map(|g| g.to_device(var.device())).transpose())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let grads = &moved[..];
        let grad_norm = sq_sum.sqrt();
        if !grad_norm.is_finite() {
            return Err(KernelError::param(
                "grad_norm",
                grad_norm,
                "gradient is not finite; the step was not applied",
            ));
        }
        let clipped = self.cfg.grad_clip > 0.0 && grad_norm > self.cfg.grad_clip;
        let clip_scale = if clipped {
            self.cfg.grad_clip / grad_norm
        } else {
            1.0
        };

        self.t += 1;
        let AdamWConfig {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
            ..
        } = self.cfg;
        // t as f64 is exact up to 2^53 and powf avoids powi's i32 exponent overflow.
        let t = self.t as f64;
        let scale_m = 1.0 / (1.0 - beta1.powf(t));
        let scale_v = 1.0 / (1.0 - beta2.powf(t));
        for (i, ((_, var), g)) in self.vars.iter().zip(grads).enumerate() {
            let Some(g) = g else { continue };
            let g = g.to_dtype(var.dtype())?;
            let g = if clipped { (g * clip_scale)? } else { g };
            let next_m = ((&self.m[i] * beta1)? + (&g * (1.0 - beta1))?)?;
            let next_v = ((&self.v[i] * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let m_hat = (&next_m * scale_m)?;
            let v_hat = (&next_v * scale_v)?;
            // Same operation order as candle_nn::AdamW: decay the old theta, then the Adam step.
            let decayed = (var.as_tensor() * (1.0 - lr * weight_decay))?;
            let adjusted = (m_hat / (v_hat.sqrt()? + eps)?)?;
            let next_theta = (decayed - (adjusted * lr)?)?;
            var.set(&next_theta)?;
            self.m[i] = next_m;
            self.v[i] = next_v;
        }
        Ok(StepInfo { grad_norm, clipped })
    }

    /// The gradients of this optimiser's vars in `grads`, in the order of [`AdamW::vars`].
    pub fn grads_in_order(&self, grads: &GradStore) -> Vec<Option<Tensor>> {
        grads_in_order(&self.vars, grads)
    }

    /// Change the learning rate (e.g. from a schedule). The caller keeps it finite and `>= 0`.
    pub fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    /// Change the gradient-norm clip (`0` turns it off). The caller keeps it finite and `>= 0`.
    pub fn set_grad_clip(&mut self, grad_clip: f64) {
        self.cfg.grad_clip = grad_clip;
    }

    /// The current learning rate.
    pub fn lr(&self) -> f64 {
        self.cfg.lr
    }

    /// Number of steps taken so far (the `t` of the bias corrections).
    pub fn t(&self) -> u64 {
        self.t
    }

    /// The named variables, in the order `step_with` expects gradients.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// The hyper-parameters in use.
    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// The full optimiser state: `m.<name>` and `v.<name>` for every var, and `t` as a one-element
    /// f64 tensor (exact below 2^53 steps).
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(2 * self.vars.len() + 1);
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.push((format!("m.{name}"), self.m[i].clone()));
            out.push((format!("v.{name}"), self.v[i].clone()));
        }
        if self.t > MAX_EXACT_T {
            return Err(KernelError::param(
                "t",
                self.t,
                "step counter too large to store exactly as f64",
            ));
        }
        out.push((
            "t".to_string(),
            Tensor::new(&[self.t as f64], &Device::Cpu)?,
        ));
        Ok(out)
    }

    /// Write [`AdamW::state_tensors`] to `path` as safetensors, atomically (a `.tmp` file renamed
    /// over `path`), so a crash mid-write never leaves a truncated state file.
    pub fn save_state(&self, path: &Path) -> Result<()> {
        let tensors: HashMap<String, Tensor> = self.state_tensors()?.into_iter().collect();
        let tmp = path.with_extension("safetensors.tmp");
        candle_core::safetensors::save(&tensors, &tmp).map_err(|e| KernelError::Checkpoint {
            path: tmp.display().to_string(),
            detail: e.to_string(),
        })?;
        std::fs::rename(&tmp, path).map_err(|e| KernelError::Checkpoint {
            path: path.display().to_string(),
            detail: e.to_string(),
        })
    }

    /// Restore moments and step counter from a file written by [`AdamW::save_state`]. Every key
    /// must be present with the right shape and no unknown key may appear; otherwise the error
    /// names the file and the key, and the optimiser is left unchanged. The variables themselves
    /// are not touched (they live in the model checkpoint).
    pub fn load_state(&mut self, path: &Path) -> Result<()> {
        let err = |detail: String| KernelError::Checkpoint {
            path: path.display().to_string(),
            detail,
        };
        let mut tensors =
            candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| err(e.to_string()))?;

        let t_tensor = tensors
            .remove("t")
            .ok_or_else(|| err("missing tensor t".into()))?;
        if t_tensor.dims() != [1] {
            return Err(err(format!(
                "tensor t has shape {:?}, expected [1]",
                t_tensor.dims()
            )));
        }
        let t_f = t_tensor
            .to_dtype(DType::F64)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f64>())
            .map_err(|e| err(format!("tensor t: {e}")))?[0];
        if !(t_f.is_finite() && t_f >= 0.0 && t_f.fract() == 0.0 && t_f <= MAX_EXACT_T as f64) {
            return Err(err(format!(
                "tensor t = {t_f} is not a step count (a non-negative integer)"
            )));
        }

        let mut m = Vec::with_capacity(self.vars.len());
        let mut v = Vec::with_capacity(self.vars.len());
        for (name, var) in &self.vars {
            for (prefix, dst) in [("m", &mut m), ("v", &mut v)] {
                let key = format!("{prefix}.{name}");
                let t = tensors
                    .remove(&key)
                    .ok_or_else(|| err(format!("missing tensor {key}")))?;
                if t.shape() != var.shape() {
                    return Err(err(format!(
                        "tensor {key} has shape {:?}, the variable {:?}",
                        t.dims(),
                        var.dims()
                    )));
                }
                dst.push(t.to_device(var.device())?.to_dtype(var.dtype())?);
            }
        }
        if let Some(key) = tensors.keys().min() {
            return Err(err(format!(
                "unexpected tensor {key}: the state belongs to a different set of variables"
            )));
        }
        self.m = m;
        self.v = v;
        self.t = t_f as u64;
        Ok(())
    }
}

/// The position of the first gradient holding a NaN or an infinity (summed in f64: a finite f32
/// gradient cannot overflow the sum, and NaN or inf anywhere makes it non-finite).
/// One read-back for all of them (on a GPU each read-back is a synchronisation).
pub fn first_non_finite(grads: &[Option<Tensor>]) -> Result<Option<usize>> {
    let (index, present): (Vec<usize>, Vec<&Tensor>) = grads
        .iter()
        .enumerate()
        .filter_map(|(i, g)| g.as_ref().map(|t| (i, t)))
        .unzip();
    let sums = f64_sums(&present, |g| Ok(g.clone()))?;
    Ok(index
        .into_iter()
        .zip(sums)
        .find(|(_, s)| !s.is_finite())
        .map(|(i, _)| i))
}

/// sum_all(f(t)) of each tensor in f64, read back in one transfer from the first tensor's
/// device (on a GPU each read-back is a synchronisation).
fn f64_sums(
    ts: &[&Tensor],
    f: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
) -> Result<Vec<f64>> {
    let Some(first) = ts.first() else {
        return Ok(Vec::new());
    };
    let sums = ts
        .iter()
        .map(|t| {
            f(&t.to_dtype(DType::F64)?)?
                .sum_all()?
                .to_device(first.device())
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::stack(&sums, 0)?.to_vec1::<f64>()?)
}

/// The variables of `varmap` sorted by name: a fixed order every replica and every optimiser of
/// the same model agrees on (a VarMap iterates in hash order).
pub fn named_vars(varmap: &candle_nn::VarMap) -> Result<Vec<(String, Var)>> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| KernelError::param("varmap", "lock", "poisoned by a panicking thread"))?;
    let mut vars: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(vars)
}

/// The gradients of `vars` in `grads`, in that order (None for a var the loss does not reach).
/// Loss functions take the trainable vars rather than an optimiser: computing gradients needs
/// no optimiser state.
pub fn grads_in_order(vars: &[(String, Var)], grads: &GradStore) -> Vec<Option<Tensor>> {
    vars.iter()
        .map(|(_, var)| grads.get(var.as_tensor()).cloned())
        .collect()
}

/// Element-wise mean of per-replica gradients (each replica's list in the same var order). A
/// `None` in one replica counts as a zero gradient for that replica when another replica has
/// `Some` (the sum is still divided by the number of replicas); a position that is `None`
/// everywhere stays `None`. All replicas must have the same length and, per position, the same
/// shapes, otherwise a shape error. Replicas on different devices are averaged on the device of
/// the first replica that has the gradient.
pub fn average_grads(replicas: &[Vec<Option<Tensor>>]) -> Result<Vec<Option<Tensor>>> {
    let Some(first) = replicas.first() else {
        return Err(KernelError::param(
            "replicas",
            0,
            "need at least one replica to average",
        ));
    };
    let n_vars = first.len();
    if let Some((r, bad)) = replicas.iter().enumerate().find(|(_, g)| g.len() != n_vars) {
        return Err(KernelError::shape(
            "average_grads",
            format!(
                "replica {r} has {} gradients, replica 0 has {n_vars}",
                bad.len()
            ),
        ));
    }
    let inv_n = 1.0 / replicas.len() as f64;
    (0..n_vars)
        .map(|i| {
            let mut sum: Option<Tensor> = None;
            for (r, replica) in replicas.iter().enumerate() {
                let Some(g) = &replica[i] else { continue };
                sum = Some(match sum {
                    None => g.clone(),
                    Some(acc) => {
                        if acc.shape() != g.shape() {
                            return Err(KernelError::shape(
                                "average_grads",
                                format!(
                                    "gradient {i} of replica {r} has shape {:?}, earlier replicas {:?}",
                                    g.dims(),
                                    acc.dims()
                                ),
                            ));
                        }
                        // Replicas on other devices (`learner.devices`) are summed on the
                        // device of the first replica that has this gradient.
                        (&acc + g.to_device(acc.device())?)?
                    }
                });
            }
            sum.map(|s| (s * inv_n).map_err(KernelError::from))
                .transpose()
        })
        .collect()
}

/// A learning-rate plan over `total` steps: linear warm-up from `base / warmup` to `base` over the
/// first `warmup` steps, then constant, or (with `cosine`) half a cosine from `base` down to 0 at
/// step `total`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrPlan {
    pub base: f64,
    pub warmup: u64,
    pub cosine: bool,
    pub total: u64,
}

impl LrPlan {
    /// A constant rate (no warm-up, no decay).
    pub fn constant(base: f64) -> Self {
        Self {
            base,
            warmup: 0,
            cosine: false,
            total: 0,
        }
    }

    /// The rate of step `t` (0-based).
    pub fn at(&self, t: u64) -> f64 {
        let warm = if self.warmup > 0 {
            ((t + 1) as f64 / self.warmup as f64).min(1.0)
        } else {
            1.0
        };
        let decay = if self.cosine && self.total > 0 {
            let frac = (t as f64 / self.total as f64).min(1.0);
            0.5 * (1.0 + (std::f64::consts::PI * frac).cos())
        } else {
            1.0
        };
        self.base * warm * decay
    }
}

/// An exponential moving average of a model's variables (the weights diffusion models sample
/// with). The decay of update `t` (1-based) is `min(decay, (1 + t) / (10 + t))`, so the average
/// forgets the initial weights within the first few hundred steps instead of dragging them along.
pub struct Ema {
    decay: f64,
    updates: u64,
    shadow: Vec<Tensor>,
}

impl Ema {
    /// Start the average at the current values of `vars`. `decay` in `[0, 1)`.
    pub fn new(vars: &[(String, Var)], decay: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&decay) {
            return Err(KernelError::param("ema", decay, "must be in [0, 1)"));
        }
        let shadow = vars
            .iter()
            .map(|(_, v)| v.as_tensor().detach().copy())
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            decay,
            updates: 0,
            shadow,
        })
    }

    /// The decay the next update uses.
    pub fn next_decay(&self) -> f64 {
        let t = (self.updates + 1) as f64;
        self.decay.min((1.0 + t) / (10.0 + t))
    }

    /// Fold the current values of `vars` (the same list, in the same order, as at `new`) in.
    pub fn update(&mut self, vars: &[(String, Var)]) -> Result<()> {
        if vars.len() != self.shadow.len() {
            return Err(KernelError::shape(
                "Ema::update",
                format!(
                    "{} vars, the average holds {}",
                    vars.len(),
                    self.shadow.len()
                ),
            ));
        }
        let d = self.next_decay();
        for (s, (_, v)) in self.shadow.iter_mut().zip(vars) {
            // Detached: arithmetic on a Var records the graph, which would chain every update.
            *s = ((&*s * d)? + (v.as_tensor().detach() * (1.0 - d))?)?.detach();
        }
        self.updates += 1;
        Ok(())
    }

    /// Write the averaged values into `vars`.
    pub fn copy_to(&self, vars: &[(String, Var)]) -> Result<()> {
        for (s, (_, v)) in self.shadow.iter().zip(vars) {
            v.set(s)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::Optimizer;

    fn scalar_var(x: f32) -> Var {
        Var::new(&[x], &Device::Cpu).unwrap()
    }

    fn vals(v: &Var) -> Vec<f32> {
        v.as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }

    #[test]
    fn lr_plan_warms_up_then_follows_the_cosine() {
        let p = LrPlan {
            base: 1.0,
            warmup: 4,
            cosine: true,
            total: 100,
        };
        assert!((p.at(0) - 0.25).abs() < 1e-12);
        assert!((p.at(1) - 0.5 * 0.5 * (1.0 + (std::f64::consts::PI * 0.01).cos())).abs() < 1e-12);
        assert!((p.at(50) - 0.5).abs() < 1e-12);
        assert!(p.at(100).abs() < 1e-12 && p.at(150).abs() < 1e-12);
        let c = LrPlan::constant(0.3);
        assert_eq!((c.at(0), c.at(10_000)), (0.3, 0.3));
    }

    #[test]
    fn ema_follows_the_hand_computed_average() {
        let v = scalar_var(0.0);
        let vars = vec![("w".to_string(), v.clone())];
        let mut ema = Ema::new(&vars, 0.9).unwrap();
        // Update 1 decays by min(0.9, 2/11), update 2 by min(0.9, 3/12).
        v.set(&Tensor::new(&[1f32], &Device::Cpu).unwrap()).unwrap();
        ema.update(&vars).unwrap();
        v.set(&Tensor::new(&[2f32], &Device::Cpu).unwrap()).unwrap();
        ema.update(&vars).unwrap();
        let (d1, d2) = (2.0f64 / 11.0, 3.0f64 / 12.0);
        let want = ((0.0 * d1 + 1.0 * (1.0 - d1)) * d2 + 2.0 * (1.0 - d2)) as f32;
        ema.copy_to(&vars).unwrap();
        assert!(
            (vals(&v)[0] - want).abs() < 1e-6,
            "{} vs {want}",
            vals(&v)[0]
        );
        // Late updates use the configured decay.
        for _ in 0..200 {
            ema.update(&vars).unwrap();
        }
        assert_eq!(ema.next_decay(), 0.9);
        assert!(Ema::new(&vars, 1.0).is_err());
        assert!(ema.update(&[]).is_err());
    }

    fn grad(x: &[f32]) -> Option<Tensor> {
        Some(Tensor::new(x, &Device::Cpu).unwrap())
    }

    fn tmp_path(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("tilt-optim-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(format!("{tag}.safetensors"))
    }

    #[test]
    fn one_and_two_steps_by_hand() {
        // Hand computation: at t = 1, mhat = g and vhat = g^2, so mhat / sqrt(vhat) = g / |g| = 1
        // (up to eps = 1e-8) and theta = 1 - lr * 1 = 0.9. At t = 2 with the same g, m = 0.19 g,
        // mhat = 0.19 g / 0.19 = g and likewise vhat = g^2, so again exactly -lr: theta = 0.8.
        let theta = scalar_var(1.0);
        let cfg = AdamWConfig {
            lr: 0.1,
            ..AdamWConfig::default()
        };
        let mut opt = AdamW::new(vec![("theta".into(), theta.clone())], cfg.clone()).unwrap();
        // d(0.5 theta)/d theta = 0.5, through candle's backprop and `step`.
        let loss = (theta.as_tensor() * 0.5).unwrap().sum_all().unwrap();
        let info = opt.step(&loss.backward().unwrap()).unwrap();
        assert_eq!(opt.t(), 1);
        assert!((info.grad_norm - 0.5).abs() < 1e-12 && !info.clipped);
        assert!((vals(&theta)[0] - 0.9).abs() < 1e-6, "{:?}", vals(&theta));
        opt.step_with(&[grad(&[0.5])]).unwrap();
        assert!((vals(&theta)[0] - 0.8).abs() < 1e-6, "{:?}", vals(&theta));

        // Decoupled decay, hand computation: theta = 1 - 0.1 * 0.01 * 1 - 0.1 * 1 = 0.899.
        let theta = scalar_var(1.0);
        let cfg = AdamWConfig {
            weight_decay: 0.01,
            ..cfg
        };
        let mut opt = AdamW::new(vec![("theta".into(), theta.clone())], cfg).unwrap();
        opt.step_with(&[grad(&[0.5])]).unwrap();
        assert!((vals(&theta)[0] - 0.899).abs() < 1e-6, "{:?}", vals(&theta));
    }

    #[test]
    fn var_without_gradient_is_unchanged() {
        // By the documented contract: None leaves the var as it was, the counter still advances.
        let a = scalar_var(1.0);
        let b = scalar_var(2.0);
        let cfg = AdamWConfig {
            lr: 0.1,
            weight_decay: 0.5,
            ..AdamWConfig::default()
        };
        let mut opt =
            AdamW::new(vec![("a".into(), a.clone()), ("b".into(), b.clone())], cfg).unwrap();
        opt.step_with(&[grad(&[0.5]), None]).unwrap();
        assert_eq!(vals(&b), vec![2.0]);
        assert_ne!(vals(&a), vec![1.0]);
        assert_eq!(opt.t(), 1);
        // The wrong number of gradients is a shape error and changes nothing.
        assert!(matches!(
            opt.step_with(&[grad(&[0.5])]),
            Err(KernelError::Shape { .. })
        ));
        // A non-finite gradient is refused before any state changes.
        assert!(opt.step_with(&[grad(&[f32::NAN]), None]).is_err());
        assert_eq!(opt.t(), 1);
    }

    /// Quadratic loss sum_j a_j (theta_j - c_j)^2 over two vars; returns its gradients.
    fn quadratic_grads(w: &Var, b: &Var) -> GradStore {
        let dev = Device::Cpu;
        let cw = Tensor::new(&[[1.0f32, -2.0], [0.5, 3.0]], &dev).unwrap();
        let aw = Tensor::new(&[[1.0f32, 0.3], [2.0, 0.7]], &dev).unwrap();
        let cb = Tensor::new(&[-1.0f32, 4.0, 0.25], &dev).unwrap();
        let lw = ((w.as_tensor() - cw).unwrap().sqr().unwrap() * aw)
            .unwrap()
            .sum_all()
            .unwrap();
        let lb = (b.as_tensor() - cb)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        (lw + lb).unwrap().backward().unwrap()
    }

    #[test]
    fn agrees_with_candle_adamw() {
        // Reference: candle_nn::AdamW (candle-nn 0.11.1, src/optim.rs) computes
        // theta * (1 - lr * wd) - lr * mhat / (sqrt(vhat) + eps): the same decoupled decay as ours,
        // so we compare with weight decay on and off.
        for weight_decay in [0.0, 0.05] {
            let dev = Device::Cpu;
            let init_w = Tensor::new(&[[0.1f32, 0.2], [-0.3, 0.4]], &dev).unwrap();
            let init_b = Tensor::new(&[0.0f32, 1.0, -1.0], &dev).unwrap();
            let (w1, b1) = (
                Var::from_tensor(&init_w).unwrap(),
                Var::from_tensor(&init_b).unwrap(),
            );
            let (w2, b2) = (
                Var::from_tensor(&init_w).unwrap(),
                Var::from_tensor(&init_b).unwrap(),
            );
            let params = candle_nn::ParamsAdamW {
                lr: 0.05,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay,
            };
            let mut theirs = candle_nn::AdamW::new(vec![w1.clone(), b1.clone()], params).unwrap();
            let cfg = AdamWConfig {
                lr: 0.05,
                weight_decay,
                ..AdamWConfig::default()
            };
            let mut ours = AdamW::new(
                vec![("w".into(), w2.clone()), ("b".into(), b2.clone())],
                cfg,
            )
            .unwrap();
            for _ in 0..50 {
                theirs.step(&quadratic_grads(&w1, &b1)).unwrap();
                ours.step(&quadratic_grads(&w2, &b2)).unwrap();
            }
            for (x, y) in [(&w1, &w2), (&b1, &b2)] {
                for (p, q) in vals(x).iter().zip(vals(y)) {
                    assert!((p - q).abs() < 1e-6, "wd {weight_decay}: {p} vs {q}");
                }
            }
            // And the run actually moved the parameters.
            assert!((vals(&w2)[0] - 0.1).abs() > 0.1);
        }
    }

    #[test]
    fn clipping_scales_global_norm() {
        // Hand computation: gradients [3] and [4] over two vars have global norm 5; with
        // grad_clip = 1 they become [0.6] and [0.8] (global, not per-tensor clipping, which would
        // give [1] and [1]). After one step m = (1 - beta1) g = [0.06] and [0.08].
        let run = |grad_clip: f64| {
            let cfg = AdamWConfig {
                lr: 0.1,
                grad_clip,
                ..AdamWConfig::default()
            };
            let mut opt = AdamW::new(
                vec![("a".into(), scalar_var(0.0)), ("b".into(), scalar_var(0.0))],
                cfg,
            )
            .unwrap();
            let info = opt.step_with(&[grad(&[3.0]), grad(&[4.0])]).unwrap();
            let state: HashMap<String, Tensor> = opt.state_tensors().unwrap().into_iter().collect();
            let m = |k: &str| state[k].to_vec1::<f32>().unwrap()[0];
            (info, m("m.a"), m("m.b"))
        };
        let (info, ma, mb) = run(1.0);
        assert!((info.grad_norm - 5.0).abs() < 1e-12 && info.clipped);
        assert!(
            (ma - 0.06).abs() < 1e-7 && (mb - 0.08).abs() < 1e-7,
            "{ma} {mb}"
        );
        // grad_clip above the norm, and grad_clip = 0 (off): unchanged, m = 0.1 g = [0.3], [0.4].
        for clip in [10.0, 0.0] {
            let (info, ma, mb) = run(clip);
            assert!((info.grad_norm - 5.0).abs() < 1e-12 && !info.clipped);
            assert!(
                (ma - 0.3).abs() < 1e-7 && (mb - 0.4).abs() < 1e-7,
                "{ma} {mb}"
            );
        }
    }

    /// Gradients of the mean squared error of y = x w + b over one batch, in order [w, b].
    fn mse_grads(w: &Var, b: &Var, x: &[[f32; 2]], y: &[f32]) -> Vec<Option<Tensor>> {
        let dev = Device::Cpu;
        let flat: Vec<f32> = x.iter().flatten().copied().collect();
        let x = Tensor::from_vec(flat, (x.len(), 2), &dev).unwrap(); // [n, 2]
        let y = Tensor::new(y, &dev).unwrap(); // [n]
        let pred = x
            .matmul(&w.as_tensor().unsqueeze(1).unwrap())
            .unwrap()
            .squeeze(1)
            .unwrap()
            .broadcast_add(b.as_tensor())
            .unwrap(); // [n]
        let loss = (pred - y).unwrap().sqr().unwrap().mean_all().unwrap();
        let g = loss.backward().unwrap();
        vec![g.get(w).cloned(), g.get(b).cloned()]
    }

    #[test]
    fn average_of_replica_grads_is_grad_of_union() {
        // Identity: for equal batch sizes, mean over A∪B of the per-example loss is the mean of
        // the two batch means, and the gradient is linear, so grad(A∪B) = (grad(A) + grad(B)) / 2.
        let w = Var::new(&[0.5f32, -1.0], &Device::Cpu).unwrap();
        let b = Var::new(&[0.2f32], &Device::Cpu).unwrap();
        let xa = [[1.0f32, 2.0], [0.5, -1.0], [3.0, 0.0]];
        let ya = [1.0f32, 0.0, 2.5];
        let xb = [[-1.0f32, 1.0], [2.0, 2.0], [0.0, -0.5]];
        let yb = [0.3f32, -2.0, 1.0];
        let union_x: Vec<[f32; 2]> = xa.iter().chain(&xb).copied().collect();
        let union_y: Vec<f32> = ya.iter().chain(&yb).copied().collect();
        let ga = mse_grads(&w, &b, &xa, &ya);
        let gb = mse_grads(&w, &b, &xb, &yb);
        let gu = mse_grads(&w, &b, &union_x, &union_y);
        let avg = average_grads(&[ga, gb]).unwrap();
        for (a, u) in avg.iter().zip(&gu) {
            let a = a.as_ref().unwrap().to_vec1::<f32>().unwrap();
            let u = u.as_ref().unwrap().to_vec1::<f32>().unwrap();
            for (p, q) in a.iter().zip(&u) {
                assert!((p - q).abs() < 1e-6, "{a:?} vs {u:?}");
            }
        }
    }

    #[test]
    fn average_grads_none_and_mismatch() {
        // By the documented contract: None counts as zero, so mean([4, 6], None) = [2, 3];
        // None everywhere stays None.
        let avg = average_grads(&[vec![grad(&[4.0, 6.0]), None], vec![None, None]]).unwrap();
        assert_eq!(
            avg[0].as_ref().unwrap().to_vec1::<f32>().unwrap(),
            [2.0, 3.0]
        );
        assert!(avg[1].is_none());
        assert!(matches!(
            average_grads(&[vec![grad(&[1.0])], vec![]]),
            Err(KernelError::Shape { .. })
        ));
        assert!(matches!(
            average_grads(&[vec![grad(&[1.0])], vec![grad(&[1.0, 2.0])]]),
            Err(KernelError::Shape { .. })
        ));
        assert!(average_grads(&[]).is_err());
    }

    fn copy_var(v: &Var) -> Var {
        Var::from_tensor(&v.as_tensor().copy().unwrap()).unwrap()
    }

    #[test]
    fn save_load_round_trip_is_bitwise() {
        // Determinism: the same state, the same vars and the same gradients give the same bits.
        let dev = Device::Cpu;
        let w = Var::new(&[[0.1f32, 0.2], [-0.3, 0.4]], &dev).unwrap();
        let b = Var::new(&[0.0f32, 1.0, -1.0], &dev).unwrap();
        let cfg = AdamWConfig {
            lr: 0.05,
            weight_decay: 0.01,
            grad_clip: 1.0,
            ..AdamWConfig::default()
        };
        let mut opt = AdamW::new(
            vec![("w".into(), w.clone()), ("b".into(), b.clone())],
            cfg.clone(),
        )
        .unwrap();
        for _ in 0..3 {
            opt.step(&quadratic_grads(&w, &b)).unwrap();
        }
        let path = tmp_path("round_trip");
        opt.save_state(&path).unwrap();
        assert!(!path.with_extension("safetensors.tmp").exists());

        let (w2, b2) = (copy_var(&w), copy_var(&b));
        let mut resumed = AdamW::new(
            vec![("w".into(), w2.clone()), ("b".into(), b2.clone())],
            cfg,
        )
        .unwrap();
        resumed.load_state(&path).unwrap();
        assert_eq!(resumed.t(), 3);
        for _ in 0..2 {
            opt.step(&quadratic_grads(&w, &b)).unwrap();
            resumed.step(&quadratic_grads(&w2, &b2)).unwrap();
        }
        for (x, y) in [(&w, &w2), (&b, &b2)] {
            let bits = |v: &Var| vals(v).iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(x), bits(y));
        }
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn load_state_rejects_bad_files() {
        let dev = Device::Cpu;
        let mk = || {
            AdamW::new(
                vec![("w".into(), Var::zeros((2, 2), DType::F32, &dev).unwrap())],
                AdamWConfig::default(),
            )
            .unwrap()
        };
        let good: HashMap<String, Tensor> = mk().state_tensors().unwrap().into_iter().collect();
        let expect_checkpoint_err = |tensors: &HashMap<String, Tensor>, tag: &str, needle: &str| {
            let path = tmp_path(tag);
            candle_core::safetensors::save(tensors, &path).unwrap();
            let mut opt = mk();
            match opt.load_state(&path) {
                Err(KernelError::Checkpoint { path: p, detail }) => {
                    assert!(detail.contains(needle), "{detail}");
                    assert_eq!(p, path.display().to_string());
                }
                other => panic!("expected a checkpoint error, got {other:?}"),
            }
            assert_eq!(opt.t(), 0);
            std::fs::remove_file(&path).unwrap();
        };
        let mut missing = good.clone();
        missing.remove("v.w");
        expect_checkpoint_err(&missing, "missing", "v.w");
        let mut wrong = good.clone();
        wrong.insert("m.w".into(), Tensor::zeros(3, DType::F32, &dev).unwrap());
        expect_checkpoint_err(&wrong, "wrong_shape", "m.w");
        let mut extra = good.clone();
        extra.insert(
            "m.other".into(),
            Tensor::zeros(1, DType::F32, &dev).unwrap(),
        );
        expect_checkpoint_err(&extra, "extra", "m.other");
        let mut bad_t = good;
        bad_t.insert("t".into(), Tensor::new(&[1.5f64], &dev).unwrap());
        expect_checkpoint_err(&bad_t, "bad_t", "t");

        // A corrupt file (not safetensors) and an absent file are errors, not panics.
        let path = tmp_path("corrupt");
        std::fs::write(
            &path,
            b"\x10\x00\x00\x00\x00\x00\x00\x00not json, not tensors",
        )
        .unwrap();
        assert!(matches!(
            mk().load_state(&path),
            Err(KernelError::Checkpoint { .. })
        ));
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            mk().load_state(&tmp_path("absent")),
            Err(KernelError::Checkpoint { .. })
        ));
    }

    #[test]
    fn config_validation_names_the_field() {
        let bad = [
            (
                "lr",
                AdamWConfig {
                    lr: -1.0,
                    ..AdamWConfig::default()
                },
            ),
            (
                "beta1",
                AdamWConfig {
                    beta1: 1.0,
                    ..AdamWConfig::default()
                },
            ),
            (
                "beta2",
                AdamWConfig {
                    beta2: -0.1,
                    ..AdamWConfig::default()
                },
            ),
            (
                "eps",
                AdamWConfig {
                    eps: 0.0,
                    ..AdamWConfig::default()
                },
            ),
            (
                "weight_decay",
                AdamWConfig {
                    weight_decay: f64::NAN,
                    ..AdamWConfig::default()
                },
            ),
            (
                "grad_clip",
                AdamWConfig {
                    grad_clip: -1.0,
                    ..AdamWConfig::default()
                },
            ),
        ];
        for (field, cfg) in bad {
            match cfg.validate() {
                Err(KernelError::Param { name, .. }) => assert_eq!(name, field),
                other => panic!("{field}: expected a param error, got {other:?}"),
            }
        }
        AdamWConfig::default().validate().unwrap();
        // Duplicate names would collide in the saved state.
        let v = scalar_var(0.0);
        assert!(AdamW::new(
            vec![("x".into(), v.clone()), ("x".into(), v)],
            AdamWConfig::default()
        )
        .is_err());
    }

    #[test]
    fn named_vars_are_sorted_by_name() {
        let vm = candle_nn::VarMap::new();
        let vb = crate::testutil::vb(&vm, 0, &Device::Cpu);
        for name in ["w2", "b", "a.z", "a.b"] {
            vb.get_with_hints(2, name, candle_nn::Init::Const(0.0))
                .unwrap();
        }
        let names: Vec<String> = named_vars(&vm).unwrap().into_iter().map(|v| v.0).collect();
        assert_eq!(names, ["a.b", "a.z", "b", "w2"]);
    }

    #[test]
    fn first_non_finite_finds_nan_and_inf_and_ignores_large_finite() {
        let d = Device::Cpu;
        let ok = Tensor::new(&[1.0f32, -2.0, 3.0e38, 3.0e38], &d).unwrap();
        let nan = Tensor::new(&[0.0f32, f32::NAN], &d).unwrap();
        let inf = Tensor::new(&[f32::NEG_INFINITY], &d).unwrap();
        // 3e38 + 3e38 overflows f32 but not the f64 sum: still finite.
        assert_eq!(first_non_finite(&[Some(ok.clone()), None]).unwrap(), None);
        assert_eq!(
            first_non_finite(&[Some(ok.clone()), None, Some(nan)]).unwrap(),
            Some(2)
        );
        assert_eq!(
            first_non_finite(&[None, Some(inf), Some(ok)]).unwrap(),
            Some(1)
        );
    }
}
