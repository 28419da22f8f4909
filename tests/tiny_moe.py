"""Tiny random mixture-of-experts models (Qwen3-MoE, Qwen2-MoE) built by transformers, and the
transformers references the MoE tests compare the engine with.

The models have 4 layers, 4 experts, top-2, layer 1 a dense MLP (``mlp_only_layers``), Qwen2-MoE
with its gated shared expert. The router weights are drawn so that top-k picks are clear (no
near-ties that float rounding could flip) while the routing weights stay far from one-hot.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import tiny_models as tm

VOCAB = 96
LAYERS = 4
HIDDEN = 64
HEAD_DIM = 16
DENSE_LAYER = 1  # model.layers[1] is a dense MLP; layers 0, 2, 3 are sparse
FAMILIES = ["qwen3_moe", "qwen2_moe"]


def config(family: str, vocab: int = VOCAB, **overrides):
    """A tiny transformers config of ``family``: 4 experts, top-2, layer 1 dense."""
    import transformers

    common = dict(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[DENSE_LAYER],
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        tie_word_embeddings=False,
    )
    if family == "qwen3_moe":
        common.update(head_dim=HEAD_DIM, norm_topk_prob=True)
        common.update(overrides)
        return transformers.Qwen3MoeConfig(**common)
    common.update(shared_expert_intermediate_size=48)
    common.update(overrides)
    return transformers.Qwen2MoeConfig(**common)


def model_class(family: str):
    """transformers' causal-LM class of ``family``."""
    import transformers

    if family == "qwen3_moe":
        return transformers.Qwen3MoeForCausalLM
    return transformers.Qwen2MoeForCausalLM


def randomize(model) -> None:
    """Random weights: norms around 1, the rest small; the routers' logits spread by about 2, so
    that the top-k is decided by clear margins but the picked weights are far from 0 and 1."""
    import torch

    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + torch.randn_like(p) * 0.3)
            elif name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn_like(p) * 0.3)
            else:
                p.copy_(torch.randn_like(p) * 0.15)


def random_model(family: str, vocab: int = VOCAB, **overrides):
    """A random tiny ``family`` model in transformers (float32, eager attention)."""
    cfg = config(family, vocab, **overrides)
    cfg._attn_implementation = "eager"
    model = model_class(family)(cfg).eval()
    randomize(model)
    return model


def write_tokenizer(path: Path, vocab: int = VOCAB) -> None:
    """The tiny WordLevel tokenizer files of tests/tiny_models.py."""
    (path / "tokenizer.json").write_text(json.dumps(tm.tokenizer_json(vocab)))
    (path / "tokenizer_config.json").write_text(json.dumps(tm.tokenizer_config(vocab)))


def build(path: Path, family: str, **overrides):
    """A random tiny ``family`` model saved by transformers at ``path``; returns the torch model."""
    model = random_model(family, **overrides)
    model.save_pretrained(path, safe_serialization=True)
    write_tokenizer(path)
    return model


def load_reference(path: Path, family: str):
    """transformers' model of the directory at ``path`` (float32, eager attention)."""
    return model_class(family).from_pretrained(path, attn_implementation="eager").eval()


def ids(seed: int, n: int = 11, vocab: int = VOCAB) -> list:
    """``n`` random non-special token ids."""
    return [int(i) for i in np.random.default_rng(seed).integers(3, vocab, size=n)]


def reference(model, token_ids: list):
    """transformers' hidden states ``[layers + 1, t, hidden]`` and logits ``[t, vocab]``."""
    import torch

    with torch.no_grad():
        out = model(torch.tensor([token_ids]), output_hidden_states=True)
    hidden = torch.stack([h[0] for h in out.hidden_states]).numpy()
    return hidden, out.logits[0].numpy()


def greedy(model, token_ids: list, n: int) -> list:
    """``n`` greedy tokens by full forward passes (no cache), as an independent reference."""
    import torch

    seq = list(token_ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq])).logits[0, -1]
            seq.append(int(torch.argmax(logits)))
    return seq[len(token_ids) :]


def assert_rows_close(got: np.ndarray, want: np.ndarray, rel: float = 1e-4) -> None:
    """Every row (layer) within ``rel`` of that row's largest |value| in the reference."""
    assert got.shape == want.shape
    for layer in range(want.shape[0]):
        scale = np.abs(want[layer]).max()
        err = np.abs(got[layer] - want[layer]).max()
        assert err <= rel * scale, f"row {layer}: max |diff| {err} vs max |ref| {scale}"
