"""CustomResourceDefinitions in the local API server, with the real kubectl and the official client
(ApiextensionsV1Api, CustomObjectsApi): the Gateway API CRDs the project ships, and a small test CRD for
what they do not cover (cluster scope, no status subresource, deleting a CRD)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from trafficmgr.apiserver import APIServer
from trafficmgr.apiserver.crds import GATEWAY_API_CRDS, json_path
from trafficmgr.testing.cluster import Kubectl

G, V1 = "gateway.networking.k8s.io", "v1"
KINDS = {"gatewayclasses": ("GatewayClass", "gc", False, "v1"), "gateways": ("Gateway", "gtw", True, "v1"),
         "httproutes": ("HTTPRoute", None, True, "v1"), "grpcroutes": ("GRPCRoute", None, True, "v1"),
         "referencegrants": ("ReferenceGrant", "refgrant", True, "v1beta1")}

ROUTE = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: {name}
  namespace: {ns}
  labels: {{app: {app}}}
spec:
  parentRefs: [{{name: traffic}}]
  hostnames: [{host}]
  rules:
  - backendRefs: [{{name: reviews, port: 9080}}]
"""

# A small CRD of our own: cluster-scoped, printer columns of every type, no status subresource.
WIDGETS = {
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.test.trafficmgr.io"},
    "spec": {"group": "test.trafficmgr.io", "scope": "Cluster",
             "names": {"plural": "widgets", "kind": "Widget", "shortNames": ["wdg"]},
             "versions": [{"name": "v1", "served": True, "storage": True,
                           "additionalPrinterColumns": [
                               {"name": "Size", "type": "integer", "jsonPath": ".spec.size"},
                               {"name": "Ready", "type": "boolean", "jsonPath": ".status.ready"},
                               {"name": "First", "type": "string", "jsonPath": ".spec.tags[0]"}],
                           "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                               "spec": {"type": "object", "required": ["size"], "properties": {
                                   "size": {"type": "integer", "minimum": 1},
                                   "color": {"type": "string", "enum": ["red", "blue"], "default": "red"},
                                   "tags": {"type": "array", "items": {"type": "string"}},
                                   "extra": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}},
                               "status": {"type": "object", "properties": {"ready": {"type": "boolean"}}}}}}}]}}


@pytest.fixture(scope="module")
def crds(kubectl: Kubectl) -> Kubectl:
    """The shipped Gateway API CRDs applied with ``kubectl apply -f <dir>``, and the class and Gateway."""
    out = kubectl("apply", "-f", str(GATEWAY_API_CRDS))
    assert out.count("created") == 5, out
    kubectl.apply("""
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: traffic}
spec: {controllerName: trafficmgr.io/gateway-controller}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: traffic, namespace: default}
spec:
  gatewayClassName: traffic
  listeners: [{name: http, port: 8081, protocol: HTTP}]
""")
    return kubectl


def _co(api: client.ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api)


def _route(name: str, host: str = "a.example.com", app: str = "demo", ns: str = "default") -> str:
    return ROUTE.format(name=name, ns=ns, app=app, host=host)


def test_crds_established_and_in_discovery(crds: Kubectl, api: client.ApiClient) -> None:
    ext = client.ApiextensionsV1Api(api)
    for plural, (kind, _short, _namespaced, version) in KINDS.items():
        crd = ext.read_custom_resource_definition(f"{plural}.{G}")
        conds = {c.type: c.status for c in crd.status.conditions}
        assert conds == {"NamesAccepted": "True", "Established": "True"}, conds
        assert crd.status.accepted_names.kind == kind and crd.status.accepted_names.singular == kind.lower()
        assert crd.status.stored_versions == [version]
    table = crds("api-resources", f"--api-group={G}", "--no-headers")
    rows = {line.split()[0]: line.split() for line in table.splitlines()}
    assert set(rows) == set(KINDS)
    for plural, (kind, short, namespaced, version) in KINDS.items():
        expect = [plural] + ([short] if short else []) + [f"{G}/{version}", str(namespaced).lower(), kind]
        assert rows[plural] == expect, rows[plural]
    # the category every Gateway API kind is in, as upstream's
    assert set(crds("api-resources", "--categories=gateway-api", "-o", "name").split()) == {f"{p}.{G}" for p in KINDS}
    assert "widgets" not in crds("api-resources", "-o", "name")
    assert crds("get", "crd", f"httproutes.{G}", "--no-headers").split()[0] == f"httproutes.{G}"


