//! DF-DPO in worker mode (`tilt worker --role distortion|learner`) on a redis-server of the
//! test's own: a distortion worker and the learner are each killed with SIGKILL in the middle of
//! the run ("middle" read from the learner's checkpoints, never from a clock) and started again;
//! the run still finishes every continuation and the eval, the learner continues the continuation
//! it was on from its newest complete checkpoint (never from 0), the restarts are counted, and
//! every record is accounted for.

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use common::redis_server::RedisServer;
use common::*;
use tilt_actors::checkpoint::latest_checkpoint;

/// Steps of each continuation (sft, dfdpo), checkpointed every 10.
const STEPS: u64 = 80;
/// Bound on the whole run, restarts included.
const RUN_LIMIT: Duration = Duration::from_secs(240);

/// The worker processes of one run, each start's output in `worker-<role>-<n>.{out,err}`.
struct Workers {
    url: String,
    run_id: String,
    dir: PathBuf,
    running: BTreeMap<&'static str, Child>,
    starts: BTreeMap<&'static str, u32>,
}

impl Workers {
    fn start(&mut self, role: &'static str) {
        let n = self.starts.entry(role).or_insert(0);
        *n += 1;
        std::fs::create_dir_all(&self.dir).unwrap();
        let log =
            |ext: &str| File::create(self.dir.join(format!("worker-{role}-{n}.{ext}"))).unwrap();
        let steps = format!("dfdpo.steps={STEPS}");
        let mut args = vec![
            "worker",
            "--role",
            role,
            "--config",
            "configs/video-dfdpo.toml",
            "--run-id",
            &self.run_id,
            "--out",
            self.dir.to_str().unwrap(),
        ];
        let sets = [
            "replay.backend=redis",
            "video.clips=24",
            "pretrain.steps=8",
            "pretrain.batch=4",
            steps.as_str(),
            "dfdpo.batch=2",
            "dfdpo.curriculum.every=20",
            "learner.checkpoint_every=10",
            "eval.samples=3",
            "sampling.steps=4",
            "replay.min_size=8",
            "replay.capacity=64",
            "metrics.listen=",
            "metrics.progress_every_s=0.25",
        ];
        for s in &sets {
            args.extend(["--set", s]);
        }
        let child = tilt_cmd(&args)
            .env("TILT_REDIS_URL", &self.url)
            .stdout(log("out"))
            .stderr(log("err"))
            .spawn()
            .expect("tilt worker starts");
        self.running.insert(role, child);
    }

    fn kill9(&mut self, role: &'static str) {
        let mut c = self.running.remove(role).expect("the worker runs");
        c.kill().unwrap();
        let status = c.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9), "{role} was not killed: {status}");
    }

    fn stderr(&self, role: &str, n: u32) -> String {
        std::fs::read_to_string(self.dir.join(format!("worker-{role}-{n}.err"))).unwrap_or_default()
    }

    fn logs(&self) -> String {
        self.starts
            .iter()
            .map(|(role, n)| format!("--- {role} (start {n}) ---\n{}", self.stderr(role, *n)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Newest complete checkpoint step of continuation `name`.
    fn checkpoint(&self, name: &str) -> Option<u64> {
        latest_checkpoint(&self.dir.join(name))
            .ok()
            .flatten()
            .map(|(s, _)| s)
    }

    /// Wait for `cond`, failing with every worker's log if a worker dies or time runs out.
    fn wait(&mut self, what: &str, t0: Instant, mut cond: impl FnMut(&Self) -> bool) {
        while !cond(self) {
            let dead = self
                .running
                .iter_mut()
                .find_map(|(role, c)| c.try_wait().ok().flatten().map(|st| (*role, st)));
            if let Some((role, st)) = dead {
                panic!("{role} exited ({st}) before {what}\n{}", self.logs());
            }
            assert!(
                t0.elapsed() < RUN_LIMIT,
                "no {what} within {RUN_LIMIT:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait for every worker to exit; all must succeed.
    fn finish(&mut self, t0: Instant) {
        while !self.running.is_empty() {
            let mut exited = vec![];
            for (role, c) in self.running.iter_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    exited.push((*role, st));
                }
            }
            for (role, st) in exited {
                self.running.remove(role);
                assert!(st.success(), "{role}: {st}\n{}", self.logs());
            }
            assert!(
                t0.elapsed() < RUN_LIMIT,
                "the run did not finish within {RUN_LIMIT:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for c in self.running.values_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn accounting_balances(a: &serde_json::Value) -> bool {
    let n = |k: &str| a[k].as_u64().unwrap();
    let dropped: u64 = a["dropped"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    n("produced") == n("applied") + dropped + n("lost") + n("in_flight")
}

#[test]
fn dfdpo_workers_survive_kill9_of_the_distortion_worker_and_the_learner() {
    let redis = RedisServer::start();
    let mut w = Workers {
        url: redis.url(),
        run_id: format!("ci-dfdpo-workers-{}", std::process::id()),
        dir: scratch("dfdpo-workers").join("run"),
        running: BTreeMap::new(),
        starts: BTreeMap::new(),
    };
    let t0 = Instant::now();
    w.start("learner");
    w.start("distortion");
    // The distortion worker dies once the learner has trained on its pairs (sft's first
    // checkpoint), and a new one takes over.
    w.wait("an sft checkpoint", t0, |w| w.checkpoint("sft").is_some());
    w.kill9("distortion");
    w.start("distortion");
    // The learner dies in the middle of the dfdpo continuation.
    w.wait("a dfdpo checkpoint", t0, |w| {
        w.checkpoint("dfdpo").is_some()
    });
    w.kill9("learner");
    let at_kill = w.checkpoint("dfdpo").unwrap();
    assert!(
        at_kill < STEPS,
        "the learner was killed after dfdpo finished (checkpoint {at_kill}); the test needs a run \
         still in the middle: raise STEPS"
    );
    w.start("learner");
    w.finish(t0);

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
