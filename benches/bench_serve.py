"""Serving benchmark (issue 15, item 5): personacore serve vs llama-cpp-python's server, one run.

    pip install ".[serve]" httpx aiohttp "llama-cpp-python[server]"
    python benches/bench_serve.py                      # everything: parts a-f, 1/4/16 clients
    python benches/bench_serve.py --only b,c           # pieces (see --only)
    python benches/bench_serve.py --levels 1,2 --requests 2 --tokens 8 --rounds 1   # smoke run
    python benches/bench_serve.py --out serve.json     # also write the numbers as JSON

One load generator (this process: asyncio + aiohttp, streamed chat requests, so the time to first
token is seen) drives servers running in their own processes, all on the Q4_1 GGUF of
``personacore.engine.defaults.default_model_path()`` with the same thread count:

  a. ``personacore serve`` f32 (the GGUF dequantized) and ``--quantized`` (Q4_1 kept quantized);
  b. llama-cpp-python's OpenAI server (``benches/llama_server.py``: ``llama_cpp.server``'s app,
     no extra buffer types, ``n_threads`` = ``n_threads_batch`` = ``--threads``);
  c. the floor: sequential ``model.generate`` in this process, the prompts of the 1-client level;
  d. 16 clients, each steering with a *different* vector (``steer`` extra body key), vs unsteered;
  e. 16 clients monitoring 8 vectors at every layer (``monitor``: layers ``"all"``) vs unmonitored;
  f. one client's latency vs ``model.generate`` of the same chat in this process, measured in
     pairs: one served request, then the same prompt through ``model.generate`` (the order of the
     two alternates from pair to pair), so that both sides of a pair see the same state of a shared
     host; the median of the pairs' ratios is compared with the target. Streamed requests are the
     target's; the same pairs with whole (non-streamed) replies follow, for what the per-token
     stream costs.

Each client sends varied chat prompts one after the other; every reply is exactly ``--tokens``
tokens on every side (personacore ``ignore_eos``, llama-cpp-python ``min_tokens`` = ``max_tokens``;
the script counts and reports any reply that came out shorter). Per level: throughput (generated
tokens / wall time of the level), p50/p99 request latency and time to first token (TTFT). The levels
run in turn over the servers (all started at once), so a slow patch of the host hits every side;
d and e run in rounds (9 by default) whose order rotates, each compared with the unsteered run of its
round; each round's ratio is printed with their mean and its standard error.
The vectors for d and e are random unit directions written as PersonaVector files into a temporary
directory and loaded with ``--vector NAME=PATH``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_generate import BATCH_PROMPTS, gguf_path, machine_line  # noqa: E402
from serve_load import (  # noqa: E402
    free_port,
    request_body,
    run_level,
    single_request,
    wait_ready,
)

PARTS = {
    "a": {"f32", "q4"},
    "b": {"llama"},
    "c": {"floor"},
    "d": {"steer"},
    "e": {"monitor"},
    "f": {"latency"},
}
N_STEER = 16  # vectors for d: one per client
N_MONITOR = 8  # vectors monitored in e (the first 8 of the same files)


@dataclass
class Side:
    """One server under test: its name, process, base URL and request flavour."""

    name: str
    kind: str  # "personacore" or "llama"
    proc: subprocess.Popen
    url: str
    levels: List[int] = field(default_factory=list)
    rows: Dict[int, Dict[str, Any]] = field(default_factory=dict)  # clients -> run_level numbers


def parse_parts(only: str) -> set:
    """``--only a,b,...`` (letters of the docstring or f32,q4,llama,floor,steer,monitor,latency)."""
    names = {n for v in PARTS.values() for n in v}
    out: set = set()
    for item in (x.strip() for x in only.split(",") if x.strip()):
        if item in PARTS:
            out |= PARTS[item]
        elif item in names:
            out.add(item)
        else:
            raise SystemExit(f"--only: unknown part {item!r} (use a-f or one of {sorted(names)})")
    return out


def write_vectors(directory: str, coef_layer: int, num_layers: int, hidden: int) -> List[str]:
    """16 random unit-direction PersonaVector files (every row unit length); their NAME=PATH args."""
    import personacore as pc

    rng = np.random.default_rng(15)
    args = []
    for i in range(N_STEER):
        d = rng.standard_normal((num_layers + 1, hidden)).astype(np.float32)
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        meta = {"trait": f"random-{i}", "method": "random unit directions (benches/bench_serve.py)"}
        vec = pc.PersonaVector(d, layer=coef_layer, name=f"s{i}", metadata=meta)
        path = os.path.join(directory, f"s{i}.safetensors")
        vec.save(path)
        args.append(f"s{i}={path}")
    return args


def start(cmd: List[str], ready: str, env: Dict[str, str]) -> Tuple[subprocess.Popen, str]:
    """Start a server (``{port}`` in ``cmd`` filled in) and wait until ``ready`` answers 200."""
    port = free_port()
    proc = subprocess.Popen([c.replace("{port}", str(port)) for c in cmd], env=env)
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, url + ready, timeout=300)
    return proc, url


def start_sides(
    args: argparse.Namespace, parts: set, vector_args: List[str], sides: List[Side]
) -> None:
    """Start the servers the chosen parts need into ``sides``, each with the levels it runs."""
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    gguf = str(gguf_path())
    levels = args.level_list
    wanted: Dict[str, List[int]] = {}
    for name in ("f32", "q4"):
        lv = list(levels) if name in parts else []
        if "latency" in parts and name == args.targets_on and 1 not in lv:
            lv = [1] + lv
        if lv or (name == args.targets_on and parts & {"steer", "monitor"}):
            wanted[name] = lv
    if "llama" in parts:
        wanted["llama"] = list(levels)
    for name, lv in wanted.items():
        if name == "llama":
            cmd = [sys.executable, os.path.join(os.path.dirname(__file__), "llama_server.py")]
            cmd += ["--model", gguf, "--port", "{port}", "--threads", str(args.threads)]
            proc, url = start(cmd, "/v1/models", env)
            sides.append(Side("llama-cpp-python Q4_1", "llama", proc, url, lv))
            continue
        cmd = [sys.executable, "-m", "personacore", "serve", "--model", gguf, "--port", "{port}"]
        cmd += ["--max-batch", str(args.max_batch), "--log-level", "warning"]
        cmd += ["--quantized"] if name == "q4" else []
        cmd += ["--precision", args.precision] if args.precision else []
        for v in vector_args:
            cmd += ["--vector", v]
        proc, url = start(cmd, "/health", env)
        label = "personacore Q4_1" if name == "q4" else "personacore f32"
        sides.append(Side(label, "personacore", proc, url, lv))


def floor(model: Any, prompts: List[str], tokens: int) -> Dict[str, Any]:
    """Sequential ``model.generate`` of ``prompts`` (chat-templated like the server): tok/s, latency."""
    ids = [
        model.encode_chat([{"role": "user", "content": p}], add_generation_prompt=True)
        for p in prompts
    ]
    model.generate(ids[0], max_new_tokens=2, temperature=0.0, ignore_eos=True)  # warm-up
    lat = []
    t0, cpu0 = time.perf_counter(), time.process_time()
    for x in ids:
        t = time.perf_counter()
        g = model.generate(x, max_new_tokens=tokens, temperature=0.0, ignore_eos=True)
        lat.append(time.perf_counter() - t)
        assert len(g.token_ids) == tokens, (len(g.token_ids), tokens)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    ttft = []  # prompt prefill + first token, the in-process counterpart of the server's TTFT
    for x in ids:
        t = time.perf_counter()
        model.generate(x, max_new_tokens=1, temperature=0.0, ignore_eos=True)
        ttft.append(time.perf_counter() - t)
    return {
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "requests": len(ids),
        "tokens": tokens * len(ids),
        "tok_s": tokens * len(ids) / wall,
        "p50_s": float(np.percentile(lat, 50)),
        "p99_s": float(np.percentile(lat, 99)),
        "prompt_tokens": [len(x) for x in ids],
        "cpu_ms_per_token": cpu * 1000 / (tokens * len(ids)),
    }


def whole_request(url: str, body: Dict[str, Any]) -> Dict[str, Any]:
    """Latency and tokens of one non-streamed chat request."""
    body = {**body, "stream": False}
    body.pop("stream_options", None)
    import httpx

    t0 = time.perf_counter()
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
    latency = time.perf_counter() - t0
    if r.status_code != 200:
        raise SystemExit(f"{url}: HTTP {r.status_code}: {r.text[:500]}")
    return {"latency": latency, "tokens": r.json()["usage"]["completion_tokens"]}


def paired_latency(
    side: Side, model: Any, prompts: List[str], tokens: int, stream: bool = True
) -> Dict[str, Any]:
    """Part f: pairs of (one served request, ``model.generate`` of the same chat in this process).

    Both sides start from the chat text (the server applies the template and tokenizes, so the
    in-process call does too), ask for exactly ``tokens`` greedy tokens and are timed to the last
    token; the first of the two alternates from pair to pair. ``stream=False``: whole replies.
    """
    send = single_request if stream else whole_request
    body_of = [request_body(side.kind, p, tokens, None) for p in prompts]
    chats = [[{"role": "user", "content": p}] for p in prompts]
    model.generate(chats[0], max_new_tokens=2, temperature=0.0, ignore_eos=True)  # warm-up
    single_request(side.url, request_body(side.kind, prompts[0], 2, None))
    served: List[float] = []
    local: List[float] = []

    def serve_one(body: Dict[str, Any], _chat: Any) -> None:
        r = send(side.url, body)
        assert r["tokens"] == tokens, (r["tokens"], tokens)
        served.append(r["latency"])

    def local_one(_body: Dict[str, Any], chat: Any) -> None:
        t = time.perf_counter()
        g = model.generate(chat, max_new_tokens=tokens, temperature=0.0, ignore_eos=True)
        local.append(time.perf_counter() - t)
        assert len(g.token_ids) == tokens, (len(g.token_ids), tokens)

    for i, (body, chat) in enumerate(zip(body_of, chats)):
        for run in (serve_one, local_one) if i % 2 == 0 else (local_one, serve_one):
            run(body, chat)
    ratios = [s / g for s, g in zip(served, local)]
    return {
        "pairs": len(ratios),
        "median_ratio": float(np.median(ratios)),
        "served_p50_s": float(np.median(served)),
        "generate_p50_s": float(np.median(local)),
        "ratios": ratios,
    }


def paired(rounds: List[Dict[str, Dict[str, Any]]], name: str) -> Tuple[float, float]:
    """(median over rounds of name tok/s / plain tok/s, best name tok/s / best plain tok/s)."""
    r = [x[name]["tok_s"] / x["plain"]["tok_s"] for x in rounds]
    best = max(x[name]["tok_s"] for x in rounds) / max(x["plain"]["tok_s"] for x in rounds)
    return float(np.median(r)), best


def round_spread(rounds: List[Dict[str, Dict[str, Any]]], name: str, overhead: bool) -> str:
    """Each round's ratio of ``name`` to plain (as a % overhead if ``overhead``) and their mean
    with its standard error: on a shared 2-core host one round moves by several percent, so a
    median of few rounds is only as good as this spread says."""
    r = np.array([x["plain"]["tok_s"] / x[name]["tok_s"] - 1 for x in rounds])
    if not overhead:
        r = np.array([x[name]["tok_s"] / x["plain"]["tok_s"] for x in rounds])
    fmt = (lambda v: f"{100 * v:+.1f}%") if overhead else (lambda v: f"{v:.3f}x")
    se = r.std(ddof=1) / np.sqrt(len(r)) if len(r) > 1 else float("nan")
    se_txt = f"{100 * se:.1f} points" if overhead else f"{se:.3f}"
    return f"    rounds: {' '.join(fmt(v) for v in r)}; mean {fmt(r.mean())} +- {se_txt} (standard error)"


def run_targets(
    side: Side, args: argparse.Namespace, parts: set, num_layers: int
) -> List[Dict[str, Dict[str, Any]]]:
    """Parts d and e at ``--target-clients`` clients: rounds of plain / steer / monitor in turn."""
    c, n = args.target_clients, args.requests
    steer = [{"steer": [{"vector": f"s{k % N_STEER}", "coef": args.steer_coef}]} for k in range(c)]
    monitor = {"monitor": {"vectors": [f"s{i}" for i in range(N_MONITOR)], "layers": "all"}}
    configs: Dict[str, Any] = {"plain": None}
    if "steer" in parts:
        configs["steer"] = steer
    if "monitor" in parts:
        configs["monitor"] = [monitor] * c
    names = list(configs)
    rounds = []
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        row = {}
        for k in order:
            row[k] = run_level(
                side.url, side.kind, c, n, args.tokens, BATCH_PROMPTS, configs[k], pid=side.proc.pid
            )
            if k == "monitor":  # every reply must carry 8 vectors x all rows of scores
                assert row[k]["score_rows"] == num_layers + 1, row[k]["score_rows"]
        rounds.append(row)
    return rounds


def fmt_row(label: str, r: Dict[str, Any], floor_tok_s: Optional[float]) -> str:
    """One line of the level table."""
    x = f"{r['tok_s'] / floor_tok_s:7.2f}" if floor_tok_s else f"{'-':>7}"
    batch = (
        f"{r['mean_batch']:6.1f} {r['max_batch']:5.0f}"
        if r.get("mean_batch") is not None
        else f"{'-':>6} {'-':>5}"
    )
    short = f"  ({r['short']} short)" if r["short"] else ""
    return (
        f"{label:24s}{r['clients']:>4} {r['requests']:>5} {r['tok_s']:7.1f} {x}  {r['p50_s']:6.2f} "
        f"{r['p99_s']:6.2f} {r['ttft_p50_s']:7.3f} {r['ttft_p99_s']:7.3f}  {batch}{short}"
    )


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def report(
    args, sides, floors, rounds, target_side, parts, prompt_tokens, latency, latency_whole=None
) -> Dict[str, Any]:
    """Print the tables, ratios and what limits each; return everything as a dict for ``--out``."""
    T = args.tokens
    print(
        f"\nworkload: {len(BATCH_PROMPTS)} varied chat prompts ({min(prompt_tokens)}-{max(prompt_tokens)} "
        f"prompt tokens), replies exactly {T} tokens, greedy, {args.requests} requests per level "
        f"(each client sends requests/clients of them one after the other), streamed"
    )
    floor_of = {"personacore f32": floors.get("f32"), "personacore Q4_1": floors.get("q4")}
    print("\n== throughput and latency (tok/s = generated tokens / wall time of the level)")
    print(
        f"{'side':24s}{'cli':>4} {'reqs':>5} {'tok/s':>7} {'x floor':>7}  {'p50 s':>6} {'p99 s':>6} "
        f"{'TTFT50':>7} {'TTFT99':>7}  {'batch':>6} {'max':>5}"
    )
    for s in sides:
        fl = floor_of.get(s.name)
        for c in sorted(s.rows):
            print(fmt_row(s.name, s.rows[c], fl["tok_s"] if fl else None))
    for key, label in (("f32", "model.generate f32"), ("q4", "model.generate Q4_1")):
        if key in floors:
            f = floors[key]
            print(
                f"{'floor ' + label:30s} {f['requests']:>5} {f['tok_s']:7.1f} {'1.00':>7}  "
                f"{f['p50_s']:6.2f} {f['p99_s']:6.2f} {f['ttft_p50_s']:7.3f}  (sequential, in process)"
            )
    print(
        "('batch' = generated tokens per engine step over the level, i.e. the mean decode batch, from "
        "/metrics; 'max' = the largest batch_size seen when polled every 0.5 s)"
    )

    print("\n== ratios vs targets")
    by = {s.name: s for s in sides}
    top = max(args.level_list)
    q4, ll = by.get("personacore Q4_1"), by.get("llama-cpp-python Q4_1")
    if q4 and ll and top in q4.rows and top in ll.rows:
        r = q4.rows[top]["tok_s"] / ll.rows[top]["tok_s"]
        print(
            f"personacore Q4_1 / llama-cpp-python server at {top} clients: {r:.2f}x   (target >= 3x: {verdict(r >= 3)})"
        )
    f32 = by.get("personacore f32")
    if f32 and ll and top in f32.rows and top in ll.rows:
        r = f32.rows[top]["tok_s"] / ll.rows[top]["tok_s"]
        print(
            f"personacore f32 / llama-cpp-python server at {top} clients: {r:.2f}x   (no target; different weights)"
        )
    if rounds:
        c = args.target_clients
        if "steer" in parts:
            med, best = paired(rounds, "steer")
            print(
                f"(d) {c} clients, each a different steering vector / unsteered: {med:.3f}x paired median "
                f"({best:.3f}x best vs best, {len(rounds)} rounds)   (target >= 0.9x: {verdict(med >= 0.9)})"
            )
            print(round_spread(rounds, "steer", overhead=False))
        if "monitor" in parts:
            med, best = paired(rounds, "monitor")
            print(
                f"(e) {c} clients monitoring {N_MONITOR} vectors x all layers / unmonitored: overhead "
                f"{100 * (1 / med - 1):+.1f}% paired median ({100 * (1 / best - 1):+.1f}% best vs best)   "
                f"(target <= 5%: {verdict(1 / med - 1 <= 0.05)})"
            )
            print(round_spread(rounds, "monitor", overhead=True))
    key = "f32" if args.targets_on == "f32" else "q4"
    ts = by.get("personacore f32" if key == "f32" else "personacore Q4_1")
    if latency:
        r = latency["median_ratio"]
        print(
            f"(f) one client, latency served / model.generate of the same chat ({key}): {r:.3f}x "
            f"median of {latency['pairs']} pairs (p50 {latency['served_p50_s']:.3f} s vs "
            f"{latency['generate_p50_s']:.3f} s)   (target <= 1.05x: {verdict(r <= 1.05)})"
        )
    if latency_whole:
        print(
            f"    whole (non-streamed) replies, same pairs: {latency_whole['median_ratio']:.3f}x "
            f"(p50 {latency_whole['served_p50_s']:.3f} s vs {latency_whole['generate_p50_s']:.3f} s)"
        )
    if "latency" in parts and ts and 1 in ts.rows and key in floors:
        r = ts.rows[1]["p50_s"] / floors[key]["p50_s"]
        print(
            f"    unpaired: the 1-client level's p50 / the floor's p50 (run minutes apart): {r:.3f}x "
            f"({ts.rows[1]['p50_s']:.3f} s vs {floors[key]['p50_s']:.3f} s)"
        )

    print("\n== what limits it")
    for s in sides:
        if s.kind == "llama":
            lo, hi = min(s.rows), max(s.rows)
            print(
                f"{s.name}: serves ONE request at a time (llama_cpp.server holds one Llama behind a lock; "
                f"there is no batching across requests), so concurrency only queues: {hi} clients give "
                f"{s.rows[hi]['tok_s'] / s.rows[lo]['tok_s']:.2f}x the tok/s of {lo}; TTFT p50 "
                f"{s.rows[lo]['ttft_p50_s']:.3f} s at {lo} vs {s.rows[hi]['ttft_p50_s']:.3f} s at {hi} "
                "clients (at N clients a request waits for up to N - 1 others)"
            )
        elif s.rows:
            parts_txt = ", ".join(
                f"{c} clients {s.rows[c]['mean_batch']:.1f}"
                for c in sorted(s.rows)
                if s.rows[c].get("mean_batch")
            )
            print(
                f"{s.name}: generated tokens per engine step (mean decode batch): {parts_txt} (--max-batch {args.max_batch}); "
                f"a step reads all weights once, so tok/s grows with the batch until compute, not memory, bounds it"
            )
    if rounds:
        mb = {k: np.mean([x[k]["mean_batch"] or 0 for x in rounds]) for k in rounds[0]}
        kb = {k: np.mean([x[k]["bytes_per_request"] for x in rounds]) / 1024 for k in rounds[0]}
        print(
            f"d/e on {target_side.name}: mean batch "
            + ", ".join(f"{k} {v:.1f}" for k, v in mb.items())
            + "; reply bytes per request "
            + ", ".join(f"{k} {v:.1f} KiB" for k, v in kb.items())
            + (
                " (monitored replies carry per-token scores of 8 vectors x all rows in every chunk: "
                "the server serialises and this process parses them on the same CPUs)"
                if "monitor" in rounds[0]
                else ""
            )
        )
    if rounds:
        # CPU per generated token by part, median over the rounds: where a variant's extra goes
        groups = sorted({g for x in rounds for k in x for g in x[k]["cpu_ms_per_token"]})
        for k in rounds[0]:
            cpu = {
                g: np.median([x[k]["cpu_ms_per_token"].get(g, np.nan) for x in rounds])
                for g in groups
            }
            print(
                f"    CPU ms per token, {k}: "
                + ", ".join(f"{g} {v:.2f}" for g, v in cpu.items())
                + f"; sum {sum(cpu.values()):.2f}"
            )
    if "latency" in parts and ts and 1 in ts.rows and key in floors:
        sv, fl = ts.rows[1], floors[key]
        per_tok = [(x["p50_s"] - x["ttft_p50_s"]) / max(1, T - 1) * 1000 for x in (sv, fl)]
        print(
            f"(f): TTFT p50 served {sv['ttft_p50_s']:.3f} s vs in process {fl['ttft_p50_s']:.3f} s; "
            f"after the first token {per_tok[0]:.1f} vs {per_tok[1]:.1f} ms per token (the difference: "
            "HTTP + one SSE chunk per token, the engine thread's hand-off, the load generator on the "
            "same CPUs)"
        )
        cpu = ", ".join(f"{k} {v:.2f}" for k, v in sv.get("cpu_ms_per_token", {}).items())
        print(
            f"(f): CPU ms per generated token, served at 1 client: {cpu}; in process "
            f"(model.generate, all threads): {fl['cpu_ms_per_token']:.2f}"
        )
    print(f"load average after run: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return {
        "tokens": T,
        "threads": args.threads,
        "levels": {s.name: s.rows for s in sides},
        "floors": floors,
        "targets_rounds": rounds,
        "latency_pairs": latency,
        "latency_pairs_whole": latency_whole,
    }


def main() -> int:
    """Start the servers, run the levels in turn, the floor and the target rounds; print the ratios."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--only",
        default="a,b,c,d,e,f",
        help="parts to run: letters a-f (above) or "
        "f32,q4,llama,floor,steer,monitor,latency (default: all)",
    )
    ap.add_argument("--tokens", type=int, default=64, help="tokens per reply (default 64)")
    ap.add_argument("--levels", default="1,4,16", help="concurrent clients (default 1,4,16)")
    ap.add_argument("--requests", type=int, default=32, help="requests per level (default 32)")
    ap.add_argument("--rounds", type=int, default=9, help="rounds of d/e (default 9)")
    ap.add_argument("--target-clients", type=int, default=16, help="clients of d/e (default 16)")
    ap.add_argument(
        "--targets-on",
        choices=["f32", "q4"],
        default="f32",
        help="the personacore server of d, e and f (default f32)",
    )
    ap.add_argument("--steer-coef", type=float, default=4.0, help="d: coefficient (unit vectors)")
    ap.add_argument("--threads", type=int, default=2, help="threads of every side (default 2)")
    ap.add_argument("--max-batch", type=int, default=16, help="personacore serve --max-batch")
    ap.add_argument(
        "--precision",
        choices=["highest", "high"],
        default=None,
        help="personacore serve --precision (default: the server's)",
    )
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args()
    args.level_list = [int(x) for x in args.levels.split(",")]
    parts = parse_parts(args.only)
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)  # before personacore starts its pool

    import httpx

    import personacore as pc

    print(machine_line(args.threads))
    need_floor = {k for k in ("f32", "q4") if "floor" in parts}
    if "latency" in parts:
        need_floor.add(args.targets_on)
    probe = pc.load_model(str(gguf_path()), quantized=True)
    num_layers, hidden = probe.num_layers, probe.hidden_size
    prompt_tokens = [
        len(probe.encode_chat([{"role": "user", "content": p}], add_generation_prompt=True))
        for p in BATCH_PROMPTS
    ]
    del probe
    tmp = tempfile.TemporaryDirectory(prefix="bench_serve_")
    vector_args = (
        write_vectors(tmp.name, num_layers // 2, num_layers, hidden)
        if parts & {"steer", "monitor"}
        else []
    )
    sides: List[Side] = []
    floors: Dict[str, Any] = {}
    rounds: List[Dict[str, Dict[str, Any]]] = []
    latency: Optional[Dict[str, Any]] = None
    latency_whole: Optional[Dict[str, Any]] = None
    try:
        start_sides(args, parts, vector_args, sides)
    except BaseException:
        for s in sides:
            s.proc.terminate()
        raise
    target_side = next(
        (
            s
            for s in sides
            if s.name.endswith("f32" if args.targets_on == "f32" else "Q4_1")
            and s.kind == "personacore"
        ),
        None,
    )
    try:
        llama = next((s for s in sides if s.kind == "llama"), None)
        if llama:
            import llama_cpp

            print(
                f"llama-cpp-python {llama_cpp.__version__}: n_threads = n_threads_batch = {args.threads}, "
                "n_ctx 2048, extra buffer types off, interrupt_requests off; one request at a time"
            )
        print(
            f"personacore {pc.__version__}; servers: {', '.join(s.name for s in sides)}", flush=True
        )
        checks = []
        for s in sides:  # the same chat must give the same prompt tokens on every side
            body = request_body(s.kind, BATCH_PROMPTS[0], 4, None)
            body["stream"] = False
            body.pop("stream_options", None)
            usage = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=600).json()[
                "usage"
            ]
            checks.append(f"{s.name} {usage['prompt_tokens']}")
        print(f"check: prompt tokens of the first chat prompt: {', '.join(checks)}")
        for s in sides:  # warm-up: a short reply at a few clients
            run_level(
                s.url,
                s.kind,
                min(4, max(args.level_list)),
                min(4, max(args.level_list)),
                4,
                BATCH_PROMPTS,
            )
        order = sorted({c for s in sides for c in s.levels} | ({1} if need_floor else set()))
        for c in order:
            for s in sides:
                if c in s.levels:
                    s.rows[c] = run_level(
                        s.url, s.kind, c, args.requests, args.tokens, BATCH_PROMPTS, pid=s.proc.pid
                    )
                    print(fmt_row(s.name, s.rows[c], None), flush=True)
            if c == 1:  # the floor right after the 1-client level: same prompts, same order
                first = [BATCH_PROMPTS[i % len(BATCH_PROMPTS)] for i in range(args.requests)]
                for key in sorted(need_floor):
                    extra = {"precision": args.precision} if args.precision else {}
                    model = pc.load_model(str(gguf_path()), quantized=key == "q4", **extra)
                    floors[key] = floor(model, first, args.tokens)
                    print(
                        f"floor {key}: {floors[key]['tok_s']:.1f} tok/s, p50 {floors[key]['p50_s']:.2f} s",
                        flush=True,
                    )
                    if "latency" in parts and key == args.targets_on and target_side is not None:
                        latency = paired_latency(target_side, model, first, args.tokens)
                        print(
                            f"(f) pairs: served / model.generate median {latency['median_ratio']:.3f}x "
                            f"over {latency['pairs']} pairs",
                            flush=True,
                        )
                        latency_whole = paired_latency(
                            target_side, model, first, args.tokens, stream=False
                        )
                        print(
                            "(f) pairs, whole replies: served / model.generate median "
                            f"{latency_whole['median_ratio']:.3f}x",
                            flush=True,
                        )
                    del model
        if parts & {"steer", "monitor"} and target_side is not None:
            rounds = run_targets(target_side, args, parts, num_layers)
    finally:
        for s in sides:
            s.proc.terminate()
        for s in sides:
            s.proc.wait(timeout=60)
        tmp.cleanup()
    result = report(
        args, sides, floors, rounds, target_side, parts, prompt_tokens, latency, latency_whole
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
