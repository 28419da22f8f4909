"""``quantized=True``: every common GGUF type kept quantized, checked against independent references.

For each type (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K … Q6_K) a tiny llama GGUF (hidden 256, so the
256-value k-quant blocks fit a row) is written with the ``gguf`` package: the types gguf can
quantize are quantized from random weights; for the k-quants, which gguf can only dequantize,
random blocks are written directly (random bytes, with the f16 scales set so the weights have a
sensible size). Every matmul weight and the (tied) embedding table has that type; a mixed file
gives each tensor a different type and an untied output projection.

References, both independent of personacore:

- numpy, float64, on the weights as gguf dequantizes them (tests/numpy_reference.py). The
  quantized path also rounds the activations to 8 bits inside every dot product (as llama.cpp
  does), which this reference does not. The tolerance is measured, not guessed: the same numpy
  forward with its activations rounded to 8 bits per block (amax / 127, the Q8 rule) moves the
  logits by some amount ``e``; personacore must stay within ``3 e`` of the exact reference.
- llama.cpp (llama-cpp-python, if installed; f32 KV cache) on the same file, which also rounds
  activations to 8 bits: personacore's logits must be within ``3 e`` of it too. Where both run
  the same arithmetic (candle's k-quant and Q4_0 kernels are ports of ggml's) they agree to
  ~1e-6; elsewhere a single activation rounded to the neighbouring integer moves later layers by
  about one rounding step, which is what ``e`` measures.

Resident memory of a quantized load of the bundled models is measured in a subprocess
(``VmHWM`` of /proc/self/status).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import numpy_reference as ref
import personacore as pc
from test_errors import tiny_vocab

gguf = pytest.importorskip("gguf")
GT = gguf.GGMLQuantizationType

V, H, LAYERS, HEADS, KV_HEADS, FFN = 300, 256, 2, 4, 2, 512
HD = H // HEADS
EPS = 1e-5
IDS = [5, 120, 33, 287, 64, 9, 250, 101, 17, 3]

PY_QUANTIZABLE = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
ALL_TYPES = PY_QUANTIZABLE + K_QUANTS

# Byte offsets of the f16 scale fields of one k-quant block (ggml's block_qN_K): (d, dmin).
K_SCALE_FIELDS = {
    "Q2_K": (80, 82),  # scales[16], qs[64], d, dmin
    "Q3_K": (108, None),  # hmask[32], qs[64], scales[12], d
    "Q4_K": (0, 2),  # d, dmin, scales[12], qs[128]
    "Q5_K": (0, 2),  # d, dmin, scales[12], qh[32], qs[128]
    "Q6_K": (208, None),  # ql[128], qh[64], scales[16] (int8), d
}

MATMULS = {
    "self_attn.q_proj": ("attn_q", HEADS * HD, H),
    "self_attn.k_proj": ("attn_k", KV_HEADS * HD, H),
    "self_attn.v_proj": ("attn_v", KV_HEADS * HD, H),
    "self_attn.o_proj": ("attn_output", H, HEADS * HD),
    "mlp.gate_proj": ("ffn_gate", FFN, H),
    "mlp.up_proj": ("ffn_up", FFN, H),
    "mlp.down_proj": ("ffn_down", H, FFN),
}


def _with_scales(blocks: np.ndarray, qtype: str, d: float, dmin: float) -> np.ndarray:
    """``blocks`` (uint8 ``[n, block_bytes]``) with every block's d (and dmin) set."""
    out = blocks.copy()
    d_off, m_off = K_SCALE_FIELDS[qtype]
    out[:, d_off : d_off + 2] = np.frombuffer(np.float16(d).tobytes(), np.uint8)
    if m_off is not None:
        out[:, m_off : m_off + 2] = np.frombuffer(np.float16(dmin).tobytes(), np.uint8)
    return out


