//! The preference losses. VRPO on segment path log-ratios, with the soft labels of DESIGN.md
//! (q = sigmoid(V(a) - V(b)), optimum at beta Delta = V(a) - V(b), the Doob h-transform) or the
//! paper's hard labels; and the Diffusion-DPO loss plus lambda times the SFT loss (DF-DPO).

use candle_core::{DType, Tensor};

use crate::{KernelError, Result};

/// How VRPO turns the two endpoint values into a preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VrpoLabels {
    /// q = sigmoid(V(a) - V(b)): the exact tilt at beta = 1 (DESIGN.md). Default.
    Soft,
    /// winner = larger V, the paper's Algorithm 1 (no finite optimum; drifts toward the mode).
    Hard,
}

/// log sigmoid(x) = -ln(1 + e^-x), written as -(m + ln(e^-m + e^(-x-m))) with m = max(-x, 0)
/// held constant (detached): every exponent is <= 0, so it never overflows, and its gradient is
/// exactly 1 - sigmoid(x) everywhere. (The kinked form min(x,0) - ln(1 + e^-|x|) has a wrong
/// gradient at x = 0 under candle's subgradients, and x = 0 is every pair at step 0.)
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let m = x.neg()?.relu()?.detach();
    let inner = (m.neg()?.exp()? + (x.neg()? - &m)?.exp()?)?.log()?;
    Ok((m + inner)?.neg()?)
}

fn check_same(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.shape() != b.shape() {
        return Err(KernelError::shape(
            op,
            format!("{:?} vs {:?}", a.shape().dims(), b.shape().dims()),
        ));
    }
    Ok(())
}

/// Soft-label VRPO loss, mean over the batch:
/// -[q log sigmoid(beta Delta) + (1 - q) log sigmoid(-beta Delta)], q = sigmoid(V(a) - V(b)).
/// `delta`, `v_a`, `v_b`: [batch]; Delta = [log p_theta(a) - log p_ref(a)] - [same for b].
pub fn vrpo_soft_loss(delta: &Tensor, v_a: &Tensor, v_b: &Tensor, beta: f64) -> Result<Tensor> {
    check_same("vrpo_soft_loss", delta, v_a)?;
    check_same("vrpo_soft_loss", v_a, v_b)?;
    let q = candle_nn::ops::sigmoid(&(v_a - v_b)?.detach())?;
    let bd = (delta * beta)?;
    let l = ((&q * log_sigmoid(&bd)?)? + ((1.0 - &q)? * log_sigmoid(&bd.neg()?)?)?)?;
    Ok(l.neg()?.mean_all()?)
}

/// Hard-label VRPO loss (the paper's Algorithm 1): -log sigmoid(beta s Delta), s = +1 when
/// V(a) >= V(b), else -1. Mean over the batch.
pub fn vrpo_hard_loss(delta: &Tensor, v_a: &Tensor, v_b: &Tensor, beta: f64) -> Result<Tensor> {
    check_same("vrpo_hard_loss", delta, v_a)?;
    check_same("vrpo_hard_loss", v_a, v_b)?;
    let s = v_a
        .ge(v_b)?
        .to_dtype(DType::F32)?
        .affine(2.0, -1.0)?
        .detach();
    Ok(log_sigmoid(&(delta * s)?.affine(beta, 0.0)?)?
        .neg()?
        .mean_all()?)
}

/// The VRPO loss with the chosen labels.
pub fn vrpo_loss(
    labels: VrpoLabels,
    delta: &Tensor,
    v_a: &Tensor,
    v_b: &Tensor,
    beta: f64,
) -> Result<Tensor> {
    match labels {
        VrpoLabels::Soft => vrpo_soft_loss(delta, v_a, v_b, beta),
        VrpoLabels::Hard => vrpo_hard_loss(delta, v_a, v_b, beta),
    }
}

/// Share of pairs where the policy's preference agrees with the value's: sign(Delta) == sign(V(a) - V(b)).
/// Pairs with Delta == 0 count as disagreeing (at step 0 this is 0); 0 for no pairs.
pub fn pair_accuracy(delta: &[f32], v_a: &[f32], v_b: &[f32]) -> f32 {
    if delta.is_empty() {
        return 0.0;
    }
    let ok = delta
        .iter()
        .zip(v_a.iter().zip(v_b))
        .filter(|(&di, (&ai, &bi))| di != 0.0 && (di > 0.0) == (ai > bi))
        .count();
    ok as f32 / delta.len() as f32
}

