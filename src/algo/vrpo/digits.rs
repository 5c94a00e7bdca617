//! VRPO on images: the 8x8 digits (`data.kind = "digits"`). The "pretrain" stage trains the three
//! models the run needs on the training split: reward model A (an MLP classifier; r = log p_A(class
//! | x)), judge B (a CNN classifier with another seed, used only to evaluate) and the
//! class-conditional reference U-Net. They live in `<run>/pretrain/` (or in the run named by
//! `pretrain.from`). The image evaluation: reward A, judge B, diversity, the per-class tilted
//! target and PNG grids (one row per class).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};
use tilt_kernels::classifier::{
    accuracy, train_classifier, Classifier, ClassifierTrainConfig, CnnClassifier,
    CnnClassifierConfig, MlpClassifier, MlpClassifierConfig,
};
use tilt_kernels::denoiser::{load_weights, save_weights, Denoiser, Prediction};
use tilt_kernels::dfdpo::pretrain_denoiser;
use tilt_kernels::digits::{Digits, Upsample};
use tilt_kernels::init::{seeded_var_builder, CLASSIFIER_STREAM, REFERENCE_STREAM};
use tilt_kernels::logprob::sample_chain;
use tilt_kernels::models::{MlpConfig, MlpDenoiser, UNetConfig, UNetDenoiser};
use tilt_kernels::optim::{named_vars, AdamW, AdamWConfig, LrPlan};
use tilt_kernels::rng::{randn, rng_for};
use tilt_kernels::schedule::{SamplingGrid, VpSchedule};
use tilt_kernels::tilt::{systematic_resample, tilted_target};

use crate::config::{Config, DataConfig, DigitsDataConfig, ReferenceModel};
use crate::files::{read_json, write_json};
use crate::plots::image_grid;
use crate::progress::Progress;

/// Judge accuracy the reference's samples must reach for the run to mean anything (issue 12).
pub const REFERENCE_JUDGE_FLOOR: f64 = 0.8;
/// Reference samples per class that the pretrain stage shows the judge.
const JUDGED_PER_CLASS: usize = 50;
/// Samples per class in the PNG grids.
const GRID_PER_CLASS: usize = 12;

/// What the pretrain stage measured; saved as `pretrain/pretrain.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PretrainReport {
    /// The data section the models were trained for (a run reusing them must match it).
    pub data: DigitsDataConfig,
    pub train_rows: usize,
    pub held_out_rows: usize,
    /// Held-out accuracy of reward model A and of judge B.
    pub reward_acc: f64,
    pub judge_acc: f64,
    /// Share of reference samples (JUDGED_PER_CLASS a class, the K-step chain) that judge B
    /// classifies as their conditioning class.
    pub reference_judge_acc: f64,
    pub reference_steps: u64,
    pub reference_loss: f64,
    pub sampling_steps: usize,
    pub wall_s: f64,
}

/// The pretrained models and the data a digits run uses.
pub struct DigitsModels {
    pub reference: Arc<dyn Denoiser>,
    pub reward_model: Arc<dyn Classifier>,
    pub judge: Arc<dyn Classifier>,
    pub report: PretrainReport,
    /// The training split [n, 1, s, s] (nearest-neighbour diversity).
    pub train_images: Tensor,
}

/// Where a run's pretrained models are: `pretrain.from` (a run directory, or its `pretrain/`),
/// else `<run>/pretrain`.
pub fn pretrain_dir(cfg: &Config, run_dir: &Path) -> PathBuf {
    if cfg.pretrain.from.is_empty() {
        return run_dir.join("pretrain");
    }
    let from = PathBuf::from(&cfg.pretrain.from);
    if from.join("pretrain").join("pretrain.json").exists() {
        from.join("pretrain")
    } else {
        from
    }
}

fn files(dir: &Path) -> [PathBuf; 4] {
    [
        dir.join("pretrain.json"),
        dir.join("reference.safetensors"),
        dir.join("reward_model.safetensors"),
        dir.join("judge.safetensors"),
    ]
}

/// The data split of a run: (train x, train y, held-out x, held-out y) on `device`, only the
/// first `d.classes` classes, at `d.size`.
pub fn load_split(
    d: &DigitsDataConfig,
    seed: u64,
    device: &Device,
) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
    let all =
        Digits::load(Path::new(&d.path)).with_context(|| format!("data.path = {:?}", d.path))?;
    let all = all.first_classes(d.classes);
    let all = if d.size == 16 {
        all.upsample2x(Upsample::Bilinear)
    } else {
        all
    };
    let (train, held) = all.split(seed, d.held_out)?;
    let (tx, ty) = train.as_tensors(device)?;
    let (hx, hy) = held.as_tensors(device)?;
    Ok((tx, ty, hx, hy))
}

