//! tilt-kernels: every piece of math tilt uses, as plain functions and structs over candle tensors.
//! No async, no I/O beyond safetensors files, no actors. Each module is tested against a closed form
//! or a hand computation next to its code.

pub mod classifier;
pub mod clip_gates;
pub mod clip_metrics;
pub mod critic;
pub mod critic_features;
pub mod critic_train;
pub mod cuda;
pub mod denoiser;
pub mod dfdpo;
pub mod diffusers;
pub mod digits;
pub mod distort;
pub mod error;
pub mod final_dpo;
pub mod fused;
pub mod fused_vrpo;
pub mod image_reward;
pub mod init;
pub mod logprob;
pub mod losses;
pub mod mixture;
pub mod models;
pub mod optim;
pub mod reward;
pub mod rng;
pub mod schedule;
#[cfg(test)]
mod testutil;
pub mod tilt;
pub mod vrpo;

pub use error::{KernelError, Result};
