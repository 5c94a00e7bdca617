//! Seeded, reproducible randomness. candle's own `randn` on CPU cannot be seeded per call, so every
//! random tensor in tilt is drawn here from a `StdRng`. A stream is identified by (seed, stream,
//! index): the RNG state of a run is therefore just its seed and step counter, which makes resume
//! exact without serialising generator internals.

use candle_core::{Device, Shape, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

use crate::Result;

/// SplitMix64 finaliser: decorrelates nearby (seed, stream, index) triples.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A generator for one (seed, stream, index) triple, e.g. (run seed, actor id, step).
pub fn rng_for(seed: u64, stream: u64, index: u64) -> StdRng {
    StdRng::seed_from_u64(mix(mix(seed)
        ^ mix(stream.wrapping_add(0x1234_5678))
        ^ index))
}

/// Standard normal tensor of `shape` (f32) drawn from `rng`.
pub fn randn(rng: &mut StdRng, shape: impl Into<Shape>, device: &Device) -> Result<Tensor> {
    let shape = shape.into();
    let v: Vec<f32> = (0..shape.elem_count())
        .map(|_| rng.sample::<f32, _>(StandardNormal))
        .collect();
    Ok(Tensor::from_vec(v, shape, device)?)
}

/// Uniform [0, 1) tensor of `shape` (f32) drawn from `rng`.
pub fn rand_uniform(rng: &mut StdRng, shape: impl Into<Shape>, device: &Device) -> Result<Tensor> {
    let shape = shape.into();
    let v: Vec<f32> = (0..shape.elem_count())
        .map(|_| rng.random::<f32>())
        .collect();
    Ok(Tensor::from_vec(v, shape, device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_triple_same_numbers_other_triple_other_numbers() {
        let d = Device::Cpu;
        let a = randn(&mut rng_for(1, 2, 3), 8, &d)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = randn(&mut rng_for(1, 2, 3), 8, &d)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let c = randn(&mut rng_for(1, 2, 4), 8, &d)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn randn_moments() {
        // 200k standard normals: mean within 5 standard errors (5/sqrt(2e5) ~ 0.011) of 0,
        // variance within 0.02 of 1.
        let v = randn(&mut rng_for(7, 0, 0), 200_000, &Device::Cpu)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 0.011, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "var {var}");
    }
}
