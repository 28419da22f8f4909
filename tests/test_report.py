"""pc.report and ``personacore report``: the HTML file, its figures' data, and a real render.

The vector carries statistics computed here from simulated held-out projections (sklearn's AUROC,
Cohen's d by its formula); the generations come from a tiny model with a monitor (alerts) and a
conditional steer (steer events). The render test opens the file in Debian's headless Chromium over
the DevTools protocol, screenshots every figure's region and checks that it is drawn; a negative
control (the same file without plotly's script) checks that a blank figure fails that check.
"""

from __future__ import annotations

import html
import io
import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from types import SimpleNamespace

import numpy as np
import pytest

import personacore as pc
from headless_chromium import HeadlessChromium, chromium_path
from personacore.cli import main
from personacore.report.inputs import alert_threshold
from tiny_models import write_tiny_model

FIGURES = {"separation", "projections", "generation-1", "generation-2", "evaluation"}


@pytest.fixture(scope="module")
def plotly():
    return pytest.importorskip("plotly")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    write_tiny_model(path, "llama", seed=0)
    return pc.load_model(str(path))


def simulated_stats(n_rows: int, seed: int = 0):
    """Per-layer separation statistics of simulated held-out projections, and the raw ones."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    stats = {k: [] for k in ("auroc", "cohens_d", "pos_mean", "pos_std", "neg_mean", "neg_std")}
    raw = []
    for row in range(n_rows):
        shift = 2.5 * np.sin(np.pi * row / n_rows)  # separation rises, then falls
        pos = rng.normal(shift, 1.0 + 0.1 * row, 40)
        neg = rng.normal(-0.5, 0.8, 40)
        raw.append((pos, neg))
        pooled = np.sqrt((pos.var(ddof=1) + neg.var(ddof=1)) / 2)
        labels = np.r_[np.ones(40), np.zeros(40)]
        stats["auroc"].append(float(roc_auc_score(labels, np.r_[pos, neg])))
        stats["cohens_d"].append(float((pos.mean() - neg.mean()) / pooled))
        stats["pos_mean"].append(float(pos.mean()))
        stats["pos_std"].append(float(pos.std(ddof=1)))
        stats["neg_mean"].append(float(neg.mean()))
        stats["neg_std"].append(float(neg.std(ddof=1)))
    return stats, raw


@pytest.fixture(scope="module")
def vector(tiny):
    rows = tiny.num_layers + 1
    stats, _ = simulated_stats(rows)
    layer = max(range(1, tiny.num_layers), key=lambda i: stats["auroc"][i])  # as extract picks
    dirs = np.random.default_rng(1).standard_normal((rows, tiny.hidden_size)).astype(np.float32)
    meta = {"trait": "impolite", "model": tiny.path, "method": "mean_diff", "stats": stats}
    return pc.PersonaVector(dirs, layer=layer, name="impolite", metadata=meta)


@pytest.fixture(scope="module")
def generations(tiny, vector):
    """(unsteered with alerts, steered with steer events), their threshold."""
    prompt = [0, 5, 9, 14, 20]
    kw = dict(max_new_tokens=20, ignore_eos=True)
    probe = tiny.generate(prompt, monitor=pc.Monitor({"impolite": vector}), **kw)
    thr = float(np.median(probe.reply_scores()["impolite"][:, 0]))
    mon = pc.Monitor({"impolite": vector}, thresholds=thr)
    plain = tiny.generate(prompt, monitor=mon, **kw)
    steer = pc.Steer(vector, -4.0, when=pc.When("impolite", above=thr))
    steered = tiny.generate(prompt, monitor=mon, steer=steer, **kw)
    assert any(e.kind == "alert" for e in plain.events)
    assert any(e.kind == "steer_on" for e in steered.events)
    return plain, steered, thr


def sweep_rows(judged: bool = True):
    rows = []
    for layer in (1, 2):
        for coef in (4.0, -4.0, 0.0, 2.0, -2.0):  # unsorted on purpose
            rows.append(
                {
                    "layer": layer,
                    "coef": coef,
                    "trait_score": 50.0 + 5 * coef * layer if judged else None,
                    "coherence": 90.0 - 3 * abs(coef) if judged else None,
                    "ab_gap": 0.4 * coef - layer,
                    "projection": 1.5 * coef + layer,
                    "n": 4,
                    "samples": [],
                }
            )
    return rows


@pytest.fixture(scope="module")
def full_report(plotly, tmp_path_factory, tiny, vector, generations):
    plain, steered, _ = generations
    path = tmp_path_factory.mktemp("report") / "sub" / "report.html"
    out = pc.report(
        path,
        vector=vector,
        generations=[("unsteered", plain), ("steered", steered)],
        evaluation=sweep_rows(),
        tokenizer=tiny,
    )
    assert out == path and path.is_file()
    return path


class _Refs(HTMLParser):
    """Collects every URL attribute, inline scripts, figure and token containers."""

    def __init__(self):
        super().__init__()
        self.urls, self.scripts, self.figures, self.tokens, self.stylesheets = [], [], [], [], []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("src", "href", "data", "poster", "srcset", "action"):
            if a.get(key):
                self.urls.append((tag, a[key]))
        if tag == "link" and "stylesheet" in (a.get("rel") or ""):
            self.stylesheets.append(a)
        if tag == "script":
            self._in_script = True
            self.scripts.append("")
        if "data-figure" in a:
            self.figures.append(a["data-figure"])
        if "data-tokens" in a:
            self.tokens.append(a["data-tokens"])

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1] += data


def parse(path) -> _Refs:
    refs = _Refs()
    refs.feed(path.read_text(encoding="utf-8"))
    return refs


def test_html_is_self_contained_with_every_section(full_report):
    refs = parse(full_report)
    assert sorted(refs.figures) == sorted(FIGURES)
    assert refs.tokens == ["generation-1", "generation-2"]
    assert refs.urls == [] and refs.stylesheets == []  # nothing fetched: no src, no href
    big = [s for s in refs.scripts if len(s) > 1_000_000]
    assert len(big) == 1 and "plotly" in big[0][:2000].lower()  # plotly.js inlined once
    text = full_report.read_text()
    # outside plotly.js (whose strings hold links it never fetches: the render test checks that)
    ours = text.replace(big[0], "")
    assert not re.search(r"\b(src|href)\s*=\s*[\"']?(https?:)?//", ours)
    assert not re.search(r"\b(src|href)\s*=", ours)
    assert "<title>personacore report: impolite</title>" in text
    assert ">unsteered<" in text and ">steered<" in text


def test_separation_figure_marks_the_chosen_layer(plotly, vector):
    from personacore.report.figures import separation_figure

    fig = separation_figure(vector.metadata["stats"], vector.layer)
    by_name = {t.name: t for t in fig.data}
    assert list(by_name["AUROC"].y) == vector.metadata["stats"]["auroc"]
    assert list(by_name["Cohen's d"].y) == vector.metadata["stats"]["cohens_d"]
    lines = [s for s in fig.layout.shapes if s.type == "line"]
    assert [(s.x0, s.x1) for s in lines] == [(vector.layer, vector.layer)]
    assert f"chosen layer {vector.layer}" in [a.text for a in fig.layout.annotations]


def test_projection_densities_are_the_fitted_normals(plotly, vector):
    from scipy.stats import norm

    from personacore.report.figures import projection_figure

    stats, layer = vector.metadata["stats"], vector.layer
    midpoint = (stats["pos_mean"][layer] + stats["neg_mean"][layer]) / 2
    assert alert_threshold(vector) == pytest.approx(midpoint)
    fig = projection_figure(stats, layer, vector.metadata, alert_threshold(vector))
    assert "normal densities fitted" in fig.layout.title.text
    pos, neg = fig.data
    for trace, key in ((pos, "pos"), (neg, "neg")):
        want = norm.pdf(
            np.asarray(trace.x), stats[f"{key}_mean"][layer], stats[f"{key}_std"][layer]
        )
        np.testing.assert_allclose(np.asarray(trace.y), want, rtol=1e-9, atol=1e-12)
    assert [s.x0 for s in fig.layout.shapes] == [pytest.approx(midpoint)]


def test_projection_histograms_when_raw_projections_are_stored(plotly, vector):
    from personacore.report.figures import projection_figure

    stats, raw = simulated_stats(vector.num_layers + 1)
    pos, neg = raw[vector.layer]
    labels = [1] * len(pos) + [0] * len(neg)
    meta = dict(
        vector.metadata,
        heldout={"layer": vector.layer, "labels": labels, "reply": list(np.r_[pos, neg])},
    )
    fig = projection_figure(stats, vector.layer, meta, 0.25)
    assert "histograms" in fig.layout.title.text
    assert [t.type for t in fig.data] == ["histogram", "histogram"]
    np.testing.assert_array_equal(np.asarray(fig.data[0].x), pos)
    np.testing.assert_array_equal(np.asarray(fig.data[1].x), neg)
    assert [s.x0 for s in fig.layout.shapes] == [0.25]


def test_explicit_threshold_wins(plotly, tmp_path, vector):
    assert alert_threshold(vector, 1.25) == 1.25
    text = pc.report(tmp_path / "r.html", vector=vector, threshold=1.25).read_text()
    assert "Alert threshold 1.25: given explicitly" in text
    with pytest.raises(pc.InvalidInputError, match="threshold must be a number"):
        pc.report(tmp_path / "r.html", vector=vector, threshold="high")


def token_spans(text: str, k: int):
    """([(background color, token text)], [event kinds]) of the K-th generation's tokens."""
    block = text.split(f'data-tokens="generation-{k}"', 1)[1].split('<div class="scale">', 1)[0]
    spans = re.findall(
        r'<span class="tok[^"]*" style="background:([^"]+)"[^>]*>(.*?)</span>', block
    )
    return spans, re.findall(r'<span class="event (\w+)"', block)


