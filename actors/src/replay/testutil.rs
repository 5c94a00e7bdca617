//! What the replay unit tests share: records, configs, waits, and a redis-server of each test's
//! own (`RedisServer`, the file `tests/common/redis_server.rs` that every test crate of the
//! workspace includes). `actors/tests/replay_conformance.rs` keeps its own copy of the few helpers
//! it needs: an integration test cannot see `cfg(test)` items.

use std::fmt::Display;
use std::future::Future;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::replay::{Record, ReplayBuffer, ReplayConfig, Sampler};
use crate::Result;

/// A boxed error so `?` works across candle, serde, redis, tokio and our own errors.
pub(crate) type TestResult = std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;

#[path = "../../../tests/common/redis_server.rs"]
pub(crate) mod redis_server;
pub(crate) use redis_server::RedisServer;

/// Generous bound on every wait that is expected to finish.
pub(crate) const LONG: Duration = Duration::from_secs(20);
/// How long a wait that is expected NOT to finish is given before we conclude it is blocked.
pub(crate) const SHORT: Duration = Duration::from_millis(300);

/// Record `seq` of `producer`: its payload and its one scalar carry the seq.
pub(crate) fn rec(producer: u32, seq: u64) -> Record {
    Record {
        seq,
        producer,
        version: 7,
        payload: seq.to_le_bytes().to_vec(),
        scalars: vec![("v_a".to_owned(), seq as f64)],
    }
}

/// `[replay]` with these limiter and sampler settings (memory backend; the rest default).
pub(crate) fn cfg(
    capacity: usize,
    min_size: usize,
    spi: f64,
    eb: f64,
    sampler: Sampler,
) -> ReplayConfig {
    ReplayConfig {
        capacity,
        min_size,
        samples_per_insert: spi,
        error_buffer: eb,
        sampler,
        ..ReplayConfig::default()
    }
}

/// A run id no other test (or test run) uses.
pub(crate) fn run_id(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("test-{tag}-{}-{nanos}", std::process::id())
}

/// Periodic check of an async condition, bounded by `limit` (ractor's `periodic_check`).
pub(crate) async fn wait_until<F, Fut>(limit: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    cond().await
}

/// A producer task inserting `rec(producer, s)` for every `s` in `seqs`, in order.
pub(crate) fn spawn_producer<R>(
    rb: Arc<R>,
    producer: u32,
    seqs: Range<u64>,
) -> JoinHandle<Result<()>>
where
    R: ReplayBuffer + ?Sized + 'static,
{
    tokio::spawn(async move {
        for s in seqs {
            rb.insert(rec(producer, s)).await?;
        }
        Ok(())
    })
}

/// `attempt`, given a password-protected Redis URL of a port nothing listens on, must fail with
/// one error naming host:port, without the password, within the connect timeout (no reconnect
/// loop).
pub(crate) async fn fails_naming_the_address_not_the_password<T, E, Fut>(
    attempt: impl FnOnce(String) -> Fut,
) -> TestResult
where
    Fut: Future<Output = std::result::Result<T, E>>,
    E: Display,
{
    let port = redis_server::free_port();
    let t0 = Instant::now();
    let Err(e) = attempt(format!("redis://:hunter2-secret@127.0.0.1:{port}/0")).await else {
        return Err(format!("reaching the closed port {port} succeeded").into());
    };
    let msg = e.to_string();
    assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
    assert!(msg.contains("cannot connect"), "{msg}");
    assert!(!msg.contains("hunter2"), "{msg}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    Ok(())
}
