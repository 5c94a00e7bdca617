//! LoRA in PEFT's form on a diffusers model's linear layers: y = W x + b + (alpha / r) B (A x),
//! A [r, in] drawn like PEFT's `kaiming_uniform_(a = sqrt(5))` (U(-1/sqrt(in), 1/sqrt(in))), B
//! [out, r] zero, so the model with a fresh LoRA equals the base model bit for bit. The weights
//! use diffusers' PEFT key names (`unet.<module path>.lora_A.weight` / `.lora_B.weight`) and the
//! file carries rank, alpha and targets in the `lora_adapter_metadata` entry diffusers reads.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use candle_nn::{Init, Linear, Module, VarBuilder, VarMap};
use serde_json::json;

use crate::{KernelError, Result};

/// diffusers' component prefix of a UNet's LoRA keys.
pub const UNET_PREFIX: &str = "unet";
/// The safetensors metadata entry diffusers reads a LoRA's config from.
pub const METADATA_KEY: &str = "lora_adapter_metadata";

/// Where and how large (`[policy] kind = "lora"`).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// r, the rank.
    pub rank: usize,
    /// alpha: the update is scaled by alpha / r.
    pub alpha: f64,
    /// Module-name suffixes that get a LoRA (PEFT's `target_modules`): a linear layer at path
    /// p is adapted when p equals a target or ends with "." + target.
    pub targets: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 4,
            alpha: 4.0,
            targets: ["to_q", "to_k", "to_v", "to_out.0"]
                .map(String::from)
                .to_vec(),
        }
    }
}

impl LoraConfig {
    fn wants(&self, path: &str) -> bool {
        self.targets
            .iter()
            .any(|t| path == t || path.ends_with(&format!(".{t}")))
    }
}

/// The LoRA of a model being built: its config and where its A and B come from (a seeded
/// `VarMap` for a new one, a file for a trained one), rooted at the model (no component prefix).
#[derive(Clone)]
pub struct Lora {
    pub config: LoraConfig,
    pub vb: VarBuilder<'static>,
}

/// A linear layer with an optional LoRA.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    base: Linear,
    /// A [r, in] and B [out, r] as bias-free layers, and alpha / r.
    lora: Option<(Linear, Linear, f64)>,
}

impl LoraLinear {
    /// The layer at `vb`'s path (base weights from `vb`), with a LoRA when `lora` targets it.
    pub fn new(cin: usize, cout: usize, vb: VarBuilder, lora: Option<&Lora>) -> Result<Self> {
        let path = vb.prefix();
        let base = candle_nn::linear(cin, cout, vb)?;
        let lora = match lora {
            Some(l) if l.config.wants(&path) => {
                let r = l.config.rank;
                let bound = 1.0 / (cin as f64).sqrt();
                let at = l.vb.pp(&path);
                let a = at.pp("lora_A").get_with_hints(
                    (r, cin),
                    "weight",
                    Init::Uniform {
                        lo: -bound,
                        up: bound,
                    },
                )?;
                let b = at
                    .pp("lora_B")
                    .get_with_hints((cout, r), "weight", Init::Const(0.0))?;
                Some((
                    Linear::new(a, None),
                    Linear::new(b, None),
                    l.config.alpha / r as f64,
                ))
            }
            _ => None,
        };
        Ok(Self { base, lora })
    }
}

impl Module for LoraLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.base.forward(x)?;
        match &self.lora {
            None => Ok(y),
            Some((a, b, scale)) => {
                // x [.., in] -> [.., r] -> [.., out]
                y + (b.forward(&a.forward(x)?)? * *scale)?
            }
        }
    }
}

fn io_err(path: &Path, detail: impl Into<String>) -> KernelError {
    KernelError::Checkpoint {
        path: path.display().to_string(),
        detail: detail.into(),
    }
}

