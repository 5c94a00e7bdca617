//! Time the parts of one VRPO learner step (record decode, gradients, AdamW) at the peer's shape
//! (K = 100, L = 10, batch 256, policy hidden 128, depth 2, time_dim 32), for profiling:
//!
//!   N=200 TUNE=1 cargo run --release --example profile_learner
//!   N=200 TUNE=1 perf record ./target/release/examples/profile_learner
//!
//! `TUNE=1` applies tilt's allocator settings (`tilt::alloc::tune`), as the `tilt` binary does.
//! `PLAIN=1` times the plain candle path (`vrpo_grads`) instead of the fused one
//! (`tilt_kernels::fused_vrpo`, the learner's default on the CPU); `THREADS=T` gives the fused
//! step T threads (default 1). `GEMM=1` only measures the CPU's f32 matrix-product rate through
//! candle (gemm) on `RAYON_NUM_THREADS` threads: [1024, 1024] x [1024, 1024], and the step's own
//! shape [rows / threads, 128] x [128, 128].
use candle_core::Device;
use std::time::Instant;
use tilt::algo::vrpo::{build_policy, setup, FusedVrpoObjective, VrpoObjective};
use tilt::config::Config;
use tilt_actors::codec::{pair_records, records_to_batch};
use tilt_actors::objective::Objective;
use tilt_kernels::fused_vrpo::{fused_residual, FusedVrpo};
use tilt_kernels::losses::VrpoLabels;
use tilt_kernels::rng::rng_for;
use tilt_kernels::vrpo::{make_segment_pairs, score_pair, vrpo_grads};

fn main() {
    if std::env::var("TUNE").is_ok() {
        tilt::alloc::tune();
    }
    if std::env::var("GEMM").is_ok() {
        return gemm_rate();
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
    // OBJECTIVE=1: the fused step as the learner calls it (FusedVrpoObjective: the threads also
    // decode the batch in parts); reported as "grads" with decode 0.
    let objective = std::env::var("OBJECTIVE").is_ok().then(|| {
        let plain = VrpoObjective {
            grid: s.grid.clone(),
            labels: VrpoLabels::Soft,
            beta: 1.0,
        };
        FusedVrpoObjective::new(plain, 1, threads)
    });
    let (mut td, mut tg, mut ta) = (0.0, 0.0, 0.0);
    for i in 0..n {
        let off = (i * 256) % (records.len() - 256);
        let t0 = Instant::now();
        let (g, t1) = if let Some(o) = &objective {
            let t1 = Instant::now();
            let (g, _) = o
                .grads(
                    p.model.as_ref(),
                    p.opt.vars(),
                    &records[off..off + 256],
                    0,
                    0,
                )
                .unwrap();
            (g, t1)
        } else {
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
            (g, t1)
        };
        let t2 = Instant::now();
        p.opt.step_with(&g).unwrap();
        let t3 = Instant::now();
        td += (t1 - t0).as_secs_f64();
        tg += (t2 - t1).as_secs_f64();
        ta += (t3 - t2).as_secs_f64();
    }
    let n = n as f64;
    // FLOP of one step's matrix products, fused form (the first layer's time columns once per
    // grid step, negligible): 2560 a + b rows of L = 10 steps, 3 products per hidden x hidden
    // layer (forward, dW, dh), the [dim, hidden] ones 5 times (forward x2, dW x2, dh).
    let (rows, h, dim) = (2.0 * 256.0 * 10.0, 128.0, 2.0);
    let flop = 2.0 * rows * (3.0 * h * h * (cfg.policy.depth as f64 - 1.0) + 5.0 * dim * h);
    println!(
        "step: {:.0} MFLOP in matrix products, {:.1} GFLOP/s over the gradient time",
        flop / 1e6,
        flop / (tg / n) / 1e9
    );
    println!(
        "{} ({} thread(s)): decode {:.2} ms, grads {:.2} ms, adam {:.2} ms, total {:.2} ms/step",
        match (plain, objective.is_some()) {
            (true, _) => "plain",
            (false, false) => "fused",
            (false, true) => "fused objective",
        },
        if plain { 1 } else { threads },
        1e3 * td / n,
        1e3 * tg / n,
        1e3 * ta / n,
        1e3 * (td + tg + ta) / n
    );
}

/// GFLOP/s of f32 matrix products through candle on this machine.
fn gemm_rate() {
    let dev = Device::Cpu;
    for (m, k, n, reps) in [(1024, 1024, 1024, 20), (2560, 128, 128, 400)] {
        let a = tilt_kernels::rng::randn(&mut tilt_kernels::rng::rng_for(101, 0, 0), (m, k), &dev)
            .unwrap();
        let b = tilt_kernels::rng::randn(&mut tilt_kernels::rng::rng_for(102, 0, 0), (k, n), &dev)
            .unwrap();
        let _ = a.matmul(&b).unwrap();
        let t0 = Instant::now();
        for _ in 0..reps {
            let _ = a.matmul(&b).unwrap();
        }
        let s = t0.elapsed().as_secs_f64() / reps as f64;
        println!(
            "gemm [{m}, {k}] x [{k}, {n}]: {:.1} GFLOP/s ({} thread(s))",
            2.0 * (m * k * n) as f64 / s / 1e9,
            std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into())
        );
    }
}