def test_apply_route_get_columns_describe(crds: Kubectl) -> None:
    crds.apply(_route("cols", host="cols.example.com"))
    out = crds("get", "httproute", "cols")
    header, row = out.splitlines()
    assert header.split() == ["NAME", "HOSTNAMES", "AGE"]
    assert row.split()[:2] == ["cols", '["cols.example.com"]'] and row.split()[2].endswith("s")
    # until a controller writes status, the schema's status default (as upstream's CRDs): Pending
    assert crds("get", "gtw", "traffic", "--no-headers").split()[:3] == ["traffic", "traffic", "Unknown"]  # no address
    assert crds("get", "gc", "traffic", "--no-headers").split()[2] == "Unknown"
    crds("patch", "gateway", "traffic", "--subresource=status", "--type=merge", "-p", json.dumps({"status": {
        "addresses": [{"type": "IPAddress", "value": "127.0.0.1"}],
        "conditions": [{"type": "Programmed", "status": "True", "reason": "Programmed", "message": "ok",
                        "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1}]}}))
    header, row = crds("get", "gtw").splitlines()
    assert header.split() == ["NAME", "CLASS", "ADDRESS", "PROGRAMMED", "AGE"]
    assert row.split()[:4] == ["traffic", "traffic", "127.0.0.1", "True"]
    header, row = crds("get", "gc", "-o", "wide").splitlines()
    assert header.split() == ["NAME", "CONTROLLER", "ACCEPTED", "AGE", "DESCRIPTION"]
    assert row.split()[:2] == ["traffic", "trafficmgr.io/gateway-controller"]
    described = crds("describe", "httproute", "cols")
    for text in ("Name:         cols", "API Version:  gateway.networking.k8s.io/v1", "Kind:         HTTPRoute",
                 "Hostnames:", "cols.example.com", "Backend Refs:", "Name:    reviews", "Port:    9080"):
        assert text in described, described


def test_explain_serves_the_schema(crds: Kubectl) -> None:
    out = crds("explain", "httproute.spec.rules.backendRefs")
    assert "KIND:       HTTPRoute" in out and "VERSION:    v1" in out
    assert "weight\t<integer>" in out and "name\t<string> -required-" in out
    assert "allowedRoutes" in crds("explain", "gateway.spec.listeners")


def test_schema_defaults(crds: Kubectl, api: client.ApiClient) -> None:
    crds.apply(_route("defaults"))
    r = _co(api).get_namespaced_custom_object(G, V1, "default", "httproutes", "defaults")
    assert r["spec"]["parentRefs"] == [{"group": G, "kind": "Gateway", "name": "traffic"}]
    rule = r["spec"]["rules"][0]
    assert rule["backendRefs"] == [{"group": "", "kind": "Service", "name": "reviews", "port": 9080, "weight": 1}]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]
    # a route without rules gets the default rule; a match without a path gets PathPrefix /
    _co(api).create_namespaced_custom_object(G, V1, "default", "httproutes", {
        "apiVersion": f"{G}/{V1}", "kind": "HTTPRoute", "metadata": {"name": "norules"},
        "spec": {"parentRefs": [{"name": "traffic", "sectionName": "http"}]}})
    r = _co(api).get_namespaced_custom_object(G, V1, "default", "httproutes", "norules")
    assert r["spec"]["rules"] == [{"matches": [{"path": {"type": "PathPrefix", "value": "/"}}]}]
    gw = _co(api).get_namespaced_custom_object(G, V1, "default", "gateways", "traffic")
    assert gw["spec"]["listeners"][0]["allowedRoutes"] == {"namespaces": {"from": "Same"}}
    _co(api).create_namespaced_custom_object(G, V1, "default", "httproutes", {
        "apiVersion": f"{G}/{V1}", "kind": "HTTPRoute", "metadata": {"name": "hdr"},
        "spec": {"rules": [{"matches": [{"headers": [{"name": "x-canary", "value": "true"}]}],
                            "backendRefs": [{"name": "reviews-v2", "port": 9080, "weight": 0}]}]}})
    r = _co(api).get_namespaced_custom_object(G, V1, "default", "httproutes", "hdr")
    assert r["spec"]["rules"][0]["matches"] == [{"headers": [{"type": "Exact", "name": "x-canary", "value": "true"}],
                                                 "path": {"type": "PathPrefix", "value": "/"}}]
    assert r["spec"]["rules"][0]["backendRefs"][0]["weight"] == 0  # 0 is a value, not absent


def test_invalid_custom_resource_is_422_with_the_field_path(crds: Kubectl, api: client.ApiClient) -> None:
    with pytest.raises(ApiException) as exc:
        _co(api).create_namespaced_custom_object(G, V1, "default", "httproutes", {
            "apiVersion": f"{G}/{V1}", "kind": "HTTPRoute", "metadata": {"name": "bad"},
            "spec": {"rules": [{"backendRefs": [{"name": "reviews", "port": "eighty", "weight": -1}],
                                "matches": [{"path": {"type": "Prefix"}}]}]}})
    assert exc.value.status == 422
    body = json.loads(exc.value.body)
    assert body["reason"] == "Invalid" and body["details"]["kind"] == "HTTPRoute"
    fields = {c["field"]: c["message"] for c in body["details"]["causes"]}
    assert set(fields) == {"spec.rules[0].backendRefs[0].port", "spec.rules[0].backendRefs[0].weight",
                           "spec.rules[0].matches[0].path.type"}, fields
    assert "must be of type integer" in fields["spec.rules[0].backendRefs[0].port"]
    assert "greater than or equal to 0" in fields["spec.rules[0].backendRefs[0].weight"]
    assert 'Unsupported value: "Prefix"' in fields["spec.rules[0].matches[0].path.type"]
    proc = crds.run("apply", "-f", "-", input="""
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: nolisteners}
spec: {gatewayClassName: traffic}
""", check=False)
    assert proc.returncode != 0 and "spec.listeners: Required value" in proc.stderr, proc.stderr
    with pytest.raises(ApiException) as exc:
        _co(api).get_namespaced_custom_object(G, V1, "default", "httproutes", "bad")
    assert exc.value.status == 404


def test_unknown_fields_pruned_or_refused_when_strict(crds: Kubectl, api: client.ApiClient) -> None:
    _co(api).create_namespaced_custom_object(G, V1, "default", "httproutes", {
        "apiVersion": f"{G}/{V1}", "kind": "HTTPRoute", "metadata": {"name": "pruned"},
        "spec": {"hostnames": ["p.example.com"], "frobnicate": True}})
    r = _co(api).get_namespaced_custom_object(G, V1, "default", "httproutes", "pruned")
    assert "frobnicate" not in r["spec"] and r["spec"]["hostnames"] == ["p.example.com"]
    # kubectl apply validates on the server (fieldValidation=Strict): an unknown field is an error
    proc = crds.run("apply", "-f", "-", input=_route("strict") + "  frobnicate: true\n", check=False)
    assert proc.returncode != 0 and 'strict decoding error: unknown field "spec.frobnicate"' in proc.stderr, \
        proc.stderr


def test_unknown_kind_is_404(crds: Kubectl, api: client.ApiClient) -> None:
    for call in (lambda: _co(api).list_namespaced_custom_object(G, V1, "default", "tcproutes"),
                 lambda: _co(api).create_namespaced_custom_object(G, V1, "default", "tcproutes", {
                     "apiVersion": f"{G}/{V1}", "kind": "TCPRoute", "metadata": {"name": "x"}}),
                 lambda: _co(api).list_namespaced_custom_object(G, "v9", "default", "httproutes"),
                 lambda: _co(api).list_cluster_custom_object("nothere.example.com", "v1", "things")):
        with pytest.raises(ApiException) as exc:
            call()
        assert exc.value.status == 404
    proc = crds.run("apply", "-f", "-", check=False, input="""
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: x}
spec: {}
""")
    assert proc.returncode != 0 and 'no matches for kind "TCPRoute"' in proc.stderr, proc.stderr


def test_label_selectors(crds: Kubectl, api: client.ApiClient) -> None:
    crds.apply(_route("sel-a", app="canary") + "---" + _route("sel-b", app="stable") + "---"
               + _route("sel-c", app="canary"))
    got = _co(api).list_namespaced_custom_object(G, V1, "default", "httproutes", label_selector="app=canary")
    assert [i["metadata"]["name"] for i in got["items"]] == ["sel-a", "sel-c"]
    assert got["kind"] == "HTTPRouteList" and got["apiVersion"] == f"{G}/{V1}"
    assert crds("get", "httproute", "-l", "app in (stable)", "-o", "name").split() == [f"httproute.{G}/sel-b"]
    got = _co(api).list_cluster_custom_object(G, V1, "httproutes", label_selector="app!=canary,app in (canary,stable)")
    assert [i["metadata"]["name"] for i in got["items"]] == ["sel-b"]
    crds("delete", "httproute", "-l", "app=canary")
    assert crds("get", "httproute", "-l", "app in (canary,stable)", "-o", "name").split() == [f"httproute.{G}/sel-b"]


def test_watch_events(crds: Kubectl, api: client.ApiClient) -> None:
    rv = _co(api).list_namespaced_custom_object(G, V1, "default", "httproutes")["metadata"]["resourceVersion"]
    events: list[tuple[str, str, int]] = []

    def collect() -> None:
        for ev in watch.Watch().stream(_co(api).list_namespaced_custom_object, G, V1, "default", "httproutes",
                                       resource_version=rv, label_selector="app=watched", timeout_seconds=5):
            o = ev["object"]
            events.append((ev["type"], o["metadata"]["name"], o["metadata"]["generation"]))
            if ev["type"] == "DELETED":
                return

    t = threading.Thread(target=collect)
    t.start()
    crds.apply(_route("w1", app="watched"))
    crds.apply(_route("w1", app="watched", host="w2.example.com"))
    crds.apply(_route("unwatched", app="other"))
    crds("delete", "httproute", "w1")
    t.join(10)
    assert events == [("ADDED", "w1", 1), ("MODIFIED", "w1", 2), ("DELETED", "w1", 2)]
    # kubectl's own watch (a Table watch with the printer columns)
    proc = crds.run("get", "httproute", "sel-b", "--watch", "--request-timeout=2s", check=False)
    assert proc.stdout.split()[:4] == ["NAME", "HOSTNAMES", "AGE", "sel-b"], proc.stdout


def test_wait_established_and_garbage_collection(crds: Kubectl, api: client.ApiClient) -> None:
    """``kubectl wait --for condition=established`` (install scripts do it); a namespace's deletion takes its
    custom resources, and a custom resource's deletion its dependents (ownerReferences)."""
    out = crds("wait", "--for", "condition=established", "--timeout=10s", f"crd/httproutes.{G}")
    assert "condition met" in out
    v1 = client.CoreV1Api(api)
    v1.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="gone")))
    crds.apply(_route("inns", ns="gone"))
    owner = _co(api).get_namespaced_custom_object(G, V1, "gone", "httproutes", "inns")
    crds.apply(_route("owner"))
    route = _co(api).get_namespaced_custom_object(G, V1, "default", "httproutes", "owner")
    v1.create_namespaced_config_map("default", client.V1ConfigMap(metadata=client.V1ObjectMeta(
        name="owned", owner_references=[client.V1OwnerReference(
            api_version=f"{G}/{V1}", kind="HTTPRoute", name="owner", uid=route["metadata"]["uid"])])))
    crds("delete", "httproute", "owner")
    with pytest.raises(ApiException) as exc:
        v1.read_namespaced_config_map("owned", "default")
    assert exc.value.status == 404
    crds("delete", "namespace", "gone")
    names = [i["metadata"]["name"] for i in _co(api).list_cluster_custom_object(G, V1, "httproutes")["items"]]
    assert owner["metadata"]["name"] == "inns" and "inns" not in names and names


def test_status_subresource_and_generation(crds: Kubectl, api: client.ApiClient) -> None:
    co = _co(api)
    crds.apply(_route("st"))
    r = co.get_namespaced_custom_object(G, V1, "default", "httproutes", "st")
    assert r["metadata"]["generation"] == 1 and "status" not in r
    status = {"parents": [{"parentRef": {"name": "traffic"}, "controllerName": "trafficmgr.io/gateway-controller",
                           "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "",
                                           "lastTransitionTime": "2026-01-01T00:00:00Z"}]}]}
    # a status write changes only status (the spec it carries is ignored) and not the generation
    r = co.patch_namespaced_custom_object_status(G, V1, "default", "httproutes", "st",
                                                 {"status": status, "spec": {"hostnames": ["ignored.example.com"]}},
                                                 _content_type="application/merge-patch+json")
    assert r["metadata"]["generation"] == 1 and r["spec"]["hostnames"] == ["a.example.com"]
    assert r["status"]["parents"][0]["parentRef"] == {"group": G, "kind": "Gateway", "name": "traffic"}  # defaulted
    # a spec write ignores the status it carries and bumps the generation
    r = co.patch_namespaced_custom_object(G, V1, "default", "httproutes", "st",
                                          {"spec": {"hostnames": ["b.example.com"]}, "status": {"parents": []}},
                                          _content_type="application/merge-patch+json")
    assert r["metadata"]["generation"] == 2 and len(r["status"]["parents"]) == 1
    # a metadata-only write does not
    r = co.patch_namespaced_custom_object(G, V1, "default", "httproutes", "st", {"metadata": {"labels": {"x": "y"}}},
                                          _content_type="application/merge-patch+json")
    assert r["metadata"]["generation"] == 2
    # JSON patch, and kubectl's default strategic merge refused as kube-apiserver refuses it for CRs
    r = co.patch_namespaced_custom_object(G, V1, "default", "httproutes", "st",
                                          [{"op": "replace", "path": "/spec/hostnames/0", "value": "c.example.com"}],
                                          _content_type="application/json-patch+json")
    assert r["spec"]["hostnames"] == ["c.example.com"] and r["metadata"]["generation"] == 3
    proc = crds.run("patch", "httproute", "st", "-p", '{"spec":{"hostnames":["d.example.com"]}}', check=False)
    assert proc.returncode != 0 and "application/strategic-merge-patch+json is not supported" in proc.stderr
    # an invalid status is refused with its path too
    with pytest.raises(ApiException) as exc:
        co.patch_namespaced_custom_object_status(G, V1, "default", "httproutes", "st",
                                                 {"status": {"parents": [{"controllerName": 5}]}},
                                                 _content_type="application/merge-patch+json")
    assert exc.value.status == 422
    fields = {c["field"] for c in json.loads(exc.value.body)["details"]["causes"]}
    assert fields == {"status.parents[0].controllerName", "status.parents[0].parentRef"}, fields
    # a create cannot set status (as on a cluster)
    obj = co.create_namespaced_custom_object(G, V1, "default", "httproutes", {
        "apiVersion": f"{G}/{V1}", "kind": "HTTPRoute", "metadata": {"name": "st2"}, "spec": {}, "status": status})
    assert "status" not in obj


