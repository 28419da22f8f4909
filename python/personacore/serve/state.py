"""The state of one ``personacore serve`` app (:class:`Server`): its options, the named vectors,
and how a request body becomes the arguments of :meth:`personacore.Engine.submit` (steering,
monitor, limits) and how a step or a reply becomes its ``persona`` object."""

from __future__ import annotations

import dataclasses
import os
import secrets
import threading
import time
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
from pydantic import ValidationError

from ..engine import Event, Generation, Model, Step
from ..errors import InvalidInputError
from ..steering import Ablate, Cap, Monitor, Steer, When
from ..vectors import PersonaVector
from ..vectors.calibration import CalibrationMissingError
from ..vectors.calibration import auto_threshold as calibrated_threshold
from .errors import APIError
from .logprobs import TokenTexts
from .metrics import Metrics
from .schemas import (
    MAX_TOP_LOGPROBS,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    MonitorBody,
    SteerBody,
    Usage,
)


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
    ``default_steer``: the ``steer`` list (bodies as a request sends them) of every request that
    sends none, so that clients that cannot send extra body keys (an evaluation harness, say)
    talk to the steered model; a request's own ``steer`` replaces it (``[]``: unsteered).
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
    default_steer: Optional[List[Dict[str, Any]]] = None


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


# ---- the server ------------------------------------------------------------------------------------
@dataclasses.dataclass
class Prepared:
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
    #: which of the request's choices this is (prompt ``k``'s ``j``-th of ``n``: ``k * n + j``)
    index: int = 0

    @property
    def prompt_logprobs(self) -> bool:
        """Whether the reply reports the prompt's log-probabilities (``echo`` with ``logprobs``)."""
        return self.kwargs.get("prompt_logprobs") is not None


def choices(ps: List[Prepared], n: int) -> List[Prepared]:
    """The choices of a request of prompts ``ps``, ``n`` each, each its own engine request:
    choice ``k * n + j`` (prompt ``k``, its ``j``-th) is request id ``RID.index`` (when there is
    more than one choice) and samples with seed ``seed + j``, so a seeded request's choices differ
    from each other and repeat from one call to the next."""
    if len(ps) == 1 and n == 1:
        return ps
    out = []
    for k, p in enumerate(ps):
        for j in range(n):
            index = k * n + j
            rid = f"{p.rid}.{index}"
            kwargs = dict(p.kwargs, request_id=rid, seed=p.kwargs["seed"] + j)
            out.append(dataclasses.replace(p, rid=rid, kwargs=kwargs, index=index))
    return out


def content_text(content: Union[str, List[Dict[str, Any]], None]) -> str:
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


def chat_messages(messages: List[ChatMessage]) -> List[Dict[str, str]]:
    """Chat messages as the chat template takes them (text content only, see :func:`content_text`)."""
    return [{"role": m.role, "content": content_text(m.content)} for m in messages]


def event_dicts(events: List[Event]) -> List[Dict[str, Any]]:
    return [e.to_dict() for e in events]


def refuse_unsupported(req: Union[ChatCompletionRequest, CompletionRequest]) -> None:
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
        }
    for name, refused in unsupported.items():
        if refused:
            raise APIError(
                400, f"{name} is not supported by this server", param=name, code="unsupported"
            )


def top_logprobs(req: Union[ChatCompletionRequest, CompletionRequest]) -> Optional[int]:
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


def chat_prompt_logprobs(req: ChatCompletionRequest) -> int:
    """A chat request's ``prompt_logprobs`` (0 to 20; a whole reply only)."""
    k = req.prompt_logprobs
    if k is None or not 0 <= k <= MAX_TOP_LOGPROBS:
        raise APIError(
            400,
            f"prompt_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {k}",
            param="prompt_logprobs",
            code="invalid_value",
        )
    if req.stream:
        raise APIError(
            400,
            "prompt_logprobs is not supported with stream",
            param="prompt_logprobs",
            code="unsupported",
        )
    return k


#: How many kinds of monitor (vectors, layers, thresholds) a server keeps built for reuse.
MONITOR_CACHE = 64


