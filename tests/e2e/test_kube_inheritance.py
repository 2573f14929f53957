"""Labels inherited through the owner chain from a StatefulSet and a DaemonSet: the workload is labeled
with the real kubectl against the project's API server, the control plane watching it rebuilds, and the
traffic a real sidecar Envoy sends to the Service's pods changes (LocalCluster: iptables redirect in a
pod network namespace)."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Iterator

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
