//! The `PairSource` seam: a kind of producer actor (rollout and critic for VRPO, distortion for
//! DF-DPO, ...) that the coordinator spawns, supervises and restarts without knowing what it is.
//! A source is a template: it holds what its actors share (models, channels, curriculum) and
//! spawns actor `id` of generation `generation` on request; the run-wide pieces (seed, replay,
//! control) come from the coordinator through `SourceContext`.

use std::sync::Arc;

use async_trait::async_trait;
use ractor::{Actor, ActorCell, SpawnErr};

use crate::control::RunControl;
use crate::replay::{Record, ReplayBuffer};
use crate::telemetry::Stage;
use crate::ActorError;

/// What every source's actors share with the rest of the run.
#[derive(Clone)]
pub struct SourceContext {
    /// The run's seed for this invocation (a resumed run gets a fresh one).
    pub seed: u64,
    pub replay: Arc<dyn ReplayBuffer>,
    pub control: Arc<RunControl>,
}

impl SourceContext {
    /// Insert one unit of records of actor `id` of `role` in one call (one round trip on the
    /// Redis backend; waits while the rate limiter forbids inserts), record its latency as the
    /// unit's, and count the records as inserted. `Ok(false)`: the replay has closed, the actor
    /// should stop.
    pub async fn insert_unit(
        &self,
        role: &'static str,
        id: u32,
        records: Vec<Record>,
    ) -> crate::Result<bool> {
        let n = records.len() as u64;
        let t = std::time::Instant::now();
        let res = self.replay.insert_many(records).await;
        self.control
            .latency
            .record(Stage::ReplayInsert, role, id, t.elapsed());
        match res {
            Ok(()) => {}
            Err(ActorError::Closed) => return Ok(false),
            Err(e) => return Err(e),
        }
        RunControl::add(&self.control.pairs_inserted, n);
        self.control.unit_inserted();
        metrics::counter!("tilt_pairs_inserted_total", "role" => role, "actor" => id.to_string())
            .increment(n);
        Ok(true)
    }
}

/// A kind of producer actor.
#[async_trait]
pub trait PairSource: Send + Sync {
    /// The role name in logs, metrics and restart messages ("rollout", "critic", ...).
    fn role(&self) -> &'static str;
    /// How many actors of this kind the run starts.
    fn actors(&self) -> usize;
    /// Spawn actor `id`, linked to `supervisor`. `generation` counts its restarts: a restarted
    /// actor draws fresh randomness and a fresh range of sequence numbers.
    async fn spawn(
        &self,
        id: u32,
        generation: u64,
        ctx: &SourceContext,
        supervisor: ActorCell,
    ) -> Result<ActorCell, SpawnErr>;
}

/// What one producer actor is started with: its id, its generation (restarts so far), the
/// source it belongs to and the run-wide context.
#[derive(Clone)]
pub struct SourceArgs<S> {
    pub id: u32,
    pub generation: u64,
    pub source: S,
    pub ctx: SourceContext,
}

/// A source whose actors are one ractor actor type started with `SourceArgs<Self>`: implementing
/// this (role, count, actor) makes it a `PairSource`.
pub trait ActorSource: Clone + Send + Sync + 'static {
    type Actor: Actor<Arguments = SourceArgs<Self>>;
    /// The role name (see `PairSource::role`).
    const ROLE: &'static str;
    /// How many actors of this kind the run starts.
    fn count(&self) -> usize;
    /// The actor value to spawn (actors are unit structs: state lives in `State`).
    fn actor() -> Self::Actor;
}

#[async_trait]
impl<T: ActorSource> PairSource for T {
    fn role(&self) -> &'static str {
        T::ROLE
    }
    fn actors(&self) -> usize {
        self.count()
    }
    async fn spawn(
        &self,
        id: u32,
        generation: u64,
        ctx: &SourceContext,
        supervisor: ActorCell,
    ) -> Result<ActorCell, SpawnErr> {
        let args = SourceArgs {
            id,
            generation,
            source: self.clone(),
            ctx: ctx.clone(),
        };
        let (r, _) = Actor::spawn_linked(None, T::actor(), args, supervisor).await?;
        Ok(r.get_cell())
    }
}
