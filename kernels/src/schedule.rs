//! The variance-preserving noise schedule, forward noising q(x_n | x_0), the coarse sampling grid of
//! K steps and the coefficients of the stochastic DDIM step. Index convention (DESIGN.md): k runs
//! from K (noise) down to 0 (data); the training grid n runs 0 (data, abar = 1) ..= N.

use candle_core::Tensor;

use crate::{KernelError, Result};

/// Linear-beta VP schedule on the training grid n = 1..=N; `abar[0] = 1` is the data end.
#[derive(Debug, Clone)]
pub struct VpSchedule {
    /// beta_n for n = 1..=N, stored at index n - 1.
    pub betas: Vec<f64>,
    /// abar_n for n = 0..=N (abar_0 = 1).
    pub abar: Vec<f64>,
}

impl VpSchedule {
    /// Linear betas from `beta_start` to `beta_end` over `n` steps (DDPM: 1e-4 .. 0.02, N = 1000).
    pub fn linear(n: usize, beta_start: f64, beta_end: f64) -> Result<Self> {
        if n < 2 {
            return Err(KernelError::param(
                "schedule.train_steps",
                n,
                "must be at least 2",
            ));
        }
        if !(0.0 < beta_start && beta_start <= beta_end && beta_end < 1.0) {
            return Err(KernelError::param(
                "schedule.beta",
                format!("{beta_start}..{beta_end}"),
                "need 0 < beta_start <= beta_end < 1",
            ));
        }
        let betas: Vec<f64> = (0..n)
            .map(|i| beta_start + (beta_end - beta_start) * i as f64 / (n - 1) as f64)
            .collect();
        Self::from_betas(betas)
    }

    /// The schedule of explicit betas (beta_n for n = 1..=N at index n - 1), each in (0, 1).
    pub fn from_betas(betas: Vec<f64>) -> Result<Self> {
        if betas.len() < 2 {
            return Err(KernelError::param(
                "schedule.train_steps",
                betas.len(),
                "must be at least 2",
            ));
        }
        if let Some((i, b)) = betas
            .iter()
            .enumerate()
            .find(|(_, b)| !(**b > 0.0 && **b < 1.0))
        {
            return Err(KernelError::param(
                "schedule.betas",
                format!("beta[{i}] = {b}"),
                "every beta must lie in (0, 1)",
            ));
        }
        let mut abar = Vec::with_capacity(betas.len() + 1);
        abar.push(1.0);
        for b in &betas {
            let last = *abar.last().unwrap_or(&1.0);
            abar.push(last * (1.0 - b));
        }
        Ok(Self { betas, abar })
    }

    /// The DDPM default: N = 1000, betas 1e-4 .. 0.02.
    pub fn ddpm_default() -> Self {
        Self::linear(1000, 1e-4, 0.02).expect("constant parameters are valid")
    }

    /// N, the number of training steps.
    pub fn train_steps(&self) -> usize {
        self.betas.len()
    }

    /// Forward noising x_n = sqrt(abar_n) x_0 + sqrt(1 - abar_n) eps, one n per batch row.
    /// `x0`, `eps`: [batch, ...]; `n`: one index per row.
    pub fn q_sample(&self, x0: &Tensor, n: &[usize], eps: &Tensor) -> Result<Tensor> {
        let b = x0.dim(0)?;
        if n.len() != b || eps.shape() != x0.shape() {
            return Err(KernelError::shape(
                "q_sample",
                format!(
                    "x0 {:?}, eps {:?}, {} indices",
                    x0.shape(),
                    eps.shape(),
                    n.len()
                ),
            ));
        }
        let mut a = Vec::with_capacity(b);
        let mut s = Vec::with_capacity(b);
        for &ni in n {
            let ab = *self.abar.get(ni).ok_or_else(|| {
                KernelError::param(
                    "n",
                    ni,
                    format!("training index beyond N = {}", self.train_steps()),
                )
            })?;
            a.push(ab.sqrt() as f32);
            s.push((1.0 - ab).sqrt() as f32);
        }
        let mut bshape = vec![b];
        bshape.extend(std::iter::repeat_n(1, x0.rank() - 1));
        let a = Tensor::from_vec(a, bshape.clone(), x0.device())?;
        let s = Tensor::from_vec(s, bshape, x0.device())?;
        Ok((x0.broadcast_mul(&a)? + eps.broadcast_mul(&s)?)?)
    }
}

/// The coefficients of one sampling step k -> k-1: x_{k-1} = c_x x_k + c_eps eps(x_k, n_k) + sigma z.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepCoef {
    /// Training index of x_k.
    pub n_from: usize,
    /// Training index of x_{k-1}.
    pub n_to: usize,
    pub c_x: f64,
    pub c_eps: f64,
    /// Standard deviation of the step; > 0 for every step (see `SamplingGrid::new`).
    pub sigma: f64,
}

