//! The replay buffer between producers (critic, distortion actors) and learners: the
//! `ReplayBuffer` seam, its counters and its `[replay]` config. Backends live in submodules
//! (`memory` in-process, `redis` across processes), the record format in `record`, and the rate
//! limiter both backends apply in `limiter`.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::accounting::Census;
use crate::Result;

pub mod limiter;
pub mod memory;
pub mod record;
pub mod redis;
#[cfg(test)]
pub(crate) mod testutil;

pub use limiter::RateLimiter;
pub use memory::MemoryReplay;
pub use record::{payload_to_tensors, tensors_to_payload, Record};

/// A replay buffer: producers insert [`Record`]s, learners sample them. Backends: `memory`
/// ([`MemoryReplay`]) and `redis`. Callers share one as `Arc<dyn ReplayBuffer>`.
#[async_trait::async_trait]
pub trait ReplayBuffer: Send + Sync {
    /// Insert one record; waits (back-pressure) while the rate limiter forbids inserts;
    /// Err(Closed) once closed.
    async fn insert(&self, rec: Record) -> Result<()>;

    /// Insert `records` in order, with the semantics of calling [`insert`](Self::insert) on each:
    /// waits while the rate limiter or capacity forbids inserts (a prefix may go in, then the call
    /// waits and continues); Err(Closed) once closed (the records before that point stay
    /// inserted). The redis backend admits a batch with one script call (one round trip when
    /// nothing has to wait); this default inserts one by one.
    async fn insert_many(&self, records: Vec<Record>) -> Result<()> {
        for rec in records {
            self.insert(rec).await?;
        }
        Ok(())
    }

    /// Sample `n` records; waits until allowed (min fill, rate limiter) or until `timeout` passes
    /// (then Ok(None)); Err(Closed) once closed and nothing can ever be sampled.
    ///
    /// A call returns between 1 and `n` records: fewer than `n` only when fewer are available
    /// (a FIFO sampler with fewer than `n` records present, or records near `max_times_sampled`),
    /// as a Redis `XREADGROUP COUNT n` does; this lets a learner drain the tail after close.
    async fn sample(&self, n: usize, timeout: Duration) -> Result<Option<Vec<Record>>>;

    /// Acknowledge records applied by the learner (no-op for memory; the redis backend XACKs).
    async fn ack(&self, keys: &[(u32, u64)]) -> Result<()>;

    /// Counters for metrics and reports.
    fn stats(&self) -> ReplayStats;

    /// Uses a record gets before it leaves the buffer (`max_times_sampled`, or the redis
    /// backend's `U`); None = unlimited (sampling with replacement). A learner refuses a record
    /// beyond it as a duplicate.
    fn uses_per_record(&self) -> Option<u32> {
        None
    }

    /// What this buffer knows for exact accounting: records handed to it per producer stream,
    /// inserted, present now, dropped (by reason), redelivered and deduplicated (see
    /// [`crate::accounting`]). The redis backend reads the run-wide part from Redis.
    async fn census(&self) -> Result<Census> {
        Ok(Census::default())
    }

    /// Close: wake every waiter; later inserts fail with Closed.
    fn close(&self);
    /// Remove everything this buffer stored outside the process (Redis keys of the run); a no-op
    /// for the in-process backend.
    async fn purge(&self) -> Result<()> {
        Ok(())
    }
}

/// Counters of a replay buffer.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ReplayStats {
    /// Records inserted since the start.
    pub inserted: u64,
    /// Records handed out by `sample` (a record handed out twice counts twice).
    pub sampled: u64,
    /// Records removed: by the capacity remover or after `max_times_sampled` samples.
    pub evicted: u64,
    /// Records present now.
    pub depth: u64,
    /// Records lost: removed by the capacity remover before being sampled even once
    /// (a subset of `evicted`).
    pub dropped: u64,
    /// Deliveries of records delivered before (redis: own pending entries read again, entries
    /// claimed from a dead consumer; this consumer's count).
    pub redelivered: u64,
    /// Deliveries thrown away by the key filter (redis: a key applied or held already; this
    /// consumer's count).
    pub deduplicated: u64,
}

/// How records are picked by `sample`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sampler {
    /// Uniformly at random among present records, with replacement.
    #[default]
    Uniform,
    /// The oldest present records first, without replacement within one call.
    Fifo,
}

/// Which replay backend a run uses (`replay.backend`); an unknown name is a parse error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplayBackend {
    /// In-process, bounded (the default).
    Memory,
    /// Redis Streams, for multi-process and multi-machine runs.
    Redis,
}

