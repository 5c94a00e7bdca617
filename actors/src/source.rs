//! The `PairSource` seam: a kind of producer actor (rollout and critic for VRPO, distortion for
//! DF-DPO, ...) that the coordinator spawns, supervises and restarts without knowing what it is.
//! A source is a template: it holds what its actors share (models, channels, curriculum) and
//! spawns actor `id` of generation `generation` on request; the run-wide pieces (seed, replay,
//! control) come from the coordinator through `SourceContext`.

use std::sync::Arc;

use async_trait::async_trait;
use ractor::{ActorCell, SpawnErr};

use crate::control::RunControl;
use crate::replay::ReplayBuffer;

/// What every source's actors share with the rest of the run.
#[derive(Clone)]
pub struct SourceContext {
    /// The run's seed for this invocation (a resumed run gets a fresh one).
    pub seed: u64,
    pub replay: Arc<dyn ReplayBuffer>,
    pub control: Arc<RunControl>,
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
