//! The CUDA side of the fused ops (only with the `cuda` feature): the embedded PTX, device views
//! of candle storages, and the launches. Every `unsafe` of tilt-kernels is a launch in this file,
//! each with the reason it is sound next to it.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::{CudaDevice, Layout, Result};

const LOG_RATIO_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/log_ratio.ptx"));
const VALUE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/value.ptx"));

/// Threads per block; the row kernels give each row one warp of 32 lanes.
const BLOCK: u32 = 256;
const WARPS_PER_BLOCK: usize = BLOCK as usize / 32;
// The row kernels return whole warps before their full-mask shuffles: blocks of whole warps.
const _: () = assert!(BLOCK % 32 == 0);

/// The f32 elements of a contiguous storage, as a device view.
pub(super) fn view<'a>(
    s: &'a CudaStorage,
    l: &Layout,
    op: &'static str,
) -> Result<CudaView<'a, f32>> {
    let slice = s.as_cuda_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(slice.slice(a..b)),
        None => candle_core::bail!("{op}: expected a contiguous f32 tensor"),
    }
}

/// Refuse a launch whose buffer does not hold exactly the floats the kernel will index (or
/// holds none: a zero-size launch has nothing to compute and CUDA refuses zero-byte allocations).
fn check_len(v: &CudaView<f32>, n: usize, what: &'static str) -> Result<()> {
    if n == 0 || v.len() != n {
        candle_core::bail!(
            "{what}: the kernel indexes {n} floats, the buffer holds {}",
            v.len()
        )
    }
    Ok(())
}

/// A size as the kernels' `int`.
pub(super) fn int(n: usize, what: &'static str) -> Result<i32> {
    i32::try_from(n).map_err(|_| candle_core::Error::Msg(format!("{what} = {n} exceeds i32")))
}

