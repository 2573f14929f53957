"""The control plane's admin HTTP endpoint: metrics, health, and debug views.

Routes (all GET):

- ``/metrics``: Prometheus exposition of :data:`trafficmgr.core.metrics.REGISTRY`;
- ``/healthz``: 200 ``ok`` while :meth:`AdminState.healthy`, else 503;
- ``/readyz``: 200 ``ready`` when :meth:`AdminState.ready` is true, else 503 with the reason;
- ``/debug/proxy-status``: JSON list, one object per open xDS stream (see :meth:`AdminState.proxy_status`
  and :func:`proxy_identity`), each naming the ``replica`` that holds the stream;
- ``/debug/config-dump?node_id=ID[&type=clusters]``: JSON
  ``{"node_id", "view", "replica", "resources": {"clusters": [{"name", "version", "config"}]}}`` (``replica``: the
  one answering, see :func:`config_dump`), private keys
  redacted (:func:`trafficmgr.core.render.resource_dict`; workload keys are never in it at all: Envoy
  reads them from files on its node); 404 for an unknown node, 400 for a bad type;
- ``/debug/nacks``, ``/debug/plugins``, ``/debug/labels``: JSON lists;
- ``/debug/dashboard/data``: the dashboard's JSON document (golden signals from the proxies' Envoy stats,
  the service graph, proxies with their last NACK, recent Warning Events, routes; the contract is in
  :mod:`trafficmgr.core.telemetry`); 404 when the state has none (:meth:`AdminState.dashboard_data` is
  optional);
- ``/dashboard/`` and ``/dashboard/<file>``: the dashboard page, files of ``trafficmgr/dashboard/static``
  (see :func:`static_file`); ``/dashboard`` redirects to ``/dashboard/``. The same token rule as
  ``/debug/*`` applies (the page shows what ``/debug/*`` shows).

Errors are JSON ``{"error": message}``. The server runs in a daemon thread; handlers only read state.
Every ``/debug/*`` answer carries the header ``Trafficmgr-Replica: <name>`` when the state has a
``replica`` name (:func:`replica_name`), so a client asking several replicas knows which one answered,
streams or not.

Two listeners (``trafficmgr serve``): the **admin** endpoint serves every route and is bound to loopback
by default; ``/debug/*`` names every proxy, pod IP and the gateway's configuration, so binding it to a
non-loopback address requires a bearer token (``--admin-token-file``; compared in constant time, 401
without it). The optional **metrics** endpoint (``--metrics-address/--metrics-port``) serves only
:data:`METRICS_ROUTES` (``/metrics``, ``/healthz``, ``/readyz``) and is what Prometheus and the kubelet
reach; any other path there is 404.
"""

from __future__ import annotations

import errno
import hmac
import ipaddress
import json
import logging
import os
import re
import socket
import threading
from collections.abc import Callable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from trafficmgr.core import metrics, render
from trafficmgr.core.cache import SHORT_NAMES, Resource, Snapshot
from trafficmgr.core.identity import spiffe
from trafficmgr.core.labels import LabelSpec
from trafficmgr.core.model import GATEWAY
from trafficmgr.core.plugins import PluginInfo

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 18080
DEFAULT_URL = f"http://{DEFAULT_HOST}:{DEFAULT_PORT}"
#: The environment variable a replica takes its name from (the chart sets it from ``metadata.name``).
REPLICA_ENV = "POD_NAME"
#: The response header naming the replica that answered.
REPLICA_HEADER = "Trafficmgr-Replica"


def replica_name(configured: str | None = None) -> str:
    """The name this control-plane replica reports in ``proxy-status`` (``replica``): ``configured``
    (``serve --replica-name``), else ``$POD_NAME``, else ``<hostname>-<pid>`` (the same rule as the
    Lease's holder identity, :func:`trafficmgr.core.kube.leader.default_identity`)."""
    return (configured or "").strip() or os.environ.get(REPLICA_ENV, "").strip() or f"{socket.gethostname()}-{os.getpid()}"


