//! The kernels of `personacore-kernels` (plain `f32` slices) applied to candle tensors for the
//! decoder layers: each reads its tensors in place when they are f32 on the CPU and laid out
//! for the kernel, and returns the result as a new tensor. The norm, activation, add and softmax
//! entry points check that themselves and return `None` (or run candle's ops) otherwise; the
//! attention ones run only where their check (`split_heads_applies`, `kernel_kv_view`), which
//! [`Attention`](super::Attention) makes once per call, accepted the tensors.

use candle_core::{DType, Tensor};
use personacore_kernels::activations::swiglu_to_vec;
use personacore_kernels::norm::{add_rms_norm_to_vec, add_to_vec, rms_norm_to_vec};

use crate::error::Result;

/// RMSNorm of `x + delta` (or of `x`) over the last axis with `weight`: `(sum, norm)` in one pass
/// through [`personacore_kernels::norm`] for contiguous f32 CPU tensors of one shape
/// (`sum` only with a `delta`); `None` otherwise.
pub(super) fn rms_norm(
    x: &Tensor,
    delta: Option<&Tensor>,
    weight: &Tensor,
    eps: f32,
) -> Result<Option<(Option<Tensor>, Tensor)>> {
    if delta.is_some_and(|d| d.dims() != x.dims()) || x.dims().last() != Some(&weight.elem_count()) {
        return Ok(None);
    }
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = weight.storage_and_layout();
    let ds = delta.map(|d| d.storage_and_layout());
    let (Some(xv), Some(wv)) = (contiguous_f32(&xs, xl), contiguous_f32(&ws, wl)) else { return Ok(None) };
    let dv = match &ds {
        Some((s, l)) => match contiguous_f32(s, l) {
            Some(v) => Some(v),
            None => return Ok(None),
        },
        None => None,
    };
    let (sum, out) = match dv {
        Some(d) => {
            let (sum, out) = add_rms_norm_to_vec(xv, d, wv, eps);
            (Some(sum), out)
        }
        None => (None, rms_norm_to_vec(xv, wv, eps)),
    };
    let dev = x.device();
    let sum = sum.map(|s| Tensor::from_vec(s, x.shape(), dev)).transpose()?;
    Ok(Some((sum, Tensor::from_vec(out, x.shape(), dev)?)))
}

/// `softmax(scores · scale + mask)` over the last axis of `[b, kv_heads, rows_per_head, keys]`
/// f32 CPU scores (mask `[b or 1, 1, t, keys]`, rows ordered `[group, t]` within a head) in one
/// pass through [`personacore_kernels::attention::masked_softmax`];
/// `None` for other dtypes, devices or layouts.
pub(super) fn softmax_cpu(
    scores: &Tensor,
    mask: Option<&Tensor>,
    scale: f32,
    rows_per_head: usize,
    t: usize,
) -> Result<Option<Tensor>> {
    use personacore_kernels::attention::{masked_softmax_to_vec, MaskLayout};
    if scores.dtype() != DType::F32 || !scores.device().is_cpu() {
        return Ok(None);
    }
    let keys = scores.dims().last().copied().unwrap_or(0);
    let heads_per_batch = if scores.rank() == 4 { scores.dim(1)? } else { return Ok(None) };
    let mask = match mask {
        Some(m) if m.rank() == 4 && m.dim(2)? == t && m.dim(3)? == keys => Some((m.dim(0)?, m.storage_and_layout())),
        Some(_) => return Ok(None),
        None => None,
    };
    let mask = match &mask {
        Some((mb, (ms, ml))) => match contiguous_f32(ms, ml) {
            Some(m) => Some((m, MaskLayout { rows_per_batch: heads_per_batch * rows_per_head, t, mask_batches: *mb })),
            None => return Ok(None),
        },
        None => None,
    };
    let (st, l) = scores.storage_and_layout();
    let Some(src) = contiguous_f32(&st, l) else { return Ok(None) };
    let out = masked_softmax_to_vec(src, keys, scale, mask);
    Ok(Some(Tensor::from_vec(out, scores.shape(), scores.device())?))
}

