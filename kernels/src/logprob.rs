//! Transition log-probabilities of the sampling chain: the Gaussian log-density summed over all
//! dimensions, rollouts of L-step segments with their path log-probabilities, the path log-ratio of
//! a residual policy against its reference (computed from the step noises, DESIGN.md), and the
//! one-step Gaussian approximation of a segment endpoint (VRPO paper, Lemma 2).

use candle_core::{DType, Tensor};
use rand::rngs::StdRng;

use crate::denoiser::{timesteps, Denoiser};
use crate::rng::randn;
use crate::schedule::{SamplingGrid, StepCoef};
use crate::{KernelError, Result};

const LN_2PI: f64 = 1.837_877_066_409_345_3;

/// log N(x; mu, sigma^2 I) summed over every non-batch dimension: [batch, ...] -> [batch].
/// = -|x - mu|^2 / (2 sigma^2) - D/2 ln(2 pi sigma^2), accumulated in f64.
pub fn gaussian_log_density(x: &Tensor, mu: &Tensor, sigma: f64) -> Result<Tensor> {
    if x.shape() != mu.shape() {
        return Err(KernelError::shape(
            "gaussian_log_density",
            format!("x {:?} vs mu {:?}", x.shape().dims(), mu.shape().dims()),
        ));
    }
    if sigma <= 0.0 {
        return Err(KernelError::param("sigma", sigma, "must be positive"));
    }
    let d = x.elem_count() / x.dim(0)?;
    let sq = (x - mu)?
        .to_dtype(DType::F64)?
        .sqr()?
        .flatten_from(1)?
        .sum(1)?;
    let c = -0.5 * d as f64 * (LN_2PI + 2.0 * sigma.ln());
    Ok(sq.affine(-0.5 / (sigma * sigma), c)?.to_dtype(DType::F32)?)
}

/// An L-step piece of a sampling chain from x_k down to x_{k-L}, for a batch of starts.
#[derive(Debug, Clone)]
pub struct Segment {
    /// The index k of the first state.
    pub k_start: usize,
    /// L + 1 states x_k, x_{k-1}, ..., x_{k-L}, each [batch, ...].
    pub states: Vec<Tensor>,
    /// L standard-normal noises, `noises[j]` drove the step from `states[j]` to `states[j + 1]`.
    pub noises: Vec<Tensor>,
    /// [batch] path log-probability under the model that generated it.
    pub log_prob: Tensor,
}

impl Segment {
    /// L, the number of steps.
    pub fn len(&self) -> usize {
        self.noises.len()
    }
    /// True for a segment of zero steps.
    pub fn is_empty(&self) -> bool {
        self.noises.is_empty()
    }
    /// The last state x_{k-L}.
    pub fn endpoint(&self) -> &Tensor {
        self.states
            .last()
            .expect("a segment holds at least its start state")
    }
}

/// log-probability of one standard step given its noise: -|z|^2/2 - D/2 ln(2 pi sigma^2), [batch].
fn step_log_prob_from_noise(z: &Tensor, sigma: f64) -> Result<Tensor> {
    let d = z.elem_count() / z.dim(0)?;
    let sq = z.to_dtype(DType::F64)?.sqr()?.flatten_from(1)?.sum(1)?;
    Ok(sq
        .affine(-0.5, -0.5 * d as f64 * (LN_2PI + 2.0 * sigma.ln()))?
        .to_dtype(DType::F32)?)
}

