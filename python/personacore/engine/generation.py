"""Generation with steering and live monitoring: :class:`Generation`, :class:`Step`, :class:`Event`.

Use it through :meth:`Model.generate <personacore.Model.generate>` and
:meth:`Model.stream <personacore.Model.stream>`. The decode loop runs in the Rust engine (KV cache,
batched prompts of different lengths, sampling, stop conditions); steering
(:class:`~personacore.Steer`, :class:`~personacore.Ablate`, :class:`~personacore.Cap`) and monitoring
(:class:`~personacore.Monitor`) act inside every forward pass. This module converts the arguments
to the engine's types; the engine checks every value before it starts (``prepare_generation``), so
that bad input raises :class:`~personacore.InvalidInputError` before any computation. The results
come back grouped by monitored name and become the objects below.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import signal
import threading
from collections.abc import Mapping
from types import FrameType
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

from ..errors import InvalidInputError
from .convert import as_float, as_i64, as_ids, as_int
from .specs import MonitorSpec, check_spec_models, flat_steers, resolve_steers

__all__ = ["Event", "Generation", "Step", "Stream", "TokenLogprob"]

_EVENT_KINDS = ("alert", "clear", "steer_on", "steer_off")


@dataclasses.dataclass(frozen=True)
class Event:
    """Something the monitor or a conditional steer did, with the numbers that caused it.

    ``kind`` is ``"alert"`` (a monitor score rose above its threshold), ``"clear"`` (it came back),
    ``"steer_on"`` or ``"steer_off"`` (a conditional steer switched). ``sequence`` is the batch index,
    ``position`` the token position in prompt + generated tokens, ``step`` the forward pass (0 = the
    prompt pass), ``vector``/``layer``/``score`` the monitor column and its score, ``threshold`` the
    line that was crossed, ``coef`` and ``steer`` the steering's coefficient and name (steer events;
    a ``"steer_on"`` of ``When(mode="proportional")`` reports the coefficient in effect,
    ``coef × min(1, gain × excess)``).
    """

    kind: str
    sequence: int
    position: int
    step: int
    vector: Optional[str] = None
    layer: Optional[int] = None
    score: Optional[float] = None
    threshold: Optional[float] = None
    coef: Optional[float] = None
    steer: Optional[str] = None

    @classmethod
    def from_dict(cls, d: Mapping) -> "Event":
        """Build an event from the engine's (or the audit log's) dict; unknown keys are ignored."""
        fields: Dict[str, Any] = {f.name: d.get(f.name) for f in dataclasses.fields(cls)}
        return cls(**fields)

    def to_dict(self) -> Dict[str, Any]:
        """The event as a plain dict (the same keys as an audit-log line)."""
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """One line for people: kind, position, vector@layer, score, threshold, coef, steer."""
        parts = [self.kind, f"position {self.position}"]
        if self.vector is not None:
            parts.append(f"{self.vector}@{self.layer}")
        if self.score is not None:
            parts.append(f"score {self.score:+.3f}")
        if self.threshold is not None:
            parts.append(f"threshold {self.threshold:+.3f}")
        if self.coef is not None:
            parts.append(f"coef {self.coef:+.3g}")
        if self.steer is not None:
            parts.append(f"steer {self.steer}")
        return ", ".join(parts)


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """The log-probability of one generated token, and the most likely tokens at its step.

    ``top`` is ``[(token_id, logprob), ...]``, most likely first (``logprobs=k`` asks for ``k`` of
    them, 0 to 20). These are the model's own log-probabilities (its log-softmax, steering
    included), before temperature, ``top_k``/``top_p``, penalties and ``logit_bias`` change the
    choice, as vLLM reports them by default.
    """

    token_id: int
    logprob: float
    top: List[Tuple[int, float]] = dataclasses.field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        """``{"token_id", "logprob", "top": [[id, logprob], ...]}``."""
        return {
            "token_id": self.token_id,
            "logprob": self.logprob,
            "top": [[i, lp] for i, lp in self.top],
        }

    @classmethod
    def from_dict(cls, d: Any) -> "TokenLogprob":
        """The inverse of :meth:`to_dict`; a malformed dict raises InvalidInputError."""
        try:
            return cls(
                token_id=int(d["token_id"]),
                logprob=float(d["logprob"]),
                top=[(int(i), float(lp)) for i, lp in d.get("top") or []],
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise InvalidInputError(f"malformed logprobs entry {d!r}: {e}") from None


def _logprobs(raw: Any) -> List[TokenLogprob]:
    """The engine's ``[(token, logprob, [(id, logprob), ...]), ...]`` as :class:`TokenLogprob`."""
    return [
        TokenLogprob(int(t), float(lp), [(int(i), float(v)) for i, v in top])
        for t, lp, top in raw or []
    ]


