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

#[cfg(test)]
thread_local! {
    /// Set by [`with_cuda_forms`]: this thread's models take the CUDA formulations on the CPU.
    static FORCE_CUDA_FORMS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether a model on `device` takes the formulations written for CUDA (convs as candle's
/// `conv2d`, class embeddings as one-hot matmuls) instead of the CPU's (gathers): on CUDA
/// devices, and in tests that compare the two on the CPU ([`both_forms`]).
pub(crate) fn cuda_forms(device: &Device) -> bool {
    #[cfg(test)]
    if FORCE_CUDA_FORMS.with(|c| c.get()) {
        return true;
    }
    device.is_cuda()
}

/// Run `f` with this thread's models taking the CUDA formulations (tests).
#[cfg(test)]
pub(crate) fn with_cuda_forms<T>(f: impl FnOnce() -> T) -> T {
    FORCE_CUDA_FORMS.with(|c| c.set(true));
    let out = f();
    FORCE_CUDA_FORMS.with(|c| c.set(false));
    out
}

/// `f` with the CPU's formulations, then with CUDA's, both on the CPU (tests).
#[cfg(test)]
pub(crate) fn both_forms<T>(f: impl Fn() -> T) -> [T; 2] {
    [f(), with_cuda_forms(&f)]
}

/// The rows of a class-embedding table for labels `c` ([rows], u32), by device:
/// - CPU: candle's `index_select` (an out-of-range label is its error);
/// - CUDA: a one-hot matmul. candle's CUDA backward of `index_select` (`index_add`) runs one
///   thread per embedding column, each looping over every row of the batch; the one-hot's
///   backward is a matmul. The labels are checked on the host first (one read-back), so an
///   out-of-range label is an error there too, never a silent zero row.
pub fn class_embedding(emb: &candle_nn::Embedding, c: &Tensor) -> Result<Tensor> {
    use candle_core::Module;
    if !cuda_forms(c.device()) {
        return Ok(emb.forward(c)?);
    }
    let table = emb.embeddings(); // [classes, dim]
    let classes = table.dim(0)?;
    let rows = c.dim(0)?;
    if rows > 0 {
        let max = c.max(0)?.to_scalar::<u32>()? as usize;
        if max >= classes {
            return Err(KernelError::param(
                "cond",
                max,
                format!("a class label must be < classes = {classes}"),
            ));
        }
    }
    let ids = Tensor::arange(0u32, classes as u32, c.device())?;
    let one_hot = c
        .unsqueeze(1)?
        .broadcast_eq(&ids.unsqueeze(0)?)?
        .to_dtype(table.dtype())?; // [rows, classes]
    Ok(one_hot.matmul(table)?)
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

/// What a network's output means: the noise eps (DDPM), or the velocity
/// v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho, 2022, "Progressive distillation").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Prediction {
    #[default]
    Eps,
    V,
}

/// A network that predicts v, seen through the `Denoiser` seam as an eps predictor:
/// eps = sqrt(1 - abar_n) x_n + sqrt(abar_n) v. Everything downstream (samplers, losses, the
/// residual policy) stays in eps. Why: at high noise an eps error d becomes an x_0 error
/// d sqrt(1 - abar) / sqrt(abar) (~150x at n = 1000 of the DDPM schedule), and the layout of a
/// clip (where the object is in every frame) is decided there; a v error is an x_0 error of the
/// same size at every n. The wrapper holds no weights.
pub struct VPrediction {
    net: Arc<dyn Denoiser>,
    /// sqrt(abar_n) and sqrt(1 - abar_n), n = 0..=N, on the network's device.
    sqrt_ab: Tensor,
    sqrt_1m: Tensor,
}

impl VPrediction {
    pub fn new(net: Arc<dyn Denoiser>, abar: &[f64], device: &Device) -> Result<Self> {
        let a: Vec<f32> = abar.iter().map(|&a| a.sqrt() as f32).collect();
        let s: Vec<f32> = abar
            .iter()
            .map(|&a| (1.0 - a).max(0.0).sqrt() as f32)
            .collect();
        Ok(Self {
            net,
            sqrt_ab: Tensor::from_vec(a, abar.len(), device)?,
            sqrt_1m: Tensor::from_vec(s, abar.len(), device)?,
        })
    }

    /// (sqrt(1 - abar_n), sqrt(abar_n)) gathered at `n` (one index conversion for both), each
    /// [batch, 1, ...] to broadcast over `x`.
    fn coefs(&self, n: &Tensor, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let idx = n.to_dtype(DType::F32)?.round()?.to_dtype(DType::U32)?;
        let mut shape = vec![x.dim(0)?];
        shape.extend(std::iter::repeat_n(1, x.rank() - 1));
        let gather = |t: &Tensor| -> Result<Tensor> {
            Ok(t.index_select(&idx, 0)?.reshape(shape.as_slice())?)
        };
        Ok((gather(&self.sqrt_1m)?, gather(&self.sqrt_ab)?))
    }
}

impl Denoiser for VPrediction {
    fn eps(&self, x: &Tensor, n: &Tensor, cond: Option<&Tensor>) -> Result<Tensor> {
        let v = self.net.eps(x, n, cond)?;
        let (s, a) = self.coefs(n, x)?;
        Ok((x.broadcast_mul(&s)? + v.broadcast_mul(&a)?)?)
    }
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

    /// A "network" that returns a fixed tensor, for the wrappers' hand checks.
    struct Fixed(Tensor);
    impl Denoiser for Fixed {
        fn eps(&self, _x: &Tensor, _n: &Tensor, _c: Option<&Tensor>) -> Result<Tensor> {
            Ok(self.0.clone())
        }
    }

    #[test]
    fn v_prediction_gives_back_the_noise_of_the_true_v() {
        // x_n = a x_0 + s eps and v = a eps - s x_0 (a = sqrt(abar_n), s = sqrt(1 - abar_n)):
        // a network returning the true v is seen as returning eps exactly, at every n of the
        // batch (each row its own n), including n = 0 (a = 1, s = 0: eps = v) and n = N.
        let d = Device::Cpu;
        let sch = crate::schedule::VpSchedule::ddpm_default();
        let ns = [0usize, 1, 250, 999, 1000];
        let b = ns.len();
        let mut r = crate::rng::rng_for(3, 0, 0);
        let x0 = crate::rng::randn(&mut r, (b, 2, 3), &d).unwrap();
        let eps = crate::rng::randn(&mut r, (b, 2, 3), &d).unwrap();
        let xn = sch.q_sample(&x0, &ns, &eps).unwrap();
        let col = |f: &dyn Fn(f64) -> f64| {
            let v: Vec<f32> = ns.iter().map(|&n| f(sch.abar[n]) as f32).collect();
            Tensor::from_vec(v, (b, 1, 1), &d).unwrap()
        };
        let a = col(&|ab| ab.sqrt());
        let s = col(&|ab| (1.0 - ab).sqrt());
        let v = (eps.broadcast_mul(&a).unwrap() - x0.broadcast_mul(&s).unwrap()).unwrap();
        let n: Vec<f32> = ns.iter().map(|&n| n as f32).collect();
        let n = Tensor::from_vec(n, b, &d).unwrap();
        let w = VPrediction::new(Arc::new(Fixed(v.clone())), &sch.abar, &d).unwrap();
        let got = w.eps(&xn, &n, None).unwrap();
        let err = crate::testutil::max_abs_diff(&got, &eps);
        assert!(err < 1e-5, "max |eps_hat - eps| = {err}");
        // Hand value: n = 0 returns v itself; a zero v returns s x_n.
        let zero =
            VPrediction::new(Arc::new(Fixed(v.zeros_like().unwrap())), &sch.abar, &d).unwrap();
        let z = zero.eps(&xn, &n, None).unwrap();
        let want = xn.broadcast_mul(&s).unwrap();
        let err = crate::testutil::max_abs_diff(&z, &want);
        assert!(err < 1e-6, "{err}");
        use crate::testutil::flat;
        let row0 = flat(&w.eps(&xn, &n, None).unwrap().get(0).unwrap());
        let v0 = flat(&v.get(0).unwrap());
        assert_eq!(row0, v0);
    }
}
