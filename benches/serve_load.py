"""The load generator of ``bench_serve.py``: concurrent streamed chat clients and their numbers.

``run_level`` drives one OpenAI-compatible server with ``clients`` concurrent clients (asyncio +
aiohttp, the client library of vLLM's own serving benchmark: its C-accelerated HTTP parser takes
about half the CPU per streamed chunk that httpx takes, and this process shares the CPUs with the
server), each sending its share of the requests one after the other, and returns throughput,
latency and time-to-first-token percentiles, how many replies came out shorter than asked, the
bytes received per request and, for ``personacore serve``, the engine's batch sizes read from
``/metrics`` while the level ran. Chunks are parsed with ``orjson`` (the server's own JSON
library, in ``personacore[serve]``): a monitored chunk carries 8 vectors x 31 rows of scores, which
``json.loads`` takes ~79 us to parse against orjson's ~8 us, CPU this process would otherwise take
from the server beside it (a client of a real deployment runs elsewhere).
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import orjson

_METRIC = re.compile(r"^(personacore_engine_\w+) ([0-9.eE+-]+|NaN)$", re.M)


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(proc: subprocess.Popen, url: str, timeout: float) -> None:
    """Wait until GET ``url`` answers 200; exit if the server process dies or the time runs out."""
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode} before answering {url}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.terminate()
    raise SystemExit(f"{url} did not answer within {timeout:.0f} s")


def scrape(text: str) -> Dict[str, float]:
    """``personacore_engine_*`` gauges of a Prometheus text page, by their key (prefix dropped)."""
    return {
        m.group(1)[len("personacore_engine_") :]: float(m.group(2)) for m in _METRIC.finditer(text)
    }


def request_body(
    kind: str, prompt: str, tokens: int, extra: Optional[Dict[str, Any]]
) -> Dict[str, Any]:
    """A streamed greedy chat request for exactly ``tokens`` tokens, in the server's own words."""
    body: Dict[str, Any] = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
    }
    if kind == "personacore":
        body.update(ignore_eos=True, stream_options={"include_usage": True})
    else:  # llama-cpp-python: masks EOS until min_tokens; no repetition penalty (its default 1.1)
        body.update(min_tokens=tokens, repeat_penalty=1.0)
    body.update(extra or {})
    return body


async def one_request(session: Any, url: str, body: Dict[str, Any]) -> Dict[str, Any]:
    """Latency, TTFT, tokens and bytes of one streamed chat request (an ``aiohttp`` session)."""
    t0 = time.perf_counter()
    ttft: Optional[float] = None
    n_content, usage_tokens, finish, nbytes, score_rows = 0, None, None, 0, 0
    async with session.post(url + "/v1/chat/completions", json=body) as r:
        if r.status != 200:
            raise SystemExit(f"{url}: HTTP {r.status}: {(await r.read())[:500]!r}")
        async for raw in r.content:  # one line at a time, b"\n" included
            nbytes += len(raw)
            line = raw.rstrip(b"\r\n")
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = orjson.loads(line[6:])
            if "error" in chunk:
                raise SystemExit(f"{url}: error in stream: {chunk['error']}")
            if chunk.get("usage"):
                usage_tokens = chunk["usage"]["completion_tokens"]
            persona = chunk.get("persona") or {}
            for rows in (persona.get("scores") or {}).values():
                if rows:
                    score_rows = max(score_rows, len(rows[0]))
            for ch in chunk.get("choices") or []:
                delta = ch.get("delta") or {}
                finish = ch.get("finish_reason") or finish
                if delta.get("role") or "content" not in delta:
                    continue  # the opening chunk, or llama-cpp-python's closing one
                n_content += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
    # personacore reports usage; for llama-cpp-python a "length" finish means max_tokens tokens
    if usage_tokens is not None:
        n = usage_tokens
    elif finish == "length":
        n = body["max_tokens"]
    else:
        n = n_content
    return {
        "latency": time.perf_counter() - t0,
        "ttft": ttft if ttft is not None else float("nan"),
        "tokens": n,
        "bytes": nbytes,
        "score_rows": score_rows,
    }


def session() -> Any:
    """An ``aiohttp`` client session without a total timeout (long replies at many clients)."""
    import aiohttp

    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=1800))


def single_request(url: str, body: Dict[str, Any]) -> Dict[str, Any]:
    """:func:`one_request` on a session of its own, from synchronous code."""

    async def go() -> Dict[str, Any]:
        async with session() as s:
            return await one_request(s, url, body)

    return asyncio.run(go())


