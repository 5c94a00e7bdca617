//! VRPO (reward tilting with a distributional critic), wired from config. Stages: `critic` (stage
//! 1: reference rollouts, CDF critic training, held-out report; `critic.rs`), `vrpo` (stage 2:
//! rollout and critic sources feeding the shared learners with `VrpoObjective`), `eval` (policy
//! vs the importance-weighted tilted target; `eval.rs`). Worker mode is in `worker.rs`.

pub mod critic;
pub mod digits;
pub mod eval;
pub mod final_dpo;
pub mod worker;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use async_trait::async_trait;
use candle_core::{Device, Tensor, Var};
use tilt_actors::codec::records_to_batch;
use tilt_actors::critic::CriticSource;
use tilt_actors::final_pairs::FinalPairSource;
use tilt_actors::objective::{model_device, Objective, StepStats};
use tilt_actors::replay::{Record, ReplayBuffer};
use tilt_actors::rollout::RolloutSource;
use tilt_actors::source::PairSource;
use tilt_kernels::denoiser::Denoiser;
use tilt_kernels::fused_vrpo::{fused_residual, FusedVrpo};
use tilt_kernels::losses::VrpoLabels;
use tilt_kernels::mixture::ExactValue;
use tilt_kernels::optim::AdamWConfig;
use tilt_kernels::reward::Reward;
use tilt_kernels::schedule::{SamplingGrid, VpSchedule};
use tilt_kernels::vrpo::{vrpo_grads, SegmentPair};

use super::{has_stage, Algorithm, RunCtx, WorkerRole};
use crate::build::{self, VrpoData};
use crate::config::{Config, CriticKind, VrpoMethod};
use crate::files::read_json;
use crate::progress::Progress;
use crate::train::{off_executor, train, TrainReport, Trainable, Training};
use critic::{critic_files, load_critic, stage_critic, CriticReport};

/// VRPO.
pub struct Vrpo;

/// What every VRPO stage shares: schedule, grid, data and reference model, reward, exact value
/// (where known), and the device of each role.
pub struct Setup {
    pub schedule: VpSchedule,
    pub grid: Arc<SamplingGrid>,
    pub data: VrpoData,
    pub reward: Arc<dyn Reward>,
    pub exact: Option<Arc<ExactValue>>,
    pub rollout_device: Device,
    pub critic_device: Device,
    pub learner_device: Device,
}

impl Setup {
    /// Elements of one sample (the flat dimension the MLP networks see).
    pub fn dim(&self) -> usize {
        self.data.sample_shape.iter().product()
    }
}

/// Build the shared pieces from a validated config. Image data loads its pretrained models from
/// the run directory (the "pretrain" stage must have run: `ensure_pretrained`).
pub fn setup(cfg: &Config, run_dir: &Path) -> Result<Setup> {
    let schedule = build::schedule(cfg)?;
    let grid = build::grid(cfg, &schedule)?;
    let learner_device = build::device(cfg, "learner.device", &cfg.learner.device)?;
    let data = build::vrpo_data(cfg, &schedule, run_dir, &learner_device)?;
    let exact = build::exact_value(&data, &cfg.reward, &schedule).map(Arc::new);
    let rollout_device = build::device(cfg, "rollout.device", &cfg.rollout.device)?;
    if matches!(cfg.data, crate::config::DataConfig::Mixture2d { .. })
        && (rollout_device.is_cuda() || learner_device.is_cuda())
    {
        eprintln!(
            "[vrpo] note: the 2-D mixture's reference is exact host maths, so on a GPU every \
             reference eps copies its states to the host and back; this data runs faster on the \
             CPU (README \"GPUs\")"
        );
    }
    Ok(Setup {
        rollout_device,
        critic_device: build::device(cfg, "critic.device", &cfg.critic.device)?,
        learner_device,
        reward: build::reward(&cfg.reward, &data)?,
        exact,
        data,
        grid,
        schedule,
    })
}

