//! The critic role: takes segment pairs from the rollout channel, scores both endpoints with
//! V(., lambda) (`tilt_kernels::vrpo::score_pair`), and writes one record per pair into the replay.
//! Inserting waits on the replay's rate limiter: that is where back-pressure reaches the producers.

use std::sync::Arc;

use candle_core::Device;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tilt_kernels::critic::ValueCritic;
use tilt_kernels::schedule::SamplingGrid;
use tilt_kernels::vrpo::{score_pair, SegmentPair};

use crate::codec::pair_records;
use crate::source::{ActorSource, SourceArgs};
use crate::telemetry::Stage;
use crate::ActorError;

/// The critic actor.
pub struct CriticActor;

/// The critic source: what every critic actor of the run shares.
#[derive(Clone)]
pub struct CriticSource {
    pub actors: usize,
    pub critic: Arc<dyn ValueCritic>,
    pub grid: Arc<SamplingGrid>,
    pub lambda: f64,
    /// Where the critic scores (its weights live there; pairs are moved there).
    pub device: Device,
    /// The rollout -> critic channel.
    pub input: flume::Receiver<Vec<SegmentPair>>,
    /// Test hook: panic when this many units have been scored (0 = never).
    pub panic_after_units: u64,
}

/// Everything one critic actor is started with.
pub type CriticArgs = SourceArgs<CriticSource>;

impl ActorSource for CriticSource {
    type Actor = CriticActor;
    const ROLE: &'static str = "critic";
    fn count(&self) -> usize {
        self.actors
    }
    fn actor() -> CriticActor {
        CriticActor
    }
}

/// Per-actor state.
pub struct CriticState {
    args: CriticArgs,
    units: u64,
    next_seq: u64,
}

/// Verbs of the critic actor.
#[derive(Debug)]
pub enum CriticMsg {
    /// Score the next unit from the channel, then schedule the next.
    Score,
}

impl Actor for CriticActor {
    type Msg = CriticMsg;
    type State = CriticState;
    type Arguments = CriticArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: CriticArgs,
    ) -> Result<CriticState, ActorProcessingErr> {
        myself.cast(CriticMsg::Score)?;
        // Sequence numbers of a restarted producer continue in a fresh range (generation << 40).
        let next_seq = args.generation << 40;
        Ok(CriticState {
            args,
            units: 0,
            next_seq,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        _msg: CriticMsg,
        st: &mut CriticState,
    ) -> Result<(), ActorProcessingErr> {
        let a = st.args.clone();
        let (src, control) = (&a.source, &a.ctx.control);
        if src.panic_after_units > 0 && st.units == src.panic_after_units && a.generation == 0 {
            panic!(
                "critic {}: injected fault after {} units (fault.critic_panic_after)",
                a.id, st.units
            );
        }
        let unit = tokio::select! {
            r = src.input.recv_async() => match r {
                Ok(u) => u,
                Err(_) => { myself.stop(Some("rollout channel closed".into())); return Ok(()); }
            },
            _ = control.stopped() => {
                // Drain what the rollouts already produced, without waiting for more.
                match src.input.try_recv() {
                    Ok(u) => u,
                    Err(_) => { myself.stop(Some("run stopping".into())); return Ok(()); }
                }
            }
        };
        let (critic, grid, lambda, id, device) = (
            src.critic.clone(),
            src.grid.clone(),
            src.lambda,
            a.id,
            src.device.clone(),
        );
        let mut seq = st.next_seq;
        let t0 = std::time::Instant::now();
        let records = control
            .producer_compute(move || -> Result<_, ActorError> {
                let mut out = Vec::new();
                for pair in &unit {
                    let (va, vb) = score_pair(critic.as_ref(), &grid, pair, lambda, &device)?;
                    out.extend(pair_records(pair, &va, &vb, id, 0, &mut seq)?);
                }
                Ok((out, seq))
            })
            .await??;
        control
            .latency
            .record(Stage::CriticScore, "critic", a.id, t0.elapsed());
        st.next_seq = records.1;
        st.units += 1;
        // A closed replay ends this actor.
        if !a
            .ctx
            .insert_unit(CriticSource::ROLE, a.id, records.0)
            .await?
        {
            myself.stop(Some("replay closed".into()));
            return Ok(());
        }
        myself.cast(CriticMsg::Score)?;
        Ok(())
    }
}
