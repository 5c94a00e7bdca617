//! VRPO stage 2 in one place: how the rollout role cuts reference chains into pairs of L-step
//! segments from a shared start, and how a learner turns a batch of scored pairs into the VRPO loss
//! and its gradients (policy = reference + residual; path log-ratios from the stored step noises).

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::Rng;

use crate::critic::ValueCritic;
use crate::denoiser::{timesteps, Denoiser};
use crate::logprob::{path_log_ratio_residual_rows, rollout_segment, Segment};
use crate::losses::{pair_accuracy, vrpo_loss, VrpoLabels};
use crate::optim::grads_in_order;
use crate::rng::randn;
use crate::schedule::SamplingGrid;
use crate::{KernelError, Result};

/// Two L-step continuations a, b of the reference chain from the same start x_k, for a batch of starts.
#[derive(Debug, Clone)]
pub struct SegmentPair {
    pub k_start: usize,
    pub a: Segment,
    pub b: Segment,
    /// [batch] u32 class of each chain (the "prompt"), shared by a and b; None when unconditional.
    pub cond: Option<Tensor>,
}

/// Segment starts for a grid of K steps and segments of L steps: K, K - L, ..., down to >= L.
pub fn segment_starts(k: usize, len: usize) -> Vec<usize> {
    if len == 0 {
        return vec![];
    }
    (0..)
        .map(|i| k.saturating_sub(i * len))
        .take_while(|&s| s >= len)
        .collect()
}

/// Roll `batch` reference chains from x_K ~ N(0, I) (shape [batch, sample_shape...]); at every
/// segment start k branch two continuations a and b of L steps, and carry on from a's endpoint (a
/// is an exact reference continuation, so the next start is still distributed as p_ref(x_{k-L})).
/// Costs 2K model evaluations per chain and yields K/L pairs per chain. `cond`: [batch] u32
/// class of each chain for a class-conditional reference (see [`draw_classes`]).
#[allow(clippy::too_many_arguments)]
pub fn make_segment_pairs(
    reference: &dyn Denoiser,
    grid: &SamplingGrid,
    sample_shape: &[usize],
    batch: usize,
    len: usize,
    cond: Option<&Tensor>,
    rng: &mut StdRng,
    device: &Device,
) -> Result<Vec<SegmentPair>> {
    let starts = segment_starts(grid.len(), len);
    if starts.is_empty() {
        return Err(KernelError::param(
            "vrpo.segment_len",
            len,
            format!("must be in 1..={}", grid.len()),
        ));
    }
    let mut shape = vec![batch];
    shape.extend_from_slice(sample_shape);
    let mut x = randn(rng, shape, device)?;
    // Advance from K to the first start if K is not a multiple of L (starts[0] == K always).
    let mut out = Vec::with_capacity(starts.len());
    for &k in &starts {
        let a = rollout_segment(reference, grid, &x, k, len, cond, rng)?;
        let b = rollout_segment(reference, grid, &x, k, len, cond, rng)?;
        x = a.endpoint().clone();
        out.push(SegmentPair {
            k_start: k,
            a,
            b,
            cond: cond.cloned(),
        });
    }
    Ok(out)
}

/// One class per chain, uniform on 0..classes, as a [batch] u32 tensor; None when `classes` is 0
/// (an unconditional model).
pub fn draw_classes(
    classes: usize,
    batch: usize,
    rng: &mut StdRng,
    device: &Device,
) -> Result<Option<Tensor>> {
    if classes == 0 {
        return Ok(None);
    }
    let c: Vec<u32> = (0..batch)
        .map(|_| rng.random_range(0..classes as u32))
        .collect();
    Ok(Some(Tensor::from_vec(c, batch, device)?))
}

/// [cond; cond]: the classes of rows [a; b].
fn twice(cond: Option<&Tensor>, device: &Device) -> Result<Option<Tensor>> {
    Ok(match cond {
        None => None,
        Some(c) => {
            let c = c.to_device(device)?;
            Some(Tensor::cat(&[&c, &c], 0)?)
        }
    })
}

