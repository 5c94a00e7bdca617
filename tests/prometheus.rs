//! Operations: the shipped `deploy/` files against a real Prometheus (Debian's `prometheus`
//! package). promtool checks the config and the rules and runs the alerts' unit tests; a
//! Prometheus of the test's own, configured from `deploy/prometheus.yml` (same rule file, the
//! target rewritten to a running tilt's endpoint, 1 s intervals), scrapes the run; its HTTP API
//! then shows tilt's series, every alert of `deploy/alerts.yml` loaded and evaluated healthy, and
//! every query of the Grafana dashboard valid, on metric names tilt describes.

mod common;
use common::*;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

/// What the test says when Prometheus is not installed.
const INSTALL_HINT: &str =
    "this test starts its own prometheus and runs promtool, and they are not on PATH: install \
     Prometheus (Debian/Ubuntu: `apt-get install --no-install-recommends prometheus`; elsewhere: \
     both binaries from the release tarball at prometheus.io/download)";

/// How long a step of the test may wait for a condition (the smoke run's critic stage comes
/// first, a few seconds on 2 cores).
const WAIT: Duration = Duration::from_secs(90);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `program ARGS`, failing with the install hint when the program is missing.
fn run_tool(program: &str, args: &[&str]) -> std::process::Output {
    match Command::new(program)
        .args(args)
        .current_dir(repo())
        .output()
    {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!("{INSTALL_HINT}"),
        Err(e) => panic!("{program}: {e}"),
    }
}

/// A child process killed (SIGKILL) and reaped on drop, whatever the test's outcome.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// GET `path` (with its query) from `addr` with a plain HTTP/1.0 request: (status, body).
fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// Percent-encoding of a query parameter.
fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `/api/v1/query?query=Q` on Prometheus at `addr`: the JSON reply (status "success" or
/// "error"), or None while Prometheus does not answer.
fn query(addr: &str, q: &str) -> Option<Value> {
    let (_, body) = http_get(addr, &format!("/api/v1/query?query={}", encode(q)))?;
    serde_json::from_str(&body).ok()
}

/// The result vector of a successful query (empty while nothing matches).
fn samples(addr: &str, q: &str) -> Vec<Value> {
    match query(addr, q) {
        Some(v) if v["status"] == "success" => v["data"]["result"].as_array().cloned().unwrap(),
        _ => vec![],
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `tilt_...` metric names in `text`, with a summary's `_sum` / `_count` suffix taken off.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("tilt_") {
        let start = i + at;
        let boundary =
            start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_');
        let mut end = start;
        while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
            end += 1;
        }
        if boundary {
            let n = &text[start..end];
            let n = n
                .strip_suffix("_sum")
                .or_else(|| n.strip_suffix("_count"))
                .unwrap_or(n);
            names.insert(n.to_owned());
        }
        i = end.max(start + 1);
    }
    names
}

/// The metric names tilt describes (`describe_*!("tilt_...")` in src/telemetry.rs): every series
/// on the endpoint, and every name the deploy files use, must be one of them.
fn described_names() -> BTreeSet<String> {
    let src = std::fs::read_to_string(repo().join("src/telemetry.rs")).unwrap();
    let names: BTreeSet<String> = src
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| s.starts_with("tilt_") && !s.contains(' '))
        .map(str::to_owned)
        .collect();
    assert!(names.len() >= 20, "too few described names: {names:?}");
    names
}

/// Alert names of deploy/alerts.yml (`- alert: NAME` lines).
fn alert_names(rules: &str) -> BTreeSet<String> {
    rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(|n| n.trim().to_owned())
        .collect()
}

/// `text` with `from` replaced, which must occur exactly once (the shipped file changed shape
/// otherwise, and the test must be updated with it).
fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "deploy/prometheus.yml: expected {from:?} exactly once"
    );
    text.replacen(from, to, 1)
}