@dataclasses.dataclass(eq=False)  # scores hold arrays: compare fields, not objects
class Generation:
    """The result of generating from one prompt.

    ``token_ids``/``text`` are the generated tokens only; ``finish_reason`` is ``"eos"``, ``"stop"``
    (a stop string) or ``"length"`` (``max_new_tokens`` or the context window). ``scores[name]`` is
    float32 ``[n_positions, len(score_layers[name])]``: rows ``0 .. prompt_len - 1`` are the prompt's
    tokens, the following rows the generated ones (see :attr:`is_generated`); ``sinks`` is a
    boolean mask over the same rows, True at attention-sink positions (position 0 and norm
    outliers, see :class:`~personacore.Monitor`), which raise no alert by default and are left
    out of :meth:`reply_scores`; ``events`` lists :class:`Event` objects in the order they happened.
    ``token_texts`` is the text of each generated token (special tokens as their vocabulary string;
    a character split over several tokens is given to its last token, the others get ``""``), and
    ``thresholds`` the monitor's alert thresholds ``{name: value}``; both are filled by
    ``model.generate``/``model.stream`` and used by the notebook view (``_repr_html_``).
    ``logprobs`` has one :class:`TokenLogprob` per generated token when the call asked for them
    (``logprobs=k``), else None; ``prompt_logprobs`` one per prompt token after the first (the
    first has no context to be predicted from) when the call asked for them
    (``prompt_logprobs=k``), else None.
    """

    text: str
    token_ids: List[int]
    finish_reason: Optional[str]
    prompt_ids: List[int]
    scores: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    score_layers: Dict[str, List[int]] = dataclasses.field(default_factory=dict)
    events: List[Event] = dataclasses.field(default_factory=list)
    sinks: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=bool))
    token_texts: List[str] = dataclasses.field(default_factory=list)
    thresholds: Dict[str, float] = dataclasses.field(default_factory=dict)
    logprobs: Optional[List[TokenLogprob]] = None
    prompt_logprobs: Optional[List[TokenLogprob]] = None

    def reply_scores(self, include_sinks: bool = False) -> Dict[str, np.ndarray]:
        """Scores of the generated tokens, ``{name: [n, n_layers]}``, attention sinks left out
        unless ``include_sinks`` (the rows to summarise a reply with: mean, max, ...)."""
        keep = self.is_generated
        if not include_sinks and len(self.sinks) == len(keep):
            keep = keep & ~self.sinks
        return {name: s[keep] for name, s in self.scores.items()}

    @property
    def prompt_len(self) -> int:
        """Number of prompt tokens (the first ``prompt_len`` rows of every score array)."""
        return len(self.prompt_ids)

    @property
    def ids(self) -> List[int]:
        """Prompt ids followed by the generated ids."""
        return self.prompt_ids + self.token_ids

    @property
    def is_generated(self) -> np.ndarray:
        """Boolean mask over score rows: False for prompt positions, True for generated ones."""
        n = next(iter(self.scores.values())).shape[0] if self.scores else len(self.ids)
        return np.arange(n) >= self.prompt_len

    @property
    def early_warning(self) -> Dict[str, np.ndarray]:
        """Scores at the last prompt token, before the first generated token: ``{name: [n_layers]}``."""
        return {name: s[self.prompt_len - 1].copy() for name, s in self.scores.items()}

    def to_dict(self) -> Dict[str, Any]:
        """The generation as plain JSON-ready values; :meth:`from_dict` gives back an equal one.

        Scores become nested lists of floats (each float32 value exactly, as a Python float),
        ``sinks`` a list of bools and events their dicts (:meth:`Event.to_dict`).
        """
        return {
            "text": self.text,
            "token_ids": [int(t) for t in self.token_ids],
            "finish_reason": self.finish_reason,
            "prompt_ids": [int(t) for t in self.prompt_ids],
            "scores": {n: np.asarray(s, dtype=np.float32).tolist() for n, s in self.scores.items()},
            "score_layers": {n: [int(x) for x in ls] for n, ls in self.score_layers.items()},
            "events": [e.to_dict() for e in self.events],
            "sinks": [bool(x) for x in np.asarray(self.sinks, dtype=bool)],
            "token_texts": list(self.token_texts),
            "thresholds": {n: float(t) for n, t in self.thresholds.items()},
            "logprobs": None if self.logprobs is None else [lp.to_dict() for lp in self.logprobs],
            "prompt_logprobs": None
            if self.prompt_logprobs is None
            else [lp.to_dict() for lp in self.prompt_logprobs],
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "Generation":
        """Rebuild a generation from :meth:`to_dict`'s dict (e.g. a line of a JSONL file).

        Raises :class:`~personacore.InvalidInputError` naming the key that is missing or malformed;
        unknown keys are ignored.
        """
        if not isinstance(d, Mapping):
            raise InvalidInputError(f"a Generation dict must be a mapping, got {type(d).__name__}")
        for key in ("text", "token_ids", "prompt_ids"):
            if key not in d:
                raise InvalidInputError(f"Generation dict has no {key!r}")
        if not isinstance(d["text"], str):
            raise InvalidInputError(f"Generation dict 'text' must be a str, got {d['text']!r}")
        layers_in = d.get("score_layers") or {}
        scores_in = d.get("scores") or {}
        if not isinstance(layers_in, Mapping) or not isinstance(scores_in, Mapping):
            raise InvalidInputError("Generation dict 'scores' and 'score_layers' must be mappings")
        if set(layers_in) != set(scores_in):
            raise InvalidInputError(
                f"Generation dict names differ between 'scores' {sorted(scores_in)} and "
                f"'score_layers' {sorted(layers_in)}"
            )
        score_layers = {str(n): as_ids(ls, f"score_layers[{n!r}]") for n, ls in layers_in.items()}
        scores: Dict[str, np.ndarray] = {}
        for name, rows in scores_in.items():
            n_layers = len(score_layers[str(name)])
            try:
                arr = np.asarray(rows, dtype=np.float32)
            except (TypeError, ValueError) as e:
                raise InvalidInputError(f"Generation dict scores[{name!r}]: {e}") from None
            if arr.size == 0:
                arr = arr.reshape(0, n_layers)
            if arr.ndim != 2 or arr.shape[1] != n_layers:
                raise InvalidInputError(
                    f"Generation dict scores[{name!r}] must be [n_positions, {n_layers}], "
                    f"got shape {arr.shape}"
                )
            scores[str(name)] = arr
        events = d.get("events") or []
        if not isinstance(events, (list, tuple)) or not all(isinstance(e, Mapping) for e in events):
            raise InvalidInputError("Generation dict 'events' must be a list of event dicts")
        for event in events:
            if event.get("kind") not in _EVENT_KINDS:
                raise InvalidInputError(
                    f"Generation dict event kind {event.get('kind')!r} is not one of {_EVENT_KINDS}"
                )
        return cls(
            text=d["text"],
            token_ids=as_ids(d["token_ids"], "token_ids"),
            finish_reason=d.get("finish_reason"),
            prompt_ids=as_ids(d["prompt_ids"], "prompt_ids"),
            scores=scores,
            score_layers=score_layers,
            events=[Event.from_dict(event) for event in events],
            sinks=np.asarray(d.get("sinks") or [], dtype=bool),
            token_texts=_str_list(d.get("token_texts") or [], "token_texts"),
            thresholds=_float_map(d.get("thresholds") or {}, "thresholds"),
            logprobs=_logprobs_in(d.get("logprobs")),
            prompt_logprobs=_logprobs_in(d.get("prompt_logprobs"), "prompt_logprobs"),
        )

    def _repr_html_(self) -> str:
        """HTML for notebooks: the reply's tokens colored by the first monitored score, with the
        alert and steering events marked (see :func:`personacore.engine.notebook.generation_html`)."""
        from .notebook import generation_html

        return generation_html(self)

    def __repr__(self) -> str:
        text = self.text if len(self.text) <= 60 else self.text[:57] + "..."
        shapes = {n: tuple(s.shape) for n, s in self.scores.items()}
        return (
            f"Generation(text={text!r}, n_generated={len(self.token_ids)}, "
            f"finish_reason={self.finish_reason!r}, prompt_len={self.prompt_len}, "
            f"scores={shapes}, events={len(self.events)})"
        )


@dataclasses.dataclass(eq=False)
class Step:
    """One step of :meth:`Model.stream <personacore.Model.stream>`: one new token.

    ``token_id`` and ``text`` (the new UTF-8-safe piece; may be empty while a multi-byte character
    is incomplete or could be the start of a stop string), ``finish_reason`` (None until the last
    step) and ``events`` raised in this step. ``scores`` ``{name: float32 [n_positions, n_layers]}``
    holds the positions the model read in this step, listed in ``positions`` (indices into prompt +
    generated tokens): the whole prompt in the first step (its last row is the early warning), then
    the previous token; the last step also carries the score of its own token when monitoring.
    ``sinks`` marks the attention-sink positions among them (see :class:`Generation`).
    ``logprobs`` holds the new token's :class:`TokenLogprob` when the call asked for them (more
    than one when an engine reader fell behind and steps were merged), else it is empty;
    ``prompt_logprobs`` those of the prompt tokens read in this step (the first step's, with
    ``prompt_logprobs=k``).
    """

    token_id: Optional[int]
    text: str
    scores: Dict[str, np.ndarray]
    events: List[Event]
    finish_reason: Optional[str]
    positions: List[int] = dataclasses.field(default_factory=list)
    sinks: List[bool] = dataclasses.field(default_factory=list)
    logprobs: List[TokenLogprob] = dataclasses.field(default_factory=list)
    prompt_logprobs: List[TokenLogprob] = dataclasses.field(default_factory=list)


def _logprobs_in(x: Any, key: str = "logprobs") -> Optional[List[TokenLogprob]]:
    """A Generation dict's ``logprobs`` or ``prompt_logprobs`` (None, or a list of
    :meth:`TokenLogprob.to_dict` dicts)."""
    if x is None:
        return None
    if not isinstance(x, (list, tuple)):
        raise InvalidInputError(f"Generation dict {key!r} must be a list of dicts or None")
    return [TokenLogprob.from_dict(e) for e in x]


# ---- argument conversion -----------------------------------------------------------------------
def _params(
    max_new_tokens: Any,
    temperature: Any,
    top_p: Any,
    top_k: Any,
    seed: Any,
    stop: Any,
    ignore_eos: Any,
    logprobs: Any = None,
    logit_bias: Any = None,
    presence_penalty: Any = 0.0,
    frequency_penalty: Any = 0.0,
    prompt_logprobs: Any = None,
) -> Dict[str, Any]:
    """The engine's generation settings (types only; the engine checks the values)."""
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise InvalidInputError(f"stop must be a non-empty str or a list of them, got {stop!r}")
    if not isinstance(ignore_eos, (bool, np.bool_)):
        raise InvalidInputError(f"ignore_eos must be a bool, got {ignore_eos!r}")
    return {
        "max_new_tokens": as_i64(max_new_tokens, "max_new_tokens"),
        "temperature": as_float(temperature, "temperature"),
        "top_p": as_float(top_p, "top_p"),
        "top_k": as_i64(top_k, "top_k"),
        "seed": _seed(seed),
        "stop": list(stop),
        "ignore_eos": bool(ignore_eos),
        "presence_penalty": as_float(presence_penalty, "presence_penalty"),
        "frequency_penalty": as_float(frequency_penalty, "frequency_penalty"),
        "logit_bias": _logit_bias(logit_bias),
        "logprobs": None if logprobs is None else as_i64(logprobs, "logprobs"),
        "prompt_logprobs": None
        if prompt_logprobs is None
        else as_i64(prompt_logprobs, "prompt_logprobs"),
    }


def _seed(x: Any) -> int:
    """A seed in ``[0, 2**64)``."""
    v = as_int(x, "seed")
    if not 0 <= v < 1 << 64:
        raise InvalidInputError(f"seed must be an int in [0, {(1 << 64) - 1}], got {v}")
    return v


def _logit_bias(x: Any) -> List[Tuple[int, float]]:
    """``{token_id: value}`` (keys may be digit strings, as in OpenAI's JSON) as pairs."""
    if x is None:
        return []
    if not isinstance(x, Mapping):
        raise InvalidInputError(f"logit_bias must be a mapping of token id to value, got {x!r}")
    out = []
    for k, v in x.items():
        if isinstance(k, str) and k.strip().lstrip("-").isdigit():
            k = int(k)
        out.append((as_i64(k, f"logit_bias key {k!r}"), as_float(v, f"logit_bias[{k!r}]")))
    return out


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def _one_prompt(model: Any, p: Any, what: str) -> List[int]:
    """A str (a user message), a list of message dicts, or token ids -> token ids."""
    if isinstance(p, str):
        return model.encode_chat([{"role": "user", "content": p}], add_generation_prompt=True)
    if isinstance(p, np.ndarray) or (isinstance(p, (list, tuple)) and all(_is_int(i) for i in p)):
        return as_ids(p, what)
    if isinstance(p, (list, tuple)) and all(isinstance(m, Mapping) for m in p):
        return model.encode_chat(p, add_generation_prompt=True)
    raise InvalidInputError(
        f"{what} must be a str (a user message), a list of message dicts or a list of token ids, "
        f"got {type(p).__name__}"
        + (f" of {sorted({type(i).__name__ for i in p})}" if isinstance(p, (list, tuple)) else "")
    )


def _prompts(model: Any, prompts: Any) -> Tuple[List[List[int]], bool]:
    """(token ids per prompt, whether the input was a batch)."""
    if isinstance(prompts, Mapping):
        raise InvalidInputError("a single message dict is not a prompt: pass a list of messages")
    if isinstance(prompts, np.ndarray) and prompts.ndim == 2:
        return [_one_prompt(model, row, f"prompts[{k}]") for k, row in enumerate(prompts)], True
    batch = (
        isinstance(prompts, (list, tuple))
        and len(prompts) > 0
        and all(isinstance(p, (str, list, tuple, np.ndarray)) for p in prompts)
    )
    if not batch:
        return [_one_prompt(model, prompts, "prompt")], False
    return [_one_prompt(model, p, f"prompts[{k}]") for k, p in enumerate(prompts)], True


def _audit_path(audit_log: Any) -> Optional[str]:
    """The audit-log path as a str, ``~`` expanded (the engine checks where it points)."""
    if audit_log is None:
        return None
    if not isinstance(audit_log, (str, os.PathLike)):
        raise InvalidInputError(f"audit_log must be a path, got {type(audit_log).__name__}")
    return os.path.expanduser(os.fspath(audit_log))


def _prepare(
    model: Any,
    prompts: Any,
    max_new_tokens: Any,
    temperature: Any,
    top_p: Any,
    top_k: Any,
    seed: Any,
    stop: Any,
    ignore_eos: Any,
    steer: Any,
    monitor: Any,
    audit_log: Any,
    audit_fsync: Any = "request",
    single: bool = False,
    logprobs: Any = None,
    logit_bias: Any = None,
    presence_penalty: Any = 0.0,
    frequency_penalty: Any = 0.0,
    prompt_logprobs: Any = None,
) -> Tuple[Any, List[List[int]], bool]:
    """Convert and let the engine check everything: (plan, prompt ids, batch?); nothing runs yet."""
    ids, batch = _prompts(model, prompts)
    if single and batch:
        raise InvalidInputError("stream() takes a single prompt; use generate() for a batch")
    params = _params(
        max_new_tokens,
        temperature,
        top_p,
        top_k,
        seed,
        stop,
        ignore_eos,
        logprobs,
        logit_bias,
        presence_penalty,
        frequency_penalty,
        prompt_logprobs,
    )
    audit = _audit_path(audit_log)
    if not isinstance(audit_fsync, str):
        raise InvalidInputError(
            f"audit_fsync must be 'request', 'event' or 'never', got {type(audit_fsync).__name__}"
        )
    spec = MonitorSpec.coerce(monitor)
    check_spec_models(model, flat_steers(steer) + ([spec] if spec is not None else []))
    mon = spec._prepared(model._core) if spec is not None else None
    steers = resolve_steers(steer, len(ids))
    plan = model._core.prepare_generation(
        ids, params, steers, None, audit, audit_fsync, prepared_monitor=mon
    )
    return plan, ids, batch


def _start(
    model: Any, prompts: Any, **kwargs: Any
) -> Tuple[Any, List[List[int]], bool, Dict[str, List[int]]]:
    """Convert, let the engine check, then start a session: (session, prompt ids, batch?, layers)."""
    plan, ids, batch = _prepare(model, prompts, **kwargs)
    session = model._core.generate_start(plan)
    layers = {name: list(ls) for name, ls in session.score_layers}
    return session, ids, batch, layers


def _scores(scores: Mapping, layers: Dict[str, List[int]]) -> Dict[str, np.ndarray]:
    """The engine's {name: [n_positions, n_layers]} scores, one array per monitored name."""
    return {n: np.asarray(scores[n], dtype=np.float32) for n in layers}


def _str_list(x: Any, what: str) -> List[str]:
    """A list of str from a Generation dict (named in the error otherwise)."""
    if not isinstance(x, (list, tuple)) or not all(isinstance(v, str) for v in x):
        raise InvalidInputError(f"Generation dict {what!r} must be a list of str")
    return list(x)


def _float_map(x: Any, what: str) -> Dict[str, float]:
    """A ``{name: number}`` mapping from a Generation dict (named in the error otherwise)."""
    if not isinstance(x, Mapping) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in x.values()
    ):
        raise InvalidInputError(f"Generation dict {what!r} must map names to numbers")
    return {str(n): float(v) for n, v in x.items()}