def random_kquant(rows: int, cols: int, qtype: str, rng, std: float = 0.05) -> np.ndarray:
    """Random ``qtype`` blocks of a ``[rows, cols]`` matrix (uint8 ``[rows, bytes per row]``).

    The quantized values and sub-block scales are random bytes; d and dmin are chosen so that
    the dequantized weights have mean ~0 and standard deviation ~``std``.
    """
    qt = GT[qtype]
    block, type_size = gguf.GGML_QUANT_SIZES[qt]
    n = rows * cols // block
    raw = rng.integers(0, 256, size=(n, type_size), dtype=np.uint8)

    def deq(d: float, dmin: float) -> np.ndarray:
        return gguf.quants.dequantize(_with_scales(raw, qtype, d, dmin), qt)

    if K_SCALE_FIELDS[qtype][1] is None:
        d, dmin = std / deq(1.0, 0.0).std(), 0.0
    else:
        pos, neg = deq(1.0, 0.0).mean(), -deq(0.0, 1.0).mean()  # w = d * pos_part - dmin * neg_part
        unit = deq(1.0, pos / neg)
        d = std / unit.std()
        dmin = d * pos / neg
    return _with_scales(raw, qtype, d, dmin).reshape(rows, -1)


def quantized_tensor(rows: int, cols: int, qtype: str, rng) -> np.ndarray:
    """A ``[rows, cols]`` weight as ``qtype`` blocks (uint8 ``[rows, bytes per row]``)."""
    if qtype in K_QUANTS:
        return random_kquant(rows, cols, qtype, rng)
    w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    return gguf.quants.quantize(w, GT[qtype])


def write_quant_gguf(path: Path, types: dict, tied: bool = True, seed: int = 0) -> dict:
    """A tiny llama GGUF whose tensors have the GGUF types ``types[gguf name]``.

    Returns the weights as gguf dequantizes them, under their GGUF names.
    """
    rng = np.random.default_rng(seed)
    tokens, merges, token_types = tiny_vocab()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-quant")
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(H)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HD)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(EPS)
    w.add_vocab_size(V)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    w.add_bos_token_id(297)
    w.add_eos_token_id(298)
    w.add_add_bos_token(False)
    deq = {}

    def add(name: str, rows: int, cols: int) -> None:
        qtype = types[name]
        blocks = quantized_tensor(rows, cols, qtype, rng)
        w.add_tensor(name, blocks, raw_dtype=GT[qtype])
        deq[name] = gguf.quants.dequantize(blocks, GT[qtype]).reshape(rows, cols)

    def add_norm(name: str) -> None:
        deq[name] = (1.0 + 0.1 * rng.standard_normal(H)).astype(np.float32)
        w.add_tensor(name, deq[name])

    add("token_embd.weight", V, H)
    add_norm("output_norm.weight")
    if not tied:
        add("output.weight", V, H)
    for i in range(LAYERS):
        for g_name, rows, cols in MATMULS.values():
            add(f"blk.{i}.{g_name}.weight", rows, cols)
        add_norm(f"blk.{i}.attn_norm.weight")
        add_norm(f"blk.{i}.ffn_norm.weight")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return deq


def all_names(tied: bool) -> list:
    names = ["token_embd.weight"] + ([] if tied else ["output.weight"])
    for i in range(LAYERS):
        names += [f"blk.{i}.{g}.weight" for g, _, _ in MATMULS.values()]
    return names


