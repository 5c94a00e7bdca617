//! The tilted-target estimator: from N reference samples and their rewards, the self-normalised
//! importance weights w_i proportional to exp(lambda r_i), the weighted mean reward and the effective
//! sample size. This is the ground truth a tuned policy is compared against, for any reference.

/// Self-normalised estimate of p_ref exp(lambda r) from reference samples.
#[derive(Debug, Clone)]
pub struct TiltedEstimate {
    /// Normalised weights, summing to 1.
    pub weights: Vec<f64>,
    /// sum_i w_i r_i.
    pub mean_reward: f64,
    /// Kish's effective sample size 1 / sum_i w_i^2.
    pub ess: f64,
}

/// Weights exp(lambda r_i - max) / Z (shifted by the max: no overflow for large lambda r).
pub fn tilted_target(rewards: &[f64], lambda: f64) -> TiltedEstimate {
    if rewards.is_empty() {
        return TiltedEstimate {
            weights: vec![],
            mean_reward: f64::NAN,
            ess: 0.0,
        };
    }
    let m = rewards
        .iter()
        .map(|r| lambda * r)
        .fold(f64::NEG_INFINITY, f64::max);
    let raw: Vec<f64> = rewards.iter().map(|r| (lambda * r - m).exp()).collect();
    let z: f64 = raw.iter().sum();
    let weights: Vec<f64> = raw.iter().map(|w| w / z).collect();
    let mean_reward = weights.iter().zip(rewards).map(|(w, r)| w * r).sum();
    let ess = 1.0 / weights.iter().map(|w| w * w).sum::<f64>();
    TiltedEstimate {
        weights,
        mean_reward,
        ess,
    }
}

/// sum_i w_i v_i.
pub fn weighted_mean(values: &[f64], weights: &[f64]) -> f64 {
    values.iter().zip(weights).map(|(v, w)| v * w).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::rng_for;
    use rand::Rng;
    use rand_distr::StandardNormal;

    #[test]
    fn hand_case_and_limits() {
        // r = (0, ln 3), lambda = 1: weights (1/4, 3/4), mean = .75 ln 3, ESS = 1/(1/16 + 9/16) = 1.6.
        let e = tilted_target(&[0.0, 3f64.ln()], 1.0);
        assert!((e.weights[0] - 0.25).abs() < 1e-15 && (e.weights[1] - 0.75).abs() < 1e-15);
        assert!((e.mean_reward - 0.75 * 3f64.ln()).abs() < 1e-15);
        assert!((e.ess - 1.6).abs() < 1e-12);
        // lambda = 0: uniform weights, ESS = N. Huge lambda * r: no overflow, all mass on the max.
        let e0 = tilted_target(&[1.0, 2.0, 3.0, 4.0], 0.0);
        assert!((e0.ess - 4.0).abs() < 1e-12);
        let big = tilted_target(&[1.0, 900.0], 10.0);
        assert!((big.weights[1] - 1.0).abs() < 1e-12 && big.mean_reward.is_finite());
    }

    #[test]
    fn gaussian_tilt_closed_form() {
        // r ~ N(0, 1) tilted by exp(lambda r) is N(lambda, 1): weighted mean -> lambda = 0.5.
        // 200k samples, ESS ~ N exp(-lambda^2) ~ 156k: standard error ~ 0.003, tolerance 0.015.
        let mut rng = rng_for(3, 0, 0);
        let r: Vec<f64> = (0..200_000).map(|_| rng.sample(StandardNormal)).collect();
        let e = tilted_target(&r, 0.5);
        assert!((e.mean_reward - 0.5).abs() < 0.015, "{}", e.mean_reward);
        let want_ess = 200_000.0 * (-0.25f64).exp();
        assert!(
            (e.ess / want_ess - 1.0).abs() < 0.05,
            "{} vs {want_ess}",
            e.ess
        );
    }
}
