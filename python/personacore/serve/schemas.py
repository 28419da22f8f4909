"""Request and response bodies of ``personacore serve``, as typed pydantic models.

The OpenAI fields follow the Chat Completions and Completions APIs. Fields that do not change the
reply (``user``, ``metadata``, ``store``...) are accepted and ignored, as OpenAI-compatible servers
do; fields that would change it and that the server does not implement (``tools``, a JSON
``response_format``, ``best_of``, ``suffix``) are named in a 400, never
silently dropped.
personacore's own fields travel as extra body keys (``steer``, ``monitor``, ``on_alert``;
README, "Serving") and are strict: a misspelt key is an error, not a silently unsteered reply. Types are
checked here; values (coefficients, layers, thresholds, sampling settings) are checked by the
engine, once (docs/architecture.md, "Values are checked once").
"""

from __future__ import annotations

from typing import Annotated, Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatLogprobs",
    "ChatMessage",
    "CompletionLogprobs",
    "CompletionRequest",
    "CompletionResponse",
    "DetokenizeRequest",
    "DetokenizeResponse",
    "ErrorBody",
    "ErrorDetail",
    "ModelCard",
    "ModelList",
    "MonitorBody",
    "PersonaInfo",
    "SteerBody",
    "TokenLogprobOut",
    "TokenizeRequest",
    "TokenizeResponse",
    "TopLogprob",
    "Usage",
    "VectorCard",
    "VectorList",
    "WhenBody",
]


class _Strict(BaseModel):
    """A body of personacore's own: unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid")


class _Open(BaseModel):
    """An OpenAI body: unknown keys are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")


# ---- personacore's extra body keys ---------------------------------------------------------------
#: Bounds on the lists a request may send. The engine checks every stop string at every token of
#: every request in the batch on its one thread, and checks layer lists for duplicates, so
#: unbounded lists would let one request stall all the others.
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 512
MAX_LAYERS = 1024
StopString = Annotated[str, Field(max_length=MAX_STOP_LENGTH)]
StopList = Annotated[List[StopString], Field(max_length=MAX_STOP_STRINGS)]
#: The most ``logit_bias`` entries a request may send (OpenAI's limit; each is applied per token).
MAX_LOGIT_BIAS = 300
#: The most top log-probabilities a token may list (OpenAI's ``top_logprobs`` bound).
MAX_TOP_LOGPROBS = 20
LayerList = Annotated[List[int], Field(max_length=MAX_LAYERS)]


class WhenBody(_Strict):
    """A steering condition: on while the monitor score of ``vector`` is above (or below) a value.

    ``min_on`` defaults to 8 here (``pc.When`` defaults to 0): measured on the default model, plain
    switching flips 70 times per 100 tokens and a hold of 8 tokens 19 times (benches/README.md,
    "Closed loop"), so a served conditional steer holds unless the request says otherwise.
    ``mode="proportional"`` scales the coefficient by ``min(1, gain × excess)``.
    """

    vector: str
    above: Optional[float] = None
    below: Optional[float] = None
    hysteresis: float = 0.0
    layer: Optional[int] = None
    min_on: int = 8
    min_off: int = 0
    mode: Literal["switch", "proportional"] = "switch"
    gain: Optional[float] = None


class SteerBody(_Strict):
    """One intervention on a named vector: ``add`` (``coef``), ``ablate`` or ``cap`` (``min``/``max``).

    ``layers`` omitted: the vector's recommended layer. ``positions``: ``all``, ``prompt`` or
    ``response`` (docs/conventions.md, "Positions").
    """

    vector: str
    kind: Literal["add", "ablate", "cap"] = "add"
    coef: Optional[float] = None
    min: Optional[float] = None
    max: Optional[float] = None
    layers: Union[int, LayerList, None] = None
    positions: str = "all"
    when: Optional[WhenBody] = None


