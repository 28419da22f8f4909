"""The OpenAI-compatible HTTP app of ``personacore serve``: :func:`create_app`.

One :class:`~personacore.Engine` (continuous batching, its own thread) serves every request; each
request is admitted (limits below), converted to token ids (chat prompts through the model's chat
template), submitted with its own steering, monitor and alert policy, and answered as one JSON
body or as server-sent events (``data: {...}`` chunks, then ``data: [DONE]``). Every reply and every
chunk carries a ``persona`` object (:class:`~personacore.serve.schemas.PersonaInfo`).

The app keeps no state between requests (the engine's KV cache slots are freed when a request
ends), so it replicates: :mod:`personacore.serve.ray` runs it as a Ray Serve deployment.

Safe by default: ``/v1/*`` needs ``Authorization: Bearer <api_key>`` when an ``api_key`` is set
(compared in constant time); bodies over ``max_body_bytes`` get 413, ``max_tokens`` over
``max_tokens_limit`` or a prompt that does not fit the context 400, more than
``max_batch + max_queued`` requests in flight or more than ``max_streams`` open streams 429. A
client that disconnects cancels its request, which frees its slot at the engine's next step. A
client that sends its body too slowly (the whole body within ``body_timeout`` seconds) gets 408 and
the connection is closed; one that stops reading the reply (a send blocked for ``send_timeout``
seconds) has its request cancelled, its place freed and its connection closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import os
import re
import secrets
import sys
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any, AsyncIterator, Dict, List, Mapping, Optional, Tuple, Type, TypeVar, Union

import numpy as np
import orjson
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..engine import Event, Generation, Model, Step, TokenLogprob, load_model
from ..errors import InvalidInputError
from ..steering import Ablate, Cap, Monitor, Steer, When
from ..vectors import PersonaVector
from ..vectors.calibration import CalibrationMissingError
from ..vectors.calibration import auto_threshold as calibrated_threshold
from . import errors
from .errors import APIError
from .logprobs import CompletionLogprobs, TokenTexts, chat_logprobs
from .metrics import CONTENT_TYPE, Metrics, stats_dict
from .schemas import (
    MAX_TOP_LOGPROBS,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    MonitorBody,
    PersonaInfo,
    SteerBody,
    TokenizeRequest,
    TokenizeResponse,
    Usage,
    VectorCard,
    VectorList,
)

__all__ = ["ServeOptions", "auto_threshold", "create_app", "load_vectors", "REPLICA_HEADER"]

_LOG = logging.getLogger("personacore.serve")

#: response header naming the replica (process) that answered
REPLICA_HEADER = "x-personacore-replica"

#: the routes counted by name in ``personacore_requests_total`` (any other path is "other")
_ENDPOINTS = frozenset(
    [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/v1/vectors",
        "/tokenize",
        "/detokenize",
        "/health",
        "/metrics",
    ]
)

#: engine finish reasons -> OpenAI's (a stop string and the end-of-sequence token are both "stop")
_FINISH = {"eos": "stop", "stop": "stop", "length": "length", "content_filter": "content_filter"}


@dataclasses.dataclass
class ServeOptions:
    """Limits and settings of a server.

    ``model_name`` is the id in ``/v1/models`` (default: the model file's stem); requests naming
    another model get 404. ``default_max_tokens`` (capped by ``max_tokens_limit``) is used when a
    request gives none.
    ``max_prompt_tokens`` defaults to the model's context. ``replica_id`` is sent in the
    ``x-personacore-replica`` header (default: host and process id). ``body_timeout``: seconds a
    client has to send its whole request body (then 408); ``send_timeout``: seconds one write of the
    reply may wait for a client that does not read (then the request is cancelled and the
    connection closed). uvicorn itself closes idle keep-alive connections (``timeout_keep_alive``).
    """

    api_key: Optional[str] = None
    model_name: Optional[str] = None
    max_batch: int = 16
    max_queued: int = 64
    max_streams: int = 64
    max_body_bytes: int = 1 << 20
    max_tokens_limit: int = 2048
    default_max_tokens: int = 256
    max_prompt_tokens: Optional[int] = None
    replica_id: Optional[str] = None
    body_timeout: float = 30.0
    send_timeout: float = 30.0


# ---- vectors ---------------------------------------------------------------------------------------
def load_vectors(
    model: Model, vectors: Optional[Mapping[str, Union[PersonaVector, str, "os.PathLike[str]"]]]
) -> Dict[str, PersonaVector]:
    """``{name: PersonaVector}`` from vectors or paths (``.safetensors``/``.pt``/``.gguf``).

    Each vector is named by its key and must fit ``model`` (``num_layers + 1`` rows of width
    ``hidden_size``) and, when its metadata records the model it was extracted from, be that model
    (:class:`~personacore.ModelMismatchError`); a mismatch raises at start, not at the first
    request. A bare name such as ``"impolite"`` is a built-in vector of the default model.
    """
    out: Dict[str, PersonaVector] = {}
    for name, v in (vectors or {}).items():
        if isinstance(v, PersonaVector):
            vec = PersonaVector(v.directions, layer=v.layer, name=name, metadata=v.metadata)
        else:
            vec = PersonaVector.load(v, name=name, num_layers=model.num_layers)
        if vec.shape != (model.num_layers + 1, model.hidden_size):
            raise InvalidInputError(
                f"vector {name!r} has shape {vec.shape}; the model needs "
                f"{(model.num_layers + 1, model.hidden_size)}"
            )
        vec.check_model(model)
        out[name] = vec
    return out


def auto_threshold(vec: PersonaVector) -> Optional[float]:
    """The alert threshold ``"auto"`` uses, or None when the vector stores no statistics.

    The same number as ``pc.Monitor(..., thresholds="auto")``:
    :func:`personacore.vectors.calibration.auto_threshold` (its rule and why are documented there),
    at the vector's recommended layer; it applies at every layer the monitor watches for that
    vector.
    """
    try:
        return calibrated_threshold(vec)
    except CalibrationMissingError:
        return None


# ---- middleware ------------------------------------------------------------------------------------
class _SendTimeout(Exception):
    """A write of the reply waited longer than ``send_timeout``: the client is not reading."""


class _SendWatch:
    """``send`` of one response, ended with :class:`_SendTimeout` when a write waits longer
    than ``timeout`` seconds (the client stopped reading and the transport's buffer is full).

    One timer per response, re-armed only when it fires, instead of a timer per write: a stream
    writes a chunk per token, and ``asyncio.timeout`` around each one was a quarter of the event
    loop's work per token (py-spy of a served stream). When the timer finds a write pending for
    ``timeout`` seconds it cancels the writing task, and that write raises :class:`_SendTimeout`.
    """

    def __init__(self, send: Send, timeout: float):
        self.send, self.timeout = send, timeout
        self.loop = asyncio.get_running_loop()
        self.since: Optional[float] = None  # when the pending write started, if one is pending
        self.writer: Optional["asyncio.Task[Any]"] = None
        self.timer: Optional[asyncio.TimerHandle] = None
        self.expired = False

    async def __call__(self, message: Message) -> None:
        self.writer = asyncio.current_task()
        self.since = self.loop.time()
        if self.timer is None:
            self.timer = self.loop.call_later(self.timeout, self._check)
        try:
            await self.send(message)
        except asyncio.CancelledError:
            if not self.expired or self.writer is None:
                raise
            if sys.version_info >= (3, 11):
                self.writer.uncancel()
            raise _SendTimeout() from None
        finally:
            self.since = None

    def _check(self) -> None:
        self.timer = None
        if self.since is None or self.writer is None:
            return  # no write pending: the next one arms the timer again
        waited = self.loop.time() - self.since
        if waited < self.timeout:
            self.timer = self.loop.call_later(self.timeout - waited, self._check)
            return
        self.expired = True
        self.writer.cancel()

    def close(self) -> None:
        """Drop the timer (the response is over)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


def _holds(exc: BaseException, cls: Type[BaseException]) -> bool:
    """Whether ``exc`` is a ``cls`` or an exception group (anyio's task groups) holding one."""
    if isinstance(exc, cls):
        return True
    return any(_holds(e, cls) for e in getattr(exc, "exceptions", ()) or ())


class _Guard:
    """ASGI middleware: the body-size limit (413), the body and send timeouts (408; closing a
    connection whose client stops reading), the replica header, and request counting."""

    def __init__(
        self,
        app: ASGIApp,
        limit: int,
        replica: str,
        metrics: Metrics,
        body_timeout: float = 30.0,
        send_timeout: float = 30.0,
    ):
        self.app, self.limit, self.replica, self.metrics = app, limit, replica, metrics
        self.body_timeout, self.send_timeout = body_timeout, send_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}
        watched = _SendWatch(send, self.send_timeout)

        async def send_wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [
                    (REPLICA_HEADER.encode(), self.replica.encode())
                ]
            await watched(message)

        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        body_done = False
        try:
            headers = dict(scope.get("headers") or [])
            declared = headers.get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.limit:
                await errors.error_response(self._too_large())(scope, receive, send_wrapped)
                return
            seen = 0

            async def receive_limited() -> Message:
                nonlocal seen, body_done
                if body_done:  # after the body: waiting for a disconnect, no deadline
                    return await receive()
                try:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    raise APIError(
                        408,
                        f"the request body did not arrive within {self.body_timeout:g} s",
                        code="body_timeout",
                        headers={"connection": "close"},
                    ) from None
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > self.limit:
                        raise self._too_large()
                    body_done = not message.get("more_body", False)
                else:
                    body_done = True
                return message

            await self.app(scope, receive_limited, send_wrapped)
        except Exception as e:
            if not _holds(e, _SendTimeout):
                raise
            # the reply was started: all that is left is to let uvicorn close the connection
            _LOG.warning(
                "closing %s %s: the client read nothing for %g s",
                scope.get("method"),
                scope.get("path"),
                self.send_timeout,
            )
        finally:
            watched.close()
            path = scope.get("path", "")
            self.metrics.count_request(path if path in _ENDPOINTS else "other", status["code"])

    def _too_large(self) -> APIError:
        return APIError(
            413, f"the request body is larger than {self.limit} bytes", code="body_too_large"
        )


# ---- the server ------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Prepared:
    """A request turned into what :meth:`Engine.submit` takes, plus what the reply reports."""

    rid: str
    prompt_ids: List[int]
    max_tokens: int
    kwargs: Dict[str, Any]
    thresholds: Optional[Dict[str, float]]
    layers: Dict[str, List[int]]
    include_usage: bool = False
    #: top log-probabilities per token (0 to 20), or None when the request asked for none
    top: Optional[int] = None
    #: the prompt's text, sent before the reply (completions with ``echo``)
    echo: str = ""


def _content(content: Union[str, List[Dict[str, Any]], None]) -> str:
    """A message's text: a string, or the text parts of a list of parts joined."""
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for k, part in enumerate(content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(
                400,
                "only text content parts are supported",
                param=f"content[{k}]",
                code="unsupported_content",
            )
        parts.append(part["text"])
    return "".join(parts)


def _messages(messages: List[ChatMessage]) -> List[Dict[str, str]]:
    """Chat messages as the chat template takes them (text content only, see :func:`_content`)."""
    return [{"role": m.role, "content": _content(m.content)} for m in messages]


def _events(events: List[Event]) -> List[Dict[str, Any]]:
    return [e.to_dict() for e in events]


def _refuse_unsupported(req: Union[ChatCompletionRequest, CompletionRequest]) -> None:
    """A 400 naming a field that would change the reply and that this server does not implement."""
    if isinstance(req, ChatCompletionRequest):
        fmt = (req.response_format or {}).get("type", "text")
        unsupported = {
            "response_format": fmt != "text",
            "tools": bool(req.tools),
            "tool_choice": req.tool_choice not in (None, "none"),
            "functions": bool(req.functions),
            "function_call": req.function_call not in (None, "none"),
        }
    else:
        unsupported = {
            "best_of": req.best_of not in (None, 1),
            "suffix": bool(req.suffix),
            "echo": req.echo and req.logprobs is not None,  # the prompt's logprobs: not computed
        }
    for name, refused in unsupported.items():
        if refused:
            what = "echo with logprobs" if name == "echo" else name
            raise APIError(
                400, f"{what} is not supported by this server", param=name, code="unsupported"
            )


def _top_logprobs(req: Union[ChatCompletionRequest, CompletionRequest]) -> Optional[int]:
    """How many top log-probabilities each token reports; None when none were asked for."""
    if isinstance(req, ChatCompletionRequest):
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(
                400,
                "top_logprobs needs logprobs=true",
                param="top_logprobs",
                code="invalid_value",
            )
        top, param = (req.top_logprobs or 0) if req.logprobs else None, "top_logprobs"
    else:
        top, param = req.logprobs, "logprobs"
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise APIError(
            400,
            f"{param} must be in 0..{MAX_TOP_LOGPROBS}, got {top}",
            param=param,
            code="invalid_value",
        )
    return top


#: How many kinds of monitor (vectors, layers, thresholds) a server keeps built for reuse.
MONITOR_CACHE = 64


class _Server:
    """The state of one app: the model, the engine, the named vectors, the limits, the counters."""

    def __init__(
        self, model: Model, vectors: Dict[str, PersonaVector], engine: Any, opts: ServeOptions
    ):
        self.model, self.vectors, self.engine, self.opts = model, vectors, engine, opts
        self.name = opts.model_name or os.path.splitext(os.path.basename(str(model.path)))[0]
        self.context = int(model.max_position_embeddings)
        self.max_prompt = min(opts.max_prompt_tokens or self.context, self.context)
        self.metrics = Metrics()
        self.created = int(time.time())
        self.token_texts = TokenTexts(model.tokenizer)
        # Monitors built for requests, by what they monitor: clients that ask for the same thing
        # share one (its vectors converted and laid out once, see MonitorSpec._prepared).
        self._monitors: "OrderedDict[Any, Tuple[Monitor, Dict[str, List[int]]]]" = OrderedDict()
        self._monitors_lock = threading.Lock()

    # -- building a request -------------------------------------------------------------------------
    def check_model(self, name: Optional[str]) -> None:
        """A 404 when a request names a model other than this server's."""
        if name is not None and name != self.name:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {self.name!r}",
                param="model",
                code="model_not_found",
            )

    def vector(self, name: str, param: str) -> PersonaVector:
        """A loaded vector by name, or a 400 naming the field."""
        if name not in self.vectors:
            known = ", ".join(sorted(self.vectors)) or "none loaded"
            raise APIError(
                400,
                f"unknown vector {name!r} (loaded: {known})",
                param=param,
                code="vector_not_found",
            )
        return self.vectors[name]

    def steers(self, bodies: Optional[List[SteerBody]]) -> List[Any]:
        """The request's ``steer`` list as :class:`Steer`/:class:`Ablate`/:class:`Cap` objects."""
        out: List[Any] = []
        for k, b in enumerate(bodies or []):
            vec = self.vector(b.vector, f"steer[{k}].vector")
            when = None
            if b.when is not None:
                self.vector(b.when.vector, f"steer[{k}].when.vector")
                w = b.when
                when = When(
                    w.vector,
                    above=w.above,
                    below=w.below,
                    hysteresis=w.hysteresis,
                    layer=w.layer,
                    min_on=w.min_on,
                    min_off=w.min_off,
                    mode=w.mode,
                    gain=w.gain,
                )
            label = f"{b.kind}:{b.vector}"
            if b.kind == "add":
                if b.coef is None:
                    raise APIError(
                        400,
                        "an 'add' steer needs a coef",
                        param=f"steer[{k}].coef",
                        code="missing_coef",
                    )
                out.append(Steer(vec, b.coef, b.layers, b.positions, when, label))
            elif b.kind == "ablate":
                out.append(Ablate(vec, b.layers, b.positions, when, label))
            else:
                out.append(Cap(vec, b.layers, b.min, b.max, b.positions, when, label))
        return out

    def monitor(
        self, body: Optional[MonitorBody], steers: List[SteerBody]
    ) -> Tuple[Optional[Monitor], Optional[Dict[str, float]], Dict[str, List[int]]]:
        """The request's monitor, the thresholds it uses and the layers of each vector; vectors a
        ``when`` reads are added. Requests that monitor the same vectors, layers and thresholds
        get the same :class:`Monitor` (the last :data:`MONITOR_CACHE` kinds are kept)."""
        wanted = [s.when.vector for s in steers if s.when is not None]
        if body is None and not wanted:
            return None, None, {}
        body = body or MonitorBody()
        names = list(body.vectors) if body.vectors is not None else list(self.vectors)
        names += [n for n in wanted if n not in names]
        vecs = {n: self.vector(n, f"monitor.vectors[{k}]") for k, n in enumerate(names)}
        if not vecs:
            raise APIError(
                400, "no vector to monitor: the server loaded none", param="monitor.vectors"
            )
        layers: Any = None if body.layers == "recommended" else body.layers
        thresholds: Optional[Dict[str, float]] = None
        if body.thresholds == "auto":
            thresholds = {}
            for n, v in vecs.items():
                t = auto_threshold(v)
                if t is None:
                    raise APIError(
                        400,
                        f"vector {n!r} stores no statistics at a recommended layer: give thresholds as numbers",
                        param="monitor.thresholds",
                        code="no_vector_stats",
                    )
                thresholds[n] = t
        elif isinstance(body.thresholds, dict):
            for n in body.thresholds:
                self.vector(n, "monitor.thresholds")
            thresholds = dict(body.thresholds)
        elif body.thresholds is not None:
            thresholds = {n: float(body.thresholds) for n in vecs}
        key = (tuple(vecs), repr(layers), repr(thresholds))
        with self._monitors_lock:
            hit = self._monitors.get(key)
            if hit is not None:
                self._monitors.move_to_end(key)
        if hit is None:
            mon = Monitor(vecs, layers=layers, thresholds=thresholds)
            hit = (mon, mon.layers_for(self.model))
            with self._monitors_lock:
                self._monitors[key] = hit
                while len(self._monitors) > MONITOR_CACHE:
                    self._monitors.popitem(last=False)
        return hit[0], thresholds, hit[1]

    def prepare(
        self, req: Union[ChatCompletionRequest, CompletionRequest], prompt_ids: List[int], rid: str
    ) -> _Prepared:
        """Check the limits and build the engine arguments of one request."""
        self.check_model(req.model)
        if req.n != 1:
            raise APIError(400, "only n=1 is supported", param="n", code="unsupported")
        _refuse_unsupported(req)
        top = _top_logprobs(req)
        max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens
        if max_tokens is None:
            max_tokens = min(self.opts.default_max_tokens, self.opts.max_tokens_limit)
        if not 1 <= max_tokens <= self.opts.max_tokens_limit:
            raise APIError(
                400,
                f"max_tokens must be in 1..{self.opts.max_tokens_limit}, got {max_tokens}",
                param="max_tokens",
                code="max_tokens_out_of_range",
            )
        n = len(prompt_ids)
        if n > self.max_prompt or n + max_tokens > self.context:
            raise APIError(
                400,
                f"the prompt has {n} tokens and max_tokens is {max_tokens}: more than the limit of "
                f"{self.max_prompt} prompt tokens or the context of {self.context}",
                param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
                code="context_length_exceeded",
            )
        steers = self.steers(req.steer)
        monitor, thresholds, layers = self.monitor(req.monitor, req.steer or [])
        kwargs = {
            "max_new_tokens": max_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "top_k": req.top_k,
            "seed": req.seed if req.seed is not None else secrets.randbits(31),
            "stop": req.stop,
            "ignore_eos": req.ignore_eos,
            "steer": steers or None,
            "monitor": monitor,
            "on_alert": req.on_alert,
            "request_id": rid,
            "logprobs": top,
            "logit_bias": req.logit_bias,
            "presence_penalty": req.presence_penalty,
            "frequency_penalty": req.frequency_penalty,
        }
        include_usage = bool(req.stream and (req.stream_options or {}).get("include_usage"))
        echo = ""
        if isinstance(req, CompletionRequest) and req.echo:
            echo = (
                req.prompt
                if isinstance(req.prompt, str)
                else self.model.tokenizer.decode(req.prompt)
            )
        return _Prepared(
            rid, prompt_ids, max_tokens, kwargs, thresholds, layers, include_usage, top, echo
        )

    # -- admission ----------------------------------------------------------------------------------
    def admit(self, stream: bool) -> None:
        """Take a place among the requests in flight (and the open streams); 429 when full."""
        m = self.metrics
        if m.in_flight >= self.opts.max_batch + self.opts.max_queued:
            raise APIError(
                429,
                f"too many requests in flight ({m.in_flight}); retry later",
                code="queue_full",
                headers={"retry-after": "1"},
            )
        if stream and m.streams >= self.opts.max_streams:
            raise APIError(
                429,
                f"too many open streams ({m.streams}); retry later",
                code="too_many_streams",
                headers={"retry-after": "1"},
            )
        m.add("in_flight", 1)
        if stream:
            m.add("streams", 1)

    def release(self, stream: bool) -> None:
        """Give back the place taken by :meth:`admit`."""
        self.metrics.add("in_flight", -1)
        if stream:
            self.metrics.add("streams", -1)

    # -- persona objects ------------------------------------------------------------------------------
    def persona_of_step(self, p: _Prepared, step: Step) -> Dict[str, Any]:
        """The ``persona`` object of one stream chunk: the generated positions this step scored.

        Its fields are :class:`PersonaInfo`'s; the scores stay float32 arrays (see :func:`_json`).
        ``layers`` and ``thresholds`` are sent once, in the stream's opening chunk.
        """
        prompt_len = len(p.prompt_ids)
        if not step.positions or step.positions[0] >= prompt_len:
            # a decode step (positions ascend): every row is a generated token's, sent as it came
            return {
                "request_id": p.rid,
                "positions": step.positions,
                "layers": None,
                "scores": step.scores,
                "prompt_last": None,
                "thresholds": None,
                "events": _events(step.events),
            }
        keep = [i for i, pos in enumerate(step.positions) if pos >= prompt_len]
        prompt_last = None
        if prompt_len - 1 in step.positions:
            row = step.positions.index(prompt_len - 1)
            prompt_last = {n: np.ascontiguousarray(s[row]) for n, s in step.scores.items()}
        return {
            "request_id": p.rid,
            "positions": [step.positions[i] for i in keep],
            "layers": None,
            "scores": {n: np.asarray(s)[keep] for n, s in step.scores.items()},
            "prompt_last": prompt_last,
            "thresholds": None,
            "events": _events(step.events),
        }

    def persona_of(self, p: _Prepared, gen: Generation) -> Dict[str, Any]:
        """The ``persona`` object of a whole reply: every generated token's scores (as above)."""
        n = gen.prompt_len
        rows = {name: np.asarray(s) for name, s in gen.scores.items()}
        # A reply stopped by policy during a chunked prefill has fewer score rows than prompt tokens.
        positions = list(
            range(n, n + max((max(0, r.shape[0] - n) for r in rows.values()), default=0))
        )
        whole_prompt = bool(rows) and all(r.shape[0] >= n for r in rows.values())
        return {
            "request_id": p.rid,
            "positions": positions,
            "layers": gen.score_layers,
            "scores": {name: np.ascontiguousarray(r[n:]) for name, r in rows.items()},
            "prompt_last": {name: np.ascontiguousarray(r[n - 1]) for name, r in rows.items()}
            if whole_prompt
            else None,
            "thresholds": p.thresholds,
            "events": _events(gen.events),
        }

    def usage(self, p: _Prepared, generated: int) -> Usage:
        """The ``usage`` object."""
        n = len(p.prompt_ids)
        return Usage(prompt_tokens=n, completion_tokens=generated, total_tokens=n + generated)


_Body = TypeVar("_Body", bound=BaseModel)


async def _parse(request: Request, schema: Type[_Body]) -> _Body:
    """The JSON body as ``schema``, whatever the Content-Type (curl's ``-d`` sends a form type)."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:  # "[[[[..." a few thousand deep (within the body-size limit)
        raise APIError(400, "the body is JSON nested too deeply", code="invalid_json") from None
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise errors.validation_error(e.errors()) from None


async def _until_disconnected(request: Request) -> None:
    """Return once the client has gone (the body is read by then, so receive() waits for it)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


_RID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _request_id(request: Request, prefix: str) -> str:
    """The client's ``x-request-id`` when it is a short plain token, else a new ``prefix-<uuid>``."""
    given = request.headers.get("x-request-id", "")
    return given if _RID.match(given) else f"{prefix}-{uuid.uuid4().hex}"


def _json(body: BaseModel, persona: Optional[Dict[str, Any]] = None) -> bytes:
    """``body`` as JSON, its ``persona`` field set to ``persona`` (see :class:`PersonaInfo`).

    Scores stay float32 arrays and are written by orjson, each as the shortest decimal that reads
    back as the same float32 (about half the bytes of their float64 expansion, and ~8x faster than
    a list of Python floats through pydantic); a non-finite score (an overflowing steer) becomes
    null, as before.
    """
    data = body.model_dump()
    if persona is not None:
        data["persona"] = persona
    return orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY)


