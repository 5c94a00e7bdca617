//! What one consumer holds locally: the window of delivered records with the uses each has left,
//! the memory of applied keys, and the entries queued for retirement or as dropped.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use rand::rngs::StdRng;
use rand::Rng;
use tokio::time::Instant;

use super::parse::{Delivery, EntryId};
use crate::accounting::{reason, KeySet};
use crate::replay::{Record, Sampler};

/// A delivered record this consumer holds (its entry is pending in its name).
pub(super) struct Slot {
    pub(super) rec: Record,
    /// Hand-outs left that the limiter counts.
    pub(super) counted: u32,
    /// Hand-outs left that it does not count: one more use of a redelivered record whose uses
    /// were all spent by a consumer that died before acknowledging it.
    pub(super) extra: u32,
    /// Handed out and not yet acknowledged by the learner.
    pub(super) outstanding: bool,
}

impl Slot {
    pub(super) fn left(&self) -> u32 {
        self.counted + self.extra
    }
}

/// Keys acknowledged as applied, the most recent `cap` of them (see [`RedisReplay`] on why a
/// bounded memory suffices).
pub(super) struct RecentKeys {
    set: HashSet<(u32, u64)>,
    order: VecDeque<(u32, u64)>,
    cap: usize,
}

impl RecentKeys {
    pub(super) fn new(cap: usize) -> Self {
        Self {
            set: HashSet::new(),
            order: VecDeque::new(),
            cap,
        }
    }

    pub(super) fn contains(&self, k: &(u32, u64)) -> bool {
        self.set.contains(k)
    }

