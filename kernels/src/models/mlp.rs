//! An MLP denoiser for low-dimensional data (the 2-D mixtures), optionally class-conditioned.
//! Also the residual of the VRPO policy: `zero_init_output = true` makes it output exactly zero.

use candle_core::Tensor;
use candle_nn::{Init, Linear, VarBuilder};

use crate::denoiser::{time_embedding, Denoiser};
use crate::fused;
use crate::{KernelError, Result};

/// Shape of an MLP denoiser.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MlpConfig {
    /// Data dimension D (the input and output width).
    pub dim: usize,
    /// Hidden width.
    pub hidden: usize,
    /// Number of hidden layers (>= 1).
    pub depth: usize,
    /// Width of the sinusoidal time embedding.
    pub time_dim: usize,
    /// Number of classes for conditioning (0 = unconditional).
    pub classes: usize,
    /// Initialise the output layer to zero (residual of a policy).
    pub zero_init_output: bool,
}

/// x, time embedding (+ class embedding) -> hidden layers with SiLU -> eps.
pub struct MlpDenoiser {
    cfg: MlpConfig,
    layers: Vec<Linear>,
    out: Linear,
    class_emb: Option<candle_nn::Embedding>,
}

impl MlpDenoiser {
    /// Build the network with its variables in `vb`.
    pub fn new(cfg: MlpConfig, vb: VarBuilder) -> Result<Self> {
        if cfg.depth == 0 || cfg.dim == 0 || cfg.hidden == 0 {
            return Err(KernelError::param(
                "mlp",
                format!("{cfg:?}"),
                "dim, hidden and depth must be positive",
            ));
        }
        let mut layers = Vec::with_capacity(cfg.depth);
        let mut width = cfg.dim + cfg.time_dim;
        for i in 0..cfg.depth {
            layers.push(candle_nn::linear(
                width,
                cfg.hidden,
                vb.pp(format!("l{i}")),
            )?);
            width = cfg.hidden;
        }
        let out = if cfg.zero_init_output {
            let w =
                vb.pp("out")
                    .get_with_hints((cfg.dim, cfg.hidden), "weight", Init::Const(0.0))?;
            let b = vb
                .pp("out")
                .get_with_hints(cfg.dim, "bias", Init::Const(0.0))?;
            Linear::new(w, Some(b))
        } else {
            candle_nn::linear(cfg.hidden, cfg.dim, vb.pp("out"))?
        };
        let class_emb = if cfg.classes > 0 {
            Some(candle_nn::embedding(
                cfg.classes,
                cfg.time_dim,
                vb.pp("class"),
            )?)
        } else {
            None
        };
        Ok(Self {
            cfg,
            layers,
            out,
            class_emb,
        })
    }

    /// The first layer's pre-activation when the rows' training indices repeat (the learner's
    /// [L*B] rows come from at most K grid steps): W [x; temb] + b = W_x x + (W_t temb) + b with
    /// W_t temb computed once per distinct index and gathered. The same function as the plain
    /// path (tested); at the quickstart shape it saves a fifth of the step's matrix products.
    fn first_layer_shared(&self, x: &Tensor, steps: &Tensor, index: &Tensor) -> Result<Tensor> {
        let l0 = &self.layers[0];
        let w = l0.weight(); // [hidden, dim + time_dim]
        let wx = w.narrow(1, 0, self.cfg.dim)?;
        let wt = w.narrow(1, self.cfg.dim, self.cfg.time_dim)?;
        let per_step = time_embedding(steps, self.cfg.time_dim)?.matmul(&wt.t()?)?; // [U, hidden]
        let pre = (x.matmul(&wx.t()?)? + per_step.index_select(index, 0)?)?;
        match l0.bias() {
            Some(b) => fused::add_bias(&pre, b),
            None => Ok(pre),
        }
    }

    /// The configuration this network was built with.
    pub fn config(&self) -> &MlpConfig {
        &self.cfg
    }

    /// The hidden layers, first to last (the first takes [x; time embedding]).
    pub fn layers(&self) -> &[Linear] {
        &self.layers
    }

    /// The output layer (hidden -> dim).
    pub fn out_layer(&self) -> &Linear {
        &self.out
    }
}

