"""Loading models and reading their activations: :func:`load_model`, :class:`Model`, :class:`Tokenizer`.

The heavy lifting happens in the Rust engine (``personacore._core``); this module validates the
caller's arguments first so that mistakes produce an :class:`~personacore.errors.InvalidInputError`
naming the exact problem (the engine checks again as a backstop).

Layer layout of every activation array (DESIGN.md section 2): ``num_layers + 1`` rows; row 0 is the
token embeddings, row ``i`` the residual stream after decoder block ``i`` (1-based), and the last
row the final norm applied to the output of the last block (as ``transformers`` returns it).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np

from ..errors import InvalidInputError, ModelNotFoundError
from .generation import generate, stream
from .native import native
from .specs import resolve_single_forward

__all__ = ["VALID_POOLINGS", "VALID_DTYPES", "Model", "Tokenizer", "load_model"]

#: Pooling names accepted by :meth:`Model.pool` (DESIGN.md section 2).
VALID_POOLINGS = ("response_avg", "prompt_avg", "prompt_last")
#: Activation dtypes accepted by :func:`load_model` (aliases are normalised to these).
VALID_DTYPES = ("f32", "f16", "bf16")

_DTYPE_ALIASES = {
    "f32": "f32",
    "float32": "f32",
    "fp32": "f32",
    "f16": "f16",
    "float16": "f16",
    "fp16": "f16",
    "half": "f16",
    "bf16": "bf16",
    "bfloat16": "bf16",
}
_DEVICE_RE = re.compile(r"^(cpu|cuda|cuda:\d+)$")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

Ids = Union[Sequence[int], np.ndarray]
Messages = Sequence[Mapping]




def _steer_dicts(steer: Any, model: "Model") -> Optional[List[Dict[str, Any]]]:
    """Engine steer dicts for a single forward pass, or None without steering."""
    if steer is None:
        return None
    return resolve_single_forward(steer, model)


def _type_name(x: Any) -> str:
    return type(x).__name__


def _as_ids(ids: Any, limit: int, what: str = "ids", allow_empty: bool = False) -> List[int]:
    """Validate a sequence of token ids (list/tuple of ints or a 1-D integer numpy array)."""
    if isinstance(ids, (str, bytes)) or ids is None:
        raise InvalidInputError(f"{what} must be a list of token ids (ints), got {_type_name(ids)}")
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1:
            raise InvalidInputError(f"{what} must be 1-D, got an array of shape {ids.shape}")
        if ids.size and ids.dtype.kind not in "iu":
            raise InvalidInputError(f"{what} must be integers, got an array of dtype {ids.dtype}")
        out = [int(i) for i in ids.tolist()]
    else:
        try:
            seq = list(ids)
        except TypeError:
            raise InvalidInputError(
                f"{what} must be a list of token ids (ints), got {_type_name(ids)}"
            ) from None
        out = []
        for pos, i in enumerate(seq):
            if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
                raise InvalidInputError(
                    f"{what}[{pos}] = {i!r} is a {_type_name(i)}, expected an int token id"
                )
            out.append(int(i))
    if not out and not allow_empty:
        raise InvalidInputError(f"{what} is empty: at least one token id is needed")
    for pos, i in enumerate(out):
        if i < 0 or i >= limit:
            raise InvalidInputError(
                f"{what}[{pos}] = {i} is out of range: token ids must be in [0, {limit})"
            )
    return out


def _as_messages(messages: Any, what: str = "messages") -> List[Dict[str, Any]]:
    """Validate a chat: a non-empty list of dicts with a string 'role'."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Iterable):
        raise InvalidInputError(
            f"{what} must be a list of message dicts like {{'role': 'user', 'content': '...'}}, "
            f"got {_type_name(messages)}"
        )
    out = []
    for pos, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InvalidInputError(f"{what}[{pos}] must be a dict, got {_type_name(m)}")
        if not isinstance(m.get("role"), str):
            raise InvalidInputError(f"{what}[{pos}] needs a string 'role' (e.g. 'user')")
        out.append(dict(m))
    if not out:
        raise InvalidInputError(f"{what} is empty: at least one message is needed")
    return out


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
            raise InvalidInputError(f"text to encode must be a str, got {_type_name(text)}")
        return list(self._core.encode(text, bool(add_special_tokens)))

    def decode(self, ids: Ids, skip_special_tokens: bool = False) -> str:
        """Turn token ids back into text (ids must be ints in ``[0, vocab_size)``)."""
        checked = _as_ids(ids, self.vocab_size, allow_empty=True)
        return self._core.decode(checked, bool(skip_special_tokens))

    def token_to_id(self, token: str) -> Optional[int]:
        """The id of a token string (as it appears in the vocabulary), or None."""
        if not isinstance(token, str):
            raise InvalidInputError(f"token must be a str, got {_type_name(token)}")
        return self._core.token_to_id(token)

    def id_to_token(self, token_id: int) -> Optional[str]:
        """The vocabulary string of ``token_id``, or None when it is out of range."""
        if isinstance(token_id, bool) or not isinstance(token_id, (int, np.integer)):
            raise InvalidInputError(f"token id must be an int, got {_type_name(token_id)}")
        if token_id < 0:
            return None
        return self._core.id_to_token(int(token_id))

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
        return self._core.chat_text(_as_messages(messages), bool(add_generation_prompt))

    def encode_chat(self, messages: Messages, add_generation_prompt: bool = True) -> List[int]:
        """Token ids of the rendered chat: ``encode(chat_text(...), add_special_tokens=False)``."""
        return self._tokenizer.encode(self.chat_text(messages, add_generation_prompt), False)

    def _check_ids(self, ids: Any, what: str = "ids") -> List[int]:
        out = _as_ids(ids, self.vocab_size, what)
        if len(out) > self.max_position_embeddings:
            raise InvalidInputError(
                f"{what} has {len(out)} tokens, more than the model's "
                f"max_position_embeddings ({self.max_position_embeddings})"
            )
        return out

    # ---- activations --------------------------------------------------------------------------
    def hidden_states(self, ids: Ids, steer: Any = None) -> np.ndarray:
        """All hidden states of one sequence: float32 ``[num_layers + 1, len(ids), hidden_size]``.

        ``steer`` (a :class:`~personacore.Steer`/``Ablate``/``Cap`` or a list of them) is applied in
        this forward pass: rows after a steered layer show its effect. Positions ``"all"`` and
        ``"prompt"`` act on every position, ``"response"`` on the last one.
        """
        checked = self._check_ids(ids)
        steers = _steer_dicts(steer, self)
        if steers is None:
            return self._core.hidden_states(checked)
        return self._core.hidden_states(checked, steers)

    def logits(self, ids: Ids, steer: Any = None) -> np.ndarray:
        """Next-token logits at every position: float32 ``[len(ids), vocab_size]``.

        ``steer`` is applied in this forward pass, as in :meth:`hidden_states`.
        """
        checked = self._check_ids(ids)
        steers = _steer_dicts(steer, self)
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
    ) -> Any:
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
        it happens (flushed line by line).
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
    ) -> Any:
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
        )

    def _prompt_ids(self, prompt: Any, index: int) -> List[int]:
        what = f"prompts[{index}]"
        if isinstance(prompt, str):
            ids = self._tokenizer.encode(prompt, False)
        elif isinstance(prompt, np.ndarray):
            ids = _as_ids(prompt, self.vocab_size, what, allow_empty=True)
        elif isinstance(prompt, Sequence) and len(prompt) and isinstance(prompt[0], Mapping):
            ids = self.encode_chat(_as_messages(prompt, what), add_generation_prompt=True)
        elif isinstance(prompt, Sequence):
            ids = _as_ids(prompt, self.vocab_size, what, allow_empty=True)
        else:
            raise InvalidInputError(
                f"{what} must be a str, a list of message dicts or a list of token ids, "
                f"got {_type_name(prompt)}"
            )
        if not ids:
            raise InvalidInputError(f"{what} is empty: a prompt needs at least one token")
        return ids

    def _response_ids(self, response: Any, index: int) -> List[int]:
        if isinstance(response, str):
            return self._tokenizer.encode(response, False)
        if isinstance(response, (np.ndarray, Sequence)):
            return _as_ids(response, self.vocab_size, f"responses[{index}]", allow_empty=True)
        raise InvalidInputError(
            f"responses[{index}] must be a str or a list of token ids, got {_type_name(response)}"
        )

    def pool(
        self,
        prompts: Sequence[Any],
        responses: Sequence[Any],
        poolings: Union[str, Sequence[str]] = VALID_POOLINGS,
        batch_size: int = 8,
    ) -> Dict[str, np.ndarray]:
        """Pooled hidden states of (prompt, response) pairs at every layer.

        Each prompt is a str (already rendered text), a list of message dicts (rendered with the
        chat template and ``add_generation_prompt=True``) or a list of token ids; each response is
        a str or a list of token ids. Both are tokenized without special tokens and concatenated.
        Returns ``{pooling: float32 [len(prompts), num_layers + 1, hidden_size]}`` for each of
        ``poolings`` (``response_avg``, ``prompt_avg``, ``prompt_last``).
        """
        if isinstance(prompts, (str, Mapping)) or isinstance(responses, (str, Mapping)):
            raise InvalidInputError("prompts and responses must be lists (one item per sample)")
        prompts, responses = list(prompts), list(responses)
        if len(prompts) != len(responses):
            raise InvalidInputError(
                f"prompts and responses must have the same length: "
                f"got {len(prompts)} prompts and {len(responses)} responses"
            )
        if not prompts:
            raise InvalidInputError(
                "prompts is empty: at least one (prompt, response) pair is needed"
            )
        names = [poolings] if isinstance(poolings, str) else list(poolings)
        if not names:
            raise InvalidInputError(f"poolings is empty; choose from {', '.join(VALID_POOLINGS)}")
        for name in names:
            if name not in VALID_POOLINGS:
                raise InvalidInputError(
                    f"unknown pooling {name!r}; valid poolings: {', '.join(VALID_POOLINGS)}"
                )
        names = list(dict.fromkeys(names))
        if (
            isinstance(batch_size, bool)
            or not isinstance(batch_size, (int, np.integer))
            or batch_size < 1
        ):
            raise InvalidInputError(f"batch_size must be an int >= 1, got {batch_size!r}")
        sequences, prompt_lens = [], []
        for k, (p, r) in enumerate(zip(prompts, responses)):
            p_ids, r_ids = self._prompt_ids(p, k), self._response_ids(r, k)
            if not r_ids and "response_avg" in names:
                raise InvalidInputError(
                    f"responses[{k}] is empty: 'response_avg' needs at least one response token"
                )
            seq = p_ids + r_ids
            if len(seq) > self.max_position_embeddings:
                raise InvalidInputError(
                    f"sample {k} has {len(seq)} tokens, more than the model's "
                    f"max_position_embeddings ({self.max_position_embeddings})"
                )
            sequences.append(seq)
            prompt_lens.append(len(p_ids))
        out = self._core.pool(sequences, prompt_lens, names, int(batch_size))
        return {name: out[name] for name in names}

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


