//! Whole VRPO runs through the real binary on the seconds-long smoke config: the run finishes and
//! moves toward the target, injected rollout/critic panics are survived, a learner failure stops
//! the run after a checkpoint, SIGTERM drains and checkpoints, resume continues the step counter and
//! weights, and a corrupt checkpoint is refused with a clear error.

mod common;
use common::*;
use std::time::Duration;

fn run(out: &std::path::Path, sets: &[&str]) -> std::process::Output {
    let mut a = vec!["run", "configs/smoke.toml", "--out", out.to_str().unwrap()];
    for s in sets {
        a.extend(["--set", s]);
    }
    tilt(&a)
}

#[test]
fn learner_devices_run_one_replica_per_listed_device() {
    // Two data-parallel replicas named by device (both the CPU here; scripts/gpu-check.sh runs
    // ["cuda:0","cuda:0"] and ["cuda:0","cpu"] on a GPU): every step trains on 64 pairs per
    // replica, and the run finishes with the same quality checks as one replica.
    let d = scratch("learner-devices");
    let out = d.join("run");
    let o = run(&out, &["learner.devices=[\"cpu\", \"cpu\"]"]);
    assert!(o.status.success(), "{}", err(&o));
    let s = json(&out.join("summary.json"));
    let a = &s["accounting"];
    assert_eq!(a["applications"], 60 * 64 * 2, "{a}");
    assert!(s["gap_closed"].as_f64().unwrap().is_finite(), "{s}");
}

#[test]
fn smoke_run_finishes_and_moves_toward_the_tilted_target() {
    let d = scratch("smoke-run");
    let out = d.join("run");
    let o = run(&out, &[]);
    assert!(o.status.success(), "{}", err(&o));
    let s = json(&out.join("summary.json"));
    for key in [
        "algorithm",
        "labels",
        "lambda",
        "beta",
        "segment_len",
        "steps",
        "wall_s",
        "reward_mean_ref",
        "reward_mean_policy",
        "reward_mean_target",
        "gap_closed",
        "mode_weights_policy",
        "mode_weights_target",
        "critic",
        "throughput",
    ] {
        assert!(s.get(key).is_some(), "summary lacks {key}: {s}");
    }
    assert_eq!(s["steps"], 60);
    // The process's peak RSS is reported (Linux), and is at least the size of the binary's code.
    let rss = s["peak_rss_mb"].as_f64().expect("peak_rss_mb");
    assert!(rss > 5.0 && rss < 24_000.0, "peak_rss_mb = {rss}");
    // The target is above the reference (lambda > 0, linear reward), and 60 soft-label steps move
    // the policy a good part of the way (measured ~0.5-0.8 on this config; a policy that did not
    // learn stays at 0 +- 0.05 from sampling noise with 4000 samples).
    let gap = s["gap_closed"].as_f64().unwrap();
    assert!(
        s["reward_mean_target"].as_f64().unwrap() > s["reward_mean_ref"].as_f64().unwrap() + 0.5
    );
    assert!(gap > 0.25, "gap_closed = {gap}");
    // Every record accounted for (memory backend): nothing lost, redelivered or deduplicated;
    // each learner step used 64 rows; what was not applied is still in the buffer or was refused
    // when it closed at the end.
    let a = accounting(&s);
    assert_eq!(
        (&a["lost"], &a["redelivered"], &a["deduplicated"]),
        (&0.into(), &0.into(), &0.into()),
        "{a}"
    );
    assert_eq!(a["applications"], 60 * 64, "{a}");
    for why in a["dropped"].as_object().unwrap().keys() {
        assert_eq!(why, "closed_at_stop", "{a}");
    }
    for c in ["crps", "ce", "top1", "top3"] {
        assert!(s["critic"][c].as_f64().unwrap().is_finite(), "{c}");
    }
    assert!(out.join("config.toml").exists() && out.join("progress.log").exists());
    // The critic's label strength, mean |V(a) - V(b)| of the last batch: reported, and above 0
    // (the linear reward separates a segment's endpoints); the finish line shows it.
    let v = json(&out.join("vrpo.json"));
    let strength = v["final_label_strength"]
        .as_f64()
        .expect("final_label_strength");
    assert!(strength > 0.0 && strength.is_finite(), "{v}");
    assert!(
        err(&o).contains(&format!(", |dV| {strength:.4}; checkpoint")),
        "{}",
        err(&o)
    );
    let ck = out.join("checkpoints/step-00000060");
    for f in [
        "policy.safetensors",
        "optimizer.safetensors",
        "critic.safetensors",
        "state.json",
    ] {
        assert!(ck.join(f).exists(), "{f}");
    }
    // The same directory cannot be reused by `run`.
    let again = run(&out, &[]);
    assert_eq!(again.status.code(), Some(1));
    assert!(err(&again).contains("tilt resume"), "{}", err(&again));
}

