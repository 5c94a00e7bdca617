//! Models and schedules in diffusers' own format (the "Your own model" issue): each file reads one
//! kind of diffusers file exactly and refuses by name what tilt does not implement. So far:
//! the scheduler, `UNet2DModel`, LoRA on its attention projections and the weights file.
//! `UNet2DConditionModel` and the VAE follow (docs/your-own-model.md, "Not yet").

mod config;
pub mod lora;
pub mod scheduler;
pub mod unet2d;
pub mod weights;
