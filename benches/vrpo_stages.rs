//! Throughput of each VRPO stage on the quickstart shapes (2-D mixture, K = 100, L = 10):
//! rollout (pairs from reference chains), critic scoring, record encode / decode, one learner
//! step (gradients + AdamW), and the memory replay. `cargo bench --bench vrpo_stages`
//! (`RAYON_NUM_THREADS=1` for the thread count the `tilt` binary defaults to).

use std::sync::Arc;

use candle_core::{DType, Device};
use candle_nn::VarMap;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tilt::algo::vrpo::{build_policy, setup};
use tilt::config::Config;
use tilt_actors::codec::{pair_records, records_to_batch};
use tilt_actors::replay::{MemoryReplay, ReplayBuffer, ReplayConfig};
use tilt_kernels::critic::{CdfCritic, CdfGrid, MlpEncoder, MlpEncoderConfig};
use tilt_kernels::init::{seeded_var_builder, TEST_STREAM};
use tilt_kernels::losses::VrpoLabels;
use tilt_kernels::rng::rng_for;
use tilt_kernels::vrpo::{make_segment_pairs, score_pair, vrpo_grads};

fn stages(c: &mut Criterion) {
    // As the `tilt` binary runs: mimalloc's purge delay (tilt::alloc).
    tilt::alloc::tune();
    let mut cfg = Config::default();
    cfg.policy.hidden = 64;
    let s = setup(&cfg, std::path::Path::new(".")).expect("setup");
    let dev = Device::Cpu;
    let chains = 64;
    let len = cfg.vrpo.segment_len;
    let mut g = c.benchmark_group("vrpo");
    g.sample_size(10)
        .measurement_time(std::time::Duration::from_secs(4));

    // Rollout: one unit = 64 chains -> 64 * K/L pairs.
    let pairs_per_unit = (chains * (s.grid.len() / len)) as u64;
    g.throughput(Throughput::Elements(pairs_per_unit));
    let mut i = 0;
    g.bench_function("rollout_pairs", |b| {
        b.iter(|| {
            i += 1;
            make_segment_pairs(
                s.data.reference.as_ref(),
                &s.grid,
                &[2],
                chains,
                len,
                None,
                &mut rng_for(0, 0, i),
                &dev,
            )
            .unwrap()
        })
    });
    let pairs = make_segment_pairs(
        s.data.reference.as_ref(),
        &s.grid,
        &[2],
        chains,
        len,
        None,
        &mut rng_for(0, 0, 0),
        &dev,
    )
    .unwrap();

    // Critic scoring with the learned critic's architecture (weights untrained: cost only).
    let vm = VarMap::new();
    let vb = seeded_var_builder(&vm, 0, TEST_STREAM, DType::F32, &dev);
    let enc = MlpEncoder::new(
        MlpEncoderConfig {
            in_dim: 2,
            hidden: 128,
            depth: 3,
            time_dim: 32,
            classes: 0,
        },
        vb.pp("e"),
    )
    .unwrap();
    let critic = CdfCritic::new(
        Box::new(enc),
        CdfGrid::uniform(-4.0, 4.0, 50).unwrap(),
        vb.pp("h"),
    )
    .unwrap();
    g.bench_function("critic_score", |b| {
        b.iter(|| {
            for p in &pairs {
                score_pair(&critic, &s.grid, p, 1.0, &dev).unwrap();
            }
        })
    });

    // Encode every pair into a record, decode a learner batch.
    let scored: Vec<_> = pairs
        .iter()
        .map(|p| (p, score_pair(&critic, &s.grid, p, 1.0, &dev).unwrap()))
        .collect();
    g.bench_function("encode_records", |b| {
        b.iter(|| {
            let mut seq = 0;
            scored
                .iter()
                .map(|(p, (va, vb))| pair_records(p, va, vb, 0, 0, &mut seq).unwrap().len())
                .sum::<usize>()
        })
    });
    let mut seq = 0;
    let records: Vec<_> = scored
        .iter()
        .flat_map(|(p, (va, vb))| pair_records(p, va, vb, 0, 0, &mut seq).unwrap())
        .collect();
    let batch_n = cfg.vrpo.batch;
    g.throughput(Throughput::Elements(batch_n as u64));
    g.bench_function("decode_batch", |b| {
        b.iter(|| records_to_batch(&records[..batch_n], &dev).unwrap())
    });

    // One learner step: gradients of the VRPO loss + AdamW.
    let batch = records_to_batch(&records[..batch_n], &dev).unwrap();
    let mut p = build_policy(&cfg, &s).unwrap();
    let (res, opt) = (p.model.clone(), &mut p.opt);
    g.bench_function("learner_step", |b| {
        b.iter(|| {
            let (grads, _) = vrpo_grads(
                res.as_ref(),
                opt.vars(),
                &s.grid,
                &batch,
                VrpoLabels::Soft,
                1.0,
            )
            .unwrap();
            opt.step_with(&grads).unwrap();
        })
    });

    // Memory replay: insert + sample 256 records (no rate limit).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let replay = Arc::new(
        MemoryReplay::new(ReplayConfig {
            samples_per_insert: 0.0,
            min_size: 1,
            ..Default::default()
        })
        .unwrap(),
    );
    g.bench_function("replay_insert_sample", |b| {
        b.iter(|| {
            rt.block_on(async {
                for r in &records[..batch_n] {
                    replay.insert(r.clone()).await.unwrap();
                }
                replay
                    .sample(batch_n, std::time::Duration::from_secs(1))
                    .await
                    .unwrap()
                    .unwrap()
                    .len()
            })
        })
    });
    g.finish();
}

criterion_group!(benches, stages);
criterion_main!(benches);
