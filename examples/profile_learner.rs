//! Time the parts of one VRPO learner step (record decode, gradients, AdamW) at the peer's shape
//! (K = 100, L = 10, batch 256, policy hidden 128, depth 2, time_dim 32), for profiling:
//!
//!   N=200 TUNE=1 cargo run --release --example profile_learner
//!   N=200 TUNE=1 perf record ./target/release/examples/profile_learner
//!
//! `TUNE=1` applies tilt's allocator settings (`tilt::alloc::tune`), as the `tilt` binary does.
//! `PLAIN=1` times the plain candle path (`vrpo_grads`) instead of the fused one
//! (`tilt_kernels::fused_vrpo`, the learner's default on the CPU); `THREADS=T` gives the fused
//! step T threads (default 1).
use candle_core::Device;
use std::time::Instant;
use tilt::algo::vrpo::{build_policy, setup};
use tilt::config::Config;
use tilt_actors::codec::{pair_records, records_to_batch};
use tilt_kernels::losses::VrpoLabels;
use tilt_kernels::rng::rng_for;
use tilt_kernels::fused_vrpo::{fused_residual, FusedVrpo};
use tilt_kernels::vrpo::{make_segment_pairs, score_pair, vrpo_grads};

fn main() {
    if std::env::var("TUNE").is_ok() {
        tilt::alloc::tune();
    }
    let mut cfg = Config::default();
    cfg.policy.hidden = 128;
    cfg.policy.depth = 2;
    cfg.policy.time_dim = 32;
    let s = setup(&cfg, std::path::Path::new(".")).unwrap();
    let dev = Device::Cpu;
    let pairs = make_segment_pairs(
        s.data.reference.as_ref(),
        &s.grid,
        &[2],
        256,
        10,
        None,
        &mut rng_for(0, 0, 0),
        &dev,
    )
    .unwrap();
    let exact = s.exact.clone().unwrap();
    let mut seq = 0;
    let mut records = vec![];
    for p in &pairs {
        let (va, vb) = score_pair(exact.as_ref(), &s.grid, p, 1.0, &dev).unwrap();
        records.extend(pair_records(p, &va, &vb, 0, 0, &mut seq).unwrap());
    }
    let mut p = build_policy(&cfg, &s).unwrap();
    let n: usize = std::env::var("N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let plain = std::env::var("PLAIN").is_ok();
    let threads: usize = std::env::var("THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let mut fused = FusedVrpo::new(threads);
    let (mut td, mut tg, mut ta) = (0.0, 0.0, 0.0);
    for i in 0..n {
        let off = (i * 256) % (records.len() - 256);
        let t0 = Instant::now();
        let batch = records_to_batch(&records[off..off + 256], &dev).unwrap();
        let t1 = Instant::now();
        let (g, _) = if plain {
            vrpo_grads(
                p.model.as_ref(),
                p.opt.vars(),
                &s.grid,
                &batch,
                VrpoLabels::Soft,
                1.0,
            )
        } else {
            let mlp = fused_residual(p.model.as_ref()).unwrap();
            fused.grads(mlp, p.opt.vars(), &s.grid, &batch, VrpoLabels::Soft, 1.0)
        }
        .unwrap();
        let t2 = Instant::now();
        p.opt.step_with(&g).unwrap();
        let t3 = Instant::now();
        td += (t1 - t0).as_secs_f64();
        tg += (t2 - t1).as_secs_f64();
        ta += (t3 - t2).as_secs_f64();
    }
    let n = n as f64;
    println!(
        "{} ({} thread(s)): decode {:.2} ms, grads {:.2} ms, adam {:.2} ms, total {:.2} ms/step",
        if plain { "plain" } else { "fused" },
        if plain { 1 } else { threads },
        1e3 * td / n,
        1e3 * tg / n,
        1e3 * ta / n,
        1e3 * (td + tg + ta) / n
    );
}
