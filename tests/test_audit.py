"""Receipts (personacore.steering.audit): what an audit line records, hashes recomputed with
hashlib, reading torn logs, ``personacore audit verify``, and a log that survives SIGKILL."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import personacore as pc
from personacore.steering.audit import AuditLogWarning, model_sha256, vector_sha256
from tiny_models import write_tiny_model

PROMPT = [1, 5, 7, 9]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, its directory, a PersonaVector 'evil' that crosses threshold 0 often)."""
    d = tmp_path_factory.mktemp("audit-model")
    write_tiny_model(d, "llama", seed=0)
    model = pc.load_model(str(d))
    rng = np.random.default_rng(0)
    vec = pc.PersonaVector(
        rng.standard_normal((model.num_layers + 1, model.hidden_size)).astype(np.float32),
        layer=2,
        name="evil",
    )
    return model, d, vec


def _generate(model, vec, log, **kw):
    return model.generate(
        PROMPT,
        max_new_tokens=kw.pop("max_new_tokens", 20),
        monitor=pc.Monitor({"evil": vec}, layers=[2], thresholds={"evil": 0.0}),
        steer=pc.Steer(vec, 2.0, layers=[1], when=pc.When("evil", above=0.0)),
        audit_log=log,
        **kw,
    )


def test_every_line_names_vector_and_model_by_hash(tiny, tmp_path):
    model, d, vec = tiny
    log = tmp_path / "audit.jsonl"
    g = _generate(model, vec, log)
    events = pc.read_audit_log(log)
    assert len(events) == len(g.events) > 2
    assert {e["kind"] for e in events} >= {"alert", "steer_on"}
    # The hash definition of docs/conventions.md, written out with struct + hashlib alone.
    d2 = vec.directions
    header = ("f32le %d %d\n" % d2.shape).encode()
    expected = hashlib.sha256(header + struct.pack("<%df" % d2.size, *d2.ravel())).hexdigest()
    assert vector_sha256(vec) == expected
    for line, ev in zip(events, g.events):
        assert line["vector"] == "evil" and line["vector_sha256"] == expected
        assert line["model_sha256"] == model.sha256 == model_sha256(d)
        assert line["model"] == str(d)
        for key in ("kind", "position", "step", "layer", "score", "threshold", "coef"):
            assert line[key] == pytest.approx(getattr(ev, key)), key
        if line["kind"].startswith("steer"):
            assert line["steer"] == "evil" and line["steer_sha256"] == expected
            assert line["coef"] == 2.0
        else:
            assert line["steer_sha256"] is None


def test_model_hash_samples_large_files_like_hashlib(tmp_path):
    # vocab 20000 x hidden 64 x f32 x 2 matrices > 8 MiB: the sampled-blocks branch.
    write_tiny_model(tmp_path, "llama", seed=1, vocab_size=20000)
    big = tmp_path / "model.safetensors"
    assert big.stat().st_size > 8 << 20
    model = pc.load_model(str(tmp_path))
    assert model.sha256 == model_sha256(tmp_path)
    # One flipped byte inside a sampled block changes it; the file name and size are hashed too.
    size = big.stat().st_size
    offset = 5 * (size - 65536) // 63 + 100
    with open(big, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))
    assert model_sha256(tmp_path) != model.sha256


@pytest.mark.parametrize("policy", ["request", "event", "never"])
def test_every_fsync_policy_writes_every_event(tiny, tmp_path, policy):
    model, _, vec = tiny
    log = tmp_path / "audit.jsonl"
    g = _generate(model, vec, log, audit_fsync=policy)
    stream_events = [
        e for s in model.stream(PROMPT, max_new_tokens=5, audit_log=log) for e in s.events
    ]
    assert len(pc.read_audit_log(log)) == len(g.events) + len(stream_events)


@pytest.mark.parametrize(
    "bad, match", [("always", "audit_fsync 'always'"), (1, "audit_fsync must be")]
)
def test_bad_audit_fsync_is_rejected(tiny, tmp_path, bad, match):
    model, _, vec = tiny
    with pytest.raises(pc.InvalidInputError, match=match):
        _generate(model, vec, tmp_path / "a.jsonl", audit_fsync=bad)
    assert not (tmp_path / "a.jsonl").exists()


@pytest.mark.parametrize("policy", ["request", "event"])
def test_a_log_that_is_not_a_regular_file_is_written_without_fsync(tiny, policy):
    model, _, vec = tiny  # fsync on /dev/null fails with EINVAL: the engine skips it there
    assert _generate(model, vec, os.devnull, audit_fsync=policy).events


def test_engine_serving_writes_request_ids_and_hashes(tiny, tmp_path):
    model, _, vec = tiny
    log = tmp_path / "audit.jsonl"
    with pc.Engine(model) as engine:
        h = engine.submit(
            PROMPT,
            max_new_tokens=10,
            monitor=pc.Monitor({"evil": vec}, layers=[2], thresholds={"evil": 0.0}),
            audit_log=log,
            audit_fsync="event",
            request_id="r-1",
        )
        g = h.result()
    events = pc.read_audit_log(log)
    assert len(events) == len(g.events) > 0
    assert all(
        e["request_id"] == "r-1" and e["vector_sha256"] == vector_sha256(vec) for e in events
    )


def test_torn_last_line_is_skipped_with_a_warning_and_repaired_by_the_next_writer(tiny, tmp_path):
    model, _, vec = tiny
    log = tmp_path / "audit.jsonl"
    _generate(model, vec, log)
    n = len(pc.read_audit_log(log))
    with open(log, "ab") as f:
        f.write(b'{"kind": "alert", "seq')  # a line torn mid-write
    with pytest.warns(AuditLogWarning, match="torn last line"):
        assert len(pc.read_audit_log(log)) == n
    _generate(model, vec, log)  # the writer starts a new line: the torn one stays one damaged line
    with pytest.warns(AuditLogWarning, match=f"damaged line {n + 1}"):
        assert len(pc.read_audit_log(log)) == 2 * n


