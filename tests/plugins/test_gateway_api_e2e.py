"""gateway_api end to end: Gateway API objects applied with kubectl to the local API server (the
project's CRDs), the real control plane with every built-in plugin, a real gateway Envoy
(``GatewayCluster``) and real backends (HttpBackend, the gRPC echo app) on a random 127.x.y.0/24 block.
Routing by path/header/query/method, weights (statistically), redirect, rewrite, header modifiers,
mirroring, GRPCRoute over HTTP/2, an HTTPS listener with SNI and a Secret, ReferenceGrant allowing and
refusing."""

from __future__ import annotations

import base64
import http.client
import json
import math
import random
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

import trafficmgr.core.kube.watch as watch_module
from tests.plugins.test_gateway_api_plan import make_cert
from trafficmgr.apiserver.crds import GATEWAY_API_CRDS
from trafficmgr.apps.grpc_echo import ECHO_METHOD, GrpcEchoServer
from trafficmgr.testing import free_port
from trafficmgr.testing.cluster import GatewayCluster
from trafficmgr.testing.kit import _bindable

BACKEND_PORT = 8080
GRPC_PORT = 9090
SECURE_HOST = "secure.example.com"


def _block() -> tuple[int, int]:
    rng = random.Random()
    for _ in range(50):
        block = (rng.randint(64, 250), rng.randint(0, 255))
        if _bindable(f"127.{block[0]}.{block[1]}.1", BACKEND_PORT):
            return block
    raise RuntimeError("no usable 127.x.y.0/24 block")


class Rig:
    def __init__(self, c: GatewayCluster, http_port: int, https_port: int, ips: dict[str, str], ca: Path) -> None:
        self.c, self.http_port, self.https_port, self.ips, self.ca = c, http_port, https_port, ips, ca
        self.backends = {b.name: b for b in c.backends}

    def request(self, path: str, host: str, method: str = "GET", headers: dict[str, str] | None = None,
                timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=timeout)
        try:
            conn.request(method, path, headers={"Host": host, **(headers or {})})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def served(self, path: str, host: str, **kw: Any) -> str:
        """The backend that answered, or ``<status>``."""
        try:
            status, _, body = self.request(path, host, **kw)
        except OSError as exc:
            return f"<{type(exc).__name__}>"
        return str(json.loads(body)["backend"]) if status == 200 else f"<{status}>"

    def apply(self, manifest: str) -> None:
        self.c.kubectl.apply(manifest)

    def wait(self, what: str, fn: Any, timeout: float = 20.0) -> None:
        self.c.wait_config(fn, timeout, message=what)


def service(name: str, ns: str, ip: str, port: int = BACKEND_PORT, app_protocol: str = "") -> str:
    proto = f", appProtocol: {app_protocol}" if app_protocol else ""
    return f"""
---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {ns}}}
spec: {{selector: {{app: {name}}}, ports: [{{name: p, port: 80, targetPort: {port}{proto}}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: {name}-1, namespace: {ns}, labels: {{app: {name}}}}}
spec: {{nodeName: node-1, containers: [{{name: app, image: {name}}}]}}
status: {{podIP: {ip}, conditions: [{{type: Ready, status: "True"}}]}}
"""


