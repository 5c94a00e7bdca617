//! GPU entry points: device names from config, the CUDA device behind them, and tilt's own fused
//! ops with a CUDA kernel each (`cuda/*.cu`, compiled to PTX by build.rs) and a CPU reference.
//!
//! Without the `cuda` feature the API is the same: `device("cuda")` returns
//! `KernelError::NotCompiledWithCuda`, and the fused ops run their CPU reference on CPU tensors,
//! so callers need no `cfg` of their own.

mod bench;
mod check;
#[cfg(feature = "cuda")]
mod launch;
mod log_ratio;
mod value;

pub use bench::{learner_step_rate, BenchModel, StepPath, StepRate};
pub use check::{compare_on, Comparison};
pub use log_ratio::{segment_log_ratio, segment_log_ratio_cpu};
pub use value::{value_lse, value_lse_cpu};

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

/// One candle device per ordinal for the whole process: candle refuses to mix tensors of two
/// `Device::new_cuda(0)` calls (each is its own device id), and roles hand tensors to each other.
///
/// With one explicit stream (`new_cuda_with_stream`), not `Device::new_cuda`'s per-thread default
/// stream: tilt's roles run on tokio and blocking-pool threads and hand CUDA tensors across them
/// (a rollout's segment to the critic's thread, a learner's weights updated on one worker and read
/// on the next, a buffer freed by whichever thread drops it). Per-thread streams are not ordered
/// with each other, so such a hand-off could read data still being written; on one stream every
/// role's work is queued in the order it was issued. The cost: the roles' kernels on one GPU do not
/// overlap each other (cudarc also records an event per buffer use, as it does with any
/// non-default stream).
#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> Result<Device> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static DEVICES: OnceLock<Mutex<HashMap<usize, Device>>> = OnceLock::new();
    let mut devices = DEVICES
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(d) = devices.get(&ordinal) {
        return Ok(d.clone());
    }
    let count = cuda_device_count()?;
    if ordinal >= count {
        return Err(KernelError::CudaUnavailable(format!(
            "cuda:{ordinal} requested, but this machine has {count} CUDA device(s)"
        )));
    }
    let d = Device::new_cuda_with_stream(ordinal)
        .map_err(|e| KernelError::CudaUnavailable(format!("cuda:{ordinal}: {e}")))?;
    devices.insert(ordinal, d.clone());
    Ok(d)
}

/// The number of CUDA devices the driver sees (an error names the driver's reason, e.g.
/// CUDA_ERROR_STUB_LIBRARY when the link stub of scripts/cuda-toolchain.sh stands in for it).
#[cfg(feature = "cuda")]
pub fn cuda_device_count() -> Result<usize> {
    use candle_core::cuda_backend::cudarc::driver::result;
    use candle_core::cuda_backend::cudarc::driver::sys::CUresult;
    let unavailable = |e: result::DriverError| {
        let hint = if e.0 == CUresult::CUDA_ERROR_STUB_LIBRARY {
            " (libcuda.so.1 is the link stub of scripts/cuda-toolchain.sh, not a driver)"
        } else {
            ""
        };
        KernelError::CudaUnavailable(format!("the CUDA driver failed to start: {:?}{hint}", e.0))
    };
    result::init().map_err(unavailable)?;
    let n = result::device::get_count().map_err(unavailable)?;
    Ok(usize::try_from(n).unwrap_or(0))
}

/// The number of CUDA devices: always an error without the `cuda` feature.
#[cfg(not(feature = "cuda"))]
pub fn cuda_device_count() -> Result<usize> {
    Err(KernelError::NotCompiledWithCuda)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_available_and_cuda_fails_with_a_typed_error() {
        assert!(matches!(device("cpu"), Ok(Device::Cpu)));
        // Without the feature: always the typed error. With it: a CUDA device where a driver and
        // a GPU are present, else CudaUnavailable with the driver's reason.
        let got = device("cuda");
        #[cfg(not(feature = "cuda"))]
        assert!(matches!(got, Err(KernelError::NotCompiledWithCuda)));
        #[cfg(feature = "cuda")]
        match got {
            Ok(d) => assert!(d.is_cuda()),
            Err(KernelError::CudaUnavailable(why)) => assert!(!why.is_empty()),
            Err(e) => panic!("unexpected error {e}"),
        }
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