/// Whether [`split_heads_cpu`] applies: projections `[b, t, n · head_dim]` that are f32 CPU
/// views with dense rows (e.g. of one fused q/k/v matmul), and contiguous f32 CPU rotation
/// tables of `b · t · head_dim/2` values.
pub(super) fn split_heads_applies(qkv: [&Tensor; 3], heads: [usize; 3], hd: usize, cos: &Tensor, sin: &Tensor) -> bool {
    let table = |c: &Tensor| is_f32_cpu(c) && c.is_contiguous();
    let rows = |x: &Tensor, n: usize, rotated: bool| match *x.dims() {
        [b, t, width] => {
            let tables_fit = cos.elem_count() == b * t * hd / 2 && sin.elem_count() == cos.elem_count();
            is_f32_cpu(x) && width == n * hd && x.stride()[2] == 1 && (tables_fit || !rotated)
        }
        _ => false,
    };
    let [q, k, v] = qkv;
    table(cos) && table(sin) && rows(q, heads[0], true) && rows(k, heads[1], true) && rows(v, heads[2], false)
}

/// The projections' outputs `[b, t, n · head_dim]` as contiguous heads `[b, n, t, head_dim]`,
/// q and k rotated by `cos`/`sin` `[b, t, head_dim/2]`, in one pass each through
/// [`personacore_kernels::rope`]. Only for tensors [`split_heads_applies`] accepts.
pub(super) fn split_heads_cpu(
    qkv: [&Tensor; 3],
    heads: [usize; 3],
    hd: usize,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    use candle_core::Storage;
    use personacore_kernels::rope::{split_heads_to_vec, HeadShape, Rows};
    let (cs, cl) = cos.storage_and_layout();
    let (ss, sl) = sin.storage_and_layout();
    let (cos, sin) = (cpu_f32(&cs, cl)?, cpu_f32(&ss, sl)?);
    let split = |x: &Tensor, n: usize, rotation: Option<(&[f32], &[f32])>| -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (st, l) = x.storage_and_layout();
        let Storage::Cpu(st) = &*st else { return Err(not_laid_out()) };
        let stride = l.stride();
        let rows = Rows { offset: l.start_offset(), batch_stride: stride[0], row_stride: stride[1] };
        let shape = HeadShape { batch: b, t, heads: n, head_dim: hd };
        let y = split_heads_to_vec(st.as_slice::<f32>()?, rows, shape, rotation);
        Ok(Tensor::from_vec(y, (b, n, t, hd), x.device())?)
    };
    let [q, k, v] = qkv;
    Ok((split(q, heads[0], Some((cos, sin)))?, split(k, heads[1], Some((cos, sin)))?, split(v, heads[2], None)?))
}

/// Where the keys and values `[b, kv_heads, s, head_dim]` live for the attention kernels, when
/// `q`, `k`, `v` (and `mask`) are f32 CPU tensors, the mask contiguous, and `k` and `v` share
/// one layout with dense rows (a fresh tensor or a view of the KV cache); `None` otherwise.
pub(super) fn kernel_kv_view(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
) -> Option<personacore_kernels::attention::KvStrides> {
    let mask_fits = mask.is_none_or(|m| is_f32_cpu(m) && m.is_contiguous());
    if !(is_f32_cpu(q) && is_f32_cpu(k) && is_f32_cpu(v) && mask_fits) || k.rank() != 4 {
        return None;
    }
    let (kl, vl) = (k.layout(), v.layout());
    let (ks, vs) = (kl.stride(), vl.stride());
    let hd = k.dims()[3];
    if ks != vs || kl.start_offset() != vl.start_offset() || ks[2] != hd || ks[3] != 1 || v.dims() != k.dims() {
        return None;
    }
    Some(personacore_kernels::attention::KvStrides {
        offset: kl.start_offset(),
        batch_stride: ks[0],
        head_stride: ks[1],
    })
}

