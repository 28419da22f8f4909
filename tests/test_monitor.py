"""Live monitoring (pc.Monitor) on the default model: scores are the scalar projections a·v/‖v‖ of
the residual stream (docs/conventions.md, Layers), for prompt and generated tokens, computed in the loop."""

from __future__ import annotations

import numpy as np
import pytest

import personacore as pc


@pytest.fixture(scope="session")
def default_model(device_model):
    """This module's tests run on every device of conftest's ``device`` (CUDA with a GPU only)."""
    return device_model


def _projections(hs: np.ndarray, vector: np.ndarray, layers) -> np.ndarray:
    """[n_tokens, len(layers)] projections of hidden states [L+1, T, H] on vector rows."""
    cols = []
    for layer in layers:
        v = vector[layer].astype(np.float64)
        cols.append(hs[layer].astype(np.float64) @ (v / np.linalg.norm(v)))
    return np.stack(cols, axis=1)


def _close(got: np.ndarray, want: np.ndarray, rel: float = 1e-3) -> None:
    """Within ``rel`` of each layer's largest |projection| (the relative scale of that column)."""
    assert got.shape == want.shape
    scale = np.abs(want).max(axis=0, keepdims=True) + 1e-6
    err = (np.abs(got - want) / scale).max()
    assert err < rel, f"max relative error {err}"


@pytest.fixture(scope="module")
def vec(steering_reference) -> np.ndarray:
    return steering_reference.vector


def test_prompt_scores_match_hidden_states(default_model, reference, vec):
    conv = reference.conversations[0]
    out = default_model.generate(
        conv.prompt_ids, max_new_tokens=1, monitor=pc.Monitor({"sarcasm": vec}, layers="all")
    )
    assert out.score_layers == {"sarcasm": list(range(31))}
    s = out.scores["sarcasm"]
    assert s.dtype == np.float32 and s.shape[1] == 31
    want = _projections(default_model.hidden_states(conv.prompt_ids), vec, range(31))
    _close(s[: out.prompt_len], want)
    # Also against the transformers reference hidden states.
    _close(
        s[: out.prompt_len],
        _projections(conv.hidden[:, : conv.prompt_len], vec, range(31)),
        rel=2e-3,
    )
    np.testing.assert_array_equal(out.early_warning["sarcasm"], s[out.prompt_len - 1])


def test_generated_scores_match_hidden_states(default_model, reference, vec):
    conv = reference.conversations[1]
    layers = [0, 5, 10, 20, 30]
    out = default_model.generate(
        conv.prompt_ids,
        max_new_tokens=6,
        ignore_eos=True,
        monitor=pc.Monitor({"v": vec, "neg": -vec}, layers=layers),
    )
    n = out.prompt_len + len(out.token_ids)
    assert len(out.token_ids) == 6 and out.scores["v"].shape == (n, len(layers))
    assert out.is_generated.tolist() == [False] * out.prompt_len + [True] * 6
    want = _projections(default_model.hidden_states(out.ids), vec, layers)
    _close(out.scores["v"], want)
    np.testing.assert_allclose(out.scores["neg"], -out.scores["v"], atol=1e-5)


def test_batched_scores_equal_one_by_one(default_model, reference, vec):
    """Left padding in a batch does not leak into scores or events."""
    prompts = [c.prompt_ids for c in reference.conversations]
    mon = pc.Monitor({"v": vec}, layers=[0, 10, 30], thresholds={"v": 5.0})
    batch = default_model.generate(prompts, max_new_tokens=3, ignore_eos=True, monitor=mon)
    for ids, got in zip(prompts, batch):
        alone = default_model.generate(ids, max_new_tokens=3, ignore_eos=True, monitor=mon)
        assert got.token_ids == alone.token_ids
        assert got.scores["v"].shape == (len(ids) + 3, 3)
        _close(got.scores["v"], alone.scores["v"].astype(np.float64))
        assert [(e.kind, e.position, e.layer) for e in got.events] == [
            (e.kind, e.position, e.layer) for e in alone.events
        ]
    assert {e.sequence for e in batch[1].events} == {1}


def test_monitoring_does_not_change_tokens(default_model, reference, vec):
    conv = reference.conversations[0]
    out = default_model.generate(
        conv.prompt_ids,
        max_new_tokens=8,
        monitor=pc.Monitor({"v": vec}, layers="all", thresholds=0.0),
    )
    assert out.token_ids == conv.greedy[:8]


