//! The coordinator: spawns every role from a `RunSpec`, supervises them and owns the one shutdown
//! path. A producer (any `PairSource`: rollout, critic, distortion, ...) that fails is respawned
//! (fresh randomness, fresh sequence range) and the run goes on; a learner failure ends the run
//! (the learner has already checkpointed). The coordinator never knows what kind a source is.
//! Shutdown (step budget, SIGINT/SIGTERM via `Shutdown`, or a learner failure): set the stop flag so
//! producers stop, the learner finishes its step and writes the final checkpoint, the replay closes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};

use crate::control::RunControl;
use crate::learner::{LearnerActor, LearnerArgs, LearnerMsg};
use crate::replay::ReplayBuffer;
use crate::source::{PairSource, SourceContext};

/// How a run ended.
#[derive(Debug, Clone)]
pub enum RunOutcome {
    /// The learner reached its budget or was asked to stop; the final checkpoint is here.
    Finished { step: u64, checkpoint: PathBuf },
    /// The learner failed (after checkpointing its last good state).
    LearnerFailed(String),
}

/// What the coordinator spawns: learner replicas and producer sources around one replay.
pub struct RunSpec {
    /// The seed of this invocation, handed to every source's actors.
    pub seed: u64,
    /// One entry per learner replica (rank order; empty in a producer-only process);
    /// `on_done` is filled in at spawn.
    pub learners: Vec<LearnerArgs>,
    /// The producers, spawned in this order, `actors()` of each.
    pub sources: Vec<Arc<dyn PairSource>>,
    pub replay: Arc<dyn ReplayBuffer>,
    pub control: Arc<RunControl>,
    /// Where the outcome goes (taken once).
    pub done: Arc<Mutex<Option<tokio::sync::oneshot::Sender<RunOutcome>>>>,
}

/// The coordinator actor.
pub struct CoordinatorActor;

#[derive(Debug, Clone, Copy)]
enum Role {
    /// Actor `id` of `spec.sources[source]`, restarted `generation` times.
    Source {
        source: usize,
        id: u32,
        generation: u64,
    },
    Learner {
        rank: usize,
    },
}

/// Coordinator state: the spec (kept for respawning) and who is who.
pub struct CoordinatorState {
    spec: RunSpec,
    ctx: SourceContext,
    roles: HashMap<ActorId, Role>,
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
    async fn spawn_source(
        &mut self,
        myself: &ActorRef<CoordinatorMsg>,
        source: usize,
        id: u32,
        generation: u64,
    ) -> Result<(), ActorProcessingErr> {
        let cell = self.spec.sources[source]
            .spawn(id, generation, &self.ctx, myself.get_cell())
            .await?;
        self.roles.insert(
            cell.get_id(),
            Role::Source {
                source,
                id,
                generation,
            },
        );
        Ok(())
    }

    fn describe(&self, role: Role) -> String {
        match role {
            Role::Source {
                source,
                id,
                generation,
            } => format!(
                "{} {id} (generation {generation})",
                self.spec.sources[source].role()
            ),
            Role::Learner { rank } => format!("learner {rank}"),
        }
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
        let learners = std::mem::take(&mut spec.learners);
        let ctx = SourceContext {
            seed: spec.seed,
            replay: spec.replay.clone(),
            control: spec.control.clone(),
        };
        let mut st = CoordinatorState {
            spec,
            ctx,
            roles: HashMap::new(),
        };
        let mut refs: Vec<ActorRef<LearnerMsg>> = Vec::new();
        for mut args in learners {
            let rank = args.rank;
            let me = myself.clone();
            args.on_done = Some(Arc::new(move |step, checkpoint| {
                // A coordinator that is already gone has nothing left to finish.
                let _ = me.cast(CoordinatorMsg::LearnerDone { step, checkpoint });
            }));
            let (r, _) = Actor::spawn_linked(None, LearnerActor, args, myself.get_cell()).await?;
            st.roles.insert(r.get_id(), Role::Learner { rank });
            refs.push(r);
        }
        for source in 0..st.spec.sources.len() {
            for id in 0..st.spec.sources[source].actors() as u32 {
                st.spawn_source(&myself, source, id, 0).await?;
            }
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
                    Role::Source {
                        source,
                        id,
                        generation,
                    } if !st.spec.control.stopping() => {
                        let next = Role::Source {
                            source,
                            id,
                            generation: generation + 1,
                        };
                        eprintln!(
                            "tilt: {} failed ({err}); restarting as {}",
                            st.describe(role),
                            st.describe(next)
                        );
                        RunControl::add(&st.spec.control.restarts, 1);
                        crate::telemetry::actor_restarted(st.spec.sources[source].role());
                        st.spawn_source(&myself, source, id, generation + 1).await?;
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
