//! The analytic reference: an isotropic Gaussian mixture in R^D. Its noised density is a mixture
//! again, so the exact eps of the forward process is a `Denoiser`; a linear reward tilts it into
//! another closed-form mixture; and the exact value V(x, n) = log E[exp(lambda a.x_0) | x_n = x]
//! follows from the mixture posterior. All of it in f64 on the host (the data are low-dimensional).

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::Rng;
use rand_distr::StandardNormal;

use crate::denoiser::Denoiser;
use crate::schedule::VpSchedule;
use crate::{KernelError, Result};

/// sum_i w_i N(mu_i, s_i^2 I).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GaussianMixture {
    pub weights: Vec<f64>,
    pub means: Vec<Vec<f64>>,
    pub stds: Vec<f64>,
}

fn logsumexp(v: &[f64]) -> f64 {
    let m = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + v.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
}

impl GaussianMixture {
    /// Validate and build: weights positive (normalised here), one mean and one std per component,
    /// all means of the same dimension.
    pub fn new(weights: Vec<f64>, means: Vec<Vec<f64>>, stds: Vec<f64>) -> Result<Self> {
        let c = weights.len();
        if c == 0 || means.len() != c || stds.len() != c {
            return Err(KernelError::param(
                "mixture",
                format!("{c} weights, {} means, {} stds", means.len(), stds.len()),
                "need one weight, mean and std per component",
            ));
        }
        let d = means[0].len();
        if d == 0 || means.iter().any(|m| m.len() != d) {
            return Err(KernelError::param(
                "mixture.means",
                format!("{means:?}"),
                "all means need the same positive dimension",
            ));
        }
        if weights.iter().chain(&stds).any(|v| v.is_nan() || *v <= 0.0) {
            return Err(KernelError::param(
                "mixture",
                format!("{weights:?} / {stds:?}"),
                "weights and stds must be positive",
            ));
        }
        let z: f64 = weights.iter().sum();
        Ok(Self {
            weights: weights.iter().map(|w| w / z).collect(),
            means,
            stds,
        })
    }

    /// D, the data dimension.
    pub fn dim(&self) -> usize {
        self.means[0].len()
    }

    /// Number of components.
    pub fn components(&self) -> usize {
        self.weights.len()
    }

    /// Draw `n` samples and their component indices. Samples: [n, D] f32.
    pub fn sample(
        &self,
        n: usize,
        rng: &mut StdRng,
        device: &Device,
    ) -> Result<(Tensor, Vec<usize>)> {
        let d = self.dim();
        let mut xs = Vec::with_capacity(n * d);
        let mut comps = Vec::with_capacity(n);
        for _ in 0..n {
            let u: f64 = rng.random();
            let mut acc = 0.0;
            let mut c = self.components() - 1;
            for (i, w) in self.weights.iter().enumerate() {
                acc += w;
                if u < acc {
                    c = i;
                    break;
                }
            }
            for j in 0..d {
                let z: f64 = rng.sample(StandardNormal);
                xs.push((self.means[c][j] + self.stds[c] * z) as f32);
            }
            comps.push(c);
        }
        Ok((Tensor::from_vec(xs, (n, d), device)?, comps))
    }

    /// Log-density of the mixture noised to level abar: component i becomes
    /// N(sqrt(abar) mu_i, v_i I) with v_i = abar s_i^2 + 1 - abar. Per-component log terms
    /// log w_i + log N(x; ...), which callers turn into responsibilities.
    fn component_log_terms(&self, x: &[f64], abar: f64) -> Vec<f64> {
        let d = x.len() as f64;
        let sa = abar.sqrt();
        (0..self.components())
            .map(|i| {
                let v = abar * self.stds[i].powi(2) + 1.0 - abar;
                let sq: f64 = x
                    .iter()
                    .zip(&self.means[i])
                    .map(|(xj, mj)| (xj - sa * mj).powi(2))
                    .sum();
                self.weights[i].ln()
                    - 0.5 * sq / v
                    - 0.5 * d * (2.0 * std::f64::consts::PI * v).ln()
            })
            .collect()
    }

