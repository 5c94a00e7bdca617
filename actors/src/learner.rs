//! The learner role: synchronous data-parallel replicas of the policy residual. The rank-0 leader
//! samples one batch per replica from the replay, every replica computes the gradients of its
//! `Objective` (VRPO or DF-DPO) on its own batch, the leader averages them and every replica applies the
//! same averaged step, so all replicas stay identical. The leader checkpoints; a failed step writes
//! a checkpoint of the last good state and stops the run.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use candle_nn::VarMap;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tilt_kernels::denoiser::Denoiser;
use tilt_kernels::optim::{average_grads, first_non_finite, AdamW};

use crate::accounting::{reason, Ledger};
use crate::checkpoint::{write_checkpoint, CheckpointState};
use crate::control::{LastStats, RunControl};
use crate::cpu::off_executor;
use crate::objective::{Objective, StepStats};
use crate::replay::Record;
use crate::replay::ReplayBuffer;
use crate::telemetry::Stage;
use crate::ActorError;

/// The trainable part of a replica: residual network, its variables, optimiser, step.
pub struct LearnerCore {
    pub varmap: VarMap,
    pub residual: Arc<dyn Denoiser>,
    pub opt: AdamW,
    pub step: u64,
}

/// The learner actor (one per replica).
pub struct LearnerActor;

/// Checkpointing settings (leader only).
#[derive(Clone, Debug)]
pub struct CheckpointSpec {
    pub run_dir: PathBuf,
    /// Write every this many steps (0 = only at the end).
    pub every: u64,
    /// Also write at these steps (evaluation points).
    pub at_steps: Vec<u64>,
    pub seed: u64,
    /// The critic weights to copy into each checkpoint.
    pub critic_file: Option<PathBuf>,
}

/// Everything a learner replica needs.
pub struct LearnerArgs {
    pub rank: usize,
    pub world: usize,
    pub core: Arc<Mutex<LearnerCore>>,
    pub replay: Arc<dyn ReplayBuffer>,
    /// The loss (VRPO or DF-DPO).
    pub objective: Arc<dyn Objective>,
    /// Pairs per replica per step.
    pub batch: usize,
    pub total_steps: u64,
    pub checkpoint: CheckpointSpec,
    pub control: Arc<RunControl>,
    /// Called once by the leader when it has finished (step, final checkpoint directory): the
    /// coordinator passes a callback here, so the learner does not depend on the coordinator.
    pub on_done: Option<DoneCallback>,
    /// Test hook: fail the step that would reach this step number (0 = never).
    pub fail_at_step: u64,
    /// Test hook: the gradients of the step that would reach this step number are NaN (0 = never).
    pub nan_at_step: u64,
}

/// What the leader calls when it has finished: (step, final checkpoint directory).
pub type DoneCallback = Arc<dyn Fn(u64, PathBuf) + Send + Sync>;

/// Per-replica state.
pub struct LearnerState {
    args: LearnerArgs,
    peers: Vec<ActorRef<LearnerMsg>>,
    finished: bool,
}

type GradReply = Result<(Vec<Option<Tensor>>, StepStats), String>;

/// Verbs of a learner replica.
pub enum LearnerMsg {
    /// Leader: run one synchronous step over all replicas.
    Tick,
    /// Leader: the other replicas (ranks 1..world).
    SetPeers(Vec<ActorRef<LearnerMsg>>),
    /// Any replica: gradients of the VRPO loss on this batch.
    Grads(Arc<Vec<Record>>, u64, RpcReplyPort<GradReply>),
    /// Any replica: apply these averaged gradients.
    Apply(Arc<Vec<Option<Tensor>>>, RpcReplyPort<Result<(), String>>),
}

fn compute(
    core: &Arc<Mutex<LearnerCore>>,
    objective: &dyn Objective,
    records: &[Record],
    step: u64,
    replica: usize,
) -> GradReply {
    let c = core
        .lock()
        .map_err(|_| "learner core lock poisoned".to_string())?;
    objective
        .grads(c.residual.as_ref(), c.opt.vars(), records, step, replica)
        .map_err(|e| e.to_string())
}

