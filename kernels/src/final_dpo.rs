//! The standard offline baseline VRPO is compared with: Diffusion-DPO (Wallace et al. 2023) on
//! pairs of *final* samples. Two reference samples of the same class from independent noise are
//! ranked by the reward (winner = higher r(x_0)); the loss is the Diffusion-DPO loss on the pair
//! noised to one shared timestep with one shared noise (`losses::diffusion_dpo_loss`, no SFT term),
//! for policy = reference + residual. No critic and no intermediate states: the preference is only
//! about where the chain ends.

use candle_core::{Device, Tensor, Var};
use rand::rngs::StdRng;

use crate::denoiser::Denoiser;
use crate::dfdpo::{noised_pair, DfDpoStats, NoisedPair};
use crate::logprob::sample_chain;
use crate::losses::diffusion_dpo_loss;
use crate::optim::grads_in_order;
use crate::reward::Reward;
use crate::rng::randn;
use crate::schedule::{SamplingGrid, VpSchedule};
use crate::{KernelError, Result};

/// A batch of ranked final-sample pairs.
#[derive(Debug, Clone)]
pub struct FinalPairs {
    /// [B, ...] the higher-reward sample of each pair.
    pub winners: Tensor,
    /// [B, ...] the other one.
    pub losers: Tensor,
    /// [B] u32 class of the pair (both samples share it), None when unconditional.
    pub cond: Option<Tensor>,
    /// Rewards of winners and losers.
    pub r_w: Vec<f32>,
    pub r_l: Vec<f32>,
}

/// Sample 2B reference chains from independent noise (rows i and B + i share the class cond[i]),
/// score their endpoints with `reward`, and order each pair (ties go to the first sample).
#[allow(clippy::too_many_arguments)]
pub fn make_final_pairs(
    reference: &dyn Denoiser,
    grid: &SamplingGrid,
    reward: &dyn Reward,
    sample_shape: &[usize],
    batch: usize,
    cond: Option<&Tensor>,
    rng: &mut StdRng,
    device: &Device,
) -> Result<FinalPairs> {
    if batch == 0 {
        return Err(KernelError::param(
            "rollout.chains",
            batch,
            "must be at least 1",
        ));
    }
    let mut shape = vec![2 * batch];
    shape.extend_from_slice(sample_shape);
    let x = randn(rng, shape, device)?;
    let cond2 = match cond {
        None => None,
        Some(c) => Some(Tensor::cat(&[c, c], 0)?),
    };
    let x0 = sample_chain(reference, grid, &x, grid.len(), 0, cond2.as_ref(), rng)?;
    let r = crate::reward::checked_rewards(reward, &x0, cond2.as_ref())?;
    let (mut w_idx, mut l_idx, mut r_w, mut r_l) = (vec![], vec![], vec![], vec![]);
    for i in 0..batch {
        let (a, b) = (i, batch + i);
        let (w, l) = if r[a] >= r[b] { (a, b) } else { (b, a) };
        w_idx.push(w as u32);
        l_idx.push(l as u32);
        r_w.push(r[w]);
        r_l.push(r[l]);
    }
    let pick = |idx: Vec<u32>| -> Result<Tensor> {
        Ok(x0.index_select(&Tensor::from_vec(idx, batch, device)?, 0)?)
    };
    Ok(FinalPairs {
        winners: pick(w_idx)?,
        losers: pick(l_idx)?,
        cond: cond.cloned(),
        r_w,
        r_l,
    })
}

