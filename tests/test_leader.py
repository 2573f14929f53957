"""Leader election (``trafficmgr.core.kube.leader``) and leader-gated writers (``core/kube/writer.py``),
against the project's API server (real HTTP, real Lease objects, the official client's election code).

The whole-process behaviour (three ``serve`` replicas, SIGKILL, Envoys, traffic) is
``tests/e2e/test_replicas_failover.py``; here each rule is pinned on its own, fast."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from trafficmgr import cli
from trafficmgr.apiserver import APIServer
from trafficmgr.core.contrib import ObjectStatus
from trafficmgr.core.kube.client import KubeClient, load_api_client
from trafficmgr.core.kube.events import COMPONENT, EventRecorder
from trafficmgr.core.kube.leader import TRANSITIONS, LeaderElector, check_timing
from trafficmgr.core.kube.status import StatusWriter
from trafficmgr.core.model import ObjectRef
from trafficmgr.testing.envoy import wait_for

TIMING = check_timing(3)  # retry 1 s, renew deadline 1.8 s: the shortest the official client allows


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[APIServer, Path]]:
    server = APIServer().start()
    kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
    try:
        yield server, kubeconfig
    finally:
        server.stop()


def _electors(kubeconfig: Path, n: int) -> list[LeaderElector]:
    return [LeaderElector(load_api_client(str(kubeconfig)), "tm", "default", f"r{i}", TIMING).start() for i in range(n)]


def _leaders(electors: list[LeaderElector]) -> list[LeaderElector]:
    return [e for e in electors if e.leading()]


def test_timing_defaults_and_bad_values() -> None:
    assert (check_timing(15).renew_deadline, check_timing(15).retry_period) == (10, 2)
    four = check_timing(4)
    assert four.retry_period == 1 and four.renew_deadline + four.retry_period < 4
    for bad, message in [((2,), "at least 3"), ((4.5,), "whole seconds"), ((10, None, 0.5), "at least 1 s"),
                         ((10, 1.1, 1), "must exceed 1.2 x"), ((10, 8, 2), "must be less than the lease duration")]:
        with pytest.raises(ValueError, match=message):
            check_timing(*bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(("args", "message"), [
    (["--lease-duration", "2"], "argument --lease-duration: 2 is less than 3"),
    (["--lease-duration", "10", "--lease-renew-deadline", "9"], "must be less than the lease duration (10s)"),
    (["--no-leader-election", "--lease-name", "x"], "--lease-name needs leader election (drop --no-leader-election)"),
    (["--lease-name", "Not_A_Name"], "--lease-name: 'Not_A_Name' is not a valid Lease name"),
    (["--lease-namespace", "a.b"], "--lease-namespace: 'a.b' is not a namespace name"),
    (["--replica-name", "two words"], "--replica-name 'two words': one word"),
])
def test_serve_refuses_bad_lease_options_in_one_line(capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    code = cli.main(["serve", "--kubeconfig", "/nonexistent", "--plugins", "", *args])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and message in err, err


def test_one_leader_then_another_when_it_dies_or_hands_over(api: tuple[APIServer, Path]) -> None:
    server, kubeconfig = api
    gained = TRANSITIONS.labels(change="gained")._value.get()
    electors = _electors(kubeconfig, 3)
    try:
        wait_for(lambda: _leaders(electors), 5, message="nobody leads")
        time.sleep(2 * TIMING.retry_period)
        (first,) = _leaders(electors)  # exactly one, and it stays
        assert server.store.get("leases", "tm", "default")["spec"]["holderIdentity"] == first.identity

        first.stop(release=False)  # as if SIGKILLed: the Lease stays until it expires
        died = time.monotonic()
        assert not first.leading()
        wait_for(lambda: _leaders(electors), TIMING.duration + 2 * TIMING.retry_period + 1.5,
                 message="nobody took over from a dead leader")
        took = time.monotonic() - died
        (second,) = _leaders(electors)
        assert second is not first and took >= TIMING.duration - TIMING.retry_period - 0.5, \
            f"took over after {took:.1f} s, before the Lease could have expired"

        second.stop()  # graceful: released, the last one takes it at its next retry
        handed = time.monotonic()
        wait_for(lambda: _leaders(electors), TIMING.retry_period + 1.5, message="the released Lease was not taken")
        assert time.monotonic() - handed < TIMING.duration, "a released Lease is taken before it would expire"
        (third,) = _leaders(electors)
        assert third not in (first, second)
        assert TRANSITIONS.labels(change="gained")._value.get() - gained == 3
    finally:
        for e in electors:
            e.stop()


def test_a_leader_that_cannot_renew_stops_writing_before_another_may_lead(api: tuple[APIServer, Path]) -> None:
    server, kubeconfig = api
    (elector,) = _electors(kubeconfig, 1)
    try:
        wait_for(elector.leading, 5, message="did not lead")
        server.stop()  # the API is gone: no renewal can succeed
        cut = time.monotonic()
        wait_for(lambda: not elector.leading(), TIMING.duration, message="still leading without the API")
        stopped_after = time.monotonic() - cut
        # The last renewal was at most one retry period before the cut; the Lease lasts TIMING.duration
        # from it, so the leader must be done before that: renew deadline (+ one retry period) < duration.
        # (The safety property: stepped down before another replica could take the Lease; the renew deadline
        # is the design, polling and a loaded machine add to it.)
        assert stopped_after < TIMING.duration, f"kept writing {stopped_after:.1f} s without the Lease"
    finally:
        elector.stop()


class Flag:
    def __init__(self) -> None:
        self.value = False

    def __call__(self) -> bool:
        return self.value


def _ref(obj: dict[str, Any], kind: str) -> ObjectRef:
    m = obj["metadata"]
    return ObjectRef(kind, m["namespace"], m["name"], m["uid"], m["resourceVersion"])


def test_writers_hold_as_followers_and_a_new_leader_writes_only_what_is_missing(api: tuple[APIServer, Path]) -> None:
    server, kubeconfig = api
    store = server.store
    kube = KubeClient(load_api_client(str(kubeconfig)))
    leading = Flag()
    events = EventRecorder(kube, leading=leading)
    status = StatusWriter(kube, leading=leading)
    events.start()
    status.start()
    try:
        svc = [store.create({"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"s{i}", "namespace": "default"},
                             "spec": {"ports": [{"port": 80}]}}) for i in range(2)]
        for i in range(2):
            store.create({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
                          "metadata": {"name": f"i{i}", "namespace": "default"}, "spec": {}})
        # What the old leader wrote before it died: the Event on s0 and the status of i0.
        store.create({"apiVersion": "v1", "kind": "Event", "metadata": {"name": "old", "namespace": "default"},
                      "involvedObject": {"kind": "Service", "namespace": "default", "name": "s0", "uid": svc[0]["metadata"]["uid"]},
                      "reason": "Bad", "message": "problem 0", "type": "Warning", "reportingComponent": COMPONENT})
        lb = {"loadBalancer": {"ingress": [{"ip": "10.0.0.1"}]}}
        store.patch("ingresses", "i0", {"status": lb}, "default", patch_type="merge", subresource="status")
        i0_version = store.get("ingresses", "i0", "default")["metadata"]["resourceVersion"]

        # A follower sees the same problems and builds the same statuses: it writes nothing.
        for i in range(2):
            events.warn(_ref(svc[i], "Service"), f"problem {i}", "Bad")
        paths = [f"/apis/networking.k8s.io/v1/namespaces/default/ingresses/i{i}" for i in range(2)]
        status.submit([ObjectStatus(p, lb, "1") for p in paths])
        time.sleep(0.5)
        assert [e["metadata"]["name"] for e in store.list("events", "default")["items"]] == ["old"]
        assert "status" not in store.get("ingresses", "i1", "default") or not store.get("ingresses", "i1", "default")["status"]
        assert (events.held, status.held) == (2, 2)

        # Leadership: the missing Event and status are written, the present ones are not written again.
        leading.value = True
        assert events.resume() + status.resume() == 4

        def done() -> bool:
            return (len(store.list("events", "default")["items"]) == 2
                    and bool((store.get("ingresses", "i1", "default").get("status") or {}).get("loadBalancer")))

        wait_for(done, 10, message="the new leader did not write what was missing")
        time.sleep(0.5)
        messages = sorted(e["message"] for e in store.list("events", "default")["items"])
        assert messages == ["problem 0", "problem 1"]
        assert store.get("ingresses", "i0", "default")["metadata"]["resourceVersion"] == i0_version, "i0 written again"
        assert [st.path for st in status.written] == [paths[1]]

        # Leadership lost: a new write is held, not written.
        leading.value = False
        events.warn(_ref(svc[1], "Service"), "problem 2", "Bad")
        time.sleep(0.5)
        assert len(store.list("events", "default")["items"]) == 2 and events.held == 1
    finally:
        events.stop()
        status.stop()
