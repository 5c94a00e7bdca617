//! Models and schedules in diffusers' own format (the "Your own model" issue): each file reads one
//! kind of diffusers file exactly and refuses by name what tilt does not implement. So far:
//! the scheduler, `UNet2DModel` and the weights file. `UNet2DConditionModel`, the VAE and LoRA
//! follow (docs/your-own-model.md, "Not yet").

pub mod scheduler;
pub mod unet2d;
pub mod weights;
