//! Process-level faults of a multi-process run (`tilt worker --role rollout|critic|learner`), on
//! a redis-server the test starts itself. A worker is killed with SIGKILL in the middle of the
//! run ("middle" is read from the learner's progress log and its checkpoints, never from a
//! clock), started again, and the run must still finish, meet the quickstart's quality bar, and
//! the learner must continue from its newest complete checkpoint, never from step 0.

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use common::redis_server::{Persistence, RedisServer};
use common::*;

/// The learner's step budget of the kill test: the quickstart's 1500 plus margin for the steps
/// the faults cost. At 2000 one CI run on heavily loaded cores (load ~6 on 2 cores) ended at gap
/// closed 0.90 and a mode-weight error of 0.085, against 0.98 / 0.029 in other runs; 3000 leaves
/// the run time to settle after the last restart.
const BUDGET: u64 = 3000;
/// Bound on a whole run, restarts included (~1 min measured on 2 shared cores).
const RUN_LIMIT: Duration = Duration::from_secs(300);

/// A multi-process run: its workers as child processes, each worker's output in
/// `worker-<role>-<n>.{out,err}` of the run directory (n = how often that role was started).
struct Cluster {
    redis_url: String,
    run_id: String,
    dir: PathBuf,
    sets: Vec<String>,
    workers: BTreeMap<&'static str, Child>,
    starts: BTreeMap<&'static str, u32>,
    t0: Instant,
}

impl Cluster {
    fn new(redis: &RedisServer, name: &str, budget: u64, sets: &[&str]) -> Self {
        let dir = scratch(name).join("run");
        let mut all = vec![
            format!("vrpo.steps={budget}"),
            "eval.at_steps=[]".to_owned(),
            "learner.checkpoint_every=250".to_owned(),
            "metrics.progress_every_s=0.25".to_owned(),
        ];
        all.extend(sets.iter().map(|s| (*s).to_owned()));
        Self {
            redis_url: redis.url(),
            run_id: format!("{name}-{}", std::process::id()),
            dir,
            sets: all,
            workers: BTreeMap::new(),
            starts: BTreeMap::new(),
            t0: Instant::now(),
        }
    }

    /// Start (or start again) the worker of `role`.
    fn start(&mut self, role: &'static str) {
        assert!(!self.workers.contains_key(role), "{role} runs already");
        let n = self.starts.entry(role).or_insert(0);
        *n += 1;
        let log = |ext: &str| {
            std::fs::create_dir_all(&self.dir).unwrap();
            File::create(self.dir.join(format!("worker-{role}-{n}.{ext}"))).unwrap()
        };
        let mut args = vec![
            "worker",
            "--role",
            role,
            "--config",
            "configs/quickstart-redis.toml",
            "--run-id",
            &self.run_id,
            "--out",
            self.dir.to_str().unwrap(),
        ];
        for s in &self.sets {
            args.extend(["--set", s.as_str()]);
        }
        let child = tilt_cmd(&args)
            .env("TILT_REDIS_URL", &self.redis_url)
            .stdout(log("out"))
            .stderr(log("err"))
            .spawn()
            .expect("tilt worker starts");
        self.workers.insert(role, child);
    }

