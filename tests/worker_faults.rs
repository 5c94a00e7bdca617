//! Process-level faults of a multi-process run (`tilt worker --role rollout|critic|learner`), on
//! a redis-server the test starts itself. A worker is killed with SIGKILL in the middle of the
//! run ("middle" is read from the learner's progress log and its checkpoints, never from a
//! clock), started again, and the run must still finish, meet the quickstart's quality bar, and
//! the learner must continue from its newest complete checkpoint, never from step 0.

mod common;

use std::path::Path;
use std::time::Duration;

use common::redis_server::{Persistence, RedisServer};
use common::workers::Workers;
use common::*;

/// The learner's step budget of the kill test: the quickstart's 1500 plus margin for the steps
/// the faults cost. At 2000 one CI run on heavily loaded cores (load ~6 on 2 cores) ended at gap
/// closed 0.90 and a mode-weight error of 0.085, against 0.98 / 0.029 in other runs; 3000 leaves
/// the run time to settle after the last restart.
const BUDGET: u64 = 3000;
/// Bound on a whole run, restarts included: it catches a hang, it does not time the run. The kill
/// test takes ~75 s on idle cores and was measured at 230 s on loaded ones, and the tests of
/// this file run two at a time on CI's two cores, so the bound leaves more than 2x of that.
const RUN_LIMIT: Duration = Duration::from_secs(600);

/// A run of the quickstart's three workers (`configs/quickstart-redis.toml`) with a step budget.
type Cluster = Workers;

fn cluster(redis: &RedisServer, name: &str, budget: u64, sets: &[&str]) -> Cluster {
    let mut all = vec![
        format!("vrpo.steps={budget}"),
        "eval.at_steps=[]".to_owned(),
        "learner.checkpoint_every=250".to_owned(),
        "metrics.progress_every_s=0.25".to_owned(),
    ];
    all.extend(sets.iter().map(|s| (*s).to_owned()));
    Workers::new(
        redis.url(),
        name,
        "configs/quickstart-redis.toml",
        all,
        "vrpo",
        RUN_LIMIT,
    )
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
    let mut run = cluster(&redis, "kill9", BUDGET, &[]);
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
    // Both learner processes read the replay as one consumer, `learner-0`: the restarted one
    // took its predecessor's pending entries at start instead of leaving them unclaimed for
    // `claim_idle` (30 s, longer than the rest of this run), which throttled the producers to
    // the learner's pace and made every batch a few records repeated (errors of 0.06-0.07).
    let id = run.run_id.clone();
    assert_eq!(consumers(&redis, &id, "replay"), ["learner-0"]);
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
    let mut run = cluster(
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

/// The consumer names of stream `tilt:{RUN}:<stream>`'s group (`XINFO CONSUMERS`).
fn consumers(redis: &RedisServer, run_id: &str, stream: &str) -> Vec<String> {
    let out = redis.cli(&[
        "XINFO",
        "CONSUMERS",
        &format!("tilt:{{{run_id}}}:{stream}"),
        "learners",
    ]);
    let mut names = Vec::new();
    let mut lines = out.lines().map(str::trim);
    while let Some(l) = lines.next() {
        if l == "name" {
            names.extend(lines.next().map(str::to_owned));
        }
    }
    names
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
///
/// The frozen run samples FIFO. With the uniform sampler a learner reads every entry the
/// stream holds into its window (it samples from all of them), so once the producers are held
/// by the rate limiter nothing is left undelivered, and a learner frozen at such a moment never
/// leaves a backlog (CI saw it wait 5 minutes for one). A FIFO learner holds only one batch of
/// records, so the rest of the limiter's budget (thousands of records here) stays in the stream.
fn redis_restart_mid_run(
    persistence: Persistence,
    name: &str,
    freeze: bool,
) -> (serde_json::Value, u64) {
    const STEPS: u64 = 600;
    let mut redis = RedisServer::start_with(persistence);
    let mut sets = vec![
        "critic.rollouts=1000",
        "critic.train_steps=150",
        "eval.samples=4000",
        "eval.target_samples=8000",
    ];
    if freeze {
        sets.push("replay.sampler=fifo");
    }
    let mut run = cluster(&redis, name, STEPS, &sets);
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
