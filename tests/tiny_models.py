"""Tiny random-weight HF model directories for architecture tests.

    config, weights = write_tiny_model(dir, "qwen3", seed=0, dtype="float32", shards=1, **overrides)

writes ``config.json``, ``model.safetensors`` (or ``model-0000k-of-0000n.safetensors`` +
``model.safetensors.index.json``), ``tokenizer.json`` and ``tokenizer_config.json`` into
``dir`` and returns the config dict and the weights as float32 numpy arrays holding
exactly the values that were written (i.e. already rounded to f16 / bf16 when asked),
so a reference computed from them matches the file.

Archs: ``llama``, ``llama3`` (Llama with Llama-3 rope scaling), ``mistral`` (sliding
window 4), ``qwen2`` (q/k/v bias), ``qwen3`` (q/k norm, head_dim 24 != hidden/heads).
Overrides update the config (``tie_word_embeddings=True``, ``head_dim=8`` …); the
weight shapes follow the final config.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

ARCHS = ("llama", "llama3", "mistral", "qwen2", "qwen3")

_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=96,
    max_position_embeddings=256,
    hidden_act="silu",
    initializer_range=0.02,
    bos_token_id=0,
    eos_token_id=2,
    tie_word_embeddings=False,
    use_cache=True,
    transformers_version="4.46.0",
)


def base_config(arch: str) -> dict:
    """The config.json dict (before overrides) for one of ARCHS."""
    if arch == "llama":
        cfg = dict(
            architectures=["LlamaForCausalLM"],
            model_type="llama",
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            rope_scaling=None,
            attention_bias=False,
            mlp_bias=False,
            pretraining_tp=1,
        )
    elif arch == "llama3":
        # Llama-3.x style rope scaling. original_max_position_embeddings is chosen so that
        # with head_dim 16 and theta 1e4 the frequencies fall in all three bands:
        # wavelengths 6.3 (< 16: kept), 19.9 and 62.8 (16..64: smoothed), 199+ (> 64: / factor).
        cfg = dict(
            architectures=["LlamaForCausalLM"],
            model_type="llama",
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            rope_scaling={
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
                "rope_type": "llama3",
            },
            attention_bias=False,
            mlp_bias=False,
            pretraining_tp=1,
        )
    elif arch == "mistral":
        # small window so that a ~12 token test exercises it
        cfg = dict(
            architectures=["MistralForCausalLM"],
            model_type="mistral",
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            sliding_window=4,
        )
    elif arch == "qwen2":
        # Real Qwen2.5 configs carry sliding_window with use_sliding_window=false
        # (transformers then ignores the window).
        cfg = dict(
            architectures=["Qwen2ForCausalLM"],
            model_type="qwen2",
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            rope_scaling=None,
            use_sliding_window=False,
            sliding_window=32768,
            max_window_layers=3,
            attention_dropout=0.0,
        )
    elif arch == "qwen3":
        cfg = dict(
            architectures=["Qwen3ForCausalLM"],
            model_type="qwen3",
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            rope_scaling=None,
            head_dim=24,
            attention_bias=False,
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=3,
            attention_dropout=0.0,
        )
    else:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    out = dict(_COMMON)
    out.update(cfg)
    return out


# --------------------------------------------------------------------------- weights


def weight_shapes(config: dict) -> dict:
    """HF tensor name -> shape for the given config."""
    H = config["hidden_size"]
    inter = config["intermediate_size"]
    V = config["vocab_size"]
    nh = config["num_attention_heads"]
    nkv = config.get("num_key_value_heads") or nh
    hd = config.get("head_dim") or H // nh
    mt = config["model_type"]
    shapes = {"model.embed_tokens.weight": (V, H)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes[f"{p}.self_attn.q_proj.weight"] = (nh * hd, H)
        shapes[f"{p}.self_attn.k_proj.weight"] = (nkv * hd, H)
        shapes[f"{p}.self_attn.v_proj.weight"] = (nkv * hd, H)
        shapes[f"{p}.self_attn.o_proj.weight"] = (H, nh * hd)
        attn_bias = config.get("attention_bias", False) and mt in ("llama", "qwen3")
        if mt == "qwen2" or attn_bias:
            shapes[f"{p}.self_attn.q_proj.bias"] = (nh * hd,)
            shapes[f"{p}.self_attn.k_proj.bias"] = (nkv * hd,)
            shapes[f"{p}.self_attn.v_proj.bias"] = (nkv * hd,)
        if attn_bias:
            shapes[f"{p}.self_attn.o_proj.bias"] = (H,)
        if mt == "qwen3":
            shapes[f"{p}.self_attn.q_norm.weight"] = (hd,)
            shapes[f"{p}.self_attn.k_norm.weight"] = (hd,)
        shapes[f"{p}.mlp.gate_proj.weight"] = (inter, H)
        shapes[f"{p}.mlp.up_proj.weight"] = (inter, H)
        shapes[f"{p}.mlp.down_proj.weight"] = (H, inter)
        if mt == "llama" and config.get("mlp_bias", False):
            shapes[f"{p}.mlp.gate_proj.bias"] = (inter,)
            shapes[f"{p}.mlp.up_proj.bias"] = (inter,)
            shapes[f"{p}.mlp.down_proj.bias"] = (H,)
        shapes[f"{p}.input_layernorm.weight"] = (H,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (H,)
    shapes["model.norm.weight"] = (H,)
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (V, H)
    return shapes


def random_weights(config: dict, seed: int = 0) -> dict:
    """float32 random weights: projections ~N(0, 0.08), embeddings ~N(0, 0.5),
    biases ~N(0, 0.1), norm weights ~1 + N(0, 0.1)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in weight_shapes(config).items():
        if name.endswith("norm.weight") or "layernorm" in name:
            a = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name == "model.embed_tokens.weight":
            a = 0.5 * rng.standard_normal(shape)
        elif name.endswith(".bias"):
            a = 0.1 * rng.standard_normal(shape)
        else:
            a = 0.08 * rng.standard_normal(shape)
        out[name] = a.astype(np.float32)
    return out


