"""ws-echo: a WebSocket echo server (the ``websockets`` library) for local mode and the WebSocket tests.

On any path, after the opening handshake the server sends one text message ``hello from <pod name>``
(``--pod-name``, default ``$POD_NAME``, else the host name), so a test sees which pod served it, then
echoes every message back as it came: text as text, binary as binary. A plain HTTP request without the
WebSocket upgrade gets the library's ``426 Upgrade Required`` with a short text. Limits are the
library's defaults (messages up to 1 MiB, a ping every 20 s); permessage-deflate is offered.

Run ``trafficmgr ws-echo --port 8765`` (or ``python -m trafficmgr.apps.ws_echo``), or in Python::

    with WsEchoServer("127.0.0.1", 0, pod_name="a") as app:
        ...  # app.url ("ws://127.0.0.1:<port>")
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import threading
from typing import Any

from websockets.asyncio import server as ws_server
from websockets.exceptions import ConnectionClosed

from trafficmgr.apps.base import AppCommand
from trafficmgr.core import argtypes
from trafficmgr.core.signals import stop_on_signals

DEFAULT_PORT = 8765
#: Seconds ``start()``/``stop()`` wait for the server to open or to close (handlers included).
_WAIT_S = 15.0


def default_pod_name() -> str:
    return os.environ.get("POD_NAME") or os.environ.get("HOSTNAME") or socket.gethostname()


class WsEchoServer:
    """The echo server on ``host:port`` (0 = any free port), its event loop on a daemon thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = DEFAULT_PORT, pod_name: str | None = None) -> None:
        self.host = host
        self._port = port
        self.pod_name = pod_name if pod_name is not None else default_pod_name()
        self.connections = 0  # opened so far
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: ws_server.Server | None = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self._port}"

    async def _handler(self, ws: ws_server.ServerConnection) -> None:
        self.connections += 1
        try:
            await ws.send(f"hello from {self.pod_name}")
            async for message in ws:
                await ws.send(message)
        except ConnectionClosed:  # the peer went away without a closing handshake: nothing to report
            pass

    async def _open(self) -> None:
        self._server = await ws_server.serve(self._handler, self.host, self._port)
        self._port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()  # 1001 (going away) to open connections, then waits for their handlers
            await self._server.wait_closed()

    def start(self) -> Any:
        """Bind and serve in the background; returns self. Raises OSError when the address is taken."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="ws-echo", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            asyncio.run_coroutine_threadsafe(self._open(), loop).result(_WAIT_S)
        except BaseException:
            self._shutdown_loop()
            raise
        return self

    def stop(self) -> None:
        """Close the listener and every connection (code 1001), then the event loop."""
        if self._loop is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(_WAIT_S)
        finally:
            self._server = None
            self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        if not thread.is_alive():
            loop.close()

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- command line ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", "--host", dest="host", metavar="ADDRESS", default="0.0.0.0",
                        help="listen address (default 0.0.0.0)")
    parser.add_argument("--port", type=argtypes.port, default=DEFAULT_PORT, help=f"listen port (default {DEFAULT_PORT})")
    parser.add_argument("--pod-name", default=None,
                        help="named in the first message, 'hello from <pod name>' (default $POD_NAME, else the host name)")


def serve(args: argparse.Namespace, stop: threading.Event | None = None) -> int:
    """Serve until SIGTERM/SIGINT (or ``stop``); OSError when the address cannot be bound."""
    stop = stop_on_signals(stop)
    app = WsEchoServer(args.host, args.port, args.pod_name).start()
    print(f"ws-echo on {app.url} as pod {app.pod_name}", file=sys.stderr, flush=True)
    stop.wait()
    app.stop()
    return 0


COMMAND = AppCommand("ws-echo", "run a WebSocket echo server (hello from <pod>, then every message back) for local mode and tests",
                     add_arguments, serve)
main = COMMAND.main

if __name__ == "__main__":
    sys.exit(main())
