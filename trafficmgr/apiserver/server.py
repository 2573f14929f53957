"""HTTP front end: the Kubernetes REST API over ``http.server.ThreadingHTTPServer``."""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import queue
import select
import socket
import ssl
import threading
import time
from email.message import Message
from email.utils import formatdate
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import yaml

from . import access, crds, discovery, fieldmanager, openapi, paging, podlogs, protobuf, tables, tokens
from .controllers import Controllers, PodRuntime
from .discovery import BY_GVR, ResourceType
from .errors import ApiError
from .patch import json_patch, merge_patch, strategic_merge
from .store import PATCH_APPLY, PATCH_JSON, PATCH_MERGE, PATCH_STRATEGIC, Store, Watcher, encode_json

log = logging.getLogger(__name__)

_TRUE = ("true", "1", "True", "TRUE")
_WRITES = ("POST", "PUT", "PATCH")
_DRAIN_LIMIT = 1 << 20  # a refused request's body is read (to answer on a clean connection) up to 1 MiB


_MAX_LINE = 65536  # request line and header line limits, and the header count, as http.server's
_MAX_HEADERS = 100
_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


_encode = encode_json  # the encoding the store caches per object: a list joins those bytes


class _Headers(Message):
    """Request headers parsed by :meth:`_Handler.parse_request` (an ``email.message.Message`` whose
    lookups use a case-insensitive index instead of a scan through the policy on every ``get``)."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        super().__init__()
        self._headers = pairs  # type: ignore[assignment]  # what Message.items()/keys()/as_string read
        self._index: dict[str, list[str]] = {}
        for name, value in pairs:
            self._index.setdefault(name.lower(), []).append(value)

    def get(self, name: str, failobj: Any = None) -> Any:  # type: ignore[override]
        values = self._index.get(name.lower())
        return values[0] if values else failobj

    def get_all(self, name: str, failobj: Any = None) -> Any:  # type: ignore[override]
        values = self._index.get(name.lower())
        return list(values) if values else failobj

    def __getitem__(self, name: str) -> Any:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._index


class _Route:
    __slots__ = ("rt", "namespace", "name", "sub")

    def __init__(self, rt: ResourceType, namespace: str | None, name: str | None, sub: str | None) -> None:
        self.rt, self.namespace, self.name, self.sub = rt, namespace, name, sub

    @property
    def item(self) -> str:
        """The object's name on an item route (_handle dispatches to the item verbs only when there is one)."""
        assert self.name is not None, "not an item route"
        return self.name


def _route(store: Store, group: str, version: str, parts: list[str]) -> _Route:
    def rt_of(plural: str) -> ResourceType:
        rt = BY_GVR.get((group, version, plural)) or store.crds.by_gvr(group, version, plural)
        if rt is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return rt

    if len(parts) >= 3 and parts[0] == "namespaces" and not (group == "" and len(parts) == 3
                                                              and parts[2] in ("status", "finalize")):
        rt = rt_of(parts[2])
        if not rt.namespaced:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        name = parts[3] if len(parts) > 3 else None
        sub = parts[4] if len(parts) > 4 else None
        if len(parts) > 5 or (rt.custom and sub is not None and sub not in rt.subresources):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return _Route(rt, parts[1], name, sub)
    if not parts or len(parts) > 3:
        raise ApiError(404, "NotFound", "the server could not find the requested resource")
    rt = rt_of(parts[0])
    sub = parts[2] if len(parts) > 2 else None
    if rt.custom and sub is not None and sub not in rt.subresources:
        raise ApiError(404, "NotFound", "the server could not find the requested resource")
    return _Route(rt, None, parts[1] if len(parts) > 1 else None, sub)


