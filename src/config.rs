//! The run configuration: typed, nested, `deny_unknown_fields`, with defaults and a `validate()`
//! that names the offending key. `--set a.b=value` edits the TOML tree before it is typed, so every
//! key can be overridden and a misspelt one fails exactly like a misspelt key in the file.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use tilt_actors::replay::redis::{RedisTarget, RedisTls};
use tilt_actors::replay::ReplayConfig;
use tilt_kernels::critic::CriticLossWeights;
use tilt_kernels::losses::VrpoLabels;

/// The whole run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// A name for reports.
    pub name: String,
    /// "vrpo" (reward tilting, stages critic/vrpo/eval) or "dfdpo" (video preference,
    /// stages pretrain/sft/dfdpo/ablation/eval). Each is one file in src/algo/.
    pub algorithm: AlgorithmKind,
    /// Master seed: every random stream is derived from it.
    pub seed: u64,
    /// Stages to run, in order; the algorithm names the ones it offers (vrpo: "critic", "vrpo",
    /// "eval"; dfdpo: "pretrain", "sft", "dfdpo", "ablation", "eval").
    pub stages: Vec<String>,
    /// The default device of every role: "cpu", "cuda" or "cuda:N" (CUDA needs the `cuda`
    /// feature). `rollout.device`, `critic.device` and `learner.device` override it per role.
    pub device: String,
    /// "async" (the actor pipeline: producers and learners overlap) or "sync" (produce a unit,
    /// score it, train on it until the replay's limiter stops serving, repeat: no overlap).
    pub runtime: RuntimeKind,
    /// Linux, a process that runs learners: give the learners' compute cores of their own and
    /// the producers' compute (rollout, critic, distortion) the rest of the cores this process
    /// may use, so that neither preempts the other (README, "Performance"). With it,
    /// `learner.threads = 0` means all cores but one, shared by the replicas. Off by default:
    /// several pinned processes on one host would share the same first cores.
    pub pin_cores: bool,
    pub data: DataConfig,
    pub reward: RewardConfig,
    pub schedule: ScheduleConfig,
    pub sampling: SamplingConfig,
    pub policy: PolicyConfig,
    pub critic: CriticConfig,
    pub vrpo: VrpoConfig,
    pub rollout: RolloutConfig,
    pub learner: LearnerConfig,
    pub replay: ReplayConfig,
    pub eval: EvalConfig,
    pub fault: FaultConfig,
    pub metrics: MetricsConfig,
    pub video: VideoDataConfig,
    pub pretrain: PretrainConfig,
    pub dfdpo: DfDpoConfig,
    pub distortion: DistortionConfig,
}

/// How the roles take turns (`runtime = "..."`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// The actor pipeline: producers and learners run concurrently.
    #[default]
    Async,
    /// One unit at a time, produced when the learner asks for it; no overlap.
    Sync,
}

/// Which algorithm runs (`algorithm = "..."`); an unknown name is a parse error naming the key.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AlgorithmKind {
    Vrpo,
    Dfdpo,
}

/// The data / reference model of VRPO, one typed section per `kind`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", deny_unknown_fields)]
pub enum DataConfig {
    /// An isotropic Gaussian mixture whose exact eps is the reference model.
    #[serde(rename = "mixture2d")]
    Mixture2d {
        /// Mixture weights (normalised).
        weights: Vec<f64>,
        /// Mixture means, one per component.
        means: Vec<Vec<f64>>,
        /// Mixture standard deviations (isotropic), one per component.
        stds: Vec<f64>,
    },
    /// The 8x8 handwritten digits (scikit-learn's copy of the UCI set), class-conditional: the
    /// class is the prompt. The reference is a U-Net pretrained by the "pretrain" stage.
    #[serde(rename = "digits")]
    Digits(DigitsDataConfig),
}

/// `data.kind = "digits"`: the data set, the reference U-Net and the two classifiers (reward model
/// A, judge B) that the "pretrain" stage trains.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DigitsDataConfig {
    /// The converted data set (`scripts/fetch-digits.sh` regenerates it).
    pub path: String,
    /// Image side: 8 (as shipped) or 16 (2x upsampled).
    pub size: usize,
    /// Use the first this many classes (digits 0..classes-1), 2..=10.
    pub classes: usize,
    /// Share of each class held out (classifier accuracies are measured there).
    pub held_out: f64,
    /// The reference denoiser: "mlp" (class-conditional MLP on the flattened image; the default:
    /// about 30x faster than the U-Net on CPU, README) or "unet" (the convolutional U-Net).
    pub model: ReferenceModel,
    /// MLP reference: hidden width and number of hidden layers.
    pub hidden: usize,
    pub depth: usize,
    /// U-Net reference: feature channels at full resolution.
    pub base: usize,
    /// Time-embedding width of the reference.
    pub time_dim: usize,
    /// Training steps of each classifier (reward model A, judge B).
    pub classifier_steps: u64,
    /// Hidden width of reward model A (an MLP); the judge is a CNN.
    pub classifier_hidden: usize,
}

impl Default for DigitsDataConfig {
    fn default() -> Self {
        Self {
            path: "data/digits.safetensors".into(),
            size: 8,
            classes: 10,
            held_out: 0.2,
            model: ReferenceModel::Mlp,
            hidden: 512,
            depth: 4,
            base: 16,
            time_dim: 32,
            classifier_steps: 1500,
            classifier_hidden: 256,
        }
    }
}

/// The reward, one typed section per `kind`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum RewardConfig {
    /// r(x) = a.x + b.
    Linear {
        a: Vec<f64>,
        #[serde(default)]
        b: f64,
    },
    /// r(x) = -scale |x - center|^2.
    Quadratic {
        center: Vec<f64>,
        #[serde(default = "one")]
        scale: f64,
    },
    /// Images: r(x) = log p_A(class | x), the reward model A trained by the "pretrain" stage (the
    /// PickScore role). Prompt-aware.
    Classifier,
    /// Images: r(x) = scale * mean(x^2) over pixels in [-1, 1] (stroke contrast: saturated
    /// pixels score high). Prompt-agnostic.
    Contrast {
        #[serde(default = "one")]
        scale: f64,
    },
}