def _sse(body: BaseModel, persona: Optional[Dict[str, Any]] = None) -> bytes:
    """One server-sent event carrying ``body`` (and its ``persona``, see :func:`_json`)."""
    return b"data: " + _json(body, persona) + b"\n\n"


def _sse_dict(data: Dict[str, Any]) -> bytes:
    """One server-sent event carrying ``data``, a body already in its ``model_dump()`` shape.

    The per-token chunks of a stream are written this way, without building and validating a
    pydantic model per token (tests check the bytes equal :func:`_sse` of the schema's model).
    """
    return b"data: " + orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n\n"


@dataclasses.dataclass
class _StreamState:
    """What a stream has sent (tokens, events), whether it reached ``[DONE]``, whether it is closed."""

    generated: int = 0
    events: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    finished: bool = False
    closed: bool = False


class _SSE(StreamingResponse):
    """A stream of server-sent events whose request is ended however the response ends.

    ``close`` runs once the response is over, even when the client left before the first byte
    (then the body generator never starts and its own ``finally`` would never run).
    """

    def __init__(self, body: AsyncIterator[bytes], close: Any, rid: str):
        super().__init__(
            body,
            media_type="text/event-stream",
            headers={"x-request-id": rid, "cache-control": "no-cache"},
        )
        self._close = close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._close()


