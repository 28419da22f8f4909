"""Serving benchmark (issue 15, item 5): ``personacore serve`` under 1, 4 and 16 concurrent clients.

    pip install ".[serve]" httpx
    python benches/bench_serve.py                      # f32, 1/4/16 clients, 64-token replies
    python benches/bench_serve.py --quantized          # the Q4_1 weights kept quantized
    python benches/bench_serve.py --out serve.json     # also write the numbers as JSON

One load generator (this process, asyncio + httpx, streamed requests so that the time to first
token is seen) drives one server (``python -m personacore serve`` in a subprocess, so that the two
do not share a GIL). Each client sends varied chat prompts one after the other; every reply is
exactly ``--tokens`` tokens (``ignore_eos``). Reported per level: throughput (generated tokens / wall
time of the level), p50/p99 request latency and time to first token (TTFT). The floor is sequential
``model.generate`` in this process with the same prompts, run after the server has stopped; the
ratios printed are server throughput / floor throughput. llama-cpp-python's OpenAI server is not
compared here (llama-cpp-python is not installed on the bench machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any, Dict, List, Tuple

import numpy as np

PROMPTS = [
    "Write a haiku about autumn rain.",
    "Explain how a refrigerator keeps food cold, in simple words.",
    "What are three good habits for a new programmer?",
    "Give me a short recipe for pancakes.",
    "Why is the sky blue? Keep it brief.",
    "Describe a quiet morning in a small fishing village.",
    "List five animals that live in the desert.",
    "How do I politely decline a meeting invitation?",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(quantized: bool, max_batch: int) -> Tuple[subprocess.Popen, str]:
    """``personacore serve`` on a free port of 127.0.0.1; returns (process, base url) once healthy."""
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "personacore", "serve", "--port", str(port)]
    cmd += ["--max-batch", str(max_batch), "--log-level", "warning"]
    cmd += ["--quantized"] if quantized else []
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.terminate()
    raise SystemExit("the server did not start within 180 s")


async def one_request(client: Any, url: str, prompt: str, tokens: int) -> Tuple[float, float, int]:
    """(latency s, TTFT s, tokens received) of one streamed chat request."""
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    ttft, n = None, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
            elif ttft is None and chunk["choices"] and not chunk["choices"][0]["delta"].get("role"):
                ttft = time.perf_counter() - t0  # the first chunk after the opening one
    return time.perf_counter() - t0, ttft or 0.0, n


async def level(url: str, clients: int, per_client: int, tokens: int) -> Dict[str, float]:
    """Run ``clients`` concurrent clients, ``per_client`` requests each; the level's numbers."""
    import httpx

    results: List[Tuple[float, float, int]] = []

    async def client_loop(k: int) -> None:
        async with httpx.AsyncClient(timeout=600) as client:
            for i in range(per_client):
                prompt = PROMPTS[(k * per_client + i) % len(PROMPTS)]
                results.append(await one_request(client, url, prompt, tokens))

    t0 = time.perf_counter()
    await asyncio.gather(*(client_loop(k) for k in range(clients)))
    wall = time.perf_counter() - t0
    lat = np.array([r[0] for r in results])
    ttft = np.array([r[1] for r in results])
    total = sum(r[2] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "tokens": total,
        "wall_s": wall,
        "tok_s": total / wall,
        "p50_s": float(np.percentile(lat, 50)),
        "p99_s": float(np.percentile(lat, 99)),
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p99_s": float(np.percentile(ttft, 99)),
    }


def floor(quantized: bool, requests: int, tokens: int) -> Dict[str, float]:
    """Sequential ``model.generate`` of the same prompts: throughput and p50 latency."""
    import personacore as pc

    model = pc.load_model(quantized=quantized)
    model.generate(PROMPTS[0], max_new_tokens=2)  # warm-up
    lat = []
    t0 = time.perf_counter()
    for i in range(requests):
        t = time.perf_counter()
        model.generate(PROMPTS[i % len(PROMPTS)], max_new_tokens=tokens, ignore_eos=True)
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    return {"requests": requests, "tok_s": requests * tokens / wall, "p50_s": float(np.median(lat))}


def main() -> int:
    """Run the levels against one server, then the floor; print and optionally write the numbers."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quantized", action="store_true", help="serve the Q4_1 weights quantized")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per reply (default 64)")
    ap.add_argument("--levels", default="1,4,16", help="concurrent clients (default 1,4,16)")
    ap.add_argument("--requests", type=int, default=16, help="requests per level (default 16)")
    ap.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    proc, url = start_server(args.quantized, args.max_batch)
    try:
        asyncio.run(level(url, 1, 1, 4))  # warm-up
        rows = []
        for c in levels:
            rows.append(asyncio.run(level(url, c, max(1, args.requests // c), args.tokens)))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    base = floor(args.quantized, min(4, args.requests), args.tokens)
    weights = "Q4_1 (quantized)" if args.quantized else "f32"
    print(f"personacore serve, {weights}, {args.tokens}-token replies, {os.cpu_count()} CPUs")
    print(f"floor: sequential model.generate {base['tok_s']:.1f} tok/s, p50 {base['p50_s']:.2f} s")
    print("clients  requests  tok/s   x floor  p50 s   p99 s   TTFT p50  TTFT p99")
    for r in rows:
        print(
            f"{r['clients']:>7}  {r['requests']:>8}  {r['tok_s']:6.1f}  {r['tok_s'] / base['tok_s']:7.2f}"
            f"  {r['p50_s']:6.2f}  {r['p99_s']:6.2f}  {r['ttft_p50_s']:8.2f}  {r['ttft_p99_s']:8.2f}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {"weights": weights, "tokens": args.tokens, "floor": base, "levels": rows},
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
