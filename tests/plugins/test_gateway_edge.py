"""The gateway as an edge proxy (issue 16, Low): 421 for a Host outside the SNI chain's certificate, and
Envoy's edge settings, through a real gateway Envoy started from the bootstrap the chart's gateway gets
(``trafficmgr bootstrap --node-cluster traffic-ingress``: the plugins' ``trafficmgr_bootstrap`` hooks).

HTTP/2 is spoken with a minimal raw-frame client (below): no HTTP/2 library holds back streams beyond the
server's limit or lets a test put another ``:authority`` on a TLS connection on purpose.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import ssl
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.plugins.tlscerts import CA, Cert, make_ca, make_leaf, secret_yaml, tls_handshake
from trafficmgr.core.bootstrap import bootstrap
from trafficmgr.core.model import GATEWAY_CLUSTER
from trafficmgr.testing.cluster import GatewayCluster
from trafficmgr.testing.envoy import EnvoyProcess

HEAP = 300 * 1024 * 1024

BACKENDS = """
apiVersion: v1
kind: Service
metadata: {name: alpha, namespace: default}
spec:
  selector: {app: alpha}
  ports: [{name: http, port: 8080, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: alpha-1, namespace: default, labels: {app: alpha}}
spec: {nodeName: node-1, containers: [{name: app, image: alpha}]}
status: {podIP: 127.0.13.1, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Service
metadata: {name: beta, namespace: default}
spec:
  selector: {app: beta}
  ports: [{name: http, port: 8080, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: beta-1, namespace: default, labels: {app: beta}}
spec: {nodeName: node-1, containers: [{name: app, image: beta}]}
status: {podIP: 127.0.13.2, conditions: [{type: Ready, status: "True"}]}
"""

# Two tenants with their own certificates, a wildcard tenant, and a catch-all rule (served for any host
# over plain HTTP, but never over a TLS connection whose certificate does not name the host).
INGRESS = """
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: edge, namespace: default}
spec:
  ingressClassName: traffic
  tls:
  - {hosts: [a.example], secretName: a-tls}
  - {hosts: [b.example], secretName: b-tls}
  - {hosts: ["*.w.example"], secretName: w-tls}
  - {hosts: [one.v.example, none.example], secretName: v-tls}
  rules:
  - host: a.example
    http:
      paths: [{path: /, pathType: Prefix, backend: {service: {name: alpha, port: {number: 8080}}}}]
  - host: b.example
    http:
      paths: [{path: /, pathType: Prefix, backend: {service: {name: beta, port: {number: 8080}}}}]
  - host: "*.w.example"
    http:
      paths: [{path: /, pathType: Prefix, backend: {service: {name: alpha, port: {number: 8080}}}}]
  - host: "*.v.example"
    http:
      paths: [{path: /v, pathType: Prefix, backend: {service: {name: alpha, port: {number: 8080}}}}]
  - http:
      paths: [{path: /, pathType: Prefix, backend: {service: {name: beta, port: {number: 8080}}}}]
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[CA, dict[str, Cert]]:
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d)
    return ca, {"a": make_leaf(ca, d, ["a.example"], 0xA1), "b": make_leaf(ca, d, ["b.example"], 0xB1),
                "w": make_leaf(ca, d, ["*.w.example"], 0xC1),
                "v": make_leaf(ca, d, ["one.v.example", "none.example"], 0xD1)}


@pytest.fixture(scope="module")
def gw(envoy_binary: str, pki: tuple[CA, dict[str, Cert]]) -> Iterator[GatewayCluster]:
    ca, certs = pki
    with GatewayCluster() as c:
        # The gateway Envoy the chart runs: its bootstrap went through the plugins' bootstrap hooks.
        c.envoy.stop()
        config = bootstrap(GatewayCluster.NODE_ID, GATEWAY_CLUSTER, "127.0.0.1", c.xds.port, admin_port=0)
        c.plugins.call_all("trafficmgr_bootstrap", bootstrap=config, role=GATEWAY_CLUSTER,
                           options=argparse.Namespace(gateway_max_heap_bytes=HEAP))
        c.envoy = EnvoyProcess(config, c.tmp / "envoy-edge").start()
        c.backend("alpha", "127.0.13.1", 8080)
        c.backend("beta", "127.0.13.2", 8080)
        c.apply(BACKENDS)
        for name, cert in certs.items():
            c.apply(secret_yaml(f"{name}-tls", cert.cert, cert.key))
        c.apply(INGRESS)
        c.wait_config(lambda: _serial(c, ca, "b.example") == 0xB1 and _serial(c, ca, "x.w.example") == 0xC1,
                      message="TLS not served")
        yield c
        assert c.cp.nacks() == [], f"Envoy rejected config: {c.cp.nacks()}"


def _serial(c: GatewayCluster, ca: CA, sni: str) -> int | None:
    try:
        return tls_handshake("127.0.0.1", c.gateway_port, sni, str(ca.cert_path))[0]
    except (ssl.SSLError, OSError):
        return None


def _tls_socket(port: int, sni: str, cafile: str, alpn: str) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.set_alpn_protocols([alpn])
    return ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5), server_hostname=sni)


