"""Label behaviour through a real sidecar Envoy (LocalCluster: the project's API server, the real control
plane watching it, a client pod whose outbound TCP iptables redirects to its sidecar):

- ``traffic.port.<p>=direct``: the connection is relayed untouched to the address the client dialled
  (no HTTP processing: no ``x-request-id``, no retries; a server-first non-HTTP protocol works);
- raw TCP to an unlabeled port gets no connection to the backend;
- headless Services (``clusterIP: None``): connections to a pod address go to that pod (ORIGINAL_DST),
  through the service's HTTP route;
- Pod-level ``traffic.tracing.*``, ``traffic.request.rate`` and ``traffic.rate.limit``: they apply to
  traffic addressed to the pod, not to its Service.

Every test also runs the contrasting case (other label, no label), so it fails when the behaviour goes."""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from tests.plugins.reviews import get_timed
from trafficmgr.plugins.ratelimit import BANDWIDTH_FILTER, RATELIMIT_FILTER
from trafficmgr.testing.cluster import LocalCluster, http_get
from trafficmgr.testing.envoy import wait_for
from trafficmgr.testing.manifests import join, pod, service
from trafficmgr.testing.netns import require as _require_netns


class TcpServer:
    """A raw TCP server on ``host:port`` inside the pod network: sends ``banner`` first (a server-first
    protocol such as SMTP), then echoes what it receives. ``accepted`` counts connections."""

    def __init__(self, host: str, port: int, banner: bytes = b"220 ready\r\n") -> None:
        self.host, self.port, self.banner = host, port, banner
        self.accepted = 0
        self.received = bytearray()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self._sock.listen(16)
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True, name=f"tcp-{host}:{port}").start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            self.accepted += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                conn.sendall(self.banner)
                while data := conn.recv(65536):
                    self.received += data
                    conn.sendall(data)
            except OSError:
                pass

    def stop(self) -> None:
        self._stop.set()
        self._sock.close()


def tcp_exchange(host: str, port: int, payload: bytes, expect: int, timeout: float = 3.0) -> bytes:
    """Connect, send ``payload`` after reading whatever comes first, read until ``expect`` bytes arrived or
    the peer closed; the bytes received (b"" when the connection was closed or reset without data).
    Call inside the pod namespace."""
    out = b""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            try:
                s.sendall(payload)
                while len(out) < expect:
                    data = s.recv(65536)
                    if not data:
                        break
                    out += data
            except (ConnectionResetError, BrokenPipeError, TimeoutError):
                pass
    except (ConnectionRefusedError, ConnectionResetError):
        pass
    return out


def _headers_seen(backend: Any) -> dict[str, str]:
    return dict(list(backend.requests)[-1]["headers"])


# -- traffic.port.<p>=direct and raw TCP to an unlabeled port ---------------------------------------------

VIP = "10.244.0.60"  # the Service's clusterIP, served here by stand-ins for kube-proxy's listeners
LEGACY_POD = "10.244.0.21"
PAYLOAD = b"\x00\x01binary \xff not http\r\n\r\n"


@pytest.fixture
def legacy(envoy_binary: str) -> Iterator[tuple[LocalCluster, dict[str, Any]]]:
    """Service ``legacy`` (clusterIP VIP, ports 9080 and 2525, no traffic labels) selecting pod legacy-1.

    Servers: HTTP on VIP:9080 (``vip``) and LEGACY_POD:9080 (``pod``), a server-first TCP echo on
    VIP:2525 (``vip-tcp``) and LEGACY_POD:2525 (``pod-tcp``)."""
    _require_netns()
    with LocalCluster([VIP, LEGACY_POD]) as c:
        assert c.pod is not None
        servers: dict[str, Any] = {"vip": c.backend("vip", VIP, 9080), "pod": c.backend("pod", LEGACY_POD, 9080)}
        servers["vip-tcp"] = c.pod.in_ns(lambda: TcpServer(VIP, 2525, b"220 vip\r\n"))
        servers["pod-tcp"] = c.pod.in_ns(lambda: TcpServer(LEGACY_POD, 2525, b"220 pod\r\n"))
        spec = {"clusterIP": VIP, "selector": {"app": "legacy"},
                "ports": [{"name": "http", "port": 9080}, {"name": "smtp", "port": 2525}]}
        c.apply(join(f"apiVersion: v1\nkind: Service\nmetadata: {{name: legacy, namespace: default}}\nspec: {json.dumps(spec)}\n",
                     pod("legacy-1", LEGACY_POD, "legacy")))
        # No port is labeled yet: nothing to wait for (no cluster, every port blocked).
        try:
            yield c, servers
        finally:
            servers["vip-tcp"].stop()
            servers["pod-tcp"].stop()


