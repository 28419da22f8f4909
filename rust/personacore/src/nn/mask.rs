//! Attention masks: which keys each new query position may see.
//!
//! A causal mask (with a sliding window and per-sequence left padding, if any) is described by
//! its shape: the attention kernel derives each row's visible keys from it, so no `[t, keys]`
//! tensor is written or read (256 MB at 8,000 tokens in f32). The additive tensor is built only
//! for the paths that need one (candle's ops, the decode kernels), once per mask.

use std::ops::Range;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use personacore_kernels::prompt_attention::CausalRows;

use crate::error::Result;

/// Which keys each of `t` new query positions may see.
#[derive(Debug, Clone)]
pub enum AttentionMask {
    /// Causal, described by its shape.
    Causal(CausalMask),
    /// Additive values `[b or 1, 1, t, keys]` (`-inf` = not visible).
    Dense(Tensor),
}

/// A causal mask by shape: the `t` new positions of each sequence take key slots `past..past +
/// t`; a query sees the slots up to its own, at most `window` of them when there is a window,
/// and none of its sequence's left padding (its first `left_pads[b]` slots); a padding slot sees
/// only itself (so its row stays finite).
#[derive(Debug, Clone)]
pub struct CausalMask {
    t: usize,
    past: usize,
    window: Option<usize>,
    /// One per sequence, or empty when no sequence is padded (the mask is then shared).
    left_pads: Vec<usize>,
    dtype: DType,
    device: Device,
    /// The additive tensor, built on first use.
    dense: OnceLock<Tensor>,
}

impl AttentionMask {
    /// The causal mask of `t` positions after `past` cached ones in every sequence, with the
    /// sliding `window` if any and `left_pads` (one per sequence, or empty), for tensors of
    /// `dtype` on `device`.
    pub fn causal(
        t: usize,
        past: usize,
        window: Option<usize>,
        left_pads: Vec<usize>,
        dtype: DType,
        device: &Device,
    ) -> Self {
        let left_pads = if left_pads.iter().all(|&p| p == 0) { Vec::new() } else { left_pads };
        Self::Causal(CausalMask { t, past, window, left_pads, dtype, device: device.clone(), dense: OnceLock::new() })
    }

    /// Key slots per sequence (cached ones included).
    pub fn keys(&self) -> Result<usize> {
        Ok(match self {
            Self::Causal(c) => c.keys(),
            Self::Dense(m) => m.dim(3)?,
        })
    }

    /// This mask, further limited to a sliding window of `window` keys (each query sees at most
    /// `window` slots ending at its own); unchanged when every sequence has at most `window` keys.
    pub fn with_window(&self, window: usize) -> Result<Self> {
        if self.keys()? <= window {
            return Ok(self.clone());
        }
        match self {
            Self::Causal(c) => {
                let w = c.window.map_or(window, |old| old.min(window));
                Ok(Self::causal(c.t, c.past, Some(w), c.left_pads.clone(), c.dtype, &c.device))
            }
            Self::Dense(m) => Ok(Self::Dense(dense_with_window(m, window)?)),
        }
    }

    /// The additive tensor `[b or 1, 1, t, keys]` (built once for a causal mask).
    pub fn tensor(&self) -> Result<Tensor> {
        match self {
            Self::Dense(m) => Ok(m.clone()),
            Self::Causal(c) => {
                if let Some(m) = c.dense.get() {
                    return Ok(m.clone());
                }
                let m = c.build()?;
                Ok(c.dense.get_or_init(|| m).clone())
            }
        }
    }

    /// The mask of the last query position alone (what it sees, as one query after the others).
    pub fn last_query(&self) -> Result<Self> {
        Ok(match self {
            Self::Causal(c) => {
                Self::causal(1, c.past + c.t.saturating_sub(1), c.window, c.left_pads.clone(), c.dtype, &c.device)
            }
            Self::Dense(m) => {
                let t = m.dim(2)?;
                Self::Dense(m.narrow(2, t.saturating_sub(1), 1.min(t))?.contiguous()?)
            }
        })
    }

    /// The dense tensor when the mask is one.
    pub fn as_dense(&self) -> Option<&Tensor> {
        match self {
            Self::Dense(m) => Some(m),
            Self::Causal(_) => None,
        }
    }
}

impl CausalMask {
    /// New query positions.
    pub fn queries(&self) -> usize {
        self.t
    }

    /// Key slots per sequence (cached ones included).
    pub fn keys(&self) -> usize {
        self.past + self.t
    }

    /// Sequences the mask tells apart: their number when some are padded, else 1 (shared).
    pub fn batch(&self) -> usize {
        self.left_pads.len().max(1)
    }

    /// The description the prompt attention kernel reads.
    pub fn rows(&self) -> CausalRows<'_> {
        CausalRows { past: self.past, window: self.window, left_pads: &self.left_pads }
    }

    /// The key slots that query `i` of sequence `b` sees.
    pub fn visible(&self, b: usize, i: usize) -> Range<usize> {
        self.rows().visible(b, i)
    }

    /// The additive tensor `[batch, 1, t, keys]`.
    fn build(&self) -> Result<Tensor> {
        let (b, t, s) = (self.batch(), self.t, self.past + self.t);
        let mut m = vec![f32::NEG_INFINITY; b * t * s];
        for bi in 0..b {
            for i in 0..t {
                m[(bi * t + i) * s..][..s][self.visible(bi, i)].fill(0.0);
            }
        }
        Ok(Tensor::from_vec(m, (b, 1, t, s), &self.device)?.to_dtype(self.dtype)?)
    }
}