fn one() -> f64 {
    1.0
}

/// The reference denoiser of image data.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ReferenceModel {
    Mlp,
    Unet,
}

/// The critic of VRPO.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CriticKind {
    /// A CDF critic trained in stage 1.
    Learned,
    /// The analytic value of the mixture (linear reward only).
    Exact,
}

/// What the VRPO stage trains on.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum VrpoMethod {
    /// VRPO: pairs of L-step segments from a shared start, ranked by the critic's value.
    #[default]
    Segments,
    /// Baseline: Diffusion-DPO on pairs of final samples ranked by the reward.
    FinalDpo,
}

/// The encoder of the learned critic.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum EncoderKind {
    #[default]
    Mlp,
    RewardFeatures,
}

/// The value a learned critic scores with.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ValueKind {
    /// V = log sum_m pi_m exp(lambda c_m) (the optimal value; VRPO).
    #[default]
    Optimal,
    /// V = lambda sum_m pi_m c_m (the mean reward; the paper's ablation).
    Mean,
}

/// Where DF-DPO's real clips come from.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ClipSource {
    /// Built in, no download.
    Procedural,
    /// One .npy per clip (or a folder of PNG frames) in `video.dir`.
    Dir,
}

/// The motion of procedural clips.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MotionKind {
    Friction,
    Bounce,
    Mixed,
}

/// The network of a DF-DPO run's denoisers.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum VideoModelKind {
    /// Factorised spatio-temporal convolutions (`video.base`).
    Conv,
    /// Frame-token mixer (`video.hidden`, `video.depth`).
    Mixer,
}

/// The training-grid noise schedule.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleConfig {
    /// N, training steps.
    pub train_steps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
}

/// The sampling chain.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingConfig {
    /// K, sampling steps (DESIGN.md: K >= 100 for the tilt to be reachable).
    pub steps: usize,
    /// DDIM eta in (0, 1]; 1 = DDPM posterior variance.
    pub eta: f64,
}

/// The policy residual (policy = reference + residual, residual initialised to zero).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    pub hidden: usize,
    pub depth: usize,
    pub time_dim: usize,
}

/// VRPO stage 1: the distributional critic, and the critic role of stage 2.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CriticConfig {
    /// "learned" (CDF critic trained in stage 1) or "exact" (the analytic mixture value).
    pub kind: CriticKind,
    /// Which value the learned critic scores endpoints with: "optimal" (log E[exp(lambda r)],
    /// VRPO) or "mean" (lambda E[r]: the paper's "average score" ablation, w/o OVF).
    pub value: ValueKind,
    /// Reuse the trained critic of this run directory (copied into this run) instead of training
    /// one: methods compared on one critic. "" = train it here.
    pub from: String,
    /// The encoder under the CDF head: "mlp" (a trained MLP of (x_k, k, class)) or
    /// "reward_features" (images: the paper's design, the frozen reward model's features of x_k
    /// plus time and class embeddings through a trained MLP; features cached during training).
    pub encoder: EncoderKind,
    /// Critic actors scoring endpoints in stage 2.
    pub actors: usize,
    /// Device of the critic role (stage 1 training and scoring); "" = the top-level `device`.
    pub device: String,
    /// M, bins of the CDF grid.
    pub bins: usize,
    /// Grid range [lo, hi]; empty = from the rewards of the reference rollouts (min/max with 5% margin).
    pub grid: Vec<f64>,
    /// Reference chains rolled for the critic's training set (10% held out).
    pub rollouts: usize,
    pub train_steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub hidden: usize,
    pub depth: usize,
    pub time_dim: usize,
    pub loss: CriticLossWeights,
}

/// VRPO stage 2.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct VrpoConfig {
    /// The tilt lambda (the paper's eta): target p_ref exp(lambda r).
    pub lambda: f64,
    /// DPO temperature; 1 with soft labels (DESIGN.md).
    pub beta: f64,
    /// "segments" (VRPO: critic-ranked segment pairs) or "final_dpo" (the offline baseline:
    /// Diffusion-DPO on final-sample pairs ranked by the reward; no critic).
    pub method: VrpoMethod,
    /// "soft" (q = sigmoid(V(a) - V(b))) or "hard" (the paper's winner/loser).
    pub labels: VrpoLabels,
    /// L, steps per segment.
    pub segment_len: usize,
    /// Learner steps.
    pub steps: u64,
    /// Pairs per learner replica per step.
    pub batch: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub grad_clip: f64,
}

/// Rollout role.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutConfig {
    pub actors: usize,
    /// Device of the rollout role; "" = the top-level `device`.
    pub device: String,
    /// Reference chains per unit of work (each yields K/L pairs).
    pub chains: usize,
    /// Units buffered between rollouts and critics.
    pub channel: usize,
}

/// Learner role.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LearnerConfig {
    /// Synchronous data-parallel replicas.
    pub actors: usize,
    /// Device of the learner replicas (and of evaluation); "" = the top-level `device`.
    pub device: String,
    /// One device per data-parallel replica (e.g. `["cuda:0", "cuda:1"]`); empty = `actors`
    /// replicas on `device`. When set it gives the number of replicas (`actors` must then be 1,
    /// its default, or equal). Gradients are averaged on the first replica's device and every
    /// replica applies the same step. `device` stays the device of the evaluation.
    pub devices: Vec<String>,
    /// Checkpoint every this many steps (0 = only at the end and at eval points).
    pub checkpoint_every: u64,
    /// VRPO on the CPU with the unconditional MLP residual: take each step through the fused
    /// hand-written forward and backward (`tilt_kernels::fused_vrpo`, the same loss and gradients)
    /// instead of candle's autograd. false forces the plain path. Other models and devices always
    /// take the plain path; the stage's first line says which one runs.
    pub fused: bool,
    /// Threads of each learner replica's fused step; 0 = the available cores (all but one with
    /// `pin_cores`) divided by the number of replicas (at least 1).
    pub threads: usize,
}

