//! The fused ops on a device against their references, as data: the CUDA tests and
//! `tilt gpu-check` both run [`compare_on`]. Each comparison is the largest error over every
//! element relative to the reference's scale, max |x - ref| / max(1, max |ref|), for values and
//! for gradients in the op's input (an element-wise relative error would blow up where a gradient
//! is a small difference of large terms, which f32 cannot resolve either way).

use candle_core::{Device, Tensor, Var};
use serde::Serialize;

use super::log_ratio::segment_log_ratio_plain;
use super::value::value_lse_plain;
use super::{segment_log_ratio, value_lse};
use crate::critic::CdfGrid;
use crate::rng::{randn, rng_for};
use crate::Result;

/// f32 results of the same sums in another order or precision. The tightest case is the value's
/// gradient at |lambda c| ~ 100: candle's f32 log-sum-exp there is ~100, one f32 ulp (7.6e-6) of
/// which multiplies gradients of up to ~1e6 (relative error ~7e-6 against the f64 reference; the
/// CUDA kernel sums in double to stay clear of it). The CPU ops agree with candle to 3e-6 at worst.
const TOLERANCE: f64 = 2e-5;

/// One comparison of a fused op on a device against a reference.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// `segment_log_ratio` or `value_lse`.
    pub op: &'static str,
    /// The shape of the case.
    pub case: String,
    /// `value`, `gradient` or `repeat` (a second run on the device, which must agree bitwise).
    pub quantity: &'static str,
    /// `cpu-reference` (the op's CPU implementation, f64 sums), `candle` (the plain candle
    /// computation the op replaces, on the same device), `candle-on-cpu` (the caller of the op,
    /// run on the CPU where it takes the plain candle path) or `itself`.
    pub against: &'static str,
    pub max_rel_err: f64,
    pub tolerance: f64,
    pub passed: bool,
}

fn max_rel(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.flatten_all()?.to_vec1::<f32>()?;
    let b = b.flatten_all()?.to_vec1::<f32>()?;
    if a.len() != b.len() {
        return Err(crate::KernelError::shape(
            "compare_on",
            format!("{} vs {} elements", a.len(), b.len()),
        ));
    }
    let scale = b.iter().fold(1f32, |m, y| m.max(y.abs()));
    Ok(a.iter()
        .zip(&b)
        .map(|(x, y)| ((x - y).abs() / scale) as f64)
        .fold(
            0.0,
            |m, e| if e.is_nan() { f64::INFINITY } else { m.max(e) },
        ))
}

/// Output and gradient (in `x`) of `f(x)` weighted by `w`: sum(f(x) * w).backward().
fn value_and_grad(
    x: &Tensor,
    w: &Tensor,
    f: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<(Tensor, Tensor)> {
    let x = Var::from_tensor(x)?;
    let out = f(x.as_tensor())?;
    let grads = (&out * w)?.sum_all()?.backward()?;
    let g = grads
        .get(x.as_tensor())
        .cloned()
        .ok_or_else(|| crate::KernelError::shape("compare_on", "no gradient reached the input"))?;
    Ok((out, g))
}

struct Recorder<'a> {
    op: &'static str,
    case: &'a str,
    out: &'a mut Vec<Comparison>,
}

impl Recorder<'_> {
    fn push(&mut self, quantity: &'static str, against: &'static str, err: f64, tol: f64) {
        self.out.push(Comparison {
            op: self.op,
            case: self.case.to_string(),
            quantity,
            against,
            max_rel_err: err,
            tolerance: tol,
            passed: err <= tol,
        });
    }

    /// On `dev`: values and gradients against `candle` on `dev`, against the CPU op on the CPU
    /// (when `dev` is not the CPU), and a bitwise repeat.
    fn compare(
        &mut self,
        dev: &Device,
        x: &Tensor,
        w: &Tensor,
        fused: impl Fn(&Tensor) -> Result<Tensor>,
        candle: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<()> {
        let (xd, wd) = (x.to_device(dev)?, w.to_device(dev)?);
        let (v, g) = value_and_grad(&xd, &wd, &fused)?;
        let (vc, gc) = value_and_grad(&xd, &wd, &candle)?;
        self.push("value", "candle", max_rel(&v, &vc)?, TOLERANCE);
        self.push("gradient", "candle", max_rel(&g, &gc)?, TOLERANCE);
        if !dev.is_cpu() {
            let (vr, gr) = value_and_grad(x, w, &fused)?;
            self.push("value", "cpu-reference", max_rel(&v, &vr)?, TOLERANCE);
            self.push("gradient", "cpu-reference", max_rel(&g, &gr)?, TOLERANCE);
        }
        let (v2, g2) = value_and_grad(&xd, &wd, &fused)?;
        let again = max_rel(&v, &v2)?.max(max_rel(&g, &g2)?);
        self.push("repeat", "itself", again, 0.0);
        Ok(())
    }
}

