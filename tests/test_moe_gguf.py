"""Mixture-of-experts GGUF files (llama.cpp's ``qwen3moe`` / ``qwen2moe``: router
``ffn_gate_inp``, experts stacked in ``ffn_{gate,up,down}_exps``, Qwen2-MoE's shared expert in
``ffn_*_shexp``) against transformers and llama.cpp.

The tiny random models of tests/tiny_moe.py are written to GGUF here under llama.cpp's names and
metadata keys, with the small GPT-2 style vocabulary of tests/test_errors.py (300 tokens).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import personacore as pc

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

import tiny_moe as moe  # noqa: E402  (after the importorskips)
from test_errors import tiny_vocab  # noqa: E402

VOCAB = 300
GGUF_ARCH = {"qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe"}
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.experts.down_proj": "ffn_down_exps.weight",
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
}


def _gguf_tensors(model) -> dict:
    """The model's weights under llama.cpp names, float32, in HF orientation."""
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    out = {
        "token_embd.weight": sd["model.embed_tokens.weight"],
        "output_norm.weight": sd["model.norm.weight"],
        "output.weight": sd["lm_head.weight"],
    }
    for i in range(moe.LAYERS):
        p = f"model.layers.{i}."
        for hf, name in LAYER_NAMES.items():
            if p + hf in sd:
                out[f"blk.{i}.{name}"] = sd[p + hf]
        gate_up = sd.get(p + "mlp.experts.gate_up_proj")
        if gate_up is not None:
            inner = gate_up.shape[1] // 2
            out[f"blk.{i}.ffn_gate_exps.weight"] = gate_up[:, :inner]
            out[f"blk.{i}.ffn_up_exps.weight"] = gate_up[:, inner:]
        shared_gate = f"blk.{i}.ffn_gate_inp_shexp.weight"
        if shared_gate in out:  # [1, hidden] in HF, [hidden] in llama.cpp's files
            out[shared_gate] = out[shared_gate].reshape(-1)
    return out


def write_gguf(path: Path, family: str, model, qtype=None) -> dict:
    """``model`` as a llama.cpp GGUF at ``path``; with ``qtype`` the expert stacks are quantized to
    it. Returns the expert stacks as stored (dequantized), by GGUF name."""
    tokens, merges, types = tiny_vocab()
    c = model.config
    w = gguf.GGUFWriter(str(path), GGUF_ARCH[family])
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(moe.HEAD_DIM)
    w.add_value_length(moe.HEAD_DIM)
    w.add_rope_freq_base(10_000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_expert_count(c.num_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    w.add_expert_feed_forward_length(c.moe_intermediate_size)
    if family == "qwen2_moe":
        w.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(298)
    w.add_pad_token_id(299)
    w.add_add_bos_token(False)
    w.add_file_type(0 if qtype is None else 7)
    stored = {}
    for name, arr in _gguf_tensors(model).items():
        if qtype is not None and name.endswith("_exps.weight"):
            q = gguf.quants.quantize(arr, qtype)
            w.add_tensor(name, q, raw_dtype=qtype)
            stored[name] = gguf.quants.dequantize(q, qtype).reshape(arr.shape)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def _set_experts(model, stored: dict) -> None:
    """Puts the stored (dequantized) expert stacks back into the transformers model."""
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            gate = stored.get(f"blk.{i}.ffn_gate_exps.weight")
            if gate is None:
                continue
            up = stored[f"blk.{i}.ffn_up_exps.weight"]
            down = stored[f"blk.{i}.ffn_down_exps.weight"]
            layer.mlp.experts.gate_up_proj.copy_(torch.from_numpy(np.concatenate([gate, up], 1)))
            layer.mlp.experts.down_proj.copy_(torch.from_numpy(down))


@pytest.mark.parametrize("family", moe.FAMILIES)
def test_gguf_matches_transformers(tmp_path, family):
    """Every hidden-state row, the logits and 12 greedy tokens of the GGUF (layer 1 dense: a layer
    without a router reads as a dense MLP) equal transformers'."""
    torch_model = moe.random_model(family, vocab=VOCAB)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, family, torch_model)
    ours = pc.load_model(str(path))
    assert ours.architecture == family
    c = ours.config
    assert (c["num_experts"], c["num_experts_per_tok"], c["mlp_only_layers"]) == (4, 2, [1])
    assert c["norm_topk_prob"] == (family == "qwen3_moe")  # llama.cpp's rule per architecture
    ids = moe.ids(20, vocab=VOCAB - 4)
    want_hidden, want_logits = moe.reference(torch_model, ids)
    moe.assert_rows_close(ours.hidden_states(ids), want_hidden)
    got = ours.logits(ids)
    assert np.abs(got - want_logits).max() <= 1e-4 * np.abs(want_logits).max()
    out = ours.generate(ids, max_new_tokens=12, ignore_eos=True)
    assert out.token_ids == moe.greedy(torch_model, ids, 12)


@pytest.mark.parametrize("family", moe.FAMILIES)
def test_quantized_experts_stay_quantized_and_match(tmp_path, family):
    """Q8_0 expert stacks, kept quantized (each expert a byte range of the stack) or dequantized,
    against transformers holding the same dequantized weights."""
    torch_model = moe.random_model(family, vocab=VOCAB)
    path = tmp_path / "tiny-q8.gguf"
    stored = write_gguf(path, family, torch_model, qtype=gguf.GGMLQuantizationType.Q8_0)
    _set_experts(torch_model, stored)
    ids = moe.ids(21, vocab=VOCAB - 4)
    want_hidden, want_logits = moe.reference(torch_model, ids)
    scale = np.abs(want_logits).max()
    dense = pc.load_model(str(path))
    moe.assert_rows_close(dense.hidden_states(ids), want_hidden)
    quantized = pc.load_model(str(path), quantized=True)
    # Q8_0 matmuls quantize the activations too: close, not equal.
    assert np.abs(quantized.logits(ids) - want_logits).max() <= 3e-2 * scale
    assert np.abs(quantized.logits(ids) - dense.logits(ids)).max() > 0  # a different kernel ran


@pytest.mark.parametrize("family", moe.FAMILIES)
def test_gguf_matches_llama_cpp(tmp_path, family):
    """llama.cpp runs the same file (every layer sparse: llama.cpp has no dense layers in these
    architectures) to the same logits."""
    llama_cpp = pytest.importorskip("llama_cpp")
    torch_model = moe.random_model(family, vocab=VOCAB, mlp_only_layers=[])
    path = tmp_path / "tiny.gguf"
    write_gguf(path, family, torch_model)
    ids = moe.ids(22, vocab=VOCAB - 4)
    # An f32 KV cache (ggml type 0; llama.cpp's default f16 cache costs ~1e-3 of the logits).
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=64,
        logits_all=True,
        verbose=False,
        n_threads=1,
        type_k=0,
        type_v=0,
    )
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    ours = pc.load_model(str(path)).logits(ids)
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()