/// Start `tilt run configs/smoke.toml` long enough to be scraped; returns it and its metrics
/// address (from the progress log).
fn start_tilt(out: &Path, extra: &[&str]) -> (KillOnDrop, String) {
    let mut args = vec![
        "run",
        "configs/smoke.toml",
        "--out",
        out.to_str().unwrap(),
        "--set",
        "vrpo.steps=1000000",
    ];
    args.extend_from_slice(extra);
    let child = KillOnDrop(
        tilt_cmd(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tilt binary runs"),
    );
    let log = out.join("progress.log");
    let mut addr = String::new();
    assert!(
        wait_for(
            || {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                text.lines()
                    .find_map(|l| l.strip_prefix("tilt: metrics at http://"))
                    .map(|a| addr = a.trim_end_matches("/metrics").to_owned())
                    .is_some()
            },
            WAIT
        ),
        "no metrics address in {}",
        log.display()
    );
    (child, addr)
}

#[test]
fn prometheus_scrapes_tilt_and_loads_the_shipped_alerts_and_dashboard() {
    // The shipped files, checked by promtool (the rules' unit tests included).
    for args in [
        &["check", "config", "deploy/prometheus.yml"][..],
        &["check", "rules", "deploy/alerts.yml"],
        &["test", "rules", "deploy/alerts.test.yml"],
    ] {
        let o = run_tool("promtool", args);
        assert!(
            o.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    run_tool("prometheus", &["--version"]);

    let d = scratch("prometheus");
    let (_tilt, target) = start_tilt(&d.join("run"), &[]);
    let log = std::fs::read_to_string(d.join("run/progress.log")).unwrap();
    assert!(
        !log.contains("listens beyond"),
        "a loopback endpoint was reported as reachable from elsewhere: {log}"
    );

    // Prometheus configured from the shipped file: same rules, this run as the target.
    let shipped = std::fs::read_to_string(repo().join("deploy/prometheus.yml")).unwrap();
    let rules_path = repo().join("deploy/alerts.yml");
    let mut cfg = replace_once(&shipped, "scrape_interval: 15s", "scrape_interval: 1s");
    cfg = replace_once(&cfg, "evaluation_interval: 15s", "evaluation_interval: 1s");
    cfg = replace_once(&cfg, "\"127.0.0.1:9184\"", &format!("\"{target}\""));
    cfg = replace_once(&cfg, "- alerts.yml", &format!("- {}", rules_path.display()));
    let cfg_path = d.join("prometheus.yml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let prom_addr = format!("127.0.0.1:{}", free_port());
    let prom_log = d.join("prometheus.log");
    let mut prom = KillOnDrop(
        Command::new("prometheus")
            .arg(format!("--config.file={}", cfg_path.display()))
            .arg(format!("--storage.tsdb.path={}", d.join("tsdb").display()))
            .arg(format!("--web.listen-address={prom_addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&prom_log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("prometheus: {e}; {INSTALL_HINT}")),
    );
    let prom_failed = |what: &str| -> String {
        format!(
            "{what}; prometheus log:\n{}",
            std::fs::read_to_string(&prom_log).unwrap_or_default()
        )
    };
    assert!(
        wait_for(
            || {
                assert!(
                    prom.0.try_wait().unwrap().is_none(),
                    "{}",
                    prom_failed("prometheus exited")
                );
                http_get(&prom_addr, "/-/ready").is_some_and(|(s, _)| s == 200)
            },
            WAIT
        ),
        "{}",
        prom_failed("prometheus never became ready")
    );

    // A tilt series of this run's target, scraped and stored.
    let step_q = format!("tilt_learner_step{{job=\"tilt\",instance=\"{target}\",process=\"run\"}}");
    assert!(
        wait_for(|| !samples(&prom_addr, &step_q).is_empty(), WAIT),
        "{}",
        prom_failed(&format!("no sample of {step_q}"))
    );
    let up = samples(
        &prom_addr,
        &format!("up{{job=\"tilt\",instance=\"{target}\"}}"),
    );
    assert_eq!(up[0]["value"][1], "1", "{up:?}");

    // tilt's series are there (some appear with the first learner step or progress tick).
    let described = described_names();
    let must = [
        "tilt_pairs_produced_total",
        "tilt_pairs_inserted_total",
        "tilt_pairs_consumed_total",
        "tilt_pairs_dropped_total",
        "tilt_replay_depth",
        "tilt_learner_step",
        "tilt_learner_step_budget",
        "tilt_policy_version",
        "tilt_loss",
        "tilt_implicit_accuracy",
        "tilt_learner_utilisation",
        "tilt_stage_latency_seconds",
        "tilt_records_applied_total",
        "tilt_records_inserted_total",
    ];
    let names_q = format!("count by (__name__) ({{instance=\"{target}\",__name__=~\"tilt_.+\"}})");
    let mut seen = BTreeSet::new();
    assert!(
        wait_for(
            || {
                seen = samples(&prom_addr, &names_q)
                    .iter()
                    .filter_map(|s| s["metric"]["__name__"].as_str())
                    .flat_map(metric_names)
                    .collect();
                must.iter().all(|m| seen.contains(*m))
            },
            WAIT
        ),
        "missing from Prometheus: {:?} (seen {seen:?})",
        must.iter()
            .filter(|m| !seen.contains(**m))
            .collect::<Vec<_>>()
    );
    let undescribed: Vec<_> = seen.difference(&described).collect();
    assert!(
        undescribed.is_empty(),
        "series without a description in src/telemetry.rs: {undescribed:?}"
    );
    // Latency summaries: a p99 per stage the smoke run goes through.
    let p99 = samples(
        &prom_addr,
        &format!("tilt_stage_latency_seconds{{instance=\"{target}\",quantile=\"0.99\"}}"),
    );
    let stages: BTreeSet<_> = p99
        .iter()
        .filter_map(|s| s["metric"]["stage"].as_str())
        .collect();
    for st in [
        "rollout_segment",
        "critic_score",
        "replay_insert",
        "replay_sample",
        "learner_step",
    ] {
        assert!(stages.contains(st), "no p99 of stage {st}: {stages:?}");
    }

    // Every alert of deploy/alerts.yml is loaded, evaluated, and healthy.
    let rules_text = std::fs::read_to_string(&rules_path).unwrap();
    let alerts = alert_names(&rules_text);
    assert!(alerts.len() >= 6, "{alerts:?}");
    let mut last = Value::Null;
    let healthy = wait_for(
        || {
            let Some((200, body)) = http_get(&prom_addr, "/api/v1/rules?type=alert") else {
                return false;
            };
            last = serde_json::from_str(&body).unwrap_or(Value::Null);
            let rules: Vec<&Value> = last["data"]["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|g| g["rules"].as_array().into_iter().flatten())
                .collect();
            let loaded: BTreeSet<String> = rules
                .iter()
                .filter_map(|r| r["name"].as_str().map(str::to_owned))
                .collect();
            loaded == alerts
                && rules.len() == alerts.len()
                && rules.iter().all(|r| r["health"] == "ok")
        },
        WAIT,
    );
    assert!(
        healthy,
        "alerts {alerts:?} not all loaded with health \"ok\": {last}"
    );
    for name in metric_names(&rules_text) {
        assert!(
            described.contains(&name),
            "deploy/alerts.yml uses {name}, which tilt does not describe"
        );
    }

    // The dashboard: a datasource input, every query valid PromQL for this Prometheus on
    // described names, and the core panels showing this run.
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/grafana-dashboard.json")).unwrap(),
    )
    .expect("deploy/grafana-dashboard.json is JSON");
    assert_eq!(dash["__inputs"][0]["name"], "DS_PROMETHEUS");
    let panels = dash["panels"].as_array().expect("panels");
    for p in panels {
        let title = p["title"].as_str().unwrap();
        assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "panel {title}");
        for t in p["targets"].as_array().expect("targets") {
            assert_eq!(t["datasource"]["uid"], "${DS_PROMETHEUS}", "panel {title}");
            let expr = t["expr"].as_str().unwrap();
            let names = metric_names(expr);
            assert!(!names.is_empty(), "panel {title}: no tilt metric in {expr}");
            for n in &names {
                assert!(
                    described.contains(n),
                    "panel {title} uses {n}, which tilt does not describe"
                );
            }
            let q = expr.replace("$instance", ".*");
            let r = query(&prom_addr, &q).expect("prometheus answers");
            assert_eq!(r["status"], "success", "panel {title}: {q}: {r}");
        }
    }
    for title in [
        "Learner steps/s",
        "Training progress",
        "Loss",
        "Implicit accuracy",
        "Pairs/s",
        "Replay depth",
        "Learner utilisation",
        "Stage latency p50 / p90 / p99",
    ] {
        let p = panels
            .iter()
            .find(|p| p["title"] == title)
            .unwrap_or_else(|| panic!("no panel {title:?}"));
        let q = p["targets"][0]["expr"]
            .as_str()
            .unwrap()
            .replace("$instance", &target);
        assert!(
            wait_for(|| !samples(&prom_addr, &q).is_empty(), WAIT),
            "panel {title:?} shows nothing for the run: {q}"
        );
    }
}

#[test]
fn metrics_endpoint_beyond_loopback_is_stated_at_start() {
    // The default is loopback.
    let o = tilt(&["check-config", "configs/quickstart.toml"]);
    assert!(o.status.success(), "{}", err(&o));
    let resolved = String::from_utf8_lossy(&o.stdout);
    assert!(
        resolved.contains("listen = \"127.0.0.1:9184\""),
        "metrics.listen's default is not loopback: {resolved}"
    );
    // Another address is a choice the log states, in one line near the start.
    let d = scratch("prometheus-beyond-loopback");
    let out = d.join("run");
    let (_tilt, addr) = start_tilt(&out, &["--set", "metrics.listen=0.0.0.0:0"]);
    let mut lines = vec![];
    assert!(
        wait_for(
            || {
                let log = std::fs::read_to_string(out.join("progress.log")).unwrap();
                lines = log.lines().take(4).map(str::to_owned).collect();
                lines.iter().any(|l| {
                    l.contains("listens beyond this machine")
                        && l.contains(&addr)
                        && l.contains("metrics.listen")
                })
            },
            WAIT
        ),
        "no note of the non-loopback endpoint in the first lines: {lines:?}"
    );
}