/// The class-conditional reference denoiser `data.model` names.
fn reference_net(
    d: &DigitsDataConfig,
    vm: &VarMap,
    seed: u64,
    device: &Device,
) -> Result<Arc<dyn Denoiser>> {
    let vb = seeded_var_builder(vm, seed, REFERENCE_STREAM, DType::F32, device);
    Ok(match d.model {
        ReferenceModel::Mlp => Arc::new(MlpDenoiser::new(
            MlpConfig {
                dim: d.size * d.size,
                hidden: d.hidden,
                depth: d.depth,
                time_dim: d.time_dim,
                classes: d.classes,
                zero_init_output: false,
            },
            vb,
        )?),
        ReferenceModel::Unet => Arc::new(UNetDenoiser::new(
            UNetConfig {
                channels: 1,
                size: d.size,
                base: d.base,
                time_dim: d.time_dim,
                classes: d.classes,
                zero_init_output: false,
            },
            vb,
        )?),
    })
}

/// Seeds of the two classifiers' initial weights and batches: different, so that A and B are
/// independent models.
const REWARD_SEED: u64 = 101;
const JUDGE_SEED: u64 = 202;

fn reward_net(
    d: &DigitsDataConfig,
    vm: &VarMap,
    seed: u64,
    device: &Device,
) -> Result<MlpClassifier> {
    Ok(MlpClassifier::new(
        MlpClassifierConfig {
            side: d.size,
            hidden: d.classifier_hidden,
            classes: d.classes,
            ..Default::default()
        },
        seeded_var_builder(
            vm,
            seed.wrapping_add(REWARD_SEED),
            CLASSIFIER_STREAM,
            DType::F32,
            device,
        ),
    )?)
}

fn judge_net(
    d: &DigitsDataConfig,
    vm: &VarMap,
    seed: u64,
    device: &Device,
) -> Result<CnnClassifier> {
    Ok(CnnClassifier::new(
        CnnClassifierConfig {
            side: d.size,
            classes: d.classes,
            ..Default::default()
        },
        seeded_var_builder(
            vm,
            seed.wrapping_add(JUDGE_SEED),
            CLASSIFIER_STREAM,
            DType::F32,
            device,
        ),
    )?)
}

impl DigitsModels {
    /// Load the pretrained models of a run (see [`pretrain_dir`]); fails with the missing file and
    /// what to run when the pretrain stage has not run, or when they were trained for other data.
    pub fn load(cfg: &Config, run_dir: &Path, device: &Device) -> Result<Self> {
        let DataConfig::Digits(d) = &cfg.data else {
            bail!("digits models for a run whose data.kind is not \"digits\"");
        };
        let dir = pretrain_dir(cfg, run_dir);
        let [json, wref, wrew, wjudge] = files(&dir);
        for f in [&json, &wref, &wrew, &wjudge] {
            if !f.exists() {
                bail!(
                    "{} is missing: run the \"pretrain\" stage first (or set pretrain.from to a run that has)",
                    f.display()
                );
            }
        }
        let report: PretrainReport = read_json(&json)?;
        if &report.data != d {
            bail!(
                "{}: the pretrained models were trained for data {:?}, this run has {:?}",
                json.display(),
                report.data,
                d
            );
        }
        let mut vm = VarMap::new();
        let reference = reference_net(d, &vm, cfg.seed, device)?;
        load_weights(&mut vm, &wref)?;
        let mut vm = VarMap::new();
        let reward_model = reward_net(d, &vm, cfg.seed, device)?;
        load_weights(&mut vm, &wrew)?;
        let mut vm = VarMap::new();
        let judge = judge_net(d, &vm, cfg.seed, device)?;
        load_weights(&mut vm, &wjudge)?;
        let (train_images, _, _, _) = load_split(d, cfg.seed, device)?;
        Ok(Self {
            reference,
            reward_model: Arc::new(reward_model),
            judge: Arc::new(judge),
            report,
            train_images,
        })
    }
}