/// V of both endpoints of each pair, at the endpoint's training index, for the critic role. The
/// endpoints move to `device` (the critic's) first: rollouts may run elsewhere.
pub fn score_pair(
    critic: &dyn ValueCritic,
    grid: &SamplingGrid,
    pair: &SegmentPair,
    lambda: f64,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let k_end = pair.k_start - pair.a.len();
    let n_end = grid.n_of_k[k_end];
    let b = pair.a.endpoint().dim(0)?;
    let ns = timesteps(n_end, 2 * b, device)?;
    let both = Tensor::cat(&[pair.a.endpoint(), pair.b.endpoint()], 0)?.to_device(device)?;
    let cond = twice(pair.cond.as_ref(), device)?;
    let v = critic.value(&both, &ns, cond.as_ref(), lambda)?;
    Ok((v.narrow(0, 0, b)?, v.narrow(0, b, b)?))
}

/// A learner batch: B pairs, possibly from different segment starts.
#[derive(Debug, Clone)]
pub struct VrpoBatch {
    /// [B] segment start of each pair.
    pub k_starts: Vec<usize>,
    /// L + 1 tensors [B, ...]: the states of path a (state 0 is the shared start).
    pub xa: Vec<Tensor>,
    /// L tensors [B, ...]: the standard noises of path a.
    pub za: Vec<Tensor>,
    pub xb: Vec<Tensor>,
    pub zb: Vec<Tensor>,
    /// [B] values of the endpoints.
    pub v_a: Tensor,
    pub v_b: Tensor,
    /// [B] u32 class of each pair (None when unconditional).
    pub cond: Option<Tensor>,
}

/// What a learner step reports.
#[derive(Debug, Clone, Copy, Default)]
pub struct VrpoStats {
    pub loss: f32,
    /// Share of pairs whose Delta agrees in sign with V(a) - V(b).
    pub accuracy: f32,
    /// Mean of beta * Delta - (V(a) - V(b)): 0 at the soft-label optimum.
    pub margin_gap: f32,
    /// Mean |V(a) - V(b)|: the size of the soft labels' logit, q = sigmoid(V(a) - V(b)). Near 0,
    /// every label is near 1/2 and the batch carries little to learn, whatever the policy does.
    pub label_strength: f32,
}

impl VrpoStats {
    /// The stats of a step from its scalar loss and its [B] Delta, V(a), V(b), in one read-back
    /// (one device sync on a GPU, not one per number); the gap in f64 on the host, as the fused step
    /// computes it.
    pub fn read_back(
        loss: &Tensor,
        delta: &Tensor,
        v_a: &Tensor,
        v_b: &Tensor,
        beta: f64,
    ) -> Result<Self> {
        if delta.rank() != 1 || v_a.dims() != delta.dims() || v_b.dims() != delta.dims() {
            return Err(KernelError::shape(
                "VrpoStats::read_back",
                format!(
                    "Delta {:?}, V(a) {:?}, V(b) {:?}: expected three [B] vectors",
                    delta.dims(),
                    v_a.dims(),
                    v_b.dims()
                ),
            ));
        }
        let b = delta.dim(0)?;
        let f32s = |t: &Tensor| t.to_dtype(DType::F32);
        let all = Tensor::cat(
            &[
                f32s(loss)?.reshape(1)?,
                f32s(delta)?,
                f32s(v_a)?,
                f32s(v_b)?,
            ],
            0,
        )?
        .to_vec1::<f32>()?;
        let (d, rest) = all[1..].split_at(b);
        let (va, vb) = rest.split_at(b);
        Ok(Self::from_host(all[0], d, va, vb, beta))
    }

