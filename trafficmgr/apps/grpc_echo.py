"""grpc-echo: a small gRPC server (plaintext HTTP/2, "h2c") for local mode and the gRPC tests.

Service ``trafficmgr.echo.Echo``, on raw bytes (no .proto: any client calls the paths below with identity
(de)serializers, e.g. ``channel.unary_unary("/trafficmgr.echo.Echo/Echo")`` in grpcio; the server has no
reflection, so ``grpcurl`` needs a .proto or cannot call it):

- ``/trafficmgr.echo.Echo/Echo`` (unary): answers the request bytes. Request metadata ``x-fail-code: N``
  (0..16) makes it fail with that gRPC status instead (0 = OK answers normally), for retry tests.
- ``/trafficmgr.echo.Echo/Stream`` (server streaming): sends the request bytes back ``x-count`` times
  (default 3, at most 10000), ``x-interval-ms`` apart (default 100, at most 60000).

Every response starts with initial metadata ``x-pod: <pod name>`` (``--pod-name``, default ``$POD_NAME``,
else the host name), so a test sees which pod served it. A bad metadata value fails the call with
``INVALID_ARGUMENT``. The standard health service ``grpc.health.v1.Health`` answers ``SERVING`` for the
server (``""``) and for ``trafficmgr.echo.Echo`` (``NOT_SERVING`` once it is stopping).

Run ``trafficmgr grpc-echo --port 9090`` (or ``python -m trafficmgr.apps.grpc_echo``), or in Python::

    with GrpcEchoServer("127.0.0.1", 0, pod_name="a") as app:
        ...  # app.port, app.target ("127.0.0.1:<port>")
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from trafficmgr.apps.base import AppCommand
from trafficmgr.core import argtypes
from trafficmgr.core.signals import stop_on_signals

SERVICE = "trafficmgr.echo.Echo"
ECHO_METHOD = f"/{SERVICE}/Echo"
STREAM_METHOD = f"/{SERVICE}/Stream"
DEFAULT_PORT = 9090
POD_HEADER = "x-pod"
COUNT_HEADER, DEFAULT_COUNT, MAX_COUNT = "x-count", 3, 10_000
INTERVAL_HEADER, DEFAULT_INTERVAL_MS, MAX_INTERVAL_MS = "x-interval-ms", 100, 60_000
FAIL_HEADER = "x-fail-code"
#: Seconds a stopping server lets running calls finish before it cancels them.
STOP_GRACE_S = 2.0
_WORKERS = 64


def default_pod_name() -> str:
    return os.environ.get("POD_NAME") or os.environ.get("HOSTNAME") or socket.gethostname()


class BadMetadata(ValueError):
    """A request metadata value out of range (the call fails with INVALID_ARGUMENT and this message)."""


def _metadata_int(context: grpc.ServicerContext, key: str, default: int, maximum: int) -> int:
    """The last value of ``key`` in the request metadata as an integer in ``0..maximum``."""
    values = [str(v) for k, v in context.invocation_metadata() if k == key]
    if not values:
        return default
    text = values[-1].strip()
    if not text.isdigit() or int(text) > maximum:
        raise BadMetadata(f"{key} must be a whole number 0..{maximum}, got {values[-1][:40]!r}")
    return int(text)


def resolve_bind(host: str, port: int) -> str:
    """The address gRPC should listen on for ``host:port``, as ``host:port`` (``[v6]:port``).

    gRPC binds in its C core, not through Python's ``socket``; a trial bind through Python first gives the
    address a Python app would get: in local mode (``trafficmgr.cli.container``) a bind to ``0.0.0.0`` is
    made on the pod IP, so the pods of a Deployment do not clash on one port. It also reports a busy port
    as an OSError before gRPC is involved.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no conflict
        probe.bind((host, port))
        bound = probe.getsockname()[0]
    return f"[{bound}]:{port}" if family == socket.AF_INET6 else f"{bound}:{port}"


