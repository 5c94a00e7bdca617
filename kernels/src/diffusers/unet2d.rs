//! diffusers' `UNet2DModel` (pixel-space DDPM UNets), read from its `config.json` and weights with
//! diffusers' own key names, and run forward in candle: `DownBlock2D`, `AttnDownBlock2D`,
//! `UNetMidBlock2D`, `UpBlock2D`, `AttnUpBlock2D`, positional time embedding, optional class
//! embedding (`num_class_embeds`). tilt's own modules rather than candle-transformers' (which has
//! no `UNet2DModel`): their attention projections are plain `Linear`s a LoRA can wrap later.
//! Transcribed from diffusers 0.42 (`unet_2d.py`, `unet_2d_blocks.py`, `resnet.py`,
//! `attention_processor.py`); parity: `kernels/tests/diffusers_parity.rs`.

use candle_core::{DType, Device, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, Embedding, GroupNorm, Linear, Module, VarBuilder};

use super::config::{flag, key_err, list, num, object, opt_uint, require, uint, unknown_key};
use super::lora::{Lora, LoraLinear};
use serde_json::Value;

use crate::{KernelError, Result};

/// Down and up block kinds tilt implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    Plain,
    Attn,
}

/// A parsed `UNet2DModel` config.
#[derive(Debug, Clone, PartialEq)]
pub struct UNet2DConfig {
    /// (height, width).
    pub sample_size: (usize, usize),
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_blocks: Vec<BlockKind>,
    pub up_blocks: Vec<BlockKind>,
    pub layers_per_block: usize,
    /// None: one head per block (head dim = the block's channels).
    pub attention_head_dim: Option<usize>,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub mid_block_scale_factor: f64,
    pub add_attention: bool,
    pub center_input_sample: bool,
    pub time_embedding_dim: Option<usize>,
    pub num_class_embeds: Option<usize>,
}

const INERT: [&str; 3] = ["_diffusers_version", "_name_or_path", "num_train_timesteps"];

fn blocks(file: &str, key: &str, v: &Value, plain: &str, attn: &str) -> Result<Vec<BlockKind>> {
    list(file, key, v)?
        .iter()
        .map(|b| match b.as_str() {
            Some(s) if s == plain => Ok(BlockKind::Plain),
            Some(s) if s == attn => Ok(BlockKind::Attn),
            _ => Err(key_err(
                file,
                key,
                format!("block {b} is not supported (tilt implements {plain:?} and {attn:?})"),
            )),
        })
        .collect()
}

