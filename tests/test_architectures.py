"""Architecture coverage on tiny random-weight models checked against a numpy forward.

No small real Qwen2/2.5, Qwen3 or Mistral model is available here, so each family is covered by a
3-layer random model written by ``tiny_models.write_tiny_model`` and compared, layer by layer, with
the independent float64 numpy implementation in ``numpy_reference`` (itself checked against
transformers to ~1e-14 by ``test_numpy_reference_matches_transformers`` when torch and
transformers are importable).

Covered: Llama, Llama with Llama-3 rope scaling, Mistral with a sliding window shorter than the
input, Qwen2 (q/k/v bias), Qwen3 (q/k norm, head_dim != hidden/heads); tied and untied embeddings;
explicit head_dim; sharded checkpoints; f16 / bf16 weight files; pooled states with padding in a
batch; and the error kinds for bad configs, bad weight files and bad token ids.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import numpy_reference as ref
import tiny_models as tm

try:
    import personacore as pc
except ImportError as _e:  # reported by the `pc` fixture, so the reference test can still run
    pc = None
    _PC_IMPORT_ERROR = _e

T = 13  # token count; longer than the Mistral window (4)

#: name -> (arch, config overrides)
CASES = {
    "llama": ("llama", {}),
    "llama3_rope_scaling": ("llama3", {}),
    "mistral_sliding_window": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
}
#: more configurations that real checkpoints use
EXTRA_CASES = {
    # Llama with an explicit head_dim != hidden/heads (transformers honours config.head_dim)
    "llama_head_dim_8": ("llama", {"head_dim": 8}),
    # Mistral-Nemo style: head_dim 24 with hidden 64 / 4 heads
    "mistral_head_dim_24": ("mistral", {"head_dim": 24}),
    # Llama without GQA
    "llama_mha": ("llama", {"num_key_value_heads": 4}),
    # Qwen2.5 checkpoints carry sliding_window with use_sliding_window=false: must be ignored
    "qwen2_sliding_window_disabled": ("qwen2", {"sliding_window": 4}),
}
ALL_CASES = {**CASES, **EXTRA_CASES}
#: transformers features that released checkpoints of these families rarely use: the engine must
#: either compute them exactly or refuse the config with a ConfigError / UnsupportedArchitectureError
#: (never silently compute something else)
RARE_CASES = {
    # Qwen2/Qwen3 sliding window switched on: transformers slides only layers >= max_window_layers
    "qwen2_sliding_window_from_layer_1": (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
    ),
    "qwen3_sliding_window_from_layer_1": (
        "qwen3",
        {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
    ),
    # LlamaAttention / Qwen3Attention: q/k/v/o biases when attention_bias is true
    "llama_attention_bias": ("llama", {"attention_bias": True}),
    "qwen3_attention_bias": ("qwen3", {"attention_bias": True}),
    # LlamaMLP: gate/up/down biases when mlp_bias is true
    "llama_mlp_bias": ("llama", {"mlp_bias": True}),
}

REL_TOL = 1e-4  # float32 engine vs float64 reference, relative to max(1, max|ref layer|)
HALF_REL_TOL = 1e-3  # f16 / bf16 weight files, computed in f32


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="session")
def _pc():
    if pc is None:
        pytest.fail(f"personacore is not importable: {_PC_IMPORT_ERROR!r}")
    return pc


def _ids(seed: int, n: int = T, vocab: int = 96) -> list:
    return [int(i) for i in np.random.default_rng(1000 + seed).integers(0, vocab, n)]


def _case_seed(name: str) -> int:
    return sum(map(ord, name)) % 997


def assert_layers_close(got, expected, rel=REL_TOL, label=""):
    """Per-layer max |got - expected| <= rel * max(1, max|expected layer|); on failure, say which
    layer diverges first, by how much, at which token, with the whole per-layer table."""
    got = np.asarray(got)
    assert got.shape == expected.shape, f"{label}: shape {got.shape} != reference {expected.shape}"
    rows, bad = [], []
    for layer in range(expected.shape[0]):
        e = expected[layer]
        scale = max(1.0, float(np.abs(e).max()))
        diff = np.abs(got[layer].astype(np.float64) - e)
        finite = bool(np.all(np.isfinite(got[layer])))
        d = float(diff.max()) if finite else float("inf")
        tol = rel * scale
        where = ""
        if finite and diff.ndim == 2:  # [tokens, hidden]: where is the worst, which token first
            t, j = np.unravel_index(int(np.argmax(diff)), diff.shape)
            over = np.nonzero(diff.max(axis=1) > tol)[0]
            where = f" at token {t} dim {j}" + (
                f"; first token over tol: {over[0]}" if over.size else ""
            )
        elif finite and diff.ndim == 1:
            where = f" at dim {int(np.argmax(diff))}"
        elif not finite:
            where = " (non-finite values)"
        rows.append(
            f"  row {layer}: max|diff| {d:.3e} (tol {tol:.1e}, max|ref| {scale:.3g}){where}"
            f"{'  <-- FAIL' if not d <= tol else ''}"
        )
        if not d <= tol:
            bad.append(layer)
    if bad:
        raise AssertionError(
            f"{label}: first diverging row {bad[0]} (of rows 0..{expected.shape[0] - 1}; "
            f"row 0 = embeddings, row N = final norm)\n" + "\n".join(rows)
        )


def _check_logits(got, expected, rel=REL_TOL, label=""):
    assert_layers_close(np.asarray(got)[None], expected[None], rel, label + " logits")


_MODEL_CACHE: dict = {}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, _pc):
    """tiny(case, tie=False, dtype="float32", shards=1) -> (model, config, weights, dir); cached."""

    def make(case: str, tie: bool = False, dtype: str = "float32", shards: int = 1):
        key = (case, tie, dtype, shards)
        if key not in _MODEL_CACHE:
            arch, overrides = {**ALL_CASES, **RARE_CASES}[case]
            d = tmp_path_factory.mktemp(f"{case}-{'tied' if tie else 'untied'}-{dtype}-{shards}")
            config, weights = tm.write_tiny_model(
                d,
                arch,
                seed=_case_seed(case),
                dtype=dtype,
                shards=shards,
                tie_word_embeddings=tie,
                **overrides,
            )
            model = _pc.load_model(str(d))
            _MODEL_CACHE[key] = (model, config, weights, d)
        return _MODEL_CACHE[key]

    yield make
    _MODEL_CACHE.clear()


# --------------------------------------------------------------------------- forward parity


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("case", list(ALL_CASES))
def test_hidden_states_and_logits_match_reference(tiny, case, tie):
    model, config, weights, _ = tiny(case, tie)
    ids = _ids(_case_seed(case))
    exp_h, exp_l = ref.forward(config, weights, ids)
    h = model.hidden_states(ids)
    assert isinstance(h, np.ndarray) and h.dtype == np.float32, (type(h), getattr(h, "dtype", None))
    assert h.shape == (config["num_hidden_layers"] + 1, T, config["hidden_size"])
    assert_layers_close(h, exp_h, label=f"{case} tie={tie} hidden_states")
    lg = model.logits(ids)
    assert isinstance(lg, np.ndarray) and lg.dtype == np.float32
    assert lg.shape == (T, config["vocab_size"])
    _check_logits(lg, exp_l, label=f"{case} tie={tie}")


@pytest.mark.parametrize("case", list(CASES))
def test_model_metadata(tiny, case):
    model, config, _, _ = tiny(case)
    assert model.num_layers == 3
    assert model.hidden_size == config["hidden_size"] == 64
    assert model.vocab_size == config["vocab_size"] == 96
    assert model.architecture == config["model_type"]


def test_features_under_test_change_the_output():
    """Sanity of the test itself: the sliding window, the Llama-3 rope scaling, the Qwen2 bias,
    the Qwen3 q/k norms and head_dim all move the reference far beyond the tolerance."""
    ids = _ids(0)

    def delta(config_a, weights_a, config_b, weights_b):
        a = ref.hidden_states(config_a, weights_a, ids)
        b = ref.hidden_states(config_b, weights_b, ids)
        return float(np.abs(a - b).max())

    cfg = tm.base_config("mistral")
    w = {k: tm.round_to_dtype(v, "float32") for k, v in tm.random_weights(cfg, 1).items()}
    assert delta(cfg, w, dict(cfg, sliding_window=None), w) > 1e-2

    cfg = tm.base_config("llama3")
    w = tm.random_weights(cfg, 1)
    assert delta(cfg, w, dict(cfg, rope_scaling=None), w) > 1e-2

    cfg = tm.base_config("qwen2")
    w = tm.random_weights(cfg, 1)
    w0 = {k: (np.zeros_like(v) if k.endswith(".bias") else v) for k, v in w.items()}
    assert delta(cfg, w, cfg, w0) > 1e-2

    cfg = tm.base_config("qwen3")
    w = tm.random_weights(cfg, 1)
    w1 = {
        k: (np.ones_like(v) if k.endswith(("q_norm.weight", "k_norm.weight")) else v)
        for k, v in w.items()
    }
    assert delta(cfg, w, cfg, w1) > 1e-3


@pytest.mark.parametrize("case", list(RARE_CASES))
def test_rare_config_exact_or_refused(tmp_path, _pc, case):
    arch, overrides = RARE_CASES[case]
    config, weights = tm.write_tiny_model(tmp_path, arch, seed=_case_seed(case), **overrides)
    try:
        model = _pc.load_model(str(tmp_path))
    except (_pc.ConfigError, _pc.UnsupportedArchitectureError):
        return  # refusing is fine
    ids = _ids(_case_seed(case))
    exp_h, exp_l = ref.forward(config, weights, ids)
    assert_layers_close(
        model.hidden_states(ids),
        exp_h,
        label=f"{case} (loaded without error, so it must be exact) hidden_states",
    )
    _check_logits(model.logits(ids), exp_l, label=case)


# --------------------------------------------------------------------------- loading variants


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_loads_identically(tiny, case):
    one, config, weights, _ = tiny(case)
    three, _, weights3, d3 = tiny(case, shards=3)
    assert (Path(d3) / "model.safetensors.index.json").exists()
    assert not (Path(d3) / "model.safetensors").exists()
    for k in weights:
        np.testing.assert_array_equal(weights[k], weights3[k])
    ids = _ids(_case_seed(case) + 1)
    np.testing.assert_array_equal(three.hidden_states(ids), one.hidden_states(ids))
    np.testing.assert_array_equal(three.logits(ids), one.logits(ids))
    exp_h, _ = ref.forward(config, weights, ids)
    assert_layers_close(three.hidden_states(ids), exp_h, label=f"{case} sharded")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", list(CASES))
def test_half_precision_weight_files(tiny, case, dtype):
    tie = case == "qwen3"  # small Qwen3 checkpoints are tied; cover one tied half model
    model, config, weights, d = tiny(case, tie=tie, dtype=dtype)
    header = tm.read_safetensors_header(Path(d) / "model.safetensors")
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {
        "F16" if dtype == "float16" else "BF16"
    }
    ids = _ids(_case_seed(case) + 2)
    exp_h, exp_l = ref.forward(config, weights, ids)  # weights are the rounded values
    assert_layers_close(
        model.hidden_states(ids), exp_h, rel=HALF_REL_TOL, label=f"{case} {dtype} hidden_states"
    )
    _check_logits(model.logits(ids), exp_l, rel=HALF_REL_TOL, label=f"{case} {dtype}")


# --------------------------------------------------------------------------- pooling


@pytest.mark.parametrize("case", list(CASES) + ["qwen2_sliding_window_disabled"])
def test_pool_matches_reference_with_padding(tiny, case):
    model, config, weights, _ = tiny(case)
    s = _case_seed(case)
    # prompts of different lengths, responses of different lengths: a batch of 2 needs padding;
    # the third sample forms a second (partial) batch
    prompts = [_ids(s + 10, 5), _ids(s + 11, 9), _ids(s + 12, 3)]
    responses = [_ids(s + 20, 6), _ids(s + 21, 3), _ids(s + 22, 7)]
    poolings = ("response_avg", "prompt_avg", "prompt_last")
    out = model.pool(prompts, responses, poolings=poolings, batch_size=2)
    exp = ref.pool(config, weights, prompts, responses, poolings)
    assert set(out) == set(poolings)
    for p in poolings:
        got = np.asarray(out[p])
        assert got.dtype == np.float32
        assert got.shape == (3, config["num_hidden_layers"] + 1, config["hidden_size"]), (
            p,
            got.shape,
        )
        for k in range(3):
            assert_layers_close(got[k], exp[p][k], label=f"{case} pool {p} sample {k}")
    # batching must not change anything: batch_size=1 (no padding) gives the same numbers
    one = model.pool(prompts, responses, poolings=poolings, batch_size=1)
    for p in poolings:
        for k in range(3):
            assert_layers_close(
                np.asarray(one[p])[k],
                np.asarray(out[p])[k].astype(np.float64),
                label=f"{case} pool {p} sample {k}: batch_size=1 vs 2",
            )


# --------------------------------------------------------------------------- tokenizer files


def test_tokenizer_files_work(tiny):
    model, *_ = tiny("qwen3", True)
    vocab = tm.tokenizer_vocab(96)
    assert model.tokenizer.encode("hello world", add_special_tokens=False) == [
        vocab.index("hello"),
        vocab.index("world"),
    ]
    msgs = [{"role": "user", "content": "hello"}]
    text = model.chat_text(msgs, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    ids = model.encode_chat(msgs, add_generation_prompt=True)
    assert ids == [
        vocab.index(t)
        for t in ["<|im_start|>", "user", "hello", "<|im_end|>", "<|im_start|>", "assistant"]
    ]


# --------------------------------------------------------------------------- bad inputs


def _good_dir(tmp_path, arch="llama", **kw):
    d = tmp_path / "model"
    config, weights = tm.write_tiny_model(d, arch, **kw)
    return d, config, weights


def test_exception_hierarchy(_pc):
    for name in (
        "ConfigError",
        "UnsupportedArchitectureError",
        "InvalidModelFileError",
        "InvalidInputError",
    ):
        cls = getattr(_pc, name)
        assert issubclass(cls, _pc.PersonacoreError), name


def test_malformed_config_json(tmp_path, _pc):
    d, _, _ = _good_dir(tmp_path)
    (d / "config.json").write_text('{"hidden_size": 64, "num_hidden_layers": ')
    with pytest.raises(_pc.ConfigError):
        _pc.load_model(str(d))


@pytest.mark.parametrize("key", ["hidden_size", "num_hidden_layers", "num_attention_heads"])
def test_config_missing_key(tmp_path, _pc, key):
    d, config, _ = _good_dir(tmp_path)
    del config[key]
    tm.write_config(d, config)
    with pytest.raises(_pc.ConfigError) as ei:
        _pc.load_model(str(d))
    assert key in str(ei.value), str(ei.value)


def test_unsupported_architecture(tmp_path, _pc):
    d, config, _ = _good_dir(tmp_path)
    gpt2 = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_embd": 64,
        "n_layer": 3,
        "n_head": 4,
        "n_positions": 256,
        "vocab_size": 96,
        "layer_norm_epsilon": 1e-5,
        "activation_function": "gelu_new",
    }
    tm.write_config(d, gpt2)
    with pytest.raises(_pc.UnsupportedArchitectureError) as ei:
        _pc.load_model(str(d))
    assert "gpt2" in str(ei.value).lower(), str(ei.value)


def test_wrong_weight_shape(tmp_path, _pc):
    d, config, weights = _good_dir(tmp_path)
    name = "model.layers.1.self_attn.k_proj.weight"
    weights[name] = np.zeros((24, 64), np.float32)  # should be (2 * 16, 64)
    (d / "model.safetensors").unlink()
    tm.save_weights(d, weights)
    with pytest.raises(_pc.InvalidModelFileError) as ei:
        _pc.load_model(str(d))
    assert name in str(ei.value), str(ei.value)


@pytest.mark.parametrize(
    "name", ["model.layers.2.mlp.up_proj.weight", "lm_head.weight", "model.norm.weight"]
)
def test_missing_weight(tmp_path, _pc, name):
    d, config, weights = _good_dir(tmp_path)  # untied: lm_head.weight is required
    del weights[name]
    (d / "model.safetensors").unlink()
    tm.save_weights(d, weights)
    with pytest.raises(_pc.InvalidModelFileError) as ei:
        _pc.load_model(str(d))
    assert name in str(ei.value), str(ei.value)


def test_missing_weight_in_sharded_index(tmp_path, _pc):
    d, config, weights = _good_dir(tmp_path, shards=3)
    name = "model.layers.0.self_attn.o_proj.weight"
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    shard = idx["weight_map"][name]
    del weights[name]
    del idx["weight_map"][name]
    in_shard = {k: v for k, v in weights.items() if idx["weight_map"].get(k) == shard}
    tmp = d / "tmp"
    tmp.mkdir()
    tm.save_weights(tmp, in_shard)
    os.replace(tmp / "model.safetensors", d / shard)
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(_pc.InvalidModelFileError) as ei:
        _pc.load_model(str(d))
    assert name in str(ei.value), str(ei.value)


@pytest.mark.parametrize("keep", [0.6, 20], ids=["truncated_data", "truncated_header"])
def test_truncated_safetensors(tmp_path, _pc, keep):
    d, _, _ = _good_dir(tmp_path)
    f = d / "model.safetensors"
    data = f.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    f.write_bytes(data[:n])
    with pytest.raises(_pc.InvalidModelFileError):
        _pc.load_model(str(d))


@pytest.mark.parametrize(
    "bad", [[5, 96, 7], [5, -1, 7], [10**6], []], ids=["id_eq_vocab", "negative", "huge", "empty"]
)
@pytest.mark.parametrize("method", ["hidden_states", "logits"])
def test_bad_token_ids(tiny, _pc, method, bad):
    model, *_ = tiny("qwen2")
    with pytest.raises(_pc.InvalidInputError):
        getattr(model, method)(bad)


def test_bad_token_ids_in_pool(tiny, _pc):
    model, *_ = tiny("qwen2")
    with pytest.raises(_pc.InvalidInputError):
        model.pool([[1, 2, 3]], [[4, 96]])
    with pytest.raises(_pc.InvalidInputError):
        model.pool([[1, -2, 3]], [[4, 5]])


# --------------------------------------------------------------------------- the reference itself


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("case", list(ALL_CASES) + list(RARE_CASES))
def test_numpy_reference_matches_transformers(tmp_path, case, tie):
    """The numpy reference equals transformers (float64, with its float32 RMSNorm / rope /
    softmax internals lifted to float64). Runs only where torch + transformers are installed."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    arch, overrides = {**ALL_CASES, **RARE_CASES}[case]
    config, weights = tm.write_tiny_model(
        tmp_path, arch, seed=_case_seed(case), tie_word_embeddings=tie, **overrides
    )
    ids = _ids(_case_seed(case))
    h, lg = ref.forward(config, weights, ids)
    th, tl = ref.transformers_forward(tmp_path, ids)
    assert_layers_close(th, h, rel=1e-10, label=f"{case} transformers")
    _check_logits(tl, lg, rel=1e-10, label=f"{case} transformers")