async def _run(server: _Server, request: Request, p: _Prepared, stream: bool, render: Any) -> Any:
    """Submit a prepared request and answer it (JSON or SSE); ``render`` builds the bodies.

    A stream waits for the first step before it answers, so that a request the engine refuses is
    an HTTP error, not an error chunk. A client that leaves cancels its request.
    """
    handle = await run_in_threadpool(server.engine.submit, p.prompt_ids, **p.kwargs)
    if stream:
        steps = handle.__aiter__()
        try:
            first: Optional[Step] = await steps.__anext__()
        except StopAsyncIteration:
            first = None
        except BaseException:
            handle.cancel()
            raise
        state = _StreamState()

        def close() -> None:
            if state.closed:
                return
            state.closed = True
            if not state.finished:
                handle.cancel()  # the client went away (or the request failed): free the slot
            server.metrics.count_reply(len(p.prompt_ids), state.generated, state.events)
            server.release(True)

        return _SSE(_stream(server, steps, first, p, render, state), close, p.rid)
    gone = asyncio.ensure_future(_until_disconnected(request))
    done = asyncio.ensure_future(handle.aresult())
    try:
        await asyncio.wait({gone, done}, return_when=asyncio.FIRST_COMPLETED)
        if not done.done():
            handle.cancel()
            raise APIError(499, "the client closed the connection", code="client_closed")
        gen: Generation = done.result()
    finally:
        gone.cancel()
        if not done.done():
            done.cancel()
    persona = server.persona_of(p, gen)
    server.metrics.count_reply(len(p.prompt_ids), len(gen.token_ids), persona["events"])
    body = render.full(p, gen, server.usage(p, len(gen.token_ids)))
    return Response(
        _json(body, persona), media_type="application/json", headers={"x-request-id": p.rid}
    )


