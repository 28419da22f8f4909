"""How ``personacore chat`` shows a streaming reply: each token with its monitored trait scores.

A token's score is the projection (docs/conventions.md, "Projection") of the residual stream at that
token's own position, at the vector's monitored layer. The engine reads a token's position in the
forward pass after the one that sampled it, so a token's score arrives with the next step (the last
step brings the last token's own score). :class:`ChatView` prints each token as it streams and its
score as soon as it is known:

* on a terminal, the token's text colored from green (like the vector's negative rollouts) to red
  (like its positive ones); the text waits for its score, one token behind;
* otherwise (a pipe, a file, ``--no-color``, ``NO_COLOR``), plain ``token[score]`` as it streams,
  ``token[s1 s2]`` with several vectors, in the order of the header line.

Events (``alert``, ``clear``, ``steer_on``, ``steer_off``) are printed on their own line the moment
the step that raised them arrives. The prompt pass can cross a threshold many times inside the
prompt (system prompt, template tokens); it gets one ``alert`` line per vector that is still above
its threshold at the end of the prompt.
"""

from __future__ import annotations

import os
from typing import IO, Any, Callable, Dict, List, Optional, Tuple

import numpy as np

__all__ = ["ChatView", "use_color"]

# 256-color foregrounds from green (0) through yellow to red (1)
_PALETTE = (34, 70, 142, 178, 208, 202, 196)
_RESET = "\x1b[0m"


def use_color(out: IO[str], no_color: bool = False) -> bool:
    """True when ``out`` is a terminal and color is not turned off (``--no-color``, ``NO_COLOR``,
    ``TERM=dumb``)."""
    if no_color or "NO_COLOR" in os.environ or os.environ.get("TERM") == "dumb":
        return False
    isatty = getattr(out, "isatty", None)
    return bool(isatty and isatty())


def _scale(vector: Any, layer: int) -> Optional[Tuple[float, float]]:
    """(negative mean, positive mean) of the held-out projections at ``layer``, when stored."""
    stats = vector.metadata.get("stats") if isinstance(vector.metadata, dict) else None
    if not isinstance(stats, dict):
        return None
    try:
        lo, hi = float(stats["neg_mean"][layer]), float(stats["pos_mean"][layer])
    except (TypeError, KeyError, IndexError, ValueError):
        return None
    return (lo, hi) if hi != lo else None


