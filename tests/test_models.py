"""The default model through the public API: properties, tokenizer, output shapes, convert, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import personacore as pc
from personacore.cli import main as cli_main

MESSAGES = [{"role": "user", "content": "How do I tie my shoes?"}]


def test_properties(default_model):
    m = default_model
    assert (m.num_layers, m.hidden_size, m.vocab_size) == (30, 576, 49152)
    assert m.architecture == "llama"
    assert m.max_position_embeddings >= 2048
    assert m.dtype == "f32" and m.device == "cpu" and m.quantized is False
    assert m.has_chat_template
    assert m.config["num_hidden_layers"] == 30 and m.config["hidden_size"] == 576
    assert m.path == pc.default_model_path()
    r = repr(m)
    assert "llama" in r and "num_layers=30" in r


def test_version_and_exports():
    assert isinstance(pc.__version__, str) and pc.__version__
    for name in ("load_model", "Model", "errors", "PersonacoreError", "InvalidInputError"):
        assert hasattr(pc, name)
    assert isinstance(pc.avx2_enabled(), bool)


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world!",
        "  leading spaces, tabs\tand\nnewlines  ",
        "Ünïcödé, 日本語, emoji 🙂 and numbers 12345",
        "<|im_start|>user\nhi<|im_end|>",
    ],
)
def test_tokenizer_round_trip(default_model, text):
    tok = default_model.tokenizer
    ids = tok.encode(text)
    assert ids and all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(np.array(ids, dtype=np.int64)) == text


def test_tokenizer_special_tokens(default_model):
    tok = default_model.tokenizer
    assert tok.vocab_size == 49152 and len(tok) == 49152
    end = tok.token_to_id("<|im_end|>")
    assert end is not None and tok.id_to_token(end) == "<|im_end|>"
    assert end in tok.eos_token_ids
    assert tok.encode("<|im_end|>") == [end]
    assert tok.decode([end], skip_special_tokens=True) == ""
    assert tok.token_to_id("definitely-not-a-token-xyz") is None
    assert tok.id_to_token(10**9) is None and tok.id_to_token(-1) is None
    assert tok.bos_token_id is None or 0 <= tok.bos_token_id < tok.vocab_size


def test_chat_text(default_model):
    with_prompt = default_model.chat_text(MESSAGES)
    without = default_model.chat_text(MESSAGES, add_generation_prompt=False)
    assert with_prompt.endswith("<|im_start|>assistant\n")
    assert not without.endswith("<|im_start|>assistant\n")
    assert with_prompt.startswith(without)
    assert default_model.encode_chat(MESSAGES) == default_model.tokenizer.encode(with_prompt)


def test_output_shapes_and_dtypes(default_model):
    ids = default_model.encode_chat(MESSAGES)
    hs = default_model.hidden_states(ids)
    assert hs.shape == (31, len(ids), 576) and hs.dtype == np.float32
    assert np.isfinite(hs).all()
    lg = default_model.logits(ids)
    assert lg.shape == (len(ids), 49152) and lg.dtype == np.float32
    out = default_model.pool(
        [MESSAGES, "plain text prompt"], ["Loop and pull.", [28, 29]], poolings="prompt_last"
    )
    assert list(out) == ["prompt_last"]
    assert out["prompt_last"].shape == (2, 31, 576) and out["prompt_last"].dtype == np.float32
    # prompt_last of a pair equals the hidden state at the last prompt token
    np.testing.assert_allclose(
        out["prompt_last"][0], hs[:, -1, :], rtol=1e-4, atol=1e-4 * np.abs(hs[:, -1, :]).max()
    )


def test_hidden_states_deterministic(default_model):
    ids = [1, 9690, 198, 2683]
    np.testing.assert_array_equal(
        default_model.hidden_states(ids), default_model.hidden_states(ids)
    )


def test_convert_round_trip(default_model, default_model_path, tmp_path, capsys):
    out_dir = tmp_path / "hf"
    assert cli_main(["convert", default_model_path, str(out_dir)]) == 0
    printed = capsys.readouterr().out
    assert "load_model" in printed and str(out_dir) in printed
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out_dir / name).is_file(), name
    cfg = json.loads((out_dir / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576

    back = pc.load_model(out_dir)
    assert (back.num_layers, back.hidden_size, back.vocab_size, back.architecture) == (
        30,
        576,
        49152,
        "llama",
    )
    assert back.encode_chat(MESSAGES) == default_model.encode_chat(MESSAGES)
    assert back.chat_text(MESSAGES) == default_model.chat_text(MESSAGES)
    ids = default_model.encode_chat(MESSAGES)
    diff = np.abs(back.hidden_states(ids) - default_model.hidden_states(ids)).max()
    assert diff <= 1e-5, f"hidden states after convert differ by {diff}"


def test_cli_info(default_model, capsys):
    assert cli_main(["info"]) == 0
    out = capsys.readouterr().out
    assert "llama" in out and "576" in out and "avx2" in out


def test_cli_reports_errors(tmp_path, capsys):
    assert cli_main(["info", "--model", str(tmp_path / "missing.gguf")]) == 1
    err = capsys.readouterr().err
    assert "ModelNotFoundError" in err and "missing.gguf" in err


def test_python_dash_m_help():
    out = subprocess.run(
        [sys.executable, "-m", "personacore", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for cmd in ("demo", "convert", "fetch-default", "info"):
        assert cmd in out


@pytest.mark.parametrize("name", ["tokenizer.json", "{stem}.tokenizer.json"])
def test_tokenizer_json_beside_a_gguf_is_preferred(default_model_path, tmp_path, name):
    """A tokenizer.json next to the GGUF replaces the metadata tokenizer: "x  1" is split as the
    HF tokenizer.json splits it (Ġ, Ġ, 1), not as llama.cpp's smollm pre-tokenizer (ĠĠ, 1)."""
    tokenizers = pytest.importorskip("tokenizers")
    src = Path(__file__).parent / "data" / "smollm2_tokenizer.json"
    gguf = tmp_path / Path(default_model_path).name
    gguf.symlink_to(default_model_path)
    text = "x  1 and  42"
    want = tokenizers.Tokenizer.from_file(str(src)).encode(text, add_special_tokens=False).ids
    plain = pc.load_model(str(gguf))
    assert plain.tokenizer.encode(text) != want  # the metadata tokenizer follows llama.cpp here
    (tmp_path / name.format(stem=gguf.stem)).write_text(src.read_text())
    beside = pc.load_model(str(gguf))
    assert beside.tokenizer.encode(text) == want
    assert beside.tokenizer.eos_token_ids == plain.tokenizer.eos_token_ids
    assert beside.chat_text(MESSAGES) == plain.chat_text(MESSAGES)
