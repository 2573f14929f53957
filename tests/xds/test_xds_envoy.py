"""The xDS server driving a real Envoy on loopback, in state-of-the-world and delta modes."""

from __future__ import annotations

import http.client
import json
import re
import time
from collections import Counter
from collections.abc import Callable

import pytest
from xds_resources import Endpoint, bad_cluster, web_snapshot

from trafficmgr.core import metrics
from trafficmgr.testing import ControlPlane, EnvoyProcess, HttpBackend, free_port

pytestmark = pytest.mark.envoy

MODES = pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
# An Istio-style name: Envoy's default tag extraction splits it at the first dot.
SVC = "9080|default|reviews.outbound"


class HttpClient:
    """Keep-alive HTTP/1.1 client to an Envoy listener (reconnects once on a broken connection)."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.host, self.port = host, port
        self.conn = http.client.HTTPConnection(host, port, timeout=5)

    def get(self, path: str = "/") -> tuple[int, dict]:
        for attempt in (1, 2):
            try:
                self.conn.request("GET", path)
                resp = self.conn.getresponse()
                body = resp.read()
                data = json.loads(body) if resp.getheader("content-type") == "application/json" else {}
                return resp.status, data
            except (OSError, http.client.HTTPException):
                self.conn.close()
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=5)
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def split(self, n: int, path: str = "/") -> Counter[str]:
        """Backend name -> hits over ``n`` requests (non-200 answers count as ``status:<code>``)."""
        out: Counter[str] = Counter()
        for _ in range(n):
            status, data = self.get(path)
            out[data["backend"] if status == 200 else f"status:{status}"] += 1
        return out

    def close(self) -> None:
        self.conn.close()


def weights(envoy: EnvoyProcess, cluster: str) -> dict[str, int]:
    """``host:port`` -> weight of ``cluster``'s hosts as Envoy currently has them (admin /clusters)."""
    out = {}
    for line in envoy.clusters().splitlines():
        m = re.fullmatch(re.escape(cluster) + r"::([\d.]+:\d+)::weight::(\d+)", line)
        if m:
            out[m.group(1)] = int(m.group(2))
    return out


def ep(backend: HttpBackend, weight: int) -> Endpoint:
    return (backend.host, backend.port, weight)


def addr(backend: HttpBackend) -> str:
    return f"{backend.host}:{backend.port}"


def weighted_share(hits: int, n: int, p: float) -> bool:
    """True when ``hits`` of ``n`` requests is the share ``p`` weighted round robin gives, within 2.

    Envoy's weighted round robin (an EDF scheduler per worker; these Envoys run one worker and the
    client one connection) is deterministic up to its random starting point: 1000 requests at weights
    100:10 gave the weight-10 host 90 or 91 (n p = 90.9) in 12 of 12 runs (issue 17 measurements). The
    +-2 window still tells weight 10 from 9 (82.6) or 11 (99.1)."""
    return abs(hits - n * p) <= 2


@pytest.fixture
def two_backends(backend_factory: Callable[..., HttpBackend]) -> tuple[HttpBackend, HttpBackend]:
    return backend_factory("one", "127.0.0.11"), backend_factory("two", "127.0.0.12")


@MODES
def test_weighted_endpoints_follow_snapshots(
    xds_server: ControlPlane,
    envoy_factory: Callable[..., EnvoyProcess],
    two_backends: tuple[HttpBackend, HttpBackend],
    delta: bool,
) -> None:
    one, two = two_backends
    port = free_port()
    xds_server.nodes["sidecar-1"] = "sidecar"
    xds_server.cache.set_view("sidecar", web_snapshot(port, {SVC: [ep(one, 100), ep(two, 10)]}))
    envoy = envoy_factory("sidecar-1", delta=delta)
    client = HttpClient(port)
    envoy.wait_for(lambda: client.get()[0] == 200, message="listener not serving")

    hits = client.split(1000)
    assert hits["one"] + hits["two"] == 1000
    assert weighted_share(hits["two"], 1000, 10 / 110), hits

    # New weights: a new snapshot, same Envoy.
    xds_server.cache.set_view("sidecar", web_snapshot(port, {SVC: [ep(one, 10), ep(two, 100)]}))
    envoy.wait_for(lambda: weights(envoy, SVC) == {addr(one): 10, addr(two): 100}, message="weights not applied")
    hits = client.split(1000)
    assert weighted_share(hits["one"], 1000, 10 / 110), hits

    # Endpoint removed: no more traffic to it.
    xds_server.cache.set_view("sidecar", web_snapshot(port, {SVC: [ep(two, 100)]}))
    envoy.wait_for(lambda: weights(envoy, SVC) == {addr(two): 100}, message="endpoint not removed")
    before = one.hits
    assert client.split(200) == {"two": 200}
    assert one.hits == before

    # Envoy's default Prometheus naming is kept (bootstrap has no stats_config).
    envoy.wait_for(
        lambda: re.search(
            r'^envoy_cluster_outbound_upstream_rq_completed\{envoy_cluster_name="9080\|default\|reviews"\} (\d+)$',
            envoy.prometheus(),
            re.M,
        ),
        message="prometheus name",
    )
    status = xds_server.status()
    assert [(s["node_id"], s["view"], s["mode"]) for s in status] == [
        ("sidecar-1", "sidecar", "delta" if delta else "sotw")
    ]
    for short in ("clusters", "endpoints", "listeners", "routes"):
        assert status[0][short]["sent"] == status[0][short]["acked"] is not None, (short, status[0])
    client.close()


