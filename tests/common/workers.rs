//! A multi-process run for the worker-mode fault tests (`tests/worker_faults.rs`,
//! `tests/dfdpo_workers.rs`): start, SIGKILL, SIGTERM and signal worker processes, wait on what
//! the run writes (never on a clock), and collect their logs for failure messages.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use super::tilt_cmd;

/// A multi-process run (`tilt worker --role ...` on a Redis of the test's own): its workers as
/// child processes, each worker's output in `worker-<role>-<n>.{out,err}` of the run directory
/// (n = how often that role was started). Killed on drop.
pub struct Workers {
    pub redis_url: String,
    pub run_id: String,
    pub dir: PathBuf,
    /// The config every worker starts with, and its `--set` overrides.
    pub config: String,
    pub sets: Vec<String>,
    /// The learner's training name in its progress lines (`[vrpo] step N/M`).
    pub stage: String,
    /// Bound on the whole run, restarts included.
    pub limit: Duration,
    workers: BTreeMap<&'static str, Child>,
    starts: BTreeMap<&'static str, u32>,
    pub t0: Instant,
}

impl Workers {
    /// A run named `name` (its directory `scratch(name)/run`, its id `<name>-<pid>`) of `config`
    /// with `sets`, meeting through the Redis at `redis_url`.
    pub fn new(
        redis_url: String,
        name: &str,
        config: &str,
        sets: Vec<String>,
        stage: &str,
        limit: Duration,
    ) -> Self {
        Self {
            redis_url,
            run_id: format!("{name}-{}", std::process::id()),
            dir: super::scratch(name).join("run"),
            config: config.to_owned(),
            sets,
            stage: stage.to_owned(),
            limit,
            workers: BTreeMap::new(),
            starts: BTreeMap::new(),
            t0: Instant::now(),
        }
    }

    /// Start (or start again) the worker of `role`.
    pub fn start(&mut self, role: &'static str) {
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
            &self.config,
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
    pub fn kill9(&mut self, role: &'static str) {
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
    pub fn sigterm(&mut self, role: &'static str) {
        let mut c = self.workers.remove(role).expect("the worker runs");
        let st = std::process::Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        let Some(status) = super::wait_exit(&mut c, super::EXIT_LIMIT) else {
            panic!(
                "{role} did not exit within {:?} of SIGTERM (killed)\n{}",
                super::EXIT_LIMIT,
                self.logs()
            );
        };
        assert!(
            status.success(),
            "{role} after SIGTERM: {status}\n{}",
            self.logs()
        );
    }

    /// Send `kill -<sig>` (STOP, CONT) to the worker of `role`.
    pub fn signal(&mut self, role: &'static str, sig: &str) {
        let c = self.workers.get(role).expect("the worker runs");
        let st = std::process::Command::new("kill")
            .args([format!("-{sig}"), c.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success(), "kill -{sig} {role}");
    }

    /// Whether the worker of `role` is still running.
    pub fn running(&mut self, role: &'static str) -> bool {
        self.workers
            .get_mut(role)
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Stderr of the `n`-th start of `role`.
    pub fn stderr(&self, role: &str, n: u32) -> String {
        std::fs::read_to_string(self.dir.join(format!("worker-{role}-{n}.err"))).unwrap_or_default()
    }

    /// Every worker's latest stderr (its last lines: a producer writes a progress line every
    /// quarter second, and a CI log keeps only its tail), then the replay streams' state, for
    /// failure messages.
    pub fn logs(&self) -> String {
        const TAIL: usize = 30;
        let mut out: Vec<String> = self
            .starts
            .iter()
            .map(|(role, n)| {
                let err = self.stderr(role, *n);
                let lines: Vec<&str> = err.lines().collect();
                let from = lines.len().saturating_sub(TAIL);
                format!(
                    "--- {role} (start {n}; last {} of {} lines) ---\n{}",
                    lines.len() - from,
                    lines.len(),
                    lines[from..].join("\n")
                )
            })
            .collect();
        for stream in [self.run_id.clone(), format!("{}-segments", self.run_id)] {
            let key = format!("tilt:{{{stream}}}:replay");
            let info = |args: &[&str]| {
                std::process::Command::new("redis-cli")
                    .args(["-u", &self.redis_url])
                    .args(args)
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).replace('\n', " "))
                    .unwrap_or_else(|e| format!("redis-cli: {e}"))
            };
            out.push(format!(
                "--- {key}: XLEN {} | XINFO GROUPS {} | consumers {}",
                info(&["XLEN", &key]).trim(),
                info(&["XINFO", "GROUPS", &key]).trim(),
                info(&["XINFO", "CONSUMERS", &key, "learners"]).trim()
            ));
        }
        out.join("\n")
    }

    /// Panic with the logs if a worker has exited with an error.
    pub fn check_alive(&mut self) {
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

    /// Poll `cond` (and the workers' health) until it holds; panic after the run's `limit`.
    pub fn wait(&mut self, what: &str, mut cond: impl FnMut(&Self) -> bool) {
        let end = self.t0 + self.limit;
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
    pub fn learner_step(&self) -> Option<u64> {
        let log = std::fs::read_to_string(self.dir.join("progress-learner.log")).ok()?;
        log.lines()
            .rev()
            .find_map(|l| l.strip_prefix(&format!("[{}] step ", self.stage)))
            .and_then(|r| r.split('/').next())
            .and_then(|s| s.parse().ok())
    }

    /// Wait for every worker to exit; all must succeed. Returns the exit statuses.
    pub fn finish(&mut self) -> BTreeMap<&'static str, ExitStatus> {
        let mut done = BTreeMap::new();
        let end = self.t0 + self.limit;
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

impl Drop for Workers {
    fn drop(&mut self) {
        for c in self.workers.values_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
