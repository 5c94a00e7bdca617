//! The run report: the algorithm's figures redrawn from the files a run leaves behind (so `tilt
//! report` works for a finished or a running run of any algorithm), and the printed summary.

use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::algo::for_kind;
use crate::config::Config;

/// `tilt report RUN_DIR`: re-render the plots and print the summary (or the progress so far).
pub fn report(run_dir: &Path) -> Result<()> {
    if !run_dir.join("config.toml").exists() {
        bail!(
            "{} is not a tilt run directory (no config.toml)",
            run_dir.display()
        );
    }
    let cfg = Config::load(&run_dir.join("config.toml"), &[])
        .with_context(|| format!("{} holds no valid config.toml", run_dir.display()))?;
    let files = for_kind(cfg.algorithm).render(run_dir)?;
    for f in &files {
        println!("plot: {}", f.display());
    }
    let summary = run_dir.join("summary.json");
    if summary.exists() {
        println!("{}", std::fs::read_to_string(&summary)?);
    } else {
        let log = std::fs::read_to_string(run_dir.join("progress.log")).unwrap_or_default();
        println!("no summary yet (run in progress or stopped); last progress:");
        for l in log
            .lines()
            .rev()
            .take(3)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
        {
            println!("{l}");
        }
    }
    Ok(())
}