/// The "pretrain" stage: train reward model A, judge B and the reference U-Net (unless this run
/// already holds them, or `pretrain.from` names a run that does), check the reference's samples
/// with the judge, and save everything under `<run>/pretrain/`.
pub fn ensure_pretrained(
    cfg: &Config,
    schedule: &VpSchedule,
    grid: &SamplingGrid,
    run_dir: &Path,
    device: &Device,
    progress: &Progress,
) -> Result<PretrainReport> {
    let DataConfig::Digits(d) = &cfg.data else {
        bail!("stages: \"pretrain\" needs data.kind = \"digits\"");
    };
    let dir = pretrain_dir(cfg, run_dir);
    let [json, ..] = files(&dir);
    if json.exists() {
        let rep: PretrainReport = read_json(&json)?;
        progress.line(&format!(
            "[pretrain] reusing the models in {} (reward model {:.3}, judge {:.3}, reference samples judged {:.3})",
            dir.display(),
            rep.reward_acc,
            rep.judge_acc,
            rep.reference_judge_acc
        ));
        return Ok(rep);
    }
    if !cfg.pretrain.from.is_empty() {
        bail!(
            "pretrain.from = {:?}: no pretrain.json there (expected {})",
            cfg.pretrain.from,
            json.display()
        );
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let t0 = Instant::now();
    let (tx, ty, hx, hy) = load_split(d, cfg.seed, device)?;
    progress.line(&format!(
        "[pretrain] digits {}x{}, {} classes: {} training and {} held-out images",
        d.size,
        d.size,
        d.classes,
        tx.dim(0)?,
        hx.dim(0)?
    ));
    let [_, wref, wrew, wjudge] = files(&dir);
    // Reward model A and judge B: different architectures and seeds, the same training split.
    let mut accs = [0.0f64; 2];
    let mut trained: Vec<Box<dyn Classifier>> = Vec::with_capacity(2);
    for (i, (name, path)) in [("reward model A (MLP)", &wrew), ("judge B (CNN)", &wjudge)]
        .into_iter()
        .enumerate()
    {
        let vm = VarMap::new();
        let (net, seed): (Box<dyn Classifier>, u64) = if i == 0 {
            (Box::new(reward_net(d, &vm, cfg.seed, device)?), REWARD_SEED)
        } else {
            (Box::new(judge_net(d, &vm, cfg.seed, device)?), JUDGE_SEED)
        };
        let mut last = Instant::now();
        train_classifier(
            net.as_ref(),
            &vm,
            &tx,
            &ty,
            &ClassifierTrainConfig {
                steps: d.classifier_steps as usize,
                ..Default::default()
            },
            cfg.seed.wrapping_add(seed),
            &mut |step, total, loss| {
                if last.elapsed() > Duration::from_secs(3) || step == total {
                    last = Instant::now();
                    progress.line(&format!(
                        "[pretrain] {name}: step {step}/{total} loss {loss:.4}"
                    ));
                }
                Ok(())
            },
        )?;
        accs[i] = accuracy(net.as_ref(), &hx, &hy)?;
        progress.line(&format!(
            "[pretrain] {name}: held-out accuracy {:.3}",
            accs[i]
        ));
        save_weights(&vm, path)?;
        trained.push(net);
    }
    // The class-conditional reference.
    let vm = VarMap::new();
    let reference = reference_net(d, &vm, cfg.seed, device)?;
    let mut opt = AdamW::new(
        named_vars(&vm)?,
        AdamWConfig {
            lr: cfg.pretrain.lr,
            ..Default::default()
        },
    )?;
    let total = cfg.pretrain.steps;
    let mut last = Instant::now();
    let t_ref = Instant::now();
    let loss = pretrain_denoiser(
        reference.as_ref(),
        &mut opt,
        schedule,
        &tx,
        Some(&ty),
        total,
        cfg.pretrain.batch,
        cfg.seed,
        &LrPlan::constant(cfg.pretrain.lr),
        None,
        Prediction::Eps,
        &mut |step, loss| {
            if last.elapsed() > Duration::from_secs(3) || step == total {
                last = Instant::now();
                progress.line(&format!(
                    "[pretrain] reference {:?}: step {step}/{total} loss {loss:.4} ({:.1} steps/s)",
                    d.model,
                    step as f64 / t_ref.elapsed().as_secs_f64()
                ));
            }
        },
    )?;
    save_weights(&vm, &wref)?;
    // Are the reference's samples recognisable? The judge says.
    let judge = &trained[1];
    let cond = balanced_classes(d.classes, JUDGED_PER_CLASS, device)?;
    let mut rng = rng_for(cfg.seed, 21, 0);
    let xk = randn(&mut rng, (cond.dim(0)?, 1, d.size, d.size), device)?;
    let x0 = sample_chain(
        reference.as_ref(),
        grid,
        &xk,
        grid.len(),
        0,
        Some(&cond),
        &mut rng,
    )?;
    let ref_acc = accuracy(judge.as_ref(), &x0, &cond)?;
    let report = PretrainReport {
        data: d.clone(),
        train_rows: tx.dim(0)?,
        held_out_rows: hx.dim(0)?,
        reward_acc: accs[0],
        judge_acc: accs[1],
        reference_judge_acc: ref_acc,
        reference_steps: total,
        reference_loss: loss as f64,
        sampling_steps: grid.len(),
        wall_s: t0.elapsed().as_secs_f64(),
    };
    let verdict = if ref_acc >= REFERENCE_JUDGE_FLOOR {
        "ok".to_string()
    } else {
        format!(
            "WARNING: below {REFERENCE_JUDGE_FLOOR}: the reference has not learned the digits; \
             a preference result on it means little (train longer: pretrain.steps)"
        )
    };
    progress.line(&format!(
        "[pretrain] judge B recognises {:.3} of the reference's samples ({} steps, {:.0}s) {verdict}",
        ref_acc,
        grid.len(),
        t0.elapsed().as_secs_f64()
    ));
    // The json last: its presence means every weight file is complete.
    write_json(&files(&dir)[0], &report)?;
    Ok(report)
}

/// [classes * per_class] u32 labels 0,0,..,1,1,..: class-major, so a grid row is a class.
pub fn balanced_classes(classes: usize, per_class: usize, device: &Device) -> Result<Tensor> {
    let c: Vec<u32> = (0..classes as u32)
        .flat_map(|c| std::iter::repeat_n(c, per_class))
        .collect();
    let n = c.len();
    Ok(Tensor::from_vec(c, n, device)?)
}

/// Metrics of one set of generated images (the per-model block).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ImageMetrics {
    /// Mean reward A.
    pub reward: f64,
    /// Its standard error (sample standard deviation / sqrt(n)).
    #[serde(default)]
    pub reward_se: f64,
    /// Share the judge classifies as their conditioning class.
    pub judge_acc: f64,
    /// Mean judge log-probability of the conditioning class.
    pub judge_logp: f64,
    pub diversity: Diversity,
}

