"""Pods whose traffic a sidecar could not capture get none, and say why (issue 16, item 7): a pod running
as the proxy's uid, a hostNetwork pod (nothing may touch the node's namespace), and a pod IP held by two
network namespaces (the netns runtime does not guess). Real namespaces, real iptables, real Envoy; the
pure checks are unit-tested in ``test_eligibility.py``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.agent.manifests import SERVICES, WORKLOAD, pod
from tests.agent.rig import DOCKER_HOST, Cluster, capture_rules, captured
from trafficmgr.core.agent import iptables
from trafficmgr.core.agent.netns_runtime import ProcessRuntime
from trafficmgr.core.agent.runtime import AmbiguousNetwork, PodRef, SidecarError, netns_identity
from trafficmgr.testing.backends import HttpBackend
from trafficmgr.testing.envoy import wait_for
from trafficmgr.testing.netns import NetNS

# 10.244.66.0/24: used by no other test (the netns runtime finds namespaces by pod IP).
APP_IP, OTHER_IP, REVIEWS_IP, BLOCKED_IP = "10.244.66.2", "10.244.66.3", "10.244.66.11", "10.244.66.12"


def pod_yaml(name: str, ip: str, spec: dict[str, Any] | None = None, **container_sc: Any) -> str:
    """A pod of the Deployment ``web`` on the agent's node, with ``spec`` fields and a container
    securityContext added."""
    obj = yaml.safe_load(pod(name, "web", ip))
    obj["spec"].update(spec or {})
    if container_sc:
        obj["spec"]["containers"][0]["securityContext"] = container_sc
    return yaml.safe_dump(obj)


@pytest.fixture
def state_dir(cluster: Cluster) -> Iterator[str]:
    """The netns runtime's state directory; at the end the agents stop and every sidecar is removed."""
    path = tempfile.mkdtemp(prefix="tm-agent-state-")
    try:
        yield path
    finally:
        while cluster.agents:
            cluster.agents.pop().stop()
        runtime = ProcessRuntime(path)
        for s in runtime.list():
            runtime.remove(s)
        shutil.rmtree(path, ignore_errors=True)


def enable_web(cluster: Cluster) -> None:
    cluster.apply(WORKLOAD.format(app="web"))
    cluster.label("deployments", "web", {"traffic.envoy.enabled": "true"})


def failed_event(cluster: Cluster, name: str) -> str:
    """The message of the one ``SidecarFailed`` Event on pod ``name`` (waits for it)."""
    events = wait_for(lambda: [e for e in cluster.events(name) if e["reason"] == "SidecarFailed"], 15,
                      message=f"no SidecarFailed Event on {name}")
    assert len(events) == 1, events
    return str(events[0]["message"])


def node_rules() -> str:
    """The node's (this test process's namespace's) nat rules and ip6tables filter rules."""
    run = iptables.netns_runner(None)
    return iptables.dump(run) + iptables.dump6(run)


def node_address() -> str:
    """An IPv4 address of the node's own namespace (what a hostNetwork pod has as its pod IP)."""
    out = subprocess.run(["ip", "-o", "-4", "addr", "show", "scope", "global"], capture_output=True, text=True,
                         check=True).stdout
    addresses = [line.split()[3].split("/")[0] for line in out.splitlines()]
    return addresses[0] if addresses else "127.0.0.1"


def test_a_pod_running_as_the_proxy_uid_gets_no_sidecar(cluster: Cluster, state_dir: str) -> None:
    """Its connections would match the capture's exemption for the proxy's uid: no sidecar, an Event
    naming the container, the uid and the fix; another pod of the node is served as usual."""
    with NetNS("tmuid") as refused_ns, NetNS("tmuid") as other_ns:
        refused_ns.add_pod_network([APP_IP])
        other_ns.add_pod_network([OTHER_IP])
        enable_web(cluster)
        cluster.apply(pod_yaml("web-uid", APP_IP, runAsUser=1337))
        cluster.apply(pod_yaml("web-ok", OTHER_IP, {"securityContext": {"runAsUser": 1000, "fsGroup": 2000}}))
        runtime = ProcessRuntime(state_dir)
        agent = cluster.agent(runtime)

        wait_for(lambda: cluster.annotation("web-ok"), 20, message="the eligible pod got no sidecar")
        message = failed_event(cluster, "web-uid")
        assert "container app runs as uid 1337 (securityContext.runAsUser), the proxy's own uid" in message
        assert "its traffic would bypass the sidecar" in message and "--proxy-uid" in message
        cluster.settle(agent, 3)  # later passes change nothing and record no second Event
        failed_event(cluster, "web-uid")
        assert [s.pod for s in runtime.list()] == ["web-ok"]
        assert cluster.annotation("web-uid") is None
        assert iptables.CHAIN not in capture_rules(refused_ns.path)
        assert captured(other_ns.path)
        for s in runtime.list():
            runtime.remove(s)


