//! Worker mode: one role per process, meeting the others only through Redis and a shared run
//! directory. Rollout workers push unscored segment pairs into the `<run-id>-segments` stream;
//! critic workers (which also train the critic, stage 1, if the run directory has none) score them
//! into the `<run-id>` replay stream; the learner worker trains, evaluates, writes summary.json and
//! sets `tilt:<run-id>:done`, which stops the producers.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use tilt_actors::codec::{record_segment_pair, segment_pair_record};
use tilt_actors::replay::{ReplayBuffer, ReplayConfig, Sampler};
use tilt_actors::replay_redis::{redact, RedisReplay};

use crate::config::Config;
use crate::pipeline::{read_json, setup, stage_critic, stage_vrpo, write_json, Roles};
use crate::progress::Progress;

/// The role of a worker process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WorkerRole {
    Rollout,
    Critic,
    Learner,
}

fn redis_url(cfg: &Config) -> String {
    std::env::var("TILT_REDIS_URL").unwrap_or_else(|_| cfg.replay.url.clone())
}

/// The segments stream: each unscored pair batch delivered once, bounded by back-pressure.
fn segments_config(cfg: &Config) -> ReplayConfig {
    ReplayConfig {
        backend: "redis".into(),
        capacity: 64,
        min_size: 1,
        samples_per_insert: 0.0,
        error_buffer: 64.0,
        sampler: Sampler::Fifo,
        max_times_sampled: 0,
        seed: cfg.seed,
        url: cfg.replay.url.clone(),
    }
}

fn done_key(run_id: &str) -> String {
    format!("tilt:{run_id}:done")
}