/// Diversity of generated images.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Diversity {
    /// Mean pairwise L2 distance between samples of the same class (averaged over classes).
    pub pairwise: f64,
    /// Distinct nearest training images / samples.
    pub distinct_nn: f64,
}

/// Reward, judge and diversity of `x` [n, 1, s, s] generated for classes `cond` [n]. Diversity
/// depends on the number of samples (distinct nearest neighbours saturate), so it is measured on
/// the first `diversity_rows` only: the same count for every model compared.
pub fn image_metrics(
    m: &DigitsModels,
    reward: &[f64],
    x: &Tensor,
    cond: &Tensor,
    classes: usize,
    diversity_rows: usize,
) -> Result<ImageMetrics> {
    let lp = m
        .judge
        .log_prob(x, cond)?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;
    let rows = diversity_rows.min(x.dim(0)?);
    let n = reward.len() as f64;
    let mean = reward.iter().sum::<f64>() / n.max(1.0);
    let var = reward.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    Ok(ImageMetrics {
        reward: mean,
        reward_se: (var / n.max(1.0)).sqrt(),
        judge_acc: accuracy(m.judge.as_ref(), x, cond)?,
        judge_logp: lp.iter().sum::<f64>() / lp.len().max(1) as f64,
        diversity: diversity(
            &x.narrow(0, 0, rows)?,
            &cond.narrow(0, 0, rows)?,
            classes,
            &m.train_images,
        )?,
    })
}

