"""The real kubectl against the local API server: /openapi/v2, List manifests, the get -o yaml | apply
round trip, kubectl explain, kubectl diff (dry run) and kubectl apply --server-side (field ownership).

Each test uses its own namespace, so it depends on no object another test created.
"""

from __future__ import annotations

import json
import ssl
import subprocess
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
    assert "FIELD: containers <[]Object>" in out and "env\t<[]Object>" in out and "image\t<string>" in out
    out = kubectl("explain", "deployment.spec.replicas")
    assert "FIELD: replicas <integer>" in out and "desired number of pods" in out
    out = kubectl("explain", "service.spec.ports")
    assert "targetPort\t<string>" in out and "port\t<integer>" in out
    out = kubectl("explain", "secret", "--output=plaintext-openapiv2")
    assert "KIND:     Secret" in out and "stringData\t<map[string]string>" in out
    res = kubectl.run("explain", "configmap.nosuchfield", check=False)
    assert res.returncode == 1 and 'field "nosuchfield" does not exist' in res.stderr


def _cm(name: str, data: dict, labels: dict | None = None) -> str:
    md: dict = {"name": name}
    if labels:
        md["labels"] = labels
    return yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap", "metadata": md, "data": data})


def _managers(kubectl: Kubectl, *args: str) -> dict[str, dict]:
    got = kubectl.json("get", *args, "--show-managed-fields")
    return {e["manager"]: e for e in got["metadata"]["managedFields"] if e["operation"] == "Apply"}


def test_server_side_apply_ownership(kubectl: Kubectl) -> None:
    """Field ownership per manager: managedFields as kube-apiserver writes them, 409 with its message
    when another manager's field would change, shared ownership for equal values, --force-conflicts
    takes fields over, and a manager's dropped fields go unless another manager owns them."""
    ns = _ns(kubectl, "ssa-own")
    ssa = ["apply", "--server-side", "-n", ns, "-f", "-"]
    assert "configmap/own serverside-applied" in kubectl(*ssa, input=_cm("own", {"a": "1", "b": "2"}, {"t": "x"}))
    mf = _managers(kubectl, "cm", "own", "-n", ns)
    assert mf["kubectl"]["fieldsV1"] == {"f:data": {"f:a": {}, "f:b": {}}, "f:metadata": {"f:labels": {"f:t": {}}}}
    assert mf["kubectl"]["fieldsType"] == "FieldsV1" and mf["kubectl"]["apiVersion"] == "v1"

    other = ["--field-manager=other", *ssa]
    res = kubectl.run(*other, input=_cm("own", {"a": "9", "c": "3"}, {"t": "x"}), check=False)
    assert res.returncode == 1
    assert res.stderr.startswith('error: Apply failed with 1 conflict: conflict with "kubectl": .data.a\n')
    assert "--force-conflicts" in res.stderr
    assert kubectl.json("get", "cm", "own", "-n", ns)["data"] == {"a": "1", "b": "2"}  # nothing written

    res = kubectl.run(*other, input=_cm("own", {"a": "8", "b": "7"}), check=False)
    assert ('error: Apply failed with 2 conflicts: conflict with "kubectl"\n- .data.a\n- .data.b\n'
            in res.stderr), res.stderr

    kubectl(*other, input=_cm("own", {"b": "2", "c": "3"}, {"t": "x"}))  # equal values: shared, no conflict
    mf = _managers(kubectl, "cm", "own", "-n", ns)
    assert mf["other"]["fieldsV1"] == {"f:data": {"f:b": {}, "f:c": {}}, "f:metadata": {"f:labels": {"f:t": {}}}}
    assert kubectl.json("get", "cm", "own", "-n", ns)["data"] == {"a": "1", "b": "2", "c": "3"}

    kubectl("--force-conflicts", *other, input=_cm("own", {"a": "9", "b": "2", "c": "3"}, {"t": "x"}))
    mf = _managers(kubectl, "cm", "own", "-n", ns)
    assert mf["kubectl"]["fieldsV1"] == {"f:data": {"f:b": {}}, "f:metadata": {"f:labels": {"f:t": {}}}}
    assert mf["other"]["fieldsV1"]["f:data"] == {"f:a": {}, "f:b": {}, "f:c": {}}

    # kubectl now applies only a label: b and t stay (other owns them too), nothing of kubectl's is left alone
    kubectl(*ssa, input=_cm("own", {}, {"only": "k"}).replace("data: {}\n", ""))
    got = kubectl.json("get", "cm", "own", "-n", ns)
    assert got["data"] == {"a": "9", "b": "2", "c": "3"} and got["metadata"]["labels"] == {"t": "x", "only": "k"}
    # other drops c and t: both go (nobody else owns them)
    kubectl(*other, input=_cm("own", {"a": "9", "b": "2"}))
    got = kubectl.json("get", "cm", "own", "-n", ns)
    assert got["data"] == {"a": "9", "b": "2"} and got["metadata"]["labels"] == {"only": "k"}