async def _stream(
    server: _Server,
    steps: AsyncIterator[Step],
    first: Optional[Step],
    p: _Prepared,
    render: Any,
    state: "_StreamState",
) -> AsyncIterator[bytes]:
    """The SSE body: a chunk per step, a final chunk with the finish reason, then ``[DONE]``.

    ``state`` records what was sent and whether it finished.
    """
    try:
        yield _sse(render.opening(p))
        step = first
        while step is not None:
            state.generated += step.token_id is not None
            persona = server.persona_of_step(p, step)
            state.events += persona["events"]
            finish = _FINISH.get(step.finish_reason or "", step.finish_reason)
            lps = render.logprobs(p, step.logprobs) if p.top is not None else None
            yield _sse_dict(render.chunk_dict(step.text, finish, persona, lps))
            try:
                step = await steps.__anext__()
            except StopAsyncIteration:
                step = None
        if p.include_usage:
            yield _sse(render.usage_chunk(p, server.usage(p, state.generated)))
        yield b"data: [DONE]\n\n"
        state.finished = True
    except Exception as e:  # noqa: BLE001 - after the headers an error can only be sent as a chunk
        err = APIError.from_exception(e)
        yield f"data: {json.dumps(errors.error_body(err))}\n\n".encode()


def _opening_persona(p: _Prepared) -> PersonaInfo:
    """The ``persona`` of a stream's opening chunk: what its later chunks' scores refer to."""
    return PersonaInfo(request_id=p.rid, layers=p.layers, thresholds=p.thresholds)


