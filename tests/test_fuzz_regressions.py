"""Regression tests for what fuzzing (``scripts/fuzz.py``, harnesses in ``fuzz/``) found.

Each test feeds the input that crashed or hung, or one built the same way, to the public entry
point, and checks the typed error (or the clean load) that replaced the crash. The inputs the
fuzzer wrote are in ``tests/data/fuzz/``. The deep-JSON cases were found while writing the
harnesses (``json.loads`` raises ``RecursionError``, which no reader caught); the fuzz seeds now
include such a document.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import personacore as pc
from personacore.errors import InvalidInputError, PersonacoreError, PersonacoreIOError
from personacore.extract.traits import TraitError
from personacore.steering import AuditLogWarning
from personacore.vectors.io import VectorFormatError
from personacore.vectors.io import pt as pt_format

DATA = Path(__file__).parent / "data" / "fuzz"
TESTS = Path(__file__).parent
DEEP = "[" * 5000 + "]" * 5000


def _run_python(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (a Rust abort would kill pytest itself)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=TESTS,
    )


# ---- model files: a huge declared context ---------------------------------------------------------
def _patch_gguf_u32(data: bytes, key: str, value: int) -> bytes:
    """``data`` with the uint32 metadata value of ``key`` replaced (the key must be uint32)."""
    k = key.encode()
    at = data.index(struct.pack("<Q", len(k)) + k) + 8 + len(k)
    assert struct.unpack_from("<I", data, at)[0] == 4, "not a uint32 value"
    return data[: at + 4] + struct.pack("<I", value) + data[at + 8 :]


def test_gguf_model_declaring_a_four_billion_token_context_loads_without_tables(tmp_path):
    """The rope tables were built for every position of the declared context at load: a GGUF
    saying ``context_length`` 50,331,776 took 27 s and gigabytes (fuzzing: a hang), 2**32 - 1
    would abort on allocation. The rows are now computed for the positions a forward reads."""
    pytest.importorskip("gguf")
    from test_errors import write_tiny_gguf

    seed = write_tiny_gguf(tmp_path / "tiny.gguf").read_bytes()
    path = tmp_path / "huge-context.gguf"
    path.write_bytes(_patch_gguf_u32(seed, "llama.context_length", 2**32 - 1))
    r = _run_python(
        f"""
        import personacore as pc
        m = pc.load_model({str(path)!r})
        print(m.max_position_embeddings, m.logits([1, 2, 3]).shape)
        """
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == [str(2**32 - 1), "(3,", "300)"]


def test_config_json_declaring_a_huge_context_gives_the_same_logits(tmp_path):
    """``max_position_embeddings`` 2**40 in config.json: the load would have asked for 35 TB.
    Now it loads, and a forward pass equals the same model's with the real context (the rope rows
    of the positions read are the same numbers either way)."""
    from tiny_models import write_tiny_model

    write_tiny_model(tmp_path / "small", "llama3")
    write_tiny_model(tmp_path / "huge", "llama3", max_position_embeddings=2**40)
    r = _run_python(
        f"""
        import numpy as np, personacore as pc
        small = pc.load_model({str(tmp_path / "small")!r})
        huge = pc.load_model({str(tmp_path / "huge")!r})
        ids = list(range(4, 40))
        print(huge.max_position_embeddings,
              np.array_equal(small.logits(ids), huge.logits(ids)))
        """
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == [str(2**40), "True"]


# ---- control vectors -----------------------------------------------------------------------------
def test_gguf_vector_with_a_huge_array_count_is_refused_at_once():
    """gguf.GGUFReader looped for hours over an array claiming 4.7e18 items (fuzzing: a hang)."""
    with pytest.raises(VectorFormatError, match="does not fit in the file"):
        pc.PersonaVector.load(DATA / "gguf_vector_huge_array.gguf")


@pytest.mark.parametrize("name", ["gguf_vector_terabyte_depth.gguf", "gguf_vector_slow_depth.gguf"])
def test_gguf_vector_declaring_millions_of_layers_is_refused(name):
    """personacore.num_layers 4294377475 made numpy allocate a terabyte (MemoryError escaped);
    4194307 took half a minute (a hang). A depth over MAX_LAYERS is now a format error."""
    with pytest.raises(VectorFormatError, match="expected an integer in 0..65536"):
        pc.PersonaVector.load(DATA / name)


def test_gguf_vector_direction_index_beyond_any_depth_is_refused(tmp_path):
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(tmp_path / "v.gguf"), "controlvector")
    w.add_string("controlvector.model_hint", "llama")
    w.add_uint32("controlvector.layer_count", 1)
    w.add_tensor("direction.4000000000", np.ones(8, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(VectorFormatError, match="beyond any model's depth"):
        pc.PersonaVector.load(tmp_path / "v.gguf")


def test_gguf_layout_check_refuses_truncations_of_a_real_vector(tmp_path):
    """Every prefix of a real control vector is refused with VectorFormatError, never a hang."""
    v = pc.PersonaVector(np.ones((4, 8), np.float32), layer=2, name="v")
    path = tmp_path / "v.gguf"
    v.save(path)
    whole = path.read_bytes()
    for cut in range(0, len(whole), 7):
        path.write_bytes(whole[:cut])
        with pytest.raises(VectorFormatError):
            pc.PersonaVector.load(path)
    path.write_bytes(whole)
    assert pc.PersonaVector.load(path).shape == (4, 8)


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("pt_zip_bad_header.pt", "Bad magic number"),  # BadZipFile from reading a record
        ("pt_zip_bad_name.pt", "not a torch zip archive"),  # UnicodeDecodeError in the directory
        ("pt_zip_bad_offset.pt", "Invalid argument"),  # OSError: a seek before the start
        ("pt_zip_unsupported_version.pt", "zip file version"),  # NotImplementedError
    ],
)
def test_pt_reader_without_torch_refuses_corrupt_zips(name, fragment):
    """The reader for users without torch let zipfile's errors escape (fuzzing: 4 kinds)."""
    with pytest.raises(VectorFormatError, match=fragment):
        pt_format._read_pt_without_torch(DATA / name)
    with pytest.raises(VectorFormatError):  # and through the public API (torch or not)
        pc.PersonaVector.load(DATA / name)