def test_server_side_apply(crds: Kubectl, api: client.ApiClient) -> None:
    crds("apply", "--server-side", "-f", "-", input=_route("ssa", host="s1.example.com"))
    r = _co(api).get_namespaced_custom_object(G, V1, "default", "httproutes", "ssa")
    assert r["spec"]["hostnames"] == ["s1.example.com"]
    assert [m["manager"] for m in r["metadata"]["managedFields"]] == ["kubectl"]
    crds("apply", "--server-side", "-f", "-", input=_route("ssa", host="s1.example.com").replace(
        "  hostnames: [s1.example.com]\n", ""))
    r = _co(api).get_namespaced_custom_object(G, V1, "default", "httproutes", "ssa")
    assert "hostnames" not in r["spec"] and r["metadata"]["generation"] == 2


def test_widgets_cluster_scope_columns_and_crd_deletion(kubectl: Kubectl, api: client.ApiClient,
                                                        server: APIServer, tmp_path: Path) -> None:
    ext, co = client.ApiextensionsV1Api(api), _co(api)
    ext.create_custom_resource_definition(WIDGETS)
    co.create_cluster_custom_object("test.trafficmgr.io", "v1", "widgets", {
        "apiVersion": "test.trafficmgr.io/v1", "kind": "Widget", "metadata": {"name": "w1"},
        "spec": {"size": 3, "tags": ["a", "b"], "extra": {"anything": [1, {"x": None}]}},
        "status": {"ready": True}})  # no status subresource: a create sets status
    w = co.get_cluster_custom_object("test.trafficmgr.io", "v1", "widgets", "w1")
    assert w["spec"]["color"] == "red" and w["spec"]["extra"] == {"anything": [1, {"x": None}]}
    assert w["status"] == {"ready": True} and "namespace" not in w["metadata"]
    header, row = kubectl("get", "wdg").splitlines()
    assert header.split() == ["NAME", "SIZE", "READY", "FIRST"] and row.split() == ["w1", "3", "true", "a"]
    r = co.patch_cluster_custom_object("test.trafficmgr.io", "v1", "widgets", "w1", {"status": {"ready": False}},
                                       _content_type="application/merge-patch+json")
    assert r["metadata"]["generation"] == 2  # status is part of the object without the subresource
    with pytest.raises(ApiException) as exc:
        co.get_cluster_custom_object_status("test.trafficmgr.io", "v1", "widgets", "w1")
    assert exc.value.status == 404
    with pytest.raises(ApiException) as exc:
        co.create_cluster_custom_object("test.trafficmgr.io", "v1", "widgets", {
            "apiVersion": "test.trafficmgr.io/v1", "kind": "Widget", "metadata": {"name": "w2"},
            "spec": {"size": 0, "color": "green"}})
    assert exc.value.status == 422
    assert {c["field"] for c in json.loads(exc.value.body)["details"]["causes"]} == {"spec.size", "spec.color"}
    # deleting the CRD deletes its objects (a watcher sees them go) and the kind leaves discovery
    rv = co.list_cluster_custom_object("test.trafficmgr.io", "v1", "widgets")["metadata"]["resourceVersion"]
    resp = co.list_cluster_custom_object("test.trafficmgr.io", "v1", "widgets", watch=True, resource_version="0",
                                         _preload_content=False, timeout_seconds=10)
    time.sleep(0.3)
    ext.delete_custom_resource_definition("widgets.test.trafficmgr.io")
    lines = [json.loads(line) for line in resp.read().splitlines() if line.strip()]
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in lines] == [("ADDED", "w1"), ("DELETED", "w1")]
    assert int(lines[1]["object"]["metadata"]["resourceVersion"]) > int(rv)
    with pytest.raises(ApiException) as exc:
        co.list_cluster_custom_object("test.trafficmgr.io", "v1", "widgets")
    assert exc.value.status == 404
    assert "widgets" not in kubectl("api-resources", "-o", "name")
    ext.create_custom_resource_definition(WIDGETS)  # the same CRD again: an empty kind
    assert co.list_cluster_custom_object("test.trafficmgr.io", "v1", "widgets")["items"] == []
    ext.delete_custom_resource_definition("widgets.test.trafficmgr.io")


