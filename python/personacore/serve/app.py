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

Here: the routes, parsing and the streaming loop. The middleware that enforces the body limits
and timeouts is :mod:`.guard`; a request's conversion and the ``persona`` objects, :mod:`.state`;
the response bodies, :mod:`.render`.
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
import uuid
from typing import Any, AsyncIterator, Dict, List, Mapping, Optional, Tuple, Type, TypeVar, Union

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from ..engine import Generation, Model, Step, load_model
from ..errors import InvalidInputError
from ..vectors import PersonaVector
from . import errors
from .errors import APIError
from .guard import REPLICA_HEADER, Guard
from .metrics import CONTENT_TYPE, stats_dict
from .render import ChatRender, TextRender, json_body, openai_finish, sse, sse_dict
from .schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    VectorCard,
    VectorList,
)
from .state import (
    Prepared,
    ServeOptions,
    Server,
    auto_threshold,
    chat_messages,
)

__all__ = ["ServeOptions", "auto_threshold", "create_app", "load_vectors", "REPLICA_HEADER"]

_LOG = logging.getLogger("personacore.serve")


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


def _as_list(prompt: Any) -> List[Any]:
    """A completion request's prompts: one (a str or token ids) or a list of them."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    return list(prompt) if prompt else [prompt]


_RID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _request_id(request: Request, prefix: str) -> str:
    """The client's ``x-request-id`` when it is a short plain token, else a new ``prefix-<uuid>``."""
    given = request.headers.get("x-request-id", "")
    return given if _RID.match(given) else f"{prefix}-{uuid.uuid4().hex}"


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


def _submit(engine: Any, ps: List[Prepared]) -> List[Any]:
    """Submit every choice; if one is refused, the others are cancelled."""
    handles: List[Any] = []
    try:
        for p in ps:
            handles.append(engine.submit(p.prompt_ids, **p.kwargs))
    except BaseException:
        for h in handles:
            h.cancel()
        raise
    return handles


async def _first(steps: AsyncIterator[Step]) -> Optional[Step]:
    try:
        return await steps.__anext__()
    except StopAsyncIteration:
        return None


async def _run(
    server: Server,
    request: Request,
    ps: List[Prepared],
    stream: bool,
    render: Any,
    rid: str,
    prompt_len: int,
) -> Any:
    """Submit a prepared request's choices and answer them (JSON or SSE); ``render`` builds the
    bodies.

    A stream waits for each choice's first step before it answers, so that a request the engine
    refuses is an HTTP error, not an error chunk. A client that leaves cancels its request.
    ``rid`` is the reply's id (its choices' are ``RID.i`` when there are several), ``prompt_len``
    the request's prompt tokens (each prompt once, for ``usage`` and the metrics).
    """
    handles = await run_in_threadpool(_submit, server.engine, ps)
    if stream:
        iters = [h.__aiter__() for h in handles]
        try:
            firsts = list(await asyncio.gather(*(_first(it) for it in iters)))
        except BaseException:
            for h in handles:
                h.cancel()
            raise
        state = _StreamState()

        def close() -> None:
            if state.closed:
                return
            state.closed = True
            if not state.finished:
                for h in handles:  # the client went away (or the request failed): free the slots
                    h.cancel()
            server.metrics.count_reply(prompt_len, state.generated, state.events)
            server.release(True, len(ps))

        body = _stream(server, iters, firsts, ps, render, state, prompt_len)
        return _SSE(body, close, rid)
    gone = asyncio.ensure_future(_until_disconnected(request))
    done = asyncio.ensure_future(asyncio.gather(*(h.aresult() for h in handles)))
    answered = False
    try:
        await asyncio.wait({gone, done}, return_when=asyncio.FIRST_COMPLETED)
        if not done.done():
            raise APIError(499, "the client closed the connection", code="client_closed")
        gens: List[Generation] = list(done.result())
        answered = True
    finally:
        gone.cancel()
        if not answered:
            for h in handles:
                h.cancel()
        if not done.done():
            done.cancel()
    personas = [server.persona_of(p, gen) for p, gen in zip(ps, gens)]
    generated = sum(len(gen.token_ids) for gen in gens)
    events = [e for persona in personas for e in persona["events"]]
    server.metrics.count_reply(prompt_len, generated, events)
    body = render.full(ps, gens, server.usage(prompt_len, generated))
    data = json_body(body, personas[0]) if len(ps) == 1 else json_body(body, None, personas)
    return Response(data, media_type="application/json", headers={"x-request-id": rid})