/// What one Diffusion-DPO evaluation reports.
#[derive(Debug)]
pub struct DpoOutput {
    /// The scalar loss to differentiate: DPO term + lambda_sft * SFT term.
    pub loss: Tensor,
    /// Its value.
    pub total: f32,
    /// The DPO term alone (mean over pairs).
    pub dpo: f32,
    /// The SFT term alone: mean ||eps - eps_theta(x_w)||^2 (mean over dims).
    pub sft: f32,
    /// Share of pairs with -beta/2 (m - r) > 0.
    pub implicit_accuracy: f32,
}

/// Per-sample mean squared error over all non-batch dims: [batch, ...] -> [batch].
fn per_sample_mse(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok((a - b)?.sqr()?.flatten_from(1)?.mean(1)?)
}

/// Diffusion-DPO with an SFT term (DESIGN.md, DF-DPO). The pair shares timestep and noise `eps`.
/// m = ||eps - eps_theta(x_w)||^2 - ||eps - eps_theta(x_l)||^2 (means over dims), r the same with the
/// reference; L = -log sigmoid(-beta/2 (m - r)) + lambda_sft ||eps - eps_theta(x_w)||^2, mean over pairs.
pub fn diffusion_dpo_loss(
    eps: &Tensor,
    eps_theta_w: &Tensor,
    eps_theta_l: &Tensor,
    eps_ref_w: &Tensor,
    eps_ref_l: &Tensor,
    beta: f64,
    lambda_sft: f64,
) -> Result<DpoOutput> {
    for t in [eps_theta_w, eps_theta_l, eps_ref_w, eps_ref_l] {
        check_same("diffusion_dpo_loss", eps, t)?;
    }
    let mse_w = per_sample_mse(eps, eps_theta_w)?;
    let mse_l = per_sample_mse(eps, eps_theta_l)?;
    let m = (&mse_w - mse_l)?;
    let r =
        (per_sample_mse(eps, &eps_ref_w.detach())? - per_sample_mse(eps, &eps_ref_l.detach())?)?;
    let z = ((m - r)? * (-beta / 2.0))?;
    let dpo = log_sigmoid(&z)?.neg()?.mean_all()?;
    let sft = mse_w.mean_all()?;
    let loss = (&dpo + (&sft * lambda_sft)?)?;
    // One read-back of [loss, dpo, sft, z..] (one device sync on a GPU, not one per number).
    let f32s = |t: &Tensor| t.to_dtype(DType::F32);
    let host = Tensor::cat(
        &[
            f32s(&loss)?.reshape(1)?,
            f32s(&dpo)?.reshape(1)?,
            f32s(&sft)?.reshape(1)?,
            f32s(&z)?,
        ],
        0,
    )?
    .to_vec1::<f32>()?;
    let zs = &host[3..];
    let acc = zs.iter().filter(|&&v| v > 0.0).count() as f32 / zs.len().max(1) as f32;
    Ok(DpoOutput {
        loss,
        total: host[0],
        dpo: host[1],
        sft: host[2],
        implicit_accuracy: acc,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    #[test]
    fn log_sigmoid_is_stable_and_exact() {
        // log sigmoid(0) = -ln 2; log sigmoid(-100) = -100 - ln(1 + e^-100) ~ -100; log sigmoid(100) ~ -e^-100.
        let v = log_sigmoid(&t(&[0.0, -100.0, 100.0, 2.0]))
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!((v[0] + std::f32::consts::LN_2).abs() < 1e-7);
        assert!((v[1] + 100.0).abs() < 1e-4);
        assert!(v[2].abs() < 1e-6);
        assert!((v[3] as f64 - (1.0 / (1.0 + (-2f64).exp())).ln()).abs() < 1e-6);
    }

    #[test]
    fn vrpo_loss_is_ln2_when_policy_equals_reference() {
        // Delta = 0 => sigmoid(0) = 1/2 for both terms: loss = -(q + 1 - q) ln(1/2) = ln 2, any q.
        let z = t(&[0.0; 4]);
        let va = t(&[0.3, -1.0, 2.0, 0.0]);
        let vb = t(&[0.1, 1.0, -2.0, 0.0]);
        for labels in [VrpoLabels::Soft, VrpoLabels::Hard] {
            let l = vrpo_loss(labels, &z, &va, &vb, 1.0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!((l - std::f32::consts::LN_2).abs() < 1e-6, "{labels:?}: {l}");
        }
    }

    #[test]
    fn soft_label_gradient_vanishes_at_the_h_transform() {
        // dL/dDelta = -beta (q - sigmoid(beta Delta)) / B, zero iff beta Delta = V(a) - V(b).
        let va = t(&[0.9, -0.4, 1.5]);
        let vb = t(&[0.1, 0.6, 1.5]);
        let beta = 1.0;
        let opt = Var::from_tensor(&((&va - &vb).unwrap() / beta).unwrap()).unwrap();
        let l = vrpo_soft_loss(opt.as_tensor(), &va, &vb, beta).unwrap();
        let g = l.backward().unwrap();
        let gd = g.get(opt.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        assert!(gd.iter().all(|v| v.abs() < 1e-7), "{gd:?}");
        // Away from the optimum the gradient is the closed form above.
        let d = Var::from_tensor(&t(&[0.0, 0.0, 1.0])).unwrap();
        let l = vrpo_soft_loss(d.as_tensor(), &va, &vb, 2.0).unwrap();
        let gd = l
            .backward()
            .unwrap()
            .get(d.as_tensor())
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        for (i, (dv, dq)) in [(0.0, 0.8), (0.0, -1.0), (1.0, 0.0)].iter().enumerate() {
            let want = -2.0 * (sig(*dq) - sig(2.0 * dv)) / 3.0;
            assert!(
                (gd[i] as f64 - want).abs() < 1e-6,
                "{i}: {} vs {want}",
                gd[i]
            );
        }
    }

    #[test]
    fn hard_labels_hand_value() {
        // V(a) > V(b), Delta = 1, beta = 2: -ln sigmoid(2) = ln(1 + e^-2) = 0.12692801104297252.
        // V(a) < V(b), Delta = 1: -ln sigmoid(-2) = 2.1269280110429727. Mean = 1.1269280110429726.
        let l = vrpo_hard_loss(&t(&[1.0, 1.0]), &t(&[1.0, 0.0]), &t(&[0.0, 1.0]), 2.0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((l as f64 - 1.126_928_011_042_972_6).abs() < 1e-6, "{l}");
        assert_eq!(
            pair_accuracy(&[1.0, 1.0, 0.0], &[1.0, 0.0, 1.0], &[0.0, 1.0, 0.0]),
            1.0 / 3.0
        );
    }

    #[test]
    fn diffusion_dpo_is_ln2_at_reference_and_hand_case() {
        let d = Device::Cpu;
        let eps = Tensor::new(&[[1f32, 0.0], [0.0, 1.0]], &d).unwrap();
        let w = Tensor::new(&[[0.5f32, 0.0], [0.0, 0.0]], &d).unwrap();
        let l = Tensor::new(&[[0.0f32, 0.0], [0.0, 2.0]], &d).unwrap();
        // policy == reference: m = r, loss = ln 2 + lambda * sft.
        let out = diffusion_dpo_loss(&eps, &w, &l, &w, &l, 5000.0, 0.0).unwrap();
        assert!((out.dpo - std::f32::consts::LN_2).abs() < 1e-6);
        assert_eq!(out.implicit_accuracy, 0.0);
        // Hand case. Row 0: mse_w(theta) = ((1-.5)^2 + 0)/2 = .125, mse_l(theta) = 1/2 = .5 -> m = -.375.
        // Row 1: mse_w = 1/2 = .5, mse_l = (0 + 1)/2 = .5 -> m = 0. Reference: eps_ref = 0 for both, r = .5 - .5 = 0.
        // beta = 2: z = -(m - r) = [.375, 0]. dpo = mean(-ln sigmoid(.375), ln 2); accuracy = 1/2.
        // sft = mean(.125, .5) = .3125; loss = dpo + 0.5 * .3125.
        let zero = Tensor::zeros((2, 2), DType::F32, &d).unwrap();
        let out = diffusion_dpo_loss(&eps, &w, &l, &zero, &zero, 2.0, 0.5).unwrap();
        let want_dpo = ((1.0 + (-0.375f64).exp()).ln() + 2f64.ln()) / 2.0;
        assert!((out.dpo as f64 - want_dpo).abs() < 1e-6);
        assert!((out.sft - 0.3125).abs() < 1e-7);
        assert_eq!(out.implicit_accuracy, 0.5);
        let total = out.loss.to_scalar::<f32>().unwrap();
        assert_eq!(out.total, total);
        assert!((total as f64 - (want_dpo + 0.5 * 0.3125)).abs() < 1e-6);
    }
}