/// Resolves once the learner has set the run's done flag (polled; producers stop on it).
fn watch_done(url: String, run_id: String) -> tokio::sync::oneshot::Receiver<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let Ok(client) = redis::Client::open(url.as_str()) else {
            return;
        };
        loop {
            if let Ok(mut c) = client.get_multiplexed_async_connection().await {
                let v: redis::RedisResult<Option<String>> = redis::cmd("GET")
                    .arg(done_key(&run_id))
                    .query_async(&mut c)
                    .await;
                if matches!(v, Ok(Some(_))) {
                    let _ = tx.send(());
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    rx
}

/// Run one role of run `run_id` in `run_dir`.
pub async fn run_worker(
    cfg: &Config,
    role: WorkerRole,
    run_id: &str,
    run_dir: &Path,
) -> Result<()> {
    if cfg.replay.backend != "redis" {
        anyhow::bail!(
            "tilt worker needs replay.backend = \"redis\" (got {:?})",
            cfg.replay.backend
        );
    }
    std::fs::create_dir_all(run_dir)
        .with_context(|| format!("cannot create run directory {}", run_dir.display()))?;
    // The first worker saves the resolved config; the others find it there.
    let cpath = run_dir.join("config.toml");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&cpath)
    {
        use std::io::Write;
        f.write_all(cfg.to_toml()?.as_bytes())?;
    }
    let name = format!("{role:?}").to_lowercase();
    let consumer = format!("{name}-{}", std::process::id());
    use std::io::IsTerminal;
    let progress = Progress {
        log: Some(run_dir.join(format!("progress-{name}.log"))),
        every: Duration::from_secs_f64(cfg.metrics.progress_every_s),
        interactive: std::io::stderr().is_terminal(),
    };
    let url = redis_url(cfg);
    progress.line(&format!(
        "tilt worker: role {name}, run {run_id}, redis {}, run directory {}",
        redact(&url),
        run_dir.display()
    ));
    if let Some(addr) = crate::telemetry::start_metrics(&cfg.metrics.listen)? {
        progress.line(&format!("tilt: metrics at http://{addr}/metrics"));
    }
    let s = setup(cfg)?;
    let seg_id = format!("{run_id}-segments");
    match role {
        WorkerRole::Rollout => {
            let segments: Arc<dyn ReplayBuffer> = Arc::new(
                RedisReplay::connect(&url, &seg_id, &consumer, segments_config(cfg)).await?,
            );
            let (tx, rx) = flume::bounded(cfg.rollout.channel.max(1));
            // Bridge: in-process channel -> segments stream.
            let seg = segments.clone();
            let producer = std::process::id();
            let bridge = tokio::spawn(async move {
                let mut seq = 0u64;
                while let Ok(unit) = rx.recv_async().await {
                    for pair in &unit {
                        let rec = segment_pair_record(pair, producer, seq)?;
                        seq += 1;
                        seg.insert(rec).await?;
                    }
                }
                Ok::<(), tilt_actors::ActorError>(())
            });
            let roles = Roles {
                rollouts: cfg.rollout.actors,
                critics: 0,
                learners: false,
                replay: segments.clone(),
                channel: Some((tx.clone(), flume::bounded(1).1)),
                stop: Some(watch_done(url.clone(), run_id.to_string())),
            };
            drop(tx);
            stage_vrpo(cfg, &s, run_dir, &progress, roles).await?;
            segments.close();
            bridge.abort();
        }
        WorkerRole::Critic => {
            if cfg.critic.kind == "learned" && !run_dir.join("critic.json").exists() {
                crate::run::off_executor(|| stage_critic(cfg, &s, run_dir))?;
            }
            let segments: Arc<dyn ReplayBuffer> = Arc::new(
                RedisReplay::connect(&url, &seg_id, &consumer, segments_config(cfg)).await?,
            );
            let replay: Arc<dyn ReplayBuffer> =
                Arc::new(RedisReplay::connect(&url, run_id, &consumer, cfg.replay.clone()).await?);
            let (tx, rx) = flume::bounded(cfg.rollout.channel.max(1));
            // Bridge: segments stream -> in-process channel (acked once handed to the critics; a
            // critic process that dies loses at most the channel's few units of i.i.d. reference
            // draws, which the rollouts keep producing).
            let seg = segments.clone();
            let btx = tx.clone();
            let bridge = tokio::spawn(async move {
                loop {
                    let recs = match seg.sample(8, Duration::from_millis(250)).await {
                        Ok(Some(r)) => r,
                        Ok(None) => continue,
                        Err(_) => return,
                    };
                    let mut unit = Vec::with_capacity(recs.len());
                    for r in &recs {
                        match record_segment_pair(r, &candle_core::Device::Cpu) {
                            Ok(p) => unit.push(p),
                            Err(e) => eprintln!("tilt worker: skipping a bad segment record: {e}"),
                        }
                    }
                    if btx.send_async(unit).await.is_err() {
                        return;
                    }
                    let keys: Vec<_> = recs.iter().map(|r| r.key()).collect();
                    if seg.ack(&keys).await.is_err() {
                        return;
                    }
                }
            });
            drop(tx);
            let roles = Roles {
                rollouts: 0,
                critics: cfg.critic.actors,
                learners: false,
                replay: replay.clone(),
                channel: Some((flume::bounded(1).0, rx)),
                stop: Some(watch_done(url.clone(), run_id.to_string())),
            };
            stage_vrpo(cfg, &s, run_dir, &progress, roles).await?;
            bridge.abort();
            segments.close();
        }
        WorkerRole::Learner => {
            let t0 = Instant::now();
            let replay: Arc<dyn ReplayBuffer> =
                Arc::new(RedisReplay::connect(&url, run_id, &consumer, cfg.replay.clone()).await?);
            let roles = Roles {
                rollouts: 0,
                critics: 0,
                learners: true,
                replay: replay.clone(),
                channel: None,
                stop: None,
            };
            let vrpo = stage_vrpo(cfg, &s, run_dir, &progress, roles).await?;
            write_json(&run_dir.join("vrpo.json"), &vrpo)?;
            let client = redis::Client::open(url.as_str())
                .map_err(|e| anyhow!("redis {}: {e}", redact(&url)))?;
            let mut c = client
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| anyhow!("redis {}: {e}", redact(&url)))?;
            let _: () = redis::cmd("SET")
                .arg(done_key(run_id))
                .arg("1")
                .arg("EX")
                .arg(3600)
                .query_async(&mut c)
                .await
                .map_err(|e| anyhow!("redis {}: {e}", redact(&url)))?;
            if vrpo.stopped_early {
                progress.line("tilt worker: the learner stopped early; resume with `tilt worker --role learner` again");
                return Ok(());
            }
            let critic = read_json(&run_dir.join("critic.json")).ok();
            crate::run::off_executor(|| {
                crate::run::finish(cfg, &s, run_dir, critic, &vrpo, t0, &progress)
            })?;
            println!("{}", run_dir.join("summary.json").display());
        }
    }
    Ok(())
}
