//! The `tilt` package: configuration, builders, the algorithms' wiring (`algo`), the shared
//! learner wiring (`train`), and the command line. The math lives in `tilt-kernels`, the actors in
//! `tilt-actors`.

pub mod algo;
pub mod alloc;
pub mod build;
pub mod config;
pub mod files;
pub mod gpu_check;
pub mod model;
pub mod plots;
pub mod progress;
pub mod provenance;
pub mod report;
pub mod run;
pub mod signals;
pub mod telemetry;
pub mod train;
pub mod video;
pub mod worker;
