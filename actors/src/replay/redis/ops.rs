//! The three verbs behind the trait (insert, sample, ack) and the writes they make: limiter
//! reservations, retirements, dropped entries, heartbeats and the counters.

use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::RedisResult;
use tokio::time::Instant;

use super::conn::{OnClose, Wait};
use super::parse::EntryId;
use super::step_none;
use super::{Inner, GROUP};
use crate::replay::{Record, ReplayStats};
use crate::{ActorError, Result};

/// Polling of a waiting producer (stream full, limiter) or sampler (limiter): first and largest
/// pause between looks.
const POLL_MIN: Duration = Duration::from_millis(2);
const POLL_MAX: Duration = Duration::from_millis(50);
/// Entry ids handed to one script call.
const SCRIPT_BATCH: usize = 1000;
/// Payload bytes sent in one batch insert script call (more records go in further calls). Larger
/// calls cost Redis more per byte: a unit of 8 x 1 MiB records round-tripped in 38 ms with one
/// 8 MiB call, 24 ms with 4 MiB calls, 25 ms record by record (benches/replay_backends.rs).
const INSERT_MANY_BYTES: usize = 4 << 20;
/// How long a sample reservation's nonce key lives (it only has to outlive a retry).
const NONCE_TTL_MS: u64 = 30_000;

impl Inner {
    /// Read the run-wide counters into the cache.
    pub(super) async fn stats_query(&self) -> RedisResult<()> {
        let mut c = self.cmd.clone();
        let k = &self.keys;
        let (ins, smp, ev, depth, dropped): (Option<u64>, Option<u64>, Option<u64>, u64, u64) =
            redis::pipe()
                .cmd("GET")
                .arg(&k.inserts)
                .cmd("GET")
                .arg(&k.samples)
                .cmd("GET")
                .arg(&k.evicted)
                .cmd("XLEN")
                .arg(&k.stream)
                .cmd("SCARD")
                .arg(&k.dropped)
                .query_async(&mut c)
                .await?;
        self.update_cache(|s| {
            *s = ReplayStats {
                inserted: ins.unwrap_or(0),
                sampled: smp.unwrap_or(0),
                evicted: ev.unwrap_or(0),
                depth,
                dropped,
                ..ReplayStats::default()
            }
        });
        Ok(())
    }
    /// XACK + XDEL applied entries and record dropped ones (queued by `ack` and `admit`).
    pub(super) async fn flush(&self, wait: Wait) -> Result<Option<()>> {
        let _one_flush = match wait.deadline {
            Some(d) => match tokio::time::timeout_at(d, self.flush_lock.lock()).await {
                Ok(g) => g,
                Err(_) => return Ok(None),
            },
            None => self.flush_lock.lock().await,
        };
        let (retire, drop) = {
            let mut local = self.local()?;
            (
                std::mem::take(&mut local.retire),
                std::mem::take(&mut local.drop),
            )
        };
        let r = self.flush_lists(&retire, &drop, wait).await;
        if !matches!(r, Ok(Some(()))) {
            // Keep them for the next flush (the scripts are safe to run again).
            let mut local = self.local()?;
            local.retire.extend(retire);
            local.drop.extend(drop);
        }
        r
    }

