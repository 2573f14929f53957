"""In-process store, patch algorithms, performance and the CLI entry point."""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from trafficmgr.apiserver import ApiError, APIServer, Store
from trafficmgr.apiserver.patch import json_patch, merge_patch, strategic_merge

REPO = Path(__file__).resolve().parents[2]


def _pod(i: int, ns: str = "default") -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"p-{i}", "namespace": ns, "labels": {"app": f"a{i % 10}"}},
            "spec": {"containers": [{"name": "c", "image": "x"}]},
            "status": {"phase": "Running", "podIP": f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"}}


def test_strategic_merge_directives() -> None:
    orig = {"spec": {"containers": [{"name": "a", "image": "1", "env": [{"name": "X", "value": "1"}]},
                                    {"name": "b", "image": "1"}],
                     "ports": [{"containerPort": 80, "name": "http"}],
                     "volumes": [{"name": "v", "emptyDir": {}}]},
            "metadata": {"finalizers": ["x"], "labels": {"k": "v"}}}
    patch = {"$setElementOrder/containers": [{"name": "c"}, {"name": "a"}],
             "spec": {"$setElementOrder/containers": [{"name": "c"}, {"name": "a"}],
                      "containers": [{"name": "a", "env": [{"name": "Y", "value": "2"}]},
                                     {"name": "b", "$patch": "delete"}, {"name": "c", "image": "3"}],
                      "volumes": [{"name": "v", "$retainKeys": ["name", "configMap"], "configMap": {"name": "m"}}]},
             "metadata": {"finalizers": ["y"], "labels": {"k": None}}}
    out = strategic_merge(orig, patch)
    cs = out["spec"]["containers"]
    assert [c["name"] for c in cs] == ["c", "a"]
    assert cs[1]["env"] == [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}]
    assert out["spec"]["volumes"] == [{"name": "v", "configMap": {"name": "m"}}]
    assert out["metadata"] == {"finalizers": ["x", "y"], "labels": {}}
    assert strategic_merge({"a": [1, 2]}, {"a": [3]}) == {"a": [3]}
    assert strategic_merge({"s": {"x": 1}}, {"s": {"$patch": "replace", "y": 2}}) == {"s": {"y": 2}}
    assert orig["spec"]["containers"][1]["name"] == "b"


def test_json_and_merge_patch() -> None:
    doc = {"a": {"b": [1, 2]}, "c": 1}
    assert json_patch(doc, [{"op": "add", "path": "/a/b/-", "value": 3},
                            {"op": "remove", "path": "/c"},
                            {"op": "add", "path": "/x~1y", "value": True}]) == {"a": {"b": [1, 2, 3]}, "x/y": True}
    assert json_patch(doc, [{"op": "move", "from": "/c", "path": "/d"}]) == {"a": {"b": [1, 2]}, "d": 1}
    with pytest.raises(ApiError):
        json_patch(doc, [{"op": "test", "path": "/c", "value": 2}])
    assert merge_patch(doc, {"a": None, "c": {"z": 1}}) == {"c": {"z": 1}}


def test_generation_resource_version_and_status() -> None:
    s = Store()
    d = s.create({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
                  "spec": {"replicas": 1, "template": {}}})
    assert d["metadata"]["generation"] == 1 and d["metadata"]["uid"]
    rv1 = int(d["metadata"]["resourceVersion"])
    d2 = s.patch("deployments", "d", {"metadata": {"labels": {"a": "b"}}})
    assert d2["metadata"]["generation"] == 1 and int(d2["metadata"]["resourceVersion"]) == rv1 + 1
    d3 = s.patch("deployments", "d", {"spec": {"replicas": 2}})
    assert d3["metadata"]["generation"] == 2
    same = s.patch("deployments", "d", {"spec": {"replicas": 2}})
    assert same["metadata"]["resourceVersion"] == d3["metadata"]["resourceVersion"]
    s.update({**d3, "status": {"replicas": 7}}, subresource="status")
    assert s.get("deployments", "d")["status"] == {"replicas": 7}
    with pytest.raises(ApiError) as exc:
        s.update(d)
    assert exc.value.code == 409 and exc.value.reason == "Conflict"
    with pytest.raises(ApiError) as exc:
        s.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "Bad_Name"}})
    assert exc.value.code == 422 and exc.value.reason == "Invalid"


