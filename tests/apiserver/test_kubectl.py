"""The real kubectl against the in-memory API server."""

from __future__ import annotations

import datetime as dt
import re
import subprocess
import textwrap

import pytest
import yaml

from trafficmgr.testing.cluster import Kubectl

DEPLOY_V1 = textwrap.dedent("""\
    apiVersion: apps/v1
    kind: Deployment
    metadata:
      name: web
      labels: {app: web}
    spec:
      replicas: 2
      selector:
        matchLabels: {app: web}
      template:
        metadata:
          labels: {app: web}
        spec:
          containers:
          - name: app
            image: nginx:1.25
            ports: [{name: http, containerPort: 80}]
            env: [{name: MODE, value: one}, {name: OLD, value: x}]
          - name: sidecar
            image: busybox
    ---
    apiVersion: v1
    kind: Service
    metadata:
      name: web
      labels: {app: web}
    spec:
      selector: {app: web}
      ports:
      - {name: http, port: 80, targetPort: http}
      - {name: metrics, port: 9090}
    """)

DEPLOY_V2 = textwrap.dedent("""\
    apiVersion: apps/v1
    kind: Deployment
    metadata:
      name: web
      labels: {app: web}
    spec:
      replicas: 2
      selector:
        matchLabels: {app: web}
      template:
        metadata:
          labels: {app: web}
        spec:
          containers:
          - name: app
            image: nginx:1.26
            ports: [{name: http, containerPort: 80}]
            env: [{name: MODE, value: two}]
          - name: proxy
            image: envoy
    ---
    apiVersion: v1
    kind: Service
    metadata:
      name: web
      labels: {app: web}
    spec:
      selector: {app: web}
      ports:
      - {name: http, port: 8080, targetPort: http}
    """)


def _containers(kubectl: Kubectl, name: str = "web") -> dict[str, dict]:
    d = kubectl.json("get", "deployment", name)
    return {c["name"]: c for c in d["spec"]["template"]["spec"]["containers"]}


def test_version_and_discovery(kubectl: Kubectl) -> None:
    out = kubectl("version", "-o", "json")
    assert '"gitVersion": "v1.32.0"' in out
    res = kubectl("api-resources", "--no-headers")
    for short in ("svc", "po", "deploy", "rs", "sts", "ds", "ing", "ns", "ev", "cm", "ep", "no"):
        assert f" {short} " in res or f" {short}," in res or f",{short} " in res, short
    assert "endpointslices" in res and "ingressclasses" in res


def test_apply_create_update_and_get(kubectl: Kubectl, tmp_path) -> None:
    (tmp_path / "v1.yaml").write_text(DEPLOY_V1)
    (tmp_path / "v2.yaml").write_text(DEPLOY_V2)
    out = kubectl("apply", "-f", str(tmp_path / "v1.yaml"))
    assert "deployment.apps/web created" in out and "service/web created" in out
    assert list(_containers(kubectl)) == ["app", "sidecar"]

    out = kubectl("apply", "-f", str(tmp_path / "v2.yaml"))
    assert "deployment.apps/web configured" in out and "service/web configured" in out
    cs = _containers(kubectl)
    assert list(cs) == ["app", "proxy"]
    assert cs["app"]["image"] == "nginx:1.26"
    assert cs["app"]["env"] == [{"name": "MODE", "value": "two"}]
    svc = kubectl.json("get", "svc", "web")
    assert [(p["name"], p["port"]) for p in svc["spec"]["ports"]] == [("http", 8080)]
    assert svc["spec"]["clusterIP"].startswith("10.96.")
    assert kubectl.json("get", "deploy", "web")["metadata"]["generation"] == 2

    out = kubectl("apply", "-f", str(tmp_path / "v2.yaml"))
    assert "unchanged" in out

    wide = kubectl("get", "svc,deploy", "-o", "wide")
    assert "CLUSTER-IP" in wide and "PORT(S)" in wide and "8080/TCP" in wide
    assert "UP-TO-DATE" in wide and "nginx:1.26,envoy" in wide
    doc = yaml.safe_load(kubectl("get", "deploy", "web", "-o", "yaml"))
    assert doc["kind"] == "Deployment" and doc["metadata"]["uid"]


def test_apply_server_side(kubectl: Kubectl, tmp_path) -> None:
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ssa"}, "data": {"a": "1", "b": "2"}}
    f = tmp_path / "cm.yaml"
    f.write_text(yaml.safe_dump(cm))
    assert "serverside-applied" in kubectl("apply", "--server-side", "-f", str(f))
    cm["data"] = {"a": "10"}
    f.write_text(yaml.safe_dump(cm))
    kubectl("apply", "--server-side", "-f", str(f))
    got = kubectl.json("get", "cm", "ssa", "--show-managed-fields")
    assert got["data"] == {"a": "10"}
    assert any(m["manager"] == "kubectl" and m["operation"] == "Apply" for m in got["metadata"]["managedFields"])