fn rows_cfg(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.div_ceil(WARPS_PER_BLOCK).max(1) as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn elems_cfg(n: usize) -> LaunchConfig {
    // A grid-stride loop covers the rest beyond 2^20 blocks.
    LaunchConfig {
        grid_dim: (n.div_ceil(BLOCK as usize).clamp(1, 1 << 20) as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub(super) fn wrap(slice: CudaSlice<f32>, dev: &CudaDevice) -> CudaStorage {
    CudaStorage::wrap_cuda_slice(slice, dev.clone())
}

/// out[b] of `log_ratio_fwd` (cuda/log_ratio.cu).
#[allow(unsafe_code)]
pub(super) fn log_ratio_fwd(
    dev: &CudaDevice,
    v: &CudaView<f32>,
    z: &CudaView<f32>,
    scale: &CudaView<f32>,
    (b, len, d): (usize, usize, usize),
) -> Result<CudaSlice<f32>> {
    int(len * b * d, "elements")?;
    let (bi, li, di) = (int(b, "rows")?, int(len, "steps")?, int(d, "dims")?);
    check_len(v, len * b * d, "log_ratio_fwd v")?;
    check_len(z, len * b * d, "log_ratio_fwd z")?;
    check_len(scale, len * b, "log_ratio_fwd scale")?;
    let func = dev.get_or_load_custom_func("log_ratio_fwd", "tilt_log_ratio", LOG_RATIO_PTX)?;
    let mut out = dev.alloc_zeros::<f32>(b)?;
    let mut args = func.builder();
    args.arg(v).arg(z).arg(scale).arg(&mut out);
    args.arg(&bi).arg(&li).arg(&di);
    // SAFETY: the arguments match the kernel's signature in order and type (3 const float*, a
    // float*, 3 int); v and z hold len * b * d floats and scale len * b (checked above), out
    // has b; every index the kernel forms is below those counts.
    unsafe { args.launch(rows_cfg(b)) }.w()?;
    Ok(out)
}

/// grad_v[len * b * d] of `log_ratio_bwd`; `sg` is scale [len * b] followed by g [b].
#[allow(unsafe_code)]
pub(super) fn log_ratio_bwd(
    dev: &CudaDevice,
    v: &CudaView<f32>,
    z: &CudaView<f32>,
    sg: &CudaView<f32>,
    (b, len, d): (usize, usize, usize),
) -> Result<CudaSlice<f32>> {
    let n = len * b * d;
    int(n, "elements")?;
    let (bi, li, di) = (int(b, "rows")?, int(len, "steps")?, int(d, "dims")?);
    check_len(v, n, "log_ratio_bwd v")?;
    check_len(z, n, "log_ratio_bwd z")?;
    check_len(sg, len * b + b, "log_ratio_bwd scale and g")?;
    let func = dev.get_or_load_custom_func("log_ratio_bwd", "tilt_log_ratio", LOG_RATIO_PTX)?;
    let scale = sg.slice(0..len * b);
    let g = sg.slice(len * b..len * b + b);
    let mut grad = dev.alloc_zeros::<f32>(n)?;
    let mut args = func.builder();
    args.arg(v).arg(z).arg(&scale).arg(&g).arg(&mut grad);
    args.arg(&bi).arg(&li).arg(&di);
    // SAFETY: the arguments match the kernel's signature (4 const float*, a float*, 3 int); v, z
    // and grad hold n = len * b * d floats, scale len * b and g b (checked above), and the
    // grid-stride loop stays below n.
    unsafe { args.launch(elems_cfg(n)) }.w()?;
    Ok(grad)
}

/// out[rows] of `value_fwd` (cuda/value.cu).
#[allow(unsafe_code)]
pub(super) fn value_fwd(
    dev: &CudaDevice,
    f: &CudaView<f32>,
    lc: &CudaView<f32>,
    (rows, bins): (usize, usize),
    eps: f32,
) -> Result<CudaSlice<f32>> {
    let (ri, mi) = (int(rows, "rows")?, int(bins, "bins")?);
    int(rows * bins, "elements")?;
    check_len(f, rows * bins, "value_fwd f")?;
    check_len(lc, bins, "value_fwd lc")?;
    let func = dev.get_or_load_custom_func("value_fwd", "tilt_value", VALUE_PTX)?;
    let mut out = dev.alloc_zeros::<f32>(rows)?;
    let mut args = func.builder();
    args.arg(f)
        .arg(lc)
        .arg(&mut out)
        .arg(&ri)
        .arg(&mi)
        .arg(&eps);
    // SAFETY: the arguments match the kernel's signature (2 const float*, a float*, 2 int, a
    // float); f holds rows * bins floats and lc bins (checked above), out rows, and the kernel
    // indexes no further.
    unsafe { args.launch(rows_cfg(rows)) }.w()?;
    Ok(out)
}

/// grad_f[rows * bins] of `value_bwd`; `lcg` is lc [bins] followed by g [rows].
#[allow(unsafe_code)]
pub(super) fn value_bwd(
    dev: &CudaDevice,
    f: &CudaView<f32>,
    lcg: &CudaView<f32>,
    (rows, bins): (usize, usize),
    eps: f32,
) -> Result<CudaSlice<f32>> {
    let (ri, mi) = (int(rows, "rows")?, int(bins, "bins")?);
    int(rows * bins, "elements")?;
    check_len(f, rows * bins, "value_bwd f")?;
    check_len(lcg, bins + rows, "value_bwd lc and g")?;
    let func = dev.get_or_load_custom_func("value_bwd", "tilt_value", VALUE_PTX)?;
    let lc = lcg.slice(0..bins);
    let g = lcg.slice(bins..bins + rows);
    let mut grad = dev.alloc_zeros::<f32>(rows * bins)?;
    let mut args = func.builder();
    args.arg(f).arg(&lc).arg(&g).arg(&mut grad);
    args.arg(&ri).arg(&mi).arg(&eps);
    // SAFETY: the arguments match the kernel's signature (3 const float*, a float*, 2 int, a
    // float); f and grad hold rows * bins floats, lc bins and g rows (checked above).
    unsafe { args.launch(rows_cfg(rows)) }.w()?;
    Ok(grad)
}

/// The device of a storage.
pub(super) fn device(s: &CudaStorage) -> &CudaDevice {
    s.device()
}
