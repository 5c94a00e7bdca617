//! tilt-actors: the runtime. ractor actors (rollout, critic, learner, coordinator) that move data
//! between the replay buffer and the math of `tilt-kernels`; no math lives here.

pub mod error;
pub mod replay;

pub use error::{ActorError, Result};
