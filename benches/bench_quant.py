"""Quantized decode (issue 17): personacore ``quantized=True`` vs llama.cpp on the same GGUF.

    pip install ".[bench]" llama-cpp-python
    python benches/bench_quant.py                     # Gemma 3 270M Q4_K_M, greedy 128, 2 threads
    python benches/bench_quant.py --model default     # SmolLM2-135M-Instruct Q4_1
    python benches/bench_quant.py --model path/to/file.gguf

Both sides get the same token ids (the plain-text prompt of bench_generate.py, no chat template:
Gemma 3 270M is a base model), the same thread count and generate exactly the same number of
tokens, greedy, EOS ignored; llama.cpp's KV cache is reset every run. Runs alternate (see
``interleaved`` in bench_generate.py); TTFT and decode speed are separated as there: decode tok/s
= (N - 1) / (t_N - t_1). llama.cpp is loaded without "extra buffer types" unless they survive a
probe here (their AMX kernels die with SIGILL on this host), so it runs its ordinary AVX-512 /
VNNI ``vec_dot`` kernels. Also printed: the file's tensor types and the process's peak resident
memory after personacore's load against the file size.
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from bench_generate import (  # noqa: E402
    BW_THREADS,
    PROMPT,
    common_prefix,
    disable_llama_extra_bufts,
    greedy_runners,
    interleaved,
    llama_extra_bufts_work,
    machine_line,
    open_llama,
    read_bandwidth,
    report_decode,
)


def model_path(name: str) -> pathlib.Path:
    """The GGUF for ``--model``: a bundled model's cached file, or a path."""
    if name == "gemma-3-270m":
        from personacore.engine.gemma3 import gemma3_model_path

        return pathlib.Path(gemma3_model_path())
    if name == "default":
        from personacore.engine.defaults import default_model_path

        return pathlib.Path(default_model_path())
    return pathlib.Path(name)


def tensor_types(path: pathlib.Path) -> str:
    """Tensor types with their counts and share of the tensor bytes ("Q8_0 10 (73%), ...")."""
    import gguf

    r = gguf.GGUFReader(str(path))
    count: collections.Counter = collections.Counter()
    size: collections.Counter = collections.Counter()
    for t in r.tensors:
        count[t.tensor_type.name] += 1
        size[t.tensor_type.name] += int(t.n_bytes)
    total = sum(size.values())
    return ", ".join(
        f"{k} {count[k]} ({100 * size[k] / total:.0f}%)" for k, _ in size.most_common()
    )


def vm_kib(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def main(argv: list | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="gemma-3-270m", help="gemma-3-270m, default, or a path")
    ap.add_argument("--threads", type=int, default=2, help="threads for both sides (default 2)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs after a warm-up")
    ap.add_argument("--tokens", type=int, default=128, help="new tokens")
    ap.add_argument(
        "--llama-extra-bufts",
        choices=["auto", "on", "off"],
        default="auto",
        help="llama.cpp extra buffer types (AMX, repacked CPU kernels); auto = on unless they crash",
    )
    args = ap.parse_args(argv)
    # Thread counts must be fixed before the engines start their pools.
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)

    import llama_cpp

    import personacore as pc

    path = model_path(args.model)
    extra = args.llama_extra_bufts
    if extra == "auto":
        extra = "on" if llama_extra_bufts_work(path, args.threads) else "off"
    if extra == "off":
        disable_llama_extra_bufts(llama_cpp)
    before = vm_kib("VmRSS")
    model = pc.load_model(str(path), quantized=True)
    loaded = vm_kib("VmHWM")
    ids = model.tokenizer.encode(PROMPT)
    llm = open_llama(llama_cpp, path, args.threads)
    ours, theirs = greedy_runners(model, llm, ids)

    n = args.tokens
    size_mb = path.stat().st_size / 1e6
    print(machine_line(args.threads))
    bw = read_bandwidth(BW_THREADS)
    print(f"model {path.name}: {size_mb:.0f} MB; tensor types {tensor_types(path)}")
    print(
        f"personacore {pc.__version__} (quantized=True, avx2={pc.avx2_enabled()}): peak resident "
        f"memory +{(loaded - before) / 1024:.0f} MiB over the load = "
        f"{(loaded - before) * 1024 / 1e6 / size_mb:.2f}x the file (target <= 1.3x)"
    )
    print(
        f"llama-cpp-python {llama_cpp.__version__} (extra buffer types {extra}; "
        f"{llama_cpp.llama_print_system_info().decode().strip()})"
    )
    first = interleaved({"personacore": ours(1), "llama.cpp": theirs(1)}, args.repeats)
    full = interleaved({"personacore": ours(n), "llama.cpp": theirs(n)}, args.repeats)
    a, b = full["personacore"]["result"], full["llama.cpp"]["result"]
    assert len(a) == n and len(b) == n, (len(a), len(b))
    sides = {
        k: {"t1": first[k]["best"], "tn": full[k]["best"], "runs": full[k]["times"]} for k in full
    }
    # Every weight is read once per decode step (the tied output projection reads the whole
    # embedding table), so the file size is the bytes per step; no fixed design band here.
    mem = 1000 * bw / size_mb
    report_decode(
        f"greedy decode, batch 1, {path.name}: personacore quantized=True vs llama.cpp",
        sides,
        n,
        len(ids),
        "personacore",
        "llama.cpp",
        1.0,
        (round(0.8 * mem, 1), round(mem, 1)),
        "bytes of the file per step at the measured bandwidth",
        bw,
        size_mb,
    )
    print(
        f"check: greedy tokens identical for the first {common_prefix(a, b)} of {n} "
        "(both round activations to 8 bits, in slightly different ways; drift is expected)"
    )
    print(f"load average after run: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
