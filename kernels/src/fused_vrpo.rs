//! VRPO's learner step for an unconditional MLP residual on the CPU, written out by hand: the
//! forward of every row of a batch through the residual, the segment log-ratios, the loss, and the
//! backward through the MLP, one pass per layer over all rows, with no candle graph. The same
//! function and gradients as the plain path [`crate::vrpo::vrpo_grads`] (tested against it).
//!
//! Why: at the quickstart shape the plain path spends about 60% of a step outside matrix products
//! (per-op overhead, allocation, element-wise passes), and candle's rayon pool cannot use a second
//! core without spinning against the producers. Here each thread takes a contiguous block of rows
//! through the whole network with single-threaded `gemm` calls (the crate candle itself uses), and
//! the threads' partial weight gradients are summed at the end.
//!
//! Per row r (step j of segment a or b of pair p, grid step k, training index n, scale
//! s = c_eps / sigma, standard noise z): res = MLP(x, temb(n)), u = s res,
//! ratio_r = z.u - |u|^2 / 2, Delta_p = sum_j ratio(a, j) - ratio(b, j) (`logprob`), the loss of
//! `losses::vrpo_loss`, and dL/dres_r = dL/dDelta_p (+-1) s (z - u). The first layer's time part
//! W_t temb(n) + b is computed once per distinct grid step (as `MlpDenoiser::first_layer_shared`).

use candle_core::{CpuStorage, Storage, Tensor, Var};

use crate::denoiser::{time_embedding, Denoiser};
use crate::losses::VrpoLabels;
use crate::models::MlpDenoiser;
use crate::schedule::SamplingGrid;
use crate::vrpo::{VrpoBatch, VrpoStats};
use crate::{KernelError, Result};

/// The residual the fused step can take, or why it cannot (for the log line at stage start).
pub fn fused_residual(model: &dyn Denoiser) -> std::result::Result<&MlpDenoiser, &'static str> {
    let Some(mlp) = model.as_any().and_then(|a| a.downcast_ref::<MlpDenoiser>()) else {
        return Err("the residual is not an MLP");
    };
    if mlp.config().classes > 0 {
        return Err("the residual is class-conditional");
    }
    let w = mlp.layers()[0].weight();
    if !w.device().is_cpu() {
        return Err("the learner is not on the CPU");
    }
    if w.dtype() != candle_core::DType::F32 {
        return Err("the residual is not f32");
    }
    Ok(mlp)
}

/// The fused VRPO step with its buffers, reused from step to step (no allocation once their sizes
/// are reached). One per learner replica.
#[derive(Default)]
pub struct FusedVrpo {
    threads: usize,
    /// Rows [2 L B, dim] in the plain path's order (step j: rows a then rows b): states, noises.
    x: Vec<f32>,
    z: Vec<f32>,
    /// Per row: s = c_eps / sigma, its slot in the per-step table, its pair, +1 (a) or -1 (b).
    scale: Vec<f32>,
    slot: Vec<u32>,
    pair: Vec<u32>,
    sign: Vec<f32>,
    /// Per distinct grid step: its time embedding [U, time_dim] and W_t temb + b_0 [U, hidden].
    temb: Vec<f32>,
    table: Vec<f32>,
    /// The x columns of the first layer's weight, transposed: [dim, hidden].
    wxt: Vec<f32>,
    /// Host copies of the weights: hidden layers ([out, in], [out]) then the output layer.
    w: Vec<Vec<f32>>,
    b: Vec<Vec<f32>>,
    /// ratio_r per row; Delta and dL/dDelta per pair.
    ratio: Vec<f32>,
    delta: Vec<f32>,
    dldelta: Vec<f32>,
    va: Vec<f32>,
    vb: Vec<f32>,
    work: Vec<ThreadWork>,
}

/// One thread's block of rows: its activations and its partial gradients.
#[derive(Default)]
struct ThreadWork {
    /// Per hidden layer: h = silu(pre) and sigmoid(pre), [rows, hidden].
    h: Vec<Vec<f32>>,
    sig: Vec<Vec<f32>>,
    /// u = s res [rows, dim], then dL/dres.
    u: Vec<f32>,
    /// Gradient w.r.t. a hidden layer's output, two buffers used in turn [rows, hidden].
    dh: [Vec<f32>; 2],
    /// Partial gradients: weights and biases as in `FusedVrpo::w`/`b` (the first layer's weight
    /// only over its x columns), and dL/d(table) [U, hidden].
    dw: Vec<Vec<f32>>,
    db: Vec<Vec<f32>>,
    dtable: Vec<f32>,
}

/// Shape of the network for one step.
#[derive(Clone, Copy)]
struct Dims {
    dim: usize,
    hidden: usize,
    time_dim: usize,
    depth: usize,
    /// Distinct grid steps in the batch.
    slots: usize,
}

impl FusedVrpo {
    /// `threads` >= 1: the rows of a step are split over this many threads (the caller's and
    /// `threads - 1` scoped ones).
    pub fn new(threads: usize) -> Self {
        Self {
            threads: threads.max(1),
            ..Default::default()
        }
    }

    /// The threads this step uses.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The VRPO loss of `batch` and the gradients of `mlp`'s variables in the order of `vars`,
    /// with the contract of [`crate::vrpo::vrpo_grads`]. Every var must be a weight or bias of
    /// `mlp`; `mlp` must pass [`fused_residual`].
    pub fn grads(
        &mut self,
        mlp: &MlpDenoiser,
        vars: &[(String, Var)],
        grid: &SamplingGrid,
        batch: &VrpoBatch,
        labels: VrpoLabels,
        beta: f64,
    ) -> Result<(Vec<Option<Tensor>>, VrpoStats)> {
        self.grads_of_parts(mlp, vars, grid, std::slice::from_ref(batch), labels, beta)
    }

