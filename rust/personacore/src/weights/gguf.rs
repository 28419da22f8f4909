//! GGUF files: metadata, tensors under llama.cpp names, dequantized or kept quantized.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::quantized::{ggml_file, gguf_file, GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use personacore_kernels::q4_1::Q4_1Matrix;
use personacore_kernels::q8_block::{self, BlockType, Q8BlockMatrix};

use super::{check_shape, WeightSource};
use crate::error::{Error, Result};
use crate::nn::{Embedding, Linear, MatmulPrecision};

/// How far around a faulting page Linux may map a file's cached pages: `fault_around_bytes`
/// (64 KiB by default), or the whole large folio that holds the page, up to 2 MiB on x86-64 (the
/// page cache of ext4 and xfs holds large folios, and kernels since 6.x map a folio whole).
const FAULT_AROUND: usize = 2 * 1024 * 1024;

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
            let start = content.tensor_data_offset.saturating_add(info.offset);
            let align = if matches!(info.ggml_dtype, GgmlDType::F32 | GgmlDType::Q8K) { 4 } else { 2 };
            if !start.is_multiple_of(align) {
                return Err(Error::invalid_file(
                    path,
                    format!("tensor '{name}' starts at byte {start}, not aligned to {align} bytes"),
                ));
            }
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
    ///
    /// The blocks are copied straight out of the map, and the map's pages of that range are then
    /// released: a quantized load holds one copy of the weights, not the copy plus the file's
    /// pages (which count toward the process's resident memory while mapped).
    pub fn qtensor(&self, gguf_name: &str) -> Result<QTensor> {
        let info = self
            .content
            .tensor_infos
            .get(gguf_name)
            .ok_or_else(|| Error::invalid_file(&self.path, format!("missing tensor '{gguf_name}'")))?;
        let (start, len) = self.byte_range(info);
        let raw = &self.mmap[start..start + len];
        let dims = info.shape.dims().to_vec();
        let t = ggml_file::qtensor_from_ggml(info.ggml_dtype, raw, dims, &Device::Cpu).map_err(|e| {
            Error::invalid_file(&self.path, format!("tensor '{gguf_name}': {}", crate::error::candle_message(&e)))
        })?;
        self.release_tensor_pages(start, len);
        Ok(t)
    }

    /// `f` applied to the raw bytes of tensor `gguf_name` in the map and to a function that
    /// releases the map's pages of the first `n` of them (once `f` no longer reads them); all
    /// its pages are released afterwards (see [`GgufFile::qtensor`]).
    pub fn with_bytes<T>(&self, gguf_name: &str, f: impl FnOnce(&[u8], &dyn Fn(usize)) -> T) -> Result<T> {
        let info = self
            .content
            .tensor_infos
            .get(gguf_name)
            .ok_or_else(|| Error::invalid_file(&self.path, format!("missing tensor '{gguf_name}'")))?;
        let (start, len) = self.byte_range(info);
        let release = |n: usize| personacore_kernels::mmap::release_pages(&self.mmap, start, n.min(len));
        let out = f(&self.mmap[start..start + len], &release);
        self.release_tensor_pages(start, len);
        Ok(out)
    }

    /// Releases the map's pages of a tensor that has been copied out, with a margin of
    /// [`FAULT_AROUND`] on each side, rounded out to it: reading a page of a file map also maps
    /// its cached neighbours (the kernel's fault-around, or the page's whole folio), which would
    /// otherwise keep the tail of the tensor read before. Pages of a tensor not read yet are
    /// simply read again from the page cache.
    fn release_tensor_pages(&self, start: usize, len: usize) {
        let from = start.saturating_sub(FAULT_AROUND) / FAULT_AROUND * FAULT_AROUND;
        let to = (start + len + FAULT_AROUND).next_multiple_of(FAULT_AROUND);
        personacore_kernels::mmap::release_pages(&self.mmap, from, to - from);
    }

    /// Where a tensor's blocks lie in the file (checked against the file's length at open).
    fn byte_range(&self, info: &gguf_file::TensorInfo) -> (usize, usize) {
        let elems = info.shape.elem_count();
        let len = elems / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
        ((self.content.tensor_data_offset + info.offset) as usize, len)
    }

    /// Drops the metadata arrays (the tokenizer's vocabulary, scores, merges: tens of MB of small
    /// allocations for a 262k vocabulary) once the tokenizer has been built from them, hands the
    /// freed heap back to the system and releases the map's pages of the header, so that the
    /// weights loaded next do not pile on top.
    pub fn release_metadata_arrays(&mut self) {
        self.content.metadata.retain(|_, v| !matches!(v, gguf_file::Value::Array(_)));
        personacore_kernels::mmap::trim_heap();
        // The header was parsed into `content`: its pages (the vocabulary's strings, several MB
        // for a large vocabulary) need not stay resident while the weights are read.
        personacore_kernels::mmap::release_pages(&self.mmap, 0, self.content.tensor_data_offset as usize);
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
        // Mixture of experts: the router, the experts stacked `[experts, out, in]`, the shared
        // expert and its gate.
        "mlp.gate" => "ffn_gate_inp",
        "mlp.experts.gate_proj" => "ffn_gate_exps",
        "mlp.experts.up_proj" => "ffn_up_exps",
        "mlp.experts.down_proj" => "ffn_down_exps",
        "mlp.shared_expert.gate_proj" => "ffn_gate_shexp",
        "mlp.shared_expert.up_proj" => "ffn_up_shexp",
        "mlp.shared_expert.down_proj" => "ffn_down_shexp",
        "mlp.shared_expert_gate" => "ffn_gate_inp_shexp",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" if gemma => "post_attention_norm",
        "post_attention_layernorm" => "ffn_norm",
        "pre_feedforward_layernorm" if gemma => "ffn_norm",
        "post_feedforward_layernorm" if gemma => "post_ffw_norm",
        _ => return None,
    };
    Some(format!("blk.{idx}.{g}.{suffix}"))
}

