//! Learner step throughput on a device, for `tilt gpu-check`, for two residuals: the
//! quickstart's MLP on 2-D data and the digits' class-conditional U-Net on 8x8 images. One VRPO
//! learner step = `vrpo_grads` (path log-ratios of a and b through the residual, loss, backward)
//! plus the AdamW step, on a synthetic batch resident on the device (no replay sampling, no
//! upload). The clock stops after a device synchronisation.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use serde::Serialize;

use super::segment_log_ratio;
use crate::denoiser::Denoiser;
use crate::fused_vrpo::{fused_residual, FusedVrpo};
use crate::init::{seeded_var_builder, TEST_STREAM};
use crate::losses::VrpoLabels;
use crate::models::{MlpConfig, MlpDenoiser, UNetConfig, UNetDenoiser};
use crate::optim::{named_vars, AdamW, AdamWConfig};
use crate::rng::{randn, rng_for};
use crate::schedule::{SamplingGrid, VpSchedule};
use crate::vrpo::{vrpo_grads, VrpoBatch};
use crate::{KernelError, Result};

/// The learner's chain: K = 100 steps, segments of L = 10.
const K: usize = 100;
const L: usize = 10;

/// The residual a benchmark trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BenchModel {
    /// The quickstart's policy: MLP hidden 64, depth 3, time_dim 32, on 2-D data.
    QuickstartMlp,
    /// The digits' image residual: U-Net base 32, time_dim 32, 10 classes, on 1x8x8 images.
    DigitsUnet,
}

impl BenchModel {
    /// One sample's shape.
    fn sample_shape(self) -> Vec<usize> {
        match self {
            BenchModel::QuickstartMlp => vec![2],
            BenchModel::DigitsUnet => vec![1, 8, 8],
        }
    }

    fn classes(self) -> usize {
        match self {
            BenchModel::QuickstartMlp => 0,
            BenchModel::DigitsUnet => 10,
        }
    }

    /// Elements per sample (the log-ratio kernel's row width).
    fn dim(self) -> usize {
        self.sample_shape().iter().product()
    }

    fn build(self, vm: &VarMap, dev: &Device) -> Result<Box<dyn Denoiser>> {
        let vb = seeded_var_builder(vm, 0, TEST_STREAM, DType::F32, dev);
        Ok(match self {
            BenchModel::QuickstartMlp => Box::new(MlpDenoiser::new(
                MlpConfig {
                    dim: 2,
                    hidden: 64,
                    depth: 3,
                    time_dim: 32,
                    classes: 0,
                    zero_init_output: false,
                },
                vb,
            )?),
            BenchModel::DigitsUnet => Box::new(UNetDenoiser::new(
                UNetConfig {
                    channels: 1,
                    size: 8,
                    base: 32,
                    time_dim: 32,
                    classes: 10,
                    zero_init_output: false,
                },
                vb,
            )?),
        })
    }
}

/// How a benchmarked learner step computes its gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepPath {
    /// candle's autograd (`vrpo_grads`): every device, every model; on CUDA it calls tilt's
    /// CUDA kernel for the segment log-ratio.
    Candle,
    /// tilt's fused CPU step (`FusedVrpo`, what `learner.fused = true` runs): the CPU and the
    /// unconditional MLP only. The CPU's best, for a fair CPU-vs-GPU ratio.
    Fused,
}

/// Measured rate of one device at one batch size.
#[derive(Debug, Clone, Serialize)]
pub struct StepRate {
    pub model: BenchModel,
    /// `cpu` or `cuda:N`.
    pub device: String,
    pub path: StepPath,
    /// Pairs per learner step.
    pub batch: usize,
    /// Timed steps (after 3 warm-up steps).
    pub steps: usize,
    pub steps_per_s: f64,
    pub ms_per_step: f64,
    /// Milliseconds per step in tilt's own fused kernel (`segment_log_ratio` forward and
    /// backward at the step's shape: [2 batch L, elements per sample]), timed alone; None on the
    /// fused CPU path, which does not call it.
    pub fused_ms: Option<f64>,
    /// fused_ms / ms_per_step.
    pub fused_share: Option<f64>,
}

fn device_name(dev: &Device) -> String {
    match dev.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        _ => "cpu".into(),
    }
}

