//! `tilt gpu-check`: the one check to run on a GPU machine (scripts/gpu-check.sh calls it). It
//! compares tilt's fused CUDA kernels with their CPU reference and with the candle computation
//! they replace (values, gradients, bitwise repeat), then measures learner steps/s for the
//! quickstart's MLP and the digits' U-Net on the CPU and the GPU for each batch size (the U-Net on
//! the CPU up to batch 256), with the share of the GPU step spent in tilt's own kernel. The
//! benchmark keeps to a time budget (a batch predicted to overrun it is skipped and listed), a
//! failed measurement (out of memory, say) is listed and ends that model's larger batches on that
//! device, and the JSON is rewritten after every step of the check, so a run cut short keeps
//! what it measured. Prints two tables; exits 1 if any comparison or measurement fails or the
//! device cannot be had (never falls back to the CPU).

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Device;
use serde::Serialize;
use tilt_kernels::cuda::{
    compare_on, device, learner_step_rate, BenchModel, Comparison, StepPath, StepRate,
};

#[derive(Serialize)]
struct Report {
    device: String,
    /// False until every comparison and measurement has run: the file is rewritten after each,
    /// so a run cut short (a time limit, a crash) leaves what it had measured.
    complete: bool,
    passed: bool,
    comparisons: Vec<Comparison>,
    bench: Vec<StepRate>,
    /// Measurements not taken: over the bench's time budget, or after a failure at a smaller
    /// batch of the same model and device.
    skipped: Vec<Skipped>,
    /// Measurements that failed (e.g. out of device memory), with candle's error.
    failed: Vec<Failed>,
    budget_s: f64,
}

#[derive(Serialize)]
struct Skipped {
    model: BenchModel,
    device: String,
    path: StepPath,
    batch: usize,
    reason: String,
}

#[derive(Serialize)]
struct Failed {
    model: BenchModel,
    device: String,
    path: StepPath,
    batch: usize,
    error: String,
}

/// The largest batch at which the U-Net's CPU step is measured.
const CPU_UNET_MAX_BATCH: usize = 256;

/// What the last measurement of one model on one device cost, to predict the next batch's.
struct Last {
    batch: usize,
    wall_s: f64,
}

/// Check `device_name` (e.g. "cuda:0"), benchmark at `batches` for about `seconds` each within
/// `budget_s` seconds for the whole benchmark, and write the report to `out` (after the
/// comparisons and after every measurement). `cpu`: also measure the CPU.
pub fn gpu_check(
    device_name: &str,
    out: &Path,
    batches: &[usize],
    seconds: f64,
    budget_s: f64,
    cpu: bool,
) -> Result<()> {
    let dev = device(device_name).with_context(|| format!("gpu-check: --device {device_name}"))?;
    if !dev.is_cuda() {
        anyhow::bail!("gpu-check: --device {device_name} is not a CUDA device");
    }
    eprintln!("gpu-check: comparing the fused kernels on {device_name} with their references");
    let comparisons = compare_on(&dev).context("gpu-check: comparisons")?;
    print_comparisons(&comparisons);
    let passed = comparisons.iter().all(|c| c.passed);
    let mut report = Report {
        device: device_name.to_string(),
        complete: false,
        passed,
        comparisons,
        bench: Vec::new(),
        skipped: Vec::new(),
        failed: Vec::new(),
        budget_s,
    };
    crate::files::write_json(out, &report)?;
    let mut devices = Vec::new();
    if cpu {
        devices.push(("cpu".to_string(), Device::Cpu));
    }
    devices.push((device_name.to_string(), dev));
    run_bench(&mut report, &devices, batches, seconds, out)?;
    println!();
    print_bench(&report);
    report.complete = true;
    crate::files::write_json(out, &report)?;
    eprintln!("gpu-check: wrote {}", out.display());
    if !passed {
        anyhow::bail!("gpu-check: a fused kernel disagrees with its reference (see the table)");
    }
    if !report.failed.is_empty() {
        anyhow::bail!(
            "gpu-check: {} measurement(s) failed (see the table and {})",
            report.failed.len(),
            out.display()
        );
    }
    Ok(())
}

