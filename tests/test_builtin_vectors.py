"""The built-in vectors of the default model (personacore.vectors.builtin): what ships, how it
loads by name, that a vector refuses another model, and that a fresh extraction agrees with it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

import personacore as pc
from personacore.engine.defaults import DEFAULT_MODEL_NAME
from personacore.vectors.builtin import BUILTIN_VECTOR_DIR, builtin_vectors
from personacore.vectors.io import VectorNotFoundError
from tiny_models import write_tiny_model

ROOT = Path(__file__).resolve().parents[1]


def _build_settings() -> dict:
    spec = importlib.util.spec_from_file_location(
        "build_vectors", ROOT / "scripts/build_vectors.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("build_vectors", module)
    spec.loader.exec_module(module)
    return module.SETTINGS


def test_every_builtin_trait_ships():
    shipped = builtin_vectors()
    assert shipped == pc.traits()
    total = sum((BUILTIN_VECTOR_DIR / f"{n}.safetensors").stat().st_size for n in shipped)
    assert total < 150_000 * len(shipped)


@pytest.mark.parametrize("name", builtin_vectors())
def test_shipped_metadata_names_model_and_settings(name, default_model):
    vec = pc.PersonaVector.load(name)
    meta = vec.metadata
    assert vec.name == name and vec.shape == (31, 576)
    assert meta["model"] == DEFAULT_MODEL_NAME and meta["model_sha256"] == default_model.sha256
    assert meta["trait"] == name and meta["built_by"] == "scripts/build_vectors.py"
    assert meta["package_version"] == pc.__version__
    settings = {k: v for k, v in _build_settings().items() if k != "judge"}
    assert meta["extract_kwargs"] == settings
    assert meta["settings"]["seed"] == settings["seed"]
    assert meta["judge"] is None
    assert 1 <= vec.layer < 30 and meta["layer"] == vec.layer
    # calibration data made from the real held-out rollouts
    held = meta["heldout"]
    warn = meta["early_warning"]["layer"]
    assert held["layer"] == vec.layer and 1 <= warn < 30
    n = len(held["labels"])
    assert n == len(held["reply"]) == len(held["reply_max"]) == len(held["prompt_last"][str(warn)])
    labels = np.asarray(held["labels"])
    for key, stats in (("reply", "stats"), ("reply_max", "token_max_stats")):
        pos = np.asarray(held[key])[labels == 1]
        assert pos.mean() == pytest.approx(meta[stats]["pos_mean"][vec.layer])
    last = np.asarray(held["prompt_last"][str(warn)])
    assert last[labels == 0].mean() == pytest.approx(meta["prompt_last_stats"]["neg_mean"][warn])
    cal = vec.calibration
    assert cal.rates_from == "held-out rollouts" and cal.rule == "token_fpr"
    assert cal.early_warning_layer == warn


def test_unknown_name_lists_the_builtin_ones():
    with pytest.raises(VectorNotFoundError) as info:
        pc.PersonaVector.load("grumpy")
    msg = str(info.value)
    assert "'grumpy'" in msg and "impolite" in msg and "evil" in msg
    assert isinstance(info.value, pc.PersonacoreError)


def test_a_path_is_still_a_path(tmp_path):
    vec = pc.PersonaVector.load("impolite")
    vec.save(tmp_path / "mine.safetensors")
    assert pc.PersonaVector.load(str(tmp_path / "mine.safetensors")) == vec


def test_another_model_is_refused_naming_both(tmp_path):
    write_tiny_model(tmp_path / "tiny", "llama")
    tiny = pc.load_model(tmp_path / "tiny")
    with pytest.raises(pc.ModelMismatchError) as info:
        pc.PersonaVector.load("impolite", model=tiny)
    msg = str(info.value)
    assert DEFAULT_MODEL_NAME in msg and str(tmp_path / "tiny") in msg
    vec = pc.PersonaVector.load("impolite")
    with pytest.raises(pc.ModelMismatchError, match="SmolLM2"):
        tiny.generate("hi", max_new_tokens=1, monitor=pc.Monitor({"impolite": vec}))
    with pytest.raises(pc.ModelMismatchError, match="SmolLM2"):
        tiny.generate("hi", max_new_tokens=1, steer=pc.Steer(vec, 1.0))
    with pytest.raises(pc.ModelMismatchError):
        tiny.logits([1, 2, 3], steer=pc.Cap(vec, layers=[3], max=0.0))


def test_the_default_model_accepts_it(default_model):
    vec = pc.PersonaVector.load("impolite", model=default_model)
    gen = default_model.generate(
        "hi", max_new_tokens=1, monitor=pc.Monitor({"impolite": vec}), steer=pc.Steer(vec, 0.5)
    )
    assert gen.score_layers["impolite"] == [vec.layer]


def test_fresh_small_extraction_points_the_same_way(default_model):
    shipped = pc.PersonaVector.load("impolite", model=default_model)
    fresh = pc.extract(
        default_model,
        "impolite",
        max_questions=3,  # x 6 instruction pairs: 36 rollouts (the shipped one: 240)
        max_eval_questions=2,
        progress=False,
    )
    a = shipped[shipped.layer].astype(np.float64)
    b = fresh[shipped.layer].astype(np.float64)
    cosine = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    assert cosine >= 0.8, cosine