class AdminState(Protocol):
    """What the admin endpoint reads. Implemented by ``trafficmgr serve`` (and test fakes).

    Every method is called from the admin thread and must be thread-safe and cheap.
    """

    def proxy_status(self) -> list[dict[str, Any]]:
        """One dict per open xDS stream, as ``XdsServer.status()`` returns them (``node_id``,
        ``node_cluster``, ``view``, ``peer``, ``mode``, ``connected_at``, ``identities``, ``cert_expiry``
        and per short type name ``{"sent", "acked", "last_nack"}``), with the keys of :func:`proxy_identity`
        when the implementation knows the pods, and ``replica`` (:func:`replica_name`) when it has one
        (``trafficmgr serve`` does both)."""
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


#: Where the dashboard's files are (the ``trafficmgr.dashboard`` package's ``static`` directory; found by
#: path, not imported: it holds no code the admin endpoint runs).
STATIC_DIR = Path(__file__).resolve().parent.parent / "dashboard" / "static"
DASHBOARD_PREFIX = "/dashboard"
#: The only files served from :data:`STATIC_DIR`, by suffix (anything else is 404).
STATIC_TYPES = {
    ".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8", ".json": "application/json", ".svg": "image/svg+xml",
    ".png": "image/png", ".ico": "image/x-icon", ".woff2": "font/woff2", ".txt": "text/plain; charset=utf-8",
}
_STATIC_SEGMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")
#: Headers of every dashboard file: the page may load only its own files and talk only to this endpoint,
#: cannot be framed, and types are not sniffed.
STATIC_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
                               "script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
    "Referrer-Policy": "no-referrer",
}


def static_file(subpath: str, root: Path = STATIC_DIR) -> tuple[Path, str] | None:
    """``(file, content type)`` for the dashboard URL path below ``/dashboard/`` (``""``: ``index.html``), or
    None (404).

    Why this cannot leave ``root`` (directory traversal): the raw path (never percent-decoded, so ``%2e%2e``
    and ``%2f`` stay literal and fail the next check) is split at ``/`` and every segment must be 1-128 of
    ``[A-Za-z0-9_.-]`` not starting with a dot (so no ``..``, no hidden files, no empty segment, no backslash);
    the suffix must be one of :data:`STATIC_TYPES`; the resolved path (symlinks followed) must still be
    inside the resolved ``root`` and be a regular file. Files are read only, never listed or executed."""
    parts = (subpath or "index.html").split("/")
    if not all(_STATIC_SEGMENT.fullmatch(p) for p in parts):
        return None
    content_type = STATIC_TYPES.get(Path(parts[-1]).suffix.lower())
    if content_type is None:
        return None
    base = root.resolve()
    target = base.joinpath(*parts).resolve()
    if not target.is_relative_to(base) or not target.is_file():
        return None
    return target, content_type


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


def proxy_identity(stream: Mapping[str, Any], pod: Any, trust_domain: str, gateway_identity: str | None,
                   mtls: bool) -> dict[str, Any]:
    """The identity keys ``proxy-status`` adds to one xDS stream (``stream``: an item of
    ``XdsServer.status()``; ``pod``: the sidecar's model Pod or None):

    - ``identity``: the SPIFFE ID of the stream's verified client certificate (``serve --xds-auth mtls``:
      its first ``spiffe://`` URI SAN); otherwise the one expected for the proxy: a sidecar's from its pod's
      namespace and ServiceAccount, the gateway's ``gateway_identity``; None when neither is known;
    - ``identity_verified``: True only for the certificate's;
    - ``mtls``: ``"mtls"`` when ``mtls`` (the ``mtls`` plugin's ``serve --mtls``) is on and the proxy is a
      sidecar whose pod is marked as one (``Pod.sidecar``: meshed peers send it mutual TLS), else
      ``"plaintext"``.

    ``cert_expiry`` (the client certificate's notAfter) is already in the stream.
    """
    verified = next((i for i in stream.get("identities") or () if spiffe.parse(str(i))), None)
    expected: str | None = None
    if stream.get("view") == GATEWAY:
        expected = gateway_identity
    elif pod is not None:
        expected = spiffe.spiffe_id(trust_domain, pod.namespace, pod.service_account)
    # Any view but the gateway's is a sidecar's: ``sidecar`` or a scoped one (``sidecar~<hash>``).
    sidecar = stream.get("view") != GATEWAY and pod is not None and bool(getattr(pod, "sidecar", False))
    return {"identity": verified or expected, "identity_verified": verified is not None,
            "mtls": "mtls" if mtls and sidecar else "plaintext"}


