"""Labels inherited through the owner chain from a StatefulSet and a DaemonSet, seen in traffic:

- ``traffic.endpoint.weight``: the workload is labeled with the real kubectl against the project's API
  server, the control plane watching it rebuilds, and the traffic a real sidecar Envoy sends to the
  Service's pods changes (LocalCluster: iptables redirect in a pod network namespace);
- ``traffic.envoy.enabled``: the node agent (netns runtime) gives the owned pod a sidecar, and the pod's
  own traffic goes through it."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from trafficmgr.testing.cluster import Kubectl, LocalCluster
from trafficmgr.testing.envoy import no_nacks
from trafficmgr.testing.manifests import service
from trafficmgr.testing.netns import require as _require_netns
from trafficmgr.testing.prereq import missing

PODS = {"shop-web-0": "10.244.0.11", "shop-node-x7k2p": "10.244.0.12", "shop-bare": "10.244.0.13"}
WORKLOADS = """
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: shop-web, namespace: default, uid: uid-sts}
spec:
  serviceName: shop
  selector: {matchLabels: {app: shop, tier: web}}
  template:
    metadata: {labels: {app: shop, tier: web}}
    spec: {containers: [{name: app, image: shop}]}
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: shop-node, namespace: default, uid: uid-ds}
spec:
  selector: {matchLabels: {app: shop, tier: node}}
  template:
    metadata: {labels: {app: shop, tier: node}}
    spec: {containers: [{name: app, image: shop}]}
"""


def _pod(name: str, ip: str, tier: str, owner: tuple[str, str, str] | None) -> str:
    meta: dict[str, object] = {"name": name, "namespace": "default", "labels": {"app": "shop", "tier": tier}}
    if owner:
        kind, oname, uid = owner
        meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": kind, "name": oname, "uid": uid, "controller": True}]
    spec = {"nodeName": "node-1", "containers": [{"name": "app", "image": "shop"}]}
    status = {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}
    return f"apiVersion: v1\nkind: Pod\nmetadata: {json.dumps(meta)}\nspec: {json.dumps(spec)}\nstatus: {json.dumps(status)}\n"


MANIFESTS = "---\n".join([
    service("shop"), WORKLOADS,
    _pod("shop-web-0", PODS["shop-web-0"], "web", ("StatefulSet", "shop-web", "uid-sts")),
    _pod("shop-node-x7k2p", PODS["shop-node-x7k2p"], "node", ("DaemonSet", "shop-node", "uid-ds")),
    _pod("shop-bare", PODS["shop-bare"], "bare", None),
])


@pytest.fixture
def shop(envoy_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalCluster, Kubectl]]:
    _require_netns()
    if shutil.which("kubectl") is None:
        missing("kubectl is not installed (.ci/run installs it)")
    with LocalCluster(list(PODS.values())) as c:
        for name, ip in PODS.items():
            c.backend(name, ip, 9080)
        c.apply(MANIFESTS)
        yield c, Kubectl(c.kubeconfig, tmp_path_factory.mktemp("kubehome"))


def _spread(c: LocalCluster, n: int = 60) -> Counter[str]:
    assert c.pod is not None
    answers = c.pod.get_many(c.cluster_ip("shop"), 9080, "shop:9080", n, "/")
    assert {status for status, _ in answers} == {200}, answers[:2]
    return Counter(json.loads(body)["backend"] for _, body in answers)


def _endpoints(c: LocalCluster) -> set[str]:
    """Pod IPs in the sidecar's endpoints of the shop cluster."""
    assert c.pod is not None
    return {ip for ip in PODS.values() if f"9080|default|shop.outbound::{ip}:9080::" in c.pod.admin("/clusters")}


def _weights(c: LocalCluster) -> Counter[int]:
    """Endpoint weights in the sidecar's assignment of the shop cluster: {weight: how many}."""
    assert c.pod is not None
    dump = json.loads(c.pod.admin("/config_dump?include_eds"))
    out: Counter[int] = Counter()
    for section in dump["configs"]:
        for item in section.get("dynamic_endpoint_configs", []):
            cla = item.get("endpoint_config", {})
            if cla.get("cluster_name") == "9080|default|shop.outbound":
                for loc in cla.get("endpoints", []):
                    out.update(int(lb.get("load_balancing_weight", 1)) for lb in loc.get("lb_endpoints", []))
    return out


