//! Run flags of worker mode: processes of one run that meet only through Redis tell each other
//! that the run is over (the learner marks the run done; rollout and critic workers watch for the
//! mark and stop their producers), and count their starts and restarts, so a process killed and
//! started again shows in the run's summary.

use std::collections::BTreeMap;
use std::time::Duration;

use redis::{AsyncConnectionConfig, RedisError};
use tokio::sync::oneshot;

use super::conn::CONNECT_TIMEOUT;
use super::url::{scrub, RedisTarget};
use crate::{ActorError, Result};

/// How long a done mark outlives the call that set it.
pub const DONE_TTL: Duration = Duration::from_secs(3600);
/// How often [`watch_run_done`] looks for the mark.
pub const DONE_POLL: Duration = Duration::from_millis(300);

/// The key of run `run_id`'s done mark: `tilt:<run-id>:done`.
///
/// Outside the run's `tilt:{RUN}:` hash slot, so [`RedisReplay::purge`](super::RedisReplay::purge)
/// leaves it; it expires after [`DONE_TTL`].
pub fn done_key(run_id: &str) -> String {
    format!("tilt:{run_id}:done")
}

/// Connection settings of the flag calls: bounded, so a Redis that is down gives an error (mark)
/// or another try (watch) instead of a hang.
fn connection_config() -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(CONNECT_TIMEOUT))
}

/// The hash of run `run_id`'s process starts, `tilt:<run-id>:starts`: one field per worker name
/// (how often that worker started) and [`ALL_STARTS`] (process starts of the run). Outside the
/// replay's hash slot, like the done mark; no expiry (it lives as long as the run's streams).
pub fn starts_key(run_id: &str) -> String {
    format!("tilt:{run_id}:starts")
}

/// The hash of run `run_id`'s actor restarts inside worker processes, `tilt:<run-id>:restarts`:
/// one field per role (`rollout`, `critic`, ...).
pub fn restarts_key(run_id: &str) -> String {
    format!("tilt:{run_id}:restarts")
}

/// The field of [`starts_key`] counting every process start of the run.
pub const ALL_STARTS: &str = "#all";

/// One registered process start (see [`register_start`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerStart {
    /// Ordinal of this start among all process starts of the run (0 for the first): a number no
    /// other process of the run has, for fresh randomness and producer ids.
    pub ordinal: u64,
    /// How often this worker started before (0: a first start; more: it is a restart).
    pub previous: u64,
}

/// Restarts of a run across its processes (see [`run_restarts`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunRestarts {
    /// Worker processes started again under a name that had started before, by name.
    pub processes: BTreeMap<String, u64>,
    /// Actors restarted inside worker processes, by role.
    pub actors: BTreeMap<String, u64>,
}

impl RunRestarts {
    /// Process restarts plus actor restarts.
    pub fn total(&self) -> u64 {
        self.processes.values().chain(self.actors.values()).sum()
    }
}

/// A connection for one flag call on `redis`, and a function that turns a Redis error of call
/// `what` into one line naming the address, never the password.
async fn flag_connection(
    redis: RedisTarget,
    what: String,
) -> Result<(
    redis::aio::MultiplexedConnection,
    impl Fn(&str, RedisError) -> ActorError,
)> {
    let secrets = redis.secrets();
    let address = redis.redacted();
    let client = redis
        .client()
        .map_err(|e| ActorError::Replay(format!("{what}: {e}")))?;
    let fail = move |step: &str, e: RedisError| {
        ActorError::Replay(format!(
            "redis {address}: {what}: {step}: {}",
            scrub(e.to_string(), &secrets)
        ))
    };
    let c = client
        .get_multiplexed_async_connection_with_config(&connection_config())
        .await
        .map_err(|e| {
            let hint = redis.connect_hint(&e);
            match fail("cannot connect", e) {
                ActorError::Replay(m) => ActorError::Replay(m + hint),
                other => other,
            }
        })?;
    Ok((c, fail))
}

/// Mark run `run_id` done (`SET tilt:<run-id>:done 1 EX 3600`) on `redis`. Errors name
/// the address, never the password.
pub async fn mark_run_done(redis: impl Into<RedisTarget>, run_id: &str) -> Result<()> {
    let (mut c, fail) = flag_connection(redis.into(), format!("mark run {run_id} done")).await?;
    redis::cmd("SET")
        .arg(done_key(run_id))
        .arg("1")
        .arg("EX")
        .arg(DONE_TTL.as_secs())
        .query_async::<()>(&mut c)
        .await
        .map_err(|e| fail("SET", e))
}

/// Register a start of worker `worker` (a role and an id, e.g. `critic-0`) of run `run_id`: one
/// atomic `HINCRBY` of its field and of [`ALL_STARTS`] in [`starts_key`].
pub async fn register_start(
    redis: impl Into<RedisTarget>,
    run_id: &str,
    worker: &str,
) -> Result<WorkerStart> {
    let (mut c, fail) = flag_connection(
        redis.into(),
        format!("register worker {worker} of run {run_id}"),
    )
    .await?;
    let key = starts_key(run_id);
    let (mine, all): (u64, u64) = redis::pipe()
        .atomic()
        .cmd("HINCRBY")
        .arg(&key)
        .arg(worker)
        .arg(1)
        .cmd("HINCRBY")
        .arg(&key)
        .arg(ALL_STARTS)
        .arg(1)
        .query_async(&mut c)
        .await
        .map_err(|e| fail("HINCRBY", e))?;
    Ok(WorkerStart {
        ordinal: all.saturating_sub(1),
        previous: mine.saturating_sub(1),
    })
}

