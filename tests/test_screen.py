"""Data screening (issue 14): pc.screen, its samples, results, files, and the resumable CLI."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import personacore as pc
from personacore.cli import main
from personacore.screen import BadSample, SampleError, iter_samples, ranking

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))
from screen_quality import SMALL_EXTRACTION, pair_samples, separation  # noqa: E402

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


@pytest.fixture(scope="session")
def default_model(device_model):
    """This module's tests run on every device of conftest's ``device`` (CUDA with a GPU only)."""
    return device_model


@pytest.fixture(scope="session")
def impolite(default_model, request):
    """The small impolite extraction of benches/screen_quality.py, cached in the pytest cache."""
    key = json.dumps({"model": os.path.getsize(pc.default_model_path()), **SMALL_EXTRACTION})
    cache = Path(request.config.cache.mkdir("personacore-screen"))
    path = cache / f"impolite-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
    if not path.exists():
        vec = pc.extract(default_model, "impolite", progress=False, **SMALL_EXTRACTION)
        vec.save(str(path))
    return pc.PersonaVector.load(str(path))


@pytest.fixture(scope="session")
def vector_file(impolite, tmp_path_factory):
    path = tmp_path_factory.mktemp("vec") / "impolite.safetensors"
    impolite.save(str(path))
    return str(path)


def _unit(vec, layer):
    row = vec.directions[layer].astype(np.float64)
    return row / np.linalg.norm(row)


def _mean_proj(model, prompt_ids, response_ids, unit, layer):
    """Independent reference: numpy over model.hidden_states, mean of the response rows · v̂."""
    hs = model.hidden_states(list(prompt_ids) + list(response_ids))
    return float(hs[layer, len(prompt_ids) :].astype(np.float64).mean(0) @ unit)


# ---- it works ----------------------------------------------------------------------------------
def test_delta_ranks_rude_above_polite(default_model, impolite):
    samples = pair_samples()
    res = pc.screen(default_model, impolite, samples, method="delta", max_new_tokens=24)
    assert res.names == ["impolite"] and res.layers == {"impolite": impolite.layer}
    assert len(res) == len(samples) and res.max_new_tokens == 24
    assert res.ids == [s["id"] for s in samples] and list(res.indices) == list(range(len(samples)))
    acc, auc = separation(res.scores["impolite"])
    assert acc >= 0.9 and auc >= 0.8, (acc, auc)
    # the two samples of a prompt share one baseline y'
    assert res.baselines[0::2] == res.baselines[1::2]
    np.testing.assert_array_equal(
        res.baseline_proj["impolite"][0::2], res.baseline_proj["impolite"][1::2]
    )


def test_delta_equals_numpy_on_hidden_states(default_model, impolite):
    layer = 12
    unit = _unit(impolite, layer)
    samples = pair_samples()[:2]
    res = pc.screen(default_model, {"v": impolite}, samples, layer=layer, max_new_tokens=12)
    tok = default_model.tokenizer
    for k, s in enumerate(samples):
        p_ids = default_model.encode_chat([{"role": "user", "content": s["prompt"]}])
        r_ids = tok.encode(s["response"])
        gen = default_model.generate([p_ids], max_new_tokens=12, temperature=0.0)[0]
        base = [t for t in gen.token_ids]
        if base and base[-1] in tok.eos_token_ids:
            base.pop()
        assert res.baselines[k] == tok.decode(base)
        resp = _mean_proj(default_model, p_ids, r_ids, unit, layer)
        basep = _mean_proj(default_model, p_ids, base, unit, layer)
        last = float(default_model.hidden_states(p_ids)[layer, -1].astype(np.float64) @ unit)
        got = res.response_proj["v"][k], res.baseline_proj["v"][k], res.prompt_last_proj["v"][k]
        np.testing.assert_allclose(got, [resp, basep, last], rtol=2e-4, atol=2e-3)
        np.testing.assert_allclose(res.scores["v"][k], resp - basep, rtol=2e-4, atol=4e-3)


def test_methods_fields_and_several_vectors(default_model, impolite):
    rng = np.random.default_rng(0)
    other = pc.PersonaVector(rng.standard_normal(impolite.shape), layer=5, name="rand")
    samples = pair_samples()[:4]
    both = pc.screen(default_model, {"imp": impolite, "rand": other}, samples, method="prompt_last")
    assert both.layers == {"imp": impolite.layer, "rand": 5} and both.baselines is None
    for name in ("imp", "rand"):
        np.testing.assert_allclose(
            both.scores[name], both.response_proj[name] - both.prompt_last_proj[name], rtol=1e-6
        )
    alone = pc.screen(default_model, other, samples, method="response", batch_size=3)
    np.testing.assert_allclose(alone.scores["rand"], both.response_proj["rand"], rtol=1e-5)
    row = next(both.rows())
    assert set(row) == {"index", "id", "scores", "response_proj", "prompt_last_proj"}
    assert set(row["scores"]) == {"imp", "rand"}


# ---- samples ------------------------------------------------------------------------------------
def test_sample_shapes_give_the_same_scores(default_model, impolite):
    chat = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name a colour."},
    ]
    answer = {"role": "assistant", "content": "Blue, obviously, you fool."}
    samples = [
        {"messages": chat + [answer]},
        chat + [answer],
        {"prompt": chat, "response": answer["content"]},
        {"prompt": "Name a colour.", "response": "Blue."},
        {"prompt": [{"role": "user", "content": "Name a colour."}], "response": "Blue."},
    ]
    res = pc.screen(default_model, impolite, samples, method="response")
    s = res.scores[impolite.name]
    assert s[0] == s[1] == s[2] and s[3] == s[4] and s[0] != s[3]


def test_bad_samples_are_reported_with_their_line(default_model, impolite, tmp_path):
    good = {"prompt": "Hi", "response": "Hello there."}
    lines = [
        json.dumps(good),
        "{not json",
        "",
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
        json.dumps({"prompt": "Hi", "response": "   "}),
        json.dumps({"prompt": "word " * 9000, "response": "ok"}),
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"},
                ]
            }
        ),
        json.dumps({"id": 7, **good}),
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SampleError, match=r"line 2 \(sample 1\): bad JSON") as e:
        pc.screen(default_model, impolite, str(path), method="response")
    assert isinstance(e.value, pc.InvalidInputError) and e.value.bad.line == 2
    with pytest.warns(UserWarning, match="skipped 5 malformed"):
        res = pc.screen(default_model, impolite, str(path), method="response", on_error="skip")
    assert list(res.indices) == [0, 6] and res.ids == [None, 7]
    got = {(b.line, b.index): b.reason for b in res.errors}
    assert list(got) == [(2, 1), (4, 2), (5, 3), (6, 4), (7, 5)]
    assert "no assistant turn" in got[(4, 2)] and got[(5, 3)] == "empty response"
    assert "longer than the context (8192)" in got[(6, 4)]
    assert "must end with the assistant" in got[(7, 5)]
    assert [type(x) for x in iter_samples(str(path), start=6)] == [pc.screen.__globals__["Sample"]]


def test_bad_arguments_are_typed_errors(default_model, impolite):
    s = pair_samples()[:1]
    cases = [
        (dict(method="mean"), "unknown method"),
        (dict(batch_size=0), "batch_size"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(on_error="ignore"), "on_error"),
        (dict(layer=99), "layer 99"),
    ]
    for kwargs, match in cases:
        with pytest.raises(pc.InvalidInputError, match=match):
            pc.screen(default_model, impolite, s, **kwargs)
    with pytest.raises(pc.InvalidInputError, match="shape"):
        pc.screen(default_model, pc.PersonaVector(np.ones((3, 4)), layer=1), s)
    zero = pc.PersonaVector(np.zeros(impolite.shape), layer=3)
    with pytest.raises(pc.InvalidInputError, match="zero at layer 3"):
        pc.screen(default_model, {"z": zero}, s)
    with pytest.raises(pc.InvalidInputError, match="unknown sample file type"):
        pc.screen(default_model, impolite, "data.csv")
    with pytest.raises(pc.PersonacoreIOError):
        pc.screen(default_model, impolite, "missing.jsonl")
    with pytest.raises(pc.InvalidInputError, match="empty"):
        pc.screen(default_model, impolite, [])


# ---- results ------------------------------------------------------------------------------------
def test_ranking_and_filters(default_model, impolite):
    res = pc.screen(default_model, {"a": impolite}, pair_samples()[:6], method="response")
    res.scores["a"][:] = [3.0, np.nan, 5.0, 1.0, 5.0, 2.0]
    assert list(ranking(res.scores["a"])) == [2, 4, 0, 5, 3, 1]
    assert list(res.top(2).indices) == [2, 4] and len(res.top(0)) == 0
    assert list(res.keep_below(3.0).indices) == [1, 3, 5]  # NaN is never dropped
    assert list(res.drop_top(0.5).indices) == [1, 3, 5]  # round(0.5 * 6) = 3 dropped
    with pytest.raises(pc.InvalidInputError, match="fraction"):
        res.drop_top(1.5)
    with pytest.raises(pc.InvalidInputError, match="no vector named"):
        res.top(1, vector="b")
    row = list(res.rows())[1]
    assert row["scores"] == {"a": None}
    df = res.to_pandas()
    assert list(df["index"]) == list(range(6)) and "scores.a" in df.columns


def test_parquet_in_and_out(default_model, impolite, tmp_path):
    samples = pair_samples()[:4]
    pq.write_table(pa.Table.from_pylist(samples), tmp_path / "in.parquet")
    a = pc.screen(default_model, impolite, samples, method="prompt_last")
    b = pc.screen(default_model, impolite, str(tmp_path / "in.parquet"), method="prompt_last")
    np.testing.assert_array_equal(a.scores[impolite.name], b.scores[impolite.name])
    a.to_parquet(tmp_path / "out.parquet")
    a.to_jsonl(tmp_path / "out.jsonl")
    from_parquet = pq.read_table(tmp_path / "out.parquet").to_pylist()
    from_jsonl = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in from_parquet] == [r["id"] for r in from_jsonl] == a.ids
    for p, j in zip(from_parquet, from_jsonl):
        assert np.float32(p["scores"][impolite.name]) == np.float32(j["scores"][impolite.name])


# ---- CLI ----------------------------------------------------------------------------------------
def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_cli_screens_and_filters(vector_file, impolite, default_model, tmp_path, capsys):
    samples = pair_samples()[:8]
    _write_jsonl(tmp_path / "in.jsonl", samples)
    args = ["screen", "--vector", f"imp={vector_file}", "--input", str(tmp_path / "in.jsonl")]
    args += ["--method", "delta", "--max-new-tokens", "8", "--batch-size", "3", "--quiet"]
    args += ["--device", default_model.device]
    assert main([*args, "--out", str(tmp_path / "s.jsonl"), "--drop-top", "25%"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(8)) and rows[0]["id"] == "0-rude"
    assert set(rows[0]) == {"index", "id", "scores", "response_proj", "baseline_proj"} | {
        "prompt_last_proj",
        "baseline",
    }
    ref = pc.screen(default_model, {"imp": impolite}, samples, max_new_tokens=8)
    np.testing.assert_allclose([r["scores"]["imp"] for r in rows], ref.scores["imp"], rtol=1e-5)
    kept = [json.loads(x) for x in (tmp_path / "s.filtered.jsonl").read_text().splitlines()]
    dropped = set(ref.top(2).ids)
    assert kept == [s for s in samples if s["id"] not in dropped]
    assert not (tmp_path / "s.jsonl.partial").exists()
    args[args.index("delta")] = "prompt_last"
    assert main([*args, "--out", str(tmp_path / "s.parquet")]) == 0
    table = pq.read_table(tmp_path / "s.parquet").to_pylist()
    assert "baseline" not in table[0] and [r["index"] for r in table] == list(range(8))
    np.testing.assert_allclose(
        [r["response_proj"]["imp"] for r in table], ref.response_proj["imp"], rtol=1e-5
    )
    assert main([*args, "--out", str(tmp_path / "s.parquet"), "--resume"]) == 0
    assert "already complete" in capsys.readouterr().err


def _cli(vector_file, src, out, *extra):
    return [sys.executable, "-m", "personacore", "screen", "--vector", vector_file, "--input",
            str(src), "--out", str(out), "--method", "response", "--batch-size", "4", "--quiet",
            *extra]  # fmt: skip


@pytest.mark.parametrize("suffix,kills", [(".jsonl", 3), (".parquet", 1)])
def test_resume_after_sigkill_equals_an_uninterrupted_run(vector_file, tmp_path, suffix, kills):
    samples = pair_samples() * 2  # 48 samples, 12 batches
    samples[5] = {"prompt": "no response here"}  # a malformed record stays skipped across resumes
    src = tmp_path / "in.jsonl"
    _write_jsonl(src, [{**s, "n": k} for k, s in enumerate(samples)])
    ref = tmp_path / f"ref{suffix}"
    t0 = time.perf_counter()
    subprocess.run(_cli(vector_file, src, ref), check=True, stderr=subprocess.DEVNULL)
    full = time.perf_counter() - t0
    out, partial = tmp_path / f"out{suffix}", tmp_path / f"out{suffix}.partial"
    rng = random.Random(14)
    killed = 0
    for attempt in range(kills):
        if out.exists() and not partial.exists():
            break  # finished before its kill
        extra = ["--resume"] if attempt else []
        proc = subprocess.Popen(_cli(vector_file, src, out, *extra), stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2, full))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed += 1
        proc.wait()
    if suffix == ".jsonl" and partial.exists():
        with open(out, "ab") as f:  # a torn line after whatever was committed
            f.write(b'{"index": 999, "scores": {"impol')
    subprocess.run(_cli(vector_file, src, out, "--resume"), check=True, stderr=subprocess.DEVNULL)
    assert killed >= 1 and not partial.exists()
    if suffix == ".jsonl":
        assert out.read_bytes() == ref.read_bytes()
    else:
        assert pq.read_table(out).to_pylist() == pq.read_table(ref).to_pylist()


@pytest.mark.parametrize("suffix,kills", [(".jsonl", 5), (".parquet", 3)])
def test_random_sigkills_then_resume_equal_an_uninterrupted_run_tiny_model(tmp_path, suffix, kills):
    """The CI-sized run of scripts/screen_kill_test.py (20 kills per format, recorded in
    README.md): SIGKILLs at random moments (fixed seed), each followed by --resume; the final
    output equals an uninterrupted run's, every sample exactly once."""
    from screen_kills import kill_and_resume

    report = kill_and_resume(tmp_path, suffix, kills=kills, seed=19, n_samples=240)
    assert report.kills == kills and report.kills_after_first_commit >= 1, report
    assert report.equal_to_reference and report.indices_exactly_once, report


