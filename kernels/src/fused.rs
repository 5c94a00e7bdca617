//! Fused elementwise ops with a hand-written forward and backward (candle `CustomOp`s), for the
//! hot paths of the learner on the CPU. Each one computes exactly the function of its plain candle
//! counterpart and is tested against it (values and gradients).
//!
//! - `silu`: candle's own SiLU backward builds its derivative from ~8 separate tensor passes (neg,
//!   exp, +1, recip, 1 - y, mul, add, mul), each allocating a tensor the size of the activation;
//!   the fused backward is one pass.
//! - `linear` (x W^T + b): candle's `broadcast_add` of the bias takes its gradient with a
//!   reduction over rows that walks the [rows, features] gradient column by column; it was 16% of
//!   a VRPO learner step (perf, quickstart shape). The fused bias add sums rows in memory order.
//!
//! On other devices or dtypes each op defers to the plain candle ops (the same function).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use crate::Result;

/// SiLU x * sigmoid(x), with a one-pass backward on contiguous f32 CPU tensors.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        // `contiguous` is free for a contiguous tensor and keeps the gradient path otherwise.
        Ok(x.contiguous()?.apply_op1(FusedSilu {
            sigmoid: std::sync::OnceLock::new(),
        })?)
    } else {
        Ok(candle_nn::ops::silu(x)?)
    }
}

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => Err(candle_core::Error::Msg(
            "fused op: expected a contiguous tensor".into(),
        )),
    }
}

/// e^x in f32 without a libm call, so loops over it vectorise: x = n ln 2 + r with |r| <= ln2 / 2,
/// e^r by its degree-7 Taylor polynomial (truncation < 6e-9 relative), 2^n from the exponent
/// bits. Inputs are clamped to [-87, 88] (the normal range of f32). Relative error against
/// `f32::exp` below 4e-7 (tested).
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in a part exact in f32 and the rest (Cody-Waite), so n ln 2 subtracts exactly.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer (|v| < 2^22) in pure
    // arithmetic (no call to `round`, which the baseline x86-64 target cannot inline).
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + MAGIC) - MAGIC;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-x))
}

/// SiLU whose forward keeps sigmoid(x) for its backward (no second pass of exponentials).
struct FusedSilu {
    sigmoid: std::sync::OnceLock<Vec<f32>>,
}

impl CustomOp1 for FusedSilu {
    fn name(&self) -> &'static str {
        "fused-silu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l)?;
        let sig: Vec<f32> = x.iter().map(|&v| sigmoid(v)).collect();
        let y: Vec<f32> = x.iter().zip(&sig).map(|(&v, &sv)| v * sv).collect();
        // A second forward of the same op instance (not done by candle) would keep the first.
        let _ = self.sigmoid.set(sig);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = grad.contiguous()?;
        let sig = match self.sigmoid.get() {
            Some(s) => Tensor::from_slice(s, arg.shape(), arg.device())?,
            None => candle_nn::ops::sigmoid(arg)?,
        };
        Ok(Some(arg.apply_op3_no_bwd(&sig, &g, &SiluGrad)?))
    }
}

/// d/dx silu(x) * g = g * s (1 + x (1 - s)), s = sigmoid(x) given, in one pass.
struct SiluGrad;

impl CustomOp3 for SiluGrad {
    fn name(&self) -> &'static str {
        "fused-silu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1)?;
        let sig = contiguous_f32(s2, l2)?;
        let g = contiguous_f32(s3, l3)?;
        let out: Vec<f32> = x
            .iter()
            .zip(sig)
            .zip(g)
            .map(|((&v, &s), &gv)| gv * s * (1.0 + v * (1.0 - s)))
            .collect();
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// x W^T + b for x [rows, in], W [out, in], b [out] (a `candle_nn::Linear` with a bias), with
/// the bias added by one fused op whose gradient sums rows in memory order.
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    add_bias(&x.matmul(&w.t()?)?, b)
}

/// x [rows, h] + b [h] through the fused bias add (plain `broadcast_add` off the CPU).
pub fn add_bias(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 && x.rank() == 2 {
        Ok(x.contiguous()?.apply_op2(&b.contiguous()?, AddBias)?)
    } else {
        Ok(x.broadcast_add(b)?)
    }
}

/// A `candle_nn::Linear` through [`linear`] (the same function; without a bias, its own forward).
pub fn linear_layer(l: &candle_nn::Linear, x: &Tensor) -> Result<Tensor> {
    use candle_core::Module;
    match l.bias() {
        Some(b) => linear(x, l.weight(), b),
        None => Ok(l.forward(x)?),
    }
}

/// y [rows, h] = x [rows, h] + b [h].
struct AddBias;

impl CustomOp2 for AddBias {
    fn name(&self) -> &'static str {
        "fused-add-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1)?;
        let b = contiguous_f32(s2, l2)?;
        let h = b.len();
        if h == 0 || x.len() % h != 0 || l1.dims().last() != Some(&h) {
            return Err(candle_core::Error::Msg(format!(
                "fused add-bias: x {:?} and bias {:?} do not match",
                l1.dims(),
                l2.dims()
            )));
        }
        let mut y = x.to_vec();
        for row in y.chunks_exact_mut(h) {
            for (v, bv) in row.iter_mut().zip(b) {
                *v += bv;
            }
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let gb = g.apply_op1_no_bwd(&RowSum)?.reshape(b.shape())?;
        Ok((Some(g), Some(gb)))
    }
}