/// Evaluation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Policy samples per evaluated checkpoint.
    pub samples: usize,
    /// Reference samples for the importance-weighted target.
    pub target_samples: usize,
    /// Extra learner steps to evaluate at (besides the last), e.g. to show drift.
    pub at_steps: Vec<u64>,
}

/// DF-DPO data and model: procedural clips with an arrow of time, or a directory of .npy clips.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct VideoDataConfig {
    /// "procedural" (built in, no download) or "dir" (one .npy per clip in `dir`).
    pub source: ClipSource,
    pub dir: String,
    /// Procedural motion: "friction", "bounce" or "mixed".
    pub motion: MotionKind,
    /// Number of real clips.
    pub clips: usize,
    pub frames: usize,
    pub channels: usize,
    pub size: usize,
    /// The denoiser: "conv" (factorised space-time convolutions) or "mixer" (frame tokens).
    pub model: VideoModelKind,
    /// Width of the conv denoiser.
    pub base: usize,
    /// Conv denoiser: width of the global block after its half-resolution level (each frame's
    /// map one token, mixed over the clip's frames); 0 = none.
    pub global: usize,
    /// Width of a frame token and number of blocks of the mixer.
    pub hidden: usize,
    pub depth: usize,
    pub time_dim: usize,
    /// Diffuse standardised clips ((clip - mean) / std of the real clips) and map samples back.
    pub normalize: bool,
    /// What the denoiser predicts: "eps" or "v" (v = sqrt(abar) eps - sqrt(1 - abar) x_0, trained
    /// with the v-MSE in pretraining; seen as eps everywhere else, `denoiser::VPrediction`).
    pub prediction: tilt_kernels::denoiser::Prediction,
}

impl Default for VideoDataConfig {
    fn default() -> Self {
        Self {
            source: ClipSource::Procedural,
            dir: String::new(),
            motion: MotionKind::Mixed,
            clips: 512,
            frames: 8,
            channels: 1,
            size: 16,
            model: VideoModelKind::Conv,
            base: 16,
            global: 0,
            hidden: 512,
            depth: 3,
            time_dim: 32,
            normalize: true,
            prediction: tilt_kernels::denoiser::Prediction::Eps,
        }
    }
}

impl VideoDataConfig {
    /// The mixer denoiser of these clips (`video.model = "mixer"`).
    pub fn mixer(&self) -> tilt_kernels::models::MixerConfig {
        tilt_kernels::models::MixerConfig {
            frames: self.frames,
            channels: self.channels,
            size: self.size,
            hidden: self.hidden,
            depth: self.depth,
            time_dim: self.time_dim,
            zero_init_output: false,
        }
    }
}

/// Stage "pretrain": the reference denoiser trained on the real data (DF-DPO's clips, VRPO's
/// digits; for digits also the two classifiers).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PretrainConfig {
    pub steps: u64,
    pub batch: usize,
    pub lr: f64,
    /// Reuse the pretrained models of this run directory (or of this directory holding them)
    /// instead of training them; "" = train them in this run.
    pub from: String,
    /// DF-DPO: linear learning-rate warm-up over this many steps (0 = none).
    pub warmup: u64,
    /// DF-DPO: decay the learning rate along half a cosine to 0 at the last step.
    pub cosine: bool,
    /// DF-DPO: clip the gradients' global L2 norm to this (0 = off).
    pub grad_clip: f64,
    /// DF-DPO: keep an exponential moving average of the weights with this decay and save it as
    /// the reference (0 = save the last weights).
    pub ema: f64,
    /// DF-DPO protocol: the share of the pretraining clips replaced by temporally corrupted copies
    /// (a reference whose arrow of time is wrong at a known rate); 0 = real clips only.
    pub corrupt: f64,
    /// The operators (with weights) that make those copies: "reverse" and/or "shuffle".
    pub corrupt_ops: Vec<(tilt_kernels::distort::Distortion, f64)>,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        Self {
            steps: 600,
            batch: 16,
            lr: 2e-3,
            from: String::new(),
            warmup: 0,
            cosine: false,
            grad_clip: 0.0,
            ema: 0.0,
            corrupt: 0.0,
            corrupt_ops: vec![(tilt_kernels::distort::Distortion::Reverse, 1.0)],
        }
    }
}

impl PretrainConfig {
    /// DF-DPO: the reference file `pretrain.from` names (a run directory's
    /// `reference.safetensors`, or the file itself); None when `from` is empty.
    pub fn video_reference(&self) -> Option<std::path::PathBuf> {
        if self.from.is_empty() {
            return None;
        }
        let from = std::path::Path::new(&self.from);
        Some(if from.is_dir() {
            from.join("reference.safetensors")
        } else {
            from.to_path_buf()
        })
    }
}

/// DF-DPO stages "sft", "dfdpo" and "ablation" (each continues from the reference).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DfDpoConfig {
    /// Learner steps of each continuation (SFT, DF-DPO, each ablation).
    pub steps: u64,
    /// Pairs per learner replica per step.
    pub batch: usize,
    pub lr: f64,
    /// Diffusion-DPO temperature (per-sample MSE differences are small: beta is large).
    pub beta: f64,
    /// Weight of the SFT term.
    pub lambda_sft: f64,
    /// The distortion curriculum (operator mix and strength, changing every `every` steps).
    pub curriculum: tilt_kernels::distort::Curriculum,
}

impl Default for DfDpoConfig {
    fn default() -> Self {
        let mut curriculum = tilt_kernels::distort::Curriculum::default_schedule();
        curriculum.every = 100;
        Self {
            steps: 300,
            batch: 8,
            lr: 5e-4,
            beta: 1000.0,
            lambda_sft: 1.0,
            curriculum,
        }
    }
}