def token_texts(tokenizer: Any, ids: List[int], context: int = 4) -> List[str]:
    """The text each token of ``ids`` adds, in order (``"".join`` gives the decoded text).

    Each token is decoded after up to ``context`` tokens before it and the text they decode to is
    cut off, so word-initial spaces survive tokenizers that strip them at the start of a string;
    a multi-byte character split over several tokens (an incomplete one decodes to U+FFFD) is
    given to its last token, and the tokens before it get ``""``.
    """

    def decode(part: List[int]) -> str:
        return tokenizer.decode(part) if part else ""

    out: List[str] = []
    start = 0  # first token whose text has not been given out yet
    for k in range(len(ids)):
        before = ids[max(0, start - context) : start]
        base, full = decode(before), decode(before + ids[start : k + 1])
        if full.endswith("\ufffd") and k + 1 - start < 4 and k + 1 < len(ids):
            out.append("")  # an incomplete character: wait for the next token
            continue
        out.append(full[len(base) :] if full.startswith(base) else decode(ids[start : k + 1]))
        start = k + 1
    return out


def _thresholds(monitor: Any) -> Dict[str, float]:
    """The alert thresholds of a monitor argument, ``{name: value}`` (empty without one)."""
    spec = MonitorSpec.coerce(monitor)
    if spec is None:
        return {}
    return {str(n): float(t) for n, t in spec._request().get("thresholds") or []}