def f32_to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (round to nearest even) and return the uint16 bit patterns."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounding = 0x7FFF + ((bits >> 16) & 1)
    return ((bits + rounding) >> 16).astype(np.uint16)


def bf16_bits_to_f32(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


def round_to_dtype(a: np.ndarray, dtype: str) -> np.ndarray:
    """The float32 values a tensor has after being stored as ``dtype``."""
    if dtype in ("float32", "f32", "F32"):
        return a.astype(np.float32)
    if dtype in ("float16", "f16", "F16"):
        return a.astype(np.float16).astype(np.float32)
    if dtype in ("bfloat16", "bf16", "BF16"):
        return bf16_bits_to_f32(f32_to_bf16_bits(a))
    raise ValueError(f"unknown dtype {dtype!r}")


_ST_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_NORM_DTYPE = {
    "float32": "float32",
    "f32": "float32",
    "F32": "float32",
    "float16": "float16",
    "f16": "float16",
    "F16": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "BF16": "bfloat16",
}


def write_safetensors_raw(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write a safetensors file by hand.

    ``tensors`` maps name -> (st_dtype, shape, raw little-endian bytes). Format:
    u64 little-endian header length, JSON header (padded with spaces to a multiple
    of 8), then the concatenated data.
    """
    header = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    chunks = []
    for name in sorted(tensors):
        st_dtype, shape, data = tensors[name]
        header[name] = {
            "dtype": st_dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
        chunks.append(data)
    hbytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hbytes += b" " * ((8 - len(hbytes) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)))
        f.write(hbytes)
        for c in chunks:
            f.write(c)


def read_safetensors_header(path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def save_weights(dir, weights: dict, dtype: str = "float32", shards: int = 1) -> list:
    """Write ``weights`` (float32 arrays) as safetensors in ``dir``; returns the file names.

    float32 / float16 go through ``safetensors.numpy.save_file``; bfloat16 (no numpy
    dtype) is written by hand with the same format.
    """
    dtype = _NORM_DTYPE[dtype]
    dir = Path(dir)
    names = list(weights)  # insertion order: embed, layers..., norm, lm_head
    if shards < 1:
        raise ValueError("shards must be >= 1")
    if shards == 1:
        groups = [("model.safetensors", names)]
    else:
        parts = np.array_split(np.arange(len(names)), shards)
        groups = [
            (f"model-{k + 1:05d}-of-{shards:05d}.safetensors", [names[j] for j in idx])
            for k, idx in enumerate(parts)
        ]
    meta = {"format": "pt"}
    total = 0
    weight_map = {}
    for fname, group in groups:
        path = dir / fname
        if dtype == "bfloat16":
            raw = {}
            for n in group:
                bits = f32_to_bf16_bits(weights[n])
                raw[n] = ("BF16", weights[n].shape, bits.astype("<u2").tobytes())
                total += bits.nbytes
            write_safetensors_raw(path, raw, meta)
        else:
            from safetensors.numpy import save_file

            np_dtype = np.float32 if dtype == "float32" else np.float16
            arrs = {n: np.ascontiguousarray(weights[n].astype(np_dtype)) for n in group}
            total += sum(a.nbytes for a in arrs.values())
            save_file(arrs, str(path), metadata=meta)
        for n in group:
            weight_map[n] = fname
    if shards > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return [g[0] for g in groups]


# --------------------------------------------------------------------------- tokenizer

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
_WORDS = [
    "system",
    "user",
    "assistant",
    "hello",
    "world",
    "you",
    "are",
    "a",
    "helpful",
    "evil",
    "kind",
    "the",
    "model",
    "what",
    "is",
    "your",
    "name",
    "i",
    "am",
    "not",
    "yes",
    "no",
    ".",
    ",",
    "!",
    "?",
    ":",
    "'",
]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tokenizer_vocab(vocab_size: int) -> list:
    toks = SPECIAL_TOKENS + _WORDS
    toks = toks[:vocab_size]
    k = 0
    while len(toks) < vocab_size:
        toks.append(f"tok{k}")
        k += 1
    return toks


def tokenizer_json(vocab_size: int) -> dict:
    """A valid HF tokenizers JSON: WordLevel over the vocab, Whitespace pre-tokenizer."""
    toks = tokenizer_vocab(vocab_size)
    added = [
        {
            "id": i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, t in enumerate(toks)
        if t in SPECIAL_TOKENS
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {
            "type": "WordLevel",
            "vocab": {t: i for i, t in enumerate(toks)},
            "unk_token": "<unk>",
        },
    }


def tokenizer_config(vocab_size: int) -> dict:
    toks = tokenizer_vocab(vocab_size)
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, t in enumerate(toks)
            if t in SPECIAL_TOKENS
        },
        "bos_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<unk>",
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 256,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


# --------------------------------------------------------------------------- entry point


def write_config(dir, config: dict) -> None:
    Path(dir, "config.json").write_text(json.dumps(config, indent=2))


def write_tiny_model(
    dir, arch: str, seed: int = 0, dtype: str = "float32", shards: int = 1, **overrides
):
    """Write a tiny HF model directory; returns (config, weights as float32 arrays)."""
    dtype = _NORM_DTYPE[dtype]
    dir = Path(dir)
    os.makedirs(dir, exist_ok=True)
    config = base_config(arch)
    config.update(overrides)
    config["torch_dtype"] = dtype
    weights = random_weights(config, seed)
    weights = {n: round_to_dtype(a, dtype) for n, a in weights.items()}
    write_config(dir, config)
    save_weights(dir, weights, dtype=dtype, shards=shards)
    V = config["vocab_size"]
    Path(dir, "tokenizer.json").write_text(json.dumps(tokenizer_json(V), indent=1))
    Path(dir, "tokenizer_config.json").write_text(json.dumps(tokenizer_config(V), indent=2))
    Path(dir, "generation_config.json").write_text(
        json.dumps(
            {"bos_token_id": config.get("bos_token_id"), "eos_token_id": config.get("eos_token_id")}
        )
    )
    return config, weights
