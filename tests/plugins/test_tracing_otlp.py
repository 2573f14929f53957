"""tracing plugin, OpenTelemetry provider: real sidecar Envoys export spans over OTLP/gRPC to the built-in
collector (``trafficmgr zipkin --otlp-port``), W3C ``traceparent`` across two hops (the client's sidecar ->
the reviews pod's sidecar -> the reviews app); labels (enabled, sampling) apply as for Zipkin; the
collector's OTLP receiver answers bad input with gRPC errors; options, bootstrap."""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from trafficmgr.apps.otlp import EXPORT, GROUPS_FIELD
from trafficmgr.apps.zipkin import ZipkinCollector
from trafficmgr.core.model import GATEWAY, SIDECAR, Model
from trafficmgr.core.translate.context import BuildContext
from trafficmgr.plugins import tracing
from trafficmgr.testing.cluster import LocalCluster, SidecarPod
from trafficmgr.testing.envoy import wait_for
from trafficmgr.testing.manifests import join, pod, service
from trafficmgr.testing.netns import require as _require_netns

REVIEWS_IP = "10.244.0.11"  # its own network namespace (a peer pod), linked to the client pod's
COLLECTOR_IP = "10.244.0.50"  # inside the client pod's network namespace (the peer pod routes to it)
ZIPKIN_PORT, OTLP_PORT = 9411, 4317
PROXY_UID = 1337


def traceparent(trace_id: str, span_id: str, sampled: bool = True) -> str:
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"


class Rig:
    def __init__(self, cluster: LocalCluster, peer: SidecarPod, backend: Any) -> None:
        self.c = cluster
        self.peer = peer
        self.backend = backend

    def api(self, path: str) -> Any:
        """GET the collector's Zipkin API. It lives in the client pod's namespace, where connections from
        any uid but the proxy's are captured by the sidecar: curl runs as the proxy's uid."""
        assert self.c.pod is not None
        proc = self.c.pod.ns.run("setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}", "--clear-groups",
                                 "curl", "-sS", "--fail", "-m", "5", f"http://{COLLECTOR_IP}:{ZIPKIN_PORT}{path}")
        return json.loads(proc.stdout)

    def spans(self) -> list[dict[str, Any]]:
        return [s for trace in self.api("/api/v2/traces?limit=100000") for s in trace]

    def requests(self, n: int, headers: dict[str, str] | None = None) -> list[dict[str, str]]:
        """``n`` GETs to reviews from the client pod; the request headers the reviews app saw."""
        assert self.c.pod is not None
        before = self.backend.hits
        answers = self.c.pod.get_many(self.c.cluster_ip("reviews"), 9080, "reviews:9080", n, "/reviews/0",
                                      headers=headers, timeout=10)
        assert [status for status, _ in answers] == [200] * n
        assert self.backend.hits == before + n
        return [r["headers"] for r in list(self.backend.requests)[-n:]]

    def outbound_traced(self) -> bool:
        assert self.c.pod is not None
        return tracing.OTLP_TRACER in self.c.pod.listener_config("outbound")

    def wait_spans(self, count: int, message: str = "") -> list[dict[str, Any]]:
        return wait_for(lambda: len(self.spans()) == count and self.spans(), timeout=10,
                        message=message or f"expected {count} spans, have {len(self.spans())}")

    def spans_of(self, trace_ids: set[str]) -> list[dict[str, Any]]:
        return [s for s in self.spans() if s["traceId"] in trace_ids]


