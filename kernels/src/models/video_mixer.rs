//! A frame-token mixer denoiser for clips [batch, frames, C, H, W]: every frame is one token (its
//! C*H*W pixels, projected to `hidden`), with a learned frame-position embedding; each block adds
//! the time embedding, applies a per-frame MLP (the same weights for every frame: a frame's content)
//! and a token-mixing MLP over the frames (the same weights for every channel: how the frames of a
//! clip relate). MLP-Mixer (Tolstikhin et al., 2021) with frames as tokens.
//!
//! Why next to the conv net (`video`): on the CPU every matrix here is a dense GEMM, so a step at
//! batch 32 costs a few tens of milliseconds where the factorised conv net's row gathers cost
//! ~0.1 s at batch 12; the clips of the procedural data are small (16x16) and hold one object, so a
//! dense map per frame is enough to place it. Measured in the README ("DF-DPO on video").

use candle_core::{Module, Tensor, D};
use candle_nn::{Init, Linear, VarBuilder};

use super::unet::{check_n_cond, TimeEmbed};
use crate::denoiser::Denoiser;
use crate::{KernelError, Result};

/// Shape of a mixer denoiser.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixerConfig {
    /// Frames per clip T, in 1..=64.
    pub frames: usize,
    /// Channels per frame C.
    pub channels: usize,
    /// Frame side H = W.
    pub size: usize,
    /// Width of a frame token.
    pub hidden: usize,
    /// Number of mixer blocks (>= 1).
    pub depth: usize,
    /// Width of the sinusoidal time embedding (even).
    pub time_dim: usize,
    /// Initialise the output layer to zero (residual of a policy).
    pub zero_init_output: bool,
}

impl MixerConfig {
    /// Check every field; the error names the offending key.
    pub fn validate(&self) -> Result<()> {
        if !(1..=64).contains(&self.frames) {
            return Err(KernelError::param(
                "video.frames",
                self.frames,
                "must be in 1..=64",
            ));
        }
        if self.channels == 0 || self.size == 0 {
            return Err(KernelError::param(
                "video.size",
                format!("{} channels, side {}", self.channels, self.size),
                "must be positive",
            ));
        }
        if !(8..=4096).contains(&self.hidden) {
            return Err(KernelError::param(
                "video.hidden",
                self.hidden,
                "must be in 8..=4096",
            ));
        }
        if !(1..=32).contains(&self.depth) {
            return Err(KernelError::param(
                "video.depth",
                self.depth,
                "must be in 1..=32",
            ));
        }
        if self.time_dim == 0 || self.time_dim % 2 != 0 {
            return Err(KernelError::param(
                "video.time_dim",
                self.time_dim,
                "must be even and positive",
            ));
        }
        Ok(())
    }

    fn frame_len(&self) -> usize {
        self.channels * self.size * self.size
    }
}

/// RMS normalisation over the last dimension with a learned gain (starts at 1).
pub(crate) struct RmsNorm {
    gain: Tensor,
}

impl RmsNorm {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            gain: vb.get_with_hints(dim, "gain", Init::Const(1.0))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        let y = x.broadcast_div(&(ms + 1e-6)?.sqrt()?)?;
        Ok(y.broadcast_mul(&self.gain)?)
    }
}

/// One block: h += frame_mlp(norm(h) + emb); h += token_mix(norm(h)) over the frames.
pub(crate) struct MixerBlock {
    emb: Linear,
    norm1: RmsNorm,
    fc1: Linear,
    fc2: Linear,
    norm2: RmsNorm,
    tok1: Linear,
    tok2: Linear,
}

