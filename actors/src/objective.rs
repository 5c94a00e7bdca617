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

/// Decode (winner, loser) clip pairs into two stacked tensors [B, T, C, H, W].
pub fn records_to_clip_pairs(records: &[Record]) -> Result<(Tensor, Tensor)> {
    let (mut w, mut l) = (
        Vec::with_capacity(records.len()),
        Vec::with_capacity(records.len()),
    );
    for r in records {
        let mut ts = crate::replay::payload_to_tensors(&r.payload)?;
        let bad = |n: &str| crate::ActorError::Record {
            seq: r.seq,
            producer: r.producer,
            detail: format!("missing tensor {n}"),
        };
        w.push(ts.remove("w").ok_or_else(|| bad("w"))?);
        l.push(ts.remove("l").ok_or_else(|| bad("l"))?);
    }
    Ok((Tensor::stack(&w, 0)?, Tensor::stack(&l, 0)?))
}

/// DF-DPO: Diffusion-DPO + lambda SFT on (real, edited) pairs against the frozen reference.
pub struct DfDpoObjective {
    pub reference: Arc<dyn Denoiser>,
    pub schedule: tilt_kernels::schedule::VpSchedule,
    pub beta: f64,
    pub lambda_sft: f64,
    pub seed: u64,
    /// Data space -> the space the denoisers diffuse in (applied to winners and losers).
    pub scale: tilt_kernels::dfdpo::DataScale,
}

impl Objective for DfDpoObjective {
    fn grads(
        &self,
        model: &dyn Denoiser,
        opt: &AdamW,
        records: &[Record],
        step: u64,
        replica: usize,
    ) -> Result<(Vec<Option<Tensor>>, StepStats)> {
        let (w, l) = records_to_clip_pairs(records)?;
        let (w, l) = (self.scale.to_model(&w)?, self.scale.to_model(&l)?);
        let mut rng = tilt_kernels::rng::rng_for(self.seed, 5_000 + replica as u64, step);
        let (g, s) = tilt_kernels::dfdpo::dfdpo_grads(
            model,
            self.reference.as_ref(),
            opt,
            &self.schedule,
            &w,
            &l,
            self.beta,
            self.lambda_sft,
            &mut rng,
        )?;
        Ok((
            g,
            StepStats {
                loss: s.loss,
                accuracy: s.implicit_accuracy,
                aux: s.sft,
            },
        ))
    }
}

/// The SFT baseline: the plain denoising loss on the winners (real clips) of the same pairs.
pub struct SftObjective {
    pub schedule: tilt_kernels::schedule::VpSchedule,
    pub seed: u64,
    /// Data space -> the space the denoiser diffuses in.
    pub scale: tilt_kernels::dfdpo::DataScale,
}

impl Objective for SftObjective {
    fn grads(
        &self,
        model: &dyn Denoiser,
        opt: &AdamW,
        records: &[Record],
        step: u64,
        replica: usize,
    ) -> Result<(Vec<Option<Tensor>>, StepStats)> {
        let (w, _) = records_to_clip_pairs(records)?;
        let w = self.scale.to_model(&w)?;
        let mut rng = tilt_kernels::rng::rng_for(self.seed, 6_000 + replica as u64, step);
        let (g, loss) =
            tilt_kernels::dfdpo::denoise_grads(model, opt, &self.schedule, &w, &mut rng)?;
        Ok((
            g,
            StepStats {
                loss,
                accuracy: 0.0,
                aux: loss,
            },
        ))
    }
}