/// Roll `len` steps of the chain from `x` at index `k_start` with `model`, recording states, noises
/// and the path log-probability. `x`: [batch, ...].
pub fn rollout_segment(
    model: &dyn Denoiser,
    grid: &SamplingGrid,
    x: &Tensor,
    k_start: usize,
    len: usize,
    cond: Option<&Tensor>,
    rng: &mut StdRng,
) -> Result<Segment> {
    if len == 0 || len > k_start || k_start > grid.len() {
        return Err(KernelError::param(
            "segment_len",
            len,
            format!("need 1 <= L <= k_start = {k_start} <= K = {}", grid.len()),
        ));
    }
    let b = x.dim(0)?;
    let mut states = vec![x.clone()];
    let mut noises = Vec::with_capacity(len);
    let mut log_prob = Tensor::zeros(b, DType::F32, x.device())?;
    for k in (k_start - len + 1..=k_start).rev() {
        let st = grid.step(k)?;
        let cur = states.last().expect("non-empty");
        let eps = model
            .eps(cur, &timesteps(st.n_from, b, x.device())?, cond)?
            .detach();
        let z = randn(rng, cur.shape(), cur.device())?;
        let next = st.sample(cur, &eps, &z)?;
        log_prob = (log_prob + step_log_prob_from_noise(&z, st.sigma)?)?;
        noises.push(z);
        states.push(next);
    }
    Ok(Segment {
        k_start,
        states,
        noises,
        log_prob,
    })
}

/// Run the chain from `x` at `k_from` down to `k_to` (>= 0) and return the final state.
pub fn sample_chain(
    model: &dyn Denoiser,
    grid: &SamplingGrid,
    x: &Tensor,
    k_from: usize,
    k_to: usize,
    cond: Option<&Tensor>,
    rng: &mut StdRng,
) -> Result<Tensor> {
    if k_to > k_from || k_from > grid.len() {
        return Err(KernelError::param(
            "k",
            format!("{k_from}->{k_to}"),
            "need k_to <= k_from <= K",
        ));
    }
    let b = x.dim(0)?;
    let mut cur = x.clone();
    for k in (k_to + 1..=k_from).rev() {
        let st = grid.step(k)?;
        let eps = model
            .eps(&cur, &timesteps(st.n_from, b, x.device())?, cond)?
            .detach();
        let z = randn(rng, cur.shape(), cur.device())?;
        cur = st.sample(&cur, &eps, &z)?;
    }
    Ok(cur)
}

/// `sample_chain` with the predicted x_0 clipped to [lo, hi] at every step (DDPM's `clip_denoised`):
/// eps is replaced by the one consistent with the clipped x_0, which keeps samples of data known to
/// live in a box from diverging when the denoiser is weak. For generation only: the transitions are
/// then no longer those `path_log_prob` scores.
#[allow(clippy::too_many_arguments)]
pub fn sample_chain_clipped(
    model: &dyn Denoiser,
    schedule: &crate::schedule::VpSchedule,
    grid: &SamplingGrid,
    x: &Tensor,
    cond: Option<&Tensor>,
    lo: f32,
    hi: f32,
    rng: &mut StdRng,
) -> Result<Tensor> {
    let b = x.dim(0)?;
    let mut cur = x.clone();
    for k in (1..=grid.len()).rev() {
        let st = grid.step(k)?;
        let ab = schedule.abar[st.n_from];
        let eps = model
            .eps(&cur, &timesteps(st.n_from, b, x.device())?, cond)?
            .detach();
        let x0 = ((&cur - (&eps * (1.0 - ab).sqrt())?)? / ab.sqrt())?.clamp(lo, hi)?;
        let eps_c = ((&cur - (x0 * ab.sqrt())?)? / (1.0 - ab).sqrt().max(1e-12))?;
        let z = randn(rng, cur.shape(), cur.device())?;
        cur = st.sample(&cur, &eps_c, &z)?;
    }
    Ok(cur)
}

/// Path log-probability of recorded `states` (x_k .. x_{k-L}) under `model`, recomputed from the
/// states: sum_j log N(x_{j-1}; mu_model(x_j), sigma_j^2). [batch]. Differentiable in the model.
pub fn path_log_prob(
    model: &dyn Denoiser,
    grid: &SamplingGrid,
    states: &[Tensor],
    k_start: usize,
    cond: Option<&Tensor>,
) -> Result<Tensor> {
    let (stacked, ns, coefs, b) = stack_steps(grid, states, k_start)?;
    let cond_rep = repeat_cond(cond, coefs.len())?;
    let eps = model.eps(&stacked, &ns, cond_rep.as_ref())?;
    let mut total: Option<Tensor> = None;
    for (j, st) in coefs.iter().enumerate() {
        let x = stacked.narrow(0, j * b, b)?;
        let e = eps.narrow(0, j * b, b)?;
        let lp = gaussian_log_density(&states[j + 1], &st.mean(&x, &e)?, st.sigma)?;
        total = Some(match total {
            None => lp,
            Some(t) => (t + lp)?,
        });
    }
    total.ok_or_else(|| KernelError::param("segment_len", 0, "segment has no steps"))
}

