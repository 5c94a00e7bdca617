//! `MemoryReplay`: the bounded in-process backend, with a blocking Reverb-style rate limiter and
//! a FIFO remover.

use std::collections::BTreeMap;
use std::pin::pin;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::limiter::RateLimiter;
use super::{Record, ReplayBackend, ReplayBuffer, ReplayConfig, ReplayStats, Sampler};
use crate::accounting::{reason, stream_base, stream_of, Census, KeySet};
use crate::{ActorError, Result};

/// The in-process, bounded replay backend.
///
/// **Rate limiter.** [`RateLimiter`]: Reverb's `SampleToInsertRatio(samples_per_insert,
/// min_size_to_sample, error_buffer)`, blocking rather than dropping, with samples counted in
/// records (the same definition the redis backend evaluates in Lua). With
/// `spi = samples_per_insert`,
/// `min_diff = min_size * spi - error_buffer` and `max_diff = min_size * spi + error_buffer`:
/// - an insert may proceed iff `(inserts + 1) * spi - samples <= max_diff`, else it waits;
/// - a sample of `n` records may proceed iff `inserts >= min_size` and
///   `inserts * spi - (samples + n) >= min_diff`, else it waits.
///
/// `inserts` and `samples` are totals since the start (so `min_size` counts inserts, not the
/// current depth, and a drained FIFO buffer stays sampleable). With `spi == 0` there is no ratio
/// limit: inserts never wait and sampling needs only `min_size` inserts. A call for `n` records
/// with `n + spi > 2 * error_buffer` is refused, because then a waiting insert and a waiting sample
/// can block each other for good.
///
/// **Removal.** When the buffer is full an insert evicts the oldest record (Reverb's FIFO remover);
/// a record is also removed once sampled `max_times_sampled` times (when > 0). The two interact
/// through the limiter: it bounds how far inserts run ahead of samples
/// (`inserts * spi - samples <= max_diff`), not the depth. With `max_times_sampled = 0` nothing
/// leaves but by eviction, so once `capacity` is reached each insert evicts the oldest record,
/// and a record lives for `capacity` inserts, during which about `capacity * spi` samples are
/// drawn: on average `spi` per record, as the ratio intends. With `max_times_sampled = k > 0`
/// (validated `spi <= k`) records also leave after `k` samples; with `k = spi = 1` (either
/// sampler) every sampled record leaves, so `depth = inserts - samples <= max_diff = min_size +
/// error_buffer`, and a `capacity` at least that never evicts a record before it is sampled.
/// Evictions of never-sampled records are counted in `dropped`: they mean an undersized buffer.
/// With `spi == 0` inserts never wait and, when full, simply evict the oldest.
///
/// **Closing.** `close` wakes every waiter: inserts fail with `Closed`; samples keep being served
/// while records are available and the limiter allows (a drain), then fail with `Closed`.
pub struct MemoryReplay {
    cfg: ReplayConfig,
    limiter: RateLimiter,
    state: Mutex<State>,
    /// Woken by inserts and close: what a waiting sampler waits for.
    sample_wakeup: Notify,
    /// Woken by samples and close: what a waiting inserter waits for.
    insert_wakeup: Notify,
}

/// A present record and how often it has been handed out.
struct Slot {
    rec: Record,
    times: u32,
    /// Position of this record's id in `State::ids`.
    idx: usize,
}

struct State {
    /// Present records by arrival number: the first entry is the oldest.
    slots: BTreeMap<u64, Slot>,
    /// Arrival numbers of present records, dense, for O(1) uniform picks.
    ids: Vec<u64>,
    next_id: u64,
    /// Sum of `times` over present records (how many uses of them are spent).
    times_present: u64,
    inserts: u64,
    samples: u64,
    evicted: u64,
    dropped: u64,
    closed: bool,
    rng: StdRng,
    /// Accounting: per producer stream, how many sequence numbers were handed to `insert`.
    produced: BTreeMap<(u32, u64), u64>,
    /// Accounting: keys evicted before their first sample (the `dropped` count).
    dropped_keys: KeySet,
    /// Accounting: keys refused because the buffer had closed.
    refused: KeySet,
}

impl State {
    fn depth(&self) -> usize {
        self.slots.len()
    }

    /// Accounting: a record with key `key` was handed to `insert`.
    fn handed(&mut self, key: (u32, u64)) {
        let s = stream_of(key);
        let n = key.1 - stream_base(s) + 1;
        let e = self.produced.entry(s).or_insert(0);
        *e = (*e).max(n);
    }

