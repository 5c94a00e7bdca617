//! The critic's value V = log sum_m pi_m exp(lambda c_m) from CDF rows, fused (forward and
//! backward in one pass each over a row): the same function as `critic::value_from_cdf`, with
//! w_m = (F_m - F_{m-1})_+ + eps, pi = w / sum w, and a log-sum-exp around the row maximum.
//! CUDA kernel: cuda/value.cu; CPU reference: [`value_lse_cpu`].

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

use crate::critic::CdfGrid;
use crate::{KernelError, Result};

/// V [B] from the CDF `f` [B, M] on `grid` (M points), as `critic::value_from_cdf` computes it.
/// Differentiable in `f`. f32 on the device of `f`.
pub fn value_lse(f: &Tensor, grid: &CdfGrid, lambda: f64, eps: f64) -> Result<Tensor> {
    grid.validate()?;
    let m = grid.len();
    match *f.dims() {
        [b, cols] if b > 0 && cols == m => {}
        _ => {
            return Err(KernelError::shape(
                "value_lse",
                format!(
                    "f is {:?}, expected [batch, {m}] (the grid's points)",
                    f.dims()
                ),
            ))
        }
    }
    if !lambda.is_finite() {
        return Err(KernelError::param(
            "critic.lambda",
            lambda,
            "must be finite",
        ));
    }
    if !eps.is_finite() || eps < 0.0 {
        return Err(KernelError::param(
            "critic.eps",
            eps,
            "must be finite and >= 0",
        ));
    }
    let lc: Vec<f32> = grid.c.iter().map(|c| (lambda * c) as f32).collect();
    let lc = Tensor::from_vec(lc, m, f.device())?;
    let f = f.to_dtype(DType::F32)?.contiguous()?;
    Ok(f.apply_op2(&lc, ValueLse { eps: eps as f32 })?)
}

/// `critic::value_from_cdf`'s plain candle computation, op for op (that function sends CUDA
/// tensors to [`value_lse`], so `compare_on` needs this copy as the candle oracle on a GPU; a test
/// checks the two agree bitwise on the CPU).
pub(crate) fn value_lse_plain(f: &Tensor, grid: &CdfGrid, lambda: f64, eps: f64) -> Result<Tensor> {
    let m = grid.len();
    let d = if m == 1 {
        f.clone()
    } else {
        let rest = (f.narrow(1, 1, m - 1)? - f.narrow(1, 0, m - 1)?)?;
        Tensor::cat(&[&f.narrow(1, 0, 1)?, &rest], 1)?
    };
    let w = d.relu()?.affine(1.0, eps)?;
    let log_z = w.sum_keepdim(1)?.log()?;
    let lc: Vec<f64> = grid.c.iter().map(|c| lambda * c).collect();
    let lc = Tensor::from_vec(lc, (1, m), f.device())?.to_dtype(f.dtype())?;
    let a = w.log()?.broadcast_add(&lc)?;
    let a_max = a.max_keepdim(1)?;
    let lse = (a.broadcast_sub(&a_max)?.exp()?.sum_keepdim(1)?.log()? + a_max)?;
    Ok((lse - log_z)?.squeeze(1)?)
}

/// log-sum-exp of the row's a_m = log w_m + lc_m and its Z = sum_m w_m, in f64.
fn row_sums(row: &[f32], lc: &[f32], eps: f32) -> (f64, f64) {
    let w = |m: usize| {
        let d = if m == 0 { row[0] } else { row[m] - row[m - 1] };
        (d.max(0.0) + eps) as f64
    };
    let a = |m: usize| w(m).ln() + lc[m] as f64;
    let z: f64 = (0..row.len()).map(w).sum();
    let amax = (0..row.len()).map(a).fold(f64::NEG_INFINITY, f64::max);
    let s: f64 = (0..row.len()).map(|m| (a(m) - amax).exp()).sum();
    (s.ln() + amax, z)
}

/// The CPU reference: `f` [rows * bins], `lc` = lambda c [bins] -> V [rows], in f64.
pub fn value_lse_cpu(f: &[f32], lc: &[f32], eps: f32) -> Vec<f32> {
    f.chunks(lc.len().max(1))
        .map(|row| {
            let (lse, z) = row_sums(row, lc, eps);
            (lse - z.ln()) as f32
        })
        .collect()
}