/// Every comparison of both fused ops on `dev`, on seeded random inputs at the shapes tilt uses
/// (the quickstart's D = 2, L = 10 up to 4096 pairs; the 8x8 digits' D = 64; 50..201 bins,
/// lambda up to +-100 where exp(lambda c) alone overflows f32).
pub fn compare_on(dev: &Device) -> Result<Vec<Comparison>> {
    let cpu = Device::Cpu;
    let mut out = Vec::new();
    for (i, &(b, len, d)) in [(2 * 4096, 10, 2), (2 * 256, 10, 64), (37, 3, 5)]
        .iter()
        .enumerate()
    {
        let mut rng = rng_for(11, 0, i as u64);
        let v = randn(&mut rng, (len * b, d), &cpu)?;
        let z = randn(&mut rng, (len * b, d), &cpu)?.to_device(dev)?;
        let scale = (randn(&mut rng, len * b, &cpu)?.abs()? + 0.1)?.to_device(dev)?;
        let w = randn(&mut rng, b, &cpu)?;
        let case = format!("rows {b}, steps {len}, dims {d}");
        let (zc, sc) = (z.to_device(&cpu)?, scale.to_device(&cpu)?);
        let mut r = Recorder {
            op: "segment_log_ratio",
            case: &case,
            out: &mut out,
        };
        r.compare(
            dev,
            &v,
            &w,
            |x| {
                let (z, s) = if x.device().is_cpu() {
                    (&zc, &sc)
                } else {
                    (&z, &scale)
                };
                segment_log_ratio(x, z, s, len)
            },
            |x| segment_log_ratio_plain(x, &z, &scale, len),
        )?;
    }
    for (i, &(lambda, eps, b, m)) in [
        (1.0, 1e-6, 8192, 50),
        (100.0, 1e-6, 333, 64),
        (-100.0, 1e-3, 64, 201),
    ]
    .iter()
    .enumerate()
    {
        let mut rng = rng_for(11, 1, i as u64);
        let grid = CdfGrid::new((0..m).map(|k| -1.0 + 2.0 * k as f64 / m as f64).collect())?;
        // Increasing CDF rows with noise that makes some bin differences negative.
        let steps = (randn(&mut rng, (b, m), &cpu)?.abs()? * 0.3)?.cumsum(1)?;
        let noise = (randn(&mut rng, (b, m), &cpu)? * 0.05)?;
        let f = candle_nn::ops::sigmoid(&((steps + noise)? - 2.0)?)?;
        let w = randn(&mut rng, b, &cpu)?;
        let case = format!("rows {b}, bins {m}, lambda {lambda}, eps {eps}");
        let mut r = Recorder {
            op: "value_lse",
            case: &case,
            out: &mut out,
        };
        r.compare(
            dev,
            &f,
            &w,
            |x| value_lse(x, &grid, lambda, eps),
            |x| value_lse_plain(x, &grid, lambda, eps),
        )?;
    }
    if !dev.is_cpu() {
        wiring(dev, &mut out)?;
    }
    Ok(out)
}

/// eps(x, n) = tanh(a x) + n / 1000 with a learnable a [1, D]: a small residual for the wiring.
struct Probe(Var);

impl crate::denoiser::Denoiser for Probe {
    fn eps(&self, x: &Tensor, n: &Tensor, _cond: Option<&Tensor>) -> Result<Tensor> {
        let t = (n.unsqueeze(1)? / 1000.0)?;
        Ok(x.broadcast_mul(&self.0)?.tanh()?.broadcast_add(&t)?)
    }
}

