//! The read path of a sampler: own pending entries, entries claimed from dead consumers, and new
//! entries (non-blocking top-ups and blocking waits), admitted into the local window.

use std::time::Duration;

use redis::Value;
use tokio::time::Instant;

use super::conn::{OnClose, Wait};
use super::parse::{parse_autoclaim, parse_read, Delivery, EntryId};
use super::{Inner, GROUP};
use crate::accounting::reason;
use crate::replay::Sampler;
use crate::{ActorError, Result};

/// Longest BLOCK of one XREADGROUP; a sample waits in several such reads.
const BLOCK_CAP: Duration = Duration::from_secs(1);
/// Entries asked for by one XREADGROUP or XAUTOCLAIM page.
const READ_BATCH: usize = 512;
/// XAUTOCLAIM pages read in one maintenance pass.
const CLAIM_PAGES: usize = 8;

impl Inner {
    /// XREADGROUP from `id` ("0"/cursor = own pending, ">" = new). `block` uses the blocking
    /// connection.
    pub(super) async fn read_group(
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
    pub(super) async fn prior_uses(&self, ids: &[EntryId], wait: Wait) -> Result<Option<Vec<u32>>> {
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
    pub(super) async fn admit_redelivered(
        &self,
        ds: Vec<Delivery>,
        wait: Wait,
    ) -> Result<Option<()>> {
        let ids: Vec<EntryId> = ds.iter().map(|d| d.id).collect();
        let prior = step!(self.prior_uses(&ids, wait).await);
        let mut local = self.local()?;
        for (d, p) in ds.into_iter().zip(prior) {
            local.admit(d, p, self.uses, true);
        }
        Ok(Some(()))
    }

    pub(super) fn admit_new(&self, ds: Vec<Delivery>) -> Result<()> {
        let mut local = self.local()?;
        for d in ds {
            local.admit(d, 0, self.uses, false);
        }
        Ok(())
    }

    /// Own pending entries (when flagged) and entries claimed from dead consumers (when due).
    pub(super) async fn maintain(&self, wait: Wait) -> Result<Option<()>> {
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
                self.local()?
                    .drop
                    .extend(deleted.into_iter().map(|id| (id, reason::DELETED)));
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
    pub(super) async fn prefetch(&self, n: usize, wait: Wait) -> Result<Option<()>> {
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

    /// Wait for new entries on the blocking connection (at most until the deadline, one
    /// BLOCK_CAP or half the claim period at a time, and no longer than until close).
    pub(super) async fn block_for_new(&self, n: usize, deadline: Option<Instant>) -> Result<()> {
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
}
