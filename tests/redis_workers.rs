//! Multi-process runs on a real Redis (a redis-server each test starts on a free port): the
//! single-process run on the Redis backend, the three-worker run through scripts/cluster-local.sh
//! meeting the quickstart's quality bar, and a clear error (without the password) when Redis is
//! down.

mod common;
use common::redis_server::RedisServer;
use common::*;

#[test]
fn single_process_run_on_the_redis_backend_cleans_up_its_keys() {
    let redis = RedisServer::start();
    let d = scratch("redis-single");
    let out = d.join("run");
    let o = tilt_on(
        &redis.url(),
        &[
            "run",
            "configs/smoke.toml",
            "--out",
            out.to_str().unwrap(),
            "--set",
            "replay.backend=redis",
            "--set",
            "name=redis-single-test",
        ],
    );
    assert!(o.status.success(), "{}", err(&o));
    let s = json(&out.join("summary.json"));
    assert_eq!(s["steps"], 60);
    assert!(s["gap_closed"].as_f64().unwrap() > 0.25, "{s}");
    // Every record accounted for: nothing lost, redelivered or deduplicated (one consumer, no
    // fault); 60 steps of 64 rows; each record used at most U = samples_per_insert = 4 times.
    let a = accounting(&s);
    assert_eq!(
        (&a["lost"], &a["redelivered"], &a["deduplicated"]),
        (&0.into(), &0.into(), &0.into()),
        "{a}"
    );
    assert_eq!(a["applications"], 60 * 64, "{a}");
    assert!(
        a["applications"].as_u64() <= a["applied"].as_u64().map(|n| 4 * n),
        "{a}"
    );
    assert_eq!(
        redis.keys("tilt:*"),
        Vec::<String>::new(),
        "the run's Redis keys must be removed"
    );
}

#[test]
fn redis_down_is_one_clear_line_without_the_password() {
    let d = scratch("redis-down");
    let out = d.join("run");
    let o = tilt(&[
        "run",
        "configs/smoke.toml",
        "--out",
        out.to_str().unwrap(),
        "--set",
        "replay.backend=redis",
        "--set",
        "replay.url=redis://:hunter2@127.0.0.1:1/",
    ]);
    let e = err(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    let errors: Vec<&str> = e.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "{e}");
    assert!(errors[0].contains("127.0.0.1:1"), "{e}");
    assert!(!e.contains("hunter2"), "the password leaked: {e}");
    assert!(!std::fs::read_to_string(out.join("config.toml"))
        .unwrap()
        .contains("hunter2"));
    assert!(
        !out.join("summary.json").exists() && !out.join("critic.json").exists(),
        "no work before Redis answers"
    );
}

#[test]
fn three_workers_meet_through_redis_and_reach_the_target() {
    // The quickstart experiment (K = 100, L = 10, soft labels, learned critic) as three processes,
    // with 2000 instead of 1500 learner steps for margin (~30 s since the learner speed-ups). Measured max mode-weight errors at
    // 1500 steps: 0.015 (one process), 0.025 (three processes), 0.043 (exact value); shortened runs
    // sat at the bar (600 steps: 0.059; 1200 steps with a shorter critic stage: 0.053).
    // Bar (issue 3): gap_closed >= 0.85 and every mode weight within 0.05 of the target.
    let redis = RedisServer::start();
    let run_id = format!("ci-cluster-{}", std::process::id());
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/cluster-local.sh");
    let o = std::process::Command::new("bash")
        .arg(script)
        .args(["configs/quickstart-redis.toml", &run_id])
        .args(["--set", "eval.at_steps=[]", "--set", "vrpo.steps=2000"])
        .env("TILT_BIN", env!("CARGO_BIN_EXE_tilt"))
        .env("TILT_REDIS_URL", redis.url())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let e = err(&o);
    assert!(o.status.success(), "{e}");
    let stdout = String::from_utf8_lossy(&o.stdout);
    let summary = std::path::PathBuf::from(
        stdout
            .lines()
            .last()
            .expect("the summary path is the last line")
            .trim(),
    );
    assert!(summary.ends_with("summary.json"), "{stdout}");
    let s = json(&summary);
    let gap = s["gap_closed"].as_f64().unwrap();
    let err_modes = s["max_mode_weight_error"].as_f64().unwrap();
    assert!(gap >= 0.85, "gap_closed {gap}");
    assert!(err_modes <= 0.05, "max mode-weight error {err_modes}: {s}");
    assert_eq!(s["steps"], 2000);
    // The learner process counts the other processes' inserts (the Redis backend's counter).
    let pps = s["throughput"]["pairs_per_s"].as_f64().unwrap();
    assert!(pps > 0.0, "pairs_per_s in worker mode: {pps}");
    assert_eq!(redis.keys("tilt:*"), Vec::<String>::new());
    let dir = summary.parent().unwrap();
    for role in ["rollout", "critic", "learner"] {
        assert!(dir.join(format!("progress-{role}.log")).exists(), "{role}");
    }
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn a_missing_redis_server_says_how_to_install_it() {
    // What a machine without Redis sees from every Redis test: one message with the install
    // command, not a connection error.
    let e = std::panic::catch_unwind(|| {
        RedisServer::start_program(
            "tilt-test-no-such-redis-server",
            common::redis_server::Persistence::None,
        )
    })
    .err()
    .expect("starting a missing binary must fail");
    let msg = e
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_default();
    assert!(msg.contains("apt-get install redis-server"), "{msg}");
}
