"""The response bodies of ``personacore serve``: whole replies and stream chunks of
``/v1/chat/completions`` (:class:`ChatRender`) and ``/v1/completions`` (:class:`TextRender`),
written as JSON with float32 scores."""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional

import orjson
from pydantic import BaseModel

from ..engine import Generation, Step, TokenLogprob
from .logprobs import CompletionLogprobs, chat_logprobs, join_logprobs, prompt_logprobs_list
from .schemas import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionResponse,
    PersonaInfo,
    Usage,
)
from .state import Prepared, Server

#: engine finish reasons -> OpenAI's (a stop string and the end-of-sequence token are both "stop")
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "content_filter": "content_filter"}


def openai_finish(reason: Optional[str]) -> Optional[str]:
    """OpenAI's finish reason for the engine's (others, such as ``"cancelled"``, pass as they are)."""
    return FINISH.get(reason or "", reason)


def json_body(
    body: BaseModel,
    persona: Optional[Dict[str, Any]] = None,
    choice_personas: Optional[List[Dict[str, Any]]] = None,
) -> bytes:
    """``body`` as JSON, its ``persona`` field set to ``persona`` (see :class:`PersonaInfo`), or
    with ``choice_personas``, each choice's ``persona`` field set to its own (a reply of ``n`` > 1
    choices, whose top-level ``persona`` stays null).

    Scores stay float32 arrays and are written by orjson, each as the shortest decimal that reads
    back as the same float32 (about half the bytes of their float64 expansion, and ~8x faster than
    a list of Python floats through pydantic); a non-finite score (an overflowing steer) becomes
    null, as before.
    """
    data = body.model_dump()
    if persona is not None:
        data["persona"] = persona
    for choice, own in zip(data["choices"], choice_personas or []):
        choice["persona"] = own
    return orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY)


def sse(body: BaseModel, persona: Optional[Dict[str, Any]] = None) -> bytes:
    """One server-sent event carrying ``body`` (and its ``persona``, see :func:`json_body`)."""
    return b"data: " + json_body(body, persona) + b"\n\n"


def sse_dict(data: Dict[str, Any]) -> bytes:
    """One server-sent event carrying ``data``, a body already in its ``model_dump()`` shape.

    The per-token chunks of a stream are written this way, without building and validating a
    pydantic model per token (tests check the bytes equal :func:`sse` of the schema's model).
    """
    return b"data: " + orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n\n"


def opening_persona(p: Prepared) -> PersonaInfo:
    """The ``persona`` of a stream's opening chunk: what its later chunks' scores refer to."""
    return PersonaInfo(request_id=p.rid, layers=p.layers, thresholds=p.thresholds)


class ChatRender:
    """Bodies of ``/v1/chat/completions``."""

    def __init__(self, server: Server, rid: str):
        self.model, self.rid, self.created = server.name, rid, int(time.time())
        self.texts = server.token_texts

    def logprobs(self, p: Prepared, lps: List[TokenLogprob]) -> Dict[str, Any]:
        """The ``logprobs`` of a choice holding the tokens ``lps``."""
        return chat_logprobs(lps, self.texts)

    def full(
        self, ps: List[Prepared], gens: List[Generation], usage: Usage
    ) -> ChatCompletionResponse:
        """The whole reply, a choice per generation (its ``persona`` is written by :func:`json_body`)."""
        return ChatCompletionResponse.model_validate(
            {
                "id": self.rid,
                "created": self.created,
                "model": self.model,
                "choices": [
                    {
                        "index": p.index,
                        "message": {"content": gen.text},
                        "finish_reason": openai_finish(gen.finish_reason),
                        "logprobs": self.logprobs(p, gen.logprobs or [])
                        if p.top is not None
                        else None,
                    }
                    for p, gen in zip(ps, gens)
                ],
                "usage": usage,
                # the prompt is the same for every choice
                "prompt_logprobs": prompt_logprobs_list(gens[0].prompt_logprobs, self.texts)
                if gens[0].prompt_logprobs is not None
                else None,
            }
        )

    def _chunk(
        self,
        delta: Dict[str, Any],
        finish: Optional[str],
        persona: Optional[PersonaInfo],
        usage: Optional[Usage] = None,
        choices: bool = True,
        index: int = 0,
    ) -> ChatCompletionChunk:
        return ChatCompletionChunk.model_validate(
            {
                "id": self.rid,
                "created": self.created,
                "model": self.model,
                "choices": [{"index": index, "delta": delta, "finish_reason": finish}]
                if choices
                else [],
                "usage": usage,
                "persona": persona,
            }
        )

    def opening(self, p: Prepared, first: Optional[Step] = None) -> ChatCompletionChunk:
        """A choice's first chunk: the role, and the ``layers`` and ``thresholds`` of every later
        score."""
        return self._chunk(
            {"role": "assistant", "content": ""}, None, opening_persona(p), index=p.index
        )

    def chunk(self, p: Prepared, text: str, finish: Optional[str]) -> ChatCompletionChunk:
        """A step's chunk (its ``persona`` is written by :func:`sse`)."""
        return self._chunk({"content": text}, finish, None, index=p.index)

    def chunk_dict(
        self,
        text: str,
        finish: Optional[str],
        persona: Optional[Dict[str, Any]],
        logprobs: Optional[Dict[str, Any]] = None,
        index: int = 0,
    ) -> Dict[str, Any]:
        """:meth:`chunk`'s ``model_dump()`` with its ``persona``, built without the model (per token)."""
        choice = {
            "index": index,
            "delta": {"role": None, "content": text},
            "finish_reason": finish,
            "logprobs": logprobs,
        }
        return chunk_body(self, "chat.completion.chunk", choice, persona)

    def usage_chunk(self, p: Prepared, usage: Usage) -> ChatCompletionChunk:
        return self._chunk({}, None, None, usage, choices=False)


