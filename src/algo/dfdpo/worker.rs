//! DF-DPO in worker mode: distortion workers and one learner worker meet only through Redis and
//! a shared run directory. Each continuation (sft, dfdpo, the ablations, in `variants` order) has
//! a stream of its own, `<run-id>-<name>`. The distortion workers fill the stream of the
//! continuation the learner is on, with that continuation's curriculum. The learner pretrains the
//! reference (when the run directory has none), trains each continuation from its stream, marks it
//! done (`tilt:<run-id>-<name>:done`, which moves the distortion workers on to the next one), then
//! evaluates, writes summary.json and marks the run done. A learner stopped by a signal pauses the
//! run (nothing is marked: the producers wait, held back by the replay's capacity) and
//! `tilt worker --role learner` resumes it from the newest checkpoint of the continuation it was
//! on. Each process start has its own producer ids and randomness (`crate::worker::WorkerCtx`), so
//! a killed worker can simply be started again.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Tensor, Var};
use tilt_actors::objective::{Objective, StepStats};
use tilt_actors::replay::redis::{mark_run_done, watch_run_done, RedisReplay};
use tilt_actors::replay::{Record, ReplayBuffer};
use tilt_kernels::denoiser::Denoiser;
use tilt_kernels::distort::Curriculum;

use super::{
    clip_spec, continuation, distortion_source, evaluate, prepare, real_clips, report_file,
    variants,
};
use crate::algo::{has_stage, RunCtx, WorkerRole};
use crate::config::Config;
use crate::files::read_json;
use crate::progress::Progress;
use crate::train::{off_executor, train, TrainReport, Training};
use crate::worker::WorkerCtx;

/// Run one DF-DPO role of run `run_id` (the process, run directory and metrics are set up by
/// `crate::worker`).
pub async fn run_worker(run: &RunCtx<'_>, role: WorkerRole, run_id: &str) -> Result<()> {
    let worker = run
        .worker
        .context("DF-DPO's worker roles run under `tilt worker`")?;
    match role {
        WorkerRole::Rollout | WorkerRole::Critic => bail!(
            "--role {}: DF-DPO's roles are distortion and learner (rollout and critic are VRPO's)",
            role.name()
        ),
        WorkerRole::Distortion => distortion(run, worker, run_id).await,
        WorkerRole::Learner => learner(run, worker, run_id).await,
    }
}

/// The stream (and run id of the done mark) of continuation `name`.
fn stream_id(run_id: &str, name: &str) -> String {
    format!("{run_id}-{name}")
}

/// Whether continuation `name` reached its step budget: its report is in the shared run directory
/// (the done mark expires; the report does not).
fn finished(cfg: &Config, run_dir: &Path, name: &str) -> bool {
    read_json::<TrainReport>(&report_file(&run_dir.join(name)))
        .is_ok_and(|r| r.steps >= cfg.dfdpo.steps)
}

/// A distortion worker: for each continuation the learner has not finished, produce (real,
/// edited) pairs into its stream until the learner marks it done; a signal ends the process.
async fn distortion(run: &RunCtx<'_>, worker: &WorkerCtx, run_id: &str) -> Result<()> {
    let (cfg, run_dir, progress) = (run.cfg, run.run_dir, run.progress);
    let consumer = worker.consumer();
    let url = cfg.redis_target();
    let spec = clip_spec(cfg)?;
    let clips = Arc::new(real_clips(cfg, &spec)?);
    progress.line(&format!(
        "[data] {} real clips {:?}",
        clips.dim(0)?,
        clips.dims()
    ));
    let signalled = Arc::new(AtomicBool::new(false));
    let watch = signalled.clone();
    let signal_watch = tokio::spawn(async move {
        crate::signals::shutdown_signal().await;
        watch.store(true, Ordering::SeqCst);
    });
    for (name, curriculum) in variants(cfg)? {
        if finished(cfg, run_dir, name) {
            progress.line(&format!("[{name}] trained already"));
            continue;
        }
        let id = stream_id(run_id, name);
        let replay: Arc<dyn ReplayBuffer> =
            Arc::new(RedisReplay::connect(&url, &id, consumer, cfg.replay.clone()).await?);
        // The learner's done mark of this continuation stops the producers; whether it fired
        // tells a finished continuation from a signal.
        let marked = Arc::new(AtomicBool::new(false));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let (mark, seen) = (watch_run_done(url.clone(), id.clone()), marked.clone());
        let forward = tokio::spawn(async move {
            if mark.await.is_ok() {
                seen.store(true, Ordering::SeqCst);
                let _ = stop_tx.send(());
            }
        });
        let t = producers(
            cfg,
            name,
            &run_dir.join(name),
            worker,
            &clips,
            curriculum,
            replay.clone(),
            stop_rx,
        );
        progress.line(&format!("[{name}] producing pairs into stream {id}"));
        let res = train(t, progress).await;
        forward.abort();
        replay.close();
        res?;
        if signalled.load(Ordering::SeqCst) || !marked.load(Ordering::SeqCst) {
            progress.line(&format!(
                "tilt worker: the distortion worker stopped during {name} (signal); start it again to continue"
            ));
            signal_watch.abort();
            return Ok(());
        }
        progress.line(&format!("[{name}] the learner finished it"));
    }
    signal_watch.abort();
    progress.line("tilt worker: every continuation is trained; the distortion worker exits");
    Ok(())
}