def _generation(
    result: Mapping,
    prompt_ids: List[int],
    layers: Dict[str, List[int]],
    tokenizer: Any = None,
    thresholds: Optional[Dict[str, float]] = None,
    logprobs: bool = False,
    prompt_logprobs: bool = False,
) -> Generation:
    ids = [int(t) for t in result["token_ids"]]
    return Generation(
        text=result["text"],
        token_ids=ids,
        finish_reason=result.get("finish_reason"),
        prompt_ids=list(prompt_ids),
        scores=_scores(result["scores"], layers),
        score_layers={n: list(ls) for n, ls in layers.items()},
        events=[Event.from_dict(e) for e in result.get("events") or []],
        sinks=np.asarray(result.get("sinks") or [], dtype=bool),
        token_texts=token_texts(tokenizer, ids) if tokenizer is not None else [],
        thresholds=dict(thresholds or {}),
        logprobs=_logprobs(result["logprobs"]) if logprobs else None,
        prompt_logprobs=_logprobs(result["prompt_logprobs"]) if prompt_logprobs else None,
    )


def _step(o: Mapping, layers: Dict[str, List[int]], first_position: int) -> Step:
    """The engine's output of one step as a :class:`Step`; its score rows start at ``first_position``."""
    scores = _scores(o["scores"], layers)
    n = next(iter(scores.values())).shape[0] if scores else 0
    return Step(
        token_id=o.get("token"),
        text=o.get("text", ""),
        scores=scores,
        events=[Event.from_dict(e) for e in o.get("events") or []],
        finish_reason=o.get("finish_reason"),
        positions=list(range(first_position, first_position + n)),
        sinks=[bool(x) for x in o.get("sinks") or []],
        logprobs=_logprobs(o.get("logprobs")),
        prompt_logprobs=_logprobs(o.get("prompt_logprobs")),
    )