class Server:
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
        # the bodies (their `when` vectors join the monitor) and the steers, built once
        self.default_steer, self._default_steers = self._default_steer(opts.default_steer)

    def _default_steer(
        self, bodies: Optional[List[Dict[str, Any]]]
    ) -> Tuple[Optional[List[SteerBody]], List[Any]]:
        """``default_steer`` checked once, at start: a bad body or an unknown vector is an
        :class:`~personacore.InvalidInputError` naming it."""
        if bodies is None:
            return None, []
        try:
            out = [SteerBody.model_validate(b) for b in bodies]
            return out, self.steers(out)
        except ValidationError as e:
            raise InvalidInputError(f"default_steer: {e}") from None
        except APIError as e:
            raise InvalidInputError(f"default_steer: {e.message}") from None

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
        self,
        req: Union[ChatCompletionRequest, CompletionRequest],
        prompts: List[List[int]],
        rid: str,
        echoes: Optional[List[str]] = None,
    ) -> List[Prepared]:
        """Check the limits and build the engine arguments of one request: one per choice
        (``n`` per prompt of ``prompts``; ``echoes`` are the prompts' texts, for ``echo``)."""
        self.check_model(req.model)
        if not 1 <= req.n <= self.opts.max_batch:
            raise APIError(
                400,
                f"n must be in 1..{self.opts.max_batch} (the server's batch), got {req.n}",
                param="n",
                code="invalid_value",
            )
        param = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
        self._check_prompts(prompts, req.n, param)
        refuse_unsupported(req)
        top = top_logprobs(req)
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
        n = max(len(ids) for ids in prompts)
        if n > self.max_prompt or n + max_tokens > self.context:
            raise APIError(
                400,
                f"the prompt has {n} tokens and max_tokens is {max_tokens}: more than the limit of "
                f"{self.max_prompt} prompt tokens or the context of {self.context}",
                param=param,
                code="context_length_exceeded",
            )
        bodies: Optional[List[SteerBody]]
        if req.steer is not None:
            bodies, steers = req.steer, self.steers(req.steer)
        else:
            bodies, steers = self.default_steer, self._default_steers
        monitor, thresholds, layers = self.monitor(req.monitor, bodies or [])
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
        if isinstance(req, CompletionRequest) and req.echo and top is not None:
            kwargs["prompt_logprobs"] = top  # the echoed prompt's tokens get log-probabilities
        elif isinstance(req, ChatCompletionRequest) and req.prompt_logprobs is not None:
            kwargs["prompt_logprobs"] = chat_prompt_logprobs(req)
        include_usage = bool(req.stream and (req.stream_options or {}).get("include_usage"))
        texts = echoes if isinstance(req, CompletionRequest) and req.echo else None
        ps = [
            Prepared(
                rid,
                ids,
                max_tokens,
                kwargs,
                thresholds,
                layers,
                include_usage,
                top,
                texts[k] if texts is not None else "",
            )
            for k, ids in enumerate(prompts)
        ]
        return choices(ps, req.n)

    def _check_prompts(self, prompts: List[List[int]], n: int, param: str) -> None:
        """A 400 for more choices than the server holds, an empty prompt or a token id outside
        the vocabulary (naming the prompt of a list and the token)."""
        places = self.opts.max_batch + self.opts.max_queued
        if len(prompts) * n > places:
            raise APIError(
                400,
                f"{len(prompts)} prompts x n={n} choices is more than the {places} requests "
                f"this server holds at once",
                param="prompt",
                code="invalid_value",
            )
        vocab = self.model.vocab_size
        for k, ids in enumerate(prompts):
            where = f"{param}[{k}]" if len(prompts) > 1 else param
            if not ids:
                raise APIError(400, f"{where} is empty", param=param, code="empty_prompt")
            bad = next((i for i, t in enumerate(ids) if not 0 <= t < vocab), None)
            if bad is not None:
                raise APIError(
                    400,
                    f"{where} token {bad} is {ids[bad]}: token ids must be in [0, {vocab})",
                    param=param,
                    code="invalid_token",
                )

    # -- admission ----------------------------------------------------------------------------------
    def admit(self, stream: bool, places: int = 1) -> None:
        """Take ``places`` among the requests in flight (one per choice) and one among the open
        streams; 429 when full."""
        m = self.metrics
        if m.in_flight + places > self.opts.max_batch + self.opts.max_queued:
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
        m.add("in_flight", places)
        if stream:
            m.add("streams", 1)

    def release(self, stream: bool, places: int = 1) -> None:
        """Give back the places taken by :meth:`admit`."""
        self.metrics.add("in_flight", -places)
        if stream:
            self.metrics.add("streams", -1)

    # -- persona objects ------------------------------------------------------------------------------
    def persona_of_step(self, p: Prepared, step: Step) -> Dict[str, Any]:
        """The ``persona`` object of one stream chunk: the generated positions this step scored.

        Its fields are :class:`PersonaInfo`'s; the scores stay float32 arrays (see :func:`json_body`).
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
                "events": event_dicts(step.events),
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
            "events": event_dicts(step.events),
        }

    def persona_of(self, p: Prepared, gen: Generation) -> Dict[str, Any]:
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
            "events": event_dicts(gen.events),
        }

    def usage(self, prompt_tokens: int, generated: int) -> Usage:
        """The ``usage`` object: each prompt once, the tokens of every choice."""
        return Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=generated,
            total_tokens=prompt_tokens + generated,
        )
