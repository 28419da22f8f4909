"""``personacore evaluate`` (in-process through cli.main) on a tiny random model, with and without
a judge served over real HTTP."""

from __future__ import annotations

import json

import numpy as np
import pytest

import personacore as pc
import tiny_models as tm
from personacore.cli import main
from personacore.cli.eval_cmds import parse_number_list
from test_sweep import TRAIT


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_eval")
    tm.write_tiny_model(d / "model", "llama", seed=0)
    model = pc.load_model(str(d / "model"))
    rng = np.random.default_rng(5)
    vec = pc.PersonaVector(
        rng.standard_normal((model.num_layers + 1, model.hidden_size)), layer=2, name="tiny"
    )
    vec.save(d / "tiny.safetensors")
    (d / "tiny.json").write_text(json.dumps(TRAIT))
    return d, model, vec


def _args(d, *extra):
    return [
        "evaluate",
        "--model",
        str(d / "model"),
        "--vector",
        str(d / "tiny.safetensors"),
        "--trait",
        str(d / "tiny.json"),
        "--max-new-tokens",
        "4",
        "--quiet",
        *extra,
    ]


def test_evaluate_writes_rows_and_prints_a_table(files, capsys):
    d, model, vec = files
    out = d / "eval.json"
    assert main(_args(d, "--layers", "1,2", "--coefs=-2,0,2", "--out", str(out))) == 0
    printed = capsys.readouterr().out
    ev = pc.Evaluation.load(out)
    assert [(r["layer"], r["coef"]) for r in ev] == [
        (1, -2.0),
        (1, 0.0),
        (1, 2.0),
        (2, -2.0),
        (2, 0.0),
        (2, 2.0),
    ]
    lines = printed.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["layer", "coef"])
    assert len(lines[header + 1 : header + 7]) == 6 and f"wrote {out}" in printed
    for line, row in zip(lines[header + 1 :], ev):
        cells = line.split()
        assert int(cells[0]) == row["layer"] and float(cells[1]) == row["coef"]
        assert float(cells[5]) == pytest.approx(row["projection"], abs=1e-3)
    # the same numbers as the Python API
    api = pc.evaluate(
        model,
        vec,
        pc.Trait.from_dict(TRAIT),
        layers=[1, 2],
        coefs=[-2, 0, 2],
        max_new_tokens=4,
        progress=False,
    )
    assert [r["projection"] for r in api] == pytest.approx([r["projection"] for r in ev])


def test_evaluate_shows_a_progress_bar(files, capsys):
    d, _, _ = files
    args = [a for a in _args(d, "--coefs", "0,1", "--out", str(d / "bar.json")) if a != "--quiet"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "evaluate tiny" in err and f"{2 * len(TRAIT['eval_questions'])}/" in err


def test_evaluate_with_a_judge(files, capsys):
    from test_judges import FakeOpenAI, _completion

    pytest.importorskip("openai")
    d, _, _ = files
    server = FakeOpenAI(lambda n, body: (200, None, _completion([("60", 1.0)])))
    try:
        args = _args(d, "--coefs", "0,1", "--questions", "2", "--out", str(d / "judged.json"))
        args += ["--judge-url", server.base_url, "--judge-model", "m"]
        assert main(args) == 0
    finally:
        server.close()
    ev = pc.Evaluation.load(d / "judged.json")
    assert [r["trait_score"] for r in ev] == [60.0, 60.0]
    assert [r["coherence"] for r in ev] == [60.0, 60.0] and all(r["n"] == 2 for r in ev)
    assert {b["model"] for _, b in server.requests} == {"m"}
    assert len(server.requests) == 2 * 2 * 2  # 2 rows x 2 replies x (trait, coherence)
    assert "judge: OpenAIJudge(" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--layers", "", "--coefs", "0"], "--layers is empty"),
        (["--layers", "1,x", "--coefs", "0"], "'x' is not a number"),
        (["--layers", "99", "--coefs", "0"], "layer 99 is not steerable"),
        (["--coefs", "0,nan"], "coefs must be finite"),
    ],
)
def test_bad_arguments_exit_1_with_the_error(files, capsys, extra, message):
    d, _, _ = files
    assert main(_args(d, *extra, "--out", str(d / "bad.json"))) == 1
    err = capsys.readouterr().err
    assert "InvalidInputError" in err and message in err
    assert not (d / "bad.json").exists()


def test_vector_layer_option(files, capsys):
    d, model, vec = files
    bare = pc.PersonaVector(vec.directions, name="bare")  # no recommended layer stored
    bare.save(d / "bare.safetensors")
    args = _args(d, "--coefs", "0", "--questions", "1", "--out", str(d / "v.json"))
    args[args.index(str(d / "tiny.safetensors"))] = str(d / "bare.safetensors")
    assert main(args) == 1
    assert "has no recommended layer" in capsys.readouterr().err
    assert main(args + ["--vector-layer", "1"]) == 0
    ev = pc.Evaluation.load(d / "v.json")
    assert ev.metadata["vector_layer"] == 1 and ev[0]["layer"] == 1


def test_parse_number_list():
    assert parse_number_list("10, 12", "--layers", int) == [10, 12]
    assert parse_number_list("-4,0.5", "--coefs", float) == [-4.0, 0.5]
    with pytest.raises(pc.InvalidInputError, match="comma-separated integers"):
        parse_number_list("1.5", "--layers", int)
