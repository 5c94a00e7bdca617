//! Builders: typed config sections -> the components they name (device, schedule, data and
//! reference model, reward, exact value, policy and critic networks, replay). A new reward, data
//! kind or model is its file in `tilt-kernels` plus one enum arm in `config` and one arm here.

use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Device};
use candle_nn::VarMap;
use tilt_actors::cpu::CpuPlan;
use tilt_actors::replay::{MemoryReplay, ReplayBackend, ReplayBuffer};
use tilt_kernels::classifier::Classifier;
use tilt_kernels::critic::{CdfCritic, CdfGrid, CriticEncoder, MlpEncoder, MlpEncoderConfig};
use tilt_kernels::critic_features::{FeatureEncoderConfig, RewardFeatureEncoder};
use tilt_kernels::denoiser::{Denoiser, Prediction, VPrediction};
use tilt_kernels::image_reward::{ClassifierReward, ContrastReward};
use tilt_kernels::init::{seeded_var_builder, CRITIC_STREAM, POLICY_STREAM, VIDEO_STREAM};
use tilt_kernels::mixture::{AnalyticDenoiser, ExactValue, GaussianMixture};
use tilt_kernels::models::{MlpConfig, MlpDenoiser, VideoConfig, VideoDenoiser, VideoMixer};
use tilt_kernels::optim::AdamWConfig;
use tilt_kernels::reward::{LinearReward, QuadraticReward, Reward};
use tilt_kernels::schedule::{SamplingGrid, VpSchedule};

use crate::config::{
    Config, DataConfig, EncoderKind, PolicyConfig, RewardConfig, VideoDataConfig, VideoModelKind,
};
use crate::train::Trainable;

/// The device of a role: `role_device` ("" = the top-level `device`). Fails with the key named.
pub fn device(cfg: &Config, key: &str, role_device: &str) -> Result<Device> {
    let name = cfg.device_of(role_device);
    let key = if role_device.is_empty() {
        "device"
    } else {
        key
    };
    tilt_kernels::cuda::device(name).map_err(|e| anyhow!("{key} = {name:?}: {e}"))
}

/// Open the device of every role once, before anything is written: a role whose device is
/// missing (no `cuda` feature, no driver) fails the run at start with its key named. With
/// `pin_cores`, also check that the cores split (the learners' threads as configured, the
/// producers at least one), so a bad split fails before the first stage, not after it.
pub fn check_devices(cfg: &Config) -> Result<()> {
    device(cfg, "rollout.device", &cfg.rollout.device)?;
    device(cfg, "critic.device", &cfg.critic.device)?;
    device(cfg, "learner.device", &cfg.learner.device)?;
    let replicas = learner_devices(cfg)?.len().max(1);
    if cfg.pin_cores {
        let per = match cfg.learner.threads {
            0 => 1,
            t => t,
        };
        cpu_plan(cfg, per * replicas, true)?;
    }
    Ok(())
}

/// The device of each learner replica: `learner.devices` (one replica each), else
/// `learner.actors` replicas on `learner.device`. Fails with the key of the device that is missing.
pub fn learner_devices(cfg: &Config) -> Result<Vec<Device>> {
    if cfg.learner.devices.is_empty() {
        let d = device(cfg, "learner.device", &cfg.learner.device)?;
        return Ok(vec![d; cfg.learner.actors]);
    }
    cfg.learner
        .devices
        .iter()
        .enumerate()
        .map(|(i, d)| device(cfg, &format!("learner.devices[{i}]"), d))
        .collect()
}

/// Where this process's roles compute (`pin_cores`): unpinned unless set, or in a process without
/// learners; else the first `learner_threads` of the cores this process may use to the learners
/// and the rest to the producers. Fails, naming the key, when either role would get no core.
pub fn cpu_plan(cfg: &Config, learner_threads: usize, learners: bool) -> Result<CpuPlan> {
    if !cfg.pin_cores || !learners {
        return Ok(CpuPlan::unpinned());
    }
    CpuPlan::split_allowed(learner_threads).map_err(|e| anyhow!("{e}"))
}

/// The cores the learners of a `pin_cores` run may use by default: all but one (the producers').
pub fn default_learner_cores(cfg: &Config) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cfg.pin_cores {
        cores.saturating_sub(1).max(1)
    } else {
        cores
    }
}

/// The training-grid noise schedule.
pub fn schedule(cfg: &Config) -> Result<VpSchedule> {
    Ok(VpSchedule::linear(
        cfg.schedule.train_steps,
        cfg.schedule.beta_start,
        cfg.schedule.beta_end,
    )?)
}