def test_versions_share_storage(kubectl: Kubectl, api: client.ApiClient) -> None:
    """Two served versions (conversion None): an object written at one is read and watched at the other."""
    ext, co = client.ApiextensionsV1Api(api), _co(api)
    dual = json.loads(json.dumps(WIDGETS))
    dual["metadata"]["name"] = "duals.test.trafficmgr.io"
    dual["spec"]["names"] = {"plural": "duals", "kind": "Dual"}
    dual["spec"]["scope"] = "Namespaced"
    beta = json.loads(json.dumps(dual["spec"]["versions"][0]))
    beta.update(name="v1beta1", storage=False)
    dual["spec"]["versions"].append(beta)
    ext.create_custom_resource_definition(dual)
    try:
        assert kubectl("api-resources", "--api-group=test.trafficmgr.io", "--no-headers").split() == [
            "duals", "test.trafficmgr.io/v1", "true", "Dual"]  # the preferred version
        group = json.loads(kubectl("get", "--raw", "/apis/test.trafficmgr.io"))
        assert [v["version"] for v in group["versions"]] == ["v1", "v1beta1"]
        assert group["preferredVersion"]["version"] == "v1"
        rv = co.list_namespaced_custom_object("test.trafficmgr.io", "v1beta1", "default", "duals")[
            "metadata"]["resourceVersion"]
        co.create_namespaced_custom_object("test.trafficmgr.io", "v1beta1", "default", "duals", {
            "apiVersion": "test.trafficmgr.io/v1beta1", "kind": "Dual", "metadata": {"name": "d"}, "spec": {"size": 1}})
        assert co.get_namespaced_custom_object("test.trafficmgr.io", "v1", "default", "duals", "d")[
            "apiVersion"] == "test.trafficmgr.io/v1"
        listed = co.list_namespaced_custom_object("test.trafficmgr.io", "v1", "default", "duals")
        assert [i["apiVersion"] for i in listed["items"]] == ["test.trafficmgr.io/v1"]
        co.patch_namespaced_custom_object("test.trafficmgr.io", "v1", "default", "duals", "d", {"spec": {"size": 2}},
                                          _content_type="application/merge-patch+json")
        evs = [(e["type"], e["object"]["apiVersion"], e["object"]["spec"]["size"]) for e in watch.Watch().stream(
            co.list_namespaced_custom_object, "test.trafficmgr.io", "v1beta1", "default", "duals",
            resource_version=rv, timeout_seconds=1)]
        assert evs == [("ADDED", "test.trafficmgr.io/v1beta1", 1), ("MODIFIED", "test.trafficmgr.io/v1beta1", 2)]
    finally:
        ext.delete_custom_resource_definition("duals.test.trafficmgr.io")


