"""Fuzz the GGUF model loader: ``pc.load_model("x.gguf")`` (header, metadata, tokenizer, tensors).

Seed: a tiny llama GGUF with a GPT-2 BPE tokenizer and a chat template, in two modes
(``seeds.header_mode_file``): the header and metadata alone, the seed's tensor data appended to
whatever the fuzzer made of them, or the whole file. A model that loads is used (tokenizer, chat
template, a forward pass).
"""

from __future__ import annotations

from pathlib import Path

import seeds
from _harness import exercise_model, main

import personacore as pc

NAME = "model_gguf"


def one_input(data: bytes, work: Path) -> None:
    """Write ``data`` as a .gguf and load it."""
    path = work / "model.gguf"
    path.write_bytes(seeds.header_mode_file(data, seeds.gguf_model(), "gguf"))
    exercise_model(pc.load_model(str(path)))


if __name__ == "__main__":
    main(NAME, lambda: seeds.header_mode_seeds(seeds.gguf_model(), "gguf"), one_input)
