"""Extraction: fitting methods on synthetic data, filtering, and the pipeline on the default model."""

import numpy as np
import pytest

import personacore as pc
from personacore.extract import evaluate, fit, rollouts


def _synthetic(n=40, layers=4, hidden=16, seed=0):
    rng = np.random.default_rng(seed)
    true = rng.normal(size=(layers, hidden)).astype(np.float32)
    labels = np.r_[np.ones(n), np.zeros(n)].astype(np.int64)
    acts = rng.normal(size=(2 * n, layers, hidden)).astype(np.float32)
    acts[labels == 1] += true
    pairs = {(0, str(i), 0): {1: i, 0: n + i} for i in range(n)}
    return acts, labels, pairs, true


def _cos(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("method", fit.METHODS)
def test_methods_recover_the_planted_direction(method):
    acts, labels, pairs, true = _synthetic()
    dirs, info = fit.fit_directions(method, acts, labels, pairs)
    assert dirs.shape == true.shape and dirs.dtype == np.float32
    for layer in range(true.shape[0]):
        assert _cos(dirs[layer], true[layer]) > 0.8, (method, layer)
    if method == "mean_diff":
        np.testing.assert_allclose(
            dirs, acts[labels == 1].mean(0) - acts[labels == 0].mean(0), rtol=1e-5
        )
    if method == "logreg":
        assert all(a > 0.8 for a in info["cv_accuracy"])
    if method == "pca":
        assert len(info["explained_variance"]) == true.shape[0]


def test_separation_statistics():
    acts, labels, _, true = _synthetic()
    st = evaluate.separation(acts, labels, true)
    assert all(a > 0.95 for a in st["auroc"]) and all(d > 2 for d in st["cohens_d"])
    flipped = evaluate.separation(acts, labels, -true)
    assert all(a < 0.05 for a in flipped["auroc"])
    proj = acts[labels == 1, 0] @ (true[0] / np.linalg.norm(true[0]))
    assert st["pos_mean"][0] == pytest.approx(float(proj.mean()), rel=1e-5)


def test_filter_keeps_trait_positive_and_trait_free_negative_coherent_rollouts():
    def r(label, t, c):
        return rollouts.Rollout(label, 0, "q", 0, "a", [1], [2], t, c)

    keep = [
        rollouts._keep(x, 50, 50)
        for x in (
            r(1, 80, 90),
            r(1, 20, 90),
            r(0, 20, 90),
            r(0, 80, 90),
            r(1, 80, 10),
            r(1, None, 90),
        )
    ]
    assert keep == [True, False, True, False, False, False]


def test_bad_arguments_are_rejected_before_any_rollout(default_model):
    with pytest.raises(pc.InvalidInputError, match="unknown method"):
        pc.extract(default_model, "impolite", method="svm")
    with pytest.raises(pc.InvalidInputError, match="unknown pooling"):
        pc.extract(default_model, "impolite", pooling="mean")
    with pytest.raises(pc.InvalidInputError, match="n_per_question"):
        pc.extract(default_model, "impolite", n_per_question=0)
    one = {**pc.Trait.load("impolite").to_dict(), "eval_questions": []}
    one["questions"] = one["questions"][:1]
    with pytest.raises(pc.TraitError, match="held-out split needs at least 2"):
        pc.extract(default_model, pc.Trait.from_dict(one, name="x"))
    with pytest.raises(pc.TraitError):
        pc.extract(default_model, "no-such-trait")


def test_trait_without_held_out_questions_extracts_on_a_split(default_model):
    """persona_vectors' extraction file alone: a warning, a held-out split, and a vector."""
    trait = pc.Trait.from_dict(
        {**pc.Trait.load("impolite").to_dict(), "eval_questions": []}, name="x"
    )
    rest, held = trait.held_out_split()
    with pytest.warns(
        UserWarning, match="'x' has no evaluation questions: holding out 5 of its 20"
    ):
        vec = pc.extract(
            default_model,
            trait,
            max_questions=2,
            max_instructions=1,
            max_eval_questions=2,
            max_new_tokens=6,
            progress=False,
        )
    settings = vec.metadata["settings"]
    assert settings["eval_split"] == 0.25
    assert settings["questions"] == 2 and settings["eval_questions"] == 2
    assert vec.metadata["counts"]["eval_pos"] == 2 and vec.metadata["counts"]["eval_neg"] == 2
    assert set(rest).isdisjoint(held)


class _ScriptedJudge(pc.Judge):
    """Scores by label-revealing text: the trait prompt gives 90 to every answer, coherence 90."""

    def score_prompt(self, prompt):
        return 90.0


@pytest.fixture(scope="module")
def impolite_small(default_model):
    """A small but real extraction: 2 instruction pairs x 6 questions, 10 held-out questions, greedy."""
    trait = pc.Trait.load("impolite")
    vec = pc.extract(
        default_model,
        trait,
        max_questions=6,
        max_instructions=2,
        max_eval_questions=10,
        max_new_tokens=24,
        temperature=0.0,
        progress=False,
    )
    return trait, vec


def test_small_extraction_separates_held_out_rollouts(impolite_small, default_model):
    trait, vec = impolite_small
    assert vec.shape == (default_model.num_layers + 1, default_model.hidden_size)
    assert 1 <= vec.layer < default_model.num_layers and vec.name == "impolite"
    md = vec.metadata
    assert md["method"] == "mean_diff" and md["pooling"] == "response_avg"
    assert md["counts"] == {
        "rollouts": 24,
        "kept_pos": 12,
        "kept_neg": 12,
        "eval_pos": 10,
        "eval_neg": 10,
    }
    auroc = md["stats"]["auroc"][vec.layer]
    assert auroc >= 0.75, f"held-out AUROC {auroc:.3f} at layer {vec.layer}"
    assert md["stats"]["pos_mean"][vec.layer] > md["stats"]["neg_mean"][vec.layer]


def test_steering_with_the_vector_moves_behaviour(impolite_small, default_model):
    trait, vec = impolite_small
    gaps = pc.ab_logit_gap(default_model, vec, trait.ab_items[:10], coefs=(-2.0, 0.0, 2.0))
    assert gaps[-2.0] < gaps[0.0] < gaps[2.0], gaps


def test_judge_filtering_drops_negative_rollouts_scored_as_trait(default_model):
    # every rollout scores 90 on the trait: positives are kept, negatives (trait >= 50) are all dropped
    with pytest.raises(pc.InvalidInputError, match="0 negative"):
        pc.extract(
            default_model,
            "impolite",
            max_questions=1,
            max_instructions=1,
            max_eval_questions=1,
            max_new_tokens=4,
            judge=_ScriptedJudge(),
            progress=False,
        )
