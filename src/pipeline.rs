//! The stages of a run, wired from config: `critic` (VRPO stage 1: reference rollouts, CDF critic
//! training, held-out report), `vrpo` (stage 2 through the actors), `eval` (policy vs the
//! importance-weighted tilted target). Math comes from `tilt_kernels`, movement from `tilt_actors`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tilt_actors::checkpoint::{checkpoint_dir, latest_checkpoint, load_checkpoint};
use tilt_actors::control::RunControl;
use tilt_actors::coordinator::{CoordinatorActor, CoordinatorMsg, RunOutcome, RunSpec};
use tilt_actors::learner::{CheckpointSpec, LearnerArgs, LearnerCore};
use tilt_actors::replay::{MemoryReplay, ReplayBuffer};
use tilt_kernels::critic::{
    critic_loss, cross_entropy, crps_loss, topk_accuracy, CdfCritic, CdfGrid, MlpEncoder,
    MlpEncoderConfig, ValueCritic, DEFAULT_EPS,
};
use tilt_kernels::denoiser::{load_weights, save_weights, timesteps, Denoiser, ResidualPolicy};
use tilt_kernels::logprob::sample_chain;
use tilt_kernels::mixture::{AnalyticDenoiser, ExactValue, GaussianMixture};
use tilt_kernels::models::{MlpConfig, MlpDenoiser};
use tilt_kernels::optim::{AdamW, AdamWConfig};
use tilt_kernels::reward::{LinearReward, QuadraticReward, Reward};
use tilt_kernels::rng::{randn, rng_for};
use tilt_kernels::schedule::{SamplingGrid, VpSchedule};
use tilt_kernels::tilt::tilted_target;

use crate::config::Config;
use crate::progress::Progress;

/// What every stage shares: schedule, grid, reference model, reward.
pub struct Setup {
    pub schedule: VpSchedule,
    pub grid: Arc<SamplingGrid>,
    pub mixture: GaussianMixture,
    pub reference: Arc<dyn Denoiser>,
    pub reward: Arc<dyn Reward>,
    pub dim: usize,
    pub device: Device,
}

/// Build the shared pieces from a validated config.
pub fn setup(cfg: &Config) -> Result<Setup> {
    let device = tilt_kernels::cuda::device(&cfg.device)
        .map_err(|e| anyhow!("device = {:?}: {e}", cfg.device))?;
    let schedule = VpSchedule::linear(
        cfg.schedule.train_steps,
        cfg.schedule.beta_start,
        cfg.schedule.beta_end,
    )?;
    let grid = Arc::new(SamplingGrid::new(
        &schedule,
        cfg.sampling.steps,
        cfg.sampling.eta,
    )?);
    let mixture = GaussianMixture::new(
        cfg.data.weights.clone(),
        cfg.data.means.clone(),
        cfg.data.stds.clone(),
    )?;
    let reference: Arc<dyn Denoiser> = Arc::new(AnalyticDenoiser {
        mixture: mixture.clone(),
        schedule: schedule.clone(),
    });
    let reward: Arc<dyn Reward> = match cfg.reward.kind.as_str() {
        "linear" => Arc::new(LinearReward {
            a: cfg.reward.a.clone(),
            b: cfg.reward.b,
        }),
        _ => Arc::new(QuadraticReward {
            center: cfg.reward.center.clone(),
            scale: cfg.reward.scale,
        }),
    };
    Ok(Setup {
        dim: mixture.dim(),
        schedule,
        grid,
        mixture,
        reference,
        reward,
        device,
    })
}

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

fn critic_files(run_dir: &Path) -> (PathBuf, PathBuf) {
    (
        run_dir.join("critic.safetensors"),
        run_dir.join("critic.json"),
    )
}

fn build_critic(
    cfg: &Config,
    dim: usize,
    grid: CdfGrid,
    vm: &VarMap,
    device: &Device,
) -> Result<CdfCritic> {
    let vb = VarBuilder::from_varmap(vm, DType::F32, device);
    let enc = MlpEncoder::new(
        MlpEncoderConfig {
            in_dim: dim,
            hidden: cfg.critic.hidden,
            depth: cfg.critic.depth,
            time_dim: cfg.critic.time_dim,
            classes: 0,
        },
        vb.pp("encoder"),
    )?;
    Ok(CdfCritic::new(Box::new(enc), grid, vb.pp("head"))?)
}

