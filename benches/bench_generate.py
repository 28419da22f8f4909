"""Generation benchmarks (issue 3): personacore vs transformers / llama.cpp, same machine, one run.

    pip install ".[bench]" llama-cpp-python   # torch, transformers, accelerate, gguf (+ llama.cpp)
    python benches/bench_generate.py greedy     # 1. f32 greedy 128 tokens, batch 1 vs transformers
    python benches/bench_generate.py quantized  # 2. quantized=True (Q4_1) vs llama.cpp, greedy 128
    python benches/bench_generate.py monitor    # 3. monitor 8 vectors x all layers + steer 1 layer vs plain
    python benches/bench_generate.py batch      # 4. 16 prompts x 64 sampled tokens, one batched call
    python benches/bench_generate.py all        # each of the above in its own process, in turn (~11 min):
                                                # greedy, quantized, monitor --only-combined (f32),
                                                # monitor --quantized, batch

Common flags: --threads N (default 2; the same for both sides), --repeats N (timed repetitions after
one warm-up; the best is reported), --tokens N (new tokens), --quantized (monitor and batch: run
personacore on the Q4_1 weights). Timed runs of the two sides alternate, so a slow patch of the
machine hits both. Every side decodes exactly the same number of tokens (EOS is ignored).

Time to first token (TTFT) and decode speed are separated by timing each side twice: with 1 new
token (= prompt prefill + the first token) and with N new tokens; decode tok/s = (N - 1) /
(t_N - t_1). "e2e" is N / t_N, the whole call. The reference limits of benches/README.md (2 cores,
AVX-512, ~8-10 GB/s memory) are printed next to the numbers.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import subprocess
import sys
import time
from typing import Callable, Dict, List, Sequence

import numpy as np

# benches/README.md, "Reference limits": physical limits of this machine kind for SmolLM2-135M.
F32_DECODE_LIMIT = (15.0, 19.0)  # ~540 MB of f32 weights per token at 8-10 GB/s
Q41_DECODE_LIMIT = (80.0, 100.0)  # ~98 MB of Q4_1 weights per token
PREFILL_LIMIT = 1100.0  # f32 compute bound (~320 GFLOP/s peak)
F32_WEIGHT_MB = (
    538.0  # 134.5 M parameters x 4 bytes, all read once per decode step (lm_head = tied embedding)
)
Q41_WEIGHT_MB = 98.0  # the Q4_1 GGUF's tensors
BW_THREADS = 2

PROMPT = (
    "I am planning a three-day trip to Lisbon in early spring with two friends who love food, "
    "old neighbourhoods and live music, but none of us likes crowded tourist traps. We will "
    "arrive on a Friday morning and leave on Sunday night. Could you suggest a relaxed plan for "
    "each day, with a few places to eat, and tell us what we should book in advance?"
)

BATCH_PROMPTS = [
    "Write a haiku about autumn rain.",
    "Explain how a refrigerator keeps food cold, in simple words.",
    "What are three good habits for a new programmer?",
    "Give me a short recipe for pancakes.",
    "Why is the sky blue? Keep it brief.",
    "Summarise the plot of a detective story you invent, in four sentences.",
    "List five animals that live in the desert and one fact about each.",
    "How do I politely decline an invitation to a party?",
    "What is the difference between weather and climate?",
    "Suggest a name for a small bakery by the sea and explain it.",
    "Describe a sunrise over the mountains to someone who has never seen one.",
    "What should I pack for a weekend hiking trip in the hills?",
    "Tell me a fun fact about octopuses.",
    "How can I make my mornings less stressful? Give practical tips for a busy parent of two.",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "Write the opening line of a fantasy novel.",
]


# ---------------------------------------------------------------------------------------------
# helpers
def machine_line(threads: int) -> str:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        flags = open("/proc/cpuinfo").read()
        avx512 = "avx512f" in flags
    except OSError:
        avx512 = False
    la = os.getloadavg()
    try:
        import personacore._core as core

        built = time.strftime("%Y-%m-%d %H:%M", time.localtime(os.path.getmtime(core.__file__)))
    except Exception:  # pragma: no cover - reporting only
        built = "?"
    return (
        f"personacore engine built {built}; "
        f"machine: {os.cpu_count()} cores, {cpu}, AVX-512 {'yes' if avx512 else 'no'}, "
        f"{platform.python_implementation()} {platform.python_version()}; threads {threads}; "
        f"load average before run {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}"
    )


def read_bandwidth(threads: int, mib: int = 1024) -> float:
    """Measured DRAM read bandwidth in GB/s: `threads` numpy sums over a buffer larger than L3."""
    import threading

    x = np.ones(mib * 1024 * 1024 // 4, dtype=np.float32)
    parts = np.array_split(x, threads)

    def once() -> float:
        ts = [threading.Thread(target=np.add.reduce, args=(p,)) for p in parts]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return time.perf_counter() - t0

    once()
    return x.nbytes / min(once() for _ in range(5)) / 1e9


def limits_line(bw: float, weight_mb: float, design: Sequence[float], what: str) -> str:
    return (
        f"limit ({what}): {weight_mb:.0f} MB of weights per decode step; the reference limits assume 8-10 GB/s -> "
        f"{design[0]:g}-{design[1]:g} tok/s; measured read bandwidth here {bw:.1f} GB/s ({'%d' % BW_THREADS} "
        f"threads) -> {1000 * bw / weight_mb:.0f} tok/s"
    )


def quiet_transformers() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF de-quantization progress bar
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def hf_eos(hf) -> int:
    """The end-of-turn id transformers uses (padding and the min_new_tokens mask)."""
    eos = hf.generation_config.eos_token_id or hf.config.eos_token_id or 2
    return eos[0] if isinstance(eos, list) else eos


def gguf_path() -> pathlib.Path:
    from personacore.engine.defaults import default_model_path

    return pathlib.Path(default_model_path())


def single_precision(args: argparse.Namespace) -> str:
    """The one precision a bench loads personacore at ('both' means 'highest' plus extra sides)."""
    return "highest" if args.precision == "both" else args.precision


def interleaved(
    fns: Dict[str, Callable[[], object]], repeats: int, pause: float = 0.3
) -> Dict[str, dict]:
    """Warm up each fn once, then run them in turn `repeats` times; best and all times per name."""
    out: Dict[str, dict] = {k: {"times": [], "result": None} for k in fns}
    for k, fn in fns.items():
        out[k]["result"] = fn()  # warm-up (and the result kept for checks)
        time.sleep(pause)
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            out[k]["times"].append(time.perf_counter() - t0)
            time.sleep(pause)  # let spinning worker threads of the other engine go to sleep
    for v in out.values():
        v["best"] = min(v["times"])
        v["median"] = float(np.median(v["times"]))
    return out


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def band(x: float, lim: Sequence[float]) -> str:
    lo, hi = lim
    return f"{100 * x / hi:.0f}-{100 * x / lo:.0f}% of the {lo:g}-{hi:g} tok/s limit"


def report_decode(
    title: str,
    sides: Dict[str, dict],
    n_new: int,
    prompt_len: int,
    ours: str,
    peer: str,
    target: float,
    limit: Sequence[float],
    limit_name: str,
    bw: float,
    weight_mb: float,
) -> None:
    """sides[name] = {"t1": best time of 1 new token, "tn": best time of n_new tokens}."""
    print(f"\n== {title}")
    print(f"prompt {prompt_len} tokens, {n_new} new tokens (greedy, EOS ignored)")
    print(
        f"{'':14s} {'e2e tok/s':>10s} {'TTFT ms':>9s} {'prefill tok/s':>14s} {'decode tok/s':>13s}   runs (s)"
    )
    rows = {}
    for name, s in sides.items():
        t1, tn = s["t1"], s["tn"]
        dec = (n_new - 1) / (tn - t1) if tn > t1 else float("nan")
        rows[name] = {"e2e": n_new / tn, "ttft": t1, "prefill": prompt_len / t1, "decode": dec}
        r = rows[name]
        print(
            f"{name:14s} {r['e2e']:10.1f} {1000 * r['ttft']:9.1f} {r['prefill']:14.1f} {r['decode']:13.1f}"
            f"   {' '.join(f'{t:.2f}' for t in s['runs'])}"
        )
    a, b = rows[ours], rows[peer]
    print(
        f"ratio {ours}/{peer}: e2e {a['e2e'] / b['e2e']:.2f}x, decode {a['decode'] / b['decode']:.2f}x, "
        f"prefill {a['prefill'] / b['prefill']:.2f}x   (target >= {target:g}x)"
    )
    print(
        f"limits ({limit_name}): {ours} decode {a['decode']:.1f} tok/s = {band(a['decode'], limit)} "
        f"(reference limits); {peer} {band(b['decode'], limit)}"
    )
    mem = 1000 * bw / weight_mb
    print(
        f"         measured read bandwidth {bw:.1f} GB/s ({BW_THREADS} threads) / {weight_mb:.0f} MB of weights per "
        f"step = {mem:.0f} tok/s: {ours} at {100 * a['decode'] / mem:.0f}%, {peer} at {100 * b['decode'] / mem:.0f}%"
    )
    print(
        f"         prefill: {ours} {a['prefill']:.0f} tok/s = {100 * a['prefill'] / PREFILL_LIMIT:.0f}% of the "
        f"f32 compute bound ~{PREFILL_LIMIT:,.0f} tok/s (a {prompt_len}-token prompt is too short to reach it)"
    )


# ---------------------------------------------------------------------------------------------
# 1. greedy f32 vs transformers
def bench_greedy(args: argparse.Namespace) -> None:
    import torch

    quiet_transformers()
    import transformers

    import personacore as pc

    torch.set_num_threads(args.threads)
    gguf = gguf_path()
    model = pc.load_model(str(gguf), precision=single_precision(args))
    print(
        f"personacore precision={model.precision!r} (AMX {'available' if pc.amx_available() else 'not available'})"
    )
    ids = model.encode_chat([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    hf_ids = torch.tensor([ids])
    mask = torch.ones_like(hf_ids)
    eos = hf_eos(hf)

    def ours(n):
        return lambda: (
            model.generate(ids, max_new_tokens=n, temperature=0.0, ignore_eos=True).token_ids
        )

    def theirs(n):
        cfg = transformers.GenerationConfig(
            do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=eos, eos_token_id=eos
        )

        def run():
            with torch.inference_mode():
                out = hf.generate(input_ids=hf_ids, attention_mask=mask, generation_config=cfg)
            return out[0, len(ids) :].tolist()

        return run

    n = args.tokens
    print(machine_line(args.threads))
    bw = read_bandwidth(BW_THREADS)
    print(
        f"personacore {pc.__version__} (f32, avx2={pc.avx2_enabled()}), torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )
    first = interleaved({"personacore": ours(1), "transformers": theirs(1)}, args.repeats)
    full = interleaved({"personacore": ours(n), "transformers": theirs(n)}, args.repeats)
    a, b = full["personacore"]["result"], full["transformers"]["result"]
    assert len(a) == n and len(b) == n, (len(a), len(b))
    sides = {
        k: {"t1": first[k]["best"], "tn": full[k]["best"], "runs": full[k]["times"]} for k in full
    }
    report_decode(
        "1. greedy decode, batch 1, f32: personacore vs transformers",
        sides,
        n,
        len(ids),
        "personacore",
        "transformers",
        1.5,
        F32_DECODE_LIMIT,
        "f32 decode, memory bound",
        bw,
        F32_WEIGHT_MB,
    )
    print(f"check: greedy tokens identical for the first {common_prefix(a, b)} of {n}")
    print(f"load average after run: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


# ---------------------------------------------------------------------------------------------
# 2. quantized vs llama.cpp
def disable_llama_extra_bufts(llama_cpp) -> None:
    """Load llama.cpp models without "extra buffer types" (AMX, CPU repack).

    A llama.cpp built with GGML_NATIVE=ON on a CPU that reports AMX packs Q4_1 weights for its AMX
    kernels; in VMs that do not enable the AMX register state (this machine) they die with SIGILL
    (`tilezero`). Without extra buffer types Q4_1 runs the ordinary AVX-512/VNNI `vec_dot` kernels;
    ggml has no CPU repack layout for Q4_1, so nothing else changes for this model.
    """
    import llama_cpp.llama as llama_mod

    orig = llama_cpp.llama_model_default_params

    def params():
        p = orig()
        p.use_extra_bufts = False
        return p

    llama_mod.llama_cpp.llama_model_default_params = params


def llama_extra_bufts_work(gguf: pathlib.Path, threads: int) -> bool:
    """Whether llama.cpp with its default extra buffer types survives a short generation here."""
    code = (
        "import llama_cpp, sys; llm = llama_cpp.Llama(model_path=sys.argv[1], n_threads=int(sys.argv[2]), "
        "n_ctx=64, verbose=False); g = llm.generate(list(range(100, 140)), temp=0.0); next(g); next(g)"
    )
    r = subprocess.run([sys.executable, "-c", code, str(gguf), str(threads)], capture_output=True)
    if r.returncode != 0:
        print(
            f"note: llama.cpp with extra buffer types failed here (exit status {r.returncode}"
            f"{', SIGILL: AMX not usable in this VM' if r.returncode in (-4, 132) else ''}); running without them"
        )
    return r.returncode == 0


def open_llama(llama_cpp, path, threads: int):
    """llama.cpp on ``path``: ``threads`` for prompt and decode, a 512-token context, no logits kept."""
    return llama_cpp.Llama(
        model_path=str(path),
        n_threads=threads,
        n_threads_batch=threads,
        n_ctx=512,
        logits_all=False,
        verbose=False,
    )


def greedy_runners(model, llm, ids):
    """``(ours, theirs)``: ``ours(n)`` / ``theirs(n)`` return a callable that greedily generates
    ``n`` tokens from ``ids`` (EOS ignored) with personacore's ``model`` / llama.cpp's ``llm`` and
    returns their ids; llama.cpp's KV cache is reset every run, so each run prefills the prompt."""

    def ours(n):
        return lambda: (
            model.generate(ids, max_new_tokens=n, temperature=0.0, ignore_eos=True).token_ids
        )

    def theirs(n):
        def run():
            llm.reset()
            out = []
            for tok in llm.generate(
                ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True
            ):
                out.append(int(tok))
                if len(out) == n:
                    break
            return out

        return run

    return ours, theirs


