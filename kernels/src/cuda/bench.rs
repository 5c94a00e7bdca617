//! Learner step throughput at the quickstart's shape on a device, for `tilt gpu-check`: one VRPO
//! learner step = `vrpo_grads` (path log-ratios of a and b through the residual, loss, backward)
//! plus the AdamW step, on a synthetic batch resident on the device (no replay sampling, no
//! upload). The clock stops after a device synchronisation.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::Serialize;

use super::segment_log_ratio;
use crate::losses::VrpoLabels;
use crate::models::{MlpConfig, MlpDenoiser};
use crate::optim::{named_vars, AdamW, AdamWConfig};
use crate::rng::{randn, rng_for};
use crate::schedule::{SamplingGrid, VpSchedule};
use crate::vrpo::{vrpo_grads, VrpoBatch};
use crate::Result;

/// The quickstart's learner: K = 100 steps, segments of L = 10, policy MLP hidden 64, depth 3,
/// time_dim 32, on 2-D data.
const K: usize = 100;
const L: usize = 10;
const DIM: usize = 2;

/// Measured rate of one device at one batch size.
#[derive(Debug, Clone, Serialize)]
pub struct StepRate {
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Pairs per learner step.
    pub batch: usize,
    /// Timed steps (after 3 warm-up steps).
    pub steps: usize,
    pub steps_per_s: f64,
    pub ms_per_step: f64,
    /// Milliseconds per step in tilt's own fused kernel (`segment_log_ratio` forward and
    /// backward at the step's shape: [2 batch L, 2]), timed alone.
    pub fused_ms: f64,
    /// fused_ms / ms_per_step.
    pub fused_share: f64,
}

fn device_name(dev: &Device) -> String {
    match dev.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        _ => "cpu".into(),
    }
}

/// A synthetic learner batch of `b` pairs on `dev`.
fn batch(dev: &Device, b: usize) -> Result<VrpoBatch> {
    let mut rng = rng_for(5, 0, b as u64);
    let mut states = |n: usize| -> Result<Vec<Tensor>> {
        (0..n).map(|_| randn(&mut rng, (b, DIM), dev)).collect()
    };
    let (xa, za, xb, zb) = (states(L + 1)?, states(L)?, states(L + 1)?, states(L)?);
    let mut rng = rng_for(5, 1, b as u64);
    Ok(VrpoBatch {
        k_starts: (0..b).map(|i| L + (i * 7919) % (K - L + 1)).collect(),
        xa,
        za,
        xb,
        zb,
        v_a: randn(&mut rng, b, dev)?,
        v_b: randn(&mut rng, b, dev)?,
        cond: None,
    })
}

/// Run learner steps of `b` pairs on `dev` for about `seconds` (at least 5 and at most
/// `max_steps` timed steps).
pub fn learner_step_rate(
    dev: &Device,
    b: usize,
    seconds: f64,
    max_steps: usize,
) -> Result<StepRate> {
    let vm = VarMap::new();
    let residual = MlpDenoiser::new(
        MlpConfig {
            dim: DIM,
            hidden: 64,
            depth: 3,
            time_dim: 32,
            classes: 0,
            zero_init_output: false,
        },
        VarBuilder::from_varmap(&vm, DType::F32, dev),
    )?;
    let mut opt = AdamW::new(
        named_vars(&vm)?,
        AdamWConfig {
            lr: 1e-3,
            ..Default::default()
        },
    )?;
    let grid = SamplingGrid::new(&VpSchedule::ddpm_default(), K, 1.0)?;
    let batch = batch(dev, b)?;
    let mut step = || -> Result<()> {
        let (grads, _) = vrpo_grads(&residual, opt.vars(), &grid, &batch, VrpoLabels::Soft, 1.0)?;
        opt.step_with(&grads)?;
        Ok(())
    };
    for _ in 0..3 {
        step()?;
    }
    dev.synchronize()?;
    let t0 = Instant::now();
    let mut steps = 0;
    while steps < max_steps.max(5) && (steps < 5 || t0.elapsed().as_secs_f64() < seconds) {
        step()?;
        steps += 1;
        if steps % 10 == 0 {
            dev.synchronize()?;
        }
    }
    dev.synchronize()?;
    let ms_per_step = t0.elapsed().as_secs_f64() * 1e3 / steps as f64;
    let fused_ms = fused_ms(dev, b)?;
    Ok(StepRate {
        device: device_name(dev),
        batch: b,
        steps,
        steps_per_s: 1e3 / ms_per_step,
        ms_per_step,
        fused_ms,
        fused_share: fused_ms / ms_per_step,
    })
}

/// Milliseconds of one forward + backward of `segment_log_ratio` at a learner step's shape.
fn fused_ms(dev: &Device, b: usize) -> Result<f64> {
    let rows = 2 * b * L;
    let mut rng = rng_for(5, 2, b as u64);
    let v = candle_core::Var::from_tensor(&randn(&mut rng, (rows, DIM), dev)?)?;
    let z = randn(&mut rng, (rows, DIM), dev)?;
    let s = randn(&mut rng, rows, dev)?;
    let run = || -> Result<()> {
        let out = segment_log_ratio(&v, &z, &s, L)?;
        out.sum_all()?.backward()?;
        Ok(())
    };
    run()?;
    dev.synchronize()?;
    let reps = 20;
    let t0 = Instant::now();
    for _ in 0..reps {
        run()?;
    }
    dev.synchronize()?;
    Ok(t0.elapsed().as_secs_f64() * 1e3 / reps as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_cpu_measurement_is_complete() {
        let r = learner_step_rate(&Device::Cpu, 16, 0.0, 5).unwrap();
        assert_eq!((r.device.as_str(), r.batch, r.steps), ("cpu", 16, 5));
        assert!(r.steps_per_s > 0.0 && r.ms_per_step > 0.0 && r.fused_ms > 0.0);
        assert!((r.fused_share - r.fused_ms / r.ms_per_step).abs() < 1e-12);
    }
}
