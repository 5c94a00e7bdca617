//! A small class-conditioned conv U-Net denoiser for images [batch, C, H, W]: two 2x downsamplings,
//! residual blocks with a per-channel time (+ class) bias, skips by concatenation. With
//! `zero_init_output = true` it outputs exactly zero (the residual of a policy).
//!
//! Activations live as pixel rows [images*h*w, channels] and every 3x3 conv is one row gather
//! (`index_select`, im2col with a shared zero row as padding) and one matmul: on this CPU that is
//! several times faster than candle 0.11's `conv2d` for small images, forward and backward.
//! Strided convs and nearest 2x upsampling are folded into the gather tables. On CUDA the same
//! convs run as candle's `conv2d` instead (see [`Taps`]): same function, tested against the gather.

use candle_core::{Device, Module, Tensor};
use candle_nn::{Init, Linear, VarBuilder};

use crate::denoiser::{time_embedding, Denoiser};
use crate::{KernelError, Result};

fn default_base() -> usize {
    32
}

fn default_time_dim() -> usize {
    32
}

/// Shape of a U-Net denoiser.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UNetConfig {
    /// Image channels C (1 = grey, 3 = RGB).
    pub channels: usize,
    /// Image side H = W, in 8..=32 and divisible by 4 (two 2x downsamplings).
    pub size: usize,
    /// Feature channels at full resolution; the two lower levels use 2x this.
    #[serde(default = "default_base")]
    pub base: usize,
    /// Width of the sinusoidal time embedding (even).
    #[serde(default = "default_time_dim")]
    pub time_dim: usize,
    /// Number of classes for conditioning (0 = unconditional).
    #[serde(default)]
    pub classes: usize,
    /// Initialise the output conv to zero (residual of a policy).
    #[serde(default)]
    pub zero_init_output: bool,
}

impl UNetConfig {
    /// Check every field; the error names the offending key.
    pub fn validate(&self) -> Result<()> {
        if !(8..=32).contains(&self.size) || self.size % 4 != 0 {
            return Err(KernelError::param(
                "unet.size",
                self.size,
                "must be in 8..=32 and divisible by 4 (two 2x downsamplings)",
            ));
        }
        super::validate_widths(
            ["unet.channels", "unet.base", "unet.time_dim"],
            self.channels,
            self.base,
            self.time_dim,
        )
    }
}

/// How a 3x3 conv samples its square input: at the same size, with stride 2 (side / 2), or
/// after a nearest-neighbour 2x upsample (side * 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resample {
    Same,
    Down,
    Up,
}

fn u32_table(t: Vec<usize>, device: &Device) -> Result<Tensor> {
    let t = t
        .into_iter()
        .map(u32::try_from)
        .collect::<std::result::Result<Vec<u32>, _>>()
        .map_err(|_| {
            KernelError::shape("gather table", "more than 2^32 pixel rows in one batch")
        })?;
    let len = t.len();
    Ok(Tensor::from_vec(t, len, device)?)
}

/// Gather table of a 3x3 conv (padding 1) over `images` square images of side `side` stored as
/// pixel rows (image, y, x): 9 input rows per output pixel, tap order (dy, dx) row-major; a tap
/// outside the image points at row `images * side^2`, the zero row appended by [`PixelConv`].
fn conv3x3_table(
    images: usize,
    side: usize,
    resample: Resample,
    device: &Device,
) -> Result<Tensor> {
    let out = match resample {
        Resample::Same => side,
        Resample::Down => side / 2,
        Resample::Up => side * 2,
    };
    let (si, so) = (side as isize, out as isize);
    let pad = images * side * side;
    let mut t = Vec::with_capacity(images * out * out * 9);
    for img in 0..images {
        let base = img * side * side;
        for i in 0..so {
            for j in 0..so {
                for dy in -1..=1 {
                    for dx in -1..=1 {
                        let (y, x) = match resample {
                            Resample::Same => (i + dy, j + dx),
                            Resample::Down => (2 * i + dy, 2 * j + dx),
                            // Tap the upsampled image at (i+dy, j+dx); its pixel comes from
                            // ((i+dy)/2, (j+dx)/2), padding outside the upsampled image.
                            Resample::Up => {
                                let (u, v) = (i + dy, j + dx);
                                if u < 0 || v < 0 || u >= so || v >= so {
                                    (-1, -1)
                                } else {
                                    (u / 2, v / 2)
                                }
                            }
                        };
                        let inside = (0..si).contains(&y) && (0..si).contains(&x);
                        t.push(if inside {
                            base + (y * si + x) as usize
                        } else {
                            pad
                        });
                    }
                }
            }
        }
    }
    u32_table(t, device)
}

