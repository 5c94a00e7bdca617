//! Replay throughput: records/s and MB/s through the in-process and the Redis backend, for small
//! (1 KiB), tensor-sized (64 KiB) and large (1 MiB) records, one client, one unit (512, 64, 8
//! records) at a time. One iteration = insert a unit (`redis`: record by record; `redis_batch`:
//! one `insert_many`), sample it back, acknowledge it; `redis_batch_insert` times only the
//! `insert_many` (the sample and ack run untimed). The records are made outside the timing.
//! Needs Redis on 127.0.0.1:6379 (or TILT_REDIS_URL); scripts/bench-replay.sh runs it next to
//! redis-benchmark on the same Redis and prints the ratios.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tilt_actors::replay::redis::RedisReplay;
use tilt_actors::replay::{
    MemoryReplay, Record, ReplayBackend, ReplayBuffer, ReplayConfig, Sampler,
};

fn cfg(backend: ReplayBackend, capacity: usize) -> ReplayConfig {
    ReplayConfig {
        backend,
        capacity,
        min_size: 1,
        samples_per_insert: 0.0,
        error_buffer: capacity as f64,
        sampler: Sampler::Fifo,
        max_times_sampled: 0,
        seed: 0,
        url: std::env::var("TILT_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into()),
        ..ReplayConfig::default()
    }
}

/// Insert `recs` (one `insert` per record, or one `insert_many` for the unit when `batched`).
async fn insert(replay: &Arc<dyn ReplayBuffer>, recs: Vec<Record>, batched: bool) {
    if batched {
        replay.insert_many(recs).await.unwrap();
    } else {
        for r in recs {
            replay.insert(r).await.unwrap();
        }
    }
}

/// Sample `n` records back and acknowledge them.
async fn drain(replay: &Arc<dyn ReplayBuffer>, n: usize) {
    let mut got = 0;
    while got < n {
        let batch = replay
            .sample(n - got, Duration::from_secs(10))
            .await
            .unwrap()
            .expect("records");
        let keys: Vec<_> = batch.iter().map(|r| r.key()).collect();
        replay.ack(&keys).await.unwrap();
        got += batch.len();
    }
}

/// `iters` units, each made outside the timing by `make`; `what` times the insert alone
/// (`Insert`, the drain untimed) or insert + sample + ack (`RoundTrip`).
fn timed(
    rt: &tokio::runtime::Runtime,
    replay: &Arc<dyn ReplayBuffer>,
    iters: u64,
    make: &mut dyn FnMut() -> Vec<Record>,
    batched: bool,
    what: Timed,
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let recs = make();
        let n = recs.len();
        rt.block_on(async {
            let t = Instant::now();
            insert(replay, recs, batched).await;
            if what == Timed::Insert {
                total += t.elapsed();
                drain(replay, n).await;
            } else {
                drain(replay, n).await;
                total += t.elapsed();
            }
        });
    }
    total
}

#[derive(PartialEq, Clone, Copy)]
enum Timed {
    Insert,
    RoundTrip,
}

fn backends(c: &mut Criterion) {
    // As the `tilt` binary runs: its allocator (mimalloc, `tilt::alloc`; without this call the
    // bench does not link tilt and runs on glibc's malloc, 19% of the 1 KiB round trip in perf).
    tilt::alloc::tune();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("replay");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    let mut seq = 0u64;
    for (label, size, n) in [
        ("1KiB", 1usize << 10, 512usize),
        ("64KiB", 64 << 10, 64),
        ("1MiB", 1 << 20, 8),
    ] {
        g.throughput(Throughput::Bytes((size * n) as u64));
        let mut make = || -> Vec<Record> {
            (0..n)
                .map(|_| {
                    seq += 1;
                    Record {
                        seq,
                        producer: 1,
                        version: 0,
                        payload: vec![7u8; size],
                        scalars: vec![("v".into(), 1.0)],
                    }
                })
                .collect()
        };
        let mem: Arc<dyn ReplayBuffer> =
            Arc::new(MemoryReplay::new(cfg(ReplayBackend::Memory, 4 * n)).unwrap());
        g.bench_with_input(BenchmarkId::new("memory", label), &n, |b, _| {
            b.iter_custom(|iters| timed(&rt, &mem, iters, &mut make, false, Timed::RoundTrip))
        });
        let run_id = format!("bench-{}-{label}", std::process::id());
        let redis: Arc<dyn ReplayBuffer> = match rt.block_on(RedisReplay::connect(
            &cfg(ReplayBackend::Redis, 4 * n).url,
            &run_id,
            "bench",
            cfg(ReplayBackend::Redis, 4 * n),
        )) {
            Ok(r) => Arc::new(r),
            Err(e) => {
                eprintln!("skipping the redis backend: {e}");
                continue;
            }
        };
        g.bench_with_input(BenchmarkId::new("redis", label), &n, |b, _| {
            b.iter_custom(|iters| timed(&rt, &redis, iters, &mut make, false, Timed::RoundTrip))
        });
        // The unit in one `insert_many`, as the critic and distortion actors insert it: the
        // whole round trip, and the insert alone (sample + ack untimed).
        g.bench_with_input(BenchmarkId::new("redis_batch", label), &n, |b, _| {
            b.iter_custom(|iters| timed(&rt, &redis, iters, &mut make, true, Timed::RoundTrip))
        });
        g.bench_with_input(BenchmarkId::new("redis_batch_insert", label), &n, |b, _| {
            b.iter_custom(|iters| timed(&rt, &redis, iters, &mut make, true, Timed::Insert))
        });
        rt.block_on(redis.purge()).unwrap();
    }
    g.finish();
}

criterion_group!(benches, backends);
criterion_main!(benches);