    pub(super) fn insert(&mut self, k: (u32, u64)) {
        if self.set.insert(k) {
            self.order.push_back(k);
            while self.order.len() > self.cap {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }
}

pub(super) struct Local {
    /// Held records in stream order.
    pub(super) slots: BTreeMap<EntryId, Slot>,
    /// Entry of each held record.
    pub(super) by_key: HashMap<(u32, u64), EntryId>,
    pub(super) applied: RecentKeys,
    /// Applied (or duplicate) entries still to XACK + XDEL.
    pub(super) retire: Vec<EntryId>,
    /// Deleted-while-pending or unreadable entries still to record as dropped, with the reason.
    pub(super) drop: Vec<(EntryId, &'static str)>,
    /// Re-read this consumer's pending entries before anything new: true at start and after any
    /// read whose reply may have been lost.
    pub(super) reread_own: bool,
    pub(super) last_claim: Option<Instant>,
    pub(super) rng: StdRng,
    /// Accounting in this process.
    pub(super) counts: Counts,
}

/// What one process of a run counts for exact accounting (see [`crate::accounting`]).
#[derive(Debug, Default)]
pub(super) struct Counts {
    /// Deliveries of entries delivered before (own pending re-read, claimed).
    pub(super) redelivered: u64,
    /// Deliveries thrown away by the key filter.
    pub(super) deduplicated: u64,
    /// Producer streams' high-water marks of records handed to `insert` here, refused ones
    /// included (the `produced` hash only knows inserted ones).
    pub(super) handed: std::collections::BTreeMap<(u32, u64), u64>,
    /// Keys refused because the replay had closed.
    pub(super) refused: KeySet,
}

impl Counts {
    /// Records of `keys` were handed to `insert` and refused: the replay had closed.
    pub(super) fn refuse(&mut self, keys: impl IntoIterator<Item = (u32, u64)>) {
        use crate::accounting::{stream_base, stream_of};
        for k in keys {
            let s = stream_of(k);
            let e = self.handed.entry(s).or_insert(0);
            *e = (*e).max(k.1 - stream_base(s) + 1);
            self.refused.entry(s).or_default().insert(k.1);
        }
    }
}

impl Local {
    /// Take a delivered entry into the window, or queue it for retirement or as dropped.
    /// `prior` = hand-outs already counted for it (0 for a first delivery); `again` = it may
    /// have been delivered before (own pending entries, claimed entries).
    pub(super) fn admit(&mut self, d: Delivery, prior: u32, uses: u32, again: bool) {
        if self.slots.contains_key(&d.id) {
            return;
        }
        if again {
            self.counts.redelivered += 1;
        }
        let Some(bytes) = d.payload else {
            self.drop.push((d.id, reason::DELETED));
            return;
        };
        let Ok(rec) = Record::decode_owned(bytes) else {
            self.drop.push((d.id, reason::DECODE));
            return;
        };
        let key = rec.key();
        if self.applied.contains(&key) || self.by_key.contains_key(&key) {
            // A redelivery of a record already applied, or a second entry of a key held now:
            // never hand it out; remove its entry (its unspent uses count as sampled, see
            // RETIRE_LUA).
            self.counts.deduplicated += 1;
            self.retire.push(d.id);
            return;
        }
        let (counted, extra) = if prior < uses {
            (uses - prior, 0)
        } else {
            (0, 1)
        };
        self.by_key.insert(key, d.id);
        self.slots.insert(
            d.id,
            Slot {
                rec,
                counted,
                extra,
                outstanding: false,
            },
        );
    }

    pub(super) fn remove(&mut self, id: &EntryId) -> Option<Slot> {
        let slot = self.slots.remove(id)?;
        if self.by_key.get(&slot.rec.key()) == Some(id) {
            self.by_key.remove(&slot.rec.key());
        }
        Some(slot)
    }

    /// Hand-outs one call for `n` could make now (the memory backend's rule).
    pub(super) fn available(&self, n: usize, sampler: Sampler) -> usize {
        match sampler {
            Sampler::Fifo => self.slots.values().filter(|s| s.left() > 0).take(n).count(),
            Sampler::Uniform => {
                let uses: u64 = self.slots.values().map(|s| u64::from(s.left())).sum();
                n.min(usize::try_from(uses).unwrap_or(usize::MAX))
            }
        }
    }

    /// Choose up to `n` hand-outs: (entry, counted by the limiter). FIFO: the oldest held records,
    /// each at most once per call; uniform: with replacement among held records with uses left.
    pub(super) fn plan(&mut self, n: usize, sampler: Sampler) -> Vec<(EntryId, bool)> {
        let mut picks = Vec::new();
        match sampler {
            Sampler::Fifo => {
                for (id, s) in &self.slots {
                    if picks.len() == n {
                        break;
                    }
                    if s.left() > 0 {
                        picks.push((*id, s.counted > 0));
                    }
                }
            }
            Sampler::Uniform => {
                let mut cand: Vec<(EntryId, u32, u32)> = self
                    .slots
                    .iter()
                    .filter(|(_, s)| s.left() > 0)
                    .map(|(id, s)| (*id, s.counted, s.extra))
                    .collect();
                while picks.len() < n && !cand.is_empty() {
                    let i = self.rng.random_range(0..cand.len());
                    let c = &mut cand[i];
                    let counted = c.1 > 0;
                    if counted {
                        c.1 -= 1;
                    } else {
                        c.2 -= 1;
                    }
                    picks.push((c.0, counted));
                    if c.1 + c.2 == 0 {
                        cand.swap_remove(i);
                    }
                }
            }
        }
        picks
    }

    /// Spend the planned uses and return the records (entries lost meanwhile are skipped).
    pub(super) fn hand_out(&mut self, picks: &[(EntryId, bool)]) -> Vec<Record> {
        let mut out = Vec::with_capacity(picks.len());
        for (id, counted) in picks {
            let Some(slot) = self.slots.get_mut(id) else {
                continue;
            };
            if *counted && slot.counted > 0 {
                slot.counted -= 1;
            } else if slot.extra > 0 {
                slot.extra -= 1;
            } else if slot.counted > 0 {
                slot.counted -= 1;
            } else {
                continue;
            }
            slot.outstanding = true;
            if slot.left() == 0 {
                // Its last hand-out: the payload moves out (the slot keeps only what `ack`
                // and `remove` read: the key).
                out.push(Record {
                    payload: std::mem::take(&mut slot.rec.payload),
                    scalars: std::mem::take(&mut slot.rec.scalars),
                    ..slot.rec
                });
            } else {
                out.push(slot.rec.clone());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::testutil::rec;
    use rand::SeedableRng;

    #[test]
    fn admit_never_holds_an_applied_or_held_key_twice() {
        // Idempotence point 2: a redelivery of an applied key, or a second entry of a held key,
        // is queued for retirement and never handed out; a deleted or corrupt entry is dropped;
        // a redelivery whose counted uses are spent gets one uncounted use.
        let mut l = Local {
            slots: BTreeMap::new(),
            by_key: HashMap::new(),
            applied: RecentKeys::new(4),
            retire: Vec::new(),
            drop: Vec::new(),
            reread_own: false,
            last_claim: None,
            rng: StdRng::seed_from_u64(0),
            counts: Counts::default(),
        };
        let id = |seq| EntryId { ms: 1, seq };
        let d = |seq: u64, r: Record| Delivery {
            id: id(seq),
            payload: Some(r.encode()),
        };
        l.applied.insert((0, 1));
        l.admit(d(1, rec(0, 1)), 0, 2, true); // already applied
        l.admit(d(2, rec(0, 2)), 0, 2, false); // new: held with 2 counted uses
        l.admit(d(3, rec(0, 2)), 0, 2, false); // same key as entry 2
        l.admit(d(2, rec(0, 2)), 0, 2, true); // entry 2 again (own pending re-read): ignored
        l.admit(d(4, rec(0, 4)), 2, 2, true); // claimed with both uses spent: one uncounted use
        l.admit(
            Delivery {
                id: id(5),
                payload: None,
            },
            0,
            2,
            true,
        ); // deleted while pending
        l.admit(
            Delivery {
                id: id(6),
                payload: Some(vec![1, 2, 3]),
            },
            0,
            2,
            false,
        ); // corrupt
        assert_eq!(l.retire, vec![id(1), id(3)]);
        assert_eq!(
            l.drop,
            vec![(id(5), reason::DELETED), (id(6), reason::DECODE)]
        );
        // Redelivered: entries 1, 4 and 5 (entry 2's re-read is one it holds); deduplicated:
        // entries 1 and 3.
        assert_eq!((l.counts.redelivered, l.counts.deduplicated), (3, 2));
        assert_eq!(l.slots.len(), 2);
        assert_eq!((l.slots[&id(2)].counted, l.slots[&id(2)].extra), (2, 0));
        assert_eq!((l.slots[&id(4)].counted, l.slots[&id(4)].extra), (0, 1));
        // FIFO plan: oldest first, each once per call, entry 4's use uncounted.
        assert_eq!(
            l.plan(5, Sampler::Fifo),
            vec![(id(2), true), (id(4), false)]
        );
        // Uniform: with replacement, never more than the uses left (2 + 1).
        assert_eq!(l.plan(10, Sampler::Uniform).len(), 3);
        // The applied memory is bounded: the oldest key is forgotten past `cap`.
        for s in 10..14 {
            l.applied.insert((9, s));
        }
        assert!(!l.applied.contains(&(0, 1)) && l.applied.contains(&(9, 13)));
    }
}
