//! Run flags of worker mode: processes of one run that meet only through Redis tell each other
//! that the run is over. The learner marks the run done; rollout and critic workers watch for the
//! mark and stop their producers.

use std::time::Duration;

use redis::{AsyncConnectionConfig, Client, RedisError};
use tokio::sync::oneshot;

use super::conn::CONNECT_TIMEOUT;
use super::url::{password_ranges, redact, scrub};
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

/// Mark run `run_id` done (`SET tilt:<run-id>:done 1 EX 3600`) on the Redis at `url`. Errors name
/// the address, never the password.
pub async fn mark_run_done(url: &str, run_id: &str) -> Result<()> {
    let mut secrets: Vec<String> = password_ranges(url)
        .into_iter()
        .map(|(a, b)| url[a..b].to_owned())
        .collect();
    let fail = |what: &str, e: RedisError, secrets: &[String]| {
        ActorError::Replay(format!(
            "redis {}: mark run {run_id} done: {what}: {}",
            redact(url),
            scrub(e.to_string(), secrets)
        ))
    };
    let client = Client::open(url).map_err(|e| fail("bad url", e, &secrets))?;
    secrets.extend(
        client
            .get_connection_info()
            .redis_settings()
            .password()
            .map(str::to_owned),
    );
    let mut c = client
        .get_multiplexed_async_connection_with_config(&connection_config())
        .await
        .map_err(|e| fail("cannot connect", e, &secrets))?;
    redis::cmd("SET")
        .arg(done_key(run_id))
        .arg("1")
        .arg("EX")
        .arg(DONE_TTL.as_secs())
        .query_async::<()>(&mut c)
        .await
        .map_err(|e| fail("SET", e, &secrets))
}

/// Resolves once run `run_id` is marked done on the Redis at `url`, looking every [`DONE_POLL`]
/// (the watch starts at once, on the current tokio runtime).
///
/// While Redis is unreachable it keeps trying. It resolves only on the mark: the sender is never
/// dropped without sending while the receiver lives, so a receiver error cannot be mistaken for
/// the mark (a URL that does not parse is never marked; connecting the replay reports it). The
/// watch ends when the receiver is dropped.
pub fn watch_run_done(url: String, run_id: String) -> oneshot::Receiver<()> {
    let (mut tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let marked = tokio::select! {
            () = wait_for_mark(&url, &run_id) => true,
            () = tx.closed() => false,
        };
        if marked {
            let _ = tx.send(());
        }
    });
    rx
}

/// Poll the done mark until it is there, on one connection made again after any error.
async fn wait_for_mark(url: &str, run_id: &str) {
    let key = done_key(run_id);
    let Ok(client) = Client::open(url) else {
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

        let client = Client::open(url.as_str())?;
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
    async fn mark_run_done_names_the_address_not_the_password() -> TestResult {
        // A closed port: one error with host:port, without the password, within the connect
        // timeout.
        fails_naming_the_address_not_the_password(
            |url| async move { mark_run_done(&url, "r").await },
        )
        .await
    }
}