def _legacy_labels(c: LocalCluster, labels: dict[str, str | None], chain: str, ready: str) -> None:
    """Label the Service; wait until the outbound listener has ``chain`` (a stat prefix) and ``ready`` (a
    route or an endpoint the new config needs) is in the sidecar's config dump (routes, EDS)."""
    assert c.pod is not None
    c.label("service", "legacy", labels)
    c.wait_config(lambda: chain in c.pod.listener_config("outbound")  # type: ignore[union-attr]
                  and ready in json.dumps(json.loads(c.pod.admin("/config_dump?include_eds"))),  # type: ignore[union-attr]
                  message=f"{labels} not applied")  # type: ignore[union-attr]


def test_raw_tcp_to_an_unlabeled_port_reaches_nothing(legacy: tuple[LocalCluster, dict[str, Any]]) -> None:
    c, s = legacy
    assert c.pod is not None
    # Barrier: once the sidecar serves the Service's other port (http), it has the config in which 2525
    # is unlabeled.
    _legacy_labels(c, {"traffic.port.9080": "http"}, "outbound_9080", '"name": "legacy.default:9080"')
    # Neither the ClusterIP nor the pod address: connect() succeeds (to the sidecar), then the sidecar
    # closes it; no byte of the server's banner, no connection to either server.
    for host in (VIP, LEGACY_POD):
        got = c.pod.in_ns(lambda host=host: tcp_exchange(host, 2525, PAYLOAD, 1))
        assert got == b"", f"{host}:2525 unlabeled must give nothing: {got!r}"
    assert s["vip-tcp"].accepted == 0 and s["pod-tcp"].accepted == 0
    # Labeled tcp: the connection reaches one pod of the service (EDS), bytes both ways, banner first.
    _legacy_labels(c, {"traffic.port.2525": "tcp"}, "outbound_tcp_2525", f'"address": "{LEGACY_POD}", "port_value": 2525')
    want = b"220 pod\r\n" + PAYLOAD
    assert c.pod.in_ns(lambda: tcp_exchange(VIP, 2525, PAYLOAD, len(want))) == want
    assert (s["pod-tcp"].accepted, s["vip-tcp"].accepted) == (1, 0)
    assert c.cp.xds is not None and c.xds.nacks() == []


def test_direct_port_passes_traffic_through_untouched(legacy: tuple[LocalCluster, dict[str, Any]]) -> None:
    c, s = legacy
    assert c.pod is not None
    vip, pod_backend = s["vip"], s["pod"]
    url = f"http://{VIP}:9080/untouched"
    # http: the sidecar's HTTP path routes to the pod (EDS), adds x-request-id and retries a 503.
    _legacy_labels(c, {"traffic.port.9080": "http", "traffic.retries.5xx": "2"}, "outbound_9080", '"name": "legacy.default:9080"')
    pod_backend.set(status=503)
    assert c.pod.in_ns(lambda: get_timed(url))[0] == 503
    assert (pod_backend.hits, vip.hits) == (3, 0), "http: one request and two retries to the pod"
    assert "x-request-id" in _headers_seen(pod_backend)
    # direct: a plain TCP relay to the address dialled (the ClusterIP, i.e. kube-proxy's job in a
    # cluster): the same request reaches the VIP's server once, with exactly the client's headers.
    pod_backend.reset()
    _legacy_labels(c, {"traffic.port.9080": "direct"}, "outbound_tcp_9080", f'"address": "{VIP}", "port_value": 9080')
    vip.set(status=503)
    status = c.pod.in_ns(lambda: get_timed(url))[0]
    assert status == 503
    assert (vip.hits, pod_backend.hits) == (1, 0), "direct: no retry, nothing to the pod's endpoint"
    headers = _headers_seen(vip)
    assert not any(h.startswith("x-envoy") or h == "x-request-id" for h in headers), headers
    assert set(headers) == {"host", "user-agent", "accept-encoding", "connection"}, headers
    # It went through the sidecar (its direct cluster counts the connection), not around it.
    assert c.pod.stat("cluster.9080|default|legacy.outbound.upstream_cx_total") >= 1
    # A server-first, non-HTTP protocol on a direct port: the banner arrives before the client sends
    # anything (no HTTP inspection waiting for client bytes), bytes pass unchanged both ways.
    _legacy_labels(c, {"traffic.port.2525": "direct"}, "outbound_tcp_2525", f'"address": "{VIP}", "port_value": 2525')

    def banner_first() -> tuple[bytes, bytes]:
        with socket.create_connection((VIP, 2525), timeout=3) as sock:
            sock.settimeout(3)
            banner = sock.recv(100)
            sock.sendall(PAYLOAD)
            echo = b""
            while len(echo) < len(PAYLOAD):
                echo += sock.recv(65536)
            return banner, echo

    assert c.pod.in_ns(banner_first) == (b"220 vip\r\n", PAYLOAD)
    assert (s["vip-tcp"].accepted, s["pod-tcp"].accepted) == (1, 0)
    assert bytes(s["vip-tcp"].received) == PAYLOAD
    assert c.xds.nacks() == []


