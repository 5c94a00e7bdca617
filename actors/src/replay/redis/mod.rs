//! The Redis backend of [`ReplayBuffer`]: one Redis Stream per run, read through a consumer group,
//! so roles in separate processes or machines meet through Redis. Capacity is back-pressure (never
//! trimming), the rate limiter's counters live in Redis, redeliveries are filtered by key. Also
//! the run flags of worker mode ([`mark_run_done`], [`watch_run_done`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redis::aio::ConnectionManager;
use redis::{AsyncConnectionConfig, RedisError};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::accounting::Census;
use crate::replay::limiter::{LuaBounds, RateLimiter};
use crate::replay::{Record, ReplayBackend, ReplayBuffer, ReplayConfig, ReplayStats};
use crate::{ActorError, Result};

/// Unwrap a step that returns None when the caller's deadline passed.
macro_rules! step {
    ($e:expr) => {
        match $e? {
            Some(v) => v,
            None => return Ok(None),
        }
    };
}

mod census;
mod conn;
mod flags;
mod local;
mod ops;
mod parse;
mod read;
mod scripts;
mod url;

pub use flags::{
    count_actor_restarts, done_key, mark_run_done, register_start, restarts_key, run_restarts,
    starts_key, watch_run_done, RunRestarts, WorkerStart, ALL_STARTS, DONE_POLL, DONE_TTL,
};
pub use url::{redact, RedisTarget, RedisTls};

use conn::{
    background, manager_config, OnClose, Wait, BLOCKING_TIMEOUT, COMMAND_TIMEOUT, CONNECT_TIMEOUT,
};
use local::{Local, RecentKeys};
use scripts::Scripts;
use url::scrub;

/// Consumer group every learner of a run reads through.
const GROUP: &str = "learners";
/// The one field of a stream entry: the record's [`Record::encode`] bytes.
const FIELD: &str = "r";

/// Timing of the Redis backend's failure handling (not part of `[replay]`).
#[derive(Debug, Clone, PartialEq)]
pub struct RedisOptions {
    /// A pending entry idle longer than this is taken over (XAUTOCLAIM) from its consumer, which
    /// is presumed dead; live consumers refresh the entries they hold every third of it. Every
    /// process of a run must use the same value.
    pub claim_idle: Duration,
    /// How long Redis may stay unreachable before an operation fails instead of retrying.
    pub max_outage: Duration,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            claim_idle: Duration::from_secs(30),
            max_outage: Duration::from_secs(60),
        }
    }
}