/// The "pretrain" stage of image data (a no-op for the mixture, whose reference is analytic).
pub fn ensure_pretrained(cfg: &Config, run_dir: &Path, progress: &Progress) -> Result<()> {
    if !matches!(cfg.data, crate::config::DataConfig::Digits(_)) {
        return Ok(());
    }
    let schedule = build::schedule(cfg)?;
    let grid = build::grid(cfg, &schedule)?;
    let device = build::device(cfg, "learner.device", &cfg.learner.device)?;
    off_executor(|| {
        digits::ensure_pretrained(cfg, &schedule, &grid, run_dir, &device, progress).map(|_| ())
    })
}

/// A residual policy network with its optimiser (zero-initialised output), on the learner device.
pub fn build_policy(cfg: &Config, s: &Setup) -> Result<Trainable> {
    build::mlp_policy(
        &cfg.policy,
        s.dim(),
        s.data.classes,
        adamw(cfg),
        cfg.seed,
        &s.learner_device,
    )
}

fn adamw(cfg: &Config) -> AdamWConfig {
    AdamWConfig {
        lr: cfg.vrpo.lr,
        weight_decay: cfg.vrpo.weight_decay,
        grad_clip: cfg.vrpo.grad_clip,
        ..Default::default()
    }
}

/// VRPO's loss on scored segment pairs (`tilt_kernels::vrpo`), on the learner's device.
pub struct VrpoObjective {
    pub grid: Arc<SamplingGrid>,
    pub labels: VrpoLabels,
    pub beta: f64,
}

impl Objective for VrpoObjective {
    fn grads(
        &self,
        model: &dyn Denoiser,
        vars: &[(String, Var)],
        records: &[Record],
        _step: u64,
        _replica: usize,
    ) -> tilt_actors::Result<(Vec<Option<Tensor>>, StepStats)> {
        let batch = records_to_batch(records, &model_device(vars)?)?;
        let (g, s) = vrpo_grads(model, vars, &self.grid, &batch, self.labels, self.beta)?;
        Ok((
            g,
            StepStats {
                loss: s.loss,
                accuracy: s.accuracy,
                label_strength: Some(s.label_strength),
            },
        ))
    }
}

/// VRPO's loss through the fused learner step (`tilt_kernels::fused_vrpo`: the same loss and
/// gradients as [`VrpoObjective`], by hand, on `threads` threads per replica), for the
/// unconditional MLP residual on the CPU. A model it cannot take is an error, not a fallback.
pub struct FusedVrpoObjective {
    pub plain: VrpoObjective,
    /// One step with its buffers per learner replica.
    steps: Vec<Mutex<FusedVrpo>>,
}

impl FusedVrpoObjective {
    /// For `replicas` learner replicas of `threads` threads each.
    pub fn new(plain: VrpoObjective, replicas: usize, threads: usize) -> Self {
        Self {
            plain,
            steps: (0..replicas.max(1))
                .map(|_| Mutex::new(FusedVrpo::new(threads)))
                .collect(),
        }
    }
}

impl Objective for FusedVrpoObjective {
    fn grads(
        &self,
        model: &dyn Denoiser,
        vars: &[(String, Var)],
        records: &[Record],
        _step: u64,
        replica: usize,
    ) -> tilt_actors::Result<(Vec<Option<Tensor>>, StepStats)> {
        let actor_err = |detail: String| tilt_actors::ActorError::Actor {
            role: format!("learner {replica}"),
            detail,
        };
        let mlp =
            fused_residual(model).map_err(|why| actor_err(format!("fused VRPO step: {why}")))?;
        let step = self
            .steps
            .get(replica)
            .ok_or_else(|| actor_err(format!("no fused VRPO step for replica {replica}")))?;
        let mut step = step
            .lock()
            .map_err(|_| actor_err("fused VRPO step poisoned by a panic".into()))?;
        // Decoding is a sixth of a step: each of the step's threads decodes a part of the batch.
        let per = records.len().div_ceil(step.threads()).max(1);
        let device = &model_device(vars)?;
        let parts = std::thread::scope(|s| {
            let mut chunks = records.chunks(per);
            let first = chunks.next().unwrap_or(&[]);
            let others: Vec<_> = chunks
                .map(|c| s.spawn(move || records_to_batch(c, device)))
                .collect();
            let mut parts = vec![records_to_batch(first, device)];
            for h in others {
                parts.push(
                    h.join()
                        .unwrap_or_else(|_| Err(actor_err("a decoding thread panicked".into()))),
                );
            }
            parts.into_iter().collect::<tilt_actors::Result<Vec<_>>>()
        })?;
        let p = &self.plain;
        let (g, s) = step.grads_of_parts(mlp, vars, &p.grid, &parts, p.labels, p.beta)?;
        Ok((
            g,
            StepStats {
                loss: s.loss,
                accuracy: s.accuracy,
                label_strength: Some(s.label_strength),
            },
        ))
    }
}