async def _interleaved(
    iters: List[AsyncIterator[Step]], firsts: List[Optional[Step]]
) -> AsyncIterator[Tuple[int, Step]]:
    """``(choice, step)`` of every choice's steps, in the order they come; each choice's in order."""
    if len(iters) == 1:
        step = firsts[0]
        while step is not None:
            yield 0, step
            step = await _first(iters[0])
        return
    queue: "asyncio.Queue[Tuple[int, Any]]" = asyncio.Queue()

    async def pump(i: int) -> None:
        step = firsts[i]
        try:
            while step is not None:
                await queue.put((i, step))
                step = await _first(iters[i])
        except Exception as e:  # noqa: BLE001 - handed to the stream, which sends it as a chunk
            await queue.put((i, e))
            return
        await queue.put((i, None))

    pumps = [asyncio.ensure_future(pump(i)) for i in range(len(iters))]
    try:
        live = len(pumps)
        while live:
            i, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if item is None:
                live -= 1
            else:
                yield i, item
    finally:
        for t in pumps:
            t.cancel()


async def _stream(
    server: Server,
    iters: List[AsyncIterator[Step]],
    firsts: List[Optional[Step]],
    ps: List[Prepared],
    render: Any,
    state: "_StreamState",
    prompt_len: int,
) -> AsyncIterator[bytes]:
    """The SSE body: each choice's opening chunk, a chunk per step of any choice (each choice's
    last with its finish reason), then ``[DONE]``.

    ``state`` records what was sent and whether it finished.
    """
    try:
        for p, first in zip(ps, firsts):
            yield sse(render.opening(p, first))
        async for i, step in _interleaved(iters, firsts):
            p = ps[i]
            state.generated += step.token_id is not None
            persona = server.persona_of_step(p, step)
            state.events += persona["events"]
            finish = openai_finish(step.finish_reason)
            lps = render.logprobs(p, step.logprobs) if p.top is not None else None
            yield sse_dict(render.chunk_dict(step.text, finish, persona, lps, p.index))
        if ps[0].include_usage:
            yield sse(render.usage_chunk(ps[0], server.usage(prompt_len, state.generated)))
        yield b"data: [DONE]\n\n"
        state.finished = True
    except Exception as e:  # noqa: BLE001 - after the headers an error can only be sent as a chunk
        err = APIError.from_exception(e)
        yield f"data: {json.dumps(errors.error_body(err))}\n\n".encode()


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
    server = Server(model, named, engine, opts)

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
        Guard,
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
        messages = chat_messages(req.messages)
        ids = await run_in_threadpool(
            model.encode_chat, messages, add_generation_prompt=req.add_generation_prompt
        )
        return await _serve(req, request, [list(ids)], rid, ChatRender(server, rid))

    @v1.post("/completions", response_model=None)
    async def completions(request: Request) -> Any:
        """OpenAI (legacy) completions of a prompt or a list of prompts, text or token ids."""
        req = await _parse(request, CompletionRequest)
        rid = _request_id(request, "cmpl")
        prompts, echoes = await run_in_threadpool(_completion_prompts, req.prompt, req.echo)
        return await _serve(req, request, prompts, rid, TextRender(server, rid), echoes)

    def _completion_prompts(prompt: Any, echo: bool) -> Tuple[List[List[int]], Optional[List[str]]]:
        """Each prompt's token ids, and with ``echo`` its text (a token-id prompt decoded)."""
        given = _as_list(prompt)
        ids = [
            list(model.tokenizer.encode(p, add_special_tokens=True))
            if isinstance(p, str)
            else list(p)
            for p in given
        ]
        if not echo:
            return ids, None
        return ids, [p if isinstance(p, str) else model.tokenizer.decode(p) for p in given]

    async def _serve(
        req: Any,
        request: Request,
        prompts: List[List[int]],
        rid: str,
        render: Any,
        echoes: Optional[List[str]] = None,
    ) -> Any:
        # off the event loop: resolving steering and monitor specs runs the engine's checks
        ps = await run_in_threadpool(server.prepare, req, prompts, rid, echoes)
        server.admit(req.stream, len(ps))
        handed_over = False  # a stream releases its places when its body ends (_stream)
        try:
            prompt_len = sum(len(ids) for ids in prompts)  # each prompt once, not per choice
            response = await _run(server, request, ps, req.stream, render, rid, prompt_len)
            handed_over = req.stream
            return response
        finally:
            if not handed_over:
                server.release(req.stream, len(ps))

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
            messages = chat_messages(req.messages or [])
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