/// Gather table of a kernel-3 conv over time (padding 1) for pixel rows (clip, frame, pixel):
/// 3 input rows (frame - 1, frame, frame + 1) per row; outside the clip, the zero row.
fn temporal_table(clips: usize, frames: usize, pixels: usize, device: &Device) -> Result<Tensor> {
    let pad = clips * frames * pixels;
    let mut t = Vec::with_capacity(pad * 3);
    for c in 0..clips {
        for f in 0..frames {
            for q in 0..pixels {
                for df in [-1isize, 0, 1] {
                    let g = f as isize + df;
                    t.push(if (0..frames as isize).contains(&g) {
                        (c * frames + g as usize) * pixels + q
                    } else {
                        pad
                    });
                }
            }
        }
    }
    u32_table(t, device)
}

/// The geometry of a [`PixelConv`]'s input rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Geom {
    /// A 3x3 conv (padding 1) over `images` square images of side `side`, rows (image, y, x).
    Grid {
        images: usize,
        side: usize,
        resample: Resample,
    },
    /// A kernel-3 conv over time (padding 1), rows (clip, frame, pixel).
    Time {
        clips: usize,
        frames: usize,
        pixels: usize,
    },
}

/// What a [`PixelConv`] reads: its geometry, and on the gather path the gather table.
///
/// Two paths compute the same conv (tested against each other, values and gradients):
/// - **gather** (CPU): the table's `index_select` (im2col) and a matmul, several times faster
///   than candle 0.11's CPU `conv2d` at these image sizes;
/// - **conv2d** (CUDA): candle's `conv2d` on [images, cin, h, w]. On CUDA the gather path would be
///   unusable at learner batches: candle's backward of `index_select` (its `index_add` kernel)
///   runs one thread per channel, each looping over every gathered row (~47 M rows per 8x8 conv
///   at the U-Net bench's batch 4096), the table is built on the host and uploaded each forward,
///   and the gathered columns stay alive for the backward (~12 GB a conv there).
#[derive(Debug, Clone)]
pub(crate) struct Taps {
    geom: Geom,
    device: Device,
    /// `Some` on the gather path.
    table: Option<Tensor>,
}

impl Taps {
    /// The gather table is built only where the gather path runs (not on CUDA).
    fn new(geom: Geom, device: &Device) -> Result<Self> {
        let table = match geom {
            _ if crate::denoiser::cuda_forms(device) => None,
            Geom::Grid {
                images,
                side,
                resample,
            } => Some(conv3x3_table(images, side, resample, device)?),
            Geom::Time {
                clips,
                frames,
                pixels,
            } => Some(temporal_table(clips, frames, pixels, device)?),
        };
        Ok(Self {
            geom,
            device: device.clone(),
            table,
        })
    }

    /// The device the taps were built for.
    pub(crate) fn device(&self) -> &Device {
        &self.device
    }
}

/// The taps of a 3x3 conv (padding 1) over `images` square images of side `side` stored as pixel
/// rows (image, y, x), resampled by `resample` (see [`conv3x3_table`] for the gather table).
pub(crate) fn conv3x3_taps(
    images: usize,
    side: usize,
    resample: Resample,
    device: &Device,
) -> Result<Taps> {
    let geom = Geom::Grid {
        images,
        side,
        resample,
    };
    Taps::new(geom, device)
}

/// The taps of a kernel-3 conv over time (padding 1) for pixel rows (clip, frame, pixel).
pub(crate) fn temporal_taps(
    clips: usize,
    frames: usize,
    pixels: usize,
    device: &Device,
) -> Result<Taps> {
    let geom = Geom::Time {
        clips,
        frames,
        pixels,
    };
    Taps::new(geom, device)
}

/// A conv as gather + matmul: the table picks `taps` input rows per output row (im2col), a
/// Linear of `taps * cin -> cout` mixes them. The weight is [cout, taps * cin] (Kaiming fan-in).
pub(crate) struct PixelConv {
    lin: Linear,
    cin: usize,
    taps: usize,
}

impl PixelConv {
    /// `zero`: weight and bias start at 0.0, so the output is +0.0 everywhere (a sum of ±0
    /// products plus a +0 bias is +0 in IEEE arithmetic).
    pub(crate) fn new(
        cin: usize,
        cout: usize,
        taps: usize,
        zero: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let lin = if zero {
            let w = vb.get_with_hints((cout, taps * cin), "weight", Init::Const(0.0))?;
            let b = vb.get_with_hints(cout, "bias", Init::Const(0.0))?;
            Linear::new(w, Some(b))
        } else {
            candle_nn::linear(taps * cin, cout, vb)?
        };
        Ok(Self { lin, cin, taps })
    }

    /// `x`: [n_in, cin] rows in the layout of `taps`. -> [n_out, cout].
    pub(crate) fn forward(&self, x: &Tensor, taps: &Taps) -> Result<Tensor> {
        match &taps.table {
            Some(table) => self.forward_gather(x, table),
            None => self.forward_conv2d(x, taps.geom),
        }
    }

