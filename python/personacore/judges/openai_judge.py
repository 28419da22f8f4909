"""A judge on any OpenAI-compatible ``/chat/completions`` endpoint, through the official ``openai`` SDK
(the optional extra ``personacore[judge]``).

The SDK does the HTTP: connection reuse, timeouts, retries with exponential backoff and jitter on
408/409/429/5xx and connection errors, ``Retry-After``. This module adds persona_vectors' request
(one token, top-20 logprobs), the scoring of :mod:`.base`, a bound on requests in flight, an on-disk
cache, and errors that say what to fix.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, List, Optional, Tuple, Union

from tqdm.auto import tqdm

from ..errors import InvalidInputError
from .base import TOP_K, Judge, JudgeError, aggregate_0_100

__all__ = ["OpenAIJudge"]


def _openai():
    try:
        import openai
    except ImportError:
        raise JudgeError(
            "OpenAIJudge needs the openai package: pip install 'personacore[judge]' "
            "(or pip install openai)"
        ) from None
    return openai


def _server_said(e: Any) -> str:
    """The error message in an API error's body (``{"error": {"message": ...}}`` or a string)."""
    body = getattr(e, "body", None)
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])[:500]
    if isinstance(body, str) and body:
        return body[:500]
    return str(getattr(e, "message", e))[:500]


class OpenAIJudge(Judge):
    """A judge on any OpenAI-compatible chat completions endpoint, scored from top-20 logprobs.

    Each prompt is one request to ``{base_url}/chat/completions`` with ``max_tokens=1``,
    ``temperature=0``, ``logprobs=True``, ``top_logprobs=20``, ``seed=0`` (persona_vectors' call),
    sent by an ``openai.OpenAI`` client. ``base_url`` defaults to ``$OPENAI_BASE_URL`` or
    ``https://api.openai.com/v1``; ``api_key`` to ``$OPENAI_API_KEY`` (required for api.openai.com;
    elsewhere, e.g. a local vLLM server, it may be left out and the placeholder ``EMPTY`` is sent).
    At most ``max_concurrency`` requests are in flight per judge. The SDK retries 408/409/429/5xx
    answers and connection errors ``max_retries`` times (exponential backoff, ``Retry-After``
    honoured up to a minute) and gives up after ``timeout`` seconds per request; other 4xx answers
    and the last failure raise :class:`JudgeError`. With ``cache_dir``, each prompt's top logprobs
    are stored in that directory (key: sha256 of base URL, model and prompt) and never requested
    again. Needs the ``openai`` package (``pip install 'personacore[judge]'``).
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
    ):
        """Configure the endpoint; nothing is sent until the first score."""
        openai = _openai()
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
        self.timeout = float(timeout)
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
        self._errors = openai
        self._client = openai.OpenAI(
            base_url=self.base_url,
            api_key=self.api_key or "EMPTY",
            max_retries=max_retries,
            timeout=self.timeout,
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
                    f"judge cache {self.cache_dir} is not writable ({e}); continuing without it",
                    stacklevel=2,
                )

    # -- requests ---------------------------------------------------------------------------------
    def _complete(self, prompt: str) -> Any:
        """One chat completion (the SDK retries), with the SDK's errors turned into JudgeErrors."""
        err = self._errors
        try:
            with self._slots:
                return self._client.chat.completions.create(
                    model=self.model,
                    messages=[{"role": "user", "content": prompt}],
                    max_tokens=1,
                    temperature=0,
                    logprobs=True,
                    top_logprobs=TOP_K,
                    seed=0,
                )
        except err.AuthenticationError as e:
            raise JudgeError(
                f"the judge endpoint {self.base_url} rejected the API key (HTTP 401): the key is "
                f"wrong or missing (api_key= or OPENAI_API_KEY). Server said: {_server_said(e)}"
            ) from e
        except err.PermissionDeniedError as e:
            raise JudgeError(
                f"the API key may not use model {self.model!r} (HTTP 403): {_server_said(e)}"
            ) from e
        except err.NotFoundError as e:
            raise JudgeError(
                f"HTTP 404 from {self.base_url}/chat/completions: check base_url (usually ending "
                f"in /v1) and the model name {self.model!r}. Server said: {_server_said(e)}"
            ) from e
        except (err.RateLimitError, err.InternalServerError, err.APIConnectionError) as e:
            if isinstance(e, err.APIStatusError):
                last = f"HTTP {e.status_code}: {_server_said(e)}"
            elif isinstance(e, err.APITimeoutError):
                last = f"timed out after {self.timeout:g} s"
            else:
                last = f"connection error: {e.__cause__ or e}"
            raise JudgeError(
                f"the judge endpoint {self.base_url} failed (retried up to {self.max_retries} "
                f"times); last error: {last}"
            ) from e
        except err.APIStatusError as e:
            raise JudgeError(
                f"the judge endpoint refused the request (HTTP {e.status_code}): {_server_said(e)}"
            ) from e
        except (err.OpenAIError, ValueError) as e:  # ValueError: a body that is not JSON
            raise JudgeError(f"unexpected response from {self.base_url}: {e}") from e

    def top_logprobs(self, prompt: str) -> List[Tuple[str, float]]:
        """The top-20 ``(token, logprob)`` of the judge's first answer token for ``prompt`` (cached)."""
        path = self._cache_file(prompt)
        cached = self._cache_get(path)
        if cached is not None:
            return cached
        response = self._complete(prompt)
        try:
            logprobs = response.choices[0].logprobs
        except (AttributeError, IndexError, TypeError):
            raise JudgeError(
                f"unexpected response from {self.base_url}: {str(response)[:300]}"
            ) from None
        content = getattr(logprobs, "content", None)
        if not isinstance(content, list):
            raise JudgeError(
                f"the endpoint returned no logprobs for model {self.model!r}: this judge needs "
                "an endpoint and model that support logprobs/top_logprobs"
            )
        if not content:  # persona_vectors: no token -> no score
            return []
        try:
            top = [(str(el.token), float(el.logprob)) for el in content[0].top_logprobs or []]
        except (AttributeError, TypeError, ValueError):
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
        with ThreadPoolExecutor(
            max_workers=min(self.max_concurrency, len(prompts)),
            thread_name_prefix="personacore-judge",
        ) as pool:
            futures = [pool.submit(self.score_prompt, p) for p in prompts]
            try:
                bar = tqdm(futures, desc="judge", unit="item", disable=not progress)
                return [f.result() for f in bar]
            finally:
                for f in futures:
                    f.cancel()
