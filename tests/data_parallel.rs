//! Synchronous data parallelism: 2 learner replicas on batches A and B end with the same weights
//! (to float tolerance) as 1 learner on A+B, and the 2 replicas stay identical to each other.
//! The identity behind it: the VRPO loss is a mean over pairs, so the average of the gradients on
//! two equal halves is the gradient on the whole (tested in kernels::optim as well).

mod common;
use common::*;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::Device;
use tilt::algo::vrpo::{build_policy, setup, VrpoObjective};
use tilt::config::Config;
use tilt_actors::codec::pair_records;
use tilt_actors::control::RunControl;
use tilt_actors::learner::{CheckpointSpec, LearnerActor, LearnerArgs, LearnerCore, LearnerMsg};
use tilt_actors::replay::{MemoryReplay, ReplayBuffer, ReplayConfig, Sampler};
use tilt_kernels::mixture::ExactValue;
use tilt_kernels::rng::rng_for;
use tilt_kernels::vrpo::{make_segment_pairs, score_pair};

const STEPS: u64 = 5;
const HALF: usize = 32;

/// The same records, in the same order, in a FIFO replay (each record handed out once).
async fn replay_with_records(cfg: &Config) -> Arc<dyn ReplayBuffer> {
    let s = setup(cfg, std::path::Path::new(".")).unwrap();
    let v = ExactValue {
        mixture: s.data.mixture().expect("mixture data").clone(),
        schedule: s.schedule.clone(),
        a: vec![1.0, 0.0],
        b: 0.0,
    };
    let replay = MemoryReplay::new(ReplayConfig {
        sampler: Sampler::Fifo,
        max_times_sampled: 1,
        samples_per_insert: 0.0,
        min_size: 1,
        capacity: 100_000,
        ..Default::default()
    })
    .unwrap();
    let pairs = make_segment_pairs(
        s.data.reference.as_ref(),
        &s.grid,
        &[2],
        64,
        4,
        None,
        &mut rng_for(5, 0, 0),
        &Device::Cpu,
    )
    .unwrap();
    let mut seq = 0;
    for p in &pairs {
        let (va, vb) = score_pair(&v, &s.grid, p, 1.0, &Device::Cpu).unwrap();
        for r in pair_records(p, &va, &vb, 0, 0, &mut seq).unwrap() {
            replay.insert(r).await.unwrap();
        }
    }
    assert!(seq as usize >= STEPS as usize * 2 * HALF);
    Arc::new(replay)
}

/// Train `world` replicas with `batch` pairs each for STEPS steps; return every replica's weights.
async fn train(world: usize, batch: usize, name: &str) -> Vec<Vec<(String, Vec<f32>)>> {
    let mut cfg = Config::default();
    cfg.sampling.steps = 20;
    cfg.policy.hidden = 32;
    cfg.policy.depth = 2;
    cfg.vrpo.lr = 1e-2;
    let s = setup(&cfg, std::path::Path::new(".")).unwrap();
    let replay = replay_with_records(&cfg).await;
    let control = Arc::new(RunControl::default());
    let dir = scratch(name);
    // All replicas start from replica 0's weights (as the pipeline does).
    let mut cores: Vec<Arc<Mutex<LearnerCore>>> = vec![];
    for _ in 0..world {
        let p = build_policy(&cfg, &s).unwrap();
        let (vm, res, opt) = (p.varmap, p.model, p.opt);
        if let Some(c0) = cores.first() {
            let c0 = c0.lock().unwrap();
            for (n, v) in vm.data().lock().unwrap().iter() {
                v.set(c0.varmap.data().lock().unwrap()[n].as_tensor())
                    .unwrap();
            }
        } else {
            // A fixed, non-trivial start, by sorted name (HashMap order differs between maps).
            let data = vm.data().lock().unwrap();
            let mut names: Vec<&String> = data.keys().collect();
            names.sort();
            for (i, v) in names.iter().map(|n| &data[*n]).enumerate() {
                let t = (v.as_tensor().ones_like().unwrap() * (0.01 * (i as f64 + 1.0))).unwrap();
                v.set(&t).unwrap();
            }
        }
        cores.push(Arc::new(Mutex::new(LearnerCore {
            varmap: vm,
            residual: res,
            opt,
            step: 0,
        })));
    }
    let mut refs = vec![];
    for (rank, core) in cores.iter().enumerate() {
        let args = LearnerArgs {
            rank,
            world,
            core: core.clone(),
            replay: replay.clone(),
            objective: Arc::new(VrpoObjective {
                grid: s.grid.clone(),
                labels: cfg.vrpo.labels,
                beta: 1.0,
            }),
            batch,
            total_steps: STEPS,
            checkpoint: CheckpointSpec {
                run_dir: dir.clone(),
                every: 0,
                at_steps: vec![],
                seed: 0,
                critic_file: None,
            },
            control: control.clone(),
            on_done: None,
            fail_at_step: 0,
            nan_at_step: 0,
        };
        refs.push(
            ractor::Actor::spawn(None, LearnerActor, args)
                .await
                .unwrap()
                .0,
        );
    }
    refs[0]
        .cast(LearnerMsg::SetPeers(refs[1..].to_vec()))
        .unwrap();
    refs[0].cast(LearnerMsg::Tick).unwrap();
    let done = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || {
            wait_for(
                || {
                    dir.join(format!("checkpoints/step-{STEPS:08}/state.json"))
                        .exists()
                },
                Duration::from_secs(60),
            )
        }
    })
    .await
    .unwrap();
    assert!(done, "learners did not reach step {STEPS}");
    for r in refs {
        r.stop(None);
    }
    cores
        .iter()
        .map(|c| {
            let c = c.lock().unwrap();
            let mut v: Vec<(String, Vec<f32>)> = c
                .varmap
                .data()
                .lock()
                .unwrap()
                .iter()
                .map(|(n, v)| {
                    (
                        n.clone(),
                        v.as_tensor()
                            .flatten_all()
                            .unwrap()
                            .to_vec1::<f32>()
                            .unwrap(),
                    )
                })
                .collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_a_and_b_equal_one_learner_on_a_plus_b() {
    let two = train(2, HALF, "dp-two").await;
    let one = train(1, 2 * HALF, "dp-one").await;
    // Replicas apply the same averaged step: bitwise identical.
    assert_eq!(two[0], two[1]);
    // Against the single learner: float tolerance (summation order differs).
    let mut max_diff = 0f32;
    let mut moved = 0f32;
    for ((n1, a), (n2, b)) in two[0].iter().zip(&one[0]) {
        assert_eq!(n1, n2);
        for (x, y) in a.iter().zip(b) {
            max_diff = max_diff.max((x - y).abs());
            moved = moved.max(x.abs());
        }
    }
    assert!(moved > 0.0);
    assert!(max_diff < 1e-4, "max |w2 - w1| = {max_diff}");
}
