"""Calibrated alerts (personacore.vectors.calibration): thresholds from held-out statistics, the
rates they give, the early-warning logistic fit, and Monitor(thresholds="auto")."""

from __future__ import annotations

import numpy as np
import pytest

import personacore as pc
from personacore.vectors.calibration import (
    CalibrationMissingError,
    alert_layer,
    auto_threshold,
    calibration,
    fit_early_warning,
)

LAYERS, HIDDEN, LAYER = 4, 8, 2


def _stats(pos: np.ndarray, neg: np.ndarray) -> dict:
    stats = {k: [0.0] * (LAYERS + 1) for k in ("auroc", "cohens_d")}
    for k, arr in (("pos", pos), ("neg", neg)):  # scores grow with depth, as real ones do
        stats[f"{k}_mean"] = [float(arr.mean()) * (1 + i) for i in range(LAYERS + 1)]
        stats[f"{k}_std"] = [float(arr.std(ddof=1)) * (1 + i) for i in range(LAYERS + 1)]
    return stats


def _vector(heldout: bool = True, tokens: bool = True, seed: int = 0) -> pc.PersonaVector:
    """A vector with pc.extract's metadata layout, its statistics computed from sampled numbers."""
    rng = np.random.default_rng(seed)
    pos_reply, neg_reply = rng.normal(6.0, 2.0, 30), rng.normal(1.0, 1.5, 30)
    pos_max, neg_max = pos_reply + rng.uniform(5, 20, 30), neg_reply + rng.uniform(5, 20, 30)
    pos_last, neg_last = rng.normal(4.0, 2.0, 30), rng.normal(0.0, 2.0, 30)
    meta = {"stats": _stats(pos_reply, neg_reply)}
    if tokens:
        meta["token_max_stats"] = _stats(pos_max, neg_max)
    if heldout:
        meta["heldout"] = {
            "layer": LAYER,
            "labels": [1] * 30 + [0] * 30,
            "reply": list(np.r_[pos_reply, neg_reply]),
            "reply_max": list(np.r_[pos_max, neg_max]),
            "prompt_last": {str(LAYER + 1): list(np.r_[pos_last, neg_last])},
        }
        meta["early_warning"] = fit_early_warning(
            {
                "layer": LAYER + 1,
                "labels": meta["heldout"]["labels"],
                "prompt_last": meta["heldout"]["prompt_last"][str(LAYER + 1)],
            }
        )
    dirs = rng.normal(size=(LAYERS + 1, HIDDEN))
    return pc.PersonaVector(dirs, layer=LAYER, name="t", metadata=meta)


def test_threshold_rules_against_the_normal_quantile():
    scipy_stats = pytest.importorskip("scipy.stats")
    vec = _vector()
    st, tok = vec.metadata["stats"], vec.metadata["token_max_stats"]
    want = scipy_stats.norm(tok["neg_mean"][LAYER], tok["neg_std"][LAYER]).ppf(0.95)
    assert auto_threshold(vec) == pytest.approx(want, rel=1e-9)  # the default: token_fpr
    want = scipy_stats.norm(st["neg_mean"][LAYER], st["neg_std"][LAYER]).ppf(0.95)
    assert auto_threshold(vec, "neg_fpr") == pytest.approx(want, rel=1e-9)
    assert auto_threshold(vec, "midpoint") == pytest.approx(
        (st["pos_mean"][LAYER] + st["neg_mean"][LAYER]) / 2
    )
    with pytest.raises(pc.InvalidInputError, match="unknown threshold rule"):
        auto_threshold(vec, "median")
    # a vector saved before token statistics existed falls back to neg_fpr, visibly
    old = _vector(tokens=False)
    assert auto_threshold(old) == auto_threshold(old, "neg_fpr")
    assert old.calibration.rule == "neg_fpr"


def test_calibration_rates_count_the_heldout_rollouts():
    vec = _vector()
    cal = vec.calibration
    held = vec.metadata["heldout"]
    labels = np.array(held["labels"])
    reply, top = np.array(held["reply"]), np.array(held["reply_max"])
    assert cal.rates_from == "held-out rollouts" and cal.layer == LAYER and cal.rule == "token_fpr"
    assert cal.false_alarm_rate == pytest.approx(np.mean(top[labels == 0] > cal.threshold))
    assert cal.detection_rate == pytest.approx(np.mean(top[labels == 1] > cal.threshold))
    assert cal.reply_mean_false_alarm_rate == pytest.approx(
        np.mean(reply[labels == 0] > cal.threshold)
    )
    assert cal.reply_mean_detection_rate == pytest.approx(
        np.mean(reply[labels == 1] > cal.threshold)
    )
    assert (cal.n_pos, cal.n_neg) == (30, 30)
    assert cal.to_dict()["threshold"] == cal.threshold
    assert cal.early_warning_layer == LAYER + 1