def test_get_pods_wide_table(kubectl: Kubectl, server) -> None:
    server.store.create({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "tbl-pod", "labels": {"app": "tbl"}},
        "spec": {"nodeName": "node-a", "containers": [{"name": "c", "image": "x"}]},
        "status": {"phase": "Running", "podIP": "10.1.2.3",
                   "containerStatuses": [{"name": "c", "ready": True, "restartCount": 2}]},
    })
    out = kubectl("get", "pods", "-o", "wide", "-l", "app=tbl")
    header, row = out.splitlines()[:2]
    assert header.split()[:7] == ["NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP", "NODE"]
    assert row.split()[:4] == ["tbl-pod", "1/1", "Running", "2"]
    assert "10.1.2.3" in row and "node-a" in row
    assert kubectl.json("get", "pod", "tbl-pod")["status"]["podIP"] == "10.1.2.3"


def test_label_and_annotate(kubectl: Kubectl) -> None:
    kubectl("create", "configmap", "lbl", "--from-literal=k=v")
    assert "labeled" in kubectl("label", "cm", "lbl", "tier=a")
    res = kubectl.run("label", "cm", "lbl", "tier=b", check=False)
    assert res.returncode != 0 and "--overwrite is false" in res.stderr
    kubectl("label", "cm", "lbl", "tier=b", "--overwrite")
    assert kubectl.json("get", "cm", "lbl")["metadata"]["labels"] == {"tier": "b"}
    kubectl("create", "configmap", "lbl-other", "--from-literal=k=v")
    kubectl("label", "cm", "lbl-other", "tier=a")
    assert kubectl("get", "cm", "-l", "tier=b", "-o", "name").split() == ["configmap/lbl"]
    assert kubectl("get", "cm", "-l", "tier=a", "-o", "name").split() == ["configmap/lbl-other"]
    assert sorted(kubectl("get", "cm", "-l", "tier", "-o", "name").split()) == ["configmap/lbl", "configmap/lbl-other"]
    kubectl("label", "cm", "lbl", "tier-")
    assert not kubectl.json("get", "cm", "lbl")["metadata"].get("labels")
    kubectl("annotate", "cm", "lbl", "note=hello")
    kubectl("annotate", "cm", "lbl", "note=bye", "--overwrite")
    assert kubectl.json("get", "cm", "lbl")["metadata"]["annotations"]["note"] == "bye"
    kubectl("annotate", "cm", "lbl", "note-")
    assert "note" not in (kubectl.json("get", "cm", "lbl")["metadata"].get("annotations") or {})


def test_scale_deployment(kubectl: Kubectl) -> None:
    kubectl("create", "deployment", "scaleme", "--image=nginx", "--replicas=1")
    assert "scaled" in kubectl("scale", "deployment", "scaleme", "--replicas=4")
    assert kubectl.json("get", "deploy", "scaleme")["spec"]["replicas"] == 4


def test_create_namespace_and_secret_tls(kubectl: Kubectl, tmp_path) -> None:
    assert "namespace/team-a created" in kubectl("create", "namespace", "team-a")
    key, crt = tmp_path / "tls.key", tmp_path / "tls.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(crt), "-days", "1", "-subj", "/CN=example.com"], check=True, capture_output=True)
    kubectl("create", "secret", "tls", "site-tls", "--cert", str(crt), "--key", str(key), "-n", "team-a")
    sec = kubectl.json("get", "secret", "site-tls", "-n", "team-a")
    assert sec["type"] == "kubernetes.io/tls"
    import base64
    assert base64.b64decode(sec["data"]["tls.crt"]) == crt.read_bytes()
    assert "site-tls" in kubectl("get", "secrets", "-n", "team-a")


def test_not_found_and_delete(kubectl: Kubectl) -> None:
    res = kubectl.run("get", "svc", "nope", check=False)
    assert res.returncode == 1
    assert res.stderr.strip() == 'Error from server (NotFound): services "nope" not found'
    res = kubectl.run("get", "deploy", "nope", check=False)
    assert 'Error from server (NotFound): deployments.apps "nope" not found' in res.stderr
    kubectl("create", "configmap", "doomed")
    assert 'configmap "doomed" deleted' in kubectl("delete", "configmap", "doomed")
    assert kubectl.run("get", "cm", "doomed", check=False).returncode == 1
    res = kubectl.run("delete", "namespace", "default", check=False)
    assert res.returncode == 1 and "Forbidden" in res.stderr
    kubectl("create", "configmap", "twice")
    res = kubectl.run("create", "configmap", "twice", check=False)
    assert res.returncode == 1 and 'configmaps "twice" already exists' in res.stderr