def config_dump(state: AdminState, node_id: str, type_name: str | None = None) -> dict[str, Any]:
    """The ``/debug/config-dump`` document for ``node_id`` (optionally one type).

    ``view`` is taken from the node's open stream in :meth:`AdminState.proxy_status` (None when the node
    has no open stream); ``replica`` (left out when the state has no ``replica`` attribute) is the replica
    that answered, whether or not it holds the node's stream (every replica serves the same config).
    Raises ``LookupError`` for an unknown node and ``ValueError`` for a bad type.
    """
    if type_name is not None and type_name not in render.TYPES:
        raise ValueError(f"unknown type {type_name!r}; valid types: {', '.join(render.TYPES)}")
    by_type = state.config_dump(node_id)
    if by_type is None:
        raise LookupError(f"unknown node id {node_id!r}")
    view = next((s.get("view") for s in state.proxy_status() if s.get("node_id") == node_id), None)
    types = [type_name] if type_name else [t for t in render.TYPES if t in by_type]
    resources = {t: [render.resource_dict(r) for r in sorted(by_type.get(t, ()), key=lambda r: r.name)] for t in types}
    replica = getattr(state, "replica", None)
    return {"node_id": node_id, "view": view, **({"replica": replica} if replica else {}), "resources": resources}


def is_loopback(host: str) -> bool:
    """True when ``host`` is ``localhost`` or a loopback IP (127.0.0.0/8, ::1); any other name or address,
    including a wildcard such as ``0.0.0.0``, is treated as reachable from the network."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_token_file(path: str) -> str:
    """The bearer token stored in ``path`` (surrounding whitespace stripped). Raises :class:`AdminError`
    when the file cannot be read, is empty, or holds a token shorter than 16 characters or with
    characters not allowed in an HTTP header."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise AdminError(f"--admin-token-file: cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if len(token) < 16:
        raise AdminError(f"--admin-token-file: {path} must hold a token of at least 16 characters")
    if not all(33 <= ord(c) < 127 for c in token):
        raise AdminError(f"--admin-token-file: {path} must hold one token of printable ASCII characters, no spaces")
    return token


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "trafficmgr-admin"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("admin %s - %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        path = url.path.rstrip("/") or "/"
        route = self.server.routes.get(path)
        static = DASHBOARD_PREFIX in self.server.routes and (path == DASHBOARD_PREFIX or path.startswith(DASHBOARD_PREFIX + "/"))
        extra_headers: dict[str, str] = {}
        try:
            if route is None and not static:
                raise _HTTPError(HTTPStatus.NOT_FOUND, f"no such path {url.path!r}; try one of: {', '.join(sorted(self.server.routes))}")
            if protected(path) and self.server.token is not None and not self._authorized(self.server.token):
                extra_headers["WWW-Authenticate"] = 'Bearer realm="trafficmgr-admin"'
                raise _HTTPError(HTTPStatus.UNAUTHORIZED, "missing or wrong bearer token (Authorization: Bearer <token>; "
                                                          "trafficmgr proxy-status --token-file FILE)")
            if static:
                status, content_type, body = self._static(url.path)
                extra_headers.update(STATIC_HEADERS)
                if status == HTTPStatus.MOVED_PERMANENTLY:
                    extra_headers["Location"] = DASHBOARD_PREFIX + "/"
            else:
                assert route is not None
                status, content_type, body = route(self.server.state, query)
        except _HTTPError as exc:
            status, content_type, body = exc.status, "application/json", self._json({"error": str(exc)})
        except Exception as exc:  # a broken view must not kill the endpoint
            log.exception("admin %s failed", url.path)
            status, content_type, body = HTTPStatus.INTERNAL_SERVER_ERROR, "application/json", self._json({"error": f"{type(exc).__name__}: {exc}"})
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        replica = getattr(self.server.state, "replica", None)
        # Only on /debug/* (what proxy-status and config-dump read) and never to a caller without the token;
        # the metrics endpoint, which other pods reach, does not name the pod.
        if (path.startswith("/debug/") and status != HTTPStatus.UNAUTHORIZED and isinstance(replica, str)
                and replica.isascii() and replica.isprintable()):
            self.send_header(REPLICA_HEADER, replica)
        for name, value in extra_headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _static(self, raw_path: str) -> tuple[HTTPStatus, str, bytes]:
        if raw_path == DASHBOARD_PREFIX:  # relative links of the page need the trailing slash
            return _text(HTTPStatus.MOVED_PERMANENTLY, f"see {DASHBOARD_PREFIX}/")
        found = static_file(raw_path[len(DASHBOARD_PREFIX) + 1:], self.server.static_dir)
        if found is None:
            raise _HTTPError(HTTPStatus.NOT_FOUND, f"no dashboard file {raw_path!r}")
        target, content_type = found
        return HTTPStatus.OK, content_type, target.read_bytes()

    def _authorized(self, token: bytes) -> bool:
        """The request carries ``Authorization: Bearer <token>`` (constant-time comparison)."""
        scheme, _, given = (self.headers.get("Authorization") or "").strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("utf-8", "replace"), token)

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