impl MixerBlock {
    pub(crate) fn new(
        hidden: usize,
        frames: usize,
        emb_dim: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let tok_hidden = 4 * frames;
        Ok(Self {
            emb: candle_nn::linear(emb_dim, hidden, vb.pp("emb"))?,
            norm1: RmsNorm::new(hidden, vb.pp("norm1"))?,
            fc1: candle_nn::linear(hidden, hidden, vb.pp("fc1"))?,
            fc2: candle_nn::linear(hidden, hidden, vb.pp("fc2"))?,
            norm2: RmsNorm::new(hidden, vb.pp("norm2"))?,
            tok1: candle_nn::linear(frames, tok_hidden, vb.pp("tok1"))?,
            tok2: candle_nn::linear(tok_hidden, frames, vb.pp("tok2"))?,
        })
    }

    /// `h`: [b, T, hidden]; `emb`: [b, emb_dim].
    pub(crate) fn forward(&self, h: &Tensor, emb: &Tensor) -> Result<Tensor> {
        let (b, t, hd) = h.dims3()?;
        let e = self.emb.forward(emb)?.unsqueeze(1)?; // [b, 1, hidden]
        let u = self.norm1.forward(h)?.broadcast_add(&e)?;
        let u = u.reshape((b * t, hd))?;
        let u = self
            .fc2
            .forward(&candle_nn::ops::silu(&self.fc1.forward(&u)?)?)?;
        let h = (h + u.reshape((b, t, hd))?)?;
        // Token mixing: frames are the features, (clip, channel) the rows.
        let v = self
            .norm2
            .forward(&h)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * hd, t))?;
        let v = self
            .tok2
            .forward(&candle_nn::ops::silu(&self.tok1.forward(&v)?)?)?;
        let v = v.reshape((b, hd, t))?.transpose(1, 2)?;
        Ok((h + v)?)
    }
}

/// A global pathway for a conv net: each frame's whole feature map [D] is one token, projected to
/// `width`, passed through one [`MixerBlock`] (every pixel of every frame of the clip reaches every
/// other) and projected back as a residual whose last layer starts at zero (the block starts as
/// the identity). It lets a conv net decide "one object per frame, on one track" globally, where
/// its receptive field is local.
pub(crate) struct GlobalBlock {
    norm: RmsNorm,
    down: Linear,
    pos: Tensor,
    block: MixerBlock,
    up: Linear,
}

impl GlobalBlock {
    pub(crate) fn new(
        dim: usize,
        width: usize,
        frames: usize,
        emb_dim: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let w = vb
            .pp("up")
            .get_with_hints((dim, width), "weight", Init::Const(0.0))?;
        let b = vb.pp("up").get_with_hints(dim, "bias", Init::Const(0.0))?;
        Ok(Self {
            norm: RmsNorm::new(dim, vb.pp("norm"))?,
            down: candle_nn::linear(dim, width, vb.pp("down"))?,
            pos: vb.get_with_hints(
                (frames, width),
                "pos",
                Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            )?,
            block: MixerBlock::new(width, frames, emb_dim, vb.pp("block"))?,
            up: Linear::new(w, Some(b)),
        })
    }

    /// `h`: [b, frames, dim]; `emb`: [b, emb_dim].
    pub(crate) fn forward(&self, h: &Tensor, emb: &Tensor) -> Result<Tensor> {
        let (b, f, d) = h.dims3()?;
        let u = self
            .down
            .forward(&self.norm.forward(h)?.reshape((b * f, d))?)?;
        let w = u.dim(1)?;
        let u = u
            .reshape((b, f, w))?
            .broadcast_add(&self.pos.unsqueeze(0)?)?;
        let u = self.block.forward(&u, emb)?.reshape((b * f, w))?;
        Ok((h + self.up.forward(&u)?.reshape((b, f, d))?)?)
    }
}

/// in (per frame) + frame position -> blocks -> norm, SiLU, out (per frame) -> eps.
pub struct VideoMixer {
    cfg: MixerConfig,
    temb: TimeEmbed,
    input: Linear,
    pos: Tensor,
    blocks: Vec<MixerBlock>,
    norm_out: RmsNorm,
    out: Linear,
    /// A linear map from each input frame straight to its output (the near-identity the eps
    /// prediction needs at low noise, where eps is mostly the input's own high frequencies).
    skip: Linear,
}