/// log p_theta(path) - log p_ref(path) for policy = reference + residual, for a path generated by
/// the reference with step noises z_j (x_{j-1} = mu_ref(x_j) + sigma_j z_j). With
/// dmu_j = mu_theta - mu_ref = c_eps_j * residual(x_j), each step contributes
/// z_j . dmu_j / sigma_j - |dmu_j|^2 / (2 sigma_j^2) (DESIGN.md: no difference of two large
/// log-densities). All L steps go through the residual in one batched call. [batch].
pub fn path_log_ratio_residual(
    residual: &dyn Denoiser,
    grid: &SamplingGrid,
    states: &[Tensor],
    noises: &[Tensor],
    k_start: usize,
    cond: Option<&Tensor>,
) -> Result<Tensor> {
    let b = states.first().map(|s| s.dim(0)).transpose()?.unwrap_or(0);
    path_log_ratio_residual_rows(residual, grid, states, noises, &vec![k_start; b], cond)
}

/// `path_log_ratio_residual` with one segment start per batch row (a learner batch mixes
/// segments that start at different k). `k_starts`: [batch]. Still one residual call.
pub fn path_log_ratio_residual_rows(
    residual: &dyn Denoiser,
    grid: &SamplingGrid,
    states: &[Tensor],
    noises: &[Tensor],
    k_starts: &[usize],
    cond: Option<&Tensor>,
) -> Result<Tensor> {
    if noises.len() + 1 != states.len() || noises.is_empty() {
        return Err(KernelError::shape(
            "path_log_ratio_residual",
            format!("{} states but {} noises", states.len(), noises.len()),
        ));
    }
    let len = noises.len();
    let b = states[0].dim(0)?;
    if k_starts.len() != b {
        return Err(KernelError::shape(
            "path_log_ratio_residual",
            format!("{} segment starts for {b} rows", k_starts.len()),
        ));
    }
    // Row r of step j sits at k_starts[r] - j; its coefficients and training index per row.
    let mut ns = Vec::with_capacity(len * b);
    let mut scale = Vec::with_capacity(len * b);
    for j in 0..len {
        for &k in k_starts {
            if k < len || k > grid.len() {
                return Err(KernelError::param(
                    "k_start",
                    k,
                    format!(
                        "a segment of {len} steps needs {len} <= k_start <= K = {}",
                        grid.len()
                    ),
                ));
            }
            let st = grid.step(k - j)?;
            ns.push(st.n_from as f32);
            scale.push((st.c_eps / st.sigma) as f32);
        }
    }
    let stacked = Tensor::cat(&states[..len], 0)?; // [L*b, ...]
    let dev = stacked.device();
    let ns = Tensor::from_vec(ns, len * b, dev)?;
    let mut bshape = vec![len * b];
    bshape.extend(std::iter::repeat_n(1, stacked.rank() - 1));
    let scale = Tensor::from_vec(scale, bshape, dev)?;
    let cond_rep = repeat_cond(cond, len)?;
    let res = residual.eps(&stacked, &ns, cond_rep.as_ref())?;
    if dev.is_cuda() {
        // tilt's fused kernel (kernels/cuda/log_ratio.cu): the same sum in one pass each way.
        return crate::cuda::segment_log_ratio(&res, &Tensor::cat(noises, 0)?, &scale, len);
    }
    // u = dmu / sigma = (c_eps / sigma) * residual.
    let u = res.broadcast_mul(&scale)?.flatten_from(1)?;
    let z = Tensor::cat(noises, 0)?.flatten_from(1)?;
    let per_row = ((&z * &u)?.sum(1)? - (u.sqr()?.sum(1)? * 0.5)?)?; // [L*b]
    Ok(per_row.reshape((len, b))?.sum(0)?)
}

