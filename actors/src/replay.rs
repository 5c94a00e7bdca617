//! The replay buffer between producers (critic, distortion actors) and learners: the `Record` they
//! exchange and its binary form, the `ReplayBuffer` seam, its config, and `MemoryReplay`, the
//! bounded in-process backend with a Reverb-style blocking sample-to-insert rate limiter.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::pin::pin;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::{ActorError, Result};

// ---------------------------------------------------------------------------------------------
// Record
// ---------------------------------------------------------------------------------------------

/// First bytes of every encoded record.
const MAGIC: [u8; 4] = *b"TLRC";
/// Version of the encoded layout; bump it when the layout changes.
const FORMAT_VERSION: u8 = 1;
/// magic + format version + seq + producer + version.
const FIXED_HEADER: usize = 4 + 1 + 8 + 4 + 8;
/// Fixed header, one-byte payload length, one-byte scalar count, CRC trailer.
const MIN_ENCODED: usize = FIXED_HEADER + 1 + 1 + 4;

/// One unit of experience: what a producer puts into the replay and a learner takes out.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Sequence number, unique per producer (the learner is idempotent by `(producer, seq)`).
    pub seq: u64,
    /// Id of the producer that made the record.
    pub producer: u32,
    /// Reference/policy version the record came from.
    pub version: u64,
    /// Tensors as safetensors bytes (see [`tensors_to_payload`]).
    pub payload: Vec<u8>,
    /// Named scalars: V(a), V(b), log-probs, k_start, ...
    pub scalars: Vec<(String, f64)>,
}

impl Record {
    /// The first scalar called `name`, if any.
    pub fn scalar(&self, name: &str) -> Option<f64> {
        self.scalars
            .iter()
            .find(|(n, _)| n == name)
            .map(|&(_, v)| v)
    }

    /// Identity of the record: `(producer, seq)`.
    pub fn key(&self) -> (u32, u64) {
        (self.producer, self.seq)
    }

    /// The payload's tensors on the CPU; errors name this record.
    pub fn tensors(&self) -> Result<HashMap<String, Tensor>> {
        payload_to_tensors(&self.payload).map_err(|e| ActorError::Record {
            seq: self.seq,
            producer: self.producer,
            detail: e.to_string(),
        })
    }

    /// Encode into tilt's self-describing binary form (also what the redis backend stores).
    ///
    /// Layout, little endian, lengths as LEB128 varints:
    ///
    /// | offset | size | field |
    /// |---|---|---|
    /// | 0 | 4 | magic `TLRC` |
    /// | 4 | 1 | format version (1) |
    /// | 5 | 8 | `seq` (u64) |
    /// | 13 | 4 | `producer` (u32) |
    /// | 17 | 8 | `version` (u64) |
    /// | 25 | var | payload length, then the payload bytes |
    /// | .. | var | scalar count, then per scalar: name length, UTF-8 name, value (f64 bits) |
    /// | end-4 | 4 | CRC-32 (IEEE) of every preceding byte |
    pub fn encode(&self) -> Vec<u8> {
        let names: usize = self.scalars.iter().map(|(n, _)| n.len() + 10 + 8).sum();
        let mut out = Vec::with_capacity(FIXED_HEADER + 10 + self.payload.len() + 10 + names + 4);
        out.extend_from_slice(&MAGIC);
        out.push(FORMAT_VERSION);
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.producer.to_le_bytes());
        out.extend_from_slice(&self.version.to_le_bytes());
        put_varint(&mut out, self.payload.len() as u64);
        out.extend_from_slice(&self.payload);
        put_varint(&mut out, self.scalars.len() as u64);
        for (name, value) in &self.scalars {
            put_varint(&mut out, name.len() as u64);
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&value.to_bits().to_le_bytes());
        }
        let crc = crc32(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decode bytes made by [`Record::encode`]. Truncated, corrupt (checksum mismatch) or foreign
    /// input is an error, never a panic.
    pub fn decode(bytes: &[u8]) -> Result<Record> {
        if bytes.len() < MIN_ENCODED {
            return Err(decode_err(format!(
                "{} bytes is shorter than the smallest record ({MIN_ENCODED} bytes)",
                bytes.len()
            )));
        }
        if bytes[..4] != MAGIC {
            return Err(decode_err(format!(
                "bad magic {:02x?} (expected {:02x?})",
                &bytes[..4],
                MAGIC
            )));
        }
        if bytes[4] != FORMAT_VERSION {
            return Err(decode_err(format!(
                "format version {} (this build reads {FORMAT_VERSION})",
                bytes[4]
            )));
        }
        let (body, trailer) = bytes.split_at(bytes.len() - 4);
        let stored = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
        let computed = crc32(body);
        if stored != computed {
            return Err(decode_err(format!(
                "checksum mismatch (stored {stored:08x}, computed {computed:08x}): \
                 corrupt or truncated"
            )));
        }
        let mut r = Reader { buf: body, pos: 5 };
        let seq = r.u64("seq")?;
        let producer = r.u32("producer")?;
        let version = r.u64("version")?;
        let payload_len = r.len("payload length")?;
        let payload = r.take(payload_len, "payload")?.to_vec();
        let count = r.len("scalar count")?;
        // Each scalar takes at least 9 bytes, so a corrupt count cannot force a huge allocation.
        let mut scalars = Vec::with_capacity(count.min(r.remaining() / 9));
        for i in 0..count {
            let name_len = r.len("scalar name length")?;
            let name = std::str::from_utf8(r.take(name_len, "scalar name")?)
                .map_err(|e| decode_err(format!("scalar {i}: name is not UTF-8: {e}")))?
                .to_owned();
            let value = f64::from_bits(r.u64("scalar value")?);
            scalars.push((name, value));
        }
        if r.remaining() != 0 {
            return Err(decode_err(format!(
                "{} trailing bytes after the last scalar",
                r.remaining()
            )));
        }
        Ok(Record {
            seq,
            producer,
            version,
            payload,
            scalars,
        })
    }
}

