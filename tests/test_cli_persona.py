"""The persona subcommands: traits, extract, score, chat (run in-process through cli.main)."""

import importlib.util
import json
import re
import sys

import numpy as np
import pytest

import personacore as pc
from personacore.cli import main
from personacore.cli.persona_cmds import parse_steer

# writing a persona_vectors .pt needs torch (the `torch` extra)
FORMATS = ["safetensors", "gguf"] + (["pt"] if importlib.util.find_spec("torch") else [])


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


def test_extract_checks_formats_before_running(tmp_path, monkeypatch, capsys):
    args = ["extract", "--trait", "impolite", "--out", str(tmp_path), "--model", "/nonexistent"]
    assert main(args + ["--formats", "safetensors,npy"]) == 1
    assert "expected a comma-separated list of safetensors, pt, gguf" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert main(args + ["--formats", "pt"]) == 1
    assert "pip install torch" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


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
            ",".join(FORMATS),
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
    if "pt" in FORMATS:
        pt = pc.PersonaVector.load(extracted / "impolite.pt")
        np.testing.assert_array_equal(pt.directions, v.directions)
    gg = pc.PersonaVector.load(extracted / "impolite.gguf")
    np.testing.assert_array_equal(gg.directions[2:-1], v.directions[2:-1])
    # every file honours the umask alike (the .safetensors was once 0600 while the rest were 0644)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in extracted.iterdir()}
    assert len(modes) == len(FORMATS) + 1 and len(set(modes.values())) == 1, modes


def test_score_jsonl(extracted, tmp_path, capsys):
    conv = tmp_path / "c.jsonl"
    conv.write_text(
        json.dumps(
            {
                "id": "conv-1",
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Go away."},
                ],
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
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["line"] for r in rows] == [1, 2]
    assert rows[0]["id"] == "conv-1" and "id" not in rows[1]  # the input's id is kept
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


def test_chat_shows_each_tokens_score_and_alerts(extracted, default_model, monkeypatch, capsys):
    """Not a terminal: every generated token is printed as ``token[score]``, the score being the
    monitored projection at the vector's layer of that token's own position, and an alert line
    appears when the threshold is crossed."""
    answers = iter(["Hello there", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    path = extracted / "impolite.safetensors"
    args = ["chat", "--vector", str(path), "--max-new-tokens", "6", "--threshold=-1e6"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "\x1b[" not in out  # no ANSI codes when stdout is not a terminal
    reply = out.split("bot> ", 1)[1]
    shown = [float(x) for x in re.findall(r"\[([-+]\d+\.\d\d)\]", reply)]

    vec = pc.PersonaVector.load(path)
    gen = default_model.generate(
        [{"role": "user", "content": "Hello there"}],
        max_new_tokens=6,
        monitor=pc.Monitor({"impolite": vec}),
    )
    expected = gen.scores["impolite"][gen.is_generated][:, 0]
    assert len(shown) == len(gen.token_ids) == len(expected) > 0
    np.testing.assert_allclose(shown, expected, atol=0.006)
    first = default_model.tokenizer.decode(gen.token_ids[:1])
    assert f"{first}[{expected[0]:+.2f}]" in reply
    alerts = [line for line in out.splitlines() if line.lstrip().startswith("! alert")]
    assert len(alerts) == 1 and "impolite@" in alerts[0] and "-1000000" in alerts[0]


def test_chat_colors_tokens_on_a_terminal(extracted, monkeypatch, capsys):
    answers = iter(["Hi", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    vec = str(extracted / "impolite.safetensors")
    assert main(["chat", "--vector", vec, "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "\x1b[" in out and not re.search(r"\[[-+]\d+\.\d\d\]", out.split("bot> ", 1)[1])
    answers = iter(["Hi", "/quit"])
    assert main(["chat", "--vector", vec, "--max-new-tokens", "4", "--no-color"]) == 0
    out = capsys.readouterr().out
    assert "\x1b[" not in out and re.search(r"\[[-+]\d+\.\d\d\]", out)
