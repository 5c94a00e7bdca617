//! A whole run: the run directory, the stages in order, the summary. `tilt run` and `tilt resume`
//! both end here.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::pipeline::{
    read_json, setup, stage_critic, stage_eval, stage_vrpo, write_json, CriticReport, EvalPoint,
    EvalReport, VrpoReport,
};
use crate::progress::Progress;

/// `summary.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub name: String,
    pub algorithm: String,
    pub labels: String,
    pub lambda: f64,
    pub beta: f64,
    pub segment_len: usize,
    pub sampling_steps: usize,
    pub steps: u64,
    pub wall_s: f64,
    pub reward_mean_ref: f64,
    pub reward_mean_policy: f64,
    pub reward_mean_target: f64,
    pub reward_mean_closed_form: Option<f64>,
    pub gap_closed: f64,
    pub mode_weights_ref: Vec<f64>,
    pub mode_weights_policy: Vec<f64>,
    pub mode_weights_target: Vec<f64>,
    pub mode_weights_closed_form: Option<Vec<f64>>,
    pub max_mode_weight_error: f64,
    pub target_ess: f64,
    pub critic: Option<CriticReport>,
    pub throughput: Throughput,
    pub learner_utilisation: f64,
    pub restarts: u64,
    /// The policy evaluated at each listed training length (drift of hard labels shows here).
    pub evals: Vec<EvalPoint>,
    pub stopped_early: bool,
    /// Per-stage latency percentiles (ms), merged across actors.
    pub latency: std::collections::BTreeMap<String, tilt_actors::telemetry::LatencySummary>,
}

/// Throughput of the VRPO stage.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Throughput {
    pub pairs_per_s: f64,
    pub learner_steps_per_s: f64,
}

/// Run CPU-heavy tensor work without stalling the async executor: on a multi-thread runtime the
/// current worker hands its other tasks (the metrics endpoint, heartbeats) to the other workers
/// first (`block_in_place`); on a current-thread runtime, or outside one, the work just runs.
pub fn off_executor<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Create a fresh run directory; refuse one that already holds a run.
pub fn prepare_run_dir(out: &Path, cfg: &Config) -> Result<()> {
    if out.join("config.toml").exists() {
        bail!(
            "run directory {} already holds a run: use `tilt resume {}` or another --out",
            out.display(),
            out.display()
        );
    }
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create run directory {}", out.display()))?;
    let tmp = out.join("config.toml.tmp");
    std::fs::write(&tmp, cfg.to_toml()?)?;
    std::fs::rename(&tmp, out.join("config.toml"))?;
    Ok(())
}

/// Run the configured stages in `run_dir` (fresh or resumed) and write `summary.json`.
pub async fn execute(cfg: &Config, run_dir: &Path) -> Result<Option<Summary>> {
    let t0 = Instant::now();
    use std::io::IsTerminal;
    let progress = Progress {
        log: Some(run_dir.join("progress.log")),
        every: Duration::from_secs_f64(cfg.metrics.progress_every_s),
        interactive: std::io::stderr().is_terminal(),
    };
    progress.line(&format!("tilt: run {} in {}", cfg.name, run_dir.display()));
    if let Some(addr) = crate::telemetry::start_metrics(&cfg.metrics.listen)? {
        progress.line(&format!("tilt: metrics at http://{addr}/metrics"));
    }
    if cfg.algorithm == "dfdpo" {
        crate::dfdpo::execute(cfg, run_dir, &progress).await?;
        return Ok(None);
    }
    let s = setup(cfg)?;
    // Connect the replay first: a Redis that is down fails the run before any work is done. A run
    // id unique to this invocation namespaces the Redis keys (removed at the end).
    let replay = if cfg.stages.iter().any(|x| x == "vrpo") {
        let run_id = format!(
            "{}-{}-{}",
            cfg.name,
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0)
        );
        Some(crate::pipeline::make_replay(cfg, &run_id, "learner-0").await?)
    } else {
        None
    };
    let has = |st: &str| cfg.stages.iter().any(|x| x == st);
    let mut critic: Option<CriticReport> = None;
    if has("critic") && cfg.critic.kind == "learned" {
        let done = run_dir.join("critic.json");
        critic = Some(
            if done.exists() && run_dir.join("critic.safetensors").exists() {
                progress.line("[critic] already trained in this run directory: reusing it");
                read_json(&done)?
            } else {
                // Tensor work off the async executor's worker.
                off_executor(|| stage_critic(cfg, &s, run_dir))?
            },
        );
    }
    let mut vrpo = VrpoReport::default();
    if has("vrpo") {
        let replay = replay
            .clone()
            .expect("created above when the vrpo stage is listed");
        let res = stage_vrpo(
            cfg,
            &s,
            run_dir,
            &progress,
            crate::pipeline::Roles::all(cfg, replay.clone()),
        )
        .await;
        if let Err(e) = replay.purge().await {
            progress.line(&format!(
                "tilt: warning: could not remove the run's Redis keys: {e}"
            ));
        }
        vrpo = res?;
        write_json(&run_dir.join("vrpo.json"), &vrpo)?;
        if vrpo.stopped_early {
            progress.line(&format!(
                "tilt: stopped at step {} of {}; continue with `tilt resume {}`",
                vrpo.steps,
                cfg.vrpo.steps,
                run_dir.display()
            ));
            return Ok(None);
        }
    }
    if !has("eval") {
        return Ok(None);
    }
    off_executor(|| finish(cfg, &s, run_dir, critic, &vrpo, t0, &progress)).map(Some)
}

