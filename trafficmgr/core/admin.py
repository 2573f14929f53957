"""The control plane's admin HTTP endpoint: metrics, health, and debug views.

Routes (all GET):

- ``/metrics``: Prometheus exposition of :data:`trafficmgr.core.metrics.REGISTRY`;
- ``/healthz``: 200 ``ok`` while :meth:`AdminState.healthy`, else 503;
- ``/readyz``: 200 ``ready`` when :meth:`AdminState.ready` is true, else 503 with the reason;
- ``/debug/proxy-status``: JSON list, one object per open xDS stream (see :meth:`AdminState.proxy_status`);
- ``/debug/config-dump?node_id=ID[&type=clusters]``: JSON
  ``{"node_id", "view", "resources": {"clusters": [{"name", "version", "config"}]}}``, private keys
  redacted (:func:`trafficmgr.core.render.resource_dict`); 404 for an unknown node, 400 for a bad type;
- ``/debug/nacks``, ``/debug/plugins``, ``/debug/labels``: JSON lists.

Errors are JSON ``{"error": message}``. The server runs in a daemon thread; handlers only read state.
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from trafficmgr.core import metrics, render
from trafficmgr.core.cache import SHORT_NAMES, Resource, Snapshot
from trafficmgr.core.labels import LabelSpec
from trafficmgr.core.plugins import PluginInfo

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 18080
DEFAULT_URL = f"http://{DEFAULT_HOST}:{DEFAULT_PORT}"


class AdminState(Protocol):
    """What the admin endpoint reads. Implemented by ``trafficmgr serve`` (and test fakes).

    Every method is called from the admin thread and must be thread-safe and cheap.
    """

    def proxy_status(self) -> list[dict[str, Any]]:
        """One dict per open xDS stream, as ``XdsServer.status()`` returns them (``node_id``,
        ``node_cluster``, ``view``, ``peer``, ``mode``, ``connected_at`` and per short type name
        ``{"sent", "acked", "last_nack"}``)."""
        ...

    def config_dump(self, node_id: str) -> dict[str, list[Resource]] | None:
        """The resources served to ``node_id``'s view, by short type name (``clusters``, ...); None when
        the node is unknown."""
        ...

    def healthy(self) -> bool:
        """True while the process works (liveness)."""
        ...

    def ready(self) -> tuple[bool, str]:
        """``(ready, reason)``: ready once the first snapshot is published (readiness)."""
        ...

    def nacks(self) -> list[dict[str, Any]]:
        """Recent NACKs, as ``XdsServer.nacks()`` returns them."""
        ...

    def plugins_info(self) -> list[PluginInfo]:
        """The loaded plugins (named so that an implementation can keep its PluginHost as ``.plugins``)."""
        ...

    def labels(self) -> list[LabelSpec]:
        """Every label of the loaded plugins."""
        ...


class AdminError(OSError):
    """The admin endpoint cannot start; the message is meant for the user (an ``OSError``, so callers
    that handle bind errors generically catch it too)."""


class _HTTPError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def snapshot_resources(snapshot: Snapshot | None) -> dict[str, list[Resource]]:
    """A snapshot's resources by short type name: a ready-made :meth:`AdminState.config_dump` answer for
    a node whose view is ``snapshot`` (empty when there is no snapshot yet)."""
    if snapshot is None:
        return {}
    return {short: list(snapshot.types[url].resources.values()) for short, url in SHORT_NAMES.items() if url in snapshot.types}


def config_dump(state: AdminState, node_id: str, type_name: str | None = None) -> dict[str, Any]:
    """The ``/debug/config-dump`` document for ``node_id`` (optionally one type).

    ``view`` is taken from the node's open stream in :meth:`AdminState.proxy_status` (None when the node
    has no open stream). Raises ``LookupError`` for an unknown node and ``ValueError`` for a bad type.
    """
    if type_name is not None and type_name not in render.TYPES:
        raise ValueError(f"unknown type {type_name!r}; valid types: {', '.join(render.TYPES)}")
    by_type = state.config_dump(node_id)
    if by_type is None:
        raise LookupError(f"unknown node id {node_id!r}")
    view = next((s.get("view") for s in state.proxy_status() if s.get("node_id") == node_id), None)
    types = [type_name] if type_name else [t for t in render.TYPES if t in by_type]
    resources = {t: [render.resource_dict(r) for r in sorted(by_type.get(t, ()), key=lambda r: r.name)] for t in types}
    return {"node_id": node_id, "view": view, "resources": resources}


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "trafficmgr-admin"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("admin %s - %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        route = self.server.routes.get(url.path.rstrip("/") or "/")
        try:
            if route is None:
                raise _HTTPError(HTTPStatus.NOT_FOUND, f"no such path {url.path!r}; try one of: {', '.join(sorted(self.server.routes))}")
            status, content_type, body = route(self.server.state, query)
        except _HTTPError as exc:
            status, content_type, body = exc.status, "application/json", self._json({"error": str(exc)})
        except Exception as exc:  # a broken view must not kill the endpoint
            log.exception("admin %s failed", url.path)
            status, content_type, body = HTTPStatus.INTERNAL_SERVER_ERROR, "application/json", self._json({"error": f"{type(exc).__name__}: {exc}"})
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    @staticmethod
    def _json(data: Any) -> bytes:
        return (json.dumps(data, indent=2, default=_json_default) + "\n").encode()


Route = Callable[[AdminState, dict[str, str]], tuple[HTTPStatus, str, bytes]]


def _json_response(data: Any) -> tuple[HTTPStatus, str, bytes]:
    return HTTPStatus.OK, "application/json", _Handler._json(data)


def _text(status: HTTPStatus, text: str) -> tuple[HTTPStatus, str, bytes]:
    return status, "text/plain; charset=utf-8", (text + "\n").encode()


def _metrics(state: AdminState, query: dict[str, str]) -> tuple[HTTPStatus, str, bytes]:
    return HTTPStatus.OK, CONTENT_TYPE_LATEST, generate_latest(metrics.REGISTRY)


def _healthz(state: AdminState, query: dict[str, str]) -> tuple[HTTPStatus, str, bytes]:
    return _text(HTTPStatus.OK, "ok") if state.healthy() else _text(HTTPStatus.SERVICE_UNAVAILABLE, "unhealthy")


def _readyz(state: AdminState, query: dict[str, str]) -> tuple[HTTPStatus, str, bytes]:
    ok, reason = state.ready()
    return _text(HTTPStatus.OK, reason or "ready") if ok else _text(HTTPStatus.SERVICE_UNAVAILABLE, reason or "not ready")


def _config_dump(state: AdminState, query: dict[str, str]) -> tuple[HTTPStatus, str, bytes]:
    node_id = query.get("node_id")
    if not node_id:
        raise _HTTPError(HTTPStatus.BAD_REQUEST, "missing query parameter node_id (see /debug/proxy-status for node ids)")
    try:
        return _json_response(config_dump(state, node_id, query.get("type") or None))
    except LookupError as exc:
        raise _HTTPError(HTTPStatus.NOT_FOUND, f"{exc.args[0]} (see /debug/proxy-status for connected nodes)") from None
    except ValueError as exc:
        raise _HTTPError(HTTPStatus.BAD_REQUEST, str(exc)) from None


ROUTES: dict[str, Route] = {
    "/metrics": _metrics,
    "/healthz": _healthz,
    "/readyz": _readyz,
    "/debug/proxy-status": lambda state, q: _json_response(state.proxy_status()),
    "/debug/config-dump": _config_dump,
    "/debug/nacks": lambda state, q: _json_response(state.nacks()),
    "/debug/plugins": lambda state, q: _json_response([render.plugin_row(p) for p in state.plugins_info()]),
    "/debug/labels": lambda state, q: _json_response([render.label_row(s) for s in state.labels()]),
}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], state: AdminState, routes: dict[str, Route]) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.state = state
        self.routes = routes
        super().__init__(address, _Handler)


class AdminServer:
    """Serves :data:`ROUTES` for ``state`` on ``host:port`` from a background thread.

    ``port=0`` picks a free port; read it back from :attr:`port` after :meth:`start`.
    """

    def __init__(self, state: AdminState, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
        self.state = state
        self.host = host
        self._requested_port = port
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self._bound_port = port

    @property
    def port(self) -> int:
        """The bound port (the requested one before :meth:`start`; kept after :meth:`stop`)."""
        return self._httpd.server_address[1] if self._httpd is not None else self._bound_port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        """Bind and serve in a daemon thread. Raises :class:`AdminError` when the port is taken."""
        if self._httpd is not None:
            return
        try:
            self._httpd = _Server((self.host, self._requested_port), self.state, dict(ROUTES))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise AdminError(
                    f"admin port {self._requested_port} on {self.host} is already in use; "
                    f"choose another with --admin-port"
                ) from exc
            raise AdminError(f"cannot start the admin endpoint on {self.host}:{self._requested_port}: {exc.strerror or exc}") from exc
        self._bound_port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="trafficmgr-admin", daemon=True)
        self._thread.start()
        log.info("admin endpoint on %s", self.url)

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> AdminServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
