//! The `Objective` seam between the learner and the losses: decode a batch of replay records and
//! return the gradients of the loss (in the optimiser's variable order) with a few statistics. The
//! learner stays the same for VRPO and DF-DPO; each objective is one implementation.

use std::sync::Arc;

use candle_core::{Device, Tensor};
use tilt_kernels::denoiser::Denoiser;
use tilt_kernels::losses::VrpoLabels;
use tilt_kernels::optim::AdamW;
use tilt_kernels::schedule::SamplingGrid;
use tilt_kernels::vrpo::vrpo_grads;

use crate::codec::records_to_batch;
use crate::replay::Record;
use crate::Result;

/// What one gradient evaluation reports, whatever the loss.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepStats {
    pub loss: f32,
    /// VRPO: share of pairs ordered like the critic; DF-DPO: implicit accuracy.
    pub accuracy: f32,
    /// VRPO: mean beta Delta - (V(a) - V(b)); DF-DPO: the SFT term.
    pub aux: f32,
}

/// A loss a learner replica can take gradients of.
pub trait Objective: Send + Sync {
    /// Gradients of the loss on `records` w.r.t. `model`'s variables, in `opt`'s order.
    /// `step` is the learner step (objectives may draw per-step randomness from it).
    fn grads(
        &self,
        model: &dyn Denoiser,
        opt: &AdamW,
        records: &[Record],
        step: u64,
        replica: usize,
    ) -> Result<(Vec<Option<Tensor>>, StepStats)>;
}

/// VRPO on scored segment pairs (`tilt_kernels::vrpo`).
pub struct VrpoObjective {
    pub grid: Arc<SamplingGrid>,
    pub labels: VrpoLabels,
    pub beta: f64,
}

impl Objective for VrpoObjective {
    fn grads(
        &self,
        model: &dyn Denoiser,
        opt: &AdamW,
        records: &[Record],
        _step: u64,
        _replica: usize,
    ) -> Result<(Vec<Option<Tensor>>, StepStats)> {
        let batch = records_to_batch(records, &Device::Cpu)?;
        let (g, s) = vrpo_grads(model, opt, &self.grid, &batch, self.labels, self.beta)?;
        Ok((
            g,
            StepStats {
                loss: s.loss,
                accuracy: s.accuracy,
                aux: s.margin_gap,
            },
        ))
    }
}
