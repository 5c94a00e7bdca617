//! Stream entry ids and the parsing of XREADGROUP / XAUTOCLAIM replies (RESP2 and RESP3 shapes).

use std::fmt;

use redis::Value;

use super::FIELD;

/// A stream entry id `ms-seq`; ordered as Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct EntryId {
    pub(super) ms: u64,
    pub(super) seq: u64,
}

impl EntryId {
    pub(super) const ZERO: EntryId = EntryId { ms: 0, seq: 0 };

    pub(super) fn parse(bytes: &[u8]) -> Option<Self> {
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
pub(super) struct Delivery {
    pub(super) id: EntryId,
    pub(super) payload: Option<Vec<u8>>,
}

fn bytes_of(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// The bytes of a string reply, moved out (no copy).
fn into_bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
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
                .and_then(|(_, v)| into_bytes(v))
                .unwrap_or_default(),
        ),
        Some(fields) => {
            // An entry without our field is foreign: an empty payload fails to decode and is
            // counted as dropped.
            let mut fields = items(fields)?.into_iter();
            let mut payload = Vec::new();
            while let Some(k) = fields.next() {
                let v = fields.next();
                if bytes_of(&k) == Some(FIELD.as_bytes()) {
                    payload = v.and_then(into_bytes).unwrap_or_default();
                    break;
                }
            }
            Some(payload)
        }
    };
    Ok(Some(Delivery { id, payload }))
}

pub(super) fn parse_entries(v: Value) -> std::result::Result<Vec<Delivery>, String> {
    let mut out = Vec::new();
    for e in items(v)? {
        if let Some(d) = parse_entry(e)? {
            out.push(d);
        }
    }
    Ok(out)
}

/// An XREADGROUP reply: nil, `[[stream, entries]]` (RESP2) or `{stream: entries}` (RESP3).
pub(super) fn parse_read(v: Value) -> std::result::Result<Vec<Delivery>, String> {
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
pub(super) type Claimed = (EntryId, Vec<Delivery>, Vec<EntryId>);

pub(super) fn parse_autoclaim(v: Value) -> std::result::Result<Claimed, String> {
    let mut parts = items(v)?.into_iter();
    let next = parse_id(&parts.next().ok_or("empty XAUTOCLAIM reply")?)?;
    let entries = parse_entries(parts.next().unwrap_or(Value::Nil))?;
    let deleted = items(parts.next().unwrap_or(Value::Nil))?
        .iter()
        .map(parse_id)
        .collect::<std::result::Result<_, _>>()?;
    Ok((next, entries, deleted))
}
