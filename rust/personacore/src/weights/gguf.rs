//! GGUF files: metadata, tensors under llama.cpp names, dequantized or kept quantized.

use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};

use super::{check_shape, WeightSource};
use crate::error::{Error, Result};
use crate::nn::{Linear, MatmulPrecision};

/// An opened GGUF file: parsed metadata plus a memory map of the tensor data.
pub struct GgufFile {
    /// Parsed header: metadata key/values and tensor infos.
    pub content: gguf_file::Content,
    mmap: personacore_kernels::mmap::Mmap,
    path: PathBuf,
}

impl GgufFile {
    /// Opens and parses a GGUF file; garbage or truncated files give `InvalidModelFile`.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let mmap = personacore_kernels::mmap::map_file(&file).map_err(|e| Error::io(path, e))?;
        if mmap.len() < 4 || &mmap[..4] != b"GGUF" {
            return Err(Error::invalid_file(path, "not a GGUF file (missing 'GGUF' magic)"));
        }
        let mut cursor = std::io::Cursor::new(&mmap[..]);
        let content = gguf_file::Content::read(&mut cursor).map_err(|e| {
            Error::invalid_file(path, format!("cannot parse GGUF header: {}", crate::error::candle_message(&e)))
        })?;
        for (name, info) in &content.tensor_infos {
            let elems = info.shape.elem_count();
            let bytes = elems / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
            let end = content.tensor_data_offset.saturating_add(info.offset).saturating_add(bytes as u64);
            if end > mmap.len() as u64 {
                return Err(Error::invalid_file(
                    path,
                    format!(
                        "tensor '{name}' extends past the end of the file ({end} > {} bytes): truncated?",
                        mmap.len()
                    ),
                ));
            }
        }
        Ok(Self { content, mmap, path: path.to_path_buf() })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads one tensor (still in its GGUF type) by its llama.cpp name.
    pub fn qtensor(&self, gguf_name: &str) -> Result<QTensor> {
        let mut cursor = std::io::Cursor::new(&self.mmap[..]);
        self.content.tensor(&mut cursor, gguf_name, &Device::Cpu).map_err(|e| {
            Error::invalid_file(&self.path, format!("tensor '{gguf_name}': {}", crate::error::candle_message(&e)))
        })
    }

    /// A metadata value, if present.
    pub fn meta(&self, key: &str) -> Option<&gguf_file::Value> {
        self.content.metadata.get(key)
    }
}

/// A metadata integer of any GGUF integer type, if non-negative (candle's `Value::to_u64` takes
/// only the unsigned types, and bools).
pub(crate) fn gguf_uint(v: &gguf_file::Value) -> Option<u64> {
    use gguf_file::Value as V;
    match *v {
        V::U8(x) => Some(x as u64),
        V::U16(x) => Some(x as u64),
        V::U32(x) => Some(x as u64),
        V::U64(x) => Some(x),
        V::I8(x) => u64::try_from(x).ok(),
        V::I16(x) => u64::try_from(x).ok(),
        V::I32(x) => u64::try_from(x).ok(),
        V::I64(x) => u64::try_from(x).ok(),
        _ => None,
    }
}

/// Maps a Hugging Face checkpoint name to its llama.cpp GGUF name.
pub fn gguf_name(hf: &str) -> Option<String> {
    gguf_name_for(hf, false)
}

/// [`gguf_name`], for a Gemma file when `gemma`: there `post_attention_layernorm` is the norm on
/// the attention output (`post_attention_norm`) and the MLP's input norm is
/// `pre_feedforward_layernorm` (`ffn_norm`).
pub fn gguf_name_for(hf: &str, gemma: bool) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (idx, rest) = rest.split_once('.')?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let g = match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" if gemma => "post_attention_norm",
        "post_attention_layernorm" => "ffn_norm",
        "pre_feedforward_layernorm" if gemma => "ffn_norm",
        "post_feedforward_layernorm" if gemma => "post_ffw_norm",
        _ => return None,
    };
    Some(format!("blk.{idx}.{g}.{suffix}"))
}

