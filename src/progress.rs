//! Progress output: one plain line every few seconds (stage, step, pairs/s, loss, ETA), written to
//! stderr and appended to the run's `progress.log`.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tilt_actors::control::RunControl;
use tilt_actors::replay::ReplayBuffer;

/// Where progress goes.
#[derive(Clone)]
pub struct Progress {
    pub log: Option<PathBuf>,
    pub every: Duration,
    /// stderr is a terminal: draw one updating bar instead of periodic lines.
    pub interactive: bool,
}

/// "1h02m", "3m05s", "12s".
pub fn fmt_secs(s: f64) -> String {
    if !s.is_finite() {
        return "?".into();
    }
    let s = s.max(0.0) as u64;
    match (s / 3600, (s % 3600) / 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, m, sec) => format!("{m}m{sec:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}

impl Progress {
    /// Print a line and append it to the log.
    pub fn line(&self, s: &str) {
        if self.interactive {
            eprint!("\r\x1b[2K");
        }
        eprintln!("{s}");
        self.append(s);
    }

    /// Periodic lines: to stderr only when it is not a terminal (a bar is drawn instead), always to the log.
    fn log_only(&self, s: &str) {
        if !self.interactive {
            eprintln!("{s}");
        }
        self.append(s);
    }

    fn append(&self, s: &str) {
        if let Some(p) = &self.log {
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
            {
                let _ = writeln!(f, "{s}");
            }
        }
    }

    /// A background task that reports a stage running through the actors, until aborted.
    pub fn spawn_stage(
        &self,
        control: Arc<RunControl>,
        replay: Arc<dyn ReplayBuffer>,
        start: u64,
        total: u64,
        stage: String,
    ) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let t0 = Instant::now();
            // In worker mode the producers are other processes: the replay's own insert counter
            // (run-wide on Redis) is what comes in.
            let inserted0 = replay.stats().inserted;
            loop {
                tokio::time::sleep(me.every).await;
                let el = t0.elapsed().as_secs_f64();
                let step = RunControl::get(&control.learner_step);
                let done = step.saturating_sub(start) as f64;
                let rate = done / el;
                let eta = if rate > 0.0 {
                    (total.saturating_sub(step)) as f64 / rate
                } else {
                    f64::NAN
                };
                let last = control.last();
                let st = replay.stats();
                if total == 0 {
                    // A producer-only process (worker mode): no learner step to show.
                    let (p, i) = (
                        RunControl::get(&control.pairs_produced),
                        RunControl::get(&control.pairs_inserted),
                    );
                    me.log_only(&format!(
                        "[{stage}:producer] produced {p} pairs ({:.0}/s), inserted {i} ({:.0}/s) | stream depth {} | restarts {} | {} elapsed",
                        p as f64 / el,
                        i as f64 / el,
                        st.depth,
                        RunControl::get(&control.restarts),
                        fmt_secs(el)
                    ));
                    continue;
                }
                let util = RunControl::get(&control.learner_busy_us) as f64 / 1e6 / el;
                let pairs_in = RunControl::get(&control.pairs_inserted)
                    .max(st.inserted.saturating_sub(inserted0));
                metrics::gauge!("tilt_replay_depth", "role" => "replay", "actor" => "0")
                    .set(st.depth as f64);
                metrics::counter!("tilt_pairs_dropped_total", "role" => "replay", "actor" => "0")
                    .absolute(st.dropped);
                metrics::gauge!("tilt_learner_utilisation", "role" => "learner", "actor" => "0")
                    .set(util);
                if me.interactive {
                    let frac = step as f64 / total.max(1) as f64;
                    let filled = (frac * 30.0).round() as usize;
                    eprint!(
                        "\r\x1b[2K[{stage}] [{}{}] {step}/{total} | {:.0} pairs/s | loss {:.4} acc {:.3} | ETA {}",
                        "#".repeat(filled.min(30)),
                        ".".repeat(30 - filled.min(30)),
                        pairs_in as f64 / el,
                        last.loss,
                        last.accuracy,
                        fmt_secs(eta)
                    );
                }
                // VRPO's |dV| (mean |V(a) - V(b)|): how much the critic's labels say.
                let strength = last
                    .label_strength
                    .map(|v| format!(" |dV| {v:.4}"))
                    .unwrap_or_default();
                me.log_only(&format!(
                    "[{stage}] step {step}/{total} ({:.0}%) | {:.0} pairs/s in, {:.1} steps/s | loss {:.4} pair-acc {:.3}{strength} | replay {} | restarts {} | {} elapsed, ETA {}",
                    100.0 * step as f64 / total.max(1) as f64,
                    pairs_in as f64 / el,
                    rate,
                    last.loss,
                    last.accuracy,
                    st.depth,
                    RunControl::get(&control.restarts),
                    fmt_secs(el),
                    fmt_secs(eta)
                ));
            }
        })
    }
}
