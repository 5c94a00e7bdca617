//! The one error type of tilt-actors.

use thiserror::Error;

/// Failures of the runtime, with the offending component named.
#[derive(Debug, Error)]
pub enum ActorError {
    #[error(transparent)]
    Kernel(#[from] tilt_kernels::KernelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("replay: {0}")]
    Replay(String),
    #[error("replay is closed")]
    Closed,
    #[error("record {seq} from producer {producer}: {detail}")]
    Record {
        seq: u64,
        producer: u32,
        detail: String,
    },
    #[error("checkpoint {path}: {detail}")]
    Checkpoint { path: String, detail: String },
    #[error("actor {role}: {detail}")]
    Actor { role: String, detail: String },
}

/// Shorthand used across the crate.
pub type Result<T> = std::result::Result<T, ActorError>;