#[test]
fn rollout_and_critic_panics_are_restarted_and_the_run_goes_on() {
    let d = scratch("smoke-faults");
    let out = d.join("run");
    let o = run(
        &out,
        &[
            "fault.rollout_panic_after=2",
            "fault.critic_panic_after=3",
            "eval.samples=500",
            "eval.target_samples=500",
        ],
    );
    let e = err(&o);
    assert!(o.status.success(), "{e}");
    assert!(e.contains("injected fault"), "{e}");
    let s = json(&out.join("summary.json"));
    assert!(s["restarts"].as_u64().unwrap() >= 2, "{s}");
    assert_eq!(s["steps"], 60);
}

#[test]
fn sync_runtime_takes_turns_and_reaches_the_same_place() {
    // runtime = "sync": one unit produced at a time on the learner's demand. The run finishes
    // its steps and moves toward the target like the pipeline (same bar as the smoke run).
    let d = scratch("smoke-sync");
    let out = d.join("run");
    let o = run(&out, &["runtime=sync"]);
    assert!(o.status.success(), "{}", err(&o));
    let s = json(&out.join("summary.json"));
    assert_eq!(s["steps"], 60);
    let gap = s["gap_closed"].as_f64().unwrap();
    assert!(gap > 0.25, "gap_closed = {gap}");
    // Sync needs the in-process replay and one producer of each kind.
    let o = run(&d.join("bad"), &["runtime=sync", "rollout.actors=2"]);
    let e = err(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("rollout.actors") && e.contains("sync"), "{e}");
}

#[test]
fn pinned_cores_split_the_roles_and_the_run_reaches_the_same_place() {
    // pin_cores = true: the learners compute on the first core(s), the producers on the rest;
    // the stage says so, and the run finishes like the unpinned smoke run (same bar).
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores < 2 {
        eprintln!("skipped: pin_cores needs 2 cores, this machine has {cores}");
        return;
    }
    let d = scratch("smoke-pinned");
    let out = d.join("run");
    let o = run(&out, &["pin_cores=true"]);
    let e = err(&o);
    assert!(o.status.success(), "{e}");
    assert!(
        e.contains("[vrpo] pin_cores: learners on cores [") && e.contains("producers on cores ["),
        "{e}"
    );
    let s = json(&out.join("summary.json"));
    assert_eq!(s["steps"], 60);
    let gap = s["gap_closed"].as_f64().unwrap();
    assert!(gap > 0.25, "gap_closed = {gap}");
    // A plan that leaves the producers no core fails at start, naming what to change.
    let o = run(&d.join("bad"), &["pin_cores=true", "learner.threads=256"]);
    let e = err(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains("pin_cores") && e.contains("learner.threads"),
        "{e}"
    );
}

#[test]
fn learner_failure_stops_the_run_after_a_checkpoint() {
    let d = scratch("smoke-learner-fail");
    let out = d.join("run");
    let o = run(&out, &["fault.learner_fail_at_step=7"]);
    let e = err(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains("learner step 7 failed") && e.contains("step-00000006"),
        "{e}"
    );
    let st = json(&out.join("checkpoints/step-00000006/state.json"));
    assert_eq!(st["step"], 6);
    assert!(
        !out.join("summary.json").exists(),
        "a failed run must not leave a summary"
    );
}