def bench_quantized(args: argparse.Namespace) -> None:
    import llama_cpp

    import personacore as pc

    gguf = gguf_path()
    extra = args.llama_extra_bufts
    if extra == "auto":
        extra = "on" if llama_extra_bufts_work(gguf, args.threads) else "off"
    if extra == "off":
        disable_llama_extra_bufts(llama_cpp)
    model = pc.load_model(str(gguf), quantized=True)
    ids = model.encode_chat([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    llm = open_llama(llama_cpp, gguf, args.threads)
    ours, theirs = greedy_runners(model, llm, ids)

    n = args.tokens
    print(machine_line(args.threads))
    bw = read_bandwidth(BW_THREADS)
    print(
        f"personacore {pc.__version__} (quantized=True, Q4_1 weights, avx2={pc.avx2_enabled()}), "
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
    report_decode(
        "2. greedy decode, batch 1, Q4_1: personacore quantized=True vs llama.cpp",
        sides,
        n,
        len(ids),
        "personacore",
        "llama.cpp",
        1.0,
        Q41_DECODE_LIMIT,
        "Q4_1 decode, memory bound",
        bw,
        Q41_WEIGHT_MB,
    )
    print(
        "check: greedy tokens identical for the first "
        f"{common_prefix(a, b)} of {n} (both quantize activations to 8 bits differently; drift is expected)"
    )
    print(f"load average after run: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


# ---------------------------------------------------------------------------------------------
# 3. monitoring + steering overhead
def bench_monitor(args: argparse.Namespace) -> None:
    import personacore as pc

    gguf = gguf_path()
    model = pc.load_model(str(gguf), quantized=args.quantized)
    ids = model.encode_chat([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    rng = np.random.default_rng(0)
    h = model.hidden_size
    vecs = {f"v{i}": rng.standard_normal(h).astype(np.float32) for i in range(8)}
    layer = model.num_layers // 2
    steer_vec = rng.standard_normal(h).astype(np.float32)
    steer_vec /= np.linalg.norm(steer_vec)
    n = args.tokens

    def run(monitor=None, steer=None):
        def f():
            g = model.generate(
                ids,
                max_new_tokens=n,
                temperature=0.0,
                ignore_eos=True,
                monitor=pc.Monitor(monitor, layers="all") if monitor else None,
                steer=steer,
            )
            return g

        return f

    steer = [pc.Steer(steer_vec, 4.0, layers=[layer])]
    fns = {
        "plain": run(),
        "monitor": run(monitor=vecs),
        "steer": run(steer=steer),
        "monitor+steer": run(monitor=vecs, steer=steer),
    }
    if args.only_combined:
        fns = {k: fns[k] for k in ("plain", "monitor+steer")}
    print(machine_line(args.threads))
    print(
        f"personacore {pc.__version__} ({'quantized Q4_1' if args.quantized else 'f32'}), prompt {len(ids)} "
        f"tokens, {n} new tokens; monitor: 8 random vectors at all {model.num_layers + 1} rows; "
        f"steer: 1 vector, coef 4, layer {layer}"
    )
    # Run-to-run noise on this VM (+-5-15%) is larger than the effect, so the configurations run in
    # rounds, in an order that rotates every round, and each is compared with the plain run of the
    # same round; the median of those paired ratios is the overhead.
    names = list(fns)
    results = {k: fns[k]() for k in names}  # warm-up
    times: Dict[str, List[float]] = {k: [] for k in names}
    for r in range(args.repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for k in order:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
            time.sleep(0.2)
    g = results["monitor+steer"]
    for name, s in g.scores.items():
        assert s.shape == (len(ids) + n, model.num_layers + 1), (name, s.shape)
        assert np.isfinite(s).all()
    plain = np.array(times["plain"])
    print(
        f"\n== 3. monitoring + steering overhead ({'Q4_1' if args.quantized else 'f32'}), {args.repeats} rounds"
    )
    print(
        f"{'':14s} {'e2e tok/s':>10s} {'overhead: paired median':>24s} {'[quartiles]':>17s} {'best vs best':>13s}"
        f"   runs (s)"
    )
    for k in names:
        t = np.array(times[k])
        ratio = t / plain - 1
        q1, med, q3 = np.percentile(ratio, [25, 50, 75])
        print(
            f"{k:14s} {n / t.min():10.2f} {100 * med:23.2f}% [{100 * q1:+6.2f}%,{100 * q3:+6.2f}%] "
            f"{100 * (t.min() / plain.min() - 1):12.2f}%   {' '.join(f'{x:.2f}' for x in t)}"
        )
    print("target: monitor+steer overhead <= 5% (goal <= 2%)")
    print(
        f"check: scores {len(g.scores)} x {next(iter(g.scores.values())).shape} per generation, all finite"
    )
    print(f"load average after run: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


# ---------------------------------------------------------------------------------------------
# 4. batched sampling vs transformers
def bench_batch(args: argparse.Namespace) -> None:
    import torch

    quiet_transformers()
    import transformers

    import personacore as pc

    torch.set_num_threads(args.threads)
    gguf = gguf_path()
    model = pc.load_model(str(gguf), quantized=args.quantized, precision=single_precision(args))
    # --precision both (the default here): plain f32 and bf16x3 on AMX side by side in one run
    high = (
        pc.load_model(str(gguf), precision="high")
        if args.precision == "both" and pc.amx_available() and not args.quantized
        else None
    )
    prompts = [
        model.encode_chat([{"role": "user", "content": p}], add_generation_prompt=True)
        for p in BATCH_PROMPTS[: args.batch]
    ]
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    eos = hf_eos(hf)
    width = max(len(p) for p in prompts)
    hf_ids = torch.tensor([[eos] * (width - len(p)) + p for p in prompts])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    n = args.tokens
    cfg = transformers.GenerationConfig(
        do_sample=True,
        temperature=0.8,
        top_p=0.95,
        top_k=0,
        max_new_tokens=n,
        min_new_tokens=n,
        pad_token_id=eos,
        eos_token_id=eos,
    )
    seed = [0]

    def sampler(m):
        def ours():
            seed[0] += 1
            gens = m.generate(
                prompts,
                max_new_tokens=n,
                temperature=0.8,
                top_p=0.95,
                top_k=0,
                seed=seed[0],
                ignore_eos=True,
            )
            return [g.token_ids for g in gens]

        return ours

    def theirs():
        seed[0] += 1
        torch.manual_seed(seed[0])
        with torch.inference_mode():
            out = hf.generate(input_ids=hf_ids, attention_mask=mask, generation_config=cfg)
        return out[:, width:].tolist()

    print(machine_line(args.threads))
    print(
        f"personacore {pc.__version__} ({'quantized Q4_1' if args.quantized else 'f32'}), torch "
        f"{torch.__version__}, transformers {transformers.__version__} (f32)"
    )
    sides = {f"personacore {model.precision}": sampler(model), "transformers": theirs}
    if high is not None:
        sides["personacore high"] = sampler(high)
    res = interleaved(sides, args.repeats)
    for k in res:
        toks = res[k]["result"]
        assert len(toks) == len(prompts) and all(len(t) == n for t in toks), k
    total = len(prompts) * n
    lens = [len(p) for p in prompts]
    print(
        f"\n== 4. batched sampling: {len(prompts)} prompts ({min(lens)}-{max(lens)} tokens) x {n} new tokens, "
        f"temperature 0.8, top_p 0.95, one generate call, best of {args.repeats}"
    )
    print(f"{'':20s} {'tok/s':>8s} {'time s':>8s}   runs (s)")
    for k, v in res.items():
        print(
            f"{k:20s} {total / v['best']:8.1f} {v['best']:8.2f}   {' '.join(f'{t:.2f}' for t in v['times'])}"
        )
    for k in res:
        if k.startswith("personacore"):
            ratio = res["transformers"]["best"] / res[k]["best"]
            print(f"ratio {k}/transformers: {ratio:.2f}x   (target >= 3x)")
    ours_tps = total / min(v["best"] for k, v in res.items() if k.startswith("personacore"))
    lo, hi = F32_DECODE_LIMIT if not args.quantized else Q41_DECODE_LIMIT
    b = len(prompts)
    bw = read_bandwidth(BW_THREADS)
    mem = b * 1000 * bw / (Q41_WEIGHT_MB if args.quantized else F32_WEIGHT_MB)
    print(
        f"limits: the weights are read once per step for all {b} sequences: the reference limits -> {b} x {lo:g}-{hi:g} = "
        f"{b * lo:,.0f}-{b * hi:,.0f} tok/s; measured {bw:.1f} GB/s -> {mem:,.0f} tok/s; f32 compute bound "
        f"~{PREFILL_LIMIT:,.0f} tok/s (reference limit); ceiling min(memory, compute) = {min(mem, PREFILL_LIMIT):,.0f} tok/s: "
        f"personacore at {100 * ours_tps / min(mem, PREFILL_LIMIT):.0f}% of it (sampling {b} x 49,152-entry "
        f"distributions per step and attention over the padded batch come on top)"
    )
    print(f"load average after run: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


# ---------------------------------------------------------------------------------------------
BENCHES = {
    "greedy": bench_greedy,
    "quantized": bench_quantized,
    "monitor": bench_monitor,
    "batch": bench_batch,
}
DEFAULT_TOKENS = {"greedy": 128, "quantized": 128, "monitor": 128, "batch": 64}
DEFAULT_REPEATS = {"greedy": 3, "quantized": 5, "monitor": 12, "batch": 3}


def main(argv: List[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("bench", choices=[*BENCHES, "all"])
    ap.add_argument("--threads", type=int, default=2, help="threads for both sides (default 2)")
    ap.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed repetitions after a warm-up (best reported)",
    )
    ap.add_argument("--tokens", type=int, default=None, help="new tokens (default 128; batch: 64)")
    ap.add_argument("--batch", type=int, default=16, help="batch bench: number of prompts (<= 16)")
    ap.add_argument(
        "--llama-extra-bufts",
        choices=["auto", "on", "off"],
        default="auto",
        help="quantized bench: llama.cpp extra buffer types (AMX); auto = on unless they crash here",
    )
    ap.add_argument(
        "--only-combined",
        action="store_true",
        help="monitor bench: time only plain and monitor+steer (halves the run time)",
    )
    ap.add_argument(
        "--quantized", action="store_true", help="monitor/batch: personacore with quantized=True"
    )
    ap.add_argument(
        "--precision",
        choices=["highest", "high", "both"],
        default="both",
        help="personacore f32 matmul precision; 'both' (default) runs batch at both when the CPU "
        "has AMX, the other benches at 'highest'",
    )
    args = ap.parse_args(argv)

    if args.bench == "all":
        rc = 0
        runs = [
            ["greedy"],
            ["quantized"],
            ["monitor", "--only-combined"],
            ["monitor", "--quantized"],
            ["batch"],
        ]
        for name in runs:
            cmd = [sys.executable, os.path.abspath(__file__), *name, "--threads", str(args.threads)]
            if args.repeats:
                cmd += ["--repeats", str(args.repeats)]
            if args.tokens:
                cmd += ["--tokens", str(args.tokens)]
            print(f"\n$ {' '.join(cmd)}", flush=True)
            rc |= subprocess.call(cmd)
        sys.exit(rc)

    # Thread counts must be fixed before the engines start their pools.
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault(
        "TQDM_DISABLE", "1"
    )  # before anything imports tqdm (transformers' GGUF progress bar)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    args.repeats = args.repeats or DEFAULT_REPEATS[args.bench]
    args.tokens = args.tokens or DEFAULT_TOKENS[args.bench]
    BENCHES[args.bench](args)


if __name__ == "__main__":
    main()
