//! The redis backend's [`Census`] for exact accounting: the producer streams' high-water marks and
//! the drops by reason (run-wide, from Redis), the keys still in the stream (read page by page,
//! from each entry's header), and what this process counted itself (redeliveries, duplicates,
//! records refused after close).

use std::collections::BTreeMap;

use redis::Value;

use super::conn::{OnClose, Wait};
use super::parse::parse_entries;
use super::{step_none, Inner};
use crate::accounting::{reason, stream_of, Census};
use crate::replay::record::peek_key;
use crate::{ActorError, Result};

/// Entries read by one XRANGE page.
const PAGE: usize = 1000;

impl Inner {
    pub(super) async fn census(&self) -> Result<Census> {
        let wait = Wait {
            deadline: None,
            on_close: OnClose::Ignore,
        };
        // The marks first: a record inserted after this read is not counted as produced, so it
        // cannot be missing from the stream read below.
        let (marks, drops): (BTreeMap<String, u64>, BTreeMap<String, u64>) = step_none(
            self.call("census", wait, || {
                let mut c = self.cmd.clone();
                let mut p = redis::pipe();
                p.cmd("HGETALL")
                    .arg(&self.keys.produced)
                    .cmd("HGETALL")
                    .arg(&self.keys.dropped_by);
                async move { p.query_async(&mut c).await }
            })
            .await,
        )?;
        let mut census = Census {
            dropped_unkeyed: drops,
            ..Census::default()
        };
        for (field, n) in marks {
            let stream = field
                .split_once(':')
                .and_then(|(p, g)| Some((p.parse().ok()?, g.parse().ok()?)));
            let Some(s) = stream else {
                return Err(ActorError::Replay(format!(
                    "redis at {}: {}: bad field {field:?}",
                    self.addr, self.keys.produced
                )));
            };
            census.produced_at_least(s, n);
            census.inserted += n;
        }
        let mut start = "-".to_owned();
        loop {
            let v: Value = step_none(
                self.call("XRANGE", wait, || {
                    let mut c = self.cmd.clone();
                    let mut cmd = redis::cmd("XRANGE");
                    cmd.arg(&self.keys.stream)
                        .arg(&start)
                        .arg("+")
                        .arg("COUNT")
                        .arg(PAGE);
                    async move { cmd.query_async::<Value>(&mut c).await }
                })
                .await,
            )?;
            let page = parse_entries(v).map_err(|e| {
                ActorError::Replay(format!("redis at {}: XRANGE reply: {e}", self.addr))
            })?;
            for d in &page {
                if let Some(k) = d.payload.as_deref().and_then(peek_key) {
                    census.present.entry(stream_of(k)).or_default().insert(k.1);
                }
            }
            match page.last() {
                Some(last) if page.len() == PAGE => start = format!("({last}", last = last.id),
                _ => break,
            }
        }
        let local = self.local()?;
        census.redelivered = local.counts.redelivered;
        census.deduplicated = local.counts.deduplicated;
        for (&s, &n) in &local.counts.handed {
            census.produced_at_least(s, n);
        }
        if !local.counts.refused.is_empty() {
            census
                .dropped
                .insert(reason::CLOSED.to_owned(), local.counts.refused.clone());
        }
        Ok(census)
    }
}
