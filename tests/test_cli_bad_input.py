"""Bad command lines: each ends with a one-line ``personacore CMD: error: Class: message`` on stderr
and exit status 1 (checked by personacore, before any model loads), or argparse's usage error and
exit status 2. Rows of the bad-input table in README.md."""

from __future__ import annotations

import json

import pytest

from personacore.cli.main import main


def _fails(capsys, argv, status=1):
    """Run ``personacore argv``; assert the exit status; return stderr."""
    if status == 2:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    else:
        assert main(argv) == status
    return capsys.readouterr().err


@pytest.fixture
def samples(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"prompt": "Hi", "response": "Hello."}) + "\n")
    return path


def _screen(samples, *extra):
    return ["screen", "--vector", "v.safetensors", "--input", str(samples), *extra]


def test_unknown_command_and_bad_choices_are_usage_errors(capsys):
    assert "invalid choice: 'frobnicate'" in _fails(capsys, ["frobnicate"], status=2)
    assert "invalid choice: 'f64'" in _fails(capsys, ["info", "--dtype", "f64"], status=2)
    err = _fails(capsys, ["screen", "--input", "a.jsonl", "--method", "mean"], status=2)
    assert "invalid choice: 'mean'" in err


def test_missing_model_path(capsys, tmp_path):
    err = _fails(capsys, ["info", "--model", str(tmp_path / "no-such-model")])
    assert "ModelNotFoundError" in err and "no-such-model" in err


def test_screen_missing_input(capsys, tmp_path):
    err = _fails(capsys, _screen(tmp_path / "absent.jsonl", "--out", str(tmp_path / "o.jsonl")))
    assert "InvalidInputError" in err and "absent.jsonl' does not exist" in err


def test_screen_output_equal_to_input(capsys, samples):
    err = _fails(capsys, _screen(samples, "--out", str(samples)))
    assert "--out must differ from --input" in err


def test_screen_unknown_output_type(capsys, samples, tmp_path):
    err = _fails(capsys, _screen(samples, "--out", str(tmp_path / "o.csv")))
    assert "unknown sample file type '.csv'" in err


@pytest.mark.parametrize(
    "value, message",
    [("150%", "is not between 0% and 100%"), ("lots", "expected a percentage like 5%")],
)
def test_screen_bad_drop_top(capsys, samples, tmp_path, value, message):
    err = _fails(capsys, _screen(samples, "--out", str(tmp_path / "o.jsonl"), "--drop-top", value))
    assert message in err


def test_screen_bad_batch_size(capsys, samples, tmp_path):
    err = _fails(capsys, _screen(samples, "--out", str(tmp_path / "o.jsonl"), "--batch-size", "0"))
    assert "InvalidInputError" in err and "batch_size" in err


@pytest.mark.parametrize(
    "vectors, message",
    [(["=v.safetensors"], "expected NAME=PATH"), (["a=x.pt", "a=y.pt"], "given twice")],
)
def test_malformed_vector_arguments(capsys, tmp_path, vectors, message):
    log = tmp_path / "audit.jsonl"
    log.write_text("")
    argv = ["audit", "verify", str(log)]
    for v in vectors:
        argv += ["--vector", v]
    assert message in _fails(capsys, argv)


def test_audit_verify_missing_log(capsys, tmp_path):
    err = _fails(capsys, ["audit", "verify", str(tmp_path / "gone.jsonl")])
    assert "PersonacoreIOError" in err and "cannot read audit log" in err


def test_audit_verify_missing_model(capsys, tmp_path):
    log = tmp_path / "audit.jsonl"
    log.write_text("")
    err = _fails(capsys, ["audit", "verify", str(log), "--model", str(tmp_path / "m")])
    assert "InvalidInputError" in err and "does not exist" in err