/// [rows, h] -> [h]: the sum over rows, accumulated row by row (memory order).
struct RowSum;

impl CustomOp1 for RowSum {
    fn name(&self) -> &'static str {
        "fused-row-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l)?;
        let h = l.dims().last().copied().unwrap_or(1).max(1);
        let mut acc = vec![0f32; h];
        for row in x.chunks_exact(h) {
            for (a, v) in acc.iter_mut().zip(row) {
                *a += v;
            }
        }
        Ok((CpuStorage::F32(acc), Shape::from(h)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{randn, rng_for};
    use candle_core::{Device, Var};

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn fused_silu_matches_candle_in_value_and_gradient() {
        // Against candle_nn::ops::silu on the same inputs, including large |x| (sigmoid saturates).
        let d = Device::Cpu;
        let x0 = (randn(&mut rng_for(1, 0, 0), (64, 33), &d).unwrap() * 6.0).unwrap();
        let w = randn(&mut rng_for(1, 1, 0), (64, 33), &d).unwrap();
        let xa = Var::from_tensor(&x0).unwrap();
        let xb = Var::from_tensor(&x0).unwrap();
        let ya = silu(xa.as_tensor()).unwrap();
        let yb = candle_nn::ops::silu(xb.as_tensor()).unwrap();
        assert!(max_abs_diff(&ya, &yb) < 1e-6);
        let ga = (ya * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (yb * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let (ga, gb) = (
            ga.get(xa.as_tensor()).unwrap(),
            gb.get(xb.as_tensor()).unwrap(),
        );
        assert!(max_abs_diff(ga, gb) < 1e-5, "{}", max_abs_diff(ga, gb));
    }

    #[test]
    fn fused_silu_hand_values_and_non_contiguous_input() {
        // silu(0) = 0, silu(1) = 1 / (1 + e^-1) = 0.7310586, silu'(0) = 0.5.
        let d = Device::Cpu;
        let x = Var::new(&[0f32, 1.0], &d).unwrap();
        let y = silu(x.as_tensor()).unwrap();
        let v = y.to_vec1::<f32>().unwrap();
        assert!(
            v[0].abs() < 1e-7 && (v[1] - 0.731_058_6).abs() < 1e-6,
            "{v:?}"
        );
        let g = y.sum_all().unwrap().backward().unwrap();
        let gv = g.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        // silu'(1) = s (1 + 1 - s) with s = 0.7310586: 0.9276705.
        assert!(
            (gv[0] - 0.5).abs() < 1e-6 && (gv[1] - 0.927_670_5).abs() < 1e-6,
            "{gv:?}"
        );
        // A transposed (non-contiguous) input is handled like a contiguous one.
        let m = randn(&mut rng_for(2, 0, 0), (5, 7), &d).unwrap();
        let t = m.t().unwrap();
        assert!(max_abs_diff(&silu(&t).unwrap(), &candle_nn::ops::silu(&t).unwrap()) < 1e-6);
    }

    #[test]
    fn fused_linear_matches_candle_linear_in_value_and_gradients() {
        // Against candle_nn::Linear (matmul + broadcast_add) on the same weights and inputs.
        use candle_core::Module;
        let d = Device::Cpu;
        let x0 = randn(&mut rng_for(3, 0, 0), (300, 17), &d).unwrap();
        let w0 = randn(&mut rng_for(3, 1, 0), (9, 17), &d).unwrap();
        let b0 = randn(&mut rng_for(3, 2, 0), 9, &d).unwrap();
        let up = randn(&mut rng_for(3, 3, 0), (300, 9), &d).unwrap();
        let grads = |fused: bool| {
            let (x, w, b) = (
                Var::from_tensor(&x0).unwrap(),
                Var::from_tensor(&w0).unwrap(),
                Var::from_tensor(&b0).unwrap(),
            );
            let y = if fused {
                linear(x.as_tensor(), w.as_tensor(), b.as_tensor()).unwrap()
            } else {
                candle_nn::Linear::new(w.as_tensor().clone(), Some(b.as_tensor().clone()))
                    .forward(x.as_tensor())
                    .unwrap()
            };
            let g = (&y * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let get = |v: &Var| g.get(v.as_tensor()).unwrap().clone();
            (y, get(&x), get(&w), get(&b))
        };
        let (a, b) = (grads(true), grads(false));
        assert!(max_abs_diff(&a.0, &b.0) < 1e-5);
        assert!(max_abs_diff(&a.1, &b.1) < 1e-5);
        assert!(max_abs_diff(&a.2, &b.2) < 1e-4);
        // The bias gradient is the column sum of the upstream gradient (hand identity).
        assert!(max_abs_diff(&a.3, &up.sum(0).unwrap()) < 1e-4);
        assert!(max_abs_diff(&a.3, &b.3) < 1e-4);
    }

    #[test]
    fn exp_f32_is_within_4e_7_of_libm() {
        // Every 1/64 on [-87, 88], plus the clamps' edges and exact points.
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let (a, b) = (exp_f32(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
            x += 1.0 / 64.0;
        }
        assert!(worst < 4e-7, "max relative error {worst}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert!((exp_f32(1.0) - std::f32::consts::E).abs() < 4e-7 * std::f32::consts::E);
        // Clamped: no inf, no zero from the clamp range's ends.
        assert!(exp_f32(1000.0).is_finite() && exp_f32(-1000.0) > 0.0);
    }
}
