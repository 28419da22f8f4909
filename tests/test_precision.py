"""``load_model(..., precision="high")``: bf16x3 matmuls on AMX tiles (plain f32 elsewhere).

On a CPU with AMX-BF16 the weights are split into bf16 pairs; the results must still meet the
transformers parity tolerances, stay within ~1e-4 of plain f32, keep batched == one-by-one,
and an export must write the exact f32 weights. Without AMX, "high" must equal "highest".
"""

from __future__ import annotations

import numpy as np
import pytest

import personacore as pc
from test_parity import POOLINGS, assert_layers_close


@pytest.fixture(scope="module")
def high_model(default_model_path):
    model = pc.load_model(default_model_path, precision="high")
    assert model.precision == "high"
    return model


def test_bad_precision_is_rejected(default_model_path):
    with pytest.raises(pc.InvalidInputError, match="precision"):
        pc.load_model(default_model_path, precision="medium")


def test_default_precision_is_highest(default_model):
    assert default_model.precision == "highest"
    assert "precision='highest'" in repr(default_model)


def test_parity_with_transformers(high_model, default_model, reference):
    for c in reference.conversations:
        hs = high_model.hidden_states(c.ids)
        assert_layers_close(hs, c.hidden, f"high precision conversation {c.index}")
        logits = high_model.logits(c.ids)
        assert np.abs(logits[-1].astype(np.float64) - c.last_logits).max() <= 2e-2
        exact = default_model.hidden_states(c.ids)
        rel = np.abs(hs - exact).max(axis=(1, 2)) / np.abs(exact).max(axis=(1, 2))
        assert rel.max() <= 1e-4, f"high vs highest: {rel.max():.3g}"
        if pc.amx_available():
            assert not np.array_equal(hs, exact), "precision='high' did not change the matmuls"
        else:
            np.testing.assert_array_equal(hs, exact)


def test_pool_and_generation_batch_equal_one_at_a_time(high_model, reference):
    convs = reference.conversations
    batched = high_model.pool(
        [c.prompt_ids for c in convs], [c.response_ids for c in convs], batch_size=2
    )
    for k, c in enumerate(convs):
        single = high_model.pool([c.prompt_ids], [c.response_ids], batch_size=1)
        for name in POOLINGS:
            a, s = batched[name][k], single[name][0]
            assert (np.abs(a - s) <= 1e-4 * np.abs(s).max(axis=-1, keepdims=True) + 1e-6).all(), (
                name
            )
            assert_layers_close(a, c.pooled[name], f"high precision batched {k} {name}")
    gens = high_model.generate([c.prompt_ids for c in convs], max_new_tokens=16)
    assert [g.token_ids for g in gens] == [c.greedy for c in convs]
    for c in convs:
        assert high_model.generate(c.prompt_ids, max_new_tokens=16).token_ids == c.greedy


def test_export_writes_exact_weights(high_model, default_model, tmp_path):
    high_model.save_hf(tmp_path / "hf")
    back = pc.load_model(tmp_path / "hf")
    ids = default_model.encode_chat([{"role": "user", "content": "Hello there"}])
    np.testing.assert_array_equal(back.hidden_states(ids), default_model.hidden_states(ids))