impl UNet2DConfig {
    /// Parse a `config.json` whose `_class_name` is `UNet2DModel`; `file` names it in errors.
    /// diffusers' defaults for absent keys; a key or value tilt does not implement is refused.
    pub fn from_json(text: &str, file: &str) -> Result<Self> {
        let obj = object(text, file)?;
        match obj.get("_class_name").and_then(Value::as_str) {
            Some("UNet2DModel") => {}
            other => {
                return Err(key_err(
                    file,
                    "_class_name",
                    format!("{other:?}: this reader takes \"UNet2DModel\""),
                ))
            }
        }
        let mut c = UNet2DConfig {
            sample_size: (64, 64),
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![224, 448, 672, 896],
            down_blocks: vec![
                BlockKind::Plain,
                BlockKind::Attn,
                BlockKind::Attn,
                BlockKind::Attn,
            ],
            up_blocks: vec![
                BlockKind::Attn,
                BlockKind::Attn,
                BlockKind::Attn,
                BlockKind::Plain,
            ],
            layers_per_block: 2,
            attention_head_dim: Some(8),
            norm_num_groups: 32,
            norm_eps: 1e-5,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            mid_block_scale_factor: 1.0,
            add_attention: true,
            center_input_sample: false,
            time_embedding_dim: None,
            num_class_embeds: None,
        };

        for (key, v) in &obj {
            let k = key.as_str();
            match k {
                "_class_name" => {}
                k if INERT.contains(&k) => {}
                "sample_size" => {
                    c.sample_size = match v {
                        Value::Array(a) if a.len() == 2 => {
                            (uint(file, k, &a[0])?, uint(file, k, &a[1])?)
                        }
                        _ => {
                            let s = uint(file, k, v)?;
                            (s, s)
                        }
                    }
                }
                "in_channels" => c.in_channels = uint(file, k, v)?,
                "out_channels" => c.out_channels = uint(file, k, v)?,
                "block_out_channels" => {
                    c.block_out_channels = list(file, k, v)?
                        .iter()
                        .map(|x| uint(file, k, x))
                        .collect::<Result<_>>()?
                }
                "down_block_types" => {
                    c.down_blocks = blocks(file, k, v, "DownBlock2D", "AttnDownBlock2D")?
                }
                "up_block_types" => c.up_blocks = blocks(file, k, v, "UpBlock2D", "AttnUpBlock2D")?,
                "mid_block_type" => require(
                    file,
                    k,
                    v,
                    &[Value::String("UNetMidBlock2D".into())],
                    "a mid block other than UNetMidBlock2D",
                )?,
                "layers_per_block" => c.layers_per_block = uint(file, k, v)?,
                "attention_head_dim" => c.attention_head_dim = opt_uint(file, k, v)?,
                "norm_num_groups" => c.norm_num_groups = uint(file, k, v)?,
                "norm_eps" => c.norm_eps = num(file, k, v)?,
                "flip_sin_to_cos" => c.flip_sin_to_cos = flag(file, k, v)?,
                "freq_shift" => c.freq_shift = num(file, k, v)?,
                "mid_block_scale_factor" => c.mid_block_scale_factor = num(file, k, v)?,
                "add_attention" => c.add_attention = flag(file, k, v)?,
                "center_input_sample" => c.center_input_sample = flag(file, k, v)?,
                "time_embedding_dim" => c.time_embedding_dim = opt_uint(file, k, v)?,
                "num_class_embeds" => c.num_class_embeds = opt_uint(file, k, v)?,
                "act_fn" => require(
                    file,
                    k,
                    v,
                    &["silu".into()],
                    "an activation other than silu",
                )?,
                "time_embedding_type" => require(
                    file,
                    k,
                    v,
                    &["positional".into()],
                    "a time embedding other than positional",
                )?,
                "resnet_time_scale_shift" => require(
                    file,
                    k,
                    v,
                    &["default".into()],
                    "scale-shift time conditioning",
                )?,
                "downsample_type" => require(
                    file,
                    k,
                    v,
                    &["conv".into()],
                    "a downsampler other than conv",
                )?,
                "upsample_type" => {
                    require(file, k, v, &["conv".into()], "an upsampler other than conv")?
                }
                "downsample_padding" => {
                    require(file, k, v, &[1.into()], "downsample padding != 1")?
                }
                "class_embed_type" => require(
                    file,
                    k,
                    v,
                    &[Value::Null],
                    "a class embedding other than a lookup table (num_class_embeds)",
                )?,
                "attn_norm_num_groups" => require(
                    file,
                    k,
                    v,
                    &[Value::Null],
                    "attention groups apart from norm_num_groups",
                )?,
                // Dropout changes training, not inference; tilt trains without it.
                "dropout" => require(file, k, v, &[0.into(), 0.0.into()], "dropout")?,
                _ => return Err(unknown_key(file, k, v)),
            }
        }
        c.validate(file)?;
        Ok(c)
    }

    fn validate(&self, file: &str) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 || self.down_blocks.len() != n || self.up_blocks.len() != n {
            return Err(key_err(
                file,
                "block_out_channels",
                format!(
                    "{} channels, {} down blocks, {} up blocks: need one of each per level",
                    n,
                    self.down_blocks.len(),
                    self.up_blocks.len()
                ),
            ));
        }
        for &ch in &self.block_out_channels {
            if ch == 0 || ch % self.norm_num_groups != 0 {
                return Err(key_err(
                    file,
                    "norm_num_groups",
                    format!(
                        "{} does not divide block channels {ch}",
                        self.norm_num_groups
                    ),
                ));
            }
            if let Some(d) = self.attention_head_dim {
                if d == 0 || ch % d != 0 {
                    return Err(key_err(
                        file,
                        "attention_head_dim",
                        format!("{d} does not divide block channels {ch}"),
                    ));
                }
            }
        }
        if self.block_out_channels[0] % 2 != 0 {
            return Err(key_err(
                file,
                "block_out_channels",
                "the first width (the time embedding's) must be even",
            ));
        }
        if self.layers_per_block == 0 || self.in_channels == 0 || self.out_channels == 0 {
            return Err(key_err(
                file,
                "layers_per_block",
                "layers and channels must be positive",
            ));
        }
        Ok(())
    }

    fn time_embed_dim(&self) -> usize {
        self.time_embedding_dim
            .unwrap_or(self.block_out_channels[0] * 4)
    }
}