/// Write the LoRA variables of `varmap` (names `<module path>.lora_A.weight`, ...) as diffusers'
/// `pytorch_lora_weights.safetensors`: keys prefixed `unet.`, metadata with r, lora_alpha and
/// target_modules. Atomic (a temporary name, then a rename).
pub fn save_lora(varmap: &VarMap, config: &LoraConfig, path: &Path) -> Result<()> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| io_err(path, "varmap lock poisoned"))?;
    let mut tensors: Vec<(String, Tensor)> = data
        .iter()
        .map(|(k, v)| (format!("{UNET_PREFIX}.{k}"), v.as_tensor().clone()))
        .collect();
    drop(data);
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let meta = json!({
        format!("{UNET_PREFIX}.r"): config.rank,
        format!("{UNET_PREFIX}.lora_alpha"): config.alpha,
        format!("{UNET_PREFIX}.target_modules"): config.targets,
    });
    let mut md = HashMap::new();
    md.insert("format".to_string(), "pt".to_string());
    md.insert(METADATA_KEY.to_string(), meta.to_string());
    let views: Vec<(String, Tensor)> = tensors
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_device(&candle_core::Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    let bytes =
        safetensors::tensor::serialize(views.iter().map(|(k, t)| (k.as_str(), t)), Some(md))
            .map_err(|e| io_err(path, format!("cannot serialise: {e}")))?;
    let tmp = path.with_extension("safetensors.tmp");
    std::fs::write(&tmp, bytes).map_err(|e| io_err(&tmp, e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| io_err(path, e.to_string()))?;
    Ok(())
}

/// The LoRA config a file's metadata records (`unet.r`, `unet.lora_alpha`,
/// `unet.target_modules`), or an error naming the file and the missing entry.
pub fn read_lora_config(path: &Path) -> Result<LoraConfig> {
    let bytes = std::fs::read(path).map_err(|e| io_err(path, e.to_string()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| io_err(path, format!("not a safetensors file: {e}")))?;
    let raw = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(METADATA_KEY))
        .ok_or_else(|| {
            io_err(
                path,
                format!("no {METADATA_KEY} entry (rank, alpha, targets)"),
            )
        })?;
    let v: serde_json::Value = serde_json::from_str(raw)
        .map_err(|e| io_err(path, format!("{METADATA_KEY} is not JSON: {e}")))?;
    let get = |k: &str| {
        v.get(format!("{UNET_PREFIX}.{k}"))
            .ok_or_else(|| io_err(path, format!("{METADATA_KEY} lacks {UNET_PREFIX}.{k}")))
    };
    let rank = get("r")?
        .as_u64()
        .filter(|&r| r > 0)
        .ok_or_else(|| io_err(path, "r must be a positive integer"))? as usize;
    let alpha = get("lora_alpha")?
        .as_f64()
        .ok_or_else(|| io_err(path, "lora_alpha must be a number"))?;
    let targets = get("target_modules")?
        .as_array()
        .and_then(|a| a.iter().map(|t| t.as_str().map(String::from)).collect())
        .ok_or_else(|| io_err(path, "target_modules must be a list of names"))?;
    Ok(LoraConfig {
        rank,
        alpha,
        targets,
    })
}

/// The base weights with the LoRA folded in: for every adapted layer at module path p,
/// `p.weight` becomes W + (alpha / r) B A (`lora` holds `unet.p.lora_A.weight` and
/// `unet.p.lora_B.weight`, as [`save_lora`] writes them). A LoRA tensor whose base weight is
/// missing, a lone A or B, or a shape that does not fit is an error naming the tensor.
pub fn merge_lora(
    base: &HashMap<String, Tensor>,
    lora: &HashMap<String, Tensor>,
    config: &LoraConfig,
) -> Result<HashMap<String, Tensor>> {
    let scale = config.alpha / config.rank as f64;
    let mut out = base.clone();
    let prefix = format!("{UNET_PREFIX}.");
    for (key, a) in lora {
        let Some(path) = key
            .strip_prefix(&prefix)
            .and_then(|k| k.strip_suffix(".lora_A.weight"))
        else {
            if key.ends_with(".lora_B.weight") && key.starts_with(&prefix) {
                continue; // taken with its A
            }
            return Err(KernelError::param(
                "lora",
                key,
                format!("not a {prefix}<module>.lora_A/B.weight key"),
            ));
        };
        let bkey = format!("{prefix}{path}.lora_B.weight");
        let b = lora
            .get(&bkey)
            .ok_or_else(|| KernelError::param("lora", &bkey, "missing (its lora_A is present)"))?;
        let wkey = format!("{path}.weight");
        let w = base
            .get(&wkey)
            .ok_or_else(|| KernelError::param("lora", key, format!("no base weight {wkey}")))?;
        let delta = (b.matmul(a)? * scale)?;
        if delta.dims() != w.dims() {
            return Err(KernelError::shape(
                "merge_lora",
                format!("{key}: B A is {:?}, {wkey} is {:?}", delta.dims(), w.dims()),
            ));
        }
        out.insert(wkey, (w + delta.to_dtype(w.dtype())?)?);
    }
    for key in lora.keys().filter(|k| k.ends_with(".lora_B.weight")) {
        let akey = key.replace(".lora_B.weight", ".lora_A.weight");
        if !lora.contains_key(&akey) {
            return Err(KernelError::param("lora", key, "missing its lora_A"));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusers::unet2d::{UNet2D, UNet2DConfig};
    use crate::diffusers::weights::WeightFile;
    use crate::init::{seeded_var_builder, POLICY_STREAM};
    use crate::rng::{randn, rng_for};
    use candle_core::{DType, Device};

    fn fixture_unet(lora: Option<&Lora>) -> UNet2D {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/diffusers/unet2d");
        let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
        let cfg = UNet2DConfig::from_json(&text, "config.json").unwrap();
        let w = WeightFile::open(
            &dir.join("diffusion_pytorch_model.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        UNet2D::new(cfg, w.var_builder(&Device::Cpu), lora).unwrap()
    }

    fn input() -> (Tensor, Vec<f32>) {
        let x = randn(&mut rng_for(5, 0, 0), (2, 3, 8, 8), &Device::Cpu).unwrap();
        (x, vec![10.0, 700.0])
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    }

    #[test]
    fn a_fresh_lora_is_the_base_model_bit_for_bit_and_holds_only_lora_weights() {
        let vm = VarMap::new();
        let lora = Lora {
            config: LoraConfig::default(),
            vb: seeded_var_builder(&vm, 1, POLICY_STREAM, DType::F32, &Device::Cpu),
        };
        let with = fixture_unet(Some(&lora));
        let base = fixture_unet(None);
        let (x, t) = input();
        assert_eq!(
            bits(&with.forward(&x, &t, None).unwrap()),
            bits(&base.forward(&x, &t, None).unwrap())
        );
        // The fixture has attention in down block 1, the mid block and up block 0 (2 layers):
        // 1 + 1 + 2 = 4 attentions x 4 projections x (A, B).
        let names: Vec<String> = crate::optim::named_vars(&vm)
            .unwrap()
            .into_iter()
            .map(|v| v.0)
            .collect();
        assert_eq!(names.len(), 32, "{names:?}");
        assert!(names
            .iter()
            .all(|n| n.ends_with("lora_A.weight") || n.ends_with("lora_B.weight")));
        assert!(names.contains(&"mid_block.attentions.0.to_out.0.lora_B.weight".to_string()));
        // A is PEFT's kaiming-uniform: |a| <= 1/sqrt(in) = 1/4 for 16 channels; B is zero.
        let a = vm.data().lock().unwrap()["mid_block.attentions.0.to_q.lora_A.weight"]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(a.iter().all(|v| v.abs() <= 0.25) && a.iter().any(|v| v.abs() > 0.2));
    }

    #[test]
    fn lora_update_is_alpha_over_r_b_a_x() {
        // One layer by hand: W = 0 (base from zeros), A = [[1, 2]], B = [[3], [4]], alpha 2, r 1:
        // y = 2 * B (A x) for x = (1, 1): A x = 3, y = (18, 24).
        let base = VarMap::new();
        let bvb = seeded_var_builder(&base, 0, POLICY_STREAM, DType::F32, &Device::Cpu);
        bvb.get_with_hints((2, 2), "l.weight", Init::Const(0.0))
            .unwrap();
        bvb.get_with_hints(2, "l.bias", Init::Const(0.0)).unwrap();
        let lvm = VarMap::new();
        let lvb = seeded_var_builder(&lvm, 0, POLICY_STREAM, DType::F32, &Device::Cpu);
        let lora = Lora {
            config: LoraConfig {
                rank: 1,
                alpha: 2.0,
                targets: vec!["l".into()],
            },
            vb: lvb,
        };
        let layer = LoraLinear::new(2, 2, bvb.pp("l"), Some(&lora)).unwrap();
        let d = lvm.data().lock().unwrap();
        d["l.lora_A.weight"]
            .set(&Tensor::new(&[[1f32, 2.0]], &Device::Cpu).unwrap())
            .unwrap();
        d["l.lora_B.weight"]
            .set(&Tensor::new(&[[3f32], [4.0]], &Device::Cpu).unwrap())
            .unwrap();
        let y = layer
            .forward(&Tensor::new(&[[1f32, 1.0]], &Device::Cpu).unwrap())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(y, [[18.0, 24.0]]);
    }

    #[test]
    fn saved_lora_reloads_with_its_config_and_gives_the_same_output() {
        let vm = VarMap::new();
        let config = LoraConfig {
            rank: 2,
            alpha: 3.0,
            ..Default::default()
        };
        let lora = Lora {
            config: config.clone(),
            vb: seeded_var_builder(&vm, 2, POLICY_STREAM, DType::F32, &Device::Cpu),
        };
        let m = fixture_unet(Some(&lora));
        // Move B off zero so the LoRA matters.
        for (i, (_, v)) in crate::optim::named_vars(&vm)
            .unwrap()
            .into_iter()
            .enumerate()
        {
            let r = randn(&mut rng_for(9, 0, i as u64), v.shape(), &Device::Cpu).unwrap();
            v.set(&(r * 0.1).unwrap()).unwrap();
        }
        let (x, t) = input();
        let y = m.forward(&x, &t, None).unwrap();
        assert_ne!(
            bits(&y),
            bits(&fixture_unet(None).forward(&x, &t, None).unwrap())
        );
        let p = std::env::temp_dir().join(format!("tilt-lora-{}.safetensors", std::process::id()));
        save_lora(&vm, &config, &p).unwrap();
        assert_eq!(read_lora_config(&p).unwrap(), config);
        let w = WeightFile::open(&p, &Device::Cpu).unwrap();
        let again = Lora {
            config,
            vb: w.var_builder(&Device::Cpu).pp(UNET_PREFIX),
        };
        let m2 = fixture_unet(Some(&again));
        w.check_all_used().unwrap();
        assert_eq!(bits(&m2.forward(&x, &t, None).unwrap()), bits(&y));
        std::fs::remove_file(&p).unwrap();
    }
}
