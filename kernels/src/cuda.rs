//! GPU entry points. The `cuda` feature compiles a probe for a CUDA driver; without it every call
//! returns `KernelError::NotCompiledWithCuda`, so callers need no `cfg` of their own.
//!
//! PLACEHOLDER: tilt has no fused CUDA kernels yet; all math runs through candle on the CPU.
//! `device()` is the one switch point when they land.

use candle_core::Device;

use crate::{KernelError, Result};

/// A device name from config: "cpu", "cuda" (= "cuda:0") or "cuda:N".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

/// Parse a device name without touching any hardware (config validation).
pub fn parse_device(name: &str) -> Result<DeviceSpec> {
    match name {
        "cpu" => Ok(DeviceSpec::Cpu),
        "cuda" => Ok(DeviceSpec::Cuda(0)),
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .map(DeviceSpec::Cuda)
            .ok_or_else(|| {
                KernelError::param("device", other, "expected \"cpu\", \"cuda\" or \"cuda:N\"")
            }),
    }
}

/// The device tilt computes on: "cpu", or "cuda[:N]" (only with the `cuda` feature and a driver).
pub fn device(name: &str) -> Result<Device> {
    match parse_device(name)? {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Cuda(ordinal) => cuda_device(ordinal),
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_ordinal: usize) -> Result<Device> {
    Err(KernelError::NotCompiledWithCuda)
}

#[cfg(feature = "cuda")]
fn cuda_device(_ordinal: usize) -> Result<Device> {
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
        assert!(matches!(device("cuda:x"), Err(KernelError::Param { .. })));
    }

    #[test]
    fn device_names_parse() {
        assert_eq!(parse_device("cpu").unwrap(), DeviceSpec::Cpu);
        assert_eq!(parse_device("cuda").unwrap(), DeviceSpec::Cuda(0));
        assert_eq!(parse_device("cuda:3").unwrap(), DeviceSpec::Cuda(3));
        for bad in ["", "gpu", "cuda:", "cuda:-1", "cuda:1:2", "CPU"] {
            assert!(parse_device(bad).is_err(), "{bad:?} should not parse");
        }
    }
}
