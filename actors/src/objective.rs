//! The `Objective` seam between the learner and the losses: decode a batch of replay records and
//! return the gradients of the loss (in the order of the trainable variables) with a few
//! statistics. The learner is the same for every algorithm; each algorithm implements this trait
//! in its own file (`src/algo/<name>.rs`), calling its math in `tilt-kernels`.

use candle_core::{Device, Tensor, Var};
use tilt_kernels::denoiser::Denoiser;

use crate::replay::Record;
use crate::{ActorError, Result};

/// What one gradient evaluation reports, whatever the loss.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepStats {
    pub loss: f32,
    /// VRPO: share of pairs ordered like the critic; DF-DPO: implicit accuracy.
    pub accuracy: f32,
    /// VRPO: mean |V(a) - V(b)|, the size of the critic's soft-label logit (near 0: labels near
    /// 1/2, little to learn). None for losses without critic labels.
    pub label_strength: Option<f32>,
}

/// A loss a learner replica can take gradients of.
pub trait Objective: Send + Sync {
    /// Gradients of the loss on `records` w.r.t. `vars` (the trainable variables of `model`), in
    /// that order. `step` is the learner step (objectives may draw per-step randomness from it),
    /// `replica` the learner's rank. Records decode on the CPU; the objective moves the batch to
    /// its device once (`codec`).
    fn grads(
        &self,
        model: &dyn Denoiser,
        vars: &[(String, Var)],
        records: &[Record],
        step: u64,
        replica: usize,
    ) -> Result<(Vec<Option<Tensor>>, StepStats)>;
}

/// The device of a replica's model (its first variable's): where an objective puts the batch it
/// decodes, so replicas on different devices (`learner.devices`) each compute where their
/// weights are.
pub fn model_device(vars: &[(String, Var)]) -> Result<Device> {
    vars.first()
        .map(|(_, v)| v.device().clone())
        .ok_or_else(|| ActorError::Actor {
            role: "learner".into(),
            detail: "the model has no trainable variables".into(),
        })
}
