//! DF-DPO end to end in seconds (tiny settings): every stage runs through the binary and the summary
//! holds the eval and ablation blocks with their metrics; and pair production keeps winner and loser
//! aligned (the winner is exactly the recorded source clip, and the loser is what the recorded
//! operator makes of it).

mod common;
use common::*;

use std::sync::Arc;
use std::time::Duration;

use tilt_actors::codec::records_to_clip_pairs;
use tilt_actors::control::RunControl;
use tilt_actors::distortion::{DistortionActor, DistortionArgs, DistortionSource};
use tilt_actors::replay::{MemoryReplay, ReplayBuffer, ReplayConfig, Sampler};
use tilt_actors::source::SourceContext;
use tilt_kernels::distort::{global_reversal, Curriculum, Distortion};

#[test]
fn tiny_dfdpo_run_writes_eval_ablation_and_filmstrips() {
    let d = scratch("dfdpo-tiny");
    let out = d.join("run");
    let o = tilt(&[
        "run",
        "configs/video-dfdpo-ablation.toml",
        "--out",
        out.to_str().unwrap(),
        "--set",
        "video.clips=24",
        "--set",
        "pretrain.steps=8",
        "--set",
        "pretrain.batch=4",
        "--set",
        "dfdpo.steps=4",
        "--set",
        "dfdpo.batch=2",
        "--set",
        "dfdpo.curriculum.every=2",
        "--set",
        "eval.samples=3",
        "--set",
        "sampling.steps=4",
        "--set",
        "replay.min_size=8",
        "--set",
        "metrics.listen=",
    ]);
    let e = err(&o);
    assert!(o.status.success(), "{e}");
    assert!(
        e.contains("curriculum stage 0 from step 0"),
        "curriculum stages are logged: {e}"
    );
    let s = json(&out.join("summary.json"));
    assert_eq!(s["algorithm"], "dfdpo");
    for (block, keys) in [
        ("eval", vec!["reference", "sft", "dfdpo"]),
        ("ablation", vec!["temporal_only", "spatial_only", "hybrid"]),
    ] {
        for k in keys {
            for m in [
                "temporal",
                "smoothness",
                "sharpness",
                "noise",
                "single_blob",
                "track_continuity",
            ] {
                let v = s[block][k][m]
                    .as_f64()
                    .unwrap_or_else(|| panic!("{block}.{k}.{m} missing: {s}"));
                assert!(v.is_finite(), "{block}.{k}.{m} = {v}");
            }
            let t = s[block][k]["temporal"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&t));
        }
    }
    // The real clips obey their own arrow of time and pass the blob gates fitted on them.
    assert!(s["real"]["temporal"].as_f64().unwrap() > 0.9, "{s}");
    assert!(s["real"]["single_blob"].as_f64().unwrap() > 0.9, "{s}");
    assert!(s["real"]["track_continuity"].as_f64().unwrap() > 0.9, "{s}");
    assert!(s["gate"]["max_area"].as_u64().unwrap() > 0, "{s}");
    // The models diffuse standardised clips (video.normalize defaults to true): the recorded map
    // is the scalar mean and std of the 24 real clips.
    let spec = tilt::video::ClipSpec {
        frames: 8,
        channels: 1,
        size: 16,
        kind: tilt::video::Motion::Mixed,
    };
    let clips = tilt::video::generate(&spec, 24, 0).unwrap().0;
    let want = tilt_kernels::dfdpo::DataScale::fit(&clips).unwrap();
    let got = json(&out.join("data_scale.json"));
    assert!(
        (got["shift"].as_f64().unwrap() - want.shift as f64).abs() < 1e-6,
        "{got}"
    );
    assert!(
        (got["scale"].as_f64().unwrap() - want.scale as f64).abs() < 1e-6,
        "{got}"
    );
    assert!(
        want.shift < -0.3 && want.scale < 0.5,
        "dark, low-contrast clips: {want:?}"
    );
    assert!(e.contains("diffusion space = (clip - "), "{e}");
    for name in ["real", "reference", "sft", "dfdpo"] {
        tilt::plots::check_png(&out.join(format!("filmstrip-{name}.png")), 200).unwrap();
    }
    // `tilt report` redraws the filmstrips from the saved sample clips: the same bytes.
    let strip = out.join("filmstrip-dfdpo.png");
    let before = std::fs::read(&strip).unwrap();
    for name in ["real", "reference", "sft", "dfdpo", "hybrid"] {
        std::fs::remove_file(out.join(format!("filmstrip-{name}.png"))).unwrap();
    }
    let r = tilt(&["report", out.to_str().unwrap()]);
    assert!(r.status.success(), "{}", err(&r));
    let listed = String::from_utf8_lossy(&r.stdout);
    for name in ["real", "reference", "sft", "dfdpo", "hybrid"] {
        assert!(
            listed.contains(&format!("filmstrip-{name}.png")),
            "{name}: {listed}"
        );
    }
    // ... and the training curves of every continuation.
    for p in ["loss.png", "accuracy.png"] {
        assert!(listed.contains(p), "{p}: {listed}");
        tilt::plots::check_png(&out.join(p), 2000).unwrap();
    }
    assert_eq!(std::fs::read(&strip).unwrap(), before);
}

