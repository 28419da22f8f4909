"""Finetuning shift (paper §4.2): how far fine-tuning moved a model along persona vectors.

:func:`finetune_shift` takes the mean last-prompt-token state of the tuned model minus the base
model's, over the same prompts (typically a trait's evaluation questions), and projects the
difference on ``v̂ = v[l]/‖v[l]‖`` at every layer ``l`` (docs/conventions.md, "Projection").
persona_vectors has no code for it; the paper reports r = 0.76-0.97 between this shift and the
trait score after fine-tuning.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from ..engine import Model
from ..errors import InvalidInputError
from ..extract import Trait
from ..vectors import PersonaVector, load_vector

__all__ = ["FinetuneShift", "finetune_shift", "named_vectors"]

VectorsArg = Union[PersonaVector, Mapping]


def named_vectors(vectors: VectorsArg) -> Dict[str, PersonaVector]:
    """``{name: PersonaVector}`` from a PersonaVector, or a mapping of names to vectors or paths.

    A single vector is named by its ``name`` (``"vector"`` when it has none); a path is read with
    :func:`~personacore.load_vector` (any format it reads) and takes the mapping's key as its name.
    """
    if isinstance(vectors, PersonaVector):
        return {vectors.name or "vector": vectors}
    if not isinstance(vectors, Mapping) or not vectors:
        raise InvalidInputError(
            "vectors must be a PersonaVector or a non-empty {name: PersonaVector | path} mapping, "
            f"got {type(vectors).__name__ if not isinstance(vectors, Mapping) else 'an empty mapping'}"
        )
    out = {}
    for name, v in vectors.items():
        if not isinstance(name, str) or not name:
            raise InvalidInputError(f"vector names must be non-empty strings, got {name!r}")
        if isinstance(v, (str, os.PathLike)):
            v = load_vector(v, name=name)
        if not isinstance(v, PersonaVector):
            raise InvalidInputError(
                f"vectors[{name!r}] must be a PersonaVector or a vector file path, "
                f"got {type(v).__name__}"
            )
        out[name] = v
    return out


@dataclass
class FinetuneShift:
    """What :func:`finetune_shift` returns.

    ``shift[name]``: float64 ``[num_layers + 1]``, the mean tuned-minus-base last-prompt-token state
    projected on the vector's unit row at each layer (NaN where the vector's row is zero);
    ``at_layer[name]``: that value at the vector's layer (its ``.layer`` or ``layer=``), absent
    when neither is set; ``layers[name]``: that layer; ``mean_diff``: float64
    ``[num_layers + 1, hidden]``, the mean state difference itself (project it on other vectors);
    ``n_prompts``: how many prompts were averaged.
    """

    shift: Dict[str, np.ndarray]
    at_layer: Dict[str, float]
    layers: Dict[str, Optional[int]]
    mean_diff: np.ndarray
    n_prompts: int


def _check_same_architecture(base: Model, tuned: Model) -> None:
    for attr in ("num_layers", "hidden_size", "vocab_size"):
        a, b = getattr(base, attr), getattr(tuned, attr)
        if a != b:
            raise InvalidInputError(
                f"finetune_shift needs two models of the same architecture, but {attr} is {a} "
                f"for the base model and {b} for the tuned model"
            )


def _prompt_ids(model: Model, prompt: Any, index: int) -> List[int]:
    """Token ids of one prompt: a question (str) as a user turn, messages, or token ids."""
    if isinstance(prompt, str):
        if not model.has_chat_template:
            return model.tokenizer.encode(prompt, add_special_tokens=False)
        prompt = [{"role": "user", "content": prompt}]
    if isinstance(prompt, Sequence) and prompt and isinstance(prompt[0], Mapping):
        return model.encode_chat(list(prompt), add_generation_prompt=True)
    if isinstance(prompt, (Sequence, np.ndarray)) and not isinstance(prompt, (bytes, bytearray)):
        return [int(i) for i in prompt]
    raise InvalidInputError(
        f"prompts[{index}] must be a str, a list of message dicts or a list of token ids, "
        f"got {type(prompt).__name__}"
    )


def _prompts_list(prompts: Any) -> List[Any]:
    if isinstance(prompts, Trait):
        if not prompts.eval_questions:
            raise InvalidInputError(
                f"trait {prompts.name!r} has no evaluation questions; pass prompts explicitly"
            )
        return list(prompts.eval_questions)
    if isinstance(prompts, (str, Mapping)) or not isinstance(prompts, (Sequence, np.ndarray)):
        raise InvalidInputError("prompts must be a list (one item per prompt) or a pc.Trait")
    prompts = list(prompts)
    if not prompts:
        raise InvalidInputError("prompts is empty: at least one prompt is needed")
    return prompts


def _mean_prompt_last(model: Model, ids: List[List[int]], batch_size: int) -> np.ndarray:
    pooled = model.pool(ids, [[] for _ in ids], poolings=("prompt_last",), batch_size=batch_size)
    return pooled["prompt_last"].astype(np.float64).mean(axis=0)


def finetune_shift(
    base_model: Model,
    tuned_model: Model,
    vectors: VectorsArg,
    prompts: Any,
    *,
    layer: Optional[int] = None,
    batch_size: int = 8,
) -> FinetuneShift:
    """The finetuning shift of ``tuned_model`` relative to ``base_model`` along ``vectors``.

    ``vectors``: a PersonaVector or ``{name: PersonaVector | path}``. ``prompts``: a list of
    questions (each rendered as one user turn with the model's chat template; as plain text when
    the model has none), of message lists (rendered with the generation prompt) or of token-id
    lists; or a :class:`~personacore.Trait`, whose ``eval_questions`` are used. Both models must
    share ``num_layers``, ``hidden_size`` and ``vocab_size`` and tokenize every prompt to the same
    ids (:class:`~personacore.InvalidInputError` otherwise). ``layer`` overrides each vector's
    recommended layer for ``at_layer``. See :class:`FinetuneShift` for the result.
    """
    if not isinstance(base_model, Model) or not isinstance(tuned_model, Model):
        raise InvalidInputError("finetune_shift needs two pc.Model objects (see pc.load_model)")
    _check_same_architecture(base_model, tuned_model)
    named = named_vectors(vectors)
    rows = base_model.num_layers + 1
    for name, v in named.items():
        if v.shape != (rows, base_model.hidden_size):
            raise InvalidInputError(
                f"vector {name!r} has shape {v.shape}, but the models need "
                f"({rows}, {base_model.hidden_size}) (num_layers + 1, hidden)"
            )
    items = _prompts_list(prompts)
    ids = [_prompt_ids(base_model, p, k) for k, p in enumerate(items)]
    for k, p in enumerate(items):
        if _prompt_ids(tuned_model, p, k) != ids[k]:
            raise InvalidInputError(
                f"prompts[{k}] is tokenized differently by the two models: the shift compares "
                f"states at the same tokens, so both need the same tokenizer and chat template"
            )
    diff = _mean_prompt_last(tuned_model, ids, batch_size) - _mean_prompt_last(
        base_model, ids, batch_size
    )
    shift, at_layer, layers = {}, {}, {}
    for name, v in named.items():
        d = v.directions.astype(np.float64)
        norms = np.linalg.norm(d, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            shift[name] = np.where(norms > 0, np.einsum("lh,lh->l", diff, d) / norms, np.nan)
        at = layers[name] = v.layer if layer is None else int(layer)
        if at is not None:
            if not 0 <= at < rows:
                raise InvalidInputError(f"layer {at} is outside 0..{rows - 1}")
            at_layer[name] = float(shift[name][at])
    return FinetuneShift(shift, at_layer, layers, diff, len(items))