/// The one-step Gaussian of a segment endpoint (Lemma 2): log N(x_end; mu(x_start), sigma^2) with the
/// coefficients of one DDIM jump from k to k - L. [batch]. Differentiable in the model.
pub fn endpoint_log_prob(
    model: &dyn Denoiser,
    jump: &StepCoef,
    x_start: &Tensor,
    x_end: &Tensor,
    cond: Option<&Tensor>,
) -> Result<Tensor> {
    let b = x_start.dim(0)?;
    let eps = model.eps(x_start, &timesteps(jump.n_from, b, x_start.device())?, cond)?;
    gaussian_log_density(x_end, &jump.mean(x_start, &eps)?, jump.sigma)
}

/// Stack the L "from" states of a segment into one batch [L*b, ...] with their training indices.
fn stack_steps(
    grid: &SamplingGrid,
    states: &[Tensor],
    k_start: usize,
) -> Result<(Tensor, Tensor, Vec<StepCoef>, usize)> {
    let len = states.len().saturating_sub(1);
    if len == 0 || len > k_start {
        return Err(KernelError::param(
            "segment_len",
            len,
            format!("need 1 <= L <= k_start = {k_start}"),
        ));
    }
    let b = states[0].dim(0)?;
    let coefs: Vec<StepCoef> = (0..len)
        .map(|j| grid.step(k_start - j))
        .collect::<Result<_>>()?;
    let stacked = Tensor::cat(&states[..len], 0)?;
    let ns: Vec<f32> = coefs
        .iter()
        .flat_map(|st| std::iter::repeat_n(st.n_from as f32, b))
        .collect();
    let ns = Tensor::from_vec(ns, len * b, stacked.device())?;
    Ok((stacked, ns, coefs, b))
}