@pytest.fixture(scope="module")
def rig_module(envoy_binary: str) -> Iterator[Rig]:
    _require_netns()
    # Flush every span (bootstrap runtime: tracing.opentelemetry.min_flush_spans = 1).
    options = argparse.Namespace(tracing_provider="opentelemetry", otlp_address=f"{COLLECTOR_IP}:{OTLP_PORT}",
                                 zipkin_flush_spans=1)
    with LocalCluster([COLLECTOR_IP], options=options) as c:
        assert c.pod is not None
        # grpcio serves from its own threads, which would stay in the host's namespace: the collector runs
        # as a process inside the client pod's namespace, as `trafficmgr zipkin` would in a pod.
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        proc = subprocess.Popen(c.pod.ns.exec_args(
            sys.executable, "-m", "trafficmgr.apps.zipkin", "--host", COLLECTOR_IP, "--port", str(ZIPKIN_PORT),
            "--otlp-port", str(OTLP_PORT)), stderr=subprocess.PIPE, text=True, env=env)
        try:
            banner = proc.stderr.readline() if proc.stderr else ""
            assert f"OTLP/gRPC on {COLLECTOR_IP}:{OTLP_PORT}" in banner, banner
            c.apply(join(service("reviews", labels={tracing.ENABLED: "true"}), pod("reviews-1", REVIEWS_IP, "reviews")))
            peer = c.peer_pod("reviews-1", REVIEWS_IP)
            backend = c.peer_backend(peer, "reviews", 9080)
            rig = Rig(c, peer, backend)
            c.wait_config(rig.outbound_traced, timeout=15, message="no OpenTelemetry tracer on the reviews chain")
            yield rig
        finally:
            proc.terminate()
            proc.wait(10)


@pytest.fixture
def rig(rig_module: Rig) -> Iterator[Rig]:
    rig_module.c.label("service", "reviews", {tracing.ENABLED: "true", tracing.SAMPLING: None})
    rig_module.c.wait_config(lambda: rig_module.outbound_traced() and '"value": 50' not in
                             rig_module.c.pod.listener_config("outbound"),  # type: ignore[union-attr]
                             message="tracing not reset")
    rig_module.backend.reset()
    yield rig_module
    assert rig_module.c.cp.nacks() == []


def test_traceparent_crosses_two_hops_and_both_spans_reach_the_collector_over_otlp(rig: Rig) -> None:
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    [seen] = rig.requests(1, headers={"traceparent": traceparent(trace_id, client_span)})
    # The reviews app sees the trace continued by the second hop (its own sidecar's server span).
    version, seen_trace, seen_parent, flags = seen["traceparent"].split("-")
    assert (version, seen_trace, flags) == ("00", trace_id, "01"), seen
    assert "x-b3-traceid" not in seen, "the OpenTelemetry tracer writes W3C headers only"
    spans = wait_for(lambda: len(rig.spans_of({trace_id})) == 2 and rig.spans_of({trace_id}), timeout=10,
                     message=f"two spans of trace {trace_id} expected: {rig.spans_of({trace_id})}")
    by_kind = {s["kind"]: s for s in spans}
    client, server = by_kind["CLIENT"], by_kind["SERVER"]
    # Parent/child: the app's span -> the client sidecar's span -> the reviews sidecar's span -> the app.
    assert client["parentId"] == client_span and server["parentId"] == client["id"] and seen_parent == server["id"]
    assert client["localEndpoint"]["serviceName"] == "client.default"  # Envoy's node_id attribute
    assert server["localEndpoint"]["serviceName"] == "reviews-1.default"
    assert client["tags"]["upstream_cluster"] == "9080|default|reviews.outbound"
    assert client["tags"]["http.status_code"] == "200" and client["duration"] > 0
    # The whole trace through the Zipkin API, and the dashboard's "recent traces of reviews" query.
    assert {s["id"] for s in rig.api(f"/api/v2/trace/{trace_id}")} == {client["id"], server["id"]}
    url = urllib.parse.urlsplit(tracing.traces_url(f"http://{COLLECTOR_IP}:{ZIPKIN_PORT}", "default", "reviews", limit=1000))
    recent = rig.api(f"{url.path}?{url.query}")
    assert trace_id in {t[0]["traceId"] for t in recent}
    assert "client.default" in rig.api("/api/v2/services")


def test_a_request_without_traceparent_starts_a_trace(rig: Rig) -> None:
    headers = rig.requests(3)
    trace_ids = {h["traceparent"].split("-")[1] for h in headers}
    assert len(trace_ids) == 3
    spans = wait_for(lambda: len(rig.spans_of(trace_ids)) == 6 and rig.spans_of(trace_ids), timeout=10,
                     message="a client and a server span per request expected")
    roots = [s for s in spans if s["kind"] == "CLIENT"]
    assert len(roots) == 3 and all("parentId" not in s for s in roots), roots


