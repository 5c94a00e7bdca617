//! VRPO in worker mode: one role per process, meeting the others only through Redis and a shared
//! run directory. Rollout workers push unscored segment pairs into the `<run-id>-segments` stream;
//! critic workers (which also train the critic, stage 1, if the run directory has none) score them
//! into the `<run-id>` replay stream; the learner worker trains, evaluates, writes summary.json and
//! sets `tilt:<run-id>:done`, which stops the producers (only at the step budget: a learner
//! stopped by a signal pauses the run, and `tilt worker --role learner` resumes it). Each process start has its own producer
//! ids and randomness (`crate::worker::WorkerCtx`), so a killed worker can simply be started again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tilt_actors::codec::{record_segment_pair, segment_pair_record};
use tilt_actors::replay::redis::{mark_run_done, watch_run_done, RedisReplay};
use tilt_actors::replay::{ReplayBackend, ReplayBuffer, ReplayConfig, Sampler};
use tilt_kernels::vrpo::SegmentPair;

use super::{ensure_critic, eval, setup, training, Roles};
use crate::algo::{RunCtx, WorkerRole};
use crate::config::Config;
use crate::files::read_json;
use crate::train::{off_executor, train};

/// The segments stream: each unscored pair batch delivered once, bounded by back-pressure.
fn segments_config(cfg: &Config) -> ReplayConfig {
    ReplayConfig {
        backend: ReplayBackend::Redis,
        capacity: 64,
        min_size: 1,
        samples_per_insert: 0.0,
        error_buffer: 64.0,
        sampler: Sampler::Fifo,
        max_times_sampled: 0,
        seed: crate::build::replay_seed(cfg),
        ..cfg.replay.clone()
    }
}

/// Run a producer worker's training next to its bridge to the segments stream. The bridge ending
/// early with an error (Redis gone for longer than `max_outage`, a script refused) fails the
/// worker with that error, so it exits non-zero and can be restarted, instead of living on with
/// producers that no longer reach the stream; a bridge that ended cleanly (the run is closing)
/// lets the training finish. The bridge is stopped once the training has returned.
async fn alongside(
    run: impl std::future::Future<Output = Result<crate::train::TrainReport>>,
    mut bridge: tokio::task::JoinHandle<tilt_actors::Result<()>>,
    role: &str,
    direction: &str,
) -> Result<()> {
    tokio::pin!(run);
    let ended = tokio::select! {
        r = &mut run => {
            bridge.abort();
            return r.map(|_| ());
        }
        b = &mut bridge => b,
    };
    match ended {
        Ok(Ok(())) => run.await.map(|_| ()),
        Ok(Err(e)) => {
            bail!("{role} worker: its bridge {direction} the segments stream failed: {e}")
        }
        Err(e) => bail!("{role} worker: its bridge {direction} the segments stream stopped: {e}"),
    }
}

