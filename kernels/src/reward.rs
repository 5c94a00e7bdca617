//! Rewards behind the `Reward` trait: linear a.x + b and quadratic -scale |x - c|^2 for
//! low-dimensional data. (Learned classifier rewards for images come later.)

use candle_core::{DType, Tensor};

use crate::{KernelError, Result};

/// r(x_0): a scalar per sample.
pub trait Reward: Send + Sync {
    /// `x0`: [batch, ...] -> [batch] f32. `cond`: [batch] u32 class of each sample (the "prompt")
    /// for a prompt-aware reward; prompt-agnostic rewards ignore it.
    fn reward(&self, x0: &Tensor, cond: Option<&Tensor>) -> Result<Tensor>;
    /// A short name for reports.
    fn name(&self) -> String;
}

/// `reward` of every sample as host values, refusing a non-finite one: a NaN or infinite reward
/// (a user's reward, or a built-in one on bad input) would otherwise poison the critic's labels,
/// the preference pairs and the evaluation silently. The error names the reward and the sample.
pub fn checked_rewards(
    reward: &dyn Reward,
    x0: &Tensor,
    cond: Option<&Tensor>,
) -> Result<Vec<f32>> {
    let r = reward
        .reward(x0, cond)?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?;
    if let Some((index, &value)) = r.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(KernelError::NonFiniteReward {
            reward: reward.name(),
            value,
            index,
            n: r.len(),
        });
    }
    Ok(r)
}

/// r(x) = a.x + b.
#[derive(Debug, Clone)]
pub struct LinearReward {
    pub a: Vec<f64>,
    pub b: f64,
}

/// r(x) = -scale |x - center|^2.
#[derive(Debug, Clone)]
pub struct QuadraticReward {
    pub center: Vec<f64>,
    pub scale: f64,
}

fn check_dim(op: &'static str, x0: &Tensor, d: usize) -> Result<()> {
    if x0.rank() != 2 || x0.dim(1)? != d {
        return Err(KernelError::shape(
            op,
            format!(
                "x0 is {:?}, the reward expects [batch, {d}]",
                x0.shape().dims()
            ),
        ));
    }
    Ok(())
}

impl Reward for LinearReward {
    fn reward(&self, x0: &Tensor, _cond: Option<&Tensor>) -> Result<Tensor> {
        check_dim("LinearReward", x0, self.a.len())?;
        let a = Tensor::from_vec(
            self.a.iter().map(|&v| v as f32).collect::<Vec<_>>(),
            (self.a.len(), 1),
            x0.device(),
        )?;
        Ok((x0.to_dtype(DType::F32)?.matmul(&a)?.squeeze(1)? + self.b)?)
    }
    fn name(&self) -> String {
        format!("linear(a={:?}, b={})", self.a, self.b)
    }
}

impl Reward for QuadraticReward {
    fn reward(&self, x0: &Tensor, _cond: Option<&Tensor>) -> Result<Tensor> {
        check_dim("QuadraticReward", x0, self.center.len())?;
        let c = Tensor::from_vec(
            self.center.iter().map(|&v| v as f32).collect::<Vec<_>>(),
            (1, self.center.len()),
            x0.device(),
        )?;
        Ok((x0.to_dtype(DType::F32)?.broadcast_sub(&c)?.sqr()?.sum(1)? * -self.scale)?)
    }
    fn name(&self) -> String {
        format!("quadratic(center={:?}, scale={})", self.center, self.scale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A user's reward that goes wrong on some inputs.
    struct NanAbove(f32);

    impl Reward for NanAbove {
        fn reward(&self, x0: &Tensor, _cond: Option<&Tensor>) -> Result<Tensor> {
            let v: Vec<f32> = x0
                .to_vec2::<f32>()?
                .iter()
                .map(|r| if r[0] > self.0 { f32::NAN } else { r[0] })
                .collect();
            Ok(Tensor::new(v, x0.device())?)
        }
        fn name(&self) -> String {
            "nan_above".into()
        }
    }

    #[test]
    fn a_non_finite_reward_is_refused_naming_the_reward_and_the_sample() {
        let x = Tensor::new(&[[0f32, 0.0], [1.0, 0.0], [3.0, 0.0]], &Device::Cpu).unwrap();
        assert_eq!(
            checked_rewards(&NanAbove(5.0), &x, None).unwrap(),
            vec![0.0, 1.0, 3.0]
        );
        let e = checked_rewards(&NanAbove(2.0), &x, None)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "reward nan_above returned NaN for sample 2 of 3: every reward must be finite"
        );
        let inf = LinearReward {
            a: vec![f64::INFINITY, 0.0],
            b: 0.0,
        };
        let e = checked_rewards(&inf, &x, None).unwrap_err().to_string();
        assert!(
            e.contains("returned NaN for sample 0") || e.contains("returned inf for sample 1"),
            "{e}"
        );
    }

    #[test]
    fn hand_values() {
        let x = Tensor::new(&[[1f32, 2.0], [-1.0, 0.5]], &Device::Cpu).unwrap();
        // 2*1 - 1*2 + .5 = .5 ; 2*(-1) - .5 + .5 = -2
        let r = LinearReward {
            a: vec![2.0, -1.0],
            b: 0.5,
        }
        .reward(&x, None)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
        assert_eq!(r, vec![0.5, -2.0]);
        // -3 * ((1-1)^2 + (2-0)^2) = -12 ; -3 * (4 + .25) = -12.75
        let q = QuadraticReward {
            center: vec![1.0, 0.0],
            scale: 3.0,
        }
        .reward(&x, None)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
        assert_eq!(q, vec![-12.0, -12.75]);
        assert!(LinearReward {
            a: vec![1.0; 3],
            b: 0.0
        }
        .reward(&x, None)
        .is_err());
    }
}
