//! MemoryReplay's own tests: what only the memory backend does. The behaviour both backends
//! share (min_size, the ratio limiter, batch refusal, max_times_sampled, close, draining after
//! close, two producers and one consumer) is checked by `actors/tests/replay_conformance.rs`.

use super::*;
use crate::replay::testutil::{cfg, rec, TestResult, LONG};
use tokio::time::timeout;

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
    // Only 4 are present, so a FIFO call for 10 hands out those 4, oldest first; with
    // max_times_sampled = 0 they stay (depth 4 after the sample).
    assert_eq!(seqs, vec![2, 3, 4, 5]);
    let st = rb.stats();
    assert_eq!(
        (st.inserted, st.evicted, st.dropped, st.depth, st.sampled),
        (6, 2, 2, 4, 4)
    );
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