    /// [`FusedVrpo::grads`] of the batch whose pairs are those of `parts` in order (as if
    /// concatenated), so a caller can decode parts of a batch on several threads.
    pub fn grads_of_parts(
        &mut self,
        mlp: &MlpDenoiser,
        vars: &[(String, Var)],
        grid: &SamplingGrid,
        parts: &[VrpoBatch],
        labels: VrpoLabels,
        beta: f64,
    ) -> Result<(Vec<Option<Tensor>>, VrpoStats)> {
        if let Err(why) = fused_residual(mlp) {
            return Err(KernelError::param(
                "fused VRPO residual",
                "MlpDenoiser",
                why,
            ));
        }
        let nb: usize = parts.iter().map(|b| b.k_starts.len()).sum();
        if nb == 0 {
            return Err(KernelError::shape("fused_vrpo", "a batch of zero pairs"));
        }
        let d = self.load(mlp, grid, parts)?;
        let rows = self.scale.len();
        // Blocks of rows, in row order: with several threads, four per thread, which the threads
        // take as they come free, so a thread the OS preempts (the producers share the cores)
        // holds back a quarter of its share, not all of it.
        let blocks = if self.threads == 1 {
            1
        } else {
            4 * self.threads
        };
        let per = rows.div_ceil(blocks).max(1);
        let nt = rows.div_ceil(per);
        self.work.resize_with(nt, ThreadWork::default);
        self.ratio.resize(rows, 0.0);

        // Forward: every thread takes its block of rows through the network to ratio_r.
        {
            let inputs = Inputs {
                d,
                x: &self.x,
                z: &self.z,
                scale: &self.scale,
                slot: &self.slot,
                pair: &self.pair,
                sign: &self.sign,
                table: &self.table,
                wxt: &self.wxt,
                w: &self.w,
                b: &self.b,
                dldelta: &[],
            };
            let jobs = self.work.iter_mut().zip(self.ratio.chunks_mut(per));
            run_blocks(self.threads, jobs, per, |(wk, out), start| {
                forward_block(&inputs, wk, start, out);
            });
        }

        // The loss, its statistics and dL/dDelta per pair (the mean over pairs).
        self.delta.clear();
        self.delta.resize(nb, 0.0);
        for ((&r, &p), &sg) in self.ratio.iter().zip(&self.pair).zip(&self.sign) {
            self.delta[p as usize] += sg * r;
        }
        let stats = loss_and_slopes(
            labels,
            beta,
            &self.delta,
            &self.va,
            &self.vb,
            &mut self.dldelta,
        );

        // Backward: every thread its block, into its partial gradients.
        {
            let inputs = Inputs {
                d,
                x: &self.x,
                z: &self.z,
                scale: &self.scale,
                slot: &self.slot,
                pair: &self.pair,
                sign: &self.sign,
                table: &self.table,
                wxt: &self.wxt,
                w: &self.w,
                b: &self.b,
                dldelta: &self.dldelta,
            };
            let jobs = self.work.iter_mut().map(|wk| (wk, ()));
            run_blocks(self.threads, jobs, per, |(wk, ()), start| {
                backward_block(&inputs, wk, start);
            });
        }
        let grads = self.collect(mlp, vars, d)?;
        Ok((grads, stats))
    }