/// A coarse grid of K sampling steps over a `VpSchedule`, with stochastic DDIM coefficients.
#[derive(Debug, Clone)]
pub struct SamplingGrid {
    /// n_k for k = 0..=K: n_0 = 0 (data), n_K = N.
    pub n_of_k: Vec<usize>,
    /// `steps[k - 1]` is the step k -> k-1, for k = 1..=K.
    pub steps: Vec<StepCoef>,
    pub eta: f64,
    /// The training-grid size N the indices refer to.
    pub train_steps: usize,
}

impl SamplingGrid {
    /// K evenly spaced steps, n_k = round(k N / K), DDIM with `eta` in (0, 1] (1 = DDPM posterior
    /// variance). The DDIM variance of the last step (n_0 = 0, abar = 1) is zero; it is replaced
    /// by 1 - abar_1 = beta_1 (1e-4 for the default schedule) so every transition is a proper
    /// Gaussian with a log-density, and the direction term sqrt(1 - abar' - sigma^2) is clamped
    /// at 0 (the last step's mean is then the predicted x_0).
    pub fn new(schedule: &VpSchedule, k: usize, eta: f64) -> Result<Self> {
        let n = schedule.train_steps();
        if k == 0 || k > n {
            return Err(KernelError::param(
                "sampling.steps",
                k,
                format!("must be in 1..={n}"),
            ));
        }
        let n_of_k: Vec<usize> = (0..=k)
            .map(|i| ((i as f64) * n as f64 / k as f64).round() as usize)
            .collect();
        Self::from_indices(schedule, n_of_k, eta)
    }

    /// The grid through the training indices `n_of_k` (k = 0..=K, strictly increasing, at most
    /// N; n_0 = 0 is the data end, abar = 1), with the same stochastic DDIM steps as
    /// [`SamplingGrid::new`]. A diffusers scheduler's timesteps map here (tilt's n = diffusers'
    /// t + 1; see `crate::diffusers::scheduler`).
    pub fn from_indices(schedule: &VpSchedule, n_of_k: Vec<usize>, eta: f64) -> Result<Self> {
        let n = schedule.train_steps();
        if !(eta > 0.0 && eta <= 1.0) {
            return Err(KernelError::param("sampling.eta", eta, "must be in (0, 1]"));
        }
        if n_of_k.len() < 2
            || n_of_k.windows(2).any(|w| w[0] >= w[1])
            || n_of_k.last().is_some_and(|&top| top > n)
        {
            return Err(KernelError::param(
                "sampling.timesteps",
                format!("{n_of_k:?}"),
                format!("need at least 2 strictly increasing training indices <= N = {n}"),
            ));
        }
        let k = n_of_k.len() - 1;
        let var_floor = 1.0 - schedule.abar[1];
        let steps = (1..=k)
            .map(|i| {
                let (nf, nt) = (n_of_k[i], n_of_k[i - 1]);
                let (a, ap) = (schedule.abar[nf], schedule.abar[nt]);
                let ddpm_var = (1.0 - ap) / (1.0 - a) * (1.0 - a / ap);
                // Only a step to the data end (abar = 1) has zero DDIM variance; every other
                // step keeps diffusers' variance exactly.
                let var = if ap >= 1.0 {
                    var_floor
                } else {
                    eta * eta * ddpm_var
                };
                let dir = (1.0 - ap - var).max(0.0).sqrt();
                // mu = sqrt(ap) * (x - sqrt(1-a) eps) / sqrt(a) + dir * eps
                StepCoef {
                    n_from: nf,
                    n_to: nt,
                    c_x: (ap / a).sqrt(),
                    c_eps: dir - (ap * (1.0 - a) / a).sqrt(),
                    sigma: var.sqrt(),
                }
            })
            .collect();
        Ok(Self {
            n_of_k,
            steps,
            eta,
            train_steps: n,
        })
    }

    /// K, the number of sampling steps.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// Always false: a grid has at least one step.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// The coefficients of step k -> k-1 (k in 1..=K).
    pub fn step(&self, k: usize) -> Result<StepCoef> {
        if k == 0 || k > self.len() {
            return Err(KernelError::param(
                "k",
                k,
                format!("step index must be in 1..={}", self.len()),
            ));
        }
        Ok(self.steps[k - 1])
    }

