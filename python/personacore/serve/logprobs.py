"""The ``logprobs`` objects of the server's replies, from the engine's per-token log-probabilities.

Chat replies use OpenAI's current layout (``{"content": [{"token", "logprob", "bytes",
"top_logprobs"}]}``), completions the legacy one (``tokens``, ``token_logprobs``, ``top_logprobs``,
``text_offset``). A token's text is the text of its bytes (:meth:`personacore.Tokenizer.token_bytes`),
or ``bytes:\\xNN...`` when they are a piece of a character split over several tokens; ``bytes``
holds them exactly, so a client can join the pieces. The values are the model's own
log-probabilities (before temperature, top-k/top-p, penalties and ``logit_bias``); JSON has no
infinity, so minus infinity is written ``-9999.0``, as vLLM does.
"""

from __future__ import annotations

import codecs
import math
from typing import Any, Dict, List, Optional, Tuple

from ..engine import TokenLogprob

#: What a log-probability of minus infinity (or NaN) is written as.
NEG_INF = -9999.0


def _value(x: float) -> float:
    return x if math.isfinite(x) else NEG_INF


class TokenTexts:
    """Token id -> (OpenAI token text, its bytes as a list of ints), cached per server."""

    def __init__(self, tokenizer: Any, cache_size: int = 1 << 17):
        self._tokenizer = tokenizer
        self._cache: Dict[int, Tuple[str, List[int]]] = {}
        self._cache_size = cache_size

    def __call__(self, token_id: int) -> Tuple[str, List[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            raw = self._tokenizer.token_bytes(token_id) or b""
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            hit = (text, list(raw))
            if len(self._cache) < self._cache_size:
                self._cache[token_id] = hit
        return hit


def chat_logprobs(lps: List[TokenLogprob], texts: TokenTexts) -> Dict[str, Any]:
    """A chat choice's ``logprobs`` for the tokens ``lps``."""
    content = []
    for lp in lps:
        text, raw = texts(lp.token_id)
        top = []
        for token_id, value in lp.top:
            t, b = texts(token_id)
            top.append({"token": t, "logprob": _value(value), "bytes": b})
        content.append(
            {"token": text, "logprob": _value(lp.logprob), "bytes": raw, "top_logprobs": top}
        )
    return {"content": content}


def prompt_logprobs_list(
    lps: List[TokenLogprob], texts: TokenTexts
) -> List[Optional[Dict[str, Dict[str, Any]]]]:
    """vLLM's ``prompt_logprobs`` of a prompt whose tokens after the first have ``lps``: null for
    the first token, then per token ``{token id: {"logprob", "rank", "decoded_token"}}`` holding
    the prompt token and the top k (rank 1 the most likely; a prompt token outside the top k has
    rank null)."""
    out: List[Optional[Dict[str, Dict[str, Any]]]] = [None]
    for lp in lps:
        ranks = {token_id: r for r, (token_id, _) in enumerate(lp.top, start=1)}
        entry = {
            str(lp.token_id): {
                "logprob": _value(lp.logprob),
                "rank": ranks.get(lp.token_id),
                "decoded_token": texts(lp.token_id)[0],
            }
        }
        for token_id, value in lp.top:
            entry.setdefault(
                str(token_id),
                {
                    "logprob": _value(value),
                    "rank": ranks[token_id],
                    "decoded_token": texts(token_id)[0],
                },
            )
        out.append(entry)
    return out


class CompletionLogprobs:
    """The legacy ``logprobs`` of one completion, built chunk by chunk.

    ``text_offset`` counts characters from the start of the reply's text (after the echoed prompt
    with ``echo``): a token that ends in the middle of a character does not move the offset until
    the piece that completes it.
    """

    def __init__(self, texts: TokenTexts, start: int = 0):
        self._texts = texts
        self._offset = start
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def _next_offset(self, raw: List[int]) -> int:
        offset = self._offset
        self._offset += len(self._decoder.decode(bytes(raw)))
        return offset

    def add_prompt(self, first: int, lps: List[TokenLogprob]) -> Dict[str, Any]:
        """The ``logprobs`` object of an echoed prompt: its first token ``first`` (which no context
        predicts: null log-probability and top), then the tokens ``lps``."""
        text, raw = self._texts(first)
        head = {
            "tokens": [text],
            "token_logprobs": [None],
            "top_logprobs": [None],
            "text_offset": [self._next_offset(raw)],
        }
        return join_logprobs(head, self.add(lps))

    def add(self, lps: List[TokenLogprob]) -> Dict[str, Any]:
        """The ``logprobs`` object of the tokens ``lps`` (the next ones of the reply)."""
        out: Dict[str, Any] = {
            "tokens": [],
            "token_logprobs": [],
            "top_logprobs": [],
            "text_offset": [],
        }
        for lp in lps:
            text, raw = self._texts(lp.token_id)
            out["tokens"].append(text)
            out["token_logprobs"].append(_value(lp.logprob))
            top: Dict[str, float] = {}
            for (
                token_id,
                value,
            ) in lp.top:  # most likely first: a text two ids share keeps the first
                top.setdefault(self._texts(token_id)[0], _value(value))
            out["top_logprobs"].append(top)
            out["text_offset"].append(self._next_offset(raw))
        return out


def join_logprobs(a: Dict[str, Any], b: Dict[str, Any]) -> Dict[str, Any]:
    """Two legacy ``logprobs`` objects of consecutive tokens as one."""
    return {key: a[key] + b[key] for key in a}
