//! GPU entry points. The `cuda` feature compiles a probe for a CUDA driver; without it every call
//! returns `KernelError::NotCompiledWithCuda`, so callers need no `cfg` of their own.
//!
//! PLACEHOLDER: tilt has no fused CUDA kernels yet; all math runs through candle on the CPU.
//! `device()` is the one switch point when they land.

use candle_core::Device;

use crate::{KernelError, Result};

/// The device tilt computes on: "cpu", or "cuda" (only with the `cuda` feature and a driver).
pub fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda_device(),
        other => Err(KernelError::param(
            "device",
            other,
            "expected \"cpu\" or \"cuda\"",
        )),
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_device() -> Result<Device> {
    Err(KernelError::NotCompiledWithCuda)
}

#[cfg(feature = "cuda")]
fn cuda_device() -> Result<Device> {
    // cudarc with dynamic loading panics when libcuda is missing: probe inside catch_unwind.
    let probe = std::panic::catch_unwind(|| cudarc::driver::result::init().is_ok());
    match probe {
        Ok(true) => Err(KernelError::CudaUnavailable(
            "a CUDA driver was found, but candle's CUDA backend is not enabled in this build"
                .into(),
        )),
        _ => Err(KernelError::CudaUnavailable(
            "no CUDA driver (libcuda) on this machine".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_available_and_cuda_fails_with_a_typed_error() {
        assert!(matches!(device("cpu"), Ok(Device::Cpu)));
        let e = device("cuda").unwrap_err();
        assert!(matches!(
            e,
            KernelError::NotCompiledWithCuda | KernelError::CudaUnavailable(_)
        ));
        assert!(matches!(device("tpu"), Err(KernelError::Param { .. })));
    }
}