#[test]
fn non_finite_gradient_stops_the_run_keeping_the_last_good_weights() {
    // At step 9 the gradients turn NaN (fault hook): the run stops with the step named, the
    // checkpoint it leaves is step 8 with finite weights, and no summary is written.
    let d = scratch("smoke-nan");
    let out = d.join("run");
    let o = run(&out, &["fault.learner_nan_at_step=9"]);
    let e = err(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains("non-finite gradient") && e.contains("at step 9") && e.contains("step-00000008"),
        "{e}"
    );
    assert_eq!(
        e.lines().filter(|l| l.contains("error")).count(),
        1,
        "one error line: {e}"
    );
    let ck = out.join("checkpoints/step-00000008");
    assert_eq!(json(&ck.join("state.json"))["step"], 8);
    assert!(!out.join("checkpoints/step-00000009").exists());
    let w =
        candle_core::safetensors::load(ck.join("policy.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    assert!(!w.is_empty());
    for (name, t) in w {
        let s = t
            .to_dtype(candle_core::DType::F64)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(s.is_finite(), "{name} is not finite in the kept checkpoint");
    }
    assert!(!out.join("summary.json").exists());
}

#[test]
fn sigterm_drains_and_checkpoints_then_resume_continues() {
    let d = scratch("smoke-sigterm");
    let out = d.join("run");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tilt"))
        .args([
            "run",
            "configs/smoke.toml",
            "--out",
            out.to_str().unwrap(),
            "--set",
            "vrpo.steps=100000",
            "--set",
            "learner.checkpoint_every=0",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the learner has stepped (a vrpo progress line past step 0: the first line
    // comes on a timer, and may still say step 0 while the replay fills).
    let log = out.join("progress.log");
    let started = wait_for(
        || {
            std::fs::read_to_string(&log).is_ok_and(|s| {
                s.lines()
                    .filter_map(|l| l.strip_prefix("[vrpo] step "))
                    .filter_map(|r| r.split('/').next()?.parse::<u64>().ok())
                    .any(|step| step >= 1)
            })
        },
        Duration::from_secs(120),
    );
    assert!(started, "the learner never started");
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = wait_exit(&mut child, EXIT_LIMIT).expect("an exit within EXIT_LIMIT of SIGTERM");
    assert!(status.success(), "SIGTERM must lead to a clean exit 0");
    let (step, dir) = tilt_actors::checkpoint::latest_checkpoint(&out)
        .unwrap()
        .expect("a final checkpoint");
    assert!(step > 0 && step < 100000, "{step}");
    assert!(!out.join("summary.json").exists());
    // Resume with a budget a little above the stop: the counter continues from the checkpoint.
    let target = step + 15;
    let o = tilt(&[
        "resume",
        out.to_str().unwrap(),
        "--set",
        &format!("vrpo.steps={target}"),
    ]);
    let e = err(&o);
    assert!(o.status.success(), "{e}");
    assert!(
        e.contains(&format!("resuming from checkpoint step {step}")),
        "{e}"
    );
    let s = json(&out.join("summary.json"));
    assert_eq!(s["steps"].as_u64().unwrap(), target);
    // The optimiser continued (its step counter t is the learner step), from the checkpointed state.
    let opt = candle_core::safetensors::load(
        out.join(format!(
            "checkpoints/step-{target:08}/optimizer.safetensors"
        )),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let t = opt["t"]
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[0];
    assert_eq!(t as u64, target);
    assert!(dir.exists(), "the stop checkpoint is kept");
}

#[test]
fn corrupt_checkpoint_is_refused_with_the_file_named() {
    let d = scratch("smoke-corrupt");
    let out = d.join("run");
    let o = run(
        &out,
        &[
            "vrpo.steps=20",
            "eval.samples=500",
            "eval.target_samples=500",
        ],
    );
    assert!(o.status.success(), "{}", err(&o));
    let pol = out.join("checkpoints/step-00000020/policy.safetensors");
    let mut bytes = std::fs::read(&pol).unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&pol, bytes).unwrap();
    let o = tilt(&["resume", out.to_str().unwrap(), "--set", "vrpo.steps=30"]);
    let e = err(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("policy.safetensors"), "{e}");
    assert_eq!(
        e.lines()
            .filter(|l| !l.trim().is_empty() && l.contains("error"))
            .count(),
        1,
        "{e}"
    );
}