/// Run learner compute off the async executor on the current thread ([`off_executor`]), on the
/// learners' cores when `pin_cores` is set; a panic becomes the error the learner fails with.
fn on_learner_cores<T>(control: &RunControl, f: impl FnOnce() -> T) -> Result<T, String> {
    off_executor(|| {
        let _pinned = control.cpu.learner();
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
            .map_err(|p| format!("panicked: {}", panic_message(p.as_ref())))
    })
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

fn apply(core: &Arc<Mutex<LearnerCore>>, grads: &[Option<Tensor>]) -> Result<(), String> {
    let mut c = core
        .lock()
        .map_err(|_| "learner core lock poisoned".to_string())?;
    c.opt.step_with(grads).map_err(|e| e.to_string())?;
    c.step += 1;
    Ok(())
}

impl LearnerState {
    fn checkpoint(&self) -> Result<PathBuf, ActorError> {
        let c = self.args.core.lock().map_err(|_| ActorError::Actor {
            role: "learner".into(),
            detail: "lock poisoned".into(),
        })?;
        let spec = &self.args.checkpoint;
        // The replay counts per process: the checkpoint carries this process's on.
        let replay = self.args.replay.stats();
        let ledger = self
            .ledger()?
            .for_checkpoint(replay.redelivered, replay.deduplicated);
        let state = CheckpointState {
            step: c.step,
            seed: spec.seed,
            policy_version: c.step,
        };
        write_checkpoint(
            &spec.run_dir,
            &state,
            &c.varmap,
            &c.opt,
            spec.critic_file.as_deref(),
            Some(&ledger),
        )
    }

    fn ledger(&self) -> Result<std::sync::MutexGuard<'_, Ledger>, ActorError> {
        self.args
            .control
            .ledger
            .lock()
            .map_err(|_| ActorError::Actor {
                role: "learner".into(),
                detail: "ledger lock poisoned".into(),
            })
    }

    fn step(&self) -> u64 {
        self.args.core.lock().map(|c| c.step).unwrap_or(0)
    }

    async fn fail(&self, detail: String) -> Result<(), ActorProcessingErr> {
        let saved = self
            .checkpoint()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|e| format!("(checkpoint failed too: {e})"));
        Err(format!(
            "learner step {} failed: {detail}; last good state saved in {saved}",
            self.step() + 1
        )
        .into())
    }

    /// One synchronous data-parallel step. Ok(false) when no data was available yet.
    async fn leader_step(&mut self) -> Result<bool, ActorProcessingErr> {
        let a = &self.args;
        let ts = Instant::now();
        let n = a.batch * a.world;
        let sampled = match &a.control.sync {
            None => a.replay.sample(n, Duration::from_millis(250)).await?,
            // Synchronous runtime: train while the replay serves; when it cannot, ask for the
            // next unit and wait for it.
            Some(turns) => match a.replay.sample(n, Duration::ZERO).await? {
                Some(r) => Some(r),
                None => {
                    turns.request_if_idle();
                    a.replay.sample(n, Duration::from_millis(250)).await?
                }
            },
        };
        let Some(records) = sampled else {
            return Ok(false);
        };
        a.control
            .latency
            .record(Stage::ReplaySample, "learner", 0, ts.elapsed());
        // Idempotence by (producer, seq): a delivery beyond a record's uses is refused (and
        // acknowledged, so the replay can retire it).
        let (records, dups) = self.ledger()?.admit(records);
        if !dups.is_empty() {
            a.replay.ack(&dups).await?;
        }
        if records.len() < a.world {
            // Too few to give every replica one: acknowledged and counted, not applied.
            let keys: Vec<(u32, u64)> = records.iter().map(|r| r.key()).collect();
            self.ledger()?.drop_keys(reason::SHORT_BATCH, &keys);
            a.replay.ack(&keys).await?;
            return Ok(false);
        }
        let t0 = Instant::now();
        let next = self.step() + 1;
        if a.fail_at_step > 0 && next == a.fail_at_step {
            self.fail("injected fault (fault.learner_fail_at_step)".into())
                .await?;
        }
        let world = a.world;
        let keys: Vec<(u32, u64)> = records.iter().map(|r| r.key()).collect();
        let per = records.len() / world;
        let batches: Vec<Arc<Vec<Record>>> = (0..world)
            .map(|r| Arc::new(records[r * per..(r + 1) * per].to_vec()))
            .collect();
        // Replicas 1.. compute on their batches while the leader computes on batch 0.
        let mut pending = Vec::new();
        for (peer, b) in self.peers.iter().zip(batches.iter().skip(1)) {
            let b = b.clone();
            let peer = peer.clone();
            pending.push(tokio::spawn(async move {
                peer.call(
                    |port| LearnerMsg::Grads(b, next, port),
                    Some(Duration::from_secs(300)),
                )
                .await
            }));
        }
        // The step runs on this worker thread itself (no hand-off to a blocking thread and no
        // wake-up when it is done: on a busy machine each cost up to a millisecond), on the
        // learners' cores when pinned.
        let own = match on_learner_cores(&a.control, || {
            compute(&a.core, a.objective.as_ref(), &batches[0], next, 0)
        }) {
            Ok(Ok(g)) => g,
            Ok(Err(e)) => return self.fail(e).await.map(|_| true),
            Err(e) => return self.fail(e).await.map(|_| true),
        };
        let mut all = vec![own.0];
        let mut stats = vec![own.1];
        for p in pending {
            match p.await {
                Ok(Ok(ractor::rpc::CallResult::Success(Ok((g, s))))) => {
                    all.push(g);
                    stats.push(s);
                }
                other => {
                    return self
                        .fail(format!("replica failed: {other:?}"))
                        .await
                        .map(|_| true)
                }
            }
        }
        let mut avg = average_grads(&all)?;
        if a.nan_at_step > 0 && next == a.nan_at_step {
            avg = avg
                .iter()
                .map(|g| g.as_ref().map(|t| t.affine(0.0, f64::NAN)).transpose())
                .collect::<candle_core::Result<_>>()?;
        }
        // A non-finite loss or gradient stops the run before it reaches the weights: the last
        // good weights are checkpointed (`fail`), never a NaN state.
        let loss_sum: f32 = stats.iter().map(|s| s.loss).sum();
        if !loss_sum.is_finite() {
            metrics::gauge!("tilt_loss", "role" => "learner", "actor" => "0").set(loss_sum as f64);
            crate::telemetry::learner_non_finite("loss");
            return self
                .fail(format!("non-finite loss ({loss_sum}) at step {next}"))
                .await
                .map(|_| true);
        }
        if let Some(bad) = first_non_finite(&avg)? {
            crate::telemetry::learner_non_finite("gradient");
            return self
                .fail(format!(
                    "non-finite gradient (variable #{bad} in the optimiser's order) at step {next}"
                ))
                .await
                .map(|_| true);
        }
        let avg = Arc::new(avg);
        for peer in &self.peers {
            let g = avg.clone();
            match peer
                .call(
                    |port| LearnerMsg::Apply(g, port),
                    Some(Duration::from_secs(300)),
                )
                .await
            {
                Ok(ractor::rpc::CallResult::Success(Ok(()))) => {}
                other => {
                    return self
                        .fail(format!("replica apply failed: {other:?}"))
                        .await
                        .map(|_| true)
                }
            }
        }
        if let Err(e) = on_learner_cores(&a.control, || apply(&a.core, &avg)).and_then(|r| r) {
            return self.fail(e).await.map(|_| true);
        }
        // Applied: into the ledger first (the redis backend may redeliver what an ack did not
        // reach), then acknowledge (the redis backend XACKs and deletes; memory is a no-op).
        let (applied, dedup) = {
            let mut l = self.ledger()?;
            l.commit(&keys);
            (l.distinct, l.deduplicated)
        };
        a.replay.ack(&keys).await?;
        let n = stats.len() as f32;
        let last = LastStats {
            loss: stats.iter().map(|s| s.loss).sum::<f32>() / n,
            accuracy: stats.iter().map(|s| s.accuracy).sum::<f32>() / n,
            label_strength: stats
                .iter()
                .map(|s| s.label_strength)
                .sum::<Option<f32>>()
                .map(|v| v / n),
        };
        if let Ok(mut l) = a.control.last.lock() {
            *l = last;
        }
        let consumed = (batches.len() * batches[0].len()) as u64;
        RunControl::add(&a.control.pairs_consumed, consumed);
        RunControl::add(&a.control.learner_busy_us, t0.elapsed().as_micros() as u64);
        a.control
            .learner_step
            .store(next, std::sync::atomic::Ordering::Relaxed);
        a.control
            .latency
            .record(Stage::LearnerStep, "learner", 0, t0.elapsed());
        if let Ok(mut h) = a.control.history.lock() {
            h.push((next, last.loss, last.accuracy));
        }
        metrics::counter!("tilt_pairs_consumed_total", "role" => "learner", "actor" => "0")
            .increment(consumed);
        let rs = a.replay.stats();
        metrics::gauge!("tilt_replay_depth", "role" => "replay", "actor" => "0")
            .set(rs.depth as f64);
        metrics::counter!("tilt_pairs_dropped_total", "role" => "replay", "actor" => "0")
            .absolute(rs.dropped);
        // Live accounting; the final numbers (produced, lost, drops by reason) are exported
        // when the run settles its accounting.
        for (name, v) in [
            ("tilt_records_applied_total", applied),
            ("tilt_records_inserted_total", rs.inserted),
            ("tilt_records_redelivered_total", rs.redelivered),
            ("tilt_records_deduplicated_total", dedup + rs.deduplicated),
        ] {
            metrics::counter!(name, "role" => "learner", "actor" => "0").absolute(v);
        }
        metrics::gauge!("tilt_learner_step", "role" => "learner", "actor" => "0").set(next as f64);
        metrics::gauge!("tilt_policy_version", "role" => "learner", "actor" => "0")
            .set(next as f64);
        metrics::gauge!("tilt_loss", "role" => "learner", "actor" => "0").set(last.loss as f64);
        metrics::gauge!("tilt_implicit_accuracy", "role" => "learner", "actor" => "0")
            .set(last.accuracy as f64);
        if let Some(v) = last.label_strength {
            metrics::gauge!("tilt_label_strength", "role" => "learner", "actor" => "0")
                .set(v as f64);
        }
        let spec = &a.checkpoint;
        if (spec.every > 0 && next % spec.every == 0) || spec.at_steps.contains(&next) {
            self.checkpoint()?;
        }
        Ok(true)
    }
}

