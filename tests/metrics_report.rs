//! Live metrics and reports: a running job's Prometheus endpoint is scraped over HTTP (counters
//! increase between two scrapes, the latency summaries have samples), and a finished run leaves
//! valid PNG plots and an ordered latency block in summary.json; `tilt report` re-renders them.

mod common;
use common::*;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::time::Duration;

/// GET http://addr/metrics with a plain HTTP/1.0 request.
fn scrape(addr: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let (head, rest) = body.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.").then(|| rest.to_string())
}

/// Parse the text exposition format: "name{labels} value" lines (comments skipped), summed over labels.
fn parse(text: &str) -> HashMap<String, f64> {
    let mut m = HashMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let (name_labels, value) = line.rsplit_once(' ').expect("metric line has a value");
        let name = name_labels.split('{').next().unwrap().to_string();
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        *m.entry(name).or_insert(0.0) += v;
    }
    m
}

#[test]
fn endpoint_is_scraped_while_the_run_goes_and_counters_increase() {
    let d = scratch("metrics-scrape");
    let out = d.join("run");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tilt"))
        .args([
            "run",
            "configs/smoke.toml",
            "--out",
            out.to_str().unwrap(),
            "--set",
            "vrpo.steps=100000",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let log = out.join("progress.log");
    let mut addr = String::new();
    let found = wait_for(
        || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            match text
                .lines()
                .find_map(|l| l.strip_prefix("tilt: metrics at http://"))
            {
                Some(a) => {
                    addr = a.trim_end_matches("/metrics").to_string();
                    true
                }
                None => false,
            }
        },
        Duration::from_secs(60),
    );
    assert!(found, "no metrics address in the progress log");
    // First scrape once the learner is stepping, second a little later.
    let mut first = HashMap::new();
    assert!(
        wait_for(
            || {
                first = scrape(&addr).map(|t| parse(&t)).unwrap_or_default();
                first.get("tilt_learner_step").is_some_and(|&v| v >= 1.0)
            },
            Duration::from_secs(120)
        ),
        "the learner never showed up on the endpoint"
    );
    let mut second = HashMap::new();
    assert!(wait_for(
        || {
            second = scrape(&addr).map(|t| parse(&t)).unwrap_or_default();
            // Both: the learner counts the pairs before it sets the step gauge.
            second.get("tilt_pairs_consumed_total") > first.get("tilt_pairs_consumed_total")
                && second.get("tilt_learner_step") > first.get("tilt_learner_step")
        },
        Duration::from_secs(60)
    ));
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = wait_exit(&mut child, EXIT_LIMIT).expect("an exit within EXIT_LIMIT of SIGTERM");
    assert!(
        status.success(),
        "SIGTERM must lead to a clean exit 0: {status}"
    );
    for name in [
        "tilt_pairs_produced_total",
        "tilt_pairs_consumed_total",
        "tilt_learner_step",
        "tilt_policy_version",
        "tilt_loss",
        "tilt_implicit_accuracy",
        "tilt_label_strength",
        "tilt_replay_depth",
        "tilt_pairs_dropped_total",
    ] {
        assert!(
            second.contains_key(name),
            "{name} missing from the endpoint: {:?}",
            second.keys().collect::<Vec<_>>()
        );
    }
    assert!(second["tilt_pairs_produced_total"] >= first["tilt_pairs_produced_total"]);
    assert!(second["tilt_learner_step"] > first["tilt_learner_step"]);
    // Latency summaries have samples (one _count series per stage and actor).
    assert!(
        second
            .get("tilt_stage_latency_seconds_count")
            .copied()
            .unwrap_or(0.0)
            > 0.0,
        "no latency samples"
    );
}

#[test]
fn finished_run_has_plots_and_ordered_latency_and_report_redraws() {
    let d = scratch("metrics-report");
    let out = d.join("run");
    let o = tilt(&[
        "run",
        "configs/smoke.toml",
        "--out",
        out.to_str().unwrap(),
        "--set",
        "vrpo.steps=30",
        "--set",
        "metrics.listen=",
    ]);
    assert!(o.status.success(), "{}", err(&o));
    let s = json(&out.join("summary.json"));
    for stage in [
        "rollout_segment",
        "critic_score",
        "replay_insert",
        "replay_sample",
        "learner_step",
    ] {
        let l = &s["latency"][stage];
        let (p50, p90, p99, max) = (
            l["p50_ms"].as_f64().unwrap(),
            l["p90_ms"].as_f64().unwrap(),
            l["p99_ms"].as_f64().unwrap(),
            l["max_ms"].as_f64().unwrap(),
        );
        assert!(l["count"].as_u64().unwrap() > 0, "{stage}");
        assert!(p50 <= p90 && p90 <= p99 && p99 <= max, "{stage}: {l}");
    }
    assert!(s["learner_utilisation"].as_f64().unwrap() > 0.0);
    let plots = [
        "loss.png",
        "accuracy.png",
        "reward.png",
        "calibration.png",
        "samples.png",
    ];
    for p in plots {
        let (w, h) =
            tilt::plots::check_png(&out.join(p), 2000).unwrap_or_else(|e| panic!("{p}: {e:#}"));
        assert!(w >= 400 && h >= 300, "{p}: {w}x{h}");
        std::fs::remove_file(out.join(p)).unwrap();
    }
    let o = tilt(&["report", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", err(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("\"gap_closed\""));
    for p in plots {
        tilt::plots::check_png(&out.join(p), 2000).unwrap();
    }
}