    /// log p_n(x) of the noised mixture at level abar.
    pub fn log_density_noised(&self, x: &[f64], abar: f64) -> f64 {
        logsumexp(&self.component_log_terms(x, abar))
    }

    /// Posterior responsibilities P(component i | x_n = x) at level abar.
    pub fn responsibilities(&self, x: &[f64], abar: f64) -> Vec<f64> {
        let t = self.component_log_terms(x, abar);
        let z = logsumexp(&t);
        t.iter().map(|v| (v - z).exp()).collect()
    }

    /// Exact eps = -sqrt(1 - abar) grad log p_n(x): score of the noised mixture,
    /// grad log p_n = sum_i r_i (sqrt(abar) mu_i - x) / v_i.
    pub fn eps_exact(&self, x: &[f64], abar: f64) -> Vec<f64> {
        let r = self.responsibilities(x, abar);
        let sa = abar.sqrt();
        let mut score = vec![0.0; x.len()];
        for (i, ri) in r.iter().enumerate() {
            let v = abar * self.stds[i].powi(2) + 1.0 - abar;
            for j in 0..x.len() {
                score[j] += ri * (sa * self.means[i][j] - x[j]) / v;
            }
        }
        score.iter().map(|s| -(1.0 - abar).sqrt() * s).collect()
    }

    /// The tilted mixture p(x) exp(lambda a.x) / Z, closed form: component i moves to
    /// mu_i + lambda s_i^2 a, its weight to w_i exp(lambda a.mu_i + lambda^2 s_i^2 |a|^2 / 2) (normalised).
    pub fn tilted_linear(&self, lambda: f64, a: &[f64]) -> Result<GaussianMixture> {
        if a.len() != self.dim() {
            return Err(KernelError::param(
                "reward.a",
                format!("{a:?}"),
                format!("needs {} entries", self.dim()),
            ));
        }
        let a2: f64 = a.iter().map(|v| v * v).sum();
        let logw: Vec<f64> = (0..self.components())
            .map(|i| {
                let am: f64 = a.iter().zip(&self.means[i]).map(|(x, y)| x * y).sum();
                self.weights[i].ln()
                    + lambda * am
                    + 0.5 * lambda * lambda * self.stds[i].powi(2) * a2
            })
            .collect();
        let z = logsumexp(&logw);
        let means = (0..self.components())
            .map(|i| {
                self.means[i]
                    .iter()
                    .zip(a)
                    .map(|(m, aj)| m + lambda * self.stds[i].powi(2) * aj)
                    .collect()
            })
            .collect();
        GaussianMixture::new(
            logw.iter().map(|l| (l - z).exp()).collect(),
            means,
            self.stds.clone(),
        )
    }

    /// The mean of the linear reward a.x + b under this mixture: sum_i w_i a.mu_i + b.
    pub fn linear_reward_mean(&self, a: &[f64], b: f64) -> f64 {
        (0..self.components())
            .map(|i| {
                self.weights[i]
                    * self.means[i]
                        .iter()
                        .zip(a)
                        .map(|(m, aj)| m * aj)
                        .sum::<f64>()
            })
            .sum::<f64>()
            + b
    }

