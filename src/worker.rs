//! Worker mode: one role per process, meeting the others only through Redis and a shared run
//! directory. This module does what every algorithm's workers share; the roles themselves are
//! the algorithm's (`Algorithm::worker`).

use std::path::Path;

use anyhow::{Context, Result};
use tilt_actors::replay::redis::redact;
use tilt_actors::replay::ReplayBackend;

use crate::algo::{for_kind, RunCtx, WorkerRole};
use crate::build::redis_url;
use crate::config::Config;
use crate::run::open_progress;

/// Run one role of run `run_id` in `run_dir`: the process-level part every algorithm shares
/// (Redis backend required, run directory, resolved config, progress log, metrics endpoint), then
/// the algorithm's own roles.
pub async fn run_worker(
    cfg: &Config,
    role: WorkerRole,
    run_id: &str,
    run_dir: &Path,
) -> Result<()> {
    if cfg.replay.backend != ReplayBackend::Redis {
        anyhow::bail!(
            "tilt worker needs replay.backend = \"redis\" (got {:?})",
            cfg.replay.backend
        );
    }
    crate::build::check_devices(cfg)?;
    std::fs::create_dir_all(run_dir)
        .with_context(|| format!("cannot create run directory {}", run_dir.display()))?;
    // The first worker saves the resolved config; the others find it there.
    let cpath = run_dir.join("config.toml");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&cpath)
    {
        use std::io::Write;
        f.write_all(cfg.to_toml()?.as_bytes())?;
    }
    let name = format!("{role:?}").to_lowercase();
    let url = redis_url(cfg);
    let first = format!(
        "tilt worker: role {name}, run {run_id}, redis {}, run directory {}",
        redact(&url),
        run_dir.display()
    );
    let progress = open_progress(cfg, run_dir, &format!("progress-{name}.log"), &first)?;
    let run = RunCtx {
        cfg,
        run_dir,
        progress: &progress,
    };
    for_kind(cfg.algorithm).worker(&run, role, run_id).await
}
