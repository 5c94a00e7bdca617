//! Exact accounting of records: what the producers handed to the replay, what went in, what the
//! learner applied (idempotently by `(producer, seq)`), what was dropped and why, what is still in
//! flight, and what was lost (sequence numbers that nobody can account for, e.g. a Redis that came
//! back empty). The learner keeps a [`Ledger`]; the replay describes itself in a [`Census`];
//! [`settle`] classifies every produced sequence number into exactly one fate ([`Accounting`]).
//!
//! A producer's records form *streams*: `(producer id, generation)`, where the generation is
//! `seq >> 40` (a restarted producer actor continues at `generation << 40`) and the sequence
//! numbers of a stream are consecutive from its base. So "produced" per stream is a high-water
//! mark, and a gap below it that is neither applied, dropped nor in flight is a lost record.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::replay::Record;

/// Bits of a sequence number below the generation (see the critic's `generation << 40`).
pub const GENERATION_SHIFT: u32 = 40;

/// A stream of records: (producer id, generation).
pub type Stream = (u32, u64);

/// The stream of record key `(producer, seq)`.
pub fn stream_of(key: (u32, u64)) -> Stream {
    (key.0, key.1 >> GENERATION_SHIFT)
}

/// First sequence number of a stream.
pub fn stream_base(s: Stream) -> u64 {
    s.1 << GENERATION_SHIFT
}

/// Drop reasons (keys of [`Accounting::dropped`]).
pub mod reason {
    /// Memory backend: evicted by the capacity remover before it was sampled once.
    pub const CAPACITY: &str = "capacity";
    /// Handed to a replay that had closed (the run was stopping): never inserted.
    pub const CLOSED: &str = "closed_at_stop";
    /// Redis backend: the entry could not be decoded (corrupt or foreign bytes).
    pub const DECODE: &str = "decode_error";
    /// Redis backend: the entry was deleted by something else while it was pending.
    pub const DELETED: &str = "deleted_while_pending";
    /// Sampled, but fewer records than learner replicas came back: acknowledged, not applied.
    pub const SHORT_BATCH: &str = "short_batch";
}

/// A set of `u64` as sorted, disjoint, non-adjacent half-open ranges (`start -> end`): sequence
/// numbers applied in roughly increasing order stay a handful of ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeSet(BTreeMap<u64, u64>);

impl RangeSet {
    /// Whether `x` is in the set.
    pub fn contains(&self, x: u64) -> bool {
        self.0.range(..=x).next_back().is_some_and(|(_, &e)| x < e)
    }

    /// Add `x`; false if it was there already.
    pub fn insert(&mut self, x: u64) -> bool {
        if self.contains(x) {
            return false;
        }
        let mut start = x;
        let mut end = x + 1;
        if let Some((&s, &e)) = self.0.range(..x).next_back() {
            if e == x {
                start = s;
                self.0.remove(&s);
            }
        }
        if let Some(e) = self.0.remove(&end) {
            end = e;
        }
        self.0.insert(start, end);
        true
    }

    /// How many numbers the set holds.
    pub fn len(&self) -> u64 {
        self.0.iter().map(|(s, e)| e - s).sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Largest member.
    pub fn max(&self) -> Option<u64> {
        self.0.iter().next_back().map(|(_, &e)| e - 1)
    }

    /// Number of ranges (the memory it takes).
    pub fn ranges(&self) -> usize {
        self.0.len()
    }
}

/// Keys grouped by stream.
pub type KeySet = BTreeMap<Stream, RangeSet>;

fn add_key(set: &mut KeySet, key: (u32, u64)) -> bool {
    set.entry(stream_of(key)).or_default().insert(key.1)
}

fn has_key(set: &KeySet, key: (u32, u64)) -> bool {
    set.get(&stream_of(key)).is_some_and(|r| r.contains(key.1))
}

/// The learner's record of what it applied: each key once (idempotent), the uses it got, and the
/// deliveries it refused because the key had already had all its uses.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Ledger {
    /// Uses a record may get (the replay's `uses_per_record`); None = unlimited (sampling with
    /// replacement): then no delivery is a duplicate.
    pub quota: Option<u32>,
    /// Keys applied at least once.
    #[serde(with = "keyset")]
    pub applied: KeySet,
    /// Uses of keys applied fewer than `quota` times.
    #[serde(with = "partial_uses")]
    pub partial: HashMap<(u32, u64), u32>,
    /// Keys sampled but not applied, by reason (the learner's own drops).
    #[serde(with = "keyset_by_reason")]
    pub dropped: BTreeMap<String, KeySet>,
    /// Rows applied (a record used `k` times counts `k`).
    pub applications: u64,
    /// Deliveries refused because their key had had its `quota` uses already.
    pub deduplicated: u64,
    /// Distinct keys applied (the size of `applied`, kept for the per-step metrics).
    #[serde(default)]
    pub distinct: u64,
    /// The replay's redelivered and deduplicated counts of the learner processes before this one,
    /// up to the checkpoint this ledger was loaded from (a replay counts per consumer, i.e. per
    /// process; see [`Ledger::for_checkpoint`]). Constant while a process runs.
    #[serde(default)]
    pub earlier: EarlierCounts,
}

