//! The bytes one token stands for, so that a caller given per-token pieces (OpenAI's `logprobs`
//! `bytes`) can rebuild a character split over several tokens: decoding a single token gives
//! U+FFFD for a partial character, its bytes do not lose it.

use std::collections::HashMap;
use std::sync::OnceLock;

use tokenizers::DecoderWrapper;

/// GPT-2's byte-level alphabet read backwards: the character that stands for each byte in a
/// byte-level BPE vocabulary → the byte (printable Latin-1 bytes stand for themselves, the other
/// 68 bytes for U+0100 onwards, in order).
fn byte_of_char() -> &'static HashMap<char, u8> {
    static TABLE: OnceLock<HashMap<char, u8>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let mut next = 256u32;
        (0..=255u8)
            .map(|b| {
                let c = if printable(b) {
                    char::from(b)
                } else {
                    next += 1;
                    char::from_u32(next - 1).unwrap_or(char::REPLACEMENT_CHARACTER)
                };
                (c, b)
            })
            .collect()
    })
}

/// Whether `decoder` is, or contains, a decoder matching `pred`.
fn has_decoder(decoder: Option<&DecoderWrapper>, pred: &dyn Fn(&DecoderWrapper) -> bool) -> bool {
    match decoder {
        Some(DecoderWrapper::Sequence(seq)) => seq.get_decoders().iter().any(|d| has_decoder(Some(d), pred)),
        Some(d) => pred(d),
        None => false,
    }
}

/// A `<0xNN>` byte-fallback token's byte.
fn fallback_byte(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() == 2 {
        u8::from_str_radix(hex, 16).ok()
    } else {
        None
    }
}

/// The bytes of token `id` of `inner` (`None` for an id it does not know): an added token's
/// content; a byte-level BPE token's characters mapped back to bytes; a `<0xNN>` byte-fallback
/// token's byte; otherwise the vocabulary string with SentencePiece's `▁` read as a space.
pub fn token_bytes(inner: &tokenizers::Tokenizer, id: u32) -> Option<Vec<u8>> {
    if let Some(added) = inner.get_added_tokens_decoder().get(&id) {
        return Some(added.content.as_bytes().to_vec());
    }
    let token = inner.id_to_token(id)?;
    let decoder = inner.get_decoder();
    if has_decoder(decoder, &|d| matches!(d, DecoderWrapper::ByteLevel(_))) {
        let table = byte_of_char();
        if let Some(bytes) = token.chars().map(|c| table.get(&c).copied()).collect::<Option<Vec<u8>>>() {
            return Some(bytes);
        }
    }
    if has_decoder(decoder, &|d| matches!(d, DecoderWrapper::ByteFallback(_))) {
        if let Some(b) = fallback_byte(&token) {
            return Some(vec![b]);
        }
    }
    Some(token.replace('\u{2581}', " ").into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::testdata::gguf_content;
    use crate::tokenizer::Tokenizer;

    #[test]
    fn pieces_rebuild_the_text_byte_for_byte() {
        let tok = Tokenizer::from_gguf(&gguf_content()).expect("build tokenizer from GGUF");
        for text in ["Hello, world!", "naïve café — “quotes”", "日本語のテキスト 🙂🚀", "  tabs\tand\nnewlines  "]
        {
            let ids = tok.encode(text, false).expect("encode");
            let bytes: Vec<u8> = ids.iter().flat_map(|&id| tok.token_bytes(id).expect("known id")).collect();
            assert_eq!(bytes, text.as_bytes(), "{text:?}");
        }
        // a split character: each piece alone is not valid UTF-8, the pieces together are
        let ids = tok.encode("🙂", false).expect("encode");
        assert!(ids.len() > 1 && ids.iter().all(|&i| std::str::from_utf8(&tok.token_bytes(i).expect("id")).is_err()));
        let im_start = tok.token_to_id("<|im_start|>").expect("special token");
        assert_eq!(tok.token_bytes(im_start).expect("id"), b"<|im_start|>");
        assert_eq!(tok.token_bytes(u32::MAX), None);
    }

    #[test]
    fn byte_fallback_tokens_are_their_byte() {
        assert_eq!(fallback_byte("<0xE2>"), Some(0xE2));
        assert_eq!(fallback_byte("<0xE>"), None);
        assert_eq!(fallback_byte("0xE2"), None);
        assert_eq!(byte_of_char().len(), 256);
        assert_eq!(byte_of_char()[&'\u{120}'], b' ');
    }
}
