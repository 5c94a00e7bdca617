//! One conformance suite for every `ReplayBuffer` backend: the same assertions on insert / sample /
//! ack, the rate limiter blocking and releasing, capacity, `max_times_sampled`, close and stats,
//! run once against `MemoryReplay` and once against `RedisReplay` (on a redis-server the test
//! starts on a free port; each buffer under a run id of its own).
//!
//! The one difference the suite allows is the documented policy of a full buffer: the memory
//! backend evicts the oldest record, the redis backend makes the insert wait (on Redis 7, trimming
//! deletes pending entries). Everything else is asserted alike. Counters are read through
//! `stats()`, which the redis backend refreshes in the background, so stats are waited on with a
//! timeout; a producer's progress is counted by the producer itself.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tilt_actors::replay::redis::RedisReplay;
use tilt_actors::replay::{
    MemoryReplay, Record, ReplayBackend, ReplayBuffer, ReplayConfig, ReplayStats, Sampler,
};
use tilt_actors::ActorError;
use tokio::time::{timeout, Instant};

type TestResult = std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Bound on every wait that is expected to finish.
const LONG: Duration = Duration::from_secs(20);
/// How long a wait that is expected NOT to finish is given before we conclude it is blocked.
const SHORT: Duration = Duration::from_millis(300);

#[path = "../../tests/common/redis_server.rs"]
mod redis_server;

/// What an insert into a full buffer does.
#[derive(Debug, Clone, Copy, PartialEq)]
enum WhenFull {
    /// It proceeds and evicts the oldest record (counted in `dropped` if never sampled).
    EvictOldest,
    /// It waits until a learner has sampled and acknowledged a record.
    Wait,
}

type Made = Pin<Box<dyn Future<Output = tilt_actors::Result<Arc<dyn ReplayBuffer>>> + Send>>;

/// A backend under test: how to build a fresh, empty buffer from a config, its full policy, and
/// how many records each producer sends in the two-producer case (the in-process backend is fast
/// enough for a stress-sized run).
struct Backend {
    name: &'static str,
    when_full: WhenFull,
    per_producer: u64,
    make: Box<dyn Fn(ReplayConfig) -> Made + Send + Sync>,
}

impl Backend {
    async fn make(&self, cfg: ReplayConfig) -> tilt_actors::Result<Arc<dyn ReplayBuffer>> {
        (self.make)(cfg).await
    }
}

/// `[replay]` without the backend (the backend's factory sets it).
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

fn with_max_times(k: u32, c: ReplayConfig) -> ReplayConfig {
    ReplayConfig {
        max_times_sampled: k,
        ..c
    }
}

fn rec(producer: u32, seq: u64) -> Record {
    Record {
        seq,
        producer,
        version: 5,
        payload: seq.to_le_bytes().to_vec(),
        scalars: vec![("v_a".to_owned(), seq as f64 / 3.0)],
    }
}

fn seqs(recs: &[Record]) -> Vec<u64> {
    recs.iter().map(|r| r.seq).collect()
}

fn keys(recs: &[Record]) -> Vec<(u32, u64)> {
    recs.iter().map(Record::key).collect()
}

/// (inserted, sampled, evicted, depth, dropped).
fn tuple(s: &ReplayStats) -> (u64, u64, u64, u64, u64) {
    (s.inserted, s.sampled, s.evicted, s.depth, s.dropped)
}

/// Periodic check of a condition, bounded by `limit` (ractor's `periodic_check`).
async fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    cond()
}

/// Wait until `stats()` shows `want` as (inserted, sampled, evicted, depth, dropped).
async fn stats_become(rb: &Arc<dyn ReplayBuffer>, want: (u64, u64, u64, u64, u64)) -> TestResult {
    if wait_until(LONG, || tuple(&rb.stats()) == want).await {
        return Ok(());
    }
    Err(format!("stats stayed {:?}, expected {want:?}", tuple(&rb.stats())).into())
}

