//! The Redis backend of [`ReplayBuffer`]: one Redis Stream per run, read through a consumer group,
//! so roles in separate processes or machines meet through Redis. Capacity is back-pressure (never
//! trimming), the rate limiter's counters live in Redis, redeliveries are filtered by key.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{
    AsyncConnectionConfig, Client, ErrorKind, RedisError, RedisResult, Script, ServerErrorKind,
    Value,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::replay::{Record, ReplayBuffer, ReplayConfig, ReplayStats, Sampler};
use crate::{ActorError, Result};

/// Consumer group every learner of a run reads through.
const GROUP: &str = "learners";
/// The one field of a stream entry: the record's [`Record::encode`] bytes.
const FIELD: &str = "r";
/// Timeout of the first connection attempt and of each reconnection attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Response timeout of the command connection (scripts, XACK, non-blocking reads).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest BLOCK of one XREADGROUP; a sample waits in several such reads.
const BLOCK_CAP: Duration = Duration::from_secs(1);
/// Response timeout of the blocking connection: longer than any BLOCK it sends (redis-rs'
/// default of 500 ms would cut a 1 s BLOCK short).
const BLOCKING_TIMEOUT: Duration = Duration::from_secs(11);
/// Polling of a waiting producer (stream full, limiter) or sampler (limiter): first and largest
/// pause between looks.
const POLL_MIN: Duration = Duration::from_millis(2);
const POLL_MAX: Duration = Duration::from_millis(50);
/// Pause between retries while Redis is unreachable: first and largest.
const RETRY_MIN: Duration = Duration::from_millis(20);
const RETRY_MAX: Duration = Duration::from_secs(1);
/// Entries asked for by one XREADGROUP or XAUTOCLAIM page.
const READ_BATCH: usize = 512;
/// Entry ids handed to one script call.
const SCRIPT_BATCH: usize = 1000;
/// XAUTOCLAIM pages read in one maintenance pass.
const CLAIM_PAGES: usize = 8;
/// How long a sample reservation's nonce key lives (it only has to outlive a retry).
const NONCE_TTL_MS: u64 = 30_000;
/// Period of the stats refresh of the background task (the heartbeat may run more often).
const STATS_PERIOD: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------------------------
// Lua scripts: each runs atomically, and each is safe to run twice (a retry after a lost reply).
// ---------------------------------------------------------------------------------------------

/// Insert one record unless the stream is full, the ratio limiter forbids it, or it repeats the
/// producer's last inserted key (a retry of an insert whose reply was lost).
/// KEYS: stream, inserts, samples, last-seq hash. ARGV: payload, producer, seq, capacity, spi,
/// max_diff. Returns {status, stream length}.
const INSERT_LUA: &str = r"
if redis.call('HGET', KEYS[4], ARGV[2]) == ARGV[3] then
  return {'dup', redis.call('XLEN', KEYS[1])}
end
local len = redis.call('XLEN', KEYS[1])
if len >= tonumber(ARGV[4]) then return {'full', len} end
local spi = tonumber(ARGV[5])
if spi > 0 then
  local ins = tonumber(redis.call('GET', KEYS[2]) or '0')
  local smp = tonumber(redis.call('GET', KEYS[3]) or '0')
  if (ins + 1) * spi - smp > tonumber(ARGV[6]) then return {'limit', len} end
end
redis.call('XADD', KEYS[1], '*', 'r', ARGV[1])
redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[4], ARGV[2], ARGV[3])
return {'ok', len + 1}
";

/// Reserve `counted` samples if the limiter allows, and count one hand-out per listed entry.
/// KEYS: inserts, samples, uses hash, nonce. ARGV: min_size, spi, min_diff, counted, nonce ttl
/// (ms), entry ids (one per hand-out). Returns {granted 0/1, inserts, samples} (-1 = replayed).
const RESERVE_LUA: &str = r"
if redis.call('EXISTS', KEYS[4]) == 1 then return {1, -1, -1} end
local ins = tonumber(redis.call('GET', KEYS[1]) or '0')
local smp = tonumber(redis.call('GET', KEYS[2]) or '0')
local m = tonumber(ARGV[4])
if m > 0 then
  if ins < tonumber(ARGV[1]) then return {0, ins, smp} end
  local spi = tonumber(ARGV[2])
  if spi > 0 and ins * spi - (smp + m) < tonumber(ARGV[3]) then return {0, ins, smp} end
  redis.call('INCRBY', KEYS[2], m)
end
for i = 6, #ARGV do redis.call('HINCRBY', KEYS[3], ARGV[i], 1) end
redis.call('SET', KEYS[4], '1', 'PX', ARGV[5])
return {1, ins, smp + m}
";

/// Retire applied entries: XACK + XDEL together, so an entry is never left acknowledged but
/// present, nor deleted but pending. KEYS: stream, uses hash, evicted. ARGV: group, ids.
/// Returns {entries deleted now, stream length}.
const RETIRE_LUA: &str = r"
local n = 0
for i = 2, #ARGV do
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
  n = n + redis.call('XDEL', KEYS[1], ARGV[i])
  redis.call('HDEL', KEYS[2], ARGV[i])
end
if n > 0 then redis.call('INCRBY', KEYS[3], n) end
return {n, redis.call('XLEN', KEYS[1])}
";

/// Record entries as dropped (deleted while pending, or unreadable) and clear them out.
/// KEYS: stream, dropped set, uses hash. ARGV: group, ids. Returns the number dropped so far.
const DROP_LUA: &str = r"
for i = 2, #ARGV do
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
  redis.call('XDEL', KEYS[1], ARGV[i])
  redis.call('HDEL', KEYS[3], ARGV[i])
  redis.call('SADD', KEYS[2], ARGV[i])
end
return redis.call('SCARD', KEYS[2])
";