def _view(model: Any, kwargs: Mapping) -> Dict[str, Any]:
    """What :func:`_generation` needs beside the engine's result: the tokenizer, the monitor's
    thresholds and whether log-probabilities (of the reply, of the prompt) were asked for."""
    return {
        "tokenizer": model.tokenizer,
        "thresholds": _thresholds(kwargs.get("monitor")),
        "logprobs": kwargs.get("logprobs") is not None,
        "prompt_logprobs": kwargs.get("prompt_logprobs") is not None,
    }


def generate(model: Any, prompts: Any, **kwargs: Any) -> Union[Generation, List[Generation]]:
    """Implementation of :meth:`Model.generate <personacore.Model.generate>`."""
    session, ids, batch, layers = _start(model, prompts, **kwargs)
    session.run()
    view = _view(model, kwargs)
    gens = [_generation(r, p, layers, **view) for r, p in zip(session.results(), ids)]
    return gens if batch else gens[0]


class _DeferSigint:
    """Hold SIGINT back while the engine runs a step, so that a Ctrl-C cannot discard its output.

    Only in the main thread (the only place Python signal handlers run); elsewhere it does nothing.
    On exit the original handler is restored; :meth:`replay` then delivers a held-back SIGINT to it.
    """

    def __enter__(self) -> "_DeferSigint":
        self.pending = False
        self.old: Any = None
        if threading.current_thread() is threading.main_thread():
            current = signal.getsignal(signal.SIGINT)
            if current is not None:  # None: a handler not set from Python, leave it alone
                try:
                    self.old = signal.signal(signal.SIGINT, self._hold)
                except ValueError:  # pragma: no cover - e.g. a sub-interpreter
                    self.old = None
        return self

    def _hold(self, signum: int, frame: Optional[FrameType]) -> None:
        self.pending = True

    def __exit__(self, *exc: Any) -> None:
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)

    def replay(self) -> None:
        """Deliver a held-back SIGINT to the original handler (KeyboardInterrupt by default)."""
        if self.pending:
            self.pending = False
            signal.raise_signal(signal.SIGINT)


