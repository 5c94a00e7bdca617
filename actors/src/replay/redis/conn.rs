//! Connections and failure handling: the connection managers' settings, the retry loop around
//! every Redis call (transient errors, a lost consumer group, the outage bound), waits that end
//! at a deadline or on close, and the background task (heartbeat, leftover retirements, stats).

use std::future::Future;
use std::sync::{MutexGuard, PoisonError, Weak};
use std::time::Duration;

use redis::aio::ConnectionManagerConfig;
use redis::{ErrorKind, RedisError, RedisResult, ServerErrorKind};
use tokio::time::Instant;

use super::local::Local;
use super::url::scrub;
use super::{Inner, GROUP};
use crate::replay::ReplayStats;
use crate::{ActorError, Result};

/// Timeout of the first connection attempt and of each reconnection attempt.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Response timeout of the command connection (scripts, XACK, non-blocking reads).
pub(super) const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// Response timeout of the blocking connection: longer than any BLOCK it sends (redis-rs'
/// default of 500 ms would cut a 1 s BLOCK short).
pub(super) const BLOCKING_TIMEOUT: Duration = Duration::from_secs(11);
/// Pause between retries while Redis is unreachable: first and largest.
const RETRY_MIN: Duration = Duration::from_millis(20);
const RETRY_MAX: Duration = Duration::from_secs(1);
/// Period of the stats refresh of the background task (the heartbeat may run more often).
const STATS_PERIOD: Duration = Duration::from_secs(1);

/// What a wait does when the buffer is closed meanwhile.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum OnClose {
    /// Keep waiting.
    Ignore,
    /// Stop waiting and let the caller look again.
    Wake,
    /// Fail with `Closed`.
    Fail,
}

/// Bounds of a wait: a deadline (None = none) and what closing does.
#[derive(Clone, Copy)]
pub(super) struct Wait {
    pub(super) deadline: Option<Instant>,
    pub(super) on_close: OnClose,
}

fn is_transient(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(
            e.kind(),
            ErrorKind::Server(
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ClusterDown
            )
        )
}

fn is_nogroup(e: &RedisError) -> bool {
    e.code() == Some("NOGROUP")
}

pub(super) fn manager_config(response_timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_number_of_retries(3)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_secs(1))
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(response_timeout))
}

/// Heartbeat of held entries, flushing of leftover retirements, and the stats refresh.
pub(super) async fn background(inner: Weak<Inner>) {
    let beat_every = match inner.upgrade() {
        Some(i) => i.opts.claim_idle / 3,
        None => return,
    };
    let mut tick = tokio::time::interval(beat_every.min(STATS_PERIOD));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_beat = Instant::now();
    let mut last_stats = Instant::now();
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        // Single attempts: errors here are retried at the next tick.
        if last_beat.elapsed() >= beat_every {
            last_beat = Instant::now();
            inner.heartbeat().await.ok();
        }
        if last_stats.elapsed() >= STATS_PERIOD {
            last_stats = Instant::now();
            inner.stats_query().await.ok();
        }
        let wait = Wait {
            deadline: Some(Instant::now()),
            on_close: OnClose::Ignore,
        };
        inner.flush(wait).await.ok();
    }
}

impl Inner {
    pub(super) fn local(&self) -> Result<MutexGuard<'_, Local>> {
        self.local
            .lock()
            .map_err(|_| ActorError::Replay("redis replay state poisoned by a panic".to_owned()))
    }

    pub(super) fn cached(&self) -> ReplayStats {
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(super) fn update_cache(&self, f: impl FnOnce(&mut ReplayStats)) {
        f(&mut self.cache.lock().unwrap_or_else(PoisonError::into_inner));
    }

    pub(super) fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    pub(super) fn fail(&self, what: &str, e: &RedisError) -> ActorError {
        ActorError::Replay(format!(
            "redis at {}: {what}: {}",
            self.addr,
            scrub(e.to_string(), &self.secrets)
        ))
    }

    /// Note a transient failure; returns how long Redis has been unreachable.
    pub(super) fn mark_down(&self) -> Duration {
        let mut d = self
            .down_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        d.get_or_insert_with(Instant::now).elapsed()
    }

    pub(super) fn mark_up(&self) {
        *self
            .down_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// Sleep `d` within `wait`. Ok(false): the deadline came first; Ok(true) otherwise (also when
    /// woken by close under `OnClose::Wake`); Err(Closed) under `OnClose::Fail`.
    pub(super) async fn pause(&self, d: Duration, wait: Wait) -> Result<bool> {
        let mut until = Instant::now() + d;
        let mut last = false;
        if let Some(dl) = wait.deadline {
            if dl <= until {
                until = dl;
                last = true;
            }
        }
        if wait.on_close == OnClose::Ignore {
            tokio::time::sleep_until(until).await;
            return Ok(!last);
        }
        let mut rx = self.closed.subscribe();
        let closed = tokio::select! {
            _ = tokio::time::sleep_until(until) => false,
            r = rx.wait_for(|c| *c) => r.is_ok(),
        };
        match (closed, wait.on_close) {
            (true, OnClose::Fail) => Err(ActorError::Closed),
            (true, _) => Ok(true),
            (false, _) => Ok(!last),
        }
    }

    /// Run `op` until it succeeds, retrying transient errors with back-off for up to
    /// `max_outage`. Ok(None) when `wait`'s deadline passes first.
    pub(super) async fn call<T, F, Fut>(
        &self,
        what: &str,
        wait: Wait,
        mut op: F,
    ) -> Result<Option<T>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let mut delay = RETRY_MIN;
        let mut regroups = 0;
        loop {
            let mut err = match op().await {
                Ok(v) => {
                    self.mark_up();
                    return Ok(Some(v));
                }
                Err(e) => e,
            };
            if is_nogroup(&err) && regroups < 3 {
                // The stream or its group vanished (a Redis restarted without persistence, or a
                // purge): recreate it and try again.
                regroups += 1;
                match self.create_group().await {
                    Ok(()) => continue,
                    Err(e) => err = e,
                }
            }
            if !is_transient(&err) {
                return Err(self.fail(what, &err));
            }
            // A lost reply of a read may have delivered entries to this consumer.
            self.local()?.reread_own = true;
            let down = self.mark_down();
            if down > self.opts.max_outage {
                return Err(ActorError::Replay(format!(
                    "redis at {}: {what}: unreachable for {:.1} s (limit {:.1} s): {}",
                    self.addr,
                    down.as_secs_f64(),
                    self.opts.max_outage.as_secs_f64(),
                    scrub(err.to_string(), &self.secrets)
                )));
            }
            let wait = Wait {
                on_close: if wait.on_close == OnClose::Fail {
                    OnClose::Fail
                } else {
                    OnClose::Ignore
                },
                ..wait
            };
            if !self.pause(delay, wait).await? {
                return Ok(None);
            }
            delay = (delay * 2).min(RETRY_MAX);
        }
    }

    pub(super) async fn create_group(&self) -> RedisResult<()> {
        let mut c = self.cmd.clone();
        let r: RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.keys.stream)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut c)
            .await;
        match r {
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            other => other,
        }
    }
}
