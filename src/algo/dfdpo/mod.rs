//! The DF-DPO pipeline (video): `pretrain` the spatio-temporal reference on real clips; continue it
//! through the actors with `sft` (denoising loss on the real clips of the pairs), `dfdpo`
//! (Diffusion-DPO + lambda SFT on (real, edited) pairs, curriculum) and `ablation` (DF-DPO with
//! temporal-only, spatial-only and hybrid operators), all for the same steps on the same data; then
//! `eval`: sample clips from every model from the same noise and measure the arrow of time,
//! smoothness, sharpness and noise against the real clips.

pub mod worker;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use async_trait::async_trait;
use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use tilt_actors::accounting::Accounting;
use tilt_actors::checkpoint::{latest_checkpoint, load_checkpoint};
use tilt_actors::codec::records_to_clip_pairs;
use tilt_actors::distortion::DistortionSource;
use tilt_actors::objective::{model_device, Objective, StepStats};
use tilt_actors::replay::{Record, ReplayBuffer};
use tilt_actors::source::PairSource;
use tilt_kernels::clip_gates::BlobGate;
use tilt_kernels::denoiser::{load_weights, save_weights, Denoiser, Prediction};
use tilt_kernels::dfdpo::{denoise_grads, dfdpo_grads, pretrain_denoiser, DataScale};
use tilt_kernels::distort::{corrupt_share, Curriculum, Distortion};
use tilt_kernels::logprob::sample_chain_clipped;
use tilt_kernels::optim::{Ema, LrPlan};
use tilt_kernels::rng::{randn, rng_for};
use tilt_kernels::schedule::{SamplingGrid, VpSchedule};

use super::{has_stage, Algorithm, RunCtx, WorkerRole};
use crate::build;
use crate::config::{ClipSource, Config, MotionKind};
use crate::files::{read_json, write_json};
use crate::progress::Progress;
use crate::train::{off_executor, train, TrainReport, Trainable, Training};
use crate::video::{
    generate, load_clip_dir, load_npy, save_npy, video_stats, ClipSpec, Motion, VideoStats,
};

/// DF-DPO.
pub struct DfDpo;

/// Diffusion-DPO + lambda SFT on (real, edited) pairs against the frozen reference.
pub struct DfDpoObjective {
    pub reference: Arc<dyn Denoiser>,
    pub schedule: VpSchedule,
    pub beta: f64,
    pub lambda_sft: f64,
    pub seed: u64,
    /// Data space -> the space the denoisers diffuse in (applied to winners and losers).
    pub scale: DataScale,
}

impl Objective for DfDpoObjective {
    fn grads(
        &self,
        model: &dyn Denoiser,
        vars: &[(String, Var)],
        records: &[Record],
        step: u64,
        replica: usize,
    ) -> tilt_actors::Result<(Vec<Option<Tensor>>, StepStats)> {
        let (w, l) = records_to_clip_pairs(records, &model_device(vars)?)?;
        let (w, l) = (self.scale.to_model(&w)?, self.scale.to_model(&l)?);
        let mut rng = rng_for(self.seed, 5_000 + replica as u64, step);
        let (g, s) = dfdpo_grads(
            model,
            self.reference.as_ref(),
            vars,
            &self.schedule,
            &w,
            &l,
            self.beta,
            self.lambda_sft,
            &mut rng,
        )?;
        Ok((
            g,
            StepStats {
                loss: s.loss,
                accuracy: s.implicit_accuracy,
                label_strength: None,
            },
        ))
    }
}

/// The SFT baseline: the plain denoising loss on the winners (real clips) of the same pairs.
pub struct SftObjective {
    pub schedule: VpSchedule,
    pub seed: u64,
    /// Data space -> the space the denoiser diffuses in.
    pub scale: DataScale,
}

