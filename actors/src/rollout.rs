//! The rollout role: runs the frozen reference chain and cuts it into pairs of L-step segments
//! from a shared start (`tilt_kernels::vrpo::make_segment_pairs`), and hands them to the critic
//! role through a bounded flume channel: a slow critic or learner blocks rollouts, queues stay bounded.

use std::sync::Arc;

use candle_core::Device;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tilt_kernels::denoiser::Denoiser;
use tilt_kernels::rng::rng_for;
use tilt_kernels::schedule::SamplingGrid;
use tilt_kernels::vrpo::{draw_classes, make_segment_pairs, SegmentPair};

use crate::control::RunControl;
use crate::source::{ActorSource, SourceArgs};

/// The rollout actor.
pub struct RolloutActor;

/// The rollout source: what every rollout actor of the run shares.
#[derive(Clone)]
pub struct RolloutSource {
    pub actors: usize,
    pub reference: Arc<dyn Denoiser>,
    pub grid: Arc<SamplingGrid>,
    /// One sample's shape ([dim], [C, H, W], ...).
    pub sample_shape: Vec<usize>,
    /// Classes of a class-conditional reference (each chain draws one uniformly); 0 = unconditional.
    pub classes: usize,
    /// Chains per unit of work.
    pub chains: usize,
    pub segment_len: usize,
    /// Where the chains run.
    pub device: Device,
    /// The rollout -> critic channel (bounded: back-pressure).
    pub out: flume::Sender<Vec<SegmentPair>>,
    /// Test hook: panic in the handler when this many units have been produced (0 = never).
    pub panic_after_units: u64,
}

/// Everything one rollout actor is started with.
pub type RolloutArgs = SourceArgs<RolloutSource>;

impl ActorSource for RolloutSource {
    type Actor = RolloutActor;
    const ROLE: &'static str = "rollout";
    fn count(&self) -> usize {
        self.actors
    }
    fn actor() -> RolloutActor {
        RolloutActor
    }
}

/// Per-actor state.
pub struct RolloutState {
    args: RolloutArgs,
    units: u64,
}

/// Verbs of the rollout actor.
#[derive(Debug)]
pub enum RolloutMsg {
    /// Produce one unit of pairs, then schedule the next.
    Produce,
}

impl Actor for RolloutActor {
    type Msg = RolloutMsg;
    type State = RolloutState;
    type Arguments = RolloutArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: RolloutArgs,
    ) -> Result<RolloutState, ActorProcessingErr> {
        myself.cast(RolloutMsg::Produce)?;
        Ok(RolloutState { args, units: 0 })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        _msg: RolloutMsg,
        st: &mut RolloutState,
    ) -> Result<(), ActorProcessingErr> {
        let (a, src) = (&st.args, &st.args.source);
        let control = &a.ctx.control;
        if control.stopping() {
            myself.stop(Some("run stopping".into()));
            return Ok(());
        }
        if !control.producer_turn().await {
            myself.stop(Some("run stopping".into()));
            return Ok(());
        }
        if src.panic_after_units > 0 && st.units == src.panic_after_units && a.generation == 0 {
            panic!(
                "rollout {}: injected fault after {} units (fault.rollout_panic_after)",
                a.id, st.units
            );
        }
        let (reference, grid, shape, device) = (
            src.reference.clone(),
            src.grid.clone(),
            src.sample_shape.clone(),
            src.device.clone(),
        );
        let (chains, len, classes) = (src.chains, src.segment_len, src.classes);
        let mut rng = rng_for(
            a.ctx.seed,
            1_000 + a.id as u64 + 1_000_000 * a.generation,
            st.units,
        );
        // Tensor work off the async executor, on the producers' cores when pinned.
        let t0 = std::time::Instant::now();
        let pairs = control
            .producer_compute(move || {
                let cond = draw_classes(classes, chains, &mut rng, &device)?;
                make_segment_pairs(
                    reference.as_ref(),
                    &grid,
                    &shape,
                    chains,
                    len,
                    cond.as_ref(),
                    &mut rng,
                    &device,
                )
            })
            .await??;
        control.latency.record(
            crate::telemetry::Stage::RolloutSegment,
            "rollout",
            a.id,
            t0.elapsed(),
        );
        let rows: u64 = pairs
            .iter()
            .map(|p| p.a.log_prob.dims1().unwrap_or(0) as u64)
            .sum();
        st.units += 1;
        // Bounded hand-off: waits while the critics are behind (back-pressure), unless the run stops.
        tokio::select! {
            sent = src.out.send_async(pairs) => {
                if sent.is_err() {
                    myself.stop(Some("critic channel closed".into()));
                    return Ok(());
                }
            }
            _ = control.stopped() => {
                myself.stop(Some("run stopping".into()));
                return Ok(());
            }
        }
        RunControl::add(&control.pairs_produced, rows);
        metrics::counter!("tilt_pairs_produced_total", "role" => "rollout", "actor" => a.id.to_string()).increment(rows);
        myself.cast(RolloutMsg::Produce)?;
        Ok(())
    }
}
