"""circuit_breaker plugin: thresholds, retries, timeouts, connect timeout and outlier detection, proven
through a real sidecar Envoy (LocalCluster: in-memory API server, real control plane, iptables redirect).

Exercises the hooks ``trafficmgr_cluster`` (thresholds, connect timeout, outlier detection) and
``trafficmgr_route`` (timeout, retry policy)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from tests.plugins.reviews import (
    CLUSTER,
    PODS,
    STAT,
    assert_no_nacks,
    cluster_has,
    get_timed,
    request_reviews,
    reviews_url,
    route_has,
    start_reviews,
)
from trafficmgr.core.kube.events import INVALID_LABEL
from trafficmgr.testing.cluster import LocalCluster
from trafficmgr.testing.envoy import wait_for
from trafficmgr.testing.netns import require as _require_netns


@pytest.fixture(params=["sotw", "delta"])
def cluster(request: pytest.FixtureRequest, envoy_binary: str) -> Iterator[LocalCluster]:
    """Three reviews pods behind one Service (both xDS modes)."""
    _require_netns()
    c = start_reviews(request.param == "delta", PODS)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def single(envoy_binary: str) -> Iterator[LocalCluster]:
    """One reviews pod (so status sequences are deterministic), state-of-the-world xDS."""
    _require_netns()
    c = start_reviews(False, {"reviews-1": PODS["reviews-1"]})
    try:
        yield c
    finally:
        c.close()


SLOW = 1.5  # seconds the upstream takes in the overflow test: the whole burst must arrive meanwhile


def _burst(c: LocalCluster, n: int = 8) -> list[tuple[int, dict[str, str], float]]:
    """``n`` concurrent requests; the others start once the first one has reached a backend (is active)."""
    url = reviews_url(c)

    def run() -> list[tuple[int, dict[str, str], float]]:
        results: list[tuple[int, dict[str, str], float]] = []
        lock = threading.Lock()

        def one() -> None:
            r = get_timed(url)
            with lock:
                results.append(r)

        # Threads started here inherit the pod network namespace of this thread.
        threads = [threading.Thread(target=one) for _ in range(n)]
        hits = sum(b.hits for b in c.backends)
        threads[0].start()
        wait_for(lambda: sum(b.hits for b in c.backends) > hits, timeout=5, interval=0.005, message="first request lost")
        for t in threads[1:]:
            t.start()
        for t in threads:
            t.join(15)
        return results

    return c.pod.in_ns(run)


def _assert_overloaded(results: list[tuple[int, dict[str, str], float]], served: int) -> None:
    statuses = sorted(r[0] for r in results)
    assert statuses.count(200) == served, statuses
    overloaded = [r for r in results if r[0] != 200]
    assert all(r[0] == 503 and r[1].get("x-envoy-overloaded") == "true" for r in overloaded), overloaded
    # The upstream takes SLOW s; an overflow answered in well under that was not queued behind it. The
    # margin is wide because a loaded CI machine can take a while just to start eight client threads.
    assert all(r[2] < SLOW * 0.6 for r in overloaded), "an overflow must be answered at once, not after the upstream delay"


def test_overflow_gives_503_overloaded_and_counts(single: LocalCluster) -> None:
    # One endpoint: Envoy lets every host open one connection whatever max_connections says (so that
    # its pending requests can be served), which would make the counts below depend on the lb choice.
    c = single
    for b in c.backends:
        b.set(delay=SLOW)
    # The README's circuit breaker: one request at a time. While the first (slow) request is active,
    # every other one overflows max_requests at once.
    c.label("service", "reviews", {"traffic.request.max": "1", "traffic.request.max-pending": "1"})
    c.wait_config(lambda: cluster_has(c, '"max_pending_requests":1', '"max_requests":1'), message="thresholds not applied")
    _assert_overloaded(_burst(c), served=1)
    # Every overflow is counted; which counter takes one that raced the first request's connection setup
    # (pending vs active) is Envoy's timing, so the split is not asserted.
    active = c.pod.stat(STAT + "upstream_rq_active_overflow")
    assert active >= 1 and active + c.pod.stat(STAT + "upstream_rq_pending_overflow") == 7
    # Pending requests: with one connection, the second request waits for it (pending) and is served
    # after the first; with the one pending slot taken, the rest overflow max_pending_requests.
    c.label("service", "reviews", {"traffic.request.max": None, "traffic.connection.max": "1"})
    c.wait_config(lambda: cluster_has(c, '"max_connections":1', '"max_pending_requests":1') and not cluster_has(c, "max_requests"),
                  message="thresholds not applied")
    pending_before = c.pod.stat(STAT + "upstream_rq_pending_overflow")
    _assert_overloaded(_burst(c), served=2)
    pending = c.pod.stat(STAT + "upstream_rq_pending_overflow") - pending_before
    assert pending >= 1 and pending + c.pod.stat(STAT + "upstream_rq_active_overflow") - active == 6
    # Without thresholds the same burst is served completely.
    c.label("service", "reviews", {"traffic.connection.max": None, "traffic.request.max-pending": None})
    c.wait_config(lambda: not cluster_has(c, "circuit_breakers"), message="thresholds not removed")
    assert sorted(r[0] for r in _burst(c)) == [200] * 8
    assert_no_nacks(c)


def test_retries_5xx_and_largest_count_wins(single: LocalCluster) -> None:
    c = single
    backend = c.backends[0]
    backend.set(statuses=[503, 503])
    assert request_reviews(c)[0] == 503, "without retries the first failure reaches the client"
    # The original README: an upstream that fails twice then succeeds is fine with retries.5xx=2.
    c.label("service", "reviews", {"traffic.retries.5xx": "2"})
    c.wait_config(lambda: route_has(c, '"retry_on":"5xx"', '"num_retries":2'), message="retry policy not applied")
    backend.reset().set(statuses=[503, 503])
    assert request_reviews(c)[0] == 200
    assert backend.hits == 3
    assert c.pod.stat(STAT + "upstream_rq_retry") == 2
    # One retry is not enough for two failures.
    c.label("service", "reviews", {"traffic.retries.5xx": "1"})
    c.wait_config(lambda: route_has(c, '"num_retries":1'), message="retry count not updated")
    backend.reset().set(statuses=[503, 503])
    assert request_reviews(c)[0] == 503
    assert backend.hits == 2
    # Several conditions: retry_on lists all, num_retries is the largest (3 from gateway-error).
    c.label("service", "reviews", {"traffic.retries.gateway-error": "3"})
    c.wait_config(lambda: route_has(c, '"retry_on":"5xx,gateway-error"', '"num_retries":3'), message="retry policy not merged")
    backend.reset().set(statuses=[502, 504, 503])
    assert request_reviews(c)[0] == 200
    assert backend.hits == 4
    # gateway-error alone does not retry a plain 500.
    c.label("service", "reviews", {"traffic.retries.5xx": None})
    c.wait_config(lambda: route_has(c, '"retry_on":"gateway-error"'), message="5xx condition not removed")
    backend.reset().set(statuses=[500])
    assert request_reviews(c)[0] == 500
    assert backend.hits == 1
    c.label("service", "reviews", {"traffic.retries.gateway-error": None})
    c.wait_config(lambda: not route_has(c, "retry_policy"), message="retry policy not removed")
    assert_no_nacks(c)


def test_request_timeout_gives_504(single: LocalCluster) -> None:
    c = single
    c.backends[0].set(delay=0.8)
    assert request_reviews(c)[0] == 200, "a slow upstream is fine without a timeout"
    c.label("service", "reviews", {"traffic.request.timeout": "300"})
    c.wait_config(lambda: route_has(c, '"timeout":"0.300s"'), message="route timeout not applied")
    status, _, seconds = request_reviews(c)
    assert status == 504
    assert seconds >= 0.28, seconds  # 504 before the upstream's 0.8 s answer: the route timeout fired
    assert c.pod.stat(STAT + "upstream_rq_timeout") == 1
    c.label("service", "reviews", {"traffic.request.timeout": None})
    c.wait_config(lambda: not route_has(c, '"timeout":"0.300s"'), message="route timeout not removed")
    assert request_reviews(c)[0] == 200
    assert_no_nacks(c)


def _health_flags(c: LocalCluster, ip: str) -> str:
    for line in c.pod.admin("/clusters").splitlines():
        if line.startswith(f"{CLUSTER}::{ip}:9080::health_flags::"):
            return line.rpartition("::")[2]
    return "<absent>"


def test_outlier_detection_ejects_failing_endpoint(cluster: LocalCluster) -> None:
    c = cluster
    bad = c.backends[2]
    bad_ip = PODS["reviews-3"]
    bad.set(status=500)
    seen = [request_reviews(c)[0] for _ in range(9)]
    assert seen.count(500) == 3, f"round robin sends a third of the traffic to the failing pod: {seen}"
    c.label("service", "reviews", {"traffic.outlier.consecutive-5xx": "3"})
    c.wait_config(lambda: cluster_has(c, '"consecutive_5xx":3', '"max_ejection_percent":50'), message="outlier detection not applied")
    bad.reset().set(status=500)
    failures = 0
    for _ in range(30):
        if request_reviews(c)[0] == 500:
            failures += 1
            if failures == 3:
                break
    assert failures == 3, "the failing pod never got three requests"
    # Ejected on the third 5xx, not at the next 10 s detection interval: the wait's timeout is the bound.
    c.wait_config(lambda: _health_flags(c, bad_ip) == "/failed_outlier_check", timeout=5,
                  message=f"not ejected within 5 s: {_health_flags(c, bad_ip)}")
    hits = bad.hits
    assert [request_reviews(c)[0] for _ in range(30)] == [200] * 30
    assert bad.hits == hits, "an ejected endpoint must get no traffic"
    assert c.pod.stat(STAT + "outlier_detection.ejections_enforced_consecutive_5xx") == 1
    for ip in (PODS["reviews-1"], PODS["reviews-2"]):
        assert _health_flags(c, ip) == "healthy"
    assert_no_nacks(c)


def test_connect_timeout_is_honoured(single: LocalCluster) -> None:
    c = single
    ip = PODS["reviews-1"]
    # A blackhole: SYNs from the sidecar to the pod are dropped, so connecting times out (a closed
    # port would refuse at once). The rule lives in the pod namespace and goes away with it.
    c.pod.ns.run("iptables", "-w", "-I", "OUTPUT", "-p", "tcp", "-d", ip, "--dport", "9080", "-j", "DROP")
    code, body = c.pod.curl(reviews_url(c), timeout=1.0)
    assert code == 0, f"with the default 60 s connect timeout the client gives up first: {code} {body}"
    c.label("service", "reviews", {"traffic.connection.timeout": "300"})
    c.wait_config(lambda: cluster_has(c, '"connect_timeout":"0.300s"'), message="connect timeout not applied")
    status, _, seconds = request_reviews(c)
    assert status == 503
    assert 0.28 <= seconds < 5, seconds  # far below the default 60 s
    assert c.pod.stat(STAT + "upstream_cx_connect_timeout") >= 1
    assert_no_nacks(c)


@pytest.fixture
def pair(envoy_binary: str) -> Iterator[LocalCluster]:
    """Two reviews pods (round robin alternates between them), state-of-the-world xDS."""
    _require_netns()
    c = start_reviews(False, {name: PODS[name] for name in ("reviews-1", "reviews-2")})
    try:
        yield c
    finally:
        c.close()


def test_retry_on_connect_failure_reaches_the_other_endpoint(pair: LocalCluster) -> None:
    """One of two endpoints refuses connections: without ``traffic.retries.connect-failure`` the requests
    round robin sends there fail; with it, Envoy retries them on the other endpoint and every request
    succeeds (the first attempt really failed to connect: the retry and connect-failure stats move)."""
    c = pair
    refused, good = PODS["reviews-1"], PODS["reviews-2"]
    by_ip = {b.host: b for b in c.backends}
    # A TCP reset answers the sidecar's SYNs to reviews-1 (only SYNs: FACTS), i.e. it refuses at once.
    c.pod.ns.run("iptables", "-w", "-I", "OUTPUT", "-p", "tcp", "-d", refused, "--dport", "9080", "--syn",
                 "-j", "REJECT", "--reject-with", "tcp-reset")
    n = 10

    def run() -> tuple[list[int], int, int]:
        retries, fails = c.pod.stat(STAT + "upstream_rq_retry"), c.pod.stat(STAT + "upstream_cx_connect_fail")
        codes = [request_reviews(c)[0] for _ in range(n)]
        return (codes, c.pod.stat(STAT + "upstream_rq_retry") - retries,
                c.pod.stat(STAT + "upstream_cx_connect_fail") - fails)

    # Without the label: each request round robin sends to reviews-1 is a 503, and nothing retries.
    codes, retried, failed = run()
    assert 503 in codes and 200 in codes, codes
    assert retried == 0 and failed >= codes.count(503), (retried, failed)
    assert by_ip[refused].hits == 0
    c.label("service", "reviews", {"traffic.retries.connect-failure": "2"})
    c.wait_config(lambda: route_has(c, '"retry_on":"connect-failure"'), message="retry policy not applied")
    good_hits = by_ip[good].hits
    codes, retried, failed = run()
    assert codes == [200] * n, codes
    # Round robin sent about half of the first attempts to reviews-1: each failed to connect and was
    # retried; the retries and every other request reached reviews-2.
    assert retried >= 3 and failed >= retried, (retried, failed)
    assert by_ip[good].hits - good_hits == n and by_ip[refused].hits == 0
    assert_no_nacks(c)


BAD = {
    "traffic.retries.max": "-1",
    "traffic.connection.max": "lots",
    "traffic.request.max": "1.5",
    "traffic.connection.timeout": "0",
    "traffic.retries.5xx": "x",
    "traffic.retries.connect-failure": "-3",
}
# Valid but beyond what protobuf/Envoy hold: clamped (uint32 counts, ten-year durations).
HUGE = {
    "traffic.request.max-pending": "99999999999999999999",
    "traffic.outlier.consecutive-5xx": "4294967296",
    "traffic.request.timeout": "99999999999999999999",
    "traffic.retries.gateway-error": "99999999999",
}


def test_bad_values_give_events_and_no_nack(single: LocalCluster) -> None:
    c = single
    c.label("service", "reviews", {**BAD, **HUGE})
    c.wait_config(lambda: cluster_has(c, '"max_pending_requests":4294967295', '"consecutive_5xx":4294967295'),
                  message="clamped values not applied")
    c.wait_config(lambda: route_has(c, '"timeout":"315360000s"', '"num_retries":4294967295'), message="clamped route values")
    assert cluster_has(c, '"connect_timeout":"60s"')

    def reported() -> set[str]:
        items = c.store.list("events", "default")["items"]
        return {key for e in items if e.get("reason") == INVALID_LABEL for key in BAD if key in e.get("message", "")}

    c.wait_config(lambda: reported() == set(BAD), message=f"Events missing for {set(BAD) - reported()}")
    assert request_reviews(c)[0] == 200
    assert_no_nacks(c)


def test_pod_labels_apply_to_traffic_addressed_to_the_pod(single: LocalCluster) -> None:
    """A pod with its own ``traffic.port.<port>`` label is a destination of its own: its timeout and
    retry labels apply to requests sent to its IP, not to requests sent to its Service."""
    c = single
    backend = c.backends[0]
    ip = PODS["reviews-1"]
    pod_url = f"http://{ip}:9080/direct"
    c.label("pod", "reviews-1", {"traffic.port.9080": "http", "traffic.request.timeout": "300", "traffic.retries.5xx": "2"})
    c.wait_config(lambda: route_has(c, f'"{ip}:9080"', '"timeout":"0.300s"', '"num_retries":2'), message="pod route not configured")
    backend.set(delay=0.8)
    assert c.pod.in_ns(lambda: get_timed(pod_url))[0] == 504
    assert request_reviews(c)[0] == 200, "the Service has no timeout label"
    backend.reset().set(statuses=[503, 503])
    assert c.pod.in_ns(lambda: get_timed(pod_url))[0] == 200
    assert backend.hits == 3
    assert_no_nacks(c)
