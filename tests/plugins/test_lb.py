"""lb plugin: the original README's load-balancing walkthrough, through a real sidecar Envoy."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterator

import pytest

from trafficmgr.testing.cluster import LocalCluster
from trafficmgr.testing.kit import BuildResult, SidecarMesh
from trafficmgr.testing.manifests import service
from trafficmgr.testing.netns import require as _require_netns

PODS = {"reviews-v1": "10.244.0.11", "reviews-v2": "10.244.0.12", "reviews-v3": "10.244.0.13"}

MANIFESTS = service("reviews") + "".join(f"""
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: default}}
spec:
  selector: {{matchLabels: {{app: reviews, version: {name}}}}}
  template:
    metadata: {{labels: {{app: reviews, version: {name}}}}}
    spec: {{containers: [{{name: app, image: reviews}}]}}
---
apiVersion: apps/v1
kind: ReplicaSet
metadata:
  name: {name}-5d8f
  namespace: default
  ownerReferences: [{{apiVersion: apps/v1, kind: Deployment, name: {name}, uid: u-{name}, controller: true}}]
spec:
  selector: {{matchLabels: {{app: reviews, version: {name}}}}}
  template:
    metadata: {{labels: {{app: reviews, version: {name}}}}}
    spec: {{containers: [{{name: app, image: reviews}}]}}
---
apiVersion: v1
kind: Pod
metadata:
  name: {name}-5d8f-abcde
  namespace: default
  labels: {{app: reviews, version: {name}}}
  ownerReferences: [{{apiVersion: apps/v1, kind: ReplicaSet, name: {name}-5d8f, uid: u-rs-{name}, controller: true}}]
