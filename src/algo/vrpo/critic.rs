//! VRPO stage 1: roll reference chains, train the distributional (CDF) critic on (x_k, k, r(x_0)),
//! and report it on held-out chains (the paper's Table 7 columns, plus agreement with the exact
//! value where one is known); and the critic stage 2 scores with.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};
use tilt_kernels::critic::{CdfGrid, CriticLoss, MeanValue, ValueCritic};
use tilt_kernels::critic_train::{
    critic_held_out, reward_grid_range, roll_reference_states, train_critic, CriticTrainConfig,
    ROLLOUT_STREAM,
};
use tilt_kernels::denoiser::{load_weights, save_weights};
use tilt_kernels::optim::named_vars;
use tilt_kernels::reward::checked_rewards;
use tilt_kernels::rng::rng_for;
use tilt_kernels::vrpo::draw_classes;

use super::Setup;
use crate::build;
use crate::config::{Config, CriticKind, EncoderKind, ValueKind};
use crate::files::{read_json, write_json};

/// The held-out report of the critic (the paper's Table 7 columns, plus agreement with the exact value).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct CriticReport {
    pub kind: String,
    /// "mlp" or "reward_features" (critic.encoder).
    #[serde(default)]
    pub encoder: String,
    pub crps: f64,
    pub ce: f64,
    pub top1: f64,
    pub top3: f64,
    /// Grid [lo, hi] and bins.
    pub grid: Vec<f64>,
    pub bins: usize,
    /// RMSE of the learned V against the exact V on held-out states (linear reward only).
    pub value_rmse_vs_exact: Option<f64>,
    /// Share of held-out same-k state pairs ordered the same way by learned and exact V.
    pub order_agreement_vs_exact: Option<f64>,
    pub train_s: f64,
}

pub fn critic_files(run_dir: &Path) -> (PathBuf, PathBuf) {
    (
        run_dir.join("critic.safetensors"),
        run_dir.join("critic.json"),
    )
}