impl Denoiser for MlpDenoiser {
    fn eps(&self, x: &Tensor, n: &Tensor, cond: Option<&Tensor>) -> Result<Tensor> {
        // Images [batch, C, H, W] go through flattened and come back in their shape.
        if x.rank() > 2 {
            let flat = x.flatten_from(1)?;
            if flat.dim(1)? == self.cfg.dim {
                return Ok(self.eps(&flat, n, cond)?.reshape(x.shape())?);
            }
        }
        if x.rank() != 2 || x.dim(1)? != self.cfg.dim {
            return Err(KernelError::shape(
                "MlpDenoiser::eps",
                format!(
                    "x is {:?}, expected [batch, {}] (or [batch, ...] of {} elements per row)",
                    x.shape().dims(),
                    self.cfg.dim,
                    self.cfg.dim
                ),
            ));
        }
        if self.class_emb.is_some() != cond.is_some() {
            return Err(KernelError::param(
                "MlpDenoiser::eps.cond",
                if cond.is_some() { "Some" } else { "None" },
                format!(
                    "the network has classes = {}: a class-conditional one needs cond, an \
                     unconditional one would silently ignore it",
                    self.cfg.classes
                ),
            ));
        }
        let mut h = match (cond, shared_steps(n)?) {
            (None, Some((steps, index))) => self.first_layer_shared(x, &steps, &index)?,
            _ => {
                let mut temb = time_embedding(n, self.cfg.time_dim)?;
                if let (Some(emb), Some(c)) = (&self.class_emb, cond) {
                    temb = (temb + crate::denoiser::class_embedding(emb, c)?)?;
                }
                fused::linear_layer(&self.layers[0], &Tensor::cat(&[x, &temb], 1)?)?
            }
        };
        h = fused::silu(&h)?;
        for l in &self.layers[1..] {
            h = fused::silu(&fused::linear_layer(l, &h)?)?;
        }
        fused::linear_layer(&self.out, &h)
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}

/// The distinct training indices of `n` [rows] and each row's position among them, when there are
/// at most a quarter as many as rows (else None: sharing would not pay). Reads `n` on the host, so
/// only CPU tensors take this path (on a GPU the read-back would synchronise every forward).
fn shared_steps(n: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
    let rows = n.dim(0)?;
    if rows < 64 || !n.device().is_cpu() {
        return Ok(None);
    }
    let values = n.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
    let mut distinct: Vec<f32> = Vec::new();
    let mut index: Vec<u32> = Vec::with_capacity(rows);
    let mut seen: std::collections::HashMap<u32, u32> = std::collections::HashMap::new();
    for v in values {
        let i = *seen.entry(v.to_bits()).or_insert_with(|| {
            distinct.push(v);
            (distinct.len() - 1) as u32
        });
        if distinct.len() * 4 > rows {
            return Ok(None);
        }
        index.push(i);
    }
    let u = distinct.len();
    Ok(Some((
        Tensor::from_vec(distinct, u, n.device())?,
        Tensor::from_vec(index, rows, n.device())?,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::denoiser::{load_weights, save_weights, ResidualPolicy};
    use candle_core::{Device, Module};
    use candle_nn::VarMap;
    use std::sync::Arc;

    fn cfg(zero: bool) -> MlpConfig {
        MlpConfig {
            dim: 2,
            hidden: 32,
            depth: 2,
            time_dim: 16,
            classes: 0,
            zero_init_output: zero,
        }
    }

    #[test]
    fn residual_policy_equals_reference_bit_for_bit_at_init() {
        let d = Device::Cpu;
        let vm_ref = VarMap::new();
        let reference = MlpDenoiser::new(cfg(false), crate::testutil::vb(&vm_ref, 1, &d)).unwrap();
        let vm_res = VarMap::new();
        let residual = MlpDenoiser::new(cfg(true), crate::testutil::vb(&vm_res, 2, &d)).unwrap();
        let reference: Arc<dyn Denoiser> = Arc::new(reference);
        let policy = ResidualPolicy {
            reference: reference.clone(),
            residual: Arc::new(residual),
        };
        let x = crate::rng::randn(&mut crate::rng::rng_for(101, 0, 0), (64, 2), &d).unwrap();
        let n = Tensor::arange(0f32, 64.0, &d)
            .unwrap()
            .affine(15.0, 1.0)
            .unwrap();
        let a = reference
            .eps(&x, &n, None)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let b = policy.eps(&x, &n, None).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn save_load_round_trip_and_shape_errors() {
        let d = Device::Cpu;
        let dir = std::env::temp_dir().join(format!("tilt-mlp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.safetensors");
        let vm = VarMap::new();
        let m = MlpDenoiser::new(cfg(false), crate::testutil::vb(&vm, 3, &d)).unwrap();
        save_weights(&vm, &path).unwrap();
        let mut vm2 = VarMap::new();
        let m2 = MlpDenoiser::new(cfg(false), crate::testutil::vb(&vm2, 4, &d)).unwrap();
        load_weights(&mut vm2, &path).unwrap();
        let x = crate::rng::randn(&mut crate::rng::rng_for(102, 0, 0), (8, 2), &d).unwrap();
        let n = Tensor::full(300f32, 8, &d).unwrap();
        assert_eq!(
            m.eps(&x, &n, None).unwrap().to_vec2::<f32>().unwrap(),
            m2.eps(&x, &n, None).unwrap().to_vec2::<f32>().unwrap()
        );
        // A model of another width cannot load it; the error names the file and the tensor.
        let mut vm3 = VarMap::new();
        let mut c = cfg(false);
        c.hidden = 16;
        let _m3 = MlpDenoiser::new(c, crate::testutil::vb(&vm3, 5, &d)).unwrap();
        let e = load_weights(&mut vm3, &path).unwrap_err().to_string();
        assert!(e.contains("m.safetensors") && e.contains("shape"), "{e}");
        // A corrupt file is an error, not a panic.
        std::fs::write(&path, b"not a safetensors file").unwrap();
        assert!(load_weights(&mut vm2, &path).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn class_embeddings_by_one_hot_are_the_gather_in_value_gradient_and_errors() {
        // What CUDA runs (one-hot matmul) against what the CPU runs (index_select): eps and the
        // gradients in x and every weight, the class table's included; a label >= classes is
        // an error on both.
        let d = Device::Cpu;
        let vm = VarMap::new();
        let m = MlpDenoiser::new(
            MlpConfig {
                classes: 4,
                ..cfg(false)
            },
            crate::testutil::vb(&vm, 6, &d),
        )
        .unwrap();
        let x = crate::rng::randn(&mut crate::rng::rng_for(33, 0, 0), (8, 2), &d).unwrap();
        let n = Tensor::new(&[5f32, 90.0, 300.0, 999.0, 5.0, 5.0, 40.0, 700.0], &d).unwrap();
        let c = Tensor::new(&[0u32, 3, 1, 1, 2, 0, 3, 3], &d).unwrap();
        crate::testutil::assert_forms_agree(&vm, &x, 1e-5, |x| m.eps(x, &n, Some(&c)));
        let bad = Tensor::new(&[0u32, 3, 1, 4, 2, 0, 3, 3], &d).unwrap();
        for r in crate::denoiser::both_forms(|| m.eps(&x, &n, Some(&bad))) {
            assert!(r.is_err());
        }
    }

    #[test]
    fn shared_time_steps_give_the_plain_function_and_gradients() {
        // 400 rows on 20 distinct indices take the shared first layer; the same rows with one
        // index each (n + row / 1000, too many distinct) take the plain path. Compare the shared
        // path against the plain formula computed by hand from the same weights.
        use candle_core::Var;
        let d = Device::Cpu;
        let vm = VarMap::new();
        let m = MlpDenoiser::new(cfg(false), crate::testutil::vb(&vm, 7, &d)).unwrap();
        let x = crate::rng::randn(&mut crate::rng::rng_for(103, 0, 0), (400, 2), &d).unwrap();
        let n: Vec<f32> = (0..400).map(|r| (37 * (r % 20) + 5) as f32).collect();
        let n = Tensor::from_vec(n, 400, &d).unwrap();
        assert!(shared_steps(&n).unwrap().is_some());
        let shared = m.eps(&x, &n, None).unwrap();
        // The plain path: cat + linear, by hand.
        let temb = time_embedding(&n, 16).unwrap();
        let mut h = Tensor::cat(&[&x, &temb], 1).unwrap();
        for l in &m.layers {
            h = candle_nn::ops::silu(&l.forward(&h).unwrap()).unwrap();
        }
        let plain = m.out.forward(&h).unwrap();
        let diff = (&shared - &plain)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
        // Gradients w.r.t. every weight agree too.
        let up = crate::rng::randn(&mut crate::rng::rng_for(104, 0, 0), (400, 2), &d).unwrap();
        let g1 = (&shared * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (&plain * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, var) in vm.data().lock().unwrap().iter() {
            let var: &Var = var;
            let (a, b) = (g1.get(var.as_tensor()), g2.get(var.as_tensor()));
            let (Some(a), Some(b)) = (a, b) else {
                panic!("{name}: gradient missing on one path");
            };
            let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-4, "{name}");
        }
        // Too many distinct indices: no sharing.
        let many = Tensor::arange(0f32, 400.0, &d).unwrap();
        assert!(shared_steps(&many).unwrap().is_none());
    }
}
