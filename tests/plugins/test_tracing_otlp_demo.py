"""``trafficmgr demo --tracing-provider opentelemetry``: local mode's Envoys export OTLP/gRPC to the built-in
collector, whose Zipkin API then shows traces that cross the bookinfo apps (W3C ``traceparent`` propagated
by productpage), and the "recent traces of a Service" query finds them."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from tests.local import test_demo as base
from trafficmgr.plugins import tracing
from trafficmgr.testing.envoy import free_port, wait_for

pytestmark = [pytest.mark.envoy, pytest.mark.slow]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[base.Demo]:
    base._require("kubectl")
    state = tmp_path_factory.mktemp("demo-otlp") / "state"
    a, b = random.randrange(100, 200), random.randrange(0, 255)
    ports = {name: free_port() for name in ("http", "https", "admin", "xds", "serve_admin", "zipkin", "api",
                                            "gateway_api", "otlp")}
    argv = [sys.executable, "-m", "trafficmgr", "demo", "--state-dir", str(state),
            "--http-port", str(ports["http"]), "--https-port", str(ports["https"]), "--admin-port", str(ports["admin"]),
            "--xds-port", str(ports["xds"]), "--serve-admin-port", str(ports["serve_admin"]),
            "--zipkin-port", str(ports["zipkin"]), "--api-port", str(ports["api"]),
            "--gateway-api-port", str(ports["gateway_api"]),
            "--tracing-provider", "opentelemetry", "--otlp-port", str(ports["otlp"]),
            "--pod-cidr", f"127.{a}.{b}.0/24", "--service-cidr", f"127.{a}.{b + 1}.0/24"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    d = base.Demo(proc, state.resolve(), ports, f"127.{a}.{b}.")

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            d.lines.append(line.rstrip("\n"))

    threading.Thread(target=read, daemon=True).start()
    try:
        wait_for(lambda: any(ln.startswith("export KUBECONFIG=") for ln in d.lines) or proc.poll() is not None,
                 base.READY_TIMEOUT_S, 0.2)
        assert proc.poll() is None, "demo exited:\n" + "\n".join(d.lines)
        d.kubeconfig = next(ln for ln in d.lines if ln.startswith("export KUBECONFIG="))[len("export KUBECONFIG="):]
        yield d
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        subprocess.run([sys.executable, "-m", "trafficmgr", "proxies", "--runtime", "local", "--state-dir",
                        str(d.state / "sidecars"), "--remove-all"], capture_output=True, timeout=60)
        from trafficmgr.local.processes import kill_leftovers

        kill_leftovers(str(d.state))


def test_local_mode_shows_otlp_traces_across_the_bookinfo_apps(demo: base.Demo) -> None:
    services = ("productpage", "details", "ratings", "reviews")
    demo.kubectl("label", "svc", *services, "traffic.port.9080=http", "--overwrite")
    demo.kubectl("label", "deployment", *base.WORKLOADS[:-1], "traffic.envoy.enabled=true")
    demo.kubectl("label", "svc", *services, "traffic.tracing.enabled=true")

    def sidecars_traced() -> bool:
        pods = [p for p in demo.pods() if p["metadata"]["name"] != "traffic-ingress"]
        if not all((p["metadata"].get("annotations") or {}).get("traffic.envoy.proxy") for p in pods):
            return False
        return all(tracing.OTLP_TRACER in base.request(p["status"]["podIP"], 15000, "",
                                                       "/config_dump?resource=dynamic_listeners")[2].decode()
                   for p in pods)

    wait_for(sidecars_traced, 60, 0.5, "not every pod got a sidecar with the OpenTelemetry tracer")
    zipkin = ("127.0.0.1", demo.ports["zipkin"])

    def traces(query: str = "limit=1000") -> list[list[dict[str, object]]]:
        return json.loads(base.request(*zipkin, "", f"/api/v2/traces?{query}")[2])

    client = demo.pod_ip("client")
    n = 5
    for _ in range(n):
        status, _, body, _ = demo.via(client, "http://productpage:9080/productpage")
        assert status == 200 and b"William Shakespeare" in body

    def joined() -> list[list[dict[str, object]]]:
        # A trace joins the client's span with productpage's outbound spans only when productpage copied
        # the traceparent it got to its calls to details and reviews.
        out = []
        for t in traces():
            names = {str(s["localEndpoint"]["serviceName"]) for s in t}  # type: ignore[index]
            if any(x.startswith("client-") for x in names) and any(x.startswith("productpage-v1-") for x in names) \
                    and any(str((s.get("tags") or {}).get("upstream_cluster", "")).endswith("|default|details.outbound")  # type: ignore[union-attr]
                            for s in t):
                out.append(t)
        return out if len(out) == n else []

    found = wait_for(joined, 30, 1.0, f"{n} traces across client -> productpage -> details expected: {traces()}")
    reviews = {t[0]["traceId"] for t in traces("meshService=reviews.default&limit=1000")}
    assert {t[0]["traceId"] for t in found} <= reviews
    # The dashboard links reviews to that query on the collector.
    status, _, body = base.request("127.0.0.1", demo.ports["serve_admin"], "", "/debug/dashboard/data", timeout=30)
    assert status == 200, body[:200]
    [row] = [r for r in json.loads(body)["services"] if (r["namespace"], r["name"]) == ("default", "reviews")]
    assert row["traces_url"] == tracing.traces_url(f"http://127.0.0.1:{demo.ports['zipkin']}", "default", "reviews")
