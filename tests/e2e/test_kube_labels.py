"""Bad label values: one Warning Event each (visible in `kubectl describe`), defaults apply, Envoy never NACKs."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from trafficmgr.core.plugins import PluginHost
from trafficmgr.testing.cluster import Kubectl, LocalCluster
from trafficmgr.testing.envoy import no_nacks, wait_for
from trafficmgr.testing.manifests import join, pod, service
from trafficmgr.testing.netns import require as _require_netns

POD_IP = "10.244.0.11"
MANIFESTS = join(service("reviews"), pod("reviews-1", POD_IP, "reviews"))

# Every label of LABELS.md with values that must be refused. Kubernetes itself limits label values to
# [A-Za-z0-9._-]{0,63}, so only values of that shape are tried.
BAD_VALUES: dict[str, tuple[str, list[str]]] = {
    "traffic.envoy.enabled": ("pod", ["yes", "1"]),
    "traffic.port.<port>": ("service", ["sctp", "udp"]),
    "traffic.lb.policy": ("service", ["FASTEST", "round-robin"]),
    "traffic.hash.cookie.ttl": ("service", ["-1", "1.5", "ten"]),
    "traffic.endpoint.weight": ("pod", ["129", "-1", "heavy"]),
    "traffic.fault.delay.time": ("service", ["-5", "3s"]),
    "traffic.fault.delay.percentage": ("service", ["101", "-1", "nan"]),
    "traffic.fault.abort.status": ("service", ["600", "199", "oops"]),
    "traffic.fault.abort.grpc-status": ("service", ["17", "-1", "unavailable"]),
    "traffic.fault.abort.percentage": ("service", ["100.5", "inf"]),
    "traffic.rate.limit": ("service", ["-1", "fast"]),
    "traffic.request.rate": ("service", ["-3", "1.5"]),
    "traffic.tracing.enabled": ("service", ["maybe"]),
    "traffic.tracing.sampling": ("service", ["200", "-0.5"]),
    "traffic.retries.max": ("service", ["-1"]),
    "traffic.connection.max": ("service", ["-1", "1e3"]),
    "traffic.request.max-pending": ("service", ["-2"]),
    "traffic.request.max": ("service", ["many"]),
    "traffic.request.timeout": ("service", ["-1", "1m"]),
    "traffic.retries.5xx": ("service", ["-1"]),
    "traffic.retries.connect-failure": ("service", ["a"]),
    "traffic.retries.gateway-error": ("service", ["-1"]),
    "traffic.retries.grpc": ("service", ["-1", "two"]),
    "traffic.connection.timeout": ("service", ["0", "-100"]),
    "traffic.outlier.consecutive-5xx": ("service", ["-1"]),
    "traffic.scope": ("pod", ["everything", "ns"]),
    "traffic.scope.namespaces": ("pod", ["Shop", "a__b", "-x"]),
}
# Cookie and header names: every value Kubernetes allows in a label is a valid HTTP token.
NO_BAD_VALUE = {"traffic.hash.cookie.name", "traffic.hash.header.name"}


def test_table_covers_every_label() -> None:
    declared = {s.key for s in PluginHost.load().labels.specs if s.plugin in ("core", "lb", "fault", "ratelimit", "tracing", "circuit_breaker")}
    assert declared == set(BAD_VALUES) | NO_BAD_VALUE


@pytest.fixture
def cluster(envoy_binary: str) -> Iterator[LocalCluster]:
    _require_netns()
    with LocalCluster([POD_IP]) as c:
        c.backend("reviews-1", POD_IP, 9080)
        c.apply(MANIFESTS)
        yield c


def _events(c: LocalCluster) -> list[dict]:
    return [e for e in c.store.list("events", "default")["items"] if e.get("reason") == "InvalidTrafficLabel"]


def test_bad_values_give_one_event_each_and_no_nack(cluster: LocalCluster) -> None:
    c = cluster
    url = f"http://{c.cluster_ip('reviews')}:9080/"
    wait_for(lambda: c.pod.curl(url)[0] == 200, 10, message="service not reachable before the test")
    expected: list[tuple[str, str, str]] = []
    for spec_key, (kind, values) in BAD_VALUES.items():
        key = spec_key.replace("<port>", "9080")
        name = "reviews" if kind == "service" else "reviews-1"
        for value in values:
            c.label(kind, name, {key: value})
            expected.append((name, key, value))
        # Restore a valid state (for the port label: the valid value; else: remove the label).
        c.label(kind, name, {key: "http" if spec_key == "traffic.port.<port>" else None})

    def matched() -> bool:
        seen = {(e["involvedObject"]["name"], e["message"]) for e in _events(c)}
        return all(any(n == name and f"{value!r}" in m and key in m for n, m in seen) for name, key, value in expected)

    wait_for(matched, 15, message="not every bad value produced an Event")
    events = _events(c)
    # One Event per distinct bad value, never one per rebuild: more object updates add none.
    c.label("service", "reviews", {"unrelated": "x"})
    c.label("pod", "reviews-1", {"unrelated": "y"})
    time.sleep(0.5)
    assert len(_events(c)) == len(events) == len(expected), [e["message"] for e in events]
    assert all(e["type"] == "Warning" for e in events)
    # Defaults applied and Envoy accepted everything: the service still answers, no NACK ever.
    assert c.pod.curl(url)[0] == 200
    no_nacks(c.xds.status())
    assert c.xds.nacks() == []


def test_kubectl_describe_shows_the_event(cluster: LocalCluster, tmp_path) -> None:  # type: ignore[no-untyped-def]
    c = cluster
    kubectl = Kubectl(c.kubeconfig, tmp_path / "home")
    kubectl("label", "svc", "reviews", "traffic.lb.policy=FASTEST")
    wait_for(lambda: "InvalidTrafficLabel" in kubectl("describe", "svc", "reviews"), 10,
             message="kubectl describe shows no InvalidTrafficLabel event")
    out = kubectl("describe", "svc", "reviews")
    assert "traffic.lb.policy" in out and "FASTEST" in out and "ROUND_ROBIN" in out
    events = json.loads(kubectl("get", "events", "-o", "json"))["items"]
    assert [e["reason"] for e in events].count("InvalidTrafficLabel") == 1