/// DF-DPO distortion role.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DistortionConfig {
    pub actors: usize,
    /// Pairs per unit of work.
    pub per_unit: usize,
}

impl Default for DistortionConfig {
    fn default() -> Self {
        Self {
            actors: 1,
            per_unit: 16,
        }
    }
}

/// Live metrics.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Prometheus endpoint address, e.g. "127.0.0.1:9184"; port 0 picks a free port (logged at
    /// start); "" turns the endpoint off.
    pub listen: String,
    /// Seconds between progress lines (and gauge updates).
    pub progress_every_s: f64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9184".into(),
            progress_every_s: 3.0,
        }
    }
}

/// Fault injection (for tests of supervision; 0 = off).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct FaultConfig {
    /// A rollout actor panics after this many units (once).
    pub rollout_panic_after: u64,
    /// A critic actor panics after this many units (once).
    pub critic_panic_after: u64,
    /// The learner fails at this step (after checkpointing the previous one).
    pub learner_fail_at_step: u64,
    /// The learner's gradients turn NaN at this step (the run must stop, keeping the last good
    /// weights).
    pub learner_nan_at_step: u64,
}

impl AlgorithmKind {
    /// The name in configs and summaries.
    pub fn name(self) -> &'static str {
        match self {
            AlgorithmKind::Vrpo => "vrpo",
            AlgorithmKind::Dfdpo => "dfdpo",
        }
    }

    /// The stages the algorithm offers, in the order it runs them.
    pub fn stages(self) -> &'static [&'static str] {
        match self {
            AlgorithmKind::Vrpo => &["pretrain", "critic", "vrpo", "eval"],
            AlgorithmKind::Dfdpo => &["pretrain", "sft", "dfdpo", "ablation", "eval"],
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            name: "tilt".into(),
            algorithm: AlgorithmKind::Vrpo,
            seed: 0,
            stages: vec!["critic".into(), "vrpo".into(), "eval".into()],
            device: "cpu".into(),
            runtime: RuntimeKind::Async,
            pin_cores: false,
            data: DataConfig::default(),
            reward: RewardConfig::default(),
            schedule: ScheduleConfig::default(),
            sampling: SamplingConfig::default(),
            policy: PolicyConfig::default(),
            critic: CriticConfig::default(),
            vrpo: VrpoConfig::default(),
            rollout: RolloutConfig::default(),
            learner: LearnerConfig::default(),
            replay: ReplayConfig::default(),
            eval: EvalConfig::default(),
            fault: FaultConfig::default(),
            metrics: MetricsConfig::default(),
            video: VideoDataConfig::default(),
            pretrain: PretrainConfig::default(),
            dfdpo: DfDpoConfig::default(),
            distortion: DistortionConfig::default(),
        }
    }
}

impl DigitsDataConfig {
    /// Check every field; the error names the key.
    pub fn validate(&self) -> Result<()> {
        if self.path.is_empty() {
            bail!("data.path = \"\": needs the digits file (scripts/fetch-digits.sh writes data/digits.safetensors)");
        }
        if self.size != 8 && self.size != 16 {
            bail!(
                "data.size = {}: must be 8 (as shipped) or 16 (2x upsampled)",
                self.size
            );
        }
        if !(2..=10).contains(&self.classes) {
            bail!("data.classes = {}: must be in 2..=10", self.classes);
        }
        if !(self.held_out > 0.0 && self.held_out < 1.0) {
            bail!("data.held_out = {}: must be in (0, 1)", self.held_out);
        }
        for (k, v) in [
            ("data.hidden", self.hidden),
            ("data.depth", self.depth),
            ("data.base", self.base),
            ("data.classifier_hidden", self.classifier_hidden),
            ("data.classifier_steps", self.classifier_steps as usize),
        ] {
            if v == 0 {
                bail!("{k} = 0: must be at least 1");
            }
        }
        if self.time_dim == 0 || self.time_dim % 2 != 0 {
            bail!(
                "data.time_dim = {}: must be even and positive",
                self.time_dim
            );
        }
        Ok(())
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        let m = tilt_kernels::mixture::GaussianMixture::quickstart();
        Self::Mixture2d {
            weights: m.weights,
            means: m.means,
            stds: m.stds,
        }
    }
}
impl Default for RewardConfig {
    fn default() -> Self {
        Self::Linear {
            a: vec![1.0, 0.0],
            b: 0.0,
        }
    }
}
impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            train_steps: 1000,
            beta_start: 1e-4,
            beta_end: 0.02,
        }
    }
}
impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            steps: 100,
            eta: 1.0,
        }
    }
}
impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            hidden: 128,
            depth: 3,
            time_dim: 32,
        }
    }
}
impl Default for CriticConfig {
    fn default() -> Self {
        Self {
            kind: CriticKind::Learned,
            value: ValueKind::Optimal,
            from: String::new(),
            encoder: EncoderKind::Mlp,
            actors: 1,
            device: String::new(),
            bins: 50,
            grid: vec![],
            rollouts: 4000,
            train_steps: 2000,
            batch: 1024,
            lr: 1e-3,
            hidden: 128,
            depth: 3,
            time_dim: 32,
            loss: CriticLossWeights::default(),
        }
    }
}
impl Default for VrpoConfig {
    fn default() -> Self {
        Self {
            lambda: 1.0,
            beta: 1.0,
            method: VrpoMethod::Segments,
            labels: VrpoLabels::Soft,
            segment_len: 10,
            steps: 2000,
            batch: 256,
            lr: 1e-3,
            weight_decay: 0.0,
            grad_clip: 0.0,
        }
    }
}
impl Default for RolloutConfig {
    fn default() -> Self {
        Self {
            actors: 1,
            device: String::new(),
            chains: 64,
            channel: 4,
        }
    }
}
impl Default for LearnerConfig {
    fn default() -> Self {
        Self {
            actors: 1,
            device: String::new(),
            devices: Vec::new(),
            checkpoint_every: 500,
            fused: true,
            threads: 0,
        }
    }
}
impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            samples: 20_000,
            target_samples: 50_000,
            at_steps: vec![],
        }
    }
}

