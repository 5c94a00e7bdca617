//! The learners of every algorithm, wired once: build the replicas (from the newest checkpoint, an
//! initial weights file, or fresh), hand them with the algorithm's producers (`PairSource`s) and
//! `Objective` to the coordinator, run until the step budget, a signal or a failure, and report.
//! An algorithm says *what* trains (`Training`); this module says *how*.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::Device;
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};
use tilt_actors::accounting::{settle, Accounting, Ledger};
use tilt_actors::checkpoint::{latest_checkpoint, load_checkpoint, load_ledger};
use tilt_actors::control::RunControl;
use tilt_actors::coordinator::{CoordinatorActor, CoordinatorMsg, RunOutcome, RunSpec};
use tilt_actors::learner::{CheckpointSpec, LearnerArgs, LearnerCore};
use tilt_actors::objective::Objective;
use tilt_actors::replay::ReplayBuffer;
use tilt_actors::source::PairSource;
use tilt_actors::telemetry::LatencySummary;
use tilt_kernels::denoiser::{load_weights, Denoiser};
use tilt_kernels::optim::{named_vars, AdamW, AdamWConfig};

use crate::files::{read_json, write_json};
use crate::progress::Progress;

/// A trainable model: its variables, the network, and an optimiser over the variables sorted by
/// name (replicas must agree on the order).
pub struct Trainable {
    pub varmap: VarMap,
    pub model: Arc<dyn Denoiser>,
    pub opt: AdamW,
}

impl Trainable {
    /// Wrap a freshly built model whose variables live in `varmap`.
    pub fn new(varmap: VarMap, model: Arc<dyn Denoiser>, opt: AdamWConfig) -> Result<Self> {
        let opt = AdamW::new(named_vars(&varmap)?, opt)?;
        Ok(Self { varmap, model, opt })
    }

    /// Copy every variable's value from `other` (same architecture).
    fn copy_from(&self, other: &Trainable) -> Result<()> {
        let src = other
            .varmap
            .data()
            .lock()
            .map_err(|_| anyhow!("varmap lock poisoned"))?;
        for (name, var) in self
            .varmap
            .data()
            .lock()
            .map_err(|_| anyhow!("varmap lock poisoned"))?
            .iter()
        {
            let v0 = src
                .get(name)
                .ok_or_else(|| anyhow!("replica variable {name} missing in replica 0"))?;
            // Replicas on other devices (`learner.devices`) get a copy on theirs.
            var.set(&v0.as_tensor().to_device(var.device())?)?;
        }
        Ok(())
    }
}

/// Builds one learner replica (model and optimiser) on a device.
pub type BuildReplica = Box<dyn Fn(&Device) -> Result<Trainable> + Send + Sync>;

/// One training through the actors, as an algorithm describes it.
pub struct Training {
    /// Its name in progress lines ("vrpo", "sft", "dfdpo", "temporal_only", ...).
    pub name: String,
    /// Checkpoints, `history.json` and the report file live here.
    pub dir: PathBuf,
    /// The report (`TrainReport`) is written here; a finished training reads it back.
    pub report_file: PathBuf,
    /// The learner step budget.
    pub steps: u64,
    /// Pairs per replica per step.
    pub batch: usize,
    /// One device per learner replica in this process (none: a producer-only process).
    pub devices: Vec<Device>,
    /// Builds one replica's model and optimiser on a device.
    pub build: BuildReplica,
    /// Weights every replica starts from when there is no checkpoint yet (None: as built).
    pub init: Option<PathBuf>,
    pub objective: Arc<dyn Objective>,
    pub sources: Vec<Arc<dyn PairSource>>,
    pub replay: Arc<dyn ReplayBuffer>,
    /// Checkpoint every this many steps (0: only at the end and at `at_steps`).
    pub checkpoint_every: u64,
    pub at_steps: Vec<u64>,
    /// A file copied into every checkpoint (VRPO: the critic's weights).
    pub extra_file: Option<PathBuf>,
    pub seed: u64,
    /// Test hook: the learner fails at this step (0: never).
    pub fail_at_step: u64,
    /// Test hook: the learner's gradients are NaN at this step (0: never).
    pub nan_at_step: u64,
    /// `runtime = "sync"`: producers make a unit only when the learner asks (no overlap).
    pub sync: bool,
    /// Which cores the learners' and the producers' compute runs on (`pin_cores`).
    pub cpu: tilt_actors::cpu::CpuPlan,
    /// Fires when a producer-only process should stop (worker mode: the learner finished).
    pub stop: Option<tokio::sync::oneshot::Receiver<()>>,
    /// Continue the learner's ledger from the newest checkpoint (worker mode, where the replay
    /// and its producer ids outlive a learner process). A single-process run's replay and
    /// producer ids start afresh with each invocation, so its ledger does too.
    pub resume_ledger: bool,
}