/// The K-step sampling grid.
pub fn grid(cfg: &Config, schedule: &VpSchedule) -> Result<Arc<SamplingGrid>> {
    Ok(Arc::new(SamplingGrid::new(
        schedule,
        cfg.sampling.steps,
        cfg.sampling.eta,
    )?))
}

/// VRPO's data: its reference model, the shape of one sample and its number of classes (0 =
/// unconditional), and what the evaluation needs of the data kind.
pub struct VrpoData {
    pub reference: Arc<dyn Denoiser>,
    pub sample_shape: Vec<usize>,
    pub classes: usize,
    pub kind: DataKind,
}

/// What each data kind keeps for its evaluation.
pub enum DataKind {
    /// The mixture, for mode weights and the closed-form tilt.
    Mixture(GaussianMixture),
    /// The pretrained image models (reference, reward model A, judge B) and the data.
    Digits(Arc<crate::algo::vrpo::digits::DigitsModels>),
}

impl VrpoData {
    /// The mixture of a `mixture2d` run.
    pub fn mixture(&self) -> Option<&GaussianMixture> {
        match &self.kind {
            DataKind::Mixture(m) => Some(m),
            DataKind::Digits(_) => None,
        }
    }
}

/// Build the data kind named by `data.kind`. Image kinds load their pretrained models from the
/// run directory (the "pretrain" stage writes them there, or `pretrain.from` names another run).
pub fn vrpo_data(
    cfg: &Config,
    schedule: &VpSchedule,
    run_dir: &std::path::Path,
    device: &Device,
) -> Result<VrpoData> {
    match &cfg.data {
        DataConfig::Mixture2d {
            weights,
            means,
            stds,
        } => {
            let mixture = GaussianMixture::new(weights.clone(), means.clone(), stds.clone())
                .map_err(|e| anyhow!("data: {e}"))?;
            Ok(VrpoData {
                sample_shape: vec![mixture.dim()],
                reference: Arc::new(AnalyticDenoiser {
                    mixture: mixture.clone(),
                    schedule: schedule.clone(),
                }),
                classes: 0,
                kind: DataKind::Mixture(mixture),
            })
        }
        DataConfig::Digits(d) => {
            let models = Arc::new(crate::algo::vrpo::digits::DigitsModels::load(
                cfg, run_dir, device,
            )?);
            Ok(VrpoData {
                sample_shape: vec![1, d.size, d.size],
                reference: models.reference.clone(),
                classes: d.classes,
                kind: DataKind::Digits(models),
            })
        }
    }
}

/// The reward named by `reward.kind` (image rewards use the data's trained reward model).
pub fn reward(r: &RewardConfig, data: &VrpoData) -> Result<Arc<dyn Reward>> {
    Ok(match r {
        RewardConfig::Linear { a, b } => Arc::new(LinearReward {
            a: a.clone(),
            b: *b,
        }),
        RewardConfig::Quadratic { center, scale } => Arc::new(QuadraticReward {
            center: center.clone(),
            scale: *scale,
        }),
        RewardConfig::Classifier => match &data.kind {
            DataKind::Digits(m) => Arc::new(ClassifierReward {
                model: m.reward_model.clone(),
            }),
            DataKind::Mixture(_) => {
                bail!("reward.kind = \"classifier\" needs image data (data.kind = \"digits\")")
            }
        },
        RewardConfig::Contrast { scale } => Arc::new(ContrastReward { scale: *scale }),
    })
}

/// The exact value V(x, k) where it is known in closed form (a mixture with a linear reward).
pub fn exact_value(data: &VrpoData, r: &RewardConfig, schedule: &VpSchedule) -> Option<ExactValue> {
    match (r, data.mixture()) {
        (RewardConfig::Linear { a, b }, Some(m)) => Some(ExactValue {
            mixture: m.clone(),
            schedule: schedule.clone(),
            a: a.clone(),
            b: *b,
        }),
        _ => None,
    }
}

/// The residual policy network (zero-initialised output: policy == reference at step 0).
pub fn mlp_policy(
    p: &PolicyConfig,
    dim: usize,
    classes: usize,
    opt: AdamWConfig,
    seed: u64,
    device: &Device,
) -> Result<Trainable> {
    let vm = VarMap::new();
    let res = MlpDenoiser::new(
        MlpConfig {
            dim,
            hidden: p.hidden,
            depth: p.depth,
            time_dim: p.time_dim,
            classes,
            zero_init_output: true,
        },
        seeded_var_builder(&vm, seed, POLICY_STREAM, DType::F32, device),
    )?;
    Trainable::new(vm, Arc::new(res), opt)
}