fn repeat_cond(cond: Option<&Tensor>, times: usize) -> Result<Option<Tensor>> {
    Ok(match cond {
        None => None,
        Some(c) => Some(Tensor::cat(&vec![c.clone(); times], 0)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::denoiser::ResidualPolicy;
    use crate::models::{MlpConfig, MlpDenoiser};
    use crate::rng::rng_for;
    use crate::schedule::VpSchedule;
    use candle_core::Device;
    use candle_nn::VarMap;
    use std::sync::Arc;

    #[test]
    fn gaussian_log_density_closed_form() {
        // x = (1, 2), mu = (0, 0), sigma = 0.5: -(1 + 4)/(2 * 0.25) - (2/2) ln(2 pi 0.25)
        // = -10 - ln(pi/2) = -10.451582705289455.
        let d = Device::Cpu;
        let x = Tensor::new(&[[1f32, 2.0]], &d).unwrap();
        let mu = Tensor::zeros((1, 2), DType::F32, &d).unwrap();
        let lp = gaussian_log_density(&x, &mu, 0.5)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(
            (lp[0] as f64 + 10.451_582_705_289_455).abs() < 1e-5,
            "{}",
            lp[0]
        );
    }

    fn mlp(zero: bool, seed_shift: f64) -> (VarMap, MlpDenoiser) {
        let vm = VarMap::new();
        let m = MlpDenoiser::new(
            MlpConfig {
                dim: 2,
                hidden: 16,
                depth: 1,
                time_dim: 8,
                classes: 0,
                zero_init_output: zero,
            },
            crate::testutil::vb(&vm, 1, &Device::Cpu),
        )
        .unwrap();
        // Make the net differ from the default random init deterministically when asked.
        if seed_shift != 0.0 {
            for v in vm.all_vars() {
                let w = (v.as_tensor() + seed_shift).unwrap();
                v.set(&w).unwrap();
            }
        }
        (vm, m)
    }

    #[test]
    fn path_log_prob_is_the_sum_of_steps_and_matches_the_rollout() {
        let s = VpSchedule::ddpm_default();
        let g = SamplingGrid::new(&s, 20, 1.0).unwrap();
        let (_vm, m) = mlp(false, 0.0);
        let x = randn(&mut rng_for(1, 0, 0), (5, 2), &Device::Cpu).unwrap();
        let seg = rollout_segment(&m, &g, &x, 12, 4, None, &mut rng_for(1, 0, 1)).unwrap();
        // Recomputed from states (sum over steps of gaussian_log_density) == the rollout's record.
        let lp = path_log_prob(&m, &g, &seg.states, 12, None)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let rec = seg.log_prob.to_vec1::<f32>().unwrap();
        let mut by_hand = [0f64; 5];
        for j in 0..4 {
            let st = g.step(12 - j).unwrap();
            let eps = m
                .eps(
                    &seg.states[j],
                    &timesteps(st.n_from, 5, &Device::Cpu).unwrap(),
                    None,
                )
                .unwrap();
            let one = gaussian_log_density(
                &seg.states[j + 1],
                &st.mean(&seg.states[j], &eps).unwrap(),
                st.sigma,
            )
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
            for i in 0..5 {
                by_hand[i] += one[i] as f64;
            }
        }
        for i in 0..5 {
            assert!((lp[i] as f64 - by_hand[i]).abs() < 1e-3 * by_hand[i].abs().max(1.0));
            assert!(
                (lp[i] - rec[i]).abs() < 1e-3 * rec[i].abs().max(1.0),
                "{} vs {}",
                lp[i],
                rec[i]
            );
        }
    }

    #[test]
    fn residual_log_ratio_equals_difference_of_log_densities_and_is_zero_at_init() {
        let s = VpSchedule::ddpm_default();
        let g = SamplingGrid::new(&s, 20, 1.0).unwrap();
        let (_v1, reference) = mlp(false, 0.0);
        let reference: Arc<dyn Denoiser> = Arc::new(reference);
        let x = randn(&mut rng_for(2, 0, 0), (6, 2), &Device::Cpu).unwrap();
        let seg = rollout_segment(
            reference.as_ref(),
            &g,
            &x,
            10,
            3,
            None,
            &mut rng_for(2, 0, 1),
        )
        .unwrap();
        // Zero-initialised residual: the ratio is exactly 0 (0 * anything summed).
        let (_v0, zero) = mlp(true, 0.0);
        let r0 = path_log_ratio_residual(&zero, &g, &seg.states, &seg.noises, 10, None).unwrap();
        assert!(r0.to_vec1::<f32>().unwrap().iter().all(|&v| v == 0.0));
        // A non-zero residual: the noise form equals log p_theta - log p_ref from the densities.
        let (_v2, res) = mlp(false, 0.01);
        let res: Arc<dyn Denoiser> = Arc::new(res);
        let policy = ResidualPolicy {
            reference: reference.clone(),
            residual: res.clone(),
        };
        let ratio = path_log_ratio_residual(res.as_ref(), &g, &seg.states, &seg.noises, 10, None)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let lp_t = path_log_prob(&policy, &g, &seg.states, 10, None)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let lp_r = path_log_prob(reference.as_ref(), &g, &seg.states, 10, None)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for i in 0..6 {
            let diff = lp_t[i] as f64 - lp_r[i] as f64;
            assert!(
                (ratio[i] as f64 - diff).abs() < 2e-2 + 1e-3 * diff.abs(),
                "{} vs {diff}",
                ratio[i]
            );
            assert!(
                diff.abs() > 1e-3,
                "the test residual must move the log-probs"
            );
        }
    }

    #[test]
    fn per_row_starts_equal_separate_calls() {
        // Two batches starting at k = 12 and k = 7, stacked with per-row starts, give the same
        // ratios as two separate calls.
        let s = VpSchedule::ddpm_default();
        let g = SamplingGrid::new(&s, 20, 1.0).unwrap();
        let (_v1, reference) = mlp(false, 0.0);
        let (_v2, res) = mlp(false, 0.02);
        let d = Device::Cpu;
        let x = randn(&mut rng_for(4, 0, 0), (3, 2), &d).unwrap();
        let s1 = rollout_segment(&reference, &g, &x, 12, 3, None, &mut rng_for(4, 0, 1)).unwrap();
        let s2 = rollout_segment(&reference, &g, &x, 7, 3, None, &mut rng_for(4, 0, 2)).unwrap();
        let r1 = path_log_ratio_residual(&res, &g, &s1.states, &s1.noises, 12, None).unwrap();
        let r2 = path_log_ratio_residual(&res, &g, &s2.states, &s2.noises, 7, None).unwrap();
        let cat = |a: &[Tensor], b: &[Tensor]| -> Vec<Tensor> {
            a.iter()
                .zip(b)
                .map(|(x, y)| Tensor::cat(&[x, y], 0).unwrap())
                .collect()
        };
        let both = path_log_ratio_residual_rows(
            &res,
            &g,
            &cat(&s1.states, &s2.states),
            &cat(&s1.noises, &s2.noises),
            &[12, 12, 12, 7, 7, 7],
            None,
        )
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
        let want: Vec<f32> = [r1.to_vec1::<f32>().unwrap(), r2.to_vec1::<f32>().unwrap()].concat();
        for (a, b) in both.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }

    #[test]
    fn one_step_endpoint_matches_the_single_step_for_l_equal_1() {
        // With L = 1 the Lemma-2 jump is the step itself.
        let s = VpSchedule::ddpm_default();
        let g = SamplingGrid::new(&s, 20, 0.7).unwrap();
        assert_eq!(g.jump(&s, 9, 1).unwrap(), g.step(9).unwrap());
        let (_vm, m) = mlp(false, 0.0);
        let x = randn(&mut rng_for(3, 0, 0), (4, 2), &Device::Cpu).unwrap();
        let seg = rollout_segment(&m, &g, &x, 9, 1, None, &mut rng_for(3, 0, 1)).unwrap();
        let e = endpoint_log_prob(&m, &g.jump(&s, 9, 1).unwrap(), &x, seg.endpoint(), None)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let rec = seg.log_prob.to_vec1::<f32>().unwrap();
        for i in 0..4 {
            assert!((e[i] - rec[i]).abs() < 1e-3, "{} vs {}", e[i], rec[i]);
        }
    }

    #[test]
    fn clipped_sampling_equals_plain_sampling_when_nothing_is_clipped() {
        // With a box far wider than any predicted x_0 the clipped eps is the model's eps (up to
        // rounding), so both samplers give the same chain from the same noise.
        let s = VpSchedule::ddpm_default();
        let g = SamplingGrid::new(&s, 10, 1.0).unwrap();
        let (_vm, m) = mlp(false, 0.0);
        let x = randn(&mut rng_for(8, 0, 0), (16, 2), &Device::Cpu).unwrap();
        let a = sample_chain(&m, &g, &x, 10, 0, None, &mut rng_for(8, 0, 1))
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let b = sample_chain_clipped(&m, &s, &g, &x, None, -1e6, 1e6, &mut rng_for(8, 0, 1))
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (ra, rb) in a.iter().zip(&b) {
            for (u, v) in ra.iter().zip(rb) {
                assert!((u - v).abs() < 1e-3 * (1.0 + u.abs()), "{u} vs {v}");
            }
        }
        // With a tight box every x_0 prediction lies in it, so the final state (x_0 at n = 0 up to
        // the last step's 1e-2 noise) stays near [-1, 1].
        let c =
            sample_chain_clipped(&m, &s, &g, &x, None, -1.0, 1.0, &mut rng_for(8, 0, 1)).unwrap();
        let mx = c
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(mx < 1.1, "{mx}");
    }

    #[test]
    fn bad_segment_lengths_are_errors() {
        let s = VpSchedule::ddpm_default();
        let g = SamplingGrid::new(&s, 20, 1.0).unwrap();
        let (_vm, m) = mlp(false, 0.0);
        let x = Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(rollout_segment(&m, &g, &x, 3, 4, None, &mut rng_for(0, 0, 0)).is_err());
        assert!(rollout_segment(&m, &g, &x, 21, 1, None, &mut rng_for(0, 0, 0)).is_err());
    }
}