/// Runs `f` on the values of contiguous `q` and `mask` and the whole storages of `k` and `v`
/// (read in place). Only for tensors [`kernel_kv_view`] accepts, with `q` made contiguous.
pub(super) fn with_f32_views(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    f: impl FnOnce(&[f32], &[f32], &[f32], Option<&[f32]>),
) -> Result<()> {
    use candle_core::Storage;
    let ((qst, ql), (kst, _), (vst, _)) = (q.storage_and_layout(), k.storage_and_layout(), v.storage_and_layout());
    let mask_storage = mask.map(|m| m.storage_and_layout());
    let mask = match &mask_storage {
        Some((ms, ml)) => Some(cpu_f32(ms, ml)?),
        None => None,
    };
    let (Storage::Cpu(kst), Storage::Cpu(vst)) = (&*kst, &*vst) else { return Err(not_laid_out()) };
    f(cpu_f32(&qst, ql)?, kst.as_slice::<f32>()?, vst.as_slice::<f32>()?, mask);
    Ok(())
}

/// Whether a decode step (`q` `[b, heads, 1, head_dim]`) can attend to each sequence's own cache
/// in place ([`decode_each`]): f32 on the CPU, the mask (if any) contiguous f32.
pub(super) fn decode_each_applies(q: &Tensor, k: &Tensor, mask: Option<&Tensor>) -> bool {
    is_f32_cpu(q)
        && is_f32_cpu(k)
        && q.dims().get(2) == Some(&1)
        && mask.is_none_or(|m| is_f32_cpu(m) && m.is_contiguous())
}

/// A decode step's attention of `q` `[b, heads, 1, head_dim]` against each sequence's own keys
/// and values (`views[i]`: `[1, kv_heads, len_i, head_dim]` views of its cache, read in place),
/// through [`personacore_kernels::attention::decode_attention_seqs`]; `mask` is additive
/// `[b or 1, 1, 1, s]` with `s >= len_i` (each sequence reads its first `len_i` values); scores
/// are scaled by `scale`. Returns `[b, 1, heads · head_dim]`. Only where [`decode_each_applies`]
/// accepted the tensors.
pub(super) fn decode_each(
    q: &Tensor,
    views: &[(Tensor, Tensor)],
    mask: Option<&Tensor>,
    [heads, kv_heads]: [usize; 2],
    scale: f32,
) -> Result<Tensor> {
    use candle_core::Storage;
    use personacore_kernels::attention::{decode_attention_seqs, SeqKv};
    let (b, hd) = (views.len(), q.dim(3)?);
    let q = q.contiguous()?;
    let (qs, ql) = q.storage_and_layout();
    let qv = cpu_f32(&qs, ql)?;
    let mask_guard = mask.map(|m| m.storage_and_layout());
    let mask_vals = match &mask_guard {
        Some((ms, ml)) => Some(cpu_f32(ms, ml)?),
        None => None,
    };
    let s = mask.map_or(0, |m| m.dims().last().copied().unwrap_or(0));
    let mask_rows = mask_vals.map_or(0, |m| m.len() / s.max(1));
    let guards: Vec<_> = views.iter().map(|(k, v)| (k.storage_and_layout(), v.storage_and_layout())).collect();
    let mut seqs = Vec::with_capacity(b);
    for (r, (((ks, kl), (vs, vl)), (k, v))) in guards.iter().zip(views).enumerate() {
        let (Storage::Cpu(ks), Storage::Cpu(vs)) = (&**ks, &**vs) else { return Err(not_laid_out()) };
        let (kst, vst, keys) = (kl.stride(), vl.stride(), k.dim(2)?);
        let laid_out = k.rank() == 4 && v.dims() == k.dims() && k.dim(3)? == hd && kst == vst && kst[2] == hd;
        if !laid_out || kst[3] != 1 || kl.start_offset() != vl.start_offset() || (mask.is_some() && keys > s) {
            return Err(not_laid_out());
        }
        let off = kl.start_offset();
        let row = if mask_rows == 1 { 0 } else { r };
        seqs.push(SeqKv {
            k: &ks.as_slice::<f32>()?[off..],
            v: &vs.as_slice::<f32>()?[off..],
            head_stride: kst[1],
            keys,
            mask: mask_vals.map(|m| &m[row * s..][..keys]),
        });
    }
    let mut out = vec![0f32; b * heads * hd];
    decode_attention_seqs(qv, &seqs, heads, kv_heads, hd, scale, &mut out);
    Ok(Tensor::from_vec(out, (b, 1, heads * hd), q.device())?)
}