class MonitorBody(_Strict):
    """Which vectors to score, where, and when to raise alerts.

    ``vectors`` omitted: every vector the server loaded. ``layers``: ``"recommended"`` (each
    vector's own layer), ``"all"`` or a list of layers. ``thresholds``: a number, ``{name: number}``
    or ``"auto"`` (from each vector's stored statistics, see :func:`personacore.vectors.calibration.auto_threshold`).
    """

    vectors: Optional[List[str]] = None
    layers: Union[Literal["recommended", "all"], LayerList] = "recommended"
    thresholds: Union[float, Dict[str, float], Literal["auto"], None] = None


class _PersonaFields(_Open):
    """The fields every generation request shares: sampling, limits and personacore's extras."""

    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    stop: Union[StopString, StopList, None] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    #: ``{token id (a string in JSON): bias in [-100, 100]}``
    logit_bias: Optional[Dict[str, float]] = Field(default=None, max_length=MAX_LOGIT_BIAS)
    n: int = 1
    stream: bool = False
    stream_options: Optional[Dict[str, Any]] = None
    ignore_eos: bool = False
    steer: Optional[List[SteerBody]] = None
    monitor: Optional[MonitorBody] = None
    on_alert: Literal["flag", "steer", "stop"] = "flag"


class ChatMessage(_Open):
    """One chat message; ``content`` is a string or a list of ``{"type": "text", "text": ...}`` parts."""

    role: str
    content: Union[str, List[Dict[str, Any]], None] = None


class ChatCompletionRequest(_PersonaFields):
    """``POST /v1/chat/completions``."""

    messages: List[ChatMessage] = Field(min_length=1)
    #: vLLM's extensions: ``add_generation_prompt=false`` renders the chat without opening an
    #: assistant turn (to score a conversation that ends with an assistant message), and
    #: ``prompt_logprobs=k`` reports each prompt token's log-probability and the top ``k``
    add_generation_prompt: bool = True
    prompt_logprobs: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    # not implemented: a request that sets them gets a 400 naming them (see _Server.prepare)
    response_format: Optional[Dict[str, Any]] = None
    tools: Optional[List[Any]] = None
    tool_choice: Optional[Any] = None
    functions: Optional[List[Any]] = None
    function_call: Optional[Any] = None


class CompletionRequest(_PersonaFields):
    """``POST /v1/completions``: a prompt or a list of prompts, each text or token ids."""

    prompt: Union[str, List[int], List[str], List[List[int]]]
    echo: bool = False
    logprobs: Optional[int] = None
    # not implemented: a request that sets them gets a 400 naming them (see _Server.prepare)
    best_of: Optional[int] = None
    suffix: Optional[str] = None


# ---- responses -----------------------------------------------------------------------------------
class PersonaInfo(BaseModel):
    """The ``persona`` object of a response or stream chunk.

    ``scores[name]`` is ``[n_tokens][n_layers]`` for the generated tokens at ``positions`` (indices
    into prompt + generated tokens; a token is scored in the forward pass that reads it, so a stream
    chunk carries the score of the previous token), at the layers ``layers[name]``.
    ``prompt_last`` holds the scores of the last prompt token (the state just before the reply),
    ``thresholds`` the alert lines in use and ``events`` what the monitor and conditional steering did.
    Scores are float32, written as the shortest decimal that reads back as the same float32 (null
    for a non-finite one). A stream sends ``layers`` and ``thresholds`` once, in its opening chunk
    (the one with the assistant role), and null in the chunks after it; a whole reply has both.
    """

    request_id: str
    positions: List[int] = Field(default_factory=list)
    layers: Optional[Dict[str, List[int]]] = None
    scores: Dict[str, List[List[float]]] = Field(default_factory=dict)
    prompt_last: Optional[Dict[str, List[float]]] = None
    thresholds: Optional[Dict[str, float]] = None
    events: List[Dict[str, Any]] = Field(default_factory=list)


class Usage(BaseModel):
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    """One of the most likely tokens at a step (chat ``top_logprobs``)."""

    token: str
    logprob: float
    bytes: Optional[List[int]] = None


