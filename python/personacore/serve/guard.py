"""The ASGI middleware in front of ``personacore serve``: the body-size limit (413), the body and
send timeouts (408; a connection whose client stops reading is closed), the replica header and the
count of requests per route."""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any, Optional, Type

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import errors
from .errors import APIError
from .metrics import Metrics

_LOG = logging.getLogger("personacore.serve")

#: response header naming the replica (process) that answered
REPLICA_HEADER = "x-personacore-replica"

#: the routes counted by name in ``personacore_requests_total`` (any other path is "other")
ENDPOINTS = frozenset(
    [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/v1/vectors",
        "/tokenize",
        "/detokenize",
        "/health",
        "/metrics",
    ]
)


# ---- middleware ------------------------------------------------------------------------------------
class SendTimeout(Exception):
    """A write of the reply waited longer than ``send_timeout``: the client is not reading."""


class SendWatch:
    """``send`` of one response, ended with :class:`SendTimeout` when a write waits longer
    than ``timeout`` seconds (the client stopped reading and the transport's buffer is full).

    One timer per response, re-armed only when it fires, instead of a timer per write: a stream
    writes a chunk per token, and ``asyncio.timeout`` around each one was a quarter of the event
    loop's work per token (py-spy of a served stream). When the timer finds a write pending for
    ``timeout`` seconds it cancels the writing task, and that write raises :class:`SendTimeout`.
    """

    def __init__(self, send: Send, timeout: float):
        self.send, self.timeout = send, timeout
        self.loop = asyncio.get_running_loop()
        self.since: Optional[float] = None  # when the pending write started, if one is pending
        self.writer: Optional["asyncio.Task[Any]"] = None
        self.timer: Optional[asyncio.TimerHandle] = None
        self.expired = False

    async def __call__(self, message: Message) -> None:
        self.writer = asyncio.current_task()
        self.since = self.loop.time()
        if self.timer is None:
            self.timer = self.loop.call_later(self.timeout, self._check)
        try:
            await self.send(message)
        except asyncio.CancelledError:
            if not self.expired or self.writer is None:
                raise
            if sys.version_info >= (3, 11):
                self.writer.uncancel()
            raise SendTimeout() from None
        finally:
            self.since = None

    def _check(self) -> None:
        self.timer = None
        if self.since is None or self.writer is None:
            return  # no write pending: the next one arms the timer again
        waited = self.loop.time() - self.since
        if waited < self.timeout:
            self.timer = self.loop.call_later(self.timeout - waited, self._check)
            return
        self.expired = True
        self.writer.cancel()

    def close(self) -> None:
        """Drop the timer (the response is over)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


def holds(exc: BaseException, cls: Type[BaseException]) -> bool:
    """Whether ``exc`` is a ``cls`` or an exception group (anyio's task groups) holding one."""
    if isinstance(exc, cls):
        return True
    return any(holds(e, cls) for e in getattr(exc, "exceptions", ()) or ())


class Guard:
    """ASGI middleware: the body-size limit (413), the body and send timeouts (408; closing a
    connection whose client stops reading), the replica header, and request counting."""

    def __init__(
        self,
        app: ASGIApp,
        limit: int,
        replica: str,
        metrics: Metrics,
        body_timeout: float = 30.0,
        send_timeout: float = 30.0,
    ):
        self.app, self.limit, self.replica, self.metrics = app, limit, replica, metrics
        self.body_timeout, self.send_timeout = body_timeout, send_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}
        watched = SendWatch(send, self.send_timeout)

        async def send_wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [
                    (REPLICA_HEADER.encode(), self.replica.encode())
                ]
            await watched(message)

        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        body_done = False
        try:
            headers = dict(scope.get("headers") or [])
            declared = headers.get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.limit:
                await errors.error_response(self._too_large())(scope, receive, send_wrapped)
                return
            seen = 0

            async def receive_limited() -> Message:
                nonlocal seen, body_done
                if body_done:  # after the body: waiting for a disconnect, no deadline
                    return await receive()
                try:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    raise APIError(
                        408,
                        f"the request body did not arrive within {self.body_timeout:g} s",
                        code="body_timeout",
                        headers={"connection": "close"},
                    ) from None
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > self.limit:
                        raise self._too_large()
                    body_done = not message.get("more_body", False)
                else:
                    body_done = True
                return message

            await self.app(scope, receive_limited, send_wrapped)
        except Exception as e:
            if not holds(e, SendTimeout):
                raise
            # the reply was started: all that is left is to let uvicorn close the connection
            _LOG.warning(
                "closing %s %s: the client read nothing for %g s",
                scope.get("method"),
                scope.get("path"),
                self.send_timeout,
            )
        finally:
            watched.close()
            path = scope.get("path", "")
            self.metrics.count_request(path if path in ENDPOINTS else "other", status["code"])

    def _too_large(self) -> APIError:
        return APIError(
            413, f"the request body is larger than {self.limit} bytes", code="body_too_large"
        )
