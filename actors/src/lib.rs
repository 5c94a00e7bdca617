//! tilt-actors: the runtime. ractor actors (rollout, critic, learner, coordinator) that move data
//! between the replay buffer and the math of `tilt-kernels`; no math lives here.

pub mod accounting;
pub mod checkpoint;
pub mod codec;
pub mod control;
pub mod coordinator;
pub mod cpu;
pub mod critic;
pub mod distortion;
pub mod error;
pub mod final_pairs;
pub mod learner;
pub mod objective;
pub mod replay;
pub mod rollout;
pub mod source;
pub mod telemetry;

pub use error::{ActorError, Result};