/// dV/dF of every row times g: q_m = (exp(lc_m - lse) - 1/Z) [d_m >= 0] (candle's relu'(0) = 1),
/// grad_m = g (q_m - q_{m+1}). `lcg` = lc [bins] then g [rows].
fn grad_cpu(f: &[f32], lcg: &[f32], bins: usize, eps: f32) -> Vec<f32> {
    let (lc, g) = lcg.split_at(bins);
    let mut out = Vec::with_capacity(f.len());
    for (row, &gi) in f.chunks(bins).zip(g) {
        let (lse, z) = row_sums(row, lc, eps);
        let q = |m: usize| -> f64 {
            if m >= bins {
                return 0.0;
            }
            let d = if m == 0 { row[0] } else { row[m] - row[m - 1] };
            if d >= 0.0 {
                (lc[m] as f64 - lse).exp() - 1.0 / z
            } else {
                0.0
            }
        };
        out.extend((0..bins).map(|m| (gi as f64 * (q(m) - q(m + 1))) as f32));
    }
    out
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("value_lse: expected a contiguous f32 tensor"),
    }
}

/// (f [rows, bins], lc [bins]) -> V [rows].
struct ValueLse {
    eps: f32,
}

impl CustomOp2 for ValueLse {
    fn name(&self) -> &'static str {
        "value-lse"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let v = value_lse_cpu(slice(s1, l1)?, slice(s2, l2)?, self.eps);
        let rows = v.len();
        Ok((CpuStorage::F32(v), Shape::from(rows)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use super::launch;
        let (rows, bins) = l1.shape().dims2()?;
        let dev = launch::device(s1);
        let out = launch::value_fwd(
            dev,
            &launch::view(s1, l1, self.name())?,
            &launch::view(s2, l2, self.name())?,
            (rows, bins),
            self.eps,
        )?;
        Ok((launch::wrap(out, dev), Shape::from(rows)))
    }

    fn bwd(
        &self,
        f: &Tensor,
        lc: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // lc is built from the grid inside `value_lse`: a constant, never a variable.
        let lcg = Tensor::cat(&[lc, &grad.contiguous()?], 0)?;
        let gf = f.apply_op2_no_bwd(&lcg, &ValueLseGrad { eps: self.eps })?;
        Ok((Some(gf), None))
    }
}

/// (f [rows, bins], lc then g [bins + rows]) -> dV/dF * g [rows, bins].
struct ValueLseGrad {
    eps: f32,
}

impl CustomOp2 for ValueLseGrad {
    fn name(&self) -> &'static str {
        "value-lse-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, bins) = l1.shape().dims2()?;
        let g = grad_cpu(slice(s1, l1)?, slice(s2, l2)?, bins, self.eps);
        Ok((CpuStorage::F32(g), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use super::launch;
        let (rows, bins) = l1.shape().dims2()?;
        let dev = launch::device(s1);
        let g = launch::value_bwd(
            dev,
            &launch::view(s1, l1, self.name())?,
            &launch::view(s2, l2, self.name())?,
            (rows, bins),
            self.eps,
        )?;
        Ok((launch::wrap(g, dev), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::critic::value_from_cdf;
    use crate::rng::{randn, rng_for};
    use candle_core::{Device, Var};

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a.len(), b.len());
        // The largest error over the largest reference magnitude (at least 1).
        let scale = b.iter().fold(1f32, |m, y| m.max(y.abs()));
        a.iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs() / scale)
            .fold(0.0, f32::max)
    }

    /// Random increasing-ish CDF rows in (0, 1): a sigmoid of sorted normals plus noise that
    /// sometimes makes F decrease (so the relu of the bin masses is exercised).
    fn cdf_rows(seed: u64, b: usize, m: usize) -> Tensor {
        let mut rng = rng_for(seed, 0, 0);
        let x = randn(&mut rng, (b, m), &Device::Cpu).unwrap();
        let steps = (x.abs().unwrap() * 0.3).unwrap();
        let cum = steps.cumsum(1).unwrap();
        let noise = (randn(&mut rng, (b, m), &Device::Cpu).unwrap() * 0.05).unwrap();
        candle_nn::ops::sigmoid(&((cum + noise).unwrap() - 2.0).unwrap()).unwrap()
    }

    #[test]
    fn two_bins_by_hand() {
        // F = (0.25, 1), c = (0, 1), lambda = ln 3, eps = 0: pi = (0.25, 0.75),
        // V = ln(0.25 + 0.75 * 3) = ln 2.5.
        let grid = CdfGrid::new(vec![0.0, 1.0]).unwrap();
        let f = Tensor::new(&[[0.25f32, 1.0]], &Device::Cpu).unwrap();
        let v = value_lse(&f, &grid, 3f64.ln(), 0.0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!((v[0] - 2.5f32.ln()).abs() < 1e-6, "{v:?}");
    }

    #[test]
    fn matches_value_from_cdf_values_and_gradients() {
        // lambda from small to +-100 (where exp(lambda c) alone overflows f32), eps as in
        // training (1e-6) and larger, 1 to 64 bins.
        let cases = [
            (1.0, 1e-6, 50, 64),
            (100.0, 1e-6, 33, 17),
            (-100.0, 1e-3, 8, 64),
        ];
        for (i, &(lambda, eps, b, m)) in cases.iter().enumerate() {
            let grid =
                CdfGrid::new((0..m).map(|k| -1.0 + 2.0 * k as f64 / m as f64).collect()).unwrap();
            let f = Var::from_tensor(&cdf_rows(i as u64, b, m)).unwrap();
            let fused = value_lse(&f, &grid, lambda, eps).unwrap();
            let plain = value_from_cdf(&f, &grid, lambda, eps).unwrap();
            assert!(max_rel(&fused, &plain) < 2e-5, "values, case {i}");
            let w = randn(&mut rng_for(9, 0, i as u64), b, &Device::Cpu).unwrap();
            let gf = (&fused * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gp = (&plain * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let (gf, gp) = (
                gf.get(f.as_tensor()).unwrap(),
                gp.get(f.as_tensor()).unwrap(),
            );
            assert!(max_rel(gf, gp) < 2e-5, "gradients, case {i}");
        }
        // One bin: V = lambda c_1 whatever F.
        let grid = CdfGrid::new(vec![0.5]).unwrap();
        let f = Tensor::new(&[[0.3f32], [0.9]], &Device::Cpu).unwrap();
        let v = value_lse(&f, &grid, 2.0, 1e-6)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(v.iter().all(|x| (x - 1.0).abs() < 1e-6), "{v:?}");
    }

    #[test]
    fn the_candle_oracle_is_value_from_cdf() {
        let grid = CdfGrid::new((0..40).map(|k| k as f64 / 40.0).collect()).unwrap();
        let f = cdf_rows(3, 20, 40);
        for (lambda, eps) in [(3.0, 1e-6), (-70.0, 0.0)] {
            let a = value_lse_plain(&f, &grid, lambda, eps).unwrap();
            let b = value_from_cdf(&f, &grid, lambda, eps).unwrap();
            assert_eq!(a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
        }
    }

    #[test]
    fn empty_bins_drop_out_with_eps_zero() {
        // F = (0, 0, 1): only the last bin has mass, V = lambda c_3 exactly (a_1 = a_2 = -inf).
        let grid = CdfGrid::new(vec![0.0, 1.0, 2.0]).unwrap();
        let f = Tensor::new(&[[0.0f32, 0.0, 1.0]], &Device::Cpu).unwrap();
        let v = value_lse(&f, &grid, 50.0, 0.0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(v, vec![100.0]);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let grid = CdfGrid::new(vec![0.0, 1.0]).unwrap();
        let f = Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(value_lse(&f, &grid, f64::NAN, 0.0).is_err());
        assert!(value_lse(&f, &grid, 1.0, -1.0).is_err());
        let f3 = Tensor::zeros((3, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(value_lse(&f3, &grid, 1.0, 0.0).is_err());
    }
}
