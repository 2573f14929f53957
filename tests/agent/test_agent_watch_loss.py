"""The node agent across API server outages and watch loss (issue 17, reliability).

A real agent (``netns`` runtime: Envoy processes as uid 1337 in pod network namespaces made with
``ip netns``, iptables capture) runs sidecars for the pods of its node while its watches are broken:

1. the API server stops and starts again on the same port with the same store (the history kept, so
   the watches resume from their resourceVersion); changes are made while it is down;
2. the watches are dropped and the history expired in one step, with changes made in between that no
   watch sees: the reconnecting watches get ``ERROR 410 Expired`` and must relist;
3. a restart whose history is gone (every old resourceVersion 410), with a deletion made while down.

After each: no sidecar lost (the ones whose pods did not change keep their id and Envoy pid), no pod has
two sidecars, the capture rules of the untouched pods are the very same, every annotation names the
pod's sidecar (or is ``""`` once it was removed), the changes made during the outage are applied, and
each pod's traffic goes through its sidecar.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator

import pytest

from tests.agent.manifests import SERVICES, WORKLOAD, pod
from tests.agent.rig import Cluster, capture_rules, captured
from trafficmgr.apiserver import APIServer
from trafficmgr.core.agent import iptables
from trafficmgr.core.agent.netns_runtime import ProcessRuntime
from trafficmgr.testing.backends import HttpBackend
from trafficmgr.testing.envoy import wait_for
from trafficmgr.testing.netns import NetNS

# 10.244.93.0/24 (pods of this node) and 10.244.94.0/24: addresses no other test uses (the runtime finds
# a pod's namespace by its IP). Each pod's namespace also holds a reviews backend on REVIEWS_IP.
PODS = {"web-a": "10.244.93.2", "web-b": "10.244.93.3", "web-c": "10.244.93.4", "web-d": "10.244.93.5"}
REVIEWS_IP, BLOCKED_IP = "10.244.94.11", "10.244.94.12"


@pytest.fixture
def pods(cluster: Cluster) -> Iterator[dict[str, NetNS]]:
    nets: dict[str, NetNS] = {}
    backends: list[HttpBackend] = []
    try:
        for name, ip in PODS.items():
            ns = nets[name] = NetNS("tmwl")
            ns.add_pod_network([ip, REVIEWS_IP])
            backends.append(ns.in_ns(lambda name=name: HttpBackend(f"reviews-for-{name}", REVIEWS_IP, 9080).start()))
        cluster.apply(SERVICES.format(reviews_ip=REVIEWS_IP, blocked_ip=BLOCKED_IP))
        cluster.apply(WORKLOAD.format(app="web"))
        cluster.label("deployments", "web", {"traffic.envoy.enabled": "true"})
        for name, ip in PODS.items():
            cluster.apply(pod(f"{name}", "web", ip=ip))
        cluster.label("pods", "web-d", {"traffic.envoy.enabled": "false"})  # the Pod's label wins
        yield nets
    finally:
        for b in backends:
            b.stop()
        for ns in nets.values():
            ns.delete()


def curl(ns: NetNS, url: str) -> int:
    proc = ns.run("curl", "-sS", "-m", "3", "-o", "/dev/null", "-w", "%{http_code}", url, check=False)
    return int(proc.stdout or 0) if proc.returncode == 0 else 0


def sidecars(state_dir: str) -> dict[str, tuple[str, int]]:
    """pod name -> (sidecar id, Envoy pid); fails on a pod with two sidecars."""
    out: dict[str, tuple[str, int]] = {}
    for s in ProcessRuntime(state_dir).list():
        assert s.pod not in out, f"pod {s.pod} has two sidecars: {out[s.pod][0]} and {s.id}"
        assert s.running, f"sidecar {s.id} of {s.pod} is not running: {s.status}"
        with open(os.path.join(state_dir, s.id, "sidecar.json")) as f:
            out[s.pod] = (s.id, int(json.load(f)["pid"]))
    return out


def pending(cluster: Cluster, state_dir: str, nets: dict[str, NetNS], wanted: set[str]) -> str | None:
    """What is still missing for ``wanted`` pods to have their sidecar, annotation and rules and the
    others none (None: nothing)."""
    have = sidecars(state_dir)
    if set(have) != wanted:
        return f"sidecars of {sorted(have)}, wanted {sorted(wanted)}"
    for name in PODS:
        annotation = cluster.annotation(name) if cluster.pod(name) is not None else None
        if name in wanted:
            if annotation != have[name][0]:
                return f"{name}: annotation {annotation!r}, sidecar {have[name][0]}"
            if not captured(nets[name].path, inbound=True):
                return f"{name}: no capture rules"
        elif cluster.pod(name) is not None and annotation not in (None, ""):
            return f"{name}: annotation {annotation!r} without a sidecar"
        elif iptables.CHAIN in capture_rules(nets[name].path):
            return f"{name}: capture rules without a sidecar"
    return None


def converge(cluster: Cluster, state_dir: str, nets: dict[str, NetNS], wanted: set[str], what: str) -> None:
    """Wait until :func:`pending` is None; fail with what was still missing."""
    last: list[str | None] = [None]

    def done() -> bool:
        last[0] = pending(cluster, state_dir, nets, wanted)
        return last[0] is None

    try:
        wait_for(done, 30)
    except TimeoutError:
        raise AssertionError(f"{what}: {last[0]}") from None


def test_agent_survives_api_restarts_and_410_without_losing_or_doubling_sidecars(
        cluster: Cluster, pods: dict[str, NetNS]) -> None:
    nets = pods
    state_dir = tempfile.mkdtemp(prefix="tm-agent-state-")
    try:
        agent = cluster.agent(ProcessRuntime(state_dir))
        reviews_url = f"http://{cluster.cluster_ip('reviews')}:9080/r"
        wanted = {"web-a", "web-b", "web-c"}
        converge(cluster, state_dir, nets, wanted, "first sidecars not set up")
        for name in wanted:
            assert curl(nets[name], reviews_url) == 200, f"{name}: no traffic through its sidecar"
        first = sidecars(state_dir)
        rules = {name: capture_rules(nets[name].path) for name in wanted}

        # 1. The API server goes away (history kept); meanwhile web-c is disabled and web-d enabled.
        port, store = cluster.api.port, cluster.store
        cluster.api.stop()
        cluster.label("pods", "web-c", {"traffic.envoy.enabled": "false"})
        cluster.label("pods", "web-d", {"traffic.envoy.enabled": "true"})
        cluster.settle(agent)  # reconcile passes while the API is down (full resyncs included) ...
        time.sleep(2.5)
        assert sidecars(state_dir) == first, "the agent changed sidecars while it could not see the API"
        cluster.api = APIServer(port=port, store=store).start()
        wanted = {"web-a", "web-b", "web-d"}
        converge(cluster, state_dir, nets, wanted, "changes made during the API outage not applied")
        second = sidecars(state_dir)
        assert {k: second[k] for k in ("web-a", "web-b")} == {k: first[k] for k in ("web-a", "web-b")}, \
            "a sidecar was replaced though its pod did not change"
        assert cluster.annotation("web-c") == ""
        assert all(capture_rules(nets[name].path) == rules[name] for name in ("web-a", "web-b"))
        relists = {w.kind.plural: w.relists for w in agent.watchers}
        assert all(n == 1 for n in relists.values()), f"the history was kept: the watches resume, no relist: {relists}"

        # 2. 410: every watch dropped and the history expired at once, with changes no watch sees (web-b
        # deleted, web-c enabled again); the watches reconnect from their resourceVersion, get 410, relist.
        with store.lock:
            cluster.api.drop_watches()
            store.delete("pods", "web-b", "default")
            cluster.label("pods", "web-c", {"traffic.envoy.enabled": "true"})
            cluster.api.expire_history()
        wanted = {"web-a", "web-c", "web-d"}
        converge(cluster, state_dir, nets, wanted, "changes hidden by the 410 not applied")
        # (A watch still in its reconnect backoff from step 1 meets the 410 when it comes back.)
        try:
            wait_for(lambda: all(w.relists == 2 for w in agent.watchers), 15)
        except TimeoutError:
            raise AssertionError(f"every watch must relist once after the 410: "
                                 f"{ {w.kind.plural: w.relists for w in agent.watchers} }") from None
        third = sidecars(state_dir)
        assert {k: third[k] for k in ("web-a", "web-d")} == {k: second[k] for k in ("web-a", "web-d")}
        assert capture_rules(nets["web-a"].path) == rules["web-a"]
        assert iptables.CHAIN not in capture_rules(nets["web-b"].path), "the deleted pod's rules are left"

        # 3. A restart that lost the history (every old resourceVersion 410); web-d deleted meanwhile.
        cluster.api.stop()
        store.delete("pods", "web-d", "default")
        time.sleep(1.0)
        cluster.api = APIServer(port=port, store=store, fresh_window=True).start()
        wanted = {"web-a", "web-c"}
        converge(cluster, state_dir, nets, wanted, "the deletion made during the outage not applied")
        fourth = sidecars(state_dir)
        assert {k: fourth[k] for k in wanted} == {k: third[k] for k in wanted}
        assert capture_rules(nets["web-a"].path) == rules["web-a"]
        for name in wanted:
            assert curl(nets[name], reviews_url) == 200, f"{name}: no traffic through its sidecar at the end"
        for name in ("web-b", "web-d"):
            assert curl(nets[name], f"http://{REVIEWS_IP}:9080/r") == 200, f"{name}: direct traffic still captured"
    finally:
        for a in cluster.agents:  # stop the agent before removing its sidecars (it would start them again)
            a.stop()
        cluster.agents.clear()
        runtime = ProcessRuntime(state_dir)
        for s in runtime.list():
            runtime.remove(s)
        shutil.rmtree(state_dir, ignore_errors=True)
