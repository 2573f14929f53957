"""Behaviour of ``traffic.retries.max`` and of the ``LEAST_REQUEST`` / ``RANDOM`` lb policies, observed
through a real sidecar Envoy (LocalCluster: test API server, real control plane, iptables redirect), not
only read back from the config.

Each test also runs the same traffic without the label (or with another value) and checks the
difference, so a plugin that stops setting the field fails it."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from tests.plugins.reviews import STAT, assert_no_nacks, cluster_has, get_timed, reviews_url, route_has, start_reviews
from trafficmgr.testing.backends import HttpBackend
from trafficmgr.testing.cluster import LocalCluster
from trafficmgr.testing.envoy import wait_for
from trafficmgr.testing.manifests import join, pod, service
from trafficmgr.testing.netns import require as _require_netns

PODS = {"reviews-1": "10.244.0.11", "reviews-2": "10.244.0.12"}


# -- traffic.retries.max -------------------------------------------------------------------------------


@pytest.fixture
def single(envoy_binary: str) -> Iterator[LocalCluster]:
    _require_netns()
    c = start_reviews(False, {"reviews-1": PODS["reviews-1"]})
    try:
        yield c
    finally:
        c.close()


def _concurrent(c: LocalCluster, n: int) -> list[int]:
    """``n`` requests to reviews at the same time from the client pod; their statuses."""
    url = reviews_url(c)

    def run() -> list[int]:
        out: list[int] = []
        lock = threading.Lock()

        def one() -> None:
            status = get_timed(url, timeout=15)[0]
            with lock:
                out.append(status)

        threads = [threading.Thread(target=one) for _ in range(n)]  # they inherit the pod namespace
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        return out

    return c.pod.in_ns(run)


def _retry_burst(c: LocalCluster, n: int = 3) -> tuple[int, int, int]:
    """``n`` concurrent requests to an upstream answering 503 after 1 s, with one retry each allowed:
    (retries made, retries refused by the circuit breaker, requests the backend saw) during the burst.

    The first attempts all fail within milliseconds of each other, so their retries are in flight at the
    same time (a retry holds Envoy's retry resource until its own attempt ends, 1 s later)."""
    backend = c.backends[0]
    backend.reset().set(status=503, delay=1.0)
    retry0, overflow0 = c.pod.stat(STAT + "upstream_rq_retry"), c.pod.stat(STAT + "upstream_rq_retry_overflow")
    statuses = _concurrent(c, n)
    assert statuses == [503] * n, statuses
    return (c.pod.stat(STAT + "upstream_rq_retry") - retry0,
            c.pod.stat(STAT + "upstream_rq_retry_overflow") - overflow0, backend.hits)


def test_retries_max_limits_concurrent_retries(single: LocalCluster) -> None:
    c = single
    c.label("service", "reviews", {"traffic.retries.5xx": "1", "traffic.retries.max": "1"})
    c.wait_config(lambda: cluster_has(c, '"max_retries":1') and route_has(c, '"retry_on":"5xx"', '"num_retries":1'),
                  message="retry policy and max_retries not applied")
    # One retry may be in flight: of three concurrent retries two are refused (overflow) and their
    # requests end with the first attempt's 503.
    assert _retry_burst(c) == (1, 2, 3 + 1)
    # A budget as large as the burst: every request gets its retry.
    c.label("service", "reviews", {"traffic.retries.max": "3"})
    c.wait_config(lambda: cluster_has(c, '"max_retries":3'), message="max_retries 3 not applied")
    assert _retry_burst(c) == (3, 0, 3 + 3)
    # Without the label Envoy's default (3) applies: no overflow either.
    c.label("service", "reviews", {"traffic.retries.max": None})
    c.wait_config(lambda: not cluster_has(c, "max_retries") and route_has(c, '"num_retries":1'),
                  message="max_retries not removed")
    assert _retry_burst(c) == (3, 0, 3 + 3)
    assert_no_nacks(c)


# -- LEAST_REQUEST and RANDOM --------------------------------------------------------------------------


class HoldingBackend(HttpBackend):
    """An HttpBackend that, while ``holding``, keeps every request to ``/hold...`` open until
    :meth:`release` (other paths are answered at once)."""

    def __init__(self, name: str, host: str, port: int) -> None:
        super().__init__(name, host, port)
        self.holding = False
        self.held = 0
        self._release = threading.Event()

    def _next(self, record: dict[str, Any]) -> tuple[int, float, int | None, dict[str, str]]:
        out = super()._next(record)
        if self.holding and record["path"].startswith("/hold"):
            with self._lock:
                self.held += 1
            self._release.wait(60)
        return out

    def release(self) -> None:
        self._release.set()


@pytest.fixture
def pair(envoy_binary: str) -> Iterator[tuple[LocalCluster, dict[str, HoldingBackend]]]:
    """Two reviews pods served by HoldingBackends (reviews-1 holds), state-of-the-world xDS."""
    _require_netns()
    with LocalCluster(list(PODS.values())) as c:
        assert c.pod is not None
        backends: dict[str, HoldingBackend] = {}
        for name, ip in PODS.items():
            backends[name] = c.pod.in_ns(lambda name=name, ip=ip: HoldingBackend(name, ip, 9080).start())
            c.backends.append(backends[name])
        backends["reviews-1"].holding = True
        c.apply(join(service("reviews"), *(pod(name, ip, "reviews") for name, ip in PODS.items())))
        c.wait_config(lambda: all(f"::{ip}:9080::" in c.pod.admin("/clusters") for ip in PODS.values()),  # type: ignore[union-attr]
                      message="reviews endpoints not configured")
        try:
            yield c, backends
        finally:
            for b in backends.values():
                b.release()


def _sequence(c: LocalCluster, n: int) -> list[str]:
    """``n`` sequential fast GETs to reviews on one keep-alive connection: the backend of each."""
    import json

    answers = c.pod.get_many(c.cluster_ip("reviews"), 9080, "reviews:9080", n, "/fast")  # type: ignore[union-attr]
    assert {status for status, _ in answers} == {200}, answers[:3]
    return [json.loads(body)["backend"] for _, body in answers]


def _hold(c: LocalCluster, slow: HoldingBackend, count: int) -> list[threading.Thread]:
    """Send ``/hold`` requests through the sidecar, one after another, until ``slow`` holds ``count``
    of them in flight; the threads of the held requests (they end on ``slow.release()``)."""
    url = f"http://{c.cluster_ip('reviews')}:9080/hold"

    def run() -> list[threading.Thread]:
        threads: list[threading.Thread] = []
        for _ in range(200):
            if slow.held >= count:
                return threads
            before = slow.held
            t = threading.Thread(target=get_timed, args=(url, 70), daemon=True)  # inherits the pod namespace
            t.start()
            threads.append(t)
            # Either the other pod answered (the thread ends) or this one holds one more.
            wait_for(lambda t=t, before=before: not t.is_alive() or slow.held > before, timeout=10, interval=0.005,
                     message="a /hold request neither answered nor held")
        raise AssertionError(f"{slow.name} never held {count} requests: {slow.held}")

    return c.pod.in_ns(run)  # type: ignore[union-attr,no-any-return]


def test_least_request_sends_new_requests_away_from_a_busy_pod(
        pair: tuple[LocalCluster, dict[str, HoldingBackend]]) -> None:
    c, backends = pair
    slow = backends["reviews-1"]
    n = 400
    # Round robin (the default) ignores the four requests reviews-1 is holding: exactly every other one.
    _hold(c, slow, 4)
    rr = Counter(_sequence(c, n))
    assert abs(rr["reviews-1"] - n / 2) <= 1, rr
    slow.release()
    c.label("service", "reviews", {"traffic.lb.policy": "LEAST_REQUEST"})
    c.wait_config(lambda: cluster_has(c, '"lb_policy":"LEAST_REQUEST"'), message="LEAST_REQUEST not applied")
    slow._release = threading.Event()  # hold again
    slow.held = 0
    _hold(c, slow, 4)
    lr = Counter(_sequence(c, n))
    # Envoy's LEAST_REQUEST with equal weights is "power of two choices": two random picks (with
    # replacement), the one with fewer active requests wins; reviews-1 (4 active) is chosen only when both
    # picks are reviews-1, p = 1/4. Binomial(400, 1/4): mean 100, sd 8.7; the bound 150 is 5.8 sd above
    # (P(fail) < 1e-8) and far below round robin's 200.
    print(f"round robin {dict(rr)}, least request {dict(lr)}")
    assert lr["reviews-1"] < 150, lr
    assert lr["reviews-2"] > 250, lr
    slow.release()
    assert_no_nacks(c)


def test_random_is_not_round_robin(pair: tuple[LocalCluster, dict[str, HoldingBackend]]) -> None:
    c, _ = pair
    n = 200

    def repeats(seq: list[str]) -> int:
        return sum(a == b for a, b in zip(seq, seq[1:]))

    rr = _sequence(c, n)
    assert repeats(rr) == 0, f"round robin over two pods alternates strictly: {rr[:20]}"
    c.label("service", "reviews", {"traffic.lb.policy": "RANDOM"})
    c.wait_config(lambda: cluster_has(c, '"lb_policy":"RANDOM"'), message="RANDOM not applied")
    seq = _sequence(c, n)
    seen = Counter(seq)
    # Each pick is uniform over two pods, independent of the last: the 199 neighbour pairs are equal
    # with p = 1/2 each, so repeats ~ Binomial(199, 1/2) (mean 99.5, sd 7.05). Fewer than 50 is 7 sd
    # below the mean (Hoeffding: P < exp(-2 * 49.5^2 / 199) < 2e-11); round robin gives 0. Each pod's
    # share ~ Binomial(200, 1/2): below 50 has P < exp(-2 * 50^2 / 200) < 2e-11.
    print(f"random: {dict(seen)}, {repeats(seq)} repeats in {n}")
    assert repeats(seq) >= 50, seq[:40]
    assert min(seen["reviews-1"], seen["reviews-2"]) >= 50, seen
    assert_no_nacks(c)
