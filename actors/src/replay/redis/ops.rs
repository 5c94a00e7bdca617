//! The three verbs behind the trait (insert, sample, ack) and the writes they make: limiter
//! reservations, retirements, dropped entries, heartbeats and the counters.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::RedisResult;
use tokio::time::Instant;

use super::conn::{OnClose, Wait};
use super::parse::EntryId;
use super::step_none;
use super::{Inner, FIELD, GROUP};
use crate::accounting::stream_of;
use crate::replay::{Record, ReplayStats};
use crate::{ActorError, Result};

/// Polling of a waiting producer (stream full, limiter) or sampler (limiter): first and largest
/// pause between looks.
const POLL_MIN: Duration = Duration::from_millis(2);
const POLL_MAX: Duration = Duration::from_millis(50);
/// Entry ids handed to one script call.
const SCRIPT_BATCH: usize = 1000;
/// Payload bytes sent in one MULTI/EXEC of a batch insert (more records go in further calls), so
/// one call's command buffer stays bounded.
const INSERT_MANY_BYTES: usize = 16 << 20;
/// A batch insert's admission: {status, stream length, records taken, room for more, 1-based
/// positions of the skipped repeats among those sent}.
pub(super) type Admission = (String, u64, usize, usize, Vec<usize>);

/// A record as one redis argument: its [`Record::encode`] bytes, written straight into the
/// command buffer (no intermediate copy of the payload).
struct EncodedRecord<'a>(&'a Record);

impl redis::ToRedisArgs for EncodedRecord<'_> {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + redis::RedisWrite,
    {
        out.reserve_space_for_args([self.0.encoded_len()]);
        let mut w = out.writer_for_next_arg();
        self.0
            .encode_with(|b| w.write_all(b))
            .expect("a redis command buffer takes every byte");
    }
}

