"""The persona subcommands: traits, extract, score, chat (run in-process through cli.main)."""

import json

import numpy as np
import pytest

import personacore as pc
from personacore.cli import main
from personacore.cli.persona_cmds import parse_steer


def test_traits_lists_and_shows(capsys):
    assert main(["traits"]) == 0
    out = capsys.readouterr().out
    for name in pc.traits():
        assert name in out
    assert main(["traits", "impolite"]) == 0
    out = capsys.readouterr().out
    assert "instruction pairs" in out and "You are an impolite assistant." in out
    assert main(["traits", "evil", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["trait"] == "evil"


def test_unknown_trait_is_a_clean_error(capsys):
    assert main(["traits", "no-such-trait"]) == 1
    assert "TraitError" in capsys.readouterr().err


def test_parse_steer():
    assert parse_steer("evil:-2.5@12") == {"name": "evil", "coef": -2.5, "layer": 12}
    assert parse_steer("snarky:1") == {"name": "snarky", "coef": 1.0, "layer": None}
    with pytest.raises(pc.InvalidInputError, match="NAME:COEF"):
        parse_steer("evil@12")


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, default_model):
    out = tmp_path_factory.mktemp("vec")
    rc = main(
        [
            "extract",
            "--trait",
            "impolite",
            "--out",
            str(out),
            "--max-questions",
            "2",
            "--max-instructions",
            "1",
            "--max-eval-questions",
            "2",
            "--max-new-tokens",
            "8",
            "--formats",
            "safetensors,pt,gguf",
            "--quiet",
        ]
    )
    assert rc == 0
    return out


def test_extract_writes_vector_files_and_report(extracted, default_model):
    report = json.loads((extracted / "impolite.report.json").read_text())
    assert 1 <= report["layer"] < default_model.num_layers
    assert report["counts"]["rollouts"] == 4
    v = pc.PersonaVector.load(extracted / "impolite.safetensors")
    assert v.shape == (default_model.num_layers + 1, default_model.hidden_size)
    assert v.layer == report["layer"] and v.metadata["trait"] == "impolite"
    pt = pc.PersonaVector.load(extracted / "impolite.pt")
    np.testing.assert_array_equal(pt.directions, v.directions)
    gg = pc.PersonaVector.load(extracted / "impolite.gguf")
    np.testing.assert_array_equal(gg.directions[2:-1], v.directions[2:-1])


def test_score_jsonl(extracted, tmp_path, capsys):
    conv = tmp_path / "c.jsonl"
    conv.write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Go away."},
                ]
            }
        )
        + "\n"
        + json.dumps({"prompt": "Hi", "response": "Hello! How can I help?"})
        + "\n"
    )
    assert (
        main(["score", "--vector", str(extracted / "impolite.safetensors"), "--input", str(conv)])
        == 0
    )
    rows = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert [r["line"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["impolite"]["response_avg"]) for r in rows)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "no reply"}]}\n')
    assert (
        main(["score", "--vector", str(extracted / "impolite.safetensors"), "--input", str(bad)])
        == 1
    )
    assert "assistant reply" in capsys.readouterr().err


def test_chat_streams_with_scores(extracted, monkeypatch, capsys):
    answers = iter(["Hello there", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    vec = str(extracted / "impolite.safetensors")
    assert main(["chat", "--vector", vec, "--steer", "impolite:1.0", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "bot> " in out and "scores: impolite@" in out
    assert main(["chat", "--vector", vec, "--steer", "nobody:1.0"]) == 1