    /// Copy the weights and the batch's rows into the buffers; build the per-step table.
    fn load(
        &mut self,
        mlp: &MlpDenoiser,
        grid: &SamplingGrid,
        parts: &[VrpoBatch],
    ) -> Result<Dims> {
        let cfg = mlp.config();
        let layers = mlp.layers();
        let nl = layers.len() + 1;
        self.w.resize_with(nl, Vec::new);
        self.b.resize_with(nl, Vec::new);
        for (i, l) in layers.iter().chain([mlp.out_layer()]).enumerate() {
            let bias = l.bias().ok_or_else(|| {
                KernelError::param("fused VRPO residual", "MlpDenoiser", "a layer has no bias")
            })?;
            self.w[i].clear();
            host_f32(l.weight(), &mut self.w[i])?;
            self.b[i].clear();
            host_f32(bias, &mut self.b[i])?;
        }
        let len = parts[0].za.len();
        let nb: usize = parts.iter().map(|b| b.k_starts.len()).sum();
        for batch in parts {
            if len == 0
                || batch.za.len() != len
                || batch.xa.len() != len + 1
                || batch.zb.len() != len
                || batch.xb.len() != len + 1
            {
                return Err(KernelError::shape(
                    "fused_vrpo",
                    format!(
                        "{} / {} states and {} / {} noises for a and b (segments of {len} steps)",
                        batch.xa.len(),
                        batch.xb.len(),
                        batch.za.len(),
                        batch.zb.len()
                    ),
                ));
            }
        }
        let dim = cfg.dim;
        self.x.clear();
        self.z.clear();
        for j in 0..len {
            for side in 0..2 {
                for batch in parts {
                    let (xs, zs) = if side == 0 {
                        (&batch.xa, &batch.za)
                    } else {
                        (&batch.xb, &batch.zb)
                    };
                    host_f32(&xs[j], &mut self.x)?;
                    host_f32(&zs[j], &mut self.z)?;
                }
            }
        }
        let rows = 2 * len * nb;
        if self.x.len() != rows * dim || self.z.len() != rows * dim {
            return Err(KernelError::shape(
                "fused_vrpo",
                format!(
                    "{} pairs of {len} steps need {} values per tensor of states and noises \
                     ({dim} per row), got {} and {}",
                    nb,
                    2 * len * nb * dim,
                    self.x.len(),
                    self.z.len()
                ),
            ));
        }
        self.va.clear();
        self.vb.clear();
        for batch in parts {
            host_f32(&batch.v_a, &mut self.va)?;
            host_f32(&batch.v_b, &mut self.vb)?;
        }
        if self.va.len() != nb || self.vb.len() != nb {
            return Err(KernelError::shape(
                "fused_vrpo",
                format!(
                    "{nb} pairs but {} / {} values",
                    self.va.len(),
                    self.vb.len()
                ),
            ));
        }
        // Per row: coefficients and the slot of its grid step (slots in order of appearance).
        let mut slot_of_k = vec![u32::MAX; grid.len() + 1];
        let mut ns: Vec<f32> = Vec::new();
        self.scale.clear();
        self.slot.clear();
        self.pair.clear();
        self.sign.clear();
        for j in 0..len {
            for sign in [1.0f32, -1.0] {
                let ks = parts.iter().flat_map(|b| b.k_starts.iter());
                for (p, &k) in ks.enumerate() {
                    if k < len || k > grid.len() {
                        return Err(KernelError::param(
                            "k_start",
                            k,
                            format!(
                                "a segment of {len} steps needs {len} <= k_start <= K = {}",
                                grid.len()
                            ),
                        ));
                    }
                    let st = grid.step(k - j)?;
                    if slot_of_k[k - j] == u32::MAX {
                        slot_of_k[k - j] = ns.len() as u32;
                        ns.push(st.n_from as f32);
                    }
                    self.scale.push((st.c_eps / st.sigma) as f32);
                    self.slot.push(slot_of_k[k - j]);
                    self.pair.push(p as u32);
                    self.sign.push(sign);
                }
            }
        }
        // table[u] = W_t temb(n_u) + b_0, with the time columns of the first layer's weight.
        let (hidden, td) = (cfg.hidden, cfg.time_dim);
        self.wxt.clear();
        self.wxt.resize(dim * hidden, 0.0);
        for o in 0..hidden {
            for c in 0..dim {
                self.wxt[c * hidden + o] = self.w[0][o * (dim + td) + c];
            }
        }
        let slots = ns.len();
        let temb = time_embedding(&Tensor::from_vec(ns, slots, &candle_core::Device::Cpu)?, td)?;
        self.temb.clear();
        host_f32(&temb, &mut self.temb)?;
        self.table.clear();
        for u in 0..slots {
            self.table.extend_from_slice(&self.b[0]);
            let row = &mut self.table[u * hidden..(u + 1) * hidden];
            let e = &self.temb[u * td..(u + 1) * td];
            for (o, t) in row.iter_mut().enumerate() {
                let w = &self.w[0][o * (dim + td) + dim..(o + 1) * (dim + td)];
                *t += w.iter().zip(e).map(|(a, b)| a * b).sum::<f32>();
            }
        }
        Ok(Dims {
            dim,
            hidden,
            time_dim: td,
            depth: cfg.depth,
            slots,
        })
    }

    /// Sum the threads' partial gradients and hand them out as tensors in the order of `vars`.
    fn collect(
        &mut self,
        mlp: &MlpDenoiser,
        vars: &[(String, Var)],
        d: Dims,
    ) -> Result<Vec<Option<Tensor>>> {
        let (first, rest) = self.work.split_at_mut(1);
        let acc = &mut first[0];
        for wk in rest.iter() {
            add_into(&mut acc.dtable, &wk.dtable);
            for (a, b) in acc.dw.iter_mut().zip(&wk.dw) {
                add_into(a, b);
            }
            for (a, b) in acc.db.iter_mut().zip(&wk.db) {
                add_into(a, b);
            }
        }
        // The first layer: [dW_x | dW_t] with dW_t = dtable^T temb; its bias gets the row sum of
        // dtable (the table holds b_0).
        let (dim, td, hidden) = (d.dim, d.time_dim, d.hidden);
        let mut dw0 = vec![0f32; hidden * (dim + td)];
        let mut dwt = vec![0f32; hidden * td];
        matmul(
            Mat::new(&mut dwt, hidden, td),
            false,
            Src::t(&acc.dtable, hidden), // dtable^T [hidden, U]
            Src::n(&self.temb, td),      // temb [U, time_dim]
            d.slots,
        );
        for o in 0..hidden {
            let row = &mut dw0[o * (dim + td)..(o + 1) * (dim + td)];
            for (c, v) in row[..dim].iter_mut().enumerate() {
                *v = acc.dw[0][c * hidden + o]; // dW_x^T [dim, hidden]
            }
            row[dim..].copy_from_slice(&dwt[o * td..(o + 1) * td]);
        }
        let mut db0 = vec![0f32; hidden];
        for r in acc.dtable.chunks_exact(hidden) {
            add_into(&mut db0, r);
        }
        let layers = mlp.layers();
        let params: Vec<&candle_nn::Linear> = layers.iter().chain([mlp.out_layer()]).collect();
        let dev = candle_core::Device::Cpu;
        vars.iter()
            .map(|(name, var)| {
                let id = var.as_tensor().id();
                for (i, l) in params.iter().enumerate() {
                    let w = l.weight();
                    if w.id() == id {
                        let g = if i == 0 { &dw0 } else { &acc.dw[i] };
                        return Ok(Some(Tensor::from_slice(g, w.shape(), &dev)?));
                    }
                    if let Some(b) = l.bias().filter(|b| b.id() == id) {
                        let g = if i == 0 { &db0 } else { &acc.db[i] };
                        return Ok(Some(Tensor::from_slice(g, b.shape(), &dev)?));
                    }
                }
                Err(KernelError::param(
                    "fused VRPO variable",
                    name,
                    "is not a weight or bias of the MLP residual",
                ))
            })
            .collect()
    }
}

