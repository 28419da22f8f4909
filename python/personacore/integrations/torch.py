"""Preventative steering and ablation while training a ``transformers`` model (``personacore[torch]``).

:func:`steering_hooks` registers forward hooks on the decoder layers of a Hugging Face causal LM
(plain or wrapped by PEFT) for the time of a ``with`` block::

    from personacore.integrations.torch import steering_hooks

    with steering_hooks(hf_model, evil_vector, coef=5.0, layers=[20]):
        trainer.train()               # every forward (and the backward through it) is steered

* ``mode="add"`` adds ``coef * v[layer]`` to the output of decoder block ``layer`` at every
  position (persona_vectors' ``steering_intervention``, the paper's preventative steering);
* ``mode="ablate"`` removes the component along ``v̂ = v[layer]/‖v[layer]‖``: ``x - (x·v̂) v̂``
  (CAFT).

Layers and vectors follow docs/conventions.md ("Layers", "Vectors"): our layer ``i`` is the output
of decoder block ``i``, i.e. a hook on ``model.model.layers[i - 1]``; steerable layers are
``1 .. num_layers - 1``; the raw (unnormalised) row is added. So a hooked forward equals
``pc.load_model(dir).hidden_states(ids, steer=[pc.Steer(v, coef, layers)])`` (or ``pc.Ablate``).

Gradients flow through the hooks to the model's parameters; the vector is a constant (no gradient).
The hooks compute in the hidden states' own dtype and device, except the ablation's dot product,
which is taken in float32. With gradient checkpointing, run the backward pass inside the ``with``
block so that the recomputed forward is steered too.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..engine.native import native
from ..errors import InvalidInputError
from ..steering import Ablate, Steer

__all__ = ["MODES", "SteeringHooks", "decoder_layers", "steering_hooks"]

#: What a hook does to the residual stream: add ``coef * v`` or remove the component along v̂.
MODES = ("add", "ablate")

# Where the decoder blocks live, tried in order (Llama, Mistral, Qwen2/3, Gemma 1-3 text models:
# ``model.layers``; multimodal Gemma 3 / Llava-style wrappers: ``model.language_model.layers``).
_LAYER_PATHS = (
    "model.layers",
    "model.language_model.layers",
    "language_model.model.layers",
    "model.decoder.layers",
    "transformer.h",
    "gpt_neox.layers",
)


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _num_hidden_layers(model: torch.nn.Module) -> Optional[int]:
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    n = getattr(config, "num_hidden_layers", None)
    return n if isinstance(n, int) else None


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder blocks of a ``transformers`` model, in order (``[i - 1]`` is our layer ``i``).

    Unwraps PEFT models, tries the attribute paths the common families use, then falls back to the
    shallowest ``ModuleList`` with ``config.num_hidden_layers`` entries. Raises
    :class:`~personacore.InvalidInputError` when none is found.
    """
    if not isinstance(model, torch.nn.Module):
        raise InvalidInputError(
            f"steering hooks need a torch.nn.Module (a transformers model), got {type(model).__name__}"
        )
    # PEFT's wrapper; getattr, since torch.nn.Module types unknown attributes as tensors or modules
    get_base_model = getattr(model, "get_base_model", None)
    base = get_base_model() if callable(get_base_model) else model
    for path in _LAYER_PATHS:
        layers = _get_path(base, path)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
            return layers
    n = _num_hidden_layers(base)
    found = [
        (name.count("."), name, module)
        for name, module in base.named_modules()
        if isinstance(module, torch.nn.ModuleList) and n is not None and len(module) == n
    ]
    if found:
        return min(found, key=lambda t: t[:2])[2]
    raise InvalidInputError(
        f"cannot find the decoder layers of {type(base).__name__}: none of "
        f"{', '.join(_LAYER_PATHS)} exists and no ModuleList has config.num_hidden_layers entries"
    )


def _hidden_size(model: torch.nn.Module, vector: Any) -> int:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    width = getattr(config, "hidden_size", None)
    if isinstance(width, int):
        return width
    # No config: trust the vector's width; a mismatch then fails in the first forward pass.
    return int(np.shape(vector)[-1])