fn exact_value(cfg: &Config, s: &Setup) -> Option<ExactValue> {
    (cfg.reward.kind == "linear").then(|| ExactValue {
        mixture: s.mixture.clone(),
        schedule: s.schedule.clone(),
        a: cfg.reward.a.clone(),
        b: cfg.reward.b,
    })
}

/// Stage 1: roll reference chains, train the CDF critic on (x_k, k, r(x_0)), report on held-out chains.
pub fn stage_critic(cfg: &Config, s: &Setup, run_dir: &Path) -> Result<CriticReport> {
    let t0 = Instant::now();
    let k = s.grid.len();
    let n = cfg.critic.rollouts;
    let d = s.dim;
    eprintln!("[critic] rolling {n} reference chains of {k} steps");
    // states[k][chain] for k = K..=0, each [n, D].
    let mut rng = rng_for(cfg.seed, 1, 0);
    let mut x = randn(&mut rng, (n, d), &s.device)?;
    let mut states: Vec<Tensor> = vec![Tensor::zeros((n, d), DType::F32, &s.device)?; k + 1];
    states[k] = x.clone();
    for kk in (1..=k).rev() {
        x = sample_chain(
            s.reference.as_ref(),
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
    let critic = build_critic(cfg, d, grid.clone(), &vm, &s.device)?;
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
        let idx_t = Tensor::from_vec(idx.clone(), idx.len(), &s.device)?;
        let xb = train_x.index_select(&idx_t, 0)?;
        let nb = Tensor::from_vec(
            idx.iter().map(|&i| train_n[i as usize]).collect::<Vec<_>>(),
            idx.len(),
            &s.device,
        )?;
        let yb = Tensor::from_vec(
            idx.iter().map(|&i| train_y[i as usize]).collect::<Vec<_>>(),
            idx.len(),
            &s.device,
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
        kind: cfg.critic.kind.clone(),
        grid: vec![lo, hi],
        bins: cfg.critic.bins,
        ..Default::default()
    };
    if n_test > 0 {
        let (mut crps, mut ce, mut t1, mut t3) = (0.0, 0.0, 0.0, 0.0);
        let mut calib: Vec<(f64, bool)> = Vec::new();
        let yt = y.narrow(0, n_train, n_test)?;
        let exact = exact_value(cfg, s);
        let (mut se, mut cnt, mut agree, mut pairs) = (0.0, 0usize, 0usize, 0usize);
        for (kk, state) in states.iter().enumerate().skip(1) {
            let xt = state.narrow(0, n_train, n_test)?;
            let nt = timesteps(s.grid.n_of_k[kk], n_test, &s.device)?;
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
    if cfg.critic.kind == "exact" {
        return Ok(Arc::new(exact_value(cfg, s).ok_or_else(|| {
            anyhow!("critic.kind = \"exact\" needs a linear reward")
        })?));
    }
    let (wfile, jfile) = critic_files(run_dir);
    let report: CriticReport = read_json(&jfile)
        .context("the vrpo stage needs a trained critic: run the \"critic\" stage first")?;
    let mut vm = VarMap::new();
    let critic = build_critic(
        cfg,
        s.dim,
        CdfGrid::uniform(report.grid[0], report.grid[1], report.bins)?,
        &vm,
        &s.device,
    )?;
    load_weights(&mut vm, &wfile)?;
    Ok(Arc::new(critic))
}

/// Build a residual policy network with its optimiser (zero-initialised output).
pub fn build_policy(cfg: &Config, s: &Setup) -> Result<(VarMap, Arc<MlpDenoiser>, AdamW)> {
    let vm = VarMap::new();
    let res = MlpDenoiser::new(
        MlpConfig {
            dim: s.dim,
            hidden: cfg.policy.hidden,
            depth: cfg.policy.depth,
            time_dim: cfg.policy.time_dim,
            classes: 0,
            zero_init_output: true,
        },
        VarBuilder::from_varmap(&vm, DType::F32, &s.device),
    )?;
    let mut vars: Vec<_> = vm
        .data()
        .lock()
        .map_err(|_| anyhow!("lock"))?
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0)); // a fixed order: replicas must agree on it
    let opt = AdamW::new(
        vars,
        AdamWConfig {
            lr: cfg.vrpo.lr,
            weight_decay: cfg.vrpo.weight_decay,
            grad_clip: cfg.vrpo.grad_clip,
            ..Default::default()
        },
    )?;
    Ok((vm, Arc::new(res), opt))
}

/// What the VRPO stage reports.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct VrpoReport {
    pub steps: u64,
    pub resumed_from: u64,
    pub wall_s: f64,
    pub pairs_per_s: f64,
    pub learner_steps_per_s: f64,
    pub learner_utilisation: f64,
    pub restarts: u64,
    pub final_loss: f32,
    pub final_pair_accuracy: f32,
    pub final_checkpoint: String,
    pub stopped_early: bool,
    /// Per-stage latency percentiles, merged across actors (this invocation of the stage).
    pub latency: std::collections::BTreeMap<String, tilt_actors::telemetry::LatencySummary>,
}

/// Which roles this process runs in the VRPO stage, and how it meets the others.
pub struct Roles {
    pub rollouts: usize,
    pub critics: usize,
    pub learners: bool,
    pub replay: Arc<dyn ReplayBuffer>,
    /// A rollout -> critic channel bridged to another process (worker mode); None = in-process.
    pub channel: Option<tilt_actors::coordinator::PairChannel>,
    /// Fires when a producer-only process should stop (worker mode: the learner finished).
    pub stop: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl Roles {
    /// Every role in this process, as configured.
    pub fn all(cfg: &Config, replay: Arc<dyn ReplayBuffer>) -> Self {
        Roles {
            rollouts: cfg.rollout.actors,
            critics: cfg.critic.actors,
            learners: true,
            replay,
            channel: None,
            stop: None,
        }
    }
}

/// The replay of a run: in-process, or Redis namespaced by `run_id` (consumer name `consumer`).
/// TILT_REDIS_URL overrides `replay.url`.
pub async fn make_replay(
    cfg: &Config,
    run_id: &str,
    consumer: &str,
) -> Result<Arc<dyn ReplayBuffer>> {
    Ok(match cfg.replay.backend.as_str() {
        "redis" => {
            let url = std::env::var("TILT_REDIS_URL").unwrap_or_else(|_| cfg.replay.url.clone());
            Arc::new(
                tilt_actors::replay_redis::RedisReplay::connect(
                    &url,
                    run_id,
                    consumer,
                    cfg.replay.clone(),
                )
                .await?,
            )
        }
        _ => Arc::new(MemoryReplay::new(cfg.replay.clone())?),
    })
}

/// Stands in for the critic in processes that run no critic role.
pub struct NoCritic;

impl ValueCritic for NoCritic {
    fn value(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: Option<&Tensor>,
        _: f64,
    ) -> tilt_kernels::Result<Tensor> {
        Err(tilt_kernels::KernelError::param(
            "critic",
            "none",
            "this process runs no critic role",
        ))
    }
}

/// Stage 2: spawn the actors and run until the step budget, a signal, or a learner failure.
pub async fn stage_vrpo(
    cfg: &Config,
    s: &Setup,
    run_dir: &Path,
    progress: &Progress,
    roles: Roles,
) -> Result<VrpoReport> {
    let critic: Arc<dyn ValueCritic> = if roles.critics > 0 {
        load_critic(cfg, s, run_dir)?
    } else {
        Arc::new(NoCritic)
    };
    let control = Arc::new(RunControl::default());
    let replay = roles.replay.clone();
    let critic_file = (cfg.critic.kind == "learned").then(|| critic_files(run_dir).0);
    // Replicas: identical initial weights (the residual starts at zero output; hidden layers are
    // copied from replica 0), then the same averaged step each time.
    let mut start_step = 0;
    let mut cores = Vec::new();
    let n_learners = if roles.learners {
        cfg.learner.actors
    } else {
        0
    };
    for rank in 0..n_learners {
        let (mut vm, res, mut opt) = build_policy(cfg, s)?;
        if let Some((step, dir)) = latest_checkpoint(run_dir)? {
            let st = load_checkpoint(&dir, &mut vm, &mut opt)
                .with_context(|| format!("resuming from {}", dir.display()))?;
            start_step = st.step;
            if rank == 0 {
                eprintln!(
                    "[vrpo] resuming from checkpoint step {step} ({})",
                    dir.display()
                );
            }
        } else if rank > 0 {
            let src: &Arc<Mutex<LearnerCore>> = &cores[0];
            let c0 = src.lock().map_err(|_| anyhow!("lock"))?;
            for (name, var) in vm.data().lock().map_err(|_| anyhow!("lock"))?.iter() {
                let v0 = c0
                    .varmap
                    .data()
                    .lock()
                    .map_err(|_| anyhow!("lock"))?
                    .get(name)
                    .cloned()
                    .ok_or_else(|| anyhow!("replica var {name}"))?;
                var.set(v0.as_tensor())?;
            }
        }
        cores.push(Arc::new(Mutex::new(LearnerCore {
            varmap: vm,
            residual: res,
            opt,
            step: start_step,
        })));
    }
    control
        .learner_step
        .store(start_step, std::sync::atomic::Ordering::Relaxed);
    if roles.learners && start_step >= cfg.vrpo.steps {
        eprintln!(
            "[vrpo] already at step {start_step} >= vrpo.steps = {}: nothing to train",
            cfg.vrpo.steps
        );
        return Ok(VrpoReport {
            steps: start_step,
            resumed_from: start_step,
            ..Default::default()
        });
    }
    let spec_ck = CheckpointSpec {
        run_dir: run_dir.to_path_buf(),
        every: cfg.learner.checkpoint_every,
        at_steps: cfg.eval.at_steps.clone(),
        seed: cfg.seed,
        critic_file,
    };
    let objective: Arc<dyn tilt_actors::objective::Objective> =
        Arc::new(tilt_actors::objective::VrpoObjective {
            grid: s.grid.clone(),
            labels: cfg.vrpo.labels,
            beta: cfg.vrpo.beta,
        });
    let learners = cores
        .iter()
        .enumerate()
        .map(|(rank, core)| LearnerArgs {
            rank,
            world: cfg.learner.actors,
            core: core.clone(),
            replay: replay.clone(),
            objective: objective.clone(),
            batch: cfg.vrpo.batch,
            total_steps: cfg.vrpo.steps,
            checkpoint: spec_ck.clone(),
            control: control.clone(),
            coordinator: None,
            fail_at_step: cfg.fault.learner_fail_at_step,
        })
        .collect();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spec = RunSpec {
        seed: cfg.seed.wrapping_add(start_step.wrapping_mul(0x9E37)),
        rollouts: roles.rollouts,
        reference: s.reference.clone(),
        grid: s.grid.clone(),
        sample_shape: vec![s.dim],
        chains_per_unit: cfg.rollout.chains,
        segment_len: cfg.vrpo.segment_len,
        critics: roles.critics,
        critic,
        lambda: cfg.vrpo.lambda,
        learners,
        replay: replay.clone(),
        control: control.clone(),
        channel_capacity: cfg.rollout.channel,
        rollout_panic_after: cfg.fault.rollout_panic_after,
        critic_panic_after: cfg.fault.critic_panic_after,
        done: Arc::new(Mutex::new(Some(tx))),
        channel: roles.channel,
        distortion: None,
    };
    let roles_learners = roles.learners;
    let total = if roles.learners { cfg.vrpo.steps } else { 0 };
    let t0 = Instant::now();
    let outcome = run_actors(spec, rx, roles.stop, progress, "vrpo", start_step, total).await?;
    let wall = t0.elapsed().as_secs_f64();
    let steps_done = RunControl::get(&control.learner_step);
    let last = control.last();
    let report = VrpoReport {
        steps: steps_done,
        resumed_from: start_step,
        wall_s: wall,
        pairs_per_s: RunControl::get(&control.pairs_inserted) as f64 / wall,
        learner_steps_per_s: (steps_done - start_step) as f64 / wall,
        learner_utilisation: RunControl::get(&control.learner_busy_us) as f64 / 1e6 / wall,
        restarts: RunControl::get(&control.restarts),
        final_loss: last.loss,
        final_pair_accuracy: last.accuracy,
        final_checkpoint: String::new(),
        stopped_early: steps_done < cfg.vrpo.steps,
        latency: control.latency.summary(),
    };
    if roles_learners {
        // Loss curves: append this invocation's history to the run's (a resumed run continues it).
        let hist_file = run_dir.join("history.json");
        let mut hist: Vec<(u64, f32, f32)> = if hist_file.exists() {
            read_json(&hist_file)?
        } else {
            vec![]
        };
        hist.retain(|h| h.0 <= start_step);
        hist.extend(
            control
                .history
                .lock()
                .map(|h| h.clone())
                .unwrap_or_default(),
        );
        write_json(&hist_file, &hist)?;
    }
    match outcome {
        RunOutcome::Finished { .. } if !roles_learners => {
            eprintln!("[vrpo] producer stopped");
            Ok(report)
        }
        RunOutcome::Finished { step, checkpoint } => {
            eprintln!(
                "[vrpo] finished at step {step}; checkpoint {}",
                checkpoint.display()
            );
            Ok(VrpoReport {
                final_checkpoint: checkpoint.display().to_string(),
                ..report
            })
        }
        RunOutcome::LearnerFailed(msg) => bail!("{msg}"),
    }
}

/// Spawn the coordinator (which spawns every role) and wait for the run's outcome, forwarding
/// SIGINT/SIGTERM and an optional external stop as a graceful shutdown; progress meanwhile.
pub async fn run_actors(
    spec: RunSpec,
    mut rx: tokio::sync::oneshot::Receiver<RunOutcome>,
    mut external: Option<tokio::sync::oneshot::Receiver<()>>,
    progress: &Progress,
    stage: &'static str,
    start_step: u64,
    total: u64,
) -> Result<RunOutcome> {
    let (control, replay) = (spec.control.clone(), spec.replay.clone());
    let (coord, handle) = ractor::Actor::spawn(None, CoordinatorActor, spec)
        .await
        .map_err(|e| anyhow!("cannot start the actors: {e}"))?;
    let ticker = progress.spawn_stage(control, replay, start_step, total, stage);
    let outcome = loop {
        tokio::select! {
            r = &mut rx => break r.map_err(|_| anyhow!("the coordinator stopped without reporting an outcome"))?,
            _ = crate::signals::shutdown_signal() => {
                let _ = coord.cast(CoordinatorMsg::Shutdown("signal received".into()));
            }
            _ = async { match external.as_mut() { Some(r) => { let _ = r.await; } None => std::future::pending::<()>().await } } => {
                external = None;
                let _ = coord.cast(CoordinatorMsg::Shutdown("the run's learner has finished".into()));
            }
        }
    };
    ticker.abort();
    let _ = handle.await;
    Ok(outcome)
}

/// One evaluated policy.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalPoint {
    pub step: u64,
    pub reward_mean_policy: f64,
    pub mode_weights_policy: Vec<f64>,
    pub gap_closed: f64,
}

/// The evaluation: reference, importance-weighted target, closed form, and each evaluated policy.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct EvalReport {
    pub reward_mean_ref: f64,
    pub reward_mean_target: f64,
    pub target_ess: f64,
    pub mode_weights_ref: Vec<f64>,
    pub mode_weights_target: Vec<f64>,
    /// The closed-form tilt of the data mixture (linear reward): differs from the chain's target
    /// because the K-step chain is itself slightly off the data (DESIGN.md).
    pub reward_mean_closed_form: Option<f64>,
    pub mode_weights_closed_form: Option<Vec<f64>>,
    pub points: Vec<EvalPoint>,
}

