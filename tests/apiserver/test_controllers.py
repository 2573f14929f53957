"""Built-in controllers: EndpointSlices, clusterIPs, Deployment -> ReplicaSet -> Pod."""

from __future__ import annotations

import pytest
from kubernetes import client

from trafficmgr.apiserver import APIServer
from trafficmgr.testing.envoy import wait_for

NS = "eps"


def _pod(name: str, ip: str | None, labels: dict, ready: bool = True, ports: list | None = None,
         node: str = "node-1") -> dict:
    status: dict = {"phase": "Running",
                    "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    if ip:
        status["podIP"] = ip
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS, "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x", "ports": ports or []}]},
            "status": status}


def _slices(server: APIServer, svc: str) -> list[dict]:
    return server.store.list("endpointslices", NS, label_selector=f"kubernetes.io/service-name={svc}")["items"]


def _endpoints(server: APIServer, svc: str) -> dict[str, tuple]:
    server.wait_idle()
    out = {}
    for s in _slices(server, svc):
        ports = tuple((p["name"], p["port"]) for p in s.get("ports") or [])
        for ep in s["endpoints"]:
            out[ep["targetRef"]["name"]] = (ep["addresses"][0], ep["conditions"]["ready"], ports)
    return out


@pytest.fixture(scope="module", autouse=True)
def namespace(server: APIServer) -> None:
    server.store.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})


def test_cluster_ip_allocation(server: APIServer) -> None:
    a = server.store.create({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ip-a", "namespace": NS},
                             "spec": {"ports": [{"port": 80}]}})
    b = server.store.create({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ip-b", "namespace": NS},
                             "spec": {"ports": [{"port": 80}]}})
    h = server.store.create({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ip-h", "namespace": NS},
                             "spec": {"clusterIP": "None", "selector": {"app": "h"}, "ports": [{"port": 80}]}})
    x = server.store.create({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ip-x", "namespace": NS},
                             "spec": {"type": "ExternalName", "externalName": "example.com"}})
    ips = [a["spec"]["clusterIP"], b["spec"]["clusterIP"]]
    assert all(ip.startswith("10.96.") for ip in ips) and ips[0] != ips[1]
    assert h["spec"]["clusterIP"] == "None"
    assert "clusterIP" not in x["spec"]
    updated = server.store.update({**a, "spec": {"ports": [{"port": 81}]}})
    assert updated["spec"]["clusterIP"] == ips[0]
    server.store.create(_pod("h-1", "10.0.0.9", {"app": "h"}))
    assert list(_endpoints(server, "ip-h")) == ["h-1"]
    assert _slices(server, "ip-a") == [] and _slices(server, "ip-x") == []


def test_endpointslice_readiness_and_pod_changes(server: APIServer) -> None:
    store = server.store
    store.create({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": NS},
                  "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})
    store.create(_pod("web-1", "10.0.0.1", {"app": "web"}, ready=True))
    store.create(_pod("web-2", "10.0.0.2", {"app": "web"}, ready=False))
    store.create(_pod("web-3", None, {"app": "web"}))
    store.create(_pod("other", "10.0.0.4", {"app": "other"}))
    assert _endpoints(server, "web") == {"web-1": ("10.0.0.1", True, (("http", 8080),)),
                                         "web-2": ("10.0.0.2", False, (("http", 8080),))}
    (s,) = _slices(server, "web")
    assert s["metadata"]["name"].startswith("web-")
    assert s["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"] == "endpointslice-controller.k8s.io"
    assert s["addressType"] == "IPv4"
    ep = next(e for e in s["endpoints"] if e["targetRef"]["name"] == "web-1")
    assert ep["conditions"] == {"ready": True, "serving": True, "terminating": False}
    assert ep["nodeName"] == "node-1" and ep["targetRef"]["kind"] == "Pod" and ep["targetRef"]["uid"]
    assert s["metadata"]["ownerReferences"][0]["kind"] == "Service"
    ep = server.store.get("endpoints", "web", NS)
    assert [a["ip"] for a in ep["subsets"][0]["addresses"]] == ["10.0.0.1"]
    assert [a["ip"] for a in ep["subsets"][0]["notReadyAddresses"]] == ["10.0.0.2"]
    assert ep["subsets"][0]["ports"] == [{"name": "http", "port": 8080, "protocol": "TCP"}]

    store.patch("pods", "web-2", {"status": {"conditions": [{"type": "Ready", "status": "True"}]}},
                namespace=NS, patch_type="strategic", subresource="status")
    store.patch("pods", "web-3", {"status": {"podIP": "10.0.0.3"}}, namespace=NS, subresource="status")
    assert {k: v[1] for k, v in _endpoints(server, "web").items()} == {"web-1": True, "web-2": True, "web-3": True}
    store.delete("pods", "web-1", NS)
    store.patch("pods", "web-3", {"metadata": {"labels": {"app": "gone"}}}, namespace=NS)
    assert list(_endpoints(server, "web")) == ["web-2"]


def test_selector_change_and_removal(server: APIServer) -> None:
    store = server.store
    store.create({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "sel", "namespace": NS},
                  "spec": {"selector": {"app": "v1"}, "ports": [{"port": 80}]}})
    store.create(_pod("v1-a", "10.1.0.1", {"app": "v1"}))
    store.create(_pod("v2-a", "10.1.0.2", {"app": "v2"}))
    assert list(_endpoints(server, "sel")) == ["v1-a"]
    store.patch("services", "sel", {"spec": {"selector": {"app": "v2"}}}, namespace=NS)
    assert list(_endpoints(server, "sel")) == ["v2-a"]
    store.patch("services", "sel", {"spec": {"selector": None}}, namespace=NS)
    server.wait_idle()
    assert _slices(server, "sel") == []
    store.patch("services", "sel", {"spec": {"selector": {"app": "v1"}}}, namespace=NS)
    assert list(_endpoints(server, "sel")) == ["v1-a"]
    store.delete("services", "sel", NS)
    server.wait_idle()
    assert _slices(server, "sel") == []


def test_named_target_port_resolution(server: APIServer) -> None:
    store = server.store
    store.create({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "named", "namespace": NS},
                  "spec": {"selector": {"app": "named"},
                           "ports": [{"name": "http", "port": 80, "targetPort": "web"}]}})
    store.create(_pod("n-1", "10.2.0.1", {"app": "named"}, ports=[{"name": "web", "containerPort": 8080}]))
    store.create(_pod("n-2", "10.2.0.2", {"app": "named"}, ports=[{"name": "web", "containerPort": 8080}]))
    store.create(_pod("n-3", "10.2.0.3", {"app": "named"}, ports=[{"name": "web", "containerPort": 9090}]))
    eps = _endpoints(server, "named")
    assert eps == {"n-1": ("10.2.0.1", True, (("http", 8080),)), "n-2": ("10.2.0.2", True, (("http", 8080),)),
                   "n-3": ("10.2.0.3", True, (("http", 9090),))}
    assert len(_slices(server, "named")) == 2
    store.delete("pods", "n-3", NS)
    assert len(wait_for(lambda: _slices(server, "named") if len(_slices(server, "named")) == 1 else None)) == 1