    fn push(&mut self, rec: Record, capacity: usize) {
        while self.depth() >= capacity {
            let Some(oldest) = self.slots.keys().next().copied() else {
                break;
            };
            if let Some(slot) = self.remove(oldest) {
                if slot.times == 0 {
                    self.dropped += 1;
                    let k = slot.rec.key();
                    self.dropped_keys
                        .entry(stream_of(k))
                        .or_default()
                        .insert(k.1);
                }
            }
        }
        self.handed(rec.key());
        let id = self.next_id;
        self.next_id += 1;
        self.ids.push(id);
        self.slots.insert(
            id,
            Slot {
                rec,
                times: 0,
                idx: self.ids.len() - 1,
            },
        );
        self.inserts += 1;
    }

    /// Remove a present record, keeping `ids` dense (swap-remove) and the counters right.
    fn remove(&mut self, id: u64) -> Option<Slot> {
        let slot = self.slots.remove(&id)?;
        self.ids.swap_remove(slot.idx);
        if let Some(&moved) = self.ids.get(slot.idx) {
            if let Some(s) = self.slots.get_mut(&moved) {
                s.idx = slot.idx;
            }
        }
        self.times_present -= u64::from(slot.times);
        self.evicted += 1;
        Some(slot)
    }

    /// How many of `n` requested records one call can hand out now.
    fn available(&self, n: usize, sampler: Sampler, max_times: u32) -> usize {
        let depth = self.depth();
        if depth == 0 {
            return 0;
        }
        match (sampler, max_times) {
            (Sampler::Fifo, _) => n.min(depth),
            (Sampler::Uniform, 0) => n,
            (Sampler::Uniform, k) => {
                // Every present record has at least one use left (it is removed at k).
                let uses = (depth as u64)
                    .saturating_mul(u64::from(k))
                    .saturating_sub(self.times_present);
                n.min(usize::try_from(uses).unwrap_or(usize::MAX))
            }
        }
    }

    /// Count one more use of record `id`; hand it out, removing it if it reached `max_times`.
    fn hand_out(&mut self, id: u64, max_times: u32) -> Option<Record> {
        let slot = self.slots.get_mut(&id)?;
        slot.times += 1;
        self.times_present += 1;
        if max_times > 0 && slot.times >= max_times {
            self.remove(id).map(|s| s.rec)
        } else {
            Some(slot.rec.clone())
        }
    }

    fn take(&mut self, m: usize, sampler: Sampler, max_times: u32) -> Vec<Record> {
        let mut out = Vec::with_capacity(m);
        match sampler {
            Sampler::Fifo => {
                let oldest: Vec<u64> = self.slots.keys().take(m).copied().collect();
                out.extend(
                    oldest
                        .into_iter()
                        .filter_map(|id| self.hand_out(id, max_times)),
                );
            }
            Sampler::Uniform => {
                while out.len() < m && !self.ids.is_empty() {
                    let id = self.ids[self.rng.random_range(0..self.ids.len())];
                    if let Some(rec) = self.hand_out(id, max_times) {
                        out.push(rec);
                    }
                }
            }
        }
        self.samples += out.len() as u64;
        out
    }

    fn stats(&self) -> ReplayStats {
        ReplayStats {
            inserted: self.inserts,
            sampled: self.samples,
            evicted: self.evicted,
            depth: self.depth() as u64,
            dropped: self.dropped,
            ..ReplayStats::default()
        }
    }
}

/// What one look at the state allows a sampler to do.
enum Attempt {
    Took(Vec<Record>),
    Wait,
    Closed,
}

impl MemoryReplay {
    /// A new, empty buffer; the config is validated and must name the "memory" backend.
    pub fn new(cfg: ReplayConfig) -> Result<Self> {
        cfg.validate().map_err(ActorError::Replay)?;
        if cfg.backend != ReplayBackend::Memory {
            return Err(ActorError::Replay(format!(
                "replay.backend = {:?}: MemoryReplay serves only \"memory\"",
                cfg.backend
            )));
        }
        let state = State {
            slots: BTreeMap::new(),
            ids: Vec::new(),
            next_id: 0,
            times_present: 0,
            inserts: 0,
            samples: 0,
            evicted: 0,
            dropped: 0,
            closed: false,
            rng: StdRng::seed_from_u64(cfg.seed),
            produced: BTreeMap::new(),
            dropped_keys: KeySet::new(),
            refused: KeySet::new(),
        };
        Ok(Self {
            limiter: RateLimiter::new(&cfg),
            cfg,
            state: Mutex::new(state),
            sample_wakeup: Notify::new(),
            insert_wakeup: Notify::new(),
        })
    }

