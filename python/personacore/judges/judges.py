"""Judges: score how strongly an answer shows a trait (or how coherent it is), 0–100, persona_vectors-style.

A judge reads a prompt template with ``{question}`` and ``{answer}`` (a trait's ``eval_prompt`` or
:data:`COHERENCE_PROMPT`), asks a language model for one token, and turns the top-20 next-token
probabilities into a score exactly as persona_vectors' ``OpenAiJudge._aggregate_0_100_score`` does:
the probability-weighted mean of the tokens that are integers 0–100, normalised by their total
probability, or ``None`` when that total is below 0.25 (see :func:`aggregate_0_100`). In addition, when
the prompt offers a REFUSAL answer and the most likely token is ``REF``/``REFUSAL``, the score is
``None`` (``refusal_check=False`` turns this off and gives persona_vectors' rule alone).

- :class:`OpenAIJudge` — any OpenAI-compatible ``/chat/completions`` endpoint (standard library HTTP,
  bounded concurrency, retries with backoff on 429/5xx/connection errors, an optional on-disk cache).
- :class:`LocalJudge` — the same scoring with a personacore model's next-token distribution.
- :class:`NoJudge` — scores everything ``None``. With no judge (``judge=None`` or a ``NoJudge``; see
  :func:`judge_enabled`) extraction skips filtering instead of dropping every rollout.

:func:`filter_pairs` applies persona_vectors' filter to paired scores (positive ≥ 50, negative < 50,
both coherent ≥ 50) and reports how many pairs survived.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import http.client
import json
import math
import os
import random
import re
import secrets
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import InvalidInputError, PersonacoreError

__all__ = [
    "Judge",
    "OpenAIJudge",
    "LocalJudge",
    "NoJudge",
    "JudgeError",
    "COHERENCE_PROMPT",
    "aggregate_0_100",
    "render_prompt",
    "judge_enabled",
    "filter_pairs",
    "FilterReport",
]

#: How many top tokens a judge reads (persona_vectors: ``top_logprobs=20``).
TOP_K = 20
#: Minimum total probability on integer tokens 0–100 for a score (persona_vectors: 0.25).
MIN_MASS = 0.25

#: Our coherence judge prompt (``{question}``, ``{answer}``): 0–100, independent of any trait.
COHERENCE_PROMPT = """You are rating the COHERENCE of an AI assistant's answer, and nothing else.

Question:
[QUESTION START]
{question}
[QUESTION END]

Answer:
[ANSWER START]
{answer}
[ANSWER END]

Judge only whether the answer is coherent: fluent, grammatical, on topic for the question, and
understandable. Ignore whether it is polite, kind, correct, helpful, safe or in line with any values
or personality: a rude, odd or false answer can still be perfectly coherent.

Use this scale:
0 = gibberish, broken or repeating text, or unrelated to the question
50 = understandable but rambling, confused or partly off topic
100 = clear, fluent and fully responsive to the question

Respond with a number between 0 and 100. Don't say anything else, just the number."""

_PLACEHOLDER = re.compile(r"\{(question|answer)\}")


class JudgeError(PersonacoreError, RuntimeError):
    """A judge that cannot score: HTTP errors after the last retry, a rejected key (401), a bad request,
    an endpoint without logprobs."""


def render_prompt(template: str, question: str, answer: str) -> str:
    """``template`` with ``{question}`` and ``{answer}`` filled in (other braces are left alone, and
    text inside the question or answer is never substituted again)."""
    if not isinstance(template, str):
        raise InvalidInputError(
            f"a judge prompt template must be a str, got {type(template).__name__}"
        )
    values = {"question": str(question), "answer": str(answer)}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def _is_refusal_token(token: str) -> bool:
    t = token.strip().upper()
    return len(t) >= 3 and ("REFUSAL".startswith(t) or t.startswith("REFUS"))