    /// The stats from host values: accuracy by [`pair_accuracy`], the gap averaged in f64 (0 for
    /// no pairs). The plain step ([`VrpoStats::read_back`]) and the fused step both report this.
    pub fn from_host(loss: f32, delta: &[f32], v_a: &[f32], v_b: &[f32], beta: f64) -> Self {
        let gap = delta
            .iter()
            .zip(v_a.iter().zip(v_b))
            .map(|(&dl, (&a, &b))| beta * dl as f64 - (a as f64 - b as f64))
            .sum::<f64>()
            / delta.len().max(1) as f64;
        let strength = v_a
            .iter()
            .zip(v_b)
            .map(|(&a, &b)| (a as f64 - b as f64).abs())
            .sum::<f64>()
            / v_a.len().max(1) as f64;
        Self {
            loss,
            accuracy: pair_accuracy(delta, v_a, v_b),
            margin_gap: gap as f32,
            label_strength: strength as f32,
        }
    }
}

/// The VRPO loss of a batch and the residual's gradients in the optimiser's variable order.
/// a and b go through the residual in one call (rows [a; b]).
pub fn vrpo_grads(
    residual: &dyn Denoiser,
    vars: &[(String, Var)],
    grid: &SamplingGrid,
    batch: &VrpoBatch,
    labels: VrpoLabels,
    beta: f64,
) -> Result<(Vec<Option<Tensor>>, VrpoStats)> {
    let b = batch.k_starts.len();
    let cat = |p: &[Tensor], q: &[Tensor]| -> Result<Vec<Tensor>> {
        p.iter()
            .zip(q)
            .map(|(x, y)| Ok(Tensor::cat(&[x, y], 0)?))
            .collect()
    };
    let states = cat(&batch.xa, &batch.xb)?;
    let noises = cat(&batch.za, &batch.zb)?;
    let ks: Vec<usize> = batch
        .k_starts
        .iter()
        .chain(&batch.k_starts)
        .copied()
        .collect();
    let cond = twice(batch.cond.as_ref(), states[0].device())?;
    let ratio = path_log_ratio_residual_rows(residual, grid, &states, &noises, &ks, cond.as_ref())?; // [2B]
    let delta = (ratio.narrow(0, 0, b)? - ratio.narrow(0, b, b)?)?;
    let loss = vrpo_loss(labels, &delta, &batch.v_a, &batch.v_b, beta)?;
    let grads = loss.backward()?;
    let stats = VrpoStats::read_back(&loss, &delta, &batch.v_a, &batch.v_b, beta)?;
    Ok((grads_in_order(vars, &grads), stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mixture::{AnalyticDenoiser, ExactValue, GaussianMixture};
    use crate::models::{MlpConfig, MlpDenoiser};
    use crate::optim::{AdamW, AdamWConfig};
    use crate::rng::{randn, rng_for};
    use crate::schedule::VpSchedule;
    use candle_nn::VarMap;

    #[test]
    fn stats_read_back_in_one_go_match_hand_values() {
        // Delta = [1, -2, 0], V(a) - V(b) = [0.5, 1, -1], beta = 2, loss 0.75.
        // gap = mean(2*1 - 0.5, 2*(-2) - 1, 0 + 1) = (1.5 - 5 + 1) / 3 = -0.8333...
        // accuracy: pair 0 agrees, pair 1 disagrees, pair 2 has Delta == 0: 1/3.
        // label strength = mean(|0.5|, |1|, |-1|) = 2.5 / 3.
        let d = Device::Cpu;
        let v = |x: &[f32]| Tensor::new(x, &d).unwrap();
        let s = VrpoStats::read_back(
            &Tensor::new(0.75f32, &d).unwrap(),
            &v(&[1.0, -2.0, 0.0]),
            &v(&[1.0, 2.0, 0.0]),
            &v(&[0.5, 1.0, 1.0]),
            2.0,
        )
        .unwrap();
        assert_eq!(s.loss, 0.75);
        assert_eq!(s.accuracy, 1.0 / 3.0);
        assert!(
            (s.margin_gap as f64 + 2.5 / 3.0).abs() < 1e-6,
            "{}",
            s.margin_gap
        );
        assert!(
            (s.label_strength as f64 - 2.5 / 3.0).abs() < 1e-6,
            "{}",
            s.label_strength
        );
        let err = VrpoStats::read_back(
            &Tensor::new(0.75f32, &d).unwrap(),
            &v(&[1.0, -2.0, 0.0]),
            &v(&[1.0, 2.0]),
            &v(&[0.5, 1.0, 1.0]),
            2.0,
        )
        .expect_err("V(a) one short");
        assert!(err.to_string().contains("V(a) [2]"), "{err}");
    }

    #[test]
    fn starts_cover_the_chain() {
        assert_eq!(segment_starts(20, 4), vec![20, 16, 12, 8, 4]);
        assert_eq!(segment_starts(10, 3), vec![10, 7, 4]);
        assert_eq!(segment_starts(5, 6), Vec::<usize>::new());
    }

    #[test]
    fn pairs_share_their_start_and_chain_on() {
        let s = VpSchedule::ddpm_default();
        let g = SamplingGrid::new(&s, 20, 1.0).unwrap();
        let m = GaussianMixture::quickstart();
        let r = AnalyticDenoiser {
            mixture: m,
            schedule: s,
        };
        let pairs = make_segment_pairs(
            &r,
            &g,
            &[2],
            8,
            5,
            None,
            &mut rng_for(1, 0, 0),
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(
            pairs.iter().map(|p| p.k_start).collect::<Vec<_>>(),
            vec![20, 15, 10, 5]
        );
        for w in pairs.windows(2) {
            // Same start for a and b; the next start is a's endpoint.
            assert_eq!(
                w[0].a.states[0].to_vec2::<f32>().unwrap(),
                w[0].b.states[0].to_vec2::<f32>().unwrap()
            );
            assert_eq!(
                w[0].a.endpoint().to_vec2::<f32>().unwrap(),
                w[1].a.states[0].to_vec2::<f32>().unwrap()
            );
        }
    }

    #[test]
    fn class_conditional_pairs_keep_their_classes_and_start_at_ln2() {
        // Classes drawn per chain (uniform, reproducible), shared by a and b, handed to the
        // residual: a zero-initialised class-conditional residual gives loss ln 2 exactly, and
        // its gradient reaches the class embedding.
        let s = VpSchedule::ddpm_default();
        let g = SamplingGrid::new(&s, 20, 1.0).unwrap();
        let r = AnalyticDenoiser {
            mixture: GaussianMixture::quickstart(),
            schedule: s,
        };
        let mut rng = rng_for(3, 0, 0);
        assert!(draw_classes(0, 8, &mut rng, &Device::Cpu)
            .unwrap()
            .is_none());
        let c = draw_classes(3, 64, &mut rng, &Device::Cpu)
            .unwrap()
            .unwrap();
        let cv = c.to_vec1::<u32>().unwrap();
        assert!(cv.iter().all(|&x| x < 3));
        assert!((0..3).all(|k| cv.contains(&k)), "{cv:?}");
        let pairs =
            make_segment_pairs(&r, &g, &[2], 64, 4, Some(&c), &mut rng, &Device::Cpu).unwrap();
        let p = &pairs[2];
        assert_eq!(p.cond.as_ref().unwrap().to_vec1::<u32>().unwrap(), cv);
        let v = ExactValue {
            mixture: GaussianMixture::quickstart(),
            schedule: VpSchedule::ddpm_default(),
            a: vec![1.0, 0.0],
            b: 0.0,
        };
        let (va, vb) = score_pair(&v, &g, p, 1.0, &Device::Cpu).unwrap();
        let batch = VrpoBatch {
            k_starts: vec![p.k_start; 64],
            xa: p.a.states.clone(),
            za: p.a.noises.clone(),
            xb: p.b.states.clone(),
            zb: p.b.noises.clone(),
            v_a: va,
            v_b: vb,
            cond: p.cond.clone(),
        };
        let vm = VarMap::new();
        let res = MlpDenoiser::new(
            MlpConfig {
                dim: 2,
                hidden: 16,
                depth: 1,
                time_dim: 8,
                classes: 3,
                zero_init_output: true,
            },
            crate::testutil::vb(&vm, 1, &Device::Cpu),
        )
        .unwrap();
        let vars: Vec<(String, Var)> = crate::optim::named_vars(&vm).unwrap();
        let (grads, st) = vrpo_grads(&res, &vars, &g, &batch, VrpoLabels::Soft, 1.0).unwrap();
        assert!((st.loss - std::f32::consts::LN_2).abs() < 1e-6);
        // At a zero output layer only the output layer has a gradient; it must be nonzero.
        let out_w = vars.iter().position(|(n, _)| n == "out.weight").unwrap();
        let gsum = grads[out_w]
            .as_ref()
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(gsum > 0.0);
        // Without the classes the conditional residual refuses, rather than ignoring them.
        let mut plain = batch.clone();
        plain.cond = None;
        assert!(vrpo_grads(&res, &vars, &g, &plain, VrpoLabels::Soft, 1.0).is_err());
    }

    #[test]
    fn on_images_the_policy_is_the_reference_bit_for_bit_at_step_0_and_the_loss_is_ln2() {
        // A class-conditional reference on [B, 1, 4, 4] images (an MLP with random weights), a
        // zero-initialised class-conditional residual: policy eps == reference eps exactly, and
        // the VRPO loss of image segment pairs is ln 2.
        use crate::denoiser::ResidualPolicy;
        use std::sync::Arc;
        let s = VpSchedule::ddpm_default();
        let g = SamplingGrid::new(&s, 12, 1.0).unwrap();
        let net = |zero: bool, vm: &VarMap| {
            MlpDenoiser::new(
                MlpConfig {
                    dim: 16,
                    hidden: 32,
                    depth: 2,
                    time_dim: 8,
                    classes: 3,
                    zero_init_output: zero,
                },
                crate::testutil::vb(vm, zero as u64, &Device::Cpu),
            )
            .unwrap()
        };
        let (vr, vp) = (VarMap::new(), VarMap::new());
        let reference: Arc<dyn Denoiser> = Arc::new(net(false, &vr));
        let residual = Arc::new(net(true, &vp));
        let policy = ResidualPolicy {
            reference: reference.clone(),
            residual: residual.clone(),
        };
        let mut rng = rng_for(4, 0, 0);
        let c = draw_classes(3, 16, &mut rng, &Device::Cpu)
            .unwrap()
            .unwrap();
        let x = randn(&mut rng, (16, 1, 4, 4), &Device::Cpu).unwrap();
        let n = timesteps(500, 16, &Device::Cpu).unwrap();
        let e_ref = reference.eps(&x, &n, Some(&c)).unwrap();
        let e_pol = policy.eps(&x, &n, Some(&c)).unwrap();
        assert_eq!(e_pol.dims(), &[16, 1, 4, 4]);
        let bits = |t: &Tensor| -> Vec<u32> {
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        };
        assert_eq!(bits(&e_ref), bits(&e_pol));
        let pairs = make_segment_pairs(
            reference.as_ref(),
            &g,
            &[1, 4, 4],
            16,
            3,
            Some(&c),
            &mut rng,
            &Device::Cpu,
        )
        .unwrap();
        let p = &pairs[0];
        let batch = VrpoBatch {
            k_starts: vec![p.k_start; 16],
            xa: p.a.states.clone(),
            za: p.a.noises.clone(),
            xb: p.b.states.clone(),
            zb: p.b.noises.clone(),
            v_a: Tensor::ones(16, DType::F32, &Device::Cpu).unwrap(),
            v_b: Tensor::zeros(16, DType::F32, &Device::Cpu).unwrap(),
            cond: p.cond.clone(),
        };
        let vars = crate::optim::named_vars(&vp).unwrap();
        let (_, st) =
            vrpo_grads(residual.as_ref(), &vars, &g, &batch, VrpoLabels::Soft, 1.0).unwrap();
        assert!(
            (st.loss - std::f32::consts::LN_2).abs() < 1e-6,
            "{}",
            st.loss
        );
    }

    #[test]
    fn zero_residual_gives_ln2_and_learning_moves_delta_toward_the_value_gap() {
        // At init Delta = 0: loss = ln 2 exactly, the margin gap is -(V(a) - V(b)) on average.
        // A few hundred Adam steps on one fixed batch shrink |beta Delta - (V(a) - V(b))|: the
        // soft-label optimum is the h-transform (DESIGN.md).
        let s = VpSchedule::ddpm_default();
        let g = SamplingGrid::new(&s, 20, 1.0).unwrap();
        let mix = GaussianMixture::quickstart();
        let r = AnalyticDenoiser {
            mixture: mix.clone(),
            schedule: s.clone(),
        };
        let v = ExactValue {
            mixture: mix,
            schedule: s,
            a: vec![1.0, 0.0],
            b: 0.0,
        };
        let pairs = make_segment_pairs(
            &r,
            &g,
            &[2],
            64,
            4,
            None,
            &mut rng_for(2, 0, 0),
            &Device::Cpu,
        )
        .unwrap();
        let p = &pairs[3];
        let (va, vb) = score_pair(&v, &g, p, 1.0, &Device::Cpu).unwrap();
        let batch = VrpoBatch {
            k_starts: vec![p.k_start; 64],
            xa: p.a.states.clone(),
            za: p.a.noises.clone(),
            xb: p.b.states.clone(),
            zb: p.b.noises.clone(),
            v_a: va,
            v_b: vb,
            cond: None,
        };
        let vm = VarMap::new();
        let res = MlpDenoiser::new(
            MlpConfig {
                dim: 2,
                hidden: 64,
                depth: 2,
                time_dim: 16,
                classes: 0,
                zero_init_output: true,
            },
            crate::testutil::vb(&vm, 3, &Device::Cpu),
        )
        .unwrap();
        let vars = vm
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut opt = AdamW::new(
            vars,
            AdamWConfig {
                lr: 3e-3,
                ..Default::default()
            },
        )
        .unwrap();
        let (_, st0) = vrpo_grads(&res, opt.vars(), &g, &batch, VrpoLabels::Soft, 1.0).unwrap();
        assert!((st0.loss - std::f32::consts::LN_2).abs() < 1e-6);
        let gap_abs = |res: &MlpDenoiser| {
            let ks = vec![p.k_start; 128];
            let st = [p.a.states.clone(), p.b.states.clone()];
            let states: Vec<Tensor> = st[0]
                .iter()
                .zip(&st[1])
                .map(|(x, y)| Tensor::cat(&[x, y], 0).unwrap())
                .collect();
            let noises: Vec<Tensor> =
                p.a.noises
                    .iter()
                    .zip(&p.b.noises)
                    .map(|(x, y)| Tensor::cat(&[x, y], 0).unwrap())
                    .collect();
            let ratio = path_log_ratio_residual_rows(res, &g, &states, &noises, &ks, None).unwrap();
            let d = (ratio.narrow(0, 0, 64).unwrap() - ratio.narrow(0, 64, 64).unwrap()).unwrap();
            (d - (&batch.v_a - &batch.v_b).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .mean_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let before = gap_abs(&res);
        for _ in 0..300 {
            let (gr, _) = vrpo_grads(&res, opt.vars(), &g, &batch, VrpoLabels::Soft, 1.0).unwrap();
            opt.step_with(&gr).unwrap();
        }
        let after = gap_abs(&res);
        assert!(
            after < 0.5 * before,
            "mean |Delta - dV| {before} -> {after}"
        );
    }
}