SSA_DEPLOY = textwrap.dedent("""\
    apiVersion: apps/v1
    kind: Deployment
    metadata: {name: sd}
    spec:
      replicas: 1
      selector: {matchLabels: {app: sd}}
      template:
        metadata: {labels: {app: sd}}
        spec:
          containers:
          - {name: app, image: "nginx:1", env: [{name: A, value: "1"}]}
          - {name: side, image: busybox}
    """)


def test_server_side_apply_keyed_lists(kubectl: Kubectl) -> None:
    """Containers are owned per item (``k:{"name":...}``): a dropped container goes whole, a conflict
    names the item, another manager's container in the same list is kept."""
    ns = _ns(kubectl, "ssa-list")
    ssa = ["apply", "--server-side", "-n", ns, "-f", "-"]
    kubectl(*ssa, input=SSA_DEPLOY)
    fields = _managers(kubectl, "deploy", "sd", "-n", ns)["kubectl"]["fieldsV1"]
    app = fields["f:spec"]["f:template"]["f:spec"]["f:containers"]['k:{"name":"app"}']
    assert app == {".": {}, "f:name": {}, "f:image": {},
                   "f:env": {'k:{"name":"A"}': {".": {}, "f:name": {}, "f:value": {}}}}
    extra = textwrap.dedent("""\
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: sd}
        spec:
          template:
            spec:
              containers:
              - {name: %s, image: "%s"}
        """)
    res = kubectl.run("--field-manager=team-b", *ssa, input=extra % ("app", "nginx:2"), check=False)
    assert res.returncode == 1
    assert ('Apply failed with 1 conflict: conflict with "kubectl": '
            '.spec.template.spec.containers[name="app"].image') in res.stderr
    kubectl("--field-manager=team-b", *ssa, input=extra % ("logger", "fluent"))
    kubectl(*ssa, input=SSA_DEPLOY.replace('"nginx:1"', '"nginx:2"').replace("      - {name: side, image: busybox}\n", ""))
    cs = kubectl.json("get", "deploy", "sd", "-n", ns)["spec"]["template"]["spec"]["containers"]
    assert [(c["name"], c["image"]) for c in cs] == [("app", "nginx:2"), ("logger", "fluent")]
    assert cs[0]["env"] == [{"name": "A", "value": "1"}]


def test_diff_is_a_dry_run(kubectl: Kubectl, server: APIServer) -> None:
    """kubectl diff (client-side and --server-side) sends dryRun=All patches/creates: the diff shows the
    change, exit code 1, and nothing is stored; no change is exit code 0."""
    ns = _ns(kubectl, "diffs")
    kubectl("apply", "-n", ns, "-f", "-", input=DEPLOY)
    rv = server.store.resource_version
    changed = DEPLOY.replace('"nginx:1.25"', '"nginx:1.26"')
    for extra in ([], ["--server-side"]):
        res = kubectl.run("diff", *extra, "-n", ns, "-f", "-", input=changed, check=False)
        assert res.returncode == 1, res.stderr
        assert "-        image: nginx:1.25\n+        image: nginx:1.26" in res.stdout
        assert "resourceVersion" not in "".join(ln for ln in res.stdout.splitlines(True) if ln[:1] in "+-"
                                                and not ln.startswith(("+++", "---")))
    new = _cm("fresh", {"k": "v"})
    res = kubectl.run("diff", "-n", ns, "-f", "-", input=new, check=False)
    assert res.returncode == 1 and "+  k: v" in res.stdout
    res = kubectl.run("diff", "--server-side", "-n", ns, "-f", "-", input=new, check=False)
    assert res.returncode == 1 and "+  k: v" in res.stdout
    assert server.store.resource_version == rv  # nothing stored by any of the dry runs
    assert kubectl.run("get", "cm", "fresh", "-n", ns, check=False).returncode == 1
    res = kubectl.run("diff", "-n", ns, "-f", "-", input=DEPLOY, check=False)
    assert res.returncode == 0 and res.stdout == ""