def test_invalid_crds_are_422(api: client.ApiClient) -> None:
    ext = client.ApiextensionsV1Api(api)
    bad = json.loads(json.dumps(WIDGETS))
    bad["metadata"]["name"] = "gadgets.test.trafficmgr.io"
    bad["spec"]["versions"][0]["storage"] = False
    bad["spec"]["scope"] = "Global"
    with pytest.raises(ApiException) as exc:
        ext.create_custom_resource_definition(bad)
    assert exc.value.status == 422
    fields = {c["field"] for c in json.loads(exc.value.body)["details"]["causes"]}
    assert fields == {"metadata.name", "spec.scope", "spec.versions"}, fields
    # a plural another CRD of the group uses: stored, but NamesAccepted=False and nothing served
    clash = json.loads(json.dumps(WIDGETS))
    clash["metadata"]["name"] = "gizmos.test.trafficmgr.io"
    clash["spec"]["names"] = {"plural": "gizmos", "kind": "Gizmo", "shortNames": ["wdg"]}
    ext.create_custom_resource_definition(WIDGETS)
    try:
        crd = ext.create_custom_resource_definition(clash)
        conds = {c.type: (c.status, c.reason) for c in crd.status.conditions}
        assert conds == {"NamesAccepted": ("False", "NameConflict"), "Established": ("False", "NotAccepted")}
        with pytest.raises(ApiException) as exc:
            _co(api).list_cluster_custom_object("test.trafficmgr.io", "v1", "gizmos")
        assert exc.value.status == 404
    finally:
        ext.delete_custom_resource_definition("gizmos.test.trafficmgr.io")
        ext.delete_custom_resource_definition("widgets.test.trafficmgr.io")


def test_json_path_subset() -> None:
    obj = {"status": {"conditions": [{"type": "Accepted", "status": "True"}, {"type": "Programmed",
                                                                             "status": "False"}],
                      "addresses": [{"value": "10.0.0.1"}, {"value": "10.0.0.2"}]}}
    assert json_path(obj, '.status.conditions[?(@.type=="Programmed")].status') == ["False"]
    assert json_path(obj, ".status.addresses[*].value") == ["10.0.0.1", "10.0.0.2"]
    assert json_path(obj, "{.status.addresses[1].value}") == ["10.0.0.2"]
    assert json_path(obj, ".status.missing.x") == [] and json_path(obj, ".status[bad") == []
