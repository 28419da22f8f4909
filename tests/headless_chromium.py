"""Drive Debian's headless Chromium over the DevTools protocol on a pipe (no extra packages).

    with HeadlessChromium(tmp_dir, width=1400, height=900) as browser:
        browser.open("file:///.../report.html")
        browser.wait_for("document.querySelectorAll('.main-svg').length >= 3")
        rects = browser.evaluate("...")          # any JSON value
        png = browser.screenshot(x, y, w, h)     # PNG bytes of that page region
        browser.requests, browser.exceptions     # every URL the page asked for, uncaught JS errors

``--remote-debugging-pipe`` makes Chromium read protocol messages (JSON, each ended by a NUL byte)
from its fd 3 and write replies and events to its fd 4.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List, Optional


def chromium_path() -> Optional[str]:
    """The Chromium executable (Debian's ``chromium``), or None when it is not installed."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _high_fd(fd: int) -> int:
    """A copy of ``fd`` numbered 10 or more (so that moving it to 3 or 4 cannot clobber another)."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


class HeadlessChromium:
    """One headless Chromium with one page, controlled over the DevTools pipe."""

    def __init__(
        self, profile_dir: Path, width: int = 1400, height: int = 900, timeout: float = 60
    ):
        """Start Chromium with a fresh profile in ``profile_dir`` and a ``width`` x ``height`` page."""
        exe = chromium_path()
        if exe is None:
            raise RuntimeError("chromium is not installed (Debian package 'chromium')")
        self.timeout = timeout
        to_child_r, to_child_w = (_high_fd(fd) for fd in os.pipe())
        from_child_r, from_child_w = (_high_fd(fd) for fd in os.pipe())

        def wire_fds() -> None:
            os.dup2(to_child_r, 3)
            os.dup2(from_child_w, 4)

        self._proc = subprocess.Popen(
            [
                exe,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                "--no-first-run",
                "--remote-debugging-pipe",
                f"--user-data-dir={profile_dir}",
                "about:blank",
            ],
            preexec_fn=wire_fds,
            close_fds=False,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._out = os.fdopen(to_child_w, "wb", buffering=0)
        self._in = os.fdopen(from_child_r, "rb", buffering=0)
        self._buffer = b""
        self._next_id = 0
        self._session: Optional[str] = None
        self.events: List[Dict[str, Any]] = []
        try:
            self._attach(width, height)
        except BaseException:
            self.close()
            raise

    def _attach(self, width: int, height: int) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self._session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Page", "Runtime", "Network"):
            self.send(f"{domain}.enable")
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )

    def _message(self) -> Dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._in], [], [], left)[0]:
                raise TimeoutError("no message from chromium")
            chunk = self._in.read(1 << 16)
            if not chunk:
                raise RuntimeError(f"chromium closed its pipe (exit code {self._proc.poll()})")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Send one command (to the page once attached) and return its result; events that arrive
        meanwhile are kept in :attr:`events`."""
        self._next_id += 1
        msg: Dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if self._session is not None:
            msg["sessionId"] = self._session
        self._out.write(json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._message()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def _wait_event(self, method: str) -> None:
        deadline = time.monotonic() + self.timeout
        while not any(e["method"] == method for e in self.events):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {method} event")
            reply = self._message()
            if "method" in reply:
                self.events.append(reply)

    def open(self, url: str) -> None:
        """Navigate to ``url`` and wait for its load event."""
        self.events = [e for e in self.events if e["method"] != "Page.loadEventFired"]
        self.send("Page.navigate", {"url": url})
        self._wait_event("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the page."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30) -> bool:
        """Poll until ``expression`` is truthy; False when ``timeout`` seconds pass first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.evaluate(expression):
                return True
            time.sleep(0.2)
        return False

    def screenshot(self, x: float, y: float, width: float, height: float) -> bytes:
        """PNG of the page region at document coordinates (x, y), scrolled into view if needed."""
        clip = {"x": x, "y": y, "width": width, "height": height, "scale": 1}
        result = self.send(
            "Page.captureScreenshot",
            {"format": "png", "clip": clip, "captureBeyondViewport": True},
        )
        return base64.b64decode(result["data"])

    @property
    def requests(self) -> List[str]:
        """Every URL the page requested (``Network.requestWillBeSent``)."""
        return [
            e["params"]["request"]["url"]
            for e in self.events
            if e["method"] == "Network.requestWillBeSent"
        ]

    @property
    def exceptions(self) -> List[str]:
        """Uncaught JavaScript exceptions of the page (``Runtime.exceptionThrown``)."""
        return [
            json.dumps(e["params"]["exceptionDetails"])[:500]
            for e in self.events
            if e["method"] == "Runtime.exceptionThrown"
        ]

    def close(self) -> None:
        """Close the browser and wait for it to exit."""
        try:
            self._session = None
            self.send("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._out.close()
        self._in.close()

    def __enter__(self) -> "HeadlessChromium":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
