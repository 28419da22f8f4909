//! Safetensors checkpoints (single file or sharded with `model.safetensors.index.json`),
//! memory-mapped through candle's `MmapedSafetensors`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use super::{check_shape, WeightSource};
use crate::error::{Error, Result};
use crate::nn::MatmulPrecision;

/// The safetensors files of an HF model directory, memory-mapped.
pub struct SafetensorsWeights {
    st: MmapedSafetensors,
    /// The files, in the order opened (a name found in several is read from the last).
    files: Vec<PathBuf>,
    /// Tensor name -> its shard, from the index's `weight_map` (empty without an index), to
    /// name the file in errors.
    shard_of: HashMap<String, PathBuf>,
    device: Device,
    origin: PathBuf,
    precision: MatmulPrecision,
}

impl SafetensorsWeights {
    /// Opens every `*.safetensors` file the directory uses (the index's shards, or `model.safetensors`).
    pub fn open_dir(dir: &Path, device: &Device) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let mut shard_of = HashMap::new();
        let mut paths: Vec<PathBuf> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::invalid_file(&index_path, format!("not valid JSON: {e}")))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::invalid_file(&index_path, "missing object 'weight_map'"))?;
            let mut files: Vec<PathBuf> = Vec::new();
            for (name, v) in map {
                let f = v
                    .as_str()
                    .ok_or_else(|| Error::invalid_file(&index_path, "weight_map values must be file names"))?;
                let p = dir.join(f);
                if !files.contains(&p) {
                    files.push(p.clone());
                }
                shard_of.insert(name.clone(), p);
            }
            files
        } else {
            let single = dir.join("model.safetensors");
            if single.exists() {
                vec![single]
            } else {
                let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
                    .map_err(|e| Error::io(dir, e))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                    .collect();
                found.sort();
                found
            }
        };
        if paths.is_empty() {
            return Err(Error::invalid_file(dir, "no *.safetensors weights in the model directory"));
        }
        paths.sort();
        Ok(Self { shard_of, ..Self::open_files(&paths, device, dir)? })
    }

    /// Opens the given safetensors files.
    pub fn open_files(paths: &[PathBuf], device: &Device, origin: &Path) -> Result<Self> {
        let st = personacore_kernels::mmap::safetensors_files(paths).map_err(open_error)?;
        Ok(Self {
            st,
            files: paths.to_vec(),
            shard_of: HashMap::new(),
            device: device.clone(),
            origin: origin.to_path_buf(),
            precision: MatmulPrecision::Highest,
        })
    }

    /// Names of every tensor in the checkpoint.
    pub fn names(&self) -> Vec<String> {
        self.st.tensors().into_iter().map(|(name, _)| name).collect()
    }

    /// The precision of dense f32 matmuls (default `Highest`).
    pub fn with_precision(mut self, precision: MatmulPrecision) -> Self {
        self.precision = precision;
        self
    }

    /// The file that holds `name`, for error messages: its shard, the only file, or the directory.
    fn file_of(&self, name: &str) -> &Path {
        match (self.shard_of.get(name), self.files.as_slice()) {
            (Some(shard), _) => shard,
            (None, [only]) => only,
            (None, _) => &self.origin,
        }
    }
}

/// candle's error from opening the files as ours, naming the file (candle attaches its path):
/// `NotFound`/`Io` for the OS's errors, `InvalidModelFile` for a header safetensors refuses.
fn open_error(e: candle_core::Error) -> Error {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => open_error(*inner),
        candle_core::Error::WithPath { inner, path } => match *inner {
            candle_core::Error::Io(io) => Error::io(&path, io),
            other => Error::invalid_file(
                &path,
                format!("not a valid safetensors file: {}", crate::error::candle_message(&other)),
            ),
        },
        other => Error::from(other),
    }
}

/// Refuses a tensor stored as anything but a float type (candle would convert integers too).
fn check_float_dtype(path: &Path, name: &str, dt: safetensors::Dtype) -> Result<()> {
    use safetensors::Dtype::{BF16, F16, F32, F64};
    match dt {
        F32 | F16 | BF16 | F64 => Ok(()),
        other => Err(Error::invalid_file(path, format!("tensor '{name}' has unsupported dtype {other:?}"))),
    }
}

impl WeightSource for SafetensorsWeights {
    fn tensor(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let view =
            self.st.get(name).map_err(|_| Error::invalid_file(&self.origin, format!("missing tensor '{name}'")))?;
        let path = self.file_of(name);
        check_shape(path, name, view.shape(), shape)?;
        check_float_dtype(path, name, view.dtype())?;
        let t = self.st.load(name, &Device::Cpu)?;
        Ok(t.to_dtype(dtype)?.to_device(&self.device)?)
    }

    fn contains(&self, name: &str) -> bool {
        self.st.get(name).is_ok()
    }

    fn precision(&self) -> MatmulPrecision {
        self.precision
    }

    fn origin(&self) -> &Path {
        &self.origin
    }
}