/// See [`Ledger::earlier`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EarlierCounts {
    pub redelivered: u64,
    pub deduplicated: u64,
}

/// A [`KeySet`] as a list of (producer, generation, ranges) (JSON object keys must be strings).
mod keyset {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::{KeySet, RangeSet};

    pub fn serialize<S: Serializer>(m: &KeySet, s: S) -> Result<S::Ok, S::Error> {
        let v: Vec<(u32, u64, &RangeSet)> = m.iter().map(|(k, r)| (k.0, k.1, r)).collect();
        v.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<KeySet, D::Error> {
        let v: Vec<(u32, u64, RangeSet)> = Vec::deserialize(d)?;
        Ok(v.into_iter().map(|(p, g, r)| ((p, g), r)).collect())
    }
}

/// `BTreeMap<String, KeySet>` with each set as [`keyset`] writes it.
mod keyset_by_reason {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::{KeySet, RangeSet};

    type Wire = BTreeMap<String, Vec<(u32, u64, RangeSet)>>;

    pub fn serialize<S: Serializer>(m: &BTreeMap<String, KeySet>, s: S) -> Result<S::Ok, S::Error> {
        let w: Wire = m
            .iter()
            .map(|(why, set)| {
                let v = set.iter().map(|(k, r)| (k.0, k.1, r.clone())).collect();
                (why.clone(), v)
            })
            .collect();
        w.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, KeySet>, D::Error> {
        let w = Wire::deserialize(d)?;
        Ok(w.into_iter()
            .map(|(why, v)| (why, v.into_iter().map(|(p, g, r)| ((p, g), r)).collect()))
            .collect())
    }
}

/// `partial` as a list (JSON object keys must be strings).
mod partial_uses {
    use std::collections::HashMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(m: &HashMap<(u32, u64), u32>, s: S) -> Result<S::Ok, S::Error> {
        let mut v: Vec<(u32, u64, u32)> = m.iter().map(|(k, n)| (k.0, k.1, *n)).collect();
        v.sort_unstable();
        v.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<HashMap<(u32, u64), u32>, D::Error> {
        let v: Vec<(u32, u64, u32)> = Vec::deserialize(d)?;
        Ok(v.into_iter().map(|(p, s, n)| ((p, s), n)).collect())
    }
}

impl Ledger {
    /// An empty ledger for a replay that gives each record `quota` uses (None: unlimited).
    pub fn new(quota: Option<u32>) -> Self {
        Self {
            quota,
            ..Self::default()
        }
    }

    /// Uses key `key` got so far.
    pub fn uses(&self, key: (u32, u64)) -> u32 {
        if let Some(&n) = self.partial.get(&key) {
            return n;
        }
        match (has_key(&self.applied, key), self.quota) {
            (false, _) => 0,
            (true, Some(q)) => q,
            (true, None) => 1,
        }
    }

