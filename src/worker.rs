//! Worker mode: one role per process, meeting the others only through Redis and a shared run
//! directory. This module does what every algorithm's workers share (the process's registration
//! in the run, its producers' identity, the run's restarts); the roles themselves are the
//! algorithm's (`Algorithm::worker`).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use async_trait::async_trait;
use ractor::{ActorCell, SpawnErr};
use tilt_actors::replay::redis::{
    count_actor_restarts, register_start, run_restarts, RedisTarget, RunRestarts, WorkerStart,
};
use tilt_actors::replay::{Record, ReplayBackend, ReplayBuffer, ReplayStats};
use tilt_actors::source::{PairSource, SourceContext};

use crate::algo::{for_kind, RunCtx, WorkerRole};
use crate::config::Config;
use crate::run::open_progress;

/// Producer ids of one process start: `ordinal << PRODUCER_BITS | actor id`.
const PRODUCER_BITS: u32 = 16;

/// A worker process's place in its run, registered in Redis when it starts.
#[derive(Debug, Clone)]
pub struct WorkerCtx {
    pub run_id: String,
    /// `<role>-<id>`: a start under a name that started before is a restart.
    pub name: String,
    /// The run's Redis (TILT_REDIS_URL or `replay.url`, and its TLS files).
    pub url: RedisTarget,
    pub start: WorkerStart,
}

impl WorkerCtx {
    /// This process's consumer name in the run's Redis streams: `<role>-<id>`, the same for every
    /// start of that worker. A restarted learner (or critic) thereby reads back the entries its
    /// killed predecessor held (own pending entries, read at start) at once, with the uses they
    /// have left, instead of leaving them to a claim after `claim_idle` (30 s): until then they
    /// would hold the rate limiter's budget, so producers are throttled to the learner's pace and
    /// every batch is a few records repeated (measured in `tests/worker_faults.rs`: the kill test
    /// ended at mode-weight errors of 0.06-0.07 with a per-process name). Ids must therefore be
    /// unique among live workers of a role, which `--id` already means.
    pub fn consumer(&self) -> &str {
        &self.name
    }

    /// Producer ids of this process: its own range, so records of a restarted (or a second)
    /// producer process never carry the keys of another one (the learner would drop them as
    /// already applied).
    pub fn producer_base(&self) -> u32 {
        // Checked at registration: ordinal < 2^16.
        (self.start.ordinal as u32) << PRODUCER_BITS
    }

