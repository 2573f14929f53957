"""The reviews rig shared by the circuit_breaker and fault tests: a LocalCluster with the reviews Service,
its pods each served by an HttpBackend, and helpers to request it and read the sidecar's config."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

from trafficmgr.testing.cluster import LocalCluster
from trafficmgr.testing.envoy import no_nacks
from trafficmgr.testing.manifests import join, pod, service

PODS = {"reviews-1": "10.244.0.11", "reviews-2": "10.244.0.12", "reviews-3": "10.244.0.13"}
CLUSTER = "9080|default|reviews.outbound"
STAT = "cluster.9080|default|reviews.outbound."


def start_reviews(delta: bool, pods: dict[str, str]) -> LocalCluster:
    """A LocalCluster with the reviews Service, the given pods and one HttpBackend per pod."""
    c = LocalCluster(list(pods.values()), delta=delta)
    try:
        for name, ip in pods.items():
            c.backend(name, ip, 9080)
        c.apply(join(service("reviews"), *(pod(name, ip, "reviews") for name, ip in pods.items())))
        c.wait_config(lambda: route_has(c, CLUSTER) and all(f"{CLUSTER}::{ip}:9080::" in c.pod.admin("/clusters")
                                                             for ip in pods.values()), message="reviews not configured")
    except BaseException:
        c.close()
        raise
    return c


def reviews_url(c: LocalCluster) -> str:
    return f"http://{c.cluster_ip('reviews')}:9080/reviews/0"


def get_timed(url: str, timeout: float = 10.0) -> tuple[int, dict[str, str], float]:
    """(status, lower-cased headers, seconds); call inside the pod namespace."""
    start = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            resp.read()
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, time.monotonic() - start
    except urllib.error.HTTPError as exc:
        exc.read()
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, time.monotonic() - start


def request_reviews(c: LocalCluster, timeout: float = 10.0) -> tuple[int, dict[str, str], float]:
    url = reviews_url(c)
    return c.pod.in_ns(lambda: get_timed(url, timeout))


def config_dump(c: LocalCluster, resource: str) -> str:
    return c.pod.admin(f"/config_dump?resource={resource}")


def cluster_has(c: LocalCluster, *fragments: str) -> bool:
    """The sidecar's active reviews cluster contains every JSON fragment."""
    dump = json.loads(config_dump(c, "dynamic_active_clusters"))
    for item in dump.get("configs", []):
        cluster = item.get("cluster", {})
        if cluster.get("name") == CLUSTER:
            text = json.dumps(cluster, separators=(",", ":"))
            return all(f in text for f in fragments)
    return False


def route_has(c: LocalCluster, *fragments: str) -> bool:
    text = json.dumps(json.loads(config_dump(c, "dynamic_route_configs")), separators=(",", ":"))
    return all(f in text for f in fragments)


def assert_no_nacks(c: LocalCluster) -> None:
    no_nacks(c.xds.status())