def https1(port: int, sni: str, host: str, path: str, cafile: str) -> tuple[int, str]:
    """HTTP/1.1 over TLS with SNI ``sni`` (certificate verified for it) and ``Host: host``."""
    sock = _tls_socket(port, sni, cafile, "http/1.1")
    conn = http.client.HTTPConnection(host, port, timeout=5)
    conn.sock = sock
    try:
        conn.request("GET", path, headers={"Host": host})
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


def http1(port: int, path: str, host: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    """A plain HTTP/1.1 request with the path sent exactly as given (no client-side normalisation)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read().decode(errors="replace")
    finally:
        conn.close()


def backend_of(body: str) -> str:
    try:
        return str(json.loads(body)["backend"])
    except (ValueError, KeyError):
        return f"<not a backend: {body[:80]!r}>"


# -- a minimal HTTP/2 client (RFC 9113 frames, HPACK literals without indexing) ----------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x8
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
SETTINGS_MAX_CONCURRENT_STREAMS, SETTINGS_INITIAL_WINDOW_SIZE = 0x3, 0x4
REFUSED_STREAM = 0x7


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out, value = [first | limit], value - limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    return bytes(out + [value])


def _literal(name: str, value: str) -> bytes:
    """A header as "literal without indexing, new name", no Huffman coding."""
    n, v = name.encode(), value.encode()
    return b"\x00" + _hpack_int(len(n), 7) + n + _hpack_int(len(v), 7) + v


class H2:
    """Sends requests (all at once if asked) and records what the server answers per stream."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.settings: dict[int, int] = {}
        self.connection_window_update = 0
        self.responses: dict[int, bytes] = {}  # stream -> DATA received
        self.answered: set[int] = set()  # streams that got HEADERS
        self.ended: set[int] = set()
        self.reset: dict[int, int] = {}  # stream -> RST_STREAM error code
        self.goaway: tuple[int, int] | None = None  # (last stream id, error code)
        self.sock.sendall(PREFACE + _frame(SETTINGS, 0, 0))

    @staticmethod
    def request(stream: int, authority: str, path: str = "/", scheme: str = "http") -> bytes:
        block = b"".join(_literal(k, v) for k, v in ((":method", "GET"), (":scheme", scheme), (":path", path),
                                                      (":authority", authority)))
        return _frame(HEADERS, END_STREAM | END_HEADERS, stream, block)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _read_frame(self, deadline: float) -> tuple[int, int, int, bytes] | None:
        while len(self.buf) < 9 or len(self.buf) < 9 + int.from_bytes(self.buf[:3], "big"):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return None
            if not chunk:
                return None
            self.buf += chunk
        length = int.from_bytes(self.buf[:3], "big")
        kind, flags, stream = self.buf[3], self.buf[4], int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF
        payload, self.buf = self.buf[9:9 + length], self.buf[9 + length:]
        return kind, flags, stream, payload

    def run(self, streams: set[int], timeout: float = 10.0) -> None:
        """Read until every stream in ``streams`` ended, was reset or is past a GOAWAY."""
        deadline = time.monotonic() + timeout
        while not all(s in self.ended or s in self.reset or (self.goaway and s > self.goaway[0]) for s in streams):
            got = self._read_frame(deadline)
            if got is None:
                return
            kind, flags, stream, payload = got
            if kind == SETTINGS and not flags & ACK:
                for i in range(0, len(payload), 6):
                    key, value = struct.unpack(">HI", payload[i:i + 6])
                    self.settings[key] = value
                self.send(_frame(SETTINGS, ACK, 0))
            elif kind == PING and not flags & ACK:
                self.send(_frame(PING, ACK, 0, payload))
            elif kind == WINDOW_UPDATE and stream == 0:
                self.connection_window_update += struct.unpack(">I", payload)[0] & 0x7FFFFFFF
            elif kind == HEADERS:
                self.answered.add(stream)
            elif kind == DATA:
                self.responses[stream] = self.responses.get(stream, b"") + payload
                if payload:  # keep the server's windows open
                    self.send(_frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", len(payload)))
                              + _frame(WINDOW_UPDATE, 0, stream, struct.pack(">I", len(payload))))
            elif kind == RST_STREAM:
                self.reset[stream] = struct.unpack(">I", payload)[0]
            elif kind == GOAWAY:
                last, code = struct.unpack(">II", payload[:8])
                self.goaway = (last & 0x7FFFFFFF, code)
            if kind in (HEADERS, DATA) and flags & END_STREAM:
                self.ended.add(stream)


# -- 421 ---------------------------------------------------------------------------------------------


def test_host_outside_the_sni_certificate_gets_421(gw: GatewayCluster, pki: tuple[CA, dict[str, Cert]]) -> None:
    ca, _ = pki
    cafile, port = str(ca.cert_path), gw.gateway_port
    # Each tenant's own host over its own certificate: served.
    status, body = https1(port, "a.example", "a.example", "/x", cafile)
    assert (status, backend_of(body)) == (200, "alpha")
    assert (lambda r: (r[0], backend_of(r[1])))(https1(port, "b.example", "b.example", "/", cafile)) == (200, "beta")
    # Host spoofing: a's certificate, b's host -> 421, beta never sees it.
    status, body = https1(port, "a.example", "b.example", "/", cafile)
    assert status == 421 and "misdirected" in body, (status, body)
    # A host only the catch-all rule serves is not a.example's either.
    assert https1(port, "a.example", "other.example", "/", cafile)[0] == 421
    # The Host's port does not matter (stripped before matching); case does not either.
    assert https1(port, "a.example", f"a.example:{port}", "/", cafile)[0] == 200
    assert https1(port, "a.example", "A.Example", "/", cafile)[0] == 200
    # Wildcard certificate: exactly one more label, like the certificate itself.
    assert (lambda r: (r[0], backend_of(r[1])))(https1(port, "x.w.example", "y.w.example", "/", cafile)) == (200, "alpha")
    assert https1(port, "x.w.example", "Y.W.example", "/", cafile)[0] == 200
    assert https1(port, "x.w.example", "z.y.w.example", "/", cafile)[0] == 421
    assert https1(port, "x.w.example", "a.example", "/", cafile)[0] == 421
    # A certificate host served by a wildcard rule: that rule's routes, then the catch-all rule's (as over
    # plain HTTP); a sibling under the same wildcard rule is not in this certificate.
    assert (lambda r: (r[0], backend_of(r[1])))(https1(port, "one.v.example", "one.v.example", "/v/1", cafile)) == (200, "alpha")
    assert (lambda r: (r[0], backend_of(r[1])))(https1(port, "one.v.example", "one.v.example", "/x", cafile)) == (200, "beta")
    assert https1(port, "one.v.example", "two.v.example", "/v/1", cafile)[0] == 421
    # A certificate host only the catch-all rule serves: served (it is this certificate's host).
    assert (lambda r: (r[0], backend_of(r[1])))(https1(port, "one.v.example", "none.example", "/", cafile)) == (200, "beta")
    # Plain HTTP has no certificate: every host is routed as before.
    assert (lambda r: (r[0], backend_of(r[2])))(http1(port, "/", "b.example")) == (200, "beta")
    assert (lambda r: (r[0], backend_of(r[2])))(http1(port, "/", "other.example")) == (200, "beta")


def test_http2_connection_coalescing_gets_421(gw: GatewayCluster, pki: tuple[CA, dict[str, Cert]]) -> None:
    """A browser reusing its HTTP/2 connection to a.example for b.example (same IP) gets 421 on that
    connection, and the same connection still serves a.example."""
    ca, _ = pki
    sock = _tls_socket(gw.gateway_port, "a.example", str(ca.cert_path), "h2")
    assert sock.selected_alpn_protocol() == "h2"
    with sock:
        c = H2(sock)
        c.send(H2.request(1, "a.example", scheme="https") + H2.request(3, "b.example", scheme="https"))
        c.run({1, 3})
    assert backend_of(c.responses.get(1, b"").decode()) == "alpha"
    assert b"misdirected" in c.responses.get(3, b""), c.responses


# -- edge settings -------------------------------------------------------------------------------------


def test_paths_are_normalised_before_routing_and_forwarding(gw: GatewayCluster) -> None:
    status, _, body = http1(gw.gateway_port, "//a/../b", "a.example")
    assert status == 200 and json.loads(body)["path"] == "/b", body
    status, _, body = http1(gw.gateway_port, "/c//d/./e", "a.example")
    assert status == 200 and json.loads(body)["path"] == "/c/d/e", body
    # An escaped slash is not passed on as is: the client is sent to the unescaped, normalised path
    # (``/f%2F..%2Fg`` cannot be ``/f/..%2Fg`` to one party and ``/g`` to another).
    status, headers, _ = http1(gw.gateway_port, "/f%2F..%2Fg", "a.example")
    assert status == 307 and {k.lower(): v for k, v in headers.items()}["location"] == "/g", (status, headers)


def test_header_with_underscore_is_rejected(gw: GatewayCluster) -> None:
    assert http1(gw.gateway_port, "/", "a.example", {"x-user-id": "1"})[0] == 200
    status, _, body = http1(gw.gateway_port, "/", "a.example", {"x_user_id": "1"})
    assert status == 400, (status, body)


def test_client_address_is_appended_to_x_forwarded_for(gw: GatewayCluster) -> None:
    """use_remote_address: the TCP peer is the client; a client's own x-forwarded-for is kept but is not
    the address Envoy reports (x-envoy-external-address). Envoy appends its own host address instead of
    a loopback peer's, so the appended entry is not checked here."""
    status, _, body = http1(gw.gateway_port, "/", "a.example", {"x-forwarded-for": "203.0.113.9"})
    headers = json.loads(body)["headers"]
    h = {k.lower(): v for k, v in headers.items()}
    assert status == 200 and h["x-envoy-external-address"] == "127.0.0.1", h
    assert h["x-forwarded-for"].startswith("203.0.113.9,") and len(h["x-forwarded-for"].split(",")) == 2, h


def test_http2_stream_and_window_limits(gw: GatewayCluster) -> None:
    """Envoy announces 100 streams, 64 KiB stream window, 1 MiB connection window; a client opening more
    streams at once gets the extra ones refused (REFUSED_STREAM) while 100 are served."""
    alpha = next(b for b in gw.backends if b.name == "alpha")
    alpha.set(delay=1.0)  # keep the first 100 streams open while the others arrive
    try:
        with socket.create_connection(("127.0.0.1", gw.gateway_port), timeout=5) as sock:
            c = H2(sock)
            streams = list(range(1, 2 * 110, 2))
            c.send(b"".join(H2.request(s, "a.example") for s in streams))  # before reading the server's SETTINGS
            c.run(set(streams), timeout=20)
    finally:
        alpha.reset()
    assert c.settings.get(SETTINGS_MAX_CONCURRENT_STREAMS) == 100
    assert c.settings.get(SETTINGS_INITIAL_WINDOW_SIZE) == 65536
    assert c.connection_window_update + 65535 == 1024 * 1024
    served = [s for s in streams if s in c.ended and s not in c.reset]
    refused = {s: code for s, code in c.reset.items()}
    assert len(served) == 100 and served == streams[:100], (len(served), refused, c.goaway)
    assert sorted(refused) == streams[100:] and set(refused.values()) == {REFUSED_STREAM}, (refused, c.goaway)


def test_overload_manager_in_the_gateway_bootstrap(gw: GatewayCluster) -> None:
    dump: dict[str, Any] = gw.envoy.config_dump(include_eds=False)
    boot = next(c for c in dump["configs"] if c["@type"].endswith("BootstrapConfigDump"))["bootstrap"]
    text = json.dumps(boot["overload_manager"])
    assert "envoy.resource_monitors.fixed_heap" in text and str(HEAP) in text
    assert "envoy.resource_monitors.global_downstream_max_connections" in text and "50000" in text
    assert "envoy.overload_actions.stop_accepting_requests" in text
    stats = gw.envoy.admin("/stats?filter=^overload\\.")
    assert "overload.envoy.resource_monitors.fixed_heap.pressure:" in stats, stats
    assert "overload.envoy.overload_actions.stop_accepting_requests.active: 0" in stats, stats


def test_sidecar_bootstrap_has_no_overload_manager() -> None:
    from trafficmgr.core.plugins import PluginHost

    config = bootstrap("p.default", "sidecar", "127.0.0.1", 18000, admin_port=0)
    PluginHost.load().call_all("trafficmgr_bootstrap", bootstrap=config, role="sidecar", options=argparse.Namespace())
    assert "overload_manager" not in config


def test_bootstrap_cli_options(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "b.json"
    cmd = [sys.executable, "-m", "trafficmgr", "bootstrap", "--node-id", "gw", "--node-cluster", "traffic-ingress",
           "--xds-address", "127.0.0.1:18000", "--gateway-max-heap-bytes", str(HEAP), "--gateway-max-connections", "7",
           "-o", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    monitors = {m["name"]: m["typed_config"] for m in json.loads(out.read_text())["overload_manager"]["resource_monitors"]}
    assert int(monitors["envoy.resource_monitors.fixed_heap"]["max_heap_size_bytes"]) == HEAP
    assert int(monitors["envoy.resource_monitors.global_downstream_max_connections"]["max_active_downstream_connections"]) == 7
    bad = subprocess.run(cmd[:-2] + ["--gateway-max-heap-bytes", "1000"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--gateway-max-heap-bytes" in bad.stderr and "less than" in bad.stderr


def test_chain_route_configuration_hosts() -> None:
    """Which virtual hosts an SNI chain's route configuration holds (no Envoy needed: the traffic tests
    above run the same function)."""
    from envoy.config.route.v3 import route_pb2

    from trafficmgr.plugins.ingress.misdirected import MISDIRECTED, chain_route_configuration

    shared = route_pb2.RouteConfiguration(name="ingress")
    for host in ("a.example", "*.w.example"):
        vh = shared.virtual_hosts.add(name=host, domains=[host])
        vh.routes.add(name=host).match.prefix = "/"
    rc = chain_route_configuration(shared, "ingress|https|x", ["a.example", "z.w.example", "b.example", ""])
    by_domain = {d: vh for vh in rc.virtual_hosts for d in vh.domains}
    assert sorted(by_domain) == ["*", "a.example", "b.example", "z.w.example"]
    # Covered by the shared wildcard: its routes; a certificate host nothing routes: no routes (404, not 421).
    assert [r.name for r in by_domain["z.w.example"].routes] == ["*.w.example"]
    assert list(by_domain["b.example"].routes) == []
    assert by_domain["*"].routes[0].direct_response.status == MISDIRECTED
    # The shared configuration is not changed.
    assert [list(vh.domains) for vh in shared.virtual_hosts] == [["a.example"], ["*.w.example"]]