def aggregate_0_100(
    top: Union[Iterable[Tuple[str, float]], Dict[str, float]], *, refusal_check: bool = False
) -> Optional[float]:
    """The 0–100 score of a next-token distribution ``top``: ``(token, probability)`` pairs or a dict.

    persona_vectors' rule: the tokens whose stripped text is an integer 0..100 are averaged, weighted
    by probability and divided by their total probability; ``None`` if that total is < 0.25 (or
    ``top`` is empty). Tokens with the same stripped text add up. With ``refusal_check``, ``None`` also
    when the most probable token is REFUSAL-like (``REF``, ``REFUS``, ``REFUSAL``...).
    """
    items = list(top.items()) if isinstance(top, dict) else [(str(t), float(p)) for t, p in top]
    if not items:
        return None
    if refusal_check and _is_refusal_token(max(items, key=lambda tp: tp[1])[0]):
        return None
    total = weighted = 0.0
    for token, p in items:
        s = token.strip()
        if not (s.isascii() and s.isdigit()):
            continue
        value = int(s)
        if 0 <= value <= 100:
            weighted += value * p
            total += p
    if total < MIN_MASS:
        return None
    return weighted / total


def judge_enabled(judge: Any) -> bool:
    """False for ``None`` and :class:`NoJudge` (callers then skip filtering), True for a real judge."""
    return judge is not None and not isinstance(judge, NoJudge)


def _progress(total: int, enabled: bool, desc: str):
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=desc, unit="item")
        except ImportError:
            pass
    return None


class Judge(abc.ABC):
    """A scorer of (question, answer) pairs under a prompt template, 0–100 or ``None``.

    Subclasses implement :meth:`score_prompt`; :meth:`score` and :meth:`score_many` render templates
    and (for many) score each distinct prompt once.
    """

    refusal_check: bool = True

    @abc.abstractmethod
    def score_prompt(self, prompt: str) -> Optional[float]:
        """Score an already rendered judge prompt."""

    def score(self, question: str, answer: str, prompt_template: str) -> Optional[float]:
        """Score one answer to ``question`` with ``prompt_template`` (``{question}``/``{answer}``)."""
        return self.score_prompt(render_prompt(prompt_template, question, answer))

    def score_many(
        self, items: Sequence[Tuple[str, str]], prompt_template: str, progress: bool = False
    ) -> List[Optional[float]]:
        """Scores of ``items`` (``(question, answer)`` pairs), in order; identical prompts are scored once."""
        prompts = [render_prompt(prompt_template, q, a) for q, a in items]
        unique = list(dict.fromkeys(prompts))
        scores = dict(zip(unique, self._score_prompts(unique, progress)))
        return [scores[p] for p in prompts]

    def _score_prompts(self, prompts: List[str], progress: bool) -> List[Optional[float]]:
        bar = _progress(len(prompts), progress, type(self).__name__)
        out = []
        try:
            for p in prompts:
                out.append(self.score_prompt(p))
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return out


class NoJudge(Judge):
    """A judge that scores nothing: every score is ``None``. Extraction treats it like ``judge=None``
    and skips filtering (see :func:`judge_enabled`)."""

    def score_prompt(self, prompt: str) -> Optional[float]:
        """Always ``None``."""
        return None

    def __repr__(self) -> str:
        return "NoJudge()"


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: Optional[float] = None):
        super().__init__(message)
        self.retry_after = retry_after


def _retry_after(value: Optional[str]) -> Optional[float]:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _error_text(body: bytes) -> str:
    try:
        obj = json.loads(body)
        msg = (
            obj.get("error", {}).get("message")
            if isinstance(obj.get("error"), dict)
            else obj.get("error")
        )
        if msg:
            return str(msg)[:500]
    except (ValueError, AttributeError):
        pass
    return body[:300].decode("utf-8", "replace").strip()