    /// Split a sampled batch into the records to apply and the keys to refuse: a record whose key
    /// has had its `quota` uses (counting earlier copies in this batch) is a duplicate. Counts
    /// the refused ones in `deduplicated`.
    pub fn admit(&mut self, records: Vec<Record>) -> (Vec<Record>, Vec<(u32, u64)>) {
        let Some(q) = self.quota else {
            return (records, Vec::new());
        };
        let mut in_batch: HashMap<(u32, u64), u32> = HashMap::new();
        let mut keep = Vec::with_capacity(records.len());
        let mut dups = Vec::new();
        for r in records {
            let k = r.key();
            let n = in_batch.entry(k).or_insert_with(|| self.uses(k));
            if *n >= q {
                dups.push(k);
            } else {
                *n += 1;
                keep.push(r);
            }
        }
        self.deduplicated += dups.len() as u64;
        (keep, dups)
    }

    /// The records of `keys` (one entry per use) were applied by an optimiser step.
    pub fn commit(&mut self, keys: &[(u32, u64)]) {
        for &k in keys {
            self.applications += 1;
            if add_key(&mut self.applied, k) {
                self.distinct += 1;
            }
            if let Some(q) = self.quota {
                let n = self.partial.entry(k).or_insert(0);
                *n += 1;
                if *n >= q {
                    self.partial.remove(&k);
                }
            }
        }
    }

    /// The learner acknowledged `keys` without applying them, for `why`.
    pub fn drop_keys(&mut self, why: &str, keys: &[(u32, u64)]) {
        let set = self.dropped.entry(why.to_owned()).or_default();
        for &k in keys {
            add_key(set, k);
        }
    }

    /// The ledger to save in a checkpoint: this one, with this process's replay counts
    /// (`redelivered`, `deduplicated`, from the replay's stats) added to the earlier processes',
    /// so a learner started again from the checkpoint reports the run's counts.
    pub fn for_checkpoint(&self, redelivered: u64, deduplicated: u64) -> Ledger {
        let mut l = self.clone();
        l.earlier.redelivered += redelivered;
        l.earlier.deduplicated += deduplicated;
        l
    }

    /// Distinct keys applied.
    pub fn applied_count(&self) -> u64 {
        self.applied.values().map(RangeSet::len).sum()
    }

    /// Whether key `key` was applied at least once.
    pub fn is_applied(&self, key: (u32, u64)) -> bool {
        has_key(&self.applied, key)
    }
}

/// What a replay knows about the records that reached it (see `ReplayBuffer::census`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Census {
    /// Per stream: how many of its sequence numbers were handed to the replay (the high-water
    /// mark above the stream's base: inserted plus refused).
    pub produced: BTreeMap<Stream, u64>,
    /// Records inserted (accepted; repeats of an insert whose reply was lost count once).
    pub inserted: u64,
    /// Keys of records present now.
    pub present: KeySet,
    /// Keys dropped, by reason.
    pub dropped: BTreeMap<String, KeySet>,
    /// Records dropped whose key is unknown (undecodable or deleted entries), by reason.
    pub dropped_unkeyed: BTreeMap<String, u64>,
    /// Deliveries of records that had been delivered before (own pending entries re-read, entries
    /// claimed from a dead consumer).
    pub redelivered: u64,
    /// Deliveries or entries thrown away because their key was applied or held already.
    pub deduplicated: u64,
}

impl Census {
    /// Add `n` produced records of stream `s` (a high-water mark: the larger wins).
    pub fn produced_at_least(&mut self, s: Stream, n: u64) {
        let e = self.produced.entry(s).or_insert(0);
        *e = (*e).max(n);
    }
}

/// The `accounting` block of `summary.json`: every produced record has exactly one fate, so
/// `produced = applied + dropped (sum) + lost + in_flight`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accounting {
    /// Records the producers handed to the replay (per stream, its high-water mark).
    pub produced: u64,
    /// Records the replay accepted.
    pub inserted: u64,
    /// Distinct records the learner applied (each counted once, however many uses it got).
    pub applied: u64,
    /// Rows applied: a record used `k` times (samples per insert) counts `k`.
    pub applications: u64,
    /// Deliveries of a record that had been delivered before (a consumer's pending entries read
    /// again, entries claimed from a dead consumer).
    pub redelivered: u64,
    /// Deliveries thrown away because the record had already had all its uses (by the replay's
    /// key filter or the learner's ledger); they are never applied.
    pub deduplicated: u64,
    /// Records dropped, counted, by reason.
    pub dropped: BTreeMap<String, u64>,
    /// Produced records that were neither applied, dropped nor in flight: sequence gaps (records
    /// lost with a Redis that came back empty, or applied by a learner killed before its next
    /// checkpoint).
    pub lost: u64,
    /// Records still in the replay (or its consumer's window) at the end, never applied.
    pub in_flight: u64,
}

impl Accounting {
    /// Sum of `dropped`.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.values().sum()
    }