def _scale_of(obj: dict) -> dict:
    md = obj["metadata"]
    sel = ((obj.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
    return {
        "kind": "Scale", "apiVersion": "autoscaling/v1",
        "metadata": {k: md[k] for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp") if k in md},
        "spec": {"replicas": (obj.get("spec") or {}).get("replicas", 0)},
        "status": {"replicas": (obj.get("status") or {}).get("replicas", 0),
                   "selector": ",".join(f"{k}={v}" for k, v in sorted(sel.items()))},
    }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _HTTPServer
    raw_requestline: bytes  # set by http.server before parse_request
    _headers_buffer: list[bytes]  # http.server's pending response header lines
    _raw: bytes | None = None  # the request body, read once per request (_dispatch resets it)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def parse_request(self) -> bool:
        """http.server's request parsing (same answers for a bad request line, an HTTP/2 version, too long
        or too many header lines, ``Connection`` and ``Expect: 100-continue``) with the header block split
        here rather than by the ``email`` package's parser, which cost about a third of a small request.
        A header line without a colon, with whitespace before the colon or a name that is not an
        RFC 9110 token, or a folded (obsolete) continuation line is refused with 400, as RFC 9112 allows."""
        self.command = None  # type: ignore[assignment]  # set in case of error on the first line
        self.request_version = version = self.default_request_version
        self.close_connection = True
        requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        self.requestline = requestline
        words = requestline.split()
        if not words:
            return False
        if len(words) >= 3:
            version = words[-1]
            try:
                if not version.startswith("HTTP/"):
                    raise ValueError
                numbers = version.split("/", 1)[1].split(".")
                if len(numbers) != 2 or any(not n.isdigit() or len(n) > 10 for n in numbers):
                    raise ValueError
                major, minor = int(numbers[0]), int(numbers[1])
            except (ValueError, IndexError):
                self.send_error(HTTPStatus.BAD_REQUEST, f"Bad request version ({version!r})")
                return False
            if (major, minor) >= (1, 1):
                self.close_connection = False
            if major >= 2:
                self.send_error(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, f"Invalid HTTP version ({major}.{minor})")
                return False
            self.request_version = version
        if not 2 <= len(words) <= 3:
            self.send_error(HTTPStatus.BAD_REQUEST, f"Bad request syntax ({requestline!r})")
            return False
        command, path = words[:2]
        if len(words) == 2:
            self.close_connection = True
            if command != "GET":
                self.send_error(HTTPStatus.BAD_REQUEST, f"Bad HTTP/0.9 request type ({command!r})")
                return False
        self.command, self.path = command, path
        if self.path.startswith("//"):
            self.path = "/" + self.path.lstrip("/")
        pairs: list[tuple[str, str]] = []
        while True:
            line = self.rfile.readline(_MAX_LINE + 1)
            if len(line) > _MAX_LINE:
                self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "Line too long", "header line")
                return False
            if line in (b"\r\n", b"\n", b""):
                break
            if len(pairs) >= _MAX_HEADERS:
                self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "Too many headers",
                                f"got more than {_MAX_HEADERS} headers")
                return False
            text = line.decode("iso-8859-1").rstrip("\r\n")
            name, colon, value = text.partition(":")
            if not colon or not name or not _TOKEN_CHARS.issuperset(name):
                self.send_error(HTTPStatus.BAD_REQUEST, "Bad header line")
                return False
            pairs.append((name, value.strip(" \t")))
        self.headers = _Headers(pairs)
        conntype = self.headers.get("Connection", "").lower()
        if conntype == "close":
            self.close_connection = True
        elif conntype == "keep-alive":
            self.close_connection = False
        if (self.headers.get("Expect", "").lower() == "100-continue" and self.request_version >= "HTTP/1.1"
                and not self.handle_expect_100()):
            return False
        return True

    _date: tuple[int, str] = (0, "")

    def date_time_string(self, timestamp: float | None = None) -> str:
        """The ``Date`` header value, formatted once per second."""
        if timestamp is not None:
            return formatdate(timestamp, usegmt=True)
        now = int(time.time())
        cached = _Handler._date
        if cached[0] != now:
            cached = _Handler._date = (now, formatdate(now, usegmt=True))
        return cached[1]

    # ---- plumbing ----------------------------------------------------------------------------

    def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache, private")
        if self.command != "HEAD":  # headers and body in one write (one TLS record, one segment)
            self._headers_buffer.extend((b"\r\n", body))
            self.flush_headers()
        else:
            self.end_headers()

    def _send_obj(self, code: int, obj: Any) -> None:
        self._send(code, _encode(obj))

    def setup(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):  # the TLS handshake runs here, on the request's thread
            self.request.settimeout(10)
            self.request.do_handshake()
            self.request.settimeout(None)
        super().setup()
        self.server.track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, False)

    def _read_body(self) -> bytes:
        if self._raw is not None:
            return self._raw
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self._raw = b"".join(chunks)
            return self._raw
        n = int(self.headers.get("Content-Length") or 0)
        self._raw = self.rfile.read(n) if n else b""
        return self._raw

    def _body(self, ctype: str = "") -> Any:
        raw = self._read_body()
        if "protobuf" in ctype:
            try:
                return protobuf.decode(raw)
            except protobuf.ProtobufError as e:
                raise ApiError(415, "UnsupportedMediaType", str(e)) from None
        if "cbor" in ctype:
            raise ApiError(415, "UnsupportedMediaType",
                           "the body of the request was in an unknown format - accepted media types include: "
                           "application/json, application/yaml")
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except ValueError:
            if "yaml" not in ctype:
                raise ApiError.bad_request("invalid JSON in request body") from None
        try:
            return yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ApiError.bad_request(f"invalid YAML in request body: {e}") from None

    def _dispatch(self) -> None:
        self._raw = None
        try:
            self._admit()
            self._read_body()
            if self.command in _WRITES:
                self._check_media_type()
            self._handle()
        except ApiError as e:
            if self._raw is None:
                self._discard_body()
            self._send_obj(e.code, e.status())
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # noqa: BLE001
            log.exception("internal error handling %s %s", self.command, self.path)
            self._send_obj(500, ApiError(500, "InternalError", f"Internal error occurred: {e}").status())

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _dispatch  # type: ignore[assignment]

    # ---- admission (see access.py for what each check stops) ---------------------------------

    def _admit(self) -> None:
        """Refuse a request with a foreign ``Host`` (403) or without the bearer token (401), before its
        body is read or anything is looked up."""
        hosts = self.headers.get_all("Host") or []
        if len(hosts) != 1 or not access.host_allowed(hosts[0], self.server.bind_host):
            shown = ", ".join(h[:100] for h in hosts) or "none"
            raise ApiError(403, "Forbidden",
                           f"Host header {shown!r} is not accepted by this API server (DNS rebinding protection): "
                           f"connect to 127.0.0.1, localhost, [::1] or {self.server.bind_host}")
        token = self.server.token
        if token is not None and not access.bearer_matches(self.headers.get("Authorization"), token):
            raise ApiError(401, "Unauthorized", "Unauthorized")

    def _check_media_type(self) -> None:
        """A write must declare a JSON/YAML/patch/protobuf body (415 otherwise): a browser sends none of
        these cross-origin without a CORS preflight, which this server never grants. A write without a
        Content-Type is read as JSON (as kube-apiserver does: the official Python client sends creates and
        replaces without one) unless a browser sent it (see ``access.from_browser``)."""
        media = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if not media and not access.from_browser(self.headers):
            return
        if media not in access.WRITE_MEDIA_TYPES:
            raise ApiError(415, "UnsupportedMediaType",
                           f"the body of the request was in an unknown format ({media or 'no Content-Type'}) - "
                           f"accepted media types include: {', '.join(sorted(access.WRITE_MEDIA_TYPES))}")

    def _discard_body(self) -> None:
        """Read and drop the body of a request refused before reading it, so the answer arrives on a
        clean connection; a chunked or larger-than-1-MiB body is not read and the connection closes."""
        self.close_connection = True
        if self.headers.get("Transfer-Encoding"):
            return
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return
        if 0 < n <= _DRAIN_LIMIT:
            self._raw = self.rfile.read(n)

    # ---- routing -----------------------------------------------------------------------------

    def _handle(self) -> None:
        url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        parts = [p for p in url.path.split("/") if p]
        method = self.command
        if method in ("GET", "HEAD"):
            if url.path in ("/healthz", "/livez", "/readyz"):
                return self._send(200, b"ok", "text/plain")
            if url.path == "/version":
                return self._send_obj(200, discovery.version_info())
            if parts == ["openapi", "v2"]:
                v2 = openapi.v2_for_accept(self.headers.get("Accept", ""), self.store.crds)
                if v2 is None:
                    raise ApiError(406, "NotAcceptable", "only the following media types are accepted: "
                                   f"application/json, {openapi.V2_PROTOBUF}")
                return self._send(200, *v2)
            if parts[:2] == ["openapi", "v3"]:
                spec = (openapi.root_document(self.store.crds) if len(parts) == 2
                        else openapi.document_for_path("/".join(parts[2:]), self.store.crds))
                if spec is None:
                    raise ApiError(404, "NotFound", "the server could not find the requested resource")
                return self._send(200, spec)
            if parts == ["api"]:
                return self._send_obj(200, discovery.api_versions(self.server.host_port))
            if parts == ["apis"]:
                return self._send_obj(200, discovery.api_group_list(self.store.crds.types()))
            if len(parts) == 2 and parts[0] == "api":
                doc = discovery.api_resource_list("", parts[1], self.store.crds.types())
                if doc is None:
                    raise ApiError(404, "NotFound", "the server could not find the requested resource")
                return self._send_obj(200, doc)
            if len(parts) == 2 and parts[0] == "apis":
                doc = discovery.api_group(parts[1], self.store.crds.types())
                if doc is None:
                    raise ApiError(404, "NotFound", "the server could not find the requested resource")
                return self._send_obj(200, doc)
            if len(parts) == 3 and parts[0] == "apis":
                doc = discovery.api_resource_list(parts[1], parts[2], self.store.crds.types())
                if doc is None:
                    raise ApiError(404, "NotFound", "the server could not find the requested resource")
                return self._send_obj(200, doc)
        token_api = tokens.route(parts)
        if token_api is not None:
            return self._token_api(method, *token_api)
        if len(parts) >= 3 and parts[0] == "api":
            route = _route(self.store, "", parts[1], parts[2:])
        elif len(parts) >= 4 and parts[0] == "apis":
            route = _route(self.store, parts[1], parts[2], parts[3:])
        else:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        handler = getattr(self, f"_{method.lower()}_{'item' if route.name else 'collection'}", None)
        if handler is None:
            raise ApiError.method_not_allowed()
        if method not in _WRITES:
            return handler(route)
        manager = fieldmanager.manager_for(self.query.get("fieldManager"), self.headers.get("User-Agent"))
        with fieldmanager.updating(manager, route.sub), crds.field_validation(self.query.get("fieldValidation")):
            handler(route)  # the fields this write changes become manager's

    @property
    def store(self) -> Store:
        return self.server.store

    def _table(self, rt: ResourceType, objs: list[dict], rv: str, columns: bool = True) -> dict:
        return tables.table(rt, objs, rv, self.query.get("includeObject", "Metadata"), columns,
                            self.store.crds.table(rt, tables.human_age))

    def _wants_table(self) -> bool:
        accept = self.headers.get("Accept", "")
        return "as=Table" in accept

    def _dry_run(self) -> bool:
        return bool(self.query.get("dryRun"))

    def _token_api(self, method: str, what: str, namespace: str, name: str) -> None:
        """TokenRequest (a ServiceAccount's ``token`` subresource) and TokenReview: create only, 201 as
        kube-apiserver; see :mod:`.tokens` (the tokens never authenticate requests to this server)."""
        if method != "POST":
            raise ApiError.method_not_allowed()
        body = self._body(self.headers.get("Content-Type", ""))
        authority = tokens.authority(self.store)
        if what == "request":
            return self._send_obj(201, authority.request(namespace, name, body, self._dry_run()))
        self._send_obj(201, authority.review(body))

    # ---- collection verbs --------------------------------------------------------------------

    def _get_collection(self, r: _Route) -> None:
        """A list (one page of it with ``limit``/``continue``, see :mod:`.paging`). The body is the list's
        head, the items' cached encodings (:meth:`Store.encoded`) joined by commas, and its tail: the same
        bytes as encoding the whole list at once. Tables are encoded whole."""
        q = self.query
        if q.get("watch") in _TRUE:
            return self._watch(r)
        page = paging.list_page(self.store, r.rt, r.namespace, q.get("labelSelector"), q.get("fieldSelector"),
                                q.get("limit"), q.get("continue"), q.get("resourceVersion"))
        if self._wants_table():
            table = self._table(r.rt, page.items, page.rv)
            table["metadata"] = page.list_metadata()
            return self._send_obj(200, table)
        head = _encode({"kind": r.rt.list_kind, "apiVersion": r.rt.api_version, "metadata": page.list_metadata(),
                        "items": []})
        assert head.endswith(b"[]}")
        self._send(200, b"".join((head[:-2], b",".join(self.store.encoded(r.rt, page.items)), b"]}")))

    def _post_collection(self, r: _Route) -> None:
        if r.sub:
            raise ApiError.method_not_allowed()
        body = self._body(self.headers.get("Content-Type", ""))
        if not isinstance(body, dict):
            raise ApiError.bad_request("request body must be an object")
        body_ns = (body.get("metadata") or {}).get("namespace")
        if r.rt.namespaced and r.namespace is None:
            raise ApiError.method_not_allowed("POST requires a namespace for namespaced resources")
        if r.namespace and body_ns and body_ns != r.namespace:
            raise ApiError.bad_request("the namespace of the provided object does not match the namespace sent "
                                       "on the request")
        kind = body.get("kind")
        if kind and kind != r.rt.kind:
            raise ApiError.bad_request(f"the kind of the object ({kind}) does not match the URL ({r.rt.kind})")
        # adopt: the body was decoded for this request alone, and the answer is only encoded
        obj = self.store.create(body, namespace=r.namespace, resource=r.rt, dry_run=self._dry_run(), adopt=True)
        self._send(201, self.store.encoded_one(r.rt, obj))  # the stored object: its encoding is kept for lists

    def _delete_collection(self, r: _Route) -> None:
        items = self.store.delete_collection(r.rt, r.namespace, self.query.get("labelSelector"),
                                             self.query.get("fieldSelector"))
        self._send_obj(200, {"kind": r.rt.list_kind, "apiVersion": r.rt.api_version,
                             "metadata": {"resourceVersion": self.store.resource_version}, "items": items})

    # ---- item verbs --------------------------------------------------------------------------

    def _get_item(self, r: _Route) -> None:
        if r.sub == "log" and r.rt.key == "pods":
            return self._pod_log(r)
        if r.sub not in (None, "status", "scale"):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        obj = self.store.get_raw(r.rt, r.item, r.namespace)
        if r.sub == "scale":
            self._check_scale(r)
            return self._send_obj(200, _scale_of(obj))
        if self._wants_table() and r.sub is None:
            return self._send_obj(200, self._table(r.rt, [obj], obj["metadata"]["resourceVersion"]))
        self._send(200, self.store.encoded_one(r.rt, obj))

    def _pod_log(self, r: _Route) -> None:
        """``kubectl logs``: the file the pod runtime names (see :mod:`.podlogs`), sent chunked as
        text/plain; with ``follow`` until the pod is deleted, the client goes away or the server stops."""
        pod = self.store.get_raw(r.rt, r.item, r.namespace)
        runtime = self.server.controllers.runtime if self.server.controllers is not None else None
        req = podlogs.resolve(pod, runtime, self.query)
        uid = pod["metadata"]["uid"]

        def alive() -> bool:
            try:
                return self.store.get_raw(r.rt, r.item, r.namespace)["metadata"]["uid"] == uid
            except ApiError:
                return False

        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()
        if req.follow:
            self.close_connection = True
        try:
            for block in podlogs.chunks(req, alive):
                if block:
                    self._chunk(block)
                elif _peer_closed(self.connection):
                    return
            self._chunk(b"")
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True

    def _check_scale(self, r: _Route) -> None:
        if "scale" not in r.rt.subresources:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")

    def _put_item(self, r: _Route) -> None:
        body = self._body(self.headers.get("Content-Type", ""))
        if not isinstance(body, dict):
            raise ApiError.bad_request("request body must be an object")
        if r.sub == "scale":
            self._check_scale(r)
            return self._set_replicas(r, body)
        if r.sub not in (None, "status"):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        md = body.setdefault("metadata", {})
        if md.get("name") and md["name"] != r.name:
            raise ApiError.bad_request("the name of the object does not match the name on the URL")
        md["name"] = r.name
        obj = self.store.update(body, namespace=r.namespace, resource=r.rt, subresource=r.sub,
                                dry_run=self._dry_run(), adopt=True)
        self._send(200, self.store.encoded_one(r.rt, obj))

    def _set_replicas(self, r: _Route, scale: dict) -> None:
        replicas = (scale.get("spec") or {}).get("replicas")
        if not isinstance(replicas, int) or replicas < 0:
            raise ApiError.invalid(r.rt, r.name or "", "spec.replicas: Invalid value")
        with self.store.lock:
            cur = self.store.get_raw(r.rt, r.item, r.namespace)
            rv = (scale.get("metadata") or {}).get("resourceVersion")
            if rv and rv != cur["metadata"]["resourceVersion"]:
                raise ApiError.conflict(r.rt, r.name or "")
            obj = self.store.patch(r.rt, r.item, {"spec": {"replicas": replicas}}, namespace=r.namespace,
                                   patch_type=PATCH_MERGE, dry_run=self._dry_run())
        self._send_obj(200, _scale_of(obj))

    def _patch_item(self, r: _Route) -> None:
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip()
        body = self._body(ctype)
        if body is None:
            raise ApiError.bad_request("empty patch")
        if r.sub == "scale":
            self._check_scale(r)
            cur = _scale_of(self.store.get_raw(r.rt, r.item, r.namespace))
            if ctype == PATCH_JSON:
                new = json_patch(cur, body)
            elif ctype == PATCH_STRATEGIC:
                new = strategic_merge(cur, body)
            else:
                new = merge_patch(cur, body)
            return self._set_replicas(r, new)
        if r.sub not in (None, "status"):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if ctype == PATCH_STRATEGIC and r.rt.custom:  # as kube-apiserver: custom resources have no patch strategy
            raise ApiError(415, "UnsupportedMediaType", "the body of the request was in an unknown format - accepted "
                           f"media types include: {PATCH_JSON}, {PATCH_MERGE}, {PATCH_APPLY}")
        if ctype == PATCH_APPLY and r.sub is None:  # server-side apply with field ownership
            code, obj = fieldmanager.apply(self.store, r.rt, r.item, r.namespace, body,
                                           self.query.get("fieldManager"), self.query.get("force") in _TRUE,
                                           self._dry_run())
            return self._send_obj(code, obj)
        if ctype == PATCH_APPLY and isinstance(body, dict):
            if body.get("kind") and body["kind"] != r.rt.kind:
                raise ApiError.bad_request("the kind in the body does not match the URL")
            if r.sub is None and r.rt.has_status:
                body = {k: v for k, v in body.items() if k != "status"}
        obj = self.store.patch(r.rt, r.item, body, namespace=r.namespace, patch_type=ctype, subresource=r.sub,
                               field_manager=self.query.get("fieldManager"), dry_run=self._dry_run())
        self._send_obj(200, obj)

    def _delete_item(self, r: _Route) -> None:
        self._read_body()
        if r.sub:
            raise ApiError.method_not_allowed()
        obj = self.store.delete(r.rt, r.item, r.namespace, dry_run=self._dry_run())
        if r.rt.kind in ("Pod", "Namespace"):
            return self._send_obj(200, obj)
        details: dict = {"name": r.name, "kind": r.rt.plural, "uid": obj["metadata"]["uid"]}
        if r.rt.group:
            details["group"] = r.rt.group
        self._send_obj(200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                             "details": details})

    # ---- watch -------------------------------------------------------------------------------

    def _watch(self, r: _Route) -> None:
        q = self.query
        timeout = float(q["timeoutSeconds"]) if q.get("timeoutSeconds") else None
        bookmarks = q.get("allowWatchBookmarks") in _TRUE
        table = self._wants_table()
        deadline = time.monotonic() + timeout if timeout else None
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()
        self.close_connection = True
        try:
            w = self.store.watch(r.rt, r.namespace, q.get("resourceVersion"), q.get("labelSelector"),
                                 q.get("fieldSelector"))
        except ApiError as e:
            self._chunk(_encode({"type": "ERROR", "object": e.status()}) + b"\n")
            self._chunk(b"")
            return
        sock = self.connection
        w.on_close.append(lambda: _shutdown(sock))
        self.server.register_watch(w)
        interval = self.server.bookmark_interval
        first = True
        try:
            last_bookmark = time.monotonic()
            while True:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    break
                wait = interval
                if deadline is not None:
                    wait = min(wait, deadline - now)
                try:
                    item = w.queue.get(timeout=max(0.01, wait))
                except queue.Empty:
                    if _peer_closed(sock):
                        return
                    if bookmarks and time.monotonic() - last_bookmark >= interval:
                        rv = self.store.bookmark_version(w)
                        if rv is not None:
                            self._chunk(_encode({"type": "BOOKMARK", "object": {
                                "kind": r.rt.kind, "apiVersion": r.rt.api_version,
                                "metadata": {"resourceVersion": rv}}}) + b"\n")
                            last_bookmark = time.monotonic()
                    continue
                if item is None:
                    if w.finished:  # ended by the server (its kind went away): a complete response
                        break
                    return  # dropped: cut mid-body
                etype, obj = item
                if table:
                    obj = self._table(r.rt, [obj], obj["metadata"]["resourceVersion"], columns=first)
                    first = False
                    self._chunk(_encode({"type": etype, "object": obj}) + b"\n")
                else:  # a stored object's encoding is made once for all watches and lists
                    self._chunk(b'{"type":"%s","object":%s}\n' % (etype.encode(), self.store.encoded_one(r.rt, obj)))
            self._chunk(b"")
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass
        finally:
            self.server.unregister_watch(w)
            self.store.stop_watch(w)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _peer_closed(sock: socket.socket) -> bool:
    """True when a watch's client went away (a watch client sends nothing after its request)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if readable:
            # TLS: the socket cannot peek; anything arriving (close_notify, EOF) ends the watch.
            return isinstance(sock, ssl.SSLSocket) or sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True
    return False


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr: tuple[str, int], store: Store, bookmark_interval: float,
                 credentials: access.Credentials | None) -> None:
        super().__init__(addr, _Handler)
        self.store = store
        self.bind_host = addr[0]
        self.token = credentials.token if credentials else None
        self.ssl_context = credentials.ssl_context() if credentials else None
        self.bookmark_interval = bookmark_interval
        self.controllers: Controllers | None = None  # set by APIServer.start: the pod runtime serves logs
        self._watches: set[Watcher] = set()
        self._conns: set[socket.socket] = set()
        self._wlock = threading.Lock()

    @property
    def host_port(self) -> str:
        """``host:port`` of the bound socket (an AF_INET server: the host is a str, not bytes)."""
        host, port = cast("tuple[str, int]", self.server_address[:2])
        return f"{host}:{port}"

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        if self.ssl_context is not None:  # handshake later, on the request's thread (see _Handler.setup)
            sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection from %s failed", client_address, exc_info=True)  # e.g. a failed TLS handshake

    def track(self, conn: socket.socket, add: bool) -> None:
        with self._wlock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    def close_connections(self) -> None:
        with self._wlock:
            conns = list(self._conns)
        for c in conns:
            _shutdown(c)

    def register_watch(self, w: Watcher) -> None:
        with self._wlock:
            self._watches.add(w)

    def unregister_watch(self, w: Watcher) -> None:
        with self._wlock:
            self._watches.discard(w)

    def open_watches(self) -> list[Watcher]:
        with self._wlock:
            return list(self._watches)


class APIServer:
    """An in-memory, kubectl-compatible Kubernetes API server.

    ``store``: reuse an existing ``Store`` (restart with the same data). ``fresh_window``: expire the
    event history at start so watches from old resourceVersions get 410. ``history``: event window
    size for a new store. ``bookmark_interval``: seconds between BOOKMARK events.
    ``endpointslice_controller`` (default on) maintains EndpointSlices and Service clusterIPs;
    ``workload_controllers`` (default off) runs Deployment -> ReplicaSet -> Pod with ``pod_runtime``;
    ``service_cidr`` is where Service clusterIPs come from (local mode uses 127.2.0.0/16).
    ``freeze_every``: for a new store, freeze the process's heap out of the garbage collector every that
    many commits (0: never; see ``Store``); ``python -m trafficmgr.apiserver`` sets it.

    Access (see :mod:`.access`): every request must carry a ``Host`` that is a loopback name or ``host``
    (403 otherwise), and writes a JSON/YAML/patch/protobuf ``Content-Type`` (415 otherwise). ``token``:
    when set, every request must also carry ``Authorization: Bearer <token>`` (401 otherwise) and the
    server speaks HTTPS with a self-signed certificate (kubectl sends tokens only over TLS);
    :meth:`kubeconfig`/:meth:`api_client` carry both. None (the default) is plain HTTP without a token,
    for in-process tests only (local mode, ``python -m trafficmgr.apiserver`` and the test kit always set
    one), unless ``store`` was served with a token before: a restart keeps the token and certificate.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, store: Store | None = None,
                 fresh_window: bool = False, history: int = 10000, bookmark_interval: float = 2.0,
                 endpointslice_controller: bool = True, workload_controllers: bool = False,
                 pod_runtime: PodRuntime | None = None, service_cidr: str = "10.96.0.0/16",
                 token: str | None = None, freeze_every: int = 0) -> None:
        self.host = host
        self.port = port
        self.store = store if store is not None else Store(history=history, freeze_every=freeze_every)
        self.bookmark_interval = bookmark_interval
        self._fresh_window = fresh_window
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.credentials: access.Credentials | None = self.store.credentials
        if token is not None:
            self.credentials = access.Credentials.generate(token, hosts=(host,))
            self.store.credentials = self.credentials
        fieldmanager.install(self.store)  # before the controllers' admission: allocations are nobody's
        self.controllers = Controllers(self.store, endpointslices=endpointslice_controller,
                                       workloads=workload_controllers, pod_runtime=pod_runtime,
                                       service_cidr=service_cidr)

    @property
    def token(self) -> str | None:
        """The bearer token every request must carry (None: none needed)."""
        return self.credentials.token if self.credentials else None

    @property
    def token_authority(self) -> tokens.TokenAuthority:
        """The ServiceAccount token issuer behind TokenRequest/TokenReview (see :mod:`.tokens`)."""
        return tokens.authority(self.store)

    @property
    def url(self) -> str:
        """Base URL, e.g. ``https://127.0.0.1:34567`` (``http`` without a token; valid after ``start``)."""
        scheme = "https" if self.credentials else "http"
        host = self.host
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        if ip is not None and ip.is_unspecified:
            host = "127.0.0.1"
        elif ip is not None and ip.version == 6:
            host = f"[{host}]"
        return f"{scheme}://{host}:{self.port}"

    def start(self) -> APIServer:
        """Bind, start serving on a daemon thread and start controllers; returns when listening."""
        if self._fresh_window:
            self.store.expire_history()
        self._httpd = _HTTPServer((self.host, self.port), self.store, self.bookmark_interval, self.credentials)
        self.port = self._httpd.server_address[1]
        self._httpd.controllers = self.controllers
        self.controllers.start()
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"apiserver-{self.port}", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Start (if needed) and block until interrupted (used by ``python -m trafficmgr.apiserver``)."""
        if self._httpd is None:
            self.start()
        try:
            while self._thread and self._thread.is_alive():
                self._thread.join(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def stop(self) -> None:
        """Stop serving, close open watches and stop controllers; the store keeps its data."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self.drop_watches()
            self._httpd.close_connections()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        self.controllers.stop()

    def __enter__(self) -> APIServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def expire_history(self) -> None:
        """Test hook: later watches from any older resourceVersion get ERROR 410 Expired."""
        self.store.expire_history()

    def drop_watches(self) -> None:
        """Test hook: abruptly close every open HTTP watch connection."""
        if self._httpd is None:
            return
        for w in self._httpd.open_watches():
            self.store.stop_watch(w)

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until controllers processed all pending changes; False on timeout."""
        return self.controllers.wait_idle(timeout)

    def kubeconfig(self, context: str = "trafficmgr", namespace: str = "default") -> dict:
        """A kubeconfig dict pointing at this server, with the bearer token and the server's certificate
        (as its CA) when there is a token."""
        cluster: dict[str, Any] = {"server": self.url}
        user: dict[str, Any] = {}
        if self.credentials:
            cluster["certificate-authority-data"] = base64.b64encode(self.credentials.cert_pem.encode()).decode()
            user["token"] = self.credentials.token
        return {
            "apiVersion": "v1", "kind": "Config", "preferences": {},
            "clusters": [{"name": context, "cluster": cluster}],
            "users": [{"name": context, "user": user}],
            "contexts": [{"name": context, "context": {"cluster": context, "user": context, "namespace": namespace}}],
            "current-context": context,
        }

    def write_kubeconfig(self, path: str | Path, context: str = "trafficmgr") -> Path:
        """Write ``kubeconfig()`` as YAML to ``path``, created with mode 0600 (it holds the token; an
        existing file is replaced, not reused); returns the path."""
        return access.write_private_file(path, yaml.safe_dump(self.kubeconfig(context), sort_keys=False))

    def api_client(self) -> Any:
        """An official ``kubernetes.client.ApiClient`` configured for this server."""
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = self.url
        if self.credentials:
            cfg.api_key = {"authorization": f"Bearer {self.credentials.token}"}
            cfg.ca_cert_data = self.credentials.cert_pem
        return client.ApiClient(cfg)


__all__ = ["APIServer"]