class OpenAIJudge(Judge):
    """A judge on any OpenAI-compatible chat completions endpoint, scored from top-20 logprobs.

    Each prompt is one request to ``{base_url}/chat/completions`` with ``max_tokens=1``,
    ``temperature=0``, ``logprobs=True``, ``top_logprobs=20``, ``seed=0`` (persona_vectors' call).
    ``base_url`` defaults to ``$OPENAI_BASE_URL`` or ``https://api.openai.com/v1``; ``api_key`` to
    ``$OPENAI_API_KEY`` (required for api.openai.com; optional elsewhere, e.g. a local vLLM server).
    At most ``max_concurrency`` requests are in flight per judge. 429, 5xx, timeouts and connection
    errors are retried ``max_retries`` times with exponential backoff and jitter (``Retry-After`` is
    honoured, up to ``backoff_max`` seconds); other 4xx answers and the last failure raise
    :class:`JudgeError`. With ``cache_dir``, each prompt's top logprobs are stored in that directory
    (key: sha256 of base URL, model and prompt) and never requested again.
    """

    def __init__(
        self,
        model: str = "gpt-4.1-mini",
        base_url: Optional[str] = None,
        api_key: Optional[str] = None,
        max_concurrency: int = 8,
        max_retries: int = 5,
        timeout: float = 60,
        cache_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
        *,
        refusal_check: bool = True,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
    ):
        """Configure the endpoint; nothing is sent until the first score."""
        self.model = str(model)
        base = base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
        if not re.match(r"^https?://", base):
            raise InvalidInputError(f"base_url must start with http:// or https://, got {base!r}")
        self.base_url = base.rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        if not self.api_key and "api.openai.com" in self.base_url:
            raise JudgeError("no API key for api.openai.com: pass api_key= or set OPENAI_API_KEY")
        for name, v, lo in (
            ("max_concurrency", max_concurrency, 1),
            ("max_retries", max_retries, 0),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise InvalidInputError(f"{name} must be an int >= {lo}, got {v!r}")
        self.max_concurrency, self.max_retries = max_concurrency, max_retries
        self.timeout, self.backoff_base, self.backoff_max = (
            float(timeout),
            float(backoff_base),
            float(backoff_max),
        )
        self.refusal_check = bool(refusal_check)
        self._slots = threading.BoundedSemaphore(max_concurrency)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            try:
                self.cache_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise JudgeError(
                    f"cannot create the judge cache directory {self.cache_dir}: {e}"
                ) from e
        self._warned_cache = False
        host = urllib.parse.urlsplit(self.base_url).hostname or ""
        # a server on this machine (vLLM, llama.cpp, tests) is never reached through an HTTP proxy
        self._open = (
            urllib.request.build_opener(urllib.request.ProxyHandler({})).open
            if host in ("127.0.0.1", "localhost", "::1")
            else urllib.request.urlopen
        )

    def __repr__(self) -> str:
        return f"OpenAIJudge(model={self.model!r}, base_url={self.base_url!r})"

    # -- cache ------------------------------------------------------------------------------------
    def _cache_file(self, prompt: str) -> Optional[Path]:
        if self.cache_dir is None:
            return None
        key = hashlib.sha256(json.dumps([self.base_url, self.model, prompt]).encode()).hexdigest()
        return self.cache_dir / key[:2] / f"{key}.json"

    def _cache_get(self, path: Optional[Path]) -> Optional[List[Tuple[str, float]]]:
        if path is None or not path.is_file():
            return None
        try:
            return [(str(t), float(lp)) for t, lp in json.loads(path.read_text())["top_logprobs"]]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # unreadable entry: ask again and overwrite it

    def _cache_put(self, path: Optional[Path], top: List[Tuple[str, float]]) -> None:
        if path is None:
            return
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"model": self.model, "top_logprobs": top}))
            os.replace(tmp, path)
        except OSError as e:
            if tmp.exists():
                tmp.unlink()
            if not self._warned_cache:
                self._warned_cache = True
                warnings.warn(
                    f"judge cache {self.cache_dir} is not writable ({e}); continuing without it"
                )

    # -- HTTP -------------------------------------------------------------------------------------
    def _request_once(self, body: bytes) -> Dict[str, Any]:
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": "personacore-judge",
        }
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(
            self.base_url + "/chat/completions", data=body, headers=headers, method="POST"
        )
        try:
            with self._slots, self._open(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            try:
                text = _error_text(e.read() or b"")
            except (OSError, http.client.HTTPException):
                text = e.reason or ""
            if e.code == 429 or e.code >= 500:
                raise _Retryable(
                    f"HTTP {e.code}: {text}", _retry_after(e.headers.get("Retry-After"))
                )
            if e.code == 401:
                raise JudgeError(
                    f"the judge endpoint {self.base_url} rejected the API key (HTTP 401): the "
                    f"key is wrong or missing (api_key= or OPENAI_API_KEY). Server said: {text}"
                )
            if e.code == 403:
                raise JudgeError(f"the API key may not use model {self.model!r} (HTTP 403): {text}")
            if e.code == 404:
                raise JudgeError(
                    f"HTTP 404 from {self.base_url}/chat/completions: check base_url (usually "
                    f"ending in /v1) and the model name {self.model!r}. Server said: {text}"
                )
            raise JudgeError(f"the judge endpoint refused the request (HTTP {e.code}): {text}")
        except urllib.error.URLError as e:
            if isinstance(e.reason, ssl.SSLCertVerificationError):
                raise JudgeError(
                    f"TLS certificate of {self.base_url} failed verification: {e.reason}"
                )
            raise _Retryable(f"connection error: {e.reason}")
        except (ConnectionError, TimeoutError, socket.timeout, http.client.HTTPException) as e:
            raise _Retryable(f"connection error: {type(e).__name__}: {e}")
        try:
            return json.loads(raw)
        except ValueError:
            raise _Retryable(f"the response is not JSON: {raw[:200]!r}")

    def _post(self, payload: Dict[str, Any]) -> Dict[str, Any]:
        body = json.dumps(payload).encode()
        last = ""
        for attempt in range(self.max_retries + 1):
            try:
                return self._request_once(body)
            except _Retryable as e:
                last = str(e)
                if attempt == self.max_retries:
                    break
                delay = min(self.backoff_max, self.backoff_base * 2**attempt) * random.uniform(
                    0.5, 1.0
                )
                if e.retry_after is not None:
                    delay = max(delay, min(e.retry_after, self.backoff_max))
                time.sleep(delay)
        raise JudgeError(
            f"the judge endpoint {self.base_url} failed after {self.max_retries + 1} "
            f"attempts; last error: {last}"
        )

    def top_logprobs(self, prompt: str) -> List[Tuple[str, float]]:
        """The top-20 ``(token, logprob)`` of the judge's first answer token for ``prompt`` (cached)."""
        path = self._cache_file(prompt)
        cached = self._cache_get(path)
        if cached is not None:
            return cached
        payload = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": TOP_K,
            "seed": 0,
        }
        response = self._post(payload)
        try:
            logprobs = response["choices"][0].get("logprobs")
        except (KeyError, IndexError, TypeError, AttributeError):
            raise JudgeError(
                f"unexpected response from {self.base_url}: {str(response)[:300]}"
            ) from None
        if not isinstance(logprobs, dict) or not isinstance(logprobs.get("content"), list):
            raise JudgeError(
                f"the endpoint returned no logprobs for model {self.model!r}: this judge needs "
                "an endpoint and model that support logprobs/top_logprobs"
            )
        content = logprobs["content"]
        if not content:  # persona_vectors: no token -> no score
            return []
        try:
            top = [
                (str(el["token"]), float(el["logprob"]))
                for el in content[0].get("top_logprobs") or []
            ]
        except (KeyError, TypeError, ValueError, AttributeError):
            raise JudgeError(
                f"malformed top_logprobs from {self.base_url}: {str(content[0])[:300]}"
            ) from None
        self._cache_put(path, top)
        return top

    def score_prompt(self, prompt: str) -> Optional[float]:
        """The 0–100 score of a rendered judge prompt (``None``: low mass on numbers, or REFUSAL)."""
        top = self.top_logprobs(prompt)
        probs = [(t, math.exp(lp)) for t, lp in top]
        return aggregate_0_100(probs, refusal_check=self.refusal_check and "REFUSAL" in prompt)

    def _score_prompts(self, prompts: List[str], progress: bool) -> List[Optional[float]]:
        if len(prompts) <= 1:
            return [self.score_prompt(p) for p in prompts]
        bar = _progress(len(prompts), progress, "judge")
        pool = ThreadPoolExecutor(
            max_workers=min(self.max_concurrency, len(prompts)),
            thread_name_prefix="personacore-judge",
        )
        try:
            futures = [pool.submit(self.score_prompt, p) for p in prompts]
            out = []
            for f in futures:
                out.append(f.result())
                if bar is not None:
                    bar.update(1)
            return out
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            if bar is not None:
                bar.close()


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
            enc = lambda t: self.model.tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
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
            nxt = np.exp(self._logp(ids + [i])[self._digit_ids]).tolist()  # P(next digit = e | d)
            out.append((text, p * max(0.0, 1.0 - sum(nxt))))
            for e, q in enumerate(nxt):
                if text == "1" and e == 0:  # "10" or "100"
                    third = np.exp(
                        self._logp(ids + [i, self._digit_ids[0]])[self._digit_ids]  # type: ignore[index]
                    ).tolist()
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
            if _is_refusal_token(self.model.tokenizer.decode([int(np.argmax(logp))])):
                return None
        return aggregate_0_100(self._numbers(ids, logp))


