//! The distortion role of DF-DPO: takes real clips, edits a copy with the operator the curriculum
//! picks for the current learner step (`tilt_kernels::distort`), and writes (winner = real, loser =
//! edited) pairs into the replay, each recording its source clip, operator and strength. Logs every
//! curriculum stage change.

use std::sync::Arc;

use candle_core::Tensor;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use rand::Rng;
use tilt_kernels::distort::{Curriculum, Distortion};
use tilt_kernels::rng::rng_for;

use crate::control::RunControl;
use crate::replay::{tensors_to_payload, Record};
use crate::source::{ActorSource, SourceArgs};
use crate::telemetry::Stage;
use crate::ActorError;

/// The distortion actor.
pub struct DistortionActor;

/// The distortion source: what every distortion actor of the run shares.
#[derive(Clone)]
pub struct DistortionSource {
    pub actors: usize,
    /// The real clips [N, T, C, H, W].
    pub clips: Arc<Tensor>,
    pub curriculum: Arc<Curriculum>,
    /// Pairs per unit of work.
    pub per_unit: usize,
    /// Test hook: panic when this many units have been produced (0 = never).
    pub panic_after_units: u64,
}

/// Everything one distortion actor is started with.
pub type DistortionArgs = SourceArgs<DistortionSource>;

impl ActorSource for DistortionSource {
    type Actor = DistortionActor;
    const ROLE: &'static str = "distortion";
    fn count(&self) -> usize {
        self.actors
    }
    fn actor() -> DistortionActor {
        DistortionActor
    }
}

/// Per-actor state.
pub struct DistortionState {
    args: DistortionArgs,
    units: u64,
    next_seq: u64,
    stage: Option<usize>,
}

/// Verbs of the distortion actor.
#[derive(Debug)]
pub enum DistortionMsg {
    /// Produce one unit of pairs, then schedule the next.
    Produce,
}

/// Index of an operator in `Distortion::ALL` (recorded in each pair).
pub fn op_index(op: Distortion) -> usize {
    Distortion::ALL
        .iter()
        .position(|&o| o == op)
        .unwrap_or(usize::MAX)
}

impl Actor for DistortionActor {
    type Msg = DistortionMsg;
    type State = DistortionState;
    type Arguments = DistortionArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: DistortionArgs,
    ) -> Result<DistortionState, ActorProcessingErr> {
        myself.cast(DistortionMsg::Produce)?;
        let next_seq = args.generation << 40;
        Ok(DistortionState {
            args,
            units: 0,
            next_seq,
            stage: None,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        _msg: DistortionMsg,
        st: &mut DistortionState,
    ) -> Result<(), ActorProcessingErr> {
        let a = st.args.clone();
        let (src, control) = (&a.source, &a.ctx.control);
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
                "distortion {}: injected fault after {} units",
                a.id, st.units
            );
        }
        let step = RunControl::get(&control.learner_step);
        let (idx, stage) = src.curriculum.stage_at(step);
        if st.stage != Some(idx) && a.id == 0 {
            let ops: Vec<String> = stage
                .ops
                .iter()
                .map(|(o, w)| format!("{}:{w}", o.name()))
                .collect();
            eprintln!(
                "[dfdpo] curriculum stage {idx} from step {step}: strength {}, ops {}",
                stage.strength,
                ops.join(" ")
            );
        }
        st.stage = Some(idx);
        let t0 = std::time::Instant::now();
        let mut rng = rng_for(
            a.ctx.seed,
            2_000 + a.id as u64 + 1_000_000 * a.generation,
            st.units,
        );
        let mut seq = st.next_seq;
        let (clips, cur, n, id) = (
            src.clips.clone(),
            src.curriculum.clone(),
            src.per_unit,
            a.id,
        );
        let records = control
            .producer_compute(move || -> Result<(Vec<Record>, u64), ActorError> {
                let total = clips.dim(0)?;
                let mut out = Vec::with_capacity(n);
                for _ in 0..n {
                    let src = rng.random_range(0..total);
                    let real = clips.get(src)?;
                    let edited = cur.distort(step, &real, &mut rng)?;
                    let payload = tensors_to_payload(&[("w", &real), ("l", &edited.clip)])?;
                    out.push(Record {
                        seq,
                        producer: id,
                        version: 0,
                        payload,
                        scalars: vec![
                            ("source".into(), src as f64),
                            ("op".into(), op_index(edited.op) as f64),
                            ("strength".into(), cur.stage_at(step).1.strength as f64),
                        ],
                    });
                    seq += 1;
                }
                Ok((out, seq))
            })
            .await??;
        control
            .latency
            .record(Stage::DistortionPair, "distortion", a.id, t0.elapsed());
        st.next_seq = records.1;
        st.units += 1;
        let k = records.0.len() as u64;
        if !a
            .ctx
            .insert_unit(DistortionSource::ROLE, a.id, records.0)
            .await?
        {
            myself.stop(Some("replay closed".into()));
            return Ok(());
        }
        RunControl::add(&control.pairs_produced, k);
        metrics::counter!("tilt_pairs_produced_total", "role" => DistortionSource::ROLE, "actor" => a.id.to_string()).increment(k);
        myself.cast(DistortionMsg::Produce)?;
        Ok(())
    }
}
