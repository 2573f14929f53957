"""Asking every control-plane replica: what ``trafficmgr proxy-status`` and ``config-dump`` do when the
control plane runs as several replicas (each Envoy holds its xDS stream on one of them).

How the CLI reaches the replicas (no new listener anywhere; each replica's admin endpoint stays where
``serve`` binds it, by default its pod's loopback):

- ``--admin URL`` (repeatable, comma-separated; ``--server`` is the same option): the admin endpoints
  themselves, asked directly (local mode, tests, several ``kubectl port-forward``\\ s);
- ``--discover [NS/]SERVICE``: the control plane Service's EndpointSlices (label
  ``kubernetes.io/service-name``) name the replica pods; each pod's admin port is reached through the
  API server's ``pods/portforward`` subresource (the official client's websocket port-forward), as
  ``kubectl port-forward`` does. The API server authenticates the user and authorizes
  ``list endpointslices`` and ``create pods/portforward`` in that namespace: whoever could already
  port-forward to one replica can ask them all, and nobody else; nothing listens on the pod network.

Every target is asked in parallel; a target that does not answer is reported by name with its error,
never dropped. Rows are merged deterministically (sorted by node id, then replica, then connection
time); each row names the ``replica`` holding the stream (from the row, else the ``Trafficmgr-Replica``
header, else the target's name).
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import attrs

from trafficmgr.core.admin import DEFAULT_PORT, REPLICA_HEADER

#: Label of the EndpointSlices that belong to a Service.
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


class ReplicaError(Exception):
    """One replica's failure (unreachable, refused, not a trafficmgr admin endpoint); ``http_status`` is
    set when the endpoint answered with an error status (its message is the endpoint's own)."""

    def __init__(self, message: str, http_status: int | None = None) -> None:
        super().__init__(message)
        self.http_status = http_status


@attrs.frozen
class Target:
    """One replica to ask: an admin ``url`` (``--admin``), or a ``pod`` in ``namespace`` whose admin
    ``port`` is reached through the API server (``--discover``). ``name``: how it is shown until it
    names itself (the URL, or the pod name)."""

    name: str
    url: str | None = None
    namespace: str | None = None
    pod: str | None = None
    port: int = DEFAULT_PORT


@attrs.frozen
class Answer:
    """What one target said to one GET: ``data`` (decoded JSON) or ``error``; ``replica``: the name the
    replica gave (``Trafficmgr-Replica``), else the target's name."""

    target: Target
    replica: str
    data: Any = None
    error: ReplicaError | None = None


# -- parsing the options ----------------------------------------------------------------------------


def admin_urls(values: Sequence[str], normalize: Callable[[str], str], flag: str = "--admin") -> list[str]:
    """The admin URLs of repeated, comma-separated ``values`` (``normalize`` checks and completes each
    one), duplicates dropped, in the order given. Raises ``ValueError`` for an empty item."""
    urls: list[str] = []
    for value in values:
        for item in value.split(","):
            if not item.strip():
                raise ValueError(f"{flag} {value!r}: an empty URL (give URLs separated by commas, e.g. "
                                 "http://127.0.0.1:18080,http://127.0.0.1:18081)")
            url = normalize(item)
            if url not in urls:
                urls.append(url)
    return urls


def parse_service(text: str, default_namespace: str) -> tuple[str, str]:
    """``[NS/]NAME`` -> ``(namespace, name)``; raises ``ValueError`` unless both are DNS labels."""
    namespace, _, name = text.strip().rpartition("/")
    namespace = namespace or default_namespace
    for part, what in ((namespace, "namespace"), (name, "Service name")):
        if not (part and len(part) <= 63 and _DNS_LABEL.fullmatch(part)):
            raise ValueError(f"--discover {text!r}: {what} {part!r} is not a valid name "
                             "(lower-case letters, digits and '-'; the form is [NAMESPACE/]SERVICE)")
    return namespace, name


# -- discovery ----------------------------------------------------------------------------------------


def discover(kube: Any, namespace: str, service: str, port: int) -> list[Target]:
    """The replica pods behind Service ``namespace/service``, from its EndpointSlices (ready or not: a
    replica that is not ready may still hold streams), one :class:`Target` per pod, sorted by name.
    ``kube``: a :class:`trafficmgr.core.kube.client.KubeClient`. Raises ``LookupError`` when the
    Service has no pod endpoints."""
    body = kube.list(f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices",
                     {"labelSelector": f"{SERVICE_NAME_LABEL}={service}"}, timeout=30)
    pods: set[str] = set()
    for item in body.get("items") or ():
        for endpoint in item.get("endpoints") or ():
            ref = endpoint.get("targetRef") or {}
            if ref.get("kind") == "Pod" and ref.get("name"):
                pods.add(str(ref["name"]))
    if not pods:
        raise LookupError(f"Service {namespace}/{service} has no pod endpoints (EndpointSlices labelled "
                          f"{SERVICE_NAME_LABEL}={service}): is the control plane running, and is that its Service?")
    return [Target(name=p, namespace=namespace, pod=p, port=port) for p in sorted(pods)]


# -- asking ---------------------------------------------------------------------------------------------


class Asker:
    """GETs admin paths from targets: plain HTTP(S) for URL targets, the API server's port-forward for
    pod targets (``api_client``: the official client's ``ApiClient``, needed only for those)."""

    def __init__(self, token: str | None = None, timeout: float = 10.0, api_client: Any = None,
                 unreachable: Callable[[str, object], str] | None = None,
                 not_admin: Callable[[str, str], str] | None = None) -> None:
        self.token = token
        self.timeout = timeout
        self.api_client = api_client
        self._unreachable = unreachable or (lambda where, why: f"cannot reach {where}: {why}")
        self._not_admin = not_admin or (lambda where, path: f"unexpected answer from {where}{path}")
        # kubernetes.stream swaps the ApiClient's request function while it opens a websocket: one at a time.
        self._pf_lock = threading.Lock()

    def get(self, target: Target, path: str, params: dict[str, str] | None = None) -> Answer:
        """One GET; never raises for the target's own failure (it is in ``Answer.error``)."""
        query = path + ("?" + urllib.parse.urlencode(params) if params else "")
        try:
            if target.url is not None:
                status, headers, body = self._http(target.url, query)
                where = target.url
            else:
                status, headers, body = self._port_forward(target, query)
                where = f"pod {target.namespace}/{target.pod} port {target.port}"
        except ReplicaError as exc:
            return Answer(target, target.name, error=exc)
        replica = headers.get(REPLICA_HEADER) or target.name
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if status != 200:
            message = data.get("error") if isinstance(data, dict) else None
            if not isinstance(message, str):
                return Answer(target, replica, error=ReplicaError(f"{self._not_admin(where, path)} (HTTP {status})"))
            return Answer(target, replica, error=ReplicaError(message, http_status=status))
        if data is None:
            return Answer(target, replica, error=ReplicaError(self._not_admin(where, path)))
        return Answer(target, replica, data=data)

    def get_all(self, targets: Sequence[Target], path: str, params: dict[str, str] | None = None) -> list[Answer]:
        """:meth:`get` on every target at once; answers in the order of ``targets``."""
        if len(targets) == 1:
            return [self.get(targets[0], path, params)]
        with ThreadPoolExecutor(min(16, len(targets))) as pool:
            return list(pool.map(lambda t: self.get(t, path, params), targets))

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def _http(self, base: str, query: str) -> tuple[int, dict[str, str], bytes]:
        try:
            return http_get(base + query, self._headers(), self.timeout)
        except Unreachable as exc:
            raise ReplicaError(self._unreachable(base, exc.reason)) from None

    def _port_forward(self, target: Target, query: str) -> tuple[int, dict[str, str], bytes]:
        from kubernetes import client as k8s
        from kubernetes.stream import portforward

        where = f"pod {target.namespace}/{target.pod} port {target.port} (through the API server's port-forward)"
        try:
            with self._pf_lock:
                forward = portforward(k8s.CoreV1Api(self.api_client).connect_get_namespaced_pod_portforward,
                                      target.pod, target.namespace, ports=str(target.port))
        except Exception as exc:  # noqa: BLE001 - ApiException(status=0) wraps every websocket failure
            raise ReplicaError(f"cannot port-forward to {where}: {handshake_reason(str(getattr(exc, 'reason', None) or exc))}") from None
        try:
            sock = forward.socket(target.port)
            sock.settimeout(self.timeout)
            conn = http.client.HTTPConnection("localhost", target.port, timeout=self.timeout)
            conn.sock = sock  # HTTP/1.1 over the forwarded stream
            try:
                conn.request("GET", query, headers={**self._headers(), "Connection": "close"})
                resp = conn.getresponse()
                return resp.status, dict(resp.getheaders()), resp.read()
            except (OSError, http.client.HTTPException) as exc:
                error = forward.error(target.port)
                raise ReplicaError(f"cannot reach the admin endpoint of {where}: {error or exc or type(exc).__name__}") from None
        finally:
            forward.close()


class Unreachable(Exception):
    """:func:`http_get` got no HTTP answer; ``reason`` says why (socket error, timeout, bad response)."""

    def __init__(self, reason: object) -> None:
        super().__init__(str(reason))
        self.reason = reason


def http_get(url: str, headers: dict[str, str], timeout: float) -> tuple[int, dict[str, str], bytes]:
    """GET ``url``: ``(status, headers, body)``; HTTP error statuses are returned, not raised; no answer at
    all raises :class:`Unreachable`. The caller has checked the scheme (http or https)."""
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310 - scheme checked by the caller
            return resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as exc:
        try:
            body = exc.read()
        except OSError:
            body = b""
        return exc.code, dict(exc.headers.items()) if exc.headers else {}, body
    except urllib.error.URLError as exc:
        raise Unreachable(exc.reason) from None
    except (OSError, TimeoutError, http.client.HTTPException) as exc:
        raise Unreachable(exc) from None


def handshake_reason(text: str) -> str:
    """A failed port-forward handshake in a line: ``HTTP 403: <the API server's Status message>`` (with
    the permission it needs for 403) instead of the websocket library's dump of headers and body."""
    m = re.search(r"Handshake status (\d+)", text)
    if m is None:
        return text.splitlines()[0] if text else "failed"
    code = int(m.group(1))
    message = ""
    start = text.find('{"kind"')
    if start >= 0:
        try:
            message = str(json.JSONDecoder().raw_decode(text[start:])[0].get("message") or "")
        except ValueError:
            message = ""
    hint = " (needs create pods/portforward in the namespace)" if code == 403 else ""
    return f"HTTP {code}{': ' + message if message else ''}{hint}"


# -- merging ------------------------------------------------------------------------------------------


def merge_status(answers: Sequence[Answer], fill: bool = True) -> list[dict[str, Any]]:
    """Every stream of every answering replica, sorted by node id, replica, connection time. ``fill``:
    a row that names no ``replica`` (an older server) gets the answer's."""
    rows: list[dict[str, Any]] = []
    for answer in answers:
        if answer.error is None and isinstance(answer.data, list):
            for row in answer.data:
                rows.append({**row, "replica": row.get("replica") or answer.replica} if fill else row)
    return sorted(rows, key=lambda r: (str(r.get("node_id")), str(r.get("replica")), str(r.get("connected_at"))))


def holder(answers: Sequence[Answer], node_id: str) -> Answer | None:
    """The answer of the replica holding ``node_id``'s stream (the latest connected when several do,
    e.g. while an Envoy moves to another replica); None when no answering replica holds it."""
    best: tuple[float, str] | None = None
    found: Answer | None = None
    for answer in answers:
        if answer.error is not None or not isinstance(answer.data, list):
            continue
        for row in answer.data:
            if row.get("node_id") != node_id:
                continue
            at = row.get("connected_at")
            key = (float(at) if isinstance(at, (int, float)) else 0.0, answer.replica)
            if best is None or key > best:
                best, found = key, answer
    return found


def failure_line(answer: Answer) -> str:
    """``replica NAME did not answer: ERROR`` for a failed answer (the target's URL or pod named too)."""
    where = answer.target.url or f"pod {answer.target.namespace}/{answer.target.pod}"
    name = answer.replica if answer.replica == where else f"{answer.replica} ({where})"
    return f"replica {name} did not answer: {answer.error}"


__all__ = ["Answer", "Asker", "ReplicaError", "Target", "Unreachable", "admin_urls", "discover", "failure_line", "handshake_reason", "http_get",
           "holder", "merge_status", "parse_service"]
