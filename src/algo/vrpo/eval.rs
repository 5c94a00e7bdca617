//! VRPO evaluation: the reference, the importance-weighted tilted target (and the closed form
//! where one exists) and the policy at each evaluated checkpoint; `summary.json`; the figures.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use tilt_actors::checkpoint::{checkpoint_dir, latest_checkpoint, load_checkpoint};
use tilt_kernels::denoiser::ResidualPolicy;
use tilt_kernels::logprob::sample_chain;
use tilt_kernels::reward::{checked_rewards, Reward};
use tilt_kernels::rng::{randn, rng_for};
use tilt_kernels::tilt::{gap_closed, mean_and_se, systematic_resample, tilted_target};

use super::critic::CriticReport;
use super::digits::{image_metrics, per_class_target, save_grid, ImageMetrics, TargetEstimate};
use super::{build_policy, Setup};
use crate::build::DataKind;
use crate::config::{Config, RewardConfig};
use crate::files::{read_json, write_json};
use crate::plots::{calibration, line_chart, scatter, Series};
use crate::progress::Progress;
use crate::train::TrainReport;

/// One evaluated policy.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalPoint {
    pub step: u64,
    pub reward_mean_policy: f64,
    /// Standard error of `reward_mean_policy` over the evaluation's samples (sampling noise of
    /// the evaluation only, not the spread between training runs).
    #[serde(default)]
    pub reward_se_policy: f64,
    /// Mixture data: the policy's mode weights.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mode_weights_policy: Vec<f64>,
    pub gap_closed: f64,
    /// Image data: reward A, judge B and diversity of the policy's samples.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images: Option<ImageMetrics>,
}

/// The evaluation: reference, importance-weighted target, closed form, and each evaluated policy.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct EvalReport {
    pub reward_mean_ref: f64,
    pub reward_mean_target: f64,
    pub target_ess: f64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mode_weights_ref: Vec<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mode_weights_target: Vec<f64>,
    /// The closed-form tilt of the data mixture (linear reward): differs from the chain's target
    /// because the K-step chain is itself slightly off the data (DESIGN.md).
    pub reward_mean_closed_form: Option<f64>,
    pub mode_weights_closed_form: Option<Vec<f64>>,
    /// Image data: the reference's metrics and the per-class target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images_ref: Option<ImageMetrics>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<TargetEstimate>,
    pub points: Vec<EvalPoint>,
}

fn rewards_f64(r: &dyn Reward, x: &Tensor, cond: Option<&Tensor>) -> Result<Vec<f64>> {
    Ok(checked_rewards(r, x, cond)?
        .into_iter()
        .map(f64::from)
        .collect())
}

/// Classes of `n` evaluation samples (i mod classes: balanced), or None for unconditional data.
fn eval_classes(classes: usize, n: usize, device: &candle_core::Device) -> Result<Option<Tensor>> {
    if classes == 0 {
        return Ok(None);
    }
    let c: Vec<u32> = (0..n).map(|i| (i % classes) as u32).collect();
    Ok(Some(Tensor::from_vec(c, n, device)?))
}