fn positive(key: &str, v: f64) -> Result<()> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        bail!("{key} = {v}: must be positive")
    }
}

impl Config {
    /// Check every value a user can get wrong; the error names the key and the value. Common
    /// sections first, then the sections of the configured algorithm.
    pub fn validate(&self) -> Result<()> {
        let known = self.algorithm.stages();
        if self.stages.is_empty() {
            bail!("stages = []: list at least one of {known:?}");
        }
        for s in &self.stages {
            if !known.contains(&s.as_str()) {
                bail!(
                    "stages: unknown stage {s:?} for algorithm {:?} (expected one of {known:?})",
                    self.algorithm.name()
                );
            }
        }
        for (key, d) in [
            ("device", &self.device),
            ("rollout.device", &self.rollout.device),
            ("critic.device", &self.critic.device),
            ("learner.device", &self.learner.device),
        ] {
            if !(d.is_empty() && key != "device") {
                tilt_kernels::cuda::parse_device(d).map_err(|e| anyhow!("{key} = {d:?}: {e}"))?;
            }
        }
        for (i, d) in self.learner.devices.iter().enumerate() {
            tilt_kernels::cuda::parse_device(d)
                .map_err(|e| anyhow!("learner.devices[{i}] = {d:?}: {e}"))?;
        }
        // The Diffusion-DPO objectives (DF-DPO, vrpo.method = "final_dpo") hold one frozen
        // reference on learner.device; their replicas must compute there too.
        let with_reference =
            self.algorithm == AlgorithmKind::Dfdpo || self.vrpo.method == VrpoMethod::FinalDpo;
        let home = self.device_of(&self.learner.device);
        if let Some(d) = self.learner.devices.iter().find(|d| d.as_str() != home) {
            if with_reference {
                bail!(
                    "learner.devices: {d:?} differs from learner.device ({home:?}); the Diffusion-DPO objectives (algorithm = \"dfdpo\", vrpo.method = \"final_dpo\") keep their frozen reference on learner.device, so every replica must run there"
                );
            }
        }
        let n_dev = self.learner.devices.len();
        if n_dev > 0 && self.learner.actors != 1 && self.learner.actors != n_dev {
            bail!(
                "learner.devices lists {n_dev} devices but learner.actors = {}: one replica runs per device (drop learner.actors or make it {n_dev})",
                self.learner.actors
            );
        }
        for (k, v) in [
            ("learner.actors", self.learner.actors),
            ("eval.samples", self.eval.samples),
        ] {
            if v == 0 {
                bail!("{k} = 0: must be at least 1");
            }
        }
        if self.learner.threads > 256 {
            bail!(
                "learner.threads = {}: must be 0 (one per core, shared by the replicas; with pin_cores all cores but one) or 1..=256",
                self.learner.threads
            );
        }
        if !(self.sampling.eta > 0.0 && self.sampling.eta <= 1.0) {
            bail!("sampling.eta = {}: must be in (0, 1]", self.sampling.eta);
        }
        if self.sampling.steps == 0 || self.sampling.steps > self.schedule.train_steps {
            bail!(
                "sampling.steps = {}: must be in 1..={} (schedule.train_steps)",
                self.sampling.steps,
                self.schedule.train_steps
            );
        }
        if !(self.metrics.progress_every_s.is_finite() && self.metrics.progress_every_s >= 0.0) {
            bail!(
                "metrics.progress_every_s = {}: must be finite and >= 0",
                self.metrics.progress_every_s
            );
        }
        if !self.metrics.listen.is_empty()
            && self.metrics.listen.parse::<std::net::SocketAddr>().is_err()
        {
            bail!(
                "metrics.listen = {:?}: expected host:port (e.g. \"127.0.0.1:9184\", port 0 = a free port) or \"\" for no endpoint",
                self.metrics.listen
            );
        }
        self.replay.validate().map_err(|e| anyhow!("{e}"))?;
        self.validate_redis_tls()?;
        if self.pin_cores && !cfg!(target_os = "linux") {
            bail!("pin_cores = true: needs Linux (sched_setaffinity); set pin_cores = false");
        }
        if self.runtime == RuntimeKind::Sync {
            if self.replay.backend != tilt_actors::replay::ReplayBackend::Memory {
                bail!("runtime = \"sync\": needs replay.backend = \"memory\" (one process, no overlap)");
            }
            for (k, v) in [
                ("rollout.actors", self.rollout.actors),
                ("critic.actors", self.critic.actors),
                ("distortion.actors", self.distortion.actors),
            ] {
                if v != 1 {
                    bail!("{k} = {v}: runtime = \"sync\" runs one producer of each kind");
                }
            }
        }
        match self.algorithm {
            AlgorithmKind::Vrpo => self.validate_vrpo(),
            AlgorithmKind::Dfdpo => self.validate_dfdpo(),
        }
    }

    /// Learner replicas: one per `learner.devices` entry, else `learner.actors`.
    pub fn learner_replicas(&self) -> usize {
        if self.learner.devices.is_empty() {
            self.learner.actors
        } else {
            self.learner.devices.len()
        }
    }

    /// The run's Redis: TILT_REDIS_URL, else `replay.url`; its TLS files from TILT_REDIS_CA,
    /// TILT_REDIS_CERT and TILT_REDIS_KEY, else `replay.tls_ca`, `tls_cert` and `tls_key`.
    pub fn redis_target(&self) -> RedisTarget {
        let r = &self.replay;
        RedisTarget::new(
            std::env::var("TILT_REDIS_URL").unwrap_or_else(|_| r.url.clone()),
            RedisTls {
                ca: env_path("TILT_REDIS_CA").or_else(|| r.tls_ca.clone()),
                cert: env_path("TILT_REDIS_CERT").or_else(|| r.tls_cert.clone()),
                key: env_path("TILT_REDIS_KEY").or_else(|| r.tls_key.clone()),
            },
        )
    }