/// What every thread reads.
struct Inputs<'a> {
    d: Dims,
    x: &'a [f32],
    z: &'a [f32],
    scale: &'a [f32],
    slot: &'a [u32],
    pair: &'a [u32],
    sign: &'a [f32],
    table: &'a [f32],
    wxt: &'a [f32],
    w: &'a [Vec<f32>],
    b: &'a [Vec<f32>],
    dldelta: &'a [f32],
}

/// Run `f(job, first_row)` for each job, job i on the rows from i * per, on `threads` threads
/// (this one and scoped ones) that take the next job as they come free.
fn run_blocks<J: Send, F: Fn(J, usize) + Sync>(
    threads: usize,
    jobs: impl Iterator<Item = J> + Send,
    per: usize,
    f: F,
) {
    let queue = std::sync::Mutex::new(jobs.enumerate());
    let work = || loop {
        // A poisoned queue means another worker panicked: stop; the scope re-raises its panic.
        let next = match queue.lock() {
            Ok(mut q) => q.next(),
            Err(_) => None,
        };
        match next {
            Some((i, job)) => f(job, i * per),
            None => break,
        }
    };
    if threads <= 1 {
        return work();
    }
    std::thread::scope(|s| {
        for _ in 1..threads {
            s.spawn(work);
        }
        work();
    });
}

/// Rows `start..start + out.len()` through the network: keeps h and sigmoid of every hidden layer
/// and u = s res; writes ratio_r = z.u - |u|^2 / 2 to `out`. The first layer (k = dim) and the
/// output layer (n = dim) are row loops fused with the SiLU; the hidden x hidden layers are gemm.
fn forward_block(inp: &Inputs, wk: &mut ThreadWork, start: usize, out: &mut [f32]) {
    let d = inp.d;
    let (dim, hidden) = (d.dim, d.hidden);
    let n = out.len();
    wk.h.resize_with(d.depth, Vec::new);
    wk.sig.resize_with(d.depth, Vec::new);
    wk.u.resize(n * dim, 0.0);
    for l in 0..d.depth {
        wk.h[l].resize(n * hidden, 0.0);
        wk.sig[l].resize(n * hidden, 0.0);
        let (done, cur) = wk.h.split_at_mut(l);
        let pre = &mut cur[0];
        if l > 0 {
            for row in pre.chunks_exact_mut(hidden) {
                row.copy_from_slice(&inp.b[l]);
            }
            matmul(
                Mat::new(pre, n, hidden),
                true,
                Src::n(&done[l - 1], hidden),
                Src::t(&inp.w[l], hidden), // W_l^T [hidden, hidden]
                hidden,
            );
        }
        let sig = &mut wk.sig[l];
        let last = l + 1 == d.depth;
        let u = &mut wk.u;
        let out = &mut *out;
        with_simd(
            #[inline(always)]
            || {
                for r in 0..n {
                    let (h, sg) = (
                        &mut pre[r * hidden..(r + 1) * hidden],
                        &mut sig[r * hidden..(r + 1) * hidden],
                    );
                    let i = start + r;
                    if l == 0 {
                        // table[slot] + W_x x.
                        let slot = inp.slot[i] as usize;
                        h.copy_from_slice(&inp.table[slot * hidden..(slot + 1) * hidden]);
                        for (c, &xc) in inp.x[i * dim..(i + 1) * dim].iter().enumerate() {
                            axpy(h, xc, &inp.wxt[c * hidden..(c + 1) * hidden]);
                        }
                    }
                    silu_keep(h, sg);
                    if last {
                        // res = W_out h + b_out, u = s res, ratio = z.u - |u|^2 / 2.
                        let (s, z) = (inp.scale[i], &inp.z[i * dim..(i + 1) * dim]);
                        let ur = &mut u[r * dim..(r + 1) * dim];
                        let (mut zu, mut uu) = (0f32, 0f32);
                        for c in 0..dim {
                            let w = &inp.w[d.depth][c * hidden..(c + 1) * hidden];
                            let v = s * (dot(h, w) + inp.b[d.depth][c]);
                            ur[c] = v;
                            zu += z[c] * v;
                            uu += v * v;
                        }
                        out[r] = zu - 0.5 * uu;
                    }
                }
            },
        );
    }
}

