//! Writes the LoRA half of the diffusers round trip (docs/your-own-model.md): a rank-2 LoRA on the
//! attention projections of the `unet2d` fixture, A from tilt's seeded init, B moved off zero
//! (seeded), saved by tilt as diffusers' pytorch_lora_weights.safetensors under
//! tests/fixtures/diffusers/unet2d/lora-tilt/. scripts/diffusers-fixtures.py then loads it into
//! diffusers (PEFT) and writes diffusers' output with it, which kernels/tests/diffusers_parity.rs
//! compares with tilt's.
//!
//!     cargo run --release -p tilt-kernels --example diffusers_lora_fixture

use std::error::Error;
use std::path::Path;

use candle_core::{DType, Device};
use candle_nn::VarMap;
use tilt_kernels::diffusers::lora::{save_lora, Lora, LoraConfig};
use tilt_kernels::diffusers::unet2d::{UNet2D, UNet2DConfig};
use tilt_kernels::diffusers::weights::WeightFile;
use tilt_kernels::init::{seeded_var_builder, POLICY_STREAM};
use tilt_kernels::optim::named_vars;
use tilt_kernels::rng::{randn, rng_for};

fn main() -> Result<(), Box<dyn Error>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/diffusers/unet2d");
    let cfg = UNet2DConfig::from_json(
        &std::fs::read_to_string(dir.join("config.json"))?,
        "config.json",
    )?;
    let w = WeightFile::open(
        &dir.join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )?;
    let vm = VarMap::new();
    let config = LoraConfig {
        rank: 2,
        alpha: 4.0,
        ..Default::default()
    };
    let lora = Lora {
        config: config.clone(),
        vb: seeded_var_builder(&vm, 7, POLICY_STREAM, DType::F32, &Device::Cpu),
    };
    UNet2D::new(cfg, w.var_builder(&Device::Cpu), Some(&lora))?;
    for (i, (name, v)) in named_vars(&vm)?.into_iter().enumerate() {
        if name.ends_with("lora_B.weight") {
            v.set(&(randn(&mut rng_for(7, 1, i as u64), v.shape(), &Device::Cpu)? * 0.2)?)?;
        }
    }
    let out = dir.join("lora-tilt");
    std::fs::create_dir_all(&out)?;
    let file = out.join("pytorch_lora_weights.safetensors");
    save_lora(&vm, &config, &file)?;
    println!("{}", file.display());
    Ok(())
}
