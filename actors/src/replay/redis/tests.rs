//! RedisReplay's own tests, each against a redis-server it starts itself: what only the redis backend does (several instances on one run, claims, restarts,
//! uses per record). The behaviour both backends share is checked by
//! `actors/tests/replay_conformance.rs`.

use super::*;
use crate::accounting::{settle, Ledger};
use crate::replay::testutil::redis_server::Persistence;
use crate::replay::testutil::{
    fails_naming_the_address_not_the_password, rec, run_id, spawn_producer, wait_until,
    RedisServer, TestResult, LONG, SHORT,
};
use crate::replay::{tensors_to_payload, testutil, Sampler};
use candle_core::{Device, Tensor};
use std::sync::{MutexGuard, PoisonError};
use tokio::time::timeout;

/// [`testutil::cfg`] on the redis backend.
fn cfg(capacity: usize, min_size: usize, spi: f64, eb: f64, sampler: Sampler) -> ReplayConfig {
    ReplayConfig {
        backend: ReplayBackend::Redis,
        ..testutil::cfg(capacity, min_size, spi, eb, sampler)
    }
}

async fn inserted(rb: &RedisReplay) -> u64 {
    rb.fetch_stats().await.map(|s| s.inserted).unwrap_or(0)
}

type Applied = Arc<Mutex<HashMap<(u32, u64), u32>>>;

