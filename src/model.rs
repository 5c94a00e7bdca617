//! `tilt model info | forward | merge`: what tilt understood of a diffusers model directory, one
//! forward pass through it (with a LoRA), so a user can check tilt reads a model the way diffusers
//! does, and the model with a LoRA folded into its weights. The directory is a model (`config.json` + `diffusion_pytorch_model.safetensors`) or a
//! pipeline (`model_index.json` with `unet/` and optionally `scheduler/`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use tilt_kernels::diffusers::lora::{merge_lora, read_lora_config, Lora, UNET_PREFIX};
use tilt_kernels::diffusers::scheduler::SchedulerConfig;
use tilt_kernels::diffusers::unet2d::{UNet2D, UNet2DConfig};
use tilt_kernels::diffusers::weights::WeightFile;

/// The weights file name diffusers writes.
pub const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";
/// The LoRA file name diffusers writes and reads.
pub const LORA_WEIGHTS: &str = "pytorch_lora_weights.safetensors";

/// The model directory of `dir`: itself, or its `unet/` when `dir` is a pipeline.
pub fn unet_dir(dir: &Path) -> Result<PathBuf> {
    if dir.join("model_index.json").exists() {
        let u = dir.join("unet");
        if !u.join("config.json").exists() {
            bail!(
                "{}: a pipeline directory (model_index.json) without unet/config.json",
                dir.display()
            );
        }
        return Ok(u);
    }
    if !dir.join("config.json").exists() {
        bail!(
            "{}: not a diffusers model directory (no config.json, no model_index.json)",
            dir.display()
        );
    }
    Ok(dir.to_path_buf())
}