class ChatView:
    """Prints one reply of ``personacore chat`` as it streams (see the module docstring).

    ``vectors`` maps each monitored name to its :class:`~personacore.PersonaVector` and ``layers``
    to the layer it is monitored at; ``color`` picks the terminal rendering.
    """

    def __init__(
        self,
        out: IO[str],
        vectors: Dict[str, Any],
        layers: Dict[str, int],
        color: bool,
        early_warning: Optional[Callable[[Dict[str, float]], str]] = None,
    ):
        """Set up the view; nothing is printed until :meth:`reply`. ``early_warning``, when given,
        turns the scores of the last prompt token (``{name: score}``, known before the first reply
        token) into a line printed before the reply."""
        self.out, self.color = out, color
        self.early_warning = early_warning
        self._line_start = True
        self.names = list(vectors)
        self.layers = layers
        self.scales = {n: _scale(vectors[n], layers[n]) for n in self.names}

    def header(self) -> str:
        """One line saying what the per-token marks mean."""
        cols = " ".join(f"{n}@{self.layers[n]}" for n in self.names)
        if self.color:
            return f"token colors: green = like the negative rollouts, red = like the positive ({cols})"
        return f"per-token scores: token[{cols}]"

    def reply(self, stream: Any, prompt_len: int, line_started: bool = False) -> None:
        """Print every step of ``stream`` (a :class:`~personacore.engine.Stream` of a prompt of
        ``prompt_len`` tokens): texts, per-token scores, event lines. The caller has printed a
        prefix such as ``"bot> "`` on the current line, or ended its line (``line_started``)."""
        self._seen: List[np.ndarray] = []
        self._line_start = line_started
        self._pending: Optional[str] = None  # color mode: text waiting for its score
        for k, step in enumerate(stream):
            token_pos = prompt_len + k
            rows = {n: np.asarray(s)[:, 0] for n, s in step.scores.items()}
            events: Dict[int, List[Any]] = {}
            for e in step.events:
                events.setdefault(e.position, []).append(e)
            at = {pos: i for i, pos in enumerate(step.positions)}
            order = sorted(at) + sorted(p for p in events if p not in at)
            before = [p for p in order if p < token_pos]
            after = [p for p in order if p >= token_pos]
            prompt_events = [e for p in before if p < prompt_len for e in events.pop(p, [])]
            for pos in before:
                self._position(pos, at.get(pos), rows, events.get(pos, []), prompt_len)
            if k == 0:
                last = at.get(prompt_len - 1)
                if self.early_warning is not None and last is not None:
                    self.line(self.early_warning({n: float(r[last]) for n, r in rows.items()}))
                self._prompt_summary(prompt_events, rows, prompt_len, last)
            self._text(step.text)
            for pos in after:
                self._position(pos, at.get(pos), rows, events.get(pos, []), prompt_len)
        if self._pending is not None:  # a token whose score never came (stream closed early)
            self._write(self._pending)
        self.out.flush()

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()
        if text:
            self._line_start = text.endswith("\n")

    def line(self, text: str) -> None:
        """Print ``text`` on a line of its own (after the reply so far); output goes on below it."""
        self.end_line()
        self._write(text + "\n")

    def end_line(self) -> None:
        """End the current line unless it is already ended."""
        if not self._line_start:
            self._write("\n")

    def _prompt_summary(
        self, events: List[Any], rows: Dict[str, np.ndarray], plen: int, last: Optional[int]
    ) -> None:
        """One line per vector still above its threshold at the end of the prompt (the prompt
        pass raises an event at every crossing inside the prompt; only where it ends matters)."""
        for name in self.names:
            mine = [e for e in events if e.vector == name and e.kind in ("alert", "clear")]
            if not mine or mine[-1].kind != "alert":
                continue
            e = mine[-1]
            score = float(rows[name][last]) if last is not None and name in rows else e.score
            n = sum(x.kind == "alert" for x in mine)
            line = (
                f"  ! alert: {name}@{e.layer} {score:+.2f} above the threshold {e.threshold:+.2f} "
                f"at the end of the prompt (crossed {n} time{'s' if n > 1 else ''} in the prompt)"
            )
            self.line(self._alert_style(line))
        for e in events:
            if e.kind not in ("alert", "clear"):
                self.line(self._event_line(e, plen))

    def _alert_style(self, line: str) -> str:
        return f"\x1b[1;31m{line}{_RESET}" if self.color else line

    def _text(self, text: str) -> None:
        if self.color and self.names:
            self._pending = text
        else:
            self._write(text)

    def _position(
        self,
        pos: int,
        row: Optional[int],
        rows: Dict[str, np.ndarray],
        events: List[Any],
        plen: int,
    ) -> None:
        if row is not None and pos >= plen:
            scores = [float(rows[n][row]) for n in self.names]
            if self.color:
                self._write(self._colored(self._pending or "", scores))
                self._pending = None
            else:
                self._write("[" + " ".join(f"{s:+.2f}" for s in scores) + "]")
        for e in events:
            self.line(self._event_line(e, plen))

    def _colored(self, text: str, scores: List[float]) -> str:
        self._seen.append(np.asarray(scores))
        levels = []
        for j, (name, s) in enumerate(zip(self.names, scores)):
            scale = self.scales[name]
            if scale is None:  # no held-out statistics: the range of this reply so far
                seen = [x[j] for x in self._seen]
                scale = (min(seen), max(seen)) if max(seen) > min(seen) else (s - 1.0, s)
            levels.append((s - scale[0]) / (scale[1] - scale[0]))
        t = min(1.0, max(0.0, max(levels)))
        return f"\x1b[38;5;{_PALETTE[round(t * (len(_PALETTE) - 1))]}m{text}{_RESET}"

    def _event_line(self, e: Any, plen: int) -> str:
        where = (
            f"prompt token {e.position}"
            if e.position < plen
            else f"reply token {e.position - plen + 1}"
        )
        if e.kind in ("alert", "clear"):
            how = "above" if e.kind == "alert" else "back to or below"
            mark = "!" if e.kind == "alert" else "~"
            line = (
                f"  {mark} {e.kind}: {e.vector}@{e.layer} {e.score:+.2f} {how} the threshold "
                f"{e.threshold:+.2f} at {where}"
            )
        else:
            coef = f" coef {e.coef:+g}" if e.coef is not None else ""
            line = f"  ~ {e.kind}: {e.steer or e.vector}{coef} at {where}"
        return self._alert_style(line) if e.kind == "alert" else line