fn conv(cin: usize, cout: usize, k: usize, stride: usize, vb: VarBuilder) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: k / 2,
        stride,
        ..Default::default()
    };
    Ok(candle_nn::conv2d(cin, cout, k, cfg, vb)?)
}

fn gn(groups: usize, ch: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    Ok(candle_nn::group_norm(groups, ch, eps, vb)?)
}

/// diffusers' `ResnetBlock2D` (pre-norm, "default" time conditioning, SiLU).
#[derive(Debug)]
struct Resnet {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
    out_scale: f64,
}

impl Resnet {
    fn new(c: &UNet2DConfig, cin: usize, cout: usize, scale: f64, vb: VarBuilder) -> Result<Self> {
        let g = c.norm_num_groups;
        Ok(Self {
            norm1: gn(g, cin, c.norm_eps, vb.pp("norm1"))?,
            conv1: conv(cin, cout, 3, 1, vb.pp("conv1"))?,
            time_emb_proj: candle_nn::linear(c.time_embed_dim(), cout, vb.pp("time_emb_proj"))?,
            norm2: gn(g, cout, c.norm_eps, vb.pp("norm2"))?,
            conv2: conv(cout, cout, 3, 1, vb.pp("conv2"))?,
            shortcut: (cin != cout)
                .then(|| conv(cin, cout, 1, 1, vb.pp("conv_shortcut")))
                .transpose()?,
            out_scale: scale,
        })
    }

    fn forward(&self, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x)?.silu()?)?;
        let t = self
            .time_emb_proj
            .forward(&temb.silu()?)?
            .unsqueeze(2)?
            .unsqueeze(3)?;
        let h = h.broadcast_add(&t)?;
        let h = self.conv2.forward(&self.norm2.forward(&h)?.silu()?)?;
        let skip = match &self.shortcut {
            Some(s) => s.forward(x)?,
            None => x.clone(),
        };
        Ok(((skip + h)? / self.out_scale)?)
    }
}

/// diffusers' `Attention` as the UNet2D blocks build it: group norm, one projection each for
/// q, k, v and out (with bias), multi-head softmax attention over the pixels, residual, divided
/// by `rescale_output_factor`.
#[derive(Debug)]
struct Attn {
    group_norm: GroupNorm,
    to_q: LoraLinear,
    to_k: LoraLinear,
    to_v: LoraLinear,
    to_out: LoraLinear,
    heads: usize,
    rescale: f64,
}

