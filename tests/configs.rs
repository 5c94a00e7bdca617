//! Every preset in configs/ parses and validates; bad input fails with one line naming the file,
//! the key and the value, and leaves no run directory behind that looks valid.

mod common;
use common::*;

#[test]
fn every_preset_parses() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            tilt::config::Config::load(&p, &[])
                .unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
            n += 1;
        }
    }
    assert!(n >= 3, "expected the presets in configs/, found {n}");
}

#[test]
fn check_config_prints_the_resolved_config_with_overrides() {
    let o = tilt(&[
        "check-config",
        "configs/quickstart.toml",
        "--set",
        "vrpo.labels=hard",
        "--set",
        "sampling.steps=20",
    ]);
    assert!(o.status.success(), "{}", err(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("labels = \"hard\"") && out.contains("steps = 20"),
        "{out}"
    );
}

#[test]
fn bad_input_gets_one_clear_line() {
    let d = scratch("bad-config");
    let f = d.join("typo.toml");
    std::fs::write(&f, "[vrpo]\nlamda = 2.0\n").unwrap();
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (
            vec!["run".into(), f.display().to_string()],
            vec!["typo.toml", "lamda"],
        ),
        (
            vec![
                "run".into(),
                "configs/quickstart.toml".into(),
                "--set".into(),
                "vrpo.beta=-3".into(),
            ],
            vec!["quickstart.toml", "vrpo.beta", "-3"],
        ),
        (
            vec![
                "run".into(),
                "configs/quickstart.toml".into(),
                "--set".into(),
                "rollout.actorz=2".into(),
            ],
            vec!["actorz"],
        ),
        (
            vec![
                "run".into(),
                "configs/quickstart.toml".into(),
                "--set".into(),
                "vrpo.segment_len=500".into(),
            ],
            vec!["vrpo.segment_len", "500"],
        ),
        (
            vec!["run".into(), "configs/nope.toml".into()],
            vec!["nope.toml"],
        ),
        (
            vec![
                "run".into(),
                "configs/quickstart.toml".into(),
                "--set".into(),
                "reward.kind=cubic".into(),
            ],
            vec!["quickstart.toml", "reward.kind", "cubic"],
        ),
        (
            // A role whose device cannot be opened fails before the run directory exists (this
            // build has no `cuda` feature, or the machine no driver).
            vec![
                "run".into(),
                "configs/quickstart.toml".into(),
                "--set".into(),
                "learner.device=\"cuda:0\"".into(),
            ],
            vec!["learner.device", "cuda:0"],
        ),
        (
            vec!["resume".into(), d.join("not-a-run").display().to_string()],
            vec!["not a tilt run directory"],
        ),
    ];
    for (args, needles) in cases {
        let out_dir = d.join("out");
        let mut a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        if a[0] == "run" {
            a.extend(["--out", out_dir.to_str().unwrap()]);
        }
        let o = tilt(&a);
        let e = err(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {e}");
        let lines: Vec<&str> = e.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{args:?}: expected one line, got {e}");
        for n in needles {
            assert!(e.contains(n), "{args:?}: {e:?} should name {n}");
        }
        assert!(
            !out_dir.exists(),
            "{args:?}: a failed config must not create a run directory"
        );
    }
}
