//! Hook points: the named places in the layer loop where activations can be read or changed,
//! named as in TransformerLens.

use crate::error::{Error, Result};

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
    /// The TransformerLens-style name.
    pub fn name(&self) -> String {
        match self {
            HookPoint::Embed => "hook_embed".to_string(),
            HookPoint::ResidPost(i) => format!("blocks.{i}.hook_resid_post"),
            HookPoint::FinalNorm => "ln_final.hook_normalized".to_string(),
        }
    }

    /// Parses a name produced by [`HookPoint::name`].
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "hook_embed" => return Ok(HookPoint::Embed),
            "ln_final.hook_normalized" => return Ok(HookPoint::FinalNorm),
            _ => {}
        }
        name.strip_prefix("blocks.")
            .and_then(|r| r.strip_suffix(".hook_resid_post"))
            .and_then(|i| i.parse().ok())
            .map(HookPoint::ResidPost)
            .ok_or_else(|| Error::input(format!("unknown hook point '{name}'")))
    }

    /// The row of a `[num_layers + 1, ..]` capture this point fills (DESIGN §2), if any.
    pub fn row(&self, num_layers: usize) -> Option<usize> {
        match *self {
            HookPoint::Embed => Some(0),
            HookPoint::ResidPost(i) if i + 1 < num_layers => Some(i + 1),
            HookPoint::ResidPost(_) => None,
            HookPoint::FinalNorm => Some(num_layers),
        }
    }

    /// The point that fills capture row `row` (0 ..= num_layers).
    pub fn for_row(row: usize, num_layers: usize) -> Self {
        if row == 0 {
            HookPoint::Embed
        } else if row >= num_layers {
            HookPoint::FinalNorm
        } else {
            HookPoint::ResidPost(row - 1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_rows_follow_design() {
        let n = 30;
        for row in 0..=n {
            let p = HookPoint::for_row(row, n);
            assert_eq!(p.row(n), Some(row));
            assert_eq!(HookPoint::parse(&p.name()).ok(), Some(p));
        }
        assert_eq!(HookPoint::ResidPost(n - 1).row(n), None);
        assert_eq!(HookPoint::ResidPost(9).name(), "blocks.9.hook_resid_post");
        assert!(HookPoint::parse("blocks.x.hook_resid_post").is_err());
    }
}