/// Sample exactly `n` records (waiting up to LONG), failing on a timeout.
async fn take(rb: &Arc<dyn ReplayBuffer>, n: usize) -> Result<Vec<Record>, ActorError> {
    match timeout(LONG, rb.sample(n, LONG)).await {
        Ok(r) => r?.ok_or_else(|| ActorError::Replay(format!("sample({n}) timed out"))),
        Err(_) => Err(ActorError::Replay(format!("sample({n}) hung"))),
    }
}

/// Insert / sample / ack, bit-exact records, a zero-sized sample, and the counters.
async fn insert_sample_ack(b: &Backend) -> TestResult {
    // FIFO, k = 1: every record is handed out once, then leaves (memory: at the sample; redis:
    // at the ack that retires it).
    let rb = b
        .make(with_max_times(1, cfg(16, 1, 0.0, 0.0, Sampler::Fifo)))
        .await?;
    assert_eq!(rb.sample(0, Duration::ZERO).await?, Some(Vec::new()));
    let sent: Vec<Record> = (0..3).map(|s| rec(7, s)).collect();
    for r in &sent {
        timeout(LONG, rb.insert(r.clone())).await??;
    }
    let got = take(&rb, 3).await?;
    assert_eq!(got, sent, "FIFO hands out the records as inserted");
    rb.ack(&keys(&got)).await?;
    stats_become(&rb, (3, 3, 3, 0, 0)).await?;
    // Nothing left: a sample ends by its timeout.
    assert_eq!(rb.sample(1, Duration::from_millis(50)).await?, None);
    Ok(())
}

/// `min_size` counts inserts; a sampler already waiting is woken by the insert that reaches it.
async fn min_size_gates_sampling(b: &Backend) -> TestResult {
    let rb = b.make(cfg(16, 5, 0.0, 0.0, Sampler::Uniform)).await?;
    for s in 0..4 {
        timeout(LONG, rb.insert(rec(0, s))).await??;
    }
    assert_eq!(rb.sample(1, Duration::from_millis(50)).await?, None);
    let waiter = {
        let rb = rb.clone();
        tokio::spawn(async move { rb.sample(2, LONG).await })
    };
    assert!(!wait_until(SHORT, || waiter.is_finished()).await);
    timeout(LONG, rb.insert(rec(0, 4))).await??;
    let got = timeout(LONG, waiter).await???;
    assert_eq!(got.map(|v| v.len()), Some(2));
    Ok(())
}

/// spi = 1, min_size = 10, error_buffer = 5: min_diff = 5, max_diff = 15 (hand computation as
/// in the limiter's tests). Inserts stop at 15, each sampled record releases one more, close
/// stops the producer with Closed, and the remaining budget can still be sampled after close.
async fn rate_limiter_blocks_and_releases(b: &Backend) -> TestResult {
    // k = 1 so both backends hand each record out once (redis: U = spi = 1).
    let rb = b
        .make(with_max_times(1, cfg(100, 10, 1.0, 5.0, Sampler::Fifo)))
        .await?;
    let done = Arc::new(AtomicU64::new(0));
    let producer = {
        let (rb, done) = (rb.clone(), done.clone());
        tokio::spawn(async move {
            for s in 0..100 {
                rb.insert(rec(1, s)).await?;
                done.fetch_add(1, Ordering::SeqCst);
            }
            Ok::<_, ActorError>(())
        })
    };
    let count = || done.load(Ordering::SeqCst);
    // The producer's count, and the buffer's own counter, reach `n` and stay there.
    let stuck_at = |n: u64| {
        let rb = rb.clone();
        async move {
            assert!(wait_until(LONG, || count() == n).await, "{}", count());
            assert!(!wait_until(SHORT, || count() > n).await);
            assert!(
                wait_until(LONG, || rb.stats().inserted == n).await,
                "{:?}",
                rb.stats()
            );
        }
    };
    // With nothing sampled: (inserts + 1) - 0 <= 15 lets exactly 15 through.
    stuck_at(15).await;
    assert!(!producer.is_finished());
    // One sampled record admits one insert: (16 + 1) - 1 = 16 > 15 stops the 17th.
    assert_eq!(seqs(&take(&rb, 1).await?), vec![0]);
    stuck_at(16).await;
    // Three more admit exactly three more.
    assert_eq!(seqs(&take(&rb, 3).await?), vec![1, 2, 3]);
    stuck_at(19).await;

    rb.close();
    assert!(matches!(
        timeout(LONG, producer).await??,
        Err(ActorError::Closed)
    ));
    assert_eq!(count(), 19);
    assert!(matches!(
        rb.insert(rec(1, 999)).await,
        Err(ActorError::Closed)
    ));
    // A sample of m passes iff 19 - (4 + m) >= 5: 9 pass (19 - 13 = 6), then 1 (= 5); after
    // that none can ever pass, and the buffer is closed.
    assert_eq!(seqs(&take(&rb, 9).await?), (4..13).collect::<Vec<_>>());
    assert_eq!(seqs(&take(&rb, 1).await?), vec![13]);
    assert!(matches!(
        timeout(LONG, rb.sample(1, LONG)).await?,
        Err(ActorError::Closed)
    ));
    assert!(
        wait_until(LONG, || {
            let st = rb.stats();
            (st.inserted, st.sampled) == (19, 14)
        })
        .await,
        "{:?}",
        rb.stats()
    );
    Ok(())
}