def test_tokens_are_colored_by_score_and_events_marked(
    plotly, full_report, tiny, vector, generations
):
    from personacore.report.tokens import color_of

    plain, steered, _ = generations
    text = full_report.read_text()
    stats, layer = vector.metadata["stats"], vector.layer
    lo, hi = stats["neg_mean"][layer], stats["pos_mean"][layer]
    for k, gen in enumerate((plain, steered), 1):
        spans, badges = token_spans(text, k)
        assert "".join(html.unescape(t) for _, t in spans) == gen.text
        assert len(spans) == len(gen.token_ids)
        scores = gen.scores["impolite"][gen.prompt_len :, 0].astype(np.float64)
        assert [c for c, _ in spans] == [color_of((s - lo) / (hi - lo)) for s in scores]
        assert sorted(badges) == sorted(e.kind for e in gen.events)
    assert color_of(0.0) == "rgb(26,152,80)" and color_of(1.0) == "rgb(215,48,39)"
    assert color_of(-3.0) == color_of(0.0) and color_of(9.0) == color_of(1.0)


def test_score_figure_holds_the_scores_and_events(plotly, generations):
    from personacore.report.figures import score_figure

    _, steered, thr = generations
    fig = score_figure(steered, [], thr, "steered")
    line = fig.data[0]
    start = steered.prompt_len
    assert list(line.x) == list(range(-1, len(steered.token_ids)))
    np.testing.assert_array_equal(
        np.asarray(line.y, dtype=np.float32), steered.scores["impolite"][start - 1 :, 0]
    )
    markers = {t.name: t for t in fig.data[1:]}
    for kind in ("alert", "steer_on"):
        events = [e for e in steered.events if e.kind == kind]
        assert list(markers[kind].x) == [max(e.position - start, -1) for e in events]  # prompt: -1
    assert [s.y0 for s in fig.layout.shapes] == [thr]