def test_layer_choices(default_model, vec):
    ids = default_model.encode_chat([{"role": "user", "content": "Hi"}])
    pv = pc.PersonaVector(vec, layer=12, name="pv")
    mon = pc.Monitor(
        {"pv": pv, "raw": vec, "flat": vec[7]}, layers={"pv": None, "raw": [20, 3], "flat": 7}
    )
    assert mon.names == ["pv", "raw", "flat"]
    out = default_model.generate(ids, max_new_tokens=2, monitor=mon)
    assert out.score_layers == {"pv": [12], "raw": [20, 3], "flat": [7]}
    assert {n: s.shape[1] for n, s in out.scores.items()} == {"pv": 1, "raw": 2, "flat": 1}
    want = _projections(default_model.hidden_states(out.ids), vec, [12, 20, 3, 7])
    got = np.concatenate([out.scores["pv"], out.scores["raw"], out.scores["flat"]], axis=1)
    _close(got[: len(want)], want)
    # A dict of vectors passed directly is a Monitor with recommended layers.
    out2 = default_model.generate(ids, max_new_tokens=2, monitor={"pv": pv})
    np.testing.assert_allclose(out2.scores["pv"], out.scores["pv"], atol=1e-5)


def test_stream_scores_equal_generate(default_model, reference, vec):
    conv = reference.conversations[1]
    mon = pc.Monitor({"v": vec}, layers=[4, 15])
    full = default_model.generate(conv.prompt_ids, max_new_tokens=5, ignore_eos=True, monitor=mon)
    steps = list(
        default_model.stream(conv.prompt_ids, max_new_tokens=5, ignore_eos=True, monitor=mon)
    )
    assert [s.token_id for s in steps] == full.token_ids
    assert steps[0].positions == list(range(full.prompt_len))
    positions = [p for s in steps for p in s.positions]
    assert positions == list(range(full.prompt_len + 5))  # the last step scores its own token too
    np.testing.assert_allclose(
        np.concatenate([s.scores["v"] for s in steps]), full.scores["v"], atol=1e-5
    )


def test_thresholds_raise_alert_and_clear(default_model, reference, vec):
    conv = reference.conversations[0]
    base = default_model.generate(
        conv.prompt_ids,
        max_new_tokens=6,
        ignore_eos=True,
        monitor=pc.Monitor({"v": vec}, layers=[15]),
    )
    s = base.scores["v"][:, 0]
    thr = float(np.median(s))
    out = default_model.generate(
        conv.prompt_ids,
        max_new_tokens=6,
        ignore_eos=True,
        monitor=pc.Monitor({"v": vec}, layers=[15], thresholds={"v": thr}),
    )
    # Expected crossings from the scores themselves; attention sinks (position 0) never alert.
    above = s > np.float32(thr)
    assert out.sinks[0] and not out.sinks[1:].any()
    want, state = [], False
    for pos, a in enumerate(above):
        if a != state and not out.sinks[pos]:
            want.append(("alert" if a else "clear", pos))
            state = a
    assert [(e.kind, e.position) for e in out.events] == want
    for e in out.events:
        assert e.vector == "v" and e.layer == 15 and e.coef is None and e.steer is None
        assert e.score == pytest.approx(float(s[e.position]), abs=1e-4)
        assert e.step == max(0, e.position - out.prompt_len + 1)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda v: pc.Monitor({"raw": v}), "no recommended layer"),
        (lambda v: pc.Monitor({"raw": v}, layers=[31]), "outside 0..30"),
        (lambda v: pc.Monitor({"raw": v}, layers=[-1]), "outside 0..30"),
        (lambda v: pc.Monitor({"raw": v[:, :100]}, layers=[3]), "width 100"),
        (lambda v: pc.Monitor({"raw": v[:20]}, layers=[3]), "20 rows"),
        (lambda v: pc.Monitor({"raw": np.zeros_like(v)}, layers=[3]), "zero"),
    ],
)
def test_bad_monitor_on_the_model(default_model, vec, make, match):
    with pytest.raises(pc.InvalidInputError, match=match):
        default_model.generate([1, 2, 3], max_new_tokens=1, monitor=make(vec))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"vectors": {}}, "non-empty"),
        ({"vectors": {"": 1}}, "names"),
        ({"vectors": {"a": "text"}}, "numbers"),
        ({"vectors": {"a": np.full(4, np.nan)}}, "NaN"),
        ({"vectors": {"a": np.ones((2, 3, 4))}}, "shape"),
        ({"vectors": {"a": np.ones(4)}, "layers": "some"}, "'all'"),
        ({"vectors": {"a": np.ones(4)}, "layers": [1, 1]}, "twice"),
        ({"vectors": {"a": np.ones(4)}, "layers": {"b": 1}}, "unknown"),
        ({"vectors": {"a": np.ones(4)}, "thresholds": {"b": 1.0}}, "unknown"),
        ({"vectors": {"a": np.ones(4)}, "thresholds": float("inf")}, "finite"),
        ({"vectors": {"a": np.ones(4)}, "thresholds": "high"}, "thresholds"),
    ],
)
def test_bad_monitor_arguments(kwargs, match):
    with pytest.raises(pc.InvalidInputError, match=match):
        pc.Monitor(**kwargs)