/// The Diffusion-DPO loss of ranked final pairs for policy = reference + residual, and the
/// residual's gradients in `vars`' order. Each pair shares one timestep (uniform on 1..=N) and one
/// noise; the reference runs once on [x_w; x_l] and the policy's eps is reference + residual.
/// `implicit_accuracy` is the share of pairs the policy already ranks right.
#[allow(clippy::too_many_arguments)]
pub fn final_dpo_grads(
    residual: &dyn Denoiser,
    reference: &dyn Denoiser,
    vars: &[(String, Var)],
    schedule: &VpSchedule,
    winners: &Tensor,
    losers: &Tensor,
    cond: Option<&Tensor>,
    beta: f64,
    rng: &mut StdRng,
) -> Result<(Vec<Option<Tensor>>, DfDpoStats)> {
    let NoisedPair { b, eps, both, n_t } =
        noised_pair("final_dpo_grads", schedule, winners, losers, rng)?;
    let cond2 = match cond {
        None => None,
        Some(c) => Some(Tensor::cat(&[c, c], 0)?),
    };
    let pr = reference.eps(&both, &n_t, cond2.as_ref())?.detach();
    let pt = (&pr + residual.eps(&both, &n_t, cond2.as_ref())?)?;
    let out = diffusion_dpo_loss(
        &eps,
        &pt.narrow(0, 0, b)?,
        &pt.narrow(0, b, b)?,
        &pr.narrow(0, 0, b)?,
        &pr.narrow(0, b, b)?,
        beta,
        0.0,
    )?;
    let grads = out.loss.backward()?;
    let stats = DfDpoStats {
        loss: out.total,
        dpo: out.dpo,
        sft: out.sft,
        implicit_accuracy: out.implicit_accuracy,
    };
    Ok((grads_in_order(vars, &grads), stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mixture::{AnalyticDenoiser, GaussianMixture};
    use crate::models::{MlpConfig, MlpDenoiser};
    use crate::optim::{named_vars, AdamW, AdamWConfig};
    use crate::reward::LinearReward;
    use crate::rng::rng_for;

    use candle_nn::VarMap;

    fn setup() -> (VpSchedule, SamplingGrid, AnalyticDenoiser, LinearReward) {
        let s = VpSchedule::ddpm_default();
        let g = SamplingGrid::new(&s, 20, 1.0).unwrap();
        let r = AnalyticDenoiser {
            mixture: GaussianMixture::quickstart(),
            schedule: s.clone(),
        };
        (
            s,
            g,
            r,
            LinearReward {
                a: vec![1.0, 0.0],
                b: 0.0,
            },
        )
    }

    #[test]
    fn pairs_are_ranked_by_the_reward() {
        let (_, g, r, rew) = setup();
        let p = make_final_pairs(
            &r,
            &g,
            &rew,
            &[2],
            32,
            None,
            &mut rng_for(1, 0, 0),
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(p.winners.dims(), &[32, 2]);
        let rw = rew
            .reward(&p.winners, None)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let rl = rew
            .reward(&p.losers, None)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(rw, p.r_w);
        assert_eq!(rl, p.r_l);
        assert!(rw.iter().zip(&rl).all(|(w, l)| w >= l));
        assert!(rw.iter().zip(&rl).any(|(w, l)| w > l));
    }

    #[test]
    fn zero_residual_gives_ln2_and_training_raises_the_reward_of_the_policy() {
        // At init the policy is the reference: m = r, loss = ln 2. Training on ranked pairs of the
        // reference moves the policy's samples toward higher reward x[0].
        let (s, g, r, rew) = setup();
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
            crate::testutil::vb(&vm, 1, &Device::Cpu),
        )
        .unwrap();
        let mut opt = AdamW::new(
            named_vars(&vm).unwrap(),
            AdamWConfig {
                lr: 3e-3,
                ..Default::default()
            },
        )
        .unwrap();
        let mean_reward = |res: &MlpDenoiser| {
            let pol = Sum(&r, res);
            let x = randn(&mut rng_for(9, 0, 0), (2000, 2), &Device::Cpu).unwrap();
            let x0 = sample_chain(&pol, &g, &x, 20, 0, None, &mut rng_for(9, 0, 1)).unwrap();
            rew.reward(&x0, None)
                .unwrap()
                .mean_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let before = mean_reward(&res);
        for step in 0..150 {
            let p = make_final_pairs(
                &r,
                &g,
                &rew,
                &[2],
                128,
                None,
                &mut rng_for(2, 0, step),
                &Device::Cpu,
            )
            .unwrap();
            let (gr, st) = final_dpo_grads(
                &res,
                &r,
                opt.vars(),
                &s,
                &p.winners,
                &p.losers,
                None,
                200.0,
                &mut rng_for(3, 0, step),
            )
            .unwrap();
            if step == 0 {
                assert!(
                    (st.loss - std::f32::consts::LN_2).abs() < 1e-6,
                    "{}",
                    st.loss
                );
            }
            opt.step_with(&gr).unwrap();
        }
        let after = mean_reward(&res);
        assert!(after > before + 0.1, "mean reward {before} -> {after}");
    }

    /// reference + residual, borrowed (the test keeps the residual to train it).
    struct Sum<'a>(&'a dyn Denoiser, &'a dyn Denoiser);
    impl Denoiser for Sum<'_> {
        fn eps(&self, x: &Tensor, n: &Tensor, cond: Option<&Tensor>) -> Result<Tensor> {
            Ok((self.0.eps(x, n, cond)? + self.1.eps(x, n, cond)?)?)
        }
    }
}