    /// Exact V(x, abar) = log E[exp(lambda a.x_0) | x_n = x] for the linear reward a.x. The
    /// posterior of x_0 is a mixture with responsibilities r_i(x), means
    /// m_i = mu_i + (sqrt(abar) s_i^2 / v_i)(x - sqrt(abar) mu_i) and variances p_i = s_i^2 (1 - abar) / v_i,
    /// so V = logsumexp_i(log r_i + lambda a.m_i + lambda^2 p_i |a|^2 / 2).
    pub fn exact_value_linear(&self, x: &[f64], abar: f64, lambda: f64, a: &[f64]) -> f64 {
        let t = self.component_log_terms(x, abar);
        let z = logsumexp(&t);
        let sa = abar.sqrt();
        let a2: f64 = a.iter().map(|v| v * v).sum();
        let terms: Vec<f64> = (0..self.components())
            .map(|i| {
                let s2 = self.stds[i].powi(2);
                let v = abar * s2 + 1.0 - abar;
                let am: f64 = (0..x.len())
                    .map(|j| {
                        a[j] * (self.means[i][j] + sa * s2 / v * (x[j] - sa * self.means[i][j]))
                    })
                    .sum();
                let p = s2 * (1.0 - abar) / v;
                (t[i] - z) + lambda * am + 0.5 * lambda * lambda * p * a2
            })
            .collect();
        logsumexp(&terms)
    }

    /// The component each data point most likely came from (responsibilities at abar = 1).
    pub fn assign(&self, x: &[f64]) -> usize {
        let t = self.component_log_terms(x, 1.0);
        t.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
            .unwrap_or(0)
    }

    /// Share of samples assigned to each component; `weights` (self-normalised) may be given.
    pub fn mode_weights(&self, samples: &Tensor, weights: Option<&[f64]>) -> Result<Vec<f64>> {
        let rows = samples.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        let mut out = vec![0.0; self.components()];
        for (i, r) in rows.iter().enumerate() {
            out[self.assign(r)] += weights.map_or(1.0, |w| w[i]);
        }
        let z: f64 = out.iter().sum();
        Ok(out.iter().map(|v| v / z.max(f64::MIN_POSITIVE)).collect())
    }

    /// The three-component 2-D mixture of the quickstart (DESIGN.md: weights .5/.3/.2).
    pub fn quickstart() -> Self {
        Self::new(
            vec![0.5, 0.3, 0.2],
            vec![vec![-2.0, 0.0], vec![0.5, 1.5], vec![2.0, -1.0]],
            vec![0.5, 0.5, 0.5],
        )
        .expect("constant mixture is valid")
    }
}

/// The exact eps of a noised mixture as a `Denoiser` (the analytic reference model).
pub struct AnalyticDenoiser {
    pub mixture: GaussianMixture,
    pub schedule: VpSchedule,
}

impl Denoiser for AnalyticDenoiser {
    fn eps(&self, x: &Tensor, n: &Tensor, _cond: Option<&Tensor>) -> Result<Tensor> {
        let d = self.mixture.dim();
        if x.rank() != 2 || x.dim(1)? != d {
            return Err(KernelError::shape(
                "AnalyticDenoiser::eps",
                format!("x {:?}, expected [batch, {d}]", x.shape().dims()),
            ));
        }
        let rows = x.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        let ns = n.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        if ns.len() != rows.len() {
            return Err(KernelError::shape(
                "AnalyticDenoiser::eps",
                format!("{} rows, {} timesteps", rows.len(), ns.len()),
            ));
        }
        let mut out = Vec::with_capacity(rows.len() * d);
        for (r, &ni) in rows.iter().zip(&ns) {
            let idx = (ni.round().max(0.0) as usize).min(self.schedule.train_steps());
            out.extend(
                self.mixture
                    .eps_exact(r, self.schedule.abar[idx])
                    .into_iter()
                    .map(|v| v as f32),
            );
        }
        Ok(Tensor::from_vec(out, (rows.len(), d), x.device())?)
    }
}

/// The exact value V(x, n) = log E[exp(lambda a.x_0) | x_n = x] of a mixture under a linear reward
/// a.x + b, as a `ValueCritic` (the oracle the learned critic is compared against).
pub struct ExactValue {
    pub mixture: GaussianMixture,
    pub schedule: VpSchedule,
    pub a: Vec<f64>,
    pub b: f64,
}