fn decode_err(detail: String) -> ActorError {
    ActorError::Replay(format!("record decode: {detail}"))
}

/// Bounds-checked cursor over an encoded record.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(decode_err(format!(
                "truncated {what} at byte {}: need {n} bytes, {} left",
                self.pos,
                self.remaining()
            )));
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        let b = self.take(8, what)?;
        Ok(u64::from_le_bytes([
            b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
        ]))
    }

    /// LEB128 unsigned varint: 7 bits a byte, low first, high bit = more; at most 10 bytes.
    fn varint(&mut self, what: &str) -> Result<u64> {
        let mut value = 0u64;
        for i in 0..10 {
            let byte = self.take(1, what)?[0];
            let bits = u64::from(byte & 0x7f);
            // The tenth byte holds only bit 63.
            if i == 9 && bits > 1 {
                return Err(decode_err(format!("{what} overflows u64")));
            }
            value |= bits << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(decode_err(format!("{what} is longer than 10 bytes")))
    }

    fn len(&mut self, what: &str) -> Result<usize> {
        let v = self.varint(what)?;
        usize::try_from(v).map_err(|_| decode_err(format!("{what} {v} does not fit in usize")))
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// CRC-32/ISO-HDLC (the zlib/PNG CRC), reflected polynomial 0xEDB88320.
const CRC32_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c = CRC32_TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// Serialise named tensors into safetensors bytes for [`Record::payload`]. Tensors on a GPU are
/// copied to the CPU; names must be distinct.
pub fn tensors_to_payload(tensors: &[(&str, &Tensor)]) -> Result<Vec<u8>> {
    let mut seen = HashSet::with_capacity(tensors.len());
    let mut cpu = Vec::with_capacity(tensors.len());
    for &(name, tensor) in tensors {
        if !seen.insert(name) {
            return Err(ActorError::Replay(format!(
                "payload: tensor name {name:?} appears twice"
            )));
        }
        // candle's `View::data` unwraps its conversion; these are the dtypes it can convert, so
        // anything else is refused here instead of panicking there.
        let dtype = tensor.dtype();
        if !matches!(
            dtype,
            DType::U8
                | DType::U32
                | DType::I16
                | DType::I32
                | DType::I64
                | DType::BF16
                | DType::F16
                | DType::F32
                | DType::F64
                | DType::F8E4M3
        ) {
            return Err(ActorError::Replay(format!(
                "payload: tensor {name:?} has dtype {dtype:?}, which safetensors export does \
                 not support"
            )));
        }
        cpu.push((name, tensor.to_device(&Device::Cpu)?.contiguous()?));
    }
    safetensors::serialize(cpu.iter().map(|(name, t)| (*name, t)), None)
        .map_err(|e| ActorError::Replay(format!("payload: safetensors serialize: {e}")))
}

/// Load the tensors of a [`Record::payload`] onto the CPU.
pub fn payload_to_tensors(payload: &[u8]) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load_buffer(payload, &Device::Cpu)
        .map_err(|e| ActorError::Replay(format!("payload: {e}")))
}

// ---------------------------------------------------------------------------------------------
// The seam
// ---------------------------------------------------------------------------------------------

/// A replay buffer: producers insert [`Record`]s, learners sample them. Backends: `memory`
/// ([`MemoryReplay`]) and `redis`. Callers share one as `Arc<dyn ReplayBuffer>`.
#[async_trait::async_trait]
pub trait ReplayBuffer: Send + Sync {
    /// Insert one record; waits (back-pressure) while the rate limiter forbids inserts;
    /// Err(Closed) once closed.
    async fn insert(&self, rec: Record) -> Result<()>;

    /// Sample `n` records; waits until allowed (min fill, rate limiter) or until `timeout` passes
    /// (then Ok(None)); Err(Closed) once closed and nothing can ever be sampled.
    ///
    /// A call returns between 1 and `n` records: fewer than `n` only when fewer are available
    /// (a FIFO sampler with fewer than `n` records present, or records near `max_times_sampled`),
    /// as a Redis `XREADGROUP COUNT n` does; this lets a learner drain the tail after close.
    async fn sample(&self, n: usize, timeout: Duration) -> Result<Option<Vec<Record>>>;

    /// Acknowledge records applied by the learner (no-op for memory; the redis backend XACKs).
    async fn ack(&self, keys: &[(u32, u64)]) -> Result<()>;

    /// Counters for metrics and reports.
    fn stats(&self) -> ReplayStats;

    /// Close: wake every waiter; later inserts fail with Closed.
    fn close(&self);
    /// Remove everything this buffer stored outside the process (Redis keys of the run); a no-op
    /// for the in-process backend.
    async fn purge(&self) -> Result<()> {
        Ok(())
    }
}

/// Counters of a replay buffer.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ReplayStats {
    /// Records inserted since the start.
    pub inserted: u64,
    /// Records handed out by `sample` (a record handed out twice counts twice).
    pub sampled: u64,
    /// Records removed: by the capacity remover or after `max_times_sampled` samples.
    pub evicted: u64,
    /// Records present now.
    pub depth: u64,
    /// Records lost: removed by the capacity remover before being sampled even once
    /// (a subset of `evicted`).
    pub dropped: u64,
}