def test_sink_token_raises_no_alert_by_default(default_model, reference, vec):
    """Position 0 (the attention sink: residual norm ~25,000 against a median of ~143 at layer 12)
    is marked in ``sinks`` and raises no alert, even under a threshold every score is above;
    ``include_sinks=True`` lets it alert."""
    conv = reference.conversations[0]
    kw = dict(max_new_tokens=3, ignore_eos=True)
    out = default_model.generate(
        conv.prompt_ids, monitor=pc.Monitor({"v": vec}, layers=[12], thresholds=-1e9), **kw
    )
    assert out.sinks.dtype == bool and out.sinks.shape == (out.scores["v"].shape[0],)
    norms = np.linalg.norm(default_model.hidden_states(conv.prompt_ids)[12], axis=1)
    assert norms[0] > 5 * np.median(norms[1:])  # the measured outlier the rule marks
    assert out.sinks[0] and not out.sinks[1:].any()
    assert [(e.kind, e.position) for e in out.events] == [("alert", 1)]
    kept = default_model.generate(
        conv.prompt_ids,
        monitor=pc.Monitor({"v": vec}, layers=[12], thresholds=-1e9, include_sinks=True),
        **kw,
    )
    assert [(e.kind, e.position) for e in kept.events] == [("alert", 0)]
    np.testing.assert_array_equal(kept.sinks, out.sinks)  # marked either way
    # Summaries leave sinks out; a stream marks the same positions.
    assert out.reply_scores()["v"].shape == (3, 1)
    with default_model.stream(
        conv.prompt_ids, monitor=pc.Monitor({"v": vec}, layers=[12]), **kw
    ) as st:
        steps = list(st)
    assert [x for s in steps for x in s.sinks] == out.sinks.tolist()
    with pytest.raises(pc.InvalidInputError, match="include_sinks"):
        pc.Monitor({"v": vec}, layers=[12], include_sinks="yes")


def test_a_monitor_is_resolved_once_per_model_and_state(default_model, reference, vec):
    """A service passes one monitor to every request: its vectors are converted and laid out once
    per model, and a threshold or ``include_sinks`` set later still takes effect."""
    conv = reference.conversations[0]
    mon = pc.Monitor({"v": vec}, layers=[15])
    core = default_model._core
    first = mon._prepared(core)
    assert mon._prepared(core) is first
    base = default_model.generate(conv.prompt_ids, max_new_tokens=6, ignore_eos=True, monitor=mon)
    assert mon._prepared(core) is first and not base.events
    thr = float(np.median(base.scores["v"][:, 0]))
    mon.thresholds["v"] = thr
    again = mon._prepared(core)
    assert again is not first
    out = default_model.generate(conv.prompt_ids, max_new_tokens=6, ignore_eos=True, monitor=mon)
    fresh = default_model.generate(
        conv.prompt_ids,
        max_new_tokens=6,
        ignore_eos=True,
        monitor=pc.Monitor({"v": vec}, layers=[15], thresholds={"v": thr}),
    )
    assert out.events and [(e.kind, e.position) for e in out.events] == [
        (e.kind, e.position) for e in fresh.events
    ]
    np.testing.assert_array_equal(out.scores["v"], fresh.scores["v"])
    mon.include_sinks = True
    assert mon._prepared(core) is not again


def test_a_prepared_monitor_belongs_to_its_model(tmp_path):
    import tiny_models as tm
    from personacore.engine.generation import _params

    models = []
    for i in range(2):
        config, _ = tm.write_tiny_model(tmp_path / f"m{i}", "llama", seed=i)
        models.append(pc.load_model(str(tmp_path / f"m{i}")))
    a, b = models
    rows = np.random.default_rng(0).standard_normal(
        (config["num_hidden_layers"] + 1, config["hidden_size"])
    )
    mon = pc.Monitor({"v": rows.astype(np.float32)}, layers="all")
    prepared = mon._prepared(a._core)
    params = _params(2, 0.0, 1.0, 0, 0, None, True, None, None, 0.0, 0.0)
    with pytest.raises(pc.InvalidInputError, match="prepared for another model"):
        b._core.prepare_generation([[1, 2]], params, [], prepared_monitor=prepared)
    with pytest.raises(pc.InvalidInputError, match="not both"):
        a._core.prepare_generation([[1, 2]], params, [], mon._request(), prepared_monitor=prepared)
    # Through the public API one monitor serves both models, each with its own prepared form.
    for m in (a, b):
        got = m.generate([1, 2, 3], max_new_tokens=2, ignore_eos=True, monitor=mon)
        assert got.scores["v"].shape == (5, config["num_hidden_layers"] + 1)
    assert mon._prepared(a._core) is prepared and mon._prepared(b._core) is not prepared