/// Whether `x` is an f32 tensor on the CPU.
fn is_f32_cpu(x: &Tensor) -> bool {
    x.dtype() == DType::F32 && x.device().is_cpu()
}

/// [`contiguous_f32`] for a tensor already checked to be laid out so.
fn cpu_f32<'a>(storage: &'a candle_core::Storage, layout: &candle_core::Layout) -> Result<&'a [f32]> {
    contiguous_f32(storage, layout).ok_or_else(not_laid_out)
}

/// A kernel was handed a tensor its check had accepted but whose storage is not contiguous f32 on the CPU.
fn not_laid_out() -> crate::Error {
    crate::Error::Compute("a CPU kernel's input is not a contiguous f32 CPU tensor".into())
}

/// The values of a contiguous f32 CPU tensor, read in place through its storage (`None` for
/// another dtype, device or layout).
pub(super) fn contiguous_f32<'a>(storage: &'a candle_core::Storage, layout: &candle_core::Layout) -> Option<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(s), Some((a, b))) => s.as_slice::<f32>().ok().map(|v| &v[a..b]),
        _ => None,
    }
}

/// `silu(gate) * up` from a fused `[.., 2·inter]` gate/up output (f32, CPU, contiguous: packed
/// weights guarantee it), in one pass through [`personacore_kernels::activations`].
pub(super) fn swiglu_fused(gate_up: &Tensor) -> Result<Tensor> {
    use candle_core::Storage;
    let Some((&width, lead)) = gate_up.dims().split_last() else {
        return Err(crate::Error::Compute("fused gate/up output has no feature axis".into()));
    };
    let inter = width / 2;
    let (s, l) = gate_up.storage_and_layout();
    let (Storage::Cpu(s), Some((o0, o1))) = (&*s, l.contiguous_offsets()) else {
        return Err(crate::Error::Compute("fused gate/up output is not a contiguous CPU tensor".into()));
    };
    let y = &s.as_slice::<f32>()?[o0..o1];
    let rows = y.len() / width.max(1);
    let out = swiglu_to_vec(y, width, &y[inter.min(y.len())..], width, rows, inter);
    let shape: Vec<usize> = lead.iter().copied().chain([inter]).collect();
    Ok(Tensor::from_vec(out, shape, gate_up.device())?)
}

/// `silu(gate) * up`: one pass through [`personacore_kernels::activations`] for
/// contiguous f32 on the CPU, candle's two ops otherwise.
pub(super) fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    use candle_core::Storage;
    if gate.dtype() == DType::F32 && up.dtype() == DType::F32 && gate.dims() == up.dims() {
        let (gs, gl) = gate.storage_and_layout();
        let (us, ul) = up.storage_and_layout();
        if let (Storage::Cpu(gs), Storage::Cpu(us), Some((g0, g1)), Some((u0, u1))) =
            (&*gs, &*us, gl.contiguous_offsets(), ul.contiguous_offsets())
        {
            let cols = gate.dims().last().copied().unwrap_or(1).max(1);
            let (g, u) = (&gs.as_slice::<f32>()?[g0..g1], &us.as_slice::<f32>()?[u0..u1]);
            let out = swiglu_to_vec(g, cols, u, cols, g.len() / cols, cols);
            return Ok(Tensor::from_vec(out, gate.shape(), gate.device())?);
        }
    }
    Ok((candle_nn::ops::silu(gate)? * up)?)
}

/// `x + delta`: [`personacore_kernels::norm::add`] for contiguous f32 CPU tensors
/// of one shape, candle's add otherwise.
pub(super) fn residual_add(x: &Tensor, delta: &Tensor) -> Result<Tensor> {
    if x.dims() == delta.dims() {
        let (xs, xl) = x.storage_and_layout();
        let (ds, dl) = delta.storage_and_layout();
        if let (Some(xv), Some(dv)) = (contiguous_f32(&xs, xl), contiguous_f32(&ds, dl)) {
            let out = add_to_vec(xv, dv);
            return Ok(Tensor::from_vec(out, x.shape(), x.device())?);
        }
    }
    Ok((x + delta)?)
}
