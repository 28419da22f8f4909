//! SentencePiece vocabularies from GGUF metadata (`tokenizer.ggml.model = "llama"`), built the
//! way transformers builds them from a GGUF so that both give the same ids.
//!
//! A SentencePiece GGUF stores tokens, scores and token types but no merges. For the Gemma
//! families (`general.architecture` `gemma`, `gemma2`, `gemma3`) the tokenizer is a byte-fallback
//! BPE over `▁`-spelled text:
//!
//! - tokens made only of spaces (`"  "`, stored with real spaces) are respelled with `▁`, the
//!   character every space becomes before the model sees it;
//! - merges are recovered from the vocabulary: every split of a token into two tokens is a merge,
//!   ranked by the merged token's position in the file (earlier first; Gemma's scores do not
//!   follow its merge order), ties broken by the lengths of the two parts, longer first;
//! - the normalizer turns every space into `▁`; no prefix space is added
//!   (`tokenizer.ggml.add_space_prefix` is false in Gemma files, and a file that asks for one is
//!   refused); bytes missing from the vocabulary become `<0xNN>` tokens (byte fallback);
//! - control tokens (type 3) are special added tokens; user-defined tokens (type 4) such as the
//!   newline runs are added tokens matched whole in the raw text but not special;
//! - `<bos>` is prepended when `tokenizer.ggml.add_bos_token` is true (the default for a
//!   SentencePiece file without the key).
//!
//! Other SentencePiece families (Llama 2, Mistral v0.1, Phi-3) use a different pre-tokenization
//! and are not implemented yet; they are refused with a clear error.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, DecoderWrapper, SplitDelimiterBehavior};

use super::gguf::{gguf_tokens, meta, meta_str, meta_token_id, post_processor, token_types};
use super::Tokenizer;
use crate::error::{Error, Result};

/// The architectures whose SentencePiece GGUF vocabulary this module builds.
const GEMMA_FAMILIES: &[&str] = &["gemma", "gemma2", "gemma3"];
/// GGUF token type of a control token (`<bos>`, `<start_of_turn>`).
const CONTROL: u64 = 3;
/// GGUF token type of a user-defined token (`\n\n`, `[multimodal]`).
const USER_DEFINED: u64 = 4;
/// SentencePiece's visible space.
const SPACE: char = '\u{2581}';

/// Builds a SentencePiece (`llama`) GGUF tokenizer; see the module documentation.
pub(crate) fn tokenizer_from_gguf(c: &Content) -> Result<Tokenizer> {
    let arch = meta_str(c, "general.architecture")?.unwrap_or("");
    if !GEMMA_FAMILIES.contains(&arch) {
        return Err(Error::Tokenizer(format!(
            "SentencePiece GGUF tokenizers are implemented for the Gemma families ({}) only, this \
             file is '{arch}'; put the model's tokenizer.json beside the GGUF to use it instead",
            GEMMA_FAMILIES.join(", ")
        )));
    }
    if meta(c, "tokenizer.ggml.add_space_prefix", "a bool", Value::to_bool)?.unwrap_or(false) {
        return Err(Error::Tokenizer(
            "GGUF sets tokenizer.ggml.add_space_prefix=true, which Gemma tokenizers never do; \
             this file's tokenizer is not supported"
                .into(),
        ));
    }
    let original = gguf_tokens(c)?;
    let n = original.len();
    let types = token_types(c, n)?;
    let tokens: Vec<String> = original.iter().map(|t| respell_spaces(t)).collect();

    // Python dict semantics, as transformers builds it: a repeated token keeps its first place
    // in the merge order and its last id.
    let mut vocab = Vocab::with_capacity(n);
    for (id, t) in tokens.iter().enumerate() {
        vocab.insert(t.clone(), id as u32);
    }
    let merges = merges_by_position(&tokens, &vocab);
    let unk = meta_token_id(c, "tokenizer.ggml.unknown_token_id", n)?
        .map(|id| tokens[id as usize].clone())
        .unwrap_or_else(|| "<unk>".to_string());
    let bpe = BPE::builder()
        .vocab_and_merges(vocab.clone(), merges)
        .unk_token(unk)
        .fuse_unk(true)
        .byte_fallback(true)
        .build()
        .map_err(|e| Error::Tokenizer(format!("cannot build BPE from the GGUF SentencePiece vocabulary: {e}")))?;

    let mut inner = tokenizers::Tokenizer::new(bpe);
    inner.with_normalizer(Some(Replace::new(" ", SPACE.to_string()).map_err(tok_err)?));
    let split = Split::new(SplitPattern::String(" ".into()), SplitDelimiterBehavior::MergedWithPrevious, false)
        .map_err(tok_err)?;
    inner.with_pre_tokenizer(Some(split));
    let decoders: Vec<DecoderWrapper> = vec![
        Replace::new(SPACE.to_string(), " ").map_err(tok_err)?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    inner.with_decoder(Some(DecoderSequence::new(decoders)));

    let control: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, &ty)| ty == CONTROL)
        .map(|(t, _)| AddedToken::from(t.clone(), true).normalized(false))
        .collect();
    inner.add_special_tokens(&control);
    // A user-defined token is added only under its own spelling: the respelled space runs are
    // not (they are reached through the normalizer instead), as in transformers.
    let user: Vec<AddedToken> = original
        .iter()
        .zip(&types)
        .filter(|(t, &ty)| ty == USER_DEFINED && vocab.contains_key(**t))
        .map(|(t, _)| AddedToken::from(t.to_string(), false).normalized(false))
        .collect();
    inner.add_tokens(&user);

    let bos_id = meta_token_id(c, "tokenizer.ggml.bos_token_id", n)?;
    let eos_id = meta_token_id(c, "tokenizer.ggml.eos_token_id", n)?;
    let add_bos = meta(c, "tokenizer.ggml.add_bos_token", "a bool", Value::to_bool)?.unwrap_or(true);
    let add_eos = meta(c, "tokenizer.ggml.add_eos_token", "a bool", Value::to_bool)?.unwrap_or(false);
    let names: Vec<&str> = tokens.iter().map(String::as_str).collect();
    inner.with_post_processor(Some(post_processor(&names, bos_id, eos_id, add_bos, add_eos)?));

    let mut eos_ids = Vec::new();
    for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
        if let Some(id) = meta_token_id(c, key, n)? {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
    }
    // Gemma's turn end ends a reply too, when the vocabulary has it.
    if let Some(&id) = vocab.get("<end_of_turn>") {
        if !eos_ids.contains(&id) {
            eos_ids.push(id);
        }
    }
    let bos = bos_id.map(|id| (tokens[id as usize].clone(), id));
    Ok(Tokenizer::from_parts(inner, n, bos, eos_ids))
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(format!("cannot build the SentencePiece tokenizer: {e}"))
}

