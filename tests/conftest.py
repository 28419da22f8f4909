"""Shared pytest fixtures: the default model, its path, and the transformers reference data.

The reference arrays in tests/data/ were made with transformers 5.24 + torch 2.13 (CPU) from the
same Q4_1 GGUF dequantized to float32 (see tests/data/README.md).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import personacore as pc

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def default_model_path() -> str:
    """Path of the cached default GGUF (fetched on first use; CI fetches it before the tests)."""
    return pc.default_model_path()


@functools.lru_cache(maxsize=None)
def _default_model_on(device: str) -> pc.Model:
    """The default model on ``device``, loaded once per device per session."""
    return pc.load_model(device=device)


@pytest.fixture(scope="session")
def default_model(default_model_path) -> pc.Model:
    """The default model, SmolLM2-135M-Instruct, dequantized to float32 (loaded once per session)."""
    return _default_model_on("cpu")


# The devices the parity, steering, monitoring and screening tests run on: the CPU always, CUDA
# where this build has CUDA support and a GPU answers (pc.cuda_available(); see docs/gpu.md).
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            not pc.cuda_available(), reason="no CUDA: a CPU-only build, or no GPU here"
        ),
    ),
]


@pytest.fixture(scope="session", params=DEVICES)
def device(request) -> str:
    """Each device of DEVICES in turn."""
    return request.param


@pytest.fixture(scope="session")
def device_model(device, default_model_path) -> pc.Model:
    """The default model in float32 on each device of ``device`` (the CPU one is ``default_model``).

    A test module runs on every device by overriding ``default_model`` with this fixture.
    """
    return _default_model_on(device)


def _conversations(npz, meta) -> list:
    convs = []
    for k, c in enumerate(meta["conversations"]):
        ids = [int(i) for i in npz[f"c{k}_ids"]]
        prompt_len = int(npz[f"c{k}_prompt_len"])
        convs.append(
            SimpleNamespace(
                index=k,
                messages=c["messages"],
                response=c["response"],
                prompt_text=c["prompt_text"],
                greedy_text=c["greedy_text"],
                ids=ids,
                prompt_len=prompt_len,
                prompt_ids=ids[:prompt_len],
                response_ids=ids[prompt_len:],
                hidden=npz[f"c{k}_hidden"],
                pooled={p: npz[f"c{k}_{p}"] for p in ("response_avg", "prompt_avg", "prompt_last")},
                last_logits=npz[f"c{k}_last_logits"],
                greedy=[int(i) for i in npz[f"c{k}_greedy"]],
            )
        )
    return convs


@pytest.fixture(scope="session")
def reference() -> SimpleNamespace:
    """transformers reference: ``.conversations`` (two), each with ids, hidden, pooled, logits."""
    meta = json.loads((DATA / "smollm2_reference.json").read_text())
    with np.load(DATA / "smollm2_reference.npz") as npz:
        convs = _conversations(npz, meta)
    return SimpleNamespace(meta=meta, conversations=convs)


@pytest.fixture(scope="session")
def reference_log_softmax(reference, default_model_path) -> list:
    """Per conversation of ``reference``, float64 ``[T, vocab]``: the log-softmax of transformers'
    logits at every position, rebuilt as its final hidden state (row ``num_layers``, after the
    final norm) times the tied embedding, dequantized from the GGUF by the ``gguf`` library (at
    the last position this reproduces the stored ``last_logits``)."""
    import gguf

    reader = gguf.GGUFReader(default_model_path)
    (emb,) = [t for t in reader.tensors if t.name == "token_embd.weight"]
    table = gguf.quants.dequantize(emb.data, emb.tensor_type).astype(np.float64)
    out = []
    for conv in reference.conversations:
        logits = conv.hidden[-1].astype(np.float64) @ table.T
        np.testing.assert_allclose(logits[-1], conv.last_logits, atol=1e-4)
        top = logits.max(axis=1, keepdims=True)
        out.append(logits - (top + np.log(np.exp(logits - top).sum(axis=1, keepdims=True))))
    return out


@pytest.fixture(scope="session")
def steering_reference() -> SimpleNamespace:
    """transformers steering reference (for the steering issue): prompt ids, vector, cases."""
    meta = json.loads((DATA / "smollm2_steering_reference.json").read_text())
    with np.load(DATA / "smollm2_steering_reference.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    return SimpleNamespace(
        meta=meta,
        arrays=arrays,
        prompt_ids=[int(i) for i in arrays["prompt_ids"]],
        vector=arrays["vector"],
        cases=meta["cases"],
    )


@pytest.fixture(scope="module")
def client(served, request):
    """The official ``openai`` client pointed at the module's ``served`` server, with the
    module's ``KEY`` as its API key (the server tests)."""
    openai = pytest.importorskip("openai")
    key = getattr(request.module, "KEY", "unused")
    return openai.OpenAI(base_url=served.url + "/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_id(client) -> str:
    """The served model's id, from /v1/models."""
    return client.models.list().data[0].id