def test_evaluation_sweep_one_line_per_layer(plotly):
    from personacore.report.figures import evaluation_figure
    from personacore.report.inputs import evaluation_rows

    rows = sweep_rows()
    fig = evaluation_figure(evaluation_rows(SimpleNamespace(rows=rows)))  # an object with .rows
    assert [a.text for a in fig.layout.annotations][:2] == [
        "trait score (judge, 0-100)",
        "coherence (judge, 0-100)",
    ]
    assert [t.name for t in fig.data] == ["layer 1", "layer 1", "layer 2", "layer 2"]
    for trace, (layer, key) in zip(
        fig.data, [(1, "trait_score"), (1, "coherence"), (2, "trait_score"), (2, "coherence")]
    ):
        mine = sorted((r for r in rows if r["layer"] == layer), key=lambda r: r["coef"])
        assert list(trace.x) == [r["coef"] for r in mine] == [-4.0, -2.0, 0.0, 2.0, 4.0]
        assert list(trace.y) == [r[key] for r in mine]
    no_judge = evaluation_figure(evaluation_rows(sweep_rows(judged=False)))
    assert [a.text for a in no_judge.layout.annotations][:2] == [
        "A/B log-prob gap",
        "mean projection of the replies",
    ]
    assert list(no_judge.data[0].y) == [0.4 * c - 1 for c in (-4.0, -2.0, 0.0, 2.0, 4.0)]


