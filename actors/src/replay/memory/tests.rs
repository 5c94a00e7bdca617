//! MemoryReplay's own tests (the behaviour both backends share is also checked by
//! `actors/tests/replay_conformance.rs`).

use super::*;
use std::collections::HashSet;
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