impl Objective for SftObjective {
    fn grads(
        &self,
        model: &dyn Denoiser,
        vars: &[(String, Var)],
        records: &[Record],
        step: u64,
        replica: usize,
    ) -> tilt_actors::Result<(Vec<Option<Tensor>>, StepStats)> {
        let (w, _) = records_to_clip_pairs(records, &model_device(vars)?)?;
        let w = self.scale.to_model(&w)?;
        let mut rng = rng_for(self.seed, 6_000 + replica as u64, step);
        // The continuation losses stay in eps, as the papers write them (with a v network: the
        // v-MSE weighted by abar).
        let (g, loss) = denoise_grads(
            model,
            vars,
            &self.schedule,
            &w,
            None,
            &mut rng,
            Prediction::Eps,
        )?;
        Ok((
            g,
            StepStats {
                loss,
                accuracy: 0.0,
                label_strength: None,
            },
        ))
    }
}

/// The models DF-DPO trains from the reference, with the curriculum each uses (None = SFT).
fn variants(cfg: &Config) -> Result<Vec<(&'static str, Option<Curriculum>)>> {
    let has = |s: &str| has_stage(cfg, s);
    let mut v = vec![];
    if has("sft") {
        v.push(("sft", None));
    }
    if has("dfdpo") {
        v.push(("dfdpo", Some(cfg.dfdpo.curriculum.clone())));
    }
    if has("ablation") {
        let with_every = |c: Curriculum| Curriculum {
            every: cfg.dfdpo.curriculum.every,
            ..c
        };
        v.push((
            "temporal_only",
            Some(with_every(Curriculum::only(&[
                Distortion::Reverse,
                Distortion::Shuffle,
            ])?)),
        ));
        v.push((
            "spatial_only",
            Some(with_every(Curriculum::only(&[
                Distortion::Blur,
                Distortion::ColourShift,
                Distortion::Noise,
            ])?)),
        ));
        v.push((
            "hybrid",
            Some(with_every(Curriculum::only(&[Distortion::Hybrid])?)),
        ));
    }
    Ok(v)
}

fn clip_spec(cfg: &Config) -> Result<ClipSpec> {
    let kind = match cfg.video.motion {
        MotionKind::Friction => Motion::Friction,
        MotionKind::Bounce => Motion::Bounce,
        MotionKind::Mixed => Motion::Mixed,
    };
    let spec = ClipSpec {
        frames: cfg.video.frames,
        channels: cfg.video.channels,
        size: cfg.video.size,
        kind,
    };
    spec.validate()?;
    Ok(spec)
}

/// The data-space -> model-space map of this run: `video.normalize = true` standardises with the
/// real clips' scalar mean and std (DataScale's doc says why), false keeps the identity. Written
/// to `data_scale.json` by the first run and read back by every later one (resume, eval), so the
/// models and their scale never disagree.
fn data_scale(
    cfg: &Config,
    clips: &Tensor,
    run_dir: &Path,
    progress: &Progress,
) -> Result<DataScale> {
    let file = run_dir.join("data_scale.json");
    if file.exists() {
        return read_json(&file);
    }
    let scale = if cfg.video.normalize {
        DataScale::fit(clips).context("video.normalize = true")?
    } else {
        DataScale::IDENTITY
    };
    progress.line(&format!(
        "[data] diffusion space = (clip - {:.4}) / {:.4}{}",
        scale.shift,
        scale.scale,
        if cfg.video.normalize {
            ""
        } else {
            " (video.normalize = false)"
        }
    ));
    write_json(&file, &scale)?;
    Ok(scale)
}

/// What the "pretrain" stage did: `pretrain.json` next to the reference (and in summary.json).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PretrainReport {
    /// "conv" or "mixer", and the number of trainable values.
    pub model: String,
    pub params: usize,
    pub steps: u64,
    pub batch: usize,
    pub wall_s: f64,
    pub last_loss: f32,
    /// EMA decay of the saved weights (0 = the last weights).
    pub ema: f64,
    /// Clips of the training set, and how many of them were temporally corrupted copies
    /// (`pretrain.corrupt`, `pretrain.corrupt_ops`).
    pub clips: usize,
    pub corrupted: usize,
    pub corrupt_share: f64,
    pub corrupt_ops: Vec<(String, f64)>,
    /// What the network predicts (`video.prediction`); "eps" in reports written before it existed.
    #[serde(default)]
    pub prediction: Prediction,
}

fn pretrain_report_file(run_dir: &Path) -> PathBuf {
    run_dir.join("pretrain.json")
}

