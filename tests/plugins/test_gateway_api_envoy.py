"""gateway_api translation through a real gateway Envoy: a hand-made route table (``gateway_api_tables.py``)
built by the real builder (with the ingress and circuit_breaker plugins), served over xDS from the real
snapshot cache to an Envoy with node cluster ``traffic-ingress``; requests from Python's HTTP, TLS and
gRPC clients to real backends (HttpBackend, the gRPC echo app) on a random 127.x.y.0/24 block. Every test
runs over state-of-the-world and incremental (delta) xDS.
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import ssl
import time
from collections.abc import Iterator
from typing import Any

import attrs
import grpc
import pytest

from tests.plugins import gateway_api_tables as T
from tests.plugins.tlscerts import make_ca, make_leaf, serial_of_der, tls_handshake
from trafficmgr.apps.grpc_echo import ECHO_METHOD, STREAM_METHOD, GrpcEchoServer
from trafficmgr.core.model import GATEWAY_CLUSTER
from trafficmgr.testing import ControlPlane, EnvoyProcess, HttpBackend, free_port
from trafficmgr.testing.golden import build_from_manifests
from trafficmgr.testing.kit import _bindable, load_manifests

NODE = "gateway-api-test"
GRPC_OPTIONS = [("grpc.enable_http_proxy", 0), ("grpc.default_authority", "grpc.example.com")]


class RawHeaders(HttpBackend):
    """An HttpBackend that also keeps every request's header lines as sent (repeated names included)."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.raw: list[list[tuple[str, str]]] = []

    def make_handler(self) -> Any:
        base = super().make_handler()
        backend = self

        class Handler(base):  # type: ignore[misc,valid-type]
            def _handle(self) -> None:
                backend.raw.append([(k.lower(), v) for k, v in self.headers.items()])
                super()._handle()

            do_GET = do_POST = do_HEAD = _handle

        return Handler


@attrs.define
class Rig:
    cp: ControlPlane
    envoy: EnvoyProcess
    http_port: int
    https_port: int
    backends: dict[str, HttpBackend]
    ca_path: str
    serials: dict[str, int]
    snapshot: Any

    def request(self, path: str, host: str, method: str = "GET", headers: dict[str, str] | None = None,
                timeout: float = 10.0) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=timeout)
        try:
            conn.request(method, path, headers={"Host": host, **(headers or {})})
            resp = conn.getresponse()
            return resp.status, [(k.lower(), v) for k, v in resp.getheaders()], resp.read()
        finally:
            conn.close()

    def served(self, path: str, host: str = "match.example.com", **kw: Any) -> str:
        """The backend that answered (or ``<status>``)."""
        status, _, body = self.request(path, host, **kw)
        return json.loads(body)["backend"] if status == 200 else f"<{status}>"


def _block() -> tuple[int, int]:
    rng = random.Random()
    for _ in range(50):
        block = (rng.randint(64, 250), rng.randint(0, 255))
        if _bindable(f"127.{block[0]}.{block[1]}.1", T.HTTP_PORT):
            return block
    raise RuntimeError("no usable 127.x.y.0/24 block")