spec: {{nodeName: node-1, containers: [{{name: app, image: reviews}}]}}
status: {{podIP: {ip}, conditions: [{{type: Ready, status: "True"}}]}}
""" for name, ip in PODS.items())


@pytest.fixture(params=["sotw", "delta"])
def cluster(request: pytest.FixtureRequest, envoy_binary: str) -> Iterator[LocalCluster]:
    _require_netns()
    with LocalCluster(list(PODS.values()), delta=request.param == "delta") as c:
        for name, ip in PODS.items():
            c.backend(name, ip, 9080)
        c.apply(MANIFESTS)
        yield c


def _url(c: LocalCluster) -> str:
    return f"http://{c.cluster_ip('reviews')}:9080/reviews/0"


def _membership(c: LocalCluster) -> int:
    text = c.pod.admin("/stats/prometheus")
    m = re.search(r'^envoy_cluster_outbound_membership_total\{envoy_cluster_name="9080\|default\|reviews"\} (\d+)', text, re.M)
    return int(m.group(1)) if m else -1


def _spread(c: LocalCluster, n: int, *curl_args: str) -> Counter[str]:
    url = _url(c)

    def run() -> Counter[str]:
        import urllib.request

        seen: Counter[str] = Counter()
        for _ in range(n):
            req = urllib.request.Request(url, headers=dict(a.split(": ", 1) for a in curl_args))
            with urllib.request.urlopen(req, timeout=5) as resp:
                seen[json.loads(resp.read())["backend"]] += 1
        return seen

    return c.pod.in_ns(run)


def test_weights_membership_and_split(cluster: LocalCluster) -> None:
    c = cluster
    c.wait_config(lambda: _membership(c) == 3, message="three endpoints expected")
    c.label("deployment", "reviews-v1", {"traffic.endpoint.weight": "100"})
    c.label("deployment", "reviews-v2", {"traffic.endpoint.weight": "10"})
    c.label("deployment", "reviews-v3", {"traffic.endpoint.weight": "0"})
    c.wait_config(lambda: _membership(c) == 2, message="weight 0 must remove reviews-v3")
    n = 1000
    seen = _spread(c, n)
    assert seen["reviews-v3"] == 0
    # Envoy's weighted round robin with one worker is deterministic up to its random start: measured
    # 90 or 91 of 1000 for v2 (n p = 90.9) in 6 of 6 runs; +-2 tells weight 10 from 9 (82.6) or 11 (99.1).
    assert abs(seen["reviews-v2"] - n * 10 / 110) <= 2, seen


def test_ring_hash_cookie_is_sticky(cluster: LocalCluster) -> None:
    c = cluster
    c.label("service", "reviews", {"traffic.lb.policy": "RING_HASH", "traffic.hash.cookie.name": "mycookie",
                                   "traffic.hash.cookie.ttl": "100000"})
    url = _url(c)

    def first_cookie() -> str:
        proc = c.pod.ns.run("curl", "-sS", "-m", "3", "-D", "-", "-o", "/dev/null", url, check=False)
        m = re.search(r"^set-cookie: (mycookie=\"[0-9a-f]+\"; Max-Age=100; HttpOnly)", proc.stdout, re.M | re.I)
        return m.group(1) if m else ""

    header = c.wait_config(first_cookie, timeout=20, message="no set-cookie with Max-Age=100")
    value = header.split(";")[0]
    seen = _spread(c, 30, f"Cookie: {value}")
    assert len(seen) == 1, f"cookie {value} must stick to one pod: {seen}"
    # Without a cookie-generating request, spreading comes back when the policy returns to default.
    c.label("service", "reviews", {"traffic.lb.policy": None, "traffic.hash.cookie.name": None, "traffic.hash.cookie.ttl": None})
    c.wait_config(lambda: len(_spread(c, 30, f"Cookie: {value}")) == 3, message="round robin not restored")


def test_header_hash_is_sticky_per_value(cluster: LocalCluster) -> None:
    c = cluster
    c.label("service", "reviews", {"traffic.lb.policy": "MAGLEV", "traffic.hash.header.name": "x-user"})
    c.wait_config(lambda: len(_spread(c, 20, "x-user: alice")) == 1, message="header hashing not sticky")
    owners = {user: set(_spread(c, 15, f"x-user: {user}")) for user in ("alice", "bob", "carol", "dave", "erin", "frank")}
    assert all(len(o) == 1 for o in owners.values()), owners
    assert len(set().union(*owners.values())) > 1, "different header values should spread over pods"


# -- through the plugin kit (real Envoy on loopback, no root) ----------------------------------------

KIT_MANIFESTS = """
apiVersion: v1
kind: Service
metadata: {name: reviews, labels: {traffic.port.9080: http}}
spec: {selector: {app: reviews}, ports: [{name: http, port: 9080}]}
""" + "".join(f"""
---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, labels: {{app: reviews, traffic.endpoint.weight: "{weight}"}}}}
spec: {{containers: [{{name: app, image: reviews}}]}}
""" for name, weight in (("reviews-v1", 100), ("reviews-v2", 10), ("reviews-v3", 0)))


def test_endpoint_weights_through_the_kit(trafficmgr_build: Callable[..., BuildResult],
                                          trafficmgr_envoy: Callable[..., SidecarMesh]) -> None:
    """trafficmgr_endpoints: Pod weights become lb_endpoint weights and weight 0 removes the pod, in the
    built ClusterLoadAssignment and in what a real Envoy does with it."""
    cla = trafficmgr_build(KIT_MANIFESTS, plugins=["lb"]).sidecar.endpoints["9080|default|reviews.outbound"]
    weights = sorted(e.get("load_balancing_weight") for e in cla["endpoints"][0]["lb_endpoints"])
    assert weights == [10, 100]
    mesh = trafficmgr_envoy(KIT_MANIFESTS, plugins=["lb"])
    n = 330
    seen = Counter(mesh.get("reviews", "/").json()["backend"] for _ in range(n))
    assert seen["reviews-v3"] == 0
    # As in test_weights_membership_and_split: 330 requests are 3 whole rounds of 110, measured exactly 30
    # for v2 in 3 of 3 runs; +-2 tells weight 10 from 9 (27.2) or 12 (35.4).
    assert abs(seen["reviews-v2"] - n * 10 / 110) <= 2, seen
    # Removing the label restores the default weight (100): reviews-v3 gets traffic again.
    mesh.label("pod", "reviews-v3", {"traffic.endpoint.weight": None})
    assert mesh.wait_for(lambda: mesh.get("reviews", "/").json()["backend"] == "reviews-v3", timeout=5,
                         message="reviews-v3 back at the default weight must get traffic")