    pub(super) async fn flush_lists(
        &self,
        retire: &[EntryId],
        drop: &[(EntryId, &'static str)],
        wait: Wait,
    ) -> Result<Option<()>> {
        for chunk in retire.chunks(SCRIPT_BATCH) {
            let ids: Vec<String> = chunk.iter().map(ToString::to_string).collect();
            let (_, depth): (i64, u64) = step!(
                self.call("retire", wait, || {
                    let mut c = self.cmd.clone();
                    let mut inv = self.scripts.retire.prepare_invoke();
                    inv.key(&self.keys.stream)
                        .key(&self.keys.uses)
                        .key(&self.keys.evicted)
                        .key(&self.keys.samples)
                        .arg(GROUP)
                        .arg(self.uses)
                        .arg(&ids);
                    async move { inv.invoke_async(&mut c).await }
                })
                .await
            );
            self.update_cache(|s| s.depth = depth);
        }
        let mut reasons: Vec<&'static str> = drop.iter().map(|d| d.1).collect();
        reasons.sort_unstable();
        reasons.dedup();
        for why in reasons {
            let of_reason: Vec<EntryId> = drop.iter().filter(|d| d.1 == why).map(|d| d.0).collect();
            for chunk in of_reason.chunks(SCRIPT_BATCH) {
                let ids: Vec<String> = chunk.iter().map(ToString::to_string).collect();
                let dropped: u64 = step!(
                    self.call("drop", wait, || {
                        let mut c = self.cmd.clone();
                        let mut inv = self.scripts.drop.prepare_invoke();
                        inv.key(&self.keys.stream)
                            .key(&self.keys.dropped)
                            .key(&self.keys.uses)
                            .key(&self.keys.samples)
                            .key(&self.keys.dropped_by)
                            .arg(GROUP)
                            .arg(self.uses)
                            .arg(why)
                            .arg(&ids);
                        async move { inv.invoke_async(&mut c).await }
                    })
                    .await
                );
                self.update_cache(|s| s.dropped = dropped);
            }
        }
        Ok(Some(()))
    }

    /// Ask the limiter for the planned hand-outs. Some(true) = granted (and counted).
    pub(super) async fn reserve(
        &self,
        picks: &[(EntryId, bool)],
        wait: Wait,
    ) -> Result<Option<bool>> {
        let counted = picks.iter().filter(|p| p.1).count();
        let ids: Vec<String> = picks.iter().map(|p| p.0.to_string()).collect();
        let nonce = format!(
            "{}{}",
            self.keys.nonce,
            self.nonce_counter.fetch_add(1, Ordering::Relaxed)
        );
        let (granted, ins, smp): (i64, i64, i64) = step!(
            self.call("sample reservation", wait, || {
                let mut c = self.cmd.clone();
                let mut inv = self.scripts.reserve.prepare_invoke();
                inv.key(&self.keys.inserts)
                    .key(&self.keys.samples)
                    .key(&self.keys.uses)
                    .key(&nonce)
                    .arg(&self.bounds.min_size)
                    .arg(&self.bounds.spi)
                    .arg(&self.bounds.min_diff)
                    .arg(counted)
                    .arg(NONCE_TTL_MS)
                    .arg(&ids);
                async move { inv.invoke_async(&mut c).await }
            })
            .await
        );
        if ins >= 0 && smp >= 0 {
            self.update_cache(|s| {
                s.inserted = ins as u64;
                s.sampled = smp as u64;
            });
        }
        Ok(Some(granted == 1))
    }

    /// Keep held entries from being claimed; forget the ones another consumer took.
    pub(super) async fn heartbeat(&self) -> Result<()> {
        let ids: Vec<EntryId> = self.local()?.slots.keys().copied().collect();
        for chunk in ids.chunks(SCRIPT_BATCH) {
            let names: Vec<String> = chunk.iter().map(ToString::to_string).collect();
            let mut c = self.cmd.clone();
            let lost: Vec<String> = self
                .scripts
                .heartbeat
                .key(&self.keys.stream)
                .arg(GROUP)
                .arg(&self.consumer)
                .arg(&names)
                .invoke_async(&mut c)
                .await
                .map_err(|e| self.fail("heartbeat", &e))?;
            let mut local = self.local()?;
            for id in lost.iter().filter_map(|s| EntryId::parse(s.as_bytes())) {
                local.remove(&id);
            }
        }
        Ok(())
    }

    pub(super) fn check_batch(&self, n: usize) -> Result<()> {
        self.limiter.check_batch(n).map_err(ActorError::Replay)?;
        let spi = self.cfg.samples_per_insert;
        let min_diff = self.limiter.min_diff();
        if spi > 0.0 && n as f64 + min_diff > self.cfg.capacity as f64 {
            return Err(ActorError::Replay(format!(
                "a sample of {n} records needs replay.capacity >= {} with the redis backend \
                 (n + min_size * samples_per_insert - error_buffer; it is {}): a full stream \
                 could hold fewer uses than the sample waits for",
                n as f64 + min_diff,
                self.cfg.capacity
            )));
        }
        Ok(())
    }

    pub(super) async fn sample(&self, n: usize, timeout: Duration) -> Result<Option<Vec<Record>>> {
        if n == 0 {
            return Ok(Some(Vec::new()));
        }
        self.check_batch(n)?;
        let deadline = Instant::now().checked_add(timeout);
        let _one_sampler = match deadline {
            Some(d) => match tokio::time::timeout_at(d, self.sample_lock.lock()).await {
                Ok(g) => g,
                Err(_) => return Ok(None),
            },
            None => self.sample_lock.lock().await,
        };
        let io = Wait {
            deadline,
            on_close: OnClose::Ignore,
        };
        let mut poll = POLL_MIN;
        loop {
            let closed = self.is_closed();
            step!(self.flush(io).await);
            step!(self.maintain(io).await);
            step!(self.prefetch(n, io).await);
            let picks = self.local()?.plan(n, self.cfg.sampler);
            if !picks.is_empty() {
                if step!(self.reserve(&picks, io).await) {
                    let out = self.local()?.hand_out(&picks);
                    // Empty only if every picked entry was taken by another consumer meanwhile.
                    if !out.is_empty() {
                        return Ok(Some(out));
                    }
                    continue;
                }
                // Denied by the limiter: once closed, no insert of ours can lift it.
                if closed {
                    return Err(ActorError::Closed);
                }
                let wait = Wait {
                    deadline,
                    on_close: OnClose::Wake,
                };
                if !self.pause(poll, wait).await? {
                    return Ok(None);
                }
                poll = (poll * 2).min(POLL_MAX);
            } else {
                if closed {
                    return Err(ActorError::Closed);
                }
                if deadline.is_some_and(|d| d <= Instant::now()) {
                    return Ok(None);
                }
                self.block_for_new(n, deadline).await?;
            }
        }
    }

    pub(super) async fn insert(&self, rec: &Record) -> Result<()> {
        let bytes = rec.encode();
        let producer = rec.producer.to_string();
        let seq = rec.seq.to_string();
        let wait = Wait {
            deadline: None,
            on_close: OnClose::Fail,
        };
        let mut poll = POLL_MIN;
        let refused = |e: ActorError| {
            if matches!(e, ActorError::Closed) {
                if let Ok(mut l) = self.local() {
                    l.counts.refuse([rec.key()]);
                }
            }
            e
        };
        loop {
            if self.is_closed() {
                return Err(refused(ActorError::Closed));
            }
            let (status, depth): (String, u64) = step_none(
                self.call("insert", wait, || {
                    let mut c = self.cmd.clone();
                    let mut inv = self.scripts.insert.prepare_invoke();
                    inv.key(&self.keys.stream)
                        .key(&self.keys.inserts)
                        .key(&self.keys.samples)
                        .key(&self.keys.last)
                        .key(&self.keys.produced)
                        .arg(bytes.as_slice())
                        .arg(&producer)
                        .arg(&seq)
                        .arg(self.cfg.capacity)
                        .arg(&self.bounds.spi)
                        .arg(&self.bounds.max_diff);
                    async move { inv.invoke_async(&mut c).await }
                })
                .await,
            )
            .map_err(refused)?;
            self.update_cache(|s| s.depth = depth);
            match status.as_str() {
                "ok" | "dup" => return Ok(()),
                "full" | "limit" => {
                    self.pause(poll, wait).await.map_err(refused)?;
                    poll = (poll * 2).min(POLL_MAX);
                }
                other => {
                    return Err(ActorError::Replay(format!(
                        "redis at {}: insert script answered {other:?}",
                        self.addr
                    )))
                }
            }
        }
    }

    /// [`Inner::insert`] for a batch: each script call takes as many records as the capacity
    /// and the limiter allow (one call, one round trip, when nothing waits); the rest wait as a
    /// single insert would, then continue.
    pub(super) async fn insert_many(&self, recs: &[Record]) -> Result<()> {
        let mut next = 0;
        let r = self.insert_many_from(recs, &mut next).await;
        if matches!(r, Err(ActorError::Closed)) {
            // Accounting: the records from `next` on were handed over and never inserted.
            self.local()?
                .counts
                .refuse(recs[next.min(recs.len())..].iter().map(Record::key));
        }
        r
    }

    /// [`Inner::insert_many`]'s work; `next` = how many records went in so far.
    async fn insert_many_from(&self, recs: &[Record], next: &mut usize) -> Result<()> {
        let enc: Vec<(String, String, Vec<u8>)> = recs
            .iter()
            .map(|r| (r.producer.to_string(), r.seq.to_string(), r.encode()))
            .collect();
        let wait = Wait {
            deadline: None,
            on_close: OnClose::Fail,
        };
        // How many records the next call sends: all at first, then what the last reply said
        // there was room for (at least one, so a waiting batch polls like a single insert).
        let mut send = enc.len();
        let mut poll = POLL_MIN;
        while *next < enc.len() {
            if self.is_closed() {
                return Err(ActorError::Closed);
            }
            let mut end = *next;
            let mut bytes = 0;
            while end < enc.len()
                && end - *next < send.clamp(1, SCRIPT_BATCH)
                && (end == *next || bytes + enc[end].2.len() <= INSERT_MANY_BYTES)
            {
                bytes += enc[end].2.len();
                end += 1;
            }
            let nonce = format!(
                "{}{}",
                self.keys.nonce,
                self.nonce_counter.fetch_add(1, Ordering::Relaxed)
            );
            let left = enc.len() - *next;
            let (status, depth, taken, room): (String, u64, usize, usize) = step_none(
                self.call("insert", wait, || {
                    let mut c = self.cmd.clone();
                    let mut inv = self.scripts.insert_many.prepare_invoke();
                    inv.key(&self.keys.stream)
                        .key(&self.keys.inserts)
                        .key(&self.keys.samples)
                        .key(&self.keys.last)
                        .key(&nonce)
                        .key(&self.keys.produced)
                        .arg(self.cfg.capacity)
                        .arg(&self.bounds.spi)
                        .arg(&self.bounds.max_diff)
                        .arg(NONCE_TTL_MS)
                        .arg(left);
                    for (producer, seq, payload) in &enc[*next..end] {
                        inv.arg(producer).arg(seq).arg(payload.as_slice());
                    }
                    async move { inv.invoke_async(&mut c).await }
                })
                .await,
            )?;
            self.update_cache(|s| s.depth = depth);
            if !matches!(status.as_str(), "ok" | "full" | "limit" | "replay") || taken > end - *next
            {
                return Err(ActorError::Replay(format!(
                    "redis at {}: insert script answered {status:?} ({taken} taken of {})",
                    self.addr,
                    end - *next
                )));
            }
            *next += taken;
            send = room;
            if *next < enc.len() && (room == 0 || matches!(status.as_str(), "full" | "limit")) {
                self.pause(poll, wait).await?;
                poll = (poll * 2).min(POLL_MAX);
            } else if taken > 0 {
                poll = POLL_MIN;
            }
        }
        Ok(())
    }

    pub(super) async fn ack(&self, keys: &[(u32, u64)]) -> Result<()> {
        {
            let mut local = self.local()?;
            for key in keys {
                let Some(id) = local.by_key.get(key).copied() else {
                    // Retired before, or taken by another consumer: remember it as applied.
                    local.applied.insert(*key);
                    continue;
                };
                let done = match local.slots.get_mut(&id) {
                    Some(slot) => {
                        slot.outstanding = false;
                        slot.left() == 0
                    }
                    None => false,
                };
                if done {
                    // Applied for good: mark it before telling Redis (idempotence, point 1).
                    local.remove(&id);
                    local.applied.insert(*key);
                    local.retire.push(id);
                }
            }
        }
        let wait = Wait {
            deadline: None,
            on_close: OnClose::Ignore,
        };
        step_none(self.flush(wait).await)
    }
}
