//! The DF-DPO pipeline (video): `pretrain` the spatio-temporal reference on real clips; continue it
//! through the actors with `sft` (denoising loss on the real clips of the pairs), `dfdpo`
//! (Diffusion-DPO + lambda SFT on (real, edited) pairs, curriculum) and `ablation` (DF-DPO with
//! temporal-only, spatial-only and hybrid operators), all for the same steps on the same data; then
//! `eval`: sample clips from every model from the same noise and measure the arrow of time,
//! smoothness, sharpness and noise against the real clips.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tilt_actors::checkpoint::{latest_checkpoint, load_checkpoint};
use tilt_actors::control::RunControl;
use tilt_actors::coordinator::{DistortionTemplate, RunOutcome, RunSpec};
use tilt_actors::learner::{CheckpointSpec, LearnerArgs, LearnerCore};
use tilt_actors::objective::{DfDpoObjective, Objective, SftObjective};
use tilt_actors::replay::{MemoryReplay, ReplayBuffer};
use tilt_actors::telemetry::LatencySummary;
use tilt_kernels::denoiser::{load_weights, save_weights, Denoiser};
use tilt_kernels::dfdpo::{denoise_grads, DataScale};
use tilt_kernels::distort::{Curriculum, Distortion};
use tilt_kernels::logprob::sample_chain_clipped;
use tilt_kernels::models::{VideoConfig, VideoDenoiser};
use tilt_kernels::optim::{AdamW, AdamWConfig};
use tilt_kernels::rng::{randn, rng_for};
use tilt_kernels::schedule::{SamplingGrid, VpSchedule};

use crate::config::Config;
use crate::pipeline::{run_actors, write_json, NoCritic};
use crate::progress::Progress;
use crate::video::{
    generate, load_clip_dir, reference_stats, video_stats, ClipSpec, Motion, VideoStats,
};