    /// Whether `produced = applied + dropped + lost + in_flight`.
    pub fn balances(&self) -> bool {
        self.produced == self.applied + self.dropped_total() + self.lost + self.in_flight
    }

    /// Add the accounting of another replay (the separate streams of one run's trainings, e.g.
    /// DF-DPO's continuations): every count adds, drops by reason.
    pub fn add(&mut self, o: &Accounting) {
        self.produced += o.produced;
        self.inserted += o.inserted;
        self.applied += o.applied;
        self.applications += o.applications;
        self.redelivered += o.redelivered;
        self.deduplicated += o.deduplicated;
        for (why, n) in &o.dropped {
            *self.dropped.entry(why.clone()).or_insert(0) += n;
        }
        self.lost += o.lost;
        self.in_flight += o.in_flight;
    }

    /// Export as Prometheus counters `tilt_records_<what>_total` (dropped by `reason`) and the
    /// gauge `tilt_records_in_flight`.
    pub fn export_metrics(&self) {
        for (name, v) in [
            ("tilt_records_produced_total", self.produced),
            ("tilt_records_inserted_total", self.inserted),
            ("tilt_records_applied_total", self.applied),
            ("tilt_records_redelivered_total", self.redelivered),
            ("tilt_records_deduplicated_total", self.deduplicated),
            ("tilt_records_lost_total", self.lost),
        ] {
            metrics::counter!(name, "role" => "learner", "actor" => "0").absolute(v);
        }
        for (why, &n) in &self.dropped {
            metrics::counter!("tilt_records_dropped_total", "role" => "learner", "actor" => "0", "reason" => why.clone())
                .absolute(n);
        }
        metrics::gauge!("tilt_records_in_flight", "role" => "learner", "actor" => "0")
            .set(self.in_flight as f64);
    }
}