def responses_sent(type_short: str, mode: str) -> float:
    return metrics.REGISTRY.get_sample_value("trafficmgr_xds_responses_sent_total", {"type": type_short, "mode": mode}) or 0


@MODES
def test_nack_is_reported_not_resent_and_cleared(
    xds_server: ControlPlane,
    envoy_factory: Callable[..., EnvoyProcess],
    two_backends: tuple[HttpBackend, HttpBackend],
    delta: bool,
) -> None:
    one, two = two_backends
    mode = "delta" if delta else "sotw"
    port = free_port()
    xds_server.nodes["sidecar-1"] = "sidecar"
    xds_server.cache.set_view("sidecar", web_snapshot(port, {"svc": [ep(one, 1)]}))
    envoy = envoy_factory("sidecar-1", delta=delta)
    client = HttpClient(port)
    envoy.wait_for(lambda: client.get()[0] == 200)

    xds_server.cache.set_view("sidecar", web_snapshot(port, {"svc": [ep(one, 1)]}, extra=[bad_cluster("broken")]))
    nack = envoy.wait_for(lambda: xds_server.status()[0]["clusters"]["last_nack"], message="no NACK recorded")
    assert "broken" in nack["error"], nack  # Envoy names the rejected cluster
    assert "broken" in nack["resources"]
    assert xds_server.nacks()[-1]["node_id"] == "sidecar-1"
    # The rejected version is not resent (no NACK loop) while nothing changes.
    sent = responses_sent("clusters", mode)
    time.sleep(3)
    assert responses_sent("clusters", mode) == sent
    assert len([n for n in xds_server.nacks() if n["type"] == "clusters"]) == 1

    # Another good change still reaches Envoy, the broken cluster still there.
    xds_server.cache.set_view(
        "sidecar", web_snapshot(port, {"svc": [ep(one, 1)], "alt": [ep(two, 1)]}, extra=[bad_cluster("broken")])
    )
    envoy.wait_for(lambda: client.get("/alt")[1].get("backend") == "two", message="good change not applied")
    assert xds_server.status()[0]["clusters"]["last_nack"] is not None

    # A fixed version is accepted and clears the NACK.
    xds_server.cache.set_view("sidecar", web_snapshot(port, {"svc": [ep(one, 1)], "alt": [ep(two, 1)]}))
    envoy.wait_for(lambda: xds_server.status()[0]["clusters"]["last_nack"] is None, message="NACK not cleared")
    st = xds_server.status()[0]["clusters"]
    assert st["sent"] == st["acked"]
    assert client.get("/svc")[1]["backend"] == "one"
    client.close()


@MODES
def test_control_plane_restart(
    xds_server: ControlPlane,
    envoy_factory: Callable[..., EnvoyProcess],
    two_backends: tuple[HttpBackend, HttpBackend],
    delta: bool,
) -> None:
    one, two = two_backends
    port = free_port()
    xds_server.nodes["sidecar-1"] = "sidecar"
    xds_server.cache.set_view("sidecar", web_snapshot(port, {"svc": [ep(one, 100), ep(two, 1)]}))
    envoy = envoy_factory("sidecar-1", delta=delta)
    client = HttpClient(port)
    envoy.wait_for(lambda: client.get()[0] == 200)

    xds_server.stop()
    envoy.wait_for(lambda: envoy.stats().get("control_plane.connected_state") == 0, message="still connected")
    assert sum(client.split(50).values()) == 50 and client.split(50).keys() <= {"one", "two"}

    # Same port, changed snapshot: Envoy reconnects and resyncs.
    xds_server.cache.set_view("sidecar", web_snapshot(port, {"svc": [ep(one, 1), ep(two, 100)]}))
    xds_server.start()
    envoy.wait_for(
        lambda: weights(envoy, "svc") == {addr(one): 1, addr(two): 100}, timeout=15, message="no resync after restart"
    )
    assert envoy.stats()["control_plane.connected_state"] == 1
    hits = client.split(110)
    assert hits["two"] > hits["one"], hits
    status = xds_server.status()
    assert len(status) == 1 and status[0]["clusters"]["acked"] == status[0]["clusters"]["sent"]
    client.close()


@MODES
def test_unknown_node_gets_config_when_known(
    xds_server: ControlPlane,
    envoy_factory: Callable[..., EnvoyProcess],
    backend_factory: Callable[..., HttpBackend],
    delta: bool,
) -> None:
    one = backend_factory("one")
    port = free_port()
    xds_server.cache.set_view("sidecar", web_snapshot(port, {"svc": [ep(one, 1)]}))
    # The xDS connection comes from a chosen source address: the resolver sees it as the peer.
    envoy = envoy_factory("late-pod", delta=delta, wait="admin", xds_source_address="127.0.0.77")
    envoy.wait_for(lambda: xds_server.status(), message="Envoy did not connect")
    time.sleep(0.5)
    assert xds_server.status()[0]["view"] is None
    assert xds_server.status()[0]["peer"] == "127.0.0.77"
    assert envoy.dynamic("clusters") == [] and envoy.dynamic("listeners") == []
    assert json.loads(envoy.admin("/server_info"))["state"] != "LIVE"  # still waiting for CDS

    xds_server.nodes["late-pod"] = "sidecar"
    xds_server.cache.notify()
    envoy.wait_live(timeout=10)
    client = HttpClient(port)
    envoy.wait_for(lambda: client.get()[1].get("backend") == "one")
    assert xds_server.status()[0]["view"] == "sidecar"
    client.close()
