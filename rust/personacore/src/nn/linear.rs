//! Linear layers `y = x Wᵀ (+ b)` whose weight is dense, packed for the CPU kernels, or
//! quantized, and groups of them that read the same input.

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor};
use personacore_kernels::amx::{self, AmxMatrix};
use personacore_kernels::kquant;
use personacore_kernels::packed_matmul::{self, PackedMatrix};
use personacore_kernels::q4_1::Q4_1Matrix;
use personacore_kernels::q8_block::Q8BlockMatrix;

use crate::error::{Error, Result};

/// How exactly dense f32 matmuls are computed on the CPU (torch's `float32_matmul_precision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MatmulPrecision {
    /// Plain f32 multiply-adds (what transformers does by default).
    #[default]
    Highest,
    /// On a CPU with AMX-BF16: each f32 is split into two bf16 and a product is the sum of three
    /// bf16 products accumulated in f32 (bf16x3, ~16 significant bits, dot products within ~1e-5
    /// relative); elsewhere, or for shapes that are not multiples of 32, the same as `Highest`.
    High,
}

impl MatmulPrecision {
    /// Parses `"highest"` or `"high"`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "highest" => Ok(Self::Highest),
            "high" => Ok(Self::High),
            other => Err(Error::input(format!("unknown matmul precision '{other}': use 'highest' or 'high'"))),
        }
    }

    /// The name [`parse`](Self::parse) reads.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Highest => "highest",
            Self::High => "high",
        }
    }

    /// Whether this machine runs `High` differently from `Highest` (AMX-BF16 present and usable).
    pub fn high_available() -> bool {
        amx::available()
    }
}

/// A linear layer `y = x Wᵀ (+ b)` whose weight is dense or quantized.
#[derive(Debug, Clone)]
pub struct Linear {
    pub(super) weight: LinearWeight,
    pub(super) bias: Option<Tensor>,
    out_features: usize,
}

/// Where a [`Linear`]'s weight lives and which kernel multiplies by it.
#[derive(Debug, Clone)]
pub(super) enum LinearWeight {
    /// Dense `[out, in]` (used transposed, without a copy) through candle's matmul.
    Dense(Tensor),
    /// f32 on a CPU with AVX-512: packed once for our matmul (`personacore_kernels::packed_matmul`).
    Packed(std::sync::Arc<PackedMatrix>),
    /// f32 at [`MatmulPrecision::High`] on a CPU with AMX: split into bf16 pairs (`personacore_kernels::amx`).
    Amx(std::sync::Arc<AmxMatrix>),
    /// Quantized weight used through candle's quantized matmul kernels.
    Quantized(std::sync::Arc<QMatMul>),
    /// Quantized CPU weight in row blocks (`[rows_i, in]` each, in order), each through candle's
    /// kernel on one thread of our pool (`personacore_kernels::par`; candle's own pool has no
    /// workers, see `par::init_threads`).
    QuantizedParts(std::sync::Arc<Vec<QMatMul>>),
    /// GGUF Q4_1 weight run by our own CPU kernel (candle's CPU Q4_1 dot product is scalar).
    Q4_1(std::sync::Arc<Q4_1Matrix>),
    /// GGUF Q5_0 / Q5_1 / Q8_0 weight run by our own CPU kernel (`personacore_kernels::q8_block`).
    Q8Block(std::sync::Arc<Q8BlockMatrix>),
}