def test_sampling_50_traces_about_half(rig: Rig) -> None:
    rig.c.label("service", "reviews", {tracing.SAMPLING: "50"})
    assert rig.c.pod is not None
    rig.c.wait_config(lambda: '"value": 50' in rig.c.pod.listener_config("outbound"), message="sampling 50 not applied")
    n = 100
    headers = rig.requests(n)
    trace_ids = {h["traceparent"].split("-")[1] for h in headers if h["traceparent"].endswith("-01")}
    unsampled = {h["traceparent"].split("-")[1] for h in headers if h["traceparent"].endswith("-00")}
    assert len(trace_ids) + len(unsampled) == n, "traceparent is propagated for unsampled requests too"
    # Barrier: a client and a server span for every sampled request, none for the others.
    wait_for(lambda: len(rig.spans_of(trace_ids)) == 2 * len(trace_ids), timeout=10,
             message="two spans per sampled request expected")
    assert rig.spans_of(unsampled) == []
    # Binomial(100, 0.5): sd 5; +-6 sd fails with probability ~2e-9 and still catches 0 % or 100 %.
    print(f"sampling 50: {len(trace_ids)} of {n} requests traced")
    assert abs(len(trace_ids) - n / 2) < 6 * math.sqrt(n * 0.25)


def test_tracing_off_sends_no_spans(rig: Rig) -> None:
    rig.c.label("service", "reviews", {tracing.ENABLED: None})
    rig.c.wait_config(lambda: not rig.outbound_traced(), message="tracing not removed")
    before = len(rig.spans())
    headers = rig.requests(5)
    # The client's sidecar adds nothing; the reviews sidecar's inbound side (a shared connection manager,
    # tracer at 0 %) starts an unsampled context: flags 00, no span.
    assert all(h["traceparent"].endswith("-00") for h in headers), headers[0]
    # Barrier: a traced request's two spans arrive after any span of the 5 untraced ones would have.
    rig.c.label("service", "reviews", {tracing.ENABLED: "true"})
    rig.c.wait_config(rig.outbound_traced, message="tracing not enabled")
    [seen] = rig.requests(1)
    trace_id = seen["traceparent"].split("-")[1]
    wait_for(lambda: len(rig.spans_of({trace_id})) == 2, timeout=10, message="the barrier trace did not arrive")
    assert len(rig.spans()) == before + 2


# -- the collector's OTLP receiver (a real gRPC client on loopback) -----------------------------------


@pytest.fixture
def collector() -> Iterator[ZipkinCollector]:
    with ZipkinCollector("127.0.0.1", 0, otlp_port=0) as z:
        yield z


def export(z: ZipkinCollector, body: bytes) -> grpc.RpcError | None:
    assert z.otlp is not None
    with grpc.insecure_channel(z.otlp.address, options=[("grpc.enable_http_proxy", 0)]) as channel:
        call = channel.unary_unary(EXPORT)
        try:
            answer = call(body, timeout=5)
        except grpc.RpcError as exc:
            return exc
    assert trace_service_pb2.ExportTraceServiceResponse.FromString(answer) is not None
    return None


def request(*spans: trace_pb2.Span, service_name: str = "checkout") -> bytes:
    req = trace_service_pb2.ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    attr = rs.resource.attributes.add(key="service.name")
    attr.value.string_value = service_name
    getattr(rs, GROUPS_FIELD).add().spans.extend(spans)
    return req.SerializeToString()


def span(trace_id: bytes = b"\x01" * 16, span_id: bytes = b"\x02" * 8, **kw: Any) -> trace_pb2.Span:
    now = time.time_ns()
    kw.setdefault("kind", trace_pb2.Span.SPAN_KIND_SERVER)
    return trace_pb2.Span(trace_id=trace_id, span_id=span_id, name="GET /x",
                          start_time_unix_nano=now - 2_000_000, end_time_unix_nano=now, **kw)