/// The models DF-DPO trains from the reference, with the curriculum each uses (None = SFT).
fn variants(cfg: &Config) -> Result<Vec<(&'static str, Option<Curriculum>)>> {
    let has = |s: &str| cfg.stages.iter().any(|x| x == s);
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
    let kind = match cfg.video.motion.as_str() {
        "friction" => Motion::Friction,
        "bounce" => Motion::Bounce,
        _ => Motion::Mixed,
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

fn video_config(cfg: &Config) -> VideoConfig {
    VideoConfig {
        frames: cfg.video.frames,
        channels: cfg.video.channels,
        size: cfg.video.size,
        base: cfg.video.base,
        time_dim: cfg.video.time_dim,
        zero_init_output: false,
    }
}

/// A fresh video denoiser with its variables (sorted by name: replicas agree on the order).
fn build_model(cfg: &Config, lr: f64) -> Result<(VarMap, Arc<VideoDenoiser>, AdamW)> {
    let vm = VarMap::new();
    let m = VideoDenoiser::new(
        video_config(cfg),
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
    )?;
    let mut vars: Vec<_> = vm
        .data()
        .lock()
        .map_err(|_| anyhow!("lock"))?
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let opt = AdamW::new(
        vars,
        AdamWConfig {
            lr,
            ..Default::default()
        },
    )?;
    Ok((vm, Arc::new(m), opt))
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
        return crate::pipeline::read_json(&file);
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

/// Stage "pretrain": the reference denoiser on the real clips (plain denoising loss).
fn pretrain(
    cfg: &Config,
    schedule: &VpSchedule,
    clips: &Tensor,
    scale: DataScale,
    file: &Path,
    progress: &Progress,
) -> Result<()> {
    let (vm, model, mut opt) = build_model(cfg, cfg.pretrain.lr)?;
    let clips = &scale.to_model(clips)?;
    let n = clips.dim(0)?;
    let t0 = Instant::now();
    let mut last = Instant::now();
    for step in 0..cfg.pretrain.steps {
        let mut rng = rng_for(cfg.seed, 20, step);
        let idx: Vec<u32> = (0..cfg.pretrain.batch)
            .map(|_| rng.random_range(0..n as u32))
            .collect();
        let x0 = clips.index_select(&Tensor::new(idx.as_slice(), &Device::Cpu)?, 0)?;
        let (g, loss) = denoise_grads(model.as_ref(), &opt, schedule, &x0, &mut rng)?;
        opt.step_with(&g)?;
        if last.elapsed() > Duration::from_secs(3) || step + 1 == cfg.pretrain.steps {
            last = Instant::now();
            progress.line(&format!(
                "[pretrain] step {}/{} loss {loss:.4} ({:.0}s)",
                step + 1,
                cfg.pretrain.steps,
                t0.elapsed().as_secs_f64()
            ));
        }
    }
    save_weights(&vm, file)?;
    Ok(())
}

fn load_model(cfg: &Config, file: &Path) -> Result<Arc<VideoDenoiser>> {
    let (mut vm, m, _) = build_model(cfg, 1e-3)?;
    load_weights(&mut vm, file)?;
    Ok(m)
}

/// What one continuation (SFT, DF-DPO, an ablation) reports.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ContinuationReport {
    pub steps: u64,
    pub wall_s: f64,
    pub final_loss: f32,
    /// DF-DPO: implicit accuracy of the last step (0 for SFT).
    pub final_implicit_accuracy: f32,
    pub pairs_per_s: f64,
    pub learner_steps_per_s: f64,
    pub learner_utilisation: f64,
    pub restarts: u64,
    pub latency: BTreeMap<String, LatencySummary>,
}

/// One continuation from the reference through the actors: distortion actors -> replay -> learners.
#[allow(clippy::too_many_arguments)]
async fn continuation(
    cfg: &Config,
    name: &'static str,
    curriculum: Option<Curriculum>,
    reference_file: &Path,
    reference: Arc<dyn Denoiser>,
    schedule: &VpSchedule,
    clips: Arc<Tensor>,
    scale: DataScale,
    dir: &Path,
    progress: &Progress,
) -> Result<ContinuationReport> {
    std::fs::create_dir_all(dir)?;
    let mut start = 0;
    let mut cores = Vec::new();
    for _ in 0..cfg.learner.actors {
        let (mut vm, m, mut opt) = build_model(cfg, cfg.dfdpo.lr)?;
        // The policy starts as a copy of the reference (equal bit for bit at step 0).
        load_weights(&mut vm, reference_file)?;
        if let Some((step, ck)) = latest_checkpoint(dir)? {
            start = load_checkpoint(&ck, &mut vm, &mut opt)?.step;
            let _ = step;
        }
        cores.push(Arc::new(Mutex::new(LearnerCore {
            varmap: vm,
            residual: m,
            opt,
            step: start,
        })));
    }
    if start >= cfg.dfdpo.steps {
        progress.line(&format!("[{name}] already trained ({start} steps)"));
        // Keep what the training run recorded.
        return Ok(
            crate::pipeline::read_json(&dir.join("training.json")).unwrap_or(ContinuationReport {
                steps: start,
                ..Default::default()
            }),
        );
    }
    let objective: Arc<dyn Objective> = match &curriculum {
        None => Arc::new(SftObjective {
            schedule: schedule.clone(),
            seed: cfg.seed,
            scale,
        }),
        Some(_) => Arc::new(DfDpoObjective {
            reference: reference.clone(),
            schedule: schedule.clone(),
            beta: cfg.dfdpo.beta,
            lambda_sft: cfg.dfdpo.lambda_sft,
            seed: cfg.seed,
            scale,
        }),
    };
    // SFT sees the same pairs (it uses only the real clip); its distortions are the default curriculum's.
    let cur = Arc::new(curriculum.unwrap_or_else(|| cfg.dfdpo.curriculum.clone()));
    let control = Arc::new(RunControl::default());
    control
        .learner_step
        .store(start, std::sync::atomic::Ordering::Relaxed);
    let replay: Arc<dyn ReplayBuffer> = Arc::new(MemoryReplay::new(cfg.replay.clone())?);
    let ck = CheckpointSpec {
        run_dir: dir.to_path_buf(),
        every: cfg.learner.checkpoint_every,
        at_steps: vec![],
        seed: cfg.seed,
        critic_file: None,
    };
    let learners = cores
        .iter()
        .enumerate()
        .map(|(rank, core)| LearnerArgs {
            rank,
            world: cfg.learner.actors,
            core: core.clone(),
            replay: replay.clone(),
            objective: objective.clone(),
            batch: cfg.dfdpo.batch,
            total_steps: cfg.dfdpo.steps,
            checkpoint: ck.clone(),
            control: control.clone(),
            coordinator: None,
            fail_at_step: cfg.fault.learner_fail_at_step,
        })
        .collect();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let grid = Arc::new(SamplingGrid::new(
        schedule,
        cfg.sampling.steps,
        cfg.sampling.eta,
    )?);
    let spec = RunSpec {
        seed: cfg.seed.wrapping_add(start),
        rollouts: 0,
        reference,
        grid,
        sample_shape: vec![],
        chains_per_unit: 0,
        segment_len: 1,
        critics: 0,
        critic: Arc::new(NoCritic),
        lambda: 0.0,
        learners,
        replay,
        control: control.clone(),
        channel_capacity: 1,
        rollout_panic_after: 0,
        critic_panic_after: 0,
        done: Arc::new(Mutex::new(Some(tx))),
        channel: None,
        distortion: Some(DistortionTemplate {
            actors: cfg.distortion.actors,
            clips,
            curriculum: cur,
            per_unit: cfg.distortion.per_unit,
            panic_after_units: cfg.fault.rollout_panic_after,
        }),
    };
    let t0 = Instant::now();
    let outcome = run_actors(spec, rx, None, progress, name, start, cfg.dfdpo.steps).await?;
    let wall = t0.elapsed().as_secs_f64();
    let steps = RunControl::get(&control.learner_step);
    let last = control.last();
    match outcome {
        RunOutcome::Finished { .. } => {}
        RunOutcome::LearnerFailed(m) => bail!("{m}"),
    }
    progress.line(&format!(
        "[{name}] finished at step {steps}: loss {:.4}, implicit accuracy {:.3}",
        last.loss, last.accuracy
    ));
    Ok(ContinuationReport {
        steps,
        wall_s: wall,
        final_loss: last.loss,
        final_implicit_accuracy: last.accuracy,
        pairs_per_s: RunControl::get(&control.pairs_inserted) as f64 / wall,
        learner_steps_per_s: (steps - start) as f64 / wall,
        learner_utilisation: RunControl::get(&control.learner_busy_us) as f64 / 1e6 / wall,
        restarts: RunControl::get(&control.restarts),
        latency: control.latency.summary(),
    })
}

/// `summary.json` of a DF-DPO run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DfDpoSummary {
    pub name: String,
    pub algorithm: String,
    pub steps: u64,
    pub beta: f64,
    pub lambda_sft: f64,
    pub wall_s: f64,
    /// The real clips' own measurements (the ceiling; temporal ~1).
    pub real: VideoStats,
    /// reference, sft, dfdpo.
    pub eval: BTreeMap<String, VideoStats>,
    /// temporal_only, spatial_only, hybrid.
    pub ablation: BTreeMap<String, VideoStats>,
    pub training: BTreeMap<String, ContinuationReport>,
    pub eval_clips: usize,
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

/// The whole DF-DPO run.
pub async fn execute(cfg: &Config, run_dir: &Path, progress: &Progress) -> Result<()> {
    let t0 = Instant::now();
    let schedule = VpSchedule::linear(
        cfg.schedule.train_steps,
        cfg.schedule.beta_start,
        cfg.schedule.beta_end,
    )?;
    let spec = clip_spec(cfg)?;
    let clips = match cfg.video.source.as_str() {
        "dir" => load_clip_dir(Path::new(&cfg.video.dir), &spec)
            .with_context(|| format!("video.dir = {:?}", cfg.video.dir))?,
        _ => generate(&spec, cfg.video.clips, cfg.seed)?.0,
    };
    progress.line(&format!(
        "[data] {} real clips {:?}",
        clips.dim(0)?,
        clips.dims()
    ));
    let real = reference_stats(&clips)?;
    let ref_file = run_dir.join("reference.safetensors");
    let scale = data_scale(cfg, &clips, run_dir, progress)?;
    let has = |s: &str| cfg.stages.iter().any(|x| x == s);
    if has("pretrain") && !ref_file.exists() {
        // Tensor work off the async executor's worker (the metrics endpoint keeps serving).
        crate::run::off_executor(|| pretrain(cfg, &schedule, &clips, scale, &ref_file, progress))?;
    }
    if !ref_file.exists() {
        bail!(
            "{}: no reference model; list the \"pretrain\" stage",
            ref_file.display()
        );
    }
    let reference: Arc<dyn Denoiser> = load_model(cfg, &ref_file)?;
    let clips = Arc::new(clips);
    let mut training = BTreeMap::new();
    for (name, cur) in variants(cfg)? {
        let dir = run_dir.join(name);
        let rep = continuation(
            cfg,
            name,
            cur,
            &ref_file,
            reference.clone(),
            &schedule,
            clips.clone(),
            scale,
            &dir,
            progress,
        )
        .await?;
        write_json(&dir.join("training.json"), &rep)?;
        training.insert(name.to_string(), rep);
    }
    if !has("eval") {
        return Ok(());
    }
    // Every model samples from the same noise (a paired comparison).
    let grid = SamplingGrid::new(&schedule, cfg.sampling.steps, cfg.sampling.eta)?;
    let n = cfg.eval.samples;
    let shape = (
        n,
        cfg.video.frames,
        cfg.video.channels,
        cfg.video.size,
        cfg.video.size,
    );
    let mut models: Vec<(String, Arc<dyn Denoiser>)> =
        vec![("reference".into(), reference.clone())];
    for (name, _) in variants(cfg)? {
        let Some((_, ck)) = latest_checkpoint(&run_dir.join(name))? else {
            continue;
        };
        let (mut vm, m, mut opt) = build_model(cfg, 1e-3)?;
        load_checkpoint(&ck, &mut vm, &mut opt)?;
        models.push((name.to_string(), m));
    }
    let hint = match spec.kind {
        Motion::Mixed => None,
        k => Some(k),
    };
    let mut eval = BTreeMap::new();
    let mut ablation = BTreeMap::new();
    let mut strips: Vec<(String, Tensor)> =
        vec![("real".into(), clips.narrow(0, 0, 6.min(clips.dim(0)?))?)];
    for (name, model) in &models {
        let mut rng = rng_for(cfg.seed, 30, 0);
        let x = randn(&mut rng, shape, &Device::Cpu)?;
        // Clips live in [-1, 1]: clip the predicted x_0 at every step (DDPM's clip_denoised), in
        // the model's space, then map the samples back to data space.
        let (lo, hi) = scale.model_bounds(-1.0, 1.0);
        let samples = crate::run::off_executor(|| {
            let y =
                sample_chain_clipped(model.as_ref(), &schedule, &grid, &x, None, lo, hi, &mut rng)?;
            anyhow::Ok(scale.to_data(&y)?.clamp(-1f32, 1f32)?)
        })?;
        let st = video_stats(&samples, hint)?;
        progress.line(&format!(
            "[eval] {name:<14} temporal {:.3} smoothness {:.3} sharpness {:.4} noise {:.4}",
            st.temporal, st.smoothness, st.sharpness, st.noise
        ));
        if ["temporal_only", "spatial_only", "hybrid"].contains(&name.as_str()) {
            ablation.insert(name.clone(), st);
        } else {
            eval.insert(name.clone(), st);
        }
        strips.push((name.clone(), samples.narrow(0, 0, 6.min(n))?));
    }
    progress.line(&format!(
        "[eval] real clips      temporal {:.3} smoothness {:.3} sharpness {:.4} noise {:.4}",
        real.temporal, real.smoothness, real.sharpness, real.noise
    ));
    for (name, t) in &strips {
        let p: PathBuf = run_dir.join(format!("filmstrip-{name}.png"));
        crate::plots::filmstrips(&p, &to_rows(t, 6)?, 6, (-1.0, 1.0))?;
    }
    let summary = DfDpoSummary {
        name: cfg.name.clone(),
        algorithm: "dfdpo".into(),
        steps: cfg.dfdpo.steps,
        beta: cfg.dfdpo.beta,
        lambda_sft: cfg.dfdpo.lambda_sft,
        wall_s: t0.elapsed().as_secs_f64(),
        real,
        eval,
        ablation,
        training,
        eval_clips: n,
    };
    write_json(&run_dir.join("summary.json"), &summary)?;
    progress.line(&format!(
        "tilt: done in {:.0}s; {}",
        summary.wall_s,
        run_dir.join("summary.json").display()
    ));
    Ok(())
}