/// Run one VRPO role of run `run_id` (the process, run directory and metrics are set up by
/// `crate::worker`).
pub async fn run_worker(run: &RunCtx<'_>, role: WorkerRole, run_id: &str) -> Result<()> {
    let (cfg, run_dir, progress) = (run.cfg, run.run_dir, run.progress);
    let worker = run
        .worker
        .context("VRPO's worker roles run under `tilt worker`")?;
    let consumer = worker.consumer();
    let url = cfg.redis_target();
    let s = setup(cfg, run_dir)?;
    let seg_id = format!("{run_id}-segments");
    match role {
        WorkerRole::Distortion => bail!(
            "--role distortion is DF-DPO's producer (algorithm = \"dfdpo\"); VRPO's roles are rollout, critic and learner"
        ),
        WorkerRole::Rollout => {
            let segments: Arc<dyn ReplayBuffer> = Arc::new(
                RedisReplay::connect(&url, &seg_id, consumer, segments_config(cfg)).await?,
            );
            let (tx, rx) = flume::bounded::<Vec<SegmentPair>>(cfg.rollout.channel.max(1));
            // Bridge: in-process channel -> segments stream.
            let seg = segments.clone();
            // This process start's own producer id: a restarted rollout worker never repeats
            // the keys of the one it replaces.
            let producer = worker.producer_base();
            let bridge = tokio::spawn(async move {
                let mut seq = 0u64;
                while let Ok(unit) = rx.recv_async().await {
                    let mut recs = Vec::with_capacity(unit.len());
                    for pair in &unit {
                        recs.push(segment_pair_record(pair, producer, seq)?);
                        seq += 1;
                    }
                    // The unit in one batch (an admission script and one MULTI/EXEC), not a
                    // round trip per pair: record by record the stream takes ~8 k records/s.
                    match seg.insert_many(recs).await {
                        Ok(()) => {}
                        // The run is ending: the segments stream was closed.
                        Err(tilt_actors::ActorError::Closed) => return Ok(()),
                        Err(e) => return Err(e),
                    }
                }
                Ok::<(), tilt_actors::ActorError>(())
            });
            let roles = Roles {
                rollouts: Some((cfg.rollout.actors, tx)),
                critics: None,
                learners: false,
                replay: segments.clone(),
                stop: Some(watch_run_done(url.clone(), run_id.to_string())),
            };
            let mut t = training(cfg, &s, run_dir, roles, progress)?;
            t.sources = worker.sources(std::mem::take(&mut t.sources));
            alongside(train(t, progress), bridge, "rollout", "into").await?;
            segments.close();
        }
        WorkerRole::Critic => {
            ensure_critic(cfg, &s, run_dir, progress)?;
            let segments: Arc<dyn ReplayBuffer> = Arc::new(
                RedisReplay::connect(&url, &seg_id, consumer, segments_config(cfg)).await?,
            );
            let replay: Arc<dyn ReplayBuffer> =
                Arc::new(RedisReplay::connect(&url, run_id, consumer, cfg.replay.clone()).await?);
            let (tx, rx) = flume::bounded(cfg.rollout.channel.max(1));
            // Bridge: segments stream -> in-process channel (acked once handed to the critics; a
            // critic process that dies loses at most the channel's few units of i.i.d. reference
            // draws, which the rollouts keep producing).
            let seg = segments.clone();
            let btx = tx.clone();
            let device = s.critic_device.clone();
            let bridge = tokio::spawn(async move {
                loop {
                    let recs = match seg.sample(8, Duration::from_millis(250)).await {
                        Ok(Some(r)) => r,
                        Ok(None) => continue,
                        // The run is ending: the segments stream was closed.
                        Err(tilt_actors::ActorError::Closed) => return Ok(()),
                        Err(e) => return Err(e),
                    };
                    let mut unit = Vec::with_capacity(recs.len());
                    for r in &recs {
                        // Straight onto the critics' device (`critic.device`).
                        match record_segment_pair(r, &device) {
                            Ok(p) => unit.push(p),
                            Err(e) => eprintln!("tilt worker: skipping a bad segment record: {e}"),
                        }
                    }
                    if btx.send_async(unit).await.is_err() {
                        // The critics have stopped: the run is ending.
                        return Ok(());
                    }
                    let keys: Vec<_> = recs.iter().map(|r| r.key()).collect();
                    seg.ack(&keys).await?;
                }
            });
            drop(tx);
            let roles = Roles {
                rollouts: None,
                critics: Some((cfg.critic.actors, rx)),
                learners: false,
                replay: replay.clone(),
                stop: Some(watch_run_done(url.clone(), run_id.to_string())),
            };
            let mut t = training(cfg, &s, run_dir, roles, progress)?;
            t.sources = worker.sources(std::mem::take(&mut t.sources));
            alongside(train(t, progress), bridge, "critic", "out of").await?;
            segments.close();
        }
        WorkerRole::Learner => {
            let t0 = Instant::now();
            let replay: Arc<dyn ReplayBuffer> =
                Arc::new(RedisReplay::connect(&url, run_id, consumer, cfg.replay.clone()).await?);
            let roles = Roles {
                rollouts: None,
                critics: None,
                learners: true,
                replay: replay.clone(),
                stop: None,
            };
            let mut t = training(cfg, &s, run_dir, roles, progress)?;
            // The replay outlives this process: a restarted learner continues its ledger.
            t.resume_ledger = true;
            let mut vrpo = train(t, progress).await?;
            if vrpo.stopped_early {
                // Paused, not finished: the done mark would stop the producers, so only the step
                // budget sets it. The producers keep going (held back by the replay's capacity
                // and rate limiter) until a learner comes back.
                progress.line(&format!(
                    "tilt worker: the learner paused at step {} of {} (checkpointed); the run is not done and its producers keep running: resume with `tilt worker --role learner`",
                    vrpo.steps, cfg.vrpo.steps
                ));
                return Ok(());
            }
            mark_run_done(&url, run_id).await?;
            // Restarts of every process of the run, and of the actors inside them.
            let restarts = worker.run_restarts().await?;
            progress.line(&format!(
                "tilt worker: restarts in this run: processes {:?}, actors {:?}",
                restarts.processes, restarts.actors
            ));
            vrpo.restarts += restarts.total();
            let critic = read_json(&run_dir.join("critic.json")).ok();
            off_executor(|| eval::finish(cfg, &s, run_dir, critic, &vrpo, t0, progress))?;
            println!("{}", run_dir.join("summary.json").display());
        }
    }
    Ok(())
}