/// What a training reports (`vrpo.json`, `<variant>/training.json`, the summaries).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct TrainReport {
    pub steps: u64,
    pub resumed_from: u64,
    pub wall_s: f64,
    pub pairs_per_s: f64,
    pub learner_steps_per_s: f64,
    pub learner_utilisation: f64,
    pub restarts: u64,
    pub final_loss: f32,
    /// VRPO: share of pairs ordered like the critic; DF-DPO: implicit accuracy (0 for SFT).
    pub final_accuracy: f32,
    /// VRPO: mean |V(a) - V(b)| of the last batch (the soft labels' logit size); absent for
    /// losses without critic labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_label_strength: Option<f32>,
    pub final_checkpoint: String,
    pub stopped_early: bool,
    /// Per-stage latency percentiles, merged across actors (this invocation).
    pub latency: BTreeMap<String, LatencySummary>,
    /// Every record of this invocation's replay accounted for (README, "Exact accounting");
    /// None for a producer-only process, or if the replay could not be read at the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accounting: Option<Accounting>,
}

pub use tilt_actors::cpu::off_executor;

/// Build the replicas: all equal, resumed from the newest checkpoint in `t.dir` when there is
/// one, else from `t.init`, else replica 0's fresh weights. Returns the replicas and the step.
fn replicas(t: &Training) -> Result<(Vec<Trainable>, u64)> {
    let mut out: Vec<Trainable> = Vec::with_capacity(t.devices.len());
    let latest = latest_checkpoint(&t.dir)?;
    let mut start = 0;
    for (rank, device) in t.devices.iter().enumerate() {
        let mut r = (t.build)(device)?;
        if let Some(init) = &t.init {
            load_weights(&mut r.varmap, init)
                .with_context(|| format!("initial weights {}", init.display()))?;
        }
        if let Some((step, dir)) = &latest {
            let st = load_checkpoint(dir, &mut r.varmap, &mut r.opt)
                .with_context(|| format!("resuming from {}", dir.display()))?;
            start = st.step;
            if rank == 0 {
                eprintln!(
                    "[{}] resuming from checkpoint step {step} ({})",
                    t.name,
                    dir.display()
                );
            }
        } else if rank > 0 {
            r.copy_from(&out[0])?;
        }
        out.push(r);
    }
    Ok((out, start))
}