def chunk_body(
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


class TextRender:
    """Bodies of ``/v1/completions``."""

    def __init__(self, server: Server, rid: str):
        self.model, self.rid, self.created = server.name, rid, int(time.time())
        self.texts = server.token_texts
        self._logprobs: Dict[int, CompletionLogprobs] = {}

    def _own(self, p: Prepared) -> CompletionLogprobs:
        """Choice ``p.index``'s logprobs so far: offsets count from the start of the echoed prompt
        when its tokens are reported, else from the end of it."""
        if p.index not in self._logprobs:
            start = 0 if p.prompt_logprobs else len(p.echo)
            self._logprobs[p.index] = CompletionLogprobs(self.texts, start=start)
        return self._logprobs[p.index]

    def logprobs(self, p: Prepared, lps: List[TokenLogprob]) -> Dict[str, Any]:
        """The ``logprobs`` of choice ``p.index`` holding the tokens ``lps`` (the next ones of its
        reply)."""
        return self._own(p).add(lps)

    def prompt_logprobs(self, p: Prepared, lps: List[TokenLogprob]) -> Optional[Dict[str, Any]]:
        """The ``logprobs`` of choice ``p.index``'s echoed prompt (its first token has none:
        null), when the request asked for them (``echo`` with ``logprobs``), else None."""
        if not p.prompt_logprobs:
            return None
        return self._own(p).add_prompt(p.prompt_ids[0], lps)

    def _body(
        self,
        text: str,
        finish: Optional[str],
        persona: Optional[PersonaInfo],
        usage: Optional[Usage] = None,
        choices: bool = True,
        logprobs: Optional[Dict[str, Any]] = None,
        index: int = 0,
    ) -> CompletionResponse:
        choice = {"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}
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

    def full(self, ps: List[Prepared], gens: List[Generation], usage: Usage) -> CompletionResponse:
        """The whole reply, a choice per generation, each after the prompt with ``echo`` (its
        ``persona`` is written by :func:`json_body`)."""
        return CompletionResponse.model_validate(
            {
                "id": self.rid,
                "created": self.created,
                "model": self.model,
                "choices": [
                    {
                        "index": p.index,
                        "text": p.echo + gen.text,
                        "finish_reason": openai_finish(gen.finish_reason),
                        "logprobs": self._whole_logprobs(p, gen),
                    }
                    for p, gen in zip(ps, gens)
                ],
                "usage": usage,
            }
        )

    def _whole_logprobs(self, p: Prepared, gen: Generation) -> Optional[Dict[str, Any]]:
        if p.top is None:
            return None
        echoed = self.prompt_logprobs(p, gen.prompt_logprobs or [])  # first: offsets run on
        reply = self.logprobs(p, gen.logprobs or [])
        return reply if echoed is None else join_logprobs(echoed, reply)

    def opening(self, p: Prepared, first: Optional[Step] = None) -> CompletionResponse:
        """A choice's first chunk: the echoed prompt (with its logprobs, from the ``first`` step,
        when asked for), and the ``layers`` and ``thresholds`` of every later score."""
        lps = self.prompt_logprobs(p, first.prompt_logprobs if first is not None else [])
        return self._body(p.echo, None, opening_persona(p), logprobs=lps, index=p.index)

    def chunk(self, p: Prepared, text: str, finish: Optional[str]) -> CompletionResponse:
        """A step's chunk (its ``persona`` is written by :func:`sse`)."""
        return self._body(text, finish, None, index=p.index)

    def chunk_dict(
        self,
        text: str,
        finish: Optional[str],
        persona: Optional[Dict[str, Any]],
        logprobs: Optional[Dict[str, Any]] = None,
        index: int = 0,
    ) -> Dict[str, Any]:
        """:meth:`chunk`'s ``model_dump()`` with its ``persona``, built without the model (per token)."""
        choice = {"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}
        return chunk_body(self, "text_completion", choice, persona)

    def usage_chunk(self, p: Prepared, usage: Usage) -> CompletionResponse:
        return self._body("", None, None, usage, choices=False)
