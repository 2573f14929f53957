"""ratelimit plugin: bandwidth (traffic.rate.limit) and request rate (traffic.request.rate) limits,
measured through a real sidecar Envoy."""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from trafficmgr.plugins.ratelimit import BANDWIDTH_FILTER, MAX_BANDWIDTH_KIBPS, MAX_REQUEST_RATE, RATELIMIT_FILTER
from trafficmgr.testing.cluster import LocalCluster
from trafficmgr.testing.manifests import join, pod, service
from trafficmgr.testing.netns import require as _require_netns

REVIEWS_IP = "10.244.0.11"
MANIFESTS = join(service("reviews"), pod("reviews-1", REVIEWS_IP, "reviews"))
LABELS = ("traffic.rate.limit", "traffic.request.rate")


@pytest.fixture(scope="module", params=["sotw", "delta"])
def cluster(request: pytest.FixtureRequest, envoy_binary: str) -> Iterator[LocalCluster]:
    _require_netns()
    with LocalCluster([REVIEWS_IP], delta=request.param == "delta") as c:
        c.backend("reviews", REVIEWS_IP, 9080)
        c.apply(MANIFESTS)
        yield c


@pytest.fixture
def c(cluster: LocalCluster) -> Iterator[LocalCluster]:
    """The module's cluster with no rate labels (and a default backend) before and after each test."""
    cluster.label("service", "reviews", dict.fromkeys(LABELS))
    cluster.backends[0].reset()
    wait_filter_configs(cluster, lambda configs: not configs)
    yield cluster
    cluster.label("service", "reviews", dict.fromkeys(LABELS))


def vhost_filter_configs(c: LocalCluster, vhost: str = "reviews.default:9080") -> dict[str, Any] | None:
    """The ``typed_per_filter_config`` of ``vhost`` as the sidecar holds it (None: no such vhost)."""
    dump = json.loads(c.pod.admin("/config_dump?resource=dynamic_route_configs"))
    for cfg in dump.get("configs", []):
        for vh in cfg["route_config"].get("virtual_hosts", []):
            if vh["name"] == vhost:
                return vh.get("typed_per_filter_config", {})
    return None


def wait_filter_configs(c: LocalCluster, predicate, message: str = "route config not applied") -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """Poll the sidecar until the reviews vhost's per-filter configs satisfy ``predicate``."""
    def check() -> list[dict[str, Any]] | None:
        configs = vhost_filter_configs(c)
        return [configs] if configs is not None and predicate(configs) else None  # a list: {} is falsy

    return c.wait_config(check, timeout=10, message=message)[0]


def _no_nacks(c: LocalCluster) -> None:
    assert c.cp.nacks() == [], c.cp.nacks()


def _get(c: LocalCluster, n: int, path: str = "/") -> tuple[list[int], float, int]:
    """``n`` sequential GETs to reviews on one keep-alive connection from the client pod:
    (statuses, elapsed seconds, bytes of the last body)."""
    start = time.monotonic()
    answers = c.pod.get_many(c.cluster_ip("reviews"), 9080, "reviews:9080", n, path)
    return [status for status, _ in answers], time.monotonic() - start, len(answers[-1][1]) if answers else 0