/// Stage "pretrain": the reference denoiser on the real clips (plain denoising loss), a share
/// `pretrain.corrupt` of them replaced by temporally corrupted copies when asked. The learning
/// rate follows `pretrain.warmup` / `pretrain.cosine`; with `pretrain.ema` the saved reference is
/// the weights' moving average.
#[allow(clippy::too_many_arguments)]
fn pretrain(
    cfg: &Config,
    schedule: &VpSchedule,
    clips: &Tensor,
    scale: DataScale,
    file: &Path,
    run_dir: &Path,
    device: &Device,
    progress: &Progress,
) -> Result<()> {
    let p = &cfg.pretrain;
    let Trainable {
        varmap: vm,
        model,
        mut opt,
    } = build::video_model(&cfg.video, schedule, p.lr, cfg.seed, device)?;
    opt.set_grad_clip(p.grad_clip);
    let params = opt.vars().iter().map(|(_, v)| v.elem_count()).sum();
    let (train_set, corrupted) = if p.corrupt > 0.0 {
        let mut rng = rng_for(cfg.seed, 21, 0);
        let (set, idx) = corrupt_share(clips, p.corrupt, &p.corrupt_ops, &mut rng)?;
        progress.line(&format!(
            "[pretrain] {} of {} clips replaced by temporally corrupted copies (pretrain.corrupt = {}, ops {:?})",
            idx.len(),
            clips.dim(0)?,
            p.corrupt,
            p.corrupt_ops.iter().map(|(o, w)| (o.name(), *w)).collect::<Vec<_>>()
        ));
        (set, idx.len())
    } else {
        (clips.clone(), 0)
    };
    let train_set = scale.to_model(&train_set.to_device(device)?)?;
    let mut ema = if p.ema > 0.0 {
        Some(Ema::new(opt.vars(), p.ema)?)
    } else {
        None
    };
    let plan = LrPlan {
        base: p.lr,
        warmup: p.warmup,
        cosine: p.cosine,
        total: p.steps,
    };
    progress.line(&format!(
        "[pretrain] {:?} denoiser predicting {:?}, {params} values; {} steps of {} clips, lr {}{}{}",
        cfg.video.model,
        cfg.video.prediction,
        p.steps,
        p.batch,
        p.lr,
        if p.cosine { " (cosine to 0)" } else { "" },
        if p.ema > 0.0 {
            format!(", EMA {}", p.ema)
        } else {
            String::new()
        }
    ));
    let t0 = Instant::now();
    let mut last = Instant::now();
    let total = p.steps;
    let last_loss = pretrain_denoiser(
        model.as_ref(),
        &mut opt,
        schedule,
        &train_set,
        None,
        total,
        p.batch,
        cfg.seed,
        &plan,
        ema.as_mut(),
        cfg.video.prediction,
        &mut |step, loss| {
            if last.elapsed() > Duration::from_secs(3) || step == total {
                last = Instant::now();
                let el = t0.elapsed().as_secs_f64();
                progress.line(&format!(
                    "[pretrain] step {step}/{total} loss {loss:.4} ({el:.0}s, {:.0} ms/step)",
                    1000.0 * el / step as f64
                ));
            }
        },
    )?;
    if let Some(e) = &ema {
        e.copy_to(opt.vars())?;
    }
    save_weights(&vm, file)?;
    write_json(
        &pretrain_report_file(run_dir),
        &PretrainReport {
            model: format!("{:?}", cfg.video.model).to_lowercase(),
            params,
            steps: total,
            batch: p.batch,
            wall_s: t0.elapsed().as_secs_f64(),
            last_loss,
            ema: p.ema,
            clips: clips.dim(0)?,
            corrupted,
            corrupt_share: p.corrupt,
            corrupt_ops: p
                .corrupt_ops
                .iter()
                .map(|(o, w)| (o.name().to_string(), *w))
                .collect(),
            prediction: cfg.video.prediction,
        },
    )?;
    Ok(())
}

