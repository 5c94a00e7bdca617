//! tilt's diffusers readers against diffusers itself: the fixtures under tests/fixtures/diffusers/
//! were written by `scripts/diffusers-fixtures.py` (torch 2.15.0, diffusers 0.42.1, CPU, one
//! thread): tiny random models with their config and weights, fixed inputs, and diffusers' outputs.
//! Tolerance: f32 on both sides, different summation orders and transcendental implementations:
//! max |tilt - diffusers| <= 1e-4 of the output's largest magnitude.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use tilt_kernels::denoiser::Prediction;
use tilt_kernels::diffusers::lora::{read_lora_config, Lora, UNET_PREFIX};
use tilt_kernels::diffusers::scheduler::SchedulerConfig;
use tilt_kernels::diffusers::unet2d::{UNet2D, UNet2DConfig};
use tilt_kernels::diffusers::weights::WeightFile;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/diffusers")
        .join(name)
}

fn load(p: &Path) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(p, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// max |a - b| and max |b|.
fn err_and_scale(a: &[f32], b: &[f32]) -> (f32, f32) {
    assert_eq!(a.len(), b.len());
    let err = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    let scale = b.iter().map(|y| y.abs()).fold(0.0, f32::max);
    (err, scale)
}

/// The fixture's int64 timesteps as the f32 the model takes.
fn timesteps_f32(inp: &std::collections::HashMap<String, Tensor>) -> Vec<f32> {
    inp["timestep"]
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|&t| t as f32)
        .collect()
}

