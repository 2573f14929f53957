"""The real kubectl against the local API server: /openapi/v2, List manifests, the get -o yaml | apply
round trip, kubectl explain, kubectl diff (dry run) and kubectl apply --server-side (field ownership).

Each test uses its own namespace, so it depends on no object another test created.
"""

from __future__ import annotations

import json
import ssl
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from trafficmgr.apiserver import APIServer, openapi
from trafficmgr.testing.cluster import Kubectl

PB = "application/com.github.proto-openapi.spec.v2@v1.0+protobuf"


def _ns(kubectl: Kubectl, name: str) -> str:
    kubectl("create", "namespace", name)
    return name


def _raw_get(server: APIServer, path: str, accept: str) -> tuple[int, str, bytes]:
    assert server.credentials is not None
    ctx = ssl.create_default_context(cadata=server.credentials.cert_pem)
    req = urllib.request.Request(server.url + path, headers={
        "Accept": accept, "Authorization": f"Bearer {server.credentials.token}"})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


def test_openapi_v2_forms(server: APIServer) -> None:
    code, ctype, body = _raw_get(server, "/openapi/v2", PB)
    assert code == 200 and ctype == "application/com.github.proto-openapi.spec.v2.v1.0+protobuf"
    assert body == openapi.v2_protobuf() and body[:5] == b"\x0a\x032.0"  # field 1 (swagger) = "2.0"
    code, ctype, body = _raw_get(server, "/openapi/v2", "application/json")
    doc = json.loads(body)
    assert code == 200 and ctype == "application/json" and doc["swagger"] == "2.0"
    cm = doc["definitions"]["io.k8s.api.core.v1.ConfigMap"]
    assert cm["x-kubernetes-group-version-kind"] == [{"group": "", "version": "v1", "kind": "ConfigMap"}]
    assert set(cm["properties"]) == {"apiVersion", "kind", "metadata", "data", "binaryData", "immutable"}
    code, _, body = _raw_get(server, "/openapi/v2", "text/html")
    assert code == 406 and json.loads(body)["reason"] == "NotAcceptable"


LIST = textwrap.dedent("""\
    apiVersion: v1
    kind: List
    items:
    - apiVersion: v1
      kind: ConfigMap
      metadata: {name: one, labels: {app: l}}
      data: {a: "1"}
    - apiVersion: v1
      kind: Service
      metadata: {name: two}
      spec:
        selector: {app: l}
        ports: [{name: http, port: 80, targetPort: 8080}]
    """)


def test_apply_list_validates(kubectl: Kubectl, tmp_path: Path) -> None:
    """kubectl validates a List client-side through /openapi/v2 (it 404ed before): valid items apply,
    unknown fields are reported by name, as on a real cluster."""
    ns = _ns(kubectl, "list-a")
    f = tmp_path / "list.yaml"
    f.write_text(LIST)
    out = kubectl("apply", "-n", ns, "-f", str(f))
    assert "configmap/one created" in out and "service/two created" in out
    assert kubectl.json("get", "cm", "one", "-n", ns)["data"] == {"a": "1"}
    bad = LIST.replace("data: {a: \"1\"}", "dat: {a: \"1\"}").replace("labels:", "labelz:")
    f.write_text(bad)
    res = kubectl.run("apply", "-n", ns, "-f", str(f), check=False)
    assert res.returncode == 1
    assert 'unknown field "dat" in io.k8s.api.core.v1.ConfigMap' in res.stderr
    assert 'unknown field "labelz" in io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta' in res.stderr


DEPLOY = textwrap.dedent("""\
    apiVersion: apps/v1
    kind: Deployment
    metadata: {name: rt, labels: {app: rt}}
    spec:
      replicas: 2
      selector: {matchLabels: {app: rt}}
      template:
        metadata: {labels: {app: rt}}
        spec:
          containers:
          - {name: app, image: "nginx:1.25", ports: [{containerPort: 80}], env: [{name: A, value: "1"}]}
    """)


def test_get_yaml_apply_round_trip(kubectl: Kubectl, tmp_path: Path) -> None:
    """``kubectl get svc,cm,deploy -o yaml > list.yaml && kubectl apply -f list.yaml``: a List with
    resourceVersion, uid, managedFields and status in every item applies without error and changes
    nothing but the last-applied annotation; applying the same (now stale) file again is a Conflict,
    exactly as on a real cluster."""
    ns = _ns(kubectl, "round-trip")
    kubectl("create", "service", "clusterip", "svc-rt", "--tcp=80:8080", "-n", ns)
    kubectl("create", "configmap", "cm-rt", "--from-literal=k=v", "-n", ns)
    kubectl("apply", "-n", ns, "-f", "-", input=DEPLOY)
    before = {(o["kind"], o["metadata"]["name"]): o
              for o in kubectl.json("get", "svc,cm,deploy", "-n", ns)["items"]}
    dump = kubectl("get", "svc,cm,deploy", "-n", ns, "-o", "yaml")
    assert yaml.safe_load(dump)["kind"] == "List"
    f = tmp_path / "list.yaml"
    f.write_text(dump)
    res = kubectl.run("apply", "-f", str(f))
    out = res.stdout
    assert "service/svc-rt configured" in out and "configmap/cm-rt configured" in out
    assert "deployment.apps/rt" in out
    after = {(o["kind"], o["metadata"]["name"]): o
             for o in kubectl.json("get", "svc,cm,deploy", "-n", ns)["items"]}
    for key, old in before.items():
        new = after[key]
        for part in ("spec", "data", "status"):
            assert new.get(part) == old.get(part), (key, part)
        assert new["metadata"]["uid"] == old["metadata"]["uid"]
    res = kubectl.run("apply", "-f", str(f), check=False)
    assert res.returncode == 1
    assert ('Operation cannot be fulfilled on services "svc-rt": the object has been modified; please apply '
            "your changes to the latest version and try again") in res.stderr


def test_explain(kubectl: Kubectl) -> None:
    """explain reads /openapi/v3 (default) and /openapi/v2 (``plaintext-openapiv2``): fields and types."""
    out = kubectl("explain", "configmap")
    assert "KIND:       ConfigMap" in out and "data\t<map[string]string>" in out and "immutable\t<boolean>" in out
    out = kubectl("explain", "deployment.spec.template.spec.containers")
    assert "FIELD: containers <[]Object>" in out and "env\t<[]Object>" in out
    out = kubectl("explain", "secret", "--output=plaintext-openapiv2")
    assert "KIND:     Secret" in out and "stringData\t<map[string]string>" in out
    res = kubectl.run("explain", "configmap.nosuchfield", check=False)
    assert res.returncode == 1 and 'field "nosuchfield" does not exist' in res.stderr
