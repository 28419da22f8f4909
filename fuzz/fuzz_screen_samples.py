"""Fuzz the screening sample readers through ``pc.screen`` on the tiny llama model.

``python fuzz/fuzz_screen_samples.py KIND --out DIR ...`` with KIND ``jsonl`` or ``parquet``: the
input is written as ``samples.<KIND>`` and screened (``method="prompt_last"``, ``on_error="skip"``),
which reads the records, renders prompts with the chat template, tokenizes, pools and projects.
Malformed records must come back as skipped samples, a malformed file as a typed error. Seeds:
JSONL files with good and malformed records, Parquet files written by pyarrow.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import seeds
from _harness import main

import personacore as pc

KINDS = ("jsonl", "parquet")
_STATE = {}


def make_one_input(kind: str):
    """The per-input function for ``kind``."""

    def one_input(data: bytes, work: Path) -> None:
        if "model" not in _STATE:
            _STATE["model"] = pc.load_model(str(seeds.write_hf(work / "m", "llama")))
            _STATE["vector"] = seeds.vector()
        path = work / f"samples.{kind}"
        path.write_bytes(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pc.screen(
                _STATE["model"],
                {"fuzzy": _STATE["vector"]},
                path,
                method="prompt_last",
                batch_size=4,
                on_error="skip",
            )

    return one_input


if __name__ == "__main__":
    kind = sys.argv[1] if len(sys.argv) > 1 else ""
    if kind not in KINDS:
        sys.exit("usage: fuzz_screen_samples.py jsonl|parquet --out DIR ...")
    del sys.argv[1]
    main(
        f"screen_{kind}",
        seeds.jsonl_seeds if kind == "jsonl" else seeds.parquet_seeds,
        make_one_input(kind),
    )
