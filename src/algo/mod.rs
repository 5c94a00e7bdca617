//! Algorithms: one file each, behind one trait. An algorithm names the stages it offers, builds
//! its producers (`PairSource`s) and its `Objective` for the shared learners (`crate::train`),
//! evaluates, writes its summary and redraws its figures. Adding one: a file here, its math in
//! `tilt-kernels`, its config section and one arm in `for_kind`.

use std::path::{Path, PathBuf};

use anyhow::Result;
use async_trait::async_trait;

use crate::config::{AlgorithmKind, Config};
use crate::progress::Progress;

pub mod dfdpo;
pub mod vrpo;

/// The role of a worker process (`tilt worker --role ...`). VRPO runs rollout, critic and
/// learner workers; DF-DPO runs distortion and learner workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WorkerRole {
    Rollout,
    Critic,
    Distortion,
    Learner,
}

impl WorkerRole {
    /// The role's name as `--role` spells it.
    pub fn name(self) -> &'static str {
        match self {
            WorkerRole::Rollout => "rollout",
            WorkerRole::Critic => "critic",
            WorkerRole::Distortion => "distortion",
            WorkerRole::Learner => "learner",
        }
    }
}

/// What every stage of a run sees.
pub struct RunCtx<'a> {
    pub cfg: &'a Config,
    pub run_dir: &'a Path,
    pub progress: &'a Progress,
    /// Worker mode: this process's registered place in the run (None for `tilt run`).
    pub worker: Option<&'a crate::worker::WorkerCtx>,
}

/// One algorithm.
#[async_trait]
pub trait Algorithm: Send + Sync {
    /// The stages it offers, in the order it runs them (the config lists a subset).
    fn stages(&self) -> &'static [&'static str];
    /// Run the listed stages in `run.run_dir` (fresh or resumed); writes `summary.json` when the
    /// "eval" stage ran, and returns it.
    async fn execute(&self, run: &RunCtx<'_>) -> Result<Option<serde_json::Value>>;
    /// One role of a multi-process run that meets through Redis.
    async fn worker(&self, run: &RunCtx<'_>, role: WorkerRole, run_id: &str) -> Result<()>;
    /// Redraw every figure of a run from the files it saved (`tilt report`).
    fn render(&self, run_dir: &Path) -> Result<Vec<PathBuf>>;
}

/// The algorithm a config names (the registration point).
pub fn for_kind(kind: AlgorithmKind) -> Box<dyn Algorithm> {
    match kind {
        AlgorithmKind::Vrpo => Box::new(vrpo::Vrpo),
        AlgorithmKind::Dfdpo => Box::new(dfdpo::DfDpo),
    }
}

/// `cfg.stages` lists `stage`.
pub fn has_stage(cfg: &Config, stage: &str) -> bool {
    cfg.stages.iter().any(|s| s == stage)
}

/// A run id unique to this invocation: it namespaces the Redis keys (removed at the end).
pub(crate) fn invocation_id(cfg: &Config) -> String {
    format!(
        "{}-{}-{}",
        cfg.name,
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0)
    )
}