/// The Redis backend of [`ReplayBuffer`], for runs whose roles live in separate processes.
///
/// **Keys.** Everything of a run lives under `tilt:{RUN}:` (the braces make it one Redis Cluster
/// hash slot, so scripts may touch all of it): `replay` (the stream; one field `r` = the record's
/// [`Record::encode`] bytes), `inserts` / `samples` (limiter counters), `evicted` (entries
/// retired), `dropped` (a set of lost entry ids) and `dropped_by` (their count by reason), `uses`
/// (hand-outs per pending entry), `last` (each producer's last inserted seq), `produced` (each
/// producer stream's high-water mark, for exact accounting), `reserved` (batch inserts admitted
/// and not yet committed) and short-lived `nonce:*` keys. Learners read through the
/// group `learners`, created at id 0 with MKSTREAM (so records inserted before any learner
/// connected are delivered), and recreated the same way if Redis loses it.
///
/// **Capacity.** No MAXLEN trimming (on Redis 7 it deletes pending entries). An insert waits
/// (polling, 2 to 50 ms) while the stream holds `capacity` entries; learners' [`ack`] retires
/// entries (XACK + XDEL in one script), so `XLEN` is the backlog. A record is dropped only if
/// its entry is deleted by something else while pending, or cannot be decoded: those entry ids
/// go to the `dropped` set and [`ReplayStats::dropped`]. A batch ([`insert_many`]) takes two
/// round trips and never passes payloads through Lua: an admission script reserves room for a
/// prefix of it (records of batches admitted and not yet committed count as in the stream and
/// as inserted), then one MULTI/EXEC carries the plain XADDs and a commit script that counts
/// them and releases the reservation, so entries and counters appear together. A reservation
/// whose producer dies before committing expires after [`RedisOptions::claim_idle`].
///
/// **Uses and the rate limiter.** A stream hands each entry to one consumer. The consumer keeps
/// the records delivered to it in a local window and hands each out exactly `U` times, then,
/// once the learner has acknowledged it, retires it. `U = samples_per_insert` (which must then be
/// a whole number; `max_times_sampled` must be 0 or equal to it), or `max(1, max_times_sampled)`
/// when the ratio limiter is off. With `U` fixed, sampled = `U` x retired + uses spent on held
/// records, so the limiter's budget equals the uses left in the stream: a fractional ratio, or
/// `U` below or above it, would let inserts (blocked by capacity) and samples (blocked by the
/// ratio) wait for each other forever. The limiter is the memory backend's [`RateLimiter`] on
/// run-wide counters, checked and updated atomically in Lua by its transcription
/// ([`limiter::LUA`](crate::replay::limiter::LUA), on the bounds it computes): an insert passes
/// iff the stream is not full and `(inserts + 1) * spi - samples <= max_diff`; a sample of `m`
/// hand-outs iff `inserts >= min_size` and `inserts * spi - (samples + m) >= min_diff`. The uses spent per
/// entry are counted in Redis too, so a record taken over from a dead consumer resumes with the
/// uses it has left (and one uncounted use if it had none: at-least-once). Besides the memory
/// backend's `n + spi <= 2 * error_buffer`, a call needs `n + min_diff <= capacity`, else a full
/// stream could hold fewer uses than the call waits for.
///
/// **Delivery and idempotence.** Reads go, in this order: this consumer's own pending entries
/// (`XREADGROUP ... 0`, at start and after any read whose reply may have been lost), entries
/// idle longer than [`RedisOptions::claim_idle`] taken from other consumers (XAUTOCLAIM, every
/// half of it), then new entries (`>`, blocking on a dedicated connection). A background task
/// refreshes the idle time of entries this consumer holds (only those it still owns) every third
/// of `claim_idle`, so a slow learner's records are not taken from it. Idempotence by
/// `(producer, seq)` is enforced in exactly these places:
/// 1. [`ack`] marks a retired key as applied locally *before* sending XACK + XDEL, so a failed
///    or lost acknowledgement cannot make this consumer hand the record out again;
/// 2. every delivery (own pending, claimed, new) passes `Local::admit`, which never hands out a
///    key that is marked applied or already held, and retires that entry instead;
/// 3. an insert that repeats its producer's last inserted key is a no-op (the retry of an insert
///    whose reply was lost), so one record does not become two entries;
/// 4. the scripts are safe to repeat (XACK/XDEL/HDEL/SADD are idempotent; a sample reservation
///    carries a nonce); a batch's commit leaves a done mark, which a retry after a lost reply
///    looks for before sending the batch's XADDs again.
///
/// Once XACK + XDEL have run, Redis can never deliver that entry again, so the applied memory
/// only needs to cover entries whose retirement is not yet confirmed and duplicates of recent
/// keys: it keeps the last `max(2 * capacity, 4096)` keys. (A per-producer watermark would not
/// stay small: with several consumers each sees an interleaved subset of a producer's seqs, and
/// producers restart at a new seq range.) What remains at least once: a learner that applies a
/// record and dies before [`ack`] reaches Redis; its records are redelivered after `claim_idle`.
/// The learner must [`ack`] every record it applied, or the stream fills and producers stall.
///
/// **Failures.** Two `ConnectionManager`s (commands, and blocking reads with a response timeout
/// above the BLOCK time) reconnect with exponential back-off (3 tries, 50 ms to 1 s, jittered);
/// around them every operation retries transient errors (I/O, LOADING, TRYAGAIN) with back-off
/// for up to [`RedisOptions::max_outage`], then fails naming the address. A sample still returns
/// by its timeout (Ok(None)) while Redis refuses connections. Redis must persist (AOF) for a
/// restart to keep the stream; without persistence a restart loses every record in it. An outage
/// longer than `claim_idle` stops heartbeats, so held records may then be claimed by another
/// learner (at least once again). The URL's password never appears in errors (see [`redact`]).
///
/// **Stats** are run-wide (all processes): inserted, sampled (counted hand-outs), evicted
/// (entries retired after use), depth (XLEN), dropped. [`ReplayBuffer::stats`] returns the values
/// last seen (refreshed every second and by each operation); [`RedisReplay::fetch_stats`] reads
/// them now.
///
/// [`ack`]: ReplayBuffer::ack
/// [`insert_many`]: ReplayBuffer::insert_many
pub struct RedisReplay {
    inner: Arc<Inner>,
    task: JoinHandle<()>,
}