def test_vector_metadata_nested_too_deeply_is_a_format_error(tmp_path):
    from personacore.vectors.io import parse_header_json

    with pytest.raises(VectorFormatError, match="nested too deeply"):
        parse_header_json(DEEP, "v.safetensors")


# ---- traits, samples, audit logs -----------------------------------------------------------------
def test_trait_file_nested_too_deeply_is_a_trait_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text(DEEP)
    with pytest.raises(TraitError, match="nested too deeply"):
        pc.Trait.load(path)


def test_jsonl_sample_nested_too_deeply_is_a_bad_sample(tmp_path):
    from personacore.screen import BadSample, iter_samples

    good = {"prompt": "a", "response": "b"}
    path = tmp_path / "s.jsonl"
    path.write_text(DEEP + "\n" + json.dumps(good) + "\n")
    out = list(iter_samples(path))
    assert isinstance(out[0], BadSample) and "nested too deeply" in out[0].reason
    assert out[1].response == "b"


def test_audit_log_line_nested_too_deeply_is_skipped_with_a_warning(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.write_text(DEEP + "\n")
    with pytest.warns(AuditLogWarning, match="damaged line 1"):
        assert pc.read_audit_log(path) == []


@pytest.mark.parametrize(
    "name, error",
    [
        ("parquet_bad_thrift.parquet", PersonacoreIOError),  # pyarrow's OSError mid-file
        ("parquet_bad_utf8.parquet", InvalidInputError),  # UnicodeDecodeError in to_pylist
    ],
)
def test_corrupt_parquet_samples_are_typed_errors(tmp_path, name, error):
    """pyarrow's ArrowInvalid/OSError/UnicodeDecodeError escaped the sample reader (fuzzing)."""
    pytest.importorskip("pyarrow")
    from personacore.screen import count_records, iter_samples

    path = tmp_path / "s.parquet"
    shutil.copy(DATA / name, path)
    with pytest.raises(error):
        list(iter_samples(path))
    for junk in (b"", b"PAR1 not parquet at all PAR1"):
        path.write_bytes(junk)
        with pytest.raises(InvalidInputError, match="not a readable Parquet file"):
            list(iter_samples(path))
        with pytest.raises(PersonacoreError):
            count_records(path)


# ---- the server ----------------------------------------------------------------------------------
def test_request_body_nested_too_deeply_is_a_400(tmp_path):
    """json.loads raised RecursionError, which the server answered with a 500."""
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from personacore.serve import create_app
    from tiny_models import write_tiny_model

    write_tiny_model(tmp_path / "m", "llama")
    with TestClient(create_app(pc.load_model(str(tmp_path / "m")))) as client:
        r = client.post("/v1/chat/completions", content=DEEP.encode())
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "invalid_json"
        assert "nested too deeply" in r.json()["error"]["message"]


def test_tokenizer_json_that_panics_the_tokenizers_library_is_a_tokenizer_error(tmp_path):
    """tokenizers' decoder deserializer ends in ``.expect("Helper")``: a malformed ``decoder``
    panicked, and the panic reached Python as InternalError (fuzzing: 36 inputs)."""
    from personacore.errors import TokenizerError
    from tiny_models import write_tiny_model

    write_tiny_model(tmp_path, "llama")
    path = tmp_path / "tokenizer.json"
    text = json.dumps(json.loads(path.read_text()))
    assert '"decoder": null' in text
    # a syntax error where the decoder's value starts (what the fuzzer's inputs had)
    path.write_text(text.replace('"decoder": null', '"decoder": .null'))
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        pc.load_model(str(tmp_path))