impl Actor for LearnerActor {
    type Msg = LearnerMsg;
    type State = LearnerState;
    type Arguments = LearnerArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: LearnerArgs,
    ) -> Result<LearnerState, ActorProcessingErr> {
        if args.rank == 0 {
            let step = args.core.lock().map(|c| c.step).unwrap_or(0);
            crate::telemetry::learner_started(step, args.total_steps);
        }
        Ok(LearnerState {
            args,
            peers: vec![],
            finished: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: LearnerMsg,
        st: &mut LearnerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            LearnerMsg::SetPeers(p) => st.peers = p,
            LearnerMsg::Grads(batch, step, port) => {
                let a = &st.args;
                let r = on_learner_cores(&a.control, || {
                    compute(&a.core, a.objective.as_ref(), &batch, step, a.rank)
                })
                .and_then(|r| r);
                let _ = port.send(r);
            }
            LearnerMsg::Apply(grads, port) => {
                let a = &st.args;
                let r = on_learner_cores(&a.control, || apply(&a.core, &grads)).and_then(|r| r);
                let _ = port.send(r);
            }
            LearnerMsg::Tick => {
                if st.finished {
                    return Ok(());
                }
                if st.args.control.stopping() || st.step() >= st.args.total_steps {
                    st.finished = true;
                    let dir = st.checkpoint()?;
                    if let Some(done) = &st.args.on_done {
                        done(st.step(), dir);
                    }
                    return Ok(());
                }
                st.leader_step().await?;
                myself.cast(LearnerMsg::Tick)?;
            }
        }
        Ok(())
    }
}
