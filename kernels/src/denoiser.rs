//! The `Denoiser` seam (eps prediction), the time and class embeddings the networks share, the
//! residual policy (reference + zero-initialised residual) and safetensors save/load of weights.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarMap;

use crate::{KernelError, Result};

/// Predicts the noise eps in x_n = sqrt(abar_n) x_0 + sqrt(1 - abar_n) eps.
pub trait Denoiser: Send + Sync {
    /// `x`: [batch, ...sample dims]; `n`: [batch] f32 training-grid indices (0..=N);
    /// `cond`: optional [batch] u32 class labels. Returns eps with the shape of `x`.
    fn eps(&self, x: &Tensor, n: &Tensor, cond: Option<&Tensor>) -> Result<Tensor>;

    /// The concrete network behind the seam, for the one caller with a faster path for one kind
    /// (`fused_vrpo::fused_residual` takes an `MlpDenoiser`). None unless a network opts in.
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }
}

impl<T: Denoiser + ?Sized> Denoiser for Arc<T> {
    fn eps(&self, x: &Tensor, n: &Tensor, cond: Option<&Tensor>) -> Result<Tensor> {
        (**self).eps(x, n, cond)
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        (**self).as_any()
    }
}

/// A [batch] f32 tensor holding the same training index `n` for every row.
pub fn timesteps(n: usize, batch: usize, device: &Device) -> Result<Tensor> {
    Ok(Tensor::full(n as f32, batch, device)?)
}

/// Sinusoidal embedding of training indices: [batch] -> [batch, dim] (dim even),
/// [sin(n f_i), cos(n f_i)] with f_i = 10000^(-i / (dim/2)) (Vaswani et al.; DDPM).
pub fn time_embedding(n: &Tensor, dim: usize) -> Result<Tensor> {
    if dim % 2 != 0 || dim == 0 {
        return Err(KernelError::param(
            "time_embedding.dim",
            dim,
            "must be even and positive",
        ));
    }
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (-(10000f64.ln()) * i as f64 / half as f64).exp() as f32)
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), n.device())?;
    let args = n
        .to_dtype(DType::F32)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs)?;
    Ok(Tensor::cat(&[args.sin()?, args.cos()?], D::Minus1)?)
}

/// policy = reference (frozen) + residual. With the residual's last layer initialised to zero the
/// policy equals the reference bit for bit at step 0 (x + 0.0 == x in IEEE arithmetic).
pub struct ResidualPolicy {
    pub reference: Arc<dyn Denoiser>,
    pub residual: Arc<dyn Denoiser>,
}

impl ResidualPolicy {
    /// The residual's output alone: eps_theta - eps_ref.
    pub fn residual_eps(&self, x: &Tensor, n: &Tensor, cond: Option<&Tensor>) -> Result<Tensor> {
        self.residual.eps(x, n, cond)
    }
}

impl Denoiser for ResidualPolicy {
    fn eps(&self, x: &Tensor, n: &Tensor, cond: Option<&Tensor>) -> Result<Tensor> {
        let r = self.reference.eps(x, n, cond)?.detach();
        Ok((r + self.residual.eps(x, n, cond)?)?)
    }
}

/// Write every variable of `varmap` to a safetensors file, atomically (temp file, then rename), so
/// a crash never leaves a truncated file under the final name.
pub fn save_weights(varmap: &VarMap, path: &Path) -> Result<()> {
    let tmp = path.with_extension("safetensors.tmp");
    varmap.save(&tmp).map_err(|e| KernelError::Checkpoint {
        path: tmp.display().to_string(),
        detail: e.to_string(),
    })?;
    std::fs::rename(&tmp, path).map_err(|e| KernelError::Checkpoint {
        path: path.display().to_string(),
        detail: e.to_string(),
    })
}

/// Load a safetensors file into the variables of `varmap`: every variable must be present with
/// its exact shape, otherwise the error names the file and what is wrong.
pub fn load_weights(varmap: &mut VarMap, path: &Path) -> Result<()> {
    let err = |detail: String| KernelError::Checkpoint {
        path: path.display().to_string(),
        detail,
    };
    let tensors =
        candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| err(e.to_string()))?;
    let data = varmap
        .data()
        .lock()
        .map_err(|_| err("variable map lock poisoned".into()))?;
    for (name, var) in data.iter() {
        let t = tensors
            .get(name)
            .ok_or_else(|| err(format!("missing tensor {name}")))?;
        if t.shape() != var.shape() {
            return Err(err(format!(
                "tensor {name} has shape {:?}, the model expects {:?}",
                t.shape().dims(),
                var.shape().dims()
            )));
        }
        if t.dtype() != var.dtype() {
            return Err(err(format!(
                "tensor {name} is {:?}, the model expects {:?}",
                t.dtype(),
                var.dtype()
            )));
        }
        var.set(&t.to_device(var.device())?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_embedding_hand_values() {
        // n = 0 gives sin = 0, cos = 1; n = 1 with dim 4: f = [1, 0.01] -> [sin 1, sin .01, cos 1, cos .01].
        let n = Tensor::new(&[0f32, 1.0], &Device::Cpu).unwrap();
        let e = time_embedding(&n, 4).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(e[0], vec![0.0, 0.0, 1.0, 1.0]);
        let want = [1f32.sin(), 0.01f32.sin(), 1f32.cos(), 0.01f32.cos()];
        for (a, b) in e[1].iter().zip(want) {
            assert!((a - b).abs() < 1e-6);
        }
    }
}