/// The protocol in seconds (`scripts/dfdpo-protocol.sh`, two seeds, tiny settings): every stage
/// runs, the pretraining corrupts exactly round(0.4 x clips) clips, every model's gates are in
/// summary.json and the script prints the table and both verdicts. Then `pretrain.from` reuses
/// seed 0's reference by path: the same weights, bit for bit, so its eval of the reference is
/// the same to the last digit; and a path without a reference is refused in one line.
#[test]
fn protocol_in_seconds_and_reference_reused_by_path() {
    let d = scratch("dfdpo-protocol");
    let out = d.join("protocol");
    let tiny = [
        "video.clips=20",
        "pretrain.steps=6",
        "pretrain.batch=4",
        "pretrain.warmup=2",
        "video.hidden=32",
        "video.depth=1",
        "dfdpo.steps=3",
        "dfdpo.batch=2",
        "dfdpo.curriculum.every=1",
        "eval.samples=3",
        "sampling.steps=3",
        "replay.min_size=8",
    ];
    let mut args = vec![
        out.to_str().unwrap().to_string(),
        "--seeds".into(),
        "0 1".into(),
    ];
    for t in tiny {
        args.extend(["--set".to_string(), t.to_string()]);
    }
    let o = std::process::Command::new("bash")
        .arg("scripts/dfdpo-protocol.sh")
        .args(&args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("TILT_BIN", env!("CARGO_BIN_EXE_tilt"))
        .env_remove("TILT_REDIS_URL")
        .output()
        .unwrap();
    let (table, e) = (String::from_utf8_lossy(&o.stdout), err(&o));
    assert!(o.status.success(), "{e}");
    for want in [
        "| reference |",
        "| dfdpo |",
        "| hybrid |",
        "DF-DPO - SFT on temporal:",
        "verdict: DF-DPO",
        "reference gates (one blob >= 0.9, continuity >= 0.8):",
    ] {
        assert!(table.contains(want), "{want:?} missing: {table}");
    }
    assert!(
        e.contains("8 of 20 clips replaced by temporally corrupted copies"),
        "{e}"
    );
    for seed in ["seed-0", "seed-1"] {
        let s = json(&out.join(seed).join("summary.json"));
        assert_eq!(s["pretrain"]["corrupted"], 8, "{s}");
        assert_eq!(s["pretrain"]["model"], "mixer", "{s}");
        assert_eq!(s["pretrain"]["ema"], 0.999, "{s}");
        for (block, k) in [
            ("eval", "reference"),
            ("eval", "sft"),
            ("eval", "dfdpo"),
            ("ablation", "temporal_only"),
            ("ablation", "spatial_only"),
            ("ablation", "hybrid"),
        ] {
            for m in ["single_blob", "track_continuity", "temporal"] {
                let v = s[block][k][m]
                    .as_f64()
                    .unwrap_or_else(|| panic!("{block}.{k}.{m}: {s}"));
                assert!((0.0..=1.0).contains(&v), "{block}.{k}.{m} = {v}");
            }
        }
        let broken = s["reference_arrow_broken"].as_f64().unwrap();
        let t = s["eval"]["reference"]["temporal"].as_f64().unwrap();
        assert!((broken - (1.0 - t)).abs() < 1e-6, "{s}");
        assert!(s["real_arrow_broken"].as_f64().unwrap() < 0.1, "{s}");
    }
    // The seeds differ (their own clips, corruption and noise).
    let (a, b) = (
        std::fs::read(out.join("seed-0/reference.safetensors")).unwrap(),
        std::fs::read(out.join("seed-1/reference.safetensors")).unwrap(),
    );
    assert_ne!(a, b);

    // pretrain.from: seed 0's reference, evaluated again in a fresh run directory.
    let again = d.join("again");
    let mut args = vec![
        "run".to_string(),
        "configs/video-dfdpo-protocol.toml".into(),
        "--out".into(),
        again.to_str().unwrap().into(),
        "--set".into(),
        format!("pretrain.from={}", out.join("seed-0").display()),
        "--set".into(),
        "stages=[\"eval\"]".into(),
    ];
    for t in tiny {
        args.extend(["--set".to_string(), t.to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = tilt(&args);
    let e = err(&r);
    assert!(r.status.success(), "{e}");
    assert!(e.contains("(pretrain.from)"), "{e}");
    assert_eq!(
        std::fs::read(again.join("reference.safetensors")).unwrap(),
        a
    );
    let (s0, s1) = (
        json(&out.join("seed-0/summary.json")),
        json(&again.join("summary.json")),
    );
    assert_eq!(s0["eval"]["reference"], s1["eval"]["reference"]);
    assert_eq!(
        s1["pretrain"]["corrupted"], 8,
        "pretrain.json comes along: {s1}"
    );
    assert_eq!(s1["pretrain"]["prediction"], "v", "{s1}");

    // The same reference in a run whose model predicts eps: refused, naming the key (a v network
    // read as eps would sample garbage silently).
    let mut args = vec![
        "run".to_string(),
        "configs/video-dfdpo-protocol.toml".into(),
        "--out".into(),
        d.join("as-eps").to_str().unwrap().into(),
        "--set".into(),
        format!("pretrain.from={}", out.join("seed-0").display()),
        "--set".into(),
        "stages=[\"eval\"]".into(),
        "--set".into(),
        "video.prediction=\"eps\"".into(),
    ];
    for t in tiny {
        args.extend(["--set".to_string(), t.to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = tilt(&args);
    let e = err(&r);
    assert!(!r.status.success());
    assert!(
        e.contains("video.prediction") && e.contains("predicts V"),
        "{e}"
    );

    // A path without a reference: one line naming the key.
    let empty = d.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let from = format!("pretrain.from={}", empty.display());
    let bad = d.join("bad");
    let r = tilt(&[
        "run",
        "configs/video-dfdpo-protocol.toml",
        "--out",
        bad.to_str().unwrap(),
        "--set",
        &from,
        "--set",
        "stages=[\"eval\"]",
    ]);
    let e = err(&r);
    assert!(!r.status.success());
    assert!(
        e.contains("pretrain.from") && e.contains("no reference there"),
        "{e}"
    );
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    assert!(!bad.exists(), "no run directory for a refused config");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairs_keep_winner_and_loser_aligned() {
    let spec = tilt::video::ClipSpec {
        frames: 8,
        channels: 1,
        size: 16,
        kind: tilt::video::Motion::Mixed,
    };
    let (clips, _) = tilt::video::generate(&spec, 10, 3).unwrap();
    let clips = Arc::new(clips);
    let replay: Arc<dyn ReplayBuffer> = Arc::new(
        MemoryReplay::new(ReplayConfig {
            sampler: Sampler::Fifo,
            samples_per_insert: 0.0,
            min_size: 1,
            max_times_sampled: 1,
            capacity: 1000,
            ..Default::default()
        })
        .unwrap(),
    );
    let control = Arc::new(RunControl::default());
    let args = DistortionArgs {
        id: 0,
        generation: 0,
        source: DistortionSource {
            actors: 1,
            clips: clips.clone(),
            curriculum: Arc::new(Curriculum::default_schedule()),
            per_unit: 8,
            panic_after_units: 0,
        },
        ctx: SourceContext {
            seed: 9,
            replay: replay.clone(),
            control: control.clone(),
        },
    };
    let (actor, _) = ractor::Actor::spawn(None, DistortionActor, args)
        .await
        .unwrap();
    let mut got = vec![];
    while got.len() < 64 {
        let batch = replay
            .sample(64 - got.len(), Duration::from_secs(30))
            .await
            .unwrap()
            .expect("pairs arrive");
        got.extend(batch);
    }
    control.request_stop();
    replay.close();
    actor.stop(None);
    let (w, l) = records_to_clip_pairs(&got, &candle_core::Device::Cpu).unwrap();
    let mut reversals = 0;
    for (i, r) in got.iter().enumerate() {
        let src = r.scalar("source").unwrap() as usize;
        let op = Distortion::ALL[r.scalar("op").unwrap() as usize];
        let wi = w.get(i).unwrap();
        // The winner is the recorded source clip, bit for bit.
        assert_eq!(
            wi.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            clips
                .get(src)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );
        let li = l
            .get(i)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_ne!(
            li,
            wi.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "the loser is edited"
        );
        if op == Distortion::Reverse {
            // A reversal is deterministic: the loser is exactly the reversed winner.
            assert_eq!(
                li,
                global_reversal(&wi)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            );
            reversals += 1;
        }
    }
    assert!(
        reversals > 0,
        "the first stage of the default curriculum draws reversals"
    );
}