def test_a_host_network_pod_gets_no_sidecar_and_the_node_no_rules(cluster: Cluster, state_dir: str) -> None:
    """A hostNetwork pod's namespace is the node's: no sidecar, an Event, the node's iptables unchanged.
    The node's namespace is even given a name under /var/run/netns (as ``ip netns attach`` does), so the
    netns runtime finds the pod IP there: the runtime refuses it on its own too."""
    ip = node_address()
    before = node_rules()
    name = f"tmnode-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "attach", name, str(os.getpid())], check=True, capture_output=True)
    try:
        path = f"/var/run/netns/{name}"
        assert netns_identity(path) == netns_identity("/proc/self/ns/net")
        runtime = ProcessRuntime(state_dir)
        with pytest.raises(SidecarError, match="is the node's"):
            runtime.pod_network(PodRef("web-host", "default", "u-host", ip))

        enable_web(cluster)
        cluster.apply(pod_yaml("web-host", ip, {"hostNetwork": True}))
        agent = cluster.agent(runtime)
        message = failed_event(cluster, "web-host")
        assert "hostNetwork: true" in message and "the whole node's traffic" in message
        cluster.settle(agent, 3)
        assert runtime.list() == [] and cluster.annotation("web-host") is None
        assert iptables.CHAIN not in node_rules() and node_rules() == before
    finally:
        # Only removes the name (unmounts it): the node's namespace itself lives on. (Not NetNS.delete,
        # which kills the processes of the namespace.)
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)


def test_two_namespaces_with_the_pod_ip_are_refused_and_one_is_used(cluster: Cluster, state_dir: str) -> None:
    """An old sandbox still holding the pod IP: no sidecar (in either), an Event naming both; once the
    old namespace is gone the sidecar starts in the pod's namespace and captures its traffic."""
    old = NetNS("tmaold")  # sorts first: the old code took the first namespace holding the IP
    new = NetNS("tmbnew")
    backends: list[HttpBackend] = []
    try:
        old.add_pod_network([APP_IP])
        new.add_pod_network([APP_IP, REVIEWS_IP, BLOCKED_IP])
        backends.append(new.in_ns(lambda: HttpBackend("reviews-1", REVIEWS_IP, 9080).start()))
        cluster.apply(SERVICES.format(reviews_ip=REVIEWS_IP, blocked_ip=BLOCKED_IP))
        enable_web(cluster)
        cluster.apply(pod_yaml("web-twice", APP_IP))
        runtime = ProcessRuntime(state_dir)
        agent = cluster.agent(runtime)

        message = failed_event(cluster, "web-twice")
        assert f"2 network namespaces hold the pod IP {APP_IP}" in message
        assert old.path in message and new.path in message
        cluster.settle(agent, 3)
        assert runtime.list() == [] and cluster.annotation("web-twice") is None
        assert iptables.CHAIN not in capture_rules(old.path) + capture_rules(new.path)
        with pytest.raises(AmbiguousNetwork):
            runtime.pod_network(PodRef("web-twice", "default", "u", APP_IP))

        old.delete()  # the old sandbox is torn down: the next retry (backoff at most 1 s here) proceeds
        sidecar_id = wait_for(lambda: cluster.annotation("web-twice"), 20, message="no sidecar once unique")
        with open(os.path.join(state_dir, sidecar_id, "sidecar.json"), encoding="utf-8") as f:
            assert json.load(f)["netns"] == new.path
        assert captured(new.path, inbound=True)
        url = f"http://{cluster.cluster_ip('reviews')}:9080/r"
        proc = wait_for(lambda: (p := new.run("curl", "-sS", "-m", "3", "-o", "/dev/null", "-w", "%{http_code}", url,
                                              check=False)).stdout == "200" and p, 10,
                        message="the captured request did not reach reviews through the sidecar")
        assert proc.returncode == 0 and backends[0].hits >= 1
    finally:
        for b in backends:
            b.stop()
        old.delete()
        new.delete()