/// The CDF critic: the encoder `critic.encoder` names (an MLP of (x_k, k, class), or the frozen
/// reward model's features of x_k with time and class embeddings: `frozen`) and the monotone CDF
/// head on `grid`; new weights in `vm` drawn from the run's seed.
pub fn cdf_critic(
    cfg: &Config,
    dim: usize,
    classes: usize,
    frozen: Option<Arc<dyn Classifier>>,
    grid: CdfGrid,
    vm: &VarMap,
    device: &Device,
) -> Result<CdfCritic> {
    let c = &cfg.critic;
    let vb = seeded_var_builder(vm, cfg.seed, CRITIC_STREAM, DType::F32, device);
    let enc: Box<dyn CriticEncoder> = match c.encoder {
        EncoderKind::Mlp => Box::new(MlpEncoder::new(
            MlpEncoderConfig {
                in_dim: dim,
                hidden: c.hidden,
                depth: c.depth,
                time_dim: c.time_dim,
                classes,
            },
            vb.pp("encoder"),
        )?),
        EncoderKind::RewardFeatures => Box::new(RewardFeatureEncoder::new(
            frozen.ok_or_else(|| {
                anyhow!("critic.encoder = \"reward_features\": this run has no reward model")
            })?,
            FeatureEncoderConfig {
                hidden: c.hidden,
                depth: c.depth,
                time_dim: c.time_dim,
                classes,
            },
            vb.pp("encoder"),
        )?),
    };
    Ok(CdfCritic::new(enc, grid, vb.pp("head"))?)
}

/// The reward model of image data (the frozen features of `critic.encoder = "reward_features"`).
pub fn reward_model(data: &VrpoData) -> Option<Arc<dyn Classifier>> {
    match &data.kind {
        DataKind::Digits(m) => Some(m.reward_model.clone()),
        DataKind::Mixture(_) => None,
    }
}

/// The spatio-temporal video denoiser (the DF-DPO reference and the models continued from it).
pub fn video_model(
    v: &VideoDataConfig,
    schedule: &VpSchedule,
    lr: f64,
    seed: u64,
    device: &Device,
) -> Result<Trainable> {
    let vm = VarMap::new();
    let vb = seeded_var_builder(&vm, seed, VIDEO_STREAM, DType::F32, device);
    let m: Arc<dyn Denoiser> = match v.model {
        VideoModelKind::Conv => Arc::new(VideoDenoiser::new(
            VideoConfig {
                frames: v.frames,
                channels: v.channels,
                size: v.size,
                base: v.base,
                time_dim: v.time_dim,
                zero_init_output: false,
                global: v.global,
            },
            vb,
        )?),
        VideoModelKind::Mixer => Arc::new(VideoMixer::new(v.mixer(), vb)?),
    };
    let m: Arc<dyn Denoiser> = match v.prediction {
        Prediction::Eps => m,
        Prediction::V => Arc::new(VPrediction::new(m, &schedule.abar, device)?),
    };
    Trainable::new(
        vm,
        m,
        AdamWConfig {
            lr,
            ..Default::default()
        },
    )
}

/// Random stream of the replay's sampler seed.
const REPLAY_STREAM: u64 = 0x5EED_0001;

/// The replay sampler's seed: from the run's `seed` (with `replay.seed` as the stream index, so
/// a user can vary the sampling alone), like every other draw of a run.
pub fn replay_seed(cfg: &Config) -> u64 {
    use rand::Rng;
    tilt_kernels::rng::rng_for(cfg.seed, REPLAY_STREAM, cfg.replay.seed).random()
}

/// The replay of a run: in-process, or Redis namespaced by `run_id` (consumer name `consumer`).
/// TILT_REDIS_URL overrides `replay.url` (see [`Config::redis_target`]).
pub async fn replay(cfg: &Config, run_id: &str, consumer: &str) -> Result<Arc<dyn ReplayBuffer>> {
    let rc = tilt_actors::replay::ReplayConfig {
        seed: replay_seed(cfg),
        ..cfg.replay.clone()
    };
    Ok(match rc.backend {
        ReplayBackend::Redis => {
            let redis = cfg.redis_target();
            Arc::new(
                tilt_actors::replay::redis::RedisReplay::connect(&redis, run_id, consumer, rc)
                    .await?,
            )
        }
        ReplayBackend::Memory => Arc::new(MemoryReplay::new(rc)?),
    })
}