/// The class a model directory's `config.json` names.
fn class_of(config: &Path) -> Result<(String, String)> {
    let text = std::fs::read_to_string(config)
        .with_context(|| format!("cannot read {}", config.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", config.display()))?;
    let class = v
        .get("_class_name")
        .and_then(|c| c.as_str())
        .ok_or_else(|| anyhow!("{}: _class_name: missing", config.display()))?
        .to_string();
    Ok((class, text))
}

/// A loaded UNet2DModel and its weight file (to check every tensor was used).
pub struct Loaded {
    pub model: UNet2D,
    pub params: usize,
    pub dir: PathBuf,
}

/// Load the UNet of `dir` (and the LoRA `lora`, a file or a directory holding
/// pytorch_lora_weights.safetensors) on `device`; every tensor of both files must be used.
pub fn load_unet(dir: &Path, lora: Option<&Path>, device: &Device) -> Result<Loaded> {
    let dir = unet_dir(dir)?;
    let cfile = dir.join("config.json");
    let (class, text) = class_of(&cfile)?;
    let config = match class.as_str() {
        "UNet2DModel" => UNet2DConfig::from_json(&text, &cfile.display().to_string())?,
        "UNet2DConditionModel" | "AutoencoderKL" => bail!(
            "{}: _class_name: {class:?} is not supported yet (tilt reads UNet2DModel; docs/your-own-model.md)",
            cfile.display()
        ),
        other => bail!(
            "{}: _class_name: {other:?} is not supported (tilt reads UNet2DModel)",
            cfile.display()
        ),
    };
    let wfile = dir.join(WEIGHTS);
    if !wfile.exists() {
        bail!("{}: missing (the model's weights)", wfile.display());
    }
    let weights = WeightFile::open(&wfile, device)?;
    let lora = match lora {
        None => None,
        Some(p) => {
            let file = if p.is_dir() {
                p.join(LORA_WEIGHTS)
            } else {
                p.to_path_buf()
            };
            let lw = WeightFile::open(&file, device)?;
            let config = read_lora_config(&file)?;
            Some((
                Lora {
                    config,
                    vb: lw.var_builder(device).pp(UNET_PREFIX),
                },
                lw,
            ))
        }
    };
    let model = UNet2D::new(
        config,
        weights.var_builder(device),
        lora.as_ref().map(|l| &l.0),
    )?;
    weights.check_all_used()?;
    if let Some((_, lw)) = &lora {
        lw.check_all_used()?;
    }
    let params = weights.elem_count();
    Ok(Loaded { model, params, dir })
}

/// The device a `tilt model` command names (`--device`: "cpu", "cuda", "cuda:N").
pub fn device(name: &str) -> Result<Device> {
    tilt_kernels::cuda::device(name).map_err(|e| anyhow!("--device {name:?}: {e}"))
}

/// `tilt model info DIR`: reads the model on the host (nothing runs).
pub fn info(dir: &Path) -> Result<()> {
    let l = load_unet(dir, None, &device("cpu")?)?;
    let c = &l.model.config;
    println!("{}: UNet2DModel, {} parameters", l.dir.display(), l.params);
    println!(
        "  sample {}x{}, {} -> {} channels, block_out_channels {:?}, layers_per_block {}",
        c.sample_size.0,
        c.sample_size.1,
        c.in_channels,
        c.out_channels,
        c.block_out_channels,
        c.layers_per_block
    );
    println!(
        "  down {:?}, up {:?}, attention_head_dim {:?}, norm_num_groups {}, class embeddings {:?}",
        c.down_blocks, c.up_blocks, c.attention_head_dim, c.norm_num_groups, c.num_class_embeds
    );
    let sched = dir.join("scheduler").join("scheduler_config.json");
    if sched.exists() {
        let text = std::fs::read_to_string(&sched)?;
        let s = SchedulerConfig::from_json(&text, &sched.display().to_string())?;
        println!(
            "  scheduler {}: {:?} betas {}..{} over {}, {:?}, {:?} spacing, offset {}, set_alpha_to_one {}",
            s.class_name,
            s.beta_schedule,
            s.beta_start,
            s.beta_end,
            s.num_train_timesteps,
            s.prediction_type,
            s.timestep_spacing,
            s.steps_offset,
            s.set_alpha_to_one
        );
    }
    Ok(())
}

/// `tilt model forward DIR --inputs IN --out OUT [--lora L]`: `sample`, `timestep` (int64 or
/// f32, one per row or one for all) and `class_labels` (int64 or u32) in; `sample` out.
pub fn forward(
    dir: &Path,
    inputs: &Path,
    out: &Path,
    lora: Option<&Path>,
    dev: &Device,
) -> Result<()> {
    let l = load_unet(dir, lora, dev)?;
    let inp: HashMap<String, Tensor> = candle_core::safetensors::load(inputs, dev)
        .with_context(|| format!("{}: not a readable safetensors file", inputs.display()))?;
    let get = |k: &str| {
        inp.get(k)
            .ok_or_else(|| anyhow!("{}: tensor {k} is missing", inputs.display()))
    };
    let sample = get("sample")?.to_dtype(DType::F32)?;
    let b = sample.dim(0)?;
    let t = get("timestep")?;
    let mut ts: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    if ts.len() == 1 {
        ts = vec![ts[0]; b];
    }
    if ts.len() != b {
        bail!(
            "{}: timestep has {} values for {b} samples (one per row, or one for all)",
            inputs.display(),
            ts.len()
        );
    }
    let labels = match inp.get("class_labels") {
        Some(c) => {
            let v: Vec<i64> = c.to_dtype(DType::I64)?.flatten_all()?.to_vec1()?;
            let classes = l.model.config.num_class_embeds.unwrap_or(0) as i64;
            if let Some(bad) = v.iter().find(|&&x| x < 0 || x >= classes) {
                bail!(
                    "{}: class_labels holds {bad}, outside 0..{classes} (num_class_embeds)",
                    inputs.display()
                );
            }
            Some(Tensor::from_vec(
                v.iter().map(|&x| x as u32).collect::<Vec<_>>(),
                v.len(),
                dev,
            )?)
        }
        None => None,
    };
    let y = l.model.forward(&sample, &ts, labels.as_ref())?;
    let mut m = HashMap::new();
    m.insert("sample".to_string(), y);
    let tmp = out.with_extension("safetensors.tmp");
    candle_core::safetensors::save(&m, &tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("cannot write {}", out.display()))?;
    println!("{}", out.display());
    Ok(())
}

/// A LoRA argument: the file, or the directory holding pytorch_lora_weights.safetensors.
fn lora_file(p: &Path) -> PathBuf {
    if p.is_dir() {
        p.join(LORA_WEIGHTS)
    } else {
        p.to_path_buf()
    }
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
    for e in std::fs::read_dir(from).with_context(|| format!("cannot read {}", from.display()))? {
        let p = e?.path();
        let dst = to.join(p.file_name().expect("read_dir entries have names"));
        if p.is_dir() {
            copy_tree(&p, &dst)?;
        } else {
            std::fs::copy(&p, &dst)
                .with_context(|| format!("cannot copy {} to {}", p.display(), dst.display()))?;
        }
    }
    Ok(())
}

/// `tilt model merge DIR --lora L --out OUT`: a copy of the model (or pipeline) directory whose
/// UNet weights have the LoRA folded in (W + alpha / r B A), in diffusers' format. The LoRA and
/// the model are checked first (every tensor of both used, as `forward` does); OUT must not exist.
pub fn merge(dir: &Path, lora: &Path, out: &Path) -> Result<()> {
    if out.exists() {
        bail!(
            "{}: already exists (merge writes a new directory)",
            out.display()
        );
    }
    // Host arithmetic on the weights, written back as files: no device needed. The files are
    // read twice on purpose: once through the model (every tensor checked against the config),
    // once raw, so the merged file keeps the base file's dtypes (the model's copy is f32).
    let host = device("cpu")?;
    load_unet(dir, Some(lora), &host)?;
    let unet = unet_dir(dir)?;
    let lfile = lora_file(lora);
    let base = candle_core::safetensors::load(unet.join(WEIGHTS), &host)?;
    let ltensors = candle_core::safetensors::load(&lfile, &host)?;
    let merged = merge_lora(&base, &ltensors, &read_lora_config(&lfile)?)?;
    let tmp = out.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    copy_tree(dir, &tmp)?;
    let rel = unet.strip_prefix(dir).unwrap_or(Path::new(""));
    candle_core::safetensors::save(&merged, tmp.join(rel).join(WEIGHTS))?;
    std::fs::rename(&tmp, out).with_context(|| format!("cannot write {}", out.display()))?;
    println!("{}", out.display());
    Ok(())
}
