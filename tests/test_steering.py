"""Steering (pc.Steer, pc.Ablate, pc.Cap, conditional steers) on the default model.

Parity: tests/data/smollm2_steering_reference.* was made with transformers by adding
``coef * v[10]`` to the output of decoder block 10 (a hook on ``model.layers[9]``) at the given
positions; greedy tokens must be identical and last-position logits within 5e-2.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import personacore as pc

LAYER = 10


@pytest.fixture(scope="session")
def default_model(device_model):
    """This module's tests run on every device of conftest's ``device`` (CUDA with a GPU only)."""
    return device_model


def _proj(hs: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Scalar projection a·v/‖v‖ of every row of ``hs`` [..., hidden]."""
    return hs.astype(np.float64) @ (v / np.linalg.norm(v)).astype(np.float64)


@pytest.fixture(scope="module")
def ref(steering_reference):
    return steering_reference


@pytest.mark.parametrize("key", ["L10_c0.0_all", "L10_c2.0_all", "L10_c2.0_response"])
def test_parity_with_transformers(default_model, ref, key):
    case = next(c for c in ref.cases if c["key"] == key)
    steer = [
        pc.Steer(ref.vector, case["coef"], layers=[case["layer"]], positions=case["positions"])
    ]
    out = default_model.generate(ref.prompt_ids, max_new_tokens=20, steer=steer)
    assert out.token_ids == [int(t) for t in ref.arrays[f"{key}_greedy"]]
    assert out.text == case["greedy_text"]
    last = default_model.logits(ref.prompt_ids, steer=steer)[-1]
    diff = np.abs(last - ref.arrays[f"{key}_last_logits"]).max()
    assert diff < 5e-2, f"{key}: max |logit diff| {diff}"


def test_vector_forms_agree(default_model, ref):
    """A PersonaVector, the [L+1, H] array and its [H] row give the same steering."""
    ids = ref.prompt_ids[:20]
    pv = pc.PersonaVector(ref.vector, layer=LAYER, name="sarcasm")
    a = default_model.logits(ids, steer=pc.Steer(ref.vector, 2.0, layers=[LAYER]))
    b = default_model.logits(ids, steer=pc.Steer(pv, 2.0))  # recommended layer
    c = default_model.logits(ids, steer=pc.Steer(ref.vector[LAYER], 2.0, layers=LAYER))
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(a, c, atol=1e-5)
    assert np.abs(a - default_model.logits(ids)).max() > 1e-2  # it does something


def test_hidden_states_show_the_addition(default_model, ref):
    """Row LAYER (output of block LAYER) gets + coef * v[LAYER]; earlier rows are untouched."""
    ids = ref.prompt_ids[:12]
    base = default_model.hidden_states(ids)
    steered = default_model.hidden_states(ids, steer=pc.Steer(ref.vector, 3.0, layers=[LAYER]))
    np.testing.assert_allclose(steered[:LAYER], base[:LAYER], atol=1e-5)
    np.testing.assert_allclose(steered[LAYER], base[LAYER] + 3.0 * ref.vector[LAYER], atol=1e-3)
    assert np.abs(steered[LAYER + 1 :] - base[LAYER + 1 :]).max() > 1e-2


def test_response_positions_in_a_single_forward(default_model, ref):
    """positions='response' in logits()/hidden_states() touches only the last position."""
    ids = ref.prompt_ids[:12]
    base = default_model.logits(ids)
    resp = default_model.logits(
        ids, steer=pc.Steer(ref.vector, 4.0, layers=[LAYER], positions="response")
    )
    np.testing.assert_allclose(resp[:-1], base[:-1], atol=1e-5)
    assert np.abs(resp[-1] - base[-1]).max() > 1e-2
    for mode in ("all", "prompt"):  # both mean every position in a single forward pass
        np.testing.assert_allclose(
            default_model.logits(
                ids, steer=pc.Steer(ref.vector, 4.0, layers=[LAYER], positions=mode)
            ),
            default_model.logits(ids, steer=pc.Steer(ref.vector, 4.0, layers=[LAYER])),
            atol=1e-5,
        )