    /// On the redis backend, the TLS files [`redis_target`](Self::redis_target) names must be
    /// readable, and a client certificate needs its key. Errors name the key (or the variable
    /// that set it) and the file, except the private key's file.
    fn validate_redis_tls(&self) -> Result<()> {
        if self.replay.backend != tilt_actors::replay::ReplayBackend::Redis {
            return Ok(());
        }
        let r = &self.replay;
        let sources = [
            ("replay.tls_ca", "TILT_REDIS_CA", &r.tls_ca, true),
            ("replay.tls_cert", "TILT_REDIS_CERT", &r.tls_cert, true),
            ("replay.tls_key", "TILT_REDIS_KEY", &r.tls_key, false),
        ];
        let mut set = [false; 3];
        for (i, (key, var, value, named)) in sources.into_iter().enumerate() {
            let (name, path) = match (env_path(var), value) {
                (Some(p), _) => (var, p),
                (None, Some(p)) => (key, p.clone()),
                (None, None) => continue,
            };
            set[i] = true;
            if let Err(e) = std::fs::File::open(&path) {
                if named {
                    bail!(
                        "{name} = {:?}: cannot read: {e}",
                        path.display().to_string()
                    );
                }
                bail!("{name}: cannot read the file it names: {e}");
            }
        }
        if set[1] != set[2] {
            bail!("replay.tls_cert and replay.tls_key: mutual TLS needs both (or neither)");
        }
        Ok(())
    }

    /// The device a role computes on: its own `<role>.device`, else the top-level `device`.
    pub fn device_of<'a>(&'a self, role_device: &'a str) -> &'a str {
        if role_device.is_empty() {
            &self.device
        } else {
            role_device
        }
    }

    fn validate_dfdpo(&self) -> Result<()> {
        let v = &self.video;
        let p = &self.pretrain;
        if let Some(file) = p.video_reference() {
            if !file.is_file() {
                bail!(
                    "pretrain.from = {:?}: no reference there (expected {})",
                    p.from,
                    file.display()
                );
            }
        }
        if !(0.0..1.0).contains(&p.ema) {
            bail!("pretrain.ema = {}: must be in [0, 1)", p.ema);
        }
        if !(0.0..1.0).contains(&p.corrupt) {
            bail!("pretrain.corrupt = {}: must be in [0, 1)", p.corrupt);
        }
        if !(p.grad_clip.is_finite() && p.grad_clip >= 0.0) {
            bail!(
                "pretrain.grad_clip = {}: must be 0 (off) or positive",
                p.grad_clip
            );
        }
        if p.corrupt > 0.0 {
            if p.corrupt_ops.is_empty() {
                bail!("pretrain.corrupt_ops = []: list at least one of \"reverse\", \"shuffle\"");
            }
            use tilt_kernels::distort::Distortion;
            for (op, w) in &p.corrupt_ops {
                if !matches!(op, Distortion::Reverse | Distortion::Shuffle) {
                    bail!("pretrain.corrupt_ops: {:?} is not a temporal corruption (use \"reverse\" or \"shuffle\")", op.name());
                }
                positive("pretrain.corrupt_ops weight", *w)?;
            }
        }
        if v.model == VideoModelKind::Mixer {
            v.mixer().validate().map_err(|e| anyhow!("{e}"))?;
            if v.global != 0 {
                bail!("video.global = {}: only the conv model (video.model = \"conv\") has a global block", v.global);
            }
        }
        if v.source == ClipSource::Dir && v.dir.is_empty() {
            bail!("video.dir = \"\": video.source = \"dir\" needs a directory of .npy clips");
        }
        for (k, n) in [
            ("video.clips", v.clips),
            ("pretrain.batch", self.pretrain.batch),
            ("dfdpo.batch", self.dfdpo.batch),
            ("distortion.actors", self.distortion.actors),
            ("distortion.per_unit", self.distortion.per_unit),
        ] {
            if n == 0 {
                bail!("{k} = 0: must be at least 1");
            }
        }
        positive("dfdpo.beta", self.dfdpo.beta)?;
        positive("dfdpo.lr", self.dfdpo.lr)?;
        positive("pretrain.lr", self.pretrain.lr)?;
        self.dfdpo
            .curriculum
            .validate()
            .map_err(|e| anyhow!("dfdpo.curriculum: {e}"))
    }