def hf_weights(deq: dict) -> dict:
    """The dequantized GGUF tensors under HF names, Q/K rows put back from llama.cpp's order."""

    def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
        # llama.cpp stores the rows of head h as (j, s) pairs; HF as (s, j): rotate-half layout.
        return w.reshape(heads, HD // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)

    out = {
        "model.embed_tokens.weight": deq["token_embd.weight"],
        "model.norm.weight": deq["output_norm.weight"],
    }
    if "output.weight" in deq:
        out["lm_head.weight"] = deq["output.weight"]
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        for hf_name, (g_name, _, _) in MATMULS.items():
            t = deq[f"blk.{i}.{g_name}.weight"]
            if hf_name == "self_attn.q_proj":
                t = unpermute(t, HEADS)
            elif hf_name == "self_attn.k_proj":
                t = unpermute(t, KV_HEADS)
            out[f"{p}.{hf_name}.weight"] = t
        out[f"{p}.input_layernorm.weight"] = deq[f"blk.{i}.attn_norm.weight"]
        out[f"{p}.post_attention_layernorm.weight"] = deq[f"blk.{i}.ffn_norm.weight"]
    return out


def config(tied: bool) -> dict:
    return {
        "model_type": "llama",
        "vocab_size": V,
        "hidden_size": H,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": EPS,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tied,
    }


def round_activations(x: np.ndarray, block: int = 32) -> np.ndarray:
    """``x`` rounded to 8 bits per block of its last axis: d = amax / 127, q = round(x / d)."""
    shape = x.shape
    b = x.reshape(-1, shape[-1] // block, block)
    d = np.abs(b).max(axis=-1, keepdims=True) / 127.0
    q = np.round(np.divide(b, d, out=np.zeros_like(b), where=d > 0))
    return (q * d).reshape(shape)


def numpy_logits(cfg: dict, weights: dict, ids: list, rounding: dict | None) -> np.ndarray:
    """Logits ``[T, V]`` of the numpy reference. With ``rounding`` (weight name -> block size),
    every matmul input is first rounded to 8 bits per block of that size (32 for the activation
    blocks of the 32-value types, 256 for the k-quants' Q8_K)."""
    exact = ref.linear
    block_of = {id(weights[n]): b for n, b in (rounding or {}).items()}

    def linear(x, w, b=None):
        if rounding is not None:
            x = round_activations(x, block_of[id(w)])
        return exact(x, w, b)

    ref.linear = linear
    try:
        hidden, _ = ref.forward(cfg, weights, ids)
        return linear(hidden[-1], ref.lm_head_weight(cfg, weights))
    finally:
        ref.linear = exact


def llama_cpp_logits(path: Path, ids: list) -> np.ndarray | None:
    """llama.cpp's logits ``[T, V]`` for ``ids`` (no BOS added), or None without llama-cpp-python.

    Loaded without "extra buffer types" (their AMX kernels die with SIGILL on this host; see
    benches/bench_generate.py), so llama.cpp runs its ordinary CPU kernels.
    """
    try:
        import llama_cpp
    except ImportError:
        return None
    import llama_cpp.llama as llama_mod

    orig = llama_cpp.llama_model_default_params

    def params():
        p = orig()
        p.use_extra_bufts = False
        return p

    llama_mod.llama_cpp.llama_model_default_params = params
    try:
        llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=64,
            n_threads=1,
            logits_all=True,
            type_k=0,  # GGML_TYPE_F32 KV cache (the default f16 one rounds keys and values)
            type_v=0,
            verbose=False,
        )
        llm.eval(ids)
        out = np.array(llm.scores[: len(ids)], dtype=np.float64)
        llm.close()
        return out
    finally:
        llama_mod.llama_cpp.llama_model_default_params = orig


def activation_blocks(types: dict) -> dict:
    """HF weight name -> the block size of the 8-bit activations its matmul uses."""
    out = {}
    for i in range(LAYERS):
        for hf_name, (g_name, _, _) in MATMULS.items():
            t = types[f"blk.{i}.{g_name}.weight"]
            out[f"model.layers.{i}.{hf_name}.weight"] = 256 if t in K_QUANTS else 32
    out["model.embed_tokens.weight"] = 256 if types["token_embd.weight"] in K_QUANTS else 32
    if "output.weight" in types:
        out["lm_head.weight"] = 256 if types["output.weight"] in K_QUANTS else 32
    return out


def check_against_references(path: Path, deq: dict, types: dict, tied: bool, capsys) -> None:
    cfg = config(tied)
    weights = hf_weights(deq)
    blocks = activation_blocks(types)
    exact = numpy_logits(cfg, weights, IDS, None)
    rounded = numpy_logits(cfg, weights, IDS, blocks)
    e = np.abs(rounded - exact).max()  # what rounding the activations to 8 bits alone does

    model = pc.load_model(str(path), quantized=True)
    assert model.quantized
    ours = model.logits(IDS).astype(np.float64)
    last = model.logits(IDS[-1:]).astype(np.float64)  # one row: the m = 1 (decode) kernels
    dense = pc.load_model(str(path)).logits(IDS).astype(np.float64)
    err = np.abs(ours - exact).max()
    llama = llama_cpp_logits(path, IDS)
    with capsys.disabled():
        msg = (
            f"\n[{path.stem}] logits spread {exact.std():.3g}: dense - exact "
            f"{np.abs(dense - exact).max():.2e}, 8-bit rounding alone e = {e:.3g}, "
            f"quantized=True - exact {err:.3g}, quantized=True - rounded "
            f"{np.abs(ours - rounded).max():.3g}"
        )
        if llama is not None:
            msg += f", quantized=True - llama.cpp {np.abs(ours - llama).max():.3g}"
        print(msg)
    # The dequantizing load is exact up to f32 rounding: the weights are what gguf dequantizes.
    assert np.abs(dense - exact).max() <= 1e-4 * np.abs(exact).max()
    assert e > 0
    assert err <= 3 * e, f"quantized=True differs from the exact reference by {err}, 3e = {3 * e}"
    # The top token agrees, up to near-ties: the token picked scores within 2e of the best.
    picked = exact[np.arange(len(IDS)), ours.argmax(-1)]
    assert np.all(exact.max(-1) - picked <= 2 * e)
    single = numpy_logits(cfg, weights, IDS[-1:], None)
    single_e = np.abs(numpy_logits(cfg, weights, IDS[-1:], blocks) - single).max()
    assert np.abs(last - single).max() <= 3 * single_e
    if llama is not None:
        # llama.cpp rounds activations to 8 bits too, but not always to the same integers (f16
        # vs f32 block scales, ties, and any rounding flip propagates to later layers), so it
        # differs from us by rounding noise of the same size as from the exact reference.
        assert np.abs(ours - llama).max() <= 3 * e


@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_each_type_matches_references(qtype, tmp_path, capsys):
    path = tmp_path / f"tiny-{qtype}.gguf"
    types = dict.fromkeys(all_names(tied=True), qtype)
    deq = write_quant_gguf(path, types, tied=True)
    check_against_references(path, deq, types, tied=True, capsys=capsys)


def test_mixed_types_in_one_file(tmp_path, capsys):
    """Every tensor a different type (cycling through all ten), with an untied output."""
    names = all_names(tied=False)
    types = {n: ALL_TYPES[(i + 3) % len(ALL_TYPES)] for i, n in enumerate(names)}
    assert set(types.values()) == set(ALL_TYPES)
    path = tmp_path / "tiny-mixed.gguf"
    deq = write_quant_gguf(path, types, tied=False, seed=1)
    check_against_references(path, deq, types, tied=False, capsys=capsys)


def test_quantized_generation_agrees_with_logits(tmp_path):
    """Greedy decoding with the KV cache (m = 1 matmuls) picks the argmax of a full forward."""
    path = tmp_path / "tiny-q4k.gguf"
    write_quant_gguf(path, dict.fromkeys(all_names(tied=True), "Q4_K"), tied=True)
    model = pc.load_model(str(path), quantized=True)
    out = model.generate(IDS[:4], max_new_tokens=6, temperature=0.0, ignore_eos=True).token_ids
    seq = IDS[:4]
    for tok in out:
        assert tok == int(model.logits(seq)[-1].argmax())
        seq = seq + [tok]


RSS_SCRIPT = """
import json, sys
def kib(key):
    for line in open('/proc/self/status'):
        if line.startswith(key + ':'):
            return int(line.split()[1])
import personacore as pc
from personacore.engine.native import native
native()  # the native library's own pages (~3 MiB) are the library's, not the model's
before = kib('VmRSS')
model = pc.load_model(sys.argv[1], quantized=True)
loaded = kib('VmHWM')
model.generate(model.tokenizer.encode('The quick brown fox'), max_new_tokens=4, temperature=0.0)
print(json.dumps({"before": before, "loaded": loaded, "after_generate": kib('VmHWM')}))
"""


@pytest.mark.parametrize(
    "which",
    [
        "gemma-3-270m",
        "default",
    ],
)
def test_quantized_load_resident_memory(which, capsys):
    """A quantized load adds at most 1.3x the file's size to the process's peak resident memory
    (VmHWM), counted from the resident memory once ``personacore`` and its native module are
    imported (the module is imported lazily, at the first load); also after a short generation
    (candle's own forward used to build repacked copies of the k-quant weights there)."""
    from personacore.engine.gemma3 import gemma3_model_path

    path = pc.default_model_path() if which == "default" else gemma3_model_path()
    out = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, path], capture_output=True, text=True, check=True
    )
    m = json.loads(out.stdout.strip().splitlines()[-1])
    size_kib = Path(path).stat().st_size / 1024
    load = (m["loaded"] - m["before"]) / size_kib
    gen = (m["after_generate"] - m["before"]) / size_kib
    with capsys.disabled():
        print(
            f"\n[{which}] file {size_kib / 1024:.0f} MiB; resident after imports {m['before'] / 1024:.0f} "
            f"MiB; peak after load +{(m['loaded'] - m['before']) / 1024:.0f} MiB ({load:.2f}x the file), "
            f"after generating +{(m['after_generate'] - m['before']) / 1024:.0f} MiB ({gen:.2f}x)"
        )
    assert load <= 1.3
    assert gen <= 1.3