/// `pretrain.from`: the reference of another run (its directory, or the .safetensors file
/// itself) is copied into this run with its pretrain.json and data_scale.json, so the run directory
/// holds everything its eval and a resume need. Nothing happens when this run already has one.
fn reference_from(cfg: &Config, run_dir: &Path, progress: &Progress) -> Result<()> {
    let reference = run_dir.join("reference.safetensors");
    let Some(file) = cfg.pretrain.video_reference() else {
        return Ok(());
    };
    if reference.exists() {
        return Ok(());
    }
    // Config validation checked that the file is there.
    let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
    if let Ok(r) = read_json::<PretrainReport>(&pretrain_report_file(&dir)) {
        if r.prediction != cfg.video.prediction {
            bail!(
                "pretrain.from = {}: that reference predicts {:?}, this run's video.prediction is {:?}; set video.prediction to match",
                file.display(),
                r.prediction,
                cfg.video.prediction
            );
        }
    }
    std::fs::copy(&file, &reference)
        .with_context(|| format!("copying {} into the run", file.display()))?;
    for side in ["pretrain.json", "data_scale.json"] {
        if dir.join(side).is_file() && !run_dir.join(side).exists() {
            std::fs::copy(dir.join(side), run_dir.join(side))?;
        }
    }
    progress.line(&format!(
        "[pretrain] reference from {} (pretrain.from)",
        file.display()
    ));
    Ok(())
}

/// A video model with the weights of `file` (the reference, or a continuation's checkpoint).
fn load_model(cfg: &Config, file: &Path, device: &Device) -> Result<Arc<dyn Denoiser>> {
    let mut m = build::video_model(&cfg.video, &build::schedule(cfg)?, 1e-3, cfg.seed, device)?;
    load_weights(&mut m.varmap, file)?;
    Ok(m.model)
}

/// Everything the continuations and the evaluation share.
struct Shared {
    schedule: VpSchedule,
    clips: Arc<Tensor>,
    scale: DataScale,
    reference_file: PathBuf,
    reference: Arc<dyn Denoiser>,
    device: Device,
}

/// The producer of a continuation: distortion actors making (real, edited) pairs from the real
/// clips with the continuation's curriculum. SFT sees the same pairs (it uses only the real
/// clip); its distortions are the default curriculum's.
fn distortion_source(
    cfg: &Config,
    clips: &Arc<Tensor>,
    curriculum: &Option<Curriculum>,
) -> Arc<dyn PairSource> {
    Arc::new(DistortionSource {
        actors: cfg.distortion.actors,
        clips: clips.clone(),
        curriculum: Arc::new(
            curriculum
                .clone()
                .unwrap_or_else(|| cfg.dfdpo.curriculum.clone()),
        ),
        per_unit: cfg.distortion.per_unit,
        panic_after_units: cfg.fault.rollout_panic_after,
    })
}

/// One continuation from the reference (SFT, DF-DPO, an ablation) as a `Training`: distortion
/// actors -> `replay` -> the shared learners (worker mode drops the producers: they are other
/// processes).
fn continuation(
    cfg: &Config,
    sh: &Shared,
    name: &str,
    curriculum: Option<Curriculum>,
    dir: &Path,
    replay: Arc<dyn ReplayBuffer>,
) -> Result<Training> {
    let sources = vec![distortion_source(cfg, &sh.clips, &curriculum)];
    let objective: Arc<dyn Objective> = match &curriculum {
        None => Arc::new(SftObjective {
            schedule: sh.schedule.clone(),
            seed: cfg.seed,
            scale: sh.scale,
        }),
        Some(_) => Arc::new(DfDpoObjective {
            reference: sh.reference.clone(),
            schedule: sh.schedule.clone(),
            beta: cfg.dfdpo.beta,
            lambda_sft: cfg.dfdpo.lambda_sft,
            seed: cfg.seed,
            scale: sh.scale,
        }),
    };
    let (video, lr, schedule, seed) = (
        cfg.video.clone(),
        cfg.dfdpo.lr,
        sh.schedule.clone(),
        cfg.seed,
    );
    let devices = build::learner_devices(cfg)?;
    // Candle's ops run on one thread each: one learner core per replica.
    let cpu = build::cpu_plan(cfg, devices.len(), true)?;
    Ok(Training {
        name: name.to_string(),
        dir: dir.to_path_buf(),
        report_file: report_file(dir),
        steps: cfg.dfdpo.steps,
        batch: cfg.dfdpo.batch,
        devices,
        build: Box::new(move |device| build::video_model(&video, &schedule, lr, seed, device)),
        // The policy starts as a copy of the reference (equal bit for bit at step 0).
        init: Some(sh.reference_file.clone()),
        objective,
        sources,
        replay,
        checkpoint_every: cfg.learner.checkpoint_every,
        at_steps: vec![],
        extra_file: None,
        seed: cfg.seed,
        fail_at_step: cfg.fault.learner_fail_at_step,
        nan_at_step: cfg.fault.learner_nan_at_step,
        resume_ledger: false,
        sync: cfg.runtime == crate::config::RuntimeKind::Sync,
        cpu,
        stop: None,
    })
}