def test_steers_sum_and_multi_layer(default_model, ref):
    ids = ref.prompt_ids
    one = pc.Steer(ref.vector, 1.0, layers=[LAYER])
    two = pc.Steer(ref.vector, 2.0, layers=[LAYER])
    # x + v + v and x + 2v round differently; 30 layers amplify that to ~1e-5 of the logits
    # (a missing or doubled steer moves them by > 1e-2)
    np.testing.assert_allclose(
        default_model.logits(ids, steer=[one, one]),
        default_model.logits(ids, steer=two),
        rtol=1e-4,
        atol=1e-4,
    )
    a = default_model.generate(ids, max_new_tokens=6, steer=[one, one])
    b = default_model.generate(ids, max_new_tokens=6, steer=[two])
    assert a.token_ids == b.token_ids
    # One steer on two layers == two steers on one layer each.
    multi = pc.Steer(ref.vector, 1.5, layers=[5, 15])
    split = [pc.Steer(ref.vector, 1.5, layers=[5]), pc.Steer(ref.vector, 1.5, layers=[15])]
    np.testing.assert_allclose(
        default_model.logits(ids, steer=multi),
        default_model.logits(ids, steer=split),
        rtol=1e-4,
        atol=1e-4,
    )


def test_ablate_removes_the_component(default_model, ref):
    ids = ref.prompt_ids
    v = ref.vector[LAYER]
    base = _proj(default_model.hidden_states(ids)[LAYER], v)
    assert np.abs(base).max() > 0.5
    hs = default_model.hidden_states(ids, steer=pc.Ablate(ref.vector, [LAYER]))
    assert np.abs(_proj(hs[LAYER], v)).max() < 1e-3 * np.abs(base).max()
    # During generation, seen by a monitor at the same layer (it reads after the interventions).
    out = default_model.generate(
        ids,
        max_new_tokens=4,
        ignore_eos=True,
        steer=[pc.Ablate(ref.vector, [LAYER])],
        monitor=pc.Monitor({"v": ref.vector}, layers=[LAYER]),
    )
    assert out.scores["v"].shape == (len(ids) + 4, 1)
    assert np.abs(out.scores["v"]).max() < 1e-3 * np.abs(base).max()


def test_ablate_response_positions_only(default_model, ref):
    ids = ref.prompt_ids
    out = default_model.generate(
        ids,
        max_new_tokens=3,
        ignore_eos=True,
        steer=[pc.Ablate(ref.vector, [LAYER], positions="response")],
        monitor=pc.Monitor({"v": ref.vector}, layers=[LAYER]),
    )
    s = out.scores["v"][:, 0]
    p = out.prompt_len
    assert np.abs(s[p - 1 :]).max() < 1e-3  # last prompt token, then every generated token
    assert np.abs(s[: p - 1]).max() > 0.1  # the rest of the prompt is untouched


def test_cap_clamps_the_projection(default_model, ref):
    ids = ref.prompt_ids
    v = ref.vector[LAYER]
    base = _proj(default_model.hidden_states(ids)[LAYER], v)
    lo, hi = np.quantile(base, [0.25, 0.75])
    hs = default_model.hidden_states(ids, steer=pc.Cap(ref.vector, [LAYER], min=lo, max=hi))
    capped = _proj(hs[LAYER], v)
    np.testing.assert_allclose(capped, np.clip(base, lo, hi), atol=1e-3)
    # Max only, during generation, checked with the monitor at the same layer.
    out = default_model.generate(
        ids,
        max_new_tokens=4,
        ignore_eos=True,
        steer=pc.Cap(ref.vector, LAYER, max=hi),
        monitor=pc.Monitor({"v": ref.vector}, layers=LAYER),
    )
    s = out.scores["v"][:, 0]
    assert s.max() <= hi + 1e-3
    np.testing.assert_allclose(s[: len(ids)], np.minimum(base, hi), atol=1e-3)


def test_per_sequence_steering_in_a_batch(default_model, reference, ref):
    c0, c1 = reference.conversations
    steer = pc.Steer(ref.vector, 2.0, layers=[LAYER])
    for positions in ("all", "response"):
        steer = pc.Steer(ref.vector, 2.0, layers=[LAYER], positions=positions)
        # The shorter prompt (c0, left-padded in the batch) carries the steering.
        steered, plain = default_model.generate(
            [c0.prompt_ids, c1.prompt_ids], max_new_tokens=8, steer=[[steer], None]
        )
        alone = default_model.generate(c0.prompt_ids, max_new_tokens=8, steer=steer)
        assert steered.token_ids == alone.token_ids, positions
        assert plain.token_ids == c1.greedy[:8], positions
        assert steered.token_ids != c0.greedy[:8], positions