impl Attn {
    fn new(
        c: &UNet2DConfig,
        ch: usize,
        rescale: f64,
        vb: VarBuilder,
        lora: Option<&Lora>,
    ) -> Result<Self> {
        let head_dim = c.attention_head_dim.unwrap_or(ch);
        let proj = |vb: VarBuilder| LoraLinear::new(ch, ch, vb, lora);
        Ok(Self {
            group_norm: gn(c.norm_num_groups, ch, c.norm_eps, vb.pp("group_norm"))?,
            to_q: proj(vb.pp("to_q"))?,
            to_k: proj(vb.pp("to_k"))?,
            to_v: proj(vb.pp("to_v"))?,
            to_out: proj(vb.pp("to_out").pp("0"))?,
            heads: ch / head_dim,
            rescale,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let d = c / self.heads;
        // [b, c, hw] normed, then tokens [b, hw, c]
        let t = self
            .group_norm
            .forward(&x.reshape((b, c, h * w))?)?
            .transpose(1, 2)?
            .contiguous()?;
        let split = |p: &LoraLinear| -> Result<Tensor> {
            // [b, heads, hw, d]
            Ok(p.forward(&t)?
                .reshape((b, h * w, self.heads, d))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let (q, k, v) = (split(&self.to_q)?, split(&self.to_k)?, split(&self.to_v)?);
        let scores = (q.matmul(&k.t()?)? * (1.0 / (d as f64).sqrt()))?;
        let a = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?; // [b, heads, hw, d]
        let a = a.transpose(1, 2)?.reshape((b, h * w, c))?;
        let out = self
            .to_out
            .forward(&a)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        Ok(((out + x)? / self.rescale)?)
    }
}

#[derive(Debug)]
struct Level {
    resnets: Vec<Resnet>,
    attns: Vec<Attn>,
    /// Down: a stride-2 conv; up: nearest 2x then a conv.
    resample: Option<Conv2d>,
}

/// diffusers' `UNet2DModel`, frozen weights from a `VarBuilder` over its safetensors.
#[derive(Debug)]
pub struct UNet2D {
    pub config: UNet2DConfig,
    time_1: Linear,
    time_2: Linear,
    class_embedding: Option<Embedding>,
    conv_in: Conv2d,
    down: Vec<Level>,
    mid: (Resnet, Option<Attn>, Resnet),
    up: Vec<Level>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet2D {
    /// Build the model; every base tensor comes from `vb` under diffusers' key names, the LoRA's
    /// (if any) from `lora.vb` under the same module paths.
    pub fn new(config: UNet2DConfig, vb: VarBuilder, lora: Option<&Lora>) -> Result<Self> {
        let c = &config;
        let ch = &c.block_out_channels;
        let temb = c.time_embed_dim();
        let mut down = Vec::with_capacity(ch.len());
        let mut out_ch = ch[0];
        for (i, kind) in c.down_blocks.iter().enumerate() {
            let in_ch = out_ch;
            out_ch = ch[i];
            let vb = vb.pp("down_blocks").pp(i);
            let resnets = (0..c.layers_per_block)
                .map(|j| {
                    let cin = if j == 0 { in_ch } else { out_ch };
                    Resnet::new(c, cin, out_ch, 1.0, vb.pp("resnets").pp(j))
                })
                .collect::<Result<Vec<_>>>()?;
            let attns = match kind {
                BlockKind::Attn => (0..c.layers_per_block)
                    .map(|j| Attn::new(c, out_ch, 1.0, vb.pp("attentions").pp(j), lora))
                    .collect::<Result<Vec<_>>>()?,
                BlockKind::Plain => vec![],
            };
            let resample = (i + 1 < ch.len())
                .then(|| conv(out_ch, out_ch, 3, 2, vb.pp("downsamplers").pp(0).pp("conv")))
                .transpose()?;
            down.push(Level {
                resnets,
                attns,
                resample,
            });
        }
        let last = *ch.last().expect("validated: at least one level");
        let mvb = vb.pp("mid_block");
        let s = c.mid_block_scale_factor;
        let mid = (
            Resnet::new(c, last, last, s, mvb.pp("resnets").pp(0))?,
            c.add_attention
                .then(|| Attn::new(c, last, s, mvb.pp("attentions").pp(0), lora))
                .transpose()?,
            Resnet::new(c, last, last, s, mvb.pp("resnets").pp(1))?,
        );
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut up = Vec::with_capacity(ch.len());
        let mut out_ch = rev[0];
        for (i, kind) in c.up_blocks.iter().enumerate() {
            let prev = out_ch;
            out_ch = rev[i];
            let in_ch = rev[(i + 1).min(rev.len() - 1)];
            let vb = vb.pp("up_blocks").pp(i);
            let layers = c.layers_per_block + 1;
            let resnets = (0..layers)
                .map(|j| {
                    let skip = if j == layers - 1 { in_ch } else { out_ch };
                    let cin = if j == 0 { prev } else { out_ch };
                    Resnet::new(c, cin + skip, out_ch, 1.0, vb.pp("resnets").pp(j))
                })
                .collect::<Result<Vec<_>>>()?;
            let attns = match kind {
                BlockKind::Attn => (0..layers)
                    .map(|j| Attn::new(c, out_ch, 1.0, vb.pp("attentions").pp(j), lora))
                    .collect::<Result<Vec<_>>>()?,
                BlockKind::Plain => vec![],
            };
            let resample = (i + 1 < ch.len())
                .then(|| conv(out_ch, out_ch, 3, 1, vb.pp("upsamplers").pp(0).pp("conv")))
                .transpose()?;
            up.push(Level {
                resnets,
                attns,
                resample,
            });
        }
        Ok(Self {
            time_1: candle_nn::linear(ch[0], temb, vb.pp("time_embedding").pp("linear_1"))?,
            time_2: candle_nn::linear(temb, temb, vb.pp("time_embedding").pp("linear_2"))?,
            class_embedding: c
                .num_class_embeds
                .map(|n| candle_nn::embedding(n, temb, vb.pp("class_embedding")))
                .transpose()?,
            conv_in: conv(c.in_channels, ch[0], 3, 1, vb.pp("conv_in"))?,
            down,
            mid,
            up,
            norm_out: gn(c.norm_num_groups, ch[0], c.norm_eps, vb.pp("conv_norm_out"))?,
            conv_out: conv(ch[0], c.out_channels, 3, 1, vb.pp("conv_out"))?,
            config,
        })
    }

    /// diffusers' `get_timestep_embedding` in f32 as torch computes it: [b] timesteps -> [b, dim].
    fn time_proj(&self, t: &[f32], device: &Device) -> Result<Tensor> {
        let dim = self.config.block_out_channels[0];
        let half = dim / 2;
        let c = -(10000f64.ln()) as f32;
        let denom = half as f32 - self.config.freq_shift as f32;
        let freqs: Vec<f32> = (0..half).map(|i| (c * i as f32 / denom).exp()).collect();
        let mut out = Vec::with_capacity(t.len() * dim);
        for &ti in t {
            let (sin, cos): (Vec<f32>, Vec<f32>) = freqs
                .iter()
                .map(|f| ((ti * f).sin(), (ti * f).cos()))
                .unzip();
            if self.config.flip_sin_to_cos {
                out.extend(cos);
                out.extend(sin);
            } else {
                out.extend(sin);
                out.extend(cos);
            }
        }
        Ok(Tensor::from_vec(out, (t.len(), dim), device)?)
    }

    /// One forward pass, as `UNet2DModel.forward(sample, timestep, class_labels).sample`:
    /// `sample` [b, in_channels, h, w] f32, `timesteps` one diffusers timestep per row,
    /// `class_labels` [b] u32 where the model has `num_class_embeds`.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &[f32],
        class_labels: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, cin, h, w) = sample.dims4()?;
        let levels = self.config.block_out_channels.len();
        let div = 1usize << (levels - 1);
        if cin != self.config.in_channels || timesteps.len() != b || h % div != 0 || w % div != 0 {
            return Err(KernelError::shape(
                "UNet2D::forward",
                format!(
                    "sample {:?} with {} timesteps: need [b, {}, h, w], h and w divisible by {div}, one timestep per row",
                    sample.dims(),
                    timesteps.len(),
                    self.config.in_channels
                ),
            ));
        }
        let dev = sample.device();
        let t = self.time_proj(timesteps, dev)?.to_dtype(sample.dtype())?;
        let mut emb = self.time_2.forward(&self.time_1.forward(&t)?.silu()?)?;
        match (&self.class_embedding, class_labels) {
            (Some(e), Some(l)) => {
                if l.dims() != [b] || l.dtype() != DType::U32 {
                    return Err(KernelError::shape(
                        "UNet2D::forward",
                        format!(
                            "class_labels {:?} {:?}: need [{b}] u32",
                            l.dtype(),
                            l.dims()
                        ),
                    ));
                }
                emb = (emb + e.forward(l)?)?;
            }
            (Some(_), None) => {
                return Err(KernelError::param(
                    "class_labels",
                    "none",
                    "this UNet2DModel has num_class_embeds: class labels are required",
                ))
            }
            (None, Some(_)) => {
                return Err(KernelError::param(
                    "class_labels",
                    "given",
                    "this UNet2DModel has no class embedding",
                ))
            }
            (None, None) => {}
        }
        let x = if self.config.center_input_sample {
            ((sample * 2.0)? - 1.0)?
        } else {
            sample.clone()
        };
        let mut x = self.conv_in.forward(&x)?;
        let mut skips = vec![x.clone()];
        for level in &self.down {
            for (j, r) in level.resnets.iter().enumerate() {
                x = r.forward(&x, &emb)?;
                if let Some(a) = level.attns.get(j) {
                    x = a.forward(&x)?;
                }
                skips.push(x.clone());
            }
            if let Some(d) = &level.resample {
                x = d.forward(&x)?;
                skips.push(x.clone());
            }
        }
        x = self.mid.0.forward(&x, &emb)?;
        if let Some(a) = &self.mid.1 {
            x = a.forward(&x)?;
        }
        x = self.mid.2.forward(&x, &emb)?;
        for level in &self.up {
            for (j, r) in level.resnets.iter().enumerate() {
                let skip = skips.pop().ok_or_else(|| {
                    KernelError::shape("UNet2D::forward", "fewer skip connections than resnets")
                })?;
                x = r.forward(&Tensor::cat(&[&x, &skip], 1)?, &emb)?;
                if let Some(a) = level.attns.get(j) {
                    x = a.forward(&x)?;
                }
            }
            if let Some(u) = &level.resample {
                let (_, _, hh, ww) = x.dims4()?;
                x = u.forward(&x.upsample_nearest2d(hh * 2, ww * 2)?)?;
            }
        }
        let x = self.norm_out.forward(&x)?.silu()?;
        Ok(self.conv_out.forward(&x)?)
    }
}

/// A diffusers UNet behind tilt's `Denoiser` seam: tilt's training index n (1..=N) is
/// diffusers' timestep n - 1 (`alphas_cumprod[t]` = tilt's `abar[t + 1]`). The output is the
/// model's: eps for `prediction_type = "epsilon"`; wrap a v model in `denoiser::VPrediction`.
impl crate::denoiser::Denoiser for UNet2D {
    fn eps(&self, x: &Tensor, n: &Tensor, cond: Option<&Tensor>) -> Result<Tensor> {
        let t: Vec<f32> = n
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?
            .into_iter()
            .map(|n| (n - 1.0).max(0.0))
            .collect();
        self.forward(x, &t, cond)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"{"_class_name": "UNet2DModel", "block_out_channels": [8, 16],
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 4,
        "attention_head_dim": 4 EXTRA}"#;

    fn with(extra: &str) -> Result<UNet2DConfig> {
        UNet2DConfig::from_json(&BASE.replace("EXTRA", extra), "config.json")
    }

    #[test]
    fn config_reads_defaults_and_sizes() {
        let c = with(r#", "sample_size": [8, 12]"#).unwrap();
        assert_eq!(c.sample_size, (8, 12));
        assert_eq!(c.down_blocks, [BlockKind::Plain, BlockKind::Attn]);
        // diffusers' defaults where the file is silent: 3 channels in and out, 2 layers, silu.
        assert_eq!(
            (c.in_channels, c.out_channels, c.layers_per_block),
            (3, 3, 2)
        );
        assert_eq!(c.time_embed_dim(), 32);
        assert_eq!(
            with(r#", "sample_size": 16"#).unwrap().sample_size,
            (16, 16)
        );
    }

    #[test]
    fn what_tilt_does_not_implement_is_refused_by_name() {
        for (extra, key) in [
            (r#", "act_fn": "gelu""#, "act_fn"),
            (
                r#", "time_embedding_type": "fourier""#,
                "time_embedding_type",
            ),
            (
                r#", "resnet_time_scale_shift": "scale_shift""#,
                "resnet_time_scale_shift",
            ),
            (r#", "class_embed_type": "timestep""#, "class_embed_type"),
            (r#", "downsample_type": "resnet""#, "downsample_type"),
            (r#", "dropout": 0.1"#, "dropout"),
            (r#", "mid_block_type": null"#, "mid_block_type"),
            (r#", "some_new_key": 3"#, "some_new_key"),
            (r#", "norm_num_groups": 3"#, "norm_num_groups"),
            (r#", "attention_head_dim": 5"#, "attention_head_dim"),
        ] {
            // A later duplicate key wins in serde_json's map.
            let e = with(extra).unwrap_err().to_string();
            assert!(e.contains("config.json") && e.contains(key), "{key}: {e}");
        }
        let e = UNet2DConfig::from_json(
            &BASE
                .replace("EXTRA", "")
                .replace("AttnDownBlock2D", "SkipDownBlock2D"),
            "config.json",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("down_block_types") && e.contains("SkipDownBlock2D"),
            "{e}"
        );
        let e = UNet2DConfig::from_json(r#"{"_class_name": "UNet2DConditionModel"}"#, "c.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("_class_name"), "{e}");
    }
}