/// Where a continuation in `dir` records its report (written once it reached its budget).
fn report_file(dir: &Path) -> PathBuf {
    dir.join("training.json")
}

/// What the continuations and the evaluation start from: the real clips, their data scale and
/// the reference (pretrained here when the "pretrain" stage is listed and the run directory has
/// no `reference.safetensors` yet).
fn prepare(cfg: &Config, run_dir: &Path, progress: &Progress) -> Result<(Shared, ClipSpec)> {
    let device = build::device(cfg, "learner.device", &cfg.learner.device)?;
    let schedule = build::schedule(cfg)?;
    let spec = clip_spec(cfg)?;
    let clips = real_clips(cfg, &spec)?;
    progress.line(&format!(
        "[data] {} real clips {:?}",
        clips.dim(0)?,
        clips.dims()
    ));
    let reference_file = run_dir.join("reference.safetensors");
    reference_from(cfg, run_dir, progress)?;
    let scale = data_scale(cfg, &clips, run_dir, progress)?;
    if has_stage(cfg, "pretrain") && !reference_file.exists() {
        // Tensor work off the async executor's worker (the metrics endpoint keeps serving).
        off_executor(|| {
            pretrain(
                cfg,
                &schedule,
                &clips,
                scale,
                &reference_file,
                run_dir,
                &device,
                progress,
            )
        })?;
    }
    if !reference_file.exists() {
        bail!(
            "{}: no reference model; list the \"pretrain\" stage",
            reference_file.display()
        );
    }
    let sh = Shared {
        reference: load_model(cfg, &reference_file, &device)?,
        reference_file,
        schedule,
        clips: Arc::new(clips),
        scale,
        device,
    };
    Ok((sh, spec))
}

/// One model's evaluation: the clip measurements and the gates (does it make the data's objects).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct ModelEval {
    #[serde(flatten)]
    pub stats: VideoStats,
    /// Share of frames with exactly one blob of the data's size (`kernels::clip_gates`).
    pub single_blob: f32,
    /// Share of consecutive-frame pairs with one such blob each, no farther apart than the data moves.
    pub track_continuity: f32,
}

impl ModelEval {
    fn measure(clips: &Tensor, hint: Option<Motion>, gate: &BlobGate) -> Result<Self> {
        let g = gate.measure(clips)?;
        Ok(Self {
            stats: video_stats(clips, hint)?,
            single_blob: g.single_blob,
            track_continuity: g.track_continuity,
        })
    }

    fn line(&self, name: &str) -> String {
        let s = &self.stats;
        format!(
            "[eval] {name:<14} temporal {:.3} smoothness {:.3} sharpness {:.4} noise {:.4} | one blob {:.3} continuity {:.3}",
            s.temporal, s.smoothness, s.sharpness, s.noise, self.single_blob, self.track_continuity
        )
    }
}

