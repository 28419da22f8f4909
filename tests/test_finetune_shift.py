"""pc.finetune_shift (paper §4.2) on two tiny random models, against numpy on hidden_states."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import personacore as pc
import tiny_models as tm

QUESTIONS = [
    "what is your name ?",
    "are you kind ?",
    "hello world , you are a model .",
    "is the world evil ?",
    "i am not helpful !",
]


def _write_pair(root: Path, arch: str = "llama", **overrides):
    base_dir, tuned_dir = root / "base", root / "tuned"
    _, weights = tm.write_tiny_model(base_dir, arch, seed=0, **overrides)
    tm.write_tiny_model(tuned_dir, arch, seed=0, **overrides)
    rng = np.random.default_rng(7)
    tuned = {
        n: (w + 0.03 * rng.standard_normal(w.shape)).astype(np.float32) for n, w in weights.items()
    }
    tm.save_weights(tuned_dir, tuned)  # "fine-tuned": the same model with perturbed weights
    return base_dir, tuned_dir


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base_dir, tuned_dir = _write_pair(tmp_path_factory.mktemp("shift"))
    return pc.load_model(str(base_dir)), pc.load_model(str(tuned_dir))


def _vectors(model):
    rng = np.random.default_rng(3)
    shape = (model.num_layers + 1, model.hidden_size)
    a = rng.standard_normal(shape)
    a[0] = 0.0  # a zero row (as in imported control vectors): its projection is undefined
    return {
        "a": pc.PersonaVector(a, layer=2, name="a"),
        "b": pc.PersonaVector(rng.standard_normal(shape), layer=1, name="b"),
    }


def _reference(base, tuned, prompts, vector: np.ndarray) -> np.ndarray:
    """Independent numpy: last-token state of each full forward, mean, difference, projection."""

    def mean_last(model):
        rows = [model.hidden_states(model.encode_chat(p))[:, -1, :] for p in prompts]
        return np.mean(np.asarray(rows, dtype=np.float64), axis=0)

    diff = mean_last(tuned) - mean_last(base)
    out = np.full(vector.shape[0], np.nan)
    for layer, row in enumerate(vector.astype(np.float64)):
        if np.linalg.norm(row) > 0:
            out[layer] = diff[layer] @ (row / np.linalg.norm(row))
    return out


def test_shift_matches_numpy_on_hidden_states(models):
    base, tuned = models
    vecs = _vectors(base)
    res = pc.finetune_shift(base, tuned, vecs, QUESTIONS, batch_size=2)
    messages = [[{"role": "user", "content": q}] for q in QUESTIONS]
    assert res.n_prompts == len(QUESTIONS)
    assert res.mean_diff.shape == (base.num_layers + 1, base.hidden_size)
    for name, v in vecs.items():
        ref = _reference(base, tuned, messages, v.directions)
        assert res.shift[name].shape == (base.num_layers + 1,)
        np.testing.assert_allclose(res.shift[name], ref, atol=1e-5, rtol=1e-4)
        assert res.layers[name] == v.layer
        assert res.at_layer[name] == pytest.approx(ref[v.layer], abs=1e-5, rel=1e-4)
        assert np.abs(ref[1:]).max() > 1e-2  # the perturbation moved the states: not a 0 == 0 test
    assert np.isnan(res.shift["a"][0])
    # message prompts give the same numbers; so does a single vector (named by its name)
    again = pc.finetune_shift(base, tuned, vecs["b"], messages, layer=3)
    np.testing.assert_allclose(again.shift["b"], res.shift["b"], atol=1e-6)
    assert again.layers == {"b": 3} and again.at_layer["b"] == pytest.approx(res.shift["b"][3])


def test_same_model_has_no_shift_and_vector_paths_load(models, tmp_path):
    base, _ = models
    v = _vectors(base)["b"]
    path = tmp_path / "b.safetensors"
    v.save(path)
    res = pc.finetune_shift(base, base, {"from_file": str(path)}, QUESTIONS[:2])
    np.testing.assert_array_equal(res.shift["from_file"], np.zeros(base.num_layers + 1))


def test_trait_prompts_are_its_eval_questions(models):
    base, tuned = models
    trait = pc.Trait.load("evil")
    vec = _vectors(base)["b"]
    by_trait = pc.finetune_shift(base, tuned, vec, trait)
    by_list = pc.finetune_shift(base, tuned, vec, trait.eval_questions)
    assert by_trait.n_prompts == len(trait.eval_questions) > 0
    np.testing.assert_array_equal(by_trait.shift["b"], by_list.shift["b"])


def test_architecture_mismatch_is_a_clear_error(models, tmp_path):
    base, _ = models
    vec = _vectors(base)["b"]
    for key, value in (("num_hidden_layers", 2), ("hidden_size", 32), ("vocab_size", 120)):
        d = tmp_path / key
        tm.write_tiny_model(d, "llama", seed=0, **{key: value})
        other = pc.load_model(str(d))
        with pytest.raises(pc.InvalidInputError, match="same architecture"):
            pc.finetune_shift(base, other, vec, QUESTIONS)


def test_invalid_inputs(models, tmp_path):
    base, tuned = models
    vec = _vectors(base)["b"]
    with pytest.raises(pc.InvalidInputError, match="shape"):
        pc.finetune_shift(base, tuned, pc.PersonaVector(np.ones((3, 64))), QUESTIONS)
    with pytest.raises(pc.InvalidInputError, match="empty"):
        pc.finetune_shift(base, tuned, vec, [])
    with pytest.raises(pc.InvalidInputError, match="vectors"):
        pc.finetune_shift(base, tuned, {}, QUESTIONS)
    with pytest.raises(pc.InvalidInputError, match="pc.Model"):
        pc.finetune_shift(base, "tuned", vec, QUESTIONS)
    # the same weights with another chat template: the prompts are different tokens
    d = tmp_path / "other_template"
    tm.write_tiny_model(d, "llama", seed=0)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "system: hello ." + tm.CHATML_TEMPLATE
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(pc.InvalidInputError, match="tokenized differently"):
        pc.finetune_shift(base, pc.load_model(str(d)), vec, QUESTIONS)