impl crate::critic::ValueCritic for ExactValue {
    fn value(&self, x: &Tensor, n: &Tensor, _cond: Option<&Tensor>, lambda: f64) -> Result<Tensor> {
        let rows = x.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        let ns = n.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        if ns.len() != rows.len() || rows.first().is_some_and(|r| r.len() != self.a.len()) {
            return Err(KernelError::shape(
                "ExactValue",
                format!("x {:?}, {} timesteps", x.shape().dims(), ns.len()),
            ));
        }
        let v: Vec<f32> = rows
            .iter()
            .zip(&ns)
            .map(|(r, &ni)| {
                let idx = (ni.round().max(0.0) as usize).min(self.schedule.train_steps());
                (self
                    .mixture
                    .exact_value_linear(r, self.schedule.abar[idx], lambda, &self.a)
                    + lambda * self.b) as f32
            })
            .collect();
        Ok(Tensor::from_vec(v, rows.len(), x.device())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logprob::sample_chain;
    use crate::rng::{randn, rng_for};
    use crate::schedule::SamplingGrid;
    use crate::tilt::tilted_target;

    #[test]
    fn eps_matches_finite_difference_score() {
        // eps = -sqrt(1 - abar) d/dx log p_n(x); central differences with h = 1e-5 (error O(h^2)).
        let m = GaussianMixture::quickstart();
        let s = VpSchedule::ddpm_default();
        for &n in &[1usize, 100, 400, 900] {
            let ab = s.abar[n];
            for x in [[0.1, -0.3], [-2.2, 0.4], [1.9, -1.1], [3.0, 3.0]] {
                let e = m.eps_exact(&x, ab);
                for j in 0..2 {
                    let h = 1e-5;
                    let (mut xp, mut xm) = (x, x);
                    xp[j] += h;
                    xm[j] -= h;
                    let g =
                        (m.log_density_noised(&xp, ab) - m.log_density_noised(&xm, ab)) / (2.0 * h);
                    let want = -(1.0 - ab).sqrt() * g;
                    assert!(
                        (e[j] - want).abs() < 1e-5 * (1.0 + want.abs()),
                        "n={n} x={x:?}: {} vs {want}",
                        e[j]
                    );
                }
            }
        }
    }

    #[test]
    fn reference_chain_reproduces_mode_weights() {
        // 20k samples from the analytic chain (K = 100, eta = 1): mode weights within 0.02 of
        // (.5, .3, .2). The binomial standard error is <= sqrt(.25/20000) = 0.0035; the remaining
        // slack covers the discretisation of the chain and the overlap of the modes in `assign`.
        let m = GaussianMixture::quickstart();
        let s = VpSchedule::ddpm_default();
        let g = SamplingGrid::new(&s, 100, 1.0).unwrap();
        let model = AnalyticDenoiser {
            mixture: m.clone(),
            schedule: s,
        };
        let d = Device::Cpu;
        let x = randn(&mut rng_for(11, 0, 0), (20_000, 2), &d).unwrap();
        let x0 = sample_chain(&model, &g, &x, 100, 0, None, &mut rng_for(11, 0, 1)).unwrap();
        let mw = m.mode_weights(&x0, None).unwrap();
        for (got, want) in mw.iter().zip(&m.weights) {
            assert!((got - want).abs() < 0.02, "{mw:?}");
        }
    }

    #[test]
    fn closed_form_tilt_agrees_with_importance_weights() {
        // 200k exact data samples weighted by exp(lambda a.x): the self-normalised mode weights and
        // mean of a.x match the closed-form tilted mixture within 0.01 (ESS here is ~1e5).
        let m = GaussianMixture::quickstart();
        let a = [1.0, 0.0];
        let lambda = 1.0;
        let t = m.tilted_linear(lambda, &a).unwrap();
        let (x, _) = m
            .sample(200_000, &mut rng_for(5, 0, 0), &Device::Cpu)
            .unwrap();
        let rows = x.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap();
        let r: Vec<f64> = rows.iter().map(|v| v[0]).collect();
        let est = tilted_target(&r, lambda);
        let mw = m.mode_weights(&x, Some(&est.weights)).unwrap();
        // Closed-form mean of x[0] under the tilt: sum_i w'_i (mu_i[0] + lambda s_i^2).
        let mean: f64 = (0..3).map(|i| t.weights[i] * t.means[i][0]).sum();
        assert!(
            (est.mean_reward - mean).abs() < 0.01,
            "{} vs {mean}",
            est.mean_reward
        );
        // Mode weights: `assign` uses the untilted components, so compare against the tilted
        // mixture's samples assigned the same way (closed-form weights are shifted by overlap only).
        let (xt, _) = t
            .sample(200_000, &mut rng_for(5, 0, 1), &Device::Cpu)
            .unwrap();
        let mw_t = m.mode_weights(&xt, None).unwrap();
        for (a, b) in mw.iter().zip(&mw_t) {
            assert!((a - b).abs() < 0.01, "{mw:?} vs {mw_t:?}");
        }
        // And the closed-form component weights themselves, hand-computed:
        // w_i exp(mu_i[0] + 0.125) normalised: .5 e^-2, .3 e^.5, .2 e^2 -> (.0399, .2917, .6684).
        let raw = [0.5 * (-2f64).exp(), 0.3 * 0.5f64.exp(), 0.2 * 2f64.exp()];
        let z: f64 = raw.iter().sum();
        for (w, r) in t.weights.iter().zip(raw) {
            assert!((w - r / z).abs() < 1e-12);
        }
    }

    #[test]
    fn exact_value_limits_and_tower_property() {
        let m = GaussianMixture::quickstart();
        let s = VpSchedule::ddpm_default();
        let a = [1.0, 0.0];
        let lambda = 1.0;
        // At the data end the posterior is a point: V(x, abar = 1) = lambda a.x.
        for x in [[0.3, 0.2], [-1.0, 2.0]] {
            assert!((m.exact_value_linear(&x, 1.0, lambda, &a) - x[0]).abs() < 1e-12);
        }
        // At abar -> 0 it is the prior log E[exp(lambda a.x0)] = log sum_i w_i exp(lambda a.mu_i + lambda^2 s_i^2 |a|^2/2).
        let prior = (0..3)
            .map(|i| m.weights[i] * (lambda * m.means[i][0] + 0.5 * lambda * lambda * 0.25).exp())
            .sum::<f64>()
            .ln();
        assert!((m.exact_value_linear(&[0.0, 0.0], 1e-12, lambda, &a) - prior).abs() < 1e-6);
        // Tower property at an intermediate level: E_{x_n}[exp V(x_n)] = E[exp(lambda a.x0)] = exp(prior).
        // Monte Carlo with 100k joint samples; relative tolerance 2% (the estimator's std is < 0.5%).
        let ab = s.abar[300];
        let (x0, _) = m
            .sample(100_000, &mut rng_for(9, 0, 0), &Device::Cpu)
            .unwrap();
        let eps = randn(&mut rng_for(9, 0, 1), (100_000, 2), &Device::Cpu).unwrap();
        let xn = s.q_sample(&x0, &vec![300; 100_000], &eps).unwrap();
        let rows = xn.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap();
        let mc = rows
            .iter()
            .map(|r| m.exact_value_linear(r, ab, lambda, &a).exp())
            .sum::<f64>()
            / rows.len() as f64;
        assert!(
            (mc / prior.exp() - 1.0).abs() < 0.02,
            "{mc} vs {}",
            prior.exp()
        );
    }

    #[test]
    fn linear_reward_mean_hand_value() {
        // weights .5/.5, means (1, 2) and (-3, 0): a = (2, 1), b = 0.5
        // -> .5 (2 + 2) + .5 (-6 + 0) + .5 = 2 - 3 + .5 = -0.5
        let m = GaussianMixture::new(
            vec![0.5, 0.5],
            vec![vec![1.0, 2.0], vec![-3.0, 0.0]],
            vec![1.0, 1.0],
        )
        .unwrap();
        assert!((m.linear_reward_mean(&[2.0, 1.0], 0.5) + 0.5).abs() < 1e-12);
    }
}