def test_bandwidth_limit_slows_a_large_response(c: LocalCluster) -> None:
    limit_kib = 512
    size_kib = 1536
    c.backends[0].set(body_size=size_kib * 1024)
    statuses, unlimited, size = _get(c, 1)
    assert statuses == [200] and size == size_kib * 1024
    c.label("service", "reviews", {"traffic.rate.limit": str(limit_kib)})
    wait_filter_configs(c, lambda f: f.get(BANDWIDTH_FILTER, {}).get("limit_kbps") == str(limit_kib))
    # Envoy's bucket holds one second of traffic (limit_kib) and refills at limit_kib/s in 50 ms steps.
    # A new config starts it empty: idle for a second first, so the download gets the full burst.
    time.sleep(1.1)
    statuses, elapsed, size = _get(c, 1)
    assert statuses == [200] and size == size_kib * 1024
    # The burst covers limit_kib; the rest takes (size - limit) / limit seconds, less at most one step.
    lower = (size_kib - limit_kib) / limit_kib - 0.05
    print(f"unlimited {unlimited:.3f}s, limited {elapsed:.3f}s (lower bound {lower:.2f}s)")
    assert elapsed >= lower, elapsed
    assert elapsed < 3 * lower + 5, elapsed  # generous: scheduling on a loaded 2-core machine
    c.label("service", "reviews", {"traffic.rate.limit": None})
    wait_filter_configs(c, lambda f: BANDWIDTH_FILTER not in f)
    statuses, elapsed, _ = _get(c, 1)
    assert statuses == [200] and elapsed < lower / 2, f"limit not removed: {elapsed:.3f}s"
    _no_nacks(c)


def test_request_rate_answers_429_beyond_the_bucket(c: LocalCluster) -> None:
    rate, n = 5, 30
    c.label("service", "reviews", {"traffic.request.rate": str(rate)})
    wait_filter_configs(c, lambda f: f.get(RATELIMIT_FILTER, {}).get("token_bucket", {}).get("max_tokens") == rate)
    statuses, elapsed, _ = _get(c, n)
    seen = Counter(statuses)
    print(f"{n} requests in {elapsed:.3f}s: {dict(seen)}")
    assert set(seen) <= {200, 429}, seen
    # The bucket starts full (rate tokens) and gets rate tokens per second: continuously (rate * elapsed)
    # or by a timer (at most floor(elapsed) + 1 ticks), so 200s are in [rate, rate * (floor(elapsed) + 2)].
    # The burst takes milliseconds, so in practice exactly `rate` pass (measured: 5 of 30).
    assert rate <= seen[200] <= rate * (math.floor(elapsed) + 2), seen
    assert seen[429] == n - seen[200] >= n - rate * (math.floor(elapsed) + 2) > 0, seen
    assert c.backends[0].hits == seen[200], "a 429 must not reach the backend"
    c.label("service", "reviews", {"traffic.request.rate": None})
    wait_filter_configs(c, lambda f: RATELIMIT_FILTER not in f)
    statuses, _, _ = _get(c, n)
    assert statuses == [200] * n
    _no_nacks(c)


def _events(c: LocalCluster, reason: str) -> list[str]:
    return [e.get("message", "") for e in c.store.list("events", "default")["items"] if e.get("reason") == reason]


def test_bad_values_are_reported_and_never_nacked(c: LocalCluster) -> None:
    c.label("service", "reviews", {"traffic.rate.limit": "fast", "traffic.request.rate": "-1"})
    c.wait_config(lambda: len([m for m in _events(c, "InvalidTrafficLabel") if "traffic.rate" in m or "traffic.request.rate" in m]) >= 2,
                  message="no InvalidTrafficLabel events for the rate labels")
    assert vhost_filter_configs(c) == {}
    # Too large for Envoy's integer fields: clamped to the largest value Envoy takes, reported.
    c.label("service", "reviews", {"traffic.rate.limit": "99999999999999999999", "traffic.request.rate": "99999999999999999999"})
    configs = wait_filter_configs(c, lambda f: RATELIMIT_FILTER in f and BANDWIDTH_FILTER in f)
    assert configs[BANDWIDTH_FILTER]["limit_kbps"] == str(MAX_BANDWIDTH_KIBPS)
    assert configs[RATELIMIT_FILTER]["token_bucket"]["max_tokens"] == MAX_REQUEST_RATE
    c.wait_config(lambda: len(_events(c, "TrafficConfigClamped")) >= 2, message="no TrafficConfigClamped events")
    statuses, _, _ = _get(c, 5)
    assert statuses == [200] * 5
    _no_nacks(c)