/// A quantized CPU weight as the layers hold it.
#[derive(Clone)]
enum SharedWeight {
    /// Blocks for candle's quantized matmul, in row blocks of `part_rows` rows (see
    /// [`Linear::quantized_parts`]).
    Candle { parts: Vec<Arc<QTensor>>, part_rows: usize },
    /// Q4_1 blocks repacked for our kernel.
    Q4_1(Arc<Q4_1Matrix>),
    /// Q5_0 / Q5_1 / Q8_0 blocks repacked for our kernel.
    Q8Block(Arc<Q8BlockMatrix>),
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
    /// Quantized weights handed out to more than one layer (the embedding table and the output
    /// projection tied to it), by GGUF name: one copy of the blocks serves both.
    shared: Mutex<Vec<(String, SharedWeight)>>,
}

impl<'a> GgufWeights<'a> {
    /// Serves `file`'s tensors; `unpermute_qk` as described on the field.
    pub fn new(file: &'a GgufFile, device: &Device, quantized: bool, unpermute_qk: Option<(usize, usize)>) -> Self {
        let gemma =
            file.meta("general.architecture").and_then(|v| v.to_string().ok()).is_some_and(|a| a.starts_with("gemma"));
        Self {
            file,
            device: device.clone(),
            quantized,
            unpermute_qk,
            precision: MatmulPrecision::Highest,
            gemma,
            shared: Mutex::new(Vec::new()),
        }
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

    /// Whether a weight of GGUF type `dtype` is kept quantized on the CPU.
    fn keep_quantized_on_cpu(&self, dtype: GgmlDType) -> bool {
        self.quantized && self.device.is_cpu() && !matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
    }

    /// The quantized CPU weight `g` `[rows, cols]` (rows in file order), read once and shared by
    /// every layer that asks for it.
    fn shared_weight(&self, g: &str, rows: usize, cols: usize) -> Result<SharedWeight> {
        let mut shared = self.shared.lock().map_err(|_| Error::Compute("a GGUF loader lock was poisoned".into()))?;
        if let Some((_, w)) = shared.iter().find(|(name, _)| name == g) {
            return Ok(w.clone());
        }
        let dtype = self.lookup_gguf(g)?.ggml_dtype;
        let w = self.file.with_bytes(g, |raw, release| self.cpu_weight(g, raw, release, dtype, rows, cols))??;
        shared.push((g.to_string(), w.clone()));
        Ok(w)
    }

    /// A quantized CPU weight `[rows, cols]` of GGUF type `dtype` from its blocks `raw`: Q4_1
    /// through our kernel (candle's CPU Q4_1 dot product is scalar), Q5_0 / Q5_1 / Q8_0 through
    /// ours where the CPU runs its fast form (candle's Q5 dot products are scalar, and its Q8_0
    /// kernel keeps a second, repacked copy), every other type through candle's.
    /// `release(n)`: the first `n` bytes of `raw` are no longer needed.
    fn cpu_weight(
        &self,
        g: &str,
        raw: &[u8],
        release: &dyn Fn(usize),
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
    ) -> Result<SharedWeight> {
        let bad = |e: &dyn std::fmt::Display| Error::invalid_file(self.file.path(), format!("tensor '{g}': {e}"));
        let block_type = match dtype {
            GgmlDType::Q5_0 => Some(BlockType::Q5_0),
            GgmlDType::Q5_1 => Some(BlockType::Q5_1),
            GgmlDType::Q8_0 => Some(BlockType::Q8_0),
            _ => None,
        };
        Ok(match block_type {
            Some(ty) if q8_block::fast_kernel_available() => {
                let q = Q8BlockMatrix::new_streamed(raw, ty, rows, cols, release).map_err(|e| bad(&e))?;
                SharedWeight::Q8Block(Arc::new(q))
            }
            _ if dtype == GgmlDType::Q4_1 => {
                SharedWeight::Q4_1(Arc::new(Q4_1Matrix::new(raw, rows, cols).map_err(|e| bad(&e))?))
            }
            _ => {
                // Row blocks for the threads of our pool: two per thread, whole groups of 16 rows.
                let blocks = 2 * personacore_kernels::par::threads();
                let part_rows = rows.div_ceil(blocks).next_multiple_of(16).max(16);
                let row_bytes = raw.len() / rows.max(1);
                let mut parts = Vec::new();
                for r0 in (0..rows).step_by(part_rows) {
                    let r1 = (r0 + part_rows).min(rows);
                    let t = ggml_file::qtensor_from_ggml(
                        dtype,
                        &raw[r0 * row_bytes..r1 * row_bytes],
                        vec![r1 - r0, cols],
                        &Device::Cpu,
                    )
                    .map_err(|e| bad(&crate::error::candle_message(&e)))?;
                    parts.push(Arc::new(t));
                }
                SharedWeight::Candle { parts, part_rows }
            }
        })
    }

    /// The info of GGUF tensor `g`.
    fn lookup_gguf(&self, g: &str) -> Result<&gguf_file::TensorInfo> {
        self.file
            .content
            .tensor_infos
            .get(g)
            .ok_or_else(|| Error::invalid_file(self.file.path(), format!("missing tensor '{g}'")))
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

/// The rows of a (possibly quantized) matrix's bytes in `order` (`order.len()` rows); quantized
/// blocks never straddle rows.
fn reorder_row_bytes(data: &[u8], order: &[usize]) -> Vec<u8> {
    let row_bytes = data.len() / order.len().max(1);
    let mut out = Vec::with_capacity(data.len());
    for &r in order {
        out.extend_from_slice(&data[r * row_bytes..(r + 1) * row_bytes]);
    }
    out
}

/// Reorders the rows of a (possibly quantized) 1-D or 2-D tensor.
fn reorder_rows(t: QTensor, order: &[usize]) -> Result<QTensor> {
    let dims = t.shape().dims().to_vec();
    let out = reorder_row_bytes(&t.data()?, order);
    let storage = QStorage::from_data(std::borrow::Cow::Owned(out), &Device::Cpu, t.dtype())?;
    Ok(QTensor::new(storage, dims)?)
}

/// Checks a GGUF tensor's shape against the one asked for; leading 1s may be left out in the file
/// (llama.cpp stores a `[1, n]` weight, such as Qwen2-MoE's shared-expert gate, as `[n]`).
fn check_gguf_shape(path: &Path, name: &str, got: &[usize], want: &[usize]) -> Result<()> {
    let ones = want.iter().take_while(|&&d| d == 1).count();
    if got.len() < want.len() && got == &want[ones.min(want.len() - got.len())..] {
        return Ok(());
    }
    check_shape(path, name, got, want)
}

impl GgufWeights<'_> {
    /// Whether `info`'s weight stays quantized when loaded as a linear layer.
    fn keeps_quantized(&self, info: &gguf_file::TensorInfo) -> bool {
        let dense_type = matches!(info.ggml_dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
        self.quantized && !dense_type && (self.device.is_cpu() || self.device.is_cuda())
    }

    /// The linear layer of a quantized CPU weight (see [`Self::cpu_weight`]).
    fn cpu_linear(w: SharedWeight, out: usize, b: Option<Tensor>) -> Result<Linear> {
        Ok(match w {
            SharedWeight::Candle { parts, .. } => {
                let parts = parts.into_iter().map(QMatMul::from_arc).collect::<candle_core::Result<Vec<_>>>()?;
                Linear::quantized_parts(parts, out, b)
            }
            SharedWeight::Q4_1(q) => Linear::q4_1(q, b),
            SharedWeight::Q8Block(q) => Linear::q8_block(q, b),
        })
    }

    /// A quantized linear layer `[out, in]` on a non-CPU device: candle's kernels on a copy of the
    /// blocks `data` there.
    fn device_linear(
        &self,
        data: Vec<u8>,
        dtype: GgmlDType,
        out: usize,
        inp: usize,
        b: Option<Tensor>,
    ) -> Result<Linear> {
        let storage = QStorage::from_data(std::borrow::Cow::Owned(data), &self.device, dtype)?;
        let qt = QTensor::new(storage, vec![out, inp])?;
        Ok(Linear::quantized(QMatMul::from_qtensor(qt)?, out, b))
    }
}

impl WeightSource for GgufWeights<'_> {
    fn tensor(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let (g, info) = self.lookup(name)?;
        check_gguf_shape(self.file.path(), &g, info.shape.dims(), shape)?;
        let mut qt = self.file.qtensor(&g)?;
        if let Some(heads) = self.permute_heads(name) {
            qt = reorder_rows(qt, &unpermuted_rows(shape[0], heads))?;
        }
        Ok(qt.dequantize(&Device::Cpu)?.to_dtype(dtype)?.reshape(shape)?.to_device(&self.device)?)
    }

    fn stacked_linears(&self, name: &str, count: usize, out: usize, inp: usize, dtype: DType) -> Result<Vec<Linear>> {
        let wname = format!("{name}.weight");
        let (g, info) = self.lookup(&wname)?;
        if !self.keeps_quantized(info) {
            let w = self.tensor(&wname, &[count, out, inp], dtype)?;
            return (0..count)
                .map(|i| Linear::dense_with_precision(w.get(i)?.contiguous()?, None, self.precision))
                .collect();
        }
        check_shape(self.file.path(), &g, info.shape.dims(), &[count, out, inp])?;
        let ty = info.ggml_dtype;
        // The experts are the outermost axis, so each one's quantized blocks are one byte range.
        self.file.with_bytes(&g, |raw, _| {
            let per_expert = raw.len() / count.max(1);
            (0..count)
                .map(|i| {
                    let bytes = &raw[i * per_expert..(i + 1) * per_expert];
                    if self.device.is_cpu() {
                        Self::cpu_linear(self.cpu_weight(&g, bytes, &|_| {}, ty, out, inp)?, out, None)
                    } else {
                        self.device_linear(bytes.to_vec(), ty, out, inp, None)
                    }
                })
                .collect()
        })?
    }

    fn contains(&self, name: &str) -> bool {
        gguf_name_for(name, self.gemma).is_some_and(|g| self.file.content.tensor_infos.contains_key(&g))
    }

    fn embedding(&self, name: &str, rows: usize, cols: usize, dtype: DType) -> Result<Embedding> {
        let wname = format!("{name}.weight");
        let (g, info) = self.lookup(&wname)?;
        if !self.keep_quantized_on_cpu(info.ggml_dtype) {
            return Embedding::dense(self.tensor(&wname, &[rows, cols], dtype)?);
        }
        check_shape(self.file.path(), &g, info.shape.dims(), &[rows, cols])?;
        match self.shared_weight(&g, rows, cols)? {
            SharedWeight::Candle { parts, part_rows } => Embedding::quantized(parts, part_rows, dtype, &self.device),
            SharedWeight::Q4_1(q) => Ok(Embedding::q4_1(q, dtype, &self.device)),
            SharedWeight::Q8Block(q) => Ok(Embedding::q8_block(q, dtype, &self.device)),
        }
    }

    fn linear(&self, name: &str, out: usize, inp: usize, bias: bool, dtype: DType) -> Result<Linear> {
        let wname = format!("{name}.weight");
        let b = if bias { Some(self.tensor(&format!("{name}.bias"), &[out], dtype)?) } else { None };
        let (g, info) = self.lookup(&wname)?;
        if !self.keeps_quantized(info) {
            return Linear::dense_with_precision(self.tensor(&wname, &[out, inp], dtype)?, b, self.precision);
        }
        check_shape(self.file.path(), &g, info.shape.dims(), &[out, inp])?;
        let permute = self.permute_heads(&wname);
        if self.device.is_cpu() {
            let w = match permute {
                None => self.shared_weight(&g, out, inp)?,
                Some(heads) => {
                    let order = unpermuted_rows(out, heads);
                    self.file.with_bytes(&g, |raw, _| {
                        self.cpu_weight(&g, &reorder_row_bytes(raw, &order), &|_| {}, info.ggml_dtype, out, inp)
                    })??
                }
            };
            return Self::cpu_linear(w, out, b);
        }
        let mut qt = self.file.qtensor(&g)?;
        if let Some(heads) = permute {
            qt = reorder_rows(qt, &unpermuted_rows(out, heads))?;
        }
        self.device_linear(qt.data()?.into_owned(), qt.dtype(), out, inp, b)
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
        let moe = |n: &str| gguf_name(&format!("model.layers.3.mlp.{n}.weight"));
        assert_eq!(moe("gate").as_deref(), Some("blk.3.ffn_gate_inp.weight"));
        assert_eq!(moe("experts.up_proj").as_deref(), Some("blk.3.ffn_up_exps.weight"));
        assert_eq!(moe("shared_expert.down_proj").as_deref(), Some("blk.3.ffn_down_shexp.weight"));
        assert_eq!(moe("shared_expert_gate").as_deref(), Some("blk.3.ffn_gate_inp_shexp.weight"));
        assert_eq!(moe("experts.0.up_proj"), None);
    }

    #[test]
    fn gguf_shapes_may_leave_out_leading_ones() {
        let p = Path::new("x.gguf");
        assert!(check_gguf_shape(p, "t", &[64], &[1, 64]).is_ok());
        assert!(check_gguf_shape(p, "t", &[1, 64], &[1, 64]).is_ok());
        assert!(check_gguf_shape(p, "t", &[64], &[2, 64]).is_err());
        assert!(check_gguf_shape(p, "t", &[32], &[1, 64]).is_err());
    }
}