def test_resume_refuses_other_settings_and_fresh_runs_refuse_to_clobber(vector_file, tmp_path):
    src = tmp_path / "in.jsonl"
    _write_jsonl(src, pair_samples() * 2)
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(_cli(vector_file, src, out), stderr=subprocess.DEVNULL)
    state = Path(str(out) + ".partial") / "state.json"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text() or "{}").get("rows"):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state.exists()
    base = ["screen", "--vector", vector_file, "--input", str(src), "--out", str(out), "--quiet"]
    assert main([*base, "--method", "response", "--batch-size", "4"]) == 1  # no --resume
    assert main([*base, "--method", "response", "--batch-size", "8", "--resume"]) == 1
    assert main([*base, "--method", "response", "--batch-size", "4", "--resume"]) == 0
    assert len(out.read_text().splitlines()) == 2 * len(pair_samples())


def test_kill_around_the_first_commit_resumes_from_the_start(tmp_path):
    """The two windows of a fresh run before its first batch: killed after OUT.partial/state.json
    was written but before OUT exists, --resume starts from row 0; OUT never exists without a
    state, so --resume cannot take an empty OUT for a finished run."""
    from personacore.screen.output import CheckpointWriter

    out = tmp_path / "out.jsonl"
    settings = {"method": "response"}
    w = CheckpointWriter(out, ["v"], "response", settings)
    state = Path(str(out) + ".partial") / "state.json"
    assert state.exists() and out.exists()
    w.close()
    out.unlink()  # as if killed after the state commit, before the output was created
    again = CheckpointWriter(out, ["v"], "response", settings, resume=True)
    assert not again.complete and again.start == 0 and again.rows == 0 and out.exists()
    again.close()


