//! Helpers shared by the unit tests of this crate.

use candle_core::Tensor;

/// All values of a tensor, flattened.
pub fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// max |a - b| over all elements.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Run `f(x)` with the CPU's formulations and with CUDA's (both on the CPU:
/// [`crate::denoiser::both_forms`]) and check that the output and the gradients of sum(out * r)
/// (r random) in `x` and in every variable of `vm` agree to `tol` of their scale.
pub fn assert_forms_agree(
    vm: &candle_nn::VarMap,
    x: &Tensor,
    tol: f64,
    f: impl Fn(&Tensor) -> crate::Result<Tensor>,
) {
    let xv = candle_core::Var::from_tensor(x).unwrap();
    let run = || {
        let out = f(xv.as_tensor()).unwrap();
        let r = crate::rng::randn(
            &mut crate::rng::rng_for(99, 0, 0),
            out.shape(),
            out.device(),
        )
        .unwrap();
        let grads = (&out * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let vars = vm.data().lock().unwrap();
        let mut names: Vec<&String> = vars.keys().collect();
        names.sort();
        let mut all = vec![("out".to_string(), out.clone())];
        all.push(("d x".into(), grads.get(xv.as_tensor()).unwrap().clone()));
        for n in names {
            let g = grads
                .get(vars[n].as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {n}"));
            all.push((format!("d {n}"), g.clone()));
        }
        all
    };
    let [cpu, cuda] = crate::denoiser::both_forms(run);
    assert_eq!(cpu.len(), cuda.len());
    for ((name, a), (_, b)) in cpu.iter().zip(&cuda) {
        let scale = flat(a).iter().fold(1f32, |m, v| m.max(v.abs())) as f64;
        let err = max_abs_diff(a, b) as f64;
        assert!(err <= tol * scale, "{name}: {err:e} > {tol:e} * {scale}");
    }
}

/// A seeded `VarBuilder` for a test's model ([`crate::init::seeded_var_builder`] on the test
/// stream): the same `seed` gives the same weights on every run.
pub fn vb(
    vm: &candle_nn::VarMap,
    seed: u64,
    d: &candle_core::Device,
) -> candle_nn::VarBuilder<'static> {
    crate::init::seeded_var_builder(
        vm,
        seed,
        crate::init::TEST_STREAM,
        candle_core::DType::F32,
        d,
    )
}