/// Mean within-class pairwise distance and the share of distinct nearest training images.
pub fn diversity(x: &Tensor, cond: &Tensor, classes: usize, train: &Tensor) -> Result<Diversity> {
    let flat = x.flatten_from(1)?.to_dtype(DType::F32)?;
    let rows = flat.to_vec2::<f32>()?;
    let labels = cond.to_vec1::<u32>()?;
    let (mut sum, mut classes_seen) = (0.0, 0usize);
    for c in 0..classes as u32 {
        let idx: Vec<usize> = (0..rows.len()).filter(|&i| labels[i] == c).collect();
        if idx.len() < 2 {
            continue;
        }
        let (mut s, mut n) = (0.0, 0usize);
        for (a, &i) in idx.iter().enumerate() {
            for &j in &idx[a + 1..] {
                s += dist(&rows[i], &rows[j]);
                n += 1;
            }
        }
        sum += s / n as f64;
        classes_seen += 1;
    }
    // Nearest training image of each sample: |x - t|^2 = |x|^2 - 2 x.t + |t|^2, one matmul.
    let t = train
        .flatten_from(1)?
        .to_dtype(DType::F32)?
        .to_device(flat.device())?;
    let d2 = (flat
        .sqr()?
        .sum_keepdim(1)?
        .broadcast_add(&t.sqr()?.sum_keepdim(1)?.t()?)?
        - (flat.matmul(&t.t()?)? * 2.0)?)?;
    let nn = d2.argmin(1)?.to_vec1::<u32>()?;
    let mut distinct = nn.clone();
    distinct.sort_unstable();
    distinct.dedup();
    Ok(Diversity {
        pairwise: if classes_seen > 0 {
            sum / classes_seen as f64
        } else {
            0.0
        },
        distinct_nn: distinct.len() as f64 / nn.len().max(1) as f64,
    })
}

fn dist(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// The per-class tilted target from reference samples: within each class, self-normalised
/// weights exp(lambda r) (the tilt is per prompt: p*(x | c) ~ p_ref(x | c) exp(lambda r(x, c))).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct TargetEstimate {
    /// Mean over classes of the class's weighted mean reward.
    pub reward: f64,
    /// Sum over classes of Kish's effective sample size.
    pub ess: f64,
    /// The smallest per-class ESS.
    pub min_class_ess: f64,
    /// Normalised weights of each sample within its class.
    #[serde(skip)]
    pub weights: Vec<f64>,
}

/// See [`TargetEstimate`]. `labels[i]` is the class of `rewards[i]`.
pub fn per_class_target(
    rewards: &[f64],
    labels: &[u32],
    classes: usize,
    lambda: f64,
) -> TargetEstimate {
    let mut weights = vec![0.0; rewards.len()];
    let (mut reward, mut ess, mut min_ess, mut seen) = (0.0, 0.0, f64::INFINITY, 0usize);
    for c in 0..classes as u32 {
        let idx: Vec<usize> = (0..rewards.len()).filter(|&i| labels[i] == c).collect();
        if idx.is_empty() {
            continue;
        }
        let r: Vec<f64> = idx.iter().map(|&i| rewards[i]).collect();
        let est = tilted_target(&r, lambda);
        for (k, &i) in idx.iter().enumerate() {
            weights[i] = est.weights[k];
        }
        reward += est.mean_reward;
        ess += est.ess;
        min_ess = min_ess.min(est.ess);
        seen += 1;
    }
    TargetEstimate {
        reward: reward / seen.max(1) as f64,
        ess,
        min_class_ess: if seen > 0 { min_ess } else { 0.0 },
        weights,
    }
}

/// `GRID_PER_CLASS` images of each class from `x` (class-major `cond`), or, with `weights`,
/// resampled systematically within each class: one PNG row per class.
pub fn save_grid(
    path: &Path,
    x: &Tensor,
    cond: &[u32],
    classes: usize,
    weights: Option<&[f64]>,
) -> Result<()> {
    // PNG pixels are written on the host: one read-back of the samples, whatever their device.
    let x = x.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    let mut images = Vec::new();
    for c in 0..classes as u32 {
        let idx: Vec<usize> = (0..cond.len()).filter(|&i| cond[i] == c).collect();
        let pick: Vec<usize> = match weights {
            None => idx.iter().copied().take(GRID_PER_CLASS).collect(),
            Some(w) => {
                let wc: Vec<f64> = idx.iter().map(|&i| w[i]).collect();
                systematic_resample(&wc, GRID_PER_CLASS, 0.5)
                    .into_iter()
                    .map(|k| idx[k])
                    .collect()
            }
        };
        for &i in &pick {
            images.push(x.get(i)?.to_vec3::<f32>()?);
        }
        // Pad a short class so that each class stays on its own row.
        for _ in pick.len()..GRID_PER_CLASS {
            images.push(vec![vec![vec![-1.0; x.dim(3)?]; x.dim(2)?]]);
        }
    }
    image_grid(path, &images, GRID_PER_CLASS, 4, (-1.0, 1.0))
}
