//! `tilt gpu-check`: the one check to run on a GPU machine (scripts/gpu-check.sh calls it). It
//! compares tilt's fused CUDA kernels with their CPU reference and with the candle computation
//! they replace (values, gradients, bitwise repeat), then measures learner steps/s for the
//! quickstart's MLP and the digits' U-Net on the CPU and the GPU for each batch size (the U-Net on
//! the CPU up to batch 256), with the share of the GPU step spent in tilt's own kernel. Writes one JSON, prints two tables; exits 1 if any comparison
//! fails or the device cannot be had (never falls back to the CPU).

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::Device;
use serde::Serialize;
use tilt_kernels::cuda::{compare_on, device, learner_step_rate, BenchModel, Comparison, StepRate};

#[derive(Serialize)]
struct Report {
    device: String,
    passed: bool,
    comparisons: Vec<Comparison>,
    bench: Vec<StepRate>,
}

/// The largest batch at which the U-Net's CPU step is measured.
const CPU_UNET_MAX_BATCH: usize = 256;

/// Check `device_name` (e.g. "cuda:0"), benchmark at `batches` for about `seconds` each, and
/// write the report to `out`. `cpu`: also measure the CPU at every batch size.
pub fn gpu_check(
    device_name: &str,
    out: &Path,
    batches: &[usize],
    seconds: f64,
    cpu: bool,
) -> Result<()> {
    let dev = device(device_name).with_context(|| format!("gpu-check: --device {device_name}"))?;
    if !dev.is_cuda() {
        anyhow::bail!("gpu-check: --device {device_name} is not a CUDA device");
    }
    eprintln!("gpu-check: comparing the fused kernels on {device_name} with their references");
    let comparisons = compare_on(&dev).context("gpu-check: comparisons")?;
    println!(
        "{:<18} {:<44} {:<9} {:<14} {:>11} {:>9}  result",
        "op", "case", "quantity", "against", "max rel err", "tol"
    );
    for c in &comparisons {
        println!(
            "{:<18} {:<44} {:<9} {:<14} {:>11.2e} {:>9.1e}  {}",
            c.op,
            c.case,
            c.quantity,
            c.against,
            c.max_rel_err,
            c.tolerance,
            if c.passed { "ok" } else { "FAILED" }
        );
    }
    let passed = comparisons.iter().all(|c| c.passed);
    let mut bench = Vec::new();
    for model in [BenchModel::QuickstartMlp, BenchModel::DigitsUnet] {
        for &b in batches {
            eprintln!("gpu-check: {model:?} learner steps at batch {b}");
            // The U-Net on the CPU takes seconds per step beyond batch 256 (20 images per pair):
            // measured up to there.
            if cpu && (model == BenchModel::QuickstartMlp || b <= CPU_UNET_MAX_BATCH) {
                bench.push(learner_step_rate(model, &Device::Cpu, b, seconds, 1000)?);
            }
            bench.push(learner_step_rate(model, &dev, b, seconds, 1000)?);
        }
    }
    println!();
    println!(
        "{:<15} {:<8} {:>7} {:>14} {:>11} {:>14}",
        "model", "device", "batch", "steps/s", "ms/step", "fused share"
    );
    for r in &bench {
        println!(
            "{:<15} {:<8} {:>7} {:>14.1} {:>11.3} {:>13.1}%",
            format!("{:?}", r.model),
            r.device,
            r.batch,
            r.steps_per_s,
            r.ms_per_step,
            100.0 * r.fused_share
        );
    }
    let report = Report {
        device: device_name.to_string(),
        passed,
        comparisons,
        bench,
    };
    crate::files::write_json(out, &report)?;
    eprintln!("gpu-check: wrote {}", out.display());
    if !passed {
        anyhow::bail!("gpu-check: a fused kernel disagrees with its reference (see the table)");
    }
    Ok(())
}