@pytest.fixture(scope="module")
def rig(envoy_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("gwapi-e2e")
    b0, b1 = _block()
    names = ("web", "canary", "mirror", "prod-web", "grpc")
    ips = {n: f"127.{b0}.{b1}.{i + 1}" for i, n in enumerate(names)}
    cert, key = make_cert(SECURE_HOST)
    (tmp / "ca.pem").write_bytes(cert)
    http_port, https_port = free_port(), free_port()
    mp = pytest.MonkeyPatch()
    mp.setattr(watch_module, "NOT_SERVED_RETRY", 0.2)  # the CRDs come after the control plane started
    grpc_app: GrpcEchoServer | None = None
    with GatewayCluster() as c:
        try:
            c.kubectl("apply", "-f", str(GATEWAY_API_CRDS))
            for n in names[:-1]:
                c.backend(n, ips[n], BACKEND_PORT)
            grpc_app = GrpcEchoServer(ips["grpc"], GRPC_PORT, pod_name="grpc-1").start()
            b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
            c.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: prod}\n"
                    + service("web", "default", ips["web"]) + service("canary", "default", ips["canary"])
                    + service("mirror", "default", ips["mirror"]) + service("web", "prod", ips["prod-web"])
                    + service("grpc", "default", ips["grpc"], GRPC_PORT))
            c.kubectl.apply(f"""
apiVersion: v1
kind: Secret
metadata: {{name: secure-cert, namespace: default}}
type: kubernetes.io/tls
data: {{tls.crt: {b64(cert)}, tls.key: {b64(key)}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {{name: traffic}}
spec: {{controllerName: trafficmgr.io/gateway-controller}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: gw, namespace: default}}
spec:
  gatewayClassName: traffic
  listeners:
  - {{name: http, port: {http_port}, protocol: HTTP, allowedRoutes: {{namespaces: {{from: All}}}}}}
  - {{name: https, port: {https_port}, protocol: HTTPS, hostname: {SECURE_HOST},
     tls: {{mode: Terminate, certificateRefs: [{{name: secure-cert}}]}}}}
""")
            yield Rig(c, http_port, https_port, ips, tmp / "ca.pem")
            assert c.cp.nacks() == [], f"Envoy rejected config: {c.cp.nacks()}"
        finally:
            mp.undo()
            if grpc_app is not None:
                grpc_app.stop(0)


@pytest.fixture(autouse=True)
def _reset(rig: Rig) -> None:
    for b in rig.backends.values():
        b.reset()


def httproute(name: str, host: str, rules: str, ns: str = "default", parent: str = "{name: gw, namespace: default, sectionName: http}") -> str:
    return f"""
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}, namespace: {ns}}}
spec:
  parentRefs: [{parent}]
  hostnames: [{host}]
  rules: {rules}
"""


def to(name: str, weight: int | None = None, ns: str | None = None) -> str:
    extra = (f", weight: {weight}" if weight is not None else "") + (f", namespace: {ns}" if ns else "")
    return f"{{name: {name}, port: 80{extra}}}"


def test_path_header_query_and_method_matches(rig: Rig) -> None:
    host = "match.example.com"
    rig.apply(httproute("match", host, f"""
    - {{matches: [{{path: {{type: Exact, value: /exact}}}}], backendRefs: [{to('canary')}]}}
    - {{matches: [{{path: {{type: PathPrefix, value: /p}}, headers: [{{name: x-version, value: two}}]}},
                  {{path: {{type: PathPrefix, value: /p}}, queryParams: [{{name: v, value: two}}]}},
                  {{path: {{type: PathPrefix, value: /p}}, method: POST}},
                  {{path: {{type: RegularExpression, value: "/re/[0-9]+"}}}}],
        backendRefs: [{to('canary')}]}}
    - {{backendRefs: [{to('web')}]}}
"""))
    rig.wait("match route", lambda: rig.served("/exact", host) == "canary")
    assert rig.served("/exactly", host) == "web"  # Exact is exact
    assert rig.served("/p", host) == "web"
    assert rig.served("/p/x", host, headers={"x-version": "two"}) == "canary"  # element-wise prefix
    assert rig.served("/px", host, headers={"x-version": "two"}) == "web"  # /px is not under /p
    assert rig.served("/p", host, headers={"X-Version": "two"}) == "canary"  # header names ignore case
    assert rig.served("/p?v=two", host) == "canary"
    assert rig.served("/p?v=three", host) == "web"
    assert rig.served("/p", host, method="POST") == "canary"
    assert rig.served("/re/42", host) == "canary" and rig.served("/re/x", host) == "web"
    assert rig.served("/exact", "other.example.net") == "<404>"  # no route for that host