/// Measure every model on every device at every batch (ascending) into `report`, rewriting `out`
/// after each: a measurement predicted to overrun what is left of `report.budget_s` is skipped,
/// and so is every larger batch of a model and device after one fails.
fn run_bench(
    report: &mut Report,
    devices: &[(String, Device)],
    batches: &[usize],
    seconds: f64,
    out: &Path,
) -> Result<()> {
    let budget_s = report.budget_s;
    let mut batches = batches.to_vec();
    batches.sort_unstable();
    let t0 = Instant::now();
    for model in [BenchModel::QuickstartMlp, BenchModel::DigitsUnet] {
        // On the CPU the MLP is also timed on tilt's fused step, the CPU's best.
        let targets = devices.iter().flat_map(|(name, d)| {
            let fused = d.is_cpu() && model == BenchModel::QuickstartMlp;
            let paths: &[StepPath] = if fused {
                &[StepPath::Fused, StepPath::Candle]
            } else {
                &[StepPath::Candle]
            };
            paths.iter().map(move |&p| (name, d, p))
        });
        for (name, d, path) in targets {
            let mut last: Option<Last> = None;
            let mut broken = false;
            for &b in &batches {
                // The U-Net on the CPU takes seconds per step beyond batch 256 (20 images per
                // pair): measured up to there.
                if !d.is_cuda() && model == BenchModel::DigitsUnet && b > CPU_UNET_MAX_BATCH {
                    continue;
                }
                let left = budget_s - t0.elapsed().as_secs_f64();
                // The last batch's wall time scaled linearly in the batch: an over-estimate
                // while the device is not yet busy, exact once a step is bound by its work.
                let predicted = last.as_ref().map(|l| l.wall_s * b as f64 / l.batch as f64);
                let reason = if broken {
                    Some("a smaller batch failed".to_string())
                } else if left <= 0.0 {
                    Some(format!("the {budget_s:.0} s budget (--budget) is spent"))
                } else {
                    predicted.filter(|&p| p > left).map(|p| {
                        format!(
                            "predicted {p:.0} s, {left:.0} s left of the {budget_s:.0} s budget \
                             (--budget)"
                        )
                    })
                };
                if let Some(reason) = reason {
                    eprintln!("gpu-check: {model:?} on {name} at batch {b}: skipped, {reason}");
                    report.skipped.push(Skipped {
                        model,
                        device: name.clone(),
                        path,
                        batch: b,
                        reason,
                    });
                    continue;
                }
                eprintln!("gpu-check: {model:?} learner steps on {name} at batch {b}");
                let start = Instant::now();
                match learner_step_rate(model, d, b, seconds, 1000, path) {
                    Ok(r) => {
                        last = Some(Last {
                            batch: b,
                            wall_s: start.elapsed().as_secs_f64(),
                        });
                        report.bench.push(r);
                    }
                    Err(e) => {
                        eprintln!("gpu-check: {model:?} on {name} at batch {b}: FAILED: {e}");
                        broken = true;
                        report.failed.push(Failed {
                            model,
                            device: name.clone(),
                            path,
                            batch: b,
                            error: e.to_string(),
                        });
                    }
                }
                crate::files::write_json(out, &*report)?;
            }
        }
    }
    Ok(())
}