def get(z: ZipkinCollector, path: str) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", z.port, timeout=5)
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, json.loads(body) if body else None


def test_otlp_export_is_converted_into_the_zipkin_store(collector: ZipkinCollector) -> None:
    child = span(span_id=b"\x03" * 8, parent_span_id=b"\x02" * 8, kind=trace_pb2.Span.SPAN_KIND_CLIENT)
    tag = child.attributes.add(key="upstream_cluster")
    tag.value.string_value = "8080|shop|cart.outbound"
    child.status.code = trace_pb2.Status.STATUS_CODE_ERROR
    assert export(collector, request(span(), child)) is None
    status, traces = get(collector, "/api/v2/traces?serviceName=checkout")
    assert status == 200 and len(traces) == 1
    by_id = {s["id"]: s for s in traces[0]}
    root, sub = by_id["02" * 8], by_id["03" * 8]
    assert root["traceId"] == "01" * 16 and root["kind"] == "SERVER" and root["name"] == "get /x"
    assert root["duration"] == 2000 and "parentId" not in root
    assert sub["parentId"] == "02" * 8 and sub["kind"] == "CLIENT" and sub["tags"]["error"] == "true"
    assert get(collector, "/api/v2/services") == (200, ["checkout"])
    # The dashboard's link for Service shop/cart finds it (the span called cart); another Service's does not.
    url = tracing.traces_url(collector.url, "shop", "cart")
    assert url == f"{collector.url}/api/v2/traces?meshService=cart.shop&limit=10"
    assert [t[0]["traceId"] for t in get(collector, url[len(collector.url):])[1]] == ["01" * 16]
    assert get(collector, "/api/v2/traces?meshService=cart.other")[1] == []
    assert get(collector, "/api/v2/traces?meshService=nodot")[0] == 400


@pytest.mark.parametrize("body, code", [
    (b"\xff\xff\xff", grpc.StatusCode.INVALID_ARGUMENT),  # not a protobuf message
    (request(span(trace_id=b"\x01" * 8)), grpc.StatusCode.INVALID_ARGUMENT),  # an 8-byte trace id
    (request(span(span_id=b"")), grpc.StatusCode.INVALID_ARGUMENT),
    (request(span(trace_id=b"\x00" * 16)), grpc.StatusCode.INVALID_ARGUMENT),  # the invalid all-zero id
    (b"\x0a" + b"\xff" * 4 + b"\x7f" + b"x" * (17 * 1024 * 1024), grpc.StatusCode.RESOURCE_EXHAUSTED),  # > 16 MiB
])
def test_bad_exports_get_grpc_errors_and_store_nothing(collector: ZipkinCollector, body: bytes,
                                                       code: grpc.StatusCode) -> None:
    error = export(collector, body)
    assert error is not None and error.code() == code, error
    assert collector.spans() == []
    assert export(collector, request(span())) is None, "the receiver keeps working"
    assert len(collector.spans()) == 1


def test_too_many_spans_in_one_request_are_refused() -> None:
    with ZipkinCollector("127.0.0.1", 0, otlp_port=0) as z:
        assert z.otlp is not None
        z.otlp.max_spans_per_request = 3
        spans = [span(span_id=bytes([0, 0, 0, 0, 0, 0, 0, i])) for i in range(1, 5)]
        error = export(z, request(*spans))
        assert error is not None and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert z.spans() == [] and export(z, request(*spans[:3])) is None and len(z.spans()) == 3