    /// `table`: [n_out * taps] rows of x (n_in = the zero row).
    fn forward_gather(&self, x: &Tensor, table: &Tensor) -> Result<Tensor> {
        let n_out = table.dim(0)? / self.taps;
        let zero = Tensor::zeros((1, self.cin), x.dtype(), x.device())?;
        let cols = Tensor::cat(&[x, &zero], 0)?
            .index_select(table, 0)? // [n_out * taps, cin]
            .reshape((n_out, self.taps * self.cin))?;
        Ok(self.lin.forward(&cols)?)
    }

    /// The same conv through candle's `conv2d`: rows to [n, cin, h, w], the weight's (tap, cin)
    /// columns to a [cout, cin, kh, kw] kernel, and back to rows.
    fn forward_conv2d(&self, x: &Tensor, geom: Geom) -> Result<Tensor> {
        let cin = self.cin;
        let w = self.lin.weight(); // [cout, taps * cin], taps in (dy, dx) or (df) order
        let cout = w.dim(0)?;
        let y = match geom {
            Geom::Grid {
                images,
                side,
                resample,
            } => {
                let img = x
                    .reshape((images, side, side, cin))?
                    .permute((0, 3, 1, 2))?;
                let (img, stride) = match resample {
                    Resample::Same => (img.contiguous()?, 1),
                    Resample::Down => (img.contiguous()?, 2),
                    // Nearest 2x upsample as a broadcast (its backward is a sum).
                    Resample::Up => (
                        img.reshape((images, cin, side, 1, side, 1))?
                            .broadcast_as((images, cin, side, 2, side, 2))?
                            .reshape((images, cin, 2 * side, 2 * side))?,
                        1,
                    ),
                };
                let kernel = w
                    .reshape((cout, 3, 3, cin))?
                    .permute((0, 3, 1, 2))?
                    .contiguous()?;
                img.conv2d(&kernel, 1, stride, 1, 1)? // [images, cout, h, w]
            }
            Geom::Time {
                clips,
                frames,
                pixels,
            } => {
                // Frames as the height, pixels as a width the kernel (3 x 1) does not mix;
                // candle pads both dims, so the two padded columns are cut off again.
                let v = x
                    .reshape((clips, frames, pixels, cin))?
                    .permute((0, 3, 1, 2))?
                    .contiguous()?;
                let kernel = w
                    .reshape((cout, 3, cin))?
                    .permute((0, 2, 1))?
                    .reshape((cout, cin, 3, 1))?
                    .contiguous()?;
                v.conv2d(&kernel, 1, 1, 1, 1)?.narrow(3, 1, pixels)?
            }
        };
        let (n, _, h, wd) = y.dims4()?;
        let rows = y.permute((0, 2, 3, 1))?.reshape((n * h * wd, cout))?;
        Ok(match self.lin.bias() {
            Some(b) => rows.broadcast_add(b)?,
            None => rows,
        })
    }

    /// The same conv with weight `w` [cout, taps * cin] and no bias (tests against candle).
    #[cfg(test)]
    pub(crate) fn with_weight(self, w: Tensor) -> Self {
        Self {
            lin: Linear::new(w, None),
            ..self
        }
    }
}

/// GroupNorm over pixel rows: statistics per (sample, group) over all of a sample's rows. The
/// sums are batched matmuls with a ones row, much cheaper in candle than a middle-axis reduction.
pub(crate) struct PixelNorm {
    gamma: Tensor,
    beta: Tensor,
    groups: usize,
}

impl PixelNorm {
    /// `ch` channels in the largest of 8, 4, 2, 1 groups that divides it; affine starts at (1, 0).
    pub(crate) fn new(ch: usize, vb: VarBuilder) -> Result<Self> {
        let groups = [8, 4, 2, 1].into_iter().find(|g| ch % g == 0).unwrap_or(1);
        Ok(Self {
            gamma: vb.get_with_hints(ch, "weight", Init::Const(1.0))?,
            beta: vb.get_with_hints(ch, "bias", Init::Const(0.0))?,
            groups,
        })
    }

    /// `x`: [samples * rows, ch] -> same shape, normalised per sample and group.
    pub(crate) fn forward(&self, x: &Tensor, samples: usize) -> Result<Tensor> {
        let (n, c) = x.dims2()?;
        let (p, g) = (n / samples, self.groups);
        let cg = c / g;
        let x3 = x.reshape((samples, p, c))?;
        let ones = Tensor::ones((samples, 1, p), x.dtype(), x.device())?;
        let count = (p * cg) as f64;
        // [samples, g, 1] means of x and x^2.
        let mean = (ones
            .matmul(&x3)?
            .reshape((samples, g, cg))?
            .sum_keepdim(2)?
            / count)?;
        let msq = (ones
            .matmul(&x3.sqr()?)?
            .reshape((samples, g, cg))?
            .sum_keepdim(2)?
            / count)?;
        let var = (msq - mean.sqr()?)?.relu()?;
        let rstd = (var + 1e-5)?.sqrt()?.recip()?;
        let per_channel = |t: &Tensor| -> Result<Tensor> {
            Ok(t.broadcast_as((samples, g, cg))?.reshape((samples, 1, c))?)
        };
        let scale = per_channel(&rstd)?.broadcast_mul(&self.gamma.reshape((1, 1, c))?)?;
        let shift = self
            .beta
            .reshape((1, 1, c))?
            .broadcast_sub(&(per_channel(&mean)? * &scale)?)?;
        Ok(x3
            .broadcast_mul(&scale)?
            .broadcast_add(&shift)?
            .reshape((n, c))?)
    }
}