def test_describe_shows_events(kubectl: Kubectl, api, tmp_path) -> None:
    from kubernetes import client

    f = tmp_path / "svc.yaml"
    f.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "described"},
                                 "spec": {"selector": {"app": "d"}, "ports": [{"port": 80}]}}))
    kubectl("apply", "-f", str(f))
    v1 = client.CoreV1Api(api)
    svc = v1.read_namespaced_service("described", "default")
    now = dt.datetime.now(dt.UTC)
    ev = client.CoreV1Event(
        metadata=client.V1ObjectMeta(generate_name="described."),
        involved_object=client.V1ObjectReference(api_version="v1", kind="Service", name="described",
                                                 namespace="default", uid=svc.metadata.uid),
        reason="InvalidLabel", message="traffic.lb: unknown policy 'fastest'", type="Warning", count=2,
        first_timestamp=now, last_timestamp=now, source=client.V1EventSource(component="trafficmgr"))
    created = v1.create_namespaced_event("default", ev)
    assert created.metadata.name.startswith("described.")
    out = kubectl("describe", "svc", "described")
    assert "Events:" in out
    line = next(ln for ln in out.splitlines() if "InvalidLabel" in ln)
    assert "Warning" in line and "trafficmgr" in line and "traffic.lb: unknown policy 'fastest'" in line
    assert "(x2 over" in line
    assert "InvalidLabel" in kubectl("get", "events", "--field-selector", "involvedObject.name=described")

    ev2 = client.EventsV1Event(
        metadata=client.V1ObjectMeta(generate_name="described."), reason="Synced", note="pushed to envoy",
        type="Normal", action="Sync", event_time=now, reporting_controller="trafficmgr",
        reporting_instance="tm-0", regarding=client.V1ObjectReference(
            kind="Service", name="described", namespace="default", uid=svc.metadata.uid, api_version="v1"))
    client.EventsV1Api(api).create_namespaced_event("default", ev2)
    assert "pushed to envoy" in kubectl("describe", "svc", "described")


@pytest.mark.parametrize("kind", ["pod", "deployment"])
def test_describe_other_kinds(kubectl: Kubectl, server, kind: str) -> None:
    name = f"described-{kind}"
    spec = {"containers": [{"name": "c", "image": "busybox"}]}
    if kind == "pod":
        server.store.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec})
    else:
        server.store.create({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
                             "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                                      "template": {"metadata": {"labels": {"app": name}}, "spec": spec}}})
    out = kubectl("describe", kind, name)
    assert re.search(rf"^Name:\s+{name}$", out, re.M), out
    assert re.search(r"^\s*Image:\s+busybox$", out, re.M), out


def test_ingress_get_and_describe(kubectl: Kubectl, tmp_path) -> None:
    f = tmp_path / "ing.yaml"
    f.write_text(textwrap.dedent("""\
        apiVersion: networking.k8s.io/v1
        kind: Ingress
        metadata: {name: site}
        spec:
          ingressClassName: trafficmgr
          tls: [{hosts: [a.example.com], secretName: site-tls}]
          rules:
          - host: a.example.com
            http:
              paths:
              - {path: /, pathType: Prefix, backend: {service: {name: web, port: {number: 8080}}}}
        """))
    kubectl("apply", "-f", str(f))
    header, row = kubectl("get", "ingress").splitlines()[:2]
    assert header.split() == ["NAME", "CLASS", "HOSTS", "ADDRESS", "PORTS", "AGE"]
    assert row.split()[:3] == ["site", "trafficmgr", "a.example.com"]
    out = kubectl("describe", "ingress", "site")
    assert "a.example.com" in out and "web:8080" in out


def test_get_all_and_cascade_delete(kubectl: Kubectl, server) -> None:
    kubectl("create", "deployment", "cascade", "--image=nginx")
    kubectl("create", "service", "clusterip", "cascade", "--tcp=80:80")
    out = kubectl("get", "all", "-o", "name").split()
    assert "service/cascade" in out and "deployment.apps/cascade" in out
    d = server.store.get("deployments", "cascade")
    rs = server.store.create({
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {"name": "cascade-abc", "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment",
                                                                 "name": "cascade", "uid": d["metadata"]["uid"],
                                                                 "controller": True}]},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "cascade"}},
                 "template": {"metadata": {"labels": {"app": "cascade"}}, "spec": {"containers": []}}}})
    server.store.create({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "cascade-abc-x1", "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                                                    "name": "cascade-abc", "uid": rs["metadata"]["uid"],
                                                                    "controller": True}]},
        "spec": {"containers": [{"name": "c", "image": "x"}]}})
    assert kubectl.run("get", "pod", "cascade-abc-x1", check=False).returncode == 0
    assert "deployment.apps \"cascade\" deleted" in kubectl("delete", "deployment", "cascade")
    assert "cascade-abc" not in [r["metadata"]["name"] for r in server.store.list("replicasets")["items"]]
    assert kubectl.run("get", "pod", "cascade-abc-x1", check=False).returncode == 1
    assert "service/cascade" in kubectl("get", "all", "-o", "name").split()
