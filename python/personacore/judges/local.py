"""A judge run by a personacore model: persona_vectors' scoring on the model's own next-token
distribution, for offline runs and tests."""

from __future__ import annotations

import math
from typing import Any, List, Optional, Tuple

import numpy as np

from ..errors import InvalidInputError
from .base import TOP_K, Judge, aggregate_0_100, is_refusal_token

__all__ = ["LocalJudge"]


class LocalJudge(Judge):
    """A judge run by a personacore model: the same scoring on the model's own next-token distribution.

    The prompt is rendered as one user message with the model's chat template; the top-20 tokens of
    the next-token softmax are decoded one by one, stripped, and scored by :func:`aggregate_0_100`.

    ``numbers`` says how numbers are read. ``"token"``: persona_vectors' rule as is, one token = one
    number (right for tokenizers with whole-number tokens, like OpenAI's and Llama 3's). ``"digits"``:
    for tokenizers that split numbers into digits (SmolLM2, Qwen2), where the first token alone would
    read "85" as 8, each single-digit token among the top 20 whose probability is at least
    ``expand_min`` is followed by one more forward pass to get the probabilities of the next digit
    (and of a third one after "10", for 100), so the scored distribution is over whole numbers 0–100;
    digits below ``expand_min`` count as one-digit numbers. ``"auto"`` (default) picks ``"token"`` when
    ``"50"`` and ``"100"`` are single tokens, else ``"digits"``. Prompts are scored one at a time; the
    digit mode costs up to ~10 forward passes per prompt. A small model is a weak judge: use it for
    offline runs and tests.
    """

    def __init__(
        self,
        model: Any,
        *,
        top_k: int = TOP_K,
        refusal_check: bool = True,
        numbers: str = "auto",
        expand_min: float = 0.01,
    ):
        """Wrap a loaded :class:`~personacore.Model`."""
        if numbers not in ("auto", "token", "digits"):
            raise InvalidInputError(f"numbers must be 'auto', 'token' or 'digits', got {numbers!r}")
        self.model = model
        self.top_k = int(top_k)
        self.refusal_check = bool(refusal_check)
        self.numbers = numbers
        self.expand_min = float(expand_min)
        self._digit_ids: Optional[List[int]] = None

    def __repr__(self) -> str:
        return (
            f"LocalJudge(model={getattr(self.model, 'path', None) or type(self.model).__name__!r})"
        )

    def _mode(self) -> str:
        if self._digit_ids is None:

            def enc(text: str) -> List[int]:
                return self.model.tokenizer.encode(text, add_special_tokens=False)

            digits = [enc(str(d)) for d in range(10)]
            self._digit_ids = [d[0] for d in digits] if all(len(d) == 1 for d in digits) else []
            whole = len(enc("50")) == 1 and len(enc("100")) == 1
            self._auto = "token" if whole or not self._digit_ids else "digits"
        if self.numbers == "digits" and not self._digit_ids:
            raise InvalidInputError(
                "numbers='digits' needs a tokenizer with one token per digit 0-9"
            )
        return self._auto if self.numbers == "auto" else self.numbers

    def _logp(self, ids: List[int]) -> np.ndarray:
        logits = np.asarray(self.model.logits(ids)[-1], dtype=np.float64)
        m = logits.max()
        return logits - (m + np.log(np.exp(logits - m).sum()))

    def _top(self, logp: np.ndarray) -> List[int]:
        k = min(self.top_k, logp.size)
        idx = np.argpartition(-logp, k - 1)[:k]
        return [int(i) for i in idx[np.argsort(-logp[idx], kind="stable")]]

    def _ids(self, prompt: str) -> List[int]:
        return list(self.model.encode_chat([{"role": "user", "content": prompt}]))

    def top_logprobs(self, prompt: str) -> List[Tuple[str, float]]:
        """The top-k ``(decoded token, logprob)`` of the model's next token after ``prompt``."""
        logp = self._logp(self._ids(prompt))
        return [(self.model.tokenizer.decode([i]), float(logp[i])) for i in self._top(logp)]

    def number_probs(self, prompt: str) -> List[Tuple[str, float]]:
        """``(text, probability)`` pairs that :meth:`score_prompt` aggregates: the top-k first tokens,
        with single digits expanded into whole numbers in the ``"digits"`` mode."""
        ids = self._ids(prompt)
        return self._numbers(ids, self._logp(ids))

    def _numbers(self, ids: List[int], logp: np.ndarray) -> List[Tuple[str, float]]:
        decode = self.model.tokenizer.decode
        digits_mode = self._mode() == "digits"
        digit_ids = self._digit_ids or []  # set by _mode()
        out: List[Tuple[str, float]] = []
        for i in self._top(logp):
            text, p = decode([i]).strip(), math.exp(float(logp[i]))
            if not (
                digits_mode
                and len(text) == 1
                and text.isdigit()
                and text != "0"
                and p >= self.expand_min
            ):
                out.append((text, p))
                continue
            nxt = np.exp(self._logp(ids + [i])[digit_ids]).tolist()  # P(next digit = e | d)
            out.append((text, p * max(0.0, 1.0 - sum(nxt))))
            for e, q in enumerate(nxt):
                if text == "1" and e == 0:  # "10" or "100"
                    third = np.exp(self._logp(ids + [i, digit_ids[0]])[digit_ids]).tolist()
                    out.append(("100", p * q * third[0]))
                    out.append(("10", p * q * max(0.0, 1.0 - sum(third))))
                else:
                    out.append((text + str(e), p * q))
        return out

    def score_prompt(self, prompt: str) -> Optional[float]:
        """The 0–100 score of a rendered judge prompt (``None``: low mass on numbers, or REFUSAL)."""
        ids = self._ids(prompt)
        logp = self._logp(ids)
        if self.refusal_check and "REFUSAL" in prompt:
            if is_refusal_token(self.model.tokenizer.decode([int(np.argmax(logp))])):
                return None
        return aggregate_0_100(self._numbers(ids, logp))