# -- headless Services ------------------------------------------------------------------------------------

WEB = {"web-0": "10.244.0.41", "web-1": "10.244.0.42"}
HEADLESS = """apiVersion: v1
kind: Service
metadata: {name: web, namespace: default, labels: {traffic.port.9080: http}}
spec: {clusterIP: None, selector: {app: web}, ports: [{name: http, port: 9080}]}
"""


@pytest.fixture
def headless(envoy_binary: str) -> Iterator[LocalCluster]:
    _require_netns()
    with LocalCluster([*WEB.values(), "10.244.0.43"]) as c:
        for name, ip in WEB.items():
            c.backend(name, ip, 9080)
        c.backend("web-2", "10.244.0.43", 9080)
        c.apply(join(HEADLESS, *(pod(name, ip, "web") for name, ip in WEB.items())))
        c.wait_config(lambda: all(ip in c.pod.listener_config("outbound") for ip in WEB.values()),  # type: ignore[union-attr]
                      message="headless destinations not configured")
        yield c


def test_headless_service_goes_to_the_dialled_pod(headless: LocalCluster) -> None:
    c = headless
    assert c.pod is not None
    b = {x.name: x for x in c.backends}
    # A client resolves the headless name to pod addresses and dials one: every request goes to that pod
    # (ORIGINAL_DST: no balancing), through the service's HTTP route (x-request-id added).
    for name, ip in WEB.items():
        answers = c.pod.get_many(ip, 9080, "web:9080", 10, "/x")
        assert [st for st, _ in answers] == [200] * 10, answers[0]
        assert {json.loads(body)["backend"] for _, body in answers} == {name}
        assert "x-request-id" in _headers_seen(b[name])
    assert (b["web-0"].hits, b["web-1"].hits, b["web-2"].hits) == (10, 10, 0)
    assert c.pod.stat("cluster.9080|default|web.outbound.upstream_rq_total") == 20
    # The service's labels apply to those requests: retries on 5xx.
    c.label("service", "web", {"traffic.retries.5xx": "2"})
    c.wait_config(lambda: '"num_retries": 2' in c.pod.admin("/config_dump?resource=dynamic_route_configs"),  # type: ignore[union-attr]
                  message="retries not applied")
    b["web-1"].reset().set(statuses=[503, 503])
    assert c.pod.get_many(WEB["web-1"], 9080, "web:9080", 1)[0][0] == 200
    assert (b["web-1"].hits, b["web-0"].hits) == (3, 10), "retried on the same (dialled) pod"
    # A pod that joins the service becomes a destination; before that its address is not served.
    ip2 = "10.244.0.43"
    assert c.pod.get_many(ip2, 9080, "web:9080", 1)[0][0] == 404, "not a destination yet: the blocked 404"
    assert b["web-2"].hits == 0
    c.apply(pod("web-2", ip2, "web"))
    c.wait_config(lambda: ip2 in c.pod.listener_config("outbound"), message="new pod not a destination")  # type: ignore[union-attr]
    assert c.pod.get_many(ip2, 9080, "web:9080", 1)[0][0] == 200
    assert b["web-2"].hits == 1
    assert c.xds.nacks() == []