def test_statefulset_and_daemonset_labels_change_their_pods_traffic(shop: tuple[LocalCluster, Kubectl]) -> None:
    c, kubectl = shop
    c.wait_config(lambda: _endpoints(c) == set(PODS.values()), message="three endpoints expected")
    # Round robin over three pods, weight 100 each: 20 requests each.
    assert _spread(c) == Counter(dict.fromkeys(PODS, 20))
    # A StatefulSet label reaches its pod: weight 0 removes shop-web-0 from the endpoints.
    kubectl("label", "statefulset", "shop-web", "traffic.endpoint.weight=0")
    c.wait_config(lambda: PODS["shop-web-0"] not in _endpoints(c), message="StatefulSet weight 0 not inherited")
    assert _spread(c) == Counter({"shop-node-x7k2p": 30, "shop-bare": 30})
    # A DaemonSet label reaches its pod: weight 10 against the bare pod's default 100.
    kubectl("label", "daemonset", "shop-node", "traffic.endpoint.weight=10")
    c.wait_config(lambda: _weights(c) == {100: 1, 10: 1}, message="DaemonSet weight 10 not inherited")
    seen = _spread(c, 110)
    # Envoy's weighted round robin with one client: 10 of every 110 requests (measured exactly; +-3 for
    # where the schedule starts).
    assert abs(seen["shop-node-x7k2p"] - 10) <= 3 and seen["shop-web-0"] == 0, seen
    # The pod's own label wins over its workload's.
    kubectl("label", "pod", "shop-node-x7k2p", "traffic.endpoint.weight=100")
    c.wait_config(lambda: _weights(c) == {100: 2}, message="the pod label must win")
    assert _spread(c) == Counter({"shop-node-x7k2p": 30, "shop-bare": 30})
    # Removing the StatefulSet's label brings its pod back.
    kubectl("label", "statefulset", "shop-web", "traffic.endpoint.weight-")
    c.wait_config(lambda: _endpoints(c) == set(PODS.values()), message="StatefulSet label removal not applied")
    assert _spread(c) == Counter(dict.fromkeys(PODS, 20))
    no_nacks(c.xds.status())


# -- traffic.envoy.enabled from a StatefulSet / DaemonSet: the node agent gives the pod a sidecar ----------

# 10.244.97.0/24: used by no other test (the agent's netns runtime finds a pod's namespace by its IP).
STS_IP, DS_IP, REVIEWS_IP, BLOCKED_IP = "10.244.97.2", "10.244.97.3", "10.244.97.11", "10.244.97.12"
AGENT_OBJECTS = f"""
apiVersion: v1
kind: Service
metadata: {{name: reviews, labels: {{traffic.port.9080: http}}}}
spec: {{selector: {{app: reviews}}, ports: [{{name: http, port: 9080}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: blocked}}
spec: {{selector: {{app: blocked}}, ports: [{{name: http, port: 9090}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: reviews-1, labels: {{app: reviews}}}}
spec: {{nodeName: node-2, containers: [{{name: app, image: reviews}}]}}
status: {{podIP: {REVIEWS_IP}, conditions: [{{type: Ready, status: "True"}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: blocked-1, labels: {{app: blocked}}}}
spec: {{nodeName: node-2, containers: [{{name: app, image: blocked}}]}}
status: {{podIP: {BLOCKED_IP}, conditions: [{{type: Ready, status: "True"}}]}}
"""

AGENT_WORKLOADS = """
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db, namespace: default, uid: uid-sts}
spec:
  serviceName: db
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec: {containers: [{name: app, image: db}]}
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: logd, namespace: default, uid: uid-ds}
spec:
  selector: {matchLabels: {app: logd}}
  template:
    metadata: {labels: {app: logd}}
    spec: {containers: [{name: app, image: logd}]}
"""