/// A token made only of spaces, spelled with `▁` (one per space); others unchanged.
fn respell_spaces(t: &str) -> String {
    if t.contains(' ') && t.trim().is_empty() {
        std::iter::repeat_n(SPACE, t.chars().count()).collect()
    } else {
        t.to_string()
    }
}

/// Every split of a token into two vocabulary tokens, as a merge ranked by the token's
/// position in the file (earlier first), then by the left part's length and the right part's
/// length (longer first); splits of one token are ordered by the ids of their parts.
fn merges_by_position(tokens: &[String], vocab: &Vocab) -> Vec<(String, String)> {
    // A repeated token keeps its first place in the order and its last position (Python dict).
    let mut position: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    let mut order: Vec<&str> = Vec::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        if position.insert(t, i).is_none() {
            order.push(t);
        }
    }
    // (position, left chars, right chars, left, right), in generation order.
    let mut merges: Vec<(usize, usize, usize, &str, &str)> = Vec::new();
    for t in order {
        let pos = position[t];
        let mut local = Vec::new();
        for (cut, _) in t.char_indices().skip(1) {
            let (l, r) = t.split_at(cut);
            if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) {
                local.push((li, ri, l, r));
            }
        }
        local.sort_by_key(|&(li, ri, _, _)| (li, ri));
        merges.extend(local.into_iter().map(|(_, _, l, r)| (pos, l.chars().count(), r.chars().count(), l, r)));
    }
    // transformers sorts by (score, len(left), len(right)) descending with score = -position,
    // stably: position ascending, lengths descending, generation order among equals.
    merges.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)).then(b.2.cmp(&a.2)));
    merges.into_iter().map(|(_, _, _, l, r)| (l.to_string(), r.to_string())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(tokens: &[&str]) -> (Vec<String>, Vocab) {
        let tokens: Vec<String> = tokens.iter().map(|t| t.to_string()).collect();
        let v = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        (tokens, v)
    }

    #[test]
    fn merges_follow_file_order_then_longer_parts() {
        // "abc" (position 5) splits as a+bc and ab+c; "ab" (3) and "bc" (4) come first.
        let (tokens, v) = vocab(&["a", "b", "c", "ab", "bc", "abc"]);
        let merges = merges_by_position(&tokens, &v);
        let m = |a: &str, b: &str| (a.to_string(), b.to_string());
        // Same position: transformers sorts by (len(left), len(right)) descending, so "ab c"
        // (2, 1) before "a bc" (1, 2).
        assert_eq!(merges, vec![m("a", "b"), m("b", "c"), m("ab", "c"), m("a", "bc")]);
    }

    #[test]
    fn space_runs_are_respelled() {
        assert_eq!(respell_spaces("   "), "\u{2581}\u{2581}\u{2581}");
        assert_eq!(respell_spaces(" x"), " x");
        assert_eq!(respell_spaces("\n\n"), "\n\n");
    }
}
