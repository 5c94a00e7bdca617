//! DF-DPO in worker mode (`tilt worker --role distortion|learner`) on a redis-server of the
//! test's own: a distortion worker and the learner are each killed with SIGKILL in the middle of
//! the run ("middle" read from the learner's checkpoints, never from a clock) and started again;
//! the run still finishes every continuation and the eval, the learner continues the continuation
//! it was on from its newest complete checkpoint (never from 0), the restarts are counted, and
//! every record is accounted for.

mod common;

use std::path::Path;
use std::time::Duration;

use common::redis_server::RedisServer;
use common::workers::Workers;
use common::*;
use tilt_actors::checkpoint::latest_checkpoint;

/// Steps of each continuation (sft, dfdpo), checkpointed every 10.
const STEPS: u64 = 80;
/// Bound on the whole run, restarts included.
const RUN_LIMIT: Duration = Duration::from_secs(240);

/// The tiny DF-DPO config of the test, on the Redis backend.
fn workers(redis: &RedisServer) -> Workers {
    let sets = [
        "replay.backend=redis",
        "video.clips=24",
        "pretrain.steps=8",
        "pretrain.batch=4",
        &format!("dfdpo.steps={STEPS}"),
        "dfdpo.batch=2",
        "dfdpo.curriculum.every=20",
        "learner.checkpoint_every=10",
        "eval.samples=3",
        "sampling.steps=4",
        "replay.min_size=8",
        "replay.capacity=64",
        "metrics.listen=",
        "metrics.progress_every_s=0.25",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    Workers::new(
        redis.url(),
        "dfdpo-workers",
        "configs/video-dfdpo.toml",
        sets,
        "dfdpo",
        RUN_LIMIT,
    )
}

/// Newest complete checkpoint step of continuation `name`.
fn checkpoint(w: &Workers, name: &str) -> Option<u64> {
    latest_checkpoint(&w.dir.join(name))
        .ok()
        .flatten()
        .map(|(s, _)| s)
}

#[test]
fn dfdpo_workers_survive_kill9_of_the_distortion_worker_and_the_learner() {
    let redis = RedisServer::start();
    let mut w = workers(&redis);
    w.start("learner");
    w.start("distortion");
    // The distortion worker dies once the learner has trained on its pairs (sft's first
    // checkpoint), and a new one takes over.
    w.wait("an sft checkpoint", |w| checkpoint(w, "sft").is_some());
    w.kill9("distortion");
    w.start("distortion");
    // The learner dies in the middle of the dfdpo continuation.
    w.wait("a dfdpo checkpoint", |w| checkpoint(w, "dfdpo").is_some());
    w.kill9("learner");
    let at_kill = checkpoint(&w, "dfdpo").unwrap();
    assert!(
        at_kill < STEPS,
        "the learner was killed after dfdpo finished (checkpoint {at_kill}); the test needs a run \
         still in the middle: raise STEPS"
    );
    w.start("learner");
    w.finish();

    let learner2 = w.stderr("learner", 2);
    assert!(
        learner2.contains(&format!("resuming from checkpoint step {at_kill}")),
        "{learner2}"
    );
    assert!(learner2.contains("[sft] already trained"), "{learner2}");
    let d2 = w.stderr("distortion", 2);
    assert!(
        d2.contains("every continuation is trained"),
        "the second distortion worker ends on its own once the learner is done:\n{d2}"
    );
    let s = json(&w.dir.join("summary.json"));
    for m in ["reference", "sft", "dfdpo"] {
        assert!(
            s["eval"][m]["temporal"].as_f64().unwrap().is_finite(),
            "eval.{m}: {s}"
        );
    }
    for name in ["sft", "dfdpo"] {
        let t = &s["training"][name];
        assert_eq!(t["steps"], STEPS, "{name}: {t}");
        let a = &t["accounting"];
        assert!(a["applied"].as_u64().unwrap() > 0, "{name}: {a}");
        assert!(accounting_balances(a), "{name}: {a}");
    }
    assert_eq!(s["training"]["dfdpo"]["resumed_from"], at_kill);
    // Two process restarts (a distortion worker and the learner), whatever the actors did.
    assert!(s["restarts"].as_u64().unwrap() >= 2, "{}", s["restarts"]);
    assert!(accounting_balances(&s["accounting"]), "{}", s["accounting"]);
    // Nothing was applied twice: each continuation's applied records are distinct keys, and a
    // record's uses never exceed samples_per_insert (4 in video-dfdpo.toml).
    for name in ["sft", "dfdpo"] {
        let a = &s["training"][name]["accounting"];
        assert!(
            a["applications"].as_u64().unwrap() <= 4 * a["applied"].as_u64().unwrap(),
            "{name}: {a}"
        );
    }
    assert!(Path::new(&w.dir.join("filmstrip-dfdpo.png")).exists());
}

#[test]
fn dfdpo_roles_are_checked() {
    // VRPO's producer roles are refused by DF-DPO, and DF-DPO's by VRPO, in one line each.
    let redis = RedisServer::start();
    let d = scratch("dfdpo-roles");
    for (config, role, expect) in [
        (
            "configs/video-dfdpo.toml",
            "rollout",
            "DF-DPO's roles are distortion and learner",
        ),
        (
            "configs/quickstart-redis.toml",
            "distortion",
            "VRPO's roles are rollout, critic and learner",
        ),
    ] {
        let out = d.join(role);
        let o = tilt_on(
            &redis.url(),
            &[
                "worker",
                "--role",
                role,
                "--config",
                config,
                "--run-id",
                &format!("roles-{role}-{}", std::process::id()),
                "--out",
                out.to_str().unwrap(),
                "--set",
                "replay.backend=redis",
                "--set",
                "metrics.listen=",
            ],
        );
        let e = err(&o);
        assert_eq!(o.status.code(), Some(1), "{e}");
        assert!(e.contains(expect), "{e}");
    }
}
