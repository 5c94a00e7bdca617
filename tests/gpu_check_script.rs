//! `scripts/gpu-check.sh` is what a GPU machine runs, with minutes of device time and no Rust
//! toolchain there to fix a typo: its five end-to-end runs are run here on the CPU
//! (`SMOKE_ONLY=1 SMOKE_DEVICE=cpu`, the same commands with `device=cpu`), so a renamed config
//! key or preset breaks CI, not the GPU session. (The CUDA part itself needs a GPU: the ignored
//! `cuda_ops_match_the_cpu_reference` and the script's `tilt gpu-check`.)

#[test]
fn gpu_check_script_runs_its_five_end_to_end_runs_on_the_cpu() {
    let out = std::env::temp_dir().join(format!("tilt-gpu-check-script-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let o = std::process::Command::new("bash")
        .arg("scripts/gpu-check.sh")
        .arg(&out)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("TILT_BIN", env!("CARGO_BIN_EXE_tilt"))
        .env("SMOKE_ONLY", "1")
        .env("SMOKE_DEVICE", "cpu")
        .env_remove("TILT_REDIS_URL")
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{e}");
    let names = [
        "mixture",
        "dp-gpu-gpu",
        "dp-gpu-cpu",
        "digits-unet",
        "dfdpo-video",
    ];
    for name in names {
        assert!(
            e.contains(&format!("gpu-check: smoke run {name}: ok in ")),
            "{name} did not finish: {e}"
        );
        let log = std::fs::read_to_string(out.join(format!("smoke-{name}.log"))).unwrap();
        assert!(
            log.contains("summary.json"),
            "{name}: no summary in its log: {log}"
        );
    }
    // The device the runs were asked for reached them (the mapping of cuda:0 to cpu included).
    assert!(e.contains(r#"--set learner.devices=["cpu","cpu"]"#), "{e}");
    assert!(!e.contains("FAILED"), "{e}");
    assert_eq!(
        std::fs::read_dir(&out).unwrap().count(),
        names.len(),
        "one log per run"
    );
    std::fs::remove_dir_all(&out).unwrap();
}
