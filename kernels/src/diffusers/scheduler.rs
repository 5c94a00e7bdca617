//! A diffusers `scheduler_config.json`, read exactly: the training betas (`beta_schedule`), the
//! inference timesteps (`timestep_spacing`, `steps_offset`), the final alpha (`set_alpha_to_one`)
//! and the prediction type, mapped onto tilt's [`VpSchedule`] and [`SamplingGrid`]. tilt always
//! samples with its stochastic DDIM step; for the same timestep pair, eta and noise it is
//! diffusers' `DDIMScheduler.step(model_output, t, x, eta, variance_noise=z)`. A key tilt does not
//! implement, or one set to a value it does not honour, is refused by name, never defaulted.
//!
//! Index map: diffusers' `alphas_cumprod[t]` (t = 0..N-1) is tilt's `abar[t + 1]`; tilt's
//! `abar[0] = 1` is diffusers' `final_alpha_cumprod` with `set_alpha_to_one`. A model called by
//! tilt at training index n gets diffusers' timestep n - 1.

use serde_json::Value;

use super::config::{flag, key_err, num, object, require, text, uint, unknown_key};

use crate::denoiser::Prediction;
use crate::schedule::{SamplingGrid, VpSchedule};
use crate::{KernelError, Result};

/// How the training betas are laid out (`beta_schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetaSchedule {
    /// `linspace(beta_start, beta_end, N)`.
    Linear,
    /// `linspace(sqrt(beta_start), sqrt(beta_end), N) ** 2` (Stable Diffusion).
    ScaledLinear,
    /// The cosine schedule of Nichol & Dhariwal, betas capped at 0.999.
    SquaredcosCapV2,
}

/// Where the K inference timesteps sit (`timestep_spacing`; Lin et al. 2023, table 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spacing {
    /// `arange(K) * (N // K)`, reversed, plus `steps_offset`.
    Leading,
    /// `round(arange(N, 0, -N / K)) - 1`.
    Trailing,
    /// `round(linspace(0, N - 1, K))`, reversed.
    Linspace,
}

/// The scheduler classes whose config tilt reads (for their training schedule; tilt samples with
/// its own stochastic DDIM step whatever the class).
pub const SCHEDULER_CLASSES: [&str; 3] = ["DDIMScheduler", "DDPMScheduler", "PNDMScheduler"];

/// A parsed `scheduler_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    pub class_name: String,
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub prediction_type: Prediction,
    pub timestep_spacing: Spacing,
    pub steps_offset: usize,
    pub set_alpha_to_one: bool,
}

/// Keys whose value tilt reads without using it: metadata, or settings that only act through a
/// feature refused elsewhere (`thresholding`) or through a sampler tilt replaces (PNDM's PRK
/// steps, DDPM's variance when it is the fixed posterior one).
const INERT: [&str; 4] = [
    "_diffusers_version",
    "dynamic_thresholding_ratio",
    "sample_max_value",
    "skip_prk_steps",
];