/// A sample of n with n + spi > 2 * error_buffer could wait forever: refused up front.
async fn refuses_batches_the_limiter_could_deadlock_on(b: &Backend) -> TestResult {
    // spi = 1, error_buffer = 5: n + 1 <= 10 allows n <= 9.
    let rb = b.make(cfg(100, 10, 1.0, 5.0, Sampler::Uniform)).await?;
    assert!(matches!(
        rb.sample(10, Duration::ZERO).await,
        Err(ActorError::Replay(m)) if m.contains("replay.error_buffer")
    ));
    assert_eq!(rb.sample(9, Duration::ZERO).await?, None);
    Ok(())
}

/// Capacity 4: the depth never exceeds it; a fifth insert evicts the oldest (memory) or waits
/// for an acknowledgement (redis). Either way the records handed out are the ones present, in
/// order.
async fn capacity_bounds_the_depth(b: &Backend) -> TestResult {
    let rb = b
        .make(with_max_times(1, cfg(4, 1, 0.0, 0.0, Sampler::Fifo)))
        .await?;
    for s in 0..4 {
        timeout(LONG, rb.insert(rec(0, s))).await??;
    }
    stats_become(&rb, (4, 0, 0, 4, 0)).await?;
    let fifth = {
        let rb = rb.clone();
        tokio::spawn(async move { rb.insert(rec(0, 4)).await })
    };
    match b.when_full {
        WhenFull::EvictOldest => {
            timeout(LONG, fifth).await???;
            // Record 0 left unsampled: evicted and dropped.
            stats_become(&rb, (5, 0, 1, 4, 1)).await?;
        }
        WhenFull::Wait => {
            assert!(!wait_until(SHORT, || fifth.is_finished()).await);
            // Sampled but not acknowledged still holds its place.
            let got = take(&rb, 1).await?;
            assert_eq!(seqs(&got), vec![0]);
            assert!(!wait_until(SHORT, || fifth.is_finished()).await);
            rb.ack(&keys(&got)).await?;
            timeout(LONG, fifth).await???;
            stats_become(&rb, (5, 1, 1, 4, 0)).await?;
        }
    }
    // Only 4 are present, so a FIFO call for 10 hands out those 4, oldest first.
    let got = take(&rb, 10).await?;
    assert_eq!(seqs(&got), vec![1, 2, 3, 4]);
    rb.ack(&keys(&got)).await?;
    assert!(rb.stats().depth <= 4);
    Ok(())
}