def test_the_docker_runtime_refuses_a_host_network_pause_container(cluster: Cluster, docker_api: Any) -> None:
    """The docker runtime's own guard (behind the agent's check of the Pod spec): a pause container with
    ``network_mode=host`` is never the pod's network; the agent records an Event, starts no container
    and leaves the node's iptables as they were."""
    from trafficmgr.core.agent.docker_runtime import DockerRuntime
    from trafficmgr.testing.images import busybox_image

    ip = node_address()
    before = node_rules()
    enable_web(cluster)
    cluster.apply(pod_yaml("web-hostd", ip, {"hostNetwork": True}))
    uid = cluster.store.get("pods", "web-hostd", "default")["metadata"]["uid"]
    labels = {"io.kubernetes.pod.name": "web-hostd", "io.kubernetes.pod.namespace": "default",
              "io.kubernetes.pod.uid": uid, "io.kubernetes.docker.type": "podsandbox", "trafficmgr.test": "1"}
    pause = docker_api.create_container(busybox_image(docker_api), ["sleep", "3600"], labels=labels,
                                        name=f"k8s_POD_web-hostd_{uuid.uuid4().hex[:6]}",
                                        host_config=docker_api.create_host_config(network_mode="host"))["Id"]
    try:
        docker_api.start(pause)
        runtime = DockerRuntime(DOCKER_HOST, "no-image-needed")
        with pytest.raises(SidecarError, match="uses the node's network"):
            runtime.pod_network(PodRef("web-hostd", "default", uid, ip))
        agent = cluster.agent(runtime)
        assert "hostNetwork: true" in failed_event(cluster, "web-hostd")
        cluster.settle(agent, 3)
        assert runtime.list() == [] and cluster.annotation("web-hostd") is None
        assert node_rules() == before
    finally:
        docker_api.remove_container(pause, force=True)




#: Pod securityContexts and the ids (setpriv options) a container of such a pod runs with.
ID_CASES = [
    ({"runAsUser": 1000, "runAsGroup": 1000}, ["--reuid=1000", "--regid=1000", "--clear-groups"]),
    ({"runAsUser": 1337, "runAsGroup": 1000}, ["--reuid=1337", "--regid=1000", "--clear-groups"]),
    ({"runAsUser": 1000, "runAsGroup": 1337}, ["--reuid=1000", "--regid=1337", "--clear-groups"]),
    ({"runAsUser": 1000, "runAsGroup": 1000, "supplementalGroups": [1337]}, ["--reuid=1000", "--regid=1000", "--groups=1337"]),
    ({"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1337}, ["--reuid=1000", "--regid=1000", "--groups=1337"]),
    ({"runAsUser": 1000, "runAsGroup": 1000, "supplementalGroups": [4000]}, ["--reuid=1000", "--regid=1000", "--groups=4000"]),
]


def test_the_refusals_cover_exactly_the_ids_that_bypass_capture() -> None:
    """Against the agent's own rules in a namespace (no agent): for each pod securityContext, run a client
    with the ids a container of that pod gets, directly and, where it has supplementary groups, through a
    set-gid program of its group (which any member can make: ``chgrp`` + ``chmod g+s``). Where the
    connection lands tells whether it was captured (the "proxy" on the redirect port) or bypassed (the
    destination itself). A pod is refused exactly when one of its processes can bypass."""
    from trafficmgr.core.agent.eligibility import refusal
    from trafficmgr.testing.netns import require as require_netns

    require_netns()
    with NetNS("tmgid") as ns:
        ns.add_pod_network([REVIEWS_IP])
        iptables.install(iptables.netns_runner(ns.path), 10000, 1337, (), 0)
        proxy = ns.in_ns(lambda: HttpBackend("proxy", "127.0.0.1", 10000).start())
        direct = ns.in_ns(lambda: HttpBackend("reviews", REVIEWS_IP, 9080).start())
        workdir = tempfile.mkdtemp(prefix="tm-setgid-")  # pytest's tmp_path is not reachable for uid 1000
        os.chmod(workdir, 0o777)
        curl = shutil.which("curl") or "curl"
        fetch = f"-s -m 3 -o /dev/null http://{REVIEWS_IP}:9080/"

        def lands(ids: list[str], setgid: str | None = None) -> str:
            """Where the connection of a client with ``ids`` (run as a set-gid ``setgid`` program) lands."""
            before = (proxy.hits, direct.hits)
            program = curl
            if setgid is not None:
                program = f"{workdir}/curl-{setgid}"
                ns.run("setpriv", *ids, "sh", "-c", f"cp {curl} {program} && chgrp {setgid} {program} && chmod g+s {program}")
            ns.run("setpriv", *ids, "sh", "-c", f"{program} {fetch}")
            after = (proxy.hits, direct.hits)
            return "proxy" if after[0] > before[0] else "direct" if after[1] > before[1] else "nowhere"

        try:
            seen = []
            for sc, ids in ID_CASES:
                groups = [i.split("=")[1] for i in ids if i.startswith("--groups=")]
                outcomes = [lands(ids)] + [lands(ids, setgid=g) for g in groups]
                seen.append(outcomes)
                pod_obj = {"spec": {"securityContext": sc, "containers": [{"name": "app"}]}}
                assert ("direct" in outcomes) == (refusal(pod_obj, 1337) is not None), (sc, outcomes)
            # The facts themselves: the proxy's uid or primary gid bypass; membership alone does not, a
            # set-gid program of the group does; another group changes nothing.
            assert seen == [["proxy"], ["direct"], ["direct"], ["proxy", "direct"], ["proxy", "direct"], ["proxy", "proxy"]]
        finally:
            proxy.stop()
            direct.stop()
            shutil.rmtree(workdir, ignore_errors=True)
