"""Seed corpora for the fuzz harnesses, written at run time from real files.

The tiny models come from ``tests/tiny_models.py`` (Hugging Face directories) and
``tests/test_errors.py`` (a tiny llama GGUF with a GPT-2 BPE tokenizer); vectors are saved with
personacore's own writers in each format; the ``.pt`` seeds are real ``torch.save`` files (when
torch is installed) plus hand-made pickles whose ``__reduce__`` calls :func:`canary.trip`; trait
seeds are the built-in trait files, plus the official persona_vectors trait files when
``PERSONACORE_FUZZ_TRAITS`` names their folder (they are read, never copied into the repo).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Dict, List

import canary
import numpy as np

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
RAISING_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    "{% for m in messages %}{{ m.role | upper }}: {{ m.content }}\n{% endfor %}"
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}"
    "{{ ns.n }}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
TEMPLATES = (CHATML, SMOL_TEMPLATE, LLAMA3_TEMPLATE, RAISING_TEMPLATE)

_DIR = Path(tempfile.mkdtemp(prefix="pcfuzz-seeds-", dir="/dev/shm"))


@lru_cache(maxsize=None)
def hf_files(arch: str = "llama") -> Dict[str, bytes]:
    """The files of a tiny Hugging Face model directory of ``arch``: name -> bytes."""
    from tiny_models import write_tiny_model

    d = _DIR / f"hf-{arch}"
    write_tiny_model(d, arch)
    return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}


def write_hf(d: Path, arch: str = "llama", **replace: bytes) -> Path:
    """Write the tiny ``arch`` directory into ``d``, with some files replaced by the given bytes."""
    d.mkdir(parents=True, exist_ok=True)
    for name, data in hf_files(arch).items():
        (d / name).write_bytes(replace.get(name.replace(".", "_"), data))
    return d


@lru_cache(maxsize=None)
def gguf_model() -> bytes:
    """A tiny llama GGUF model (f32, GPT-2 BPE tokenizer, ChatML template)."""
    from test_errors import write_tiny_gguf

    p = _DIR / "tiny.gguf"
    write_tiny_gguf(p)
    return p.read_bytes()


def split_at_data(data: bytes, kind: str) -> int:
    """Where the tensor data of a GGUF or safetensors file starts (after header and metadata)."""
    if kind == "gguf":
        import gguf

        p = _DIR / "split.gguf"
        p.write_bytes(data)
        return int(gguf.GGUFReader(str(p)).data_offset)
    import struct

    return 8 + struct.unpack("<Q", data[:8])[0]


def header_mode_seeds(whole: bytes, kind: str) -> List[bytes]:
    """Seeds of a harness whose first input byte picks the mode (see :func:`header_mode_file`).

    ``b"\\x01" + header``: the fuzzer mutates only the header and metadata, the seed's tensor data
    is appended; ``b"\\x00" + whole``: the whole file.
    """
    cut = split_at_data(whole, kind)
    return [b"\x01" + whole[:cut], b"\x00" + whole]


def header_mode_file(data: bytes, whole: bytes, kind: str) -> bytes:
    """The file a header-mode input stands for: odd first byte: ``data[1:]`` + the seed's tensor
    data; even (or empty): ``data[1:]`` as the whole file."""
    if data[:1] and data[0] & 1:
        return data[1:] + whole[split_at_data_cached(whole, kind) :]
    return data[1:]


@lru_cache(maxsize=8)
def split_at_data_cached(whole: bytes, kind: str) -> int:
    """:func:`split_at_data`, computed once per seed file."""
    return split_at_data(whole, kind)


def vector(num_layers: int = 3, hidden: int = 64, seed: int = 0):
    """A PersonaVector that fits the tiny models (with the statistics ``"auto"`` thresholds use)."""
    from personacore import PersonaVector

    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((num_layers + 1, hidden)).astype(np.float32)
    stats = {"pos_mean": [1.0] * (num_layers + 1), "neg_mean": [-1.0] * (num_layers + 1)}
    return PersonaVector(
        directions, layer=2, name="fuzzy", metadata={"trait": "fuzzy", "stats": stats}
    )


@lru_cache(maxsize=None)
def vector_file(ext: str) -> bytes:
    """The tiny vector saved by personacore in format ``ext`` (``.safetensors``, ``.gguf``, ``.pt``)."""
    p = _DIR / f"v{ext}"
    vector().save(p)
    return p.read_bytes()


def _zip_pt(pickled: bytes, storages: Dict[str, bytes]) -> bytes:
    """A file in torch's zip layout: ``archive/data.pkl`` and ``archive/data/<key>``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickled)
        z.writestr("archive/byteorder", "little")
        for key, data in storages.items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", "3\n")
    return buf.getvalue()


class _Payload:
    """Pickles as a call of :func:`canary.trip` (what a malicious ``__reduce__`` does)."""

    def __init__(self, what: str):
        self.what = what

    def __reduce__(self):
        return (canary.trip, (self.what,))


