//! A diffusers weights file (`diffusion_pytorch_model.safetensors`) behind a `VarBuilder` that
//! names the file and the tensor in every error (missing, wrong shape, wrong dtype) and reports
//! the tensors no module read: a file with weights tilt did not load is refused, never half-used.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use crate::{KernelError, Result};

/// The tensors of one safetensors file, frozen (plain tensors, never optimiser variables).
#[derive(Debug, Clone)]
pub struct WeightFile {
    file: String,
    tensors: Arc<HashMap<String, Tensor>>,
    used: Arc<Mutex<HashSet<String>>>,
}

fn err(file: &str, detail: String) -> KernelError {
    KernelError::Checkpoint {
        path: file.to_string(),
        detail,
    }
}

impl WeightFile {
    /// Read `path` onto `device`. Float tensors (f16, bf16, f32, f64) are converted to f32; any
    /// other dtype is refused naming the tensor.
    pub fn open(path: &Path, device: &Device) -> Result<Self> {
        let file = path.display().to_string();
        let raw = candle_core::safetensors::load(path, device)
            .map_err(|e| err(&file, format!("not a readable safetensors file: {e}")))?;
        let mut tensors = HashMap::with_capacity(raw.len());
        for (name, t) in raw {
            let t = match t.dtype() {
                DType::F32 => t,
                DType::F16 | DType::BF16 | DType::F64 => t.to_dtype(DType::F32)?,
                other => {
                    return Err(err(
                        &file,
                        format!("tensor {name} has dtype {other:?}; weights must be floats"),
                    ))
                }
            };
            tensors.insert(name, t);
        }
        Ok(Self {
            file,
            tensors: Arc::new(tensors),
            used: Arc::new(Mutex::new(HashSet::new())),
        })
    }

    /// The number of values in the file.
    pub fn elem_count(&self) -> usize {
        self.tensors.values().map(|t| t.elem_count()).sum()
    }

    /// A `VarBuilder` over the file (f32, on the file's device).
    pub fn var_builder(&self, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), DType::F32, device.clone())
    }

    /// Refuse a file holding tensors that no module read (a block tilt does not implement, or
    /// weights of another model), naming up to five of them.
    pub fn check_all_used(&self) -> Result<()> {
        let used = self
            .used
            .lock()
            .map_err(|_| err(&self.file, "lock poisoned".into()))?;
        let mut unused: Vec<&String> = self.tensors.keys().filter(|k| !used.contains(*k)).collect();
        if unused.is_empty() {
            return Ok(());
        }
        unused.sort();
        Err(err(
            &self.file,
            format!(
                "{} tensor(s) the config does not account for, e.g. {}",
                unused.len(),
                unused
                    .iter()
                    .take(5)
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ))
    }
}

impl SimpleBackend for WeightFile {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            candle_core::bail!(
                "{}: tensor {name} has shape {:?}, the config needs {:?}",
                self.file,
                t.dims(),
                s.dims()
            )
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.tensors.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!("{}: tensor {name} is missing", self.file))
        })?;
        if let Ok(mut u) = self.used.lock() {
            u.insert(name.to_string());
        }
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}