class _Killed(BaseException):
    """Stands for a SIGKILL inside the process (nothing after it runs)."""


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_a_kill_while_a_finished_run_removes_its_folder_resumes_to_the_same_output(
    vector_file, tmp_path, monkeypatch, suffix
):
    """The run removes OUT.partial/state.json before the rest of the folder. Killed part-way
    through removing the folder (one file gone, then nothing), the output is finished: --resume
    says so, keeps it byte for byte and clears the folder. (Removed in one sweep, the first file
    could be a Parquet part while the state stayed, and the resume failed merging the parts.)"""
    from personacore.screen import output

    src = tmp_path / "in.jsonl"
    _write_jsonl(src, pair_samples())
    base = ["screen", "--vector", vector_file, "--input", str(src), "--method", "response",
            "--batch-size", "4", "--quiet"]  # fmt: skip
    assert main([*base, "--out", str(tmp_path / f"ref{suffix}")]) == 0
    out, partial = tmp_path / f"out{suffix}", tmp_path / f"out{suffix}.partial"

    def dies_part_way(path):
        for first in sorted(Path(path).iterdir())[:1]:  # part-000000.parquet before state.json
            first.unlink()
        raise _Killed

    monkeypatch.setattr(
        output, "shutil", type("Shutil", (), {"rmtree": staticmethod(dies_part_way)})
    )
    with pytest.raises(_Killed):
        main([*base, "--out", str(out)])
    monkeypatch.undo()
    assert partial.exists() and out.exists()
    assert main([*base, "--out", str(out), "--resume"]) == 0
    assert not partial.exists()
    assert out.read_bytes() == (tmp_path / f"ref{suffix}").read_bytes()


def test_bad_sample_type_is_a_bad_sample():
    (bad,) = list(iter_samples([{"prompt": "p", "response": 3}]))
    assert isinstance(bad, BadSample) and "'response' must be a str" in bad.reason