def _agent_pod(name: str, ip: str, kind: str, owner: str, uid: str) -> str:
    meta = {"name": name, "namespace": "default", "labels": {"app": owner},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": kind, "name": owner, "uid": uid, "controller": True}]}
    spec = {"nodeName": "node-1", "containers": [{"name": "app", "image": owner}]}
    status = {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}
    return f"apiVersion: v1\nkind: Pod\nmetadata: {json.dumps(meta)}\nspec: {json.dumps(spec)}\nstatus: {json.dumps(status)}\n"


def _curl(ns: Any, url: str) -> tuple[int, str]:
    proc = ns.run("curl", "-sS", "-m", "3", "-o", "-", "-w", "\n%{http_code}", url, check=False)
    if proc.returncode != 0:
        return 0, proc.stderr.strip()
    body, _, code = proc.stdout.rpartition("\n")
    return int(code or 0), body


def test_envoy_enabled_on_statefulset_and_daemonset_gives_their_pods_a_sidecar(envoy_binary: str) -> None:
    """``traffic.envoy.enabled=true`` on the workload: the agent (netns runtime) starts a sidecar for the
    pod it owns and captures its traffic, so a request to an unlabeled port now gets the sidecar's 404 and
    a labeled Service is reached through Envoy; removing the label gives the pod its direct traffic back."""
    import tempfile

    from tests.agent.rig import Cluster
    from trafficmgr.core.agent.netns_runtime import ProcessRuntime
    from trafficmgr.testing.backends import HttpBackend
    from trafficmgr.testing.envoy import wait_for
    from trafficmgr.testing.netns import NetNS

    _require_netns()
    cluster = Cluster()
    nets: dict[str, NetNS] = {}
    backends: list[HttpBackend] = []
    state_dir = tempfile.mkdtemp(prefix="tm-inherit-")
    try:
        for name, ip in (("db-0", STS_IP), ("logd-x2f9q", DS_IP)):
            nets[name] = NetNS("tminh")
            nets[name].add_pod_network([ip, REVIEWS_IP, BLOCKED_IP])
            backends.append(nets[name].in_ns(lambda: HttpBackend("reviews-1", REVIEWS_IP, 9080).start()))
            backends.append(nets[name].in_ns(lambda: HttpBackend("blocked-1", BLOCKED_IP, 9090).start()))
        cluster.apply(AGENT_OBJECTS)
        cluster.apply(AGENT_WORKLOADS)
        cluster.apply(_agent_pod("db-0", STS_IP, "StatefulSet", "db", "uid-sts"))
        cluster.apply(_agent_pod("logd-x2f9q", DS_IP, "DaemonSet", "logd", "uid-ds"))
        runtime = ProcessRuntime(state_dir)
        agent = cluster.agent(runtime)
        cluster.settle(agent)
        blocked_url = f"http://{cluster.cluster_ip('blocked')}:9090/"
        reviews_url = f"http://{cluster.cluster_ip('reviews')}:9080/r"
        for name, ns in nets.items():
            assert cluster.annotation(name) is None and runtime.list() == []
            assert _curl(ns, blocked_url)[0] == 0, f"{name}: no sidecar, no kube-proxy: a ClusterIP leads nowhere"

        for kind, owner, name in (("statefulsets", "db", "db-0"), ("daemonsets", "logd", "logd-x2f9q")):
            cluster.label(kind, owner, {"traffic.envoy.enabled": "true"})
            wait_for(lambda name=name: cluster.annotation(name), 20, message=f"{kind} label not inherited by {name}")
            ns = nets[name]
            code, body = wait_for(lambda ns=ns: (r := _curl(ns, blocked_url))[0] and r, 10, message="no answer through the sidecar")
            assert code == 404 and "port not enabled" in body, (name, code, body)
            assert _curl(ns, reviews_url)[0] == 200, f"{name}: the labeled Service through its sidecar"
        assert sorted(s.pod for s in runtime.list()) == ["db-0", "logd-x2f9q"]
        assert all(b.hits == 0 for b in backends if b.name == "blocked-1")

        # Removing the workload's label removes the sidecar: the pod's traffic is direct again.
        cluster.label("statefulsets", "db", {"traffic.envoy.enabled": None})
        wait_for(lambda: cluster.annotation("db-0") == "", 20, message="sidecar of db-0 not removed")
        assert _curl(nets["db-0"], f"http://{BLOCKED_IP}:9090/")[0] == 200, "direct traffic is not captured any more"
        assert [s.pod for s in runtime.list()] == ["logd-x2f9q"]
    finally:
        cluster.close()
        leftover = ProcessRuntime(state_dir)  # the agent leaves sidecars running when it stops (adoption)
        for sidecar in leftover.list():
            leftover.remove(sidecar)
        for b in backends:
            b.stop()
        for ns in nets.values():
            ns.delete()
        shutil.rmtree(state_dir, ignore_errors=True)