def test_endpointslices_via_kubectl_and_client(server: APIServer, api, kubectl) -> None:
    v1 = client.CoreV1Api(api)
    v1.create_namespaced_service(NS, client.V1Service(
        metadata=client.V1ObjectMeta(name="cli"),
        spec=client.V1ServiceSpec(selector={"app": "cli"}, ports=[client.V1ServicePort(port=80, target_port=80)])))
    server.store.create(_pod("cli-1", "10.3.0.1", {"app": "cli"}))
    server.wait_idle()
    sl = client.DiscoveryV1Api(api).list_namespaced_endpoint_slice(
        NS, label_selector="kubernetes.io/service-name=cli").items
    assert [e.addresses for e in sl[0].endpoints] == [["10.3.0.1"]]
    out = kubectl("get", "endpointslices", "-n", NS, "-l", "kubernetes.io/service-name=cli")
    assert "10.3.0.1" in out and "IPv4" in out


def test_workload_controllers() -> None:
    srv = APIServer(workload_controllers=True).start()
    try:
        store = srv.store
        store.create({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "app"},
                      "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "app"}},
                               "template": {"metadata": {"labels": {"app": "app"}},
                                            "spec": {"containers": [{"name": "c", "image": "x:1"}]}}}})
        store.create({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "app"},
                      "spec": {"selector": {"app": "app"}, "ports": [{"port": 80}]}})

        def settled(n: int) -> bool:
            srv.wait_idle()
            d = store.get("deployments", "app")
            return (len(store.list("pods", "default")["items"]) == n
                    and d.get("status", {}).get("readyReplicas") == n)

        wait_for(lambda: settled(3))
        (rs,) = store.list("replicasets", "default")["items"]
        assert rs["metadata"]["name"].startswith("app-") and len(rs["metadata"]["name"]) == len("app-") + 10
        pods = store.list("pods", "default")["items"]
        assert all(p["metadata"]["ownerReferences"][0]["uid"] == rs["metadata"]["uid"] for p in pods)
        assert all(p["status"]["podIP"] and p["metadata"]["name"].startswith(rs["metadata"]["name"] + "-")
                   for p in pods)
        wait_for(lambda: len(srv.store.list("endpointslices", "default")["items"][0]["endpoints"]) == 3)
        store.patch("deployments", "app", {"spec": {"replicas": 1}})
        wait_for(lambda: settled(1))
        store.patch("deployments", "app", {"spec": {"template": {"spec": {"containers": [
            {"name": "c", "image": "x:2"}]}}}}, patch_type="strategic")
        wait_for(lambda: settled(1) and [r["metadata"]["name"] for r in store.list("replicasets", "default")["items"]
                                         if r["spec"]["replicas"]] not in ([], [rs["metadata"]["name"]]))
        store.delete("deployments", "app")
        srv.wait_idle()
        assert store.list("pods", "default")["items"] == []
        assert store.list("replicasets", "default")["items"] == []
    finally:
        srv.stop()
