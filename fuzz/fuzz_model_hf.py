"""Fuzz one file of a Hugging Face model directory, the others being valid: ``pc.load_model(dir)``.

``python fuzz/fuzz_model_hf.py FILE --out DIR`` with FILE one of ``model.safetensors``,
``config.json``, ``tokenizer.json``, ``tokenizer_config.json`` (tokenizer metadata and the chat
template), ``generation_config.json``. Seeds: that file of tiny llama, mistral, qwen2 and qwen3
directories (``tests/tiny_models.py``; ``model.safetensors`` in the two modes of
``seeds.header_mode_file``: the header alone with the seed's tensor data appended, or whole), and for ``tokenizer_config.json`` variants with other chat
templates. A model that loads is used (tokenizer, chat template, a forward pass).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List

import seeds
from _harness import exercise_model, main

import personacore as pc

FILES = (
    "model.safetensors",
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
)
ARCHS = ("llama", "mistral", "qwen2", "qwen3")


def seed_list(file: str) -> List[bytes]:
    """That file of each tiny architecture (plus chat-template variants of tokenizer_config)."""
    out = [seeds.hf_files(arch)[file] for arch in ARCHS]
    if file == "model.safetensors":
        return seeds.header_mode_seeds(out[0], "safetensors")  # the directory is llama's
    if file == "tokenizer_config.json":
        base = json.loads(out[0])
        for template in seeds.TEMPLATES:
            out.append(json.dumps(dict(base, chat_template=template)).encode())
        out.append(
            json.dumps(
                dict(base, chat_template=[{"name": "default", "template": seeds.CHATML}])
            ).encode()
        )
    return out


def make_one_input(file: str):
    """The per-input function for ``file``: write the tiny llama directory with ``data`` as it."""

    def one_input(data: bytes, work: Path) -> None:
        if file == "model.safetensors":
            data = seeds.header_mode_file(data, seeds.hf_files("llama")[file], "safetensors")
        d = seeds.write_hf(work / "m", "llama", **{file.replace(".", "_"): data})
        exercise_model(pc.load_model(str(d)))

    return one_input


if __name__ == "__main__":
    file = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else ""
    if file not in FILES:
        sys.exit(f"usage: fuzz_model_hf.py FILE --out DIR ...; FILE one of {', '.join(FILES)}")
    del sys.argv[1]
    # the names scripts/fuzz.py knows: model_safetensors, model_config_json, ...
    name = "model_" + file.replace("model.", "").replace(".", "_")
    main(name, lambda: seed_list(file), make_one_input(file))