// ---------------------------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------------------------

/// How records are picked by `sample`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sampler {
    /// Uniformly at random among present records, with replacement.
    #[default]
    Uniform,
    /// The oldest present records first, without replacement within one call.
    Fifo,
}

/// `[replay]`: where records wait between producers and learners.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplayConfig {
    /// Backend: "memory" (in-process, the default) or "redis" (Redis Streams, for multi-process
    /// runs).
    pub backend: String,
    /// Most records held at once; when full the oldest is evicted.
    pub capacity: usize,
    /// Records that must have been inserted before the first sample.
    pub min_size: usize,
    /// Target records sampled per record inserted (Reverb's SampleToInsertRatio); 0 turns the
    /// ratio limiter off.
    pub samples_per_insert: f64,
    /// Slack of the ratio limiter, in sampled records: how far inserts and samples may drift from
    /// the target ratio before one side waits for the other.
    pub error_buffer: f64,
    /// How records are picked: "uniform" (with replacement) or "fifo" (oldest first).
    pub sampler: Sampler,
    /// Remove a record once it has been sampled this many times; 0 = unlimited.
    pub max_times_sampled: u32,
    /// Seed of the uniform sampler's random generator.
    pub seed: u64,
    /// Redis URL for `backend = "redis"` (redis://[:password@]host:port/db). The environment
    /// variable TILT_REDIS_URL overrides it; the password never appears in logs or saved configs.
    pub url: String,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        Self {
            backend: "memory".to_owned(),
            capacity: 65536,
            min_size: 1024,
            samples_per_insert: 4.0,
            error_buffer: 4096.0,
            sampler: Sampler::Uniform,
            max_times_sampled: 0,
            seed: 0,
            url: "redis://127.0.0.1:6379/".to_owned(),
        }
    }
}

impl ReplayConfig {
    /// Check the values; the message names the offending key.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.backend != "memory" && self.backend != "redis" {
            return Err(format!(
                "replay.backend = {:?}: must be \"memory\" or \"redis\"",
                self.backend
            ));
        }
        if self.capacity == 0 {
            return Err("replay.capacity = 0: must be positive".to_owned());
        }
        if self.min_size > self.capacity {
            return Err(format!(
                "replay.min_size = {}: must be <= replay.capacity = {}",
                self.min_size, self.capacity
            ));
        }
        let spi = self.samples_per_insert;
        if !spi.is_finite() || spi < 0.0 {
            return Err(format!(
                "replay.samples_per_insert = {spi}: must be finite and >= 0"
            ));
        }
        let eb = self.error_buffer;
        if !eb.is_finite() || eb < 0.0 {
            return Err(format!(
                "replay.error_buffer = {eb}: must be finite and >= 0"
            ));
        }
        if spi > 0.0 && eb < spi.max(1.0) {
            // Reverb's own check: a smaller buffer lets inserts and samples block each other.
            return Err(format!(
                "replay.error_buffer = {eb}: must be >= max(1, replay.samples_per_insert) = {}",
                spi.max(1.0)
            ));
        }
        if self.max_times_sampled > 0 && spi > f64::from(self.max_times_sampled) {
            // Samples could never keep up with inserts, so the limiter would stop inserts for good.
            return Err(format!(
                "replay.samples_per_insert = {spi}: must be <= replay.max_times_sampled = {} \
                 (a record cannot be sampled more often than that)",
                self.max_times_sampled
            ));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Rate limiter
// ---------------------------------------------------------------------------------------------

/// Reverb's `SampleToInsertRatio` limiter (blocking), with samples counted in records.
#[derive(Debug, Clone, Copy)]
struct RateLimiter {
    spi: f64,
    min_size: u64,
    min_diff: f64,
    max_diff: f64,
}

impl RateLimiter {
    fn new(cfg: &ReplayConfig) -> Self {
        let offset = cfg.min_size as f64 * cfg.samples_per_insert;
        Self {
            spi: cfg.samples_per_insert,
            min_size: cfg.min_size as u64,
            min_diff: offset - cfg.error_buffer,
            max_diff: offset + cfg.error_buffer,
        }
    }

    /// May one more record be inserted after `inserts` inserts and `samples` sampled records?
    fn can_insert(&self, inserts: u64, samples: u64) -> bool {
        self.spi == 0.0 || (inserts + 1) as f64 * self.spi - samples as f64 <= self.max_diff
    }

    /// May `n` more records be sampled?
    fn can_sample(&self, inserts: u64, samples: u64, n: u64) -> bool {
        inserts >= self.min_size
            && (self.spi == 0.0
                || inserts as f64 * self.spi - (samples + n) as f64 >= self.min_diff)
    }
}

// ---------------------------------------------------------------------------------------------
// MemoryReplay
// ---------------------------------------------------------------------------------------------

/// The in-process, bounded replay backend.
///
/// **Rate limiter.** Reverb's `SampleToInsertRatio(samples_per_insert, min_size_to_sample,
/// error_buffer)`, blocking rather than dropping, with samples counted in records. With
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
}