/// A record leaves after `max_times_sampled` hand-outs.
async fn max_times_sampled_removes_after_k(b: &Backend) -> TestResult {
    // FIFO, k = 2: record 0 is handed out twice, then record 1 twice.
    let rb = b
        .make(with_max_times(2, cfg(8, 1, 0.0, 0.0, Sampler::Fifo)))
        .await?;
    rb.insert(rec(0, 0)).await?;
    rb.insert(rec(0, 1)).await?;
    let mut out = vec![];
    for _ in 0..4 {
        let got = take(&rb, 1).await?;
        rb.ack(&keys(&got)).await?;
        out.extend(seqs(&got));
    }
    assert_eq!(out, vec![0, 0, 1, 1]);
    assert_eq!(rb.sample(1, Duration::from_millis(50)).await?, None);
    stats_become(&rb, (2, 4, 2, 0, 0)).await?;

    // Uniform, k = 3, one record: a call for 5 gets only the 3 uses there are.
    let rb = b
        .make(with_max_times(3, cfg(8, 1, 0.0, 0.0, Sampler::Uniform)))
        .await?;
    rb.insert(rec(0, 42)).await?;
    let got = take(&rb, 5).await?;
    assert_eq!(seqs(&got), vec![42; 3]);
    rb.ack(&keys(&got)).await?;
    stats_become(&rb, (1, 3, 1, 0, 0)).await?;
    Ok(())
}

/// Close wakes a sampler waiting for `min_size` and an inserter waiting on the limiter, both
/// with Closed; later inserts fail with Closed.
async fn close_wakes_waiters(b: &Backend) -> TestResult {
    let starved = b.make(cfg(8, 5, 0.0, 0.0, Sampler::Uniform)).await?;
    // spi = 1, min_size = 1, error_buffer = 1: max_diff = 2, so 2 inserts pass and the 3rd waits.
    let full = b.make(cfg(8, 1, 1.0, 1.0, Sampler::Uniform)).await?;
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
    assert!(matches!(
        starved.insert(rec(0, 0)).await,
        Err(ActorError::Closed)
    ));
    Ok(())
}

/// After close, what is present can still be taken; then sampling reports Closed.
async fn closed_buffer_drains_then_reports_closed(b: &Backend) -> TestResult {
    let rb = b
        .make(with_max_times(1, cfg(8, 1, 0.0, 0.0, Sampler::Fifo)))
        .await?;
    for s in 0..3 {
        rb.insert(rec(0, s)).await?;
    }
    rb.close();
    assert_eq!(seqs(&take(&rb, 2).await?), vec![0, 1]);
    assert_eq!(seqs(&take(&rb, 2).await?), vec![2]);
    assert!(matches!(
        timeout(LONG, rb.sample(2, LONG)).await?,
        Err(ActorError::Closed)
    ));
    Ok(())
}

/// Two producers and one FIFO consumer (k = 1) under the ratio limiter: every key arrives exactly
/// once, each producer's in its order, and the counters add up.
async fn two_producers_one_consumer_see_every_record_once(b: &Backend) -> TestResult {
    // spi = 1, min_size = 100, error_buffer = 200: min_diff = -100 <= 0 lets the consumer drain
    // to the last record; depth <= max_diff = 300 < capacity, so nothing is evicted unsampled.
    let per = b.per_producer;
    let rb = b
        .make(with_max_times(1, cfg(1024, 100, 1.0, 200.0, Sampler::Fifo)))
        .await?;
    let producers: Vec<_> = (0..2u32)
        .map(|p| {
            let rb = rb.clone();
            tokio::spawn(async move {
                for s in 0..per {
                    rb.insert(rec(p, s)).await?;
                }
                Ok::<_, ActorError>(())
            })
        })
        .collect();
    let mut seen: Vec<(u32, u64)> = Vec::new();
    let end = Instant::now() + LONG;
    while (seen.len() as u64) < 2 * per && Instant::now() < end {
        if let Some(batch) = rb.sample(64, Duration::from_millis(200)).await? {
            rb.ack(&keys(&batch)).await?;
            seen.extend(keys(&batch));
        }
    }
    for p in producers {
        timeout(LONG, p).await???;
    }
    assert_eq!(seen.len() as u64, 2 * per);
    let mut sorted = seen.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len() as u64, 2 * per, "a key was handed out twice");
    for p in 0..2u32 {
        let mine: Vec<u64> = seen.iter().filter(|k| k.0 == p).map(|k| k.1).collect();
        assert_eq!(mine, (0..per).collect::<Vec<_>>(), "producer {p}");
    }
    stats_become(&rb, (2 * per, 2 * per, 2 * per, 0, 0)).await?;
    Ok(())
}