struct Keys {
    stream: String,
    inserts: String,
    samples: String,
    evicted: String,
    dropped: String,
    uses: String,
    last: String,
    /// Accounting: each producer stream's high-water mark (`<producer>:<generation>` -> count).
    produced: String,
    /// Accounting: dropped entries by reason.
    dropped_by: String,
    /// Batch inserts admitted and not yet committed (nonce -> `records:expiry_ms`).
    reserved: String,
    /// Prefix of this consumer's nonce keys (unique per connection).
    nonce: String,
    /// SCAN pattern matching every key of the run.
    pattern: String,
}

impl Keys {
    fn new(run_id: &str, consumer: &str, salt: u64) -> Self {
        let p = format!("tilt:{{{run_id}}}:");
        Self {
            stream: format!("{p}replay"),
            inserts: format!("{p}inserts"),
            samples: format!("{p}samples"),
            evicted: format!("{p}evicted"),
            dropped: format!("{p}dropped"),
            uses: format!("{p}uses"),
            last: format!("{p}last"),
            produced: format!("{p}produced"),
            dropped_by: format!("{p}dropped_by"),
            reserved: format!("{p}reserved"),
            nonce: format!("{p}nonce:{consumer}:{salt:016x}:"),
            pattern: format!("{p}*"),
        }
    }
}

struct Inner {
    cfg: ReplayConfig,
    opts: RedisOptions,
    /// Hand-outs per record (see the type's docs).
    uses: u32,
    /// The rate limiter (its decisions run in Lua, on `bounds`; see `limiter::LUA`).
    limiter: RateLimiter,
    bounds: LuaBounds,
    /// `host:port` (or socket path) for messages; never the password.
    addr: String,
    /// Strings to scrub from error texts (the password, raw and decoded).
    secrets: Vec<String>,
    consumer: String,
    keys: Keys,
    cmd: ConnectionManager,
    blocking: ConnectionManager,
    scripts: Scripts,
    local: Mutex<Local>,
    /// One sampler at a time: it owns the blocking connection and plans against the window.
    sample_lock: tokio::sync::Mutex<()>,
    /// One flush at a time, so an `ack` returns only after every earlier retirement is done.
    flush_lock: tokio::sync::Mutex<()>,
    closed: watch::Sender<bool>,
    /// Start of the current outage, if Redis is unreachable.
    down_since: Mutex<Option<Instant>>,
    nonce_counter: AtomicU64,
    cache: Mutex<ReplayStats>,
}

/// The backend's checks on `[replay]`, on top of [`ReplayConfig::validate`]; returns `U`, the
/// hand-outs per record.
fn uses_per_record(cfg: &ReplayConfig) -> std::result::Result<u32, String> {
    cfg.validate()?;
    if cfg.backend != ReplayBackend::Redis {
        return Err(format!(
            "replay.backend = {:?}: RedisReplay serves only \"redis\"",
            cfg.backend
        ));
    }
    let spi = cfg.samples_per_insert;
    if spi == 0.0 {
        return Ok(cfg.max_times_sampled.max(1));
    }
    if spi < 1.0 || spi.fract() != 0.0 || spi > f64::from(u32::MAX) {
        return Err(format!(
            "replay.samples_per_insert = {spi}: the redis backend needs 0 or a whole number >= 1 \
             (each record is handed out exactly that many times)"
        ));
    }
    let uses = spi as u32;
    if cfg.max_times_sampled != 0 && cfg.max_times_sampled != uses {
        return Err(format!(
            "replay.max_times_sampled = {}: the redis backend needs 0 or \
             replay.samples_per_insert = {uses}",
            cfg.max_times_sampled
        ));
    }
    Ok(uses)
}