def test_collector_command_binds_otlp_on_loopback_and_rejects_a_bad_port() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bad = subprocess.run([sys.executable, "-m", "trafficmgr.apps.zipkin", "--otlp-port", "70000"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "--otlp-port" in bad.stderr and "not a port number" in bad.stderr
    proc = subprocess.Popen([sys.executable, "-m", "trafficmgr.apps.zipkin", "--port", "0", "--otlp-port", str(port)],
                            stderr=subprocess.PIPE, text=True)
    try:
        banner = proc.stderr.readline() if proc.stderr else ""
        assert f"OTLP/gRPC on 127.0.0.1:{port}" in banner, banner
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        # The port is taken now: a second collector says so in one line and exits 1.
        busy = subprocess.run([sys.executable, "-m", "trafficmgr", "zipkin", "--port", "0", "--otlp-port", str(port)],
                              capture_output=True, text=True, timeout=30)
        assert busy.returncode == 1 and f"cannot listen for OTLP on 127.0.0.1:{port}" in busy.stderr, busy.stderr
        assert "Traceback" not in busy.stderr
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


# -- options, bootstrap, connection managers (no Envoy) ----------------------------------------------


def test_options_are_validated() -> None:
    parser = argparse.ArgumentParser()
    tracing.trafficmgr_add_arguments(parser, command="agent")
    args = parser.parse_args(["--tracing-provider", "opentelemetry", "--otlp-address", "otel.tracing:4317",
                              "--tracing-flush-spans", "1"])
    assert (args.tracing_provider, args.otlp_address, args.zipkin_flush_spans) == ("opentelemetry", "otel.tracing:4317", 1)
    assert parser.parse_args([]).tracing_provider == "zipkin", "Zipkin stays the default"
    assert parser.parse_args(["--zipkin-flush-spans", "2"]).zipkin_flush_spans == 2, "the old spelling still works"
    for bad in (["--tracing-provider", "jaeger"], ["--otlp-address", "otel"], ["--otlp-address", "otel:99999"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_bootstrap_writes_the_opentelemetry_flush_keys() -> None:
    cfg: dict[str, Any] = {"node": {"id": "web-1.shop", "cluster": "sidecar"},
                           "layered_runtime": {"layers": [{"name": "static", "static_layer": {}}]}}
    tracing.trafficmgr_bootstrap(cfg, SIDECAR, argparse.Namespace(
        tracing_provider="opentelemetry", otlp_address="o:4317", zipkin_flush_spans=1, zipkin_flush_interval=200))
    assert cfg["layered_runtime"]["layers"][0]["static_layer"] == {"tracing.opentelemetry.min_flush_spans": 1,
                                                                   "tracing.opentelemetry.flush_interval_ms": 200}


def test_connection_managers_and_the_otlp_cluster() -> None:
    from envoy.config.cluster.v3.cluster_pb2 import Cluster
    from envoy.config.trace.v3 import opentelemetry_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2 import (
        HttpConnectionManager,
    )

    options = argparse.Namespace(tracing_provider="opentelemetry", otlp_address="10.0.0.9:4317",
                                 zipkin_address="10.0.0.8:9411")
    hcm = HttpConnectionManager(stat_prefix="ingress_http")
    tracing.trafficmgr_http_connection_manager(hcm, None, BuildContext(GATEWAY, Model(), options, reporter=lambda *a: None))
    assert hcm.tracing.provider.name == "envoy.tracers.opentelemetry" and hcm.tracing.random_sampling.value == 0
    config = opentelemetry_pb2.OpenTelemetryConfig()
    hcm.tracing.provider.typed_config.Unpack(config)
    assert config.grpc_service.envoy_grpc.cluster_name == "otlp" and config.service_name == "trafficmgr-gateway"
    made: list[tuple[Any, str]] = []
    ctx = BuildContext(SIDECAR, Model(), options, resource=lambda m, n, refs=(): made.append((m, n)) or n)
    assert tracing.trafficmgr_resources(ctx) == ["otlp"]
    cluster, _ = made[0]
    assert cluster.type == Cluster.STATIC and "envoy.extensions.upstreams.http.v3.HttpProtocolOptions" in \
        cluster.typed_extension_protocol_options, "gRPC needs HTTP/2 to the collector"
    # No --otlp-address: the OpenTelemetry provider traces nothing, even with a Zipkin address set.
    off = argparse.Namespace(tracing_provider="opentelemetry", zipkin_address="10.0.0.8:9411")
    untouched = HttpConnectionManager(stat_prefix="x")
    tracing.trafficmgr_http_connection_manager(untouched, None, BuildContext(GATEWAY, Model(), off, reporter=lambda *a: None))
    assert not untouched.HasField("tracing")
