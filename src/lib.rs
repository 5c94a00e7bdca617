//! The `tilt` package: configuration, pipeline wiring and the command line. The math lives in
//! `tilt-kernels`, the actors in `tilt-actors`.

pub mod config;
pub mod dfdpo;
pub mod pipeline;
pub mod plots;
pub mod progress;
pub mod report;
pub mod run;
pub mod signals;
pub mod telemetry;
pub mod video;
pub mod worker;
