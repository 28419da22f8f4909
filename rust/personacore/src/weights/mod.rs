//! Weight loading: safetensors (mmap, sharded) and GGUF (quantized tensors stay quantized on request).
//!
//! Models ask for weights by their Hugging Face checkpoint name (`model.layers.3.mlp.up_proj.weight`);
//! each source maps that name to where it lives and checks the shape it was asked for.

pub mod gguf;
pub mod safetensors;

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::nn::{Embedding, Linear, MatmulPrecision};

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
        Linear::dense_with_precision(w, b, self.precision())
    }
    /// `count` linear layers stacked in one tensor `{name}.weight` `[count, out, in]` (the experts
    /// of a mixture-of-experts layer in a GGUF file); quantized where the source allows.
    fn stacked_linears(&self, name: &str, count: usize, out: usize, inp: usize, dtype: DType) -> Result<Vec<Linear>> {
        let w = self.tensor(&format!("{name}.weight"), &[count, out, inp], dtype)?;
        (0..count).map(|i| Linear::dense_with_precision(w.get(i)?.contiguous()?, None, self.precision())).collect()
    }
    /// The token embedding table `name.weight` `[rows, cols]`; kept quantized (rows dequantized
    /// on lookup) where the source allows and was asked to.
    fn embedding(&self, name: &str, rows: usize, cols: usize, dtype: DType) -> Result<Embedding> {
        Embedding::dense(self.tensor(&format!("{name}.weight"), &[rows, cols], dtype)?)
    }
    /// The precision of the dense f32 matmuls built from this source.
    fn precision(&self) -> MatmulPrecision {
        MatmulPrecision::Highest
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
