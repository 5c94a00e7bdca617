//! Where the roles' compute runs on this host's cores (`pin_cores = true`).
//!
//! On a machine whose cores the learners and the producers share, the OS scheduler moves their
//! threads around: a producer woken on the learner's core preempts the learner step for a time
//! slice, and the learner waits although the step is the pipeline's bottleneck. A [`CpuPlan`]
//! splits the cores this process may use (its affinity mask at start, so `taskset` and cgroup
//! limits are respected) into the learners' cores (the first ones) and the producers' cores (the
//! rest). Compute enters its role's cores with [`CpuPlan::learner`] or [`CpuPlan::producer`]; the
//! returned guard gives the thread its previous mask back when dropped, so a runtime worker that
//! ran a learner step is free again afterwards. Threads started inside inherit the mask (the
//! fused learner step's helper threads). Unpinned plans do nothing.

use std::fmt;

/// A set of core ids (as the OS numbers them).
pub type Cores = Vec<usize>;

/// How the roles' compute is placed on the cores.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuPlan {
    /// The learners' cores; empty = unpinned.
    learner: Cores,
    /// The producers' cores (rollout, critic, distortion); empty = unpinned.
    producers: Cores,
}

impl fmt::Display for CpuPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.learner.is_empty() {
            return write!(f, "unpinned");
        }
        write!(
            f,
            "learners on cores {:?}, producers on cores {:?}",
            self.learner, self.producers
        )
    }
}

impl CpuPlan {
    /// No pinning: every thread may run on every core.
    pub fn unpinned() -> Self {
        Self::default()
    }

    /// Split `allowed` (the cores this process may use, in order): the first `learner` cores to
    /// the learners, the rest to the producers. Both roles need at least one core.
    pub fn split(allowed: &[usize], learner: usize) -> Result<Self, String> {
        if learner == 0 || learner >= allowed.len() {
            return Err(format!(
                "pin_cores: the learners need {learner} core(s) and the producers at least one, \
                 but this process may use {} core(s) ({allowed:?}); lower learner.threads or \
                 set pin_cores = false",
                allowed.len()
            ));
        }
        Ok(Self {
            learner: allowed[..learner].to_vec(),
            producers: allowed[learner..].to_vec(),
        })
    }

    /// [`CpuPlan::split`] of the cores this process may use now.
    pub fn split_allowed(learner: usize) -> Result<Self, String> {
        Self::split(&allowed_cores()?, learner)
    }

    /// Is anything pinned?
    pub fn pinned(&self) -> bool {
        !self.learner.is_empty()
    }

    /// The learners' cores (empty when unpinned).
    pub fn learner_cores(&self) -> &[usize] {
        &self.learner
    }

    /// The producers' cores (empty when unpinned).
    pub fn producer_cores(&self) -> &[usize] {
        &self.producers
    }

    /// Run the current thread on the learners' cores until the guard is dropped.
    pub fn learner(&self) -> Pinned {
        Pinned::enter(&self.learner)
    }

    /// Run the current thread on the producers' cores until the guard is dropped.
    pub fn producer(&self) -> Pinned {
        Pinned::enter(&self.producers)
    }
}

/// The current thread's previous affinity, restored on drop (nothing when nothing was pinned).
#[derive(Debug)]
#[must_use = "the thread is pinned only while the guard lives"]
pub struct Pinned {
    #[cfg(target_os = "linux")]
    previous: Option<nix::sched::CpuSet>,
}

#[cfg(target_os = "linux")]
mod os {
    use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
    use nix::unistd::Pid;

    /// The calling thread (pid 0 in the affinity calls).
    fn this_thread() -> Pid {
        Pid::from_raw(0)
    }

    pub(super) fn current() -> Result<CpuSet, String> {
        sched_getaffinity(this_thread()).map_err(|e| format!("sched_getaffinity: {e}"))
    }

    pub(super) fn set(mask: &CpuSet) -> Result<(), String> {
        sched_setaffinity(this_thread(), mask).map_err(|e| format!("sched_setaffinity: {e}"))
    }

    pub(super) fn mask(cores: &[usize]) -> Result<CpuSet, String> {
        let mut m = CpuSet::new();
        for &c in cores {
            m.set(c).map_err(|e| format!("core {c}: {e}"))?;
        }
        Ok(m)
    }

    pub(super) fn cores(mask: &CpuSet) -> Vec<usize> {
        (0..CpuSet::count())
            .filter(|&c| mask.is_set(c).unwrap_or(false))
            .collect()
    }
}

