//! The keys and values of one attention layer, preallocated for a batch.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

/// Keys and values of one layer for every sequence of a batch, preallocated to a capacity.
#[derive(Debug, Clone)]
pub struct LayerKvCache {
    /// `[batch, kv_heads, capacity, head_dim]`
    k: Tensor,
    /// `[batch, kv_heads, capacity, head_dim]`
    v: Tensor,
    len: usize,
}

impl LayerKvCache {
    /// An empty cache able to hold `capacity` positions.
    pub fn new(
        batch: usize,
        kv_heads: usize,
        capacity: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let z = Tensor::zeros((batch, kv_heads, capacity, head_dim), dtype, device)?;
        Ok(Self { k: z.clone(), v: z.copy()?, len: 0 })
    }

    /// Positions stored so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is stored yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `[batch, kv_heads, t, head_dim]` keys/values in place; returns views of everything stored.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        let cap = self.k.dim(2)?;
        if self.len + t > cap {
            return Err(crate::Error::input(format!("KV cache full: {} + {t} positions > capacity {cap}", self.len)));
        }
        self.k.slice_set(&k.contiguous()?, 2, self.len)?;
        self.v.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len += t;
        Ok((self.k.narrow(2, 0, self.len)?, self.v.narrow(2, 0, self.len)?))
    }
}

/// Where attention keeps the keys and values of earlier positions of one layer: a batch's own
/// [`LayerKvCache`], or a view over the caches of several sequences (continuous batching).
pub trait KvStore {
    /// Appends `[batch, kv_heads, t, head_dim]` keys/values; returns every stored key and value,
    /// `[batch, kv_heads, s, head_dim]` (positions a sequence has not filled are masked by the caller).
    fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)>;

    /// Whether each sequence lives in a cache of its own, so that a decode step can read them
    /// in place through [`KvStore::append_each`] instead of one gathered, padded tensor.
    fn separate(&self) -> bool {
        false
    }

    /// Appends `[batch, kv_heads, t, head_dim]` keys/values, row `i` to sequence `i`; returns each
    /// sequence's stored keys and values `[1, kv_heads, len_i, head_dim]` as they lie in its cache.
    fn append_each(&mut self, k: &Tensor, v: &Tensor) -> Result<Vec<(Tensor, Tensor)>> {
        Ok(vec![self.append(k, v)?])
    }
}

impl KvStore for LayerKvCache {
    fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        LayerKvCache::append(self, k, v)
    }
}
