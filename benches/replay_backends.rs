//! Replay throughput: records/s and MB/s through the in-process and the Redis backend, for small
//! (1 KiB), tensor-sized (64 KiB) and large (1 MiB) records. One iteration = insert a batch
//! (`redis`: record by record; `redis_batch`: one `insert_many`), sample it back, acknowledge it. Needs Redis on 127.0.0.1:6379 (or TILT_REDIS_URL); compare with
//! `redis-benchmark -t xadd` on the same machine (scripts/bench-replay.sh runs both).

use std::sync::Arc;
use std::time::Duration;

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

/// Insert `recs` (one `insert` per record, or one `insert_many` for the unit when `batched`),
/// sample them all back and acknowledge them.
fn round_trip(
    rt: &tokio::runtime::Runtime,
    replay: &Arc<dyn ReplayBuffer>,
    recs: Vec<Record>,
    batched: bool,
) {
    rt.block_on(async {
        let n = recs.len();
        if batched {
            replay.insert_many(recs).await.unwrap();
        } else {
            for r in recs {
                replay.insert(r).await.unwrap();
            }
        }
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
    })
}

fn backends(c: &mut Criterion) {
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
            let recs = make();
            b.iter(|| round_trip(&rt, &mem, recs.clone(), false))
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
            b.iter(|| {
                let recs = make();
                round_trip(&rt, &redis, recs, false)
            })
        });
        // The unit in one `insert_many` (one script call), as the critic and distortion actors
        // insert it.
        g.bench_with_input(BenchmarkId::new("redis_batch", label), &n, |b, _| {
            b.iter(|| {
                let recs = make();
                round_trip(&rt, &redis, recs, true)
            })
        });
        rt.block_on(redis.purge()).unwrap();
    }
    g.finish();
}

criterion_group!(benches, backends);
criterion_main!(benches);