/// `[replay]`: where records wait between producers and learners.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplayConfig {
    /// Backend: "memory" (in-process, the default) or "redis" (Redis Streams, for multi-process
    /// runs).
    pub backend: ReplayBackend,
    /// Most records held at once; when full the oldest is evicted.
    pub capacity: usize,
    /// Records that must have been inserted before the first sample.
    pub min_size: usize,
    /// Target records sampled per record inserted (Reverb's SampleToInsertRatio); 0 turns the
    /// ratio limiter off.
    pub samples_per_insert: f64,
    /// Slack of the ratio limiter, in sampled records: how far inserts and samples may drift from
    /// the target ratio before one side waits for the other.
    pub error_buffer: f64,
    /// How records are picked: "uniform" (with replacement) or "fifo" (oldest first).
    pub sampler: Sampler,
    /// Remove a record once it has been sampled this many times; 0 = unlimited.
    pub max_times_sampled: u32,
    /// Seed of the uniform sampler's random generator. tilt derives it from the run's `seed`
    /// (this value selects the stream: vary it to change the sampling alone).
    pub seed: u64,
    /// Redis URL for `backend = "redis"` (`redis://[:password@]host:port/db`). The environment
    /// variable TILT_REDIS_URL overrides it; the password never appears in logs or saved configs.
    pub url: String,
    /// For a `rediss://` URL: the CA certificate (PEM) that signed the Redis server's
    /// certificate, e.g. a private CA's; unset: the system's trusted roots. TILT_REDIS_CA
    /// overrides it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
    /// For mutual TLS: this client's certificate (PEM), with `tls_key`. TILT_REDIS_CERT
    /// overrides it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// For mutual TLS: the private key (PEM) of `tls_cert`. Its content never appears in
    /// messages; errors name the key, not the file. TILT_REDIS_KEY overrides it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        Self {
            backend: ReplayBackend::Memory,
            capacity: 65536,
            min_size: 1024,
            samples_per_insert: 4.0,
            error_buffer: 4096.0,
            sampler: Sampler::Uniform,
            max_times_sampled: 0,
            seed: 0,
            url: "redis://127.0.0.1:6379/".to_owned(),
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
        }
    }
}

impl ReplayConfig {
    /// Check the values; the message names the offending key.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.capacity == 0 {
            return Err("replay.capacity = 0: must be positive".to_owned());
        }
        if self.min_size > self.capacity {
            return Err(format!(
                "replay.min_size = {}: must be <= replay.capacity = {}",
                self.min_size, self.capacity
            ));
        }
        let spi = self.samples_per_insert;
        if !spi.is_finite() || spi < 0.0 {
            return Err(format!(
                "replay.samples_per_insert = {spi}: must be finite and >= 0"
            ));
        }
        let eb = self.error_buffer;
        if !eb.is_finite() || eb < 0.0 {
            return Err(format!(
                "replay.error_buffer = {eb}: must be finite and >= 0"
            ));
        }
        if spi > 0.0 && eb < spi.max(1.0) {
            // Reverb's own check: a smaller buffer lets inserts and samples block each other.
            return Err(format!(
                "replay.error_buffer = {eb}: must be >= max(1, replay.samples_per_insert) = {}",
                spi.max(1.0)
            ));
        }
        if self.max_times_sampled > 0 && spi > f64::from(self.max_times_sampled) {
            // Samples could never keep up with inserts, so the limiter would stop inserts for good.
            return Err(format!(
                "replay.samples_per_insert = {spi}: must be <= replay.max_times_sampled = {} \
                 (a record cannot be sampled more often than that)",
                self.max_times_sampled
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ActorError;

    type TestResult = std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;

    #[test]
    fn config_defaults_parse_and_validate() -> TestResult {
        // Defaults as documented on ReplayConfig.
        let d = ReplayConfig::default();
        assert_eq!(d.validate(), Ok(()));
        assert_eq!(
            (d.capacity, d.min_size, d.sampler),
            (65536, 1024, Sampler::Uniform)
        );
        let parsed: ReplayConfig =
            serde_json::from_str(r#"{"capacity": 8, "min_size": 2, "sampler": "fifo"}"#)?;
        assert_eq!(
            parsed,
            ReplayConfig {
                capacity: 8,
                min_size: 2,
                sampler: Sampler::Fifo,
                ..ReplayConfig::default()
            }
        );
        assert!(serde_json::from_str::<ReplayConfig>(r#"{"capcity": 8}"#).is_err());
        assert!(serde_json::from_str::<ReplayConfig>(r#"{"sampler": "lifo"}"#).is_err());
        Ok(())
    }

    #[test]
    fn validate_names_the_key() {
        let d = ReplayConfig::default;
        let cases: Vec<(ReplayConfig, &str)> = vec![
            (
                ReplayConfig { capacity: 0, ..d() },
                "replay.capacity = 0: must be positive",
            ),
            (
                ReplayConfig {
                    capacity: 10,
                    min_size: 11,
                    ..d()
                },
                "replay.min_size = 11",
            ),
            (
                ReplayConfig {
                    samples_per_insert: -1.0,
                    ..d()
                },
                "replay.samples_per_insert",
            ),
            (
                ReplayConfig {
                    samples_per_insert: f64::NAN,
                    ..d()
                },
                "replay.samples_per_insert",
            ),
            (
                ReplayConfig {
                    error_buffer: -1.0,
                    ..d()
                },
                "replay.error_buffer",
            ),
            // Reverb's rule error_buffer >= max(1, spi): 3 < 4.
            (
                ReplayConfig {
                    error_buffer: 3.0,
                    ..d()
                },
                "replay.error_buffer = 3",
            ),
            // spi = 4 > max_times_sampled = 2.
            (
                ReplayConfig {
                    max_times_sampled: 2,
                    ..d()
                },
                "replay.samples_per_insert = 4",
            ),
        ];
        for (c, want) in cases {
            let msg = c.validate().err().unwrap_or_default();
            assert!(msg.starts_with(want), "{msg:?} should start with {want:?}");
        }
        // With the ratio limit off, the error buffer is irrelevant.
        let off = ReplayConfig {
            samples_per_insert: 0.0,
            error_buffer: 0.0,
            ..d()
        };
        assert_eq!(off.validate(), Ok(()));
        assert!(matches!(
            MemoryReplay::new(ReplayConfig { capacity: 0, ..d() }),
            Err(ActorError::Replay(m)) if m.contains("replay.capacity")
        ));
        assert!(matches!(
            MemoryReplay::new(ReplayConfig { backend: ReplayBackend::Redis, ..d() }),
            Err(ActorError::Replay(m)) if m.contains("replay.backend")
        ));
    }
}