/// The cores the current thread may run on, in order.
pub fn allowed_cores() -> Result<Cores, String> {
    #[cfg(target_os = "linux")]
    {
        Ok(os::cores(&os::current()?))
    }
    #[cfg(not(target_os = "linux"))]
    {
        Err("pin_cores needs Linux (sched_setaffinity)".into())
    }
}

impl Pinned {
    fn enter(cores: &[usize]) -> Self {
        #[cfg(target_os = "linux")]
        {
            if cores.is_empty() {
                return Self { previous: None };
            }
            // A plan is made from the process's allowed cores at start, so setting it only
            // fails if the cores were taken away since (a cgroup change): then the thread stays
            // where it was, which is correct, only slower, and said once.
            let previous = os::current().ok();
            match os::mask(cores).and_then(|m| os::set(&m)) {
                Ok(()) => Self { previous },
                Err(e) => {
                    warn_once(&e);
                    Self { previous: None }
                }
            }
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = cores;
            Self {}
        }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        if let Some(p) = self.previous.take() {
            if let Err(e) = os::set(&p) {
                warn_once(&e);
            }
        }
    }
}

/// Run CPU-heavy work without stalling the async executor and without a hand-off to another
/// thread: on a multi-thread runtime the current worker hands its other tasks (the metrics
/// endpoint, heartbeats) to the other workers first (`block_in_place`) and runs the work itself,
/// so nothing waits for a wake-up when it is done; on a current-thread runtime, or outside one,
/// the work just runs.
pub fn off_executor<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

#[cfg(target_os = "linux")]
fn warn_once(e: &str) {
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| eprintln!("tilt: warning: pin_cores: {e}; the thread runs unpinned"));
}

#[cfg(test)]
mod executor_tests {
    use super::off_executor;

    /// `block_in_place` alone panics on a current-thread runtime (the default of `#[tokio::test]`);
    /// `off_executor` must run the closure on every kind of runtime and outside one.
    #[test]
    fn off_executor_runs_on_every_runtime_flavor() {
        assert_eq!(off_executor(|| 1 + 1), 2);
        let ct = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_eq!(ct.block_on(async { off_executor(|| 3) }), 3);
        let mt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        let on_worker = mt.block_on(async {
            tokio::spawn(async { off_executor(|| std::thread::current().id()) })
                .await
                .unwrap()
        });
        assert_ne!(on_worker, std::thread::current().id());
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn split_gives_the_first_cores_to_the_learners_and_the_rest_to_the_producers() {
        let p = CpuPlan::split(&[2, 3, 5, 7], 1).unwrap();
        assert_eq!(p.learner_cores(), &[2]);
        assert_eq!(p.producer_cores(), &[3, 5, 7]);
        let p = CpuPlan::split(&[0, 1, 2, 3], 3).unwrap();
        assert_eq!(p.learner_cores(), &[0, 1, 2]);
        assert_eq!(p.producer_cores(), &[3]);
        assert_eq!(
            p.to_string(),
            "learners on cores [0, 1, 2], producers on cores [3]"
        );
        assert_eq!(CpuPlan::unpinned().to_string(), "unpinned");
        assert!(!CpuPlan::unpinned().pinned());
    }

    #[test]
    fn split_refuses_a_role_without_a_core() {
        for (allowed, learner) in [(vec![0, 1], 2), (vec![0, 1], 0), (vec![0], 1)] {
            let e = CpuPlan::split(&allowed, learner).unwrap_err();
            assert!(e.contains("pin_cores"), "{e}");
        }
    }

    /// The guard pins the thread to its role's cores and gives the previous mask back; run on a
    /// thread of its own so the test harness's threads keep theirs.
    #[test]
    fn a_pinned_thread_runs_on_its_roles_cores_and_gets_its_mask_back() {
        std::thread::spawn(|| {
            let allowed = allowed_cores().unwrap();
            if allowed.len() < 2 {
                eprintln!("skipped: this process may use {allowed:?}, the test needs 2 cores");
                return;
            }
            let plan = CpuPlan::split(&allowed, 1).unwrap();
            {
                let _g = plan.learner();
                assert_eq!(allowed_cores().unwrap(), plan.learner_cores());
                // A thread started while pinned inherits the mask (the fused step's helpers).
                let inner = std::thread::spawn(allowed_cores).join().unwrap().unwrap();
                assert_eq!(inner, plan.learner_cores());
                {
                    let _p = plan.producer();
                    assert_eq!(allowed_cores().unwrap(), plan.producer_cores());
                }
                assert_eq!(allowed_cores().unwrap(), plan.learner_cores());
            }
            assert_eq!(allowed_cores().unwrap(), allowed);
            let _u = CpuPlan::unpinned().learner();
            assert_eq!(allowed_cores().unwrap(), allowed);
        })
        .join()
        .unwrap();
    }
}
