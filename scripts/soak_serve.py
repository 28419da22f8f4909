"""Soak test of ``personacore serve``: many concurrent clients, mixed requests, leaks and deaths.

    nice -n 19 python scripts/soak_serve.py --clients 32 --requests 1000 --out soak.json

Starts ``python -m personacore serve`` on 127.0.0.1 (a free port) with the tiny llama model of
``tests/tiny_models.py`` (``--model PATH`` serves another) and one vector loaded with ``--vector``
(seeded random directions with held-out statistics, so ``"auto"`` thresholds work). Why the tiny
model: the soak checks the server (admission, streaming, cancellation, error handling, memory),
not the network's arithmetic, and 32,000 requests of the default 135M model would take hours on
a shared CPU; the engine code it runs is the same.

Each client sends ``--requests`` requests in a seeded mix:

* ``chat`` / ``completion`` (official ``openai`` client), streamed or not, some steered
  (``steer``), some monitored (``monitor`` with ``"auto"`` thresholds, ``on_alert``);
* ``cancel``: a stream read for two chunks, then the connection is closed (httpx);
* ``malformed``: a body the server must refuse with a given 4xx (httpx): not JSON, wrong types,
  unknown vector, bad layer, NaN coefficient, ``max_tokens`` over the limit, unknown model, a body
  over ``--max-body-bytes``, an unknown route.

An unexpected error is any other status, a reply without its ``persona`` object or text, a stream
without ``[DONE]``, or a transport error. The server's RSS (``/proc/PID/status``) is read after the
first 100 requests and at the end; latency percentiles are over the completed requests. The
summary (``--out``, and stdout) says whether it passed: 0 unexpected errors, the server alive and
healthy, the final RSS within ``--rss-tolerance`` of the early one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

VECTOR = "soak"
MESSAGES = [
    [{"role": "user", "content": "hello world ! what is your name ?"}],
    [
        {"role": "system", "content": "you are a helpful model ."},
        {"role": "user", "content": "what is the model ?"},
    ],
    [
        {"role": "user", "content": "are you kind ?"},
        {"role": "assistant", "content": "yes ."},
        {"role": "user", "content": "are you evil ?"},
    ],
]
#: (name, method, path, body or raw bytes, expected status)
MALFORMED: List[Any] = [
    ("not_json", "POST", "/v1/chat/completions", b"{not json", 400),
    ("messages_str", "POST", "/v1/chat/completions", {"messages": "hi"}, 400),
    ("no_messages", "POST", "/v1/chat/completions", {"max_tokens": 3}, 400),
    (
        "unknown_vector",
        "POST",
        "/v1/chat/completions",
        {"messages": MESSAGES[0], "steer": [{"vector": "nobody", "coef": 1.0}]},
        400,
    ),
    (
        "bad_layer",
        "POST",
        "/v1/chat/completions",
        {"messages": MESSAGES[0], "steer": [{"vector": VECTOR, "coef": 1.0, "layers": [99]}]},
        400,
    ),
    (
        "nan_coef",
        "POST",
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "hi"}], '
        b'"steer": [{"vector": "soak", "coef": NaN}]}',
        400,
    ),
    ("max_tokens", "POST", "/v1/completions", {"prompt": "hello", "max_tokens": 100000}, 400),
    (
        "unknown_model",
        "POST",
        "/v1/chat/completions",
        {"model": "gpt-9", "messages": MESSAGES[0]},
        404,
    ),
    ("too_large", "POST", "/v1/completions", {"prompt": "x" * 70_000}, 413),
    ("no_route", "POST", "/v1/nothing", {}, 404),
    ("empty_prompt", "POST", "/v1/completions", {"prompt": ""}, 400),
]


def free_port() -> int:
    """A port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` (Linux ``/proc``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def write_tiny_model_and_vector(d: Path, context: int = 256) -> Dict[str, Path]:
    """The tiny llama model directory (a ``context``-token window) and a fitting vector file
    (seeded) under ``d``."""
    import personacore as pc
    from tiny_models import write_tiny_model

    config, _ = write_tiny_model(d / "tiny-llama", "llama", seed=0, max_position_embeddings=context)
    rows, hidden = config["num_hidden_layers"] + 1, config["hidden_size"]
    rng = np.random.default_rng(11)
    directions = rng.standard_normal((rows, hidden)).astype(np.float32)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    # held-out statistics as pc.extract stores them (per row), so that "auto" thresholds resolve
    stats = {
        "pos_mean": [0.5] * rows,
        "pos_std": [0.2] * rows,
        "neg_mean": [-0.5] * rows,
        "neg_std": [0.2] * rows,
        "auroc": [0.9] * rows,
        "cohens_d": [5.0] * rows,
    }
    vector = pc.PersonaVector(directions, layer=2, name=VECTOR, metadata={"stats": stats})
    vector.save(d / f"{VECTOR}.safetensors")
    return {"model": d / "tiny-llama", "vector": d / f"{VECTOR}.safetensors"}


class Server:
    """``python -m personacore serve`` as a child process on 127.0.0.1."""

    def __init__(self, model: Path, vector: Path, extra: List[str], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "w")
        cmd = [sys.executable, "-m", "personacore", "serve", "--model", str(model)]
        cmd += ["--vector", f"{VECTOR}={vector}", "--port", str(self.port)]
        cmd += ["--log-level", "warning", "--max-body-bytes", "65536", *extra]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}; see {log}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError("the server did not start within 120 s")
            time.sleep(0.2)

    def alive(self) -> bool:
        """The process runs and ``/health`` answers 200."""
        if self.proc.poll() is not None:
            return False
        try:
            return httpx.get(self.url + "/health", timeout=10).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        """SIGTERM, then wait (SIGKILL after 30 s)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Soak:
    """The clients, their counters and the RSS samples."""

    def __init__(self, server: Server, args: argparse.Namespace):
        self.server, self.args = server, args
        self.done = 0
        self.latencies: Dict[str, List[float]] = {}
        self.counts: Dict[str, int] = {}
        self.unexpected: List[str] = []
        self.rss_after_100: Optional[int] = None
        self.model = httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]["id"]

    def record(self, kind: str, seconds: float, error: Optional[str]) -> None:
        self.done += 1
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if error is None:
            self.latencies.setdefault(kind, []).append(seconds)
        else:
            self.unexpected.append(f"{kind}: {error}"[:300])
        if self.done == 100:
            self.rss_after_100 = rss_bytes(self.server.proc.pid)

    async def client(self, k: int) -> None:
        import openai

        rng = np.random.default_rng([self.args.seed, k])
        # uvicorn closes a keep-alive connection idle for 5 s; a client that reuses one at that
        # moment gets a ReadError (the HTTP keep-alive race; the first full run met it 73 times
        # in 32,000 requests on the clients' idle httpx pools). Clients drop idle connections
        # after 1 s, as a client of any keep-alive server should.
        limits = httpx.Limits(keepalive_expiry=1.0)
        oa = openai.AsyncOpenAI(
            base_url=self.server.url + "/v1",
            api_key="unused",
            max_retries=0,
            timeout=300,
            http_client=httpx.AsyncClient(limits=limits, timeout=300),
        )
        async with httpx.AsyncClient(base_url=self.server.url, timeout=300, limits=limits) as http:
            for _ in range(self.args.requests):
                u = rng.random()
                kind = (
                    "malformed"
                    if u < 0.10
                    else "cancel"
                    if u < 0.20
                    else "completion"
                    if u < 0.35
                    else "chat"
                )
                t0 = time.perf_counter()
                try:
                    if kind == "malformed":
                        error = await self.malformed(http, MALFORMED[rng.integers(len(MALFORMED))])
                    elif kind == "cancel":
                        error = await self.cancel(http, rng)
                    else:
                        stream = bool(rng.random() < 0.5)
                        kind += "_stream" if stream else ""
                        error = await self.generate(oa, kind, stream, rng)
                except Exception as e:  # noqa: BLE001 - every transport error is unexpected
                    error = f"{type(e).__name__}: {e}"
                self.record(kind, time.perf_counter() - t0, error)
        await oa.close()

    def extras(self, rng: np.random.Generator) -> Dict[str, Any]:
        """A seeded mix of personacore's extra body keys."""
        extra: Dict[str, Any] = {}
        if rng.random() < 0.5:
            extra["steer"] = [{"vector": VECTOR, "coef": float(rng.normal(0, 2)), "layers": [1, 2]}]
        if rng.random() < 0.5:
            extra["monitor"] = {"vectors": [VECTOR], "thresholds": "auto"}
            extra["on_alert"] = str(rng.choice(["flag", "stop"]))
        return extra

    async def generate(self, oa: Any, kind: str, stream: bool, rng: np.random.Generator) -> Any:
        extra = self.extras(rng)
        n = int(rng.integers(1, self.args.max_tokens + 1))
        choices = 2 if rng.random() < 0.25 else 1  # n > 1: a choice per engine request
        common = dict(
            model=self.model,
            max_tokens=n,
            temperature=float(rng.choice([0.0, 0.8])),
            seed=int(rng.integers(1 << 30)),
            n=choices,
            extra_body=extra or None,
        )
        if kind.startswith("chat"):
            messages = MESSAGES[rng.integers(len(MESSAGES))]
            if not stream:
                r = await oa.chat.completions.create(messages=messages, **common)
                ok = all(isinstance(c.message.content, str) for c in r.choices)
                return _check_choices(r, choices) if ok else f"bad reply {r}"
            s = await oa.chat.completions.create(messages=messages, stream=True, **common)
        else:
            prompt: Any = "hello world , what is the model ?"
            if rng.random() < 0.25:  # a list of prompts, echoed with their log-probabilities
                prompt = [prompt, "the model is"]
                common.update(echo=True, logprobs=1)
                choices *= 2
            if not stream:
                r = await oa.completions.create(prompt=prompt, **common)
                ok = all(isinstance(c.text, str) for c in r.choices)
                return _check_choices(r, choices) if ok else f"bad reply {r}"
            s = await oa.completions.create(prompt=prompt, stream=True, **common)
        chunks, finished = 0, set()
        async for chunk in s:
            chunks += 1
            finished |= {c.index for c in chunk.choices if c.finish_reason}
            if not hasattr(chunk, "persona"):
                return f"a chunk without persona: {chunk}"
        # the SDK consumes "data: [DONE]" itself; a stream that ends without a finish reason did not
        if finished == set(range(choices)) and chunks >= 2:
            return None
        return f"stream of {chunks} chunks, finished choices {sorted(finished)} of {choices}"

    async def cancel(self, http: httpx.AsyncClient, rng: np.random.Generator) -> Optional[str]:
        body = {
            "messages": MESSAGES[rng.integers(len(MESSAGES))],
            "max_tokens": self.args.cancel_tokens,
            "ignore_eos": True,
            "stream": True,
            **self.extras(rng),
        }
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return f"cancel: status {r.status_code}: {(await r.aread())[:200]!r}"
            seen = 0
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    seen += 1
                    if seen == 2:
                        break  # leave: the context manager closes the connection
        return None

    async def malformed(self, http: httpx.AsyncClient, case: Any) -> Optional[str]:
        name, method, path, body, status = case
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = await http.request(
            method, path, content=raw, headers={"content-type": "application/json"}
        )
        if r.status_code != status:
            return f"{name}: expected {status}, got {r.status_code}: {r.text[:200]}"
        err = r.json().get("error", {})
        if not isinstance(err.get("message"), str):
            return f"{name}: no OpenAI error body: {r.text[:200]}"
        return None

    async def run(self) -> None:
        await asyncio.gather(*(self.client(k) for k in range(self.args.clients)))


def _check_choices(r: Any, expected: int) -> Optional[str]:
    """None when a whole reply has its ``expected`` choices in order, each with its ``persona``
    (one choice: the reply's own)."""
    if [c.index for c in r.choices] != list(range(expected)):
        return f"choices {[c.index for c in r.choices]}, expected {expected}"
    if expected == 1:
        return None if getattr(r, "persona", None) else f"a reply without persona: {r}"
    missing = [c.index for c in r.choices if not getattr(c, "persona", None)]
    return f"choices {missing} without persona" if missing else None


def percentile(xs: List[float], q: float) -> Optional[float]:
    """The ``q``-th percentile of ``xs`` in seconds (rounded), None when empty."""
    return round(float(np.percentile(xs, q)), 4) if xs else None


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Start the server, run the soak, stop the server; the summary dict."""
    work = Path(tempfile.mkdtemp(prefix="pc-soak-"))
    if args.model:
        if not args.vector:
            raise SystemExit("--model needs --vector (a vector that fits it)")
        files = {"model": Path(args.model), "vector": Path(args.vector)}
    else:
        files = write_tiny_model_and_vector(work)
    limits = ["--max-tokens-limit", str(max(args.max_tokens, args.cancel_tokens))]
    server = Server(files["model"], files["vector"], limits, work / "server.log")
    try:
        soak = Soak(server, args)
        rss_start = rss_bytes(server.proc.pid)
        t0 = time.perf_counter()
        asyncio.run(soak.run())
        seconds = time.perf_counter() - t0
        alive = server.alive()
        rss_end = rss_bytes(server.proc.pid) if alive else None
    finally:
        server.stop()
    ok_latencies = [x for xs in soak.latencies.values() for x in xs]
    growth = (
        (rss_end - soak.rss_after_100) / soak.rss_after_100
        if rss_end and soak.rss_after_100
        else None
    )
    summary = {
        "model": str(files["model"]) if args.model else "tiny llama (tests/tiny_models.py)",
        "clients": args.clients,
        "requests_per_client": args.requests,
        "requests": soak.done,
        "seconds": round(seconds, 1),
        "counts": dict(sorted(soak.counts.items())),
        "unexpected_errors": len(soak.unexpected),
        "unexpected_by_type": dict(
            sorted(Counter(e.split(": ")[1] if ": " in e else e for e in soak.unexpected).items())
        ),
        "unexpected_examples": soak.unexpected[:10],
        "server_alive": alive,
        "rss_start_mb": round(rss_start / 2**20, 1),
        "rss_after_100_mb": round(soak.rss_after_100 / 2**20, 1) if soak.rss_after_100 else None,
        "rss_end_mb": round(rss_end / 2**20, 1) if rss_end else None,
        "rss_growth": round(growth, 4) if growth is not None else None,
        "latency_p50_s": percentile(ok_latencies, 50),
        "latency_p99_s": percentile(ok_latencies, 99),
        "latency_by_kind": {
            k: {"p50_s": percentile(v, 50), "p99_s": percentile(v, 99), "n": len(v)}
            for k, v in sorted(soak.latencies.items())
        },
        "server_log_tail": (work / "server.log").read_text(errors="replace")[-2000:],
    }
    summary["passed"] = bool(
        summary["unexpected_errors"] == 0
        and alive
        and growth is not None
        and abs(growth) <= args.rss_tolerance
    )
    return summary


def main() -> int:
    """Parse the arguments, run, print and write the summary; exit 1 unless it passed."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=1000, help="requests per client")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=16, help="largest max_tokens of a request")
    ap.add_argument("--cancel-tokens", type=int, default=64, help="max_tokens of a cancelled one")
    ap.add_argument("--rss-tolerance", type=float, default=0.10)
    ap.add_argument("--model", default=None, help="serve this model instead of the tiny one")
    ap.add_argument("--vector", default=None, help="with --model: the vector file to load")
    ap.add_argument("--out", type=Path, default=None, help="write the summary JSON here")
    args = ap.parse_args()
    summary = run(args)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