def test_precedence_across_routes(rig: Rig) -> None:
    """The younger route's longer prefix wins; on an identical match the older route wins."""
    host = "prec.example.com"
    rig.apply(httproute("prec-old", host, f"[{{matches: [{{path: {{type: PathPrefix, value: /a}}}}], backendRefs: [{to('web')}]}}]"))
    rig.wait("old route", lambda: rig.served("/a/b", host) == "web")
    time.sleep(1.1)  # creationTimestamp has one-second resolution
    rig.apply(httproute("prec-young", host, f"""
    - {{matches: [{{path: {{type: PathPrefix, value: /a/b}}}}], backendRefs: [{to('canary')}]}}
    - {{matches: [{{path: {{type: PathPrefix, value: /a}}}}], backendRefs: [{to('mirror')}]}}
"""))
    rig.wait("young route", lambda: rig.served("/a/b", host) == "canary")
    assert rig.served("/a/c", host) == "web"  # the same match: the oldest route wins


def test_weights_are_statistically_right(rig: Rig) -> None:
    host = "weights.example.com"
    rig.apply(httproute("weights", host, f"[{{backendRefs: [{to('web', 90)}, {to('canary', 10)}, {to('mirror', 0)}]}}]"))
    rig.wait("weighted route", lambda: rig.served("/", host) in ("web", "canary"))
    n = 400
    seen = [rig.served(f"/w{i}", host) for i in range(n)]
    canary = seen.count("canary")
    assert seen.count("web") + canary == n  # nothing else, no errors; weight 0 gets nothing
    # Binomial(400, 0.1): mean 40, sd 6; 5 sd either side (a false failure about once in 1.7 million runs).
    mean, sd = n * 0.1, math.sqrt(n * 0.1 * 0.9)
    assert mean - 5 * sd <= canary <= mean + 5 * sd, canary


def test_redirect_http_to_https(rig: Rig) -> None:
    host = "redirect.example.com"
    rig.apply(httproute("redirect", host, """
    - {filters: [{type: RequestRedirect, requestRedirect: {scheme: https, statusCode: 301}}]}
"""))
    rig.wait("redirect", lambda: rig.request("/some/path?q=1", host)[0] == 301)
    status, headers, _ = rig.request("/some/path?q=1", host)
    assert status == 301 and headers["location"] == f"https://{host}/some/path?q=1"
    assert all(b.hits == 0 for b in rig.backends.values())


def test_rewrite_hostname_and_prefix(rig: Rig) -> None:
    host = "rewrite.example.com"
    rig.apply(httproute("rewrite", host, f"""
    - matches: [{{path: {{type: PathPrefix, value: /old}}}}]
      filters: [{{type: URLRewrite, urlRewrite: {{hostname: back.example.com,
                 path: {{type: ReplacePrefixMatch, replacePrefixMatch: /new}}}}}}]
      backendRefs: [{to('web')}]
"""))
    rig.wait("rewrite", lambda: rig.served("/old/x", host) == "web")
    seen = rig.backends["web"].requests[-1]
    assert seen["path"] == "/new/x" and seen["headers"]["host"] == "back.example.com"


def test_header_modifiers(rig: Rig) -> None:
    host = "headers.example.com"
    rig.apply(httproute("headers", host, f"""
    - filters:
      - {{type: RequestHeaderModifier, requestHeaderModifier: {{set: [{{name: x-set, value: "1"}}],
          add: [{{name: x-add, value: "2"}}], remove: [x-drop]}}}}
      - {{type: ResponseHeaderModifier, responseHeaderModifier: {{add: [{{name: x-resp, value: r}}], remove: [x-backend]}}}}
      backendRefs: [{to('web')}]
"""))
    rig.wait("headers", lambda: rig.served("/", host) == "web")
    status, headers, _ = rig.request("/", host, headers={"x-set": "old", "x-drop": "gone"})
    seen = rig.backends["web"].requests[-1]["headers"]
    assert status == 200 and seen["x-set"] == "1" and "x-drop" not in seen and seen["x-add"] == "2"
    assert headers["x-resp"] == "r" and "x-backend" not in headers


