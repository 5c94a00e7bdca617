//! The one error type of tilt-kernels.

use thiserror::Error;

/// Every failure a kernel can report. Variants carry the name of the offending thing.
#[derive(Debug, Error)]
pub enum KernelError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("shape mismatch in {op}: {detail}")]
    Shape { op: &'static str, detail: String },
    #[error("invalid parameter {name} = {value}: {reason}")]
    Param {
        name: &'static str,
        value: String,
        reason: String,
    },
    #[error("checkpoint {path}: {detail}")]
    Checkpoint { path: String, detail: String },
    #[error(
        "reward {reward} returned {value} for sample {index} of {n}: every reward must be finite"
    )]
    NonFiniteReward {
        reward: String,
        value: f32,
        index: usize,
        n: usize,
    },
    /// A model directory's config (diffusers format) that tilt does not read as written: the
    /// file, the key, and why.
    #[error("{file}: {key}: {detail}")]
    ModelConfig {
        file: String,
        key: String,
        detail: String,
    },
    #[error("CUDA support was not compiled in: rebuild with `--features cuda`")]
    NotCompiledWithCuda,
    #[error("CUDA is unavailable: {0}")]
    CudaUnavailable(String),
}

/// Shorthand used across the crate.
pub type Result<T> = std::result::Result<T, KernelError>;

impl KernelError {
    /// A bad parameter value, with a reason a user can act on.
    pub fn param(name: &'static str, value: impl ToString, reason: impl Into<String>) -> Self {
        KernelError::Param {
            name,
            value: value.to_string(),
            reason: reason.into(),
        }
    }
    /// A config key of a model directory's file that tilt refuses.
    pub fn model_config(file: &str, key: &str, detail: impl Into<String>) -> Self {
        KernelError::ModelConfig {
            file: file.to_string(),
            key: key.to_string(),
            detail: detail.into(),
        }
    }
    /// A shape mismatch.
    pub fn shape(op: &'static str, detail: impl Into<String>) -> Self {
        KernelError::Shape {
            op,
            detail: detail.into(),
        }
    }
}