/// A learner: sample, "apply" (count the key), ack; until `total` keys are applied in all.
async fn learn(rb: Arc<RedisReplay>, applied: Applied, total: usize, batch: usize) -> Result<()> {
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
    let redis = RedisServer::start();
    let url = redis.url();
    // A record with real safetensors bytes and awkward scalars (NaN payload, -0, subnormal)
    // goes through XADD / XREADGROUP and comes back with the same encoded bytes.
    let run = run_id("roundtrip");
    let rb = RedisReplay::connect(&url, &run, "c0", cfg(16, 1, 0.0, 0.0, Sampler::Fifo)).await?;
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
    let redis = RedisServer::start();
    let url = redis.url();
    // Two producers insert 5000 records each through a 1024-entry stream (back-pressure is
    // engaged); two consumers of one group (two learners) share them. Each key must be
    // applied exactly once, and the stream must end empty with nothing dropped.
    const PER: u64 = 5000;
    let run = run_id("10k");
    let c = cfg(1024, 100, 1.0, 200.0, Sampler::Fifo);
    let prod = Arc::new(RedisReplay::connect(&url, &run, "p", c.clone()).await?);
    let l1 = Arc::new(RedisReplay::connect(&url, &run, "l1", c.clone()).await?);
    let l2 = Arc::new(RedisReplay::connect(&url, &run, "l2", c).await?);
    let producers: Vec<_> = (0..2u32)
        .map(|p| spawn_producer(prod.clone(), p, 0..PER))
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
    let redis = RedisServer::start();
    let url = redis.url();
    // Consumer A takes 20 of 50 records and is dropped before acking (a killed learner, its
    // heartbeat stops with it). Consumer B, with a 300 ms idle bound, claims A's entries with
    // XAUTOCLAIM; every key is applied exactly once by B.
    let run = run_id("claim");
    let opts = RedisOptions {
        claim_idle: Duration::from_millis(300),
        ..RedisOptions::default()
    };
    let c = cfg(100, 1, 0.0, 0.0, Sampler::Fifo);
    let prod = RedisReplay::connect_with(&url, &run, "p", c.clone(), opts.clone()).await?;
    for s in 0..50 {
        prod.insert(rec(0, s)).await?;
    }
    let a = RedisReplay::connect_with(&url, &run, "a", c.clone(), opts.clone()).await?;
    let taken = timeout(LONG, a.sample(20, LONG))
        .await??
        .unwrap_or_default();
    assert_eq!(taken.len(), 20);
    drop(a);
    let b = Arc::new(RedisReplay::connect_with(&url, &run, "b", c, opts).await?);
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
    let redis = RedisServer::start();
    let url = redis.url();
    // capacity 100, no consumer: 100 inserts pass, the 101st waits (no trimming, nothing
    // dropped) until a learner samples one record and acks it.
    let run = run_id("backpressure");
    let c = cfg(100, 1, 0.0, 0.0, Sampler::Fifo);
    let prod = Arc::new(RedisReplay::connect(&url, &run, "p", c.clone()).await?);
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

    let learner = RedisReplay::connect(&url, &run, "l", c).await?;
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
    let redis = RedisServer::start();
    let url = redis.url();
    // Two instances (two "processes") insert into one run, a third samples.
    // spi = 1, min_size = 10, error_buffer = 5: min_diff = 5, max_diff = 15.
    let run = run_id("limiter");
    let c = cfg(100, 10, 1.0, 5.0, Sampler::Fifo);
    let a = Arc::new(RedisReplay::connect(&url, &run, "a", c.clone()).await?);
    let b = Arc::new(RedisReplay::connect(&url, &run, "b", c.clone()).await?);
    let l = RedisReplay::connect(&url, &run, "l", c).await?;
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
    let ta = spawn_producer(a.clone(), 1, 5..100);
    let tb = spawn_producer(b.clone(), 2, 5..100);
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
    let redis = RedisServer::start();
    let url = redis.url();
    // spi = 2 (so U = 2 uses per record), uniform sampler, capacity 64: both the stream bound
    // and the ratio limiter engage. Each of 300 records must be handed out exactly twice and
    // then retired, without the two sides blocking each other; sampled = 2 x inserted.
    const N: u64 = 300;
    let run = run_id("uses");
    let c = cfg(64, 16, 2.0, 40.0, Sampler::Uniform);
    let prod = Arc::new(RedisReplay::connect(&url, &run, "p", c.clone()).await?);
    let learner = RedisReplay::connect(&url, &run, "l", c).await?;
    // n + min_diff must fit the stream: min_diff = 16 * 2 - 40 = -8, so n = 73 (73 - 8 = 65
    // > 64) is refused, although n + spi = 75 <= 2 * error_buffer = 80 passes.
    assert!(matches!(
        learner.sample(73, Duration::ZERO).await,
        Err(ActorError::Replay(m)) if m.contains("replay.capacity")
    ));
    let producer = spawn_producer(prod.clone(), 0, 0..N);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_mid_run_loses_nothing() -> TestResult {
    // A producer and a learner on a redis-server of our own; after 300 records are applied
    // the server is SIGKILLed and restarted on the same port and AOF directory. Both sides
    // reconnect with back-off; every seq produced is applied exactly once or counted as
    // dropped (and none is dropped).
    const N: u64 = 4000;
    let mut server = RedisServer::start_with(Persistence::Aof);
    let url = server.url();
    let run = run_id("restart");
    let c = cfg(256, 16, 1.0, 64.0, Sampler::Fifo);
    let prod = Arc::new(RedisReplay::connect(&url, &run, "p", c.clone()).await?);
    let learner = Arc::new(RedisReplay::connect(&url, &run, "l", c).await?);
    let producer = spawn_producer(prod.clone(), 0, 0..N);
    let applied: Applied = Arc::default();
    let consumer = tokio::spawn(learn(learner.clone(), applied.clone(), N as usize, 32));
    assert!(wait_until(LONG, || async { lock(&applied).len() >= 300 }).await);

    tokio::task::block_in_place(|| server.restart());
    timeout(LONG, producer).await???;
    timeout(LONG, consumer).await???;

    let dropped = learner.fetch_stats().await?.dropped;
    let a = lock(&applied);
    assert!(a.values().all(|&n| n == 1), "a record was applied twice");
    assert_eq!(a.len() as u64 + dropped, N);
    assert_eq!(dropped, 0);
    Ok(())
}

#[tokio::test]
async fn unreachable_redis_names_the_address_not_the_password() -> TestResult {
    // A closed port: one clear error with host:port, without the password, quickly (no
    // reconnect loop at connect time).
    fails_naming_the_address_not_the_password(|url| async move {
        let c = cfg(8, 1, 0.0, 0.0, Sampler::Fifo);
        RedisReplay::connect(&url, &run_id("down"), "c", c).await
    })
    .await
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

/// The two phases of a batch insert on their own: admission reserves room (records of other
/// batches in flight count as in the stream), skips a record repeating its producer's last key
/// and stops at capacity; the commit adds the records with their counters, releases the
/// reservation and leaves its done mark; a reservation whose producer never commits expires.
#[tokio::test]
async fn batch_insert_admission_reserves_and_commit_releases() -> TestResult {
    let redis = RedisServer::start();
    let url = redis.url();
    let run = run_id("insert-many");
    let opts = RedisOptions {
        claim_idle: Duration::from_millis(300),
        ..RedisOptions::default()
    };
    let c = cfg(5, 1, 0.0, 0.0, Sampler::Fifo);
    let rb = RedisReplay::connect_with(&url, &run, "c0", c, opts).await?;
    let inner = &rb.inner;
    let wait = Wait {
        deadline: None,
        on_close: OnClose::Fail,
    };
    let nonce = |n: &str| format!("{}{n}", inner.keys.nonce);
    let admit = |n: &str, recs: Vec<Record>, left: usize| {
        let n = nonce(n);
        async move { step_none(inner.admit(&recs, left, &n, wait).await) }
    };
    let reserved = || async {
        let mut c = inner.cmd.clone();
        redis::cmd("HLEN")
            .arg(&inner.keys.reserved)
            .query_async::<u64>(&mut c)
            .await
    };
    let recs: Vec<Record> = (0..3).map(|s| rec(4, s)).collect();
    assert_eq!(
        admit("a", recs.clone(), 3).await?,
        ("ok".into(), 0, 3, 0, vec![])
    );
    // Batch "a" holds 3 of the 5 slots: another batch gets 2 (and a retry of its admission
    // replaces its reservation instead of adding one).
    let other: Vec<Record> = (0..3).map(|s| rec(5, s)).collect();
    assert_eq!(
        admit("b", other.clone(), 3).await?,
        ("full".into(), 0, 2, 0, vec![])
    );
    assert_eq!(
        admit("b", other.clone(), 3).await?,
        ("full".into(), 0, 2, 0, vec![])
    );
    assert_eq!(reserved().await?, 2);
    let add: Vec<&Record> = recs.iter().collect();
    step_none(inner.commit(&add, 3, &nonce("a"), wait).await)?;
    assert_eq!((inserted(&rb).await, reserved().await?), (3, 1));
    let mut c = inner.cmd.clone();
    let done: bool = redis::cmd("EXISTS")
        .arg(format!("{}:done", nonce("a")))
        .query_async(&mut c)
        .await?;
    assert!(done);
    // Batch "b" never commits (its producer died): after the reservation's ttl (claim_idle,
    // at least 1 s) its room is free again. (4, 2) repeats producer 4's last key: skipped.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let more: Vec<Record> = (2..6).map(|s| rec(4, s)).collect();
    assert_eq!(
        admit("c", more.clone(), 4).await?,
        ("full".into(), 3, 3, 0, vec![1])
    );
    let add: Vec<&Record> = more[1..3].iter().collect();
    step_none(inner.commit(&add, 3, &nonce("c"), wait).await)?;
    assert_eq!((inserted(&rb).await, reserved().await?), (5, 0));
    // The stream holds the records in order, each decodable.
    let got = timeout(LONG, rb.sample(5, LONG))
        .await??
        .unwrap_or_default();
    let keys: Vec<(u32, u64)> = got.iter().map(Record::key).collect();
    assert_eq!(keys, vec![(4, 0), (4, 1), (4, 2), (4, 3), (4, 4)]);
    rb.purge().await?;
    Ok(())
}

/// A batch insert (admission, then XADDs + commit with one mark per producer and stream) leaves
/// Redis as inserting the same records one by one does: the same entries in the same order, the
/// same counter, producers' last seqs and producer streams' high-water marks; a record repeating
/// its producer's last key is skipped by both.
#[tokio::test]
async fn batch_insert_leaves_what_single_inserts_leave() -> TestResult {
    let redis = RedisServer::start();
    let url = redis.url();
    let gen = 1u64 << crate::accounting::GENERATION_SHIFT;
    // Two producers, producer 1 in two generations, interleaved; (2, 7) follows itself.
    let keys: Vec<(u32, u64)> = vec![
        (1, 3),
        (2, 5),
        (1, 4),
        (1, gen),
        (2, 7),
        (2, 7),
        (1, gen + 2),
        (2, 6),
    ];
    let recs: Vec<Record> = keys.iter().map(|&(p, s)| rec(p, s)).collect();
    let mut seen = Vec::new();
    for batched in [false, true] {
        let run = run_id(if batched { "batched" } else { "single" });
        let rb = RedisReplay::connect(&url, &run, "c", cfg(64, 1, 0.0, 0.0, Sampler::Fifo)).await?;
        if batched {
            rb.insert_many(recs.clone()).await?;
        } else {
            for r in &recs {
                rb.insert(r.clone()).await?;
            }
        }
        let k = &rb.inner.keys;
        let mut c = rb.inner.cmd.clone();
        let (last, produced, ins): (BTreeMap<String, String>, BTreeMap<String, String>, u64) =
            redis::pipe()
                .hgetall(&k.last)
                .hgetall(&k.produced)
                .get(&k.inserts)
                .query_async(&mut c)
                .await?;
        let got = timeout(LONG, rb.sample(64, LONG))
            .await??
            .unwrap_or_default();
        let order: Vec<(u32, u64)> = got.iter().map(Record::key).collect();
        seen.push((last, produced, ins, order));
        rb.purge().await?;
    }
    assert_eq!(seen[0].2, 7);
    assert_eq!(seen[0], seen[1]);
    // The marks as one write per record would leave them.
    let add: Vec<&Record> = recs.iter().collect();
    let (last, top) = ops::commit_marks(&add);
    assert_eq!(last, vec![(1, gen + 2), (2, 6)]);
    let top: Vec<_> = top.into_iter().collect();
    assert_eq!(top, vec![((1, 0), 4), ((1, 1), gen + 2), ((2, 0), 7)]);
    Ok(())
}

/// A learner with a ledger (as the learner actor does it): sample, refuse keys beyond their uses,
/// apply (commit), ack; until `total` distinct keys are applied.
async fn learn_with_ledger(
    rb: &RedisReplay,
    ledger: &mut Ledger,
    total: u64,
    batch: usize,
) -> Result<()> {
    let end = Instant::now() + LONG;
    while Instant::now() < end {
        if ledger.applied_count() >= total {
            return Ok(());
        }
        let Some(recs) = rb.sample(batch, Duration::from_millis(100)).await? else {
            continue;
        };
        let (keep, dups) = ledger.admit(recs);
        let keys: Vec<(u32, u64)> = keep.iter().map(Record::key).collect();
        ledger.commit(&keys);
        rb.ack(&keys).await?;
        rb.ack(&dups).await?;
    }
    Err(ActorError::Replay("learner ran out of time".to_owned()))
}

#[tokio::test]
async fn redelivered_and_duplicate_records_are_counted_and_applied_once() -> TestResult {
    let redis = RedisServer::start();
    let url = redis.url();
    // U = 1 (spi 1), error_buffer 4: inserts may run at most 5 records ahead of samples.
    // Consumer A takes the first 4 records and dies before acking (redelivery: B claims them
    // with XAUTOCLAIM after 300 ms idle). The producer inserts seqs 4..40 and, after every third,
    // the record before it again: a second entry of one key (12 of them), which the key filter
    // throws away. Before the fix a thrown-away entry was inserted but never sampled, so after 5
    // of them the limiter stopped inserts (waiting for samples) and samples (nothing left) for
    // good; now its unspent use counts as sampled.
    let run = run_id("acct");
    let opts = RedisOptions {
        claim_idle: Duration::from_millis(300),
        ..RedisOptions::default()
    };
    let c = cfg(64, 1, 1.0, 4.0, Sampler::Fifo);
    let prod = Arc::new(RedisReplay::connect_with(&url, &run, "p", c.clone(), opts.clone()).await?);
    for s in 0..4 {
        prod.insert(rec(0, s)).await?;
    }
    let a = RedisReplay::connect_with(&url, &run, "a", c.clone(), opts.clone()).await?;
    let taken = timeout(LONG, a.sample(4, LONG)).await??.unwrap_or_default();
    assert_eq!(taken.len(), 4);
    drop(a);
    let p = prod.clone();
    let producer = tokio::spawn(async move {
        let mut dups = 0u64;
        for s in 4..40 {
            p.insert(rec(0, s)).await?;
            if s % 3 == 0 {
                p.insert(rec(0, s - 1)).await?;
                dups += 1;
            }
        }
        Ok::<u64, ActorError>(dups)
    });
    let b = RedisReplay::connect_with(&url, &run, "b", c, opts).await?;
    let mut ledger = Ledger::new(b.uses_per_record());
    timeout(LONG, learn_with_ledger(&b, &mut ledger, 40, 4)).await??;
    let dups = timeout(LONG, producer).await???;
    assert_eq!(dups, 12);
    // Let B see (and throw away) every entry left: the stream ends empty.
    assert!(
        wait_until(LONG, || async {
            let _ = b.sample(1, Duration::from_millis(20)).await;
            b.fetch_stats().await.is_ok_and(|s| s.depth == 0)
        })
        .await
    );
    // Nothing applied twice: 40 keys, 40 uses, no delivery refused by the ledger.
    assert_eq!(
        (
            ledger.applied_count(),
            ledger.applications,
            ledger.deduplicated
        ),
        (40, 40, 0)
    );
    let st = b.fetch_stats().await?;
    // 52 entries inserted and, with the duplicates' unspent uses, 52 counted as sampled.
    assert_eq!((st.inserted, st.sampled, st.dropped), (52, 52, 0));
    let acct = settle(&ledger, &b.census().await?);
    assert_eq!(
        (
            acct.produced,
            acct.inserted,
            acct.applied,
            acct.applications
        ),
        (40, 40, 40, 40)
    );
    assert_eq!(
        (
            acct.redelivered,
            acct.deduplicated,
            acct.lost,
            acct.in_flight
        ),
        (4, 12, 0, 0)
    );
    assert!(acct.dropped.is_empty() && acct.balances(), "{acct:?}");
    prod.purge().await?;
    Ok(())
}

#[tokio::test]
async fn records_of_a_redis_that_comes_back_empty_are_counted_lost() -> TestResult {
    // Producer 2 inserts seqs 0..20; the learner applies 10 (FIFO, U = 1: its window holds only
    // what it hands out); Redis restarts without persistence, losing seqs 10..20; the producer
    // inserts 20..30, which the learner applies. The sequence gaps say 10 lost, and every produced
    // record is applied or lost.
    let mut redis = RedisServer::start_with(Persistence::None);
    let url = redis.url();
    let run = run_id("lost");
    let c = cfg(64, 1, 1.0, 64.0, Sampler::Fifo);
    let prod = RedisReplay::connect(&url, &run, "p", c.clone()).await?;
    let learner = RedisReplay::connect(&url, &run, "l", c).await?;
    for s in 0..20 {
        prod.insert(rec(2, s)).await?;
    }
    let mut ledger = Ledger::new(learner.uses_per_record());
    timeout(LONG, learn_with_ledger(&learner, &mut ledger, 10, 5)).await??;
    redis.restart();
    for s in 20..30 {
        timeout(LONG, prod.insert(rec(2, s))).await??;
    }
    timeout(LONG, learn_with_ledger(&learner, &mut ledger, 20, 5)).await??;
    let acct = settle(&ledger, &learner.census().await?);
    assert_eq!(
        (acct.produced, acct.applied, acct.lost, acct.in_flight),
        (30, 20, 10, 0),
        "{acct:?}"
    );
    assert!(acct.balances(), "{acct:?}");
    for s in 10..20 {
        assert!(!ledger.is_applied((2, s)));
    }
    Ok(())
}

#[tokio::test]
async fn a_consumer_restarted_under_its_name_takes_its_pending_entries_at_once() -> TestResult {
    // Consumer "learner-0" (FIFO, U = 2 uses per record) takes the first 30 of 40 records, one
    // use each, and is dropped without acking: a killed learner. Claims are off for an hour, so
    // the only way back for those entries is a read of the consumer's own pending entries. A
    // consumer under another name gets only the 30 entries never delivered (10 old, 20 new);
    // started again under its name, "learner-0" gets its 30 at once, each with the one use it
    // has left (the uses spent are counted in Redis).
    let redis = RedisServer::start();
    let url = redis.url();
    let run = run_id("same-name");
    let opts = RedisOptions {
        claim_idle: Duration::from_secs(3600),
        ..RedisOptions::default()
    };
    let c = cfg(64, 1, 2.0, 1000.0, Sampler::Fifo);
    let prod = RedisReplay::connect_with(&url, &run, "p", c.clone(), opts.clone()).await?;
    for s in 0..40 {
        prod.insert(rec(0, s)).await?;
    }
    let a = RedisReplay::connect_with(&url, &run, "learner-0", c.clone(), opts.clone()).await?;
    let first = timeout(LONG, a.sample(30, LONG))
        .await??
        .unwrap_or_default();
    assert_eq!(first.len(), 30);
    drop(a);
    for s in 40..60 {
        prod.insert(rec(0, s)).await?;
    }
    // A stranger gets only the 30 entries never delivered to anyone: it reads until it has 30
    // keys (or LONG passes), then one more short sample must bring no other key.
    let other = RedisReplay::connect_with(&url, &run, "learner-9", c.clone(), opts.clone()).await?;
    let mut seen = HashMap::new();
    let t0 = Instant::now();
    let mut last_look = false;
    while !last_look {
        last_look = seen.len() >= 30 || t0.elapsed() >= LONG;
        if let Some(recs) = other.sample(40, SHORT).await? {
            for r in recs {
                *seen.entry(r.key()).or_insert(0u32) += 1;
            }
        }
    }
    assert_eq!(seen.len(), 30, "a new name reads only undelivered entries");
    assert!(seen.keys().all(|k| k.1 >= 30), "{seen:?}");
    drop(other);
    // The restarted "learner-0" gets its 30 at once, each with the one use it has left.
    let b = RedisReplay::connect_with(&url, &run, "learner-0", c, opts).await?;
    let mut again: HashMap<(u32, u64), u32> = HashMap::new();
    let handed: HashMap<(u32, u64), u32> = first.iter().fold(HashMap::new(), |mut m, r| {
        *m.entry(r.key()).or_insert(0) += 1;
        m
    });
    let t0 = Instant::now();
    while again.values().sum::<u32>() < 30 && t0.elapsed() < LONG {
        if let Some(recs) = b.sample(40, SHORT).await? {
            for r in recs {
                *again.entry(r.key()).or_insert(0) += 1;
            }
        }
    }
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t0.elapsed()
    );
    assert_eq!(again.len(), 30, "{again:?}");
    for s in 0..30 {
        assert_eq!(handed.get(&(0, s)), Some(&1), "record {s}: {handed:?}");
        assert_eq!(again.get(&(0, s)), Some(&1), "record {s}: {again:?}");
    }
    prod.purge().await?;
    Ok(())
}
