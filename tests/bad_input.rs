//! Bad input gets one clear line, exit code 1, no panic, and nothing left behind that looks like a
//! valid run: every broken config of the corpus in `tests/bad-input/configs/` (each names, in its
//! first lines `# expect: ...`, the substrings its error must contain), and corrupted run files
//! (policy, optimiser, critic and reference weights, a garbage `state.json`) on resume.

mod common;
use common::*;

use std::path::{Path, PathBuf};

/// The `# expect: ...` lines at the top of a corpus file.
fn expectations(text: &str) -> Vec<String> {
    text.lines()
        .map_while(|l| l.strip_prefix("# expect: "))
        .map(|s| s.trim().to_string())
        .collect()
}

/// stderr's non-empty lines.
fn lines(e: &str) -> Vec<&str> {
    e.lines().filter(|l| !l.trim().is_empty()).collect()
}

#[test]
fn every_broken_config_fails_with_one_line_naming_the_problem() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bad-input/configs");
    let d = scratch("bad-input-configs");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 30,
        "the corpus holds {} configs",
        files.len()
    );
    let mut failures = vec![];
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let want = expectations(&text);
        assert!(!want.is_empty(), "{}: no `# expect:` line", f.display());
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        let out = d.join(name.trim_end_matches(".toml"));
        let o = tilt(&["run", f.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        let e = err(&o);
        let ok = o.status.code() == Some(1)
            && lines(&e).len() == 1
            && e.contains(&name)
            && want.iter().all(|w| e.contains(w.as_str()))
            && !e.contains("panicked")
            && !out.exists();
        if !ok {
            failures.push(format!(
                "{name}: exit {:?}, expected {want:?}, run dir left: {}, stderr: {e:?}",
                o.status.code(),
                out.exists()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Copy a run directory (files and folders).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// Resume a copy of `run` whose file `rel` was damaged by `damage`; the error must be one line
/// naming the file, exit code 1.
fn refused_on_resume(run: &Path, work: &Path, rel: &str, damage: fn(&Path), sets: &[&str]) {
    static CASE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = CASE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let copy = work.join(format!("{n}-{}", rel.replace('/', "_")));
    copy_dir(run, &copy);
    damage(&copy.join(rel));
    let mut args = vec!["resume", copy.to_str().unwrap()];
    for s in sets {
        args.extend(["--set", s]);
    }
    let o = tilt(&args);
    let e = err(&o);
    let file = Path::new(rel).file_name().unwrap().to_string_lossy();
    assert_eq!(o.status.code(), Some(1), "{rel}: {e}");
    assert!(
        e.contains(file.as_ref()),
        "{rel}: the error should name {file}: {e}"
    );
    assert!(!e.contains("panicked"), "{rel}: {e}");
    let errors: Vec<&str> = lines(&e)
        .into_iter()
        .filter(|l| l.contains("error"))
        .collect();
    assert_eq!(errors.len(), 1, "{rel}: {e}");
}

fn truncate(p: &Path) {
    let b = std::fs::read(p).unwrap();
    std::fs::write(p, &b[..b.len() / 2]).unwrap();
}

fn garbage(p: &Path) {
    std::fs::write(p, b"\x00\x01 this is not what tilt wrote \xff").unwrap();
}

/// Every tensor of a safetensors file rewritten as f64 (names and shapes kept).
fn as_f64(p: &Path) {
    use candle_core::{DType, Device};
    let t = candle_core::safetensors::load(p, &Device::Cpu).unwrap();
    let t: std::collections::HashMap<_, _> = t
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::F64).unwrap()))
        .collect();
    candle_core::safetensors::save(&t, p).unwrap();
}

/// Every tensor of a safetensors file one row longer (names and dtype kept).
fn one_row_more(p: &Path) {
    use candle_core::{Device, Tensor};
    let t = candle_core::safetensors::load(p, &Device::Cpu).unwrap();
    let t: std::collections::HashMap<_, _> = t
        .into_iter()
        .map(|(k, v)| {
            let mut dims = v.dims().to_vec();
            dims[0] += 1;
            (k, Tensor::zeros(dims, v.dtype(), &Device::Cpu).unwrap())
        })
        .collect();
    candle_core::safetensors::save(&t, p).unwrap();
}

#[test]
fn corrupted_vrpo_run_files_are_refused_on_resume() {
    let d = scratch("bad-input-vrpo");
    let run = d.join("run");
    let o = tilt(&[
        "run",
        "configs/smoke.toml",
        "--out",
        run.to_str().unwrap(),
        "--set",
        "vrpo.steps=20",
        "--set",
        "eval.samples=500",
        "--set",
        "eval.target_samples=500",
    ]);
    assert!(o.status.success(), "{}", err(&o));
    let more = ["vrpo.steps=30"];
    let ck = "checkpoints/step-00000020";
    for (rel, damage) in [
        (format!("{ck}/policy.safetensors"), truncate as fn(&Path)),
        (format!("{ck}/optimizer.safetensors"), garbage),
        (format!("{ck}/state.json"), garbage),
        ("critic.safetensors".to_string(), truncate),
        // Well-formed files of the wrong dtype or shape: refused, never converted or padded.
        (format!("{ck}/policy.safetensors"), as_f64),
        ("critic.safetensors".to_string(), one_row_more),
    ] {
        refused_on_resume(&run, &d, &rel, damage, &more);
    }
}

#[test]
fn corrupted_dfdpo_reference_is_refused_on_resume() {
    let d = scratch("bad-input-dfdpo");
    let run = d.join("run");
    let o = tilt(&[
        "run",
        "configs/video-dfdpo.toml",
        "--out",
        run.to_str().unwrap(),
        "--set",
        "video.clips=12",
        "--set",
        "pretrain.steps=2",
        "--set",
        "pretrain.batch=2",
        "--set",
        "stages=[\"pretrain\"]",
        "--set",
        "metrics.listen=",
    ]);
    assert!(o.status.success(), "{}", err(&o));
    assert!(run.join("reference.safetensors").exists());
    let sft = [
        "stages=[\"sft\"]",
        "dfdpo.steps=2",
        "dfdpo.batch=2",
        "replay.min_size=4",
    ];
    refused_on_resume(&run, &d, "reference.safetensors", truncate, &sft);
    refused_on_resume(&run, &d, "data_scale.json", garbage, &sft);
}