/// Weights served from a GGUF file under their HF names.
pub struct GgufWeights<'a> {
    file: &'a GgufFile,
    device: Device,
    /// Keep matmul weights quantized instead of dequantizing them.
    quantized: bool,
    /// llama.cpp permutes the rows of Q/K for the `llama` architecture (interleaved rope);
    /// `(num_heads, num_kv_heads)` when those rows must be put back in HF order.
    unpermute_qk: Option<(usize, usize)>,
    precision: MatmulPrecision,
    /// A Gemma file (`general.architecture` `gemma*`): its norms have their own names.
    gemma: bool,
}

impl<'a> GgufWeights<'a> {
    /// Serves `file`'s tensors; `unpermute_qk` as described on the field.
    pub fn new(file: &'a GgufFile, device: &Device, quantized: bool, unpermute_qk: Option<(usize, usize)>) -> Self {
        let gemma =
            file.meta("general.architecture").and_then(|v| v.to_string().ok()).is_some_and(|a| a.starts_with("gemma"));
        Self { file, device: device.clone(), quantized, unpermute_qk, precision: MatmulPrecision::Highest, gemma }
    }

    /// The precision of dense f32 matmuls (default `Highest`).
    pub fn with_precision(mut self, precision: MatmulPrecision) -> Self {
        self.precision = precision;
        self
    }

    fn lookup(&self, name: &str) -> Result<(String, &gguf_file::TensorInfo)> {
        let g = gguf_name_for(name, self.gemma)
            .ok_or_else(|| Error::invalid_file(self.file.path(), format!("no GGUF name known for tensor '{name}'")))?;
        let info =
            self.file.content.tensor_infos.get(&g).ok_or_else(|| {
                Error::invalid_file(self.file.path(), format!("missing tensor '{g}' (HF name '{name}')"))
            })?;
        Ok((g, info))
    }

    /// Heads whose rows must be un-permuted for this tensor, if any.
    fn permute_heads(&self, name: &str) -> Option<usize> {
        let (nh, nkv) = self.unpermute_qk?;
        if name.contains("self_attn.q_proj.") {
            Some(nh)
        } else if name.contains("self_attn.k_proj.") {
            Some(nkv)
        } else {
            None
        }
    }
}

/// Row order that undoes llama.cpp's Q/K permutation: HF row `h*d + s*d/2 + j` is GGUF row `h*d + 2j + s`.
fn unpermuted_rows(rows: usize, heads: usize) -> Vec<usize> {
    let d = rows / heads;
    let mut order = Vec::with_capacity(rows);
    for h in 0..heads {
        for s in 0..2 {
            for j in 0..d / 2 {
                order.push(h * d + 2 * j + s);
            }
        }
    }
    order
}

/// Reorders the rows of a (possibly quantized) 1-D or 2-D tensor; quantized blocks never straddle rows.
fn reorder_rows(t: QTensor, order: &[usize]) -> Result<QTensor> {
    let dims = t.shape().dims().to_vec();
    let rows = dims[0];
    let data = t.data()?;
    let row_bytes = data.len() / rows;
    let mut out = Vec::with_capacity(data.len());
    for &r in order {
        out.extend_from_slice(&data[r * row_bytes..(r + 1) * row_bytes]);
    }
    let storage = QStorage::from_data(std::borrow::Cow::Owned(out), &Device::Cpu, t.dtype())?;
    Ok(QTensor::new(storage, dims)?)
}

