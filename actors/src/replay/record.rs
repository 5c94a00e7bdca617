//! One unit of experience (`Record`) and its self-describing binary form, which both backends
//! store, plus the safetensors payload helpers producers and learners use for the tensors.

use std::collections::{HashMap, HashSet};

use candle_core::{DType, Device, Tensor};

use crate::{ActorError, Result};

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
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode_with(|b| {
            out.extend_from_slice(b);
            Ok::<(), std::convert::Infallible>(())
        })
        .unwrap_or_else(|e| match e {});
        out
    }

    /// Length of [`Record::encode`]'s bytes.
    pub fn encoded_len(&self) -> usize {
        let varint = |v: u64| (64 - (v | 1).leading_zeros() as usize).div_ceil(7);
        let scalars: usize = self
            .scalars
            .iter()
            .map(|(n, _)| varint(n.len() as u64) + n.len() + 8)
            .sum();
        FIXED_HEADER
            + varint(self.payload.len() as u64)
            + self.payload.len()
            + varint(self.scalars.len() as u64)
            + scalars
            + 4
    }

    /// [`Record::encode`]'s bytes handed to `put` piece by piece (the payload as one borrowed
    /// slice, never copied here), e.g. straight into a redis command buffer.
    pub fn encode_with<E>(
        &self,
        mut put: impl FnMut(&[u8]) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        let mut crc = crc32fast::Hasher::new();
        let mut emit = |b: &[u8], crc: &mut crc32fast::Hasher| {
            crc.update(b);
            put(b)
        };
        let mut head = Vec::with_capacity(FIXED_HEADER + 10);
        head.extend_from_slice(&MAGIC);
        head.push(FORMAT_VERSION);
        head.extend_from_slice(&self.seq.to_le_bytes());
        head.extend_from_slice(&self.producer.to_le_bytes());
        head.extend_from_slice(&self.version.to_le_bytes());
        put_varint(&mut head, self.payload.len() as u64);
        emit(&head, &mut crc)?;
        emit(&self.payload, &mut crc)?;
        let mut tail = Vec::new();
        put_varint(&mut tail, self.scalars.len() as u64);
        for (name, value) in &self.scalars {
            put_varint(&mut tail, name.len() as u64);
            tail.extend_from_slice(name.as_bytes());
            tail.extend_from_slice(&value.to_bits().to_le_bytes());
        }
        emit(&tail, &mut crc)?;
        put(&crc.finalize().to_le_bytes())
    }

    /// Decode bytes made by [`Record::encode`]. Truncated, corrupt (checksum mismatch) or foreign
    /// input is an error, never a panic.
    pub fn decode(bytes: &[u8]) -> Result<Record> {
        let (mut rec, payload) = Self::decode_parts(bytes)?;
        rec.payload = bytes[payload].to_vec();
        Ok(rec)
    }

    /// [`Record::decode`] of an owned buffer: the payload is moved to the front of `bytes` in
    /// place and kept, not copied into a new allocation.
    pub fn decode_owned(mut bytes: Vec<u8>) -> Result<Record> {
        let (mut rec, payload) = Self::decode_parts(&bytes)?;
        bytes.truncate(payload.end);
        bytes.drain(..payload.start);
        rec.payload = bytes;
        Ok(rec)
    }

    /// The record without its payload, and where the payload lies in `bytes`.
    fn decode_parts(bytes: &[u8]) -> Result<(Record, std::ops::Range<usize>)> {
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
        let payload_at = r.pos;
        r.take(payload_len, "payload")?;
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
        Ok((
            Record {
                seq,
                producer,
                version,
                payload: Vec::new(),
                scalars,
            },
            payload_at..payload_at + payload_len,
        ))
    }
}

/// The key `(producer, seq)` of an encoded record, read from its header without checking the
/// rest (for counting what a stream holds); None if the bytes do not start like a record.
pub fn peek_key(bytes: &[u8]) -> Option<(u32, u64)> {
    if bytes.len() < MIN_ENCODED || bytes[..4] != MAGIC || bytes[4] != FORMAT_VERSION {
        return None;
    }
    let seq = u64::from_le_bytes(bytes[5..13].try_into().ok()?);
    let producer = u32::from_le_bytes(bytes[13..17].try_into().ok()?);
    Some((producer, seq))
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

/// CRC-32/ISO-HDLC (the zlib/PNG CRC), reflected polynomial 0xEDB88320: the byte-at-a-time
/// reference the tests check [`crc32`] against.
#[cfg(test)]
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

/// CRC-32/ISO-HDLC (crc32fast: carry-less multiply where the CPU has it; the table-driven loop
/// was most of the client's time on 64 KiB and 1 MiB records).
fn crc32(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::testutil::{rec, TestResult};

    #[test]
    fn crc32_check_value() {
        // The catalogued check value of CRC-32/ISO-HDLC over "123456789" is 0xCBF43926.
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn crc32_agrees_with_byte_at_a_time() {
        let bytewise = |bytes: &[u8]| {
            let mut c = !0u32;
            for &b in bytes {
                c = CRC32_TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
            }
            !c
        };
        // Every length up to 1000 (across the folded blocks), on bytes that are not all alike.
        let data: Vec<u8> = (0..1000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for len in 0..data.len() {
            assert_eq!(crc32(&data[..len]), bytewise(&data[..len]), "length {len}");
        }
        assert_eq!(crc32(&data[3..]), bytewise(&data[3..]));
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
        // The owned decode (the redis read path) gives the same record (compared by its bytes:
        // the NaN scalar is not equal to itself).
        assert_eq!(Record::decode_owned(bytes.clone())?.encode(), bytes);
        assert_eq!(peek_key(&bytes), Some(r.key()));
        assert_eq!(peek_key(&bytes[..10]), None);
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
    fn encoded_len_and_piecewise_encoding_match_encode() -> TestResult {
        // Around the varint boundaries of the payload length and the scalar names.
        for len in [0usize, 1, 127, 128, 16_383, 16_384, 70_000] {
            let r = Record {
                payload: (0..len).map(|i| (i * 7) as u8).collect(),
                scalars: vec![("x".repeat(len % 200), 1.0), ("y".to_owned(), -2.0)],
                ..rec(3, len as u64)
            };
            let bytes = r.encode();
            assert_eq!(r.encoded_len(), bytes.len(), "payload {len}");
            let mut pieces = Vec::new();
            r.encode_with(|b| {
                pieces.extend_from_slice(b);
                Ok::<(), ()>(())
            })
            .ok();
            assert_eq!(pieces, bytes, "payload {len}");
            assert_eq!(
                Record::decode_owned(bytes.clone())?,
                Record::decode(&bytes)?
            );
            assert!(Record::decode_owned(bytes[1..].to_vec()).is_err());
        }
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
}