def protected(path: str) -> bool:
    """True for the paths that need the bearer token when one is set: ``/debug/*`` and the dashboard."""
    return path.startswith("/debug/") or path == DASHBOARD_PREFIX or path.startswith(DASHBOARD_PREFIX + "/")


def _dashboard_data(state: AdminState, query: dict[str, str]) -> tuple[HTTPStatus, str, bytes]:
    data = getattr(state, "dashboard_data", None)
    if data is None:
        raise _HTTPError(HTTPStatus.NOT_FOUND, "this endpoint has no dashboard data (only trafficmgr serve has)")
    return _json_response(data())


def _dashboard_page(state: AdminState, query: dict[str, str]) -> tuple[HTTPStatus, str, bytes]:
    raise AssertionError("served by the handler (static files)")  # pragma: no cover - never called


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
    "/debug/dashboard/data": _dashboard_data,
    DASHBOARD_PREFIX: _dashboard_page,  # and every path below it: files of STATIC_DIR
}

#: What the metrics endpoint serves: nothing that names a proxy, a pod or a resource.
METRICS_ROUTES: dict[str, Route] = {path: ROUTES[path] for path in ("/metrics", "/healthz", "/readyz")}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], state: AdminState, routes: dict[str, Route], token: bytes | None,
                 static_dir: Path = STATIC_DIR) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.static_dir = static_dir
        self.state = state
        self.routes = routes
        self.token = token
        super().__init__(address, _Handler)


class AdminServer:
    """Serves ``routes`` (default :data:`ROUTES`) for ``state`` on ``host:port`` from a background thread.

    ``port=0`` picks a free port; read it back from :attr:`port` after :meth:`start`. With ``token``,
    ``/debug/*`` answers only requests carrying ``Authorization: Bearer <token>`` (401 otherwise).
    :meth:`start` refuses to serve ``/debug/*`` on a non-loopback ``host`` without a token. ``flag`` names
    the port option in error messages (``--admin-port``, ``--metrics-port``). ``static_dir``: where the
    ``/dashboard/`` files are (tests).
    """

    def __init__(self, state: AdminState, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *,
                 routes: Mapping[str, Route] | None = None, token: str | None = None, flag: str = "--admin-port",
                 static_dir: Path = STATIC_DIR) -> None:
        self.state = state
        self.static_dir = static_dir
        self.host = host
        self.routes = dict(ROUTES if routes is None else routes)
        self.token = token
        self.flag = flag
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
        debug = any(protected(path) for path in self.routes)
        if debug and not self.token and not is_loopback(self.host):
            # /debug/* lists every proxy, pod IP and the gateway's configuration: never unauthenticated
            # on an address other pods can reach.
            raise AdminError(f"the admin endpoint serves /debug/* and {self.host} is not a loopback address: "
                             "give --admin-token-file (a bearer token), or bind it to 127.0.0.1 and serve "
                             "/metrics and health with --metrics-address/--metrics-port")
        token = self.token.encode() if self.token else None
        try:
            self._httpd = _Server((self.host, self._requested_port), self.state, self.routes, token, self.static_dir)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise AdminError(
                    f"{'admin' if debug else 'metrics'} port {self._requested_port} on {self.host} is already in use; "
                    f"choose another with {self.flag}"
                ) from exc
            raise AdminError(f"cannot listen on {self.host}:{self._requested_port} ({self.flag}): {exc.strerror or exc}") from exc
        self._bound_port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="trafficmgr-admin", daemon=True)
        self._thread.start()
        log.info("%s endpoint on %s (%s)", "admin" if debug else "metrics", self.url, ", ".join(sorted(self.routes)))

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