class TokenLogprobOut(TopLogprob):
    """One generated token of a chat reply's ``logprobs.content``.

    ``token`` is the token's text, or ``bytes:\\xNN...`` when its bytes are not UTF-8 on their own
    (a piece of a split character; ``bytes`` holds them exactly). Log-probabilities are the
    model's own (before temperature, top-k/top-p, penalties and ``logit_bias``); ``-9999.0`` stands
    for minus infinity.
    """

    top_logprobs: List[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    """A chat choice's ``logprobs``."""

    content: Optional[List[TokenLogprobOut]] = None


class CompletionLogprobs(BaseModel):
    """A completion choice's ``logprobs`` (the legacy layout): per token its text, log-probability,
    ``{text: logprob}`` of the most likely tokens and character offset in the reply's text. With
    ``echo`` the prompt's tokens come first, the first with null log-probability and top (nothing
    before it predicts it)."""

    tokens: List[str] = Field(default_factory=list)
    token_logprobs: List[Optional[float]] = Field(default_factory=list)
    top_logprobs: List[Optional[Dict[str, float]]] = Field(default_factory=list)
    text_offset: List[int] = Field(default_factory=list)


class _ChatChoice(BaseModel):
    index: int = 0
    message: _ChatMessageOut
    finish_reason: Optional[str]
    logprobs: Optional[ChatLogprobs] = None


class PromptLogprob(BaseModel):
    """One token of a ``prompt_logprobs`` entry: its log-probability, its rank (1: the most
    likely; null for a prompt token outside the top ``k``) and its text."""

    logprob: float
    rank: Optional[int] = None
    decoded_token: str


class ChatCompletionResponse(BaseModel):
    """A non-streamed chat reply."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: List[_ChatChoice]
    usage: Usage
    #: with ``prompt_logprobs``: per prompt token, null for the first, else
    #: ``{token id: PromptLogprob}`` for the prompt token and the most likely ones (vLLM's layout)
    prompt_logprobs: Optional[List[Optional[Dict[str, "PromptLogprob"]]]] = None
    #: always sent; filled in when the body is written (scores as float32 arrays)
    persona: Optional[PersonaInfo] = None


class _Delta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class _ChunkChoice(BaseModel):
    index: int = 0
    delta: _Delta
    finish_reason: Optional[str] = None
    logprobs: Optional[ChatLogprobs] = None


class ChatCompletionChunk(BaseModel):
    """One SSE chunk of a streamed chat reply."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: List[_ChunkChoice]
    usage: Optional[Usage] = None
    persona: Optional[PersonaInfo] = None


class _TextChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Optional[str] = None
    logprobs: Optional[CompletionLogprobs] = None


class CompletionResponse(BaseModel):
    """A completion, or one SSE chunk of a streamed one (same object, as OpenAI sends)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: List[_TextChoice]
    usage: Optional[Usage] = None
    persona: Optional[PersonaInfo] = None


class TokenizeRequest(_Open):
    """``POST /tokenize`` (vLLM's shape): a ``prompt`` as ``/v1/completions`` tokenizes it, or
    ``messages`` as ``/v1/chat/completions`` does (the ids the ``persona`` positions index)."""

    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[List[ChatMessage]] = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    """The ids of a ``/tokenize`` request, their count, the context length and (when asked) each
    token's text (see :mod:`personacore.serve.logprobs` for split characters)."""

    count: int
    max_model_len: int
    tokens: List[int]
    token_strs: Optional[List[str]] = None


class DetokenizeRequest(_Open):
    """``POST /detokenize``: token ids back to text."""

    model: Optional[str] = None
    tokens: List[int]


class DetokenizeResponse(BaseModel):
    """The text of ``/detokenize``'s ids."""

    prompt: str


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models``."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "personacore"
    max_model_len: int


class ModelList(BaseModel):
    """``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: List[ModelCard]


class VectorCard(BaseModel):
    """One entry of ``GET /v1/vectors``: a vector loaded at start, and what ``"auto"`` uses."""

    name: str
    layer: Optional[int]
    shape: List[int]
    trait: Optional[str] = None
    auto_threshold: Optional[float] = None


class VectorList(BaseModel):
    """``GET /v1/vectors``."""

    object: Literal["list"] = "list"
    data: List[VectorCard]


class ErrorDetail(BaseModel):
    """The ``error`` member of an OpenAI error body."""

    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorBody(BaseModel):
    """Every error response: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail
