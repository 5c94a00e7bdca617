//! VRPO on the digits through the real binary, on the seconds-long CI config (2 classes, every
//! stage): the pretrain stage's classifiers and reference, the summary's image keys, the PNG grids,
//! and reuse of pretrained models and of a trained critic by path.

mod common;
use common::*;

fn run(out: &std::path::Path, sets: &[&str]) -> std::process::Output {
    let mut a = vec![
        "run",
        "configs/digits-smoke.toml",
        "--out",
        out.to_str().unwrap(),
    ];
    for s in sets {
        a.extend(["--set", s]);
    }
    tilt(&a)
}

#[test]
fn digits_smoke_runs_every_stage_and_reuses_models_by_path() {
    let d = scratch("digits-smoke");
    let out = d.join("run");
    let o = run(&out, &[]);
    assert!(o.status.success(), "{}", err(&o));
    let s = json(&out.join("summary.json"));
    // The keys other tools read (issue 12).
    for key in [
        "algorithm",
        "wall_s",
        "gap_closed",
        "classifiers",
        "reference",
        "policy",
        "target",
        "critic",
    ] {
        assert!(s.get(key).is_some(), "summary lacks {key}: {s}");
    }
    for m in ["reference", "policy"] {
        for k in ["reward", "judge_acc", "judge_logp"] {
            assert!(s[m][k].as_f64().unwrap().is_finite(), "{m}.{k}: {s}");
        }
        assert!(s[m]["diversity"]["pairwise"].as_f64().unwrap() > 0.0);
        let nn = s[m]["diversity"]["distinct_nn"].as_f64().unwrap();
        assert!(nn > 0.0 && nn <= 1.0, "{m}.diversity.distinct_nn = {nn}");
    }
    for k in ["crps", "ce", "top1", "top3"] {
        assert!(s["critic"][k].as_f64().unwrap().is_finite(), "critic.{k}");
    }
    // Classifier floors at the CI size (2 classes, 150 steps; measured 1.00 and 1.00 on the 72
    // held-out images): 0.9 leaves room for 7 mistakes.
    for k in ["reward_acc", "judge_acc"] {
        let a = s["classifiers"][k].as_f64().unwrap();
        assert!(a >= 0.9, "classifiers.{k} = {a}");
    }
    // The per-class self-normalised target weights exp(lambda r) up: its mean reward is at least
    // the reference's (a covariance, >= 0 for lambda > 0), with a positive ESS.
    let (r_ref, r_tgt) = (
        s["reference"]["reward"].as_f64().unwrap(),
        s["target"]["reward"].as_f64().unwrap(),
    );
    assert!(r_tgt >= r_ref - 1e-9, "target {r_tgt} < reference {r_ref}");
    assert!(s["target"]["ess"].as_f64().unwrap() >= 1.0);
    // The sample grids: one row per class (2 classes).
    for f in [
        "samples-reference.png",
        "samples-target.png",
        "samples-policy.png",
    ] {
        let (_, h) = tilt::plots::check_png(&out.join(f), 100).unwrap();
        assert!(h > 0, "{f}");
    }
    for f in ["reference", "reward_model", "judge"] {
        assert!(out.join(format!("pretrain/{f}.safetensors")).exists());
    }
    // A second run reuses the pretrained models and the critic by path: nothing retrained, the
    // classifiers' report is the same.
    let out2 = d.join("run2");
    let from = out.to_str().unwrap();
    let o = run(
        &out2,
        &[
            &format!("pretrain.from={from}"),
            &format!("critic.from={from}"),
            "vrpo.labels=hard",
            "vrpo.beta=10",
            "vrpo.lambda=0.1",
        ],
    );
    let e = err(&o);
    assert!(o.status.success(), "{e}");
    assert!(e.contains("[pretrain] reusing the models in"), "{e}");
    assert!(e.contains("[critic] reusing the critic of"), "{e}");
    assert!(!out2.join("pretrain").exists(), "models were retrained");
    let s2 = json(&out2.join("summary.json"));
    assert_eq!(s2["classifiers"], s["classifiers"]);
    assert_eq!(s2["critic"]["crps"], s["critic"]["crps"]);
    assert_eq!(s2["labels"], "hard");
    // The paper's critic encoder: the frozen reward model's features of x_k, cached once per state.
    let out4 = d.join("run4");
    let o = run(
        &out4,
        &[
            &format!("pretrain.from={from}"),
            "critic.encoder=\"reward_features\"",
        ],
    );
    let e = err(&o);
    assert!(o.status.success(), "{e}");
    assert!(
        e.contains("[critic] cached the reward model's features"),
        "{e}"
    );
    let s4 = json(&out4.join("summary.json"));
    for k in ["crps", "ce", "top1", "top3"] {
        assert!(s4["critic"][k].as_f64().unwrap().is_finite(), "critic.{k}");
    }
    // Models trained for other data are refused with both data sections named.
    let o = run(
        &d.join("run3"),
        &[&format!("pretrain.from={from}"), "data.classes=3"],
    );
    let e = err(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("were trained for data"), "{e}");
}

