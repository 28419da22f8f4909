"""Every target in one process: the first input byte picks the target, the rest is its input.

For the short fixed-seed run in CI (``tests/test_fuzz_short.py``), where starting 14 processes
would cost more than the fuzzing. The seeds are every target's seeds behind their target's byte;
libFuzzer may change that byte, which hands an input of one target to another (more variety, not
less). The long runs use one process per target (``scripts/fuzz.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, List, Tuple

import fuzz_chat_template
import fuzz_model_gguf
import fuzz_model_hf
import fuzz_screen_samples
import fuzz_serve_request
import fuzz_trait_json
import fuzz_vector_file
import seeds
from _harness import main

NAME = "all"


def targets() -> List[Tuple[str, Callable[[], List[bytes]], Callable[[bytes, Path], None]]]:
    """(name, seeds, one_input) of every target, in a fixed order."""
    out = [
        (
            "model_gguf",
            lambda: seeds.header_mode_seeds(seeds.gguf_model(), "gguf"),
            fuzz_model_gguf.one_input,
        ),
    ]
    for file in fuzz_model_hf.FILES:
        out.append(
            (
                f"model_{file}",
                lambda f=file: fuzz_model_hf.seed_list(f),
                fuzz_model_hf.make_one_input(file),
            )
        )
    out.append(
        (
            "chat_template",
            lambda: [t.encode() for t in seeds.TEMPLATES],
            fuzz_chat_template.one_input,
        )
    )
    for ext in fuzz_vector_file.EXTS:
        out.append(
            (
                f"vector_{ext}",
                lambda e=ext: fuzz_vector_file.seed_list(e),
                fuzz_vector_file.make_one_input(ext),
            )
        )
    out.append(("trait_json", seeds.trait_seeds, fuzz_trait_json.one_input))
    for kind in fuzz_screen_samples.KINDS:
        out.append(
            (
                f"screen_{kind}",
                seeds.jsonl_seeds if kind == "jsonl" else seeds.parquet_seeds,
                fuzz_screen_samples.make_one_input(kind),
            )
        )
    out.append(("serve_request", seeds.request_seeds, fuzz_serve_request.one_input))
    return out


TARGETS = targets()


def all_seeds() -> List[bytes]:
    """Each target's seeds behind its index byte."""
    return [bytes([k]) + s for k, (_, make, _) in enumerate(TARGETS) for s in make()]


def one_input(data: bytes, work: Path) -> None:
    """Hand ``data[1:]`` to the target ``data[0]`` picks (modulo the number of targets)."""
    if not data:
        return
    _, _, run = TARGETS[data[0] % len(TARGETS)]
    target_dir = work / str(data[0] % len(TARGETS))
    target_dir.mkdir(exist_ok=True)
    run(data[1:], target_dir)


if __name__ == "__main__":
    try:
        import torch  # noqa: F401 - imported before the audit hook is armed
    except ImportError:
        pass
    sys.addaudithook(fuzz_vector_file._audit)
    main(NAME, all_seeds, one_input, fuzz_vector_file.check_nothing_ran)