/// Run one training to its budget (or a signal, or a learner failure) and report it. A training
/// already at its budget is not run again: its recorded report is returned.
pub async fn train(mut t: Training, progress: &Progress) -> Result<TrainReport> {
    std::fs::create_dir_all(&t.dir)
        .with_context(|| format!("cannot create {}", t.dir.display()))?;
    let (cores, start) = replicas(&t)?;
    let learners = !t.devices.is_empty();
    if learners && start >= t.steps {
        progress.line(&format!(
            "[{}] already trained ({start} steps >= {})",
            t.name, t.steps
        ));
        // Keep what the training run recorded (throughput, latencies); the budget is reached.
        let recorded: TrainReport = read_json(&t.report_file).unwrap_or_default();
        return Ok(TrainReport {
            steps: start,
            resumed_from: start,
            stopped_early: false,
            ..recorded
        });
    }
    let control = Arc::new(
        if t.sync {
            RunControl::synchronous()
        } else {
            RunControl::default()
        }
        .with_cpu(t.cpu.clone()),
    );
    if t.cpu.pinned() {
        progress.line(&format!("[{}] pin_cores: {}", t.name, t.cpu));
    }
    control
        .learner_step
        .store(start, std::sync::atomic::Ordering::Relaxed);
    if learners {
        let ledger = initial_ledger(&t)?;
        if let Ok(mut l) = control.ledger.lock() {
            *l = ledger;
        }
    }
    let ck = CheckpointSpec {
        run_dir: t.dir.clone(),
        every: t.checkpoint_every,
        at_steps: t.at_steps.clone(),
        seed: t.seed,
        critic_file: t.extra_file.clone(),
    };
    let world = cores.len();
    let learner_args = cores
        .into_iter()
        .enumerate()
        .map(|(rank, c)| LearnerArgs {
            rank,
            world,
            core: Arc::new(Mutex::new(LearnerCore {
                varmap: c.varmap,
                residual: c.model,
                opt: c.opt,
                step: start,
            })),
            replay: t.replay.clone(),
            objective: t.objective.clone(),
            batch: t.batch,
            total_steps: t.steps,
            checkpoint: ck.clone(),
            control: control.clone(),
            on_done: None,
            fail_at_step: t.fail_at_step,
            nan_at_step: t.nan_at_step,
        })
        .collect();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spec = RunSpec {
        // A resumed run draws fresh producer randomness.
        seed: t.seed.wrapping_add(start.wrapping_mul(0x9E37)),
        learners: learner_args,
        sources: std::mem::take(&mut t.sources),
        replay: t.replay.clone(),
        control: control.clone(),
        done: Arc::new(Mutex::new(Some(tx))),
    };
    let total = if learners { t.steps } else { 0 };
    // Pairs/s from the replay's own insert counter: in worker mode the producers are other
    // processes, and the Redis backend counts their inserts server-side.
    let inserted0 = t.replay.stats().inserted;
    let t0 = Instant::now();
    let outcome = run_actors(spec, rx, t.stop.take(), progress, &t.name, start, total).await?;
    let wall = t0.elapsed().as_secs_f64();
    let steps = RunControl::get(&control.learner_step);
    let last = control.last();
    let mut report = TrainReport {
        steps,
        resumed_from: start,
        wall_s: wall,
        pairs_per_s: t.replay.stats().inserted.saturating_sub(inserted0) as f64 / wall,
        learner_steps_per_s: (steps - start) as f64 / wall,
        learner_utilisation: RunControl::get(&control.learner_busy_us) as f64 / 1e6 / wall,
        restarts: RunControl::get(&control.restarts),
        final_loss: last.loss,
        final_accuracy: last.accuracy,
        final_label_strength: last.label_strength,
        final_checkpoint: String::new(),
        stopped_early: learners && steps < t.steps,
        latency: control.latency.summary(),
        accounting: None,
    };
    if !learners {
        if let RunOutcome::LearnerFailed(m) = outcome {
            bail!("{m}");
        }
        progress.line(&format!("[{}] producers stopped", t.name));
        return Ok(report);
    }
    append_history(&t.dir, start, &control)?;
    report.accounting = account(&t, &control, progress).await;
    match outcome {
        RunOutcome::Finished { step, checkpoint } => {
            let strength = last
                .label_strength
                .map(|v| format!(", |dV| {v:.4}"))
                .unwrap_or_default();
            progress.line(&format!(
                "[{}] finished at step {step}: loss {:.4}, accuracy {:.3}{strength}; checkpoint {}",
                t.name,
                last.loss,
                last.accuracy,
                checkpoint.display()
            ));
            report.final_checkpoint = checkpoint.display().to_string();
        }
        RunOutcome::LearnerFailed(m) => bail!("{m}"),
    }
    write_json(&t.report_file, &report)?;
    Ok(report)
}