/// Run ids and consumer names go into keys and SCAN patterns: no blanks, braces or glob signs.
fn check_name(what: &str, name: &str) -> Result<()> {
    let bad = |c: char| c.is_whitespace() || "{}*?[]\\".contains(c);
    if name.is_empty() || name.len() > 200 || name.chars().any(bad) {
        return Err(ActorError::Replay(format!(
            "redis {what} {name:?}: must be 1 to 200 characters without blanks, braces, \
             '*', '?', '[', ']' or '\\'"
        )));
    }
    Ok(())
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl RedisReplay {
    /// Connect to the Redis `redis` (a URL, `redis://[[user]:password@]host:port[/db]`, or
    /// `rediss://...` for TLS, or a [`RedisTarget`] with TLS files) for run `run_id`, reading as
    /// `consumer` (unique per learner process), with default [`RedisOptions`]. A Redis that
    /// cannot be reached gives one error naming its address (never the password).
    pub async fn connect(
        redis: impl Into<RedisTarget>,
        run_id: &str,
        consumer: &str,
        cfg: ReplayConfig,
    ) -> Result<Self> {
        Self::connect_with(redis, run_id, consumer, cfg, RedisOptions::default()).await
    }

    /// [`RedisReplay::connect`] with explicit failure-handling options.
    pub async fn connect_with(
        redis: impl Into<RedisTarget>,
        run_id: &str,
        consumer: &str,
        cfg: ReplayConfig,
        opts: RedisOptions,
    ) -> Result<Self> {
        let uses = uses_per_record(&cfg).map_err(ActorError::Replay)?;
        check_name("run id", run_id)?;
        check_name("consumer", consumer)?;
        if opts.claim_idle < Duration::from_millis(3) {
            return Err(ActorError::Replay(format!(
                "redis claim_idle = {:?}: must be at least 3 ms",
                opts.claim_idle
            )));
        }
        let redis: RedisTarget = redis.into();
        let secrets = redis.secrets();
        let client = redis
            .client()
            .map_err(|e| ActorError::Replay(format!("replay {e}")))?;
        let addr = client.get_connection_info().addr().to_string();
        let connect_err = |e: RedisError| {
            ActorError::Replay(format!(
                "redis at {addr}: cannot connect: {}{}",
                scrub(e.to_string(), &secrets),
                redis.connect_hint(&e)
            ))
        };
        // One direct attempt first: a Redis that is down gives one clear error now, instead of
        // the connection manager's retries.
        let probe_cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(CONNECT_TIMEOUT));
        let mut probe = client
            .get_multiplexed_async_connection_with_config(&probe_cfg)
            .await
            .map_err(connect_err)?;
        redis::cmd("PING")
            .query_async::<String>(&mut probe)
            .await
            .map_err(connect_err)?;
        drop(probe);
        let cmd =
            ConnectionManager::new_with_config(client.clone(), manager_config(COMMAND_TIMEOUT))
                .await
                .map_err(connect_err)?;
        let blocking = ConnectionManager::new_with_config(client, manager_config(BLOCKING_TIMEOUT))
            .await
            .map_err(connect_err)?;

        // An identity, not data: two incarnations of one consumer name (a restarted worker) must
        // not share reservation nonces, so this draw is deliberately not from the run's seed.
        #[allow(clippy::disallowed_methods)]
        let salt: u64 = rand::rng().random();
        let limiter = RateLimiter::new(&cfg);
        let local = Local {
            slots: BTreeMap::new(),
            by_key: HashMap::new(),
            applied: RecentKeys::new(cfg.capacity.saturating_mul(2).max(4096)),
            retire: Vec::new(),
            drop: Vec::new(),
            reread_own: true,
            counts: Default::default(),
            last_claim: None,
            rng: StdRng::seed_from_u64(cfg.seed ^ fnv1a(consumer)),
        };
        let inner = Arc::new(Inner {
            uses,
            limiter,
            bounds: limiter.lua_bounds(),
            cfg,
            opts,
            addr,
            secrets,
            consumer: consumer.to_owned(),
            keys: Keys::new(run_id, consumer, salt),
            cmd,
            blocking,
            scripts: Scripts::new(),
            local: Mutex::new(local),
            sample_lock: tokio::sync::Mutex::new(()),
            flush_lock: tokio::sync::Mutex::new(()),
            closed: watch::Sender::new(false),
            down_since: Mutex::new(None),
            nonce_counter: AtomicU64::new(0),
            cache: Mutex::new(ReplayStats::default()),
        });
        inner
            .create_group()
            .await
            .map_err(|e| inner.fail("create consumer group", &e))?;
        inner.stats_query().await.ok();
        let task = tokio::spawn(background(Arc::downgrade(&inner)));
        Ok(Self { inner, task })
    }

    /// The run-wide counters, read from Redis now.
    pub async fn fetch_stats(&self) -> Result<ReplayStats> {
        let wait = Wait {
            deadline: None,
            on_close: OnClose::Ignore,
        };
        step_none(
            self.inner
                .call("stats", wait, || self.inner.stats_query())
                .await,
        )?;
        Ok(self.inner.cached())
    }

    /// Delete every key of this run (the stream, counters, marks): for tests and cleaning up a
    /// finished run. Returns how many keys were deleted.
    pub async fn purge(&self) -> Result<u64> {
        let mut c = self.inner.cmd.clone();
        let mut cursor = 0u64;
        let mut deleted = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&self.inner.keys.pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut c)
                .await
                .map_err(|e| self.inner.fail("purge", &e))?;
            if !keys.is_empty() {
                let n: u64 = redis::cmd("DEL")
                    .arg(&keys)
                    .query_async(&mut c)
                    .await
                    .map_err(|e| self.inner.fail("purge", &e))?;
                deleted += n;
            }
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    }

    /// This instance's consumer name in the group.
    pub fn consumer(&self) -> &str {
        &self.inner.consumer
    }
}