/// The rate limiter of `rate_limiter_blocks_and_releases` (spi = 1, min_size = 10, max_diff = 15)
/// against one `insert_many` of 20 records: 15 go in and the call waits; each sampled record
/// lets one more in; the call completes once all 20 are in, and they come out in order.
async fn insert_many_blocks_then_completes_as_samples_free_room(b: &Backend) -> TestResult {
    let rb = b
        .make(with_max_times(1, cfg(100, 10, 1.0, 5.0, Sampler::Fifo)))
        .await?;
    let batch: Vec<Record> = (0..20).map(|s| rec(1, s)).collect();
    let call = {
        let rb = rb.clone();
        tokio::spawn(async move { rb.insert_many(batch).await })
    };
    let inserted_stays = |n: u64| {
        let rb = rb.clone();
        async move {
            assert!(
                wait_until(LONG, || rb.stats().inserted == n).await,
                "{:?}",
                rb.stats()
            );
            assert!(!wait_until(SHORT, || rb.stats().inserted > n).await);
        }
    };
    inserted_stays(15).await;
    assert!(!call.is_finished());
    assert_eq!(seqs(&take(&rb, 1).await?), vec![0]);
    inserted_stays(16).await;
    assert!(!call.is_finished());
    assert_eq!(seqs(&take(&rb, 3).await?), vec![1, 2, 3]);
    inserted_stays(19).await;
    assert!(!call.is_finished());
    assert_eq!(seqs(&take(&rb, 1).await?), vec![4]);
    timeout(LONG, call).await???;
    assert!(wait_until(LONG, || rb.stats().inserted == 20).await);
    // 20 - (5 + m) >= 5 lets 10 more out: the records of the batch, in order.
    assert_eq!(seqs(&take(&rb, 9).await?), (5..14).collect::<Vec<_>>());
    assert_eq!(seqs(&take(&rb, 1).await?), vec![14]);
    Ok(())
}

/// Close while an `insert_many` waits on the limiter: the call fails with Closed, the prefix it
/// inserted stays, and later batches fail with Closed.
async fn insert_many_close_while_blocked_returns_closed(b: &Backend) -> TestResult {
    // spi = 1, min_size = 1, error_buffer = 1: max_diff = 2, so 2 of the 5 go in.
    let rb = b.make(cfg(8, 1, 1.0, 1.0, Sampler::Uniform)).await?;
    let call = {
        let rb = rb.clone();
        tokio::spawn(async move { rb.insert_many((0..5).map(|s| rec(0, s)).collect()).await })
    };
    assert!(wait_until(LONG, || rb.stats().inserted == 2).await);
    assert!(!wait_until(SHORT, || call.is_finished()).await);
    rb.close();
    assert!(matches!(
        timeout(LONG, call).await??,
        Err(ActorError::Closed)
    ));
    assert!(matches!(
        rb.insert_many(vec![rec(0, 9)]).await,
        Err(ActorError::Closed)
    ));
    stats_become(&rb, (2, 0, 0, 2, 0)).await?;
    Ok(())
}