def test_headless_service_answers_per_pod_names(headless: LocalCluster) -> None:
    """Clients of a headless Service (a StatefulSet's) address one pod by its DNS name ``<pod>.<service>``
    or by its address; without a sidecar those requests reach the pod, and through the sidecar too (the
    virtual host names ``*.<service>...`` and the pods' addresses; before, a 404 with an empty body)."""
    c = headless
    assert c.pod is not None
    for host in ("web-0.web:9080", "web-0.web.default.svc.cluster.local:9080", f"{WEB['web-0']}:9080"):
        status, body = c.pod.get_many(WEB["web-0"], 9080, host, 1)[0]
        assert status == 200 and json.loads(body)["backend"] == "web-0", (host, status, body[:100])


# -- Pod-level tracing and rate limits ----------------------------------------------------------------------

REVIEWS_IP = "10.244.0.11"
# The collector listens on the client pod's loopback: connections to loopback are not redirected to the
# sidecar (the capture rules' exemption), so the test can read the collector's API and the sidecar (whose
# own connections are never redirected) sends spans to it.
COLLECTOR_IP = "127.0.0.1"


@pytest.fixture
def traced(envoy_binary: str) -> Iterator[tuple[LocalCluster, str]]:
    """reviews (Service and pod reviews-1) and ``trafficmgr zipkin`` as a process in the pod network
    (on its loopback, COLLECTOR_IP:9411); yields the cluster and the collector's base URL (reach it with ``in_ns``)."""
    _require_netns()
    options = argparse.Namespace(zipkin_address=f"{COLLECTOR_IP}:9411", zipkin_flush_spans=1)
    with LocalCluster([REVIEWS_IP], options=options) as c:
        assert c.pod is not None
        proc = subprocess.Popen(c.pod.ns.exec_args(sys.executable, "-m", "trafficmgr", "zipkin", "--host", COLLECTOR_IP,
                                                   "--port", "9411"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            base = f"http://{COLLECTOR_IP}:9411"
            wait_for(lambda: c.pod.in_ns(lambda: http_get(base + "/api/v2/services", 1))[0] == 200,  # type: ignore[union-attr]
                     timeout=20, message="trafficmgr zipkin did not start")
            c.backend("reviews-1", REVIEWS_IP, 9080)
            c.apply(join(service("reviews"), pod("reviews-1", REVIEWS_IP, "reviews")))
            c.wait_config(lambda: "9080|default|reviews.outbound" in c.pod.admin("/clusters"),  # type: ignore[union-attr]
                          message="reviews not configured")
            yield c, base
        finally:
            proc.terminate()
            proc.wait(10)


def _spans(c: LocalCluster, base: str) -> list[dict[str, Any]]:
    assert c.pod is not None
    code, body = c.pod.in_ns(lambda: http_get(base + "/api/v2/traces?limit=1000", 2))
    assert code == 200, body
    return [span for trace in json.loads(body) for span in trace]


def test_pod_level_tracing_sends_spans_for_traffic_to_the_pod(traced: tuple[LocalCluster, str]) -> None:
    c, base = traced
    assert c.pod is not None
    backend = c.backends[0]
    pod_cluster = "9080|default|reviews-1.outbound"
    # The pod's own port label makes it a destination; without tracing labels nothing is traced.
    c.label("pod", "reviews-1", {"traffic.port.9080": "http"})
    c.wait_config(lambda: f'"{REVIEWS_IP}:9080"' in c.pod.admin("/config_dump?resource=dynamic_route_configs"),
                  message="pod destination not configured")
    # The route and the listener's chain for the pod's address arrive in separate updates (RDS, LDS): on a
    # loaded machine the route can be there a moment before the chain, when the port still answers 404.
    c.wait_config(lambda: [st for st, _ in c.pod.get_many(REVIEWS_IP, 9080, f"{REVIEWS_IP}:9080", 3)] == [200] * 3,
                  message="the pod destination does not answer")
    assert "x-b3-traceid" not in _headers_seen(backend)
    c.label("pod", "reviews-1", {"traffic.tracing.enabled": "true"})
    c.wait_config(lambda: "envoy.tracers.zipkin" in json.dumps([
        ch for ch in json.loads(c.pod.listener_config("outbound") or "{}").get("active_state", {}).get("listener", {})
        .get("filter_chains", []) if ch.get("name") == pod_cluster]), message="pod chain not traced")  # type: ignore[union-attr]
    assert [st for st, _ in c.pod.get_many(REVIEWS_IP, 9080, f"{REVIEWS_IP}:9080", 4)] == [200] * 4
    seen = [r["headers"] for r in list(backend.requests)[-4:]]
    assert all(h.get("x-b3-sampled") == "1" for h in seen), seen
    spans = wait_for(lambda: len(_spans(c, base)) == 4 and _spans(c, base), timeout=10,
                     message="four spans expected at trafficmgr zipkin")
    assert {s["traceId"].lstrip("0") for s in spans} == {h["x-b3-traceid"].lstrip("0") for h in seen}
    assert {s["tags"]["upstream_cluster"] for s in spans} == {pod_cluster}
    assert {s["kind"] for s in spans} == {"CLIENT"}
    # The Service is not traced: requests to it carry no B3 headers and add no span.
    assert [st for st, _ in c.pod.get_many(c.cluster_ip("reviews"), 9080, "reviews:9080", 3)] == [200] * 3
    assert "x-b3-traceid" not in _headers_seen(backend)
    # Barrier: one more traced request's span arrives after any span of the Service requests would have.
    c.pod.get_many(REVIEWS_IP, 9080, f"{REVIEWS_IP}:9080", 1)
    wait_for(lambda: len(_spans(c, base)) >= 5, timeout=10, message="barrier span missing")
    assert len(_spans(c, base)) == 5
    assert c.xds.nacks() == []


@pytest.fixture
def limited(envoy_binary: str) -> Iterator[LocalCluster]:
    _require_netns()
    with LocalCluster([REVIEWS_IP]) as c:
        c.backend("reviews-1", REVIEWS_IP, 9080)
        c.apply(join(service("reviews"), pod("reviews-1", REVIEWS_IP, "reviews", labels={"traffic.port.9080": "http"})))
        c.wait_config(lambda: f'"{REVIEWS_IP}:9080"' in c.pod.admin("/config_dump?resource=dynamic_route_configs"),  # type: ignore[union-attr]
                      message="pod destination not configured")
        yield c


def _pod_route_has(c: LocalCluster, text: str) -> bool:
    assert c.pod is not None
    dump = json.loads(c.pod.admin("/config_dump?resource=dynamic_route_configs"))
    for cfg in dump.get("configs", []):
        for vh in cfg["route_config"].get("virtual_hosts", []):
            if vh["name"] == "reviews-1.default:9080":
                return text in json.dumps(vh)
    return False


def test_pod_request_rate_gives_429_for_traffic_to_the_pod(limited: LocalCluster) -> None:
    c = limited
    assert c.pod is not None
    rate, n = 5, 30
    c.label("pod", "reviews-1", {"traffic.request.rate": str(rate)})
    c.wait_config(lambda: _pod_route_has(c, RATELIMIT_FILTER), message="pod rate limit not applied")
    start = time.monotonic()
    to_pod = Counter(st for st, _ in c.pod.get_many(REVIEWS_IP, 9080, f"{REVIEWS_IP}:9080", n))
    elapsed = time.monotonic() - start
    # Bucket: `rate` tokens, refilled by `rate` per second (see test_ratelimit for the bound).
    assert set(to_pod) <= {200, 429} and rate <= to_pod[200] <= rate * (int(elapsed) + 2), to_pod
    assert to_pod[429] >= n - rate * (int(elapsed) + 2) > 0, to_pod
    # The Service has no limit: the same burst through it is served completely.
    assert [st for st, _ in c.pod.get_many(c.cluster_ip("reviews"), 9080, "reviews:9080", n)] == [200] * n
    c.label("pod", "reviews-1", {"traffic.request.rate": None})
    c.wait_config(lambda: not _pod_route_has(c, RATELIMIT_FILTER), message="pod rate limit not removed")
    assert [st for st, _ in c.pod.get_many(REVIEWS_IP, 9080, f"{REVIEWS_IP}:9080", n)] == [200] * n
    assert c.xds.nacks() == []


def test_pod_bandwidth_limit_slows_traffic_to_the_pod(limited: LocalCluster) -> None:
    c = limited
    assert c.pod is not None
    limit_kib, size_kib = 512, 1536
    c.backends[0].set(body_size=size_kib * 1024)
    c.label("pod", "reviews-1", {"traffic.rate.limit": str(limit_kib)})
    c.wait_config(lambda: _pod_route_has(c, BANDWIDTH_FILTER), message="pod bandwidth limit not applied")
    time.sleep(1.1)  # the bucket (one second of traffic) fills while idle, as in test_ratelimit

    def timed(address: str, host: str) -> float:
        start = time.monotonic()
        answers = c.pod.get_many(address, 9080, host, 1)  # type: ignore[union-attr]
        assert answers[0][0] == 200 and len(answers[0][1]) == size_kib * 1024
        return time.monotonic() - start

    lower = (size_kib - limit_kib) / limit_kib - 0.05  # the burst covers limit_kib, the rest at limit_kib/s
    limited_s = timed(REVIEWS_IP, f"{REVIEWS_IP}:9080")
    service_s = timed(c.cluster_ip("reviews"), "reviews:9080")
    print(f"to the pod {limited_s:.3f}s, to the service {service_s:.3f}s (lower bound {lower:.2f}s)")
    assert limited_s >= lower, limited_s
    assert service_s < lower / 2, f"the Service has no limit: {service_s:.3f}s"
    assert c.xds.nacks() == []


# -- Services of the same name in two namespaces ------------------------------------------------------------

SAME_NAME = {"default": "10.244.0.51", "other": "10.244.0.52"}


def test_same_named_services_in_two_namespaces_are_both_served(envoy_binary: str) -> None:
    """Services ``web`` in namespaces default and other, both http on 9080: their short name ``web:9080``
    would be a duplicate domain in the shared route configuration ``outbound|9080``, which Envoy rejects
    (freezing routing on that port for every service). The short name is left out of both virtual hosts
    with a Warning on each Service; every other name routes to the right Service, and other Services on
    the port keep being served and updated."""
    _require_netns()
    with LocalCluster([*SAME_NAME.values(), "10.244.0.53"]) as c:
        assert c.pod is not None
        for ns, ip in SAME_NAME.items():
            c.backend(f"web-{ns}", ip, 9080)
        c.backend("reviews-1", "10.244.0.53", 9080)
        c.apply(join("apiVersion: v1\nkind: Namespace\nmetadata: {name: other}\n", *(service("web", namespace=ns) for ns in SAME_NAME),
                     *(pod(f"web-{ns}", ip, "web", namespace=ns) for ns, ip in SAME_NAME.items()),
                     service("reviews"), pod("reviews-1", "10.244.0.53", "reviews")))
        vips = {ns: c.cluster_ip("web", ns) for ns in SAME_NAME}
        c.wait_config(lambda: all(ip in c.pod.listener_config("outbound") for ip in [*vips.values(), c.cluster_ip("reviews")]),  # type: ignore[union-attr]
                      message="services not configured")
        # The pods follow their Services: a snapshot can hold a Service before its endpoint (no healthy upstream).
        c.wait_config(lambda: all(c.pod.stat(f"cluster.9080|{ns}|{name}.outbound.membership_healthy") == 1  # type: ignore[union-attr]
                                  for ns, name in [*((ns, "web") for ns in SAME_NAME), ("default", "reviews")]),
                      message="endpoints not configured")
        for ns in SAME_NAME:
            for host in (f"web.{ns}:9080", f"web.{ns}.svc.cluster.local:9080", f"{vips[ns]}:9080"):
                status, body = c.pod.get_many(vips[ns], 9080, host, 1)[0]
                assert status == 200 and json.loads(body)["backend"] == f"web-{ns}", (host, status, body[:100])
        assert c.pod.get_many(vips["default"], 9080, "reviews:9080", 1)[0][0] == 200
        for ns in SAME_NAME:
            events = c.events("web", reason="TrafficConfigConflict", namespace=ns)
            assert len(events) == 1 and "web:9080 also names another Service" in events[0]["message"], events
        # Routing on the port still follows changes: a retry label reaches the route configuration.
        c.label("service", "reviews", {"traffic.retries.5xx": "2"})
        c.wait_config(lambda: '"num_retries": 2' in c.pod.admin("/config_dump?resource=dynamic_route_configs"),  # type: ignore[union-attr]
                      message="retries not applied")
        assert c.xds.nacks() == []
        assert c.pod.stat("http.outbound_9080.rds.outbound|9080.update_rejected") == 0
