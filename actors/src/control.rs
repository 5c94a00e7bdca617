//! Shared run state every actor reads and updates: the stop flag (one shutdown path) and the
//! counters the progress line, the summary and the metrics are built from.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// The run's shared switches and counters. Cheap to share as `Arc<RunControl>`.
#[derive(Debug)]
pub struct RunControl {
    stopping: AtomicBool,
    stop_tx: tokio::sync::watch::Sender<bool>,
    /// Pairs produced by rollout actors (rows of segment pairs).
    pub pairs_produced: AtomicU64,
    /// Pairs scored by critic actors and inserted into the replay.
    pub pairs_inserted: AtomicU64,
    /// Pairs consumed by learners (rows of applied batches).
    pub pairs_consumed: AtomicU64,
    /// Optimiser steps applied.
    pub learner_step: AtomicU64,
    /// Actors restarted by the coordinator after a failure.
    pub restarts: AtomicU64,
    /// Microseconds the learner spent computing (vs waiting for data).
    pub learner_busy_us: AtomicU64,
    /// Last learner statistics (loss, pair accuracy, margin gap).
    pub last: Mutex<LastStats>,
    /// Per-stage latency histograms.
    pub latency: crate::telemetry::Latencies,
    /// (step, loss, accuracy) every step, for the loss curves of the report.
    pub history: Mutex<Vec<(u64, f32, f32)>>,
    /// `runtime = "sync"`: production on the learner's demand, no overlap (None: the pipeline).
    pub sync: Option<SyncTurns>,
    /// What the learner applied, by key (exact accounting; saved with each checkpoint).
    pub ledger: Mutex<crate::accounting::Ledger>,
    /// Which cores the learners' and the producers' compute runs on (`pin_cores`).
    pub cpu: crate::cpu::CpuPlan,
}

/// Turns of the synchronous runtime: a producer makes a unit only when the learner asked for one,
/// and the learner asks only when it cannot sample, so producing and training never overlap.
#[derive(Debug)]
pub struct SyncTurns {
    permits: tokio::sync::Semaphore,
    requested: AtomicU64,
    done: AtomicU64,
}

impl Default for SyncTurns {
    fn default() -> Self {
        Self {
            permits: tokio::sync::Semaphore::new(0),
            requested: AtomicU64::new(0),
            done: AtomicU64::new(0),
        }
    }
}

impl SyncTurns {
    /// A producer that starts units (rollout, distortion): wait for the learner's request.
    pub async fn wait_turn(&self) {
        if let Ok(p) = self.permits.acquire().await {
            p.forget();
        }
    }
    /// The producer that inserts a unit's records (critic, distortion): the unit is in the replay.
    pub fn unit_done(&self) {
        self.done.fetch_add(1, Ordering::SeqCst);
    }
    /// The learner cannot sample: ask for one unit unless one is already being made. Returns
    /// whether a unit was requested.
    pub fn request_if_idle(&self) -> bool {
        let done = self.done.load(Ordering::SeqCst);
        let asked = self
            .requested
            .compare_exchange(done, done + 1, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
        if asked {
            self.permits.add_permits(1);
        }
        asked
    }
    /// Units asked for and units inserted so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.requested.load(Ordering::SeqCst),
            self.done.load(Ordering::SeqCst),
        )
    }
}

/// The latest learner numbers, for progress and reports.
#[derive(Debug, Default, Clone, Copy)]
pub struct LastStats {
    pub loss: f32,
    pub accuracy: f32,
    /// Mean over replicas of [`StepStats::label_strength`](crate::objective::StepStats), when
    /// every replica's loss has one.
    pub label_strength: Option<f32>,
}

impl Default for RunControl {
    fn default() -> Self {
        Self {
            stopping: AtomicBool::new(false),
            stop_tx: tokio::sync::watch::channel(false).0,
            pairs_produced: AtomicU64::new(0),
            pairs_inserted: AtomicU64::new(0),
            pairs_consumed: AtomicU64::new(0),
            learner_step: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
            learner_busy_us: AtomicU64::new(0),
            last: Mutex::new(LastStats::default()),
            latency: Default::default(),
            history: Mutex::new(Vec::new()),
            sync: None,
            ledger: Mutex::new(crate::accounting::Ledger::default()),
            cpu: crate::cpu::CpuPlan::unpinned(),
        }
    }
}

impl RunControl {
    /// A run control for `runtime = "sync"` (see [`SyncTurns`]).
    pub fn synchronous() -> Self {
        Self {
            sync: Some(SyncTurns::default()),
            ..Self::default()
        }
    }

    /// This run control with the roles' compute placed as `cpu` says.
    pub fn with_cpu(self, cpu: crate::cpu::CpuPlan) -> Self {
        Self { cpu, ..self }
    }

    /// Ask every producer to stop and the learner to finish after its current step.
    pub fn request_stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.stop_tx.send_replace(true);
    }
    /// Resolves once a stop has been requested (for `select!` next to a blocking wait).
    pub async fn stopped(&self) {
        let mut rx = self.stop_tx.subscribe();
        // wait_for errs only when the sender is gone, which cannot happen while `self` lives.
        let _ = rx.wait_for(|s| *s).await;
    }
    /// A producer that starts units: in `runtime = "sync"`, wait until the learner asks for one
    /// (true) or the run stops (false); in the pipeline, true at once.
    pub async fn producer_turn(&self) -> bool {
        let Some(turns) = &self.sync else {
            return true;
        };
        tokio::select! {
            _ = turns.wait_turn() => true,
            _ = self.stopped() => false,
        }
    }
    /// The producer that inserts a unit's records has inserted them (`runtime = "sync"`).
    pub fn unit_inserted(&self) {
        if let Some(turns) = &self.sync {
            turns.unit_done();
        }
    }
    /// Run a producer's tensor work off the async executor (a blocking-pool thread), on the
    /// producers' cores when `pin_cores` is set.
    pub async fn producer_compute<T: Send + 'static>(
        self: &std::sync::Arc<Self>,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, tokio::task::JoinError> {
        let control = self.clone();
        tokio::task::spawn_blocking(move || {
            let _pinned = control.cpu.producer();
            f()
        })
        .await
    }
    /// Has a stop been requested?
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
    /// Read a counter.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
    /// Add to a counter.
    pub fn add(c: &AtomicU64, v: u64) {
        c.fetch_add(v, Ordering::Relaxed);
    }
    /// The latest learner statistics.
    pub fn last(&self) -> LastStats {
        self.last.lock().map(|g| *g).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sync_turns_allow_one_unit_at_a_time() {
        let t = SyncTurns::default();
        // No request yet: a producer waits.
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(20), t.wait_turn())
                .await
                .is_err()
        );
        assert!(t.request_if_idle());
        // A second request while the first unit is being made is refused.
        assert!(!t.request_if_idle());
        t.wait_turn().await;
        assert_eq!(t.counts(), (1, 0));
        t.unit_done();
        assert_eq!(t.counts(), (1, 1));
        // The unit is in: the next request goes through.
        assert!(t.request_if_idle());
        assert_eq!(t.counts(), (2, 1));
    }
}