/// Which learner step the VRPO stage takes: `Ok((threads per replica, replicas))` for the fused
/// one, or why it takes the plain candle path.
pub fn fused_learner(cfg: &Config, s: &Setup) -> std::result::Result<(usize, usize), String> {
    if !cfg.learner.fused {
        return Err("learner.fused = false".into());
    }
    if s.data.classes > 0 {
        return Err("the residual is class-conditional".into());
    }
    let devices = build::learner_devices(cfg).map_err(|e| e.to_string())?;
    if let Some(d) = devices.iter().find(|d| !d.is_cpu()) {
        return Err(format!("a learner replica is on {:?}", d.location()));
    }
    let replicas = devices.len().max(1);
    let threads = match cfg.learner.threads {
        0 => (build::default_learner_cores(cfg) / replicas).max(1),
        t => t,
    };
    Ok((threads, replicas))
}

/// The threads the VRPO learners compute on, all replicas together: the fused step's threads per
/// replica times the replicas, or one per replica on the plain path (candle's ops run on one
/// thread each).
fn learner_threads(cfg: &Config, s: &Setup) -> Result<usize> {
    Ok(match fused_learner(cfg, s) {
        Ok((threads, replicas)) => threads * replicas,
        Err(_) => build::learner_devices(cfg)?.len().max(1),
    })
}