def test_conditional_steer_switches_and_logs(default_model, ref, tmp_path):
    """A steer pushing against the monitored direction switches on above a threshold, pulls the score
    down, switches off, and logs every switch (events and audit log)."""
    ids = ref.prompt_ids
    mon_layer = 20
    base = default_model.generate(
        ids,
        max_new_tokens=12,
        ignore_eos=True,
        monitor=pc.Monitor({"v": ref.vector}, layers=[mon_layer]),
    )
    gen_scores = base.scores["v"][base.prompt_len :, 0]
    thr = float(np.quantile(gen_scores, 0.3))  # crossed during the unsteered generation
    log = tmp_path / "audit.jsonl"
    cond = pc.Steer(
        ref.vector,
        -8.0,
        layers=[LAYER],
        when=pc.When("v", above=thr, hysteresis=0.0),
        name="calm-down",
    )
    out = default_model.generate(
        ids,
        max_new_tokens=12,
        ignore_eos=True,
        steer=[cond],
        monitor=pc.Monitor({"v": ref.vector}, layers=[mon_layer], thresholds={"v": thr}),
        audit_log=log,
    )
    kinds = [e.kind for e in out.events]
    assert "steer_on" in kinds and "alert" in kinds
    on = next(e for e in out.events if e.kind == "steer_on")
    assert (on.steer, on.vector, on.layer, on.coef, on.sequence) == (
        "calm-down",
        "v",
        mon_layer,
        -8.0,
        0,
    )
    assert on.score > thr - 1e-5 and on.threshold == pytest.approx(thr, rel=1e-6)
    assert out.scores["v"][on.position, 0] == pytest.approx(on.score, rel=1e-5, abs=1e-5)
    # Until the switch the run is the unsteered one; the switch acts from the next forward pass.
    first_steered = on.step + 1  # token index whose logits were the first steered ones
    assert out.token_ids[:first_steered] == base.token_ids[:first_steered]
    # Switching alternates on/off, each consistent with the threshold.
    switches = [e for e in out.events if e.kind in ("steer_on", "steer_off")]
    for a, b in zip(switches, switches[1:]):
        assert a.kind != b.kind and b.position > a.position
    t32 = float(np.float32(thr))
    for e in switches:
        assert (e.score > t32) if e.kind == "steer_on" else (e.score <= t32)
    for e in out.events:
        if e.kind in ("alert", "clear"):
            assert e.threshold == pytest.approx(thr, rel=1e-6) and e.steer is None
            assert (e.score > t32) == (e.kind == "alert")
    # The audit log holds the same events, one JSON object per line (plus time and model).
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(lines) == len(out.events)
    for line, event in zip(lines, out.events):
        assert isinstance(line["time"], float) and line["model"]
        _same_event(pc.Event.from_dict(line), event)
    # Appending: a second run adds its lines after the first run's (one alert, at position 1: the
    # attention sink at position 0 raises none).
    default_model.generate(
        ids,
        max_new_tokens=2,
        audit_log=log,
        monitor=pc.Monitor({"v": ref.vector}, layers=[mon_layer], thresholds=-1e9),
    )
    again = [json.loads(x) for x in log.read_text().splitlines()]
    assert again[: len(lines)] == lines
    assert [(x["kind"], x["position"], x["step"]) for x in again[len(lines) :]] == [("alert", 1, 0)]


def _same_event(a: pc.Event, b: pc.Event) -> None:
    """Equal, with float fields compared at float32 precision (JSON holds shortest f32 reprs)."""
    for f in ("kind", "sequence", "position", "step", "vector", "layer", "steer"):
        assert getattr(a, f) == getattr(b, f), f
    for f in ("score", "threshold", "coef"):
        x, y = getattr(a, f), getattr(b, f)
        assert (x is None) == (y is None), f
        if x is not None:
            assert x == pytest.approx(y, rel=1e-6, abs=1e-6), f