def test_evaluation_rows_from_a_dataframe():
    pd = pytest.importorskip("pandas")
    from personacore.report.inputs import evaluation_rows

    rows = sweep_rows(judged=False)
    got = evaluation_rows(pd.DataFrame(rows))
    assert [(r["layer"], r["coef"], r["ab_gap"]) for r in got] == [
        (r["layer"], r["coef"], r["ab_gap"]) for r in rows
    ]
    assert all(r["trait_score"] is None for r in got)  # None (NaN in pandas) stays not measured


def test_every_section_is_optional(plotly, tmp_path, vector):
    title_only = pc.report(tmp_path / "t.html", title="Nothing yet")
    refs = parse(title_only)
    assert refs.figures == [] and refs.scripts == []  # no plotly.js when nothing is plotted
    assert "<h1>Nothing yet</h1>" in title_only.read_text()
    assert "<title>personacore report</title>" in pc.report(tmp_path / "d.html").read_text()
    assert parse(pc.report(tmp_path / "e.html", evaluation=sweep_rows())).figures == ["evaluation"]
    bare = pc.PersonaVector(vector.directions, layer=vector.layer, name="bare")
    text = pc.report(tmp_path / "v.html", vector=bare).read_text()
    assert "no held-out statistics" in text and parse(tmp_path / "v.html").figures == []


def test_missing_plotly_is_a_typed_error_naming_the_extra(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "plotly" or m.startswith("plotly.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "plotly", None)  # import plotly now raises ImportError
    with pytest.raises(pc.ReportDependencyError) as err:
        pc.report(tmp_path / "r.html", title="x")
    assert 'pip install "personacore[report]"' in str(err.value)
    assert isinstance(err.value, pc.PersonacoreError) and isinstance(err.value, ImportError)
    assert not (tmp_path / "r.html").exists()


def test_importing_personacore_needs_no_plotly():
    code = (
        "import sys; sys.modules['plotly'] = None; import personacore as pc; "
        "import personacore.report; print(pc.report.__name__)"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "report"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(vector="v.safetensors"), "vector must be a PersonaVector"),
        (dict(generations=["text"]), "generations[0] must be a personacore Generation"),
        (
            dict(evaluation=[{"layer": 1.5, "coef": 1.0}]),
            "evaluation row 0['layer'] must be an int",
        ),
        (dict(evaluation=[{"layer": 1, "coef": "x"}]), "['coef'] must be a number"),
        (dict(evaluation={"rows": []}), "list of row dicts or an object with .rows"),
        (dict(title=3), "title must be a str"),
    ],
)
def test_bad_input_is_named(plotly, tmp_path, kwargs, message):
    with pytest.raises(pc.InvalidInputError) as err:
        pc.report(tmp_path / "r.html", **kwargs)
    assert message in str(err.value)


def test_bad_stats_are_named(plotly, tmp_path, vector):
    broken = pc.PersonaVector(vector.directions, layer=1, metadata={"stats": {"auroc": [0.5]}})
    with pytest.raises(pc.InvalidInputError, match="lacks"):
        pc.report(tmp_path / "r.html", vector=broken)