def pt_seeds() -> List[bytes]:
    """Real ``.pt`` vectors and malicious pickles (plain and in torch's zip layout)."""
    seeds = []
    try:
        seeds.append(vector_file(".pt"))
    except Exception:  # noqa: BLE001 - writing .pt needs torch; the pickles below do not
        pass
    for proto in (2, 4):
        payload = pickle.dumps(_Payload(f"reduce-p{proto}"), protocol=proto)
        seeds.append(payload)
        seeds.append(_zip_pt(payload, {}))
        # a payload hidden inside an OrderedDict next to what looks like a tensor
        nested = pickle.dumps({"directions": _Payload("nested"), "x": [1.0, 2.0]}, protocol=proto)
        seeds.append(_zip_pt(nested, {"0": np.zeros(8, np.float32).tobytes()}))
    return seeds


def trait_seeds() -> List[bytes]:
    """The built-in trait files, and the official ones when ``PERSONACORE_FUZZ_TRAITS`` is set."""
    from personacore.extract.traits import BUILTIN_DIR

    files = sorted(Path(BUILTIN_DIR).glob("*.json"))
    official = os.environ.get("PERSONACORE_FUZZ_TRAITS")
    if official:
        files += sorted(Path(official).glob("**/*.json"))[:16]
    return [f.read_bytes() for f in files] + [DEEP]


SAMPLE_RECORDS = [
    {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]},
    {
        "id": "x7",
        "messages": [
            {"role": "system", "content": "you are kind"},
            {"role": "user", "content": "what is your name ?"},
            {"role": "assistant", "content": "i am a model ."},
        ],
    },
    {"prompt": "what is the model", "response": "the model is evil"},
    {"prompt": [{"role": "user", "content": "yes"}], "response": "no"},
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
    {"prompt": "x", "response": ""},
    {"messages": [{"role": "user", "content": "only a user"}]},
]


#: JSON nested deeper than Python's recursion limit (``json.loads`` raises RecursionError)
DEEP = b"[" * 5000 + b"]" * 5000


def jsonl_seeds() -> List[bytes]:
    """JSONL sample files: good records, malformed ones, a line that is not JSON."""
    lines = [json.dumps(r).encode() for r in SAMPLE_RECORDS]
    return [
        b"\n".join(lines) + b"\n",
        lines[0] + b"\n\n" + lines[2] + b"\r\n{not json\n" + lines[1],
        lines[3] + b"\n",
        DEEP + b"\n" + lines[0] + b"\n",
    ]


def parquet_seeds() -> List[bytes]:
    """Parquet sample files written by pyarrow (messages column; prompt/response columns)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = []
    tables = [
        pa.Table.from_pylist([r for r in SAMPLE_RECORDS[:2]]),
        pa.Table.from_pylist([SAMPLE_RECORDS[2], {"prompt": "a", "response": "b", "id": 3}]),
    ]
    for t in tables:
        buf = io.BytesIO()
        pq.write_table(t, buf)
        out.append(buf.getvalue())
    return out


def request_seeds() -> List[bytes]:
    """Server request bodies; the first byte picks the route (even: chat, odd: completions)."""
    msgs = [{"role": "user", "content": "hello world"}]
    chats = [
        {"messages": msgs, "max_tokens": 4},
        {
            "model": "m",
            "messages": msgs,
            "max_tokens": 3,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "steer": [{"vector": "fuzzy", "coef": 1.5, "layers": [1]}],
            "monitor": {"vectors": ["fuzzy"], "layers": "recommended", "thresholds": "auto"},
            "on_alert": "steer",
            "stop": ["."],
            "seed": 3,
        },
        {
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "steer": [
                {"vector": "fuzzy", "kind": "cap", "min": -1, "max": 1, "positions": "response"},
                {"vector": "fuzzy", "kind": "ablate", "when": {"vector": "fuzzy", "above": 0.5}},
            ],
            "monitor": {"thresholds": {"fuzzy": 2.0}, "layers": [1, 2]},
            "on_alert": "stop",
        },
        {
            "messages": msgs,
            "max_tokens": 3,
            "stream": True,
            "logprobs": True,
            "top_logprobs": 5,
            "logit_bias": {"3": -100, "7": 2.5},
            "presence_penalty": 0.5,
            "frequency_penalty": -1.0,
        },
        {
            "messages": msgs,
            "max_tokens": 3,
            "n": 3,
            "seed": 5,
            "stream": True,
            "monitor": {"vectors": ["fuzzy"], "thresholds": 0.1},
            "on_alert": "stop",
        },
        {
            "messages": msgs + [{"role": "assistant", "content": "hi"}],
            "add_generation_prompt": False,
            "prompt_logprobs": 2,
            "max_tokens": 1,
            "n": 2,
        },
    ]
    texts = [
        {"prompt": "the model", "max_tokens": 2},
        {"prompt": [5, 6, 7], "max_tokens": 2, "top_p": 0.5, "top_k": 3, "logprobs": None},
        {"prompt": "the model", "max_tokens": 3, "logprobs": 2, "stream": True},
        {"prompt": [5, 6, 7], "max_tokens": 2, "echo": True, "frequency_penalty": 2},
        {"prompt": "the model", "max_tokens": 2, "n": 2, "logprobs": 1, "stream": True},
        {"prompt": [[5, 6, 7], [8, 9]], "max_tokens": 1, "echo": True, "logprobs": 2, "n": 2},
        {"prompt": ["the model", "a"], "echo": True, "logprobs": 0, "stream": True},
    ]
    return (
        [b"\x00" + json.dumps(c).encode() for c in chats]
        + [b"\x01" + json.dumps(t).encode() for t in texts]
        + [b"\x00" + DEEP]
    )
