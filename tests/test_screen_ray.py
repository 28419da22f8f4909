"""personacore.screen.ray: the Ray Data stage gives the local pc.screen scores, in input order.

One local Ray cluster (2 CPUs) for the module, a tiny random Llama, a dozen samples.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pq = pytest.importorskip("pyarrow.parquet")

import personacore as pc  # noqa: E402
import tiny_models as tm  # noqa: E402
from personacore.screen import screen  # noqa: E402
from personacore.screen.ray import screen_dataset, screen_files  # noqa: E402

MAX_NEW = 6

PROMPTS = [
    "what is your name ?",
    "are you kind ?",
    "hello world !",
    "is the model evil ?",
    "what are you ?",
    "i am not helpful .",
]
RESPONSES = [
    "i am the model .",
    "yes , i am kind !",
    "hello , you are evil .",
    "no . the model is not evil",
    "i am a helpful model",
    "you are helpful , yes !",
]


def _records():
    out = []
    for k, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        if k % 2:
            out.append({"id": f"s{k}", "prompt": p, "response": r})
        else:
            msgs = [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
            if k == 4:  # multi-turn: the last assistant turn is the response
                msgs = [
                    {"role": "system", "content": "you are kind ."},
                    {"role": "user", "content": "hello !"},
                    {"role": "assistant", "content": "hello world ."},
                ] + msgs
            out.append({"id": f"s{k}", "messages": msgs})
    return out


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray_screen")
    tm.write_tiny_model(root / "model", "llama", seed=0)
    model = pc.load_model(str(root / "model"))
    rng = np.random.default_rng(5)
    shape = (model.num_layers + 1, model.hidden_size)
    a = pc.PersonaVector(rng.standard_normal(shape), layer=2, name="a")
    b = pc.PersonaVector(rng.standard_normal(shape), layer=1, name="b")
    b.save(root / "b.safetensors")
    vectors = {"a": a, "b": str(root / "b.safetensors")}
    return root, model, vectors


def _assert_rows_match(rows, local, method):
    """Ray rows (input order) against the local ScreenResult rows, within float32 rounding."""
    expected = list(local.rows())
    assert [r["id"] for r in rows] == [e["id"] for e in expected]
    fields = ["scores", "response_proj", "prompt_last_proj"]
    fields += ["baseline_proj"] if method == "delta" else []
    for got, exp in zip(rows, expected):
        for f in fields:
            assert set(got[f]) == set(exp[f]) == {"a", "b"}
            for name, x in exp[f].items():
                y = got[f][name]
                if x is None:
                    assert y is None or math.isnan(y)
                else:
                    assert y == pytest.approx(x, rel=1e-5, abs=1e-5)
        if method == "delta":
            assert got["baseline"] == exp["baseline"]
        assert got["screen_error"] is None


@pytest.mark.parametrize("method", ["delta", "prompt_last"])
def test_ray_stage_equals_local_screen(cluster, setup, method):
    root, model, vectors = setup
    records = _records()
    local = screen(model, vectors, records, method=method, max_new_tokens=MAX_NEW, batch_size=4)
    assert np.abs(local.scores["a"]).max() > 0
    ds = ray.data.from_items(records, override_num_blocks=3)
    out = screen_dataset(
        ds,
        str(root / "model"),
        vectors,
        method,
        concurrency=2,
        batch_size=2,
        max_new_tokens=MAX_NEW,
    )
    rows = out.take_all()
    _assert_rows_match(rows, local, method)
    # the input columns are kept
    for row, rec in zip(rows, records):
        for key, value in rec.items():
            assert row[key] == value
    if method == "prompt_last":
        assert "baseline" not in rows[0] and "baseline_proj" not in rows[0]


def test_ray_files_jsonl_in_parquet_out_and_skipped_rows(cluster, setup, tmp_path):
    root, model, vectors = setup
    records = _records()
    bad = {"id": "bad", "messages": [{"role": "user", "content": "hello !"}]}  # no assistant turn
    src = tmp_path / "samples.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records[:3] + [bad] + records[3:]))
    dst = tmp_path / "scored.parquet"
    screen_files(
        src,
        dst,
        str(root / "model"),
        vectors,
        method="delta",
        concurrency=1,
        batch_size=3,
        max_new_tokens=MAX_NEW,
        on_error="skip",
    )
    files = sorted(dst.glob("*.parquet"))  # Ray names them in block order
    rows = [r for f in files for r in pq.read_table(f).to_pylist()]
    assert [r["id"] for r in rows] == ["s0", "s1", "s2", "bad", "s3", "s4", "s5"]
    skipped = rows.pop(3)
    assert "no assistant turn" in skipped["screen_error"]
    assert skipped["scores"] is None
    local = screen(model, vectors, records, method="delta", max_new_tokens=MAX_NEW, batch_size=4)
    _assert_rows_match(rows, local, "delta")

    with pytest.raises(Exception, match="id 'bad' cannot be screened: no assistant turn"):
        screen_dataset(
            ray.data.from_items([bad]), str(root / "model"), vectors, max_new_tokens=MAX_NEW
        ).take_all()


def test_invalid_arguments_fail_in_the_driver(cluster, setup):
    root, model, vectors = setup
    ds = ray.data.from_items(_records())
    with pytest.raises(pc.InvalidInputError, match="method"):
        screen_dataset(ds, str(root / "model"), vectors, method="mean")
    with pytest.raises(pc.InvalidInputError, match="concurrency"):
        screen_dataset(ds, str(root / "model"), vectors, concurrency=0)
    with pytest.raises(pc.InvalidInputError, match="path or name"):
        screen_dataset(ds, object(), vectors)
    with pytest.raises(pc.PersonacoreError):
        screen_dataset(ds, str(root / "model"), {"x": str(root / "missing.safetensors")})