/// The backward of the block `forward_block` left in `wk`, into `wk`'s partial gradients.
fn backward_block(inp: &Inputs, wk: &mut ThreadWork, start: usize) {
    let d = inp.d;
    let (dim, hidden, top) = (d.dim, d.hidden, d.depth);
    let n = wk.u.len() / dim;
    wk.dw.resize_with(top + 1, Vec::new);
    wk.db.resize_with(top + 1, Vec::new);
    for l in 0..=top {
        let size = match l {
            0 => dim * hidden, // dW_x^T [dim, hidden]
            l if l == top => dim * hidden,
            _ => hidden * hidden,
        };
        let nb = if l == top { dim } else { hidden };
        wk.dw[l].clear();
        wk.dw[l].resize(size, 0.0);
        wk.db[l].clear();
        wk.db[l].resize(nb, 0.0);
    }
    wk.dtable.clear();
    wk.dtable.resize(d.slots * hidden, 0.0);
    let [dh, spare] = &mut wk.dh;
    dh.resize(n * hidden, 0.0);
    spare.resize(n * hidden, 0.0);
    let (mut dh, mut spare) = (dh, spare);
    // Output layer, per row: dres = dL/dDelta sign s (z - u); dW_out += dres h^T, db_out += dres,
    // dh = W_out^T dres; then the last hidden layer's SiLU backward.
    {
        let (u, h, sig) = (&wk.u, &wk.h[top - 1], &wk.sig[top - 1]);
        let (dw_out, rest) = wk.dw.split_last_mut().expect("depth + 1 layers");
        let (db_out, db_rest) = wk.db.split_last_mut().expect("depth + 1 layers");
        let (dwx, dtable) = (&mut rest[0], &mut wk.dtable);
        let db_last = &mut db_rest[top - 1];
        let dh = &mut *dh;
        with_simd(
            #[inline(always)]
            || {
                for r in 0..n {
                    let i = start + r;
                    let c0 = inp.dldelta[inp.pair[i] as usize] * inp.sign[i] * inp.scale[i];
                    let hr = &h[r * hidden..(r + 1) * hidden];
                    let g = &mut dh[r * hidden..(r + 1) * hidden];
                    g.fill(0.0);
                    for c in 0..dim {
                        let v = c0 * (inp.z[i * dim + c] - u[r * dim + c]);
                        axpy(&mut dw_out[c * hidden..(c + 1) * hidden], v, hr);
                        db_out[c] += v;
                        axpy(g, v, &inp.w[top][c * hidden..(c + 1) * hidden]);
                    }
                    silu_back_row(
                        inp,
                        g,
                        hr,
                        &sig[r * hidden..(r + 1) * hidden],
                        db_last,
                        (top == 1).then_some((&mut *dwx, &mut *dtable)),
                        i,
                    );
                }
            },
        );
    }
    for l in (1..top).rev() {
        // dpre_l is in dh: dW_l = dpre^T h_{l-1}, dh_{l-1} = dpre W_l, then SiLU backward.
        matmul(
            Mat::new(&mut wk.dw[l], hidden, hidden),
            false,
            Src::t(dh, hidden),
            Src::n(&wk.h[l - 1], hidden),
            n,
        );
        matmul(
            Mat::new(spare, n, hidden),
            false,
            Src::n(dh, hidden),
            Src::n(&inp.w[l], hidden),
            hidden,
        );
        std::mem::swap(&mut dh, &mut spare);
        let (h, sig) = (&wk.h[l - 1], &wk.sig[l - 1]);
        let dwx = &mut wk.dw[0];
        let db = &mut wk.db[l - 1];
        let dtable = &mut wk.dtable;
        let dh = &mut *dh;
        with_simd(
            #[inline(always)]
            || {
                for r in 0..n {
                    silu_back_row(
                        inp,
                        &mut dh[r * hidden..(r + 1) * hidden],
                        &h[r * hidden..(r + 1) * hidden],
                        &sig[r * hidden..(r + 1) * hidden],
                        db,
                        (l == 1).then_some((&mut *dwx, &mut *dtable)),
                        start + r,
                    );
                }
            },
        );
    }
}

/// One row of a hidden layer's backward: dh -> dpre = dh silu'(pre) in place, with
/// silu' = s + h (1 - s); db += dpre; for the first layer also dtable[slot] += dpre and
/// dW_x^T += x dpre^T.
#[inline(always)]
fn silu_back_row(
    inp: &Inputs,
    g: &mut [f32],
    h: &[f32],
    s: &[f32],
    db: &mut [f32],
    first: Option<(&mut Vec<f32>, &mut Vec<f32>)>,
    i: usize,
) {
    for ((g, &h), &s) in g.iter_mut().zip(h).zip(s) {
        *g *= s + h * (1.0 - s);
    }
    add_into(db, g);
    if let Some((dwx, dtable)) = first {
        let (dim, hidden) = (inp.d.dim, inp.d.hidden);
        let slot = inp.slot[i] as usize;
        add_into(&mut dtable[slot * hidden..(slot + 1) * hidden], g);
        for (c, &xc) in inp.x[i * dim..(i + 1) * dim].iter().enumerate() {
            axpy(&mut dwx[c * hidden..(c + 1) * hidden], xc, g);
        }
    }
}