/// The same records inserted one by one into one buffer and with `insert_many` (two batches,
/// producers interleaved) into another: the same records come out in the same order, and the
/// counters agree at every step.
async fn insert_many_matches_per_record_inserts(b: &Backend) -> TestResult {
    let c = || with_max_times(1, cfg(64, 1, 0.0, 0.0, Sampler::Fifo));
    let one = b.make(c()).await?;
    let many = b.make(c()).await?;
    let sent: Vec<Record> = (0..12).map(|s| rec((s % 3) as u32, s)).collect();
    for r in &sent {
        timeout(LONG, one.insert(r.clone())).await??;
    }
    timeout(LONG, many.insert_many(sent[..7].to_vec())).await??;
    timeout(LONG, many.insert_many(sent[7..].to_vec())).await??;
    timeout(LONG, many.insert_many(Vec::new())).await??;
    stats_become(&one, (12, 0, 0, 12, 0)).await?;
    stats_become(&many, (12, 0, 0, 12, 0)).await?;
    let mut got = Vec::new();
    for rb in [&one, &many] {
        let first = take(rb, 5).await?;
        rb.ack(&keys(&first)).await?;
        stats_become(rb, (12, 5, 5, 7, 0)).await?;
        let rest = take(rb, 7).await?;
        rb.ack(&keys(&rest)).await?;
        stats_become(rb, (12, 12, 12, 0, 0)).await?;
        got.push([first, rest].concat());
    }
    assert_eq!(got[0], sent, "per-record inserts, FIFO");
    assert_eq!(
        got[1], sent,
        "insert_many, FIFO: every record once, in order"
    );
    Ok(())
}

type Case = for<'a> fn(&'a Backend) -> Pin<Box<dyn Future<Output = TestResult> + Send + 'a>>;

macro_rules! cases {
    ($($f:ident),* $(,)?) => {
        [$((stringify!($f), (|b| Box::pin($f(b))) as Case)),*]
    };
}

/// Every case, in order, against one backend; the error names the backend and the case.
async fn suite(b: Backend) -> TestResult {
    let cases = cases![
        insert_sample_ack,
        min_size_gates_sampling,
        rate_limiter_blocks_and_releases,
        refuses_batches_the_limiter_could_deadlock_on,
        capacity_bounds_the_depth,
        max_times_sampled_removes_after_k,
        close_wakes_waiters,
        closed_buffer_drains_then_reports_closed,
        two_producers_one_consumer_see_every_record_once,
        insert_many_blocks_then_completes_as_samples_free_room,
        insert_many_close_while_blocked_returns_closed,
        insert_many_matches_per_record_inserts,
    ];
    for (name, case) in cases {
        let t0 = Instant::now();
        case(&b)
            .await
            .map_err(|e| format!("{} backend, {name}: {e}", b.name))?;
        eprintln!("{} backend, {name}: ok in {:?}", b.name, t0.elapsed());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_backend_conforms() -> TestResult {
    suite(Backend {
        name: "memory",
        when_full: WhenFull::EvictOldest,
        per_producer: 5000,
        make: Box::new(|c| {
            Box::pin(async move {
                let c = ReplayConfig {
                    backend: ReplayBackend::Memory,
                    ..c
                };
                Ok(Arc::new(MemoryReplay::new(c)?) as Arc<dyn ReplayBuffer>)
            })
        }),
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_backend_conforms() -> TestResult {
    let server = redis_server::RedisServer::start();
    let url = server.url();
    // Every buffer gets a run id of its own.
    let next = Arc::new(AtomicU64::new(0));
    let backend = Backend {
        name: "redis",
        when_full: WhenFull::Wait,
        per_producer: 500,
        make: Box::new({
            move |c| {
                let id = format!("conformance-{}", next.fetch_add(1, Ordering::SeqCst));
                let url = url.clone();
                Box::pin(async move {
                    let c = ReplayConfig {
                        backend: ReplayBackend::Redis,
                        ..c
                    };
                    let rb = RedisReplay::connect(&url, &id, "c0", c).await?;
                    Ok(Arc::new(rb) as Arc<dyn ReplayBuffer>)
                })
            }
        }),
    };
    suite(backend).await
}