impl State {
    fn depth(&self) -> usize {
        self.slots.len()
    }

    fn push(&mut self, rec: Record, capacity: usize) {
        while self.depth() >= capacity {
            let Some(oldest) = self.slots.keys().next().copied() else {
                break;
            };
            if let Some(slot) = self.remove(oldest) {
                if slot.times == 0 {
                    self.dropped += 1;
                }
            }
        }
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
        if cfg.backend != "memory" {
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

    async fn sample(&self, n: usize, timeout: Duration) -> Result<Option<Vec<Record>>> {
        if n == 0 {
            return Ok(Some(Vec::new()));
        }
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

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::time::timeout;

    /// A boxed error so `?` works across candle, serde, tokio and our own errors.
    type TestResult = std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;

    /// Generous bound on every wait that is expected to finish.
    const LONG: Duration = Duration::from_secs(20);
    /// How long a wait that is expected NOT to finish is given before we conclude it is blocked.
    const SHORT: Duration = Duration::from_millis(150);

    fn rec(producer: u32, seq: u64) -> Record {
        Record {
            seq,
            producer,
            version: 7,
            payload: seq.to_le_bytes().to_vec(),
            scalars: vec![("v_a".to_owned(), seq as f64)],
        }
    }

    fn cfg(capacity: usize, min_size: usize, spi: f64, eb: f64, sampler: Sampler) -> ReplayConfig {
        ReplayConfig {
            capacity,
            min_size,
            samples_per_insert: spi,
            error_buffer: eb,
            sampler,
            ..ReplayConfig::default()
        }
    }

    /// Periodic check of a condition, bounded by `limit` (ractor's `periodic_check`).
    async fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if cond() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        cond()
    }

    #[test]
    fn crc32_check_value() {
        // The catalogued check value of CRC-32/ISO-HDLC over "123456789" is 0xCBF43926.
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn record_round_trip_is_bit_exact() -> TestResult {
        // Two tensors with hand-written values; they must come back unchanged.
        let a = Tensor::new(&[[1.5f32, -2.0, 0.25], [3.0, -0.0, 1e-30]], &Device::Cpu)?;
        let b = Tensor::new(&[7i64, -8, 9, i64::MAX], &Device::Cpu)?;
        let payload = tensors_to_payload(&[("start", &a), ("k", &b)])?;
        let r = Record {
            seq: u64::MAX - 3,
            producer: 0xdead_beef,
            version: 1 << 40,
            payload,
            scalars: vec![
                ("v_a".to_owned(), 0.1),
                ("logp_ref".to_owned(), -0.0),
                ("tiny".to_owned(), f64::MIN_POSITIVE / 4.0), // subnormal
                ("nan".to_owned(), f64::from_bits(0x7ff8_0000_0000_1234)),
                ("ünïcode".to_owned(), f64::INFINITY),
            ],
        };
        let bytes = r.encode();
        let back = Record::decode(&bytes)?;
        assert_eq!(back.key(), r.key());
        assert_eq!(back.version, r.version);
        assert_eq!(back.payload, r.payload);
        assert_eq!(back.scalars.len(), r.scalars.len());
        for ((n1, v1), (n2, v2)) in back.scalars.iter().zip(&r.scalars) {
            // Compare bits: NaN payloads and the sign of zero must survive.
            assert_eq!((n1, v1.to_bits()), (n2, v2.to_bits()));
        }
        assert_eq!(back.encode(), bytes);
        assert_eq!(back.scalar("v_a"), Some(0.1));
        assert_eq!(back.scalar("missing"), None);

        let t = back.tensors()?;
        assert_eq!(t.len(), 2);
        assert_eq!(
            t["start"].to_vec2::<f32>()?,
            vec![vec![1.5f32, -2.0, 0.25], vec![3.0, -0.0, 1e-30]]
        );
        assert_eq!(t["k"].to_vec1::<i64>()?, vec![7i64, -8, 9, i64::MAX]);

        // An empty record is the smallest encoding (MIN_ENCODED) and round-trips too.
        let empty = Record {
            seq: 0,
            producer: 0,
            version: 0,
            payload: vec![],
            scalars: vec![],
        };
        assert_eq!(empty.encode().len(), MIN_ENCODED);
        assert_eq!(Record::decode(&empty.encode())?, empty);
        Ok(())
    }

    #[test]
    fn decode_rejects_truncated_and_corrupt_bytes() {
        let r = Record {
            payload: vec![0xab; 300], // a two-byte varint length
            ..rec(3, 1234)
        };
        let bytes = r.encode();
        // Every strict prefix is truncated: too short, or its last 4 bytes are not the CRC.
        for len in 0..bytes.len() {
            assert!(Record::decode(&bytes[..len]).is_err(), "prefix of {len}");
        }
        // One extra byte moves the trailer, so the checksum no longer matches.
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Record::decode(&longer).is_err());
        // Any single corrupted byte is caught: magic and version directly, the rest by CRC-32,
        // which detects every error burst of up to 32 bits.
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x5a;
            assert!(Record::decode(&bad).is_err(), "byte {i} flipped");
        }
        // Garbage that is not a record at all.
        assert!(Record::decode(&[0xff; 64]).is_err());
        // A corrupt payload is an error from tensors(), naming the record.
        match rec(5, 9).tensors() {
            Err(ActorError::Record {
                seq: 9,
                producer: 5,
                ..
            }) => {}
            other => panic!("expected a Record error, got {other:?}"),
        }
    }

    #[test]
    fn payload_rejects_duplicate_names() -> TestResult {
        let a = Tensor::zeros(2, DType::F32, &Device::Cpu)?;
        assert!(tensors_to_payload(&[("x", &a), ("x", &a)]).is_err());
        Ok(())
    }

    #[test]
    fn limiter_matches_hand_computation() {
        // spi = 1, min_size = 10, error_buffer = 5: min_diff = 10 - 5 = 5, max_diff = 10 + 5 = 15.
        let l = RateLimiter::new(&cfg(100, 10, 1.0, 5.0, Sampler::Uniform));
        assert_eq!((l.min_diff, l.max_diff), (5.0, 15.0));
        // Insert iff inserts + 1 - samples <= 15.
        assert!(l.can_insert(14, 0));
        assert!(!l.can_insert(15, 0));
        assert!(l.can_insert(15, 1));
        // Sample n iff inserts >= 10 and inserts - samples - n >= 5.
        assert!(!l.can_sample(9, 0, 1));
        assert!(l.can_sample(10, 0, 5));
        assert!(!l.can_sample(10, 0, 6));
        assert!(l.can_sample(15, 3, 7));
        assert!(!l.can_sample(15, 3, 8));
        // spi = 0: no ratio limit, only min_size.
        let free = RateLimiter::new(&cfg(100, 10, 0.0, 0.0, Sampler::Uniform));
        assert!(free.can_insert(1_000_000, 0));
        assert!(!free.can_sample(9, 0, 1));
        assert!(free.can_sample(10, 1_000_000, 1_000_000));
    }

    #[tokio::test]
    async fn min_size_gates_sampling() -> TestResult {
        // min_size = 5, no ratio limit: sampling needs 5 inserts (can_sample's first clause).
        let rb = Arc::new(MemoryReplay::new(cfg(16, 5, 0.0, 0.0, Sampler::Uniform))?);
        for s in 0..4 {
            timeout(LONG, rb.insert(rec(0, s))).await??;
        }
        // 4 < 5 inserts: the wait ends by the timeout with None.
        assert_eq!(rb.sample(1, Duration::from_millis(50)).await?, None);
        // A sampler already waiting is woken by the fifth insert.
        let waiter = {
            let rb = rb.clone();
            tokio::spawn(async move { rb.sample(2, LONG).await })
        };
        timeout(LONG, rb.insert(rec(0, 4))).await??;
        let got = timeout(LONG, waiter).await???;
        assert_eq!(got.map(|v| v.len()), Some(2));
        Ok(())
    }

    #[tokio::test]
    async fn ratio_limiter_blocks_inserts_until_sampled() -> TestResult {
        // spi = 1, min_size = 10, error_buffer = 5 => max_diff = 15. With nothing sampled an insert
        // proceeds iff (inserts + 1) * 1 - 0 <= 15, i.e. inserts <= 14: exactly N = 15 inserts go
        // through and the 16th blocks.
        const N: u64 = 15;
        let rb = Arc::new(MemoryReplay::new(cfg(1000, 10, 1.0, 5.0, Sampler::Fifo))?);
        let producer = {
            let rb = rb.clone();
            tokio::spawn(async move {
                let mut done = 0u64;
                for s in 0..100 {
                    match rb.insert(rec(1, s)).await {
                        Ok(()) => done += 1,
                        Err(e) => return (done, Some(e)),
                    }
                }
                (done, None)
            })
        };
        assert!(wait_until(LONG, || rb.stats().inserted == N).await);
        // The producer is stuck at N: the limiter forbids the next insert, and it does not move.
        assert!(!rb.limiter.can_insert(N, 0));
        assert!(!wait_until(SHORT, || rb.stats().inserted > N).await);
        assert!(!producer.is_finished());

        // Sampling one record gives one insert of credit: (16 + 1) - 1 = 16 > 15 stops the 17th.
        let got = timeout(LONG, rb.sample(1, LONG)).await??;
        assert_eq!(got.map(|v| v[0].seq), Some(0));
        assert!(wait_until(LONG, || rb.stats().inserted == N + 1).await);
        assert!(!wait_until(SHORT, || rb.stats().inserted > N + 1).await);

        // Three more sampled records admit exactly three more inserts.
        let got = timeout(LONG, rb.sample(3, LONG)).await??;
        assert_eq!(got.map(|v| v.len()), Some(3));
        assert!(wait_until(LONG, || rb.stats().inserted == N + 4).await);
        assert!(!wait_until(SHORT, || rb.stats().inserted > N + 4).await);

        // Close wakes the blocked producer with Closed.
        rb.close();
        let (done, err) = timeout(LONG, producer).await??;
        assert_eq!(done, N + 4);
        assert!(matches!(err, Some(ActorError::Closed)));
        Ok(())
    }

    #[tokio::test]
    async fn refuses_batches_the_limiter_could_deadlock_on() -> TestResult {
        // spi = 1, error_buffer = 5: n + spi <= 2 * 5 allows n <= 9.
        let rb = MemoryReplay::new(cfg(100, 10, 1.0, 5.0, Sampler::Uniform))?;
        assert!(matches!(
            rb.sample(10, Duration::ZERO).await,
            Err(ActorError::Replay(_))
        ));
        assert_eq!(rb.sample(9, Duration::ZERO).await?, None);
        Ok(())
    }

    #[tokio::test]
    async fn capacity_evicts_oldest_first() -> TestResult {
        // capacity 4, no ratio limit: inserts 0..6 evict 0 and 1 (FIFO remover), leaving 2..=5.
        let rb = MemoryReplay::new(cfg(4, 1, 0.0, 0.0, Sampler::Fifo))?;
        for s in 0..6 {
            timeout(LONG, rb.insert(rec(0, s))).await??;
        }
        let got = timeout(LONG, rb.sample(10, LONG))
            .await??
            .unwrap_or_default();
        let seqs: Vec<u64> = got.iter().map(|r| r.seq).collect();
        // Only 4 are present, so a FIFO call for 10 hands out those 4, oldest first.
        assert_eq!(seqs, vec![2, 3, 4, 5]);
        let st = rb.stats();
        assert_eq!(
            (st.inserted, st.evicted, st.dropped, st.depth, st.sampled),
            (6, 2, 2, 4, 4)
        );
        Ok(())
    }

    #[tokio::test]
    async fn max_times_sampled_removes_after_k() -> TestResult {
        // FIFO, k = 2: record 0 is handed out twice, then removed, and record 1 comes next.
        let c = ReplayConfig {
            max_times_sampled: 2,
            ..cfg(8, 1, 0.0, 0.0, Sampler::Fifo)
        };
        let rb = MemoryReplay::new(c)?;
        rb.insert(rec(0, 0)).await?;
        rb.insert(rec(0, 1)).await?;
        let mut seqs = vec![];
        for _ in 0..4 {
            let got = timeout(LONG, rb.sample(1, LONG))
                .await??
                .unwrap_or_default();
            seqs.extend(got.iter().map(|r| r.seq));
        }
        assert_eq!(seqs, vec![0, 0, 1, 1]);
        assert_eq!((rb.stats().depth, rb.stats().evicted), (0, 2));
        // Nothing left: sampling times out.
        assert_eq!(rb.sample(1, Duration::from_millis(20)).await?, None);

        // Uniform, k = 3, one record: a call for 5 gets only the 3 uses left, then it is gone.
        let c = ReplayConfig {
            max_times_sampled: 3,
            ..cfg(8, 1, 0.0, 0.0, Sampler::Uniform)
        };
        let rb = MemoryReplay::new(c)?;
        rb.insert(rec(0, 42)).await?;
        let got = timeout(LONG, rb.sample(5, LONG))
            .await??
            .unwrap_or_default();
        assert_eq!(got.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![42; 3]);
        assert_eq!((rb.stats().depth, rb.stats().dropped), (0, 0));
        Ok(())
    }

    #[tokio::test]
    async fn uniform_sampling_is_uniform() -> TestResult {
        // 10 records, 100_000 draws with replacement: each count ~ Binomial(1e5, 0.1), expected
        // 10_000. Pearson's chi-square with 9 degrees of freedom must stay below 27.88, the 0.999
        // quantile of chi2(9) (standard tables): a fair sampler fails this 1 time in 1000, and the
        // seed is fixed, so the outcome is deterministic.
        let rb = MemoryReplay::new(cfg(10, 10, 0.0, 0.0, Sampler::Uniform))?;
        for s in 0..10 {
            rb.insert(rec(0, s)).await?;
        }
        let draws = 100_000usize;
        let got = timeout(LONG, rb.sample(draws, LONG))
            .await??
            .unwrap_or_default();
        assert_eq!(got.len(), draws);
        let mut counts = [0f64; 10];
        for r in &got {
            counts[r.seq as usize] += 1.0;
        }
        let expected = draws as f64 / 10.0;
        let chi2: f64 = counts
            .iter()
            .map(|c| (c - expected).powi(2) / expected)
            .sum();
        assert!(chi2 < 27.88, "chi2 = {chi2}, counts = {counts:?}");
        assert!(counts.iter().all(|&c| c > 0.0));
        Ok(())
    }

    #[tokio::test]
    async fn close_wakes_blocked_inserter_and_sampler() -> TestResult {
        // Sampler blocked on min_size (0 of 5 inserted), inserter blocked by the limiter
        // (spi = 1, min_size = 1, error_buffer = 1: max_diff = 2, so inserts + 1 <= 2 lets 2
        // inserts pass and the 3rd waits).
        let starved = Arc::new(MemoryReplay::new(cfg(8, 5, 0.0, 0.0, Sampler::Uniform))?);
        let full = Arc::new(MemoryReplay::new(cfg(8, 1, 1.0, 1.0, Sampler::Uniform))?);
        full.insert(rec(0, 0)).await?;
        full.insert(rec(0, 1)).await?;
        let sampler = {
            let rb = starved.clone();
            tokio::spawn(async move { rb.sample(1, Duration::MAX).await })
        };
        let inserter = {
            let rb = full.clone();
            tokio::spawn(async move { rb.insert(rec(0, 2)).await })
        };
        // Both stay blocked until close.
        assert!(!wait_until(SHORT, || sampler.is_finished() || inserter.is_finished()).await);
        starved.close();
        full.close();
        assert!(matches!(
            timeout(LONG, sampler).await??,
            Err(ActorError::Closed)
        ));
        assert!(matches!(
            timeout(LONG, inserter).await??,
            Err(ActorError::Closed)
        ));
        assert!(matches!(
            full.insert(rec(0, 3)).await,
            Err(ActorError::Closed)
        ));
        Ok(())
    }

    #[tokio::test]
    async fn closed_buffer_drains_then_reports_closed() -> TestResult {
        // FIFO, k = 1, no ratio limit: the 3 present records can still be taken after close,
        // then nothing can ever be sampled again.
        let c = ReplayConfig {
            max_times_sampled: 1,
            ..cfg(8, 1, 0.0, 0.0, Sampler::Fifo)
        };
        let rb = MemoryReplay::new(c)?;
        for s in 0..3 {
            rb.insert(rec(0, s)).await?;
        }
        rb.close();
        let got = rb.sample(2, LONG).await?.unwrap_or_default();
        assert_eq!(got.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![0, 1]);
        let got = rb.sample(2, LONG).await?.unwrap_or_default();
        assert_eq!(got.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![2]);
        assert!(matches!(
            timeout(LONG, rb.sample(2, LONG)).await?,
            Err(ActorError::Closed)
        ));
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_producers_one_fifo_consumer_see_every_record_once() -> TestResult {
        // spi = 1, min_size = 100, error_buffer = 200 (>= min_size, so min_diff = -100 <= 0 and
        // the limiter lets the consumer drain to the last record). Each sampled record is removed
        // (k = 1), so depth = inserts - samples <= max_diff = 300 < capacity 1024: nothing is
        // evicted unsampled. FIFO with k = 1 hands each record out once: the consumer must see all
        // 2 * 5000 keys exactly once.
        const PER: u64 = 5000;
        let c = ReplayConfig {
            max_times_sampled: 1,
            ..cfg(1024, 100, 1.0, 200.0, Sampler::Fifo)
        };
        let rb: Arc<dyn ReplayBuffer> = Arc::new(MemoryReplay::new(c)?);
        let producers: Vec<_> = (0..2u32)
            .map(|p| {
                let rb = rb.clone();
                tokio::spawn(async move {
                    for s in 0..PER {
                        rb.insert(rec(p, s)).await?;
                    }
                    Ok::<_, ActorError>(())
                })
            })
            .collect();
        let consumer = {
            let rb = rb.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while (seen.len() as u64) < 2 * PER {
                    if let Some(batch) = rb.sample(64, LONG).await? {
                        seen.extend(batch.iter().map(Record::key));
                        rb.ack(&seen[seen.len() - batch.len()..]).await?;
                    } else {
                        return Err(ActorError::Replay("consumer starved".to_owned()));
                    }
                }
                Ok::<_, ActorError>(seen)
            })
        };
        for p in producers {
            timeout(LONG, p).await???;
        }
        let seen = timeout(LONG, consumer).await???;
        assert_eq!(seen.len() as u64, 2 * PER);
        let unique: HashSet<(u32, u64)> = seen.iter().copied().collect();
        let all: HashSet<(u32, u64)> = (0..2u32)
            .flat_map(|p| (0..PER).map(move |s| (p, s)))
            .collect();
        assert_eq!(unique, all);
        // Each producer's records arrive in its own order (FIFO over arrival).
        for p in 0..2u32 {
            let mine: Vec<u64> = seen.iter().filter(|k| k.0 == p).map(|k| k.1).collect();
            assert!(mine.windows(2).all(|w| w[0] < w[1]));
        }
        let st = rb.stats();
        assert_eq!(
            (st.inserted, st.sampled, st.evicted, st.dropped, st.depth),
            (2 * PER, 2 * PER, 2 * PER, 0, 0)
        );
        Ok(())
    }