/// Pre-activation residual block on pixel rows: GN, SiLU, conv3x3, + per-channel embedding bias,
/// GN, SiLU, conv3x3, plus a 1x1 conv (a Linear on rows) on the skip path when channels change.
pub(crate) struct ResBlock {
    norm1: PixelNorm,
    conv1: PixelConv,
    emb: Linear,
    norm2: PixelNorm,
    conv2: PixelConv,
    skip: Option<Linear>,
}

impl ResBlock {
    /// `emb_dim`: width of the (already SiLU-activated) embedding passed to `forward`.
    pub(crate) fn new(cin: usize, cout: usize, emb_dim: usize, vb: VarBuilder) -> Result<Self> {
        let skip = if cin != cout {
            Some(candle_nn::linear(cin, cout, vb.pp("skip"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: PixelNorm::new(cin, vb.pp("norm1"))?,
            conv1: PixelConv::new(cin, cout, 9, false, vb.pp("conv1"))?,
            emb: candle_nn::linear(emb_dim, cout, vb.pp("emb"))?,
            norm2: PixelNorm::new(cout, vb.pp("norm2"))?,
            conv2: PixelConv::new(cout, cout, 9, false, vb.pp("conv2"))?,
            skip,
        })
    }

    /// `x`: [samples * rows, cin]; `emb`: [samples, emb_dim]; `taps`: a same-size 3x3 conv's.
    /// Norm statistics and the bias are per sample. Returns [samples * rows, cout].
    pub(crate) fn forward(&self, x: &Tensor, emb: &Tensor, taps: &Taps) -> Result<Tensor> {
        let samples = emb.dim(0)?;
        let h = self.conv1.forward(
            &candle_nn::ops::silu(&self.norm1.forward(x, samples)?)?,
            taps,
        )?;
        let (n, cout) = h.dims2()?;
        let bias = self.emb.forward(emb)?.unsqueeze(1)?; // [samples, 1, cout]
        let h = h
            .reshape((samples, n / samples, cout))?
            .broadcast_add(&bias)?
            .reshape((n, cout))?;
        let h = self.conv2.forward(
            &candle_nn::ops::silu(&self.norm2.forward(&h, samples)?)?,
            taps,
        )?;
        let skip = match &self.skip {
            Some(s) => s.forward(x)?,
            None => x.clone(),
        };
        Ok((skip + h)?)
    }
}

/// Sinusoidal time embedding (+ class embedding) -> Linear -> SiLU: the embedding every block
/// turns into its per-channel bias.
pub(crate) struct TimeEmbed {
    time_dim: usize,
    proj: Linear,
    class_emb: Option<candle_nn::Embedding>,
}

impl TimeEmbed {
    /// Embedding of width `emb_dim` from a `time_dim` sinusoid; a class table when `classes > 0`.
    pub(crate) fn new(
        time_dim: usize,
        emb_dim: usize,
        classes: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let class_emb = if classes > 0 {
            Some(candle_nn::embedding(classes, time_dim, vb.pp("class"))?)
        } else {
            None
        };
        Ok(Self {
            time_dim,
            proj: candle_nn::linear(time_dim, emb_dim, vb.pp("proj"))?,
            class_emb,
        })
    }

    /// `n`: [batch] f32; `cond`: optional [batch] u32. Returns [batch, emb_dim].
    pub(crate) fn forward(&self, n: &Tensor, cond: Option<&Tensor>) -> Result<Tensor> {
        let mut t = time_embedding(n, self.time_dim)?; // [batch, time_dim]
        if let (Some(emb), Some(c)) = (&self.class_emb, cond) {
            t = (t + crate::denoiser::class_embedding(emb, c)?)?;
        }
        Ok(candle_nn::ops::silu(&self.proj.forward(&t)?)?)
    }
}

/// Check that `n` (and `cond`, when given) are [batch] vectors.
pub(crate) fn check_n_cond(
    op: &'static str,
    batch: usize,
    n: &Tensor,
    cond: Option<&Tensor>,
) -> Result<()> {
    if n.dims() != [batch] {
        return Err(KernelError::shape(
            op,
            format!("n is {:?}, expected [{batch}]", n.dims()),
        ));
    }
    if let Some(c) = cond {
        if c.dims() != [batch] {
            return Err(KernelError::shape(
                op,
                format!("cond is {:?}, expected [{batch}]", c.dims()),
            ));
        }
    }
    Ok(())
}

/// conv in -> [res @ S] -> down -> [res @ S/2] -> down -> [res @ S/4] -> up, cat skip ->
/// [res @ S/2] -> up, cat skip -> [res @ S] -> GN, SiLU, conv out -> eps. Channels: base at S,
/// 2 base below. Down = 3x3 conv with stride 2; up = nearest 2x upsample then 3x3 conv.
pub struct UNetDenoiser {
    cfg: UNetConfig,
    temb: TimeEmbed,
    conv_in: PixelConv,
    down0: ResBlock,
    pool0: PixelConv,
    down1: ResBlock,
    pool1: PixelConv,
    mid: ResBlock,
    up1_conv: PixelConv,
    up1: ResBlock,
    up0_conv: PixelConv,
    up0: ResBlock,
    norm_out: PixelNorm,
    conv_out: PixelConv,
}

impl UNetDenoiser {
    /// Build the network with its variables in `vb`; the config is validated first.
    pub fn new(cfg: UNetConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let (c, c2) = (cfg.base, 2 * cfg.base);
        let e = 4 * cfg.base;
        Ok(Self {
            temb: TimeEmbed::new(cfg.time_dim, e, cfg.classes, vb.pp("temb"))?,
            conv_in: PixelConv::new(cfg.channels, c, 9, false, vb.pp("conv_in"))?,
            down0: ResBlock::new(c, c, e, vb.pp("down0"))?,
            pool0: PixelConv::new(c, c, 9, false, vb.pp("pool0"))?,
            down1: ResBlock::new(c, c2, e, vb.pp("down1"))?,
            pool1: PixelConv::new(c2, c2, 9, false, vb.pp("pool1"))?,
            mid: ResBlock::new(c2, c2, e, vb.pp("mid"))?,
            up1_conv: PixelConv::new(c2, c2, 9, false, vb.pp("up1_conv"))?,
            up1: ResBlock::new(2 * c2, c2, e, vb.pp("up1"))?,
            up0_conv: PixelConv::new(c2, c, 9, false, vb.pp("up0_conv"))?,
            up0: ResBlock::new(2 * c, c, e, vb.pp("up0"))?,
            norm_out: PixelNorm::new(c, vb.pp("norm_out"))?,
            conv_out: PixelConv::new(c, cfg.channels, 9, cfg.zero_init_output, vb.pp("conv_out"))?,
            cfg,
        })
    }

    /// The configuration this network was built with.
    pub fn config(&self) -> &UNetConfig {
        &self.cfg
    }
}

impl Denoiser for UNetDenoiser {
    /// `x`: [batch, channels, size, size]. `cond` is used when `classes > 0` (labels must be
    /// < classes, else an error) and ignored otherwise.
    fn eps(&self, x: &Tensor, n: &Tensor, cond: Option<&Tensor>) -> Result<Tensor> {
        let (ch, s) = (self.cfg.channels, self.cfg.size);
        if x.rank() != 4 || x.dims()[1..] != [ch, s, s] {
            return Err(KernelError::shape(
                "UNetDenoiser::eps",
                format!("x is {:?}, expected [batch, {ch}, {s}, {s}]", x.dims()),
            ));
        }
        let b = x.dim(0)?;
        check_n_cond("UNetDenoiser::eps", b, n, cond)?;
        let dev = x.device();
        let same0 = conv3x3_taps(b, s, Resample::Same, dev)?;
        let same1 = conv3x3_taps(b, s / 2, Resample::Same, dev)?;
        let same2 = conv3x3_taps(b, s / 4, Resample::Same, dev)?;

        let emb = self.temb.forward(n, cond)?; // [b, 4 base]
        let rows = x.permute((0, 2, 3, 1))?.reshape((b * s * s, ch))?; // [b*s*s, ch]
        let h = self.conv_in.forward(&rows, &same0)?; // [b*s*s, base]
        let skip0 = self.down0.forward(&h, &emb, &same0)?;
        let h = self
            .pool0
            .forward(&skip0, &conv3x3_taps(b, s, Resample::Down, dev)?)?; // [b*(s/2)^2, base]
        let skip1 = self.down1.forward(&h, &emb, &same1)?; // [b*(s/2)^2, 2 base]
        let h = self
            .pool1
            .forward(&skip1, &conv3x3_taps(b, s / 2, Resample::Down, dev)?)?; // [b*(s/4)^2, 2 base]
        let h = self.mid.forward(&h, &emb, &same2)?;
        let h = self
            .up1_conv
            .forward(&h, &conv3x3_taps(b, s / 4, Resample::Up, dev)?)?; // [b*(s/2)^2, 2 base]
        let h = self
            .up1
            .forward(&Tensor::cat(&[&h, &skip1], 1)?, &emb, &same1)?;
        let h = self
            .up0_conv
            .forward(&h, &conv3x3_taps(b, s / 2, Resample::Up, dev)?)?; // [b*s*s, base]
        let h = self
            .up0
            .forward(&Tensor::cat(&[&h, &skip0], 1)?, &emb, &same0)?;
        let h = candle_nn::ops::silu(&self.norm_out.forward(&h, b)?)?;
        let out = self.conv_out.forward(&h, &same0)?; // [b*s*s, ch]
        Ok(out
            .reshape((b, s, s, ch))?
            .permute((0, 3, 1, 2))?
            .contiguous()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::denoiser::{load_weights, save_weights};
    use crate::rng::{randn, rng_for};
    use crate::schedule::VpSchedule;
    use candle_core::DType;
    use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};
    use rand::Rng;

    /// The zero-padded reference of a 3x3 conv through candle's own `conv2d`, for tests of the
    /// gather tables: `x` [n, cin, h, w], `w` [cout, 9 * cin] in (dy, dx, cin) order.
    fn conv2d_reference(x: &Tensor, w: &Tensor, stride: usize) -> Result<Tensor> {
        let (cout, k) = w.dims2()?;
        let cin = k / 9;
        let kernel = w
            .reshape((cout, 3, 3, cin))?
            .permute((0, 3, 1, 2))?
            .contiguous()?;
        Ok(x.conv2d(&kernel, 1, stride, 1, 1)?)
    }

    fn cfg(channels: usize, size: usize, classes: usize, zero: bool) -> UNetConfig {
        UNetConfig {
            channels,
            size,
            base: 16,
            time_dim: 16,
            classes,
            zero_init_output: zero,
        }
    }

    fn build(c: UNetConfig) -> (VarMap, UNetDenoiser) {
        let vm = VarMap::new();
        let m = UNetDenoiser::new(c, crate::testutil::vb(&vm, 1, &Device::Cpu)).unwrap();
        (vm, m)
    }

    use crate::testutil::{flat, max_abs_diff};

    #[test]
    fn gather_convs_match_candle_conv2d() {
        // The gather tables are the only hand-written indexing: check same-size, stride-2 and
        // upsample-then-conv against candle's conv2d (with an explicit nearest upsample) on
        // random data, on both paths (the conv2d path reshapes the weight and upsamples by a
        // broadcast). Same arithmetic up to summation order, so agreement to 1e-4.
        let d = Device::Cpu;
        let mut rng = rng_for(21, 0, 0);
        let (imgs, cin, cout, side) = (3, 5, 4, 8);
        let x = randn(&mut rng, (imgs, cin, side, side), &d).unwrap();
        let w = randn(&mut rng, (cout, 9 * cin), &d).unwrap();
        let vm = VarMap::new();
        let conv = PixelConv::new(cin, cout, 9, false, crate::testutil::vb(&vm, 2, &d))
            .unwrap()
            .with_weight(w.clone());
        let rows = |t: &Tensor| {
            let (n, c, h, ww) = t.dims4().unwrap();
            t.permute((0, 2, 3, 1))
                .unwrap()
                .reshape((n * h * ww, c))
                .unwrap()
        };
        for (resample, stride, input) in [
            (Resample::Same, 1, x.clone()),
            (Resample::Down, 2, x.clone()),
            (
                Resample::Up,
                1,
                x.upsample_nearest2d(2 * side, 2 * side).unwrap(),
            ),
        ] {
            let want = rows(&conv2d_reference(&input, &w, stride).unwrap());
            for got in crate::denoiser::both_forms(|| {
                conv.forward(&rows(&x), &conv3x3_taps(imgs, side, resample, &d).unwrap())
                    .unwrap()
            }) {
                assert_eq!(got.dims(), want.dims(), "{resample:?}");
                assert!(max_abs_diff(&got, &want) < 1e-4, "{resample:?}");
            }
        }
    }

    #[test]
    fn the_conv2d_path_is_the_gather_path_in_value_and_gradient() {
        // What CUDA runs (conv2d) against what the CPU runs (gather), on the whole network:
        // eps and the gradients in x and in every weight, class-conditional and not, two sizes.
        for (size, classes) in [(8, 10), (12, 0)] {
            let (vm, m) = build(cfg(1, size, classes, false));
            let d = Device::Cpu;
            let b = 3;
            let x = randn(&mut rng_for(31, 0, 0), (b, 1, size, size), &d).unwrap();
            let n = Tensor::new(&[10f32, 400.0, 900.0], &d).unwrap();
            let cond = Tensor::new(&[0u32, 4, 9], &d).unwrap();
            let cond = (classes > 0).then_some(&cond);
            crate::testutil::assert_forms_agree(&vm, &x, 1e-4, |x| m.eps(x, &n, cond));
        }
    }

    #[test]
    fn output_shape_matches_input_and_bad_shapes_are_errors() {
        // The seam promises eps with the shape of x, for any batch and every supported config.
        let d = Device::Cpu;
        let mut rng = rng_for(1, 0, 0);
        for (channels, size, classes) in [(1, 8, 0), (3, 16, 2), (1, 12, 0), (3, 32, 0)] {
            let (_vm, m) = build(cfg(channels, size, classes, false));
            for batch in [1, 3, 8] {
                let x = randn(&mut rng, (batch, channels, size, size), &d).unwrap();
                let n = Tensor::full(500f32, batch, &d).unwrap();
                let cond = Tensor::zeros(batch, DType::U32, &d).unwrap();
                let e = m.eps(&x, &n, (classes > 0).then_some(&cond)).unwrap();
                assert_eq!(e.dims(), x.dims());
            }
        }
        // Data of the wrong rank, channels or size, or a mismatched n / cond, is a Shape error
        // naming the op, never a panic deep inside a kernel.
        let (_vm, m) = build(cfg(1, 8, 2, false));
        let n4 = Tensor::full(10f32, 4, &d).unwrap();
        for bad in [
            vec![4, 8, 8],
            vec![4, 3, 8, 8],
            vec![4, 1, 16, 16],
            vec![4, 1, 8, 8, 1],
        ] {
            let x = Tensor::zeros(bad.as_slice(), DType::F32, &d).unwrap();
            let e = m.eps(&x, &n4, None).unwrap_err();
            assert!(matches!(e, KernelError::Shape { .. }), "{e}");
        }
        let x = Tensor::zeros((4, 1, 8, 8), DType::F32, &d).unwrap();
        let n3 = Tensor::full(10f32, 3, &d).unwrap();
        assert!(matches!(
            m.eps(&x, &n3, None).unwrap_err(),
            KernelError::Shape { .. }
        ));
        let cond3 = Tensor::zeros(3, DType::U32, &d).unwrap();
        assert!(matches!(
            m.eps(&x, &n4, Some(&cond3)).unwrap_err(),
            KernelError::Shape { .. }
        ));
        // A label beyond `classes` is an error too (candle's index check), not a panic.
        let cond_oob = Tensor::full(7u32, 4, &d).unwrap();
        assert!(m.eps(&x, &n4, Some(&cond_oob)).is_err());
    }

    #[test]
    fn invalid_configs_name_the_field() {
        // A bad config is caught before any variable is created, with the key in the message.
        let d = Device::Cpu;
        let ok = cfg(1, 8, 0, false);
        let cases = [
            (
                UNetConfig {
                    size: 10,
                    ..ok.clone()
                },
                "unet.size",
            ),
            (
                UNetConfig {
                    size: 36,
                    ..ok.clone()
                },
                "unet.size",
            ),
            (
                UNetConfig {
                    size: 4,
                    ..ok.clone()
                },
                "unet.size",
            ),
            (
                UNetConfig {
                    channels: 2,
                    ..ok.clone()
                },
                "unet.channels",
            ),
            (
                UNetConfig {
                    base: 0,
                    ..ok.clone()
                },
                "unet.base",
            ),
            (
                UNetConfig {
                    time_dim: 15,
                    ..ok.clone()
                },
                "unet.time_dim",
            ),
        ];
        for (c, key) in cases {
            let vm = VarMap::new();
            let e = UNetDenoiser::new(c, crate::testutil::vb(&vm, 3, &d))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains(key), "{key}: {e}");
        }
    }

    #[test]
    fn zero_init_output_is_exactly_zero() {
        // With the output conv at zero the residual adds +0.0 to the reference, so a residual
        // policy equals its reference bit for bit at step 0.
        let d = Device::Cpu;
        let (_vm, m) = build(cfg(3, 16, 3, true));
        let x = randn(&mut rng_for(2, 0, 0), (5, 3, 16, 16), &d).unwrap();
        let n = Tensor::new(&[0f32, 1.0, 250.0, 999.0, 1000.0], &d).unwrap();
        let cond = Tensor::new(&[0u32, 1, 2, 0, 1], &d).unwrap();
        let e = m.eps(&x, &n, Some(&cond)).unwrap();
        assert!(flat(&e).iter().all(|v| v.to_bits() == 0));
    }

    #[test]
    fn class_label_changes_the_output() {
        // With classes > 0 the label must reach the blocks: same x and n, different label,
        // different eps (for a randomly initialised, non-zero net).
        let d = Device::Cpu;
        let (_vm, m) = build(cfg(1, 8, 2, false));
        let x = randn(&mut rng_for(3, 0, 0), (4, 1, 8, 8), &d).unwrap();
        let n = Tensor::full(400f32, 4, &d).unwrap();
        let c0 = Tensor::zeros(4, DType::U32, &d).unwrap();
        let c1 = Tensor::ones(4, DType::U32, &d).unwrap();
        let e0 = m.eps(&x, &n, Some(&c0)).unwrap();
        let e1 = m.eps(&x, &n, Some(&c1)).unwrap();
        let diff = max_abs_diff(&e0, &e1);
        assert!(
            diff > 1e-4,
            "labels 0 and 1 give the same eps (max diff {diff})"
        );
    }

    #[test]
    fn save_load_round_trip_is_bitwise() {
        // A checkpoint written by save_weights and read by load_weights reproduces the model
        // exactly: a resumed run continues from the very same function.
        let d = Device::Cpu;
        let dir = std::env::temp_dir().join(format!("tilt-unet-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("unet.safetensors");
        let (vm, m) = build(cfg(3, 8, 4, false));
        save_weights(&vm, &path).unwrap();
        let (mut vm2, m2) = build(cfg(3, 8, 4, false));
        load_weights(&mut vm2, &path).unwrap();
        let x = randn(&mut rng_for(4, 0, 0), (6, 3, 8, 8), &d).unwrap();
        let n = Tensor::new(&[1f32, 10.0, 100.0, 300.0, 700.0, 1000.0], &d).unwrap();
        let cond = Tensor::new(&[0u32, 1, 2, 3, 0, 1], &d).unwrap();
        assert_eq!(
            flat(&m.eps(&x, &n, Some(&cond)).unwrap()),
            flat(&m2.eps(&x, &n, Some(&cond)).unwrap())
        );
        // A net of another width cannot load it.
        let (mut vm3, _m3) = build(UNetConfig {
            base: 8,
            ..cfg(3, 8, 4, false)
        });
        assert!(load_weights(&mut vm3, &path).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn learns_to_denoise_two_patterns() {
        // Sanity of the whole graph under autograd: on 1-channel 8x8 images of two fixed
        // patterns (a cross and a ring, one per class), noised with the DDPM VP schedule,
        // 100 AdamW steps (lr 1e-3, batch 16, base 8) bring the eps MSE below 0.6x its initial
        // value.
        // A net that predicts 0 has MSE 1; with two possible images eps is recoverable from x_n
        // at all but the noisiest n, so a working net gets far below 1.
        let d = Device::Cpu;
        let (vm, m) = build(UNetConfig {
            base: 8,
            ..cfg(1, 8, 2, false)
        });
        let mut cross = [-1f32; 64];
        let mut ring = [-1f32; 64];
        for i in 0..8 {
            cross[i * 8 + 3] = 1.0;
            cross[3 * 8 + i] = 1.0;
            for j in 0..8 {
                let edge = |a: usize, b: usize| (a == 1 || a == 6) && (1..7).contains(&b);
                if edge(i, j) || edge(j, i) {
                    ring[i * 8 + j] = 1.0;
                }
            }
        }
        let sched = VpSchedule::ddpm_default();
        let params = ParamsAdamW {
            lr: 1e-3,
            weight_decay: 0.0,
            ..Default::default()
        };
        let mut opt = AdamW::new(vm.all_vars(), params).unwrap();
        let batch = 16;
        let mut losses = Vec::new();
        for step in 0..100u64 {
            let mut rng = rng_for(5, 0, step);
            let labels: Vec<u32> = (0..batch).map(|_| rng.random_range(0..2)).collect();
            let ns: Vec<usize> = (0..batch).map(|_| rng.random_range(1..=1000)).collect();
            let x0: Vec<f32> = labels
                .iter()
                .flat_map(|&l| if l == 0 { cross } else { ring })
                .collect();
            let x0 = Tensor::from_vec(x0, (batch, 1, 8, 8), &d).unwrap();
            let eps = randn(&mut rng, (batch, 1, 8, 8), &d).unwrap();
            let xn = sched.q_sample(&x0, &ns, &eps).unwrap();
            let n = Tensor::from_vec(ns.iter().map(|&v| v as f32).collect(), batch, &d).unwrap();
            let cond = Tensor::from_vec(labels, batch, &d).unwrap();
            let pred = m.eps(&xn, &n, Some(&cond)).unwrap();
            let loss = (pred - eps).unwrap().sqr().unwrap().mean_all().unwrap();
            opt.backward_step(&loss).unwrap();
            losses.push(loss.to_scalar::<f32>().unwrap());
        }
        // Average over windows: single-batch losses are noisy (they depend on the drawn n).
        let first: f32 = losses[..10].iter().sum::<f32>() / 10.0;
        let last: f32 = losses[losses.len() - 20..].iter().sum::<f32>() / 20.0;
        assert!(last < 0.6 * first, "eps MSE {first} -> {last}");
    }
}
