"""Counters of ``personacore serve`` and their Prometheus text exposition (``GET /metrics``).

The server counts what it sees (requests by endpoint and status, prompt and generated tokens,
alerts and steer switches from the events of the replies, requests in flight, open streams); the
engine's own numbers (queue depth, batch size, ...) are read from ``engine.stats()`` at scrape time
and exported as ``personacore_engine_<key>``. The format is Prometheus' text format 0.0.4.
"""

from __future__ import annotations

import math
import re
import threading
from collections import Counter
from typing import Any, Dict, Iterable, List, Mapping, Tuple

__all__ = ["Metrics", "CONTENT_TYPE"]

#: the Content-Type of the Prometheus text format
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_NAME_BAD = re.compile(r"[^a-zA-Z0-9_]")


def _label_value(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


def _family(name: str, kind: str, help_: str, samples: Iterable[Tuple[str, float]]) -> List[str]:
    lines = [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
    lines += [f"{name}{labels} {_number(v)}" for labels, v in samples]
    return lines


class Metrics:
    """Thread-safe counters and gauges of one server (one replica)."""

    def __init__(self) -> None:
        """Start every counter at zero."""
        self._lock = threading.Lock()
        self.requests: Counter = Counter()  # (endpoint, status) -> count
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.alerts = 0
        self.steer_switches = 0
        self.in_flight = 0
        self.streams = 0

    def count_request(self, endpoint: str, status: int) -> None:
        """One answered request."""
        with self._lock:
            self.requests[(endpoint, str(status))] += 1

    def count_reply(self, prompt_tokens: int, generated: int, events: Iterable[Mapping]) -> None:
        """The tokens and events of one finished reply."""
        kinds = Counter(e.get("kind") for e in events)
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += generated
            self.alerts += kinds["alert"]
            self.steer_switches += kinds["steer_on"] + kinds["steer_off"]

    def add(self, field: str, delta: int) -> None:
        """Move a gauge (``in_flight`` or ``streams``) by ``delta``."""
        with self._lock:
            setattr(self, field, getattr(self, field) + delta)

    def render(self, engine_stats: Mapping[str, Any]) -> str:
        """The Prometheus text of every counter, gauge and numeric engine statistic."""
        with self._lock:
            requests = sorted(self.requests.items())
            own = [
                ("prompt_tokens_total", "counter", "Prompt tokens processed.", self.prompt_tokens),
                ("generation_tokens_total", "counter", "Tokens generated.", self.generation_tokens),
                ("alerts_total", "counter", "Monitor alerts raised in replies.", self.alerts),
                (
                    "steer_switches_total",
                    "counter",
                    "Conditional steering switches (on and off) in replies.",
                    self.steer_switches,
                ),
                (
                    "requests_in_flight",
                    "gauge",
                    "Sequences admitted and not finished (each of a request's n choices is one).",
                    self.in_flight,
                ),
                ("streams_open", "gauge", "Streamed replies in progress.", self.streams),
            ]
        lines = _family(
            "personacore_requests_total",
            "counter",
            "HTTP requests answered, by endpoint and status.",
            (
                (f'{{endpoint="{_label_value(ep)}",status="{st}"}}', float(n))
                for (ep, st), n in requests
            ),
        )
        for name, kind, help_, value in own:
            lines += _family(f"personacore_{name}", kind, help_, [("", float(value))])
        for key, value in sorted(engine_stats.items()):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            name = "personacore_engine_" + _NAME_BAD.sub("_", str(key))
            lines += _family(name, "gauge", f"engine.stats()[{key!r}].", [("", float(value))])
        return "\n".join(lines) + "\n"


def stats_dict(stats: Any) -> Dict[str, Any]:
    """``engine.stats()`` as a dict, whether it returns a mapping, a dataclass or an object."""
    if isinstance(stats, Mapping):
        return dict(stats)
    if hasattr(stats, "_asdict"):
        return dict(stats._asdict())
    if hasattr(stats, "__dataclass_fields__"):
        return {k: getattr(stats, k) for k in stats.__dataclass_fields__}
    return {k: v for k, v in vars(stats).items() if not k.startswith("_")}
