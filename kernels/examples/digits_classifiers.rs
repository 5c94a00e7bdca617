//! Full-size training of the two digits classifiers (reward model A: MLP, judge B: CNN) at 8x8 and
//! 16x16 (nearest and bilinear 2x upsampling), printing held-out accuracy, held-out accuracy
//! under Gaussian pixel noise (std 0.2 and 0.4, a stand-in for imperfect generated samples), mean
//! held-out log-probability and wall time. Split: seed 0, 20% held out (359 images).
//! Run with RAYON_NUM_THREADS=1 on a busy 2-core machine: candle's thread pool spin-waits when its
//! workers are descheduled (measured 5-10x slower under a load average of 6).
//!
//! cargo run --release -p tilt-kernels --example digits_classifiers [STEPS] [BATCH]
//! (defaults: `ClassifierTrainConfig::default()`).

use std::error::Error;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use tilt_kernels::classifier::{
    accuracy, mean_log_prob, train_classifier, Classifier, ClassifierTrainConfig, CnnClassifier,
    CnnClassifierConfig, MlpClassifier, MlpClassifierConfig,
};
use tilt_kernels::digits::{Digits, Upsample};
use tilt_kernels::init::{seeded_var_builder, CLASSIFIER_STREAM};
use tilt_kernels::rng::{randn, rng_for};

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut cfg = ClassifierTrainConfig::default();
    if let Some(s) = args.first() {
        cfg.steps = s.parse()?;
    }
    if let Some(b) = args.get(1) {
        cfg.batch = b.parse()?;
    }
    let dev = Device::Cpu;
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/digits.safetensors");
    let (train8, held8) = Digits::load(&path)?.split(0, 0.2)?;
    println!(
        "train {} / held-out {} images; {} steps of {} (lr {}, wd {}, noise_std {}, max_shift {})",
        train8.len(),
        held8.len(),
        cfg.steps,
        cfg.batch,
        cfg.lr,
        cfg.weight_decay,
        cfg.noise_std,
        cfg.max_shift
    );
    println!("| side | model | held-out acc | acc, noise 0.2 | acc, noise 0.4 | held-out logp | train s |");
    println!("|---|---|---|---|---|---|---|");
    let sets = [
        ("8", train8.clone(), held8.clone()),
        (
            "16 nearest",
            train8.upsample2x(Upsample::Nearest),
            held8.upsample2x(Upsample::Nearest),
        ),
        (
            "16 bilinear",
            train8.upsample2x(Upsample::Bilinear),
            held8.upsample2x(Upsample::Bilinear),
        ),
    ];
    for (label, train, held) in sets {
        let side = train.side();
        let (x, y) = train.as_tensors(&dev)?;
        let (hx, hy) = held.as_tensors(&dev)?;
        let noisy = |std: f64| -> Result<Tensor, Box<dyn Error>> {
            let e = randn(&mut rng_for(123, 0, 0), hx.shape(), &dev)?;
            Ok((&hx + (e * std)?)?)
        };
        for which in ["A mlp", "B cnn"] {
            let vm = VarMap::new();
            let model: Box<dyn Classifier> = if which == "A mlp" {
                let vb = seeded_var_builder(&vm, 1, CLASSIFIER_STREAM, DType::F32, &dev);
                let c = MlpClassifierConfig {
                    side,
                    ..Default::default()
                };
                Box::new(MlpClassifier::new(c, vb)?)
            } else {
                let vb = seeded_var_builder(&vm, 2, CLASSIFIER_STREAM, DType::F32, &dev);
                let c = CnnClassifierConfig {
                    side,
                    ..Default::default()
                };
                Box::new(CnnClassifier::new(c, vb)?)
            };
            let seed = if which == "A mlp" { 1 } else { 2 };
            let t = Instant::now();
            train_classifier(model.as_ref(), &vm, &x, &y, &cfg, seed, &mut |_, _, _| {
                Ok(())
            })?;
            let wall = t.elapsed().as_secs_f64();
            let acc = accuracy(model.as_ref(), &hx, &hy)?;
            let acc2 = accuracy(model.as_ref(), &noisy(0.2)?, &hy)?;
            let acc4 = accuracy(model.as_ref(), &noisy(0.4)?, &hy)?;
            let lp = mean_log_prob(model.as_ref(), &hx, &hy)?;
            println!(
                "| {label} | {which} | {acc:.4} | {acc2:.4} | {acc4:.4} | {lp:.4} | {wall:.1} |"
            );
        }
    }
    Ok(())
}
