//! Helpers shared by the integration tests: a scratch directory, the `tilt` binary, and a
//! redis-server of the test's own (`redis_server`).
#![allow(dead_code)]

pub mod redis_server;
pub mod workers;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A fresh scratch directory under the target dir, removed at the start of each use.
pub fn scratch(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// `tilt` with arguments, run from the repository root, never inheriting TILT_REDIS_URL or the
/// TLS variables (a test names its Redis itself).
pub fn tilt_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tilt"));
    c.args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("TILT_REDIS_URL")
        .env_remove("TILT_REDIS_CA")
        .env_remove("TILT_REDIS_CERT")
        .env_remove("TILT_REDIS_KEY");
    c
}

/// Run `tilt` with arguments from the repository root.
pub fn tilt(args: &[&str]) -> Output {
    tilt_cmd(args).output().expect("tilt binary runs")
}

/// Run `tilt` with arguments against the Redis at `url` (passed as TILT_REDIS_URL).
pub fn tilt_on(url: &str, args: &[&str]) -> Output {
    tilt_cmd(args)
        .env("TILT_REDIS_URL", url)
        .output()
        .expect("tilt binary runs")
}

/// stderr as text.
pub fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Poll `cond` until it holds or `timeout` passes (no fixed sleeps as synchronisation).
pub fn wait_for(mut cond: impl FnMut() -> bool, timeout: Duration) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cond()
}

/// How long a process may take to exit after SIGTERM (drain, final checkpoint): a bound on a
/// hang, not a timing check.
pub const EXIT_LIMIT: Duration = Duration::from_secs(120);

/// Wait for `child` to exit, at most `limit`. Past it the child is SIGKILLed and `None` is
/// returned, so that a shutdown that hangs fails its test (with the caller's message) instead
/// of hanging the whole suite.
pub fn wait_exit(
    child: &mut std::process::Child,
    limit: Duration,
) -> Option<std::process::ExitStatus> {
    let t0 = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("the child can be waited for") {
            return Some(status);
        }
        if t0.elapsed() >= limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Parse a JSON file.
pub fn json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap()
}

/// The `accounting` block of a summary, checked for what holds in every run: every produced
/// record has exactly one fate (produced = applied + dropped + lost + in_flight), no more records
/// inserted than produced nor applied than inserted, and at least one use per applied record.
#[allow(dead_code)]
pub fn accounting(s: &serde_json::Value) -> serde_json::Value {
    let a = s["accounting"].clone();
    let n = |k: &str| {
        a[k].as_u64()
            .unwrap_or_else(|| panic!("accounting.{k} missing: {s}"))
    };
    let dropped: u64 = a["dropped"]
        .as_object()
        .unwrap_or_else(|| panic!("accounting.dropped missing: {s}"))
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(
        n("produced"),
        n("applied") + dropped + n("lost") + n("in_flight"),
        "the accounting does not balance: {a}"
    );
    assert!(
        n("inserted") <= n("produced") && n("applied") <= n("inserted"),
        "{a}"
    );
    assert!(n("applications") >= n("applied") && n("applied") > 0, "{a}");
    for k in ["redelivered", "deduplicated"] {
        n(k);
    }
    a
}

/// Whether a summary's `accounting` block balances: produced = applied + dropped (all reasons) +
/// lost + in flight.
pub fn accounting_balances(a: &serde_json::Value) -> bool {
    let n = |k: &str| a[k].as_u64().unwrap();
    let dropped: u64 = a["dropped"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    n("produced") == n("applied") + dropped + n("lost") + n("in_flight")
}
