//! The rollout role: runs the frozen reference chain and cuts it into pairs of L-step segments
//! from a shared start (`tilt_kernels::vrpo::make_segment_pairs`), and hands them to the critic
//! role through a bounded flume channel: a slow critic or learner blocks rollouts, queues stay bounded.

use std::sync::Arc;

use candle_core::Device;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tilt_kernels::denoiser::Denoiser;
use tilt_kernels::rng::rng_for;
use tilt_kernels::schedule::SamplingGrid;
use tilt_kernels::vrpo::{make_segment_pairs, SegmentPair};

use crate::control::RunControl;

/// The rollout actor.
pub struct RolloutActor;

/// Everything a rollout actor needs.
#[derive(Clone)]
pub struct RolloutArgs {
    pub id: u32,
    /// Incremented by the coordinator at each restart, so a restarted actor draws fresh randomness.
    pub generation: u64,
    pub seed: u64,
    pub reference: Arc<dyn Denoiser>,
    pub grid: Arc<SamplingGrid>,
    pub sample_shape: Vec<usize>,
    /// Chains per unit of work.
    pub chains: usize,
    pub segment_len: usize,
    pub out: flume::Sender<Vec<SegmentPair>>,
    pub control: Arc<RunControl>,
    /// Test hook: panic in the handler when this many units have been produced (0 = never).
    pub panic_after_units: u64,
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
        let a = &st.args;
        if a.control.stopping() {
            myself.stop(Some("run stopping".into()));
            return Ok(());
        }
        if a.panic_after_units > 0 && st.units == a.panic_after_units && a.generation == 0 {
            panic!(
                "rollout {}: injected fault after {} units (fault.rollout_panic_after)",
                a.id, st.units
            );
        }
        let (reference, grid, shape) =
            (a.reference.clone(), a.grid.clone(), a.sample_shape.clone());
        let (chains, len) = (a.chains, a.segment_len);
        let mut rng = rng_for(
            a.seed,
            1_000 + a.id as u64 + 1_000_000 * a.generation,
            st.units,
        );
        // Tensor work off the async executor.
        let t0 = std::time::Instant::now();
        let pairs = tokio::task::spawn_blocking(move || {
            make_segment_pairs(
                reference.as_ref(),
                &grid,
                &shape,
                chains,
                len,
                &mut rng,
                &Device::Cpu,
            )
        })
        .await??;
        a.control.latency.record(
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
            sent = a.out.send_async(pairs) => {
                if sent.is_err() {
                    myself.stop(Some("critic channel closed".into()));
                    return Ok(());
                }
            }
            _ = a.control.stopped() => {
                myself.stop(Some("run stopping".into()));
                return Ok(());
            }
        }
        RunControl::add(&a.control.pairs_produced, rows);
        metrics::counter!("tilt_pairs_produced_total", "role" => "rollout", "actor" => a.id.to_string()).increment(rows);
        myself.cast(RolloutMsg::Produce)?;
        Ok(())
    }
}
