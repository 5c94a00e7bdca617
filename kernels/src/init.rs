//! Seeded parameter initialisation. candle's `VarBuilder::from_varmap` draws new variables from an
//! RNG no seed controls, so a model built twice differs; every model in tilt is built through
//! [`seeded_var_builder`] instead, which draws each variable from `rng_for(seed, stream,
//! hash(name))` with the distribution the layer asked for. The streams below name the roles, so two
//! models of one run with the same variable names (a reference and a policy's residual) differ.

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::init::NormalOrUniform;
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use rand::rngs::StdRng;
use rand::Rng;
use rand_distr::StandardNormal;

use crate::rng::rng_for;

/// Init stream of the image classifiers (reward model A, judge B; their seeds differ).
pub const CLASSIFIER_STREAM: u64 = 0xC1A5_0001;
/// Init stream of a pretrained reference denoiser (the digits' MLP or U-Net).
pub const REFERENCE_STREAM: u64 = 0x1417_0001;
/// Init stream of a policy's trainable part (the residual MLP, a LoRA's A matrices).
pub const POLICY_STREAM: u64 = 0x1417_0002;
/// Init stream of the value critic (encoder and CDF head).
pub const CRITIC_STREAM: u64 = 0x1417_0003;
/// Init stream of the video denoiser (DF-DPO's reference, and the models continued from it).
pub const VIDEO_STREAM: u64 = 0x1417_0004;
/// Init stream for unit tests and benches that need some fixed weights.
pub const TEST_STREAM: u64 = 0x1417_00FF;

/// A `VarBuilder` that creates missing variables in `varmap` from tilt's seeded RNG instead of
/// candle's unseeded one: the variable named `name` is drawn from `rng_for(seed, stream,
/// hash(name))` following the layer's own `Init` hint (constant, uniform, normal, Kaiming with its
/// fan and gain, exactly the distributions candle would use), in f64 on the host, then cast to
/// `dtype` and moved to `device` (so the same weights on every device). The same (seed, stream,
/// names, shapes) give the same weights bit for bit whatever the order in which layers are built.
/// Variables already in `varmap` are returned as they are (shape-checked), as with a plain
/// `VarMap`.
pub fn seeded_var_builder(
    varmap: &VarMap,
    seed: u64,
    stream: u64,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    VarBuilder::from_backend(
        Box::new(SeededVarMap {
            varmap: varmap.clone(),
            seed,
            stream,
        }),
        dtype,
        device.clone(),
    )
}

struct SeededVarMap {
    varmap: VarMap,
    seed: u64,
    stream: u64,
}

/// FNV-1a of a variable name: a fixed function (unlike `DefaultHasher`, which may change between
/// Rust releases), so the same seed gives the same weights on every toolchain.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// `shape.elem_count()` draws from `init` (f64 arithmetic, as candle's `Init::var`).
fn draw_init(init: Init, shape: &Shape, rng: &mut StdRng) -> Vec<f32> {
    let n = shape.elem_count();
    let normal = |rng: &mut StdRng, mean: f64, std: f64| {
        (0..n)
            .map(|_| (mean + std * rng.sample::<f64, _>(StandardNormal)) as f32)
            .collect()
    };
    let uniform = |rng: &mut StdRng, lo: f64, up: f64| {
        (0..n)
            .map(|_| (lo + (up - lo) * rng.random::<f64>()) as f32)
            .collect()
    };
    match init {
        Init::Const(c) => vec![c as f32; n],
        Init::Uniform { lo, up } => uniform(rng, lo, up),
        Init::Randn { mean, stdev } => normal(rng, mean, stdev),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
            match dist {
                NormalOrUniform::Normal => normal(rng, 0.0, std),
                NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    uniform(rng, -bound, bound)
                }
            }
        }
    }
}

impl SimpleBackend for SeededVarMap {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("varmap lock poisoned".into()))?;
        if let Some(v) = data.get(name) {
            if v.shape() != &s {
                candle_core::bail!("shape mismatch on {name}: {s:?} <> {:?}", v.shape())
            }
            return Ok(v.as_tensor().clone());
        }
        let mut rng = rng_for(self.seed, self.stream, name_hash(name));
        let values = draw_init(h, &s, &mut rng);
        // Drawn on the host: the same bits on every device.
        let t = Tensor::from_vec(values, s, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(dev)?;
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("seeded var builder: {name} needs a shape (use `get`)")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .map(|d| d.contains_key(name))
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::named_vars;
    use crate::testutil::flat;

    fn build(seed: u64, stream: u64, reversed: bool) -> Vec<(String, Vec<f32>)> {
        let vm = VarMap::new();
        let vb = seeded_var_builder(&vm, seed, stream, DType::F32, &Device::Cpu);
        let mk = |name: &str| candle_nn::linear(512, 256, vb.pp(name)).unwrap();
        if reversed {
            mk("b");
            mk("a");
        } else {
            mk("a");
            mk("b");
        }
        let z = vb
            .get_with_hints(4, "zero", Init::Const(0.0))
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(z, [0.0; 4]);
        named_vars(&vm)
            .unwrap()
            .into_iter()
            .map(|(n, v)| (n, flat(v.as_tensor())))
            .collect()
    }

    #[test]
    fn seeded_init_is_reproducible_order_free_and_follows_the_hints() {
        let one = build(3, TEST_STREAM, false);
        assert_eq!(one, build(3, TEST_STREAM, true));
        // Another seed, or another stream (role) with the same seed, draws other weights.
        assert_ne!(one[0].1, build(4, TEST_STREAM, false)[0].1);
        assert_ne!(one[0].1, build(3, POLICY_STREAM, false)[0].1);
        // Different names draw different streams.
        assert_ne!(one[0].1, one[2].1);
        // candle_nn::linear's hints: weight Kaiming normal (ReLU gain) with std sqrt(2 / 512) =
        // 0.0625; bias U(-1/sqrt(512), 1/sqrt(512)) = U(-0.0442, 0.0442). 131072 draws: the
        // sample std is within 1% of 0.0625 (standard error ~0.2%, so 1% is 5 SE: odds ~6e-7).
        let (name, w) = &one[1];
        assert_eq!(name, "a.weight");
        let std = (w.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / w.len() as f64).sqrt();
        assert!((std / 0.0625 - 1.0).abs() < 0.01, "{std}");
        let (name, b) = &one[0];
        assert_eq!(name, "a.bias");
        let bound = 1.0 / 512f32.sqrt();
        assert!(b.iter().all(|v| v.abs() <= bound));
        assert!(b.iter().any(|v| v.abs() > 0.9 * bound));
    }

    #[test]
    fn existing_variables_are_returned_and_shape_checked() {
        let vm = VarMap::new();
        let vb = seeded_var_builder(&vm, 1, TEST_STREAM, DType::F32, &Device::Cpu);
        let a = vb.get((2, 3), "w").unwrap();
        let again = vb.get((2, 3), "w").unwrap();
        assert_eq!(flat(&a), flat(&again));
        assert!(vb.get((3, 2), "w").is_err());
    }

    #[test]
    fn name_hash_is_fnv1a() {
        // FNV-1a 64 reference values: "" -> offset basis; "a" -> 0xaf63dc4c8601ec8c (the FNV
        // authors' test vectors).
        assert_eq!(name_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(name_hash("a"), 0xaf63_dc4c_8601_ec8c);
    }
}