/// A dense mask `[b or 1, 1, t, s]` plus a sliding window: a query sees keys fewer than `window`
/// slots before its own slot, which is the last key its mask leaves open.
fn dense_with_window(mask: &Tensor, window: usize) -> Result<Tensor> {
    let (dtype, device, shape) = (mask.dtype(), mask.device().clone(), mask.shape().clone());
    let s = mask.dim(3)?;
    let mut m = mask.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
    for row in m.chunks_mut(s) {
        if let Some(own) = row.iter().rposition(|v| v.is_finite()) {
            if own >= window {
                row[..=own - window].fill(f32::NEG_INFINITY);
            }
        }
    }
    Ok(Tensor::from_vec(m, shape, &device)?.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn visible_rows(m: &Tensor) -> Vec<Vec<bool>> {
        let (b, _, t, s) = m.dims4().unwrap();
        let v = m.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        (0..b * t).map(|r| (0..s).map(|j| v[r * s + j].is_finite()).collect()).collect()
    }

    /// The tensor of a causal mask against the rule written out per key: causal, the window,
    /// left padding (a pad sees only itself).
    #[test]
    fn causal_tensor_follows_the_rule() {
        let (t, past, w, pads) = (6, 3, 4, vec![0usize, 5]);
        let m = AttentionMask::causal(t, past, Some(w), pads.clone(), DType::F32, &Device::Cpu);
        let s = past + t;
        let mut want = Vec::new();
        for &pad in &pads {
            for i in 0..t {
                let q = past + i;
                want.push((0..s).map(|j| !(j > q || (j < pad && j != q) || q - j.min(q) >= w)).collect::<Vec<_>>());
            }
        }
        assert_eq!(visible_rows(&m.tensor().unwrap()), want);
    }

    #[test]
    fn sliding_window_keeps_the_last_window_keys_of_each_query() {
        let m = AttentionMask::causal(5, 0, None, vec![], DType::F32, &Device::Cpu).with_window(2).unwrap();
        let want: Vec<Vec<bool>> = (0..5).map(|i| (0..5).map(|j| j <= i && i - j < 2).collect()).collect();
        assert_eq!(visible_rows(&m.tensor().unwrap()), want);
    }

    #[test]
    fn sliding_window_follows_each_dense_rows_own_slot() {
        // Row 0: a decode step at slot 3 of 5 (shorter sequence); row 1: at slot 4.
        let mut v = vec![f32::NEG_INFINITY; 10];
        v[..4].fill(0.0);
        v[5..].fill(0.0);
        let mask = AttentionMask::Dense(Tensor::from_vec(v, (2, 1, 1, 5), &Device::Cpu).unwrap());
        let m = mask.with_window(3).unwrap().tensor().unwrap();
        let flat: Vec<bool> = visible_rows(&m).concat();
        assert_eq!(flat, vec![false, true, true, true, false, false, false, true, true, true]);
    }

    /// A window on a causal mask is the same mask as the window applied to its tensor.
    #[test]
    fn with_window_matches_the_dense_window() {
        for pads in [vec![], vec![2usize, 0, 7]] {
            let m = AttentionMask::causal(9, 4, None, pads, DType::F32, &Device::Cpu);
            let dense = AttentionMask::Dense(m.tensor().unwrap());
            let a = m.with_window(3).unwrap().tensor().unwrap();
            let b = dense.with_window(3).unwrap().tensor().unwrap();
            assert_eq!(visible_rows(&a), visible_rows(&b));
        }
        // within the window nothing changes
        let m = AttentionMask::causal(5, 0, None, vec![], DType::F32, &Device::Cpu);
        assert_eq!(visible_rows(&m.with_window(5).unwrap().tensor().unwrap()), visible_rows(&m.tensor().unwrap()));
    }

    /// The last query's mask is the last row of the whole mask, for causal masks (with a past,
    /// a window, left padding) and dense ones.
    #[test]
    fn last_query_is_the_last_row() {
        let dev = Device::Cpu;
        let cases = [
            (5usize, 0usize, None, vec![]),
            (6, 3, Some(4), vec![]),
            (7, 2, None, vec![0, 3, 5]),
            (4, 0, Some(2), vec![1, 0]),
        ];
        for (t, past, window, pads) in cases {
            let m = AttentionMask::causal(t, past, window, pads.clone(), DType::F32, &dev);
            let rows = |m: &AttentionMask| visible_rows(&m.tensor().unwrap());
            let full = rows(&m);
            let b = pads.len().max(1);
            let want: Vec<Vec<bool>> = (0..b).map(|i| full[i * t + t - 1].clone()).collect();
            assert_eq!(
                rows(&m.last_query().unwrap()),
                want,
                "causal t={t} past={past} window={window:?} pads={pads:?}"
            );
            let dense = AttentionMask::Dense(m.tensor().unwrap());
            assert_eq!(rows(&dense.last_query().unwrap()), want, "dense t={t} past={past}");
        }
    }
}
