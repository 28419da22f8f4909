//! Hook points: the named places in the layer loop where activations can be read or changed,
//! named as in TransformerLens.

/// A place in the forward pass. Every hook point carries the residual stream, shape
/// `[batch, seq, hidden]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HookPoint {
    /// `hook_embed`: token embeddings, `[batch, seq, hidden]`. Capture row 0.
    Embed,
    /// `blocks.{i}.hook_resid_post`: residual stream after block `i` (0-based), `[batch, seq, hidden]`.
    /// Capture row `i + 1` for every block but the last (whose row is `FinalNorm`).
    ResidPost(usize),
    /// `ln_final.hook_normalized`: final RMSNorm of the last block's output, `[batch, seq, hidden]`.
    /// Capture row `num_layers`, as transformers' last hidden state.
    FinalNorm,
}

impl HookPoint {
    /// The row of a `[num_layers + 1, ..]` capture this point fills, if any (see
    /// docs/conventions.md, Layers).
    pub fn row(&self, num_layers: usize) -> Option<usize> {
        match *self {
            HookPoint::Embed => Some(0),
            HookPoint::ResidPost(i) if i + 1 < num_layers => Some(i + 1),
            HookPoint::ResidPost(_) => None,
            HookPoint::FinalNorm => Some(num_layers),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_follow_the_layer_convention() {
        let n = 30;
        assert_eq!(HookPoint::Embed.row(n), Some(0));
        for i in 0..n - 1 {
            assert_eq!(HookPoint::ResidPost(i).row(n), Some(i + 1));
        }
        assert_eq!(HookPoint::ResidPost(n - 1).row(n), None);
        assert_eq!(HookPoint::FinalNorm.row(n), Some(n));
    }
}
