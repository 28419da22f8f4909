"""What every fuzz harness in ``fuzz/`` shares: the crash rule, the statistics, the atheris setup.

A harness module defines ``NAME``, ``seeds() -> List[bytes]`` (its corpus, built from real files at
run time) and ``one_input(data: bytes, work: Path) -> None`` (feed one input to personacore through
a public entry point), then calls :func:`main`. For every input:

* returning, or raising a :class:`personacore.PersonacoreError` other than ``InternalError``
  (a typed, documented rejection), is fine;
* raising ``InternalError`` (a Rust panic that reached Python) or any other exception is a
  **crash**: the input and the traceback are saved under ``OUT/crashes/`` and counted, and the run
  goes on (``--stop-on-crash`` stops it instead);
* a hang (libFuzzer's ``-timeout`` per input) or a process abort (a signal, Rust's out-of-memory
  abort) ends the process; libFuzzer saves the input as ``OUT/crashes/<kind>-<sha1>`` and
  ``scripts/fuzz.py`` counts it.

The harness writes ``OUT/stats/<NAME>.json`` (executions, crashes, seconds) every second and at
the end, so the driver has the numbers even when the process dies.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, List, Optional

ROOT = Path(__file__).resolve().parents[1]
for extra in (ROOT / "tests", ROOT / "fuzz"):
    if str(extra) not in sys.path:
        sys.path.insert(1, str(extra))
# the installed personacore (CI installs the package; the tree's copy has no native module there),
# the tree's python/ only when none is installed
if importlib.util.find_spec("personacore") is None:
    sys.path.insert(1, str(ROOT / "python"))

import atheris  # noqa: E402

with atheris.instrument_imports(include=["personacore", "safetensors", "gguf", "jinja2"]):
    import gguf  # noqa: F401,E402
    import safetensors.numpy  # noqa: F401,E402

    import personacore  # noqa: F401,E402
    import personacore.extract.traits  # noqa: F401,E402
    import personacore.screen  # noqa: F401,E402
    import personacore.vectors.io.gguf  # noqa: F401,E402
    import personacore.vectors.io.pt  # noqa: F401,E402
    import personacore.vectors.io.safetensors  # noqa: F401,E402

from personacore.errors import InternalError, PersonacoreError  # noqa: E402

__all__ = ["main", "Crash", "ROOT", "exercise_model"]

#: what a loaded model is asked to do after a fuzzed load: chat, tokenize, run a forward pass
MESSAGES = [
    {"role": "system", "content": "you are kind"},
    {"role": "user", "content": "hello world ! what is your name ?"},
]


class Crash(Exception):
    """Raised by a harness's own checks (e.g. a pickle payload that ran): always a crash."""


class _Stats:
    def __init__(self, name: str, out: Path):
        self.name, self.out = name, out
        self.executions = 0
        self.crashes = 0
        self.start = time.monotonic()
        self.last_write = 0.0
        (out / "stats").mkdir(parents=True, exist_ok=True)
        (out / "crashes").mkdir(parents=True, exist_ok=True)

    def write(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_write < 1.0:
            return
        self.last_write = now
        data = {
            "target": self.name,
            "executions": self.executions,
            "crashes": self.crashes,
            "seconds": round(now - self.start, 2),
        }
        tmp = self.out / "stats" / f".{self.name}.json.tmp"
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.out / "stats" / f"{self.name}.json")

    def crash(self, data: bytes, exc: BaseException) -> None:
        self.crashes += 1
        digest = hashlib.sha1(data).hexdigest()
        base = self.out / "crashes" / f"{self.name}-exception-{digest}"
        base.write_bytes(data)
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        Path(f"{base}.txt").write_text(text, errors="backslashreplace")
        line = f"CRASH in {self.name}: {type(exc).__name__}: {exc}"
        print(line.encode("utf-8", "backslashreplace").decode()[:500], file=sys.stderr)


def is_crash(exc: BaseException) -> bool:
    """Whether an exception raised for an input is a crash (see the module docstring)."""
    if isinstance(exc, InternalError) or isinstance(exc, Crash):
        return True
    return not isinstance(exc, PersonacoreError)


def exercise_model(model: "personacore.Model") -> None:
    """Use a model that loaded from fuzzed files: tokenizer both ways, chat template, logits."""
    ids = model.tokenizer.encode("hello world, what is your name?", add_special_tokens=True)
    model.tokenizer.decode(ids)
    if model.has_chat_template:
        ids = model.encode_chat(MESSAGES, add_generation_prompt=True)
    ids = [i for i in ids if 0 <= i < model.vocab_size][:6] or [0]
    model.logits(ids)


def _write_seeds(name: str, seeds: List[bytes], corpus: Path) -> None:
    corpus.mkdir(parents=True, exist_ok=True)
    for s in seeds:
        (corpus / hashlib.sha1(s).hexdigest()).write_bytes(s)


def main(
    name: str,
    seeds: Callable[[], List[bytes]],
    one_input: Callable[[bytes, Path], None],
    after_each: Optional[Callable[[], None]] = None,
) -> None:
    """Run the harness: ``python fuzz/fuzz_x.py --out DIR [--runs N] [--seed S] [--timeout T]``."""
    ap = argparse.ArgumentParser(description=f"fuzz {name}")
    ap.add_argument("--out", type=Path, required=True, help="statistics, crashes and corpora")
    ap.add_argument("--runs", type=int, default=10_000, help="executions (after the seeds)")
    ap.add_argument("--seed", type=int, default=1, help="libFuzzer's random seed")
    ap.add_argument("--timeout", type=int, default=20, help="seconds per input before a hang")
    ap.add_argument("--max-len", type=int, default=0, help="largest input (0: the largest seed)")
    ap.add_argument("--stop-on-crash", action="store_true")
    ap.add_argument("--rss-limit-mb", type=int, default=3072)
    args, _ = ap.parse_known_args()

    out: Path = args.out.resolve()
    stats = _Stats(name, out)
    corpus = out / "corpus" / name
    seed_list = seeds()
    _write_seeds(name, seed_list, corpus)
    work = Path(tempfile.mkdtemp(prefix=f"pcfuzz-{name}-", dir="/dev/shm"))
    max_len = args.max_len or max(4096, 2 * max(len(s) for s in seed_list))

    def test_one_input(data: bytes) -> None:
        stats.executions += 1
        try:
            one_input(data, work)
        except Exception as e:  # noqa: BLE001 - classifying every exception is the point
            if is_crash(e):
                stats.crash(data, e)
                if args.stop_on_crash:
                    stats.write(force=True)
                    raise
        finally:
            if after_each is not None:
                try:
                    after_each()
                except Crash as e:
                    stats.crash(data, e)
        stats.write()

    import atexit

    atexit.register(stats.write, True)
    libfuzzer_args = [
        sys.argv[0],
        f"-runs={args.runs}",
        f"-seed={args.seed}",
        f"-timeout={args.timeout}",
        f"-max_len={max_len}",
        f"-rss_limit_mb={args.rss_limit_mb}",
        f"-artifact_prefix={out / 'crashes'}/{name}-",
        "-print_final_stats=1",
        str(corpus),
    ]
    atheris.Setup(libfuzzer_args, test_one_input)
    try:
        atheris.Fuzz()
    finally:
        stats.write(force=True)
