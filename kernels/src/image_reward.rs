//! Image rewards behind the `Reward` seam: a learned classifier's log-probability of the prompt
//! class (the PickScore role of the paper, prompt-aware) and stroke contrast (prompt-agnostic).

use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::classifier::Classifier;
use crate::reward::Reward;
use crate::{KernelError, Result};

/// r(x) = log p_A(class | x) for a trained classifier A; needs the class of every sample.
pub struct ClassifierReward {
    pub model: Arc<dyn Classifier>,
}

impl Reward for ClassifierReward {
    fn reward(&self, x0: &Tensor, cond: Option<&Tensor>) -> Result<Tensor> {
        let c = cond.ok_or_else(|| {
            KernelError::param(
                "reward.kind",
                "classifier",
                "log p(class | x) needs the class of every sample (a class-conditional run)",
            )
        })?;
        Ok(self.model.log_prob(x0, c)?.detach())
    }
    fn name(&self) -> String {
        "classifier log p_A(class | x)".into()
    }
}

/// r(x) = scale * mean over pixels of x^2, for images in [-1, 1]: saturated (ink or paper) pixels
/// score 1, grey ones less. Ignores the class.
#[derive(Debug, Clone)]
pub struct ContrastReward {
    pub scale: f64,
}

impl Reward for ContrastReward {
    fn reward(&self, x0: &Tensor, _cond: Option<&Tensor>) -> Result<Tensor> {
        if x0.rank() < 2 {
            return Err(KernelError::shape(
                "ContrastReward",
                format!("x0 is {:?}, expected [batch, ...]", x0.dims()),
            ));
        }
        Ok((x0.to_dtype(DType::F32)?.flatten_from(1)?.sqr()?.mean(1)? * self.scale)?)
    }
    fn name(&self) -> String {
        format!("contrast(scale={})", self.scale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn contrast_hand_values() {
        // Row 0: pixels (1, -1, 0, 0) -> mean x^2 = 0.5; row 1: all 0.5 -> 0.25. Scale 2.
        let x = Tensor::new(
            &[[[1f32, -1.0], [0.0, 0.0]], [[0.5, 0.5], [0.5, 0.5]]],
            &Device::Cpu,
        )
        .unwrap()
        .unsqueeze(1)
        .unwrap(); // [2, 1, 2, 2]
        let r = ContrastReward { scale: 2.0 }
            .reward(&x, None)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(r, vec![1.0, 0.5]);
    }
}