    /// The producers' seed in this process: the first process start keeps the run's seed; any
    /// later start (a restart, or another worker) draws fresh randomness instead of repeating
    /// the pairs a killed process already made.
    pub fn producer_seed(&self, seed: u64) -> u64 {
        seed.wrapping_add(self.start.ordinal.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    /// Restarts of the whole run so far (every worker process and the actors inside them).
    pub async fn run_restarts(&self) -> Result<RunRestarts> {
        Ok(run_restarts(&self.url, &self.run_id).await?)
    }

    /// This process's producer sources: fresh randomness and producer ids for this process
    /// start, and each actor restart counted in the run's Redis.
    pub fn sources(&self, sources: Vec<Arc<dyn PairSource>>) -> Vec<Arc<dyn PairSource>> {
        sources
            .into_iter()
            .map(|inner| {
                Arc::new(ProcessSource {
                    inner,
                    worker: self.clone(),
                }) as Arc<dyn PairSource>
            })
            .collect()
    }
}

/// Run one role of run `run_id` in `run_dir`: the process-level part every algorithm shares
/// (Redis backend required, run directory, resolved config, progress log, metrics endpoint,
/// registration of this start), then the algorithm's own roles.
pub async fn run_worker(
    cfg: &Config,
    role: WorkerRole,
    id: &str,
    run_id: &str,
    run_dir: &Path,
) -> Result<()> {
    if cfg.replay.backend != ReplayBackend::Redis {
        bail!(
            "tilt worker needs replay.backend = \"redis\" (got {:?})",
            cfg.replay.backend
        );
    }
    crate::build::check_devices(cfg)?;
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
    let role_name = role.name();
    let name = format!("{role_name}-{id}");
    let url = cfg.redis_target();
    let start = register_start(&url, run_id, &name).await?;
    if start.ordinal >= 1 << (32 - PRODUCER_BITS) {
        bail!(
            "run {run_id} has had {} process starts: producer ids would repeat; use a new --run-id",
            start.ordinal
        );
    }
    let first = format!(
        "tilt worker: role {role_name}, id {id} ({}), run {run_id}, redis {}, run directory {}",
        if start.previous == 0 {
            "first start".to_owned()
        } else {
            format!("restart {}", start.previous)
        },
        url.redacted(),
        run_dir.display()
    );
    let progress = open_progress(cfg, run_dir, &format!("progress-{role_name}.log"), &first)?;
    crate::telemetry::process_started(role_name, &name, start.previous);
    let worker = WorkerCtx {
        run_id: run_id.to_owned(),
        name,
        url,
        start,
    };
    let run = RunCtx {
        cfg,
        run_dir,
        progress: &progress,
        worker: Some(&worker),
    };
    for_kind(cfg.algorithm).worker(&run, role, run_id).await
}

/// A producer source of a worker process (see [`WorkerCtx::sources`]).
struct ProcessSource {
    inner: Arc<dyn PairSource>,
    worker: WorkerCtx,
}

#[async_trait]
impl PairSource for ProcessSource {
    fn role(&self) -> &'static str {
        self.inner.role()
    }

    fn actors(&self) -> usize {
        self.inner.actors()
    }

    async fn spawn(
        &self,
        id: u32,
        generation: u64,
        ctx: &SourceContext,
        supervisor: ActorCell,
    ) -> std::result::Result<ActorCell, SpawnErr> {
        if generation > 0 {
            // The coordinator restarts a failed actor: count it where the learner reads the
            // run's restarts. A failure to count is said, not fatal.
            let (url, run, role) = (
                self.worker.url.clone(),
                self.worker.run_id.clone(),
                self.inner.role(),
            );
            tokio::spawn(async move {
                if let Err(e) = count_actor_restarts(&url, &run, role, 1).await {
                    eprintln!("tilt worker: a {role} restart is not counted in the summary: {e}");
                }
            });
        }
        let ctx = SourceContext {
            seed: self.worker.producer_seed(ctx.seed),
            replay: Arc::new(ProducerIds {
                inner: ctx.replay.clone(),
                base: self.worker.producer_base(),
            }),
            control: ctx.control.clone(),
        };
        self.inner.spawn(id, generation, &ctx, supervisor).await
    }
}

/// A replay whose inserted records carry this process's producer ids (`base | actor id`).
struct ProducerIds {
    inner: Arc<dyn ReplayBuffer>,
    base: u32,
}

impl ProducerIds {
    fn rekey(&self, mut rec: Record) -> Record {
        rec.producer |= self.base;
        rec
    }
}

#[async_trait]
impl ReplayBuffer for ProducerIds {
    async fn insert(&self, rec: Record) -> tilt_actors::Result<()> {
        self.inner.insert(self.rekey(rec)).await
    }

    async fn insert_many(&self, records: Vec<Record>) -> tilt_actors::Result<()> {
        let records = records.into_iter().map(|r| self.rekey(r)).collect();
        self.inner.insert_many(records).await
    }

    async fn sample(
        &self,
        n: usize,
        timeout: Duration,
    ) -> tilt_actors::Result<Option<Vec<Record>>> {
        self.inner.sample(n, timeout).await
    }

    async fn ack(&self, keys: &[(u32, u64)]) -> tilt_actors::Result<()> {
        self.inner.ack(keys).await
    }

    fn stats(&self) -> ReplayStats {
        self.inner.stats()
    }

    fn close(&self) {
        self.inner.close();
    }

    async fn purge(&self) -> tilt_actors::Result<()> {
        self.inner.purge().await
    }
}