/// Evaluate the reference, the target and the policy at the listed steps (and the last checkpoint).
pub fn stage_eval(cfg: &Config, s: &Setup, run_dir: &Path) -> Result<EvalReport> {
    let k = s.grid.len();
    let mut rng = rng_for(cfg.seed, 3, 0);
    let shape = |n: usize| -> Vec<usize> {
        std::iter::once(n)
            .chain(s.data.sample_shape.iter().copied())
            .collect()
    };
    let n_ref = cfg.eval.target_samples;
    let cond_ref = eval_classes(s.data.classes, n_ref, &s.learner_device)?;
    let x = randn(&mut rng, shape(n_ref), &s.learner_device)?;
    let t_ref = Instant::now();
    let x0 = sample_chain(
        s.data.reference.as_ref(),
        &s.grid,
        &x,
        k,
        0,
        cond_ref.as_ref(),
        &mut rng,
    )?;
    let r = rewards_f64(s.reward.as_ref(), &x0, cond_ref.as_ref())?;
    eprintln!(
        "[eval] {n_ref} reference samples in {:.1}s",
        t_ref.elapsed().as_secs_f64()
    );
    let mut rep = EvalReport {
        reward_mean_ref: r.iter().sum::<f64>() / r.len() as f64,
        ..Default::default()
    };
    let mut samples = PlotSamples::default();
    let xy = |r: &Vec<f64>| (r[0], r.get(1).copied().unwrap_or(0.0));
    let take = 2000.min(n_ref);
    match &s.data.kind {
        DataKind::Mixture(mixture) => {
            let est = tilted_target(&r, cfg.vrpo.lambda);
            rep.reward_mean_target = est.mean_reward;
            rep.target_ess = est.ess;
            rep.mode_weights_ref = mixture.mode_weights(&x0, None)?;
            rep.mode_weights_target = mixture.mode_weights(&x0, Some(&est.weights))?;
            if let RewardConfig::Linear { a, b } = &cfg.reward {
                let t = mixture.tilted_linear(cfg.vrpo.lambda, a)?;
                rep.reward_mean_closed_form = Some(t.linear_reward_mean(a, *b));
                // Mode weights as `assign` would see exact samples of the tilted mixture.
                let (xt, _) = t.sample(
                    cfg.eval.target_samples,
                    &mut rng_for(cfg.seed, 3, 1),
                    &s.learner_device,
                )?;
                rep.mode_weights_closed_form = Some(mixture.mode_weights(&xt, None)?);
            }
            // Samples for the report's scatter: reference, target-weighted (systematic
            // resampling), policy.
            let rows = x0.to_dtype(DType::F64)?.to_vec2::<f64>()?;
            samples.reference = rows.iter().take(take).map(xy).collect();
            samples.target = systematic_resample(&est.weights, take, 0.5)
                .into_iter()
                .map(|i| xy(&rows[i]))
                .collect();
        }
        DataKind::Digits(models) => {
            let cond = cond_ref.as_ref().expect("digits are class-conditional");
            let labels = cond.to_vec1::<u32>()?;
            let est = per_class_target(&r, &labels, s.data.classes, cfg.vrpo.lambda);
            rep.reward_mean_target = est.reward;
            rep.target_ess = est.ess;
            rep.images_ref = Some(image_metrics(
                models,
                &r,
                &x0,
                cond,
                s.data.classes,
                cfg.eval.samples,
            )?);
            save_grid(
                &run_dir.join("samples-reference.png"),
                &x0,
                &labels,
                s.data.classes,
                None,
            )?;
            save_grid(
                &run_dir.join("samples-target.png"),
                &x0,
                &labels,
                s.data.classes,
                Some(&est.weights),
            )?;
            rep.target = Some(est);
        }
    }
    let mut steps: Vec<u64> = cfg
        .eval
        .at_steps
        .iter()
        .copied()
        .filter(|&st| checkpoint_dir(run_dir, st).join("state.json").exists())
        .collect();
    if let Some((last, _)) = latest_checkpoint(run_dir)? {
        steps.push(last);
    }
    steps.sort_unstable();
    steps.dedup();
    for step in steps {
        let mut p = build_policy(cfg, s)?;
        load_checkpoint(&checkpoint_dir(run_dir, step), &mut p.varmap, &mut p.opt)?;
        let policy = ResidualPolicy {
            reference: s.data.reference.clone(),
            residual: p.model,
        };
        let mut prng = rng_for(cfg.seed, 4, step);
        let n = cfg.eval.samples;
        let cond = eval_classes(s.data.classes, n, &s.learner_device)?;
        let xk = randn(&mut prng, shape(n), &s.learner_device)?;
        let p0 = sample_chain(&policy, &s.grid, &xk, k, 0, cond.as_ref(), &mut prng)?;
        let rp = rewards_f64(s.reward.as_ref(), &p0, cond.as_ref())?;
        let (mean, se) = mean_and_se(&rp);
        let mut point = EvalPoint {
            step,
            reward_mean_policy: mean,
            reward_se_policy: se,
            mode_weights_policy: vec![],
            gap_closed: gap_closed(mean, rep.reward_mean_ref, rep.reward_mean_target),
            images: None,
        };
        match &s.data.kind {
            DataKind::Mixture(mixture) => {
                point.mode_weights_policy = mixture.mode_weights(&p0, None)?;
                eprintln!(
                    "[eval] step {step}: reward {:.4} (ref {:.4}, target {:.4}), gap closed {:.3}, modes {:?} (target {:?})",
                    point.reward_mean_policy,
                    rep.reward_mean_ref,
                    rep.reward_mean_target,
                    point.gap_closed,
                    round3(&point.mode_weights_policy),
                    round3(&rep.mode_weights_target)
                );
                let pr = p0.to_dtype(DType::F64)?.to_vec2::<f64>()?;
                samples.policy = pr.iter().take(take).map(xy).collect();
            }
            DataKind::Digits(models) => {
                let c = cond.as_ref().expect("digits are class-conditional");
                let im = image_metrics(models, &rp, &p0, c, s.data.classes, n)?;
                eprintln!(
                    "[eval] step {step}: reward A {:.4} (ref {:.4}, target {:.4}), gap closed {:.3}, judge B accuracy {:.3} (ref {:.3}), diversity {:.3} (ref {:.3})",
                    point.reward_mean_policy,
                    rep.reward_mean_ref,
                    rep.reward_mean_target,
                    point.gap_closed,
                    im.judge_acc,
                    rep.images_ref.as_ref().map_or(f64::NAN, |m| m.judge_acc),
                    im.diversity.pairwise,
                    rep.images_ref.as_ref().map_or(f64::NAN, |m| m.diversity.pairwise),
                );
                save_grid(
                    &run_dir.join("samples-policy.png"),
                    &p0,
                    &c.to_vec1::<u32>()?,
                    s.data.classes,
                    None,
                )?;
                point.images = Some(im);
            }
        }
        metrics::gauge!("tilt_reward_mean", "role" => "eval", "actor" => "0")
            .set(point.reward_mean_policy);
        rep.points.push(point);
    }
    if matches!(s.data.kind, DataKind::Mixture(_)) {
        write_json(&run_dir.join("samples.json"), &samples)?;
    }
    Ok(rep)
}