class _LayerHook:
    """The forward hook on one decoder block: edits the block's hidden-state output."""

    def __init__(self, mode: str, coef: float, row: np.ndarray):
        self.mode = mode
        self.coef = coef
        if mode == "add":
            self._row = torch.from_numpy(np.asarray(row, dtype=np.float32) * np.float32(coef))
        else:
            self._row = torch.from_numpy(
                (row / np.linalg.norm(row.astype(np.float64))).astype(np.float32)
            )
        self._cache: Dict[Tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def _vector(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (device, dtype)
        if key not in self._cache:
            self._cache[key] = self._row.to(device=device, dtype=dtype)
        return self._cache[key]

    def edit(self, h: torch.Tensor) -> torch.Tensor:
        """The steered hidden states ``[..., hidden]`` (same dtype and device as ``h``)."""
        if self.mode == "add":
            return h + self._vector(h.device, h.dtype)
        u = self._vector(h.device, torch.float32)
        proj = h.to(torch.float32) @ u
        return h - (proj.unsqueeze(-1) * u).to(h.dtype)

    def __call__(self, module: torch.nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, torch.Tensor):
            return self.edit(output)
        if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
            return type(output)([self.edit(output[0]), *output[1:]])
        raise InvalidInputError(
            f"decoder layer {type(module).__name__} returned {type(output).__name__}; steering "
            f"hooks expect a tensor or a tuple whose first item is the hidden states"
        )


class SteeringHooks:
    """Hooks that steer a ``transformers`` model while the ``with`` block runs (see the module doc).

    Built by :func:`steering_hooks`; nothing is registered until ``__enter__``, and every hook is
    removed on exit, also when the block raises. ``layers`` holds the steered layers (our numbering).
    """

    def __init__(self, model: torch.nn.Module, mode: str, coef: float, rows: Dict[int, np.ndarray]):
        """Hooks for ``rows`` (``{layer: direction}``, already checked); use :func:`steering_hooks`."""
        self.model = model
        self.mode = mode
        self.coef = coef
        self.layers: List[int] = list(rows)
        self._rows = rows
        self._handles: List[Any] = []

    def __enter__(self) -> "SteeringHooks":
        """Register one forward hook per steered layer (ahead of any hook already there)."""
        if self._handles:
            raise InvalidInputError("these steering hooks are already active")
        blocks = decoder_layers(self.model)
        try:
            for layer, row in self._rows.items():
                hook = _LayerHook(self.mode, self.coef, row)
                # prepend: transformers records output_hidden_states with its own forward hooks
                # (installed lazily on first use); ours must run before them to be recorded.
                self._handles.append(blocks[layer - 1].register_forward_hook(hook, prepend=True))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        """Remove the hooks (exceptions from the block propagate)."""
        self.remove()

    def remove(self) -> None:
        """Remove every hook registered by this object (safe to call twice)."""
        while self._handles:
            self._handles.pop().remove()

    @property
    def active(self) -> bool:
        """Whether the hooks are registered now."""
        return bool(self._handles)

    def __repr__(self) -> str:
        return f"SteeringHooks(mode={self.mode!r}, coef={self.coef}, layers={self.layers}, active={self.active})"


def steering_hooks(
    model: torch.nn.Module,
    vector: Any,
    coef: float = 1.0,
    layers: Union[int, Sequence[int], None] = None,
    mode: str = "add",
) -> SteeringHooks:
    """A context manager that steers ``model``'s decoder blocks at ``layers`` in every forward pass.

    ``vector`` is a :class:`~personacore.PersonaVector` or an array ``[num_layers + 1, hidden]``
    (row ``layer`` is used) or ``[hidden]`` (the same direction at every layer); ``layers=None``
    uses the PersonaVector's recommended layer. ``mode="add"`` adds ``coef * v[layer]`` at all
    positions; ``mode="ablate"`` removes the component along ``v̂`` (``coef`` is then ignored).
    Layers, widths and row counts are checked against the model as ``pc.Steer`` checks them against
    our engine (:class:`~personacore.InvalidInputError`).
    """
    if mode not in MODES:
        raise InvalidInputError(
            f"unknown mode {mode!r}; valid modes: {', '.join(map(repr, MODES))}"
        )
    if isinstance(vector, torch.Tensor):
        vector = vector.detach().to(device="cpu", dtype=torch.float32).numpy()
    spec = Steer(vector, coef, layers=layers) if mode == "add" else Ablate(vector, layers=layers)
    blocks = decoder_layers(model)
    # The engine's own checks (layer range, width, rows, non-zero direction for ablate), against
    # the transformers model's dimensions instead of a loaded personacore model.
    steered, directions = native().resolve_intervention(
        spec._request(), len(blocks), _hidden_size(model, spec.vector)
    )
    rows = {layer: row for layer, row in zip(steered, directions)}
    return SteeringHooks(model, mode, spec.coef if isinstance(spec, Steer) else 1.0, rows)
