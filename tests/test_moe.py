"""The mixture-of-experts families (Qwen3-MoE, Qwen2-MoE) from HF directories against transformers.

Tiny random models (tests/tiny_moe.py) are saved by transformers and loaded by the engine: every
hidden-state row, the logits, greedy generation, steering at a sparse layer, monitoring and
pooling are compared with transformers' float32 eager forward; top-k, renormalisation and the
dense/sparse layer pattern are varied to show routing is computed as configured.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import personacore as pc

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import tiny_moe as moe  # noqa: E402  (after the importorskips)


@pytest.fixture(scope="module", params=moe.FAMILIES)
def tiny(request, tmp_path_factory):
    """(family, transformers model, our model, directory) for each family."""
    family = request.param
    path = tmp_path_factory.mktemp(family)
    torch_model = moe.build(path, family)
    return family, torch_model, pc.load_model(str(path)), path


def test_config_lists_the_experts(tiny):
    family, _, ours, _ = tiny
    assert ours.architecture == family and ours.num_layers == moe.LAYERS
    c = ours.config
    assert (c["num_experts"], c["num_experts_per_tok"], c["moe_intermediate_size"]) == (4, 2, 32)
    assert c["mlp_only_layers"] == [moe.DENSE_LAYER]
    assert c["norm_topk_prob"] == (family == "qwen3_moe")
    assert c.get("shared_expert_intermediate_size") == (48 if family == "qwen2_moe" else None)


def test_every_row_and_the_logits_match_transformers(tiny):
    _, torch_model, ours, _ = tiny
    ids = moe.ids(3)
    want_hidden, want_logits = moe.reference(torch_model, ids)
    moe.assert_rows_close(ours.hidden_states(ids), want_hidden)
    got = ours.logits(ids)
    assert np.abs(got - want_logits).max() <= 1e-4 * np.abs(want_logits).max()


def test_greedy_generation_matches_transformers(tiny):
    """16 greedy tokens through the KV cache equal transformers' full-forward argmax."""
    _, torch_model, ours, _ = tiny
    ids = moe.ids(5, n=7)
    out = ours.generate(ids, max_new_tokens=16, ignore_eos=True)
    assert out.token_ids == moe.greedy(torch_model, ids, 16)


def test_a_batch_equals_one_by_one(tiny):
    """Left-padded prompts of different lengths: each token is routed as if alone."""
    _, _, ours, _ = tiny
    prompts = [moe.ids(6, n=9), moe.ids(7, n=4)]
    batch = ours.generate(prompts, max_new_tokens=8, ignore_eos=True)
    for prompt, got in zip(prompts, batch):
        assert got.token_ids == ours.generate(prompt, max_new_tokens=8, ignore_eos=True).token_ids


def test_continuous_batching_equals_transformers(tiny):
    """The serving engine (requests decoded together, each reading its own cache) gives
    transformers' greedy tokens for two prompts at once."""
    _, torch_model, ours, _ = tiny
    prompts = [moe.ids(18, n=10), moe.ids(19, n=3)]
    engine = pc.Engine(ours, max_batch=2, prefill_chunk=4)
    try:
        handles = [engine.submit(p, max_new_tokens=8, ignore_eos=True) for p in prompts]
        for prompt, handle in zip(prompts, handles):
            assert handle.result().token_ids == moe.greedy(torch_model, prompt, 8)
    finally:
        engine.close()


def _steer_hook(coef: float, v: np.ndarray):
    """A forward hook adding ``coef * v`` to a decoder layer's output (tensor or tuple)."""
    add = torch.tensor(coef * v, dtype=torch.float32)

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (output[0] + add,) + tuple(output[1:])
        return output + add

    return hook


@pytest.mark.parametrize("layer", [1, 3])
def test_steering_at_a_sparse_layer_matches_a_transformers_hook(tiny, layer):
    """Steering at layer ``layer`` (the output of sparse block ``layer``, transformers'
    ``model.layers[layer - 1]``) equals a forward hook adding ``coef * v[layer]`` there: the rows
    after it (whose routing the steer changes), the logits and greedy generation."""
    _, torch_model, ours, _ = tiny
    ids = moe.ids(8)
    vector = np.random.default_rng(9).standard_normal((moe.LAYERS + 1, moe.HIDDEN))
    vector = vector.astype(np.float32)
    coef = 4.0
    steer = pc.Steer(vector, coef, layers=[layer])
    _, plain_logits = moe.reference(torch_model, ids)
    block = torch_model.model.layers[layer - 1]
    handle = block.register_forward_hook(_steer_hook(coef, vector[layer]))
    try:
        with torch.no_grad():
            out = torch_model(torch.tensor([ids]), output_hidden_states=True)
        want_after = torch.stack([h[0] for h in out.hidden_states[layer + 1 :]]).numpy()
        want_logits = out.logits[0].numpy()
        want_tokens = moe.greedy(torch_model, ids, 12)
    finally:
        handle.remove()
    got = ours.hidden_states(ids, steer=steer)
    base = ours.hidden_states(ids)
    np.testing.assert_allclose(got[:layer], base[:layer], atol=1e-6)
    np.testing.assert_allclose(got[layer], base[layer] + coef * vector[layer], atol=1e-4)
    moe.assert_rows_close(got[layer + 1 :], want_after)
    got_logits = ours.logits(ids, steer=steer)
    assert np.abs(got_logits - want_logits).max() <= 1e-4 * np.abs(want_logits).max()
    assert np.abs(want_logits - plain_logits).max() > 0.1  # the steer changed something
    generated = ours.generate(ids, max_new_tokens=12, ignore_eos=True, steer=steer)
    assert generated.token_ids == want_tokens