/// `summary.json` of a DF-DPO run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DfDpoSummary {
    pub name: String,
    pub algorithm: String,
    /// What a rerun needs: seed, config hash, build, devices (DESIGN "Reproducibility").
    #[serde(default)]
    pub provenance: crate::provenance::Provenance,
    pub steps: u64,
    pub beta: f64,
    pub lambda_sft: f64,
    pub wall_s: f64,
    /// The real clips' own measurements (the ceiling; temporal ~1).
    pub real: ModelEval,
    /// reference, sft, dfdpo.
    pub eval: BTreeMap<String, ModelEval>,
    /// temporal_only, spatial_only, hybrid.
    pub ablation: BTreeMap<String, ModelEval>,
    /// The gate's thresholds, fitted on the real clips.
    pub gate: BlobGate,
    pub training: BTreeMap<String, TrainReport>,
    /// Actor restarts of every continuation, plus (worker mode) the run's process restarts and
    /// the actor restarts inside its producer processes.
    pub restarts: u64,
    /// The continuations' record accounting added up (each continuation's own is in
    /// `training.<name>.accounting`); None when a continuation has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accounting: Option<Accounting>,
    pub eval_clips: usize,
    /// How the reference was pretrained (its pretrain.json; None for a reference from before it
    /// was written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pretrain: Option<PretrainReport>,
    /// The share of the reference's clips, and of the real clips, that break the arrow of time
    /// (1 - temporal): the protocol's premise is the first well above the second.
    #[serde(default)]
    pub reference_arrow_broken: f32,
    #[serde(default)]
    pub real_arrow_broken: f32,
    /// Peak resident set of the run's process (MiB).
    pub peak_rss_mb: Option<f64>,
}

/// A clip as nested rows: [frames][channels][h][w].
type ClipRows = Vec<Vec<Vec<Vec<f32>>>>;

fn to_rows(clips: &Tensor, k: usize) -> Result<Vec<ClipRows>> {
    let n = clips.dim(0)?.min(k);
    (0..n)
        .map(|i| {
            let c = clips.get(i)?; // [T, C, H, W]
            (0..c.dim(0)?)
                .map(|t| Ok(c.get(t)?.to_vec3::<f32>()?))
                .collect::<Result<Vec<_>>>()
        })
        .collect()
}

/// The real clips of the run: generated, or loaded from `video.dir`.
fn real_clips(cfg: &Config, spec: &ClipSpec) -> Result<Tensor> {
    Ok(match cfg.video.source {
        ClipSource::Dir => load_clip_dir(Path::new(&cfg.video.dir), spec)
            .with_context(|| format!("video.dir = {:?}", cfg.video.dir))?,
        ClipSource::Procedural => generate(spec, cfg.video.clips, cfg.seed)?.0,
    })
}

/// Where the first clips of each model's evaluation samples are kept, for `tilt report`.
fn strip_file(run_dir: &Path, name: &str) -> PathBuf {
    run_dir.join("samples").join(format!("{name}.npy"))
}

/// Clips per filmstrip.
const STRIP: usize = 6;

#[async_trait]
impl Algorithm for DfDpo {
    fn stages(&self) -> &'static [&'static str] {
        crate::config::AlgorithmKind::Dfdpo.stages()
    }

    async fn execute(&self, run: &RunCtx<'_>) -> Result<Option<serde_json::Value>> {
        let (cfg, run_dir, progress) = (run.cfg, run.run_dir, run.progress);
        let t0 = Instant::now();
        let (sh, spec) = prepare(cfg, run_dir, progress)?;
        // The continuations' streams (Redis backend) are namespaced by this invocation.
        let invocation = super::invocation_id(cfg);
        let mut training = BTreeMap::new();
        for (name, cur) in variants(cfg)? {
            let replay = build::replay(cfg, &format!("{invocation}-{name}"), "learner-0").await?;
            let t = continuation(cfg, &sh, name, cur, &run_dir.join(name), replay.clone())?;
            let rep = train(t, progress).await;
            if let Err(e) = replay.purge().await {
                progress.line(&format!(
                    "tilt: warning: could not remove the run's Redis keys: {e}"
                ));
            }
            let rep = rep?;
            if rep.stopped_early {
                progress.line(&format!(
                    "tilt: {name} stopped at step {} of {}; continue with `tilt resume {}`",
                    rep.steps,
                    cfg.dfdpo.steps,
                    run_dir.display()
                ));
                return Ok(None);
            }
            training.insert(name.to_string(), rep);
        }
        if !has_stage(cfg, "eval") {
            return Ok(None);
        }
        let summary =
            off_executor(|| evaluate(cfg, &sh, &spec, run_dir, training, 0, t0, progress))?;
        Ok(Some(serde_json::to_value(summary)?))
    }

    async fn worker(&self, run: &RunCtx<'_>, role: WorkerRole, run_id: &str) -> Result<()> {
        worker::run_worker(run, role, run_id).await
    }

    fn render(&self, run_dir: &Path) -> Result<Vec<PathBuf>> {
        let mut out = training_curves(run_dir)?;
        let dir = run_dir.join("samples");
        if !dir.exists() {
            return Ok(out);
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "npy"))
            .collect();
        files.sort();
        for f in files {
            let Some(name) = f.file_stem().map(|s| s.to_string_lossy().into_owned()) else {
                continue;
            };
            let clips = load_npy(&f)?; // [n, T, C, H, W]
            let p = run_dir.join(format!("filmstrip-{name}.png"));
            crate::plots::filmstrips(&p, &to_rows(&clips, STRIP)?, STRIP as u32, (-1.0, 1.0))?;
            out.push(p);
        }
        Ok(out)
    }
}

