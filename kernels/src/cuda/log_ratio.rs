//! The segment path log-ratio of a residual policy, fused (forward and backward in one pass each):
//! for L steps of b rows, out[i] = sum_j sum_d z u - u^2 / 2 with u = scale_r v (r = j b + i),
//! i.e. sum over steps and dimensions of z . dmu / sigma - |dmu|^2 / (2 sigma^2) when v is the
//! residual's output and scale_r = c_eps / sigma of the row's step
//! (`logprob::path_log_ratio_residual_rows` computes the same with plain candle ops).
//! CUDA kernel: cuda/log_ratio.cu; CPU reference: [`segment_log_ratio_cpu`].

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};

use crate::{KernelError, Result};

/// out [b] = sum over the `len` steps and the dimensions of z u - u^2 / 2, u = scale_r v.
/// `v`, `z`: [len * b, ...] (rows j * b + i are step j of output row i, as `Tensor::cat` of the
/// per-step tensors stacks them); `scale`: [len * b] (any shape of that many elements).
/// Differentiable in all three (the fused backward computes the gradient in v; those in z and
/// scale, constants in a learner step, go through plain candle ops when they are tracked).
/// f32 on the device of `v` (other dtypes are converted).
pub fn segment_log_ratio(v: &Tensor, z: &Tensor, scale: &Tensor, len: usize) -> Result<Tensor> {
    let rows = v.dim(0)?;
    if v.dims() != z.dims() {
        return Err(KernelError::shape(
            "segment_log_ratio",
            format!("v {:?} vs z {:?}", v.dims(), z.dims()),
        ));
    }
    if len == 0 || rows % len != 0 || scale.elem_count() != rows {
        return Err(KernelError::shape(
            "segment_log_ratio",
            format!(
                "{rows} rows, {} scales, {len} steps: need len >= 1 dividing the rows and one \
                 scale per row",
                scale.elem_count()
            ),
        ));
    }
    let f32c = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?.contiguous()?) };
    let v = f32c(&v.reshape((rows, ()))?)?;
    let z = f32c(&z.reshape((rows, ()))?)?;
    let scale = f32c(&scale.reshape(rows)?)?;
    Ok(v.apply_op3(&z, &scale, SegmentLogRatio { len })?)
}

/// The CPU reference: `v`, `z` [len * b * d], `scale` [len * b] -> [b], sums in f64.
pub fn segment_log_ratio_cpu(v: &[f32], z: &[f32], scale: &[f32], len: usize) -> Vec<f32> {
    let rows = scale.len();
    let (b, d) = (rows / len.max(1), v.len() / rows.max(1));
    let mut out = vec![0f64; b];
    for r in 0..rows {
        let s = scale[r] as f64;
        let acc: f64 = (0..d)
            .map(|k| {
                let u = s * v[r * d + k] as f64;
                z[r * d + k] as f64 * u - 0.5 * u * u
            })
            .sum();
        out[r % b] += acc;
    }
    out.into_iter().map(|x| x as f32).collect()
}

/// grad_v = g_i scale_r (z - scale_r v) on the CPU; `sg` = scale [len * b] then g [b].
fn grad_cpu(v: &[f32], z: &[f32], sg: &[f32], rows: usize, len: usize) -> Vec<f32> {
    let (b, d) = (rows / len, v.len() / rows.max(1));
    let (scale, g) = sg.split_at(rows);
    v.iter()
        .zip(z)
        .enumerate()
        .map(|(e, (&v, &z))| {
            let r = e / d;
            let s = scale[r];
            g[r % b] * s * (z - s * v)
        })
        .collect()
}

