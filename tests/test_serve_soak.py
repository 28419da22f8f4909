"""``personacore serve`` under load and against slow clients, as a real process on 127.0.0.1.

The short soak is ``scripts/soak_serve.py`` with 4 clients × 25 requests (fixed seed): the official
``openai`` client for the generations, httpx for cancelled streams and malformed bodies; it must
end with no unexpected error and the server alive. (The RSS bound is checked by the full run of
the script, not here: 100 requests are too few for a steady state.) The timeout tests start the
server with ``--body-timeout 2 --send-timeout 2`` and check that a client that sends its body
slowly gets 408 and its connection closed, and that a client that never reads its stream has
the request cancelled and its stream place given back.
"""

from __future__ import annotations

import argparse
import re
import socket
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import soak_serve  # noqa: E402


def _args(**over) -> argparse.Namespace:
    values = dict(
        clients=4,
        requests=25,
        seed=0,
        max_tokens=8,
        cancel_tokens=32,
        rss_tolerance=0.10,
        model=None,
        vector=None,
        out=None,
    )
    values.update(over)
    return argparse.Namespace(**values)


def test_short_soak_has_no_unexpected_error_and_the_server_lives():
    summary = soak_serve.run(_args())
    assert summary["requests"] == 100
    assert summary["unexpected_errors"] == 0, summary["unexpected_examples"]
    assert summary["server_alive"]
    # the seeded mix has every kind of request
    kinds = set(summary["counts"])
    assert {"malformed", "cancel", "chat", "chat_stream", "completion"} <= kinds, kinds
    assert summary["rss_after_100_mb"] is not None and summary["rss_end_mb"] is not None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The tiny model served with 2-second body and send timeouts."""
    d = tmp_path_factory.mktemp("timeouts")
    # a 16384-token window: a 16000-token stream (about 8 MB) is more than the socket buffers
    # hold (up to 4 MB each side on Linux), so the server's writes block
    files = soak_serve.write_tiny_model_and_vector(d, context=16384)
    extra = ["--body-timeout", "2", "--send-timeout", "2", "--max-tokens-limit", "16000"]
    s = soak_serve.Server(files["model"], files["vector"], extra, d / "server.log")
    yield s
    s.stop()


def _gauge(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    m = re.search(rf"^personacore_{name} (\S+)$", text, re.M)
    assert m, text
    return float(m.group(1))


def _wait(pred, timeout: float = 60.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return pred()


def test_a_body_sent_too_slowly_gets_408_and_the_connection_is_closed(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            "content-length: 400\r\n\r\n"
        )
        s.sendall(head.encode() + b'{"messages": [')  # ... and nothing more
        reply = b""
        while True:
            chunk = s.recv(65536)  # the socket timeout (60 s) fails the test if nothing comes
            if not chunk:
                break  # the server closed the connection
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"body_timeout" in reply
    assert server.alive()
    assert _gauge(server, "requests_in_flight") == 0


def test_a_client_that_never_reads_its_stream_does_not_keep_its_place(server):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)  # a small window: the server blocks
    s.settimeout(60)
    s.connect(("127.0.0.1", server.port))
    body = (
        b'{"messages": [{"role": "user", "content": "hello"}], "max_tokens": 16000, '
        b'"ignore_eos": true, "stream": true, "monitor": {"layers": "all"}}'
    )
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    try:
        s.sendall(head.encode() + body)  # then read nothing
        assert _wait(lambda: _gauge(server, "streams_open") == 1)
        # the send timeout ends the stream: the place is given back, the request cancelled (or
        # already finished: the engine does not wait for the client) and the connection closed
        log = Path(server.log.name)
        assert _wait(lambda: "the client read nothing for 2 s" in log.read_text()), log.read_text()
        assert _wait(lambda: _gauge(server, "streams_open") == 0)
        assert _wait(lambda: _gauge(server, "requests_in_flight") == 0)
        stats = lambda: _gauge(server, "engine_finished") + _gauge(server, "engine_cancelled")  # noqa: E731
        assert _wait(lambda: stats() == _gauge(server, "engine_submitted"))
    finally:
        s.close()
    assert server.alive()