/// Which roles this process runs in the VRPO stage, and how it meets the others.
pub struct Roles {
    /// Rollout actors, and where they hand their segment pairs (the critics of this process, or
    /// a bridge to Redis in worker mode).
    pub rollouts: Option<(usize, flume::Sender<Vec<SegmentPair>>)>,
    /// Critic actors, and where they take segment pairs from.
    pub critics: Option<(usize, flume::Receiver<Vec<SegmentPair>>)>,
    pub learners: bool,
    pub replay: Arc<dyn ReplayBuffer>,
    /// Fires when a producer-only process should stop (worker mode: the learner finished).
    pub stop: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl Roles {
    /// Every role in this process, as configured, meeting through a bounded in-process channel
    /// (a slow critic holds the rollouts back).
    pub fn all(cfg: &Config, replay: Arc<dyn ReplayBuffer>) -> Self {
        let (tx, rx) = flume::bounded(cfg.rollout.channel.max(1));
        Roles {
            rollouts: Some((cfg.rollout.actors, tx)),
            critics: Some((cfg.critic.actors, rx)),
            learners: true,
            replay,
            stop: None,
        }
    }
}

/// The VRPO stage's producers: critic actors (scoring endpoints into the replay) and rollout
/// actors (reference segments into the channel), as `roles` says.
pub fn sources(
    cfg: &Config,
    s: &Setup,
    run_dir: &Path,
    roles: &Roles,
) -> Result<Vec<Arc<dyn PairSource>>> {
    let mut out: Vec<Arc<dyn PairSource>> = Vec::new();
    if cfg.vrpo.method == VrpoMethod::FinalDpo {
        // The baseline's only producer: ranked final samples straight into the replay.
        if roles.rollouts.is_some() {
            out.push(Arc::new(FinalPairSource {
                actors: cfg.rollout.actors,
                reference: s.data.reference.clone(),
                reward: s.reward.clone(),
                grid: s.grid.clone(),
                sample_shape: s.data.sample_shape.clone(),
                classes: s.data.classes,
                per_unit: cfg.rollout.chains,
                device: s.rollout_device.clone(),
            }));
        }
        return Ok(out);
    }
    if let Some((actors, input)) = &roles.critics {
        out.push(Arc::new(CriticSource {
            actors: *actors,
            critic: load_critic(cfg, s, run_dir)?,
            grid: s.grid.clone(),
            lambda: cfg.vrpo.lambda,
            device: s.critic_device.clone(),
            input: input.clone(),
            panic_after_units: cfg.fault.critic_panic_after,
        }));
    }
    if let Some((actors, out_tx)) = &roles.rollouts {
        out.push(Arc::new(RolloutSource {
            actors: *actors,
            reference: s.data.reference.clone(),
            grid: s.grid.clone(),
            sample_shape: s.data.sample_shape.clone(),
            classes: s.data.classes,
            chains: cfg.rollout.chains,
            segment_len: cfg.vrpo.segment_len,
            device: s.rollout_device.clone(),
            out: out_tx.clone(),
            panic_after_units: cfg.fault.rollout_panic_after,
        }));
    }
    Ok(out)
}

/// The learners' objective: VRPO on scored segment pairs (fused or plain, as [`fused_learner`]
/// says, and said on `progress` when this process runs learners), or the Diffusion-DPO baseline.
fn objective(cfg: &Config, s: &Setup, progress: Option<&Progress>) -> Arc<dyn Objective> {
    match cfg.vrpo.method {
        VrpoMethod::Segments => {
            let plain = VrpoObjective {
                grid: s.grid.clone(),
                labels: cfg.vrpo.labels,
                beta: cfg.vrpo.beta,
            };
            let (line, objective): (String, Arc<dyn Objective>) = match fused_learner(cfg, s) {
                Ok((threads, replicas)) => (
                    format!(
                        "[vrpo] learner step: fused (tilt_kernels::fused_vrpo), {threads} thread(s) per replica"
                    ),
                    Arc::new(FusedVrpoObjective::new(plain, replicas, threads)),
                ),
                Err(why) => (
                    format!("[vrpo] learner step: plain candle autograd ({why})"),
                    Arc::new(plain),
                ),
            };
            if let Some(p) = progress {
                p.line(&line);
            }
            objective
        }
        VrpoMethod::FinalDpo => Arc::new(final_dpo::FinalDpoObjective {
            reference: s.data.reference.clone(),
            schedule: s.schedule.clone(),
            beta: cfg.vrpo.beta,
            seed: cfg.seed,
        }),
    }
}

/// Stage 2 as a `Training` for the shared learners. A process that runs learners says on
/// `progress` which learner step they take.
pub fn training(
    cfg: &Config,
    s: &Setup,
    run_dir: &Path,
    roles: Roles,
    progress: &Progress,
) -> Result<Training> {
    let sources = sources(cfg, s, run_dir, &roles)?;
    let (policy, dim, classes, opt, seed) = (
        cfg.policy.clone(),
        s.dim(),
        s.data.classes,
        adamw(cfg),
        cfg.seed,
    );
    Ok(Training {
        name: "vrpo".into(),
        dir: run_dir.to_path_buf(),
        report_file: run_dir.join("vrpo.json"),
        steps: cfg.vrpo.steps,
        batch: cfg.vrpo.batch,
        devices: if roles.learners {
            build::learner_devices(cfg)?
        } else {
            vec![]
        },
        build: Box::new(move |device| {
            build::mlp_policy(&policy, dim, classes, opt.clone(), seed, device)
        }),
        init: None,
        objective: objective(cfg, s, roles.learners.then_some(progress)),
        sources,
        replay: roles.replay,
        checkpoint_every: cfg.learner.checkpoint_every,
        at_steps: cfg.eval.at_steps.clone(),
        extra_file: (cfg.critic.kind == CriticKind::Learned).then(|| critic_files(run_dir).0),
        seed: cfg.seed,
        fail_at_step: cfg.fault.learner_fail_at_step,
        nan_at_step: cfg.fault.learner_nan_at_step,
        sync: cfg.runtime == crate::config::RuntimeKind::Sync,
        cpu: build::cpu_plan(cfg, learner_threads(cfg, s)?, roles.learners)?,
        stop: roles.stop,
        resume_ledger: false,
    })
}

/// Stage 1, unless this run directory already holds a trained critic.
pub fn ensure_critic(
    cfg: &Config,
    s: &Setup,
    run_dir: &Path,
    progress: &Progress,
) -> Result<Option<CriticReport>> {
    if cfg.critic.kind != CriticKind::Learned {
        return Ok(None);
    }
    let (wfile, jfile) = critic_files(run_dir);
    if jfile.exists() && wfile.exists() {
        progress.line("[critic] already trained in this run directory: reusing it");
        return Ok(Some(read_json(&jfile)?));
    }
    if !cfg.critic.from.is_empty() {
        let from = Path::new(&cfg.critic.from);
        let (fw, fj) = critic_files(from);
        if !fw.exists() || !fj.exists() {
            anyhow::bail!(
                "critic.from = {:?}: no trained critic there (expected {} and {})",
                cfg.critic.from,
                fw.display(),
                fj.display()
            );
        }
        // Weights first, the report last: its presence means the weights are complete.
        crate::files::copy_atomic(&fw, &wfile)?;
        let cal = from.join("calibration.json");
        if cal.exists() {
            crate::files::copy_atomic(&cal, &run_dir.join("calibration.json"))?;
        }
        crate::files::copy_atomic(&fj, &jfile)?;
        progress.line(&format!(
            "[critic] reusing the critic of {}",
            from.display()
        ));
        return Ok(Some(read_json(&jfile)?));
    }
    // Tensor work off the async executor's worker.
    off_executor(|| stage_critic(cfg, s, run_dir)).map(Some)
}

#[async_trait]
impl Algorithm for Vrpo {
    fn stages(&self) -> &'static [&'static str] {
        crate::config::AlgorithmKind::Vrpo.stages()
    }