async def _level(
    url: str,
    kind: str,
    clients: int,
    requests: int,
    tokens: int,
    prompts: Sequence[str],
    extras: Optional[List[Dict[str, Any]]],
) -> Tuple[List[Dict[str, Any]], float, List[Dict[str, float]]]:
    per_client = max(1, requests // clients)
    results: List[Dict[str, Any]] = []
    samples: List[Dict[str, float]] = []
    done = asyncio.Event()

    async def client_loop(k: int) -> None:
        async with session() as client:
            for i in range(per_client):
                prompt = prompts[(k * per_client + i) % len(prompts)]
                extra = extras[k] if extras else None
                results.append(
                    await one_request(client, url, request_body(kind, prompt, tokens, extra))
                )

    async def poll_metrics() -> None:
        async with session() as client:
            while True:
                async with client.get(url + "/metrics") as r:
                    samples.append(scrape(await r.text()))
                if done.is_set():
                    return
                try:
                    await asyncio.wait_for(done.wait(), 0.5)
                except asyncio.TimeoutError:
                    pass

    poller = asyncio.create_task(poll_metrics()) if kind == "personacore" else None
    if poller:
        while not samples:
            await asyncio.sleep(0.01)
    t0 = time.perf_counter()
    await asyncio.gather(*(client_loop(k) for k in range(clients)))
    wall = time.perf_counter() - t0
    done.set()
    if poller:
        await poller
    return results, wall, samples


def thread_cpu(pid: int) -> Dict[str, float]:
    """CPU seconds (user + system) of process ``pid``'s threads, grouped: ``main`` (the server's
    event loop), ``matmul helpers`` (personacore's ``personacore-mm-*`` threads) and ``other`` (the
    engine thread, which also runs its share of each matmul, and any worker threads).
    Empty where /proc cannot be read."""
    tick = os.sysconf("SC_CLK_TCK")
    out: Dict[str, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # the thread ended
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        cpu = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        group = (
            "main"
            if int(tid) == pid
            else "matmul helpers"
            if name.startswith("personacore-mm")
            else "other"
        )
        out[group] = out.get(group, 0.0) + cpu
    return out


def run_level(
    url: str,
    kind: str,
    clients: int,
    requests: int,
    tokens: int,
    prompts: Sequence[str],
    extras: Optional[List[Dict[str, Any]]] = None,
    pid: Optional[int] = None,
) -> Dict[str, Any]:
    """Run ``clients`` concurrent clients, ``requests // clients`` requests each; the level's numbers.

    ``kind`` is ``"personacore"`` or ``"llama"`` (how to ask for exactly ``tokens`` tokens, and
    whether ``/metrics`` exists); ``extras[k]`` is merged into the body of client ``k``'s requests.
    ``mean_batch`` = generated tokens / engine steps over the level (from ``/metrics``).
    ``cpu_ms_per_token``: CPU milliseconds per generated token of this process (the load
    generator) and, given the server's ``pid``, of the server's thread groups (:func:`thread_cpu`).
    """
    cpu0, server0 = time.process_time(), thread_cpu(pid) if pid else {}
    results, wall, samples = asyncio.run(
        _level(url, kind, clients, requests, tokens, prompts, extras)
    )
    cpu1, server1 = time.process_time(), thread_cpu(pid) if pid else {}
    lat = np.array([r["latency"] for r in results])
    ttft = np.array([r["ttft"] for r in results])
    total = sum(r["tokens"] for r in results)
    mean_batch = max_batch = None
    if len(samples) >= 2 and {"tokens_generated", "steps"} <= samples[0].keys():
        steps = samples[-1]["steps"] - samples[0]["steps"]
        gen = samples[-1]["tokens_generated"] - samples[0]["tokens_generated"]
        mean_batch = gen / steps if steps else None
        max_batch = max(s.get("batch_size", 0.0) for s in samples)
    return {
        "clients": clients,
        "requests": len(results),
        "tokens": total,
        "short": sum(r["tokens"] < tokens for r in results),
        "wall_s": wall,
        "tok_s": total / wall,
        "p50_s": float(np.percentile(lat, 50)),
        "p99_s": float(np.percentile(lat, 99)),
        "ttft_p50_s": float(np.nanpercentile(ttft, 50)),
        "ttft_p99_s": float(np.nanpercentile(ttft, 99)),
        "mean_batch": mean_batch,
        "max_batch": max_batch,
        "bytes_per_request": float(np.mean([r["bytes"] for r in results])),
        "score_rows": max(r["score_rows"] for r in results),
        "cpu_ms_per_token": {
            "load generator": (cpu1 - cpu0) * 1000 / max(1, total),
            **{
                f"server {k}": (server1.get(k, 0.0) - v) * 1000 / max(1, total)
                for k, v in server0.items()
            },
        },
    }
