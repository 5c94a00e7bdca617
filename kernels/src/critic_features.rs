//! The paper's critic encoder for images: the frozen penultimate features of the reward model on
//! the noisy state x_k, concatenated with the time embedding plus a class embedding, through a
//! small MLP (Linear + SiLU). Only the MLP and the class embedding train; the reward model's
//! weights live in another variable map and its features are detached.
//!
//! The embedding cache: the frozen features of a fixed set of states are computed once
//! ([`RewardFeatureEncoder::frozen_features`]) and fed back in their place (a rank-2 [batch, F]
//! input is taken as cached features, images are [batch, C, H, W]), so critic training pays the
//! reward model's forward pass once per state instead of once per sampled batch.

use std::sync::Arc;

use candle_core::{DType, Module, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};

use crate::classifier::Classifier;
use crate::critic::CriticEncoder;
use crate::denoiser::time_embedding;
use crate::{KernelError, Result};

/// Shape of a [`RewardFeatureEncoder`] (the frozen model brings its own feature width).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureEncoderConfig {
    /// Hidden width of the trained MLP, which is also the output width.
    pub hidden: usize,
    /// Number of Linear + SiLU layers (>= 1).
    pub depth: usize,
    /// Width of the sinusoidal time embedding (even, > 0).
    pub time_dim: usize,
    /// Number of classes (0 = unconditional).
    pub classes: usize,
}

/// concat(frozen reward-model features of x, time embedding (+ class embedding)) -> MLP.
pub struct RewardFeatureEncoder {
    frozen: Arc<dyn Classifier>,
    cfg: FeatureEncoderConfig,
    layers: Vec<Linear>,
    class_emb: Option<Embedding>,
}

impl RewardFeatureEncoder {
    /// Build the trained part in `vb` (names `l0..`, `class`); `frozen` is not trained.
    pub fn new(
        frozen: Arc<dyn Classifier>,
        cfg: FeatureEncoderConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        if cfg.hidden == 0 || cfg.depth == 0 {
            return Err(KernelError::param(
                "critic.encoder",
                format!("hidden {} depth {}", cfg.hidden, cfg.depth),
                "hidden and depth must be at least 1",
            ));
        }
        if cfg.time_dim == 0 || cfg.time_dim % 2 != 0 {
            return Err(KernelError::param(
                "critic.time_dim",
                cfg.time_dim,
                "must be even and positive",
            ));
        }
        if cfg.classes != 0 && cfg.classes != frozen.classes() {
            return Err(KernelError::param(
                "critic.encoder.classes",
                cfg.classes,
                format!("the reward model has {} classes", frozen.classes()),
            ));
        }
        let mut layers = Vec::with_capacity(cfg.depth);
        let mut width = frozen.feature_dim() + cfg.time_dim;
        for i in 0..cfg.depth {
            layers.push(candle_nn::linear(
                width,
                cfg.hidden,
                vb.pp(format!("l{i}")),
            )?);
            width = cfg.hidden;
        }
        let class_emb = if cfg.classes > 0 {
            Some(candle_nn::embedding(
                cfg.classes,
                cfg.time_dim,
                vb.pp("class"),
            )?)
        } else {
            None
        };
        Ok(Self {
            frozen,
            cfg,
            layers,
            class_emb,
        })
    }

    /// The frozen features of images x [batch, C, H, W] -> [batch, F], detached: what the cache
    /// holds and what `encode` accepts in place of the images.
    pub fn frozen_features(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.frozen.features(&x.to_dtype(DType::F32)?)?.detach())
    }
}

impl CriticEncoder for RewardFeatureEncoder {
    fn encode(&self, x: &Tensor, n: &Tensor, cond: Option<&Tensor>) -> Result<Tensor> {
        const OP: &str = "RewardFeatureEncoder::encode";
        let f = match x.rank() {
            2 if x.dim(1)? == self.frozen.feature_dim() => x.detach(),
            2 => {
                return Err(KernelError::shape(
                    OP,
                    format!(
                        "cached features are {:?}, expected [batch, {}]",
                        x.dims(),
                        self.frozen.feature_dim()
                    ),
                ))
            }
            _ => self.frozen_features(x)?,
        };
        let batch = f.dim(0)?;
        if n.dims() != [batch] {
            return Err(KernelError::shape(
                OP,
                format!("n is {:?}, expected [{batch}]", n.dims()),
            ));
        }
        let mut temb = time_embedding(n, self.cfg.time_dim)?;
        match (&self.class_emb, cond) {
            (Some(emb), Some(c)) => temb = (temb + emb.forward(c)?)?,
            (None, None) => {}
            (Some(_), None) => {
                return Err(KernelError::param(
                    "critic.encoder.cond",
                    "None",
                    "the encoder is class-conditioned",
                ))
            }
            (None, Some(_)) => {
                return Err(KernelError::param(
                    "critic.encoder.cond",
                    "Some",
                    "the encoder is unconditional; it would silently ignore cond",
                ))
            }
        }
        let mut h = Tensor::cat(&[&f, &temb], 1)?;
        for l in &self.layers {
            h = crate::fused::silu(&crate::fused::linear_layer(l, &h)?)?;
        }
        Ok(h)
    }

