//! VRPO stage 1: roll reference chains, train the distributional (CDF) critic on (x_k, k, r(x_0)),
//! and report it on held-out chains (the paper's Table 7 columns, plus agreement with the exact
//! value where one is known); and the critic stage 2 scores with.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use candle_core::{DType, Tensor};
use candle_nn::VarMap;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tilt_kernels::critic::{
    critic_loss, cross_entropy, crps_loss, topk_accuracy, CdfGrid, ValueCritic, DEFAULT_EPS,
};
use tilt_kernels::denoiser::{load_weights, save_weights, timesteps};
use tilt_kernels::logprob::sample_chain;
use tilt_kernels::optim::{AdamW, AdamWConfig};
use tilt_kernels::rng::{randn, rng_for};

use super::Setup;
use crate::build;
use crate::config::{Config, CriticKind};
use crate::files::{read_json, write_json};

/// The held-out report of the critic (the paper's Table 7 columns, plus agreement with the exact value).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct CriticReport {
    pub kind: String,
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

/// Stage 1: roll reference chains, train the CDF critic on (x_k, k, r(x_0)), report on held-out chains.
pub fn stage_critic(cfg: &Config, s: &Setup, run_dir: &Path) -> Result<CriticReport> {
    let t0 = Instant::now();
    let k = s.grid.len();
    let n = cfg.critic.rollouts;
    let d = s.dim();
    eprintln!("[critic] rolling {n} reference chains of {k} steps");
    // states[k][chain] for k = K..=0, each [n, D].
    let mut rng = rng_for(cfg.seed, 1, 0);
    let mut x = randn(&mut rng, (n, d), &s.critic_device)?;
    let mut states: Vec<Tensor> = vec![Tensor::zeros((n, d), DType::F32, &s.critic_device)?; k + 1];
    states[k] = x.clone();
    for kk in (1..=k).rev() {
        x = sample_chain(
            s.data.reference.as_ref(),
            &s.grid,
            &x,
            kk,
            kk - 1,
            None,
            &mut rng,
        )?;
        states[kk - 1] = x.clone();
    }
    let y = s.reward.reward(&states[0])?; // [n]
    let yv = y.to_vec1::<f32>()?;
    let (lo, hi) = if cfg.critic.grid.len() == 2 {
        (cfg.critic.grid[0], cfg.critic.grid[1])
    } else {
        let mn = yv.iter().cloned().fold(f32::INFINITY, f32::min) as f64;
        let mx = yv.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let m = 0.05 * (mx - mn).max(1e-3);
        (mn - m, mx + m)
    };
    let grid = CdfGrid::uniform(lo, hi, cfg.critic.bins)?;
    let n_train = (n * 9 / 10).max(1);
    let vm = VarMap::new();
    let critic = build::cdf_critic(&cfg.critic, d, grid.clone(), &vm, &s.critic_device)?;
    let vars = vm
        .data()
        .lock()
        .map_err(|_| anyhow!("lock"))?
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut opt = AdamW::new(
        vars,
        AdamWConfig {
            lr: cfg.critic.lr,
            ..Default::default()
        },
    )?;
    // Flatten the training split into rows (k in 1..=K): x [K*n_train, D], n-index, y.
    let train_x = Tensor::cat(
        &(1..=k)
            .map(|kk| states[kk].narrow(0, 0, n_train))
            .collect::<candle_core::Result<Vec<_>>>()?,
        0,
    )?;
    let train_n: Vec<f32> = (1..=k)
        .flat_map(|kk| std::iter::repeat_n(s.grid.n_of_k[kk] as f32, n_train))
        .collect();
    let train_y: Vec<f32> = (1..=k)
        .flat_map(|_| yv[..n_train].iter().cloned())
        .collect();
    let rows = train_x.dim(0)?;
    let mut last = Instant::now();
    let mut brng = rng_for(cfg.seed, 2, 0);
    for step in 0..cfg.critic.train_steps {
        let idx: Vec<u32> = (0..cfg.critic.batch)
            .map(|_| brng.random_range(0..rows as u32))
            .collect();
        let idx_t = Tensor::from_vec(idx.clone(), idx.len(), &s.critic_device)?;
        let xb = train_x.index_select(&idx_t, 0)?;
        let nb = Tensor::from_vec(
            idx.iter().map(|&i| train_n[i as usize]).collect::<Vec<_>>(),
            idx.len(),
            &s.critic_device,
        )?;
        let yb = Tensor::from_vec(
            idx.iter().map(|&i| train_y[i as usize]).collect::<Vec<_>>(),
            idx.len(),
            &s.critic_device,
        )?;
        let f = critic.cdf(&xb, &nb, None)?;
        let loss = critic_loss(&f, &yb, &grid, &cfg.critic.loss, DEFAULT_EPS)?;
        let grads = loss.total.backward()?;
        opt.step(&grads)?;
        if last.elapsed() > Duration::from_secs(3) || step + 1 == cfg.critic.train_steps {
            last = Instant::now();
            let el = t0.elapsed().as_secs_f64();
            eprintln!(
                "[critic] step {}/{} loss {:.4} ({:.0}s)",
                step + 1,
                cfg.critic.train_steps,
                loss.total.to_scalar::<f32>()?,
                el
            );
        }
    }
    let (wfile, jfile) = critic_files(run_dir);
    save_weights(&vm, &wfile)?;
    // Held-out report over every k of the held-out chains.
    let n_test = n - n_train;
    let mut report = CriticReport {
        kind: format!("{:?}", cfg.critic.kind).to_lowercase(),
        grid: vec![lo, hi],
        bins: cfg.critic.bins,
        ..Default::default()
    };
    if n_test > 0 {
        let (mut crps, mut ce, mut t1, mut t3) = (0.0, 0.0, 0.0, 0.0);
        let mut calib: Vec<(f64, bool)> = Vec::new();
        let yt = y.narrow(0, n_train, n_test)?;
        let exact = s.exact.as_deref();
        let (mut se, mut cnt, mut agree, mut pairs) = (0.0, 0usize, 0usize, 0usize);
        for (kk, state) in states.iter().enumerate().skip(1) {
            let xt = state.narrow(0, n_train, n_test)?;
            let nt = timesteps(s.grid.n_of_k[kk], n_test, &s.critic_device)?;
            let f = critic.cdf(&xt, &nt, None)?;
            crps += crps_loss(&f, &yt, &grid)?.to_scalar::<f32>()? as f64;
            if kk % (k / 4).max(1) == 0 {
                // Calibration pairs (F(c_m | x_k), 1{r <= c_m}) for the report's reliability plot.
                let fv = f.to_vec2::<f32>()?;
                let yv = yt.to_vec1::<f32>()?;
                for (row, yi) in fv.iter().zip(&yv).take(100) {
                    for (m, fm) in row.iter().enumerate().step_by(5) {
                        calib.push((*fm as f64, (*yi as f64) <= grid.c[m]));
                    }
                }
            }
            ce += cross_entropy(&f, &yt, &grid, DEFAULT_EPS)?;
            t1 += topk_accuracy(&f, &yt, &grid, 1)?;
            t3 += topk_accuracy(&f, &yt, &grid, 3)?;
            if let Some(ex) = &exact {
                let vl = ValueCritic::value(&critic, &xt, &nt, None, cfg.vrpo.lambda)?
                    .to_vec1::<f32>()?;
                let ve = ex
                    .value(&xt, &nt, None, cfg.vrpo.lambda)?
                    .to_vec1::<f32>()?;
                for i in 0..n_test {
                    se += ((vl[i] - ve[i]) as f64).powi(2);
                    cnt += 1;
                    let j = (i + 1) % n_test;
                    if ve[i] != ve[j] {
                        pairs += 1;
                        agree += usize::from((vl[i] > vl[j]) == (ve[i] > ve[j]));
                    }
                }
            }
        }
        let kf = k as f64;
        report.crps = crps / kf;
        report.ce = ce / kf;
        report.top1 = t1 / kf;
        report.top3 = t3 / kf;
        write_json(&run_dir.join("calibration.json"), &calib)?;
        if cnt > 0 {
            report.value_rmse_vs_exact = Some((se / cnt as f64).sqrt());
            report.order_agreement_vs_exact = Some(agree as f64 / pairs.max(1) as f64);
        }
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
        &cfg.critic,
        s.dim(),
        CdfGrid::uniform(report.grid[0], report.grid[1], report.bins)?,
        &vm,
        &s.critic_device,
    )?;
    load_weights(&mut vm, &wfile)?;
    Ok(Arc::new(critic))
}