@pytest.fixture(scope="module", params=["sotw", "delta"])
def rig(request: pytest.FixtureRequest, envoy_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("gwapi")
    b0, b1 = _block()
    names = (*T.SERVICES, T.GRPC_SERVICE)
    ips = {n: f"127.{b0}.{b1}.{i + 1}" for i, n in enumerate(names)}
    ca = make_ca(tmp / "pki")
    serials = {"shop": 0x5A01, "blog": 0x5A02, "default": 0x5A03}
    leafs = {
        "shop": make_leaf(ca, tmp / "pki", ["shop.example.com"], serials["shop"]),
        "blog": make_leaf(ca, tmp / "pki", ["*.blog.example.com"], serials["blog"]),
        "default": make_leaf(ca, tmp / "pki", ["default.example.com"], serials["default"]),
    }
    pems = {k: (c.cert.encode(), c.key.encode()) for k, c in leafs.items()}
    http_port, https_port = free_port(), free_port()
    backends: dict[str, HttpBackend] = {}
    grpc_app: GrpcEchoServer | None = None
    cp = ControlPlane().start()
    envoy: EnvoyProcess | None = None
    try:
        for n in T.SERVICES:
            cls = RawHeaders if n == "web" else HttpBackend
            backends[n] = cls(n, ips[n], T.HTTP_PORT).start()
        grpc_app = GrpcEchoServer(ips[T.GRPC_SERVICE], T.GRPC_PORT, pod_name="grpc-1").start()
        host = T.plugins(lambda m: T.full_table(m, http_port, https_port, pems))
        snaps, warnings = build_from_manifests(load_manifests(T.manifests(ips)), host, T.options())
        assert warnings == [] and snaps["gateway"].errors() == []
        cp.nodes[NODE] = "gateway"
        cp.cache.set_view("gateway", snaps["gateway"])
        envoy = EnvoyProcess(cp.bootstrap(NODE, GATEWAY_CLUSTER, delta=request.param == "delta"), tmp / "envoy").start()
        r = Rig(cp, envoy, http_port, https_port, backends, str(ca.cert_path), serials, snaps["gateway"])
        envoy.wait_for(lambda: r.served("/") == "web", message="gateway_api listener not serving")
        yield r
        assert cp.nacks() == [], f"Envoy rejected config: {cp.nacks()}"
    finally:
        if envoy is not None:
            envoy.stop()
        cp.stop()
        for b in backends.values():
            b.stop()
        if grpc_app is not None:
            grpc_app.stop(0)


@pytest.fixture(autouse=True)
def _reset(rig: Rig) -> None:
    for b in rig.backends.values():
        b.reset()
    raw = rig.backends["web"]
    assert isinstance(raw, RawHeaders)
    raw.raw.clear()


def test_everything_acked_no_nack(rig: Rig) -> None:
    """Envoy ACKed every resource type of the gateway view (listeners, routes, secrets, clusters)."""
    from trafficmgr.core import cache

    status = rig.cp.status()
    assert status and all((s.get(t) or {}).get("last_nack") is None for s in status for t in ("listeners", "routes", "secrets", "clusters"))
    acked = {t: (status[0].get(t) or {}).get("acked") for t in ("listeners", "routes", "secrets", "clusters")}
    assert acked["listeners"] == rig.snapshot.types[cache.LISTENER].version
    assert acked["routes"] == rig.snapshot.types[cache.ROUTE].version
    assert acked["secrets"] == rig.snapshot.types[cache.SECRET].version
    stats = rig.envoy.stats()
    assert stats.get("listener_manager.lds.update_rejected", 0) == 0
    assert [k for k, v in stats.items() if "update_rejected" in k and v] == []


def test_match_kinds_and_precedence(rig: Rig) -> None:
    s = rig.served
    assert s("/exact") == "web"
    assert s("/exact", headers={"X-Env": "canary"}) == "web"  # both match: the first route (Exact) wins
    assert s("/prefix/long") == "api" and s("/prefix/long/x") == "api"
    assert s("/prefix/longer") == "web"  # element-wise: /prefix/long does not match /prefix/longer
    assert s("/re/123") == "api" and s("/re/123/x") == "web" and s("/re/x") == "web"  # the whole path must match
    assert s("/", headers={"X-Env": "canary"}) == "canary" and s("/", headers={"x-env": "other"}) == "web"
    assert s("/", headers={"X-Ver": "v7"}) == "api" and s("/", headers={"X-Ver": "v77"}) == "web"
    assert s("/?q=yes") == "canary" and s("/?q=no") == "web" and s("/a?n=42") == "api" and s("/a?n=4x") == "web"
    assert s("/", method="POST") == "api"
    assert s("/", method="POST", headers={"X-Env": "canary"}) == "canary"  # header route comes first
    # Hostnames: exact, wildcard (one or more labels), catch-all.
    assert s("/", host="a.wild.example.com") == "api" and s("/", host="b.a.wild.example.com") == "api"
    assert s("/", host="wild.example.com") == "web" and s("/", host="unknown.test") == "web"
    assert s("/", host="match.example.com:1234", headers={"X-Env": "canary"}) == "canary"  # port ignored


def test_weights(rig: Rig) -> None:
    n = 400
    got = [rig.served("/weights", "filters.example.com") for _ in range(n)]
    assert set(got) == {"web", "api"}
    share = got.count("web") / n
    assert 0.65 < share < 0.85, f"web share {share} (weights 3:1)"


def test_invalid_backends_answer_500(rig: Rig) -> None:
    assert rig.request("/invalid", "filters.example.com")[0] == 500
    assert rig.request("/no-backends", "filters.example.com")[0] == 500
    n = 300
    got = [rig.served("/partial", "filters.example.com") for _ in range(n)]
    assert set(got) == {"web", "<500>"}
    share = got.count("<500>") / n
    assert 0.38 < share < 0.62, f"500 share {share} (one valid, one invalid backend, 1:1)"


def test_redirects(rig: Rig) -> None:
    host = f"filters.example.com:{rig.http_port}"

    def redirect(path: str) -> tuple[int, str]:
        status, headers, _ = rig.request(path, host)
        return status, dict(headers).get("location", "")

    assert redirect("/redirect-https/a?x=1") == (301, "https://filters.example.com/redirect-https/a?x=1")
    assert redirect("/redirect-host/a") == (302, "http://other.example.com:8443/new")
    assert redirect("/redirect-prefix/a?b=1") == (308, f"http://filters.example.com:{rig.http_port}/moved/a?b=1")
    assert redirect("/redirect-same-port") == (303, f"http://filters.example.com:{rig.http_port}/redirect-same-port")
    assert redirect("/redirect-http-port") == (307, "http://filters.example.com/redirect-http-port")
    assert rig.backends["web"].hits == 0


def _seen(rig: Rig) -> dict[str, Any]:
    return dict(rig.backends["web"].requests[-1])


def test_rewrites(rig: Rig) -> None:
    h = "filters.example.com"
    assert rig.request("/rewrite-prefix/a", h)[0] == 200
    seen = _seen(rig)
    assert seen["path"] == "/new/a" and seen["headers"]["host"] == "rewritten.example.com"
    rig.request("/rewrite-prefix", h)
    assert _seen(rig)["path"] == "/new"
    rig.request("/rewrite-strip/a?k=v", h)
    assert _seen(rig)["path"] == "/a?k=v"
    rig.request("/rewrite-strip", h)
    assert _seen(rig)["path"] == "/"
    rig.request("/rewrite-full/x/y?k=v", h)
    assert _seen(rig)["path"] == "/full?k=v"


def test_replace_prefix_match_table_of_the_specification(rig: Rig) -> None:
    for i, (matched, repl, cases) in enumerate(T.REPLACE_PREFIX_CASES):
        for path, expected in cases.items():
            assert rig.request(path, f"rw{i}.example.com")[0] == 200
            assert _seen(rig)["path"] == expected, f"prefix {matched!r} -> {repl!r}: {path}"


def test_header_modifiers(rig: Rig) -> None:
    web = rig.backends["web"]
    assert isinstance(web, RawHeaders)
    web.set(headers={"X-Resp-Add": "from-backend"})
    status, headers, _ = rig.request("/headers", "filters.example.com",
                                     headers={"X-Set": "old", "X-Add": "first", "X-Remove": "gone"})
    assert status == 200
    raw = web.raw[-1]
    values = lambda n: [v for k, v in raw if k == n]  # noqa: E731
    assert values("x-set") == ["set-value"]  # overwritten
    assert ",".join(values("x-add")).split(",") == ["first", "added"]  # appended
    assert values("x-remove") == []
    assert values("host") == ["set-host.example.com"]  # a set Host is the route's host rewrite
    resp = lambda n: [v for k, v in headers if k == n]  # noqa: E731
    assert resp("x-backend") == ["replaced"]
    assert ",".join(resp("x-resp-add")).split(",") == ["from-backend", "r"]
    assert resp("content-type") == []


def test_mirror(rig: Rig) -> None:
    mirror = rig.backends["mirror"]
    assert rig.served("/mirror-all/x", "filters.example.com") == "web"
    rig.envoy.wait_for(lambda: mirror.hits == 1, message="mirror saw no copy")
    copy = mirror.requests[-1]
    assert copy["path"] == "/mirror-all/x" and copy["headers"]["host"] == "filters.example.com"
    mirror.reset()
    n = 200
    for _ in range(n):
        assert rig.served("/mirror-half", "filters.example.com") == "web"
    time.sleep(0.5)
    assert 0.35 * n < mirror.hits < 0.65 * n, f"mirror hits {mirror.hits} of {n} (50 %)"


def test_timeouts_and_route_policies(rig: Rig) -> None:
    web, labelled = rig.backends["web"], rig.backends["labelled"]
    web.set(delay=1.5)
    start = time.monotonic()
    status = rig.request("/timeouts", "filters.example.com")[0]
    took = time.monotonic() - start
    assert status == 504 and 0.4 < took < 1.3, (status, took)  # backendRequest 500 ms (per try)
    web.reset()
    # The Service's labels apply through the route hooks: traffic.retries.5xx=3.
    labelled.set(statuses=[503, 503])
    assert rig.served("/labelled", "filters.example.com") == "labelled" and labelled.hits == 3
    # The route's own timeout (1.5 s) wins over the label's (9 s).
    labelled.reset().set(delay=3)
    start = time.monotonic()
    status = rig.request("/labelled-timeout", "filters.example.com")[0]
    took = time.monotonic() - start
    assert status == 504 and 1.3 < took < 2.8, (status, took)


def _https(rig: Rig, sni: str | None, host: str, path: str = "/") -> tuple[int, str]:
    ctx = ssl.create_default_context(cafile=rig.ca_path)
    ctx.check_hostname = False
    raw = socket.create_connection(("127.0.0.1", rig.https_port), timeout=5)
    conn = http.client.HTTPSConnection("127.0.0.1", rig.https_port, timeout=5, context=ctx)
    conn.sock = ctx.wrap_socket(raw, server_hostname=sni)
    try:
        conn.request("GET", path, headers={"Host": host})
        resp = conn.getresponse()
        body = resp.read().decode(errors="replace")
        return resp.status, json.loads(body)["backend"] if resp.status == 200 else body
    finally:
        conn.close()


def _presented(rig: Rig, sni: str) -> int:
    """The serial of the certificate presented for ``sni`` (chain verified, name not checked)."""
    ctx = ssl.create_default_context(cafile=rig.ca_path)
    ctx.check_hostname = False
    with socket.create_connection(("127.0.0.1", rig.https_port), timeout=5) as raw, ctx.wrap_socket(raw, server_hostname=sni) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return serial_of_der(der)


def test_https_sni_picks_the_certificate_and_routes(rig: Rig) -> None:
    serial = lambda sni: tls_handshake("127.0.0.1", rig.https_port, sni, rig.ca_path)  # noqa: E731
    assert serial("shop.example.com") == (rig.serials["shop"], "h2")  # hostname verified against the test CA
    assert serial("a.blog.example.com")[0] == rig.serials["blog"]
    assert _presented(rig, "x.y.blog.example.com") == rig.serials["blog"]  # Gateway API wildcard: one or more labels
    assert serial(None)[0] == rig.serials["default"]  # no SNI: the default chain
    assert _presented(rig, "unknown.example.com") == rig.serials["default"]
    assert _https(rig, "shop.example.com", "shop.example.com") == (200, "web")
    assert _https(rig, "a.blog.example.com", "a.blog.example.com") == (200, "api")
    assert _https(rig, "other.example.com", "other.example.com") == (200, "canary")  # default certificate
    # A host outside the connection's certificate: 421, never another chain's routes.
    status, body = _https(rig, "shop.example.com", "a.blog.example.com")
    assert status == 421 and "misdirected" in body
    # Plain HTTP on the HTTPS port matches no chain: the connection is closed.
    conn = http.client.HTTPConnection("127.0.0.1", rig.https_port, timeout=5)
    with pytest.raises((ConnectionError, http.client.RemoteDisconnected, OSError)):
        conn.request("GET", "/", headers={"Host": "shop.example.com"})
        conn.getresponse()
    conn.close()


def test_grpc_over_http2(rig: Rig) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{rig.http_port}", options=GRPC_OPTIONS) as ch:
        echo = ch.unary_unary(ECHO_METHOD)
        reply, call = echo.with_call(b"hello", timeout=10)
        assert reply == b"hello" and ("x-pod", "grpc-1") in call.initial_metadata()
        # The regular-expression route (the plan's shape for a GRPCRoute method regex).
        stream = ch.unary_stream(STREAM_METHOD)
        assert list(stream(b"tick", metadata=(("x-count", "3"), ("x-interval-ms", "10")), timeout=10)) == [b"tick"] * 3
        # A method no route matches: Envoy's 404 becomes gRPC UNIMPLEMENTED.
        with pytest.raises(grpc.RpcError) as err:
            ch.unary_unary("/trafficmgr.echo.Echo/Nope")(b"x", timeout=10)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_grpc_backend_cluster_speaks_http2(rig: Rig) -> None:
    """The gRPC backend's cluster in the gateway view is HTTP/2 (no HTTP/1.1 copy); HTTP backends get theirs."""
    clusters = {c["name"]: c for c in rig.envoy.dynamic("clusters")}
    grpc_cluster = json.dumps(clusters[f"{T.GRPC_PORT}|default|grpc.outbound"])
    assert "http2_protocol_options" in grpc_cluster
    web_cluster = json.dumps(clusters[f"{T.HTTP_PORT}|default|web.outbound"])
    assert "http_protocol_options" in web_cluster and "use_downstream_protocol_config" not in web_cluster