    fn feat_dim(&self) -> usize {
        self.cfg.hidden
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classifier::{MlpClassifier, MlpClassifierConfig};
    use crate::critic::{CdfCritic, CdfGrid};
    use crate::init::{seeded_var_builder, CLASSIFIER_STREAM, TEST_STREAM};
    use crate::optim::named_vars;
    use crate::rng::{randn, rng_for};
    use candle_core::Device;
    use candle_nn::VarMap;

    fn setup() -> (Arc<MlpClassifier>, VarMap, RewardFeatureEncoder, VarMap) {
        let dev = Device::Cpu;
        let vm_a = VarMap::new();
        let a = Arc::new(
            MlpClassifier::new(
                MlpClassifierConfig {
                    side: 4,
                    hidden: 8,
                    depth: 1,
                    classes: 3,
                },
                seeded_var_builder(&vm_a, 1, CLASSIFIER_STREAM, DType::F32, &dev),
            )
            .unwrap(),
        );
        let vm = VarMap::new();
        let enc = RewardFeatureEncoder::new(
            a.clone(),
            FeatureEncoderConfig {
                hidden: 16,
                depth: 2,
                time_dim: 8,
                classes: 3,
            },
            seeded_var_builder(&vm, 2, TEST_STREAM, DType::F32, &dev),
        )
        .unwrap();
        (a, vm_a, enc, vm)
    }

    #[test]
    fn cached_features_give_the_same_encoding_as_the_images() {
        let (_, _, enc, _) = setup();
        let x = randn(&mut rng_for(0, 0, 0), (5, 1, 4, 4), &Device::Cpu).unwrap();
        let n = Tensor::new(&[1f32, 10.0, 100.0, 500.0, 999.0], &Device::Cpu).unwrap();
        let c = Tensor::new(&[0u32, 1, 2, 0, 1], &Device::Cpu).unwrap();
        let from_images = enc.encode(&x, &n, Some(&c)).unwrap();
        let cached = enc.frozen_features(&x).unwrap();
        assert_eq!(cached.dims(), &[5, 8]);
        let from_cache = enc.encode(&cached, &n, Some(&c)).unwrap();
        assert_eq!(
            from_images.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            from_cache.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        // A rank-2 input of another width is neither images nor features.
        assert!(enc
            .encode(
                &Tensor::zeros((5, 7), DType::F32, &Device::Cpu).unwrap(),
                &n,
                Some(&c)
            )
            .is_err());
    }

    #[test]
    fn the_reward_model_stays_frozen_under_critic_training() {
        // The critic's loss has gradients for the critic's variables only: the reward model's
        // variables (another map) get none, and a training step leaves them bit for bit.
        let (_, vm_a, enc, vm) = setup();
        let critic = CdfCritic::new(
            Box::new(enc),
            CdfGrid::uniform(-3.0, 0.0, 6).unwrap(),
            seeded_var_builder(&vm, 3, TEST_STREAM, DType::F32, &Device::Cpu).pp("head"),
        )
        .unwrap();
        let x = randn(&mut rng_for(1, 0, 0), (4, 1, 4, 4), &Device::Cpu).unwrap();
        let n = Tensor::new(&[5f32, 50.0, 500.0, 900.0], &Device::Cpu).unwrap();
        let c = Tensor::new(&[0u32, 1, 2, 1], &Device::Cpu).unwrap();
        let loss = critic.cdf(&x, &n, Some(&c)).unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        for (name, v) in named_vars(&vm_a).unwrap() {
            assert!(
                g.get(v.as_tensor()).is_none(),
                "reward model var {name} got a gradient"
            );
        }
        let trained = named_vars(&vm).unwrap();
        assert!(trained.iter().any(|(_, v)| g.get(v.as_tensor()).is_some()));
    }
}