class _ChatRender:
    """Bodies of ``/v1/chat/completions``."""

    def __init__(self, server: _Server, rid: str):
        self.model, self.rid, self.created = server.name, rid, int(time.time())
        self.texts = server.token_texts

    def logprobs(self, p: _Prepared, lps: List[TokenLogprob]) -> Dict[str, Any]:
        """The ``logprobs`` of a choice holding the tokens ``lps``."""
        return chat_logprobs(lps, self.texts)

    def full(self, p: _Prepared, gen: Generation, usage: Usage) -> ChatCompletionResponse:
        """The whole reply (its ``persona`` is written by :func:`_json`)."""
        lps = self.logprobs(p, gen.logprobs or []) if p.top is not None else None
        return ChatCompletionResponse.model_validate(
            {
                "id": self.rid,
                "created": self.created,
                "model": self.model,
                "choices": [
                    {
                        "message": {"content": gen.text},
                        "finish_reason": _FINISH.get(gen.finish_reason or "", gen.finish_reason),
                        "logprobs": lps,
                    }
                ],
                "usage": usage,
            }
        )

    def _chunk(
        self,
        delta: Dict[str, Any],
        finish: Optional[str],
        persona: Optional[PersonaInfo],
        usage: Optional[Usage] = None,
        choices: bool = True,
    ) -> ChatCompletionChunk:
        return ChatCompletionChunk.model_validate(
            {
                "id": self.rid,
                "created": self.created,
                "model": self.model,
                "choices": [{"delta": delta, "finish_reason": finish}] if choices else [],
                "usage": usage,
                "persona": persona,
            }
        )

    def opening(self, p: _Prepared) -> ChatCompletionChunk:
        """The first chunk: the role, and the ``layers`` and ``thresholds`` of every later score."""
        return self._chunk({"role": "assistant", "content": ""}, None, _opening_persona(p))

    def chunk(self, p: _Prepared, text: str, finish: Optional[str]) -> ChatCompletionChunk:
        """A step's chunk (its ``persona`` is written by :func:`_sse`)."""
        return self._chunk({"content": text}, finish, None)

    def chunk_dict(
        self,
        text: str,
        finish: Optional[str],
        persona: Optional[Dict[str, Any]],
        logprobs: Optional[Dict[str, Any]] = None,
    ) -> Dict[str, Any]:
        """:meth:`chunk`'s ``model_dump()`` with its ``persona``, built without the model (per token)."""
        choice = {
            "index": 0,
            "delta": {"role": None, "content": text},
            "finish_reason": finish,
            "logprobs": logprobs,
        }
        return _chunk_dict(self, "chat.completion.chunk", choice, persona)

    def usage_chunk(self, p: _Prepared, usage: Usage) -> ChatCompletionChunk:
        return self._chunk({}, None, None, usage, choices=False)