/// A fixture model, with a LoRA when given.
fn unet(name: &str, lora: Option<&Lora>) -> (UNet2D, WeightFile) {
    let dir = fixture(name);
    let cfile = dir.join("config.json");
    let text = std::fs::read_to_string(&cfile).unwrap();
    let cfg = UNet2DConfig::from_json(&text, &cfile.display().to_string()).unwrap();
    let w = WeightFile::open(
        &dir.join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let m = UNet2D::new(cfg, w.var_builder(&Device::Cpu), lora).unwrap();
    (m, w)
}

fn unet_matches_diffusers(name: &str) {
    let (m, w) = unet(name, None);
    // Every tensor of the file went into the model.
    w.check_all_used().unwrap();
    let dir = fixture(name);
    let inp = load(&dir.join("inputs.safetensors"));
    let t = timesteps_f32(&inp);
    let labels = inp
        .get("class_labels")
        .map(|l| l.to_dtype(DType::U32).unwrap());
    let got = m.forward(&inp["sample"], &t, labels.as_ref()).unwrap();
    let want = &load(&dir.join("outputs.safetensors"))["sample"];
    assert_eq!(got.dims(), want.dims());
    let (err, scale) = err_and_scale(&flat(&got), &flat(want));
    eprintln!("{name}: max |tilt - diffusers| {err:e}, output scale {scale}");
    assert!(
        scale > 0.1,
        "{name}: a degenerate fixture (output scale {scale})"
    );
    assert!(
        err <= 1e-4 * scale,
        "{name}: max error {err:e} against output scale {scale}"
    );
}

#[test]
fn unet2d_model_matches_diffusers() {
    // 2 levels (DownBlock2D, AttnDownBlock2D), 1 layer a block, head dim 4, 3 channels, 8x8.
    unet_matches_diffusers("unet2d");
}

#[test]
fn class_conditional_unet2d_model_matches_diffusers() {
    // 3 levels, attention in the first and last, 2 layers a block, one head per block
    // (attention_head_dim null), num_class_embeds 3, freq_shift 1, sin before cos, 8x12 samples.
    unet_matches_diffusers("unet2d-class");
}

#[test]
fn a_weight_file_missing_a_tensor_or_holding_an_extra_one_is_refused_by_name() {
    let dir = fixture("unet2d");
    let mut ts = load(&dir.join("diffusion_pytorch_model.safetensors"));
    let tmp = std::env::temp_dir().join(format!("tilt-parity-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let cfg = UNet2DConfig::from_json(&text, "config.json").unwrap();
    // An extra tensor: built, then refused by check_all_used, naming it.
    ts.insert(
        "extra.block.weight".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    let p = tmp.join("extra.safetensors");
    candle_core::safetensors::save(&ts, &p).unwrap();
    let w = WeightFile::open(&p, &Device::Cpu).unwrap();
    UNet2D::new(cfg.clone(), w.var_builder(&Device::Cpu), None).unwrap();
    let e = w.check_all_used().unwrap_err().to_string();
    assert!(
        e.contains("extra.block.weight") && e.contains("extra.safetensors"),
        "{e}"
    );
    // A missing tensor: refused at build time, naming the file and the tensor.
    ts.remove("extra.block.weight");
    ts.remove("mid_block.attentions.0.to_q.weight");
    let p = tmp.join("missing.safetensors");
    candle_core::safetensors::save(&ts, &p).unwrap();
    let w = WeightFile::open(&p, &Device::Cpu).unwrap();
    let e = UNet2D::new(cfg.clone(), w.var_builder(&Device::Cpu), None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("mid_block.attentions.0.to_q.weight") && e.contains("missing.safetensors"),
        "{e}"
    );
    // A wrong shape and a wrong dtype.
    ts.insert(
        "mid_block.attentions.0.to_q.weight".into(),
        Tensor::zeros((16, 15), DType::F32, &Device::Cpu).unwrap(),
    );
    let p = tmp.join("shape.safetensors");
    candle_core::safetensors::save(&ts, &p).unwrap();
    let w = WeightFile::open(&p, &Device::Cpu).unwrap();
    let e = UNet2D::new(cfg, w.var_builder(&Device::Cpu), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("to_q.weight") && e.contains("shape"), "{e}");
    ts.insert(
        "mid_block.attentions.0.to_q.weight".into(),
        Tensor::zeros((16, 16), DType::U32, &Device::Cpu).unwrap(),
    );
    let p = tmp.join("dtype.safetensors");
    candle_core::safetensors::save(&ts, &p).unwrap();
    let e = WeightFile::open(&p, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("to_q.weight") && e.contains("U32"), "{e}");
    // A truncated file.
    let bytes = std::fs::read(dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    let p = tmp.join("truncated.safetensors");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = WeightFile::open(&p, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("truncated.safetensors"), "{e}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

fn scheduler_matches_diffusers(name: &str) {
    let dir = fixture(name);
    let cfile = dir.join("scheduler_config.json");
    let c = SchedulerConfig::from_json(
        &std::fs::read_to_string(&cfile).unwrap(),
        "scheduler_config.json",
    )
    .unwrap();
    let case: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    let (steps, eta) = (
        case["steps"].as_u64().unwrap() as usize,
        case["eta"].as_f64().unwrap(),
    );
    let f = load(&dir.join("steps.safetensors"));
    // diffusers' alphas_cumprod (f32) against tilt's abar[1..] (f64): f32 rounding.
    let ac = flat(&f["alphas_cumprod"]);
    let s = c.vp_schedule().unwrap();
    for (t, a) in ac.iter().enumerate() {
        assert!(
            ((s.abar[t + 1] - *a as f64) / *a as f64).abs() < 2e-5,
            "{name}: alphas_cumprod[{t}]"
        );
    }
    let want_t: Vec<usize> = f["timesteps"]
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|&t| t as usize)
        .collect();
    assert_eq!(c.timesteps(steps).unwrap(), want_t, "{name}");
    let g = c.sampling_grid(&s, steps, eta).unwrap();
    for i in case["picks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
    {
        let st = g.step(steps - i).unwrap();
        assert_eq!(st.n_from, want_t[i] + 1);
        let get = |k: &str| f[&format!("step{i}.{k}")].to_dtype(DType::F64).unwrap();
        let (x, out, z, want) = (
            get("sample"),
            get("model_output"),
            get("noise"),
            get("prev_sample"),
        );
        let a = s.abar[st.n_from];
        let eps = match c.prediction_type {
            Prediction::Eps => out,
            Prediction::V => {
                ((&out * a.sqrt()).unwrap() + (&x * (1.0 - a).sqrt()).unwrap()).unwrap()
            }
        };
        let mean = ((&x * st.c_x).unwrap() + (&eps * st.c_eps).unwrap()).unwrap();
        let got = if s.abar[st.n_to] >= 1.0 {
            // diffusers' step to abar = 1 is deterministic (zero variance); tilt's has variance
            // beta_1 (every transition a Gaussian): the means agree.
            mean
        } else {
            (mean + (&z * st.sigma).unwrap()).unwrap()
        };
        let (err, scale) = err_and_scale(&flat(&got), &flat(&want));
        eprintln!("{name} step {i}: max |tilt - diffusers| {err:e}, scale {scale}");
        assert!(
            err <= 1e-4 * scale.max(1.0),
            "{name} step {i} (t = {}): {err:e}",
            want_t[i]
        );
    }
}

#[test]
fn ddim_steps_match_diffusers_stable_diffusion_schedule() {
    // scaled_linear, eps, leading + offset 1, set_alpha_to_one false, 50 steps, eta 1.
    scheduler_matches_diffusers("scheduler-sd");
}

#[test]
fn ddim_steps_match_diffusers_cosine_v_trailing() {
    // squaredcos_cap_v2, v_prediction, trailing, set_alpha_to_one true, 20 steps, eta 0.5.
    scheduler_matches_diffusers("scheduler-v-trailing");
}

#[test]
fn a_lora_tilt_wrote_gives_the_output_diffusers_gives_with_it() {
    // lora-tilt/pytorch_lora_weights.safetensors: written by tilt
    // (kernels/examples/diffusers_lora_fixture.rs: rank 2, alpha 4, B off zero); outputs.safetensors:
    // diffusers 0.42.1 + peft with that file injected (scripts/diffusers-fixtures.py).
    let dir = fixture("unet2d");
    let file = dir.join("lora-tilt/pytorch_lora_weights.safetensors");
    let lw = WeightFile::open(&file, &Device::Cpu).unwrap();
    let lora = Lora {
        config: read_lora_config(&file).unwrap(),
        vb: lw.var_builder(&Device::Cpu).pp(UNET_PREFIX),
    };
    let (m, _) = unet("unet2d", Some(&lora));
    lw.check_all_used().unwrap();
    let inp = load(&dir.join("inputs.safetensors"));
    let t = timesteps_f32(&inp);
    let got = flat(&m.forward(&inp["sample"], &t, None).unwrap());
    let want = flat(&load(&dir.join("lora-tilt/outputs.safetensors"))["sample"]);
    let base = flat(&load(&dir.join("outputs.safetensors"))["sample"]);
    let (err, scale) = err_and_scale(&got, &want);
    eprintln!("unet2d + tilt's LoRA: max |tilt - diffusers| {err:e}, output scale {scale}");
    assert!(err <= 1e-4 * scale, "{err:e} against {scale}");
    // The LoRA matters: diffusers' output with it is far from the base model's.
    assert!(err_and_scale(&want, &base).0 > 0.1);
}

#[test]
fn as_a_denoiser_tilt_index_n_is_diffusers_timestep_n_minus_1() {
    use tilt_kernels::denoiser::Denoiser;
    let (m, _) = unet("unet2d", None);
    let inp = load(&fixture("unet2d").join("inputs.safetensors"));
    // The fixture's timesteps 0, 417, 999 are tilt's n = 1, 418, 1000.
    let n = Tensor::new(&[1f32, 418.0, 1000.0], &Device::Cpu).unwrap();
    let got = flat(&m.eps(&inp["sample"], &n, None).unwrap());
    let want = flat(&load(&fixture("unet2d").join("outputs.safetensors"))["sample"]);
    let (err, scale) = err_and_scale(&got, &want);
    assert!(err <= 1e-4 * scale, "{err:e}");
}