/// 2-D samples kept for the report (at most 2000 each).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct PlotSamples {
    pub reference: Vec<(f64, f64)>,
    pub target: Vec<(f64, f64)>,
    pub policy: Vec<(f64, f64)>,
}

/// Round for display.
pub fn round3(v: &[f64]) -> Vec<f64> {
    v.iter().map(|x| (x * 1000.0).round() / 1000.0).collect()
}

/// `summary.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub name: String,
    pub algorithm: String,
    /// What a rerun needs: seed, config hash, build, devices (DESIGN "Reproducibility").
    #[serde(default)]
    pub provenance: crate::provenance::Provenance,
    /// "segments" (VRPO) or "final_dpo" (the Diffusion-DPO baseline).
    #[serde(default)]
    pub method: String,
    /// The critic's value: "optimal" or "mean" (the average-score ablation).
    #[serde(default)]
    pub critic_value: String,
    pub labels: String,
    pub lambda: f64,
    pub beta: f64,
    pub segment_len: usize,
    pub sampling_steps: usize,
    pub steps: u64,
    pub wall_s: f64,
    pub reward_mean_ref: f64,
    pub reward_mean_policy: f64,
    /// Standard error of `reward_mean_policy` over the evaluation's samples.
    #[serde(default)]
    pub reward_se_policy: f64,
    pub reward_mean_target: f64,
    pub reward_mean_closed_form: Option<f64>,
    pub gap_closed: f64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mode_weights_ref: Vec<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mode_weights_policy: Vec<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mode_weights_target: Vec<f64>,
    pub mode_weights_closed_form: Option<Vec<f64>>,
    /// Mixture data: the largest |policy - target| mode weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_mode_weight_error: Option<f64>,
    pub target_ess: f64,
    /// Image data: held-out accuracy of reward model A and judge B.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classifiers: Option<Classifiers>,
    /// Image data: the reference's and the policy's samples.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<ImageMetrics>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<ImageMetrics>,
    /// Image data: the per-class importance-weighted target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<TargetEstimate>,
    pub critic: Option<CriticReport>,
    pub throughput: Throughput,
    pub learner_utilisation: f64,
    pub restarts: u64,
    /// The policy evaluated at each listed training length (drift of hard labels shows here).
    pub evals: Vec<EvalPoint>,
    pub stopped_early: bool,
    /// Peak resident set of the process that wrote the summary (MiB; the learner's in worker mode).
    pub peak_rss_mb: Option<f64>,
    /// Per-stage latency percentiles (ms), merged across actors.
    pub latency: std::collections::BTreeMap<String, tilt_actors::telemetry::LatencySummary>,
    /// Every record of the VRPO stage's replay accounted for (README, "Exact accounting").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accounting: Option<tilt_actors::accounting::Accounting>,
}