#[test]
fn image_rewards_need_image_data_and_digits_need_an_image_reward() {
    let o = tilt(&[
        "check-config",
        "configs/smoke.toml",
        "--set",
        "reward.kind=\"classifier\"",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err(&o).contains("need data.kind = \"digits\""),
        "{}",
        err(&o)
    );
    let o = tilt(&[
        "check-config",
        "configs/digits-smoke.toml",
        "--set",
        "data.classes=11",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(err(&o).contains("data.classes = 11"), "{}", err(&o));
}

#[test]
fn digits_run_on_the_redis_backend() {
    // The image config through the same actors on the Redis replay (a redis-server of its own):
    // class-conditional records cross the stream and the run finishes every stage.
    let redis = common::redis_server::RedisServer::start();
    let d = scratch("digits-redis");
    let out = d.join("run");
    let o = tilt_on(
        &redis.url(),
        &[
            "run",
            "configs/digits-smoke.toml",
            "--out",
            out.to_str().unwrap(),
            "--set",
            "replay.backend=redis",
            "--set",
            "name=digits-redis-test",
        ],
    );
    assert!(o.status.success(), "{}", err(&o));
    let s = json(&out.join("summary.json"));
    assert_eq!(s["steps"], 40);
    assert!(s["policy"]["judge_acc"].as_f64().unwrap().is_finite());
    assert_eq!(redis.keys("tilt:*"), Vec::<String>::new());
}

#[test]
fn digits_as_three_worker_processes() {
    // The image config in worker mode: pretrained models and critic from a first run (the
    // workers read them by path), then rollout, critic and learner as processes meeting through
    // a Redis of the test's own (scripts/cluster-local.sh). Class-conditional records cross both
    // streams, every stage finishes, and the record accounting balances.
    let d = scratch("digits-workers");
    let base = d.join("base");
    let o = run(&base, &["stages=[\"pretrain\",\"critic\"]"]);
    assert!(o.status.success(), "{}", err(&o));
    let redis = common::redis_server::RedisServer::start();
    let run_id = format!("ci-digits-{}", std::process::id());
    let from = base.to_str().unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/cluster-local.sh");
    let o = std::process::Command::new("bash")
        .arg(script)
        .args(["configs/digits-smoke.toml", &run_id])
        .args(["--set", &format!("pretrain.from={from}")])
        .args(["--set", &format!("critic.from={from}")])
        .args(["--set", "replay.backend=redis"])
        .env("TILT_BIN", env!("CARGO_BIN_EXE_tilt"))
        .env("TILT_REDIS_URL", redis.url())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", err(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let summary = std::path::PathBuf::from(stdout.lines().last().expect("summary path").trim());
    let s = json(&summary);
    assert_eq!(s["steps"], 40);
    assert!(
        s["policy"]["judge_acc"].as_f64().unwrap().is_finite(),
        "{s}"
    );
    let a = &s["accounting"];
    assert!(a["applied"].as_u64().unwrap() > 0, "{a}");
    assert!(accounting_balances(a), "{a}");
    assert_eq!(redis.keys("tilt:*"), Vec::<String>::new());
    std::fs::remove_dir_all(summary.parent().unwrap()).ok();
}