def test_calibration_without_heldout_uses_normal_fits():
    scipy_stats = pytest.importorskip("scipy.stats")
    vec = _vector(heldout=False, tokens=False)
    cal = calibration(vec, "midpoint")
    st = vec.metadata["stats"]
    assert cal.rates_from == "normal fit of reply means"
    want_fa = scipy_stats.norm(st["neg_mean"][LAYER], st["neg_std"][LAYER]).sf(cal.threshold)
    want_det = scipy_stats.norm(st["pos_mean"][LAYER], st["pos_std"][LAYER]).sf(cal.threshold)
    assert cal.false_alarm_rate == pytest.approx(want_fa, rel=1e-9)
    assert cal.detection_rate == pytest.approx(want_det, rel=1e-9)
    # an older vector has no early-warning fit: a clear error, not a made-up probability
    with pytest.raises(CalibrationMissingError, match="extract it again"):
        cal.probability(1.0)


def test_early_warning_fit_matches_sklearn():
    from sklearn.linear_model import LogisticRegression

    held = _vector().metadata["heldout"]
    s = np.asarray(held["prompt_last"][str(LAYER + 1)])
    fit = fit_early_warning({"layer": 3, "labels": held["labels"], "prompt_last": s})
    assert fit["layer"] == 3
    y = np.asarray(held["labels"])
    z = (s - s.mean()) / s.std()
    ref = LogisticRegression(C=1.0, tol=1e-12, max_iter=10_000).fit(z[:, None], y)
    p_ref = ref.predict_proba(z[:, None])[:, 1]
    ours = 1 / (1 + np.exp(-(fit["coef"] * s + fit["intercept"])))
    np.testing.assert_allclose(ours, p_ref, atol=1e-6)
    cal = _vector().calibration
    np.testing.assert_allclose(cal.probability(s), p_ref, atol=1e-6)
    assert cal.probability(-20.0) < 0.05 < 0.95 < cal.probability(20.0)


def test_missing_statistics_are_clear_errors():
    bare = pc.PersonaVector(np.ones((LAYERS + 1, HIDDEN)), layer=LAYER, name="bare")
    with pytest.raises(CalibrationMissingError, match="held-out statistics"):
        _ = bare.calibration
    with pytest.raises(CalibrationMissingError, match="raw array"):
        pc.Monitor({"raw": np.ones(HIDDEN)}, layers=[1], thresholds="auto")
    with pytest.raises(CalibrationMissingError, match="held-out statistics"):
        pc.Monitor({"bare": bare}, thresholds="auto")
    assert issubclass(CalibrationMissingError, pc.InvalidInputError)


def test_monitor_auto_thresholds():
    vec = _vector()
    assert pc.Monitor({"t": vec}, thresholds="auto").thresholds == {"t": auto_threshold(vec)}
    mixed = pc.Monitor({"t": vec, "u": vec}, thresholds={"t": "auto", "u": 3.0})
    assert mixed.thresholds == {"t": auto_threshold(vec), "u": 3.0}
    assert mixed.calibration["t"].threshold == auto_threshold(vec)
    # one explicit layer: calibrated there; several: at the recommended layer
    one = pc.Monitor({"t": vec}, layers=[LAYER + 1], thresholds="auto")
    assert one.thresholds["t"] == auto_threshold(vec, layer=LAYER + 1) != auto_threshold(vec)
    assert one.calibration["t"].layer == LAYER + 1
    assert one.calibration["t"].rates_from == "normal fits of the statistics"
    two = pc.Monitor({"t": vec}, layers=[1, LAYER + 1], thresholds="auto")
    assert two.thresholds["t"] == auto_threshold(vec)


def test_serve_uses_the_same_threshold():
    pytest.importorskip("fastapi")
    from personacore.serve import auto_threshold as served

    vec = _vector()
    assert served(vec) == auto_threshold(vec)
    assert served(pc.PersonaVector(np.ones((LAYERS + 1, HIDDEN)), layer=LAYER)) is None


def test_early_warning_probability_of_a_generation(default_model):
    vec = pc.PersonaVector.load("impolite", model=default_model)
    warn = vec.calibration.early_warning_layer
    monitor = pc.Monitor({"impolite": vec}, layers=[vec.layer, warn], thresholds="auto")
    gen = default_model.generate("Hello!", max_new_tokens=2, monitor=monitor)
    (p,) = monitor.early_warning_probability(gen).values()
    ew = vec.metadata["early_warning"]
    s = float(gen.early_warning["impolite"][gen.score_layers["impolite"].index(warn)])
    assert p == pytest.approx(1 / (1 + np.exp(-(ew["coef"] * s + ew["intercept"]))))
    other = pc.Monitor({"impolite": vec}, layers=[i for i in (1, 2, 3) if i != warn])
    gen = default_model.generate("Hello!", max_new_tokens=1, monitor=other)
    with pytest.raises(CalibrationMissingError, match=f"layer {warn}"):
        other.early_warning_probability(gen)


def test_alert_layer_is_where_token_maxima_separate_best():
    vec = _vector()
    vec.metadata["token_max_stats"]["auroc"] = [
        0.9,
        0.6,
        0.7,
        0.8,
        0.95,
    ]  # rows 0 and 4 not steerable
    assert alert_layer(vec) == 3 == vec.calibration.alert_layer
    assert alert_layer(_vector(tokens=False)) == LAYER  # older vectors: the recommended layer