def test_mirror_backend_sees_the_copy(rig: Rig) -> None:
    host = "mirror.example.com"
    rig.apply(httproute("mirror", host, f"""
    - filters: [{{type: RequestMirror, requestMirror: {{backendRef: {to('mirror')}}}}}]
      backendRefs: [{to('web')}]
"""))
    rig.wait("mirror route", lambda: rig.served("/m", host) == "web")
    rig.backends["mirror"].reset()
    assert rig.served("/mirrored/1", host) == "web"
    rig.wait("the mirror's copy", lambda: any(r["path"] == "/mirrored/1" for r in rig.backends["mirror"].requests), 10)
    copy = next(r for r in rig.backends["mirror"].requests if r["path"] == "/mirrored/1")
    assert copy["headers"]["host"].startswith(host)


def test_grpc_route_to_a_grpc_backend(rig: Rig) -> None:
    rig.apply("""
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: echo, namespace: default}
spec:
  parentRefs: [{name: gw, sectionName: http}]
  hostnames: [grpc.example.com]
  rules:
  - matches: [{method: {service: trafficmgr.echo.Echo, method: Echo}}]
    backendRefs: [{name: grpc, port: 80}]
""")
    options = [("grpc.enable_http_proxy", 0), ("grpc.default_authority", "grpc.example.com")]

    def call() -> Any:
        with grpc.insecure_channel(f"127.0.0.1:{rig.http_port}", options=options) as ch:
            try:
                return ch.unary_unary(ECHO_METHOD).with_call(b"hello", timeout=5)
            except grpc.RpcError as exc:
                return exc

    rig.wait("GRPCRoute served", lambda: not isinstance(call(), grpc.RpcError))
    reply, c = call()
    assert reply == b"hello" and ("x-pod", "grpc-1") in c.initial_metadata()
    with grpc.insecure_channel(f"127.0.0.1:{rig.http_port}", options=options) as ch:
        with pytest.raises(grpc.RpcError) as err:  # the Stream method has no route
            list(ch.unary_stream("/trafficmgr.echo.Echo/Stream")(b"x", timeout=5))
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def https_get(rig: Rig, sni: str, host: str, path: str = "/") -> tuple[int, str]:
    ctx = ssl.create_default_context(cafile=str(rig.ca))
    with socket.create_connection(("127.0.0.1", rig.https_port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=sni) as tls:
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode(errors="replace")


def test_https_listener_with_sni_and_secret(rig: Rig) -> None:
    rig.apply(httproute("secure", SECURE_HOST, f"[{{backendRefs: [{to('web')}]}}]",
                        parent="{name: gw, namespace: default, sectionName: https}"))

    def ok() -> bool:
        try:
            return https_get(rig, SECURE_HOST, SECURE_HOST)[0] == 200
        except (OSError, ValueError, IndexError):
            return False

    rig.wait("HTTPS route", ok)
    status, body = https_get(rig, SECURE_HOST, SECURE_HOST, "/tls")
    assert status == 200 and json.loads(body)["backend"] == "web"
    # The certificate verified against the Secret's certificate (the handshake above) and names the host;
    # another SNI finds no chain: the handshake fails.
    with pytest.raises((ssl.SSLError, OSError)):
        https_get(rig, "other.example.com", "other.example.com")


def test_reference_grant_allows_and_refuses(rig: Rig) -> None:
    host = "grant.example.com"
    rig.apply(httproute("cross", host, f"[{{backendRefs: [{to('web', ns='prod')}]}}]"))
    rig.wait("refused: 500", lambda: rig.served("/", host) == "<500>")
    grant = """
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: from-default, namespace: prod}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: default}]
  to: [{group: "", kind: Service, name: web}]
"""
    rig.apply(grant)
    rig.wait("allowed by the grant", lambda: rig.served("/", host) == "prod-web")
    rig.c.kubectl("delete", "referencegrant", "from-default", "-n", "prod")
    rig.wait("refused again", lambda: rig.served("/", host) == "<500>")


def test_allowed_routes_same_namespace(rig: Rig) -> None:
    """The HTTPS listener allows routes of its own namespace only (the default): prod's route is refused."""
    rig.apply(httproute("prod-secure", "other.secure.example.com", f"[{{backendRefs: [{to('web')}]}}]", ns="prod",
                        parent="{name: gw, namespace: default, sectionName: https}"))

    def refused() -> bool:
        parents = json.loads(rig.c.kubectl("get", "httproute", "prod-secure", "-n", "prod", "-o", "json")).get("status", {}).get("parents", [])
        return any(c["reason"] == "NotAllowedByListeners" for p in parents for c in p["conditions"])

    rig.wait("NotAllowedByListeners", refused)


def test_backend_service_label_policies_apply(rig: Rig) -> None:
    """A backend Service's traffic labels apply to its Gateway API routes as to Ingress routes (here
    traffic.retries.5xx: two 503s are retried away); a label change reaches the route without touching it."""
    host = "policies.example.com"
    rig.apply(httproute("policies", host, f"[{{backendRefs: [{to('canary')}]}}]"))
    rig.wait("route", lambda: rig.served("/", host) == "canary")
    canary = rig.backends["canary"]
    canary.reset().set(statuses=[503, 503])
    assert rig.served("/no-retries", host) == "<503>"
    rig.c.label("service", "canary", {"traffic.retries.5xx": "2"})
    try:
        def retried() -> bool:
            canary.reset().set(statuses=[503, 503])
            return rig.served("/retried", host) == "canary" and canary.hits == 3
        rig.wait("retries from the Service label", retried)
    finally:
        rig.c.label("service", "canary", {"traffic.retries.5xx": None})


def test_certificate_rotation_without_restart(rig: Rig) -> None:
    """Updating the listener's Secret serves the new certificate on new connections (same Envoy)."""
    import ssl as _ssl

    rig.apply(httproute("secure", SECURE_HOST, f"[{{backendRefs: [{to('web')}]}}]",
                        parent="{name: gw, namespace: default, sectionName: https}"))

    def presented() -> bytes:
        ctx = _ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, _ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", rig.https_port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname=SECURE_HOST) as tls:
            return tls.getpeercert(binary_form=True) or b""

    def der(pem: bytes) -> bytes:
        return _ssl.PEM_cert_to_DER_cert(pem.decode())

    original = make_cert(SECURE_HOST)
    rig.wait("HTTPS listener", lambda: presented() == der(original[0]))
    assert rig.c.envoy.proc is not None
    pid = rig.c.envoy.proc.pid
    cert, key = make_cert.__wrapped__(SECURE_HOST)  # a fresh certificate for the same host
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731

    def put(pem: tuple[bytes, bytes]) -> None:
        rig.c.kubectl("patch", "secret", "secure-cert", "--type=merge", "-p",
                      json.dumps({"data": {"tls.crt": b64(pem[0]), "tls.key": b64(pem[1])}}))

    put((cert, key))
    try:
        rig.wait("the new certificate", lambda: presented() == der(cert))
        assert rig.c.envoy.proc.pid == pid
    finally:  # the other tests verify against the original certificate
        put(original)
        rig.wait("the original certificate back", lambda: presented() == der(original[0]))


def test_regex_envoy_would_reject_breaks_nothing(rig: Rig) -> None:
    """A regex too complex for Envoy's RE2 limits would make Envoy reject the whole route configuration
    (every route on the port): its rule is refused in the plan, the route's other rule and every other
    route keep being served, and Envoy rejects nothing."""
    host = "rx.example.com"
    rig.apply(httproute("rx", host, f"""
    - {{matches: [{{path: {{type: RegularExpression, value: "/(a{{1,20}}){{1,20}}"}}}}], backendRefs: [{to('canary')}]}}
    - {{matches: [{{path: {{type: PathPrefix, value: /fine}}}}], backendRefs: [{to('web')}]}}
"""))
    rig.wait("the valid rule", lambda: rig.served("/fine", host) == "web")
    assert rig.served("/aaaa", host) == "<404>"
    parents = json.loads(rig.c.kubectl("get", "httproute", "rx", "-o", "json"))["status"]["parents"]
    assert {c["type"]: c["reason"] for c in parents[0]["conditions"]}["Accepted"] == "UnsupportedValue"
    assert rig.c.cp.nacks() == []


def test_request_timeout(rig: Rig) -> None:
    host = "timeout.example.com"
    rig.apply(httproute("timeout", host, f"[{{timeouts: {{request: 300ms}}, backendRefs: [{to('mirror')}]}}]"))
    rig.wait("route", lambda: rig.served("/", host) == "mirror")
    rig.backends["mirror"].set(delay=1.5)
    started = time.monotonic()
    assert rig.served("/slow", host) == "<504>"
    assert time.monotonic() - started < 1.2


def _presented_der(port: int, sni: str) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw, server_hostname=sni) as tls:
        return tls.getpeercert(binary_form=True) or b""


