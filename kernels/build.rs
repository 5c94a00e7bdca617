//! With the `cuda` feature: compile every `cuda/*.cu` to PTX with nvcc into OUT_DIR, where
//! `src/cuda/*.rs` embed it (`include_str!`). Without the feature this does nothing, so the
//! default build needs no CUDA at all.
//!
//! PTX at build time rather than NVRTC at run time: a mistake in a kernel fails the build on the
//! build machine (which has nvcc anyway: candle-kernels needs it), not the first launch on a GPU
//! machine; the binary carries no compiler step and no JIT delay beyond the driver's own
//! PTX -> SASS. The PTX targets `compute_75` (the oldest architecture nvcc 13 accepts), so the
//! driver can load it on any GPU that CUDA 13 supports, whatever CUDA_COMPUTE_CAP candle's
//! kernels were built for. The PTX version follows the nvcc that builds it: use a toolchain no
//! newer than the target machine's driver (scripts/cuda-toolchain.sh pins 13.0).

use std::path::PathBuf;
use std::process::Command;

const SOURCES: [&str; 2] = ["log_ratio", "value"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    for s in SOURCES {
        println!("cargo:rerun-if-changed=cuda/{s}.cu");
    }
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_ROOT");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = nvcc();
    for s in SOURCES {
        let src = format!("cuda/{s}.cu");
        let ptx = out.join(format!("{s}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-arch=compute_75", "-O3", "-o"])
            .arg(&ptx)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "tilt-kernels: cannot run {} ({e}); the `cuda` feature needs nvcc: run \
                     scripts/cuda-toolchain.sh and export what it prints",
                    nvcc.display()
                )
            });
        assert!(status.success(), "tilt-kernels: nvcc failed on {src}");
    }
}

/// NVCC if set, else CUDA_ROOT/bin/nvcc if it exists, else `nvcc` from PATH.
fn nvcc() -> PathBuf {
    if let Some(p) = std::env::var_os("NVCC") {
        return p.into();
    }
    if let Some(root) = std::env::var_os("CUDA_ROOT") {
        let p = PathBuf::from(root).join("bin/nvcc");
        if p.exists() {
            return p;
        }
    }
    "nvcc".into()
}