/// y += a x.
#[inline(always)]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// x.y with 16 partial sums (so the loop vectorises without reassociating a single sum).
#[inline(always)]
fn dot(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (xc, yc) = (x.chunks_exact(16), y.chunks_exact(16));
    let tail: f32 = xc
        .remainder()
        .iter()
        .zip(yc.remainder())
        .map(|(a, b)| a * b)
        .sum();
    for (a, b) in xc.zip(yc) {
        for k in 0..16 {
            acc[k] += a[k] * b[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Run `f` compiled for the widest vector unit this CPU has (AVX-512, AVX2 + FMA, or the
/// baseline): the element-wise loops above are plain Rust that the compiler vectorises; the
/// build targets baseline x86-64, so without this they would use 4 lanes. No fused multiply-add
/// is introduced (Rust does not contract a * b + c), so every path gives the same bits.
#[inline(always)]
fn with_simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            #[allow(unsafe_code)]
            // SAFETY: the CPU has AVX-512F (checked on the line above).
            return unsafe { run_avx512(f) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            #[allow(unsafe_code)]
            // SAFETY: the CPU has AVX2 (checked on the line above).
            return unsafe { run_avx2(f) };
        }
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn run_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn run_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// The loss of `labels` at Delta (mean over pairs), its statistics, and dL/dDelta per pair in
/// `slope`. Soft: l = -[q log sig(beta D) + (1 - q) log sig(-beta D)], q = sig(V_a - V_b),
/// dl/dD = beta (sig(beta D) - q). Hard: l = -log sig(beta t D), t = +1 if V_a >= V_b else -1,
/// dl/dD = -beta t (1 - sig(beta t D)). Sums in f64.
fn loss_and_slopes(
    labels: VrpoLabels,
    beta: f64,
    delta: &[f32],
    va: &[f32],
    vb: &[f32],
    slope: &mut Vec<f32>,
) -> VrpoStats {
    let nb = delta.len();
    slope.clear();
    let mut loss = 0f64;
    for ((&dl, &a), &b) in delta.iter().zip(va).zip(vb) {
        let (dl, a, b) = (dl as f64, a as f64, b as f64);
        let (l, g) = match labels {
            VrpoLabels::Soft => {
                let q = sigmoid64(a - b);
                let x = beta * dl;
                (
                    -(q * log_sigmoid64(x) + (1.0 - q) * log_sigmoid64(-x)),
                    beta * (sigmoid64(x) - q),
                )
            }
            VrpoLabels::Hard => {
                let t = if a >= b { 1.0 } else { -1.0 };
                let x = beta * t * dl;
                (-log_sigmoid64(x), -beta * t * (1.0 - sigmoid64(x)))
            }
        };
        loss += l;
        slope.push((g / nb as f64) as f32);
    }
    VrpoStats::from_host((loss / nb as f64) as f32, delta, va, vb, beta)
}

fn sigmoid64(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// log sigmoid(x) = -ln(1 + e^-x), without overflow.
fn log_sigmoid64(x: f64) -> f64 {
    -((-x).max(0.0) + ((-x.abs()).exp()).ln_1p())
}

/// In place: pre -> h = pre sigmoid(pre), keeping sigmoid(pre) in `sig` (`fused::silu`'s forward).
#[inline(always)]
fn silu_keep(pre: &mut [f32], sig: &mut [f32]) {
    for (v, s) in pre.iter_mut().zip(sig.iter_mut()) {
        *s = 1.0 / (1.0 + exp(-*v));
        *v *= *s;
    }
}

/// `fused::exp_f32` bit for bit (tested), with 2^n taken from the bits of the rounding sum
/// instead of a float-to-int conversion, so the loop vectorises without per-lane conversions.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // t's low mantissa bits hold n + 2^22 (|n| < 2^22); n + 127 shifted into the exponent field.
    let e = t.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127) << 23;
    p * f32::from_bits(e)
}

fn add_into(acc: &mut [f32], x: &[f32]) {
    for (a, b) in acc.iter_mut().zip(x) {
        *a += b;
    }
}

/// Append the values of a CPU tensor to `out` (row-major), from its storage when it is a
/// contiguous f32 tensor, else through a copy.
fn host_f32(t: &Tensor, out: &mut Vec<f32>) -> Result<()> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            out.extend_from_slice(&v[a..b]);
            return Ok(());
        }
    }
    let v = t
        .to_device(&candle_core::Device::Cpu)?
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    out.extend_from_slice(&v);
    Ok(())
}

/// A row-major destination [rows, cols].
struct Mat<'a> {
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
}

impl<'a> Mat<'a> {
    fn new(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self { data, rows, cols }
    }
}

/// A matrix operand read through strides: element (i, j) at `offset + i * rs + j * cs`.
#[derive(Clone, Copy)]
struct Src<'a> {
    data: &'a [f32],
    offset: usize,
    rs: usize,
    cs: usize,
}