/// A producer-only `Training` for continuation `name`: this process's distortion actors (own
/// producer ids and randomness), no learner, stopped by `stop`.
#[allow(clippy::too_many_arguments)]
fn producers(
    cfg: &Config,
    name: &str,
    dir: &Path,
    worker: &WorkerCtx,
    clips: &Arc<Tensor>,
    curriculum: Option<Curriculum>,
    replay: Arc<dyn ReplayBuffer>,
    stop: tokio::sync::oneshot::Receiver<()>,
) -> Training {
    Training {
        name: name.to_string(),
        dir: dir.to_path_buf(),
        report_file: dir.join("producers.json"),
        steps: cfg.dfdpo.steps,
        batch: cfg.dfdpo.batch,
        devices: vec![],
        build: Box::new(|_| Err(anyhow!("a distortion worker builds no model"))),
        init: None,
        objective: Arc::new(NoLearner),
        sources: worker.sources(vec![distortion_source(cfg, clips, &curriculum)]),
        replay,
        checkpoint_every: 0,
        at_steps: vec![],
        extra_file: None,
        seed: cfg.seed,
        fail_at_step: 0,
        nan_at_step: 0,
        resume_ledger: false,
        sync: false,
        // No learner here: nothing to keep apart.
        cpu: tilt_actors::cpu::CpuPlan::unpinned(),
        stop: Some(stop),
    }
}

/// The objective of a producer-only process: it has no learner replicas, so nothing calls it; a
/// call is an error, never a silent zero gradient.
struct NoLearner;

impl Objective for NoLearner {
    fn grads(
        &self,
        _model: &dyn Denoiser,
        _vars: &[(String, Var)],
        _records: &[Record],
        _step: u64,
        _replica: usize,
    ) -> tilt_actors::Result<(Vec<Option<Tensor>>, StepStats)> {
        Err(tilt_actors::ActorError::Actor {
            role: "distortion".into(),
            detail: "a distortion worker has no learner".into(),
        })
    }
}

/// The learner worker: the reference (pretrained here if the run directory has none), every
/// continuation from its stream, the evaluation and the summary.
async fn learner(run: &RunCtx<'_>, worker: &WorkerCtx, run_id: &str) -> Result<()> {
    let (cfg, run_dir, progress) = (run.cfg, run.run_dir, run.progress);
    let t0 = Instant::now();
    let consumer = worker.consumer();
    let url = cfg.redis_target();
    let (sh, spec) = prepare(cfg, run_dir, progress)?;
    let mut training = BTreeMap::new();
    for (name, curriculum) in variants(cfg)? {
        let id = stream_id(run_id, name);
        let replay: Arc<dyn ReplayBuffer> =
            Arc::new(RedisReplay::connect(&url, &id, consumer, cfg.replay.clone()).await?);
        let mut t = continuation(cfg, &sh, name, curriculum, &run_dir.join(name), replay)?;
        // The distortion workers produce; the stream outlives this process, so a restarted
        // learner continues its ledger.
        t.sources = vec![];
        t.resume_ledger = true;
        let rep = train(t, progress).await?;
        if rep.stopped_early {
            pause(progress, name, rep.steps, cfg.dfdpo.steps);
            return Ok(());
        }
        mark_run_done(&url, &id).await?;
        training.insert(name.to_string(), rep);
    }
    mark_run_done(&url, run_id).await?;
    let restarts = worker.run_restarts().await?;
    progress.line(&format!(
        "tilt worker: restarts in this run: processes {:?}, actors {:?}",
        restarts.processes, restarts.actors
    ));
    if has_stage(cfg, "eval") {
        off_executor(|| {
            evaluate(
                cfg,
                &sh,
                &spec,
                run_dir,
                training,
                restarts.total(),
                t0,
                progress,
            )
        })?;
        println!("{}", run_dir.join("summary.json").display());
    }
    Ok(())
}

/// Say that the learner paused (a signal) and how to resume.
fn pause(progress: &Progress, name: &str, step: u64, total: u64) {
    progress.line(&format!(
        "tilt worker: the learner paused in {name} at step {step} of {total} (checkpointed); the run is not done and its distortion workers keep running: resume with `tilt worker --role learner`"
    ));
}