    /// The one-step Gaussian approximation of an L-step segment endpoint (the VRPO paper's
    /// Lemma 2): a single DDIM jump from n_k to n_{k-L} with the same eta.
    pub fn jump(&self, schedule: &VpSchedule, k: usize, len: usize) -> Result<StepCoef> {
        if len == 0 || len > k || k > self.len() {
            return Err(KernelError::param(
                "segment_len",
                len,
                format!("need 1 <= L <= k = {k} <= K"),
            ));
        }
        let (nf, nt) = (self.n_of_k[k], self.n_of_k[k - len]);
        let (a, ap) = (schedule.abar[nf], schedule.abar[nt]);
        let ddpm_var = (1.0 - ap) / (1.0 - a) * (1.0 - a / ap);
        let var = (self.eta * self.eta * ddpm_var).max(1.0 - schedule.abar[1]);
        let dir = (1.0 - ap - var).max(0.0).sqrt();
        Ok(StepCoef {
            n_from: nf,
            n_to: nt,
            c_x: (ap / a).sqrt(),
            c_eps: dir - (ap * (1.0 - a) / a).sqrt(),
            sigma: var.sqrt(),
        })
    }
}

impl StepCoef {
    /// Mean of the transition: c_x x + c_eps eps.
    pub fn mean(&self, x: &Tensor, eps: &Tensor) -> Result<Tensor> {
        Ok(((x * self.c_x)? + (eps * self.c_eps)?)?)
    }

    /// The next state: mean + sigma z.
    pub fn sample(&self, x: &Tensor, eps: &Tensor, z: &Tensor) -> Result<Tensor> {
        Ok((self.mean(x, eps)? + (z * self.sigma)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn abar_matches_hand_product() {
        // abar_1 = 1 - 1e-4; abar_2 = (1 - 1e-4)(1 - beta_2), beta_2 = 1e-4 + 0.0199/999.
        let s = VpSchedule::ddpm_default();
        assert_eq!(s.abar[0], 1.0);
        assert!((s.abar[1] - 0.9999).abs() < 1e-15);
        let b2 = 1e-4 + 0.0199 / 999.0;
        assert!((s.abar[2] - 0.9999 * (1.0 - b2)).abs() < 1e-15);
        // Known value for the DDPM schedule: abar_1000 ~ 4.04e-5.
        assert!((s.abar[1000] - 4.036e-5).abs() < 1e-7, "{}", s.abar[1000]);
    }

    #[test]
    fn every_step_has_positive_sigma_and_ddpm_variance_where_defined() {
        let s = VpSchedule::ddpm_default();
        for k in [1, 20, 100, 1000] {
            let g = SamplingGrid::new(&s, k, 1.0).unwrap();
            assert_eq!(g.n_of_k[0], 0);
            assert_eq!(g.n_of_k[k], 1000);
            for st in &g.steps {
                assert!(st.sigma > 0.0, "k={k} {st:?}");
            }
            // The last step's variance is the floor 1 - abar_1 = 1e-4.
            assert!((g.steps[0].sigma.powi(2) - 1e-4).abs() < 1e-12);
        }
        // With K = N and eta = 1 each step is the DDPM posterior: sigma^2 = beta_n (1-abar_{n-1})/(1-abar_n).
        let g = SamplingGrid::new(&s, 1000, 1.0).unwrap();
        let n = 500;
        let want = s.betas[n - 1] * (1.0 - s.abar[n - 1]) / (1.0 - s.abar[n]);
        assert!((g.steps[n - 1].sigma.powi(2) - want).abs() < 1e-12);
    }

    #[test]
    fn step_is_exact_when_eps_is_the_true_noise_and_sigma_is_small() {
        // If x_k = sqrt(a) x0 + sqrt(1-a) eps and the model returns eps, the mean is
        // sqrt(a') x0 + sqrt(1 - a' - sigma^2) eps (DDIM, Song et al. eq. 12).
        let s = VpSchedule::ddpm_default();
        let g = SamplingGrid::new(&s, 20, 0.5).unwrap();
        let d = Device::Cpu;
        let x0 = Tensor::new(&[[0.3f32, -1.2]], &d).unwrap();
        let eps = Tensor::new(&[[0.7f32, 0.1]], &d).unwrap();
        let st = g.step(10).unwrap();
        let xk = s.q_sample(&x0, &[st.n_from], &eps).unwrap();
        let mu = st.mean(&xk, &eps).unwrap().to_vec2::<f32>().unwrap();
        let ap = s.abar[st.n_to];
        let dir = (1.0 - ap - st.sigma * st.sigma).sqrt();
        for (j, (x0j, ej)) in [(0.3, 0.7), (-1.2, 0.1)].iter().enumerate() {
            let want = ap.sqrt() * x0j + dir * ej;
            assert!(
                (mu[0][j] as f64 - want).abs() < 1e-5,
                "{} vs {want}",
                mu[0][j]
            );
        }
    }

    #[test]
    fn bad_parameters_are_named() {
        let s = VpSchedule::ddpm_default();
        let e = SamplingGrid::new(&s, 20, 0.0).unwrap_err().to_string();
        assert!(e.contains("sampling.eta"), "{e}");
        assert!(VpSchedule::linear(1, 0.1, 0.2).is_err());
    }
}
