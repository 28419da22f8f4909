"""Independent numpy reference forward for HF Llama / Mistral / Qwen2 / Qwen3 causal LMs.

This is a deliberately plain, readable re-implementation of what
``transformers`` computes for ``LlamaForCausalLM``, ``MistralForCausalLM``,
``Qwen2ForCausalLM`` and ``Qwen3ForCausalLM`` (eager attention, no cache), used
to check the personacore engine on tiny random-weight models. It depends only on
numpy and computes in float64.

    hidden, logits = forward(config, weights, ids)

``config`` is the dict of a ``config.json``; ``weights`` maps HF tensor names
(``model.layers.0.self_attn.q_proj.weight`` …) to numpy arrays (any float dtype).

``hidden`` has shape ``[num_layers + 1, T, hidden_size]`` in the layout of
docs/conventions.md, Layers (= transformers ``output_hidden_states``): row 0 = token embeddings,
row i (1 <= i < N) = residual stream after decoder block i, row N = the final
RMSNorm applied to the output of block N. ``logits`` has shape ``[T, vocab]``.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

_ARCH_TO_TYPE = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


# --------------------------------------------------------------------------- config


def model_type(config: Mapping) -> str:
    mt = config.get("model_type")
    if mt is None:
        archs = config.get("architectures") or []
        mt = _ARCH_TO_TYPE.get(archs[0]) if archs else None
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model_type {mt!r}")
    return mt


def head_dim(config: Mapping) -> int:
    hd = config.get("head_dim")
    if hd is None:
        hd = config["hidden_size"] // config["num_attention_heads"]
    return int(hd)


def num_kv_heads(config: Mapping) -> int:
    kv = config.get("num_key_value_heads")
    return int(kv if kv is not None else config["num_attention_heads"])


def has_qkv_bias(config: Mapping) -> bool:
    mt = model_type(config)
    if mt == "qwen2":
        return True  # Qwen2Attention: q/k/v bias=True, o_proj bias=False
    if mt == "mistral":
        return False  # MistralAttention: never a bias
    # Llama / Qwen3: q/k/v/o bias = config.attention_bias (default False)
    return bool(config.get("attention_bias", False))


def has_o_bias(config: Mapping) -> bool:
    if model_type(config) in ("llama", "qwen3"):
        return bool(config.get("attention_bias", False))
    return False


def has_mlp_bias(config: Mapping) -> bool:
    # LlamaMLP: gate/up/down bias = config.mlp_bias; the others never
    return model_type(config) == "llama" and bool(config.get("mlp_bias", False))


def has_qk_norm(config: Mapping) -> bool:
    return model_type(config) == "qwen3"


def sliding_window_for_layer(config: Mapping, layer: int):
    """Sliding window size for a layer, or None for full causal attention.

    Mistral: ``sliding_window`` (if not null) applies to every layer.
    Qwen2 / Qwen3: only when ``use_sliding_window`` is true, and then only for
    layers ``>= max_window_layers`` (transformers' ``layer_types``); otherwise
    ``sliding_window`` in config.json is ignored.
    Llama: none.
    """
    mt = model_type(config)
    if mt == "mistral":
        return config.get("sliding_window")
    if mt in ("qwen2", "qwen3"):
        if not config.get("use_sliding_window", False):
            return None
        layer_types = config.get("layer_types")
        if layer_types is not None:
            return (
                config.get("sliding_window") if layer_types[layer] == "sliding_attention" else None
            )
        max_window_layers = config.get("max_window_layers", 28)
        return config.get("sliding_window") if layer >= max_window_layers else None
    return None


# --------------------------------------------------------------------------- pieces


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """transformers LlamaRMSNorm: weight * (x * rsqrt(mean(x^2, -1) + eps))."""
    x = x.astype(np.float64)
    var = np.mean(x * x, axis=-1, keepdims=True)
    return weight.astype(np.float64) * (x / np.sqrt(var + eps))


def default_inv_freq(theta: float, dim: int) -> np.ndarray:
    """1 / theta^(arange(0, dim, 2) / dim)."""
    return 1.0 / (float(theta) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))


def llama3_inv_freq(inv_freq: np.ndarray, rope_scaling: Mapping) -> np.ndarray:
    """transformers ``_compute_llama3_parameters`` applied to the default inv_freq."""
    factor = float(rope_scaling["factor"])
    low_freq_factor = float(rope_scaling["low_freq_factor"])
    high_freq_factor = float(rope_scaling["high_freq_factor"])
    old_context_len = float(rope_scaling["original_max_position_embeddings"])

    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2.0 * math.pi / inv_freq
    # wavelen < high_freq_wavelen: unchanged; wavelen > low_freq_wavelen: divided by factor
    out = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    # in between: smooth interpolation
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1.0 - smooth) * out / factor + smooth * out
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, out)


def rope_scaling_of(config: Mapping):
    rs = config.get("rope_scaling")
    if rs is None:
        # transformers >= 5 style
        rp = config.get("rope_parameters")
        if rp is not None and rp.get("rope_type", "default") != "default":
            rs = rp
    return rs


def rope_theta_of(config: Mapping) -> float:
    if "rope_theta" in config:
        return float(config["rope_theta"])
    rp = config.get("rope_parameters") or {}
    return float(rp.get("rope_theta", 10000.0))


def inv_freq_for(config: Mapping) -> np.ndarray:
    dim = head_dim(config)
    inv = default_inv_freq(rope_theta_of(config), dim)
    rs = rope_scaling_of(config)
    if rs is not None:
        rope_type = rs.get("rope_type", rs.get("type", "default"))
        if rope_type == "llama3":
            inv = llama3_inv_freq(inv, rs)
        elif rope_type != "default":
            raise NotImplementedError(f"rope_type {rope_type!r} not in the numpy reference")
    return inv


def rope_cos_sin(config: Mapping, positions: np.ndarray):
    """cos, sin of shape [T, head_dim]: freqs = pos * inv_freq, emb = cat(freqs, freqs)."""
    inv = inv_freq_for(config)
    freqs = np.asarray(positions, dtype=np.float64)[:, None] * inv[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    # Llama-3 ("llama3") and default rope have attention_factor 1.0
    return np.cos(emb), np.sin(emb)


def rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x: [heads, T, head_dim]; cos/sin: [T, head_dim]. Non-interleaved (rotate_half)."""
    return x * cos[None] + rotate_half(x) * sin[None]


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True)