def test_conditional_below_and_hysteresis(default_model, ref):
    ids = ref.prompt_ids
    mon = pc.Monitor({"v": ref.vector}, layers=[LAYER, 20])
    base = default_model.generate(ids, max_new_tokens=8, ignore_eos=True, monitor=mon)
    # below= a threshold above every score: on from the prompt pass, never off.
    high = float(base.scores["v"].max()) + 1000.0
    out = default_model.generate(
        ids,
        max_new_tokens=8,
        ignore_eos=True,
        monitor=mon,
        steer=pc.Steer(ref.vector, 2.0, layers=[LAYER], when=("v", "below", high, 1.0)),
    )
    switches = [e for e in out.events if e.kind.startswith("steer")]
    assert [e.kind for e in switches] == ["steer_on"]
    assert switches[0].step == 0 and switches[0].position == len(ids) - 1
    assert switches[0].layer == LAYER  # default: the monitor's first layer for that name
    # An enormous hysteresis keeps a steer on once it is on.
    low = float(base.scores["v"][:, 0].min()) - 1.0
    out = default_model.generate(
        ids,
        max_new_tokens=8,
        ignore_eos=True,
        monitor=mon,
        steer=pc.Steer(
            ref.vector,
            -20.0,
            layers=[LAYER],
            when=pc.When("v", above=low, hysteresis=1e6, layer=20),
        ),
    )
    assert [e.kind for e in out.events if e.kind.startswith("steer")] == ["steer_on"]


def _switches(out) -> list:
    return [e for e in out.events if e.kind in ("steer_on", "steer_off")]


def test_min_on_holds_a_switched_on_steer(default_model, ref):
    """The chattering loop of issue 20 (a strong steer against the monitored direction, no
    hysteresis) switches on almost every token; with ``min_on=8`` a switched-on steer stays on for
    8 tokens, and with ``min_off=8`` too the loop switches at most once per 8 tokens."""
    ids = ref.prompt_ids
    mon = pc.Monitor({"v": ref.vector}, layers=[20])
    kw = dict(max_new_tokens=24, ignore_eos=True, monitor=mon)
    base = default_model.generate(ids, **kw)
    thr = float(np.quantile(base.scores["v"][base.prompt_len :, 0], 0.3))

    def run(**when):
        steer = pc.Steer(ref.vector, -8.0, layers=[LAYER], when=pc.When("v", above=thr, **when))
        return _switches(default_model.generate(ids, steer=steer, **kw))

    plain = run()
    assert len(plain) > 24 // 8 + 1  # it chatters: more switches than min_on=8 would allow
    held = run(min_on=8)
    assert held and held[0].kind == "steer_on"
    for on, off in zip(held[::2], held[1::2]):
        assert (on.kind, off.kind) == ("steer_on", "steer_off")
        assert off.position - on.position >= 8
    both = run(min_on=8, min_off=8)
    assert both and all(b.position - a.position >= 8 for a, b in zip(both, both[1:]))
    assert len(both) <= 24 // 8 + 1


def test_proportional_strength_grows_with_the_excess(default_model, ref):
    """In proportional mode the steer's coefficient is ``coef × min(1, gain × excess)``: the
    steer_on event reports it, and the hidden state of the next token moves by exactly that much
    along the vector (monitored at the steered layer, after the steer)."""
    ids = ref.prompt_ids
    mon = pc.Monitor({"v": ref.vector}, layers=[LAYER])
    kw = dict(max_new_tokens=2, ignore_eos=True, monitor=mon)
    base = default_model.generate(ids, **kw)
    s = base.scores["v"][:, 0]
    excess = 1.5
    thr = float(s[base.prompt_len - 1]) - excess  # the prompt pass switches it on
    norm = float(np.linalg.norm(ref.vector[LAYER]))
    shifts = []
    for gain in (0.1, 0.3, 1.0):
        when = pc.When("v", above=thr, mode="proportional", gain=gain, hysteresis=100.0)
        out = default_model.generate(
            ids, steer=pc.Steer(ref.vector, -4.0, layers=[LAYER], when=when), **kw
        )
        on = _switches(out)[0]
        strength = min(1.0, gain * excess)
        assert on.kind == "steer_on" and on.coef == pytest.approx(-4.0 * strength, rel=1e-3)
        p = out.prompt_len  # the first steered forward pass
        shift = float(out.scores["v"][p, 0] - s[p])
        assert shift == pytest.approx(-4.0 * strength * norm, rel=2e-3)
        shifts.append(-shift)
    assert shifts[0] < shifts[1] < shifts[2]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"min_on": -1}, "min_on must be an int >= 0"),
        ({"min_off": -3}, "min_off must be an int >= 0"),
        ({"mode": "pid"}, "unknown When mode 'pid'"),
        ({"gain": 0.5}, "mode='proportional'"),
        ({"mode": "proportional", "gain": 0.0}, "gain must be > 0"),
        ({"mode": 3}, "mode must be a str"),
        ({"min_on": 2.5}, "min_on"),
    ],
)
def test_bad_closed_loop_arguments(kwargs, match):
    with pytest.raises(pc.InvalidInputError, match=match):
        pc.When("v", above=1.0, **kwargs)


