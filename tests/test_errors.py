"""Bad files and bad input raise the documented PersonacoreError subclasses with clear messages.

Tiny models (2 layers, hidden 64, a 300-token byte-level BPE vocabulary, random weights) are built
here as Hugging Face directories and GGUF files; each negative case has a positive control that
loads, so the failure is known to come from the one thing that was broken.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

import personacore as pc
from personacore import errors

V, H, LAYERS, HEADS, KV_HEADS, FFN = 300, 64, 2, 4, 2, 128
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


# ---- tiny model builders ---------------------------------------------------------------------
def _bytes_to_unicode() -> dict:
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiny_vocab():
    """(tokens, merges, token_types): 256 byte tokens, 40 merges, 4 special tokens = 300."""
    tokens = [_bytes_to_unicode()[b] for b in range(256)]
    merges = []
    letters = "etaoinshrd"
    for a in letters:
        for b in letters:
            if len(merges) < 40 and a != b:
                merges.append(f"{a} {b}")
                tokens.append(a + b)
    tokens += SPECIALS
    types = [1] * (len(tokens) - len(SPECIALS)) + [3] * len(SPECIALS)
    assert len(tokens) == V
    return tokens, merges, types


def tiny_weights(seed: int = 0) -> dict:
    """HF-named llama weights (tied embeddings), float32."""
    rng = np.random.default_rng(seed)
    hd = H // HEADS
    w = {"model.embed_tokens.weight": rng.standard_normal((V, H)), "model.norm.weight": np.ones(H)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = np.ones(H)
        w[p + "post_attention_layernorm.weight"] = np.ones(H)
        w[p + "self_attn.q_proj.weight"] = rng.standard_normal((H, H)) * 0.1
        w[p + "self_attn.k_proj.weight"] = rng.standard_normal((KV_HEADS * hd, H)) * 0.1
        w[p + "self_attn.v_proj.weight"] = rng.standard_normal((KV_HEADS * hd, H)) * 0.1
        w[p + "self_attn.o_proj.weight"] = rng.standard_normal((H, H)) * 0.1
        w[p + "mlp.gate_proj.weight"] = rng.standard_normal((FFN, H)) * 0.1
        w[p + "mlp.up_proj.weight"] = rng.standard_normal((FFN, H)) * 0.1
        w[p + "mlp.down_proj.weight"] = rng.standard_normal((H, FFN)) * 0.1
    return {k: v.astype(np.float32) for k, v in w.items()}


def tiny_config(**overrides) -> dict:
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": H,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": V,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "bos_token_id": 297,
        "eos_token_id": 298,
        "torch_dtype": "float32",
    }
    cfg.update(overrides)
    return cfg


def tiny_tokenizer_json() -> dict:
    tokens, merges, _ = tiny_vocab()
    n_normal = V - len(SPECIALS)
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": n_normal + k,
                "content": t,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for k, t in enumerate(SPECIALS)
        ],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": True,
            "use_regex": True,
        },
        "post_processor": None,
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": True,
            "use_regex": True,
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(tokens[:n_normal])},
            "merges": merges,
        },
    }


def write_tiny_hf(d: Path, config: dict = None, chat_template: str = CHATML) -> Path:
    """A complete tiny Hugging Face model directory."""
    from safetensors.numpy import save_file

    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config or tiny_config()))
    save_file(tiny_weights(), str(d / "model.safetensors"))
    (d / "tokenizer.json").write_text(json.dumps(tiny_tokenizer_json()))
    tcfg = {
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|pad|>",
        "model_max_length": 128,
        "tokenizer_class": "GPT2Tokenizer",
    }
    if chat_template is not None:
        tcfg["chat_template"] = chat_template
    (d / "tokenizer_config.json").write_text(json.dumps(tcfg))
    return d


def write_tiny_gguf(path: Path, pre: str = "smollm") -> Path:
    """A tiny llama GGUF (f32 tensors, GPT-2 style BPE tokenizer with pre-tokenizer ``pre``)."""
    gguf = pytest.importorskip("gguf")
    tokens, merges, types = tiny_vocab()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-test")
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(H)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(H // HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(V)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(297)
    w.add_eos_token_id(298)
    w.add_pad_token_id(299)
    w.add_add_bos_token(False)
    w.add_file_type(0)  # all f32
    w.add_chat_template(CHATML)
    hf = tiny_weights()
    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    w.add_tensor("token_embd.weight", hf["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", hf["model.norm.weight"])
    for i in range(LAYERS):
        for hf_name, g_name in names.items():
            w.add_tensor(f"blk.{i}.{g_name}.weight", hf[f"model.layers.{i}.{hf_name}.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def raises(exc, fn, *args, **kwargs):
    """Call ``fn``; assert it raises ``exc`` (a PersonacoreError); return the message."""
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, errors.PersonacoreError)
    return str(info.value)


# ---- the error classes -----------------------------------------------------------------------
EXPECTED_BASES = {
    "ModelNotFoundError": FileNotFoundError,
    "PersonacoreIOError": OSError,
    "InvalidModelFileError": ValueError,
    "ConfigError": ValueError,
    "UnsupportedArchitectureError": ValueError,
    "TokenizerError": ValueError,
    "ChatTemplateError": ValueError,
    "InvalidInputError": ValueError,
    "ComputeError": RuntimeError,
    "InternalError": RuntimeError,
    "DownloadError": OSError,
    "ModelMismatchError": ValueError,
}


@pytest.mark.parametrize("name", sorted(EXPECTED_BASES))
def test_error_class_hierarchy(name):
    cls = getattr(errors, name)
    assert getattr(pc, name) is cls
    assert issubclass(cls, pc.PersonacoreError) and issubclass(cls, EXPECTED_BASES[name])
    assert cls.__doc__ and cls.__doc__.strip()


# ---- loading -----------------------------------------------------------------------------------
def test_missing_path(tmp_path):
    missing = tmp_path / "nope" / "model.gguf"
    msg = raises(pc.ModelNotFoundError, pc.load_model, missing)
    assert "model.gguf" in msg
    with pytest.raises(FileNotFoundError):
        pc.load_model(str(missing))


def test_missing_path_engine_backstop(tmp_path):
    from personacore.engine.native import native as _native

    msg = raises(pc.ModelNotFoundError, _native().load_model, str(tmp_path / "absent.gguf"))
    assert "absent.gguf" in msg


def test_hub_id_without_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    msg = raises(pc.ModelNotFoundError, pc.load_model, "SomeOrg/some-model")
    assert "SomeOrg/some-model" in msg and "hub" in msg and "local" in msg


def test_bad_path_type():
    msg = raises(pc.InvalidInputError, pc.load_model, 123)
    assert "path" in msg


@pytest.mark.parametrize(
    "kwargs,word", [({"dtype": "f64"}, "dtype"), ({"device": "tpu"}, "device")]
)
def test_bad_dtype_or_device(kwargs, word, tmp_path):
    msg = raises(pc.InvalidInputError, pc.load_model, tmp_path, **kwargs)
    assert word in msg and repr(list(kwargs.values())[0]) in msg


def test_random_bytes_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(np.random.default_rng(0).bytes(4096))
    msg = raises(pc.InvalidModelFileError, pc.load_model, p)
    assert "x.gguf" in msg


def test_truncated_gguf(tmp_path, default_model_path):
    p = tmp_path / "truncated.gguf"
    with open(default_model_path, "rb") as f:
        p.write_bytes(f.read(1 << 20))
    msg = raises(pc.InvalidModelFileError, pc.load_model, p)
    assert "truncated.gguf" in msg
    # a message, not a Rust backtrace (candle appends one when RUST_BACKTRACE is set)
    assert "candle_core::" not in msg and len(msg) < 1000, msg[:2000]


def test_tiny_hf_control_loads(tmp_path):
    model = pc.load_model(write_tiny_hf(tmp_path / "tiny"))
    assert (model.num_layers, model.hidden_size, model.vocab_size) == (LAYERS, H, V)
    ids = model.tokenizer.encode("the cat sat")
    assert model.tokenizer.decode(ids) == "the cat sat"
    assert model.hidden_states(ids).shape == (LAYERS + 1, len(ids), H)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_bad_safetensors(tmp_path, damage):
    d = write_tiny_hf(tmp_path / "tiny")
    st = d / "model.safetensors"
    if damage == "garbage":
        st.write_bytes(np.random.default_rng(1).bytes(2048))
    else:
        data = st.read_bytes()
        st.write_bytes(data[: len(data) // 2])
    msg = raises(pc.InvalidModelFileError, pc.load_model, d)
    assert "model.safetensors" in msg


def test_malformed_config_json(tmp_path):
    d = write_tiny_hf(tmp_path / "tiny")
    (d / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    msg = raises(pc.ConfigError, pc.load_model, d)
    assert "config" in msg.lower()


def test_config_missing_field(tmp_path):
    cfg = tiny_config()
    del cfg["hidden_size"]
    d = write_tiny_hf(tmp_path / "tiny", config=cfg)
    msg = raises(pc.ConfigError, pc.load_model, d)
    assert "hidden_size" in msg


def test_unsupported_architecture(tmp_path):
    cfg = tiny_config(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    d = write_tiny_hf(tmp_path / "tiny", config=cfg)
    msg = raises(pc.UnsupportedArchitectureError, pc.load_model, d)
    assert "gpt2" in msg.lower()


def test_broken_chat_template(tmp_path):
    d = write_tiny_hf(
        tmp_path / "tiny", chat_template="{% if messages %}{{ messages[0]['content'] "
    )
    with pytest.raises(pc.ChatTemplateError):
        pc.load_model(d).chat_text([{"role": "user", "content": "hi"}])


def test_no_chat_template(tmp_path):
    model = pc.load_model(write_tiny_hf(tmp_path / "tiny", chat_template=None))
    assert not model.has_chat_template
    msg = raises(pc.ChatTemplateError, model.chat_text, [{"role": "user", "content": "hi"}])
    assert "template" in msg.lower()


def test_tiny_gguf_control_loads(tmp_path):
    model = pc.load_model(write_tiny_gguf(tmp_path / "tiny.gguf", pre="smollm"))
    assert (model.architecture, model.num_layers, model.hidden_size) == ("llama", LAYERS, H)
    ids = model.tokenizer.encode("the cat sat")
    assert model.tokenizer.decode(ids) == "the cat sat"
    assert model.logits(ids).shape == (len(ids), V)


def test_unknown_gguf_pretokenizer(tmp_path):
    p = write_tiny_gguf(tmp_path / "tiny.gguf", pre="nonsense")
    msg = raises(pc.TokenizerError, pc.load_model, p)
    assert "nonsense" in msg


# ---- bad input to a loaded model ---------------------------------------------------------------
@pytest.mark.parametrize("method", ["hidden_states", "logits"])
@pytest.mark.parametrize(
    "ids,words",
    [
        ([1, -1], ["ids[1]", "-1"]),
        ([49152], ["ids[0]", "49152", "49152)"]),
        ([], ["empty"]),
        ([1, 2.5], ["ids[1]", "float"]),
        ([1, "2"], ["ids[1]", "str"]),
        ("hello", ["str"]),
        (np.array([1.0, 2.0]), ["float64"]),
        (np.zeros((2, 2), dtype=np.int64), ["1-D"]),
        ([True], ["bool"]),
    ],
)
def test_bad_ids(default_model, method, ids, words):
    msg = raises(pc.InvalidInputError, getattr(default_model, method), ids)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


def test_too_many_ids(default_model):
    n = default_model.max_position_embeddings + 1
    msg = raises(pc.InvalidInputError, default_model.hidden_states, [1] * n)
    assert str(n) in msg and "max_position_embeddings" in msg


def test_numpy_ids_accepted(default_model):
    ids = np.array([1, 9690, 198], dtype=np.int32)
    np.testing.assert_array_equal(default_model.logits(ids), default_model.logits([1, 9690, 198]))


@pytest.mark.parametrize(
    "call",
    [
        lambda core, v: core.hidden_states([v]),
        lambda core, v: core.logits([1, v]),
        lambda core, v: core.hidden_states([]),
        lambda core, v: core.pool([[1, 2, 3]], [1, 1], ["prompt_avg"], 1),
        lambda core, v: core.pool([[1, 2, 3]], [1], ["bogus"], 1),
        lambda core, v: core.pool([[1, 2, 3]], [0], ["prompt_avg"], 1),
        lambda core, v: core.pool([[1, 2, 3]], [4], ["prompt_avg"], 1),
        lambda core, v: core.pool([[1, 2, 3]], [3], ["response_avg"], 1),
        lambda core, v: core.pool([[1, v]], [1], ["prompt_avg"], 1),
        lambda core, v: core.pool([[1, 2]], [1], ["prompt_avg"], 0),
    ],
    ids=[
        "hs-vocab",
        "logits-vocab",
        "hs-empty",
        "pool-count",
        "pool-name",
        "pool-len0",
        "pool-len-over",
        "pool-empty-response",
        "pool-vocab",
        "pool-batch0",
    ],
)
def test_engine_backstop(default_model, call):
    """The engine itself rejects bad input (the Python checks are bypassed here)."""
    raises(pc.InvalidInputError, call, default_model._core, default_model.vocab_size)


def test_pool_count_mismatch(default_model):
    msg = raises(pc.InvalidInputError, default_model.pool, ["a", "b", "c"], ["x", "y"])
    assert "got 3 prompts and 2 responses" in msg


def test_pool_unknown_pooling(default_model):
    msg = raises(pc.InvalidInputError, default_model.pool, ["a"], ["b"], poolings=["mean"])
    assert "'mean'" in msg
    for name in pc.VALID_POOLINGS:
        assert name in msg


@pytest.mark.parametrize("bs", [0, -1, 1.5, True])
def test_pool_bad_batch_size(default_model, bs):
    msg = raises(pc.InvalidInputError, default_model.pool, ["a"], ["b"], batch_size=bs)
    assert "batch_size" in msg


def test_pool_empty(default_model):
    assert "empty" in raises(pc.InvalidInputError, default_model.pool, [], [])
    assert "prompts[0]" in raises(pc.InvalidInputError, default_model.pool, [""], ["b"])
    assert "prompts[1]" in raises(
        pc.InvalidInputError, default_model.pool, [[1], [1, -3]], [[2], [2]]
    )


def test_pool_empty_response(default_model):
    msg = raises(pc.InvalidInputError, default_model.pool, ["a", "b"], ["x", ""])
    assert "responses[1]" in msg and "response_avg" in msg
    out = default_model.pool(["a", "b"], ["x", ""], poolings=("prompt_avg", "prompt_last"))
    assert set(out) == {"prompt_avg", "prompt_last"}
    assert out["prompt_last"].shape == (2, 31, 576)


def test_bad_messages(default_model):
    assert "list of message dicts" in raises(pc.InvalidInputError, default_model.chat_text, "hello")
    assert "empty" in raises(pc.InvalidInputError, default_model.chat_text, [])
    assert "role" in raises(pc.InvalidInputError, default_model.chat_text, [{"content": "x"}])
    assert "messages[1]" in raises(
        pc.InvalidInputError, default_model.encode_chat, [{"role": "user", "content": "x"}, "oops"]
    )


def test_bad_tokenizer_input(default_model):
    tok = default_model.tokenizer
    assert "str" in raises(pc.InvalidInputError, tok.encode, 123)
    msg = raises(pc.InvalidInputError, tok.decode, [1, 2, tok.vocab_size])
    assert "ids[2]" in msg and str(tok.vocab_size) in msg
    assert "ids[0]" in raises(pc.InvalidInputError, tok.decode, [-5])


# ---- the engine's error map --------------------------------------------------------------------
def test_every_engine_error_variant_reaches_its_class():
    """One sample per engine variant (personacore::Error::samples), then a caught panic."""
    from personacore.engine.native import native

    samples = native()._error_samples()
    assert [type(e) for e in samples] == [
        pc.ModelNotFoundError,
        pc.PersonacoreIOError,
        pc.InvalidModelFileError,
        pc.ConfigError,
        pc.UnsupportedArchitectureError,
        pc.TokenizerError,
        pc.ChatTemplateError,
        pc.InvalidInputError,
        pc.ComputeError,
        pc.InternalError,
    ]
    assert all("sample" in str(e) for e in samples)
    assert "please report" in str(samples[-1])