/// Count `n` actor restarts of role `role` inside a worker process of run `run_id`
/// (`HINCRBY` in [`restarts_key`]).
pub async fn count_actor_restarts(
    redis: impl Into<RedisTarget>,
    run_id: &str,
    role: &str,
    n: u64,
) -> Result<()> {
    let (mut c, fail) = flag_connection(
        redis.into(),
        format!("count a {role} restart of run {run_id}"),
    )
    .await?;
    redis::cmd("HINCRBY")
        .arg(restarts_key(run_id))
        .arg(role)
        .arg(n)
        .query_async::<()>(&mut c)
        .await
        .map_err(|e| fail("HINCRBY", e))
}

/// The restarts of run `run_id` recorded so far by its workers: each worker name's starts
/// beyond the first, and the actor restarts inside worker processes.
pub async fn run_restarts(redis: impl Into<RedisTarget>, run_id: &str) -> Result<RunRestarts> {
    let (mut c, fail) =
        flag_connection(redis.into(), format!("read the restarts of run {run_id}")).await?;
    let (starts, actors): (BTreeMap<String, u64>, BTreeMap<String, u64>) = redis::pipe()
        .cmd("HGETALL")
        .arg(starts_key(run_id))
        .cmd("HGETALL")
        .arg(restarts_key(run_id))
        .query_async(&mut c)
        .await
        .map_err(|e| fail("HGETALL", e))?;
    Ok(RunRestarts {
        processes: starts
            .into_iter()
            .filter(|(name, _)| name != ALL_STARTS)
            .map(|(name, n)| (name, n.saturating_sub(1)))
            .filter(|(_, n)| *n > 0)
            .collect(),
        actors,
    })
}

/// Resolves once run `run_id` is marked done on `redis`, looking every [`DONE_POLL`]
/// (the watch starts at once, on the current tokio runtime).
///
/// While Redis is unreachable it keeps trying. It resolves only on the mark: the sender is never
/// dropped without sending while the receiver lives, so a receiver error cannot be mistaken for
/// the mark (a URL that does not parse is never marked; connecting the replay reports it). The
/// watch ends when the receiver is dropped.
pub fn watch_run_done(redis: impl Into<RedisTarget>, run_id: String) -> oneshot::Receiver<()> {
    let redis: RedisTarget = redis.into();
    let (mut tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let marked = tokio::select! {
            () = wait_for_mark(&redis, &run_id) => true,
            () = tx.closed() => false,
        };
        if marked {
            let _ = tx.send(());
        }
    });
    rx
}

