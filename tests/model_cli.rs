//! `tilt model info | forward` on the diffusers fixtures (tests/fixtures/diffusers/, written by
//! scripts/diffusers-fixtures.py): the config tilt understood, a forward pass equal to diffusers'
//! within 1e-4 of the output's scale (with and without tilt's LoRA), and bad input refused in one
//! line naming the file and the key or tensor, exit 1.

mod common;
use common::*;
use std::path::Path;

const F: &str = "tests/fixtures/diffusers";

fn max_err(a: &Path, b: &Path) -> (f32, f32) {
    let load = |p: &Path| -> Vec<f32> {
        candle_core::safetensors::load(p, &candle_core::Device::Cpu).unwrap()["sample"]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let (x, y) = (load(a), load(b));
    assert_eq!(x.len(), y.len());
    let err = x
        .iter()
        .zip(&y)
        .map(|(p, q)| (p - q).abs())
        .fold(0.0, f32::max);
    (err, y.iter().map(|q| q.abs()).fold(0.0, f32::max))
}

#[test]
fn info_prints_what_tilt_understood() {
    let o = tilt(&["model", "info", &format!("{F}/unet2d-class")]);
    assert!(o.status.success(), "{}", err(&o));
    let s = String::from_utf8_lossy(&o.stdout);
    // 105201: diffusers' own parameter count of the fixture (the script prints it).
    assert!(s.contains("UNet2DModel, 105201 parameters"), "{s}");
    assert!(
        s.contains("sample 8x12") && s.contains("class embeddings Some(3)"),
        "{s}"
    );
}

#[test]
fn forward_matches_diffusers_with_and_without_a_lora() {
    let d = scratch("model-forward");
    for (model, lora, want) in [
        ("unet2d", None, "unet2d/outputs.safetensors"),
        ("unet2d-class", None, "unet2d-class/outputs.safetensors"),
        (
            "unet2d",
            Some("unet2d/lora-tilt"),
            "unet2d/lora-tilt/outputs.safetensors",
        ),
    ] {
        let out = d.join(format!("{model}-{}.safetensors", lora.is_some()));
        let mut args = vec![
            "model".to_string(),
            "forward".into(),
            format!("{F}/{model}"),
            "--inputs".into(),
            format!("{F}/{model}/inputs.safetensors"),
            "--out".into(),
            out.display().to_string(),
        ];
        if let Some(l) = lora {
            args.extend(["--lora".into(), format!("{F}/{l}")]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = tilt(&args);
        assert!(o.status.success(), "{}", err(&o));
        let (e, scale) = max_err(
            &out,
            &Path::new(env!("CARGO_MANIFEST_DIR")).join(F).join(want),
        );
        assert!(
            e <= 1e-4 * scale,
            "{model} lora {lora:?}: {e:e} against {scale}"
        );
    }
}

#[test]
fn bad_models_are_refused_in_one_line() {
    let d = scratch("model-bad");
    let copy = |name: &str| {
        let dst = d.join(name);
        std::fs::create_dir_all(&dst).unwrap();
        for f in [
            "config.json",
            "diffusion_pytorch_model.safetensors",
            "inputs.safetensors",
        ] {
            std::fs::copy(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join(F)
                    .join("unet2d")
                    .join(f),
                dst.join(f),
            )
            .unwrap();
        }
        dst
    };
    let refuse = |dir: &Path, want: &[&str]| {
        let o = tilt(&["model", "info", dir.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(1), "{}", err(&o));
        let e = err(&o);
        assert_eq!(e.trim().lines().count(), 1, "{e}");
        for w in want {
            assert!(e.contains(w), "{w} not in {e}");
        }
    };
    // An unsupported class, an unsupported block, a missing and a truncated weights file.
    let a = copy("class");
    let cfg = std::fs::read_to_string(a.join("config.json")).unwrap();
    std::fs::write(
        a.join("config.json"),
        cfg.replace("\"UNet2DModel\"", "\"UNet2DConditionModel\""),
    )
    .unwrap();
    refuse(&a, &["config.json", "_class_name", "UNet2DConditionModel"]);
    let b = copy("block");
    std::fs::write(
        b.join("config.json"),
        cfg.replace("\"AttnDownBlock2D\"", "\"SkipDownBlock2D\""),
    )
    .unwrap();
    refuse(&b, &["config.json", "down_block_types", "SkipDownBlock2D"]);
    let c = copy("missing");
    std::fs::remove_file(c.join("diffusion_pytorch_model.safetensors")).unwrap();
    refuse(&c, &["diffusion_pytorch_model.safetensors", "missing"]);
    let t = copy("truncated");
    let w = t.join("diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() - 100]).unwrap();
    refuse(&t, &["diffusion_pytorch_model.safetensors"]);
    refuse(&d.join("nowhere"), &["not a diffusers model directory"]);
}

#[test]
fn merge_folds_the_lora_into_weights_that_give_the_lora_output() {
    let d = scratch("model-merge");
    let merged = d.join("merged");
    let o = tilt(&[
        "model",
        "merge",
        &format!("{F}/unet2d"),
        "--lora",
        &format!("{F}/unet2d/lora-tilt"),
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", err(&o));
    // The merged directory is a plain model: tilt reads it without a LoRA, and its output is
    // diffusers' output with the LoRA (W + alpha/r B A in f32: rounding only).
    let out = d.join("out.safetensors");
    let o = tilt(&[
        "model",
        "forward",
        merged.to_str().unwrap(),
        "--inputs",
        &format!("{F}/unet2d/inputs.safetensors"),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", err(&o));
    let want = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(F)
        .join("unet2d/lora-tilt/outputs.safetensors");
    let (e, scale) = max_err(&out, &want);
    assert!(e <= 1e-4 * scale, "{e:e} against {scale}");
    // A second merge into the same directory is refused.
    let o = tilt(&[
        "model",
        "merge",
        &format!("{F}/unet2d"),
        "--lora",
        &format!("{F}/unet2d/lora-tilt"),
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(err(&o).contains("already exists"), "{}", err(&o));
}

#[test]
fn a_pipeline_directory_is_read_through_its_unet_and_scheduler() {
    // model_index.json + unet/ + scheduler/, diffusers' pipeline layout.
    let d = scratch("model-pipeline");
    let pipe = d.join("pipe");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(F);
    std::fs::create_dir_all(pipe.join("unet")).unwrap();
    std::fs::create_dir_all(pipe.join("scheduler")).unwrap();
    std::fs::write(
        pipe.join("model_index.json"),
        r#"{"_class_name": "DDIMPipeline", "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDIMScheduler"]}"#,
    )
    .unwrap();
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(root.join("unet2d").join(f), pipe.join("unet").join(f)).unwrap();
    }
    std::fs::copy(
        root.join("scheduler-sd/scheduler_config.json"),
        pipe.join("scheduler/scheduler_config.json"),
    )
    .unwrap();
    let o = tilt(&["model", "info", pipe.to_str().unwrap()]);
    assert!(o.status.success(), "{}", err(&o));
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(s.contains("UNet2DModel, 45259 parameters"), "{s}");
    assert!(
        s.contains("scheduler DDIMScheduler: ScaledLinear") && s.contains("offset 1"),
        "{s}"
    );
    // merge writes a whole pipeline, the scheduler kept, the UNet merged.
    let merged = d.join("merged");
    let o = tilt(&[
        "model",
        "merge",
        pipe.to_str().unwrap(),
        "--lora",
        root.join("unet2d/lora-tilt").to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", err(&o));
    assert!(merged.join("scheduler/scheduler_config.json").exists());
    let out = d.join("out.safetensors");
    let o = tilt(&[
        "model",
        "forward",
        merged.to_str().unwrap(),
        "--inputs",
        root.join("unet2d/inputs.safetensors").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", err(&o));
    let (e, scale) = max_err(&out, &root.join("unet2d/lora-tilt/outputs.safetensors"));
    assert!(e <= 1e-4 * scale, "{e:e}");
    // A scheduler config tilt refuses makes info fail, naming it.
    let cfg = std::fs::read_to_string(pipe.join("scheduler/scheduler_config.json")).unwrap();
    std::fs::write(
        pipe.join("scheduler/scheduler_config.json"),
        cfg.replace("\"thresholding\": false", "\"thresholding\": true"),
    )
    .unwrap();
    let o = tilt(&["model", "info", pipe.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err(&o).contains("scheduler_config.json") && err(&o).contains("thresholding"),
        "{}",
        err(&o)
    );
}