impl SchedulerConfig {
    /// Parse the JSON text of a `scheduler_config.json`; `file` names it in errors. Defaults are
    /// diffusers' own for a key the file leaves out (its `DDIMScheduler.__init__` defaults; for
    /// `set_alpha_to_one`, `steps_offset` and `clip_sample` the class's).
    pub fn from_json(json: &str, file: &str) -> Result<Self> {
        let obj = object(json, file)?;
        let class_name = match obj.get("_class_name") {
            Some(v) => text(file, "_class_name", v)?.to_string(),
            None => return Err(key_err(file, "_class_name", "missing")),
        };
        if !SCHEDULER_CLASSES.contains(&class_name.as_str()) {
            return Err(key_err(
                file,
                "_class_name",
                format!("{class_name:?} is not supported (tilt reads {SCHEDULER_CLASSES:?})"),
            ));
        }
        let mut c = SchedulerConfig {
            class_name,
            num_train_timesteps: 1000,
            beta_start: 1e-4,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            prediction_type: Prediction::Eps,
            timestep_spacing: Spacing::Leading,
            steps_offset: 0,
            set_alpha_to_one: true,
        };
        for (key, v) in &obj {
            let k = key.as_str();
            match k {
                "_class_name" => {}
                k if INERT.contains(&k) => {}
                "num_train_timesteps" => c.num_train_timesteps = uint(file, k, v)?,
                "beta_start" => c.beta_start = num(file, k, v)?,
                "beta_end" => c.beta_end = num(file, k, v)?,
                "beta_schedule" => {
                    c.beta_schedule = match text(file, k, v)? {
                        "linear" => BetaSchedule::Linear,
                        "scaled_linear" => BetaSchedule::ScaledLinear,
                        "squaredcos_cap_v2" => BetaSchedule::SquaredcosCapV2,
                        other => {
                            return Err(key_err(
                                file,
                                k,
                                format!(
                            "{other:?} is not supported (linear, scaled_linear, squaredcos_cap_v2)"
                        ),
                            ))
                        }
                    }
                }
                "prediction_type" => {
                    c.prediction_type = match text(file, k, v)? {
                        "epsilon" => Prediction::Eps,
                        "v_prediction" => Prediction::V,
                        other => {
                            return Err(key_err(
                                file,
                                k,
                                format!("{other:?} is not supported (epsilon, v_prediction)"),
                            ))
                        }
                    }
                }
                "timestep_spacing" => {
                    c.timestep_spacing = match text(file, k, v)? {
                        "leading" => Spacing::Leading,
                        "trailing" => Spacing::Trailing,
                        "linspace" => Spacing::Linspace,
                        other => {
                            return Err(key_err(
                                file,
                                k,
                                format!("{other:?} is not supported (leading, trailing, linspace)"),
                            ))
                        }
                    }
                }
                "steps_offset" => c.steps_offset = uint(file, k, v)?,
                "set_alpha_to_one" => c.set_alpha_to_one = flag(file, k, v)?,
                "trained_betas" => require(file, k, v, &[Value::Null], "an explicit beta list")?,
                "thresholding" => {
                    require(file, k, v, &[Value::Bool(false)], "dynamic thresholding")?
                }
                "rescale_betas_zero_snr" => {
                    require(file, k, v, &[Value::Bool(false)], "zero-SNR rescaling")?
                }
                // Clipping the predicted x_0 makes the step's mean non-affine in the model's
                // output; tilt's transitions are affine (their log-probabilities are exact).
                "clip_sample" => require(file, k, v, &[Value::Bool(false)], "clipping x_0")?,
                "clip_sample_range" => {
                    num(file, k, v)?;
                }
                "variance_type" => require(
                    file,
                    k,
                    v,
                    &["fixed_small".into()],
                    "a variance other than the DDPM posterior's",
                )?,
                _ => return Err(unknown_key(file, k, v)),
            }
        }
        c.validate(file)?;
        Ok(c)
    }

    fn validate(&self, file: &str) -> Result<()> {
        if self.num_train_timesteps < 2 {
            return Err(key_err(
                file,
                "num_train_timesteps",
                format!("= {}: must be at least 2", self.num_train_timesteps),
            ));
        }
        if !(0.0 < self.beta_start && self.beta_start <= self.beta_end && self.beta_end < 1.0) {
            return Err(key_err(
                file,
                "beta_start",
                format!(
                    "beta_start = {}, beta_end = {}: need 0 < beta_start <= beta_end < 1",
                    self.beta_start, self.beta_end
                ),
            ));
        }
        if self.steps_offset >= self.num_train_timesteps {
            return Err(key_err(
                file,
                "steps_offset",
                format!("= {}: must be below num_train_timesteps", self.steps_offset),
            ));
        }
        Ok(())
    }

    /// The N training betas, as diffusers computes them (in f64 here; diffusers' f32 differ by a
    /// few ulp of f32).
    pub fn betas(&self) -> Vec<f64> {
        let n = self.num_train_timesteps;
        let lin = |a: f64, b: f64| -> Vec<f64> {
            (0..n)
                .map(|i| a + (b - a) * i as f64 / (n - 1) as f64)
                .collect()
        };
        match self.beta_schedule {
            BetaSchedule::Linear => lin(self.beta_start, self.beta_end),
            BetaSchedule::ScaledLinear => lin(self.beta_start.sqrt(), self.beta_end.sqrt())
                .into_iter()
                .map(|b| b * b)
                .collect(),
            BetaSchedule::SquaredcosCapV2 => {
                // diffusers' betas_for_alpha_bar(N, max_beta = 0.999, "cosine").
                let abar = |t: f64| {
                    ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                        .cos()
                        .powi(2)
                };
                (0..n)
                    .map(|i| {
                        let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                        (1.0 - abar(t2) / abar(t1)).min(0.999)
                    })
                    .collect()
            }
        }
    }