/// `Ok(None)` (a deadline) cannot happen without a deadline; treat it as closed to stay total.
fn step_none<T>(r: Result<Option<T>>) -> Result<T> {
    r?.ok_or(ActorError::Closed)
}

impl Drop for RedisReplay {
    fn drop(&mut self) {
        // The heartbeat stops with its owner, so a dropped consumer's entries become claimable.
        self.task.abort();
    }
}

#[async_trait::async_trait]
impl ReplayBuffer for RedisReplay {
    async fn purge(&self) -> Result<()> {
        RedisReplay::purge(self).await.map(|_| ())
    }

    async fn insert(&self, rec: Record) -> Result<()> {
        self.inner.insert(&rec).await
    }

    async fn insert_many(&self, records: Vec<Record>) -> Result<()> {
        self.inner.insert_many(&records).await
    }

    async fn sample(&self, n: usize, timeout: Duration) -> Result<Option<Vec<Record>>> {
        self.inner.sample(n, timeout).await
    }

    async fn ack(&self, keys: &[(u32, u64)]) -> Result<()> {
        self.inner.ack(keys).await
    }

    fn stats(&self) -> ReplayStats {
        let mut s = self.inner.cached();
        if let Ok(l) = self.inner.local() {
            s.redelivered = l.counts.redelivered;
            s.deduplicated = l.counts.deduplicated;
        }
        s
    }

    fn uses_per_record(&self) -> Option<u32> {
        Some(self.inner.uses)
    }

    async fn census(&self) -> Result<Census> {
        self.inner.census().await
    }

    fn close(&self) {
        self.inner.closed.send_replace(true);
    }
}

#[cfg(test)]
mod tests;