/// Give every produced sequence number exactly one fate, in this order: applied (the ledger),
/// dropped with its key (by the learner, then by the replay), in flight (present in the replay),
/// else a gap. Gaps are lost records, less the drops whose key is unknown (they are gaps too, and
/// counted as dropped). A stream's produced count is the larger of the replay's and what the
/// learner saw.
pub fn settle(ledger: &Ledger, census: &Census) -> Accounting {
    let mut produced = census.produced.clone();
    for (s, r) in &ledger.applied {
        if let Some(m) = r.max() {
            let e = produced.entry(*s).or_insert(0);
            *e = (*e).max(m + 1 - stream_base(*s));
        }
    }
    let mut dropped: BTreeMap<String, u64> = census.dropped_unkeyed.clone();
    let (mut applied, mut in_flight, mut gaps) = (0u64, 0u64, 0u64);
    let keyed: Vec<(&String, &KeySet)> = ledger.dropped.iter().chain(&census.dropped).collect();
    for (&s, &n) in &produced {
        let base = stream_base(s);
        let app = ledger.applied.get(&s);
        let present = census.present.get(&s);
        let drops: Vec<(&String, &RangeSet)> = keyed
            .iter()
            .filter_map(|(why, set)| set.get(&s).map(|r| (*why, r)))
            .collect();
        for seq in base..base + n {
            if app.is_some_and(|r| r.contains(seq)) {
                applied += 1;
            } else if let Some((why, _)) = drops.iter().find(|(_, r)| r.contains(seq)) {
                *dropped.entry((*why).clone()).or_insert(0) += 1;
            } else if present.is_some_and(|r| r.contains(seq)) {
                in_flight += 1;
            } else {
                gaps += 1;
            }
        }
    }
    let unkeyed: u64 = census.dropped_unkeyed.values().sum();
    Accounting {
        produced: produced.values().sum(),
        inserted: census.inserted,
        applied,
        applications: ledger.applications,
        redelivered: census.redelivered + ledger.earlier.redelivered,
        deduplicated: census.deduplicated + ledger.deduplicated + ledger.earlier.deduplicated,
        dropped,
        lost: gaps.saturating_sub(unkeyed),
        in_flight,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::testutil::rec;

    #[test]
    fn accountings_add_count_by_count_and_keep_the_balance() {
        let a = Accounting {
            produced: 10,
            inserted: 9,
            applied: 6,
            applications: 24,
            redelivered: 1,
            deduplicated: 2,
            dropped: [("capacity".to_owned(), 2)].into(),
            lost: 1,
            in_flight: 1,
        };
        let b = Accounting {
            produced: 5,
            inserted: 5,
            applied: 3,
            applications: 12,
            redelivered: 0,
            deduplicated: 1,
            dropped: [("capacity".to_owned(), 1), ("decode".to_owned(), 1)].into(),
            lost: 0,
            in_flight: 0,
        };
        assert!(a.balances() && b.balances());
        let mut s = a.clone();
        s.add(&b);
        assert_eq!(
            (s.produced, s.inserted, s.applied, s.applications),
            (15, 14, 9, 36)
        );
        assert_eq!(
            (s.redelivered, s.deduplicated, s.lost, s.in_flight),
            (1, 3, 1, 1)
        );
        assert_eq!(
            s.dropped,
            [("capacity".to_owned(), 3), ("decode".to_owned(), 1)].into()
        );
        assert!(s.balances());
        // A broken part breaks the sum's balance.
        s.add(&Accounting {
            produced: 1,
            ..Accounting::default()
        });
        assert!(!s.balances());
    }

    #[test]
    fn range_set_merges_neighbours() {
        let mut r = RangeSet::default();
        for x in [5, 7, 6, 1, 3, 2] {
            assert!(r.insert(x));
        }
        assert!(!r.insert(6));
        // {1, 2, 3} and {5, 6, 7}: two ranges, six members.
        assert_eq!((r.ranges(), r.len(), r.max()), (2, 6, Some(7)));
        assert!(r.insert(4));
        assert_eq!(r.ranges(), 1);
        assert!(r.contains(1) && r.contains(7) && !r.contains(0) && !r.contains(8));
    }

    #[test]
    fn ledger_applies_each_key_at_most_quota_times() {
        let mut l = Ledger::new(Some(2));
        // Key (0, 1) three times in one batch: two uses, the third is a duplicate.
        let (keep, dups) = l.admit(vec![rec(0, 1), rec(0, 1), rec(0, 1), rec(0, 2)]);
        assert_eq!(keep.len(), 3);
        assert_eq!(dups, vec![(0, 1)]);
        let keys: Vec<_> = keep.iter().map(Record::key).collect();
        l.commit(&keys);
        // (0, 2) has one use left, (0, 1) none.
        let (keep, dups) = l.admit(vec![rec(0, 1), rec(0, 2), rec(0, 2)]);
        assert_eq!(keep.iter().map(Record::key).collect::<Vec<_>>(), [(0, 2)]);
        assert_eq!(dups, vec![(0, 1), (0, 2)]);
        l.commit(&[(0, 2)]);
        assert_eq!(
            (l.applied_count(), l.applications, l.deduplicated),
            (2, 4, 3)
        );
        assert_eq!(l.distinct, 2);
        assert!(l.partial.is_empty());
        // No quota: nothing is a duplicate.
        let mut free = Ledger::new(None);
        let (keep, dups) = free.admit(vec![rec(0, 1), rec(0, 1)]);
        assert_eq!((keep.len(), dups.len()), (2, 0));
        // The ledger survives a JSON round trip (it is saved with checkpoints).
        l.drop_keys(reason::SHORT_BATCH, &[(1, 9)]);
        let back: Ledger = serde_json::from_str(&serde_json::to_string(&l).unwrap()).unwrap();
        assert_eq!(back.applied, l.applied);
        assert_eq!(back.dropped, l.dropped);
        assert_eq!(back.uses((0, 2)), 2);
    }

    #[test]
    fn settle_gives_every_sequence_number_one_fate() {
        // Stream (3, 0): seqs 0..10 produced; 0..4 applied, 4 dropped by the learner, 5..7 present,
        // 7..10 gone. Stream (3, 1) (a restarted producer, base 2^40): 2 produced, 1 applied, 1
        // dropped for capacity. One undecodable entry is a gap too, so lost = 3 - 1 = 2.
        let g1 = 1u64 << GENERATION_SHIFT;
        let mut l = Ledger::new(Some(1));
        l.commit(&[(3, 0), (3, 1), (3, 2), (3, 3), (3, g1)]);
        l.drop_keys(reason::SHORT_BATCH, &[(3, 4)]);
        let mut c = Census {
            inserted: 11,
            ..Census::default()
        };
        c.produced_at_least((3, 0), 10);
        c.produced_at_least((3, 1), 2);
        for s in [5, 6] {
            add_key(&mut c.present, (3, s));
        }
        // Applied wins over present (a used record still waiting for its retirement).
        add_key(&mut c.present, (3, 0));
        add_key(
            c.dropped.entry(reason::CAPACITY.to_owned()).or_default(),
            (3, g1 + 1),
        );
        c.dropped_unkeyed.insert(reason::DECODE.to_owned(), 1);
        let a = settle(&l, &c);
        assert_eq!(
            (a.produced, a.inserted, a.applied, a.in_flight, a.lost),
            (12, 11, 5, 2, 2)
        );
        assert_eq!(
            a.dropped,
            BTreeMap::from([
                (reason::CAPACITY.to_owned(), 1),
                (reason::DECODE.to_owned(), 1),
                (reason::SHORT_BATCH.to_owned(), 1),
            ])
        );
        assert!(a.balances(), "{a:?}");
        // The learner saw seq 12 of a stream the census does not know: produced grows to 13.
        l.commit(&[(4, 12)]);
        let b = settle(&l, &c);
        assert_eq!((b.produced, b.lost), (25, 14));
        assert!(b.balances());
    }

    #[test]
    fn replay_counts_of_earlier_processes_carry_through_checkpoints() {
        // Process 1 saw 3 redeliveries and 1 duplicate by the replay's filter, and its ledger
        // refused 2 deliveries itself; its checkpoint carries the replay's counts.
        let mut l = Ledger::new(Some(1));
        l.commit(&[(0, 0)]);
        l.admit(vec![
            crate::replay::testutil::rec(0, 0),
            crate::replay::testutil::rec(0, 0),
        ]);
        assert_eq!(l.deduplicated, 2);
        let saved = l.for_checkpoint(3, 1);
        assert_eq!(
            l.earlier,
            EarlierCounts::default(),
            "the live ledger is unchanged"
        );
        let back: Ledger = serde_json::from_str(&serde_json::to_string(&saved).unwrap()).unwrap();
        assert_eq!(
            back.earlier,
            EarlierCounts {
                redelivered: 3,
                deduplicated: 1
            }
        );
        // Process 2 (started from that checkpoint) saw 2 redeliveries and 4 duplicates itself.
        let c = Census {
            redelivered: 2,
            deduplicated: 4,
            ..Census::default()
        };
        let a = settle(&back, &c);
        assert_eq!((a.redelivered, a.deduplicated), (3 + 2, 1 + 4 + 2));
        // Its next checkpoint adds its own counts once.
        let again = back.for_checkpoint(2, 4);
        assert_eq!(
            again.earlier,
            EarlierCounts {
                redelivered: 5,
                deduplicated: 5
            }
        );
        // A ledger saved before this field existed reads as no earlier counts.
        let mut v: serde_json::Value = serde_json::to_value(&l).unwrap();
        v.as_object_mut().unwrap().remove("earlier");
        let old: Ledger = serde_json::from_value(v).unwrap();
        assert_eq!(old.earlier, EarlierCounts::default());
    }
}