/// The callers on `dev` (which route CUDA tensors to the fused ops) against the same callers on
/// the CPU (plain candle): `path_log_ratio_residual_rows` (values and the gradient in the
/// residual's parameter) and `value_from_cdf` (values).
fn wiring(dev: &Device, out: &mut Vec<Comparison>) -> Result<()> {
    use crate::logprob::path_log_ratio_residual_rows;
    use crate::schedule::{SamplingGrid, VpSchedule};
    let cpu = Device::Cpu;
    let (b, len, d, k) = (300, 10, 2, 100);
    let grid = SamplingGrid::new(&VpSchedule::ddpm_default(), k, 1.0)?;
    let mut rng = rng_for(11, 2, 0);
    let states: Vec<Tensor> = (0..=len)
        .map(|_| randn(&mut rng, (b, d), &cpu))
        .collect::<Result<_>>()?;
    let noises: Vec<Tensor> = (0..len)
        .map(|_| randn(&mut rng, (b, d), &cpu))
        .collect::<Result<_>>()?;
    let ks: Vec<usize> = (0..b).map(|i| len + (i * 37) % (k - len + 1)).collect();
    let a = randn(&mut rng, (1, d), &cpu)?;
    let w = randn(&mut rng, b, &cpu)?;
    let run = |on: &Device| -> Result<(Tensor, Tensor)> {
        let probe = Probe(Var::from_tensor(&a.to_device(on)?)?);
        let to = |v: &[Tensor]| -> Result<Vec<Tensor>> {
            v.iter().map(|t| Ok(t.to_device(on)?)).collect()
        };
        let r =
            path_log_ratio_residual_rows(&probe, &grid, &to(&states)?, &to(&noises)?, &ks, None)?;
        let grads = (&r * w.to_device(on)?)?.sum_all()?.backward()?;
        let g = grads.get(probe.0.as_tensor()).cloned().ok_or_else(|| {
            crate::KernelError::shape("compare_on", "no gradient reached the residual")
        })?;
        Ok((r, g))
    };
    let ((rd, gd), (rc, gc)) = (run(dev)?, run(&cpu)?);
    let case = format!("rows {b}, steps {len}, dims {d}, residual tanh(a x) + n/1000");
    let mut r = Recorder {
        op: "path_log_ratio_residual_rows",
        case: &case,
        out,
    };
    r.push("value", "candle-on-cpu", max_rel(&rd, &rc)?, TOLERANCE);
    r.push("gradient", "candle-on-cpu", max_rel(&gd, &gc)?, TOLERANCE);
    let grid = CdfGrid::new((0..50).map(|k| k as f64 / 50.0).collect())?;
    let f = candle_nn::ops::sigmoid(&randn(&mut rng, (b, 50), &cpu)?.cumsum(1)?)?;
    let vd = crate::critic::value_from_cdf(&f.to_device(dev)?, &grid, 2.0, 1e-6)?;
    let vc = crate::critic::value_from_cdf(&f, &grid, 2.0, 1e-6)?;
    let mut r = Recorder {
        op: "value_from_cdf",
        case: "rows 300, bins 50, lambda 2",
        out,
    };
    r.push("value", "candle-on-cpu", max_rel(&vd, &vc)?, TOLERANCE);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_all_pass(r: &[Comparison]) {
        assert!(!r.is_empty());
        let bad: Vec<&Comparison> = r.iter().filter(|c| !c.passed).collect();
        assert!(bad.is_empty(), "{bad:#?}");
    }

    #[test]
    fn cpu_ops_match_plain_candle_at_every_checked_shape() {
        let r = compare_on(&Device::Cpu).unwrap();
        // 6 cases x (value, gradient, repeat) against candle on the CPU.
        assert_eq!(r.len(), 18);
        assert_all_pass(&r);
        // The callers' comparison runs only on a GPU (on the CPU both sides take the same path);
        // here it at least runs through on shapes it will see there.
        let mut w = Vec::new();
        wiring(&Device::Cpu, &mut w).unwrap();
        assert_eq!(w.len(), 3);
        assert_all_pass(&w);
    }

    #[test]
    #[ignore = "needs a CUDA GPU: run scripts/gpu-check.sh (or cargo test --features cuda -- --ignored)"]
    fn cuda_ops_match_the_cpu_reference() {
        let dev = match crate::cuda::device("cuda:0") {
            Ok(d) => d,
            Err(e) => {
                eprintln!("SKIPPED cuda_ops_match_the_cpu_reference: no CUDA device ({e})");
                return;
            }
        };
        let r = compare_on(&dev).unwrap();
        // 6 cases x (value and gradient against candle and the CPU reference, repeat), and the
        // two callers (3 comparisons).
        assert_eq!(r.len(), 33);
        assert_all_pass(&r);
    }
}
