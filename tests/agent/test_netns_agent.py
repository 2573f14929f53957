"""The agent with the ``netns`` runtime (any container runtime): a pod network namespace made with
``ip netns``, found by the pod IP; Envoy runs there as a process (uid 1337) behind the iptables rules."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator

import pytest

from tests.agent.manifests import SERVICES, WORKLOAD, pod
from tests.agent.rig import Cluster, capture_rules, captured
from trafficmgr.core.agent import iptables
from trafficmgr.core.agent.netns_runtime import ProcessRuntime
from trafficmgr.testing.backends import HttpBackend
from trafficmgr.testing.envoy import wait_for
from trafficmgr.testing.netns import NetNS

# 10.244.77.0/24: addresses no other test uses (the runtime finds namespaces by pod IP).
APP_IP, REVIEWS_IP, BLOCKED_IP = "10.244.77.2", "10.244.77.11", "10.244.77.12"


@pytest.fixture
def podnet(cluster: Cluster) -> Iterator[tuple[NetNS, list[HttpBackend]]]:
    ns = NetNS("tmagent")
    backends: list[HttpBackend] = []
    try:
        ns.add_pod_network([APP_IP, REVIEWS_IP, BLOCKED_IP])
        backends.append(ns.in_ns(lambda: HttpBackend("reviews-1", REVIEWS_IP, 9080).start()))
        backends.append(ns.in_ns(lambda: HttpBackend("blocked-1", BLOCKED_IP, 9090).start()))
        cluster.apply(SERVICES.format(reviews_ip=REVIEWS_IP, blocked_ip=BLOCKED_IP))
        cluster.apply(WORKLOAD.format(app="web"))
        yield ns, backends
    finally:
        for b in backends:
            b.stop()
        ns.delete()


def curl(ns: NetNS, url: str) -> tuple[int, str]:
    proc = ns.run("curl", "-sS", "-m", "3", "-o", "-", "-w", "\n%{http_code}", url, check=False)
    if proc.returncode != 0:
        return 0, proc.stderr.strip()
    body, _, code = proc.stdout.rpartition("\n")
    return int(code or 0), body


def envoy_stat(ns: NetNS, name: str) -> int:
    from trafficmgr.testing.cluster import http_get

    # Envoy admin: 127.0.0.1:15000 inside the pod's namespace (8900 on the pod IP serves only /stats/prometheus)
    text = ns.in_ns(lambda: http_get(f"http://127.0.0.1:15000/stats?filter=^{name.replace('|', '.')}$", 3)[1])
    for line in text.splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    return 0


def test_netns_runtime_enable_capture_adopt_disable(cluster: Cluster, podnet: tuple[NetNS, list[HttpBackend]]) -> None:
    ns, (reviews, blocked) = podnet
    state_dir = tempfile.mkdtemp(prefix="tm-agent-state-")
    runtime = ProcessRuntime(state_dir)
    agent = cluster.agent(runtime)
    reviews_url = f"http://{cluster.cluster_ip('reviews')}:9080/r"

    # An enabled pod without an IP yet: the agent waits (no sidecar, no Event), then acts on the IP.
    cluster.apply(pod("web-6c9f-x1", "web", ip=None))
    cluster.label("deployments", "web", {"traffic.envoy.enabled": "true"})
    cluster.apply(pod("elsewhere", "web", ip="10.244.78.9", node="node-2"))  # another node's pod: not ours
    # A pod of this node whose network never shows up: retried with backoff, never blocks the others,
    # reported as a Warning Event once it has waited a while (5 attempts: 0.2+0.4+0.8+1+1 s here).
    cluster.apply(pod("web-6c9f-nonet", "web", ip="10.244.77.99"))
    cluster.settle(agent)
    assert runtime.list() == [] and cluster.events("web-6c9f-x1") == []
    cluster.store.patch("pods", "web-6c9f-x1", {"status": {"podIP": APP_IP, "phase": "Running"}}, "default",
                        patch_type="merge", subresource="status")

    sidecar_id = wait_for(lambda: cluster.annotation("web-6c9f-x1"), 15, message="annotation not set")
    [sidecar] = runtime.list()
    assert sidecar.id == sidecar_id and sidecar.pod == "web-6c9f-x1" and sidecar.running
    assert cluster.annotation("elsewhere") is None
    state = json.load(open(os.path.join(state_dir, sidecar_id, "sidecar.json")))
    assert state["netns"] == ns.path
    assert captured(ns.path, inbound=True) and "--uid-owner 1337" in capture_rules(ns.path)
    assert f"-A PREROUTING -p tcp -j {iptables.INBOUND_CHAIN}" in capture_rules(ns.path), "connections to the pod are captured"
    assert "--to-ports 15006" in capture_rules(ns.path)
    with open(f"/proc/{state['pid']}/status") as f:
        uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
    assert set(uids) == {"1337"}, "Envoy runs as the proxy uid"

    # The app's requests to the labeled service go through Envoy; the unlabeled port is blocked.
    # (That capture waits for a LIVE sidecar is shown by test_wait_live_probes_envoy_ready_... below.)
    assert curl(ns, reviews_url)[0] == 200, "the first request after the annotation was refused"
    before = envoy_stat(ns, "cluster.9080|default|reviews.outbound.upstream_rq_completed")
    for _ in range(3):
        assert curl(ns, reviews_url)[0] == 200
    assert envoy_stat(ns, "cluster.9080|default|reviews.outbound.upstream_rq_completed") == before + 3
    code, body = curl(ns, f"http://{cluster.cluster_ip('blocked')}:9090/")
    assert code == 404 and "port not enabled" in body and blocked.hits == 0

    waiting = wait_for(lambda: cluster.events("web-6c9f-nonet"), 15, message="no Event for the pod without network")
    assert waiting[0]["reason"] == "SidecarWaiting" and "10.244.77.99" in waiting[0]["message"]
    assert cluster.annotation("web-6c9f-nonet") is None and len(runtime.list()) == 1

    # A restarted agent adopts the running sidecar (same id and pid, no second Envoy).
    agent.stop()
    agent2 = cluster.agent(ProcessRuntime(state_dir))
    cluster.settle(agent2)
    [again] = ProcessRuntime(state_dir).list()
    assert again.id == sidecar_id and again.running
    assert json.load(open(os.path.join(state_dir, sidecar_id, "sidecar.json")))["pid"] == state["pid"]

    # Disabling on the Pod wins over the Deployment: rules gone first, then Envoy, then the annotation.
    cluster.label("pods", "web-6c9f-x1", {"traffic.envoy.enabled": "false"})
    wait_for(lambda: cluster.annotation("web-6c9f-x1") == "", 15, message="annotation not cleared")
    assert ProcessRuntime(state_dir).list() == [] and os.listdir(state_dir) == []
    assert not os.path.exists(f"/proc/{state['pid']}") or state["id"].encode() not in open(f"/proc/{state['pid']}/cmdline", "rb").read()
    assert iptables.CHAIN not in capture_rules(ns.path) and iptables.INBOUND_CHAIN not in capture_rules(ns.path)
    assert curl(ns, reviews_url)[0] == 0, "without the sidecar a ClusterIP leads nowhere"
    assert curl(ns, f"http://{REVIEWS_IP}:9080/r")[0] == 200, "direct traffic is not redirected any more"
    os.rmdir(state_dir)


def test_netns_runtime_orphan_and_pod_deletion(cluster: Cluster, podnet: tuple[NetNS, list[HttpBackend]]) -> None:
    ns, _ = podnet
    state_dir = tempfile.mkdtemp(prefix="tm-agent-state-")
    cluster.apply(pod("web-6c9f-x2", "web", ip=APP_IP))
    cluster.label("deployments", "web", {"traffic.envoy.enabled": "true"})
    agent = cluster.agent(ProcessRuntime(state_dir))
    sidecar_id = wait_for(lambda: cluster.annotation("web-6c9f-x2"), 15)
    agent.stop()

    # While no agent runs the pod is deleted: the next agent finds an orphan and removes it and its rules.
    cluster.store.delete("pods", "web-6c9f-x2", "default")
    assert [s.id for s in ProcessRuntime(state_dir).list()] == [sidecar_id]
    cluster.agent(ProcessRuntime(state_dir))
    wait_for(lambda: ProcessRuntime(state_dir).list() == [], 15, message="orphan not removed")
    assert iptables.CHAIN not in capture_rules(ns.path) and os.listdir(state_dir) == []
    os.rmdir(state_dir)


def test_wait_live_probes_envoy_ready_inside_the_pod_namespace() -> None:
    """The agent captures a pod's traffic only once its sidecar says LIVE (inside the pod's netns)."""
    from trafficmgr.apps.text_response import TextResponseServer
    from trafficmgr.core.agent.agent import wait_live
    from trafficmgr.testing.netns import NetNS, require

    require()
    with NetNS("tmlive") as ns:
        ns.add_pod_network(["10.244.9.9"])
        assert wait_live(ns.path, "10.244.9.9", 8900, 0.5) is False  # nothing answers yet
        app = ns.in_ns(lambda: TextResponseServer("PRE_INITIALIZING", "10.244.9.9", 8900).start())
        try:
            assert wait_live(ns.path, "10.244.9.9", 8900, 0.5) is False
            app.body = "LIVE\n"
            assert wait_live(ns.path, "10.244.9.9", 8900, 2.0) is True
        finally:
            app.stop()