/// Evaluate, write summary.json, print latencies and draw the plots.
pub fn finish(
    cfg: &Config,
    s: &crate::pipeline::Setup,
    run_dir: &Path,
    critic: Option<CriticReport>,
    vrpo: &VrpoReport,
    t0: Instant,
    progress: &Progress,
) -> Result<Summary> {
    let ev: EvalReport = stage_eval(cfg, s, run_dir)?;
    write_json(&run_dir.join("eval.json"), &ev)?;
    let last = ev.points.last().cloned();
    let Some(last) = last else {
        bail!(
            "eval: no checkpoint to evaluate in {} (run the \"vrpo\" stage first)",
            run_dir.display()
        );
    };
    let max_err = last
        .mode_weights_policy
        .iter()
        .zip(&ev.mode_weights_target)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    let summary = Summary {
        name: cfg.name.clone(),
        algorithm: "vrpo".into(),
        labels: format!("{:?}", cfg.vrpo.labels).to_lowercase(),
        lambda: cfg.vrpo.lambda,
        beta: cfg.vrpo.beta,
        segment_len: cfg.vrpo.segment_len,
        sampling_steps: cfg.sampling.steps,
        steps: last.step,
        wall_s: t0.elapsed().as_secs_f64(),
        reward_mean_ref: ev.reward_mean_ref,
        reward_mean_policy: last.reward_mean_policy,
        reward_mean_target: ev.reward_mean_target,
        reward_mean_closed_form: ev.reward_mean_closed_form,
        gap_closed: last.gap_closed,
        mode_weights_ref: ev.mode_weights_ref.clone(),
        mode_weights_policy: last.mode_weights_policy.clone(),
        mode_weights_target: ev.mode_weights_target.clone(),
        mode_weights_closed_form: ev.mode_weights_closed_form.clone(),
        max_mode_weight_error: max_err,
        target_ess: ev.target_ess,
        critic: critic.or_else(|| read_json(&run_dir.join("critic.json")).ok()),
        throughput: Throughput {
            pairs_per_s: vrpo.pairs_per_s,
            learner_steps_per_s: vrpo.learner_steps_per_s,
        },
        learner_utilisation: vrpo.learner_utilisation,
        restarts: vrpo.restarts,
        evals: ev.points.clone(),
        stopped_early: false,
        latency: vrpo.latency.clone(),
    };
    for (stage, l) in &summary.latency {
        progress.line(&format!(
            "latency {stage:<16} n={:<7} p50 {:>9.3} ms  p90 {:>9.3} ms  p99 {:>9.3} ms  max {:>9.3} ms",
            l.count, l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms
        ));
    }
    write_json(&run_dir.join("summary.json"), &summary)?;
    match crate::report::render_plots(run_dir) {
        Ok(files) => progress.line(&format!(
            "tilt: {} plots in {}",
            files.len(),
            run_dir.display()
        )),
        Err(e) => progress.line(&format!("tilt: warning: plots failed: {e:#}")),
    }
    progress.line(&format!(
        "tilt: done in {:.0}s: reward {:.4} (reference {:.4}, target {:.4}), gap closed {:.3}, max mode-weight error {:.3}; {}",
        summary.wall_s,
        summary.reward_mean_policy,
        summary.reward_mean_ref,
        summary.reward_mean_target,
        summary.gap_closed,
        summary.max_mode_weight_error,
        run_dir.join("summary.json").display()
    ));
    Ok(summary)
}

/// The default run directory for a config: runs/<name>.
pub fn default_out(cfg: &Config) -> PathBuf {
    PathBuf::from("runs").join(&cfg.name)
}

#[cfg(test)]
mod tests {
    use super::off_executor;

    /// `block_in_place` alone panics on a current-thread runtime (the default of `#[tokio::test]`);
    /// `off_executor` must run the closure on every kind of runtime and outside one.
    #[test]
    fn off_executor_runs_on_every_runtime_flavor() {
        assert_eq!(off_executor(|| 1 + 1), 2);
        let ct = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_eq!(ct.block_on(async { off_executor(|| 3) }), 3);
        let mt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        let on_worker = mt.block_on(async {
            tokio::spawn(async { off_executor(|| std::thread::current().id()) })
                .await
                .unwrap()
        });
        assert_ne!(on_worker, std::thread::current().id());
    }
}