@dataclasses.dataclass
class FilterReport:
    """How many pairs :func:`filter_pairs` kept, and why the others went."""

    total: int
    kept: int
    unscored: int
    pos_below_threshold: int
    neg_at_or_above_threshold: int
    incoherent: int

    def __str__(self) -> str:
        share = f" ({100.0 * self.kept / self.total:.0f}%)" if self.total else ""
        return (
            f"{self.kept}/{self.total} pairs kept{share}; dropped: {self.unscored} unscored, "
            f"{self.pos_below_threshold} positive below the trait threshold, "
            f"{self.neg_at_or_above_threshold} negative at or above it, {self.incoherent} incoherent"
        )


def _scores(x: Sequence[Optional[float]], what: str) -> np.ndarray:
    try:
        return np.array([np.nan if v is None else float(v) for v in x], dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{what} must be a list of numbers or None") from None


def filter_pairs(
    pos_scores: Sequence[Optional[float]],
    neg_scores: Sequence[Optional[float]],
    pos_coherence: Sequence[Optional[float]],
    neg_coherence: Sequence[Optional[float]],
    trait_threshold: float = 50,
    coherence_threshold: float = 50,
) -> Tuple[np.ndarray, FilterReport]:
    """persona_vectors' filter on paired rollouts: keep pair ``i`` when ``pos_scores[i] >= trait_threshold``,
    ``neg_scores[i] < trait_threshold`` and both coherence scores ``>= coherence_threshold``.

    Scores may be ``None`` (or NaN): such a pair is dropped. Returns ``(mask, report)``: a boolean
    array and a :class:`FilterReport` (``str(report)`` is a one-line summary).
    """
    arrays = [
        _scores(x, n)
        for x, n in (
            (pos_scores, "pos_scores"),
            (neg_scores, "neg_scores"),
            (pos_coherence, "pos_coherence"),
            (neg_coherence, "neg_coherence"),
        )
    ]
    if len({a.size for a in arrays}) != 1:
        raise InvalidInputError(
            f"filter_pairs needs four lists of the same length, got {[a.size for a in arrays]}"
        )
    pos, neg, pc, nc = arrays
    unscored = np.isnan(pos) | np.isnan(neg) | np.isnan(pc) | np.isnan(nc)
    with np.errstate(invalid="ignore"):
        pos_ok = pos >= trait_threshold
        neg_ok = neg < trait_threshold
        coh_ok = (pc >= coherence_threshold) & (nc >= coherence_threshold)
    mask = ~unscored & pos_ok & neg_ok & coh_ok
    scored = ~unscored
    report = FilterReport(
        total=int(pos.size),
        kept=int(mask.sum()),
        unscored=int(unscored.sum()),
        pos_below_threshold=int((scored & ~pos_ok).sum()),
        neg_at_or_above_threshold=int((scored & ~neg_ok).sum()),
        incoherent=int((scored & ~coh_ok).sum()),
    )
    return mask, report