fn rewards_f64(r: &dyn Reward, x: &Tensor) -> Result<Vec<f64>> {
    Ok(r.reward(x)?.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

/// Evaluate the reference, the target and the policy at the listed steps (and the last checkpoint).
pub fn stage_eval(cfg: &Config, s: &Setup, run_dir: &Path) -> Result<EvalReport> {
    let k = s.grid.len();
    let mut rng = rng_for(cfg.seed, 3, 0);
    let x = randn(&mut rng, (cfg.eval.target_samples, s.dim), &s.device)?;
    let x0 = sample_chain(s.reference.as_ref(), &s.grid, &x, k, 0, None, &mut rng)?;
    let r = rewards_f64(s.reward.as_ref(), &x0)?;
    let est = tilted_target(&r, cfg.vrpo.lambda);
    let mut rep = EvalReport {
        reward_mean_ref: r.iter().sum::<f64>() / r.len() as f64,
        reward_mean_target: est.mean_reward,
        target_ess: est.ess,
        mode_weights_ref: s.mixture.mode_weights(&x0, None)?,
        mode_weights_target: s.mixture.mode_weights(&x0, Some(&est.weights))?,
        ..Default::default()
    };
    if cfg.reward.kind == "linear" {
        let t = s.mixture.tilted_linear(cfg.vrpo.lambda, &cfg.reward.a)?;
        let mean: f64 = (0..t.components())
            .map(|i| {
                t.weights[i]
                    * t.means[i]
                        .iter()
                        .zip(&cfg.reward.a)
                        .map(|(m, a)| m * a)
                        .sum::<f64>()
            })
            .sum::<f64>()
            + cfg.reward.b;
        rep.reward_mean_closed_form = Some(mean);
        // Mode weights as `assign` would see exact samples of the tilted mixture.
        let (xt, _) = t.sample(
            cfg.eval.target_samples,
            &mut rng_for(cfg.seed, 3, 1),
            &s.device,
        )?;
        rep.mode_weights_closed_form = Some(s.mixture.mode_weights(&xt, None)?);
    }
    // Samples for the report's scatter: reference, target-weighted (systematic resampling), policy.
    let rows = x0.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    let take = 2000.min(rows.len());
    let xy = |r: &Vec<f64>| (r[0], r.get(1).copied().unwrap_or(0.0));
    let mut samples = PlotSamples {
        reference: rows.iter().take(take).map(xy).collect(),
        target: systematic_resample(&est.weights, take, 0.5)
            .into_iter()
            .map(|i| xy(&rows[i]))
            .collect(),
        policy: vec![],
    };
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
        let (mut vm, res, mut opt) = build_policy(cfg, s)?;
        load_checkpoint(&checkpoint_dir(run_dir, step), &mut vm, &mut opt)?;
        let policy = ResidualPolicy {
            reference: s.reference.clone(),
            residual: res,
        };
        let mut prng = rng_for(cfg.seed, 4, step);
        let xk = randn(&mut prng, (cfg.eval.samples, s.dim), &s.device)?;
        let p0 = sample_chain(&policy, &s.grid, &xk, k, 0, None, &mut prng)?;
        let rp = rewards_f64(s.reward.as_ref(), &p0)?;
        let mean = rp.iter().sum::<f64>() / rp.len() as f64;
        let denom = rep.reward_mean_target - rep.reward_mean_ref;
        let point = EvalPoint {
            step,
            reward_mean_policy: mean,
            mode_weights_policy: s.mixture.mode_weights(&p0, None)?,
            gap_closed: if denom.abs() > 1e-12 {
                (mean - rep.reward_mean_ref) / denom
            } else {
                f64::NAN
            },
        };
        eprintln!(
            "[eval] step {step}: reward {:.4} (ref {:.4}, target {:.4}), gap closed {:.3}, modes {:?} (target {:?})",
            point.reward_mean_policy,
            rep.reward_mean_ref,
            rep.reward_mean_target,
            point.gap_closed,
            round3(&point.mode_weights_policy),
            round3(&rep.mode_weights_target)
        );
        metrics::gauge!("tilt_reward_mean", "role" => "eval", "actor" => "0")
            .set(point.reward_mean_policy);
        rep.points.push(point);
        let pr = p0.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        samples.policy = pr.iter().take(take).map(xy).collect();
    }
    write_json(&run_dir.join("samples.json"), &samples)?;
    Ok(rep)
}

/// 2-D samples kept for the report (at most 2000 each).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct PlotSamples {
    pub reference: Vec<(f64, f64)>,
    pub target: Vec<(f64, f64)>,
    pub policy: Vec<(f64, f64)>,
}

/// Indices drawn by systematic resampling of normalised `weights` (offset u in [0, 1)).
pub fn systematic_resample(weights: &[f64], n: usize, u: f64) -> Vec<usize> {
    let mut out = Vec::with_capacity(n);
    let (mut acc, mut i) = (weights.first().copied().unwrap_or(0.0), 0);
    for j in 0..n {
        let t = (j as f64 + u) / n as f64;
        while acc < t && i + 1 < weights.len() {
            i += 1;
            acc += weights[i];
        }
        out.push(i);
    }
    out
}

/// Round for display.
pub fn round3(v: &[f64]) -> Vec<f64> {
    v.iter().map(|x| (x * 1000.0).round() / 1000.0).collect()
}

/// Write JSON atomically (temp file + rename): a crash never leaves a half-written report.
pub fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(v)?)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Read a JSON file with the path in the error.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let b = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_slice(&b).with_context(|| format!("{} is corrupt", path.display()))
}