    #[test]
    fn config_defaults_parse_and_validate() -> TestResult {
        // Defaults as documented on ReplayConfig.
        let d = ReplayConfig::default();
        assert_eq!(d.validate(), Ok(()));
        assert_eq!(
            (d.capacity, d.min_size, d.sampler),
            (65536, 1024, Sampler::Uniform)
        );
        let parsed: ReplayConfig =
            serde_json::from_str(r#"{"capacity": 8, "min_size": 2, "sampler": "fifo"}"#)?;
        assert_eq!(
            parsed,
            ReplayConfig {
                capacity: 8,
                min_size: 2,
                sampler: Sampler::Fifo,
                ..ReplayConfig::default()
            }
        );
        assert!(serde_json::from_str::<ReplayConfig>(r#"{"capcity": 8}"#).is_err());
        assert!(serde_json::from_str::<ReplayConfig>(r#"{"sampler": "lifo"}"#).is_err());
        Ok(())
    }

    #[test]
    fn validate_names_the_key() {
        let d = ReplayConfig::default;
        let cases: Vec<(ReplayConfig, &str)> = vec![
            (
                ReplayConfig { capacity: 0, ..d() },
                "replay.capacity = 0: must be positive",
            ),
            (
                ReplayConfig {
                    capacity: 10,
                    min_size: 11,
                    ..d()
                },
                "replay.min_size = 11",
            ),
            (
                ReplayConfig {
                    backend: "kafka".into(),
                    ..d()
                },
                "replay.backend",
            ),
            (
                ReplayConfig {
                    samples_per_insert: -1.0,
                    ..d()
                },
                "replay.samples_per_insert",
            ),
            (
                ReplayConfig {
                    samples_per_insert: f64::NAN,
                    ..d()
                },
                "replay.samples_per_insert",
            ),
            (
                ReplayConfig {
                    error_buffer: -1.0,
                    ..d()
                },
                "replay.error_buffer",
            ),
            // Reverb's rule error_buffer >= max(1, spi): 3 < 4.
            (
                ReplayConfig {
                    error_buffer: 3.0,
                    ..d()
                },
                "replay.error_buffer = 3",
            ),
            // spi = 4 > max_times_sampled = 2.
            (
                ReplayConfig {
                    max_times_sampled: 2,
                    ..d()
                },
                "replay.samples_per_insert = 4",
            ),
        ];
        for (c, want) in cases {
            let msg = c.validate().err().unwrap_or_default();
            assert!(msg.starts_with(want), "{msg:?} should start with {want:?}");
        }
        // With the ratio limit off, the error buffer is irrelevant.
        let off = ReplayConfig {
            samples_per_insert: 0.0,
            error_buffer: 0.0,
            ..d()
        };
        assert_eq!(off.validate(), Ok(()));
        assert!(matches!(
            MemoryReplay::new(ReplayConfig { capacity: 0, ..d() }),
            Err(ActorError::Replay(m)) if m.contains("replay.capacity")
        ));
        assert!(matches!(
            MemoryReplay::new(ReplayConfig { backend: "redis".into(), ..d() }),
            Err(ActorError::Replay(m)) if m.contains("replay.backend")
        ));
    }
}
