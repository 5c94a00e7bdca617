//! The Reverb-style samples-per-insert rate limiter, as pure predicates on the run's counters.

use super::ReplayConfig;

/// Reverb's `SampleToInsertRatio` limiter (blocking), with samples counted in records.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RateLimiter {
    spi: f64,
    min_size: u64,
    min_diff: f64,
    max_diff: f64,
}

impl RateLimiter {
    pub(crate) fn new(cfg: &ReplayConfig) -> Self {
        let offset = cfg.min_size as f64 * cfg.samples_per_insert;
        Self {
            spi: cfg.samples_per_insert,
            min_size: cfg.min_size as u64,
            min_diff: offset - cfg.error_buffer,
            max_diff: offset + cfg.error_buffer,
        }
    }

    /// May one more record be inserted after `inserts` inserts and `samples` sampled records?
    pub(crate) fn can_insert(&self, inserts: u64, samples: u64) -> bool {
        self.spi == 0.0 || (inserts + 1) as f64 * self.spi - samples as f64 <= self.max_diff
    }

    /// May `n` more records be sampled?
    pub(crate) fn can_sample(&self, inserts: u64, samples: u64, n: u64) -> bool {
        inserts >= self.min_size
            && (self.spi == 0.0
                || inserts as f64 * self.spi - (samples + n) as f64 >= self.min_diff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::Sampler;

    fn cfg(capacity: usize, min_size: usize, spi: f64, eb: f64, sampler: Sampler) -> ReplayConfig {
        ReplayConfig {
            capacity,
            min_size,
            samples_per_insert: spi,
            error_buffer: eb,
            sampler,
            ..ReplayConfig::default()
        }
    }

    /// Periodic check of a condition, bounded by `limit` (ractor's `periodic_check`).

    #[test]
    fn limiter_matches_hand_computation() {
        // spi = 1, min_size = 10, error_buffer = 5: min_diff = 10 - 5 = 5, max_diff = 10 + 5 = 15.
        let l = RateLimiter::new(&cfg(100, 10, 1.0, 5.0, Sampler::Uniform));
        assert_eq!((l.min_diff, l.max_diff), (5.0, 15.0));
        // Insert iff inserts + 1 - samples <= 15.
        assert!(l.can_insert(14, 0));
        assert!(!l.can_insert(15, 0));
        assert!(l.can_insert(15, 1));
        // Sample n iff inserts >= 10 and inserts - samples - n >= 5.
        assert!(!l.can_sample(9, 0, 1));
        assert!(l.can_sample(10, 0, 5));
        assert!(!l.can_sample(10, 0, 6));
        assert!(l.can_sample(15, 3, 7));
        assert!(!l.can_sample(15, 3, 8));
        // spi = 0: no ratio limit, only min_size.
        let free = RateLimiter::new(&cfg(100, 10, 0.0, 0.0, Sampler::Uniform));
        assert!(free.can_insert(1_000_000, 0));
        assert!(!free.can_sample(9, 0, 1));
        assert!(free.can_sample(10, 1_000_000, 1_000_000));
    }
}
