//! The final-pair role of the Diffusion-DPO baseline (`vrpo.method = "final_dpo"`): samples two
//! reference chains per class to the end, ranks the two final samples by the reward
//! (`tilt_kernels::final_dpo::make_final_pairs`) and writes one (winner, loser, class) record per
//! pair into the replay. It replaces the rollout and critic roles of VRPO for that baseline.

use std::sync::Arc;

use candle_core::Device;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tilt_kernels::denoiser::Denoiser;
use tilt_kernels::final_dpo::make_final_pairs;
use tilt_kernels::reward::Reward;
use tilt_kernels::rng::rng_for;
use tilt_kernels::schedule::SamplingGrid;
use tilt_kernels::vrpo::draw_classes;

use crate::control::RunControl;
use crate::replay::{tensors_to_payload, Record};
use crate::source::{ActorSource, SourceArgs};
use crate::telemetry::Stage;
use crate::ActorError;

/// The final-pair actor.
pub struct FinalPairActor;

/// What every final-pair actor of the run shares.
#[derive(Clone)]
pub struct FinalPairSource {
    pub actors: usize,
    pub reference: Arc<dyn Denoiser>,
    pub reward: Arc<dyn Reward>,
    pub grid: Arc<SamplingGrid>,
    pub sample_shape: Vec<usize>,
    /// Classes of a class-conditional reference; 0 = unconditional.
    pub classes: usize,
    /// Pairs per unit of work (2x as many chains).
    pub per_unit: usize,
    pub device: Device,
}

/// Everything one final-pair actor is started with.
pub type FinalPairArgs = SourceArgs<FinalPairSource>;

impl ActorSource for FinalPairSource {
    type Actor = FinalPairActor;
    const ROLE: &'static str = "final_pairs";
    fn count(&self) -> usize {
        self.actors
    }
    fn actor() -> FinalPairActor {
        FinalPairActor
    }
}

/// Per-actor state.
pub struct FinalPairState {
    args: FinalPairArgs,
    units: u64,
    next_seq: u64,
}

/// Verbs of the final-pair actor.
#[derive(Debug)]
pub enum FinalPairMsg {
    /// Produce one unit of pairs, then schedule the next.
    Produce,
}

impl Actor for FinalPairActor {
    type Msg = FinalPairMsg;
    type State = FinalPairState;
    type Arguments = FinalPairArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: FinalPairArgs,
    ) -> Result<FinalPairState, ActorProcessingErr> {
        myself.cast(FinalPairMsg::Produce)?;
        let next_seq = args.generation << 40;
        Ok(FinalPairState {
            args,
            units: 0,
            next_seq,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        _msg: FinalPairMsg,
        st: &mut FinalPairState,
    ) -> Result<(), ActorProcessingErr> {
        let a = st.args.clone();
        let (src, control) = (&a.source, &a.ctx.control);
        if control.stopping() || !control.producer_turn().await {
            myself.stop(Some("run stopping".into()));
            return Ok(());
        }
        let t0 = std::time::Instant::now();
        let mut rng = rng_for(
            a.ctx.seed,
            3_000 + a.id as u64 + 1_000_000 * a.generation,
            st.units,
        );
        let (src2, id, mut seq) = (src.clone(), a.id, st.next_seq);
        let records = control
            .producer_compute(move || -> Result<(Vec<Record>, u64), ActorError> {
                let s = src2;
                let cond = draw_classes(s.classes, s.per_unit, &mut rng, &s.device)?;
                let p = make_final_pairs(
                    s.reference.as_ref(),
                    &s.grid,
                    s.reward.as_ref(),
                    &s.sample_shape,
                    s.per_unit,
                    cond.as_ref(),
                    &mut rng,
                    &s.device,
                )?;
                let classes = p.cond.as_ref().map(|c| c.to_vec1::<u32>()).transpose()?;
                let mut out = Vec::with_capacity(s.per_unit);
                for i in 0..s.per_unit {
                    let payload =
                        tensors_to_payload(&[("w", &p.winners.get(i)?), ("l", &p.losers.get(i)?)])?;
                    let mut scalars = vec![
                        ("r_w".into(), p.r_w[i] as f64),
                        ("r_l".into(), p.r_l[i] as f64),
                    ];
                    if let Some(c) = &classes {
                        scalars.push(("class".into(), c[i] as f64));
                    }
                    out.push(Record {
                        seq,
                        producer: id,
                        version: 0,
                        payload,
                        scalars,
                    });
                    seq += 1;
                }
                Ok((out, seq))
            })
            .await??;
        control
            .latency
            .record(Stage::RolloutSegment, "final_pairs", a.id, t0.elapsed());
        st.next_seq = records.1;
        st.units += 1;
        let k = records.0.len() as u64;
        if !a
            .ctx
            .insert_unit(FinalPairSource::ROLE, a.id, records.0)
            .await?
        {
            myself.stop(Some("replay closed".into()));
            return Ok(());
        }
        RunControl::add(&control.pairs_produced, k);
        metrics::counter!("tilt_pairs_produced_total", "role" => FinalPairSource::ROLE, "actor" => a.id.to_string()).increment(k);
        myself.cast(FinalPairMsg::Produce)?;
        Ok(())
    }
}