def _normalise_dtype(dtype: Any) -> str:
    key = str(dtype).lower() if isinstance(dtype, str) else None
    if key not in _DTYPE_ALIASES:
        raise InvalidInputError(f"unknown dtype {dtype!r}; valid dtypes: {', '.join(VALID_DTYPES)}")
    return _DTYPE_ALIASES[key]


def _normalise_device(device: Any) -> str:
    if not isinstance(device, str) or not _DEVICE_RE.match(device.strip().lower()):
        raise InvalidInputError(
            f"unknown device {device!r}; valid devices: 'cpu', 'cuda', 'cuda:N'"
        )
    return device.strip().lower()


def _from_hub(repo_id: str) -> str:
    try:
        from huggingface_hub import snapshot_download  # type: ignore
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
            f"could not download {repo_id!r} from the model hub ({_type_name(e)}: {e}); "
            f"pass a local model directory or .gguf file instead"
        ) from e


def load_model(
    path_or_id: Union[str, os.PathLike, None] = None,
    device: str = "cpu",
    dtype: str = "f32",
    quantized: bool = False,
    precision: str = "highest",
) -> Model:
    """Load a model.

    ``path_or_id`` is a Hugging Face directory (config.json + *.safetensors + tokenizer.json), a
    ``.gguf`` file, a hub id such as ``"HuggingFaceTB/SmolLM2-135M-Instruct"`` (only when a hub is
    reachable), or None for the embedded default model (SmolLM2-135M-Instruct, fetched and cached
    on first use). ``dtype`` is the compute dtype (``"f32"``, ``"f16"``, ``"bf16"``);
    ``quantized=True`` keeps a GGUF's quantized weights quantized instead of dequantizing them.
    ``precision`` is how exactly f32 matmuls run on the CPU, as torch's
    ``set_float32_matmul_precision``: ``"highest"`` (plain f32, the default) or ``"high"`` (on a
    CPU with AMX-BF16, each f32 split into two bf16 and three bf16 products summed in f32:
    ~16 significant bits, dot products within ~1e-5 relative, several times the f32 throughput
    for prompts and batches; elsewhere the same as ``"highest"``).
    """
    device = _normalise_device(device)
    if precision not in ("highest", "high"):
        raise InvalidInputError(f"precision must be 'highest' or 'high', got {precision!r}")
    dtype = _normalise_dtype(dtype)
    if path_or_id is None:
        from .defaults import default_model_path

        path = default_model_path()
    else:
        if not isinstance(path_or_id, (str, os.PathLike)):
            raise InvalidInputError(
                f"path_or_id must be a path or a hub id string, got {_type_name(path_or_id)}"
            )
        path = os.path.expanduser(os.fspath(path_or_id))
        if not os.path.exists(path):
            if isinstance(path_or_id, str) and _HUB_ID_RE.match(path_or_id):
                path = _from_hub(path_or_id)
            else:
                raise ModelNotFoundError(f"model path not found: {path}")
    core = native().load_model(
        path, dtype=dtype, quantized=bool(quantized), device=device, precision=precision
    )
    return Model(core, path)