    fn validate_vrpo(&self) -> Result<()> {
        let p = &self.pretrain;
        for (key, set) in [
            ("pretrain.warmup", p.warmup != 0),
            ("pretrain.cosine", p.cosine),
            ("pretrain.grad_clip", p.grad_clip != 0.0),
            ("pretrain.ema", p.ema != 0.0),
            ("pretrain.corrupt", p.corrupt != 0.0),
        ] {
            if set {
                bail!("{key}: only DF-DPO's pretraining uses it (algorithm = \"dfdpo\")");
            }
        }
        let dim = match &self.data {
            DataConfig::Mixture2d {
                weights,
                means,
                stds,
            } => {
                tilt_kernels::mixture::GaussianMixture::new(
                    weights.clone(),
                    means.clone(),
                    stds.clone(),
                )
                .map_err(|e| anyhow!("data: {e}"))?;
                if self.critic.encoder == EncoderKind::RewardFeatures {
                    bail!("critic.encoder = \"reward_features\": needs image data with a classifier reward (data.kind = \"digits\")");
                }
                if self.stages.iter().any(|s| s == "pretrain") {
                    bail!("stages: \"pretrain\" needs image data (data.kind = \"digits\"); the mixture's reference is analytic");
                }
                if matches!(
                    self.reward,
                    RewardConfig::Classifier | RewardConfig::Contrast { .. }
                ) {
                    bail!("reward.kind: image rewards (\"classifier\", \"contrast\") need data.kind = \"digits\"");
                }
                means.first().map_or(0, |m| m.len())
            }
            DataConfig::Digits(d) => {
                d.validate()?;
                if self.critic.encoder == EncoderKind::RewardFeatures
                    && !matches!(self.reward, RewardConfig::Classifier)
                {
                    bail!("critic.encoder = \"reward_features\": needs reward.kind = \"classifier\" (the features are the reward model's)");
                }
                if matches!(
                    self.reward,
                    RewardConfig::Linear { .. } | RewardConfig::Quadratic { .. }
                ) {
                    bail!(
                        "reward.kind: digits take an image reward (\"classifier\" or \"contrast\")"
                    );
                }
                for (k, n) in [
                    ("pretrain.batch", self.pretrain.batch as u64),
                    ("pretrain.steps", self.pretrain.steps),
                ] {
                    if n == 0 && self.pretrain.from.is_empty() {
                        bail!("{k} = 0: must be at least 1");
                    }
                }
                positive("pretrain.lr", self.pretrain.lr)?;
                d.size * d.size
            }
        };
        match &self.reward {
            RewardConfig::Linear { a, .. } if a.len() != dim => {
                bail!("reward.a = {a:?}: needs {dim} entries (the data dimension)")
            }
            RewardConfig::Quadratic { center, .. } if center.len() != dim => {
                bail!("reward.center = {center:?}: needs {dim} entries")
            }
            _ => {}
        }
        if self.critic.kind == CriticKind::Exact && self.critic.value == ValueKind::Mean {
            bail!(
                "critic.value = \"mean\": the mean-value ablation needs critic.kind = \"learned\""
            );
        }
        if self.critic.kind == CriticKind::Exact
            && !matches!(self.reward, RewardConfig::Linear { .. })
        {
            bail!("critic.kind = \"exact\": the exact value is only known for a linear reward (reward.kind = \"quadratic\")");
        }
        if !self.critic.grid.is_empty()
            && (self.critic.grid.len() != 2 || self.critic.grid[0] >= self.critic.grid[1])
        {
            bail!(
                "critic.grid = {:?}: expected [lo, hi] with lo < hi, or [] for automatic",
                self.critic.grid
            );
        }
        let counts = [
            ("critic.actors", self.critic.actors),
            ("critic.bins", self.critic.bins),
            ("critic.rollouts", self.critic.rollouts),
            ("critic.batch", self.critic.batch),
            ("critic.hidden", self.critic.hidden),
            ("critic.depth", self.critic.depth),
            ("policy.hidden", self.policy.hidden),
            ("policy.depth", self.policy.depth),
            ("vrpo.segment_len", self.vrpo.segment_len),
            ("vrpo.batch", self.vrpo.batch),
            ("rollout.actors", self.rollout.actors),
            ("rollout.chains", self.rollout.chains),
            ("rollout.channel", self.rollout.channel),
            ("eval.target_samples", self.eval.target_samples),
        ];
        for (k, v) in counts {
            if v == 0 {
                bail!("{k} = 0: must be at least 1");
            }
        }
        for (k, v) in [
            ("critic.time_dim", self.critic.time_dim),
            ("policy.time_dim", self.policy.time_dim),
        ] {
            if v == 0 || v % 2 != 0 {
                bail!("{k} = {v}: must be even and positive");
            }
        }
        if self.vrpo.segment_len > self.sampling.steps {
            bail!(
                "vrpo.segment_len = {}: must be at most sampling.steps = {}",
                self.vrpo.segment_len,
                self.sampling.steps
            );
        }
        positive("vrpo.beta", self.vrpo.beta)?;
        positive("vrpo.lr", self.vrpo.lr)?;
        positive("critic.lr", self.critic.lr)?;
        if !self.vrpo.lambda.is_finite() {
            bail!("vrpo.lambda = {}: must be finite", self.vrpo.lambda);
        }
        self.critic
            .loss
            .validate()
            .map_err(|e| anyhow!("critic.loss: {e}"))
    }

    /// Parse TOML text, apply `--set key=value` overrides, type-check and validate. `origin` names
    /// the file in errors.
    pub fn from_toml_str(text: &str, origin: &str, sets: &[String]) -> Result<Self> {
        let mut tree: toml::Value = toml::from_str(text).map_err(|e| {
            // One line: the message's own lines joined, and where it is.
            let msg = e.message().lines().collect::<Vec<_>>().join("; ");
            match e.span() {
                Some(span) => {
                    let before = &text[..span.start.min(text.len())];
                    let line = before.matches('\n').count() + 1;
                    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                    anyhow!("{origin}:{line}:{col}: invalid TOML: {msg}")
                }
                None => anyhow!("{origin}: invalid TOML: {msg}"),
            }
        })?;
        for s in sets {
            apply_set(&mut tree, s).with_context(|| format!("--set {s}"))?;
        }
        // serde_path_to_error names the key of a type error ("reward.kind: unknown variant ...").
        let cfg: Config = serde_path_to_error::deserialize(tree).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if path == "." || path.is_empty() {
                anyhow!("{origin}: {}", inner.message())
            } else {
                anyhow!("{origin}: {path}: {}", inner.message())
            }
        })?;
        cfg.validate().map_err(|e| anyhow!("{origin}: {e}"))?;
        Ok(cfg)
    }

    /// Read, override, type-check and validate a config file.
    pub fn load(path: &Path, sets: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        Self::from_toml_str(&text, &path.display().to_string(), sets)
    }

    /// The resolved config as TOML (saved into the run directory). A password in `replay.url`
    /// is replaced by "***" (pass it again through TILT_REDIS_URL when resuming).
    pub fn to_toml(&self) -> Result<String> {
        let mut c = self.clone();
        c.replay.url = tilt_actors::replay::redis::redact(&c.replay.url);
        Ok(toml::to_string_pretty(&c)?)
    }
}

