"""personacore.integrations.torch: steering hooks on a transformers model, against our engine.

A tiny random Llama / Qwen3 is built with transformers and saved as safetensors (+ the tiny
tokenizer of tiny_models); the hooked transformers forward must equal
``pc.load_model(dir).hidden_states(ids, steer=...)`` at every layer, for ``add`` and ``ablate``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import personacore as pc  # noqa: E402
import tiny_models as tm  # noqa: E402
from personacore.integrations.torch import decoder_layers, steering_hooks  # noqa: E402

NUM_LAYERS = 4
STEERED = [1, 3]
IDS = [4, 7, 9, 12, 5, 30, 31, 6, 40]


def _hf_model(arch: str, seed: int = 0):
    cfg = tm.base_config(arch)
    cfg.update(num_hidden_layers=NUM_LAYERS, initializer_range=0.1)
    cfg.pop("transformers_version")
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def saved(request, tmp_path_factory):
    """(transformers model, personacore model) with the same weights, saved as safetensors."""
    model = _hf_model(request.param)
    d = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(d)
    vocab = model.config.vocab_size
    Path(d, "tokenizer.json").write_text(json.dumps(tm.tokenizer_json(vocab)))
    Path(d, "tokenizer_config.json").write_text(json.dumps(tm.tokenizer_config(vocab)))
    return model, pc.load_model(str(d))


def _vector(hidden: int, seed: int = 1) -> pc.PersonaVector:
    rng = np.random.default_rng(seed)
    return pc.PersonaVector(rng.standard_normal((NUM_LAYERS + 1, hidden)), layer=2, name="v")


def _hf_hidden(model, ids=IDS) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    return np.stack([h[0].float().numpy() for h in out.hidden_states])


@pytest.mark.parametrize("mode", ["add", "ablate"])
def test_hooked_forward_equals_engine_at_every_layer(saved, mode):
    model, ours = saved
    vec = _vector(ours.hidden_size)
    plain = _hf_hidden(model)  # also installs transformers' own capture hooks before ours
    np.testing.assert_allclose(plain, ours.hidden_states(IDS), atol=1e-4)
    if mode == "add":
        spec, kwargs = pc.Steer(vec, 2.5, layers=STEERED), dict(coef=2.5)
    else:
        spec, kwargs = pc.Ablate(vec, layers=STEERED), {}
    with steering_hooks(model, vec, layers=STEERED, mode=mode, **kwargs) as hooks:
        assert hooks.active and hooks.layers == STEERED
        hooked = _hf_hidden(model)
    expected = ours.hidden_states(IDS, steer=[spec])
    assert hooked.shape == expected.shape == (NUM_LAYERS + 1, len(IDS), ours.hidden_size)
    scale = max(1.0, float(np.abs(expected).max()))
    for layer in range(NUM_LAYERS + 1):
        np.testing.assert_allclose(hooked[layer], expected[layer], atol=1e-5 * scale, rtol=0)
    # the steering did something from the first steered layer on, and nothing before it
    np.testing.assert_array_equal(hooked[0], plain[0])
    assert np.abs(hooked[1] - plain[1]).max() > 0.1
    if mode == "ablate":
        u = vec[1] / np.linalg.norm(vec[1])
        np.testing.assert_allclose(hooked[1] @ u, 0.0, atol=1e-5 * scale)
    # hooks are gone after the block
    np.testing.assert_array_equal(_hf_hidden(model), plain)


def _loss(model, ids=IDS):
    t = torch.tensor([ids])
    return model(t, labels=t).loss


@pytest.mark.parametrize("mode", ["add", "ablate"])
def test_gradients_flow_through_the_hooks(mode):
    model = _hf_model("llama").train()
    vec = _vector(model.config.hidden_size)
    params = dict(model.named_parameters())
    first = "model.layers.0.self_attn.q_proj.weight"  # below every steered layer

    model.zero_grad()
    _loss(model).backward()
    plain = {n: p.grad.clone() for n, p in params.items()}

    model.zero_grad()
    captured = {}

    def keep_grad(module, args, output):  # runs before our hook (both prepended, this one later)
        output.retain_grad()
        captured["h"] = output

    with steering_hooks(model, vec, coef=4.0, layers=STEERED, mode=mode):
        handle = decoder_layers(model)[0].register_forward_hook(keep_grad, prepend=True)
        try:
            _loss(model).backward()
        finally:
            handle.remove()
    for name, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert not torch.allclose(params[first].grad, plain[first])
    g = captured["h"].grad[0].numpy()  # dLoss / d(output of block 1 before the hook)
    assert np.abs(g).max() > 0
    if mode == "ablate":
        # d(x - (x·u)u)/dx = I - uuᵀ: no gradient along u reaches the block
        u = vec[1] / np.linalg.norm(vec[1])
        assert np.abs(g @ u).max() < 1e-6 * np.abs(g).max()
    # the vector is a constant: unchanged, and no parameter was added to the model
    np.testing.assert_array_equal(vec.directions, _vector(model.config.hidden_size).directions)
    assert set(dict(model.named_parameters())) == set(params)


def test_dtype_and_device_of_the_hidden_states_are_kept():
    model = _hf_model("llama").to(torch.bfloat16)
    vec = _vector(model.config.hidden_size)
    with torch.no_grad():
        plain = model(torch.tensor([IDS]), output_hidden_states=True).hidden_states
        with steering_hooks(model, vec, coef=3.0, layers=[1]):
            hooked = model(torch.tensor([IDS]), output_hidden_states=True).hidden_states
    assert all(h.dtype == torch.bfloat16 and h.device == plain[0].device for h in hooked)
    delta = (hooked[1] - plain[1])[0].float().numpy()
    expected = np.broadcast_to(3.0 * vec[1], delta.shape)
    np.testing.assert_allclose(delta, expected, atol=0.05 * np.abs(expected).max())


def test_hooks_removed_when_the_block_raises():
    model = _hf_model("llama")
    vec = _vector(model.config.hidden_size)
    plain = _hf_hidden(model)  # transformers installs its own capture hooks here
    before = [dict(block._forward_hooks) for block in decoder_layers(model)]
    hooks = steering_hooks(model, vec, coef=5.0, layers=STEERED)
    with pytest.raises(RuntimeError, match="boom"):
        with hooks:
            assert not np.allclose(_hf_hidden(model), plain)
            raise RuntimeError("boom")
    assert not hooks.active
    assert [dict(block._forward_hooks) for block in decoder_layers(model)] == before
    np.testing.assert_array_equal(_hf_hidden(model), plain)


def test_decoder_layers_found_in_a_wrapper():
    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.config = inner.config
            self.backbone = inner

    inner = _hf_model("qwen3")
    assert decoder_layers(Wrapper(inner)) is inner.model.layers
    with pytest.raises(pc.InvalidInputError, match="decoder layers"):
        decoder_layers(torch.nn.Linear(2, 2))


def test_invalid_arguments():
    model = _hf_model("llama")
    vec = _vector(model.config.hidden_size)
    for layer in (0, NUM_LAYERS):
        with pytest.raises(pc.InvalidInputError, match="not steerable"):
            steering_hooks(model, vec, layers=[layer])
    with pytest.raises(pc.InvalidInputError, match="width"):
        steering_hooks(model, np.ones((NUM_LAYERS + 1, 8)), layers=[1])
    with pytest.raises(pc.InvalidInputError, match="rows"):
        steering_hooks(model, np.ones((3, model.config.hidden_size)), layers=[1])
    with pytest.raises(pc.InvalidInputError, match="mode"):
        steering_hooks(model, vec, layers=[1], mode="cap")
    with pytest.raises(pc.InvalidInputError, match="non-zero"):
        steering_hooks(model, np.zeros(model.config.hidden_size), layers=[1], mode="ablate")
    with pytest.raises(pc.InvalidInputError, match="recommended layer"):
        steering_hooks(model, np.ones(model.config.hidden_size))
    with pytest.raises(pc.InvalidInputError, match="torch.nn.Module"):
        steering_hooks("not a model", vec, layers=[1])
    # a PersonaVector's recommended layer is used when layers is None; a tensor is accepted
    assert steering_hooks(model, vec).layers == [2]
    assert steering_hooks(model, torch.ones(model.config.hidden_size), layers=[2]).layers == [2]


def test_tuple_outputs_of_older_decoder_layers():
    """Decoder layers of older transformers return (hidden, ...) tuples: the first item is edited."""

    class Block(torch.nn.Module):
        def forward(self, x):
            return (x * 2.0, "cache")

    class Inner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Block(), Block(), Block()])

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Inner()

    toy = Toy()
    vec = np.arange(4 * 3, dtype=np.float32).reshape(4, 3) + 1.0
    x = torch.ones(1, 2, 3)
    with steering_hooks(toy, vec, coef=0.5, layers=[2]):
        out1, tag = toy.model.layers[1](x)
        out0, _ = toy.model.layers[0](x)
    assert tag == "cache"
    np.testing.assert_allclose(out1.numpy(), 2.0 + 0.5 * np.broadcast_to(vec[2], (1, 2, 3)))
    np.testing.assert_array_equal(out0.numpy(), np.full((1, 2, 3), 2.0))