impl VideoMixer {
    /// Build the network with its variables in `vb`; the config is validated first.
    pub fn new(cfg: MixerConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let (hd, fl) = (cfg.hidden, cfg.frame_len());
        let emb_dim = 4 * cfg.time_dim;
        let blocks = (0..cfg.depth)
            .map(|i| MixerBlock::new(hd, cfg.frames, emb_dim, vb.pp(format!("block{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let out = if cfg.zero_init_output {
            let w = vb
                .pp("out")
                .get_with_hints((fl, hd), "weight", Init::Const(0.0))?;
            let b = vb.pp("out").get_with_hints(fl, "bias", Init::Const(0.0))?;
            Linear::new(w, Some(b))
        } else {
            candle_nn::linear(hd, fl, vb.pp("out"))?
        };
        Ok(Self {
            temb: TimeEmbed::new(cfg.time_dim, emb_dim, 0, vb.pp("temb"))?,
            input: candle_nn::linear(fl, hd, vb.pp("input"))?,
            pos: vb.get_with_hints(
                (cfg.frames, hd),
                "pos",
                Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            )?,
            blocks,
            norm_out: RmsNorm::new(hd, vb.pp("norm_out"))?,
            out,
            skip: {
                let init = if cfg.zero_init_output {
                    Init::Const(0.0)
                } else {
                    candle_nn::init::DEFAULT_KAIMING_NORMAL
                };
                let w = vb.pp("skip").get_with_hints((fl, fl), "weight", init)?;
                Linear::new(w, None)
            },
            cfg,
        })
    }

    /// The configuration this network was built with.
    pub fn config(&self) -> &MixerConfig {
        &self.cfg
    }
}

impl Denoiser for VideoMixer {
    /// `x`: [batch, frames, channels, size, size]. Unconditional: `cond` is only shape-checked.
    fn eps(&self, x: &Tensor, n: &Tensor, cond: Option<&Tensor>) -> Result<Tensor> {
        let MixerConfig {
            frames: f,
            channels: ch,
            size: s,
            hidden: hd,
            ..
        } = self.cfg;
        if x.rank() != 5 || x.dims()[1..] != [f, ch, s, s] {
            return Err(KernelError::shape(
                "VideoMixer::eps",
                format!("x is {:?}, expected [batch, {f}, {ch}, {s}, {s}]", x.dims()),
            ));
        }
        let b = x.dim(0)?;
        check_n_cond("VideoMixer::eps", b, n, cond)?;
        let emb = self.temb.forward(n, None)?;
        let rows = x.reshape((b * f, ch * s * s))?;
        let mut h = self
            .input
            .forward(&rows)?
            .reshape((b, f, hd))?
            .broadcast_add(&self.pos.unsqueeze(0)?)?;
        for block in &self.blocks {
            h = block.forward(&h, &emb)?;
        }
        let h = candle_nn::ops::silu(&self.norm_out.forward(&h)?)?;
        let out = (self.out.forward(&h.reshape((b * f, hd))?)? + self.skip.forward(&rows)?)?;
        Ok(out.reshape((b, f, ch, s, s))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    fn cfg(zero: bool) -> MixerConfig {
        MixerConfig {
            frames: 4,
            channels: 1,
            size: 4,
            hidden: 16,
            depth: 2,
            time_dim: 8,
            zero_init_output: zero,
        }
    }

    /// A mixer of `cfg(zero)` on the CPU (its weights live on in the model's tensors).
    fn mixer(zero: bool) -> VideoMixer {
        let vm = VarMap::new();
        VideoMixer::new(cfg(zero), crate::testutil::vb(&vm, 1, &Device::Cpu)).unwrap()
    }

    #[test]
    fn shapes_and_zero_init() {
        let m = mixer(true);
        let x = crate::rng::randn(
            &mut crate::rng::rng_for(101, 0, 0),
            (3, 4, 1, 4, 4),
            &Device::Cpu,
        )
        .unwrap();
        let n = Tensor::new(&[1f32, 500.0, 999.0], &Device::Cpu).unwrap();
        let e = m.eps(&x, &n, None).unwrap();
        assert_eq!(e.dims(), &[3, 4, 1, 4, 4]);
        let max = crate::testutil::max_abs_diff(&e, &e.zeros_like().unwrap());
        assert_eq!(max, 0.0, "zero_init_output must give exactly 0");
        assert!(m.eps(&x.narrow(1, 0, 3).unwrap(), &n, None).is_err());
    }

    /// The frames mix: changing frame 0 changes the output at frame 3 (token mixing reaches every
    /// frame in one block), and each sample's output depends on its own input only.
    #[test]
    fn frames_mix_within_a_clip_and_clips_stay_apart() {
        let m = mixer(false);
        let x = crate::rng::randn(
            &mut crate::rng::rng_for(102, 0, 0),
            (2, 4, 1, 4, 4),
            &Device::Cpu,
        )
        .unwrap();
        let n = Tensor::new(&[10f32, 10.0], &Device::Cpu).unwrap();
        let a = m.eps(&x, &n, None).unwrap();
        let bump = Tensor::zeros((2, 4, 1, 4, 4), DType::F32, &Device::Cpu)
            .unwrap()
            .slice_assign(
                &[0..1, 0..1, 0..1, 0..4, 0..4],
                &Tensor::ones((1, 1, 1, 4, 4), DType::F32, &Device::Cpu).unwrap(),
            )
            .unwrap();
        let b = m.eps(&(&x + bump).unwrap(), &n, None).unwrap();
        let d = (b - &a).unwrap().abs().unwrap();
        let frame3 = d.get(0).unwrap().get(3).unwrap().max_all().unwrap();
        let other = d.get(1).unwrap().max_all().unwrap();
        assert!(frame3.to_scalar::<f32>().unwrap() > 1e-6);
        assert_eq!(other.to_scalar::<f32>().unwrap(), 0.0);
    }

    /// A global block starts as the identity (its output layer is zero), and once that layer is
    /// not, a change in frame 0 reaches frame 3 and never the other clip.
    #[test]
    fn global_block_starts_as_identity_then_mixes_frames() {
        let vm = VarMap::new();
        let g = GlobalBlock::new(12, 16, 4, 8, crate::testutil::vb(&vm, 2, &Device::Cpu)).unwrap();
        let h = crate::rng::randn(
            &mut crate::rng::rng_for(103, 0, 0),
            (2, 4, 12),
            &Device::Cpu,
        )
        .unwrap();
        let emb =
            crate::rng::randn(&mut crate::rng::rng_for(104, 0, 0), (2, 8), &Device::Cpu).unwrap();
        use crate::testutil::flat;
        assert_eq!(flat(&g.forward(&h, &emb).unwrap()), flat(&h));
        let up = vm.data().lock().unwrap()["up.weight"].clone();
        up.set(
            &crate::rng::randn(&mut crate::rng::rng_for(105, 0, 0), (12, 16), &Device::Cpu)
                .unwrap(),
        )
        .unwrap();
        let a = g.forward(&h, &emb).unwrap();
        let bump = Tensor::zeros((2, 4, 12), DType::F32, &Device::Cpu)
            .unwrap()
            .slice_assign(
                &[0..1, 0..1, 0..12],
                &Tensor::ones((1, 1, 12), DType::F32, &Device::Cpu).unwrap(),
            )
            .unwrap();
        let b = g.forward(&(&h + bump).unwrap(), &emb).unwrap();
        let d = (b - a).unwrap().abs().unwrap();
        let frame3 = d.get(0).unwrap().get(3).unwrap().max_all().unwrap();
        assert!(frame3.to_scalar::<f32>().unwrap() > 1e-6);
        let other = d.get(1).unwrap().max_all().unwrap();
        assert_eq!(other.to_scalar::<f32>().unwrap(), 0.0);
    }
}
