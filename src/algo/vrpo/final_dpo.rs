//! The Diffusion-DPO baseline of the VRPO comparison (`vrpo.method = "final_dpo"`): final-sample
//! pairs of the reference ranked by the reward (the `final_pairs` source) and the Diffusion-DPO
//! loss for policy = reference + residual (`tilt_kernels::final_dpo`). Same policy network, same
//! learners, same evaluation as VRPO; `vrpo.beta` is Diffusion-DPO's beta.

use std::sync::Arc;

use candle_core::{Tensor, Var};
use tilt_actors::codec::records_to_final_pairs;
use tilt_actors::objective::{model_device, Objective, StepStats};
use tilt_actors::replay::Record;
use tilt_kernels::denoiser::Denoiser;
use tilt_kernels::final_dpo::final_dpo_grads;
use tilt_kernels::rng::rng_for;
use tilt_kernels::schedule::VpSchedule;

/// Diffusion-DPO on ranked final samples, on the learner's device.
pub struct FinalDpoObjective {
    pub reference: Arc<dyn Denoiser>,
    pub schedule: VpSchedule,
    pub beta: f64,
    pub seed: u64,
}

impl Objective for FinalDpoObjective {
    fn grads(
        &self,
        model: &dyn Denoiser,
        vars: &[(String, Var)],
        records: &[Record],
        step: u64,
        replica: usize,
    ) -> tilt_actors::Result<(Vec<Option<Tensor>>, StepStats)> {
        let (w, l, cond) = records_to_final_pairs(records, &model_device(vars)?)?;
        let mut rng = rng_for(self.seed, 6_000 + replica as u64, step);
        let (g, s) = final_dpo_grads(
            model,
            self.reference.as_ref(),
            vars,
            &self.schedule,
            &w,
            &l,
            cond.as_ref(),
            self.beta,
            &mut rng,
        )?;
        Ok((
            g,
            StepStats {
                loss: s.loss,
                accuracy: s.implicit_accuracy,
                label_strength: None,
            },
        ))
    }
}