    /// tilt's schedule of these betas (abar[t + 1] = diffusers' alphas_cumprod[t]).
    pub fn vp_schedule(&self) -> Result<VpSchedule> {
        VpSchedule::from_betas(self.betas())
    }

    /// diffusers' inference timesteps for `k` steps (`DDIMScheduler.set_timesteps`), from the
    /// noisiest down.
    pub fn timesteps(&self, k: usize) -> Result<Vec<usize>> {
        let n = self.num_train_timesteps;
        if k == 0 || k > n {
            return Err(KernelError::param(
                "sampling.steps",
                k,
                format!("must be in 1..={n} (num_train_timesteps)"),
            ));
        }
        // numpy's round is half-to-even; every value rounded here is either an integer or, for
        // linspace and trailing, a float whose fraction decides the same way as round-half-even
        // except at exact halves, which `round_ties_even` reproduces.
        let t: Vec<usize> = match self.timestep_spacing {
            Spacing::Leading => {
                let ratio = n / k;
                (0..k)
                    .rev()
                    .map(|i| i * ratio + self.steps_offset)
                    .collect()
            }
            Spacing::Trailing => {
                let ratio = n as f64 / k as f64;
                // np.arange(n, 0, -ratio): n - i * ratio while > 0.
                (0..)
                    .map(|i| n as f64 - i as f64 * ratio)
                    .take_while(|&v| v > 0.0)
                    .map(|v| (v.round_ties_even() as usize).saturating_sub(1))
                    .collect()
            }
            Spacing::Linspace => (0..k)
                .rev()
                .map(|i| {
                    let v = if k == 1 {
                        0.0
                    } else {
                        i as f64 * (n - 1) as f64 / (k - 1) as f64
                    };
                    v.round_ties_even() as usize
                })
                .collect(),
        };
        if let Some(&top) = t.first() {
            if top >= n {
                return Err(KernelError::param(
                    "steps_offset",
                    self.steps_offset,
                    format!(
                        "the first timestep {top} is beyond num_train_timesteps - 1 = {}",
                        n - 1
                    ),
                ));
            }
        }
        Ok(t)
    }

    /// tilt's sampling grid through diffusers' timesteps: x_K sits at timestep `timesteps[0]`
    /// (tilt index t + 1), each step goes to the next timestep, and the last goes to diffusers'
    /// final alpha (tilt index 0, abar = 1, with `set_alpha_to_one`; else index 1, diffusers'
    /// `alphas_cumprod[0]`). With "leading" and "trailing" spacing and N divisible by K, each
    /// step is the pair (t, t - N // K) that `DDIMScheduler.step` takes.
    pub fn sampling_grid(&self, schedule: &VpSchedule, k: usize, eta: f64) -> Result<SamplingGrid> {
        let t = self.timesteps(k)?;
        let mut n_of_k: Vec<usize> = t.iter().rev().map(|&t| t + 1).collect();
        n_of_k.insert(0, if self.set_alpha_to_one { 0 } else { 1 });
        if n_of_k[0] >= n_of_k[1] {
            // Without set_alpha_to_one the final alpha is alphas_cumprod[0], the alpha of
            // timestep 0 itself: a chain whose last timestep is 0 would end with an empty step.
            return Err(KernelError::param(
                "set_alpha_to_one",
                self.set_alpha_to_one,
                "the last inference timestep is 0, whose alpha is also the final alpha: use steps_offset >= 1 or set_alpha_to_one",
            ));
        }
        SamplingGrid::from_indices(schedule, n_of_k, eta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SD15: &str = r#"{
      "_class_name": "PNDMScheduler",
      "_diffusers_version": "0.6.0",
      "beta_end": 0.012,
      "beta_schedule": "scaled_linear",
      "beta_start": 0.00085,
      "num_train_timesteps": 1000,
      "set_alpha_to_one": false,
      "skip_prk_steps": true,
      "steps_offset": 1,
      "trained_betas": null,
      "clip_sample": false
    }"#;

    /// `DDIMScheduler.step` in scalars, transcribed from diffusers 0.3x (`scheduling_ddim.py`),
    /// with `alphas_cumprod` indexed by diffusers' t: from `sample` at timestep `t` to `prev_t`
    /// (`None`: the final alpha), model output `out`, noise `z`. No clipping, no thresholding.
    struct DdimReference<'a> {
        alphas_cumprod: &'a [f64],
        final_alpha: f64,
        prediction: Prediction,
        eta: f64,
    }

