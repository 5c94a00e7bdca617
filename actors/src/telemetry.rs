//! Per-stage latency: every actor records how long each unit of work took, into an hdrhistogram per
//! (stage, role, actor) and into the `metrics` facade (`tilt_stage_latency_seconds`, exported by the
//! Prometheus endpoint when one is installed). At the end of a run the histograms of all actors of a
//! stage are merged into p50/p90/p99/max. The few metrics that mark events (learner start,
//! non-finite values, actor restarts) are set here too, so their names live in one place.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// The timed stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    /// A rollout actor producing one unit of segment pairs.
    RolloutSegment,
    /// A critic actor scoring one unit and encoding its records.
    CriticScore,
    /// One producer unit inserted into the replay (`insert_many`), including any wait imposed by
    /// the rate limiter (back-pressure).
    ReplayInsert,
    /// One replay sample of a learner batch, including waiting for data.
    ReplaySample,
    /// One synchronous learner step (gradients on every replica, averaging, apply).
    LearnerStep,
    /// A DF-DPO distortion actor producing one unit of (real, edited) pairs.
    DistortionPair,
}

impl Stage {
    /// The stable name used in metrics labels and summary.json.
    pub fn name(self) -> &'static str {
        match self {
            Stage::RolloutSegment => "rollout_segment",
            Stage::CriticScore => "critic_score",
            Stage::ReplayInsert => "replay_insert",
            Stage::ReplaySample => "replay_sample",
            Stage::LearnerStep => "learner_step",
            Stage::DistortionPair => "distortion_pair",
        }
    }
}

/// Merged percentiles of one stage, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Histograms of microseconds, 1 us .. 1 h, 3 significant digits.
#[derive(Debug, Default)]
pub struct Latencies {
    inner: Mutex<HashMap<HistKey, Histogram<u64>>>,
}

/// (stage, role, actor id).
type HistKey = (Stage, &'static str, u32);

const MAX_US: u64 = 3_600_000_000;

impl Latencies {
    /// Record one duration for `stage` of actor `actor` of `role`.
    pub fn record(&self, stage: Stage, role: &'static str, actor: u32, d: Duration) {
        let us = (d.as_micros() as u64).clamp(1, MAX_US);
        metrics::histogram!("tilt_stage_latency_seconds", "stage" => stage.name(), "role" => role, "actor" => actor.to_string())
            .record(d.as_secs_f64());
        if let Ok(mut m) = self.inner.lock() {
            let h = m.entry((stage, role, actor)).or_insert_with(|| {
                Histogram::new_with_bounds(1, MAX_US, 3).expect("constant bounds are valid")
            });
            let _ = h.record(us);
        }
    }

    /// Per stage, the histograms of all actors merged.
    pub fn summary(&self) -> BTreeMap<String, LatencySummary> {
        let mut merged: BTreeMap<Stage, Histogram<u64>> = BTreeMap::new();
        if let Ok(m) = self.inner.lock() {
            for ((stage, _, _), h) in m.iter() {
                let e = merged
                    .entry(*stage)
                    .or_insert_with(|| Histogram::new_with_bounds(1, MAX_US, 3).expect("valid"));
                let _ = e.add(h);
            }
        }
        merged
            .into_iter()
            .map(|(s, h)| {
                let ms = |v: u64| v as f64 / 1000.0;
                (
                    s.name().to_string(),
                    LatencySummary {
                        count: h.len(),
                        p50_ms: ms(h.value_at_quantile(0.5)),
                        p90_ms: ms(h.value_at_quantile(0.9)),
                        p99_ms: ms(h.value_at_quantile(0.99)),
                        max_ms: ms(h.max()),
                    },
                )
            })
            .collect()
    }
}

/// The learner leader started (or resumed) at `step` of a training of `budget` steps: both go
/// to the endpoint at once, so a learner that never completes a step is visible as stalled
/// (`tilt_learner_step` below `tilt_learner_step_budget` and not moving).
pub fn learner_started(step: u64, budget: u64) {
    metrics::gauge!("tilt_learner_step", "role" => "learner", "actor" => "0").set(step as f64);
    metrics::gauge!("tilt_learner_step_budget", "role" => "learner", "actor" => "0")
        .set(budget as f64);
}

/// The learner met a non-finite `kind` ("loss" or "gradient") and stops the run.
pub fn learner_non_finite(kind: &'static str) {
    metrics::counter!("tilt_learner_non_finite_total", "role" => "learner", "actor" => "0", "kind" => kind)
        .increment(1);
}

/// The coordinator restarted a failed producer actor of `role`.
pub fn actor_restarted(role: &'static str) {
    metrics::counter!("tilt_actor_restarts_total", "role" => role).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_across_actors_and_ordered_percentiles() {
        // Actor 0 records 1..=100 ms, actor 1 records 101..=200 ms: merged p50 ~ 100 ms, max 200 ms
        // (hdrhistogram with 3 significant digits: relative error <= 0.1%).
        let l = Latencies::default();
        for i in 1..=100u64 {
            l.record(Stage::LearnerStep, "learner", 0, Duration::from_millis(i));
            l.record(
                Stage::LearnerStep,
                "learner",
                1,
                Duration::from_millis(100 + i),
            );
        }
        let s = l.summary()["learner_step"];
        assert_eq!(s.count, 200);
        assert!((s.p50_ms - 100.0).abs() <= 0.2, "{s:?}");
        assert!((s.max_ms - 200.0).abs() <= 0.2, "{s:?}");
        assert!(s.p50_ms <= s.p90_ms && s.p90_ms <= s.p99_ms && s.p99_ms <= s.max_ms);
    }
}