def test_monitor_scores_are_projections_of_transformers_states(tiny):
    """Monitoring during generation reads a·v/‖v‖ of the residual stream, every row."""
    _, torch_model, ours, _ = tiny
    ids = moe.ids(10, n=6)
    vector = np.random.default_rng(11).standard_normal((moe.LAYERS + 1, moe.HIDDEN))
    vector = vector.astype(np.float32)
    layers = list(range(moe.LAYERS + 1))
    monitor = pc.Monitor({"v": vector}, layers=layers)
    out = ours.generate(ids, max_new_tokens=5, ignore_eos=True, monitor=monitor)
    hs, _ = moe.reference(torch_model, out.ids)
    unit = vector / np.linalg.norm(vector, axis=1, keepdims=True)
    want = np.stack([hs[row] @ unit[row] for row in layers], axis=1)
    scale = np.abs(want).max(axis=0, keepdims=True)
    assert (np.abs(out.scores["v"] - want) / scale).max() < 1e-4


def test_pooling_means_transformers_states(tiny):
    _, torch_model, ours, _ = tiny
    prompt, response = moe.ids(12, n=6), moe.ids(13, n=5)
    poolings = ["response_avg", "prompt_avg", "prompt_last"]
    pooled = ours.pool([prompt], [response], poolings=poolings)
    hs, _ = moe.reference(torch_model, prompt + response)
    n = len(prompt)
    want = {
        "response_avg": hs[:, n:].mean(axis=1),
        "prompt_avg": hs[:, :n].mean(axis=1),
        "prompt_last": hs[:, n - 1],
    }
    for p in poolings:
        moe.assert_rows_close(np.asarray(pooled[p])[0], want[p])


def _rewrite_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("family", moe.FAMILIES)
def test_top_k_and_renormalisation_are_followed(tmp_path, family):
    """The same weights under top-1, top-2 renormalised, top-2 raw and top-4 give four different
    outputs, and each matches transformers under that config: routing is computed, not assumed."""
    moe.build(tmp_path, family)
    ids = moe.ids(14)
    last = {}
    for k, norm in [(1, False), (2, True), (2, False), (4, False)]:
        _rewrite_config(tmp_path, num_experts_per_tok=k, norm_topk_prob=norm)
        _, want_logits = moe.reference(moe.load_reference(tmp_path, family), ids)
        got = pc.load_model(str(tmp_path)).logits(ids)
        assert np.abs(got - want_logits).max() <= 1e-4 * np.abs(want_logits).max(), (k, norm)
        last[(k, norm)] = got
    variants = list(last.values())
    for i in range(len(variants)):
        for j in range(i + 1, len(variants)):
            assert np.abs(variants[i] - variants[j]).max() > 0.05


@pytest.mark.parametrize("family", moe.FAMILIES)
def test_sparse_step_and_dense_layers_are_followed(tmp_path, family):
    """``decoder_sparse_step`` 2 (layers 1 and 3 sparse) with ``mlp_only_layers`` [3]: only
    layer 1 is sparse, and the engine matches transformers."""
    torch_model = moe.build(tmp_path, family, decoder_sparse_step=2, mlp_only_layers=[3])
    ids = moe.ids(15)
    want_hidden, _ = moe.reference(torch_model, ids)
    ours = pc.load_model(str(tmp_path))
    moe.assert_rows_close(ours.hidden_states(ids), want_hidden)
    assert ours.config["mlp_only_layers"] == [0, 2, 3]


@pytest.mark.parametrize("family", moe.FAMILIES)
def test_stacked_expert_tensors_load_too(tmp_path, family):
    """transformers 5 keeps the experts stacked (``experts.gate_up_proj`` ``[E, 2I, H]``,
    ``experts.down_proj`` ``[E, H, I]``); a checkpoint written in that layout loads the same."""
    from safetensors.torch import save_file

    torch_model = moe.build(tmp_path / "per_expert", family)
    stacked = tmp_path / "stacked"
    stacked.mkdir()
    state = {k: v.contiguous() for k, v in torch_model.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    save_file(state, str(stacked / "model.safetensors"))
    (stacked / "config.json").write_text((tmp_path / "per_expert" / "config.json").read_text())
    moe.write_tokenizer(stacked)
    ids = moe.ids(16)
    want_hidden, _ = moe.reference(torch_model, ids)
    moe.assert_rows_close(pc.load_model(str(stacked)).hidden_states(ids), want_hidden)


def test_save_hf_round_trips_through_transformers(tiny, tmp_path):
    """The engine's HF export of a MoE model loads in transformers and gives the same logits."""
    family, torch_model, ours, _ = tiny
    ours.save_hf(tmp_path)
    again = moe.load_reference(tmp_path, family)
    ids = moe.ids(17)
    _, want = moe.reference(torch_model, ids)
    _, got = moe.reference(again, ids)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"num_experts_per_tok": 5}, "num_experts_per_tok"),
        ({"mlp_only_layers": [7]}, "mlp_only_layers"),
        ({"decoder_sparse_step": 0}, "decoder_sparse_step"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "yarn"),
        ({"use_sliding_window": True}, "use_sliding_window"),
    ],
)
def test_bad_moe_configs_are_refused(tmp_path, change, match):
    moe.build(tmp_path, "qwen3_moe")
    _rewrite_config(tmp_path, **change)
    with pytest.raises(pc.ConfigError, match=match):
        pc.load_model(str(tmp_path))
