//! The tilted-target estimator: from N reference samples and their rewards, the self-normalised
//! importance weights w_i proportional to exp(lambda r_i), the weighted mean reward and the effective
//! sample size. This is the ground truth a tuned policy is compared against, for any reference;
//! with it, systematic resampling (target-distributed samples for plots) and the share of the
//! reference-to-target gap a policy closed.

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

/// Indices of `n` draws by systematic resampling of normalised `weights`, with offset `u` in [0, 1):
/// draw j takes the first index i whose cumulative weight w_0 + ... + w_i reaches (j + u) / n (the
/// last index if rounding leaves the total short of 1). One uniform for all draws, so index i is
/// drawn floor or ceil of n w_i times. Empty `weights` give no indices.
pub fn systematic_resample(weights: &[f64], n: usize, u: f64) -> Vec<usize> {
    let Some(&first) = weights.first() else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(n);
    let (mut acc, mut i) = (first, 0);
    for j in 0..n {
        let t = (j as f64 + u) / n as f64;
        while acc < t && i + 1 < weights.len() {
            i += 1;
            acc += weights[i];
        }
        out.push(i);
    }
    out
}

/// Share of the reference-to-target gap in mean reward a policy has closed:
/// (mean - reference) / (target - reference); 0 at the reference, 1 at the target. NaN when
/// |target - reference| <= 1e-12 (no gap to close).
pub fn gap_closed(mean: f64, reference: f64, target: f64) -> f64 {
    let denom = target - reference;
    if denom.abs() > 1e-12 {
        (mean - reference) / denom
    } else {
        f64::NAN
    }
}

/// Mean of `values` and its standard error, sample std (n - 1) / sqrt(n): the sampling noise of
/// an evaluation's mean. NaN standard error for fewer than two values.
pub fn mean_and_se(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    if values.len() < 2 {
        return (mean, f64::NAN);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::rng_for;
    use rand::Rng;
    use rand_distr::StandardNormal;

    #[test]
    fn mean_and_se_by_hand() {
        // (1, 2, 3, 4): mean 2.5, sample variance 5/3, SE sqrt(5/12).
        let (m, se) = mean_and_se(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(m, 2.5);
        assert!((se - (5.0f64 / 12.0).sqrt()).abs() < 1e-15);
        assert!(mean_and_se(&[1.0]).1.is_nan());
    }

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

    #[test]
    fn systematic_resample_hand_cases() {
        // Cumulative (0.1, 0.3, 0.6, 1.0), targets (j + 0.5) / 4 = .125, .375, .625, .875:
        // .125 -> 1 (0.1 < .125 <= 0.3), .375 -> 2, .625 -> 3, .875 -> 3.
        assert_eq!(
            systematic_resample(&[0.1, 0.2, 0.3, 0.4], 4, 0.5),
            vec![1, 2, 3, 3]
        );
        // A zero weight is never drawn: cumulative (.5, .5, 1) -> 0, 0, 2, 2.
        assert_eq!(
            systematic_resample(&[0.5, 0.0, 0.5], 4, 0.5),
            vec![0, 0, 2, 2]
        );
        // u = 0: targets 0, 1/3, 2/3; cumulative (1/3, 2/3, 1) reached exactly -> 0, 0, 1.
        // (acc < t is strict, so a target equal to a cumulative weight stays on that index.)
        let third = 1.0 / 3.0;
        assert_eq!(
            systematic_resample(&[third, third, third], 3, 0.0),
            vec![0, 0, 1]
        );
        // Weights summing to a little less than 1: the last index absorbs the shortfall.
        assert_eq!(systematic_resample(&[0.5, 0.49], 2, 0.99), vec![0, 1]);
        assert!(systematic_resample(&[], 3, 0.5).is_empty());
        assert!(systematic_resample(&[1.0], 0, 0.5).is_empty());
    }

    #[test]
    fn gap_closed_hand_cases() {
        // Reference 1, target 3: a policy at 2 closed half the gap, at 3 all of it, at 0 minus half.
        assert_eq!(gap_closed(2.0, 1.0, 3.0), 0.5);
        assert_eq!(gap_closed(3.0, 1.0, 3.0), 1.0);
        assert_eq!(gap_closed(0.0, 1.0, 3.0), -0.5);
        // No gap (|target - reference| <= 1e-12): NaN, not an infinity.
        assert!(gap_closed(2.0, 1.0, 1.0 + 1e-13).is_nan());
        assert!(gap_closed(2.0, 1.0, 1.0).is_nan());
    }
}