def test_cli_report(plotly, tmp_path, tiny, vector, generations, capsys):
    plain, steered, _ = generations
    vec_path = tmp_path / "impolite.safetensors"
    vector.save(vec_path)
    gens = tmp_path / "gens.jsonl"
    with gens.open("w") as f:
        for label, gen in (("unsteered", plain), ("steered", steered)):
            f.write(json.dumps(dict(gen.to_dict(), label=label)) + "\n")
    evaluation = tmp_path / "eval.json"
    evaluation.write_text(json.dumps({"rows": sweep_rows()}))
    out = tmp_path / "cli.html"
    argv = ["report", "--vector", str(vec_path), "--generations", str(gens)]
    argv += ["--evaluation", str(evaluation), "--out", str(out)]
    assert main(argv) == 0
    assert f"wrote {out} (vector, 2 generations, 10 evaluation rows)" in capsys.readouterr().out
    refs = parse(out)
    assert sorted(refs.figures) == sorted(FIGURES)
    text = out.read_text()
    assert ">unsteered<" in text and ">steered<" in text
    # the vector's metadata names the tiny model, whose tokenizer decodes the tokens
    for k, gen in enumerate((plain, steered), 1):
        assert "".join(html.unescape(t) for _, t in token_spans(text, k)[0]) == gen.text
    evaluation.write_text(json.dumps(sweep_rows()))  # a bare list of rows works too
    assert main(["report", "--evaluation", str(evaluation), "--out", str(out)]) == 0
    assert parse(out).figures == ["evaluation"]
    gens.write_text('{"text": "x"}\n')
    assert main(["report", "--generations", str(gens), "--out", str(out)]) == 1
    assert "line 1: Generation dict has no 'token_ids'" in capsys.readouterr().err


# ---- a real render ----------------------------------------------------------------------------
_RECTS = """Array.from(document.querySelectorAll('[data-figure], [data-tokens]')).map(e => {
  const r = e.getBoundingClientRect();
  return {name: e.dataset.figure || ('tokens ' + e.dataset.tokens), x: r.left + scrollX,
          y: r.top + scrollY, w: r.width, h: r.height};
})"""


def drawn(png: bytes):
    """(fraction of non-white pixels, number of saturated, i.e. colored, pixels) of a PNG."""
    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
    nonwhite = float((rgb.min(axis=2) < 235).mean())
    colored = int(((rgb.max(axis=2) - rgb.min(axis=2)) > 60).sum())
    return nonwhite, colored


def render(path, profile):
    """{region name: (width, height, non-white fraction, colored pixels)}, requests, JS errors."""
    with HeadlessChromium(profile, width=1400, height=900) as browser:
        browser.open(path.resolve().as_uri())
        browser.wait_for("document.querySelectorAll('[data-figure] .main-svg').length >= 5", 30)
        regions = {}
        for r in browser.evaluate(_RECTS):
            png = browser.screenshot(r["x"], r["y"], r["w"], r["h"])
            regions[r["name"]] = (r["w"], r["h"], *drawn(png))
        return regions, browser.requests, browser.exceptions


def test_report_renders_in_headless_chromium(full_report, tmp_path):
    pytest.importorskip("PIL")
    if chromium_path() is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs Debian's chromium package")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    regions, requests, errors = render(full_report, tmp_path / "profile")
    assert errors == []
    assert requests == [full_report.resolve().as_uri()]  # the page itself, nothing else
    assert set(regions) == FIGURES | {"tokens generation-1", "tokens generation-2"}
    for name, (w, h, nonwhite, colored) in regions.items():
        if name.startswith("tokens"):
            assert w > 200 and h > 20, (name, w, h)
            assert nonwhite > 0.2 and colored > 500, (name, nonwhite, colored)
        else:
            assert w >= 500 and h >= 300, (name, w, h)
            assert nonwhite > 0.01 and colored > 400, (name, nonwhite, colored)

    # negative control: without plotly's script the figures stay blank and fail the same check
    text = full_report.read_text()
    start = text.index("<script>")
    broken = tmp_path / "broken.html"
    broken.write_text(text[:start] + text[text.index("</script>", start) + 9 :])
    with HeadlessChromium(tmp_path / "profile2", width=1400, height=900) as browser:
        browser.open(broken.resolve().as_uri())
        for r in browser.evaluate(_RECTS):
            if not r["name"].startswith("tokens"):
                nonwhite, colored = drawn(browser.screenshot(r["x"], r["y"], r["w"], r["h"]))
                assert nonwhite < 0.01 and colored == 0, (r["name"], nonwhite, colored)