def _chunk_dict(
    render: Any, obj: str, choice: Dict[str, Any], persona: Optional[Dict[str, Any]]
) -> Dict[str, Any]:
    """A stream chunk's body with one choice, as its schema's ``model_dump()`` gives it."""
    return {
        "id": render.rid,
        "object": obj,
        "created": render.created,
        "model": render.model,
        "choices": [choice],
        "usage": None,
        "persona": persona,
    }


class _TextRender:
    """Bodies of ``/v1/completions``."""

    def __init__(self, server: _Server, rid: str):
        self.model, self.rid, self.created = server.name, rid, int(time.time())
        self.texts = server.token_texts
        self._logprobs: Optional[CompletionLogprobs] = None

    def logprobs(self, p: _Prepared, lps: List[TokenLogprob]) -> Dict[str, Any]:
        """The ``logprobs`` of a choice holding the tokens ``lps`` (the next ones of the reply)."""
        if self._logprobs is None:
            self._logprobs = CompletionLogprobs(self.texts, start=len(p.echo))
        return self._logprobs.add(lps)

    def _body(
        self,
        text: str,
        finish: Optional[str],
        persona: Optional[PersonaInfo],
        usage: Optional[Usage] = None,
        choices: bool = True,
        logprobs: Optional[Dict[str, Any]] = None,
    ) -> CompletionResponse:
        choice = {"text": text, "finish_reason": finish, "logprobs": logprobs}
        return CompletionResponse.model_validate(
            {
                "id": self.rid,
                "created": self.created,
                "model": self.model,
                "choices": [choice] if choices else [],
                "usage": usage,
                "persona": persona,
            }
        )

    def full(self, p: _Prepared, gen: Generation, usage: Usage) -> CompletionResponse:
        """The whole reply, after the prompt with ``echo`` (its ``persona`` is written by :func:`_json`)."""
        lps = self.logprobs(p, gen.logprobs or []) if p.top is not None else None
        finish = _FINISH.get(gen.finish_reason or "", gen.finish_reason)
        return self._body(p.echo + gen.text, finish, None, usage, logprobs=lps)

    def opening(self, p: _Prepared) -> CompletionResponse:
        """The first chunk: the echoed prompt, and the ``layers`` and ``thresholds`` of every later
        score."""
        return self._body(p.echo, None, _opening_persona(p))

    def chunk(self, p: _Prepared, text: str, finish: Optional[str]) -> CompletionResponse:
        """A step's chunk (its ``persona`` is written by :func:`_sse`)."""
        return self._body(text, finish, None)

    def chunk_dict(
        self,
        text: str,
        finish: Optional[str],
        persona: Optional[Dict[str, Any]],
        logprobs: Optional[Dict[str, Any]] = None,
    ) -> Dict[str, Any]:
        """:meth:`chunk`'s ``model_dump()`` with its ``persona``, built without the model (per token)."""
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs}
        return _chunk_dict(self, "text_completion", choice, persona)

    def usage_chunk(self, p: _Prepared, usage: Usage) -> CompletionResponse:
        return self._body("", None, None, usage, choices=False)