/// Poll the done mark until it is there, on one connection made again after any error.
async fn wait_for_mark(redis: &RedisTarget, run_id: &str) {
    let key = done_key(run_id);
    let Ok(client) = redis.client() else {
        return std::future::pending().await;
    };
    let mut conn = None;
    loop {
        if conn.is_none() {
            conn = client
                .get_multiplexed_async_connection_with_config(&connection_config())
                .await
                .ok();
        }
        if let Some(c) = conn.as_mut() {
            match redis::cmd("GET")
                .arg(&key)
                .query_async::<Option<Vec<u8>>>(c)
                .await
            {
                Ok(Some(_)) => return,
                Ok(None) => {}
                Err(_) => conn = None,
            }
        }
        tokio::time::sleep(DONE_POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::testutil::{
        fails_naming_the_address_not_the_password, run_id, RedisServer, TestResult, LONG,
    };
    use tokio::time::timeout;

    #[tokio::test]
    async fn run_done_mark_is_seen_by_watchers() -> TestResult {
        // On a redis-server of its own: a watcher started before the mark resolves after it, one
        // started after resolves at once, and the key is src/worker.rs's, with its TTL.
        let redis = RedisServer::start();
        let url = redis.url();
        let run = run_id("done");
        let key = done_key(&run);
        assert_eq!(key, format!("tilt:{run}:done"));
        let mut early = watch_run_done(url.clone(), run.clone());
        // Not marked: two polls (600 ms) pass without it resolving.
        assert!(timeout(2 * DONE_POLL, &mut early).await.is_err());

        mark_run_done(&url, &run).await?;
        timeout(LONG, early).await??;
        timeout(LONG, watch_run_done(url.clone(), run.clone())).await??;

        let client = redis::Client::open(url.as_str())?;
        let mut c = client.get_multiplexed_async_connection().await?;
        let (value, ttl): (Option<String>, i64) = redis::pipe()
            .cmd("GET")
            .arg(&key)
            .cmd("TTL")
            .arg(&key)
            .query_async(&mut c)
            .await?;
        assert_eq!(value.as_deref(), Some("1"));
        // SET ... EX 3600 a moment ago (TTL rounds down to whole seconds).
        assert!((3590..=3600).contains(&ttl), "ttl {ttl}");
        let deleted: u64 = redis::cmd("DEL").arg(&key).query_async(&mut c).await?;
        assert_eq!(deleted, 1);
        Ok(())
    }

    #[tokio::test]
    async fn starts_and_restarts_are_counted_per_worker() -> TestResult {
        // Three first starts, one restart of critic-0, two actor restarts of the rollout role:
        // ordinals 0..4 in order, `previous` says which start is a restart, and the run's
        // restarts are 1 process + 2 actors.
        let redis = RedisServer::start();
        let url = redis.url();
        let run = run_id("starts");
        let mut got = vec![];
        for w in ["rollout-0", "critic-0", "learner-0", "critic-0"] {
            got.push(register_start(&url, &run, w).await?);
        }
        let want = [(0, 0), (1, 0), (2, 0), (3, 1)];
        let got: Vec<(u64, u64)> = got.iter().map(|s| (s.ordinal, s.previous)).collect();
        assert_eq!(got, want);
        assert_eq!(run_restarts(&url, &run).await?.total(), 1);
        count_actor_restarts(&url, &run, "rollout", 2).await?;
        let r = run_restarts(&url, &run).await?;
        assert_eq!(r.processes, BTreeMap::from([("critic-0".to_owned(), 1)]));
        assert_eq!(r.actors, BTreeMap::from([("rollout".to_owned(), 2)]));
        assert_eq!(r.total(), 3);
        // A run nobody registered in has none.
        assert_eq!(
            run_restarts(&url, &run_id("other")).await?,
            RunRestarts::default()
        );
        Ok(())
    }

    #[tokio::test]
    async fn flag_calls_and_the_replay_work_over_tls_with_an_acl_user() -> TestResult {
        // A redis-server that speaks only TLS, wants a client certificate and knows one user:
        // every flag call and a replay connect over rediss:// with the CA and the client's
        // certificate; without the CA the handshake fails, and no error shows the password.
        use crate::replay::redis::{RedisReplay, RedisTls};
        use crate::replay::testutil::redis_server::TlsRedisServer;
        use crate::replay::{ReplayBackend, ReplayConfig};
        let server = TlsRedisServer::start("flags", "flag-pass-31", true);
        let tls = RedisTls {
            ca: Some(server.tls.ca.clone()),
            cert: Some(server.tls.client_cert.clone()),
            key: Some(server.tls.client_key.clone()),
        };
        let target = RedisTarget::new(server.url(), tls.clone());
        let run = run_id("tls");
        assert_eq!(register_start(&target, &run, "critic-0").await?.ordinal, 0);
        assert_eq!(register_start(&target, &run, "critic-0").await?.previous, 1);
        count_actor_restarts(&target, &run, "rollout", 1).await?;
        assert_eq!(run_restarts(&target, &run).await?.total(), 2);
        let watch = watch_run_done(&target, run.clone());
        mark_run_done(&target, &run).await?;
        timeout(LONG, watch).await??;
        assert_eq!(server.cli(&["GET", &done_key(&run)]).trim(), "1");

        let cfg = ReplayConfig {
            backend: ReplayBackend::Redis,
            capacity: 16,
            min_size: 1,
            samples_per_insert: 0.0,
            ..ReplayConfig::default()
        };
        let rb = RedisReplay::connect(&target, &run, "c0", cfg.clone()).await?;
        assert_eq!(rb.fetch_stats().await?.inserted, 0);
        rb.purge().await?;

        let no_ca = RedisTarget::new(
            server.url(),
            RedisTls {
                ca: None,
                ..tls.clone()
            },
        );
        let e = register_start(&no_ca, &run, "x")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("UnknownIssuer") && e.contains("replay.tls_ca"),
            "{e}"
        );
        let e = RedisReplay::connect(&no_ca, &run, "c1", cfg)
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("UnknownIssuer"), "{e}");
        let wrong = RedisTarget::new(server.url_as("flags", "wrong-pass-77"), tls);
        let e = mark_run_done(&wrong, &run).await.unwrap_err().to_string();
        assert!(e.contains("cannot connect"), "{e}");
        assert!(
            !e.contains("wrong-pass-77") && !e.contains("flag-pass-31"),
            "{e}"
        );
        Ok(())
    }

    #[tokio::test]
    async fn flag_calls_name_the_address_not_the_password() -> TestResult {
        fails_naming_the_address_not_the_password(|url| async move {
            register_start(&url, "r", "critic-0").await
        })
        .await?;
        fails_naming_the_address_not_the_password(
            |url| async move { run_restarts(&url, "r").await },
        )
        .await
    }

    #[tokio::test]
    async fn mark_run_done_names_the_address_not_the_password() -> TestResult {
        // A closed port: one error with host:port, without the password, within the connect
        // timeout.
        fails_naming_the_address_not_the_password(
            |url| async move { mark_run_done(&url, "r").await },
        )
        .await
    }
}
