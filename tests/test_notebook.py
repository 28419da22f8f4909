"""Notebook views: Generation._repr_html_ (colored tokens, events, legend) and
PersonaVector._repr_html_ (the per-layer curve), parsed back with html.parser."""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser

import numpy as np
import pytest

import personacore as pc
from personacore.engine.generation import token_texts
from personacore.vectors import notebook as vector_notebook

_VOID = {"br", "hr", "img", "meta", "input", "link", "wbr"}


class _Tree(HTMLParser):
    """Checks that every tag is closed in order; collects the text and style of token spans."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.errors = [], []
        self.tokens = []  # [text, style, title] of each pc-tok span, in order
        self.sequence = []  # ("tok", i) and ("event", kind) in document order
        self.points = []  # the points of SVG polylines
        self.circles = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "span" and a.get("class") == "pc-tok":
            self.tokens.append(["", a.get("style"), a.get("title")])
            self.sequence.append(("tok", len(self.tokens) - 1))
        elif tag == "span" and (a.get("class") or "").startswith("pc-event "):
            self.sequence.append(("event", a["class"].split("pc-event-")[1]))
        if tag not in _VOID:
            self.stack.append((tag, a))

    def handle_startendtag(self, tag, attrs):
        a = dict(attrs)
        if tag == "polyline":
            self.points.append(a["points"])
        if tag == "circle":
            self.circles.append(a)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1][0] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1][0] if self.stack else 'nothing'}")
            return
        self.stack.pop()

    def handle_data(self, data):
        if (
            self.stack
            and self.stack[-1][0] == "span"
            and self.stack[-1][1].get("class") == "pc-tok"
        ):
            self.tokens[-1][0] += data


def _parse(markup: str) -> _Tree:
    tree = _Tree()
    tree.feed(markup)
    tree.close()
    assert tree.errors == [] and tree.stack == [], (tree.errors, tree.stack)
    return tree


def _rgb(style):
    return tuple(int(x) for x in re.search(r"rgb\((\d+),(\d+),(\d+)\)", style).groups())


def _generation(scores, texts, events=(), thresholds=None, prompt_len=3):
    n = len(texts)
    rows = np.concatenate([np.zeros(prompt_len), np.asarray(scores, dtype=np.float32)])
    return pc.Generation(
        text="".join(texts),
        token_ids=list(range(10, 10 + n)),
        finish_reason="length",
        prompt_ids=[1] * prompt_len,
        scores={"evil": rows[:, None].astype(np.float32)},
        score_layers={"evil": [12]},
        events=list(events),
        token_texts=list(texts),
        thresholds=dict(thresholds or {}),
    )


TEXTS = ["<b>", " &amp;", ' "q"', " it's", "\n", " <script>alert(1)</script>"]


def test_tokens_escaped_and_colored_by_score():
    scores = [-4.0, -1.0, 0.5, 2.0, 3.0, 6.0]
    gen = _generation(scores, TEXTS, thresholds={"evil": 1.0})
    markup = gen._repr_html_()
    tree = _parse(markup)
    assert [t[0] for t in tree.tokens] == TEXTS  # parsed back: the exact text of every token
    for text in TEXTS:
        assert html.escape(text) in markup
    assert "<script>" not in markup and "<b>" not in markup.split("pc-tokens")[1]
    colors = [_rgb(t[1]) for t in tree.tokens]
    assert len(set(colors)) == len(colors)  # each score its own color
    # above the threshold: redder (less green) as the score grows; below it: bluer (less red)
    above = [c for c, s in zip(colors, scores) if s > 1.0]
    assert [c[1] for c in above] == sorted((c[1] for c in above), reverse=True)
    below = [c for c, s in zip(colors, scores) if s < 1.0]
    assert [c[0] for c in below] == sorted(c[0] for c in below)
    # the largest distance from the threshold (6 - 1) gets full strength: 85% of the way to red
    assert colors[-1] == tuple(round(255 + 0.85 * (c - 255)) for c in (220, 38, 38))
    assert colors[0][2] > colors[0][0]  # below: blue
    assert "threshold +1.000" in markup and "score +6.000" in tree.tokens[-1][2]
    assert "early warning (last prompt token): +0.000" in markup


def test_without_threshold_the_scale_centres_on_the_reply_mean():
    gen = _generation([0.0, 2.0, 4.0], ["a", "b", "c"])
    tree = _parse(gen._repr_html_())
    colors = [_rgb(t[1]) for t in tree.tokens]
    assert colors[1] == (255, 255, 255) and "reply mean +2.000" in gen._repr_html_()
    assert colors[2][0] > colors[2][2] and colors[0][2] > colors[0][0]


def test_events_are_marked_where_they_happened():
    events = [
        pc.Event("alert", 0, 2, 0, "evil", 12, 5.0, 1.0),  # on the prompt
        pc.Event("alert", 0, 3 + 2, 3, "evil", 12, 3.0, 1.0),  # before generated token 2
        pc.Event("steer_on", 0, 3 + 3, 4, "evil", 12, 3.0, 1.0, coef=-4.0, steer="calm"),
        pc.Event("clear", 0, 3 + 5, 6, "evil", 12, -1.0, 1.0),
    ]
    gen = _generation([0, 0, 3, 3, 0, -1], TEXTS, events=events)  # no thresholds field
    markup = gen._repr_html_()
    tree = _parse(markup)
    assert tree.sequence == [
        ("event", "alert"),  # listed above the reply
        ("tok", 0),
        ("tok", 1),
        ("event", "alert"),
        ("tok", 2),
        ("event", "steer_on"),
        ("tok", 3),
        ("tok", 4),
        ("event", "clear"),
        ("tok", 5),
    ]
    assert "on the prompt:" in markup and "coef -4" in markup and "steer calm" in markup
    assert "threshold +1.000" in markup  # taken from the events


def test_without_monitor_scores_tokens_are_plain(default_model):
    gen = default_model.generate("Say hello.", max_new_tokens=8)
    assert gen.scores == {} and len(gen.token_texts) == len(gen.token_ids)
    markup = gen._repr_html_()
    tree = _parse(markup)
    assert [t[0] for t in tree.tokens] == gen.token_texts and all(t[1] is None for t in tree.tokens)
    assert "no monitor scores" in markup


def test_real_generation_with_a_monitor(default_model):
    model = default_model
    rng = np.random.default_rng(0)
    vec = pc.PersonaVector(rng.standard_normal((31, 576)), layer=12, name="rand")
    gen = model.generate(
        "Write one line with an emoji.",
        max_new_tokens=16,
        monitor=pc.Monitor({"rand": vec}, thresholds=0.5),
    )
    assert gen.thresholds == {"rand": 0.5}
    assert "".join(gen.token_texts) == model.tokenizer.decode(gen.token_ids)
    tree = _parse(gen._repr_html_())
    assert [t[0] for t in tree.tokens] == gen.token_texts
    reply = gen.scores["rand"][gen.prompt_len : gen.prompt_len + len(gen.token_ids), 0]
    assert len(reply) == len(tree.tokens)
    scale = float(np.max(np.abs(reply.astype(np.float64) - 0.5)))
    for (_, style, title), s in zip(tree.tokens, reply):
        assert f"score {s:+.3f}" in title
        t = (float(s) - 0.5) / scale  # independent of score_color: the documented linear mix
        target = (220, 38, 38) if t >= 0 else (37, 99, 235)
        expected = tuple(round(255 + 0.85 * abs(t) * (c - 255)) for c in target)
        assert all(abs(a - b) <= 1 for a, b in zip(_rgb(style), expected)), (s, style)
    with model.stream("Hi", max_new_tokens=4) as stream:
        for _ in stream:
            pass
    streamed = stream.generation()
    assert "".join(streamed.token_texts) == model.tokenizer.decode(streamed.token_ids)


def test_token_texts_split_characters_and_keep_spaces(default_model):
    tok = default_model.tokenizer
    text = "Héllo 😀 wörld\n  <b>&amp; 日本語"
    ids = tok.encode(text)
    pieces = token_texts(tok, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == tok.decode(ids) == text
    assert "\ufffd" not in "".join(pieces) and "" in pieces  # the emoji spans several tokens


# ---- PersonaVector ------------------------------------------------------------------------------
def _vector(stats=True, name="imp<o>lite"):
    rng = np.random.default_rng(1)
    md = {"model": "SmolLM2 & co", "trait": "impolite", "method": "mean_diff"}
    if stats:
        md["stats"] = {"auroc": list(np.linspace(0.5, 1.0, 8)[[0, 2, 4, 7, 6, 5, 3, 1]])}
    return pc.PersonaVector(rng.standard_normal((8, 16)), layer=3, name=name, metadata=md)


def _polyline(points):
    return [tuple(map(float, p.split(","))) for p in points.split()]


@pytest.fixture
def no_matplotlib(monkeypatch):
    monkeypatch.setattr(vector_notebook, "_matplotlib_curve", lambda *a: None)


def test_vector_html_with_auroc_curve(no_matplotlib):
    vec = _vector()
    markup = vec._repr_html_()
    tree = _parse(markup)
    assert "imp&lt;o&gt;lite" in markup and "SmolLM2 &amp; co" in markup
    assert "held-out AUROC per layer" in markup and "held-out AUROC at layer 3" in markup
    (points,) = tree.points
    xy = _polyline(points)
    assert len(xy) == 8 and [x for x, _ in xy] == sorted(x for x, _ in xy)
    auroc = vec.metadata["stats"]["auroc"]
    assert int(np.argmin([y for _, y in xy])) == int(np.argmax(auroc))  # highest point, best layer
    assert [c for c in tree.circles if float(c["cx"]) == xy[3][0] and float(c["cy"]) == xy[3][1]]


def test_vector_html_without_stats_uses_norms(no_matplotlib):
    vec = _vector(stats=False, name=None)
    markup = vec._repr_html_()
    xy = _polyline(_parse(markup).points[0])
    assert "direction norm per layer" in markup
    assert int(np.argmin([y for _, y in xy])) == int(np.argmax(vec.norms()))
    bare = pc.PersonaVector(np.ones((4, 3)))
    tree = _parse(bare._repr_html_())
    assert tree.circles == [] and len(_polyline(tree.points[0])) == 4


def test_vector_html_with_matplotlib():
    pytest.importorskip("matplotlib")
    markup = _vector()._repr_html_()
    _parse(markup)
    assert "<svg" in markup and "<?xml" not in markup and "held-out AUROC" in markup


def test_generation_built_without_a_tokenizer_shows_ids():
    gen = _generation([1.0, 2.0], ["a", "b"])
    gen.token_texts = []
    tree = _parse(gen._repr_html_())
    assert [t[0] for t in tree.tokens] == ["[10]", "[11]"]