    /// The config this buffer was built from.
    pub fn config(&self) -> &ReplayConfig {
        &self.cfg
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>> {
        self.state
            .lock()
            .map_err(|_| ActorError::Replay("memory replay state poisoned by a panic".to_owned()))
    }

    /// One look under the lock; never waits.
    fn try_sample(&self, n: usize) -> Result<Attempt> {
        let mut st = self.lock()?;
        let m = st.available(n, self.cfg.sampler, self.cfg.max_times_sampled);
        if m > 0 && self.limiter.can_sample(st.inserts, st.samples, m as u64) {
            let out = st.take(m, self.cfg.sampler, self.cfg.max_times_sampled);
            return Ok(Attempt::Took(out));
        }
        // Once closed no insert comes, and samples only tighten the limiter and shrink the
        // buffer, so what cannot be sampled now never can.
        Ok(if st.closed {
            Attempt::Closed
        } else {
            Attempt::Wait
        })
    }
}

#[async_trait::async_trait]
impl ReplayBuffer for MemoryReplay {
    async fn insert(&self, rec: Record) -> Result<()> {
        loop {
            // Register for a wake-up before looking, so a sample between the look and the
            // await is not missed.
            let mut woken = pin!(self.insert_wakeup.notified());
            woken.as_mut().enable();
            {
                let mut st = self.lock()?;
                if st.closed {
                    let k = rec.key();
                    st.handed(k);
                    st.refused.entry(stream_of(k)).or_default().insert(k.1);
                    return Err(ActorError::Closed);
                }
                if self.limiter.can_insert(st.inserts, st.samples) {
                    st.push(rec, self.cfg.capacity);
                    drop(st);
                    self.sample_wakeup.notify_waiters();
                    return Ok(());
                }
            }
            woken.await;
        }
    }

    async fn insert_many(&self, records: Vec<Record>) -> Result<()> {
        let mut rest = records.into_iter();
        while let Some(rec) = rest.next() {
            if let Err(e) = self.insert(rec).await {
                if matches!(e, ActorError::Closed) {
                    // Accounting: the whole rest of the batch was handed over and refused.
                    let mut st = self.lock()?;
                    for r in rest {
                        let k = r.key();
                        st.handed(k);
                        st.refused.entry(stream_of(k)).or_default().insert(k.1);
                    }
                }
                return Err(e);
            }
        }
        Ok(())
    }

    async fn sample(&self, n: usize, timeout: Duration) -> Result<Option<Vec<Record>>> {
        if n == 0 {
            return Ok(Some(Vec::new()));
        }
        self.limiter.check_batch(n).map_err(ActorError::Replay)?;
        // `None` = no deadline (a timeout too large to add to now).
        let deadline = Instant::now().checked_add(timeout);
        loop {
            let mut woken = pin!(self.sample_wakeup.notified());
            woken.as_mut().enable();
            match self.try_sample(n)? {
                Attempt::Took(out) => {
                    self.insert_wakeup.notify_waiters();
                    return Ok(Some(out));
                }
                Attempt::Closed => return Err(ActorError::Closed),
                Attempt::Wait => {}
            }
            match deadline {
                Some(d) if Instant::now() >= d => return Ok(None),
                // On a timeout the loop looks once more, then returns None above.
                Some(d) => {
                    let _ = tokio::time::timeout_at(d, woken).await;
                }
                None => woken.await,
            }
        }
    }

    async fn ack(&self, _keys: &[(u32, u64)]) -> Result<()> {
        Ok(())
    }

    fn uses_per_record(&self) -> Option<u32> {
        (self.cfg.max_times_sampled > 0).then_some(self.cfg.max_times_sampled)
    }

    async fn census(&self) -> Result<Census> {
        let st = self.lock()?;
        let mut present = KeySet::new();
        for slot in st.slots.values() {
            let k = slot.rec.key();
            present.entry(stream_of(k)).or_default().insert(k.1);
        }
        let mut dropped = BTreeMap::new();
        for (why, set) in [
            (reason::CAPACITY, &st.dropped_keys),
            (reason::CLOSED, &st.refused),
        ] {
            if !set.is_empty() {
                dropped.insert(why.to_owned(), set.clone());
            }
        }
        Ok(Census {
            produced: st.produced.clone(),
            inserted: st.inserts,
            present,
            dropped,
            ..Census::default()
        })
    }

    fn stats(&self) -> ReplayStats {
        // Counters stay readable even if a panic poisoned the lock.
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .stats()
    }

    fn close(&self) {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .closed = true;
        self.insert_wakeup.notify_waiters();
        self.sample_wakeup.notify_waiters();
    }
}

#[cfg(test)]
mod tests;