/// Held-out accuracy of the two classifiers, and how recognisable the reference's samples are.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Classifiers {
    pub reward_acc: f64,
    pub judge_acc: f64,
    pub reference_judge_acc: f64,
}

/// Throughput of the VRPO stage.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Throughput {
    pub pairs_per_s: f64,
    pub learner_steps_per_s: f64,
}

/// Evaluate, write summary.json, print latencies and draw the plots.
pub fn finish(
    cfg: &Config,
    s: &Setup,
    run_dir: &Path,
    critic: Option<CriticReport>,
    vrpo: &TrainReport,
    t0: Instant,
    progress: &Progress,
) -> Result<Summary> {
    let ev: EvalReport = stage_eval(cfg, s, run_dir)?;
    write_json(&run_dir.join("eval.json"), &ev)?;
    let last = ev.points.last().cloned();
    let Some(last) = last else {
        bail!(
            "eval: no checkpoint to evaluate in {} (run the \"vrpo\" stage first)",
            run_dir.display()
        );
    };
    let max_err = (!ev.mode_weights_target.is_empty()).then(|| {
        last.mode_weights_policy
            .iter()
            .zip(&ev.mode_weights_target)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max)
    });
    let classifiers = match &s.data.kind {
        DataKind::Digits(m) => Some(Classifiers {
            reward_acc: m.report.reward_acc,
            judge_acc: m.report.judge_acc,
            reference_judge_acc: m.report.reference_judge_acc,
        }),
        DataKind::Mixture(_) => None,
    };
    let summary = Summary {
        name: cfg.name.clone(),
        provenance: crate::provenance::Provenance::of(cfg)?,
        algorithm: "vrpo".into(),
        method: serde_json::to_value(cfg.vrpo.method)?
            .as_str()
            .unwrap_or_default()
            .to_string(),
        critic_value: serde_json::to_value(cfg.critic.value)?
            .as_str()
            .unwrap_or_default()
            .to_string(),
        labels: format!("{:?}", cfg.vrpo.labels).to_lowercase(),
        lambda: cfg.vrpo.lambda,
        beta: cfg.vrpo.beta,
        segment_len: cfg.vrpo.segment_len,
        sampling_steps: cfg.sampling.steps,
        steps: last.step,
        wall_s: t0.elapsed().as_secs_f64(),
        reward_mean_ref: ev.reward_mean_ref,
        reward_mean_policy: last.reward_mean_policy,
        reward_se_policy: last.reward_se_policy,
        reward_mean_target: ev.reward_mean_target,
        reward_mean_closed_form: ev.reward_mean_closed_form,
        gap_closed: last.gap_closed,
        mode_weights_ref: ev.mode_weights_ref.clone(),
        mode_weights_policy: last.mode_weights_policy.clone(),
        mode_weights_target: ev.mode_weights_target.clone(),
        mode_weights_closed_form: ev.mode_weights_closed_form.clone(),
        max_mode_weight_error: max_err,
        target_ess: ev.target_ess,
        classifiers,
        reference: ev.images_ref.clone(),
        policy: last.images.clone(),
        target: ev.target.clone(),
        critic: critic.or_else(|| read_json(&run_dir.join("critic.json")).ok()),
        throughput: Throughput {
            pairs_per_s: vrpo.pairs_per_s,
            learner_steps_per_s: vrpo.learner_steps_per_s,
        },
        learner_utilisation: vrpo.learner_utilisation,
        restarts: vrpo.restarts,
        evals: ev.points.clone(),
        stopped_early: false,
        peak_rss_mb: crate::telemetry::peak_rss_mb(),
        latency: vrpo.latency.clone(),
        accounting: vrpo.accounting.clone(),
    };
    for (stage, l) in &summary.latency {
        progress.line(&format!(
            "latency {stage:<16} n={:<7} p50 {:>9.3} ms  p90 {:>9.3} ms  p99 {:>9.3} ms  max {:>9.3} ms",
            l.count, l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms
        ));
    }
    write_json(&run_dir.join("summary.json"), &summary)?;
    match render(run_dir) {
        Ok(files) => progress.line(&format!(
            "tilt: {} plots in {}",
            files.len(),
            run_dir.display()
        )),
        Err(e) => progress.line(&format!("tilt: warning: plots failed: {e:#}")),
    }
    let detail = match (
        &summary.max_mode_weight_error,
        &summary.policy,
        &summary.reference,
    ) {
        (Some(e), _, _) => format!("max mode-weight error {e:.3}"),
        (None, Some(p), Some(r)) => format!(
            "judge B accuracy {:.3} (reference {:.3}), diversity {:.3} (reference {:.3})",
            p.judge_acc, r.judge_acc, p.diversity.pairwise, r.diversity.pairwise
        ),
        _ => String::new(),
    };
    progress.line(&format!(
        "tilt: done in {:.0}s: reward {:.4} (reference {:.4}, target {:.4}), gap closed {:.3}, {detail}; {}",
        summary.wall_s,
        summary.reward_mean_policy,
        summary.reward_mean_ref,
        summary.reward_mean_target,
        summary.gap_closed,
        run_dir.join("summary.json").display()
    ));
    Ok(summary)
}