/// The continuations that ran, in the order `variants` lists them.
const CONTINUATIONS: [&str; 5] = ["sft", "dfdpo", "temporal_only", "spatial_only", "hybrid"];

/// `loss.png` and `accuracy.png`: one line per continuation, from its `history.json`.
fn training_curves(run_dir: &Path) -> Result<Vec<PathBuf>> {
    // (name, loss curve, accuracy curve)
    type Curves = (&'static str, Vec<(f64, f64)>, Vec<(f64, f64)>);
    let mut curves: Vec<Curves> = Vec::new();
    for name in CONTINUATIONS {
        let file = run_dir.join(name).join("history.json");
        if !file.exists() {
            continue;
        }
        let hist: Vec<(u64, f32, f32)> = read_json(&file)?;
        curves.push((
            name,
            hist.iter().map(|h| (h.0 as f64, h.1 as f64)).collect(),
            hist.iter().map(|h| (h.0 as f64, h.2 as f64)).collect(),
        ));
    }
    if curves.is_empty() {
        return Ok(vec![]);
    }
    let losses: Vec<_> = curves
        .iter()
        .map(|c| crate::plots::Series {
            name: c.0,
            points: &c.1,
        })
        .collect();
    let accs: Vec<_> = curves
        .iter()
        .map(|c| crate::plots::Series {
            name: c.0,
            points: &c.2,
        })
        .collect();
    let loss = run_dir.join("loss.png");
    crate::plots::line_chart(
        &loss,
        "Training loss of each continuation",
        "learner step",
        "loss",
        &losses,
        &[],
    )?;
    let acc = run_dir.join("accuracy.png");
    crate::plots::line_chart(
        &acc,
        "Implicit accuracy (DF-DPO variants; 0 for SFT)",
        "learner step",
        "accuracy",
        &accs,
        &[],
    )?;
    Ok(vec![loss, acc])
}

/// Sample clips from every model from the same noise (a paired comparison), measure them against
/// the real clips, save the filmstrips' clips and draw them, and write `summary.json`.
#[allow(clippy::too_many_arguments)]
fn evaluate(
    cfg: &Config,
    sh: &Shared,
    spec: &ClipSpec,
    run_dir: &Path,
    training: BTreeMap<String, TrainReport>,
    process_restarts: u64,
    t0: Instant,
    progress: &Progress,
) -> Result<DfDpoSummary> {
    let gate = BlobGate::fit(&sh.clips).context("fitting the blob gate on the real clips")?;
    let real = ModelEval::measure(&sh.clips, None, &gate)?;
    let grid = SamplingGrid::new(&sh.schedule, cfg.sampling.steps, cfg.sampling.eta)?;
    let n = cfg.eval.samples;
    let shape = (
        n,
        cfg.video.frames,
        cfg.video.channels,
        cfg.video.size,
        cfg.video.size,
    );
    let mut models: Vec<(String, Arc<dyn Denoiser>)> =
        vec![("reference".into(), sh.reference.clone())];
    for (name, _) in variants(cfg)? {
        let Some((_, ck)) = latest_checkpoint(&run_dir.join(name))? else {
            continue;
        };
        let mut m = build::video_model(&cfg.video, &sh.schedule, 1e-3, cfg.seed, &sh.device)?;
        load_checkpoint(&ck, &mut m.varmap, &mut m.opt)?;
        models.push((name.to_string(), m.model));
    }
    let hint = match spec.kind {
        Motion::Mixed => None,
        k => Some(k),
    };
    let mut eval = BTreeMap::new();
    let mut ablation = BTreeMap::new();
    std::fs::create_dir_all(run_dir.join("samples"))?;
    save_npy(
        &strip_file(run_dir, "real"),
        &sh.clips.narrow(0, 0, STRIP.min(sh.clips.dim(0)?))?,
    )?;
    for (name, model) in &models {
        let mut rng = rng_for(cfg.seed, 30, 0);
        let x = randn(&mut rng, shape, &sh.device)?;
        // Clips live in [-1, 1]: clip the predicted x_0 at every step (DDPM's clip_denoised), in
        // the model's space, then map the samples back to data space.
        let (lo, hi) = sh.scale.model_bounds(-1.0, 1.0);
        let y = sample_chain_clipped(
            model.as_ref(),
            &sh.schedule,
            &grid,
            &x,
            None,
            lo,
            hi,
            &mut rng,
        )?;
        let samples = sh
            .scale
            .to_data(&y)?
            .clamp(-1f32, 1f32)?
            // The clip measurements and the saved filmstrips are host-side.
            .to_device(&Device::Cpu)?;
        let st = ModelEval::measure(&samples, hint, &gate)?;
        progress.line(&st.line(name));
        if ["temporal_only", "spatial_only", "hybrid"].contains(&name.as_str()) {
            ablation.insert(name.clone(), st);
        } else {
            eval.insert(name.clone(), st);
        }
        save_npy(
            &strip_file(run_dir, name),
            &samples.narrow(0, 0, STRIP.min(n))?,
        )?;
    }
    progress.line(&real.line("real clips"));
    let pretrain = pretrain_report_file(run_dir)
        .exists()
        .then(|| read_json::<PretrainReport>(&pretrain_report_file(run_dir)))
        .transpose()?;
    // The reference is always the first model evaluated.
    let reference_arrow_broken = 1.0
        - eval
            .get("reference")
            .context("the reference has no evaluation")?
            .stats
            .temporal;
    let real_arrow_broken = 1.0 - real.stats.temporal;
    progress.line(&format!(
        "[eval] the reference breaks the arrow of time in {:.3} of its clips (real clips: {:.3}){}",
        reference_arrow_broken,
        real_arrow_broken,
        match &pretrain {
            Some(p) if p.corrupted > 0 => format!(
                "; {} of its {} training clips were corrupted copies",
                p.corrupted, p.clips
            ),
            _ => String::new(),
        }
    ));
    DfDpo.render(run_dir)?;
    let restarts = process_restarts + training.values().map(|t| t.restarts).sum::<u64>();
    let accounting = training.values().map(|t| t.accounting.clone()).try_fold(
        Accounting::default(),
        |mut sum, a| {
            sum.add(&a?);
            Some(sum)
        },
    );
    let summary = DfDpoSummary {
        name: cfg.name.clone(),
        provenance: crate::provenance::Provenance::of(cfg)?,
        algorithm: "dfdpo".into(),
        steps: cfg.dfdpo.steps,
        beta: cfg.dfdpo.beta,
        lambda_sft: cfg.dfdpo.lambda_sft,
        wall_s: t0.elapsed().as_secs_f64(),
        real,
        eval,
        ablation,
        training,
        restarts,
        accounting,
        gate,
        eval_clips: n,
        pretrain,
        reference_arrow_broken,
        real_arrow_broken,
        peak_rss_mb: crate::telemetry::peak_rss_mb(),
    };
    write_json(&run_dir.join("summary.json"), &summary)?;
    progress.line(&format!(
        "tilt: done in {:.0}s; {}",
        summary.wall_s,
        run_dir.join("summary.json").display()
    ));
    Ok(summary)
}
