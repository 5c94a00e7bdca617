//! What a rerun needs to reproduce a run, recorded in its `summary.json` (DESIGN
//! "Reproducibility"): the seed, a hash of the resolved config, the build, the devices.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::Config;

/// The `provenance` block of `summary.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// The run's master seed (`seed`): every random draw derives from it.
    pub seed: u64,
    /// SHA-256 of the resolved config, hex: the same bytes as the run's `config.toml`, so
    /// `sha256sum RUN/config.toml` prints it.
    pub config_sha256: String,
    /// tilt's package version.
    pub tilt_version: String,
    /// The git commit tilt was built from (`-dirty`: tracked files differed from it).
    pub tilt_commit: String,
    /// candle-core's version (Cargo.lock at build time).
    pub candle_version: String,
    /// The device of each role, as resolved from `device` and the role overrides.
    pub devices: Devices,
    /// `learner.threads` (0 = the default): the thread count can change float summation order,
    /// so two runs reproduce each other bit for bit only at the same value.
    pub learner_threads: usize,
    /// `runtime`: "sync" is bit-reproducible on one machine; "async" differs in the order in which
    /// records meet the learner.
    pub runtime: String,
}

/// The resolved device of each role.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Devices {
    pub rollout: String,
    pub critic: String,
    pub learner: String,
    /// `learner.devices` (one per data-parallel replica), when set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub learner_replicas: Vec<String>,
}

/// SHA-256 of `bytes`, lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Provenance {
    /// The provenance of a run of `cfg` with this build.
    pub fn of(cfg: &Config) -> anyhow::Result<Self> {
        Ok(Self {
            seed: cfg.seed,
            config_sha256: sha256_hex(cfg.to_toml()?.as_bytes()),
            tilt_version: env!("CARGO_PKG_VERSION").to_string(),
            tilt_commit: env!("TILT_COMMIT").to_string(),
            candle_version: env!("TILT_CANDLE_VERSION").to_string(),
            devices: Devices {
                rollout: cfg.device_of(&cfg.rollout.device).to_string(),
                critic: cfg.device_of(&cfg.critic.device).to_string(),
                learner: cfg.device_of(&cfg.learner.device).to_string(),
                learner_replicas: cfg.learner.devices.clone(),
            },
            learner_threads: cfg.learner.threads,
            runtime: match cfg.runtime {
                crate::config::RuntimeKind::Async => "async",
                crate::config::RuntimeKind::Sync => "sync",
            }
            .to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_matches_the_standard_test_vectors() {
        // FIPS 180-2 appendix B.1 ("abc") and the empty message.
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn provenance_names_the_seed_the_config_and_the_build() {
        let cfg = Config::from_toml_str("seed = 7\n", "test.toml", &[]).unwrap();
        let p = Provenance::of(&cfg).unwrap();
        assert_eq!(p.seed, 7);
        assert_eq!(
            p.config_sha256,
            sha256_hex(cfg.to_toml().unwrap().as_bytes())
        );
        assert_eq!(
            p.candle_version.split('.').take(2).collect::<Vec<_>>(),
            ["0", "11"]
        );
        assert!(!p.tilt_commit.is_empty());
        assert_eq!(p.devices.learner, "cpu");
        let other =
            Provenance::of(&Config::from_toml_str("seed = 8\n", "t.toml", &[]).unwrap()).unwrap();
        assert_ne!(p.config_sha256, other.config_sha256);
    }
}