    impl DdimReference<'_> {
        fn step(&self, t: usize, prev_t: Option<usize>, sample: f64, out: f64, z: f64) -> f64 {
            let a = self.alphas_cumprod[t];
            let ap = prev_t.map_or(self.final_alpha, |p| self.alphas_cumprod[p]);
            let b = 1.0 - a;
            let (x0, eps) = match self.prediction {
                Prediction::Eps => ((sample - b.sqrt() * out) / a.sqrt(), out),
                Prediction::V => (
                    a.sqrt() * sample - b.sqrt() * out,
                    a.sqrt() * out + b.sqrt() * sample,
                ),
            };
            let variance = (1.0 - ap) / b * (1.0 - a / ap);
            let std = self.eta * variance.sqrt();
            let dir = (1.0 - ap - std * std).sqrt() * eps;
            ap.sqrt() * x0 + dir + std * z
        }
    }

    fn cfg(json: &str) -> SchedulerConfig {
        SchedulerConfig::from_json(json, "scheduler_config.json").unwrap()
    }

    fn refused(json: &str) -> String {
        SchedulerConfig::from_json(json, "scheduler_config.json")
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn stable_diffusion_1_5_config_reads_as_written() {
        // The scheduler_config.json shipped with SD 1.5 (above, verbatim).
        let c = cfg(SD15);
        assert_eq!(c.beta_schedule, BetaSchedule::ScaledLinear);
        assert_eq!((c.steps_offset, c.set_alpha_to_one), (1, false));
        let b = c.betas();
        // scaled_linear: the first and last betas are beta_start and beta_end exactly.
        assert!((b[0] - 0.00085).abs() < 1e-15 && (b[999] - 0.012).abs() < 1e-15);
        // Leading spacing, 50 steps, offset 1: 981, 961, ..., 21, 1 (the timesteps diffusers'
        // DDIM pipeline prints for SD 1.5).
        let t = c.timesteps(50).unwrap();
        assert_eq!(t.len(), 50);
        assert_eq!((t[0], t[1], t[48], t[49]), (981, 961, 21, 1));
        // The grid: x_K at t = 981 (tilt n = 982), last step to alphas_cumprod[0] (n = 1).
        let s = c.vp_schedule().unwrap();
        let g = c.sampling_grid(&s, 50, 1.0).unwrap();
        assert_eq!(g.n_of_k[0], 1);
        assert_eq!(g.n_of_k[1], 2);
        assert_eq!(*g.n_of_k.last().unwrap(), 982);
    }

    #[test]
    fn trailing_and_linspace_spacing() {
        let base = r#"{"_class_name": "DDIMScheduler", "timestep_spacing": "SPACING"}"#;
        let trailing = cfg(&base.replace("SPACING", "trailing"))
            .timesteps(50)
            .unwrap();
        // round(arange(1000, 0, -20)) - 1 = 999, 979, ..., 19.
        assert_eq!(trailing.len(), 50);
        assert_eq!((trailing[0], trailing[1], trailing[49]), (999, 979, 19));
        // 3 steps of 1000: arange(1000, 0, -333.33) = 1000, 666.67, 333.33 -> 999, 666, 332.
        let t3 = cfg(&base.replace("SPACING", "trailing"))
            .timesteps(3)
            .unwrap();
        assert_eq!(t3, [999, 666, 332]);
        // round(linspace(0, 999, 4)) reversed: 999, 666, 333, 0.
        let lin = cfg(&base.replace("SPACING", "linspace"))
            .timesteps(4)
            .unwrap();
        assert_eq!(lin, [999, 666, 333, 0]);
    }

    #[test]
    fn cosine_betas_follow_the_alpha_bar_ratio() {
        let c = cfg(r#"{"_class_name": "DDPMScheduler", "beta_schedule": "squaredcos_cap_v2"}"#);
        let b = c.betas();
        let f = |t: f64| {
            ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                .cos()
                .powi(2)
        };
        assert!((b[0] - (1.0 - f(0.001) / f(0.0))).abs() < 1e-15);
        // The last beta hits the cap: alpha_bar(1) = cos(pi/2)^2 = 0.
        assert_eq!(b[999], 0.999);
    }

    #[test]
    fn grid_steps_are_diffusers_ddim_steps() {
        // tilt's step k -> k-1 (mean c_x x + c_eps eps plus sigma z) equals DDIMScheduler.step
        // (DdimReference), at three timesteps (first, middle, last), for eps and v models and
        // two eta. Both are f64 here: agreement to 1e-12.
        for (spacing, alpha_one) in [("leading", false), ("trailing", true)] {
            let c = cfg(&format!(
                r#"{{"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear",
                    "beta_start": 0.00085, "beta_end": 0.012, "timestep_spacing": "{spacing}",
                    "steps_offset": 1, "set_alpha_to_one": {alpha_one}}}"#
            ));
            let s = c.vp_schedule().unwrap();
            let ac: Vec<f64> = s.abar[1..].to_vec();
            let final_alpha = if alpha_one { 1.0 } else { ac[0] };
            let t = c.timesteps(20).unwrap();
            for eta in [1.0, 0.3] {
                let g = c.sampling_grid(&s, 20, eta).unwrap();
                for (i, k) in [(0usize, 20usize), (10, 10), (19, 1)] {
                    let st = g.step(k).unwrap();
                    assert_eq!(st.n_from, t[i] + 1);
                    let prev = t.get(i + 1).copied();
                    let (x, out, z) = (0.37, -1.1, 0.8);
                    for pred in [Prediction::Eps, Prediction::V] {
                        let want = DdimReference {
                            alphas_cumprod: &ac,
                            final_alpha,
                            prediction: pred,
                            eta,
                        }
                        .step(t[i], prev, x, out, z);
                        let a = s.abar[st.n_from];
                        // tilt sees a v model through VPrediction: eps = sqrt(a) v + sqrt(1-a) x.
                        let eps = match pred {
                            Prediction::Eps => out,
                            Prediction::V => a.sqrt() * out + (1.0 - a).sqrt() * x,
                        };
                        let got = st.c_x * x + st.c_eps * eps + st.sigma * z;
                        if prev.is_none() && alpha_one {
                            // The step to abar = 1 has zero DDIM variance; tilt gives it
                            // beta_1 (DESIGN: every transition a Gaussian). Only the noise term
                            // and the direction differ, by O(sqrt(beta_1)).
                            assert!(
                                (got - want).abs() < 0.05,
                                "{spacing} k={k}: {got} vs {want}"
                            );
                        } else {
                            assert!(
                                (got - want).abs() < 1e-12,
                                "{spacing} eta={eta} k={k} {pred:?}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn keys_tilt_does_not_honour_are_refused_by_name() {
        let e = refused(r#"{"_class_name": "EulerDiscreteScheduler"}"#);
        assert!(
            e.contains("scheduler_config.json") && e.contains("_class_name"),
            "{e}"
        );
        for (key, val) in [
            ("clip_sample", "true"),
            ("thresholding", "true"),
            ("rescale_betas_zero_snr", "true"),
            ("trained_betas", "[0.1, 0.2]"),
            ("variance_type", "\"learned_range\""),
            ("prediction_type", "\"sample\""),
            ("beta_schedule", "\"sigmoid\""),
            ("timestep_spacing", "\"karras\""),
            ("use_karras_sigmas", "true"),
            ("num_train_timesteps", "\"1000\""),
        ] {
            let e = refused(&format!(
                r#"{{"_class_name": "DDIMScheduler", "{key}": {val}}}"#
            ));
            assert!(
                e.contains("scheduler_config.json") && e.contains(key),
                "{key}: {e}"
            );
        }
        let e = refused("[1, 2]");
        assert!(e.contains("JSON object"), "{e}");
        let e = refused(r#"{"_class_name": "DDIMScheduler", "beta_start": 0.5, "beta_end": 0.1}"#);
        assert!(e.contains("beta_start"), "{e}");
        // Off or inert values of the same keys are accepted.
        cfg(
            r#"{"_class_name": "DDIMScheduler", "clip_sample": false, "thresholding": false,
                "sample_max_value": 1.0, "dynamic_thresholding_ratio": 0.995,
                "clip_sample_range": 1.0, "variance_type": "fixed_small"}"#,
        );
    }

    #[test]
    fn a_chain_ending_on_its_own_final_alpha_is_refused() {
        // Leading spacing with offset 0 ends at timestep 0; without set_alpha_to_one the final
        // alpha is alphas_cumprod[0]: no step left to take.
        let c = cfg(r#"{"_class_name": "DDIMScheduler", "set_alpha_to_one": false}"#);
        let s = c.vp_schedule().unwrap();
        let e = c.sampling_grid(&s, 10, 1.0).unwrap_err().to_string();
        assert!(e.contains("set_alpha_to_one"), "{e}");
    }
}
