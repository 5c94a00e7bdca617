//! The coordinator: spawns every role from a `RunSpec`, supervises them and owns the one shutdown
//! path. A rollout or critic actor that fails is respawned (fresh randomness, fresh sequence range)
//! and the run goes on; a learner failure ends the run (the learner has already checkpointed).
//! Shutdown (step budget, SIGINT/SIGTERM via `Shutdown`, or a learner failure): set the stop flag so
//! producers stop, the learner finishes its step and writes the final checkpoint, the replay closes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use tilt_kernels::critic::ValueCritic;
use tilt_kernels::denoiser::Denoiser;
use tilt_kernels::schedule::SamplingGrid;
use tilt_kernels::vrpo::SegmentPair;

use crate::control::RunControl;
use crate::critic::{CriticActor, CriticArgs};
use crate::distortion::{DistortionActor, DistortionArgs};
use crate::learner::{LearnerActor, LearnerArgs, LearnerMsg};
use crate::replay::ReplayBuffer;
use crate::rollout::{RolloutActor, RolloutArgs};

/// How a run ended.
#[derive(Debug, Clone)]
pub enum RunOutcome {
    /// The learner reached its budget or was asked to stop; the final checkpoint is here.
    Finished { step: u64, checkpoint: PathBuf },
    /// The learner failed (after checkpointing its last good state).
    LearnerFailed(String),
}

/// What the coordinator spawns.
pub struct RunSpec {
    pub seed: u64,
    pub rollouts: usize,
    pub reference: Arc<dyn Denoiser>,
    pub grid: Arc<SamplingGrid>,
    pub sample_shape: Vec<usize>,
    pub chains_per_unit: usize,
    pub segment_len: usize,
    pub critics: usize,
    pub critic: Arc<dyn ValueCritic>,
    pub lambda: f64,
    /// One entry per learner replica (rank order); `coordinator` is filled in at spawn.
    pub learners: Vec<LearnerArgs>,
    pub replay: Arc<dyn ReplayBuffer>,
    pub control: Arc<RunControl>,
    /// Capacity (in units) of the rollout -> critic channel.
    pub channel_capacity: usize,
    pub rollout_panic_after: u64,
    pub critic_panic_after: u64,
    /// Where the outcome goes (taken once).
    pub done: Arc<Mutex<Option<tokio::sync::oneshot::Sender<RunOutcome>>>>,
    /// The rollout -> critic channel, when the caller bridges one end to another process
    /// (worker mode); None = a fresh in-process channel.
    pub channel: Option<PairChannel>,
    /// DF-DPO: distortion actors producing (real, edited) pairs straight into the replay.
    pub distortion: Option<DistortionTemplate>,
}

/// Both ends of the rollout -> critic channel.
pub type PairChannel = (
    flume::Sender<Vec<SegmentPair>>,
    flume::Receiver<Vec<SegmentPair>>,
);

/// How to spawn the DF-DPO distortion actors.
#[derive(Clone)]
pub struct DistortionTemplate {
    pub actors: usize,
    pub clips: Arc<candle_core::Tensor>,
    pub curriculum: Arc<tilt_kernels::distort::Curriculum>,
    pub per_unit: usize,
    pub panic_after_units: u64,
}

/// The coordinator actor.
pub struct CoordinatorActor;

#[derive(Debug, Clone, Copy)]
enum Role {
    Rollout { id: u32, generation: u64 },
    Critic { id: u32, generation: u64 },
    Distortion { id: u32, generation: u64 },
    Learner { rank: usize },
}

/// Coordinator state: the spec (kept for respawning) and who is who.
pub struct CoordinatorState {
    spec: RunSpec,
    roles: HashMap<ActorId, Role>,
    tx: flume::Sender<Vec<SegmentPair>>,
    rx: flume::Receiver<Vec<SegmentPair>>,
}

/// Verbs of the coordinator.
#[derive(Debug)]
pub enum CoordinatorMsg {
    /// Stop the run gracefully (signal or caller).
    Shutdown(String),
    /// The leader finished: final checkpoint written.
    LearnerDone { step: u64, checkpoint: PathBuf },
}

impl CoordinatorState {
    fn rollout_args(&self, id: u32, generation: u64) -> RolloutArgs {
        let s = &self.spec;
        RolloutArgs {
            id,
            generation,
            seed: s.seed,
            reference: s.reference.clone(),
            grid: s.grid.clone(),
            sample_shape: s.sample_shape.clone(),
            chains: s.chains_per_unit,
            segment_len: s.segment_len,
            out: self.tx.clone(),
            control: s.control.clone(),
            panic_after_units: s.rollout_panic_after,
        }
    }

    fn critic_args(&self, id: u32, generation: u64) -> CriticArgs {
        let s = &self.spec;
        CriticArgs {
            id,
            generation,
            critic: s.critic.clone(),
            grid: s.grid.clone(),
            lambda: s.lambda,
            input: self.rx.clone(),
            replay: s.replay.clone(),
            control: s.control.clone(),
            panic_after_units: s.critic_panic_after,
        }
    }