/// Stage 1: roll reference chains, train the CDF critic on (x_k, k, r(x_0)), report on held-out
/// chains (10% of them). The math is `tilt_kernels::critic_train`; this wires it to the config,
/// the run directory and the progress output.
pub fn stage_critic(cfg: &Config, s: &Setup, run_dir: &Path) -> Result<CriticReport> {
    let t0 = Instant::now();
    let n = cfg.critic.rollouts;
    eprintln!(
        "[critic] rolling {n} reference chains of {} steps",
        s.grid.len()
    );
    let mut rng = rng_for(cfg.seed, ROLLOUT_STREAM, 0);
    let cond = draw_classes(s.data.classes, n, &mut rng, &s.critic_device)?;
    let states = roll_reference_states(
        s.data.reference.as_ref(),
        &s.grid,
        n,
        &s.data.sample_shape,
        cond.as_ref(),
        &mut rng,
        &s.critic_device,
    )?;
    let y = checked_rewards(s.reward.as_ref(), &states[0], cond.as_ref())?; // [n]
    let fixed = (cfg.critic.grid.len() == 2).then(|| (cfg.critic.grid[0], cfg.critic.grid[1]));
    let (lo, hi) = reward_grid_range(&y, fixed);
    let grid = CdfGrid::uniform(lo, hi, cfg.critic.bins)?;
    let n_train = (n * 9 / 10).max(1);
    let vm = VarMap::new();
    let frozen = build::reward_model(&s.data);
    let critic = build::cdf_critic(
        cfg,
        s.dim(),
        s.data.classes,
        frozen.clone(),
        grid,
        &vm,
        &s.critic_device,
    )?;
    // The embedding cache: with the reward model's frozen features as the encoder's input, they
    // are computed once per state here instead of once per sampled batch.
    let states = match (cfg.critic.encoder, &frozen) {
        (EncoderKind::RewardFeatures, Some(f)) => {
            let t = Instant::now();
            let cached = states
                .iter()
                .map(|x| Ok(f.features(x)?.detach()))
                .collect::<Result<Vec<_>>>()?;
            eprintln!(
                "[critic] cached the reward model's features of {} states ({} per state) in {:.1}s",
                n * states.len(),
                f.feature_dim(),
                t.elapsed().as_secs_f64()
            );
            cached
        }
        _ => states,
    };
    let vars = named_vars(&vm)?;
    let train_cfg = CriticTrainConfig {
        steps: cfg.critic.train_steps,
        batch: cfg.critic.batch,
        lr: cfg.critic.lr,
        loss: cfg.critic.loss,
        seed: cfg.seed,
    };
    let mut last = Instant::now();
    let mut report_progress = |step: usize, total: usize, loss: &CriticLoss| {
        if last.elapsed() > Duration::from_secs(3) || step == total {
            last = Instant::now();
            eprintln!(
                "[critic] step {step}/{total} loss {:.4} ({:.0}s)",
                loss.total.to_scalar::<f32>()?,
                t0.elapsed().as_secs_f64()
            );
        }
        Ok(())
    };
    train_critic(
        &critic,
        vars,
        &states,
        n_train,
        &y,
        cond.as_ref(),
        &s.grid,
        &train_cfg,
        &mut report_progress,
    )?;
    let (wfile, jfile) = critic_files(run_dir);
    save_weights(&vm, &wfile)?;
    let mut report = CriticReport {
        kind: format!("{:?}", cfg.critic.kind).to_lowercase(),
        encoder: serde_json::to_value(cfg.critic.encoder)?
            .as_str()
            .unwrap_or_default()
            .to_string(),
        grid: vec![lo, hi],
        bins: cfg.critic.bins,
        ..Default::default()
    };
    if n > n_train {
        let exact = s.exact.as_deref().map(|e| e as &dyn ValueCritic);
        let h = critic_held_out(
            &critic,
            exact,
            &states,
            &y,
            cond.as_ref(),
            n_train,
            &s.grid,
            cfg.vrpo.lambda,
        )?;
        write_json(&run_dir.join("calibration.json"), &h.calibration)?;
        report.crps = h.crps;
        report.ce = h.ce;
        report.top1 = h.top1;
        report.top3 = h.top3;
        report.value_rmse_vs_exact = h.value_rmse_vs_exact;
        report.order_agreement_vs_exact = h.order_agreement_vs_exact;
    }
    report.train_s = t0.elapsed().as_secs_f64();
    write_json(&jfile, &report)?;
    eprintln!(
        "[critic] held-out CRPS {:.4} CE {:.3} top-1 {:.3} top-3 {:.3}{}",
        report.crps,
        report.ce,
        report.top1,
        report.top3,
        report
            .value_rmse_vs_exact
            .map(|r| format!(
                ", V vs exact: RMSE {r:.4}, order agreement {:.3}",
                report.order_agreement_vs_exact.unwrap_or(0.0)
            ))
            .unwrap_or_default()
    );
    Ok(report)
}

/// The critic the VRPO stage scores with: the learned one from the run directory, or the exact value.
pub fn load_critic(cfg: &Config, s: &Setup, run_dir: &Path) -> Result<Arc<dyn ValueCritic>> {
    if cfg.critic.kind == CriticKind::Exact {
        let exact = s
            .exact
            .clone()
            .ok_or_else(|| anyhow!("critic.kind = \"exact\" needs a linear reward"))?;
        return Ok(exact);
    }
    let (wfile, jfile) = critic_files(run_dir);
    let report: CriticReport = read_json(&jfile)
        .context("the vrpo stage needs a trained critic: run the \"critic\" stage first")?;
    let mut vm = VarMap::new();
    let critic = build::cdf_critic(
        cfg,
        s.dim(),
        s.data.classes,
        build::reward_model(&s.data),
        CdfGrid::uniform(report.grid[0], report.grid[1], report.bins)?,
        &vm,
        &s.critic_device,
    )?;
    load_weights(&mut vm, &wfile)?;
    Ok(match cfg.critic.value {
        ValueKind::Optimal => Arc::new(critic),
        ValueKind::Mean => Arc::new(MeanValue(Arc::new(critic))),
    })
}
