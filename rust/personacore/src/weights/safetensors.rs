//! Safetensors checkpoints (single file or sharded with `model.safetensors.index.json`), memory-mapped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::{check_shape, WeightSource};
use crate::error::{Error, Result};
use crate::nn::MatmulPrecision;

/// The safetensors files of an HF model directory, memory-mapped.
pub struct SafetensorsWeights {
    files: Vec<(PathBuf, personacore_kernels::mmap::Mmap)>,
    /// tensor name -> (file index, dtype, shape, byte range in the file)
    index: HashMap<String, (usize, safetensors::Dtype, Vec<usize>, std::ops::Range<usize>)>,
    device: Device,
    origin: PathBuf,
    precision: MatmulPrecision,
}

impl SafetensorsWeights {
    /// Opens every `*.safetensors` file the directory uses (the index's shards, or `model.safetensors`).
    pub fn open_dir(dir: &Path, device: &Device) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let mut paths: Vec<PathBuf> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::invalid_file(&index_path, format!("not valid JSON: {e}")))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::invalid_file(&index_path, "missing object 'weight_map'"))?;
            let mut files: Vec<PathBuf> = Vec::new();
            for v in map.values() {
                let f = v
                    .as_str()
                    .ok_or_else(|| Error::invalid_file(&index_path, "weight_map values must be file names"))?;
                let p = dir.join(f);
                if !files.contains(&p) {
                    files.push(p);
                }
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
        Self::open_files(&paths, device, dir)
    }

    /// Opens the given safetensors files.
    pub fn open_files(paths: &[PathBuf], device: &Device, origin: &Path) -> Result<Self> {
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            let file = std::fs::File::open(p).map_err(|e| Error::io(p, e))?;
            let mmap = personacore_kernels::mmap::map_file(&file).map_err(|e| Error::io(p, e))?;
            let (header_len, meta) = safetensors::SafeTensors::read_metadata(&mmap)
                .map_err(|e| Error::invalid_file(p, format!("not a valid safetensors file: {e}")))?;
            let data_start = 8 + header_len;
            for (name, info) in meta.tensors() {
                let (s, e) = info.data_offsets;
                if data_start + e > mmap.len() {
                    return Err(Error::invalid_file(
                        p,
                        format!("tensor '{name}' extends past the end of the file (truncated?)"),
                    ));
                }
                index.insert(name.clone(), (i, info.dtype, info.shape.clone(), data_start + s..data_start + e));
            }
            files.push((p.clone(), mmap));
        }
        Ok(Self {
            files,
            index,
            device: device.clone(),
            origin: origin.to_path_buf(),
            precision: MatmulPrecision::Highest,
        })
    }

    /// Names of every tensor in the checkpoint.
    pub fn names(&self) -> Vec<&str> {
        self.index.keys().map(|s| s.as_str()).collect()
    }
}

fn candle_dtype(path: &Path, name: &str, dt: safetensors::Dtype) -> Result<DType> {
    Ok(match dt {
        safetensors::Dtype::F32 => DType::F32,
        safetensors::Dtype::F16 => DType::F16,
        safetensors::Dtype::BF16 => DType::BF16,
        safetensors::Dtype::F64 => DType::F64,
        other => return Err(Error::invalid_file(path, format!("tensor '{name}' has unsupported dtype {other:?}"))),
    })
}

impl SafetensorsWeights {
    /// The precision of dense f32 matmuls (default `Highest`).
    pub fn with_precision(mut self, precision: MatmulPrecision) -> Self {
        self.precision = precision;
        self
    }
}

impl WeightSource for SafetensorsWeights {
    fn tensor(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let (fi, dt, shp, range) = self
            .index
            .get(name)
            .ok_or_else(|| Error::invalid_file(&self.origin, format!("missing tensor '{name}'")))?;
        let (path, mmap) = &self.files[*fi];
        check_shape(path, name, shp, shape)?;
        let cdt = candle_dtype(path, name, *dt)?;
        let bytes = &mmap[range.clone()];
        if bytes.len() != shp.iter().product::<usize>() * cdt.size_in_bytes() {
            return Err(Error::invalid_file(
                path,
                format!(
                    "tensor '{name}' has {} bytes, expected {}",
                    bytes.len(),
                    shp.iter().product::<usize>() * cdt.size_in_bytes()
                ),
            ));
        }
        let t = Tensor::from_raw_buffer(bytes, cdt, shp, &Device::Cpu)?;
        Ok(t.to_dtype(dtype)?.to_device(&self.device)?)
    }

    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn precision(&self) -> MatmulPrecision {
        self.precision
    }

    fn origin(&self) -> &Path {
        &self.origin
    }
}
