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
        "tilt_label_strength",
        "VRPO: mean |V(a) - V(b)| of the last batch, the size of the critic's soft-label logit \
         (near 0: labels near 1/2, little to learn)"
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
    metrics::describe_gauge!(
        "tilt_learner_step_budget",
        "Step budget of the current training (the learner is done at tilt_learner_step = this)"
    );
    metrics::describe_counter!(
        "tilt_learner_non_finite_total",
        "Non-finite losses or gradients met by the learner (each stops the run), by kind"
    );
    metrics::describe_counter!(
        "tilt_actor_restarts_total",
        "Producer actors restarted by the coordinator in this process, by role"
    );
    metrics::describe_gauge!(
        "tilt_process_restarts",
        "Worker mode: starts of this worker name before this process (0 on a first start)"
    );
    for (name, help) in [
        (
            "tilt_records_produced_total",
            "Records handed to the replay by producers",
        ),
        (
            "tilt_records_inserted_total",
            "Records accepted by the replay",
        ),
        (
            "tilt_records_applied_total",
            "Distinct records applied by the learner",
        ),
        (
            "tilt_records_redelivered_total",
            "Deliveries of a record delivered before",
        ),
        (
            "tilt_records_deduplicated_total",
            "Deliveries thrown away, the record used up",
        ),
        (
            "tilt_records_lost_total",
            "Sequence gaps: produced, neither applied, dropped nor in flight",
        ),
        (
            "tilt_records_dropped_total",
            "Records counted out before use, by reason",
        ),
    ] {
        metrics::describe_counter!(name, help);
    }
    metrics::describe_gauge!(
        "tilt_records_in_flight",
        "Records still in the replay at the end of the training, never applied"
    );
    Ok(Some(addr))
}

/// Worker mode: this process is start number `previous + 1` of worker `name` (`<role>-<id>`);
/// a value that climbs across the worker's processes is a worker being restarted.
pub fn process_started(role: &str, name: &str, previous: u64) {
    metrics::gauge!("tilt_process_restarts", "role" => role.to_owned(), "worker" => name.to_owned())
        .set(previous as f64);
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