class Stream:
    """Iterator over the :class:`Step` objects of one generation (see :meth:`Model.stream`).

    Each ``next()`` runs one decode step in the engine with the GIL released. Ctrl-C during a step
    lets the step finish, then raises ``KeyboardInterrupt``; no token is lost: iterating again
    yields that step first, and :meth:`close` ends the generation. :meth:`generation` returns the
    :class:`Generation` so far (complete once iteration is over; after an early ``close()`` its
    ``finish_reason`` is None). Usable as a context manager (closes on exit).
    """

    def __init__(
        self,
        session: Any,
        prompt_ids: List[int],
        layers: Dict[str, List[int]],
        view: Optional[Dict[str, Any]] = None,
    ):
        """Wrap an engine session (use :meth:`Model.stream` instead)."""
        self._view = dict(view or {})  # tokenizer and thresholds for the Generation
        self._session: Any = session
        self._prompt_ids = prompt_ids
        self._layers = layers
        self._final: Optional[Generation] = None
        self._pending: Optional[Step] = None
        self._scored = 0  # score rows received so far
        self._finish_reason: Optional[str] = None

    def __iter__(self) -> Iterator[Step]:
        return self

    def _engine_step(self) -> Optional[Dict[str, Any]]:
        out = self._session.step()
        return out[0] if out is not None else None

    def _receive(self) -> Optional[Step]:
        """Run engine steps until one produces a token (or the end); None at the end.

        SIGINT is held back for the whole call, so that a Ctrl-C can only interrupt once the step
        is safely stored in ``self._pending``.
        """
        with _DeferSigint() as guard:
            o = self._engine_step()
            step = None if o is None else self._to_step(o)
            if step is not None and step.finish_reason is not None:
                self._finish_reason = step.finish_reason
                # When monitoring, one more forward pass scores the final token: fold it in.
                while not self._session.done:
                    o2 = self._engine_step()
                    if o2 is None:
                        break
                    extra = self._to_step(o2)
                    step.scores = {
                        n: np.concatenate([step.scores[n], extra.scores[n]]) for n in step.scores
                    }
                    step.positions += extra.positions
                    step.sinks += extra.sinks
                    step.events += extra.events
            if guard.pending:
                self._pending = step
                if step is None:
                    self.close()
        if guard.pending:
            guard.replay()  # raises KeyboardInterrupt unless the original handler says otherwise
            self._pending = None
        return step

    def _to_step(self, o: Mapping) -> Step:
        step = _step(o, self._layers, self._scored)
        self._scored += len(step.positions)
        return step

    def __next__(self) -> Step:
        if self._pending is not None:
            step, self._pending = self._pending, None
            return step
        if self._session is None:
            raise StopIteration
        received = self._receive()
        if received is None:
            self.close()
            raise StopIteration
        return received

    @property
    def done(self) -> bool:
        """True once the generation has finished or the stream was closed."""
        return self._session is None or bool(self._session.done)

    def _result(self) -> Generation:
        gen = _generation(self._session.results()[0], self._prompt_ids, self._layers, **self._view)
        if self._finish_reason is None:
            gen.finish_reason = None  # closed before the end: the engine would say "length"
        return gen

    def generation(self) -> Generation:
        """The :class:`Generation` so far (complete once iteration has ended)."""
        if self._session is not None:
            return self._result()
        assert self._final is not None
        return self._final

    def close(self) -> None:
        """Stop generating and free the engine session (safe to call more than once)."""
        if self._session is None:
            return
        try:
            self._final = self._result()
        finally:
            self._session = None

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Stream(prompt_len={len(self._prompt_ids)}, done={self.done})"


def stream(model: Any, prompt: Any, **kwargs: Any) -> Stream:
    """Implementation of :meth:`Model.stream <personacore.Model.stream>`."""
    session, ids, _, layers = _start(model, prompt, single=True, **kwargs)
    return Stream(session, ids[0], layers, _view(model, kwargs))
