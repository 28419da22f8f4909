"""Persona vector files: .safetensors (ours), .pt (persona_vectors, with and without torch), .gguf
(llama.cpp / repeng control vectors): round trips, metadata fidelity, interop, typed errors."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import stat
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from personacore.errors import PersonacoreError, PersonacoreIOError
from personacore.vectors import PersonaVector
from personacore.vectors.io import VectorFormatError, VectorNotFoundError, load_vector, save_vector
from personacore.vectors.io import pt as pt_format

L, H = 6, 8


def _vector(layer=3, name="snark") -> PersonaVector:
    rng = np.random.default_rng(7)
    meta = {
        "model": "SmolLM2-135M-Instruct",
        "trait": "snarky",
        "method": "mean_diff",
        "pooling": "response_avg",
        "counts": {"rollouts": 40, "kept_pos": 18, "kept_neg": 19},
        "stats": {
            "auroc": [0.5, 0.91, 0.97, 1.0, 0.88, 0.7, 0.6],
            "cohens_d": [0.1, 1e-300, 2.5e17, -0.0],
        },
        "settings": {"temperature": 1.0, "seed": 0, "questions": 20},
        "judge": None,
        "flag": True,
        "array": np.arange(4, dtype=np.float32) / 3,
        "scalar": np.float32(0.1),
        "nested": [[1, 2], {"a": "é"}],
    }
    return PersonaVector(
        rng.standard_normal((L + 1, H)).astype(np.float32), layer=layer, name=name, metadata=meta
    )


def _expected_metadata(v: PersonaVector) -> dict:
    m = dict(v.metadata)
    m["array"] = [float(x) for x in np.asarray(m["array"])]
    m["scalar"] = float(m["scalar"])
    return m


needs_torch = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None, reason="writing .pt needs torch"
)
FORMATS = ["safetensors", pytest.param("pt", marks=needs_torch), "gguf"]


# ------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("ext", FORMATS)
def test_round_trip_directions(tmp_path, ext):
    v = _vector()
    path = v.save(tmp_path / f"v.{ext}")
    assert path == tmp_path / f"v.{ext}" and path.exists()
    w = PersonaVector.load(path)
    assert w.directions.dtype == np.float32 and w.shape == v.shape
    np.testing.assert_array_equal(w.directions, v.directions)  # exact, even for the .gguf
    assert [p.name for p in tmp_path.iterdir()] == [f"v.{ext}"]  # no temporary file left behind


@pytest.mark.parametrize("ext", ["safetensors", "gguf"])
def test_metadata_round_trips_exactly(tmp_path, ext):
    v = _vector()
    w = load_vector(save_vector(v, tmp_path / f"v.{ext}"))
    assert (w.name, w.layer) == ("snark", 3)
    assert w.metadata == _expected_metadata(v)
    assert json.dumps(w.metadata) == json.dumps(
        _expected_metadata(v)
    )  # float bits and key order too
    nan = PersonaVector(v.directions, metadata={"x": float("nan"), "inf": float("-inf")})
    back = load_vector(save_vector(nan, tmp_path / f"nan.{ext}")).metadata
    assert np.isnan(back["x"]) and back["inf"] == float("-inf")


@needs_torch
def test_pt_has_no_metadata_and_takes_overrides(tmp_path):
    p = save_vector(_vector(), tmp_path / "evil_response_avg_diff.pt")
    w = load_vector(p)
    assert (w.name, w.layer, w.metadata) == ("evil_response_avg_diff", None, {})
    w = load_vector(p, name="evil", layer=4)
    assert (w.name, w.layer) == ("evil", 4)


def test_safetensors_header(tmp_path):
    from safetensors import safe_open

    p = save_vector(_vector(), tmp_path / "v.safetensors")
    with safe_open(str(p), framework="np") as f:
        assert list(f.keys()) == ["directions"]
        header = f.metadata()
        assert f.get_tensor("directions").dtype == np.float32
    assert header["format_version"] == "1" and header["layer"] == "3" and header["name"] == "snark"
    assert header["trait"] == "snarky" and header["model"] == "SmolLM2-135M-Instruct"
    payload = json.loads(header["personacore"])
    assert payload["layer"] == 3 and payload["metadata"]["counts"]["kept_neg"] == 19


def test_foreign_safetensors(tmp_path):
    from safetensors.numpy import save_file

    arr = np.ones((L + 1, H), np.float32)
    save_file({"vec": arr}, str(tmp_path / "x.safetensors"), metadata={"source": "elsewhere"})
    w = load_vector(tmp_path / "x.safetensors")
    assert w.name == "x" and w.metadata == {"source": "elsewhere"}
    np.testing.assert_array_equal(w.directions, arr)
    save_file({"a": arr, "b": arr}, str(tmp_path / "two.safetensors"))
    with pytest.raises(VectorFormatError, match="no 'directions' tensor"):
        load_vector(tmp_path / "two.safetensors")


@needs_torch
def test_format_override_and_cross_format(tmp_path):
    v = _vector()
    save_vector(v, tmp_path / "vec.bin", format="pt")
    np.testing.assert_array_equal(
        load_vector(tmp_path / "vec.bin", format="pt").directions, v.directions
    )
    g = load_vector(save_vector(v, tmp_path / "v.gguf"))
    s = load_vector(save_vector(g, tmp_path / "v.safetensors"))
    t = load_vector(save_vector(s, tmp_path / "v.pt"))
    for x in (g, s, t):
        np.testing.assert_array_equal(x.directions[2:L], v.directions[2:L])  # the steerable rows
    assert s.metadata == g.metadata == _expected_metadata(v)


# ------------------------------------------------------------------------------------------ .pt


def _no_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # "import torch" now raises ImportError
    assert pt_format._torch() is None


def test_pt_writing_without_torch_says_how_to_get_it(tmp_path, monkeypatch):
    _no_torch(monkeypatch)
    with pytest.raises(VectorFormatError, match=r"needs torch \(pip install torch"):
        save_vector(_vector(), tmp_path / "v.pt")
    assert list(tmp_path.iterdir()) == []


def test_pt_written_by_torch_loads_without_torch(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    t = torch.randn(7, 8)
    torch.save(t, tmp_path / "f32.pt")
    torch.save(t.to(torch.bfloat16), tmp_path / "bf16.pt")
    torch.save(t.double(), tmp_path / "f64.pt")
    torch.save(torch.nn.Parameter(t), tmp_path / "param.pt")
    view = torch.randn(9, 8)[1:8]  # a view with a storage offset
    torch.save(view, tmp_path / "view.pt")
    torch.save(t.t().contiguous().t(), tmp_path / "strided.pt")  # non-contiguous strides
    torch.save({"v": t}, tmp_path / "dict.pt")
    torch.save(torch.zeros(2, 3, dtype=torch.int64), tmp_path / "i64.pt")
    v = _vector()
    ours = save_vector(v, tmp_path / "ours.pt")  # torch.save, through personacore
    f32, bf16 = t.numpy().copy(), t.to(torch.bfloat16).float().numpy()
    _no_torch(monkeypatch)
    for name in ("f32", "f64", "param", "strided"):
        np.testing.assert_allclose(
            load_vector(tmp_path / f"{name}.pt").directions, f32, rtol=0, atol=1e-7
        )
    np.testing.assert_array_equal(load_vector(tmp_path / "bf16.pt").directions, bf16)
    np.testing.assert_array_equal(load_vector(tmp_path / "view.pt").directions, view.numpy())
    np.testing.assert_array_equal(load_vector(ours).directions, v.directions)
    with pytest.raises(VectorFormatError, match="not a bare tensor"):
        load_vector(tmp_path / "dict.pt")
    with pytest.raises(VectorFormatError, match="LongStorage is not allowed"):
        load_vector(tmp_path / "i64.pt")


def _malicious_pt(path: Path, marker: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps(Evil(), protocol=2))
        zf.writestr("archive/version", "3\n")


def test_pt_reader_never_runs_foreign_pickles(tmp_path, monkeypatch):
    _no_torch(monkeypatch)
    marker = tmp_path / "pwned"
    _malicious_pt(tmp_path / "evil.pt", marker)
    with pytest.raises(VectorFormatError, match="not allowed"):
        load_vector(tmp_path / "evil.pt")
    assert not marker.exists()


def test_pt_holding_a_dict_is_refused_without_torch(tmp_path, monkeypatch):
    _no_torch(monkeypatch)
    with zipfile.ZipFile(tmp_path / "d.pt", "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"layer_20": [1.0, 2.0]}, protocol=2))
    with pytest.raises(VectorFormatError, match="holds a dict, not a bare tensor"):
        load_vector(tmp_path / "d.pt")


def test_pt_with_torch_installed(tmp_path):
    """The torch code path: torch.save to write, torch.load(weights_only=True) to read."""
    torch = pytest.importorskip("torch")
    assert pt_format._torch() is torch
    v = PersonaVector(np.random.default_rng(0).standard_normal((5, 4)), layer=2)
    p = v.save(tmp_path / "t.pt")
    assert torch.equal(torch.load(p, weights_only=True), torch.from_numpy(v.directions.copy()))
    np.testing.assert_array_equal(PersonaVector.load(p).directions, v.directions)
    torch.save({"a": torch.zeros(2, 2)}, tmp_path / "d.pt")
    torch.save(torch.zeros(3, 2, dtype=torch.int64), tmp_path / "i.pt")
    marker = tmp_path / "pwned"
    _malicious_pt(tmp_path / "e.pt", marker)
    for name, msg in (("d", "not a bare tensor"), ("i", "floating-point"), ("e", "with torch")):
        with pytest.raises(VectorFormatError, match=msg):
            PersonaVector.load(tmp_path / f"{name}.pt")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------- .gguf


def test_gguf_readable_by_gguf_package(tmp_path):
    gguf = pytest.importorskip("gguf")
    v = _vector()
    p = save_vector(v, tmp_path / "v.gguf")
    r = gguf.GGUFReader(str(p))
    f = r.fields
    assert f["general.architecture"].contents() == "controlvector"
    assert f["controlvector.model_hint"].contents() == "SmolLM2-135M-Instruct"
    assert f["controlvector.layer_count"].types == [gguf.GGUFValueType.UINT32]
    # rows 2..L-1 as direction.1..direction.(L-2): direction.N is added to llama.cpp's 0-based layer N
    names = [t.name for t in r.tensors]
    assert names == [f"direction.{n}" for n in range(1, L - 1)]
    assert f["controlvector.layer_count"].contents() == len(names)
    for t in r.tensors:
        n = int(t.name.split(".")[1])
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and list(t.shape) == [H]
        np.testing.assert_array_equal(np.asarray(t.data), v.directions[n + 1])


def _write_repeng_style(path: Path, dirs: dict, layer_count, int32=False, hint="llama"):
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "controlvector")
    w.add_string("controlvector.model_hint", hint)
    (w.add_int32 if int32 else w.add_uint32)("controlvector.layer_count", layer_count)
    for k, arr in dirs.items():
        w.add_tensor(f"direction.{k}", arr.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("int32", [False, True])
def test_gguf_from_repeng_and_llama_cpp(tmp_path, int32):
    # repeng (uint32) and llama.cpp's cvector-generator (int32) write direction.1..(L-1), layer_count = L-1
    rng = np.random.default_rng(1)
    dirs = {k: rng.standard_normal(H) for k in range(1, L)}
    _write_repeng_style(tmp_path / "r.gguf", dirs, L - 1, int32=int32)
    w = load_vector(tmp_path / "r.gguf")
    assert w.shape == (L + 1, H) and w.name == "r" and w.layer is None
    assert w.metadata == {"model": "llama", "gguf_layer_count": L - 1}
    np.testing.assert_array_equal(w.directions[:2], 0)
    for k, arr in dirs.items():
        np.testing.assert_array_equal(w.directions[k + 1], arr.astype(np.float32))


def test_gguf_partial_layers_and_num_layers(tmp_path):
    rng = np.random.default_rng(2)
    dirs = {k: rng.standard_normal(H) for k in (2, 3)}  # repeng with hidden_layers=[2, 3]
    _write_repeng_style(tmp_path / "p.gguf", dirs, 2)
    assert load_vector(tmp_path / "p.gguf").shape == (5, H)  # inferred from direction.3
    w = load_vector(tmp_path / "p.gguf", num_layers=12)
    assert w.shape == (13, H)
    np.testing.assert_array_equal(w.directions[4], dirs[3].astype(np.float32))
    with pytest.raises(VectorFormatError, match="needs at least 4 layers"):
        load_vector(tmp_path / "p.gguf", num_layers=3)


def test_gguf_model_file_and_bad_tensors_are_refused(tmp_path):
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(VectorFormatError, match="not 'controlvector'"):
        load_vector(tmp_path / "m.gguf")
    _write_repeng_style(tmp_path / "2d.gguf", {1: np.zeros((2, H))}, 1)
    with pytest.raises(VectorFormatError, match="expected 1-D"):
        load_vector(tmp_path / "2d.gguf")
    _write_repeng_style(tmp_path / "n.gguf", {1: np.zeros(H), 2: np.zeros(H + 1)}, 2)
    with pytest.raises(VectorFormatError, match="different lengths"):
        load_vector(tmp_path / "n.gguf")


def test_gguf_model_hint_argument_and_warning(tmp_path):
    gguf = pytest.importorskip("gguf")
    v = PersonaVector(np.ones((L + 1, H), np.float32), layer=1)
    with pytest.warns(UserWarning, match="not addressable by a llama.cpp control vector"):
        p = save_vector(v, tmp_path / "v.gguf", model_hint="qwen2")
    assert gguf.GGUFReader(str(p)).fields["controlvector.model_hint"].contents() == "qwen2"
    assert load_vector(p) == v


# --------------------------------------------------------------------------------------- errors


def test_unknown_extension_lists_supported(tmp_path):
    with pytest.raises(VectorFormatError, match=r"\.safetensors, \.pt, \.gguf"):
        save_vector(_vector(), tmp_path / "v.npy")
    with pytest.raises(VectorFormatError, match="no extension"):
        load_vector(tmp_path / "v")
    assert issubclass(VectorFormatError, PersonacoreError) and issubclass(
        VectorFormatError, ValueError
    )


@pytest.mark.parametrize("ext", ["safetensors", "pt", "gguf"])
def test_missing_file(tmp_path, ext):
    with pytest.raises(VectorNotFoundError, match="not found") as e:
        load_vector(tmp_path / f"nope.{ext}")
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, PersonacoreIOError)


@pytest.mark.parametrize("ext", FORMATS)
def test_corrupt_and_truncated_files(tmp_path, ext):
    (tmp_path / f"junk.{ext}").write_bytes(os.urandom(300))
    with pytest.raises(VectorFormatError):
        load_vector(tmp_path / f"junk.{ext}")
    good = save_vector(_vector(), tmp_path / f"good.{ext}").read_bytes()
    (tmp_path / f"cut.{ext}").write_bytes(good[: len(good) * 2 // 3])
    with pytest.raises(VectorFormatError):
        load_vector(tmp_path / f"cut.{ext}")


def test_wrong_dtype_shape_and_nan(tmp_path):
    from safetensors.numpy import save_file

    for name, arr, msg in (
        ("1d", np.zeros(H, np.float32), "2-D"),
        ("int", np.zeros((3, H), np.int32), "dtype int32"),
        ("nan", np.full((3, H), np.nan, np.float32), "NaN"),
    ):
        save_file({"directions": arr}, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(VectorFormatError, match=msg):
            load_vector(tmp_path / f"{name}.safetensors")


def test_failed_save_keeps_the_old_file(tmp_path):
    p = save_vector(_vector(), tmp_path / "v.safetensors")
    before = p.read_bytes()
    bad = PersonaVector(np.zeros((L + 1, H)), metadata={"obj": object()})
    for ext in ("safetensors", "gguf"):
        with pytest.raises(VectorFormatError, match="metadata cannot be stored"):
            save_vector(bad, tmp_path / f"v.{ext}")
    assert p.read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["v.safetensors"]
    with pytest.raises(PersonacoreIOError, match="does not exist"):
        save_vector(_vector(), tmp_path / "no" / "such" / "v.safetensors")


@pytest.mark.parametrize("umask", [0o022, 0o027])
@pytest.mark.parametrize("ext", FORMATS)
def test_saved_files_honour_the_umask(tmp_path, ext, umask):
    """A new file and a replaced one both get ``0o666 & ~umask``, as a plain ``open()`` would give."""
    old = os.umask(umask)
    try:
        p = save_vector(_vector(), tmp_path / f"v.{ext}")
        first = stat.S_IMODE(p.stat().st_mode)
        os.chmod(p, 0o600)
        save_vector(_vector(), p)
        second = stat.S_IMODE(p.stat().st_mode)
    finally:
        os.umask(old)
    assert (oct(first), oct(second)) == (oct(0o666 & ~umask), oct(0o666 & ~umask))


def test_save_needs_a_vector(tmp_path):
    with pytest.raises(VectorFormatError, match="needs a PersonaVector"):
        save_vector(np.zeros((3, 4)), tmp_path / "v.pt")