/// Reset the idle time of entries this consumer still owns, so no one claims them while they are
/// in use; return the ids it no longer owns. KEYS: stream. ARGV: group, consumer, ids.
const HEARTBEAT_LUA: &str = r"
local lost = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] ~= nil and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  else
    lost[#lost + 1] = ARGV[i]
  end
end
return lost
";

struct Scripts {
    insert: Script,
    reserve: Script,
    retire: Script,
    drop: Script,
    heartbeat: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            insert: Script::new(INSERT_LUA),
            reserve: Script::new(RESERVE_LUA),
            retire: Script::new(RETIRE_LUA),
            drop: Script::new(DROP_LUA),
            heartbeat: Script::new(HEARTBEAT_LUA),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Public helpers
// ---------------------------------------------------------------------------------------------

/// `url` with its password replaced by `***`, for errors and logs: the password of the userinfo
/// (`redis://user:pw@host`, `redis://:pw@host`) and `pass=` / `password=` query parameters
/// (the unix-socket form). Everything else is kept.
pub fn redact(url: &str) -> String {
    let mut secrets: Vec<(usize, usize)> = password_ranges(url);
    secrets.sort_unstable();
    let mut out = String::with_capacity(url.len());
    let mut at = 0;
    for (start, end) in secrets {
        if start < at {
            continue;
        }
        out.push_str(&url[at..start]);
        out.push_str("***");
        at = end;
    }
    out.push_str(&url[at..]);
    out
}

/// Byte ranges of `url` that hold a password.
fn password_ranges(url: &str) -> Vec<(usize, usize)> {
    let body = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[body..];
    let mut ranges = Vec::new();
    // Userinfo: up to the last '@'. A ':' before any '/' separates user and password; the
    // password itself may hold any character ('@', '/', '?' unencoded included).
    if let Some(at) = rest.rfind('@') {
        let userinfo = &rest[..at];
        if let Some(colon) = userinfo.find(':') {
            if !userinfo[..colon].contains('/') && colon + 1 < at {
                ranges.push((body + colon + 1, body + at));
            }
        }
    }
    // Query parameters after the first '?' that is not inside the userinfo password.
    let query_from = ranges.first().map_or(body, |&(_, end)| end);
    if let Some(q) = url[query_from..].find('?') {
        let mut pos = query_from + q + 1;
        for param in url[pos..].split('&') {
            if let Some((name, value)) = param.split_once('=') {
                let name = name.to_ascii_lowercase();
                if (name == "pass" || name == "password") && !value.is_empty() {
                    let start = pos + param.len() - value.len();
                    ranges.push((start, start + value.len()));
                }
            }
            pos += param.len() + 1;
        }
    }
    ranges
}

/// Timing of the Redis backend's failure handling (not part of `[replay]`).
#[derive(Debug, Clone, PartialEq)]
pub struct RedisOptions {
    /// A pending entry idle longer than this is taken over (XAUTOCLAIM) from its consumer, which
    /// is presumed dead; live consumers refresh the entries they hold every third of it. Every
    /// process of a run must use the same value.
    pub claim_idle: Duration,
    /// How long Redis may stay unreachable before an operation fails instead of retrying.
    pub max_outage: Duration,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            claim_idle: Duration::from_secs(30),
            max_outage: Duration::from_secs(60),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Stream entries
// ---------------------------------------------------------------------------------------------

/// A stream entry id `ms-seq`; ordered as Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct EntryId {
    ms: u64,
    seq: u64,
}

impl EntryId {
    const ZERO: EntryId = EntryId { ms: 0, seq: 0 };

    fn parse(bytes: &[u8]) -> Option<Self> {
        let s = std::str::from_utf8(bytes).ok()?;
        let (ms, seq) = s.split_once('-')?;
        Some(Self {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// One entry as read: `payload` is None when the entry was deleted while still pending.
struct Delivery {
    id: EntryId,
    payload: Option<Vec<u8>>,
}

fn bytes_of(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn items(v: Value) -> std::result::Result<Vec<Value>, String> {
    match v {
        Value::Nil => Ok(Vec::new()),
        Value::Array(a) | Value::Set(a) => Ok(a),
        other => Err(format!("expected an array, got {other:?}")),
    }
}

fn parse_id(v: &Value) -> std::result::Result<EntryId, String> {
    bytes_of(v)
        .and_then(EntryId::parse)
        .ok_or_else(|| format!("bad stream entry id {v:?}"))
}

/// `[id, [field, value, ...]]` or `[id, nil]`.
fn parse_entry(v: Value) -> std::result::Result<Option<Delivery>, String> {
    let parts = match v {
        Value::Nil => return Ok(None),
        other => items(other)?,
    };
    let mut parts = parts.into_iter();
    let id = parse_id(&parts.next().ok_or("empty stream entry")?)?;
    let payload = match parts.next() {
        None | Some(Value::Nil) => None,
        Some(Value::Map(pairs)) => Some(
            pairs
                .into_iter()
                .find(|(k, _)| bytes_of(k) == Some(FIELD.as_bytes()))
                .and_then(|(_, v)| bytes_of(&v).map(<[u8]>::to_vec))
                .unwrap_or_default(),
        ),
        Some(fields) => {
            let fields = items(fields)?;
            // An entry without our field is foreign: an empty payload fails to decode and is
            // counted as dropped.
            Some(
                fields
                    .chunks(2)
                    .find(|kv| bytes_of(&kv[0]) == Some(FIELD.as_bytes()))
                    .and_then(|kv| kv.get(1).and_then(bytes_of).map(<[u8]>::to_vec))
                    .unwrap_or_default(),
            )
        }
    };
    Ok(Some(Delivery { id, payload }))
}

fn parse_entries(v: Value) -> std::result::Result<Vec<Delivery>, String> {
    let mut out = Vec::new();
    for e in items(v)? {
        if let Some(d) = parse_entry(e)? {
            out.push(d);
        }
    }
    Ok(out)
}

/// An XREADGROUP reply: nil, `[[stream, entries]]` (RESP2) or `{stream: entries}` (RESP3).
fn parse_read(v: Value) -> std::result::Result<Vec<Delivery>, String> {
    let per_stream: Vec<Value> = match v {
        Value::Map(m) => m.into_iter().map(|(_, e)| e).collect(),
        other => items(other)?
            .into_iter()
            .map(|s| items(s).map(|kv| kv.into_iter().nth(1).unwrap_or(Value::Nil)))
            .collect::<std::result::Result<_, _>>()?,
    };
    let mut out = Vec::new();
    for entries in per_stream {
        out.extend(parse_entries(entries)?);
    }
    Ok(out)
}

/// An XAUTOCLAIM reply: `[next cursor, entries, deleted ids]`.
type Claimed = (EntryId, Vec<Delivery>, Vec<EntryId>);

fn parse_autoclaim(v: Value) -> std::result::Result<Claimed, String> {
    let mut parts = items(v)?.into_iter();
    let next = parse_id(&parts.next().ok_or("empty XAUTOCLAIM reply")?)?;
    let entries = parse_entries(parts.next().unwrap_or(Value::Nil))?;
    let deleted = items(parts.next().unwrap_or(Value::Nil))?
        .iter()
        .map(parse_id)
        .collect::<std::result::Result<_, _>>()?;
    Ok((next, entries, deleted))
}

// ---------------------------------------------------------------------------------------------
// Local state of one consumer
// ---------------------------------------------------------------------------------------------

/// A delivered record this consumer holds (its entry is pending in its name).
struct Slot {
    rec: Record,
    /// Hand-outs left that the limiter counts.
    counted: u32,
    /// Hand-outs left that it does not count: one more use of a redelivered record whose uses
    /// were all spent by a consumer that died before acknowledging it.
    extra: u32,
    /// Handed out and not yet acknowledged by the learner.
    outstanding: bool,
}

impl Slot {
    fn left(&self) -> u32 {
        self.counted + self.extra
    }
}

/// Keys acknowledged as applied, the most recent `cap` of them (see [`RedisReplay`] on why a
/// bounded memory suffices).
struct RecentKeys {
    set: HashSet<(u32, u64)>,
    order: VecDeque<(u32, u64)>,
    cap: usize,
}

impl RecentKeys {
    fn new(cap: usize) -> Self {
        Self {
            set: HashSet::new(),
            order: VecDeque::new(),
            cap,
        }
    }

    fn contains(&self, k: &(u32, u64)) -> bool {
        self.set.contains(k)
    }

    fn insert(&mut self, k: (u32, u64)) {
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

struct Local {
    /// Held records in stream order.
    slots: BTreeMap<EntryId, Slot>,
    /// Entry of each held record.
    by_key: HashMap<(u32, u64), EntryId>,
    applied: RecentKeys,
    /// Applied (or duplicate) entries still to XACK + XDEL.
    retire: Vec<EntryId>,
    /// Deleted-while-pending or unreadable entries still to record as dropped.
    drop: Vec<EntryId>,
    /// Re-read this consumer's pending entries before anything new: true at start and after any
    /// read whose reply may have been lost.
    reread_own: bool,
    last_claim: Option<Instant>,
    rng: StdRng,
}

impl Local {
    /// Take a delivered entry into the window, or queue it for retirement or as dropped.
    /// `prior` = hand-outs already counted for it (0 for a first delivery).
    fn admit(&mut self, d: Delivery, prior: u32, uses: u32) {
        if self.slots.contains_key(&d.id) {
            return;
        }
        let Some(bytes) = d.payload else {
            self.drop.push(d.id);
            return;
        };
        let Ok(rec) = Record::decode(&bytes) else {
            self.drop.push(d.id);
            return;
        };
        let key = rec.key();
        if self.applied.contains(&key) || self.by_key.contains_key(&key) {
            // A redelivery of a record already applied, or a second entry of a key held now:
            // never hand it out; remove its entry.
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

    fn remove(&mut self, id: &EntryId) -> Option<Slot> {
        let slot = self.slots.remove(id)?;
        if self.by_key.get(&slot.rec.key()) == Some(id) {
            self.by_key.remove(&slot.rec.key());
        }
        Some(slot)
    }

    /// Hand-outs one call for `n` could make now (the memory backend's rule).
    fn available(&self, n: usize, sampler: Sampler) -> usize {
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
    fn plan(&mut self, n: usize, sampler: Sampler) -> Vec<(EntryId, bool)> {
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
    fn hand_out(&mut self, picks: &[(EntryId, bool)]) -> Vec<Record> {
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
            out.push(slot.rec.clone());
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// RedisReplay
// ---------------------------------------------------------------------------------------------

/// The Redis backend of [`ReplayBuffer`], for runs whose roles live in separate processes.
///
/// **Keys.** Everything of a run lives under `tilt:{RUN}:` (the braces make it one Redis Cluster
/// hash slot, so scripts may touch all of it): `replay` (the stream; one field `r` = the record's
/// [`Record::encode`] bytes), `inserts` / `samples` (limiter counters), `evicted` (entries
/// retired), `dropped` (a set of lost entry ids), `uses` (hand-outs per pending entry), `last`
/// (each producer's last inserted seq) and short-lived `nonce:*` keys. Learners read through the
/// group `learners`, created at id 0 with MKSTREAM (so records inserted before any learner
/// connected are delivered), and recreated the same way if Redis loses it.
///
/// **Capacity.** No MAXLEN trimming (on Redis 7 it deletes pending entries). An insert waits
/// (polling, 2 to 50 ms) while the stream holds `capacity` entries; learners' [`ack`] retires
/// entries (XACK + XDEL in one script), so `XLEN` is the backlog. A record is dropped only if
/// its entry is deleted by something else while pending, or cannot be decoded: those entry ids
/// go to the `dropped` set and [`ReplayStats::dropped`].
///
/// **Uses and the rate limiter.** A stream hands each entry to one consumer. The consumer keeps
/// the records delivered to it in a local window and hands each out exactly `U` times, then,
/// once the learner has acknowledged it, retires it. `U = samples_per_insert` (which must then be
/// a whole number; `max_times_sampled` must be 0 or equal to it), or `max(1, max_times_sampled)`
/// when the ratio limiter is off. With `U` fixed, sampled = `U` x retired + uses spent on held
/// records, so the limiter's budget equals the uses left in the stream: a fractional ratio, or
/// `U` below or above it, would let inserts (blocked by capacity) and samples (blocked by the
/// ratio) wait for each other forever. The limiter is the memory backend's Reverb formula on
/// run-wide counters, checked and updated atomically in Lua: an insert passes iff the stream is
/// not full and `(inserts + 1) * spi - samples <= max_diff`; a sample of `m` hand-outs iff
/// `inserts >= min_size` and `inserts * spi - (samples + m) >= min_diff`. The uses spent per
/// entry are counted in Redis too, so a record taken over from a dead consumer resumes with the
/// uses it has left (and one uncounted use if it had none: at-least-once). Besides the memory
/// backend's `n + spi <= 2 * error_buffer`, a call needs `n + min_diff <= capacity`, else a full
/// stream could hold fewer uses than the call waits for.
///
/// **Delivery and idempotence.** Reads go, in this order: this consumer's own pending entries
/// (`XREADGROUP ... 0`, at start and after any read whose reply may have been lost), entries
/// idle longer than [`RedisOptions::claim_idle`] taken from other consumers (XAUTOCLAIM, every
/// half of it), then new entries (`>`, blocking on a dedicated connection). A background task
/// refreshes the idle time of entries this consumer holds (only those it still owns) every third
/// of `claim_idle`, so a slow learner's records are not taken from it. Idempotence by
/// `(producer, seq)` is enforced in exactly these places:
/// 1. [`ack`] marks a retired key as applied locally *before* sending XACK + XDEL, so a failed
///    or lost acknowledgement cannot make this consumer hand the record out again;
/// 2. every delivery (own pending, claimed, new) passes `Local::admit`, which never hands out a
///    key that is marked applied or already held, and retires that entry instead;
/// 3. an insert that repeats its producer's last inserted key is a no-op (the retry of an insert
///    whose reply was lost), so one record does not become two entries;
/// 4. the scripts are safe to repeat (XACK/XDEL/HDEL/SADD are idempotent; a sample reservation
///    carries a nonce).
///
/// Once XACK + XDEL have run, Redis can never deliver that entry again, so the applied memory
/// only needs to cover entries whose retirement is not yet confirmed and duplicates of recent
/// keys: it keeps the last `max(2 * capacity, 4096)` keys. (A per-producer watermark would not
/// stay small: with several consumers each sees an interleaved subset of a producer's seqs, and
/// producers restart at a new seq range.) What remains at least once: a learner that applies a
/// record and dies before [`ack`] reaches Redis; its records are redelivered after `claim_idle`.
/// The learner must [`ack`] every record it applied, or the stream fills and producers stall.
///
/// **Failures.** Two `ConnectionManager`s (commands, and blocking reads with a response timeout
/// above the BLOCK time) reconnect with exponential back-off (3 tries, 50 ms to 1 s, jittered);
/// around them every operation retries transient errors (I/O, LOADING, TRYAGAIN) with back-off
/// for up to [`RedisOptions::max_outage`], then fails naming the address. A sample still returns
/// by its timeout (Ok(None)) while Redis refuses connections. Redis must persist (AOF) for a
/// restart to keep the stream; without persistence a restart loses every record in it. An outage
/// longer than `claim_idle` stops heartbeats, so held records may then be claimed by another
/// learner (at least once again). The URL's password never appears in errors (see [`redact`]).
///
/// **Stats** are run-wide (all processes): inserted, sampled (counted hand-outs), evicted
/// (entries retired after use), depth (XLEN), dropped. [`ReplayBuffer::stats`] returns the values
/// last seen (refreshed every second and by each operation); [`RedisReplay::fetch_stats`] reads
/// them now.
///
/// [`ack`]: ReplayBuffer::ack
pub struct RedisReplay {
    inner: Arc<Inner>,
    task: JoinHandle<()>,
}

struct Keys {
    stream: String,
    inserts: String,
    samples: String,
    evicted: String,
    dropped: String,
    uses: String,
    last: String,
    /// Prefix of this consumer's nonce keys (unique per connection).
    nonce: String,
    /// SCAN pattern matching every key of the run.
    pattern: String,
}

impl Keys {
    fn new(run_id: &str, consumer: &str, salt: u64) -> Self {
        let p = format!("tilt:{{{run_id}}}:");
        Self {
            stream: format!("{p}replay"),
            inserts: format!("{p}inserts"),
            samples: format!("{p}samples"),
            evicted: format!("{p}evicted"),
            dropped: format!("{p}dropped"),
            uses: format!("{p}uses"),
            last: format!("{p}last"),
            nonce: format!("{p}nonce:{consumer}:{salt:016x}:"),
            pattern: format!("{p}*"),
        }
    }
}

/// What a wait does when the buffer is closed meanwhile.
#[derive(Clone, Copy, PartialEq)]
enum OnClose {
    /// Keep waiting.
    Ignore,
    /// Stop waiting and let the caller look again.
    Wake,
    /// Fail with `Closed`.
    Fail,
}

/// Bounds of a wait: a deadline (None = none) and what closing does.
#[derive(Clone, Copy)]
struct Wait {
    deadline: Option<Instant>,
    on_close: OnClose,
}

/// Unwrap a step that returns None when the caller's deadline passed.
macro_rules! step {
    ($e:expr) => {
        match $e? {
            Some(v) => v,
            None => return Ok(None),
        }
    };
}

struct Inner {
    cfg: ReplayConfig,
    opts: RedisOptions,
    /// Hand-outs per record (see the type's docs).
    uses: u32,
    min_diff: f64,
    max_diff: f64,
    /// `host:port` (or socket path) for messages; never the password.
    addr: String,
    /// Strings to scrub from error texts (the password, raw and decoded).
    secrets: Vec<String>,
    consumer: String,
    keys: Keys,
    cmd: ConnectionManager,
    blocking: ConnectionManager,
    scripts: Scripts,
    local: Mutex<Local>,
    /// One sampler at a time: it owns the blocking connection and plans against the window.
    sample_lock: tokio::sync::Mutex<()>,
    /// One flush at a time, so an `ack` returns only after every earlier retirement is done.
    flush_lock: tokio::sync::Mutex<()>,
    closed: watch::Sender<bool>,
    /// Start of the current outage, if Redis is unreachable.
    down_since: Mutex<Option<Instant>>,
    nonce_counter: AtomicU64,
    cache: Mutex<ReplayStats>,
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

fn scrub(text: String, secrets: &[String]) -> String {
    secrets
        .iter()
        .filter(|s| !s.is_empty())
        .fold(text, |t, s| t.replace(s.as_str(), "***"))
}

/// The backend's checks on `[replay]`, on top of [`ReplayConfig::validate`]; returns `U`, the
/// hand-outs per record.
fn uses_per_record(cfg: &ReplayConfig) -> std::result::Result<u32, String> {
    cfg.validate()?;
    if cfg.backend != "redis" {
        return Err(format!(
            "replay.backend = {:?}: RedisReplay serves only \"redis\"",
            cfg.backend
        ));
    }
    let spi = cfg.samples_per_insert;
    if spi == 0.0 {
        return Ok(cfg.max_times_sampled.max(1));
    }
    if spi < 1.0 || spi.fract() != 0.0 || spi > f64::from(u32::MAX) {
        return Err(format!(
            "replay.samples_per_insert = {spi}: the redis backend needs 0 or a whole number >= 1 \
             (each record is handed out exactly that many times)"
        ));
    }
    let uses = spi as u32;
    if cfg.max_times_sampled != 0 && cfg.max_times_sampled != uses {
        return Err(format!(
            "replay.max_times_sampled = {}: the redis backend needs 0 or \
             replay.samples_per_insert = {uses}",
            cfg.max_times_sampled
        ));
    }
    Ok(uses)
}

/// Run ids and consumer names go into keys and SCAN patterns: no blanks, braces or glob signs.
fn check_name(what: &str, name: &str) -> Result<()> {
    let bad = |c: char| c.is_whitespace() || "{}*?[]\\".contains(c);
    if name.is_empty() || name.len() > 200 || name.chars().any(bad) {
        return Err(ActorError::Replay(format!(
            "redis {what} {name:?}: must be 1 to 200 characters without blanks, braces, \
             '*', '?', '[', ']' or '\\'"
        )));
    }
    Ok(())
}

fn manager_config(response_timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_number_of_retries(3)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_secs(1))
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(response_timeout))
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl RedisReplay {
    /// Connect to the Redis at `url` (`redis://[:password@]host:port[/db]`) for run `run_id`,
    /// reading as `consumer` (unique per learner process), with default [`RedisOptions`].
    /// A Redis that cannot be reached gives one error naming its address (never the password).
    pub async fn connect(
        url: &str,
        run_id: &str,
        consumer: &str,
        cfg: ReplayConfig,
    ) -> Result<Self> {
        Self::connect_with(url, run_id, consumer, cfg, RedisOptions::default()).await
    }

    /// [`RedisReplay::connect`] with explicit failure-handling options.
    pub async fn connect_with(
        url: &str,
        run_id: &str,
        consumer: &str,
        cfg: ReplayConfig,
        opts: RedisOptions,
    ) -> Result<Self> {
        let uses = uses_per_record(&cfg).map_err(ActorError::Replay)?;
        check_name("run id", run_id)?;
        check_name("consumer", consumer)?;
        if opts.claim_idle < Duration::from_millis(3) {
            return Err(ActorError::Replay(format!(
                "redis claim_idle = {:?}: must be at least 3 ms",
                opts.claim_idle
            )));
        }
        let mut secrets: Vec<String> = password_ranges(url)
            .into_iter()
            .map(|(a, b)| url[a..b].to_owned())
            .collect();
        let client = Client::open(url).map_err(|e| {
            ActorError::Replay(format!(
                "replay redis url {}: {}",
                redact(url),
                scrub(e.to_string(), &secrets)
            ))
        })?;
        let info = client.get_connection_info();
        let addr = info.addr().to_string();
        secrets.extend(info.redis_settings().password().map(str::to_owned));
        let connect_err = |e: RedisError| {
            ActorError::Replay(format!(
                "redis at {addr}: cannot connect: {}",
                scrub(e.to_string(), &secrets)
            ))
        };
        // One direct attempt first: a Redis that is down gives one clear error now, instead of
        // the connection manager's retries.
        let probe_cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(CONNECT_TIMEOUT));
        let mut probe = client
            .get_multiplexed_async_connection_with_config(&probe_cfg)
            .await
            .map_err(connect_err)?;
        redis::cmd("PING")
            .query_async::<String>(&mut probe)
            .await
            .map_err(connect_err)?;
        drop(probe);
        let cmd =
            ConnectionManager::new_with_config(client.clone(), manager_config(COMMAND_TIMEOUT))
                .await
                .map_err(connect_err)?;
        let blocking = ConnectionManager::new_with_config(client, manager_config(BLOCKING_TIMEOUT))
            .await
            .map_err(connect_err)?;

        let salt: u64 = rand::rng().random();
        let offset = cfg.min_size as f64 * cfg.samples_per_insert;
        let local = Local {
            slots: BTreeMap::new(),
            by_key: HashMap::new(),
            applied: RecentKeys::new(cfg.capacity.saturating_mul(2).max(4096)),
            retire: Vec::new(),
            drop: Vec::new(),
            reread_own: true,
            last_claim: None,
            rng: StdRng::seed_from_u64(cfg.seed ^ fnv1a(consumer)),
        };
        let inner = Arc::new(Inner {
            uses,
            min_diff: offset - cfg.error_buffer,
            max_diff: offset + cfg.error_buffer,
            cfg,
            opts,
            addr,
            secrets,
            consumer: consumer.to_owned(),
            keys: Keys::new(run_id, consumer, salt),
            cmd,
            blocking,
            scripts: Scripts::new(),
            local: Mutex::new(local),
            sample_lock: tokio::sync::Mutex::new(()),
            flush_lock: tokio::sync::Mutex::new(()),
            closed: watch::Sender::new(false),
            down_since: Mutex::new(None),
            nonce_counter: AtomicU64::new(0),
            cache: Mutex::new(ReplayStats::default()),
        });
        inner
            .create_group()
            .await
            .map_err(|e| inner.fail("create consumer group", &e))?;
        inner.stats_query().await.ok();
        let task = tokio::spawn(background(Arc::downgrade(&inner)));
        Ok(Self { inner, task })
    }

    /// The run-wide counters, read from Redis now.
    pub async fn fetch_stats(&self) -> Result<ReplayStats> {
        let wait = Wait {
            deadline: None,
            on_close: OnClose::Ignore,
        };
        step_none(
            self.inner
                .call("stats", wait, || self.inner.stats_query())
                .await,
        )?;
        Ok(self.inner.cached())
    }

    /// Delete every key of this run (the stream, counters, marks): for tests and cleaning up a
    /// finished run. Returns how many keys were deleted.
    pub async fn purge(&self) -> Result<u64> {
        let mut c = self.inner.cmd.clone();
        let mut cursor = 0u64;
        let mut deleted = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&self.inner.keys.pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut c)
                .await
                .map_err(|e| self.inner.fail("purge", &e))?;
            if !keys.is_empty() {
                let n: u64 = redis::cmd("DEL")
                    .arg(&keys)
                    .query_async(&mut c)
                    .await
                    .map_err(|e| self.inner.fail("purge", &e))?;
                deleted += n;
            }
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    }

    /// This instance's consumer name in the group.
    pub fn consumer(&self) -> &str {
        &self.inner.consumer
    }
}

/// `Ok(None)` (a deadline) cannot happen without a deadline; treat it as closed to stay total.
fn step_none<T>(r: Result<Option<T>>) -> Result<T> {
    r?.ok_or(ActorError::Closed)
}

impl Drop for RedisReplay {
    fn drop(&mut self) {
        // The heartbeat stops with its owner, so a dropped consumer's entries become claimable.
        self.task.abort();
    }
}

/// Heartbeat of held entries, flushing of leftover retirements, and the stats refresh.
async fn background(inner: Weak<Inner>) {
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
    fn local(&self) -> Result<MutexGuard<'_, Local>> {
        self.local
            .lock()
            .map_err(|_| ActorError::Replay("redis replay state poisoned by a panic".to_owned()))
    }

    fn cached(&self) -> ReplayStats {
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn update_cache(&self, f: impl FnOnce(&mut ReplayStats)) {
        f(&mut self.cache.lock().unwrap_or_else(PoisonError::into_inner));
    }

    fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    fn fail(&self, what: &str, e: &RedisError) -> ActorError {
        ActorError::Replay(format!(
            "redis at {}: {what}: {}",
            self.addr,
            scrub(e.to_string(), &self.secrets)
        ))
    }

    /// Note a transient failure; returns how long Redis has been unreachable.
    fn mark_down(&self) -> Duration {
        let mut d = self
            .down_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        d.get_or_insert_with(Instant::now).elapsed()
    }

    fn mark_up(&self) {
        *self
            .down_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// Sleep `d` within `wait`. Ok(false): the deadline came first; Ok(true) otherwise (also when
    /// woken by close under `OnClose::Wake`); Err(Closed) under `OnClose::Fail`.
    async fn pause(&self, d: Duration, wait: Wait) -> Result<bool> {
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
    async fn call<T, F, Fut>(&self, what: &str, wait: Wait, mut op: F) -> Result<Option<T>>
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

    async fn create_group(&self) -> RedisResult<()> {
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

    /// Read the run-wide counters into the cache.
    async fn stats_query(&self) -> RedisResult<()> {
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
            }
        });
        Ok(())
    }

    /// XREADGROUP from `id` ("0"/cursor = own pending, ">" = new). `block` uses the blocking
    /// connection.
    async fn read_group(
        &self,
        id: &str,
        count: usize,
        block: Option<Duration>,
        wait: Wait,
    ) -> Result<Option<Vec<Delivery>>> {
        let v: Option<Value> = self
            .call("XREADGROUP", wait, || {
                let mut c = if block.is_some() {
                    self.blocking.clone()
                } else {
                    self.cmd.clone()
                };
                let mut cmd = redis::cmd("XREADGROUP");
                cmd.arg("GROUP")
                    .arg(GROUP)
                    .arg(&self.consumer)
                    .arg("COUNT")
                    .arg(count.max(1));
                if let Some(b) = block {
                    // BLOCK 0 would mean forever.
                    cmd.arg("BLOCK").arg(b.as_millis().max(1) as u64);
                }
                cmd.arg("STREAMS").arg(&self.keys.stream).arg(id);
                async move { cmd.query_async::<Value>(&mut c).await }
            })
            .await?;
        let Some(v) = v else { return Ok(None) };
        parse_read(v).map(Some).map_err(|e| {
            ActorError::Replay(format!("redis at {}: XREADGROUP reply: {e}", self.addr))
        })
    }

    /// Hand-outs already counted for redelivered entries.
    async fn prior_uses(&self, ids: &[EntryId], wait: Wait) -> Result<Option<Vec<u32>>> {
        if ids.is_empty() {
            return Ok(Some(Vec::new()));
        }
        let names: Vec<String> = ids.iter().map(ToString::to_string).collect();
        let got: Option<Vec<Option<u32>>> = self
            .call("HMGET uses", wait, || {
                let mut c = self.cmd.clone();
                let mut cmd = redis::cmd("HMGET");
                cmd.arg(&self.keys.uses).arg(&names);
                async move { cmd.query_async::<Vec<Option<u32>>>(&mut c).await }
            })
            .await?;
        Ok(got.map(|v| v.into_iter().map(Option::unwrap_or_default).collect()))
    }

    /// Admit entries that may have been handed out before (own pending, claimed).
    async fn admit_redelivered(&self, ds: Vec<Delivery>, wait: Wait) -> Result<Option<()>> {
        let ids: Vec<EntryId> = ds.iter().map(|d| d.id).collect();
        let prior = step!(self.prior_uses(&ids, wait).await);
        let mut local = self.local()?;
        for (d, p) in ds.into_iter().zip(prior) {
            local.admit(d, p, self.uses);
        }
        Ok(Some(()))
    }

    fn admit_new(&self, ds: Vec<Delivery>) -> Result<()> {
        let mut local = self.local()?;
        for d in ds {
            local.admit(d, 0, self.uses);
        }
        Ok(())
    }

    /// Own pending entries (when flagged) and entries claimed from dead consumers (when due).
    async fn maintain(&self, wait: Wait) -> Result<Option<()>> {
        let reread = std::mem::take(&mut self.local()?.reread_own);
        if reread {
            let mut cursor = EntryId::ZERO;
            loop {
                let got = step!(
                    self.read_group(&cursor.to_string(), READ_BATCH, None, wait)
                        .await
                );
                let Some(last) = got.last().map(|d| d.id) else {
                    break;
                };
                cursor = last;
                step!(self.admit_redelivered(got, wait).await);
            }
        }
        let period = (self.opts.claim_idle / 2).max(Duration::from_millis(1));
        let due = self
            .local()?
            .last_claim
            .is_none_or(|t| t.elapsed() >= period);
        if due {
            let min_idle = self.opts.claim_idle.as_millis() as u64;
            let mut cursor = EntryId::ZERO;
            for _ in 0..CLAIM_PAGES {
                let v: Value = step!(
                    self.call("XAUTOCLAIM", wait, || {
                        let mut c = self.cmd.clone();
                        let mut cmd = redis::cmd("XAUTOCLAIM");
                        cmd.arg(&self.keys.stream)
                            .arg(GROUP)
                            .arg(&self.consumer)
                            .arg(min_idle)
                            .arg(cursor.to_string())
                            .arg("COUNT")
                            .arg(READ_BATCH);
                        async move { cmd.query_async::<Value>(&mut c).await }
                    })
                    .await
                );
                let (next, entries, deleted) = parse_autoclaim(v).map_err(|e| {
                    ActorError::Replay(format!("redis at {}: XAUTOCLAIM reply: {e}", self.addr))
                })?;
                self.local()?.drop.extend(deleted);
                step!(self.admit_redelivered(entries, wait).await);
                if next == EntryId::ZERO || self.local()?.slots.len() >= self.cfg.capacity {
                    break;
                }
                cursor = next;
            }
            self.local()?.last_claim = Some(Instant::now());
        }
        Ok(Some(()))
    }

    /// Non-blocking read of new entries into the window: FIFO tops it up to `n` usable
    /// records; uniform reads what is there (up to `capacity` held), to sample from more.
    async fn prefetch(&self, n: usize, wait: Wait) -> Result<Option<()>> {
        let want = {
            let local = self.local()?;
            let room = self.cfg.capacity.saturating_sub(local.slots.len());
            match self.cfg.sampler {
                Sampler::Fifo => n.saturating_sub(local.available(n, Sampler::Fifo)),
                Sampler::Uniform => room.min(READ_BATCH.max(n)),
            }
            .min(room)
        };
        if want == 0 {
            return Ok(Some(()));
        }
        let got = step!(self.read_group(">", want, None, wait).await);
        self.admit_new(got)?;
        Ok(Some(()))
    }

    /// XACK + XDEL applied entries and record dropped ones (queued by `ack` and `admit`).
    async fn flush(&self, wait: Wait) -> Result<Option<()>> {
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

    async fn flush_lists(
        &self,
        retire: &[EntryId],
        drop: &[EntryId],
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
                        .arg(GROUP)
                        .arg(&ids);
                    async move { inv.invoke_async(&mut c).await }
                })
                .await
            );
            self.update_cache(|s| s.depth = depth);
        }
        for chunk in drop.chunks(SCRIPT_BATCH) {
            let ids: Vec<String> = chunk.iter().map(ToString::to_string).collect();
            let dropped: u64 = step!(
                self.call("drop", wait, || {
                    let mut c = self.cmd.clone();
                    let mut inv = self.scripts.drop.prepare_invoke();
                    inv.key(&self.keys.stream)
                        .key(&self.keys.dropped)
                        .key(&self.keys.uses)
                        .arg(GROUP)
                        .arg(&ids);
                    async move { inv.invoke_async(&mut c).await }
                })
                .await
            );
            self.update_cache(|s| s.dropped = dropped);
        }
        Ok(Some(()))
    }

    /// Ask the limiter for the planned hand-outs. Some(true) = granted (and counted).
    async fn reserve(&self, picks: &[(EntryId, bool)], wait: Wait) -> Result<Option<bool>> {
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
                    .arg(self.cfg.min_size)
                    .arg(self.cfg.samples_per_insert.to_string())
                    .arg(self.min_diff.to_string())
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
    async fn heartbeat(&self) -> Result<()> {
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

    /// Wait for new entries on the blocking connection (at most until the deadline, one
    /// BLOCK_CAP or half the claim period at a time, and no longer than until close).
    async fn block_for_new(&self, n: usize, deadline: Option<Instant>) -> Result<()> {
        let mut left = deadline.map_or(BLOCK_CAP, |d| d.saturating_duration_since(Instant::now()));
        left = left.min(BLOCK_CAP).min(self.opts.claim_idle / 2);
        let want = n.min(self.cfg.capacity).max(1);
        let wait = Wait {
            deadline,
            on_close: OnClose::Ignore,
        };
        let mut rx = self.closed.subscribe();
        let got = tokio::select! {
            r = self.read_group(">", want, Some(left), wait) => r?,
            _ = rx.wait_for(|c| *c) => {
                // The abandoned read may still deliver entries to us: read them back later.
                self.local()?.reread_own = true;
                return Ok(());
            }
        };
        if let Some(got) = got {
            self.admit_new(got)?;
        }
        Ok(())
    }

    fn check_batch(&self, n: usize) -> Result<()> {
        let spi = self.cfg.samples_per_insert;
        if spi > 0.0 && n as f64 + spi > 2.0 * self.cfg.error_buffer {
            return Err(ActorError::Replay(format!(
                "a sample of {n} records with replay.samples_per_insert = {spi} needs \
                 replay.error_buffer >= {} (it is {}); otherwise inserts and samples can block \
                 each other forever",
                (n as f64 + spi) / 2.0,
                self.cfg.error_buffer
            )));
        }
        if spi > 0.0 && n as f64 + self.min_diff > self.cfg.capacity as f64 {
            return Err(ActorError::Replay(format!(
                "a sample of {n} records needs replay.capacity >= {} with the redis backend \
                 (n + min_size * samples_per_insert - error_buffer; it is {}): a full stream \
                 could hold fewer uses than the sample waits for",
                n as f64 + self.min_diff,
                self.cfg.capacity
            )));
        }
        Ok(())
    }

    async fn sample(&self, n: usize, timeout: Duration) -> Result<Option<Vec<Record>>> {
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

    async fn insert(&self, rec: &Record) -> Result<()> {
        let bytes = rec.encode();
        let producer = rec.producer.to_string();
        let seq = rec.seq.to_string();
        let wait = Wait {
            deadline: None,
            on_close: OnClose::Fail,
        };
        let mut poll = POLL_MIN;
        loop {
            if self.is_closed() {
                return Err(ActorError::Closed);
            }
            let (status, depth): (String, u64) = step_none(
                self.call("insert", wait, || {
                    let mut c = self.cmd.clone();
                    let mut inv = self.scripts.insert.prepare_invoke();
                    inv.key(&self.keys.stream)
                        .key(&self.keys.inserts)
                        .key(&self.keys.samples)
                        .key(&self.keys.last)
                        .arg(bytes.as_slice())
                        .arg(&producer)
                        .arg(&seq)
                        .arg(self.cfg.capacity)
                        .arg(self.cfg.samples_per_insert.to_string())
                        .arg(self.max_diff.to_string());
                    async move { inv.invoke_async(&mut c).await }
                })
                .await,
            )?;
            self.update_cache(|s| s.depth = depth);
            match status.as_str() {
                "ok" | "dup" => return Ok(()),
                "full" | "limit" => {
                    self.pause(poll, wait).await?;
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

    async fn ack(&self, keys: &[(u32, u64)]) -> Result<()> {
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

#[async_trait::async_trait]
impl ReplayBuffer for RedisReplay {
    async fn purge(&self) -> Result<()> {
        RedisReplay::purge(self).await.map(|_| ())
    }

    async fn insert(&self, rec: Record) -> Result<()> {
        self.inner.insert(&rec).await
    }

    async fn sample(&self, n: usize, timeout: Duration) -> Result<Option<Vec<Record>>> {
        self.inner.sample(n, timeout).await
    }

    async fn ack(&self, keys: &[(u32, u64)]) -> Result<()> {
        self.inner.ack(keys).await
    }

    fn stats(&self) -> ReplayStats {
        self.inner.cached()
    }

    fn close(&self) {
        self.inner.closed.send_replace(true);
    }
}

// ---------------------------------------------------------------------------------------------
// Tests (against a real Redis on 127.0.0.1:6379, and redis-servers they start themselves)
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::tensors_to_payload;
    use candle_core::{Device, Tensor};
    use std::process::{Child, Command, Stdio};
    use tokio::time::timeout;

    type TestResult = std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;

    const URL: &str = "redis://127.0.0.1:6379/0";
    /// Bound on every wait that is expected to finish.
    const LONG: Duration = Duration::from_secs(15);
    /// How long a wait that is expected NOT to finish is given before we conclude it is blocked.
    const SHORT: Duration = Duration::from_millis(300);

    /// A run id no other test (or test run) uses.
    fn run_id(tag: &str) -> String {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        format!("test-{tag}-{}-{nanos}", std::process::id())
    }

    fn cfg(capacity: usize, min_size: usize, spi: f64, eb: f64, sampler: Sampler) -> ReplayConfig {
        ReplayConfig {
            backend: "redis".to_owned(),
            capacity,
            min_size,
            samples_per_insert: spi,
            error_buffer: eb,
            sampler,
            ..ReplayConfig::default()
        }
    }

    fn rec(producer: u32, seq: u64) -> Record {
        Record {
            seq,
            producer,
            version: 3,
            payload: seq.to_le_bytes().to_vec(),
            scalars: vec![("v_a".to_owned(), seq as f64)],
        }
    }

    /// Periodic check of an async condition, bounded by `limit`.
    async fn wait_until<F, Fut>(limit: Duration, mut cond: F) -> bool
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if cond().await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        cond().await
    }

    async fn inserted(rb: &RedisReplay) -> u64 {
        rb.fetch_stats().await.map(|s| s.inserted).unwrap_or(0)
    }

    type Applied = Arc<Mutex<HashMap<(u32, u64), u32>>>;

    /// A learner: sample, "apply" (count the key), ack; until `total` keys are applied in all.
    async fn learn(
        rb: Arc<RedisReplay>,
        applied: Applied,
        total: usize,
        batch: usize,
    ) -> Result<()> {
        let end = Instant::now() + LONG;
        while Instant::now() < end {
            if lock(&applied).len() >= total {
                return Ok(());
            }
            let Some(recs) = rb.sample(batch, Duration::from_millis(100)).await? else {
                continue;
            };
            let keys: Vec<(u32, u64)> = recs.iter().map(Record::key).collect();
            {
                let mut a = lock(&applied);
                for k in &keys {
                    *a.entry(*k).or_insert(0) += 1;
                }
            }
            rb.ack(&keys).await?;
        }
        Err(ActorError::Replay("learner ran out of time".to_owned()))
    }

    fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
        m.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn assert_exactly_once(applied: &Applied, producers: u32, per: u64) {
        let a = lock(applied);
        assert_eq!(a.len() as u64, u64::from(producers) * per);
        for p in 0..producers {
            for s in 0..per {
                assert_eq!(a.get(&(p, s)), Some(&1), "key ({p}, {s})");
            }
        }
    }

    #[tokio::test]
    async fn round_trip_is_bit_exact() -> TestResult {
        // A record with real safetensors bytes and awkward scalars (NaN payload, -0, subnormal)
        // goes through XADD / XREADGROUP and comes back with the same encoded bytes.
        let run = run_id("roundtrip");
        let rb = RedisReplay::connect(URL, &run, "c0", cfg(16, 1, 0.0, 0.0, Sampler::Fifo)).await?;
        let t = Tensor::new(&[[1.5f32, -2.0], [3.0, 1e-30]], &Device::Cpu)?;
        let r = Record {
            seq: u64::MAX - 1,
            producer: 0xdead_beef,
            version: 1 << 40,
            payload: tensors_to_payload(&[("start", &t)])?,
            scalars: vec![
                ("nan".to_owned(), f64::from_bits(0x7ff8_0000_0000_1234)),
                ("neg0".to_owned(), -0.0),
                ("tiny".to_owned(), f64::MIN_POSITIVE / 4.0),
            ],
        };
        rb.insert(r.clone()).await?;
        let got = timeout(LONG, rb.sample(1, LONG))
            .await??
            .unwrap_or_default();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].encode(), r.encode());
        rb.ack(&[r.key()]).await?;
        let st = rb.fetch_stats().await?;
        assert_eq!(
            (st.inserted, st.sampled, st.evicted, st.depth, st.dropped),
            (1, 1, 1, 0, 0)
        );
        rb.purge().await?;
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ten_thousand_records_two_consumers_each_applied_once() -> TestResult {
        // Two producers insert 5000 records each through a 1024-entry stream (back-pressure is
        // engaged); two consumers of one group (two learners) share them. Each key must be
        // applied exactly once, and the stream must end empty with nothing dropped.
        const PER: u64 = 5000;
        let run = run_id("10k");
        let c = cfg(1024, 100, 1.0, 200.0, Sampler::Fifo);
        let prod = Arc::new(RedisReplay::connect(URL, &run, "p", c.clone()).await?);
        let l1 = Arc::new(RedisReplay::connect(URL, &run, "l1", c.clone()).await?);
        let l2 = Arc::new(RedisReplay::connect(URL, &run, "l2", c).await?);
        let producers: Vec<_> = (0..2u32)
            .map(|p| {
                let rb = prod.clone();
                tokio::spawn(async move {
                    for s in 0..PER {
                        rb.insert(rec(p, s)).await?;
                    }
                    Ok::<_, ActorError>(())
                })
            })
            .collect();
        let applied: Applied = Arc::default();
        let total = 2 * PER as usize;
        let t1 = tokio::spawn(learn(l1.clone(), applied.clone(), total, 64));
        let t2 = tokio::spawn(learn(l2.clone(), applied.clone(), total, 64));
        for p in producers {
            timeout(LONG, p).await???;
        }
        timeout(LONG, t1).await???;
        timeout(LONG, t2).await???;
        assert_exactly_once(&applied, 2, PER);
        let st = prod.fetch_stats().await?;
        assert_eq!(
            (st.inserted, st.sampled, st.evicted, st.depth, st.dropped),
            (2 * PER, 2 * PER, 2 * PER, 0, 0)
        );
        prod.purge().await?;
        Ok(())
    }

    #[tokio::test]
    async fn killed_consumer_records_are_claimed_and_applied_once() -> TestResult {
        // Consumer A takes 20 of 50 records and is dropped before acking (a killed learner, its
        // heartbeat stops with it). Consumer B, with a 300 ms idle bound, claims A's entries with
        // XAUTOCLAIM; every key is applied exactly once by B.
        let run = run_id("claim");
        let opts = RedisOptions {
            claim_idle: Duration::from_millis(300),
            ..RedisOptions::default()
        };
        let c = cfg(100, 1, 0.0, 0.0, Sampler::Fifo);
        let prod = RedisReplay::connect_with(URL, &run, "p", c.clone(), opts.clone()).await?;
        for s in 0..50 {
            prod.insert(rec(0, s)).await?;
        }
        let a = RedisReplay::connect_with(URL, &run, "a", c.clone(), opts.clone()).await?;
        let taken = timeout(LONG, a.sample(20, LONG))
            .await??
            .unwrap_or_default();
        assert_eq!(taken.len(), 20);
        drop(a);
        let b = Arc::new(RedisReplay::connect_with(URL, &run, "b", c, opts).await?);
        let applied: Applied = Arc::default();
        timeout(LONG, learn(b.clone(), applied.clone(), 50, 16)).await??;
        assert_exactly_once(&applied, 1, 50);
        // B holds nothing more: the claimed entries were retired, none dropped.
        let st = b.fetch_stats().await?;
        assert_eq!((st.depth, st.evicted, st.dropped), (0, 50, 0));
        prod.purge().await?;
        Ok(())
    }

    #[tokio::test]
    async fn full_stream_blocks_inserts_until_an_ack_frees_space() -> TestResult {
        // capacity 100, no consumer: 100 inserts pass, the 101st waits (no trimming, nothing
        // dropped) until a learner samples one record and acks it.
        let run = run_id("backpressure");
        let c = cfg(100, 1, 0.0, 0.0, Sampler::Fifo);
        let prod = Arc::new(RedisReplay::connect(URL, &run, "p", c.clone()).await?);
        for s in 0..100 {
            prod.insert(rec(0, s)).await?;
        }
        let blocked = {
            let rb = prod.clone();
            tokio::spawn(async move { rb.insert(rec(0, 100)).await })
        };
        assert!(!wait_until(SHORT, || async { blocked.is_finished() }).await);
        let st = prod.fetch_stats().await?;
        assert_eq!((st.inserted, st.depth, st.dropped), (100, 100, 0));

        let learner = RedisReplay::connect(URL, &run, "l", c).await?;
        let got = timeout(LONG, learner.sample(1, LONG))
            .await??
            .unwrap_or_default();
        assert_eq!(got.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![0]);
        // Sampled but not acked: the entry still counts against capacity.
        assert!(!wait_until(SHORT, || async { blocked.is_finished() }).await);
        learner.ack(&[got[0].key()]).await?;
        timeout(LONG, blocked).await???;
        let st = prod.fetch_stats().await?;
        assert_eq!(
            (st.inserted, st.depth, st.evicted, st.dropped),
            (101, 100, 1, 0)
        );
        prod.purge().await?;
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn limiter_holds_across_two_processes() -> TestResult {
        // Two instances (two "processes") insert into one run, a third samples.
        // spi = 1, min_size = 10, error_buffer = 5: min_diff = 5, max_diff = 15.
        let run = run_id("limiter");
        let c = cfg(100, 10, 1.0, 5.0, Sampler::Fifo);
        let a = Arc::new(RedisReplay::connect(URL, &run, "a", c.clone()).await?);
        let b = Arc::new(RedisReplay::connect(URL, &run, "b", c.clone()).await?);
        let l = RedisReplay::connect(URL, &run, "l", c).await?;
        // min_size counts inserts of both: 5 + 4 = 9 < 10, so no sample.
        for s in 0..5 {
            a.insert(rec(1, s)).await?;
        }
        for s in 0..4 {
            b.insert(rec(2, s)).await?;
        }
        assert_eq!(l.sample(1, Duration::from_millis(100)).await?, None);
        b.insert(rec(2, 4)).await?;
        let got = timeout(LONG, l.sample(1, LONG)).await??;
        assert_eq!(got.map(|v| v.len()), Some(1));

        // Both keep inserting. An insert passes iff (inserts + 1) - samples <= 15: with 1 sample
        // the two together stop at exactly 16.
        let spawn = |rb: Arc<RedisReplay>, p: u32| {
            tokio::spawn(async move {
                for s in 5..100 {
                    rb.insert(rec(p, s)).await?;
                }
                Ok::<_, ActorError>(())
            })
        };
        let ta = spawn(a.clone(), 1);
        let tb = spawn(b.clone(), 2);
        assert!(wait_until(LONG, || async { inserted(&l).await == 16 }).await);
        assert!(!wait_until(SHORT, || async { inserted(&l).await > 16 }).await);

        // 9 more samples admit exactly 9 more inserts: 16 + 9 = 25.
        let got = timeout(LONG, l.sample(9, LONG)).await??.unwrap_or_default();
        assert_eq!(got.len(), 9);
        assert!(wait_until(LONG, || async { inserted(&l).await == 25 }).await);
        assert!(!wait_until(SHORT, || async { inserted(&l).await > 25 }).await);

        // Close wakes both blocked producers with Closed; inserts stay at 25.
        a.close();
        b.close();
        assert!(matches!(timeout(LONG, ta).await??, Err(ActorError::Closed)));
        assert!(matches!(timeout(LONG, tb).await??, Err(ActorError::Closed)));
        assert!(matches!(
            a.insert(rec(1, 999)).await,
            Err(ActorError::Closed)
        ));

        // The sample side: a sample of m passes iff 25 - (samples + m) >= 5, samples = 10 now.
        // 9 pass (25 - 19 = 6); then 2 are refused (25 - 21 = 4) although 6 records wait, 1
        // passes (= 5), and 1 more is refused (4).
        let got = timeout(LONG, l.sample(9, LONG)).await??.unwrap_or_default();
        assert_eq!(got.len(), 9);
        assert_eq!(l.sample(2, Duration::from_millis(100)).await?, None);
        let got = timeout(LONG, l.sample(1, LONG)).await??.unwrap_or_default();
        assert_eq!(got.len(), 1);
        assert_eq!(l.sample(1, Duration::from_millis(100)).await?, None);
        let st = l.fetch_stats().await?;
        assert_eq!((st.inserted, st.sampled, st.depth), (25, 20, 25));
        l.purge().await?;
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_uses_per_record_with_uniform_sampling() -> TestResult {
        // spi = 2 (so U = 2 uses per record), uniform sampler, capacity 64: both the stream bound
        // and the ratio limiter engage. Each of 300 records must be handed out exactly twice and
        // then retired, without the two sides blocking each other; sampled = 2 x inserted.
        const N: u64 = 300;
        let run = run_id("uses");
        let c = cfg(64, 16, 2.0, 40.0, Sampler::Uniform);
        let prod = Arc::new(RedisReplay::connect(URL, &run, "p", c.clone()).await?);
        let learner = RedisReplay::connect(URL, &run, "l", c).await?;
        // n + min_diff must fit the stream: min_diff = 16 * 2 - 40 = -8, so n = 73 (73 - 8 = 65
        // > 64) is refused, although n + spi = 75 <= 2 * error_buffer = 80 passes.
        assert!(matches!(
            learner.sample(73, Duration::ZERO).await,
            Err(ActorError::Replay(m)) if m.contains("replay.capacity")
        ));
        let producer = {
            let rb = prod.clone();
            tokio::spawn(async move {
                for s in 0..N {
                    rb.insert(rec(0, s)).await?;
                }
                Ok::<_, ActorError>(())
            })
        };
        let mut uses: HashMap<u64, u32> = HashMap::new();
        let end = Instant::now() + LONG;
        while uses.values().sum::<u32>() < 2 * N as u32 && Instant::now() < end {
            let Some(recs) = learner.sample(16, Duration::from_millis(100)).await? else {
                continue;
            };
            for r in &recs {
                *uses.entry(r.seq).or_insert(0) += 1;
            }
            let keys: Vec<(u32, u64)> = recs.iter().map(Record::key).collect();
            learner.ack(&keys).await?;
        }
        timeout(LONG, producer).await???;
        assert_eq!(uses.len() as u64, N);
        assert!(uses.values().all(|&n| n == 2), "{uses:?}");
        let st = learner.fetch_stats().await?;
        assert_eq!(
            (st.inserted, st.sampled, st.evicted, st.depth, st.dropped),
            (N, 2 * N, N, 0, 0)
        );
        prod.purge().await?;
        Ok(())
    }

    /// A redis-server this test started (with AOF, so a restart keeps the stream); killed on drop.
    struct OwnRedis {
        child: Option<Child>,
        port: u16,
        dir: std::path::PathBuf,
    }

    impl OwnRedis {
        fn start(port: u16, dir: &std::path::Path) -> std::io::Result<Self> {
            let child = Command::new("redis-server")
                .args([
                    "--port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                ])
                .args(["--appendonly", "yes", "--appendfsync", "always"])
                .arg("--dir")
                .arg(dir)
                .args(["--daemonize", "no"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            Ok(Self {
                child: Some(child),
                port,
                dir: dir.to_owned(),
            })
        }

        fn url(&self) -> String {
            format!("redis://127.0.0.1:{}/0", self.port)
        }

        /// Wait until it answers PING.
        async fn ready(&self) -> bool {
            let Ok(client) = Client::open(self.url()) else {
                return false;
            };
            wait_until(LONG, || {
                let client = client.clone();
                async move {
                    let Ok(mut c) = client.get_multiplexed_async_connection().await else {
                        return false;
                    };
                    redis::cmd("PING")
                        .query_async::<String>(&mut c)
                        .await
                        .is_ok()
                }
            })
            .await
        }

        /// SIGKILL: no shutdown, no final save.
        fn kill(&mut self) {
            if let Some(mut c) = self.child.take() {
                c.kill().ok();
                c.wait().ok();
            }
        }

        /// Kill and start again on the same port and AOF directory.
        fn restart(&mut self) -> std::io::Result<()> {
            self.kill();
            let again = Self::start(self.port, &self.dir)?;
            self.child = again.child_taken();
            Ok(())
        }

        /// Move the process out (leaving `self` without one, so its drop removes nothing twice).
        fn child_taken(mut self) -> Option<Child> {
            let c = self.child.take();
            // `self` still owns the directory name; keep the directory for the restarted server.
            self.dir = std::path::PathBuf::new();
            c
        }
    }

    impl Drop for OwnRedis {
        fn drop(&mut self) {
            self.kill();
            if !self.dir.as_os_str().is_empty() {
                std::fs::remove_dir_all(&self.dir).ok();
            }
        }
    }

    fn free_port() -> std::io::Result<u16> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_restart_mid_run_loses_nothing() -> TestResult {
        // A producer and a learner on a redis-server of our own; after 300 records are applied
        // the server is SIGKILLed and restarted on the same port and AOF directory. Both sides
        // reconnect with back-off; every seq produced is applied exactly once or counted as
        // dropped (and none is dropped).
        const N: u64 = 4000;
        // tmpfs when there is one: it survives the server's SIGKILL like a disk would, and
        // `appendfsync always` is cheap there.
        let shm = std::path::Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_owned()
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(run_id("tilt-redis-aof"));
        std::fs::create_dir_all(&dir)?;
        let port = free_port()?;
        let mut server = OwnRedis::start(port, &dir)?;
        assert!(
            server.ready().await,
            "redis-server on port {port} did not start"
        );
        let url = server.url();
        let run = run_id("restart");
        let c = cfg(256, 16, 1.0, 64.0, Sampler::Fifo);
        let prod = Arc::new(RedisReplay::connect(&url, &run, "p", c.clone()).await?);
        let learner = Arc::new(RedisReplay::connect(&url, &run, "l", c).await?);
        let producer = {
            let rb = prod.clone();
            tokio::spawn(async move {
                for s in 0..N {
                    rb.insert(rec(0, s)).await?;
                }
                Ok::<_, ActorError>(())
            })
        };
        let applied: Applied = Arc::default();
        let consumer = tokio::spawn(learn(learner.clone(), applied.clone(), N as usize, 32));
        assert!(wait_until(LONG, || async { lock(&applied).len() >= 300 }).await);

        server.restart()?;
        timeout(LONG, producer).await???;
        timeout(LONG, consumer).await???;

        let dropped = learner.fetch_stats().await?.dropped;
        let a = lock(&applied);
        assert!(a.values().all(|&n| n == 1), "a record was applied twice");
        assert_eq!(a.len() as u64 + dropped, N);
        assert_eq!(dropped, 0);
        Ok(())
    }

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
        };
        let id = |seq| EntryId { ms: 1, seq };
        let d = |seq: u64, r: Record| Delivery {
            id: id(seq),
            payload: Some(r.encode()),
        };
        l.applied.insert((0, 1));
        l.admit(d(1, rec(0, 1)), 0, 2); // already applied
        l.admit(d(2, rec(0, 2)), 0, 2); // new: held with 2 counted uses
        l.admit(d(3, rec(0, 2)), 0, 2); // same key as entry 2
        l.admit(d(2, rec(0, 2)), 0, 2); // entry 2 again (own pending re-read): ignored
        l.admit(d(4, rec(0, 4)), 2, 2); // claimed with both uses spent: one uncounted use
        l.admit(
            Delivery {
                id: id(5),
                payload: None,
            },
            0,
            2,
        ); // deleted while pending
        l.admit(
            Delivery {
                id: id(6),
                payload: Some(vec![1, 2, 3]),
            },
            0,
            2,
        ); // corrupt
        assert_eq!(l.retire, vec![id(1), id(3)]);
        assert_eq!(l.drop, vec![id(5), id(6)]);
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

    #[test]
    fn redact_hides_passwords() {
        let cases = [
            (
                "redis://:hunter2@127.0.0.1:6379/0",
                "redis://:***@127.0.0.1:6379/0",
            ),
            ("redis://user:hunter2@host/1", "redis://user:***@host/1"),
            // Unencoded '@', '/', '?' inside the password.
            ("redis://:p@s/s?w@host:1", "redis://:***@host:1"),
            (
                "rediss://u:pw@h:6380?protocol=resp3",
                "rediss://u:***@h:6380?protocol=resp3",
            ),
            (
                "redis+unix:///tmp/r.sock?db=1&pass=hunter2",
                "redis+unix:///tmp/r.sock?db=1&pass=***",
            ),
            (
                "unix:///tmp/r.sock?password=x@y",
                "unix:///tmp/r.sock?password=***",
            ),
            // Nothing secret: unchanged.
            ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
            ("redis://user@host", "redis://user@host"),
        ];
        for (url, want) in cases {
            assert_eq!(redact(url), want, "{url}");
        }
    }

    #[tokio::test]
    async fn unreachable_redis_names_the_address_not_the_password() -> TestResult {
        // A closed port: one clear error with host:port, without the password, quickly (no
        // reconnect loop at connect time).
        let port = free_port()?;
        let url = format!("redis://:hunter2-secret@127.0.0.1:{port}/0");
        let t0 = Instant::now();
        let r = RedisReplay::connect(
            &url,
            &run_id("down"),
            "c",
            cfg(8, 1, 0.0, 0.0, Sampler::Fifo),
        )
        .await;
        let Err(e) = r else {
            return Err("connect to a closed port succeeded".into());
        };
        let msg = e.to_string();
        assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
        assert!(msg.contains("cannot connect"), "{msg}");
        assert!(!msg.contains("hunter2"), "{msg}");
        assert!(t0.elapsed() < Duration::from_secs(5));
        Ok(())
    }

    #[test]
    fn redis_config_rules_name_the_key() {
        // Fractional ratios cannot be served by fixed uses per record; max_times must match.
        let c = |spi: f64, k: u32| ReplayConfig {
            max_times_sampled: k,
            ..cfg(100, 1, spi, 8.0, Sampler::Uniform)
        };
        assert_eq!(uses_per_record(&c(4.0, 0)), Ok(4));
        assert_eq!(uses_per_record(&c(4.0, 4)), Ok(4));
        assert_eq!(uses_per_record(&c(0.0, 0)), Ok(1));
        assert_eq!(uses_per_record(&c(0.0, 3)), Ok(3));
        let e = uses_per_record(&c(1.5, 0)).err().unwrap_or_default();
        assert!(e.starts_with("replay.samples_per_insert = 1.5"), "{e}");
        let e = uses_per_record(&c(2.0, 3)).err().unwrap_or_default();
        assert!(e.starts_with("replay.max_times_sampled = 3"), "{e}");
        let e = uses_per_record(&ReplayConfig::default())
            .err()
            .unwrap_or_default();
        assert!(e.starts_with("replay.backend"), "{e}");
    }
}