    async fn execute(&self, run: &RunCtx<'_>) -> Result<Option<serde_json::Value>> {
        let (cfg, run_dir, progress) = (run.cfg, run.run_dir, run.progress);
        let t0 = std::time::Instant::now();
        if has_stage(cfg, "pretrain") {
            ensure_pretrained(cfg, run_dir, progress)?;
        }
        let s = setup(cfg, run_dir)?;
        // Connect the replay first: a Redis that is down fails the run before any work is done.
        let replay = if has_stage(cfg, "vrpo") {
            Some(build::replay(cfg, &super::invocation_id(cfg), "learner-0").await?)
        } else {
            None
        };
        let mut critic = None;
        if has_stage(cfg, "critic") {
            critic = ensure_critic(cfg, &s, run_dir, progress)?;
        }
        let mut report = TrainReport::default();
        if let Some(replay) = replay {
            let t = training(cfg, &s, run_dir, Roles::all(cfg, replay.clone()), progress)?;
            let res = train(t, progress).await;
            if let Err(e) = replay.purge().await {
                progress.line(&format!(
                    "tilt: warning: could not remove the run's Redis keys: {e}"
                ));
            }
            report = res?;
            if report.stopped_early {
                progress.line(&format!(
                    "tilt: stopped at step {} of {}; continue with `tilt resume {}`",
                    report.steps,
                    cfg.vrpo.steps,
                    run_dir.display()
                ));
                return Ok(None);
            }
        }
        if !has_stage(cfg, "eval") {
            return Ok(None);
        }
        let summary =
            off_executor(|| eval::finish(cfg, &s, run_dir, critic, &report, t0, progress))?;
        Ok(Some(serde_json::to_value(summary)?))
    }

    async fn worker(&self, run: &RunCtx<'_>, role: WorkerRole, run_id: &str) -> Result<()> {
        worker::run_worker(run, role, run_id).await
    }

    fn render(&self, run_dir: &Path) -> Result<Vec<PathBuf>> {
        eval::render(run_dir)
    }
}
