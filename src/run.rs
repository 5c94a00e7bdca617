//! A whole run: the run directory, the stages in order, the summary. `tilt run` and `tilt resume`
//! both end here.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::algo::{for_kind, RunCtx};
use crate::config::Config;
use crate::progress::Progress;

/// Create a fresh run directory; refuse one that already holds a run.
pub fn prepare_run_dir(out: &Path, cfg: &Config) -> Result<()> {
    if out.join("config.toml").exists() {
        bail!(
            "run directory {} already holds a run: use `tilt resume {}` or another --out",
            out.display(),
            out.display()
        );
    }
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create run directory {}", out.display()))?;
    let tmp = out.join("config.toml.tmp");
    std::fs::write(&tmp, cfg.to_toml()?)?;
    std::fs::rename(&tmp, out.join("config.toml"))?;
    Ok(())
}

/// The progress output of a process working in `run_dir` (logged to `run_dir/log_name`), its
/// first line, and the metrics endpoint (`metrics.listen`): what `tilt run`, `tilt resume` and
/// `tilt worker` share.
pub fn open_progress(
    cfg: &Config,
    run_dir: &Path,
    log_name: &str,
    first: &str,
) -> Result<Progress> {
    use std::io::IsTerminal;
    let progress = Progress {
        log: Some(run_dir.join(log_name)),
        every: Duration::from_secs_f64(cfg.metrics.progress_every_s),
        interactive: std::io::stderr().is_terminal(),
    };
    progress.line(first);
    if cfg.replay.backend == tilt_actors::replay::ReplayBackend::Redis {
        let redis = cfg.redis_target();
        if let Some(addr) = redis.remote_addr() {
            // The default is loopback; anything else is a choice the log states.
            progress.line(&format!(
                "tilt: note: Redis is beyond this machine ({addr}, {}; replay.url or TILT_REDIS_URL)",
                if redis.is_tls() { "TLS" } else { "plain TCP, not encrypted" }
            ));
        }
    }
    if let Some(addr) = crate::telemetry::start_metrics(&cfg.metrics.listen)? {
        progress.line(&format!("tilt: metrics at http://{addr}/metrics"));
        if !addr.ip().is_loopback() {
            // The default is loopback-only; anything else is a choice the log states.
            progress.line(&format!(
                "tilt: note: the metrics endpoint listens beyond this machine ({addr}, metrics.listen)"
            ));
        }
    }
    Ok(progress)
}

/// Run the configured stages in `run_dir` (fresh or resumed) with the configured algorithm;
/// returns `summary.json`'s content when the run got that far.
pub async fn execute(cfg: &Config, run_dir: &Path) -> Result<Option<serde_json::Value>> {
    let first = format!("tilt: run {} in {}", cfg.name, run_dir.display());
    let progress = open_progress(cfg, run_dir, "progress.log", &first)?;
    let run = RunCtx {
        cfg,
        run_dir,
        progress: &progress,
        worker: None,
    };
    for_kind(cfg.algorithm).execute(&run).await
}

/// The default run directory for a config: runs/<name>.
pub fn default_out(cfg: &Config) -> PathBuf {
    PathBuf::from("runs").join(&cfg.name)
}