class EchoService(grpc.GenericRpcHandler):
    """The handlers of ``trafficmgr.echo.Echo`` (bytes in, bytes out)."""

    def __init__(self, pod_name: str, stopping: threading.Event) -> None:
        self.pod_name = pod_name
        self._stopping = stopping
        self._handlers = {
            ECHO_METHOD: grpc.unary_unary_rpc_method_handler(self.echo),
            STREAM_METHOD: grpc.unary_stream_rpc_method_handler(self.stream),
        }

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        return self._handlers.get(handler_call_details.method)

    def _start(self, context: grpc.ServicerContext) -> None:
        context.send_initial_metadata(((POD_HEADER, self.pod_name),))

    def echo(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._start(context)
        try:
            code = _metadata_int(context, FAIL_HEADER, 0, 16)
        except BadMetadata as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if code:
            status = next(s for s in grpc.StatusCode if s.value[0] == code)
            context.abort(status, f"{FAIL_HEADER}: {code} ({status.name}) from {self.pod_name}")
        return request

    def stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self._start(context)
        try:
            count = _metadata_int(context, COUNT_HEADER, DEFAULT_COUNT, MAX_COUNT)
            interval = _metadata_int(context, INTERVAL_HEADER, DEFAULT_INTERVAL_MS, MAX_INTERVAL_MS) / 1000
        except BadMetadata as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        done = threading.Event()  # the call ended (cancelled, deadline, server stopped): stop waiting
        context.add_callback(done.set)
        for i in range(count):
            if i and (done.wait(interval) or self._stopping.is_set()):
                return
            yield request


class GrpcEchoServer:
    """The echo and health services on ``host:port`` (0 = any free port); ``start()`` returns self."""

    def __init__(self, host: str = "127.0.0.1", port: int = DEFAULT_PORT, pod_name: str | None = None) -> None:
        self.host = host
        self._port = port
        self.pod_name = pod_name if pod_name is not None else default_pod_name()
        self._stopping = threading.Event()
        self._server: grpc.Server | None = None
        self.health = health.HealthServicer()

    @property
    def port(self) -> int:
        return self._port

    @property
    def target(self) -> str:
        """``host:port`` for ``grpc.insecure_channel``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self._port}"

    @property
    def url(self) -> str:
        return f"grpc://{self.target}"

    def start(self) -> Any:
        """Bind and serve in the background; returns self. Raises OSError when the address is taken."""
        address = resolve_bind(self.host, self._port)
        # so_reuseport off: a second server on a taken port must fail, not share it silently.
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="grpc-echo"),
                             handlers=[EchoService(self.pod_name, self._stopping)], options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as exc:  # grpcio raises RuntimeError("Failed to bind to address ...")
            raise OSError(f"cannot listen on {address}: {exc}") from None
        if not port:  # older grpcio returns 0 instead of raising
            raise OSError(f"cannot listen on {address}")
        self._port = port
        for name in ("", SERVICE):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        server.start()
        self._server = server
        return self

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """Report NOT_SERVING, let running calls finish for ``grace`` seconds, cancel the rest."""
        if self._server is None:
            return
        self.health.enter_graceful_shutdown()
        self._stopping.set()
        self._server.stop(grace).wait(grace + 5)
        self._server = None

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop(0)


# -- command line ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", "--host", dest="host", metavar="ADDRESS", default="0.0.0.0",
                        help="listen address (default 0.0.0.0)")
    parser.add_argument("--port", type=argtypes.port, default=DEFAULT_PORT, help=f"listen port (default {DEFAULT_PORT})")
    parser.add_argument("--pod-name", default=None,
                        help="the x-pod metadata sent with every response (default $POD_NAME, else the host name)")


def serve(args: argparse.Namespace, stop: threading.Event | None = None) -> int:
    """Serve until SIGTERM/SIGINT (or ``stop``); OSError when the address cannot be bound."""
    stop = stop_on_signals(stop)
    app = GrpcEchoServer(args.host, args.port, args.pod_name).start()
    print(f"grpc-echo on {app.target} (h2c; {SERVICE}/Echo, /Stream, grpc.health.v1.Health) as pod {app.pod_name}",
          file=sys.stderr, flush=True)
    stop.wait()
    app.stop()
    return 0


COMMAND = AppCommand("grpc-echo", "run a small gRPC echo server (unary, server streaming, health) for local mode and tests",
                     add_arguments, serve)
main = COMMAND.main

if __name__ == "__main__":
    sys.exit(main())