def test_server_side_apply_after_other_writes(kubectl: Kubectl) -> None:
    """Writes that are not applies own the fields they change (Update managers): an apply changing a
    field ``kubectl scale`` or ``kubectl label`` set conflicts, naming that manager as kube-apiserver
    does; ``kubectl apply`` then ``kubectl apply --server-side`` moves ownership without conflict (the
    last-applied annotation), but another applier conflicts with kubectl-client-side-apply."""
    ns = _ns(kubectl, "ssa-upd")
    kubectl("create", "service", "clusterip", "made", "--tcp=80:8080", "-n", ns)
    entries = kubectl.json("get", "svc", "made", "-n", ns, "--show-managed-fields")["metadata"]["managedFields"]
    (created,) = entries
    assert created["manager"] == "kubectl-create" and created["operation"] == "Update"
    spec = created["fieldsV1"]["f:spec"]
    assert set(spec) == {"f:ports", "f:selector", "f:sessionAffinity", "f:type"}  # defaults too, not clusterIP
    assert spec["f:ports"]['k:{"port":80}'] == {".": {}, "f:name": {}, "f:port": {}, "f:protocol": {},
                                                 "f:targetPort": {}}

    ssa = ["apply", "--server-side", "-n", ns, "-f", "-"]
    kubectl(*ssa, input=SSA_DEPLOY)
    kubectl("scale", "deployment", "sd", "--replicas=3", "-n", ns)
    res = kubectl.run(*ssa, input=SSA_DEPLOY, check=False)
    assert res.returncode == 1
    assert ('error: Apply failed with 1 conflict: conflict with "kubectl" with subresource "scale" using '
            "apps/v1: .spec.replicas\n") in res.stderr
    kubectl(*ssa, input=SSA_DEPLOY.replace("replicas: 1", "replicas: 3"))  # same value: co-owned
    kubectl("label", "deployment", "sd", "tier=web", "-n", ns)
    res = kubectl.run(*ssa, input=SSA_DEPLOY.replace("metadata: {name: sd}", "metadata: {name: sd, labels: "
                                                     "{tier: db}}").replace("replicas: 1", "replicas: 3"),
                      check=False)
    assert 'conflict with "kubectl-label" using apps/v1: .metadata.labels.tier' in res.stderr

    kubectl("apply", "-n", ns, "-f", "-", input=DEPLOY)  # client-side apply
    moved = DEPLOY.replace('"nginx:1.25"', '"nginx:1.27"')
    res = kubectl.run("--field-manager=other", *ssa, input=moved, check=False)
    assert res.returncode == 1 and 'conflict with "kubectl-client-side-apply" using apps/v1' in res.stderr
    kubectl(*ssa, input=moved)
    d = kubectl.json("get", "deploy", "rt", "-n", ns, "--show-managed-fields")
    assert d["spec"]["template"]["spec"]["containers"][0]["image"] == "nginx:1.27"
    assert "kubectl-client-side-apply" not in {e["manager"] for e in d["metadata"]["managedFields"]}


def _raw_apply(server: APIServer, path: str, body: dict) -> tuple[int, dict]:
    assert server.credentials is not None
    ctx = ssl.create_default_context(cadata=server.credentials.cert_pem)
    req = urllib.request.Request(server.url + path, data=json.dumps(body).encode(), method="PATCH", headers={
        "Content-Type": "application/apply-patch+yaml", "Authorization": f"Bearer {server.credentials.token}"})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_apply_request_errors(server: APIServer) -> None:
    """Bad apply requests get kube-apiserver's clear errors; a good one creates (201) then updates (200)."""
    base = "/api/v1/namespaces/default/configmaps/errs"
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "errs"}, "data": {"a": "1"}}
    code, st = _raw_apply(server, base, cm)
    assert code == 400 and "fieldManager: Required value" in st["message"]
    code, st = _raw_apply(server, base + "?fieldManager=" + "m" * 129, cm)
    assert code == 400 and "at most 128" in st["message"]
    code, st = _raw_apply(server, base + "?fieldManager=t", {**cm, "metadata": {"name": "errs", "namespace": "x"}})
    assert code == 400 and "namespace of the provided object does not match" in st["message"]
    code, st = _raw_apply(server, base + "?fieldManager=t", {**cm, "kind": "Secret"})
    assert code == 400 and "does not match the URL" in st["message"]
    code, st = _raw_apply(server, base + "?fieldManager=t",
                          {**cm, "metadata": {"name": "errs", "managedFields": [{"manager": "x"}]}})
    assert code == 400 and st["message"] == "metadata.managedFields must be nil"
    assert _raw_apply(server, base + "?fieldManager=t", cm)[0] == 201
    assert _raw_apply(server, base + "?fieldManager=t", cm)[0] == 200


def test_edit_then_apply_conflicts(kubectl: Kubectl) -> None:
    """``kubectl edit`` (an editor run on the object, then a patch) works, and the field it changed is
    kubectl-edit's: an apply changing it again conflicts with that manager."""
    ns = _ns(kubectl, "edits")
    kubectl("apply", "--server-side", "-n", ns, "-f", "-", input=_cm("ed", {"k": "one"}))
    env = {**kubectl.env, "KUBE_EDITOR": "sed -i s/k:\\ one/k:\\ two/"}
    res = subprocess.run(["kubectl", "edit", "cm", "ed", "-n", ns], env=env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0 and "configmap/ed edited" in res.stdout, res.stderr
    assert kubectl.json("get", "cm", "ed", "-n", ns)["data"] == {"k": "two"}
    res = kubectl.run("apply", "--server-side", "-n", ns, "-f", "-", input=_cm("ed", {"k": "three"}), check=False)
    assert 'Apply failed with 1 conflict: conflict with "kubectl-edit" using v1: .data.k' in res.stderr
