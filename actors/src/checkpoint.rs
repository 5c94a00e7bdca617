//! Checkpoints on disk: `RUN_DIR/checkpoints/step-NNNNNNNN/` holding `policy.safetensors` (the
//! residual), `optimizer.safetensors` (AdamW moments and t), a copy of `critic.safetensors` when the
//! run has one, and `state.json` (step, seed, policy version). A checkpoint is written into a `.tmp`
//! directory and renamed into place, so a crash never leaves a partial one under a valid name.

use std::path::{Path, PathBuf};

use candle_nn::VarMap;
use serde::{Deserialize, Serialize};
use tilt_kernels::denoiser::{load_weights, save_weights};
use tilt_kernels::optim::AdamW;

use crate::accounting::Ledger;
use crate::{ActorError, Result};

/// The learner's ledger inside a checkpoint (what it had applied at that step).
const LEDGER_FILE: &str = "ledger.json";

/// What `state.json` holds. The RNG state of a run is its seed plus the step (see `tilt_kernels::rng`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    pub step: u64,
    pub seed: u64,
    pub policy_version: u64,
}

fn err(path: &Path, detail: impl ToString) -> ActorError {
    ActorError::Checkpoint {
        path: path.display().to_string(),
        detail: detail.to_string(),
    }
}

/// The directory of the checkpoint at `step`.
pub fn checkpoint_dir(run_dir: &Path, step: u64) -> PathBuf {
    run_dir.join("checkpoints").join(format!("step-{step:08}"))
}

/// Write a checkpoint atomically and return its directory.
pub fn write_checkpoint(
    run_dir: &Path,
    state: &CheckpointState,
    policy: &VarMap,
    opt: &AdamW,
    critic: Option<&Path>,
    ledger: Option<&Ledger>,
) -> Result<PathBuf> {
    let fin = checkpoint_dir(run_dir, state.step);
    let tmp = fin.with_extension("tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| err(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| err(&tmp, e))?;
    save_weights(policy, &tmp.join("policy.safetensors"))?;
    opt.save_state(&tmp.join("optimizer.safetensors"))?;
    if let Some(c) = critic.filter(|c| c.exists()) {
        std::fs::copy(c, tmp.join("critic.safetensors")).map_err(|e| err(c, e))?;
    }
    if let Some(l) = ledger {
        let json = serde_json::to_vec(l).map_err(|e| err(&tmp, e))?;
        let p = tmp.join(LEDGER_FILE);
        std::fs::write(&p, json).map_err(|e| err(&p, e))?;
    }
    let json = serde_json::to_vec_pretty(state).map_err(|e| err(&tmp, e))?;
    std::fs::write(tmp.join("state.json"), json).map_err(|e| err(&tmp, e))?;
    if fin.exists() {
        std::fs::remove_dir_all(&fin).map_err(|e| err(&fin, e))?;
    }
    std::fs::rename(&tmp, &fin).map_err(|e| err(&fin, e))?;
    Ok(fin)
}

/// The newest complete checkpoint of a run, if any (`.tmp` directories are ignored).
pub fn latest_checkpoint(run_dir: &Path) -> Result<Option<(u64, PathBuf)>> {
    let dir = run_dir.join("checkpoints");
    if !dir.exists() {
        return Ok(None);
    }
    let mut best: Option<(u64, PathBuf)> = None;
    for entry in std::fs::read_dir(&dir).map_err(|e| err(&dir, e))? {
        let p = entry.map_err(|e| err(&dir, e))?.path();
        let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(num) = name.strip_prefix("step-") else {
            continue;
        };
        let Ok(step) = num.parse::<u64>() else {
            continue;
        };
        if p.join("state.json").exists() && best.as_ref().is_none_or(|(s, _)| step > *s) {
            best = Some((step, p));
        }
    }
    Ok(best)
}

/// The learner's ledger saved in checkpoint `dir` (None: a checkpoint written without one).
pub fn load_ledger(dir: &Path) -> Result<Option<Ledger>> {
    let p = dir.join(LEDGER_FILE);
    if !p.exists() {
        return Ok(None);
    }
    let bytes = std::fs::read(&p).map_err(|e| err(&p, e))?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| err(&p, format!("corrupt ledger: {e}")))
}

/// Load a checkpoint into `policy` and `opt`; every file must be present and well-formed.
pub fn load_checkpoint(
    dir: &Path,
    policy: &mut VarMap,
    opt: &mut AdamW,
) -> Result<CheckpointState> {
    let sp = dir.join("state.json");
    let bytes = std::fs::read(&sp).map_err(|e| err(&sp, e))?;
    let state: CheckpointState =
        serde_json::from_slice(&bytes).map_err(|e| err(&sp, format!("corrupt state: {e}")))?;
    load_weights(policy, &dir.join("policy.safetensors"))?;
    opt.load_state(&dir.join("optimizer.safetensors"))?;
    Ok(state)
}