/// Render every plot whose data exists in `run_dir`; returns the files written.
pub fn render(run_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let hist_file = run_dir.join("history.json");
    if hist_file.exists() {
        let hist: Vec<(u64, f32, f32)> = read_json(&hist_file)?;
        let loss: Vec<(f64, f64)> = hist.iter().map(|h| (h.0 as f64, h.1 as f64)).collect();
        let acc: Vec<(f64, f64)> = hist.iter().map(|h| (h.0 as f64, h.2 as f64)).collect();
        let p = run_dir.join("loss.png");
        line_chart(
            &p,
            "VRPO loss",
            "learner step",
            "loss",
            &[Series {
                name: "loss",
                points: &loss,
            }],
            &[("ln 2 (policy = reference)", std::f64::consts::LN_2)],
        )?;
        out.push(p);
        let p = run_dir.join("accuracy.png");
        line_chart(
            &p,
            "Pair accuracy (sign of Delta agrees with V(a) - V(b))",
            "learner step",
            "accuracy",
            &[Series {
                name: "accuracy",
                points: &acc,
            }],
            &[],
        )?;
        out.push(p);
    }
    let eval_file = run_dir.join("eval.json");
    if eval_file.exists() {
        let ev: EvalReport = read_json(&eval_file)?;
        let pts: Vec<(f64, f64)> = std::iter::once((0.0, ev.reward_mean_ref))
            .chain(
                ev.points
                    .iter()
                    .map(|p| (p.step as f64, p.reward_mean_policy)),
            )
            .collect();
        let p = run_dir.join("reward.png");
        let mut h = vec![
            (
                "target (importance-weighted reference)",
                ev.reward_mean_target,
            ),
            ("reference", ev.reward_mean_ref),
        ];
        if let Some(c) = ev.reward_mean_closed_form {
            h.push(("closed-form tilt of the data", c));
        }
        line_chart(
            &p,
            "Mean reward of the policy",
            "learner step",
            "mean reward",
            &[Series {
                name: "policy",
                points: &pts,
            }],
            &h,
        )?;
        out.push(p);
    }
    let cal_file = run_dir.join("calibration.json");
    if cal_file.exists() {
        let pairs: Vec<(f64, bool)> = read_json(&cal_file)?;
        let p = run_dir.join("calibration.png");
        calibration(
            &p,
            "Critic calibration (held-out): predicted CDF vs observed",
            &pairs,
            10,
        )?;
        out.push(p);
    }
    let s_file = run_dir.join("samples.json");
    if s_file.exists() {
        let s: PlotSamples = read_json(&s_file)?;
        let p = run_dir.join("samples.png");
        scatter(
            &p,
            "Samples",
            &[
                ("reference", &s.reference),
                ("target (weighted reference)", &s.target),
                ("tuned policy", &s.policy),
            ],
            2000,
        )?;
        out.push(p);
    }
    Ok(out)
}
