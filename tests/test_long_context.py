"""Parity at long context with transformers (reference: scripts/make_long_reference.py, stored in
tests/data/smollm2_long_reference.npz): the hidden states of a 4,000-token input at every capture
row, checked at 32 positions spread over it (at both precisions), and greedy tokens after a
2,000-token prompt.

Prompts this long run the blocked prompt attention over many key blocks and query blocks, and
the decode steps after them split each head's keys into chunks across threads."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

import personacore as pc

REF = pathlib.Path(__file__).parent / "data/smollm2_long_reference.npz"


@pytest.fixture(scope="module")
def long_ref():
    with np.load(REF) as z:
        return {k: z[k] for k in z.files}


def test_hidden_states_of_4000_tokens_match_transformers(default_model, long_ref):
    ids = long_ref["ids"].tolist()
    assert len(ids) == 4000
    hs = default_model.hidden_states(ids)
    assert hs.shape == (default_model.num_layers + 1, 4000, default_model.hidden_size)
    assert_rows_match_reference(hs[:, long_ref["positions"]].astype(np.float64), long_ref)


def assert_rows_match_reference(ours: np.ndarray, long_ref) -> None:
    """Every row within 1e-3 of the row's largest reference value, and relative L2 ≤ 1e-3."""
    ref = long_ref["hidden"].astype(np.float64)
    for row in range(ref.shape[0]):
        diff = np.abs(ours[row] - ref[row]).max()
        scale = float(long_ref["row_max"][row])
        assert diff <= 1e-3 * scale, f"row {row}: max abs diff {diff:.4g} > 1e-3 * {scale:.4g}"
        rel = np.linalg.norm(ours[row] - ref[row]) / np.linalg.norm(ref[row])
        assert rel <= 1e-3, f"row {row}: relative L2 error {rel:.3g}"


def test_high_precision_at_4000_tokens(default_model_path, default_model, long_ref):
    """At precision "high" the linear layers and, on a CPU with AMX, the prompt attention's two
    products run as bf16x3: the 4,000-token hidden states keep the same tolerance against
    transformers' f32 and stay within 1e-4 (relative to each row's largest value) of "highest"."""
    high = pc.load_model(default_model_path, precision="high")
    ids = long_ref["ids"].tolist()
    positions = long_ref["positions"]
    ours = high.hidden_states(ids)[:, positions].astype(np.float64)
    exact = default_model.hidden_states(ids)[:, positions].astype(np.float64)
    assert_rows_match_reference(ours, long_ref)
    for row in range(ours.shape[0]):
        off = np.abs(ours[row] - exact[row]).max() / np.abs(exact[row]).max()
        assert off <= 1e-4, f"row {row}: high vs highest {off:.3g}"
    if pc.amx_available():
        assert not np.array_equal(ours, exact), "precision='high' did not change the matmuls"
    else:
        np.testing.assert_array_equal(ours, exact)


def test_greedy_tokens_after_2000_tokens_match_transformers(default_model, long_ref):
    n = int(long_ref["greedy_prompt_len"])
    want = long_ref["greedy"].tolist()
    gen = default_model.generate(
        long_ref["ids"][:n].tolist(), max_new_tokens=len(want), temperature=0.0, ignore_eos=True
    )
    assert gen.token_ids == want