def test_reading_a_missing_log_names_it(tmp_path):
    with pytest.raises(pc.PersonacoreIOError, match="nope.jsonl"):
        pc.read_audit_log(tmp_path / "nope.jsonl")


def _audit_cli(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    cmd = [sys.executable, "-m", "personacore", "audit", "verify", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def test_audit_verify_cli_catches_a_tampered_vector_and_another_model(tiny, tmp_path):
    model, d, vec = tiny
    log = tmp_path / "audit.jsonl"
    _generate(model, vec, log)
    good = tmp_path / "evil.safetensors"
    pc.save_vector(vec, good)
    ok = _audit_cli(log, "--vector", f"evil={good}", "--model", d)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "OK" in ok.stdout and "vector evil:" in ok.stdout and "model:" in ok.stdout

    directions = vec.directions.copy()
    directions[2, 7] += 1e-3  # one value, slightly
    tampered = tmp_path / "tampered.safetensors"
    pc.save_vector(pc.PersonaVector(directions, layer=2, name="evil"), tampered)
    bad = _audit_cli(log, "--vector", f"evil={tampered}")
    assert bad.returncode == 1
    assert "MISMATCH" in bad.stdout and "vector_sha256" in bad.stdout and "FAILED" in bad.stdout

    other = tmp_path / "other-model"
    write_tiny_model(other, "llama", seed=5)
    wrong_model = _audit_cli(log, "--vector", f"evil={good}", "--model", other)
    assert wrong_model.returncode == 1 and "model_sha256" in wrong_model.stdout

    missing = _audit_cli(log, "--vector", f"evil={tmp_path / 'missing.safetensors'}")
    assert missing.returncode == 1 and "error" in missing.stderr


_CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    import personacore as pc

    model_dir, log, n_requests = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model = pc.load_model(model_dir)
    rng = np.random.default_rng(0)
    vec = pc.PersonaVector(
        rng.standard_normal((model.num_layers + 1, model.hidden_size)).astype(np.float32),
        layer=2, name="evil",
    )
    written = 0
    print("ready", flush=True)
    for i in range(n_requests):
        g = model.generate(
            [1, 5, 7, 9 + i % 50], max_new_tokens=20,
            monitor=pc.Monitor({"evil": vec}, layers=[2], thresholds={"evil": 0.0}),
            steer=pc.Steer(vec, 2.0, layers=[1], when=pc.When("evil", above=0.0)),
            audit_log=log,
        )
        written += len(g.events)
        print(written, flush=True)  # every one of these events was written before this line
    """
)


def _without_time(event):
    return {k: v for k, v in event.items() if k != "time"}


def test_sigkill_at_50_random_moments_loses_no_written_event(tiny, tmp_path):
    _, d, _ = tiny
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    n_requests = 80

    def child(log):
        cmd = [sys.executable, "-c", _CHILD, str(d), str(log), str(n_requests)]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)

    def started(log):
        p = child(log)
        assert p.stdout is not None and p.stdout.readline() == b"ready\n"
        return p, time.monotonic()

    ref_log = tmp_path / "reference.jsonl"
    ref, _ = started(ref_log)
    out, err = ref.communicate(timeout=120)
    assert ref.returncode == 0, err.decode()
    reference = [_without_time(e) for e in pc.read_audit_log(ref_log)]
    assert len(reference) == int(out.split()[-1]) > 300

    rnd = random.Random(19)
    mid_run = 0
    for k in range(50):
        log = tmp_path / f"killed-{k}.jsonl"
        p, _ = started(log)
        # the kill lands while the child writes the events after a random count (up to 80% of
        # the run, so that the rest is still to come): a moment chosen by progress, not by time
        target = rnd.randint(1, int(0.8 * len(reference)))
        reported = []
        assert p.stdout is not None
        for line in p.stdout:
            reported.append(int(line))
            if reported[-1] >= target:
                break
        p.send_signal(signal.SIGKILL)
        out, _ = p.communicate(timeout=60)
        reported += [int(x) for x in out.split()]
        data = log.read_bytes() if log.exists() else b""
        lines = data.split(b"\n")
        complete, tail = lines[:-1], lines[-1]  # tail: b"" unless the last line is torn
        events = [_without_time(json.loads(line)) for line in complete]  # none torn
        assert events == reference[: len(events)], f"kill {k}: the log is not the reference prefix"
        if reported:
            assert len(events) >= reported[-1], f"kill {k}: reported events missing"
        if tail:
            with pytest.warns(AuditLogWarning, match="torn last line"):
                assert len(pc.read_audit_log(log)) == len(events)
        mid_run += 0 < len(events) < len(reference)
    assert mid_run >= 45  # the kills landed while events were being written


def test_concurrent_writers_never_interleave_inside_a_line(tiny, tmp_path):
    """Three processes append to one log at once (O_APPEND, one write per line): every line
    parses and the log holds exactly the events the three reported."""
    _, d, _ = tiny
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    log = tmp_path / "shared.jsonl"
    cmd = [sys.executable, "-c", _CHILD, str(d), str(log), "40"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env) for _ in range(3)]
    totals = [int(p.communicate(timeout=120)[0].split()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    lines = log.read_bytes().split(b"\n")
    assert lines[-1] == b""
    events = [json.loads(line) for line in lines[:-1]]
    assert len(events) == sum(totals) > 0
