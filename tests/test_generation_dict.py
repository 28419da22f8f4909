"""Generation.to_dict / Generation.from_dict: a lossless round trip through JSON, and bad dicts."""

from __future__ import annotations

import json

import numpy as np
import pytest

import personacore as pc
from tiny_models import write_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    write_tiny_model(path, "llama", seed=0)
    return pc.load_model(str(path))


@pytest.fixture(scope="module")
def steered(tiny):
    """A generation with scores at two layers of two vectors, alert and steer events."""
    rng = np.random.default_rng(3)
    dirs = rng.standard_normal((tiny.num_layers + 1, tiny.hidden_size)).astype(np.float32)
    vec = pc.PersonaVector(dirs, layer=2, name="v")
    prompt = [0, 5, 9, 14, 20]
    probe = tiny.generate(
        prompt, max_new_tokens=16, ignore_eos=True, monitor=pc.Monitor({"v": vec})
    )
    thr = float(np.median(probe.reply_scores()["v"][:, 0]))
    return tiny.generate(
        prompt,
        max_new_tokens=16,
        ignore_eos=True,
        monitor=pc.Monitor({"v": vec, "w": -vec}, layers=[1, 2], thresholds=thr),
        steer=pc.Steer(vec, -4.0, when=pc.When("v", above=thr, layer=2)),
    )


def test_round_trip_through_json_is_lossless(steered):
    kinds = {e.kind for e in steered.events}
    assert {"alert", "steer_on"} <= kinds, kinds  # the fixture exercises events
    back = pc.Generation.from_dict(json.loads(json.dumps(steered.to_dict())))
    assert back.text == steered.text
    assert back.token_ids == steered.token_ids
    assert back.prompt_ids == steered.prompt_ids
    assert back.finish_reason == steered.finish_reason
    assert back.score_layers == steered.score_layers == {"v": [1, 2], "w": [1, 2]}
    assert back.events == steered.events
    assert back.sinks.dtype == bool and np.array_equal(back.sinks, steered.sinks)
    assert set(back.scores) == set(steered.scores)
    for name, scores in steered.scores.items():
        assert back.scores[name].dtype == np.float32
        assert np.array_equal(back.scores[name], scores)  # bit for bit
    assert back.early_warning["v"].tolist() == steered.early_warning["v"].tolist()
    assert steered.token_texts and back.token_texts == steered.token_texts
    assert back.thresholds == steered.thresholds and set(back.thresholds) == {"v", "w"}


def test_round_trip_of_an_unmonitored_generation(tiny):
    gen = tiny.generate([0, 5, 9], max_new_tokens=4, ignore_eos=True)
    back = pc.Generation.from_dict(json.loads(json.dumps(gen.to_dict())))
    assert back.token_ids == gen.token_ids and back.scores == {} and back.events == []


def test_empty_score_rows_keep_their_width():
    d = {"text": "", "token_ids": [], "prompt_ids": [], "scores": {"v": []}}
    d["score_layers"] = {"v": [3, 4]}
    assert pc.Generation.from_dict(d).scores["v"].shape == (0, 2)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.pop("token_ids"), "no 'token_ids'"),
        (lambda d: d.update(text=3), "'text' must be a str"),
        (lambda d: d.update(token_ids=["a"]), "token_ids[0]"),
        (lambda d: d.update(score_layers={"v": [1, 2]}), "names differ"),
        (lambda d: d["scores"].update(v=[[1.0, 2.0, 3.0]]), "must be [n_positions, 2]"),
        (lambda d: d.update(events=[{"kind": "boom", "sequence": 0}]), "event kind 'boom'"),
    ],
)
def test_bad_dicts_are_named(steered, change, message):
    d = steered.to_dict()
    change(d)
    with pytest.raises(pc.InvalidInputError) as err:
        pc.Generation.from_dict(d)
    assert message in str(err.value)
