//! Weight loading: safetensors (mmap, sharded) and GGUF (quantized tensors stay quantized on request).
//!
//! Models ask for weights by their Hugging Face checkpoint name (`model.layers.3.mlp.up_proj.weight`);
//! each source maps that name to where it lives and checks the shape it was asked for.

pub mod gguf;
pub mod q4_1;
pub mod safetensors;

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor};

use crate::error::{Error, Result};

/// A linear layer `y = x Wᵀ (+ b)` whose weight is dense or quantized.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
    out_features: usize,
}

#[derive(Debug, Clone)]
enum LinearWeight {
    /// Dense `[out, in]` (used transposed, without a copy).
    Dense(Tensor),
    /// Quantized weight used through candle's quantized matmul kernels.
    Quantized(std::sync::Arc<QMatMul>),
    /// GGUF Q4_1 weight run by our own CPU kernel (candle's CPU Q4_1 dot product is scalar).
    Q4_1(std::sync::Arc<q4_1::Q4_1Matrix>),
}

impl Linear {
    /// A dense linear layer from a `[out, in]` weight.
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let out_features = weight.dim(0)?;
        Ok(Self { weight: LinearWeight::Dense(weight), bias, out_features })
    }

    /// A quantized linear layer.
    pub fn quantized(weight: QMatMul, out_features: usize, bias: Option<Tensor>) -> Self {
        Self { weight: LinearWeight::Quantized(std::sync::Arc::new(weight)), bias, out_features }
    }

    /// A CPU linear layer whose weight is GGUF Q4_1 (`[out, in]`).
    pub fn q4_1(weight: q4_1::Q4_1Matrix, bias: Option<Tensor>) -> Self {
        let out_features = weight.rows();
        Self { weight: LinearWeight::Q4_1(std::sync::Arc::new(weight)), bias, out_features }
    }

    /// Applies the layer to `x` of shape `[.., in]`, returning `[.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, dims[dims.len() - 1]))?;
        let y = match &self.weight {
            LinearWeight::Dense(w) => match small_dense_matmul(&x2, w)? {
                Some(y) => y,
                None => x2.matmul(&w.t()?)?,
            },
            LinearWeight::Quantized(q) => {
                let in_dtype = x2.dtype();
                q.forward(&x2.to_dtype(DType::F32)?)?.to_dtype(in_dtype)?
            }
            LinearWeight::Q4_1(q) => {
                let x32 = x2.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let y = q.matmul(&x32, rows);
                Tensor::from_vec(y, (rows, q.rows()), x2.device())?.to_dtype(x2.dtype())?
            }
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = self.out_features;
        Ok(y.reshape(out_dims)?)
    }

    /// The weight as a dense `[out, in]` f32 tensor (dequantized if needed).
    pub fn dense_weight(&self) -> Result<Tensor> {
        match &self.weight {
            LinearWeight::Dense(w) => Ok(w.to_dtype(DType::F32)?),
            LinearWeight::Quantized(q) => match q.as_ref() {
                QMatMul::QTensor(t) => Ok(t.dequantize(&Device::Cpu)?),
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => Ok(t.to_dtype(DType::F32)?),
            },
            LinearWeight::Q4_1(q) => Ok(Tensor::from_vec(q.dequantize(), (q.rows(), q.cols()), &Device::Cpu)?),
        }
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

/// `x Wᵀ` through [`small_matmul`](crate::kernels::small_matmul) when it applies (f32 on the
/// CPU, at most `MAX_ROWS` rows, contiguous, AVX-512); `None` sends the caller to candle.
fn small_dense_matmul(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    use crate::kernels::small_matmul;
    use candle_core::Storage;
    let (m, k) = x.dims2()?;
    let n = w.dim(0)?;
    if m > small_matmul::MAX_ROWS || x.dtype() != DType::F32 || w.dtype() != DType::F32 || !small_matmul::available() {
        return Ok(None);
    }
    let (ws, wl) = w.storage_and_layout();
    let (xs, xl) = x.storage_and_layout();
    let (Storage::Cpu(ws), Storage::Cpu(xs)) = (&*ws, &*xs) else { return Ok(None) };
    let (Some((w0, w1)), Some((x0, x1))) = (wl.contiguous_offsets(), xl.contiguous_offsets()) else { return Ok(None) };
    let (wv, xv) = (&ws.as_slice::<f32>()?[w0..w1], &xs.as_slice::<f32>()?[x0..x1]);
    let mut y = vec![0f32; m * n];
    small_matmul::matmul(wv, n, k, xv, m, &mut y);
    Ok(Some(Tensor::from_vec(y, (m, n), &Device::Cpu)?))
}

/// Where a model's weights come from. Names are Hugging Face checkpoint names.
pub trait WeightSource {
    /// A dense tensor of exactly `shape`, converted to `dtype`.
    fn tensor(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor>;
    /// Whether the source has a tensor of that name.
    fn contains(&self, name: &str) -> bool;
    /// A linear layer whose weight is `[out, in]`; quantized where the source allows and was asked to.
    fn linear(&self, name: &str, out: usize, inp: usize, bias: bool, dtype: DType) -> Result<Linear> {
        let w = self.tensor(&format!("{name}.weight"), &[out, inp], dtype)?;
        let b = if bias { Some(self.tensor(&format!("{name}.bias"), &[out], dtype)?) } else { None };
        Linear::dense(w, b)
    }
    /// The file the weights come from, for error messages.
    fn origin(&self) -> &std::path::Path;
}

/// Checks that a loaded tensor has the expected shape, naming it otherwise.
pub(crate) fn check_shape(origin: &std::path::Path, name: &str, got: &[usize], want: &[usize]) -> Result<()> {
    if got != want {
        return Err(Error::invalid_file(
            origin,
            format!("tensor '{name}' has shape {got:?}, expected {want:?} from the config"),
        ));
    }
    Ok(())
}