impl<'a> Src<'a> {
    /// A row-major [_, cols] matrix as stored.
    fn n(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            offset: 0,
            rs: cols,
            cs: 1,
        }
    }
    /// The transpose of a row-major [_, cols] matrix.
    fn t(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            offset: 0,
            rs: 1,
            cs: cols,
        }
    }
    /// Every element (i, j), i < rows, j < cols, lies inside `data`.
    fn covers(&self, rows: usize, cols: usize) -> bool {
        rows == 0
            || cols == 0
            || self.offset + (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// dst [m, n] = (acc ? dst : 0) + lhs [m, k] rhs [k, n], single-threaded `gemm` (the crate
/// candle's CPU matmul uses). Panics if an operand is smaller than its shape says (a bug here).
fn matmul(dst: Mat, acc: bool, lhs: Src, rhs: Src, k: usize) {
    let (m, n) = (dst.rows, dst.cols);
    assert!(
        dst.data.len() >= m * n && lhs.covers(m, k) && rhs.covers(k, n),
        "fused_vrpo::matmul: operand smaller than [{m}, {k}] x [{k}, {n}]"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            dst.data[..m * n].fill(0.0);
        }
        return;
    }
    #[allow(unsafe_code)]
    // SAFETY: the assert above keeps every element gemm reads ((i, j) of lhs for i < m, j < k,
    // of rhs for i < k, j < n, at offset + i rs + j cs) inside its slice and every element it
    // writes ((i, j) at i n + j for i < m, j < n) inside `dst.data`; `dst.data` is borrowed
    // mutably, so it does not alias the operands.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr(),
            1,
            n as isize,
            acc,
            lhs.data.as_ptr().add(lhs.offset),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr().add(rhs.offset),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::{MlpConfig, MlpDenoiser};
    use crate::optim::named_vars;
    use crate::rng::{randn, rng_for};
    use crate::schedule::VpSchedule;
    use crate::vrpo::vrpo_grads;
    use candle_core::Device;
    use candle_nn::VarMap;
    use rand::Rng;

    /// Max over elements of |a - b| / (max |b| over the tensor), so small entries of a large
    /// gradient are compared at the tensor's scale.
    fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
        let scale = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let diff = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        diff / scale.max(1e-12)
    }

    /// A random batch of `nb` pairs of `len` steps with starts drawn from `starts`.
    fn batch(nb: usize, len: usize, dim: usize, starts: &[usize], seed: u64) -> VrpoBatch {
        let d = Device::Cpu;
        let mut rng = rng_for(seed, 0, 0);
        let k_starts: Vec<usize> = (0..nb)
            .map(|_| starts[rng.random_range(0..starts.len())])
            .collect();
        let mut t = |n: usize| -> Vec<Tensor> {
            (0..n)
                .map(|_| randn(&mut rng, (nb, dim), &d).unwrap())
                .collect()
        };
        let (xa, za, xb, zb) = (t(len + 1), t(len), t(len + 1), t(len));
        let v_a = randn(&mut rng, nb, &d).unwrap().to_vec1::<f32>().unwrap();
        let mut v_b = randn(&mut rng, nb, &d).unwrap().to_vec1::<f32>().unwrap();
        // Ties at the first pairs, where the hard label's V_a >= V_b decides.
        let ties = nb.min(2);
        v_b[..ties].copy_from_slice(&v_a[..ties]);
        let (v_a, v_b) = (
            Tensor::from_vec(v_a, nb, &d).unwrap(),
            Tensor::from_vec(v_b, nb, &d).unwrap(),
        );
        VrpoBatch {
            k_starts,
            xa,
            za,
            xb,
            zb,
            v_a,
            v_b,
            cond: None,
        }
    }

    fn mlp(dim: usize, hidden: usize, depth: usize, time_dim: usize) -> (VarMap, MlpDenoiser) {
        // Seeded random weights everywhere (a non-zero output layer), N(0, 1 / fan_in), so
        // every run of the test sees the same network.
        let vm = VarMap::new();
        let m = MlpDenoiser::new(
            MlpConfig {
                dim,
                hidden,
                depth,
                time_dim,
                classes: 0,
                zero_init_output: false,
            },
            crate::testutil::vb(&vm, 1, &Device::Cpu),
        )
        .unwrap();
        let mut rng = rng_for(11, dim as u64, hidden as u64);
        for (_, v) in named_vars(&vm).unwrap() {
            let fan_in = *v.dims().last().unwrap() as f64;
            let t = (randn(&mut rng, v.shape(), &Device::Cpu).unwrap() / fan_in.sqrt()).unwrap();
            v.set(&t).unwrap();
        }
        (vm, m)
    }

    #[test]
    fn fused_step_gives_the_plain_loss_and_gradients() {
        // The plain candle path (`vrpo_grads`, autograd through `MlpDenoiser::eps`) is the
        // reference. Tolerance: relative error below 1e-4 for the loss and the margin gap, and for
        // every gradient at the scale of its tensor; the fused path sums in another order.
        let s = VpSchedule::ddpm_default();
        let g = SamplingGrid::new(&s, 40, 1.0).unwrap();
        let cases = [
            // (dim, hidden, depth, time_dim, pairs, L, starts, labels, beta, threads)
            (
                2,
                32,
                2,
                16,
                96,
                5,
                vec![40, 35, 20, 5],
                VrpoLabels::Soft,
                1.0,
                1,
            ),
            (
                2,
                32,
                2,
                16,
                96,
                5,
                vec![40, 35, 20, 5],
                VrpoLabels::Soft,
                1.0,
                2,
            ),
            (
                2,
                32,
                2,
                16,
                96,
                5,
                vec![40, 35, 20, 5],
                VrpoLabels::Hard,
                10.0,
                2,
            ),
            (
                3,
                24,
                1,
                8,
                70,
                4,
                vec![40, 12, 4],
                VrpoLabels::Hard,
                2.0,
                3,
            ),
            (16, 48, 3, 8, 33, 3, vec![30], VrpoLabels::Soft, 0.5, 2),
            // One pair, more threads than a block needs rows for.
            (2, 16, 2, 8, 1, 2, vec![10], VrpoLabels::Soft, 1.0, 4),
        ];
        for (i, (dim, hidden, depth, td, nb, len, starts, labels, beta, threads)) in
            cases.into_iter().enumerate()
        {
            let (vm, m) = mlp(dim, hidden, depth, td);
            let vars = named_vars(&vm).unwrap();
            let b = batch(nb, len, dim, &starts, i as u64);
            let (gp, sp) = vrpo_grads(&m, &vars, &g, &b, labels, beta).unwrap();
            let mut f = FusedVrpo::new(threads);
            // Twice: the second step reuses the buffers of the first.
            for _ in 0..2 {
                let (gf, sf) = f.grads(&m, &vars, &g, &b, labels, beta).unwrap();
                assert!(
                    (sf.loss - sp.loss).abs() <= 1e-4 * sp.loss.abs(),
                    "case {i}: loss {} vs {}",
                    sf.loss,
                    sp.loss
                );
                // A residual that does something: the loss is not the ln 2 of a zero one.
                assert!((sp.loss - std::f32::consts::LN_2).abs() > 1e-3, "case {i}");
                assert!(
                    (sf.margin_gap - sp.margin_gap).abs() <= 1e-4 * sp.margin_gap.abs().max(1.0),
                    "case {i}"
                );
                // Both read the same values V(a), V(b): the same label strength, bit for bit.
                assert_eq!(sf.label_strength, sp.label_strength, "case {i}");
                // The first two pairs are ties (|V(a) - V(b)| = 0), the others are not.
                assert_eq!(sp.label_strength > 0.0, nb > 2, "case {i}");
                assert!(
                    (sf.accuracy - sp.accuracy).abs() <= 1.0 / nb as f32,
                    "case {i}"
                );
                for ((name, _), (a, p)) in vars.iter().zip(gf.iter().zip(&gp)) {
                    let (a, p) = (a.as_ref().unwrap(), p.as_ref().unwrap());
                    assert_eq!(a.dims(), p.dims(), "case {i}: {name}");
                    let e = rel_err(a, p);
                    assert!(e < 1e-4, "case {i}: {name} relative error {e}");
                }
            }
        }
    }

    #[test]
    fn exp_is_fused_exp_f32_bit_for_bit() {
        // Every 97th f32 bit pattern across [-100, 100] (beyond the clamp at both ends), and
        // the clamp points themselves.
        let mut x = -100f32;
        let mut n = 0;
        while x < 100.0 {
            assert_eq!(
                exp(x).to_bits(),
                crate::fused::exp_f32(x).to_bits(),
                "x = {x}"
            );
            x = f32::from_bits(if x < 0.0 {
                x.to_bits() - 97
            } else {
                x.to_bits() + 97
            });
            if x.abs() < 1e-30 {
                x = 1e-30;
            }
            n += 1;
        }
        assert!(n > 1_000_000, "{n}");
        for x in [-87.0f32, 88.0, 0.0, -0.0] {
            assert_eq!(exp(x).to_bits(), crate::fused::exp_f32(x).to_bits());
        }
    }

    #[test]
    fn a_batch_in_parts_gives_the_whole_batch() {
        // Pairs 0..13 and 13..40 of one batch as two parts: the same loss and gradients (to the
        // last bit: the rows are the same in the same order).
        let g = SamplingGrid::new(&VpSchedule::ddpm_default(), 20, 1.0).unwrap();
        let (vm, m) = mlp(2, 16, 2, 8);
        let vars = named_vars(&vm).unwrap();
        let b = batch(40, 4, 2, &[20, 12, 4], 3);
        let part = |from: usize, to: usize| {
            let cut = |ts: &[Tensor]| -> Vec<Tensor> {
                ts.iter()
                    .map(|t| t.narrow(0, from, to - from).unwrap())
                    .collect()
            };
            VrpoBatch {
                k_starts: b.k_starts[from..to].to_vec(),
                xa: cut(&b.xa),
                za: cut(&b.za),
                xb: cut(&b.xb),
                zb: cut(&b.zb),
                v_a: b.v_a.narrow(0, from, to - from).unwrap(),
                v_b: b.v_b.narrow(0, from, to - from).unwrap(),
                cond: None,
            }
        };
        let mut f = FusedVrpo::new(1);
        let (g1, s1) = f.grads(&m, &vars, &g, &b, VrpoLabels::Soft, 1.0).unwrap();
        let parts = [part(0, 13), part(13, 40)];
        let (g2, s2) = f
            .grads_of_parts(&m, &vars, &g, &parts, VrpoLabels::Soft, 1.0)
            .unwrap();
        assert_eq!(s1.loss, s2.loss);
        for (a, b) in g1.iter().zip(&g2) {
            let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
            assert_eq!(
                a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
    }

    #[test]
    fn a_wrong_gradient_would_be_caught() {
        // The comparison above can fail: scaling one pair's value changes the loss and every
        // gradient beyond the tolerance.
        let s = VpSchedule::ddpm_default();
        let g = SamplingGrid::new(&s, 20, 1.0).unwrap();
        let (vm, m) = mlp(2, 16, 2, 8);
        let vars = named_vars(&vm).unwrap();
        let b = batch(32, 4, 2, &[20, 8], 7);
        let (gp, _) = vrpo_grads(&m, &vars, &g, &b, VrpoLabels::Soft, 1.0).unwrap();
        let mut other = b.clone();
        other.v_a = (&b.v_a + 0.5).unwrap();
        let (gf, _) = FusedVrpo::new(2)
            .grads(&m, &vars, &g, &other, VrpoLabels::Soft, 1.0)
            .unwrap();
        let worst = gf
            .iter()
            .zip(&gp)
            .map(|(a, p)| rel_err(a.as_ref().unwrap(), p.as_ref().unwrap()))
            .fold(0f32, f32::max);
        assert!(worst > 1e-2, "{worst}");
    }

    #[test]
    fn only_an_unconditional_cpu_mlp_is_taken() {
        let vm = VarMap::new();
        let cond = MlpDenoiser::new(
            MlpConfig {
                dim: 2,
                hidden: 8,
                depth: 1,
                time_dim: 4,
                classes: 3,
                zero_init_output: true,
            },
            crate::testutil::vb(&vm, 2, &Device::Cpu),
        )
        .unwrap();
        assert_eq!(
            fused_residual(&cond).err(),
            Some("the residual is class-conditional")
        );
        let analytic = crate::mixture::AnalyticDenoiser {
            mixture: crate::mixture::GaussianMixture::quickstart(),
            schedule: VpSchedule::ddpm_default(),
        };
        assert_eq!(
            fused_residual(&analytic).err(),
            Some("the residual is not an MLP")
        );
        let (_, m) = mlp(2, 8, 1, 4);
        let arc: std::sync::Arc<dyn Denoiser> = std::sync::Arc::new(m);
        assert!(fused_residual(&arc).is_ok());
        // A var that is not the MLP's is an error, not a silent None.
        let (vm2, m2) = mlp(2, 8, 1, 4);
        let (vm3, _) = mlp(2, 8, 1, 4);
        let mut vars = named_vars(&vm2).unwrap();
        vars.push(named_vars(&vm3).unwrap().remove(0));
        let b = batch(4, 2, 2, &[10], 1);
        let g = SamplingGrid::new(&VpSchedule::ddpm_default(), 10, 1.0).unwrap();
        let e = FusedVrpo::new(1)
            .grads(&m2, &vars, &g, &b, VrpoLabels::Soft, 1.0)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("is not a weight or bias"), "{e}");
    }
}