def attention_mask(T: int, sliding_window=None) -> np.ndarray:
    """Boolean [T, T]: query i may attend key j iff j <= i (and i - j < window)."""
    i = np.arange(T)[:, None]
    j = np.arange(T)[None, :]
    allowed = j <= i
    if sliding_window is not None:
        allowed &= (i - j) < int(sliding_window)
    return allowed


def linear(x: np.ndarray, w: np.ndarray, b=None) -> np.ndarray:
    """HF nn.Linear: weight is [out, in]; y = x @ W^T + b."""
    y = x @ w.astype(np.float64).T
    if b is not None:
        y = y + b.astype(np.float64)
    return y


# --------------------------------------------------------------------------- blocks


def attention(config: Mapping, W: Mapping, prefix: str, x: np.ndarray, cos, sin, layer: int):
    T = x.shape[0]
    n_heads = int(config["num_attention_heads"])
    n_kv = num_kv_heads(config)
    hd = head_dim(config)
    eps = float(config.get("rms_norm_eps", 1e-6))
    bias = has_qkv_bias(config)

    def proj(name):
        b = W.get(f"{prefix}.{name}.bias") if bias else None
        if bias and b is None:
            raise KeyError(f"{prefix}.{name}.bias")
        return linear(x, W[f"{prefix}.{name}.weight"], b)

    q = proj("q_proj").reshape(T, n_heads, hd).transpose(1, 0, 2)  # [H, T, hd]
    k = proj("k_proj").reshape(T, n_kv, hd).transpose(1, 0, 2)  # [KV, T, hd]
    v = proj("v_proj").reshape(T, n_kv, hd).transpose(1, 0, 2)

    if has_qk_norm(config):  # Qwen3: RMSNorm over head_dim, per head, before rope
        q = rms_norm(q, W[f"{prefix}.q_norm.weight"], eps)
        k = rms_norm(k, W[f"{prefix}.k_norm.weight"], eps)

    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)

    # GQA: repeat_kv — kv head h serves query heads h*rep .. h*rep+rep-1
    rep = n_heads // n_kv
    k = np.repeat(k, rep, axis=0)
    v = np.repeat(v, rep, axis=0)

    scores = q @ k.transpose(0, 2, 1) / math.sqrt(hd)  # [H, T, T]
    mask = attention_mask(T, sliding_window_for_layer(config, layer))
    scores = np.where(mask[None], scores, -np.inf)
    probs = softmax(scores, axis=-1)
    out = probs @ v  # [H, T, hd]
    out = out.transpose(1, 0, 2).reshape(T, n_heads * hd)
    ob = W[f"{prefix}.o_proj.bias"] if has_o_bias(config) else None
    return linear(out, W[f"{prefix}.o_proj.weight"], ob)


def mlp(W: Mapping, prefix: str, x: np.ndarray, bias: bool = False) -> np.ndarray:
    def lin(name, h):
        return linear(h, W[f"{prefix}.{name}.weight"], W[f"{prefix}.{name}.bias"] if bias else None)

    return lin("down_proj", silu(lin("gate_proj", x)) * lin("up_proj", x))


# --------------------------------------------------------------------------- forward


def lm_head_weight(config: Mapping, W: Mapping) -> np.ndarray:
    if config.get("tie_word_embeddings", False) or "lm_head.weight" not in W:
        if not config.get("tie_word_embeddings", False):
            raise KeyError("lm_head.weight")
        return W["model.embed_tokens.weight"]
    return W["lm_head.weight"]


