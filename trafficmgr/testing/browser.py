"""Headless Chromium for tests, driven over the DevTools protocol (a websocket, ``websockets``' sync client).

``Browser()`` starts ``chromium --headless=new`` with a throwaway profile; :meth:`Browser.page` opens one tab
and gives a :class:`Page` with ``goto``, ``eval`` (a JavaScript expression, its JSON value returned),
``wait`` (until an expression is truthy) and ``screenshot``. The DevTools port is Chromium's own
``--remote-debugging-port=0``: a free port on 127.0.0.1 only, and the profile is deleted on close.
Chromium gets ``--no-proxy-server`` and no background networking, so it only loads what a test asks.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

BINARIES = ("chromium", "chromium-browser")
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
         "--disable-extensions", "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--metrics-recording-only", "--mute-audio", "--no-proxy-server",
         "--disable-dev-shm-usage", "--hide-scrollbars")


class BrowserError(RuntimeError):
    """Chromium did not start, or a DevTools command failed (the message says which)."""


def find_chromium() -> str | None:
    """The Chromium binary on PATH (Debian's ``chromium``, Ubuntu's ``chromium-browser``), else None."""
    for name in BINARIES:
        path = shutil.which(name)
        if path:
            return path
    return None


class Page:
    """One tab: DevTools commands over its websocket."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self._ids = itertools.count(1)

    def send(self, method: str, params: dict[str, Any] | None = None, timeout: float = 30.0) -> dict[str, Any]:
        """Send one command and return its ``result`` (events arriving meanwhile are dropped)."""
        call_id = next(self._ids)
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"DevTools {method}: no answer within {timeout:.0f}s")
            msg = json.loads(self.ws.recv(timeout=left))
            if msg.get("id") == call_id:
                if "error" in msg:
                    raise BrowserError(f"DevTools {method}: {msg['error']}")
                return msg.get("result") or {}

    width, height = 1366, 768

    def set_viewport(self, width: int, height: int) -> None:
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def goto(self, url: str) -> None:
        result = self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise BrowserError(f"cannot load {url}: {result['errorText']}")

    def eval(self, expression: str) -> Any:
        """The JSON value of ``expression`` in the page (promises awaited); a thrown error is a BrowserError."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(f"{expression[:80]!r} threw: {details.get('exception', {}).get('description') or details}")
        return result.get("result", {}).get("value")

    def wait(self, expression: str, timeout: float, interval: float = 0.3,
             message: str | Callable[[], str] = "") -> Any:
        """Evaluate ``expression`` until truthy; return that value, else BrowserError after ``timeout`` s
        (with ``message``, or what it returns when called then: e.g. what the page shows at that time)."""
        deadline = time.monotonic() + timeout
        value: Any = None
        while time.monotonic() < deadline:
            value = self.eval(expression)
            if value:
                return value
            time.sleep(interval)
        text = message() if callable(message) else message
        raise BrowserError(text or f"{expression[:120]!r} still {value!r} after {timeout:.0f}s")

    def screenshot(self, path: str | os.PathLike[str], full_page: bool = False) -> Path:
        """Save a PNG of the viewport (1366x768), or of the whole page at that width, to ``path``."""
        if full_page:
            height = int(self.eval("Math.ceil(document.documentElement.scrollHeight)") or self.height)
            self.set_viewport(self.width, max(height, self.height))
            time.sleep(0.3)  # one layout/paint at the new size
        try:
            data = base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"])
        finally:
            if full_page:
                self.set_viewport(self.width, self.height)
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
        return out


class Browser:
    """A headless Chromium process; use as a context manager (``close`` kills it and deletes its profile)."""

    def __init__(self, binary: str | None = None, timeout: float = 30.0) -> None:
        self.binary = binary or find_chromium()
        if not self.binary:
            raise BrowserError("no chromium or chromium-browser on PATH (apt install chromium)")
        self.profile = tempfile.mkdtemp(prefix="trafficmgr-chromium-")
        self.stderr_path = Path(self.profile) / "stderr.log"
        self._stderr = open(self.stderr_path, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [self.binary, *FLAGS, "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             f"--user-data-dir={self.profile}", "--window-size=1366,768", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=self._stderr, stdin=subprocess.DEVNULL, start_new_session=True)
        self._stack = contextlib.ExitStack()
        self.port = self._devtools_port(timeout)

    def _devtools_port(self, timeout: float) -> int:
        # Chromium writes the port it took to DevToolsActivePort in the profile (and a line on stderr).
        deadline = time.monotonic() + timeout
        active = Path(self.profile) / "DevToolsActivePort"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.close()
                raise BrowserError(f"chromium exited with {self.proc.returncode}: {self._stderr_tail()}")
            if active.exists():
                first = active.read_text().split("\n", 1)[0].strip()
                if first.isdigit():
                    return int(first)
            m = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", self._stderr_tail(4000))
            if m:
                return int(m.group(1))
            time.sleep(0.1)
        self.close()
        raise BrowserError(f"chromium did not open its DevTools port within {timeout:.0f}s: {self._stderr_tail()}")

    def _stderr_tail(self, size: int = 1500) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-size:]
        except OSError:
            return ""

    def page(self) -> Page:
        """A new tab (``about:blank``) at 1366x768."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/json/new?about:blank", method="PUT")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(req, timeout=10) as resp:
            target = json.load(resp)
        url = target["webSocketDebuggerUrl"]
        try:  # never through a proxy from the environment (websockets >= 15 reads it; older ones have no option)
            conn = connect(url, max_size=64 * 1024 * 1024, open_timeout=10, proxy=None)  # type: ignore[call-arg,unused-ignore]
        except TypeError:
            conn = connect(url, max_size=64 * 1024 * 1024, open_timeout=10)
        ws = self._stack.enter_context(conn)  # closed by close()
        page = Page(ws)
        page.send("Page.enable")
        page.send("Runtime.enable")
        page.set_viewport(page.width, page.height)
        return page

    def close(self) -> None:
        try:
            self._stack.close()
        except Exception:  # noqa: BLE001,S110 - closing a socket to a dead browser
            pass
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 9)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        self._stderr.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Browser", "BrowserError", "Page", "find_chromium"]