    /// SIGKILL the worker of `role` and reap it.
    fn kill9(&mut self, role: &'static str) {
        let mut c = self.workers.remove(role).expect("the worker runs");
        c.kill().unwrap();
        let status = c.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9), "{role} was not killed: {status}");
        eprintln!(
            "killed the {role} worker at {:.1}s (learner step {:?})",
            self.t0.elapsed().as_secs_f64(),
            self.learner_step()
        );
    }

    /// SIGTERM the worker of `role` and wait for it to exit (it must exit 0).
    fn sigterm(&mut self, role: &'static str) {
        let mut c = self.workers.remove(role).expect("the worker runs");
        let st = std::process::Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        let status = c.wait().unwrap();
        assert!(
            status.success(),
            "{role} after SIGTERM: {status}\n{}",
            self.logs()
        );
    }

    /// Send `kill -<sig>` (STOP, CONT) to the worker of `role`.
    fn signal(&mut self, role: &'static str, sig: &str) {
        let c = self.workers.get(role).expect("the worker runs");
        let st = std::process::Command::new("kill")
            .args([format!("-{sig}"), c.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success(), "kill -{sig} {role}");
    }

    /// Whether the worker of `role` is still running.
    fn running(&mut self, role: &'static str) -> bool {
        self.workers
            .get_mut(role)
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Stderr of the `n`-th start of `role`.
    fn stderr(&self, role: &str, n: u32) -> String {
        std::fs::read_to_string(self.dir.join(format!("worker-{role}-{n}.err"))).unwrap_or_default()
    }

    /// Every worker's latest stderr, for failure messages.
    fn logs(&self) -> String {
        self.starts
            .iter()
            .map(|(role, n)| format!("--- {role} (start {n}) ---\n{}", self.stderr(role, *n)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Panic with the logs if a worker has exited with an error.
    fn check_alive(&mut self) {
        let mut failed = None;
        for (role, c) in &mut self.workers {
            if let Ok(Some(st)) = c.try_wait() {
                if !st.success() {
                    failed = Some(format!("the {role} worker exited with {st}"));
                }
            }
        }
        if let Some(f) = failed {
            panic!("{f}\n{}", self.logs());
        }
    }

    /// Poll `cond` (and the workers' health) until it holds; panic after [`RUN_LIMIT`].
    fn wait(&mut self, what: &str, mut cond: impl FnMut(&Self) -> bool) {
        let end = self.t0 + RUN_LIMIT;
        while !cond(self) {
            self.check_alive();
            assert!(
                Instant::now() < end,
                "timed out waiting for {what}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The learner's step in its progress log (the last line of any learner process).
    fn learner_step(&self) -> Option<u64> {
        let log = std::fs::read_to_string(self.dir.join("progress-learner.log")).ok()?;
        log.lines()
            .rev()
            .find_map(|l| l.strip_prefix("[vrpo] step "))
            .and_then(|r| r.split('/').next())
            .and_then(|s| s.parse().ok())
    }

    /// Wait for every worker to exit; all must succeed. Returns the exit statuses.
    fn finish(&mut self) -> BTreeMap<&'static str, ExitStatus> {
        let mut done = BTreeMap::new();
        let end = self.t0 + RUN_LIMIT;
        while !self.workers.is_empty() {
            let exited: Vec<&'static str> = self
                .workers
                .iter_mut()
                .filter_map(|(r, c)| c.try_wait().ok().flatten().map(|_| *r))
                .collect();
            for r in exited {
                let st = self.workers.remove(r).unwrap().wait().unwrap();
                assert!(
                    st.success(),
                    "the {r} worker exited with {st}\n{}",
                    self.logs()
                );
                done.insert(r, st);
            }
            assert!(Instant::now() < end, "the run did not end\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(50));
        }
        done
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in self.workers.values_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The newest complete checkpoint's step (`checkpoints/step-N` with its `state.json`).
fn newest_checkpoint(run_dir: &Path) -> Option<u64> {
    std::fs::read_dir(run_dir.join("checkpoints"))
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("state.json").exists())
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
        .max()
}

/// The quickstart's bar (issue 3), as the three-worker test checks it.
fn assert_quality(s: &serde_json::Value) {
    let gap = s["gap_closed"].as_f64().unwrap();
    let err_modes = s["max_mode_weight_error"].as_f64().unwrap();
    assert!(gap >= 0.85, "gap_closed {gap}: {s}");
    assert!(err_modes <= 0.05, "max mode-weight error {err_modes}: {s}");
}

#[test]
fn kill9_of_each_worker_mid_run_then_restart_finishes_from_the_newest_checkpoint() {
    let redis = RedisServer::start();
    let mut run = Cluster::new(&redis, "kill9", BUDGET, &[]);
    for role in ["critic", "rollout", "learner"] {
        run.start(role);
    }

    // A rollout worker dies at 15% of the budget, a critic worker at 30%; each starts again.
    run.wait("15% of the steps", |r| {
        r.learner_step().is_some_and(|s| s >= BUDGET * 15 / 100)
    });
    run.kill9("rollout");
    run.start("rollout");
    run.wait("30% of the steps", |r| {
        r.learner_step().is_some_and(|s| s >= BUDGET * 30 / 100)
    });
    run.kill9("critic");
    run.start("critic");

    // The learner dies past its half-way checkpoint, with steps done beyond it that the
    // restarted learner must redo (it may not continue from anything newer than a complete
    // checkpoint, nor from 0).
    run.wait(
        "a checkpoint at half the budget, and 100 steps beyond it",
        |r| {
            newest_checkpoint(&r.dir)
                .is_some_and(|c| c >= BUDGET / 2 && r.learner_step().is_some_and(|s| s >= c + 100))
        },
    );
    run.kill9("learner");
    let ck = newest_checkpoint(&run.dir).unwrap();
    run.start("learner");
    run.finish();
    eprintln!("the run finished at {:.1}s", run.t0.elapsed().as_secs_f64());

    let resumed = run.stderr("learner", 2);
    assert!(
        resumed.contains(&format!("[vrpo] resuming from checkpoint step {ck} ")),
        "the restarted learner must resume from step {ck}:\n{resumed}"
    );
    let vrpo = json(&run.dir.join("vrpo.json"));
    assert_eq!(vrpo["resumed_from"], ck, "{vrpo}");
    assert!(ck >= BUDGET / 2);
    let s = json(&run.dir.join("summary.json"));
    assert_eq!(s["steps"], BUDGET, "{s}");
    assert_eq!(newest_checkpoint(&run.dir), Some(BUDGET));
    assert_quality(&s);
    // Every produced record has exactly one fate. (Records the killed learner applied after its
    // last checkpoint were acknowledged, so they are gone from the stream, and the restarted
    // learner's ledger, from that checkpoint, does not hold them: they count as lost.)
    eprintln!("accounting: {}", accounting(&s));
    // One restart of each worker process, counted across processes (each registers its start
    // in Redis; the learner reads them for the summary).
    assert_eq!(s["restarts"], 3, "{s}");
    let relog = run.stderr("learner", 2);
    assert!(
        relog.contains(r#"processes {"critic-0": 1, "learner-0": 1, "rollout-0": 1}"#),
        "{relog}"
    );
    // Pairs per second in worker mode: the learner counts the other processes' inserts (the
    // quickstart inserts a few thousand records per second; 0 would mean it counts nothing).
    let pps = s["throughput"]["pairs_per_s"].as_f64().unwrap();
    assert!(pps > 100.0, "pairs_per_s {pps}: {s}");
    let progress = std::fs::read_to_string(run.dir.join("progress-learner.log")).unwrap();
    let last = progress
        .lines()
        .rev()
        .find(|l| l.starts_with("[vrpo] step "))
        .unwrap();
    assert!(!last.contains("| 0 pairs/s in"), "{last}");
    // The replacement producers really produced: the restarted learner trained on their pairs
    // (the old ones are dead), and its producers stopped on the done mark with exit 0.
    for role in ["rollout", "critic"] {
        let e = run.stderr(role, 2);
        assert!(e.contains("producers stopped"), "{role}:\n{e}");
    }
}

#[test]
fn sigterm_pauses_the_learner_without_stopping_the_producers_and_it_resumes() {
    // A small run (the point is finished vs paused, not quality): the learner gets SIGTERM at a
    // third of its budget, checkpoints and exits 0 without marking the run done; the producers
    // keep running; `tilt worker --role learner` continues from the paused step to the budget,
    // and only then do the producers stop.
    const STEPS: u64 = 600;
    let redis = RedisServer::start();
    let mut run = Cluster::new(
        &redis,
        "pause",
        STEPS,
        &[
            "critic.rollouts=1000",
            "critic.train_steps=150",
            "eval.samples=4000",
            "eval.target_samples=8000",
        ],
    );
    for role in ["critic", "rollout", "learner"] {
        run.start(role);
    }
    run.wait("a third of the steps", |r| {
        r.learner_step().is_some_and(|s| s >= STEPS / 3)
    });
    run.sigterm("learner");
    let paused = newest_checkpoint(&run.dir).unwrap();
    assert!((STEPS / 3..STEPS).contains(&paused), "paused at {paused}");
    let e = run.stderr("learner", 1);
    assert!(
        e.contains(&format!("the learner paused at step {paused} of {STEPS}")),
        "{e}"
    );
    assert!(!run.dir.join("summary.json").exists());
    assert_eq!(
        redis.keys(&format!("tilt:{}:done", run.run_id)),
        Vec::<String>::new()
    );

    // The producers stay up (they would stop within a done-mark poll, 300 ms, of a mark): each
    // writes four more progress lines (0.25 s apart) after the learner's exit, and neither has
    // stopped; while paused they are held by the replay's back-pressure, not by the mark.
    let log = |r: &Cluster, role: &str| {
        std::fs::read_to_string(r.dir.join(format!("progress-{role}.log"))).unwrap_or_default()
    };
    let ticks = |r: &Cluster, role: &str| {
        log(r, role)
            .lines()
            .filter(|l| l.starts_with("[vrpo:producer]"))
            .count()
    };
    let before = (ticks(&run, "rollout"), ticks(&run, "critic"));
    run.wait("producer progress lines after the pause", |r| {
        ticks(r, "rollout") > before.0 + 4 && ticks(r, "critic") > before.1 + 4
    });
    for role in ["rollout", "critic"] {
        assert!(
            run.running(role),
            "the {role} worker stopped with the learner"
        );
        assert!(!log(&run, role).contains("producers stopped"), "{role}");
    }

    run.start("learner");
    run.finish();
    let resumed = run.stderr("learner", 2);
    assert!(
        resumed.contains(&format!("[vrpo] resuming from checkpoint step {paused} ")),
        "{resumed}"
    );
    let s = json(&run.dir.join("summary.json"));
    assert_eq!(s["steps"], STEPS, "{s}");
    assert_eq!(json(&run.dir.join("vrpo.json"))["resumed_from"], paused);
    // The learner's second start is a restart of learner-0.
    assert_eq!(s["restarts"], 1, "{s}");
}

/// Entries of the run's replay stream never delivered to the learners (`XINFO GROUPS` lag).
fn undelivered(redis: &RedisServer, run_id: &str) -> u64 {
    let out = redis.cli(&["XINFO", "GROUPS", &format!("tilt:{{{run_id}}}:replay")]);
    let mut lines = out.lines().map(str::trim);
    while let Some(l) = lines.next() {
        if l == "lag" {
            return lines.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        }
    }
    0
}

/// A small run whose Redis is SIGKILLed and started again on the same port at 40% of the
/// learner's budget: the workers reconnect (with back-off) and the run finishes at its budget.
/// With `freeze`, the learner is stopped (SIGSTOP) first until the stream holds records it was
/// never delivered, and continued (SIGCONT) after the restart, so that an empty restart loses
/// records for certain. Returns the summary and those undelivered records.
fn redis_restart_mid_run(
    persistence: Persistence,
    name: &str,
    freeze: bool,
) -> (serde_json::Value, u64) {
    const STEPS: u64 = 600;
    let mut redis = RedisServer::start_with(persistence);
    let mut run = Cluster::new(
        &redis,
        name,
        STEPS,
        &[
            "critic.rollouts=1000",
            "critic.train_steps=150",
            "eval.samples=4000",
            "eval.target_samples=8000",
        ],
    );
    for role in ["critic", "rollout", "learner"] {
        run.start(role);
    }
    run.wait("40% of the steps", |r| {
        r.learner_step().is_some_and(|s| s >= STEPS * 40 / 100)
    });
    let at = run.learner_step().unwrap();
    let mut backlog = 0;
    if freeze {
        run.signal("learner", "STOP");
        let id = run.run_id.clone();
        run.wait("records never delivered to the frozen learner", |_| {
            undelivered(&redis, &id) > 0
        });
        backlog = undelivered(&redis, &id);
    }
    redis.restart();
    if freeze {
        run.signal("learner", "CONT");
    }
    eprintln!("redis ({persistence:?}) restarted at learner step {at}");
    run.wait("learner progress after the Redis restart", |r| {
        r.learner_step().is_some_and(|s| s > at + 50)
    });
    run.finish();
    let s = json(&run.dir.join("summary.json"));
    assert_eq!(s["steps"], STEPS, "{s}");
    eprintln!("accounting: {}", s["accounting"]);
    (s, backlog)
}

#[test]
fn redis_restart_with_aof_mid_run_is_survived() {
    let (s, _) = redis_restart_mid_run(Persistence::Aof, "redis-aof", false);
    // Nothing restarted but Redis: the starts kept in the AOF show no worker restart.
    assert_eq!(s["restarts"], 0, "{s}");
    // The AOF kept every record: nothing lost, and every produced record has its fate.
    let a = accounting(&s);
    assert_eq!(a["lost"], 0, "{a}");
}

#[test]
fn redis_restart_empty_mid_run_is_survived() {
    let (s, backlog) = redis_restart_mid_run(Persistence::None, "redis-empty", true);
    // The records in the stream that the frozen learner never got went with Redis: they are
    // counted lost (at least those; more were inserted before the kill), found from the gaps in
    // the producers' sequence numbers, and every produced record still has exactly one fate.
    let a = accounting(&s);
    let lost = a["lost"].as_u64().unwrap();
    assert!(
        backlog > 0 && lost >= backlog,
        "lost {lost}, backlog {backlog}: {a}"
    );
}