def test_namespace_delete_cascades_and_gc() -> None:
    s = Store()
    s.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "tmp"}})
    owner = s.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner", "namespace": "tmp"}})
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"]}
    s.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "child", "namespace": "tmp",
                                                                "ownerReferences": [ref]}})
    s.create(_pod(1, "tmp"))
    s.delete("configmaps", "owner", "tmp")
    assert s.list("secrets", "tmp")["items"] == []
    s.delete("namespaces", "tmp")
    assert s.list("pods", "tmp")["items"] == []


def test_in_process_watch_window() -> None:
    s = Store(history=5)
    w = s.watch("configmaps", "default")
    s.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}})
    assert w.queue.get(timeout=1)[0] == "ADDED"
    rv = s.resource_version
    for i in range(10):
        s.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"x{i}"}})
    with pytest.raises(ApiError) as exc:
        s.watch("configmaps", resource_version=rv)
    assert exc.value.code == 410 and exc.value.reason == "Expired"
    w2 = s.watch("configmaps", resource_version=str(int(s.resource_version) - 3))
    assert [w2.queue.get(timeout=1)[1]["metadata"]["name"] for _ in range(3)] == ["x7", "x8", "x9"]
    s.stop_watch(w)
    assert w.closed


def test_ten_thousand_pods_fast() -> None:
    srv = APIServer(endpointslice_controller=True).start()
    try:
        srv.store.create({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "big"},
                          "spec": {"selector": {"app": "a1"}, "ports": [{"port": 80}]}})
        t0 = time.perf_counter()
        for i in range(10000):
            srv.store.create(_pod(i))
        elapsed = time.perf_counter() - t0
        assert elapsed < 3.0, elapsed
        t0 = time.perf_counter()
        body = urllib.request.urlopen(srv.url + "/api/v1/pods", timeout=30).read()
        assert len(json.loads(body)["items"]) == 10000
        assert time.perf_counter() - t0 < 3.0
        body = urllib.request.urlopen(srv.url + "/api/v1/namespaces/default/pods?labelSelector=app%3Da3",
                                      timeout=30).read()
        assert len(json.loads(body)["items"]) == 1000
        assert srv.wait_idle(20)
        (sl,) = srv.store.list("endpointslices", "default", label_selector="kubernetes.io/service-name=big")["items"]
        assert len(sl["endpoints"]) == 1000
    finally:
        srv.stop()


def test_module_entry_point(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    kc = tmp_path / "kc.yaml"
    proc = subprocess.Popen([sys.executable, "-m", "trafficmgr.apiserver", "--port", str(port), "--kubeconfig",
                             str(kc)], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                cfg = yaml.safe_load(kc.read_text())
                ca = base64.b64decode(cfg["clusters"][0]["cluster"]["certificate-authority-data"]).decode()
                req = urllib.request.Request(f"https://127.0.0.1:{port}/version",
                                             headers={"Authorization": f"Bearer {cfg['users'][0]['user']['token']}"})
                ctx = ssl.create_default_context(cadata=ca)
                v = json.loads(urllib.request.urlopen(req, timeout=1, context=ctx).read())
                break
            except (OSError, TypeError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        assert v["minor"] == "32" and v["gitVersion"] == "v1.32.0"
        assert f"https://127.0.0.1:{port}" in kc.read_text()
        assert kc.stat().st_mode & 0o777 == 0o600
    finally:
        proc.terminate()
        proc.wait(5)