# ---- the app ---------------------------------------------------------------------------------------
def create_app(
    model: Union[Model, str, None] = None,
    vectors: Optional[Mapping[str, Union[PersonaVector, str, "os.PathLike[str]"]]] = None,
    *,
    engine: Any = None,
    options: Optional[ServeOptions] = None,
    **option_values: Any,
) -> FastAPI:
    """The FastAPI app serving ``model`` with the named ``vectors``.

    ``model`` is a loaded :class:`~personacore.Model`, a path or hub id, or None (the default model);
    ``vectors`` maps names to :class:`~personacore.PersonaVector` objects or vector files. ``engine``
    is an :class:`~personacore.Engine` to share (default: one made here with ``max_batch``, closed
    when the app shuts down). Limits come from ``options`` or keyword arguments of
    :class:`ServeOptions` (``api_key=``, ``max_tokens_limit=``...). Run it with uvicorn, or under
    Ray Serve (:mod:`personacore.serve.ray`).
    """
    opts = dataclasses.replace(options or ServeOptions(), **option_values)
    if not isinstance(model, Model):
        model = load_model(model)
    named = load_vectors(model, vectors)
    own_engine = engine is None
    if own_engine:
        from ..engine import Engine

        engine = Engine(model, max_batch=opts.max_batch)
    replica = opts.replica_id or f"{os.uname().nodename}:{os.getpid()}"
    server = _Server(model, named, engine, opts)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if own_engine:
            await run_in_threadpool(engine.close)

    app = FastAPI(title="personacore serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    app.state.engine = engine
    errors.install(app)
    app.add_middleware(
        _Guard,
        limit=opts.max_body_bytes,
        replica=replica,
        metrics=server.metrics,
        body_timeout=opts.body_timeout,
        send_timeout=opts.send_timeout,
    )

    async def check_key(request: Request) -> None:
        if opts.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.encode(), opts.api_key.encode()
        ):
            raise APIError(
                401,
                "a valid API key is needed: Authorization: Bearer <key>",
                code="invalid_api_key",
                headers={"www-authenticate": "Bearer"},
            )

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @v1.post("/chat/completions", response_model=None)
    async def chat(request: Request) -> Any:
        """OpenAI chat completions, with ``steer``/``monitor``/``on_alert`` and a ``persona`` reply."""
        req = await _parse(request, ChatCompletionRequest)
        rid = _request_id(request, "chatcmpl")
        messages = _messages(req.messages)
        ids = await run_in_threadpool(model.encode_chat, messages, add_generation_prompt=True)
        return await _serve(req, request, list(ids), rid, _ChatRender(server, rid))

    @v1.post("/completions", response_model=None)
    async def completions(request: Request) -> Any:
        """OpenAI (legacy) completions of one prompt, text or token ids."""
        req = await _parse(request, CompletionRequest)
        rid = _request_id(request, "cmpl")
        if isinstance(req.prompt, str):
            ids = await run_in_threadpool(
                model.tokenizer.encode, req.prompt, add_special_tokens=True
            )
        else:
            ids = req.prompt
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt", code="empty_prompt")
        return await _serve(req, request, list(ids), rid, _TextRender(server, rid))

    async def _serve(req: Any, request: Request, ids: List[int], rid: str, render: Any) -> Any:
        # off the event loop: resolving steering and monitor specs runs the engine's checks
        p = await run_in_threadpool(server.prepare, req, ids, rid)
        server.admit(req.stream)
        handed_over = False  # a stream releases its place when its body ends (_stream)
        try:
            response = await _run(server, request, p, req.stream, render)
            handed_over = req.stream
            return response
        finally:
            if not handed_over:
                server.release(req.stream)

    @v1.get("/models", response_model=ModelList)
    async def models() -> ModelList:
        """The one model this server serves."""
        return ModelList(
            data=[ModelCard(id=server.name, created=server.created, max_model_len=server.context)]
        )

    @v1.get("/vectors", response_model=VectorList)
    async def vectors_list() -> VectorList:
        """The vectors loaded at start, their recommended layers and ``"auto"`` thresholds."""
        return VectorList(
            data=[
                VectorCard(
                    name=n,
                    layer=v.layer,
                    shape=list(v.shape),
                    trait=v.metadata.get("trait")
                    if isinstance(v.metadata.get("trait"), str)
                    else None,
                    auto_threshold=auto_threshold(v),
                )
                for n, v in server.vectors.items()
            ]
        )

    app.include_router(v1)
    tokens = APIRouter(dependencies=[Depends(check_key)])

    @tokens.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(request: Request) -> TokenizeResponse:
        """Token ids of a prompt or a chat, exactly as the completion routes tokenize them."""
        req = await _parse(request, TokenizeRequest)
        server.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "send either prompt or messages", code="invalid_request")
        if req.prompt is not None:
            ids = await run_in_threadpool(
                model.tokenizer.encode, req.prompt, add_special_tokens=req.add_special_tokens
            )
        else:
            messages = _messages(req.messages or [])
            ids = await run_in_threadpool(
                model.encode_chat, messages, add_generation_prompt=req.add_generation_prompt
            )
        ids = [int(i) for i in ids]
        strs = [server.token_texts(i)[0] for i in ids] if req.return_token_strs else None
        return TokenizeResponse(
            count=len(ids), max_model_len=server.context, tokens=ids, token_strs=strs
        )

    @tokens.post("/detokenize", response_model=DetokenizeResponse)
    async def detokenize(request: Request) -> DetokenizeResponse:
        """The text of token ids (special tokens kept)."""
        req = await _parse(request, DetokenizeRequest)
        server.check_model(req.model)
        return DetokenizeResponse(prompt=model.tokenizer.decode(req.tokens))

    app.include_router(tokens)

    @app.get("/health")
    async def health() -> Dict[str, Any]:
        """Liveness: ``{"status": "ok"}`` while the engine thread runs."""
        return {"status": "ok", "model": server.name, "replica": replica}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        """Prometheus text: requests, tokens, queue depth, batch size, alerts, steer switches."""
        return PlainTextResponse(
            server.metrics.render(stats_dict(engine.stats())), media_type=CONTENT_TYPE
        )

    return app