/// A synthetic learner batch of `b` pairs of `model`'s samples on `dev`.
fn batch(model: BenchModel, dev: &Device, b: usize) -> Result<VrpoBatch> {
    let mut rng = rng_for(5, 0, b as u64);
    let mut shape = vec![b];
    shape.extend(model.sample_shape());
    let mut states = |n: usize| -> Result<Vec<Tensor>> {
        (0..n)
            .map(|_| randn(&mut rng, shape.clone(), dev))
            .collect()
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
        cond: match model.classes() {
            0 => None,
            c => Some(Tensor::from_vec(
                (0..b).map(|i| (i % c) as u32).collect::<Vec<u32>>(),
                b,
                dev,
            )?),
        },
    })
}

/// Run learner steps of `b` pairs of `model` on `dev` for about `seconds` (at least 5 and at
/// most `max_steps` timed steps), computed by `path` (`Fused`: the CPU's MLP only, on every core
/// this process may use).
pub fn learner_step_rate(
    model: BenchModel,
    dev: &Device,
    b: usize,
    seconds: f64,
    max_steps: usize,
    path: StepPath,
) -> Result<StepRate> {
    let vm = VarMap::new();
    let residual = model.build(&vm, dev)?;
    let mut opt = AdamW::new(
        named_vars(&vm)?,
        AdamWConfig {
            lr: 1e-3,
            ..Default::default()
        },
    )?;
    let grid = SamplingGrid::new(&VpSchedule::ddpm_default(), K, 1.0)?;
    let batch = batch(model, dev, b)?;
    let mut fused = match path {
        StepPath::Candle => None,
        StepPath::Fused => {
            let mlp = fused_residual(residual.as_ref())
                .map_err(|why| KernelError::param("bench step path", "fused", why))?;
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            Some((mlp, FusedVrpo::new(threads)))
        }
    };
    let mut step = || -> Result<()> {
        let (grads, _) = match &mut fused {
            None => vrpo_grads(
                residual.as_ref(),
                opt.vars(),
                &grid,
                &batch,
                VrpoLabels::Soft,
                1.0,
            )?,
            Some((mlp, f)) => f.grads(mlp, opt.vars(), &grid, &batch, VrpoLabels::Soft, 1.0)?,
        };
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
    let fused_ms = match path {
        StepPath::Candle => Some(fused_ms(dev, b, model.dim())?),
        StepPath::Fused => None,
    };
    Ok(StepRate {
        model,
        device: device_name(dev),
        path,
        batch: b,
        steps,
        steps_per_s: 1e3 / ms_per_step,
        ms_per_step,
        fused_ms,
        fused_share: fused_ms.map(|f| f / ms_per_step),
    })
}

/// Milliseconds of one forward + backward of `segment_log_ratio` at a learner step's shape
/// (`dim` elements per sample).
fn fused_ms(dev: &Device, b: usize, dim: usize) -> Result<f64> {
    let rows = 2 * b * L;
    let mut rng = rng_for(5, 2, b as u64);
    let v = candle_core::Var::from_tensor(&randn(&mut rng, (rows, dim), dev)?)?;
    let z = randn(&mut rng, (rows, dim), dev)?;
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
        for (model, b) in [(BenchModel::QuickstartMlp, 16), (BenchModel::DigitsUnet, 2)] {
            let r = learner_step_rate(model, &Device::Cpu, b, 0.0, 5, StepPath::Candle).unwrap();
            assert_eq!(
                (r.model, r.device.as_str(), r.path, r.batch, r.steps),
                (model, "cpu", StepPath::Candle, b, 5)
            );
            let f = r.fused_ms.unwrap();
            assert!(r.steps_per_s > 0.0 && r.ms_per_step > 0.0 && f > 0.0);
            assert!((r.fused_share.unwrap() - f / r.ms_per_step).abs() < 1e-12);
        }
        // The fused CPU step: the MLP only (the U-Net is refused with the reason), no kernel
        // share (it does not call the CUDA op's CPU twin).
        let r = learner_step_rate(
            BenchModel::QuickstartMlp,
            &Device::Cpu,
            16,
            0.0,
            5,
            StepPath::Fused,
        )
        .unwrap();
        assert_eq!((r.path, r.steps, r.fused_ms), (StepPath::Fused, 5, None));
        assert!(r.steps_per_s > 0.0);
        let e = learner_step_rate(
            BenchModel::DigitsUnet,
            &Device::Cpu,
            2,
            0.0,
            5,
            StepPath::Fused,
        )
        .unwrap_err();
        assert!(e.to_string().contains("not an MLP"), "{e}");
    }
}