def test_when_needs_a_monitor_and_a_known_name(default_model, ref):
    ids = ref.prompt_ids[:5]
    cond = pc.Steer(ref.vector, 1.0, layers=[LAYER], when=pc.When("v", above=0.0))
    with pytest.raises(pc.InvalidInputError, match="monitor"):
        default_model.generate(ids, max_new_tokens=2, steer=cond)
    with pytest.raises(pc.InvalidInputError, match="'v'"):
        default_model.generate(
            ids, max_new_tokens=2, steer=cond, monitor=pc.Monitor({"w": ref.vector}, layers=[LAYER])
        )
    with pytest.raises(pc.InvalidInputError, match="layer 3"):
        default_model.generate(
            ids,
            max_new_tokens=2,
            monitor=pc.Monitor({"v": ref.vector}, layers=[LAYER]),
            steer=pc.Steer(ref.vector, 1.0, layers=[LAYER], when=pc.When("v", above=0.0, layer=3)),
        )
    with pytest.raises(pc.InvalidInputError, match="conditional"):
        default_model.logits(ids, steer=cond)


def test_objects_and_reprs(ref):
    s = pc.Steer(ref.vector, 2, layers=[3, 4], positions="response", name="x")
    assert s.coef == 2.0 and s.layers == [3, 4] and s.positions == "response" and s.name == "x"
    assert "Steer('x', coef=2.0" in repr(s)
    assert s.vector.shape == (31, 576) and not s.vector.flags.writeable
    c = pc.Cap(ref.vector[3], 3, min=-1)
    assert (c.min, c.max, c.layers) == (-1.0, None, [3]) and "Cap(" in repr(c)
    a = pc.Ablate(pc.PersonaVector(ref.vector, layer=7, name="snark"))
    assert a.name == "snark" and a.layers is None and "recommended(7)" in repr(a)
    w = pc.When.coerce(("v", ">", 1.5))
    assert (w.monitor, w.above, w.below, w.hysteresis) == ("v", 1.5, None, 0.0)
    assert "When('v', above=1.5" in repr(w)
    w = pc.When("v", above=1.0, min_on=8, mode="proportional", gain=0.3)
    assert (w.min_on, w.min_off, w.mode, w.gain) == (8, 0, "proportional", 0.3)
    assert "min_on=8, mode='proportional', gain=0.3" in repr(w)
    # The steer keeps its own copy: mutating the caller's array changes nothing.
    arr = ref.vector.copy()
    s2 = pc.Steer(arr, 1.0, layers=[3])
    arr[:] = 0
    assert np.abs(s2.vector).max() > 0


def test_persona_vector_arithmetic(ref):
    a = pc.PersonaVector(ref.vector, layer=10, name="a", metadata={"trait": "x"})
    b = pc.PersonaVector(np.ones_like(ref.vector))
    np.testing.assert_allclose((a + b).directions, ref.vector + 1)
    np.testing.assert_allclose((a - b).directions, ref.vector - 1)
    np.testing.assert_allclose((2 * a).directions, 2 * ref.vector)
    np.testing.assert_allclose((a * 0.5).directions, 0.5 * ref.vector)
    np.testing.assert_allclose((a / 4).directions, ref.vector / 4)
    np.testing.assert_allclose((-a).directions, -ref.vector)
    n = a.normalized()
    np.testing.assert_allclose(np.linalg.norm(n.directions[1:], axis=1), 1.0, rtol=1e-5)
    assert (n.layer, n.name, n.metadata) == (10, "a", {"trait": "x"})
    assert a.directions.dtype == np.float32 and a.shape == (31, 576) and a.num_layers == 30
    assert a == pc.PersonaVector(ref.vector, layer=10) and a != b
    with pytest.raises(pc.InvalidInputError):
        a + pc.PersonaVector(np.ones((31, 8)))
    with pytest.raises(pc.InvalidInputError):
        a * float("nan")
    with pytest.raises(pc.InvalidInputError):
        pc.PersonaVector(np.ones(576))
    with pytest.raises(pc.InvalidInputError):
        pc.PersonaVector(ref.vector, layer=31)