def forward(config: Mapping, weights: Mapping, ids: Sequence[int], start_pos: int = 0):
    """Returns (hidden [N+1, T, H] float64, logits [T, V] float64)."""
    model_type(config)  # validates
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError("ids must be a non-empty 1-D sequence")
    V = int(config["vocab_size"])
    if ids.min() < 0 or ids.max() >= V:
        raise ValueError("token id out of range")
    N = int(config["num_hidden_layers"])
    eps = float(config.get("rms_norm_eps", 1e-6))
    T = ids.size

    positions = np.arange(start_pos, start_pos + T)
    cos, sin = rope_cos_sin(config, positions)

    x = weights["model.embed_tokens.weight"].astype(np.float64)[ids]
    hidden = [x]
    for i in range(N):
        p = f"model.layers.{i}"
        h = rms_norm(x, weights[f"{p}.input_layernorm.weight"], eps)
        x = x + attention(config, weights, f"{p}.self_attn", h, cos, sin, i)
        h = rms_norm(x, weights[f"{p}.post_attention_layernorm.weight"], eps)
        x = x + mlp(weights, f"{p}.mlp", h, has_mlp_bias(config))
        hidden.append(x)
    normed = rms_norm(x, weights["model.norm.weight"], eps)
    hidden[-1] = normed  # row N = final norm of block N's output (transformers convention)
    logits = normed @ lm_head_weight(config, weights).astype(np.float64).T
    return np.stack(hidden, axis=0), logits


def hidden_states(config, weights, ids):
    return forward(config, weights, ids)[0]


def logits(config, weights, ids):
    return forward(config, weights, ids)[1]


def pool(
    config, weights, prompts, responses, poolings=("response_avg", "prompt_avg", "prompt_last")
):
    """Reference for ``model.pool`` on token-id prompts/responses.

    Each sample is the sequence prompt + response run alone (no padding);
    response_avg = mean of the hidden states over the response positions,
    prompt_avg = mean over the prompt positions, prompt_last = the last prompt
    position. Returns {pooling: [n, N+1, H]}.
    """
    out = {p: [] for p in poolings}
    for pr, rs in zip(prompts, responses):
        pr, rs = list(pr), list(rs)
        hs = hidden_states(config, weights, pr + rs)  # [N+1, T, H]
        P = len(pr)
        for p in poolings:
            if p == "response_avg":
                out[p].append(hs[:, P:].mean(axis=1))
            elif p == "prompt_avg":
                out[p].append(hs[:, :P].mean(axis=1))
            elif p == "prompt_last":
                out[p].append(hs[:, P - 1])
            else:
                raise ValueError(p)
    return {p: np.stack(v, axis=0) for p, v in out.items()}


# --------------------------------------------------------------------------- cross-check


def transformers_forward(model_dir, ids, full_precision=True):
    """(hidden [N+1, T, H], logits [T, V]) from HF transformers, in float64, eager attention.

    Only for validating this reference (needs torch + transformers; not a test dependency).
    transformers computes RMSNorm, the rotary tables and the attention softmax in float32
    even for a float64 model; with ``full_precision`` those three are patched to float64
    so that the comparison is at ~1e-12 instead of ~1e-7 (the structure is unchanged:
    same modules, weights, masks, GQA, biases, q/k norms).
    """
    import contextlib

    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=torch.float64, attn_implementation="eager"
        )
    except TypeError:  # transformers < 4.56 spells it torch_dtype
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), torch_dtype=torch.float64, attn_implementation="eager"
        )
    model.eval()

    stack = contextlib.ExitStack()
    if full_precision:

        def rms_forward(self, x):
            var = x.pow(2).mean(-1, keepdim=True)
            eps = getattr(self, "variance_epsilon", getattr(self, "eps", None))
            return self.weight * (x * torch.rsqrt(var + eps))

        for mod in model.modules():
            if type(mod).__name__.endswith("RMSNorm"):
                mod.forward = rms_forward.__get__(mod)
            if type(mod).__name__.endswith("RotaryEmbedding"):
                inv = torch.tensor(
                    inv_freq_for(model.config.to_dict() | {"model_type": model.config.model_type}),
                    dtype=torch.float64,
                )
                # only default / llama3 rope are used here; recompute inv_freq in float64 the
                # transformers way and check that it agrees with the float32 buffer
                assert torch.allclose(inv.float(), mod.inv_freq.float(), rtol=1e-6), "inv_freq"

                def rope_forward(self, x, position_ids, _inv=inv):
                    freqs = position_ids[:, :, None].double() * _inv[None, None, :]
                    emb = torch.cat([freqs, freqs], dim=-1)
                    s = getattr(self, "attention_scaling", 1.0)
                    return (emb.cos() * s).to(x.dtype), (emb.sin() * s).to(x.dtype)

                mod.forward = rope_forward.__get__(mod)
        orig_softmax = F.softmax

        def softmax64(input, dim=None, _stacklevel=3, dtype=None):
            if input.dtype == torch.float64:
                dtype = None
            return orig_softmax(input, dim=dim, dtype=dtype)

        import unittest.mock as mock

        stack.enter_context(mock.patch.object(F, "softmax", softmax64))
    with stack, torch.no_grad():
        out = model(
            torch.tensor([list(ids)], dtype=torch.long), output_hidden_states=True, use_cache=False
        )
    hidden = np.stack([h[0].numpy() for h in out.hidden_states], axis=0)
    return hidden, out.logits[0].numpy()
