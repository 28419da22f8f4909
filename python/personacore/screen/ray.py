"""Screening at dataset scale on Ray Data (extra ``personacore[ray]``): :func:`screen_dataset`.

The same computation as :func:`personacore.screen.screen` (docs/conventions.md, Screening output), run as one
``map_batches`` stage over a pool of actors, each of which loads the model once::

    import ray, personacore as pc
    from personacore.screen.ray import screen_dataset

    ray.init()                                    # or ray.init(address="ray://head:10001")
    ds = ray.data.read_parquet("s3://bucket/sft/")
    scored = screen_dataset(ds, "path/to/model", {"evil": "evil.safetensors"},
                            method="delta", concurrency=8, batch_size=16)
    scored.write_parquet("s3://bucket/sft-scored/")

Each output row is its input row plus the fields of the ``personacore screen`` output row format:
struct columns ``scores``, ``response_proj``, ``prompt_last_proj`` and (``"delta"``)
``baseline_proj`` (``{vector name: float}``, null where undefined), the string column
``baseline`` (``"delta"``: the model's greedy reply y'), and ``screen_error`` (null, or why a
malformed sample was not scored when ``on_error="skip"``). Rows keep their input order.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional, Union

import pyarrow as pa
import ray
import ray.data

from ..engine import Model, load_model
from ..errors import InvalidInputError
from ..vectors import PersonaVector
from .core import check_options, screen
from .samples import JSONL_SUFFIXES, PARQUET_SUFFIXES, SampleError
from .shift import named_vectors

__all__ = ["OUTPUT_COLUMNS", "ScreenActor", "screen_dataset", "screen_files"]

#: The columns :func:`screen_dataset` adds (the ``*_proj`` / ``scores`` ones hold one field per
#: vector name). ``baseline_proj`` and ``baseline`` only come with ``method="delta"``.
OUTPUT_COLUMNS = (
    "scores",
    "response_proj",
    "baseline_proj",
    "prompt_last_proj",
    "baseline",
    "screen_error",
)


class ScreenActor:
    """The ``map_batches`` callable: loads the model once, then screens one batch per call.

    Built by Ray on each actor from :func:`screen_dataset`'s arguments. A call takes a
    ``pyarrow.Table`` batch of sample records and returns it with the score columns appended.
    """

    def __init__(
        self,
        model: Optional[str],
        model_kwargs: Dict[str, Any],
        vectors: Dict[str, PersonaVector],
        method: str,
        max_new_tokens: int,
        batch_size: int,
        layer: Any,
        on_error: str,
    ):
        """Load the model (``load_model(model, **model_kwargs)``) and keep the screening options."""
        self.model = load_model(model, **model_kwargs)
        self.vectors = vectors
        self.method = method
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.layer = layer
        self.on_error = on_error
        self.names = list(vectors)

    def _fields(self) -> List[str]:
        if self.method == "delta":
            return ["scores", "response_proj", "baseline_proj", "prompt_last_proj"]
        return ["scores", "response_proj", "prompt_last_proj"]

    def __call__(self, batch: pa.Table) -> pa.Table:
        """``batch`` with the score columns of its samples appended (rows in the same order)."""
        clash = [c for c in OUTPUT_COLUMNS if c in batch.column_names]
        if clash:
            raise InvalidInputError(
                f"the dataset already has column(s) {clash}, which screening writes; rename them"
            )
        # Ray fills keys a record lacks with nulls (e.g. "prompt" in a "messages" record).
        records = [{k: v for k, v in r.items() if v is not None} for r in batch.to_pylist()]
        n = len(records)
        fields = self._fields()
        cols: Dict[str, List[Any]] = {f: [None] * n for f in fields}
        baseline: List[Optional[str]] = [None] * n
        errors: List[Optional[str]] = [None] * n
        if n:
            try:
                res = screen(
                    self.model,
                    self.vectors,
                    records,
                    method=self.method,
                    max_new_tokens=self.max_new_tokens,
                    batch_size=self.batch_size,
                    layer=self.layer,
                    on_error=self.on_error,
                )
            except SampleError as e:  # its index counts rows of this batch, not of the dataset
                rid = records[e.bad.index].get("id")
                which = f"the row with id {rid!r}" if rid is not None else "a row"
                raise InvalidInputError(
                    f"{which} cannot be screened: {e.bad.reason} (on_error='skip' keeps it "
                    f"with null scores and the reason in screen_error)"
                ) from None
            for row in res.rows():
                i = row["index"]
                for f in fields:
                    cols[f][i] = row[f]
                baseline[i] = row.get("baseline")
            for bad in res.errors:
                errors[bad.index] = bad.reason
        struct = pa.struct([(name, pa.float32()) for name in self.names])
        for f in fields:
            batch = batch.append_column(f, pa.array(cols[f], type=struct))
        if self.method == "delta":
            batch = batch.append_column("baseline", pa.array(baseline, type=pa.string()))
        return batch.append_column("screen_error", pa.array(errors, type=pa.string()))


def _model_source(model: Any, model_kwargs: Optional[Mapping[str, Any]]) -> tuple:
    kwargs = dict(model_kwargs or {})
    if isinstance(model, Model):
        if model.path is None:
            raise InvalidInputError(
                "screen_dataset loads the model on every actor: pass a path or name, "
                "or a pc.Model that was loaded from a path"
            )
        kwargs.setdefault("dtype", model.dtype)
        kwargs.setdefault("device", model.device)
        return model.path, kwargs
    if model is not None and not isinstance(model, (str, os.PathLike)):
        raise InvalidInputError(
            f"model must be a path or name each actor loads (None: the default model), "
            f"got {type(model).__name__}"
        )
    return (None if model is None else os.fspath(model)), kwargs


def screen_dataset(
    ds: "ray.data.Dataset",
    model: Union[str, os.PathLike, Model, None],
    vectors: Any,
    method: str = "delta",
    concurrency: int = 2,
    batch_size: int = 16,
    max_new_tokens: int = 256,
    *,
    layer: Any = None,
    on_error: str = "fail",
    model_kwargs: Optional[Mapping[str, Any]] = None,
    num_cpus: float = 1,
    num_gpus: float = 0,
    preserve_order: bool = True,
) -> "ray.data.Dataset":
    """``ds`` with the screening score columns appended (see the module doc), lazily.

    ``ds`` holds sample records (``messages``, or ``prompt`` and ``response``, any other columns
    kept). ``model`` is a path or hub name each actor loads with ``load_model(model,
    **model_kwargs)`` (None: the embedded default; a :class:`~personacore.Model` stands for its
    path). ``vectors`` is a PersonaVector or ``{name: PersonaVector | vector file path}``; files
    are read here, in the driver, and the arrays shipped to the actors. ``concurrency`` actors,
    each reserving ``num_cpus`` CPUs (the engine runs that many threads) and ``num_gpus`` GPUs
    (then the model is loaded with ``device="cuda"`` unless ``model_kwargs`` names a device),
    screen ``batch_size`` rows per call: one batched generation for y' and one pooled forward.
    ``method``, ``max_new_tokens``, ``layer`` and ``on_error`` are those of
    :func:`~personacore.screen.screen`; with ``on_error="skip"`` a malformed row is kept with
    null scores and its reason in ``screen_error``. ``preserve_order`` sets the dataset's
    ``DataContext.execution_options.preserve_order`` so rows come out in input order.
    """
    check_options(method, max_new_tokens, batch_size, on_error)
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise InvalidInputError(f"concurrency must be an int >= 1, got {concurrency!r}")
    if not num_cpus or num_cpus < 0 or num_gpus < 0:
        raise InvalidInputError(
            f"num_cpus must be > 0 and num_gpus >= 0, got {num_cpus!r}, {num_gpus!r}"
        )
    path, kwargs = _model_source(model, model_kwargs)
    if num_gpus and "device" not in kwargs:
        kwargs["device"] = "cuda"
    named = named_vectors(vectors)
    threads = str(max(1, int(num_cpus)))
    out = ds.map_batches(
        ScreenActor,
        fn_constructor_kwargs=dict(
            model=path,
            model_kwargs=kwargs,
            vectors=named,
            method=method,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            layer=layer,
            on_error=on_error,
        ),
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        batch_size=batch_size,
        batch_format="pyarrow",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        runtime_env={"env_vars": {"RAYON_NUM_THREADS": threads}},
    )
    if preserve_order:
        out.context.execution_options.preserve_order = True
    return out


def _format(path: Union[str, os.PathLike], given: Optional[str]) -> str:
    if given is not None:
        if given not in ("jsonl", "parquet"):
            raise InvalidInputError(f"format must be 'jsonl' or 'parquet', got {given!r}")
        return given
    suffix = os.path.splitext(os.fspath(path).rstrip("/"))[1].lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    raise InvalidInputError(
        f"cannot tell the format of {os.fspath(path)!r} from its suffix: pass 'jsonl' or 'parquet'"
    )


def screen_files(
    input: Union[str, os.PathLike],
    output: Union[str, os.PathLike],
    model: Union[str, os.PathLike, Model, None],
    vectors: Any,
    *,
    input_format: Optional[str] = None,
    output_format: Optional[str] = None,
    **options: Any,
) -> None:
    """Read samples with Ray Data, screen them (:func:`screen_dataset`) and write the result.

    ``input`` is a ``.jsonl``/``.parquet`` file or a directory of them (any path or URI Ray Data
    reads; name the format with ``input_format`` when the suffix does not). ``output`` is the
    directory Ray Data writes its files into, as JSON Lines or Parquet (``output_format``, by
    default from ``output``'s suffix, else Parquet). ``options`` go to :func:`screen_dataset`.
    """
    src = os.fspath(input)
    kind = _format(src, input_format)
    ds = ray.data.read_parquet(src) if kind == "parquet" else ray.data.read_json(src)
    dst = os.fspath(output)
    if output_format is None:
        try:
            output_format = _format(dst, None)
        except InvalidInputError:
            output_format = "parquet"
    else:
        output_format = _format(dst, output_format)
    scored = screen_dataset(ds, model, vectors, **options)
    if output_format == "parquet":
        scored.write_parquet(dst)
    else:
        scored.write_json(dst)