impl WeightSource for GgufWeights<'_> {
    fn tensor(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let (g, info) = self.lookup(name)?;
        check_shape(self.file.path(), &g, info.shape.dims(), shape)?;
        let mut qt = self.file.qtensor(&g)?;
        if let Some(heads) = self.permute_heads(name) {
            qt = reorder_rows(qt, &unpermuted_rows(shape[0], heads))?;
        }
        Ok(qt.dequantize(&Device::Cpu)?.to_dtype(dtype)?.to_device(&self.device)?)
    }

    fn contains(&self, name: &str) -> bool {
        gguf_name_for(name, self.gemma).is_some_and(|g| self.file.content.tensor_infos.contains_key(&g))
    }

    fn linear(&self, name: &str, out: usize, inp: usize, bias: bool, dtype: DType) -> Result<Linear> {
        let wname = format!("{name}.weight");
        let b = if bias { Some(self.tensor(&format!("{name}.bias"), &[out], dtype)?) } else { None };
        let (g, info) = self.lookup(&wname)?;
        let dense_type = matches!(info.ggml_dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
        if !self.quantized || dense_type || !self.device.is_cpu() && !self.device.is_cuda() {
            return Linear::dense_with_precision(self.tensor(&wname, &[out, inp], dtype)?, b, self.precision);
        }
        check_shape(self.file.path(), &g, info.shape.dims(), &[out, inp])?;
        let mut qt = self.file.qtensor(&g)?;
        if let Some(heads) = self.permute_heads(&wname) {
            qt = reorder_rows(qt, &unpermuted_rows(out, heads))?;
        }
        if self.device.is_cpu() && info.ggml_dtype == GgmlDType::Q4_1 {
            // Our own SIMD kernel (personacore_kernels::q4_1): candle's CPU Q4_1 dot product is scalar.
            let q = personacore_kernels::q4_1::Q4_1Matrix::new(qt.data()?.into_owned(), out, inp)
                .map_err(|e| Error::invalid_file(self.file.path(), format!("tensor '{g}': {}", Error::input(e))))?;
            return Ok(Linear::q4_1(q, b));
        }
        if !self.device.is_cpu() {
            let data = qt.data()?.into_owned();
            let storage = QStorage::from_data(std::borrow::Cow::Owned(data), &self.device, qt.dtype())?;
            qt = QTensor::new(storage, vec![out, inp])?;
        }
        Ok(Linear::quantized(QMatMul::from_qtensor(qt)?, out, b))
    }

    fn precision(&self) -> MatmulPrecision {
        self.precision
    }

    fn origin(&self) -> &Path {
        self.file.path()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(heads, 2, d/2, ..).swapaxes(1, 2) -> gguf[h, j, s] = hf[h, s, j]
        let (heads, d) = (3, 8);
        let hf: Vec<usize> = (0..heads * d).collect();
        let mut gguf = vec![0; heads * d];
        for h in 0..heads {
            for s in 0..2 {
                for j in 0..d / 2 {
                    gguf[h * d + 2 * j + s] = hf[h * d + s * d / 2 + j];
                }
            }
        }
        let back: Vec<usize> = unpermuted_rows(heads * d, heads).iter().map(|&r| gguf[r]).collect();
        assert_eq!(back, hf);
    }

    #[test]
    fn maps_hf_names() {
        assert_eq!(gguf_name("model.layers.12.self_attn.k_proj.bias").as_deref(), Some("blk.12.attn_k.bias"));
        assert_eq!(
            gguf_name("model.layers.0.post_attention_layernorm.weight").as_deref(),
            Some("blk.0.ffn_norm.weight")
        );
        assert_eq!(gguf_name("lm_head.weight").as_deref(), Some("output.weight"));
        assert_eq!(gguf_name("something.else"), None);
        let gemma = |n: &str| gguf_name_for(&format!("model.layers.2.{n}.weight"), true);
        assert_eq!(gemma("post_attention_layernorm").as_deref(), Some("blk.2.post_attention_norm.weight"));
        assert_eq!(gemma("pre_feedforward_layernorm").as_deref(), Some("blk.2.ffn_norm.weight"));
        assert_eq!(gemma("post_feedforward_layernorm").as_deref(), Some("blk.2.post_ffw_norm.weight"));
        assert_eq!(gguf_name("model.layers.2.pre_feedforward_layernorm.weight"), None);
    }
}