/// A path from environment variable `var`, if set and not empty.
fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// Apply one `a.b.c=value` to the TOML tree. The value is parsed as TOML (numbers, booleans,
/// arrays, quoted strings); anything else is taken as a bare string.
pub fn apply_set(tree: &mut toml::Value, set: &str) -> Result<()> {
    let (key, raw) = set
        .split_once('=')
        .ok_or_else(|| anyhow!("expected key=value"))?;
    let key = key.trim();
    if key.is_empty() {
        bail!("empty key");
    }
    let value: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or(toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.trim().to_string()),
    };
    let parts: Vec<&str> = key.split('.').collect();
    let mut node = tree;
    for p in &parts[..parts.len() - 1] {
        let table = node
            .as_table_mut()
            .ok_or_else(|| anyhow!("{key}: {p} is not a table"))?;
        node = table
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()));
    }
    let table = node
        .as_table_mut()
        .ok_or_else(|| anyhow!("{key}: parent is not a table"))?;
    table.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_and_metrics_default_to_loopback() {
        let c = Config::default();
        assert_eq!(RedisTarget::from(&c.replay.url).remote_addr(), None);
        let listen: std::net::SocketAddr = c.metrics.listen.parse().unwrap();
        assert!(listen.ip().is_loopback(), "{listen}");
    }

    #[test]
    fn tls_files_are_checked_on_the_redis_backend_only() {
        // The TLS keys round-trip through the saved config; a missing CA file is an error only
        // where it would be used.
        let sets = |ca: &str, backend: &str| {
            vec![
                format!("replay.backend={backend}"),
                format!("replay.tls_ca={ca}"),
                "replay.url=rediss://u:pw@127.0.0.1:6380/0".to_owned(),
            ]
        };
        let ok = Config::from_toml_str("", "x", &sets("Cargo.toml", "redis")).unwrap();
        assert_eq!(ok.replay.tls_ca, Some(PathBuf::from("Cargo.toml")));
        let saved = ok.to_toml().unwrap();
        assert!(saved.contains("tls_ca = \"Cargo.toml\""), "{saved}");
        assert!(saved.contains("rediss://u:***@127.0.0.1:6380/0"), "{saved}");
        Config::from_toml_str("", "x", &sets("/nonexistent/ca.pem", "memory")).unwrap();
        let e = Config::from_toml_str("", "x", &sets("/nonexistent/ca.pem", "redis"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("x: replay.tls_ca = \"/nonexistent/ca.pem\": cannot read"),
            "{e}"
        );
    }

    #[test]
    fn defaults_validate_and_round_trip() {
        let c = Config::default();
        c.validate().unwrap();
        let back = Config::from_toml_str(&c.to_toml().unwrap(), "x", &[]).unwrap();
        assert_eq!(c, back);
    }

    #[test]
    fn errors_name_file_key_and_value() {
        let e = Config::from_toml_str("[vrpo]\nlamda = 2.0\n", "f.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("f.toml") && e.contains("lamda"), "{e}");
        let e = Config::from_toml_str("", "f.toml", &["vrpo.beta=-1".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("vrpo.beta") && e.contains("-1"), "{e}");
        let e = Config::from_toml_str("", "f.toml", &["vrpo.labels=medium".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("medium"), "{e}");
    }

    #[test]
    fn set_reaches_nested_keys_and_arrays() {
        let c = Config::from_toml_str(
            "",
            "f",
            &[
                "vrpo.labels=hard".into(),
                "sampling.steps=20".into(),
                "eval.at_steps=[10, 20]".into(),
                "name=abc".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.vrpo.labels, VrpoLabels::Hard);
        assert_eq!(c.sampling.steps, 20);
        assert_eq!(c.eval.at_steps, vec![10, 20]);
        assert_eq!(c.name, "abc");
    }

    #[test]
    fn unknown_kinds_are_parse_errors_naming_the_key() {
        for (set, key, value) in [
            ("algorithm=ppo", "algorithm", "ppo"),
            ("reward.kind=cubic", "reward", "cubic"),
            ("data.kind=moons", "data", "moons"),
            ("critic.kind=oracle", "critic.kind", "oracle"),
            ("replay.backend=kafka", "replay.backend", "kafka"),
            ("video.motion=spin", "video.motion", "spin"),
            ("video.source=web", "video.source", "web"),
        ] {
            let e = Config::from_toml_str("", "f.toml", &[set.into()])
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("f.toml") && e.contains(key) && e.contains(value),
                "{set}: {e}"
            );
        }
    }

    #[test]
    fn typed_sections_refuse_the_keys_of_another_kind() {
        // A linear reward has no `center`; a quadratic one is fine with it.
        let e = Config::from_toml_str(
            "[reward]\nkind = \"linear\"\na = [1.0, 0.0]\ncenter = [0.0, 0.0]\n",
            "f",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("center"), "{e}");
        let c = Config::from_toml_str(
            "[reward]\nkind = \"quadratic\"\ncenter = [1.0, 2.0]\n",
            "f",
            &[],
        )
        .unwrap();
        assert_eq!(
            c.reward,
            RewardConfig::Quadratic {
                center: vec![1.0, 2.0],
                scale: 1.0
            }
        );
    }

    #[test]
    fn role_devices_fall_back_and_name_their_key() {
        let c = Config::from_toml_str("", "f", &["learner.device=\"cuda:1\"".into()]).unwrap();
        assert_eq!(c.device_of(&c.learner.device), "cuda:1");
        assert_eq!(c.device_of(&c.rollout.device), "cpu");
        let e = Config::from_toml_str("", "f", &["critic.device=\"gpu\"".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("critic.device") && e.contains("gpu"), "{e}");
        let e = Config::from_toml_str("", "f", &["stages=[]".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("stages"), "{e}");
    }
}