def test_listener_with_several_certificate_refs_serves_each_by_sni(rig: Rig) -> None:
    """A listener with three certificateRefs (two Secrets and a missing one): Envoy presents each
    Secret's certificate to the SNI it names (the first to any other SNI) and routes over both; the
    listener's ResolvedRefs is False InvalidCertificateRef naming the missing Secret, Programmed True."""
    port = free_port()
    alt = "alt.example.com"
    cert, key = make_cert(alt)
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    rig.apply(f"""
apiVersion: v1
kind: Secret
metadata: {{name: alt-cert, namespace: default}}
type: kubernetes.io/tls
data: {{tls.crt: {b64(cert)}, tls.key: {b64(key)}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: multi, namespace: default}}
spec:
  gatewayClassName: traffic
  listeners:
  - {{name: https, port: {port}, protocol: HTTPS,
     tls: {{mode: Terminate, certificateRefs: [{{name: secure-cert}}, {{name: gone-cert}}, {{name: alt-cert}}]}}}}
""" + httproute("multi", "'*.example.com'", f"[{{backendRefs: [{to('canary')}]}}]",
                parent="{name: multi, namespace: default}"))
    der = lambda pem: ssl.PEM_cert_to_DER_cert(pem.decode())  # noqa: E731
    try:
        rig.wait("both certificates by SNI", lambda: _presented_der(port, alt) == der(cert)
                 and _presented_der(port, SECURE_HOST) == der(make_cert(SECURE_HOST)[0]))
        assert _presented_der(port, "other.example.com") == der(make_cert(SECURE_HOST)[0])  # no match: the first
        for host, ca in ((SECURE_HOST, make_cert(SECURE_HOST)[0]), (alt, cert)):
            ctx = ssl.create_default_context(cadata=ca.decode())  # verified against that Secret's certificate
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw, server_hostname=host) as tls:
                tls.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
                data = b""
                while chunk := tls.recv(65536):
                    data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            assert int(head.split()[1]) == 200 and json.loads(body)["backend"] == "canary", data[:200]

        def listener_status() -> dict[str, Any] | None:
            gw = json.loads(rig.c.kubectl("get", "gateway", "multi", "-o", "json"))
            lst = (gw.get("status") or {}).get("listeners") or []
            return lst[0] if lst and lst[0].get("conditions") else None

        rig.c.wait_config(lambda: listener_status() is not None, 20, message="listener status")
        got = listener_status()
        assert got is not None
        conds = {c["type"]: c for c in got["conditions"]}
        assert (conds["ResolvedRefs"]["status"], conds["ResolvedRefs"]["reason"]) == ("False", "InvalidCertificateRef")
        assert "default/gone-cert" in conds["ResolvedRefs"]["message"]
        assert conds["Programmed"]["status"] == "True" and got["attachedRoutes"] == 1
    finally:
        rig.c.kubectl("delete", "gateway", "multi")
        rig.c.kubectl("delete", "httproute", "multi")
        rig.c.kubectl("delete", "secret", "alt-cert")
