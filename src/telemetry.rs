//! The Prometheus endpoint: installs the `metrics` recorder with an HTTP listener at
//! `metrics.listen` (port 0 = a free port, printed at start). Metric names are in the README.

use std::net::{SocketAddr, TcpListener};

use anyhow::{anyhow, Context, Result};
use metrics_exporter_prometheus::PrometheusBuilder;

/// Start the endpoint; returns the bound address, or None when `listen` is empty. Must be called
/// inside a tokio runtime. Only one recorder per process: a second call is an error.
pub fn start_metrics(listen: &str) -> Result<Option<SocketAddr>> {
    if listen.is_empty() {
        return Ok(None);
    }
    let mut addr: SocketAddr = listen
        .parse()
        .map_err(|_| anyhow!("metrics.listen = {listen:?}: expected host:port"))?;
    // Resolve port 0 (and check the address is free) by binding once ourselves.
    {
        let l = TcpListener::bind(addr)
            .with_context(|| format!("metrics.listen = {listen}: cannot bind"))?;
        addr = l.local_addr()?;
    }
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|e| {
            anyhow!("metrics.listen = {addr}: cannot start the Prometheus endpoint: {e}")
        })?;
    metrics::describe_counter!(
        "tilt_pairs_produced_total",
        "Segment pairs produced by rollout actors"
    );
    metrics::describe_counter!(
        "tilt_pairs_inserted_total",
        "Scored pairs inserted into the replay by critic actors"
    );
    metrics::describe_counter!(
        "tilt_pairs_consumed_total",
        "Pairs consumed by learner steps"
    );
    metrics::describe_counter!(
        "tilt_pairs_dropped_total",
        "Records removed from the replay before being sampled"
    );
    metrics::describe_gauge!("tilt_replay_depth", "Records currently in the replay");
    metrics::describe_gauge!(
        "tilt_policy_version",
        "Version of the policy (learner step of the newest weights)"
    );
    metrics::describe_gauge!("tilt_learner_step", "Optimiser steps applied");
    metrics::describe_gauge!("tilt_loss", "Learner loss (mean over replicas, last step)");
    metrics::describe_gauge!(
        "tilt_implicit_accuracy",
        "Share of pairs the policy already orders like the critic"
    );
    metrics::describe_gauge!(
        "tilt_reward_mean",
        "Mean reward of the last evaluated policy"
    );
    metrics::describe_gauge!(
        "tilt_learner_utilisation",
        "Share of wall time the learner spent computing"
    );
    metrics::describe_histogram!(
        "tilt_stage_latency_seconds",
        "Latency of one unit of work per stage"
    );
    Ok(Some(addr))
}

/// The process's peak resident set so far, in MiB (`VmHWM` of /proc/self/status); None where
/// the kernel does not report it (not Linux).
pub fn peak_rss_mb() -> Option<f64> {
    parse_vm_hwm(&std::fs::read_to_string("/proc/self/status").ok()?)
}

fn parse_vm_hwm(status: &str) -> Option<f64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_hwm_parses_and_is_reported_here() {
        let s = "Name:\ttilt\nVmPeak:\t  999 kB\nVmHWM:\t  204800 kB\nVmRSS:\t 1 kB\n";
        assert_eq!(parse_vm_hwm(s), Some(200.0));
        assert_eq!(parse_vm_hwm("Name: x\n"), None);
        // This test process has touched at least a MiB.
        assert!(peak_rss_mb().is_some_and(|m| m > 1.0));
    }
}