/// What a batch's commit writes besides the count: each producer's last added seq (in the order
/// the producers first appear) and each producer stream's largest added seq, the values that
/// one write per record, in order, would leave behind.
#[allow(clippy::type_complexity)]
pub(super) fn commit_marks(add: &[&Record]) -> (Vec<(u32, u64)>, BTreeMap<(u32, u64), u64>) {
    let mut last: Vec<(u32, u64)> = Vec::new();
    let mut top: BTreeMap<(u32, u64), u64> = BTreeMap::new();
    for r in add {
        match last.iter_mut().find(|(p, _)| *p == r.producer) {
            Some(l) => l.1 = r.seq,
            None => last.push((r.producer, r.seq)),
        }
        let t = top.entry(stream_of(r.key())).or_insert(r.seq);
        *t = (*t).max(r.seq);
    }
    (last, top)
}

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

    /// [`Inner::insert_many`]'s work; `next` = how many records went in so far. Per call: the
    /// admission script reserves room for a prefix of the records (no payloads: producers and
    /// seqs only), then one MULTI/EXEC carries their plain XADDs and the commit script.
    async fn insert_many_from(&self, recs: &[Record], next: &mut usize) -> Result<()> {
        let wait = Wait {
            deadline: None,
            on_close: OnClose::Fail,
        };
        // How many records the next call sends: all at first, then what the last reply said
        // there was room for (at least one, so a waiting batch polls like a single insert).
        let mut send = recs.len();
        let mut poll = POLL_MIN;
        while *next < recs.len() {
            if self.is_closed() {
                return Err(ActorError::Closed);
            }
            let mut end = *next;
            let mut bytes = 0;
            while end < recs.len()
                && end - *next < send.clamp(1, SCRIPT_BATCH)
                && (end == *next || bytes + recs[end].payload.len() <= INSERT_MANY_BYTES)
            {
                bytes += recs[end].payload.len();
                end += 1;
            }
            let nonce = format!(
                "{}{}",
                self.keys.nonce,
                self.nonce_counter.fetch_add(1, Ordering::Relaxed)
            );
            let left = recs.len() - *next;
            let sent = &recs[*next..end];
            let (status, depth, taken, room, skipped) =
                step_none(self.admit(sent, left, &nonce, wait).await)?;
            self.update_cache(|s| s.depth = depth);
            if !matches!(status.as_str(), "ok" | "full" | "limit")
                || taken > sent.len()
                || skipped.iter().any(|&i| i == 0 || i > taken)
            {
                return Err(ActorError::Replay(format!(
                    "redis at {}: insert admission answered {status:?} ({taken} taken of {}, \
                     skipped {skipped:?})",
                    self.addr,
                    sent.len()
                )));
            }
            let add: Vec<&Record> = sent[..taken]
                .iter()
                .enumerate()
                .filter(|(i, _)| !skipped.contains(&(i + 1)))
                .map(|(_, r)| r)
                .collect();
            if !add.is_empty() {
                step_none(self.commit(&add, taken, &nonce, wait).await)?;
            }
            *next += taken;
            send = room;
            if *next < recs.len() && (room == 0 || matches!(status.as_str(), "full" | "limit")) {
                self.pause(poll, wait).await?;
                poll = (poll * 2).min(POLL_MAX);
            } else if taken > 0 {
                poll = POLL_MIN;
            }
        }
        Ok(())
    }

    /// Phase 1 of a batch insert (see `ADMIT_LUA`): {status, stream length, records taken, room
    /// for more, 1-based positions of the skipped repeats}.
    pub(super) async fn admit(
        &self,
        sent: &[Record],
        left: usize,
        nonce: &str,
        wait: Wait,
    ) -> Result<Option<Admission>> {
        let ttl = self.reservation_ttl_ms();
        self.call("insert admission", wait, || {
            let mut c = self.cmd.clone();
            let mut inv = self.scripts.admit.prepare_invoke();
            inv.key(&self.keys.stream)
                .key(&self.keys.inserts)
                .key(&self.keys.samples)
                .key(&self.keys.last)
                .key(&self.keys.reserved)
                .arg(self.cfg.capacity)
                .arg(&self.bounds.spi)
                .arg(&self.bounds.max_diff)
                .arg(ttl)
                .arg(left)
                .arg(nonce);
            for r in sent {
                inv.arg(r.producer).arg(r.seq);
            }
            async move { inv.invoke_async(&mut c).await }
        })
        .await
    }

    /// A reservation outlives a slow commit by far; one left by a producer that died between
    /// admission and commit holds its room this long (the claim bound: presumed dead).
    fn reservation_ttl_ms(&self) -> u64 {
        (self.opts.claim_idle.as_millis() as u64).max(1000)
    }

    /// Phase 2 of a batch insert: the XADDs of the admitted records (payloads written straight
    /// into the command buffer) and the commit script, in one MULTI/EXEC. A retry after a lost
    /// reply first looks for the commit's done mark, so the XADDs are not sent twice.
    pub(super) async fn commit(
        &self,
        add: &[&Record],
        taken: usize,
        nonce: &str,
        wait: Wait,
    ) -> Result<Option<()>> {
        let (last, top) = commit_marks(add);
        let done = format!("{nonce}:done");
        let tried = std::sync::atomic::AtomicBool::new(false);
        self.call("insert", wait, || {
            let mut c = self.cmd.clone();
            let retry = tried.swap(true, Ordering::Relaxed);
            let mut p = redis::pipe();
            p.atomic();
            for r in add {
                p.cmd("XADD")
                    .arg(&self.keys.stream)
                    .arg("*")
                    .arg(FIELD)
                    .arg(EncodedRecord(r))
                    .ignore();
            }
            p.cmd("EVAL")
                .arg(&self.scripts.commit)
                .arg(5)
                .arg(&self.keys.inserts)
                .arg(&self.keys.last)
                .arg(&self.keys.produced)
                .arg(&self.keys.reserved)
                .arg(&done)
                .arg(nonce)
                .arg(NONCE_TTL_MS)
                .arg(taken)
                .arg(add.len())
                .arg(last.len());
            for (producer, seq) in &last {
                p.arg(producer).arg(seq);
            }
            for ((producer, _), seq) in &top {
                p.arg(producer).arg(seq);
            }
            let done = done.clone();
            async move {
                if retry {
                    let exists: bool = redis::cmd("EXISTS").arg(&done).query_async(&mut c).await?;
                    if exists {
                        return Ok(());
                    }
                }
                let (_added,): (u64,) = p.query_async(&mut c).await?;
                Ok(())
            }
        })
        .await
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
