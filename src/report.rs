//! The run report: PNG plots rendered from the JSON files a run leaves behind (so `tilt report` can
//! redraw them for a finished or a running run), and the printed summary.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use crate::pipeline::{read_json, EvalReport, PlotSamples};
use crate::plots::{calibration, line_chart, scatter, Series};

/// Render every plot whose data exists in `run_dir`; returns the files written.
pub fn render_plots(run_dir: &Path) -> Result<Vec<PathBuf>> {
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

/// `tilt report RUN_DIR`: re-render the plots and print the summary (or the progress so far).
pub fn report(run_dir: &Path) -> Result<()> {
    if !run_dir.join("config.toml").exists() {
        bail!(
            "{} is not a tilt run directory (no config.toml)",
            run_dir.display()
        );
    }
    let files = render_plots(run_dir)?;
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