impl Linear {
    /// A dense linear layer from a `[out, in]` weight; an f32 weight on a CPU with AVX-512 is
    /// packed for [`PackedMatrix::matmul`] (the tensor itself is not kept), unless the
    /// environment variable `PERSONACORE_CANDLE_MATMUL` is set (for benchmarks and bisecting).
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Self::dense_with_precision(weight, bias, MatmulPrecision::Highest)
    }

    /// [`Linear::dense`] at a chosen precision: at `High`, an f32 CPU weight whose sides are
    /// multiples of 32 is split into bf16 pairs for AMX when the CPU has it.
    pub fn dense_with_precision(weight: Tensor, bias: Option<Tensor>, precision: MatmulPrecision) -> Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        let pack = weight.dtype() == DType::F32
            && weight.device().is_cpu()
            && packed_matmul::available()
            && std::env::var_os("PERSONACORE_CANDLE_MATMUL").is_none();
        if pack {
            let w = weight.flatten_all()?.to_vec1::<f32>()?;
            return Ok(Self::packed(&w, out_features, in_features, precision, bias));
        }
        Ok(Self { weight: LinearWeight::Dense(weight), bias, out_features })
    }

    /// A row-major `[rows, cols]` f32 weight packed for the kernel `precision` selects.
    fn packed(w: &[f32], rows: usize, cols: usize, precision: MatmulPrecision, bias: Option<Tensor>) -> Self {
        let weight = if precision == MatmulPrecision::High && amx::available() && AmxMatrix::supports(rows, cols) {
            LinearWeight::Amx(std::sync::Arc::new(AmxMatrix::pack(w, rows, cols)))
        } else {
            LinearWeight::Packed(std::sync::Arc::new(PackedMatrix::pack(w, rows, cols)))
        };
        Self { weight, bias, out_features: rows }
    }

    /// A quantized linear layer.
    pub fn quantized(weight: QMatMul, out_features: usize, bias: Option<Tensor>) -> Self {
        Self { weight: LinearWeight::Quantized(std::sync::Arc::new(weight)), bias, out_features }
    }

    /// A quantized CPU linear layer whose weight is given in row blocks (stacked in order).
    pub fn quantized_parts(parts: Vec<QMatMul>, out_features: usize, bias: Option<Tensor>) -> Self {
        Self { weight: LinearWeight::QuantizedParts(std::sync::Arc::new(parts)), bias, out_features }
    }

    /// A CPU linear layer whose weight is GGUF Q4_1 (`[out, in]`), possibly shared with a tied
    /// embedding table.
    pub fn q4_1(weight: std::sync::Arc<Q4_1Matrix>, bias: Option<Tensor>) -> Self {
        let out_features = weight.rows();
        Self { weight: LinearWeight::Q4_1(weight), bias, out_features }
    }

    /// A CPU linear layer whose weight is GGUF Q5_0, Q5_1 or Q8_0 (`[out, in]`), possibly shared
    /// with a tied embedding table.
    pub fn q8_block(weight: std::sync::Arc<Q8BlockMatrix>, bias: Option<Tensor>) -> Self {
        let out_features = weight.rows();
        Self { weight: LinearWeight::Q8Block(weight), bias, out_features }
    }

    /// Applies the layer to `x` of shape `[.., in]`, returning `[.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, dims[dims.len() - 1]))?;
        let y = match &self.weight {
            LinearWeight::Dense(w) => x2.matmul(&w.t()?)?,
            LinearWeight::Packed(p) => {
                let y = with_f32_rows(&x2, |x| p.matmul_to_vec(x, rows))?;
                Tensor::from_vec(y, (rows, p.rows()), x2.device())?.to_dtype(x2.dtype())?
            }
            LinearWeight::Amx(a) => {
                let y = with_f32_rows(&x2, |x| a.matmul_to_vec(x, rows))?;
                Tensor::from_vec(y, (rows, a.rows()), x2.device())?.to_dtype(x2.dtype())?
            }
            LinearWeight::Quantized(q) => {
                let in_dtype = x2.dtype();
                q.forward(&x2.to_dtype(DType::F32)?)?.to_dtype(in_dtype)?
            }
            LinearWeight::QuantizedParts(parts) => {
                let in_dtype = x2.dtype();
                quantized_parts_forward(parts, &x2.to_dtype(DType::F32)?.contiguous()?)?.to_dtype(in_dtype)?
            }
            LinearWeight::Q4_1(q) => {
                let y = with_f32_rows(&x2, |x| q.matmul(x, rows))?;
                Tensor::from_vec(y, (rows, q.rows()), x2.device())?.to_dtype(x2.dtype())?
            }
            LinearWeight::Q8Block(q) => {
                let y = with_f32_rows(&x2, |x| q.matmul(x, rows))?;
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
            LinearWeight::Packed(p) => Ok(Tensor::from_vec(p.unpack(), (p.rows(), p.cols()), &Device::Cpu)?),
            LinearWeight::Amx(a) => Ok(Tensor::from_vec(a.unpack(), (a.rows(), a.cols()), &Device::Cpu)?),
            LinearWeight::Quantized(q) => match q.as_ref() {
                QMatMul::QTensor(t) => Ok(t.dequantize(&Device::Cpu)?),
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => Ok(t.to_dtype(DType::F32)?),
            },
            LinearWeight::QuantizedParts(parts) => {
                let ws = parts
                    .iter()
                    .map(|q| match q {
                        QMatMul::QTensor(t) => t.dequantize(&Device::Cpu),
                        QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.to_dtype(DType::F32),
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Ok(Tensor::cat(&ws, 0)?)
            }
            LinearWeight::Q4_1(q) => Ok(Tensor::from_vec(q.dequantize(), (q.rows(), q.cols()), &Device::Cpu)?),
            LinearWeight::Q8Block(q) => Ok(Tensor::from_vec(q.dequantize(), (q.rows(), q.cols()), &Device::Cpu)?),
        }
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

/// `N` linear layers that read the same input (q/k/v, gate/up). When all are packed f32 they are
/// fused into one packed matrix (one matmul, the input rearranged once, one hand-off to the
/// threads); otherwise they run one by one.
#[derive(Debug, Clone)]
pub struct LinearGroup<const N: usize> {
    kind: GroupKind<N>,
}

#[derive(Debug, Clone)]
enum GroupKind<const N: usize> {
    Separate([Linear; N]),
    /// The parts' rows stacked in order; `widths` are their output sizes.
    Fused {
        linear: Linear,
        widths: [usize; N],
    },
}

impl<const N: usize> LinearGroup<N> {
    /// Groups `parts`, fusing them when they are all packed and all or none has a bias.
    pub fn new(parts: [Linear; N]) -> Result<Self> {
        let biases = parts.iter().filter(|l| l.bias.is_some()).count();
        let fused = if biases == 0 || biases == N { fused_weight(&parts) } else { None };
        let Some(weight) = fused else {
            return Ok(Self { kind: GroupKind::Separate(parts) });
        };
        let widths: [usize; N] = std::array::from_fn(|i| parts[i].out_features);
        let bias = if biases == N {
            Some(Tensor::cat(&parts.iter().filter_map(|l| l.bias.clone()).collect::<Vec<_>>(), 0)?)
        } else {
            None
        };
        let linear = Linear { weight, bias, out_features: widths.iter().sum() };
        Ok(Self { kind: GroupKind::Fused { linear, widths } })
    }

    /// Each part applied to `x` `[.., in]` (views into one output when fused).
    pub fn forward(&self, x: &Tensor) -> Result<[Tensor; N]> {
        match &self.kind {
            GroupKind::Separate(parts) => {
                let ys = parts.iter().map(|l| l.forward(x)).collect::<Result<Vec<_>>>()?;
                ys.try_into().map_err(|_| Error::Compute("a linear group returned the wrong number of outputs".into()))
            }
            GroupKind::Fused { linear, widths } => {
                let y = linear.forward(x)?;
                let last = y.rank() - 1;
                let mut off = 0;
                let mut out = Vec::with_capacity(N);
                for &w in widths {
                    out.push(y.narrow(last, off, w)?);
                    off += w;
                }
                out.try_into().map_err(|_| Error::Compute("a linear group returned the wrong number of outputs".into()))
            }
        }
    }

    /// The fused output `[.., Σ widths]` (parts side by side), when the group is fused.
    pub fn forward_fused(&self, x: &Tensor) -> Option<Result<Tensor>> {
        match &self.kind {
            GroupKind::Fused { linear, .. } => Some(linear.forward(x)),
            GroupKind::Separate(_) => None,
        }
    }

    /// Each part's dense f32 weight `[out, in]` and bias (for export).
    pub fn weights(&self) -> Result<Vec<(Tensor, Option<Tensor>)>> {
        match &self.kind {
            GroupKind::Separate(parts) => parts.iter().map(|l| Ok((l.dense_weight()?, l.bias.clone()))).collect(),
            GroupKind::Fused { linear, widths } => {
                let w = linear.dense_weight()?;
                let mut off = 0;
                let mut out = Vec::with_capacity(N);
                for &n in widths {
                    let bias = match &linear.bias {
                        Some(b) => Some(b.narrow(0, off, n)?.contiguous()?),
                        None => None,
                    };
                    out.push((w.narrow(0, off, n)?.contiguous()?, bias));
                    off += n;
                }
                Ok(out)
            }
        }
    }
}

/// The parts' weights stacked (rows in order) into one weight of the same kind, when they are all
/// packed f32 or all AMX with the same input width.
fn fused_weight(parts: &[Linear]) -> Option<LinearWeight> {
    use std::sync::Arc;
    match &parts.first()?.weight {
        LinearWeight::Packed(first) => {
            let cols = first.cols();
            let mut w = Vec::new();
            for l in parts {
                match &l.weight {
                    LinearWeight::Packed(p) if p.cols() == cols => w.extend(p.unpack()),
                    _ => return None,
                }
            }
            Some(LinearWeight::Packed(Arc::new(PackedMatrix::pack(&w, w.len() / cols.max(1), cols))))
        }
        LinearWeight::Amx(_) => {
            let amx: Option<Vec<&AmxMatrix>> = parts
                .iter()
                .map(|l| match &l.weight {
                    LinearWeight::Amx(a) => Some(a.as_ref()),
                    _ => None,
                })
                .collect();
            Some(LinearWeight::Amx(Arc::new(AmxMatrix::stack(&amx?)?)))
        }
        _ => None,
    }
}

/// `x` `[rows, in]` (contiguous f32) times the row blocks' weights: the blocks are handed out
/// to the threads of our pool, the outputs joined side by side.
fn quantized_parts_forward(parts: &[QMatMul], x: &Tensor) -> Result<Tensor> {
    let outs: Vec<std::sync::Mutex<Option<candle_core::Result<Tensor>>>> =
        parts.iter().map(|_| std::sync::Mutex::new(None)).collect();
    personacore_kernels::par::for_chunks(parts.len(), 1, &|p0, p1| {
        for p in p0..p1 {
            let y = part_forward(&parts[p], x);
            if let Ok(mut slot) = outs[p].lock() {
                *slot = Some(y);
            }
        }
    });
    let ys = outs
        .into_iter()
        .map(|m| match m.into_inner() {
            Ok(Some(y)) => Ok(y?),
            _ => Err(Error::Compute("a quantized matmul part did not run".into())),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&ys, 1)?)
}

/// One row block's product `x Wᵀ` (`x` contiguous f32 `[rows, in]`): Q4_K, Q6_K and Q8_0
/// blocks through candle's compact kernel ([`kquant::compact_matmul`]), every other type through
/// `QMatMul::forward`. candle's forward repacks those types at its first call into tiles it keeps
/// beside the blocks (1.33× the Q4_K blocks, 1.5× the Q6_K ones, plus an AMX copy of Q4_K for 32
/// rows or more); read in place, a quantized model holds one copy of its weights (for Gemma 3
/// 270M Q4_K_M the tiles were 32 MiB on top of a 241 MiB file).
fn part_forward(q: &QMatMul, x: &Tensor) -> candle_core::Result<Tensor> {
    if let QMatMul::QTensor(t) = q {
        let (n, k) = t.shape().dims2()?;
        let f32_cpu = x.device().is_cpu() && x.dtype() == DType::F32 && x.dims().last() == Some(&k);
        if f32_cpu && kquant::runs_compact(t) {
            let (xs, xl) = x.storage_and_layout();
            let (candle_core::Storage::Cpu(xs), Some((x0, x1))) = (&*xs, xl.contiguous_offsets()) else {
                candle_core::bail!("a quantized CPU matmul needs a contiguous CPU input");
            };
            let m = (x1 - x0) / k.max(1);
            let y = kquant::compact_matmul(t, &xs.as_slice::<f32>()?[x0..x1], m)?;
            return Tensor::from_vec(y, (m, n), x.device());
        }
    }
    q.forward(x)
}

/// `f` applied to `x` (`[rows, in]`) as contiguous f32.
pub(super) fn with_f32_rows(x: &Tensor, f: impl FnOnce(&[f32]) -> Vec<f32>) -> Result<Vec<f32>> {
    let x32 = x.to_dtype(DType::F32)?.contiguous()?;
    let (xs, xl) = x32.storage_and_layout();
    let candle_core::Storage::Cpu(xs) = &*xs else {
        return Err(Error::input("a CPU model was given an input on another device"));
    };
    let Some((x0, x1)) = xl.contiguous_offsets() else {
        return Err(Error::Compute("matmul input is not contiguous".into()));
    };
    Ok(f(&xs.as_slice::<f32>()?[x0..x1]))
}