/// The same function with plain candle ops, as `logprob::path_log_ratio_residual_rows` computes
/// it (the oracle of the tests and of `compare_on`).
pub(crate) fn segment_log_ratio_plain(
    v: &Tensor,
    z: &Tensor,
    scale: &Tensor,
    len: usize,
) -> Result<Tensor> {
    let rows = v.dim(0)?;
    let u = v
        .flatten_from(1)?
        .broadcast_mul(&scale.reshape((rows, 1))?)?;
    let z = z.flatten_from(1)?;
    let per_row = ((&z * &u)?.sum(1)? - (u.sqr()?.sum(1)? * 0.5)?)?;
    Ok(per_row.reshape((len, rows / len))?.sum(0)?)
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("segment_log_ratio: expected a contiguous f32 tensor"),
    }
}

/// (v [rows, d], z [rows, d], scale [rows]) -> [rows / len].
struct SegmentLogRatio {
    len: usize,
}

impl CustomOp3 for SegmentLogRatio {
    fn name(&self) -> &'static str {
        "segment-log-ratio"
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
        let out = segment_log_ratio_cpu(slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?, self.len);
        let b = out.len();
        Ok((CpuStorage::F32(out), Shape::from(b)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use super::launch;
        let (rows, d) = l1.shape().dims2()?;
        let b = rows / self.len;
        let dev = launch::device(s1);
        let out = launch::log_ratio_fwd(
            dev,
            &launch::view(s1, l1, self.name())?,
            &launch::view(s2, l2, self.name())?,
            &launch::view(s3, l3, self.name())?,
            (b, self.len, d),
        )?;
        Ok((launch::wrap(out, dev), Shape::from(b)))
    }

    fn bwd(
        &self,
        v: &Tensor,
        z: &Tensor,
        scale: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?; // [b]
        let sg = Tensor::cat(&[scale, &g], 0)?;
        let grad_v = v.apply_op3_no_bwd(z, &sg, &SegmentLogRatioGrad { len: self.len })?;
        // d/dz = g u, d/dscale_r = g sum_d v (z - u): only for tracked inputs (never in a step).
        let g_rows = || -> candle_core::Result<Tensor> {
            Tensor::cat(&vec![g.clone(); self.len], 0)?.unsqueeze(1) // [rows, 1]
        };
        let u = || v.broadcast_mul(&scale.unsqueeze(1)?);
        let grad_z = if z.track_op() {
            Some(u()?.broadcast_mul(&g_rows()?)?)
        } else {
            None
        };
        let grad_scale = if scale.track_op() {
            let per_row = (v * (z - u()?)?)?.sum_keepdim(1)?;
            Some(per_row.mul(&g_rows()?)?.squeeze(1)?)
        } else {
            None
        };
        Ok((Some(grad_v), grad_z, grad_scale))
    }
}

/// (v [rows, d], z [rows, d], scale then g [rows + b]) -> grad_v [rows, d].
struct SegmentLogRatioGrad {
    len: usize,
}

impl CustomOp3 for SegmentLogRatioGrad {
    fn name(&self) -> &'static str {
        "segment-log-ratio-grad"
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
        let (rows, _) = l1.shape().dims2()?;
        let g = grad_cpu(
            slice(s1, l1)?,
            slice(s2, l2)?,
            slice(s3, l3)?,
            rows,
            self.len,
        );
        Ok((CpuStorage::F32(g), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use super::launch;
        let (rows, d) = l1.shape().dims2()?;
        let dev = launch::device(s1);
        let grad = launch::log_ratio_bwd(
            dev,
            &launch::view(s1, l1, self.name())?,
            &launch::view(s2, l2, self.name())?,
            &launch::view(s3, l3, self.name())?,
            (rows / self.len, self.len, d),
        )?;
        Ok((launch::wrap(grad, dev), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{randn, rng_for};
    use candle_core::{Device, Var};

    fn plain(v: &Tensor, z: &Tensor, scale: &Tensor, len: usize) -> Tensor {
        segment_log_ratio_plain(v, z, scale, len).unwrap()
    }

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

    #[test]
    fn one_step_one_dim_by_hand() {
        // z u - u^2 / 2 with u = 2 * 1.5 = 3, z = 0.5: 1.5 - 4.5 = -3; d/dv = s (z - s v) = 2 *
        // (0.5 - 3) = -5.
        let v = Var::from_slice(&[1.5f32], (1, 1), &Device::Cpu).unwrap();
        let z = Tensor::new(&[[0.5f32]], &Device::Cpu).unwrap();
        let s = Tensor::new(&[2.0f32], &Device::Cpu).unwrap();
        let out = segment_log_ratio(v.as_tensor(), &z, &s, 1).unwrap();
        assert_eq!(out.to_vec1::<f32>().unwrap(), vec![-3.0]);
        let g = out.sum_all().unwrap().backward().unwrap();
        let gv = g.get(v.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(gv, vec![vec![-5.0]]);
    }

    #[test]
    fn matches_plain_candle_values_and_gradients() {
        // Shapes: the quickstart's (D = 2, L = 10), the 8x8 digits' (D = 64, 1 channel), L = 1,
        // and an odd batch.
        for (i, &(b, len, dims)) in [(256, 10, &[2][..]), (7, 3, &[1, 8, 8]), (5, 1, &[3])]
            .iter()
            .enumerate()
        {
            let mut rng = rng_for(7, 0, i as u64);
            let mut shape = vec![len * b];
            shape.extend_from_slice(dims);
            let dev = Device::Cpu;
            let v = Var::from_tensor(&randn(&mut rng, shape.clone(), &dev).unwrap()).unwrap();
            let z = randn(&mut rng, shape.clone(), &dev).unwrap();
            let scale = (randn(&mut rng, len * b, &dev).unwrap().abs().unwrap() + 0.1).unwrap();
            // Weights on the outputs so the gradient differs per row.
            let w = randn(&mut rng, b, &dev).unwrap();
            let fused = segment_log_ratio(v.as_tensor(), &z, &scale, len).unwrap();
            let reference = plain(v.as_tensor(), &z, &scale, len);
            assert!(max_rel(&fused, &reference) < 1e-5, "values, case {i}");
            let gf = (&fused * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gr = (&reference * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let (gf, gr) = (
                gf.get(v.as_tensor()).unwrap(),
                gr.get(v.as_tensor()).unwrap(),
            );
            assert_eq!(gf.dims(), v.dims());
            assert!(max_rel(gf, gr) < 1e-5, "gradients, case {i}");
        }
    }

    #[test]
    fn tracked_noise_and_scale_get_their_gradients() {
        // The rarely used branches of bwd: z and scale as variables, against plain candle.
        let dev = Device::Cpu;
        let mut rng = rng_for(7, 1, 0);
        let (b, len) = (4, 2);
        let v = Var::from_tensor(&randn(&mut rng, (len * b, 3), &dev).unwrap()).unwrap();
        let z = Var::from_tensor(&randn(&mut rng, (len * b, 3), &dev).unwrap()).unwrap();
        let s =
            Var::from_tensor(&(randn(&mut rng, len * b, &dev).unwrap() * 0.5).unwrap()).unwrap();
        let w = randn(&mut rng, b, &dev).unwrap();
        let loss = |t: Tensor| (t * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gf = loss(segment_log_ratio(&v, &z, &s, len).unwrap());
        let gr = loss(plain(&v, &z, &s, len));
        for t in [v.as_tensor(), z.as_tensor(), s.as_tensor()] {
            assert!(max_rel(gf.get(t).unwrap(), gr.get(t).unwrap()) < 1e-5);
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let dev = Device::Cpu;
        let v = Tensor::zeros((6, 2), DType::F32, &dev).unwrap();
        let z3 = Tensor::zeros((6, 3), DType::F32, &dev).unwrap();
        let s = Tensor::zeros(6, DType::F32, &dev).unwrap();
        assert!(segment_log_ratio(&v, &z3, &s, 2).is_err());
        assert!(segment_log_ratio(&v, &v, &s, 4).is_err()); // 4 does not divide 6
        assert!(segment_log_ratio(&v, &v, &s, 0).is_err());
        assert!(segment_log_ratio(&v, &v, &s.narrow(0, 0, 5).unwrap(), 2).is_err());
    }
}
