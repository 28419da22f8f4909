"""What the first import of the compiled engine logs about its CPU kernels (engine/native.py).

The CPU is stood in for by patching ``platform.machine`` and the engine's ``avx2_enabled``: the
real runs are an x86 host here, ``scripts/check-old-cpu.sh`` (x86 without AVX2) and
``scripts/check-aarch64.sh --python`` (ARM).
"""

from __future__ import annotations

import logging

import pytest

import personacore._core as core
from personacore.engine import native as native_module


def first_import_records(monkeypatch, caplog, machine: str, avx2: bool) -> list:
    """The records `native()` logs on its first call on a `machine` CPU with or without AVX2."""
    monkeypatch.setattr(native_module, "_LOGGED_BUILD", False)
    monkeypatch.setattr(native_module.platform, "machine", lambda: machine)
    monkeypatch.setattr(core, "avx2_enabled", lambda: avx2)
    with caplog.at_level(logging.INFO, logger="personacore"):
        native_module.native()
    return [r for r in caplog.records if r.name == "personacore"]


@pytest.mark.parametrize("machine", ["aarch64", "arm64"])
def test_an_arm_cpu_is_not_warned_about(monkeypatch, caplog, machine):
    records = first_import_records(monkeypatch, caplog, machine, avx2=False)
    assert len(records) == 1
    assert records[0].levelno == logging.INFO
    message = records[0].getMessage()
    assert machine in message and "x86-64 only" in message
    assert "SSE2" not in message and "AVX2 on" not in message


def test_an_x86_cpu_without_avx2_is_warned_about(monkeypatch, caplog):
    records = first_import_records(monkeypatch, caplog, "x86_64", avx2=False)
    assert [r.levelno for r in records] == [logging.WARNING]
    assert "no AVX2" in records[0].getMessage()


def test_an_x86_cpu_with_avx2_is_logged_as_info(monkeypatch, caplog):
    records = first_import_records(monkeypatch, caplog, "x86_64", avx2=True)
    assert [r.levelno for r in records] == [logging.INFO]
    assert "AVX2 on" in records[0].getMessage()


def test_only_the_first_import_logs(monkeypatch, caplog):
    first_import_records(monkeypatch, caplog, "aarch64", avx2=False)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="personacore"):
        native_module.native()
    assert [r for r in caplog.records if r.name == "personacore"] == []