fn print_comparisons(comparisons: &[Comparison]) {
    println!(
        "{:<18} {:<44} {:<9} {:<14} {:>11} {:>9}  result",
        "op", "case", "quantity", "against", "max rel err", "tol"
    );
    for c in comparisons {
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
}

fn print_bench(report: &Report) {
    println!(
        "{:<15} {:<8} {:<7} {:>7} {:>14} {:>11} {:>12}",
        "model", "device", "step", "batch", "steps/s", "ms/step", "kernel share"
    );
    let step = |p: StepPath| match p {
        StepPath::Candle => "candle",
        StepPath::Fused => "fused",
    };
    for r in &report.bench {
        println!(
            "{:<15} {:<8} {:<7} {:>7} {:>14.1} {:>11.3} {:>12}",
            format!("{:?}", r.model),
            r.device,
            step(r.path),
            r.batch,
            r.steps_per_s,
            r.ms_per_step,
            r.fused_share
                .map_or("-".to_string(), |f| format!("{:.1}%", 100.0 * f))
        );
    }
    let note = |model: BenchModel, device: &str, path: StepPath, batch: usize, text: String| {
        println!(
            "{:<15} {:<8} {:<7} {:>7}  {text}",
            format!("{model:?}"),
            device,
            step(path),
            batch
        );
    };
    for s in &report.skipped {
        let text = format!("skipped: {}", s.reason);
        note(s.model, &s.device, s.path, s.batch, text);
    }
    for f in &report.failed {
        let text = format!("FAILED: {}", f.error);
        note(f.model, &f.device, f.path, f.batch, text);
    }
    println!(
        "(step: candle = candle's autograd (vrpo_grads) + AdamW, on every device; fused = tilt's \
         fused CPU step, what learner.fused = true runs, the CPU's best for the MLP; both on a \
         batch already on the device. kernel share: one forward + backward of tilt's \
         segment_log_ratio op at the step's shape, timed alone, candle's glue included, over \
         ms/step)"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn empty_report(budget_s: f64) -> Report {
        Report {
            device: "cpu".into(),
            complete: false,
            passed: true,
            comparisons: Vec::new(),
            bench: Vec::new(),
            skipped: Vec::new(),
            failed: Vec::new(),
            budget_s,
        }
    }

    #[test]
    fn the_bench_skips_what_would_overrun_its_budget_and_writes_after_every_row() {
        let dir = std::env::temp_dir().join(format!("tilt-gpu-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("gpu-check.json");
        let devices = [("cpu".to_string(), Device::Cpu)];
        const HUGE: usize = 4_000_000_000_000;
        // Batch 4 runs (nothing measured yet to predict from); batch 4 * 10^12 would take at
        // least 10^12 times batch 4's wall time (~7 ms here, so ~10^10 s; any machine's is
        // above the 0.6 ns that would fit), over the 600 s budget, so it is skipped for the
        // MLP, on both of the CPU's step paths; the U-Net on the CPU stops at batch 256 by
        // rule, so only its batch 4 runs.
        let mut report = empty_report(600.0);
        run_bench(&mut report, &devices, &[HUGE, 4], 0.0, &out).unwrap();
        let (mlp, unet) = (BenchModel::QuickstartMlp, BenchModel::DigitsUnet);
        let measured: Vec<_> = report
            .bench
            .iter()
            .map(|r| (r.model, r.path, r.batch))
            .collect();
        assert_eq!(
            measured,
            [
                (mlp, StepPath::Fused, 4),
                (mlp, StepPath::Candle, 4),
                (unet, StepPath::Candle, 4)
            ]
        );
        let skipped: Vec<_> = report
            .skipped
            .iter()
            .map(|s| (s.model, s.path, s.batch))
            .collect();
        assert_eq!(
            skipped,
            [(mlp, StepPath::Fused, HUGE), (mlp, StepPath::Candle, HUGE)]
        );
        for s in &report.skipped {
            assert!(s.reason.starts_with("predicted "), "{}", s.reason);
        }
        assert!(report.failed.is_empty());
        // The file holds every row already (run_bench writes after each; `complete` is set
        // by the caller at the end).
        let v: serde_json::Value = crate::files::read_json(&out).unwrap();
        assert_eq!(v["bench"].as_array().unwrap().len(), 3);
        assert_eq!(v["skipped"].as_array().unwrap().len(), 2);
        assert_eq!(v["bench"][0]["path"], "fused");
        assert_eq!(v["complete"], false);

        // A spent budget skips everything and says so.
        let mut report = empty_report(0.0);
        run_bench(&mut report, &devices, &[4], 0.0, &out).unwrap();
        assert!(report.bench.is_empty());
        assert_eq!(report.skipped.len(), 3);
        assert!(report.skipped.iter().all(|s| s.reason.contains("is spent")));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