    async fn spawn_role(
        &mut self,
        myself: &ActorRef<CoordinatorMsg>,
        role: Role,
    ) -> Result<(), ActorProcessingErr> {
        let cell = match role {
            Role::Rollout { id, generation } => Actor::spawn_linked(
                None,
                RolloutActor,
                self.rollout_args(id, generation),
                myself.get_cell(),
            )
            .await?
            .0
            .get_cell(),
            Role::Critic { id, generation } => Actor::spawn_linked(
                None,
                CriticActor,
                self.critic_args(id, generation),
                myself.get_cell(),
            )
            .await?
            .0
            .get_cell(),
            Role::Distortion { id, generation } => {
                let t = self
                    .spec
                    .distortion
                    .clone()
                    .ok_or("no distortion template")?;
                let args = DistortionArgs {
                    id,
                    generation,
                    seed: self.spec.seed,
                    clips: t.clips,
                    curriculum: t.curriculum,
                    per_unit: t.per_unit,
                    replay: self.spec.replay.clone(),
                    control: self.spec.control.clone(),
                    panic_after_units: t.panic_after_units,
                };
                Actor::spawn_linked(None, DistortionActor, args, myself.get_cell())
                    .await?
                    .0
                    .get_cell()
            }
            Role::Learner { .. } => unreachable!("learners are spawned once, in pre_start"),
        };
        self.roles.insert(cell.get_id(), role);
        Ok(())
    }

    fn finish(&mut self, myself: &ActorRef<CoordinatorMsg>, outcome: RunOutcome) {
        self.spec.control.request_stop();
        self.spec.replay.close();
        if let Some(tx) = self.spec.done.lock().ok().and_then(|mut d| d.take()) {
            let _ = tx.send(outcome);
        }
        myself.stop_children(Some("run finished".into()));
        myself.stop(Some("run finished".into()));
    }
}

impl Actor for CoordinatorActor {
    type Msg = CoordinatorMsg;
    type State = CoordinatorState;
    type Arguments = RunSpec;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        mut spec: RunSpec,
    ) -> Result<CoordinatorState, ActorProcessingErr> {
        let (tx, rx) = spec
            .channel
            .take()
            .unwrap_or_else(|| flume::bounded(spec.channel_capacity.max(1)));
        let learners = std::mem::take(&mut spec.learners);
        let mut st = CoordinatorState {
            spec,
            roles: HashMap::new(),
            tx,
            rx,
        };
        let mut refs: Vec<ActorRef<LearnerMsg>> = Vec::new();
        for mut args in learners {
            let rank = args.rank;
            args.coordinator = Some(myself.clone());
            let (r, _) = Actor::spawn_linked(None, LearnerActor, args, myself.get_cell()).await?;
            st.roles.insert(r.get_id(), Role::Learner { rank });
            refs.push(r);
        }
        for id in 0..st.spec.critics as u32 {
            st.spawn_role(&myself, Role::Critic { id, generation: 0 })
                .await?;
        }
        for id in 0..st.spec.distortion.as_ref().map_or(0, |d| d.actors) as u32 {
            st.spawn_role(&myself, Role::Distortion { id, generation: 0 })
                .await?;
        }
        for id in 0..st.spec.rollouts as u32 {
            st.spawn_role(&myself, Role::Rollout { id, generation: 0 })
                .await?;
        }
        if let Some(leader) = refs.first() {
            leader.cast(LearnerMsg::SetPeers(refs[1..].to_vec()))?;
            leader.cast(LearnerMsg::Tick)?;
        }
        Ok(st)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: CoordinatorMsg,
        st: &mut CoordinatorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            // The leader sees the flag at its next step, writes the final checkpoint and reports back.
            CoordinatorMsg::Shutdown(reason) => {
                let has_learner = st.roles.values().any(|r| matches!(r, Role::Learner { .. }));
                if has_learner {
                    eprintln!("tilt: stopping ({reason}): producers stop, the learner finishes its step and checkpoints");
                    st.spec.control.request_stop();
                } else {
                    // A producer-only process (worker mode): nothing to checkpoint.
                    eprintln!("tilt: stopping ({reason})");
                    st.finish(
                        &myself,
                        RunOutcome::Finished {
                            step: 0,
                            checkpoint: PathBuf::new(),
                        },
                    );
                }
            }
            CoordinatorMsg::LearnerDone { step, checkpoint } => {
                st.finish(&myself, RunOutcome::Finished { step, checkpoint })
            }
        }
        Ok(())
    }

    // Overridden: ractor's default stops the supervisor when any child dies.
    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        st: &mut CoordinatorState,
    ) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorFailed(cell, err) => {
                let Some(role) = st.roles.remove(&cell.get_id()) else {
                    return Ok(());
                };
                match role {
                    Role::Learner { rank } => {
                        let msg = format!("learner {rank} failed: {err}");
                        eprintln!("tilt: {msg}");
                        st.finish(&myself, RunOutcome::LearnerFailed(msg));
                    }
                    Role::Rollout { id, generation }
                    | Role::Critic { id, generation }
                    | Role::Distortion { id, generation }
                        if !st.spec.control.stopping() =>
                    {
                        let generation = generation + 1;
                        let next = match role {
                            Role::Rollout { .. } => Role::Rollout { id, generation },
                            Role::Critic { .. } => Role::Critic { id, generation },
                            _ => Role::Distortion { id, generation },
                        };
                        eprintln!("tilt: {role:?} failed ({err}); restarting as {next:?}");
                        RunControl::add(&st.spec.control.restarts, 1);
                        st.spawn_role(&myself, next).await?;
                    }
                    _ => {}
                }
            }
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                st.roles.remove(&cell.get_id());
            }
            _ => {}
        }
        Ok(())
    }
}