/// The learner's ledger at the start: the newest checkpoint's in worker mode (`resume_ledger`),
/// else empty; its quota is the replay's uses per record.
fn initial_ledger(t: &Training) -> Result<Ledger> {
    let quota = t.replay.uses_per_record();
    let saved = match latest_checkpoint(&t.dir)? {
        Some((_, dir)) if t.resume_ledger => load_ledger(&dir)?,
        _ => None,
    };
    Ok(match saved {
        Some(l) => Ledger { quota, ..l },
        None => Ledger::new(quota),
    })
}

/// Settle the accounting of the replay's records (the learner's ledger against the replay's
/// census), export it as metrics and say it in one line. An unreadable replay is said, not fatal.
async fn account(t: &Training, control: &RunControl, progress: &Progress) -> Option<Accounting> {
    let census = match t.replay.census().await {
        Ok(c) => c,
        Err(e) => {
            progress.line(&format!(
                "[{}] warning: no record accounting (the replay could not be read: {e})",
                t.name
            ));
            return None;
        }
    };
    let a = {
        let ledger = control.ledger.lock().ok()?;
        settle(&ledger, &census)
    };
    a.export_metrics();
    progress.line(&format!(
        "[{}] records: produced {}, inserted {}, applied {} ({} uses), redelivered {}, deduplicated {}, dropped {:?}, lost {}, in flight {}{}",
        t.name,
        a.produced,
        a.inserted,
        a.applied,
        a.applications,
        a.redelivered,
        a.deduplicated,
        a.dropped,
        a.lost,
        a.in_flight,
        if a.balances() { "" } else { " (DOES NOT BALANCE)" }
    ));
    Some(a)
}

/// Loss curves: append this invocation's (step, loss, accuracy) to `dir/history.json`, dropping
/// what a resumed run recomputes.
fn append_history(dir: &Path, start: u64, control: &RunControl) -> Result<()> {
    let file = dir.join("history.json");
    let mut hist: Vec<(u64, f32, f32)> = if file.exists() {
        read_json(&file)?
    } else {
        vec![]
    };
    hist.retain(|h| h.0 <= start);
    hist.extend(
        control
            .history
            .lock()
            .map(|h| h.clone())
            .unwrap_or_default(),
    );
    write_json(&file, &hist)
}

/// Spawn the coordinator (which spawns every role) and wait for the run's outcome, forwarding
/// SIGINT/SIGTERM and an optional external stop as a graceful shutdown; progress meanwhile.
pub async fn run_actors(
    spec: RunSpec,
    mut rx: tokio::sync::oneshot::Receiver<RunOutcome>,
    mut external: Option<tokio::sync::oneshot::Receiver<()>>,
    progress: &Progress,
    stage: &str,
    start_step: u64,
    total: u64,
) -> Result<RunOutcome> {
    let (control, replay) = (spec.control.clone(), spec.replay.clone());
    let (coord, handle) = ractor::Actor::spawn(None, CoordinatorActor, spec)
        .await
        .map_err(|e| anyhow!("cannot start the actors: {e}"))?;
    let ticker = progress.spawn_stage(control, replay, start_step, total, stage.to_string());
    let outcome = loop {
        tokio::select! {
            r = &mut rx => break r.map_err(|_| anyhow!("the coordinator stopped without reporting an outcome"))?,
            _ = crate::signals::shutdown_signal() => {
                let _ = coord.cast(CoordinatorMsg::Shutdown("signal received".into()));
            }
            _ = async { match external.as_mut() { Some(r) => { let _ = r.await; } None => std::future::pending::<()>().await } } => {
                external = None;
                let _ = coord.cast(CoordinatorMsg::Shutdown("the run's learner has finished".into()));
            }
        }
    };
    ticker.abort();
    let _ = handle.await;
    Ok(outcome)
}
