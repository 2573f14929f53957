"""The official Python ``kubernetes`` client against the in-memory API server."""

from __future__ import annotations

import threading
import time

import pytest
import urllib3
from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from trafficmgr.apiserver import APIServer
from trafficmgr.apiserver.access import new_token


def _pod(name: str, labels: dict | None = None, phase: str = "Running", node: str = "n1") -> client.V1Pod:
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, labels=labels or {}),
        spec=client.V1PodSpec(node_name=node, containers=[client.V1Container(name="c", image="x")]),
        status=client.V1PodStatus(phase=phase))


def test_list_then_watch_from_resource_version(api, server: APIServer) -> None:
    v1 = client.CoreV1Api(api)
    v1.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="w1")))
    v1.create_namespaced_config_map("w1", client.V1ConfigMap(metadata=client.V1ObjectMeta(name="pre")))
    lst = v1.list_namespaced_config_map("w1")
    assert [c.metadata.name for c in lst.items] == ["pre"]
    rv = lst.metadata.resource_version

    def writer() -> None:
        time.sleep(0.2)
        v1.create_namespaced_config_map("w1", client.V1ConfigMap(metadata=client.V1ObjectMeta(name="a"),
                                                                 data={"k": "1"}))
        v1.patch_namespaced_config_map("a", "w1", {"data": {"k": "2"}})
        v1.delete_namespaced_config_map("a", "w1")

    t = threading.Thread(target=writer)
    t.start()
    seen = []
    w = watch.Watch()
    for ev in w.stream(v1.list_namespaced_config_map, "w1", resource_version=rv, timeout_seconds=5):
        seen.append((ev["type"], ev["object"].metadata.name, (ev["object"].data or {}).get("k")))
        if ev["type"] == "DELETED":
            w.stop()
    t.join()
    assert seen == [("ADDED", "a", "1"), ("MODIFIED", "a", "2"), ("DELETED", "a", "2")]
    assert int(w.resource_version) > int(rv)


def test_watch_without_version_sends_current_state(api) -> None:
    v1 = client.CoreV1Api(api)
    v1.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="w2")))
    for n in ("x", "y"):
        v1.create_namespaced_config_map("w2", client.V1ConfigMap(metadata=client.V1ObjectMeta(name=n)))
    events = list(watch.Watch().stream(v1.list_namespaced_config_map, "w2", timeout_seconds=1))
    assert sorted((e["type"], e["object"].metadata.name) for e in events) == [("ADDED", "x"), ("ADDED", "y")]


def test_expired_resource_version_gives_410(api, server: APIServer) -> None:
    v1 = client.CoreV1Api(api)
    rv = v1.list_namespaced_config_map("default").metadata.resource_version
    v1.create_namespaced_config_map("default", client.V1ConfigMap(metadata=client.V1ObjectMeta(name="exp")))
    server.expire_history()
    # With timeout_seconds the client does not retry and raises the 410 from the ERROR event.
    with pytest.raises(ApiException) as exc:
        for _ in watch.Watch().stream(v1.list_namespaced_config_map, "default", resource_version=rv,
                                      timeout_seconds=2):
            pass
    assert exc.value.status == 410
    assert "Expired" in exc.value.reason and "too old resource version" in exc.value.reason
    # The raw stream is a single ERROR event carrying a v1 Status.
    resp = v1.list_namespaced_config_map("default", watch=True, resource_version=rv, _preload_content=False)
    import json
    lines = [json.loads(ln) for ln in resp.read().decode().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0]["type"] == "ERROR"
    assert lines[0]["object"]["code"] == 410 and lines[0]["object"]["reason"] == "Expired"
    # A watch from the current version still works.
    cur = v1.list_namespaced_config_map("default").metadata.resource_version
    assert list(watch.Watch().stream(v1.list_namespaced_config_map, "default", resource_version=cur,
                                     timeout_seconds=1)) == []


def test_bookmarks(api, server: APIServer) -> None:
    v1 = client.CoreV1Api(api)
    rv = v1.list_namespaced_config_map("default").metadata.resource_version
    w = watch.Watch()
    types = []
    start = time.monotonic()
    for ev in w.stream(v1.list_namespaced_config_map, "default", resource_version=rv,
                       allow_watch_bookmarks=True, timeout_seconds=3):
        types.append(ev["type"])
        if ev["type"] == "BOOKMARK":
            w.stop()
    assert types == ["BOOKMARK"] and time.monotonic() - start < 2.5
    assert int(w.resource_version) >= int(rv)


def test_label_and_field_selectors(api) -> None:
    v1 = client.CoreV1Api(api)
    v1.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="sel")))
    v1.create_namespaced_pod("sel", _pod("p1", {"app": "a", "tier": "fe"}, node="n1"))
    v1.create_namespaced_pod("sel", _pod("p2", {"app": "b", "tier": "be"}, node="n2", phase="Pending"))
    v1.create_namespaced_pod("sel", _pod("p3", {"app": "c"}, node="n1"))

    def names(**kw) -> list[str]:
        return sorted(p.metadata.name for p in v1.list_namespaced_pod("sel", **kw).items)

    assert names(label_selector="app=a") == ["p1"]
    assert names(label_selector="app!=a") == ["p2", "p3"]
    assert names(label_selector="app in (a,b)") == ["p1", "p2"]
    assert names(label_selector="app notin (a,b)") == ["p3"]
    assert names(label_selector="tier") == ["p1", "p2"]
    assert names(label_selector="!tier") == ["p3"]
    assert names(label_selector="app in (a,b),tier=be") == ["p2"]
    assert names(field_selector="metadata.name=p3") == ["p3"]
    assert names(field_selector="spec.nodeName=n1") == ["p1", "p3"]
    assert names(field_selector="status.phase=Pending") == ["p2"]
    assert names(field_selector="status.phase!=Pending,spec.nodeName=n1") == ["p1", "p3"]
    all_ns = [p.metadata.name for p in v1.list_pod_for_all_namespaces(field_selector="metadata.namespace=sel").items]
    assert sorted(all_ns) == ["p1", "p2", "p3"]
    with pytest.raises(ApiException) as exc:
        v1.list_namespaced_pod("sel", label_selector="app in a,b)")
    assert exc.value.status == 400

    # Watch with a label selector: a pod leaving the selection is seen as DELETED.
    rv = v1.list_namespaced_pod("sel").metadata.resource_version
    v1.patch_namespaced_pod("p1", "sel", {"metadata": {"labels": {"app": "z"}}})
    v1.patch_namespaced_pod("p3", "sel", {"metadata": {"labels": {"app": "a"}}})
    evs = [(e["type"], e["object"].metadata.name) for e in watch.Watch().stream(
        v1.list_namespaced_pod, "sel", label_selector="app=a", resource_version=rv, timeout_seconds=1)]
    assert evs == [("DELETED", "p1"), ("ADDED", "p3")]


def test_conflict_on_stale_update_and_errors(api) -> None:
    v1 = client.CoreV1Api(api)
    cm = v1.create_namespaced_config_map("default", client.V1ConfigMap(metadata=client.V1ObjectMeta(name="cf"),
                                                                       data={"a": "1"}))
    cm.data = {"a": "2"}
    updated = v1.replace_namespaced_config_map("cf", "default", cm)
    assert int(updated.metadata.resource_version) > int(cm.metadata.resource_version)
    cm.data = {"a": "3"}
    with pytest.raises(ApiException) as exc:
        v1.replace_namespaced_config_map("cf", "default", cm)
    assert exc.value.status == 409
    import json
    body = json.loads(exc.value.body)
    assert body["kind"] == "Status" and body["reason"] == "Conflict"
    with pytest.raises(ApiException) as exc:
        v1.create_namespaced_config_map("default", client.V1ConfigMap(metadata=client.V1ObjectMeta(name="cf")))
    assert exc.value.status == 409 and json.loads(exc.value.body)["reason"] == "AlreadyExists"
    with pytest.raises(ApiException) as exc:
        v1.read_namespaced_config_map("missing", "default")
    assert exc.value.status == 404 and json.loads(exc.value.body)["details"]["kind"] == "configmaps"
    with pytest.raises(ApiException) as exc:
        v1.create_namespaced_config_map("no-such-ns", client.V1ConfigMap(metadata=client.V1ObjectMeta(name="x")))
    assert exc.value.status == 404
    gen = v1.create_namespaced_config_map("default", client.V1ConfigMap(
        metadata=client.V1ObjectMeta(generate_name="gen-")))
    assert gen.metadata.name.startswith("gen-") and len(gen.metadata.name) == 9


def test_patch_types(api) -> None:
    apps = client.AppsV1Api(api)
    dep = client.V1Deployment(
        metadata=client.V1ObjectMeta(name="pt"),
        spec=client.V1DeploymentSpec(
            replicas=1, selector=client.V1LabelSelector(match_labels={"app": "pt"}),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels={"app": "pt"}),
                spec=client.V1PodSpec(containers=[client.V1Container(name="a", image="a:1"),
                                                  client.V1Container(name="b", image="b:1")]))))
    apps.create_namespaced_deployment("default", dep)
    # The Python client sends dict bodies as strategic merge patches: containers merge by name.
    out = apps.patch_namespaced_deployment("pt", "default", {"spec": {"template": {"spec": {
        "containers": [{"name": "b", "image": "b:2"}]}}}})
    assert [(c.name, c.image) for c in out.spec.template.spec.containers] == [("a", "a:1"), ("b", "b:2")]
    assert out.metadata.generation == 2
    out = apps.patch_namespaced_deployment("pt", "default", {"spec": {"template": {"spec": {
        "containers": [{"name": "a", "$patch": "delete"}]}}}})
    assert [c.name for c in out.spec.template.spec.containers] == ["b"]
    # JSON patch (a list body).
    out = apps.patch_namespaced_deployment("pt", "default", [
        {"op": "replace", "path": "/spec/replicas", "value": 3}])
    assert out.spec.replicas == 3
    scale = apps.read_namespaced_deployment_scale("pt", "default")
    assert scale.spec.replicas == 3 and scale.status.selector == "app=pt"
    apps.patch_namespaced_deployment_scale("pt", "default", {"spec": {"replicas": 5}})
    assert apps.read_namespaced_deployment("pt", "default").spec.replicas == 5
    # Status subresource only changes status; main-resource writes keep status.
    apps.patch_namespaced_deployment_status("pt", "default", {"status": {"readyReplicas": 2}})
    apps.patch_namespaced_deployment("pt", "default", {"status": {"readyReplicas": 9}})
    assert apps.read_namespaced_deployment("pt", "default").status.ready_replicas == 2


def test_events_both_apis(api) -> None:
    v1 = client.CoreV1Api(api)
    ev = v1.create_namespaced_event("default", client.CoreV1Event(
        metadata=client.V1ObjectMeta(name="e1"), reason="R", message="m", type="Warning",
        involved_object=client.V1ObjectReference(kind="Service", name="s", namespace="default")))
    assert ev.count == 1
    new = client.EventsV1Api(api).read_namespaced_event("e1", "default")
    assert new.note == "m" and new.regarding.name == "s"
    evs = v1.list_namespaced_event("default", field_selector="involvedObject.kind=Service,involvedObject.name=s")
    assert [e.metadata.name for e in evs.items] == ["e1"]
    v1.patch_namespaced_event("e1", "default", {"count": 4})
    assert client.EventsV1Api(api).read_namespaced_event("e1", "default").deprecated_count == 4


def test_drop_watches_and_restart(tmp_path) -> None:
    srv = APIServer(bookmark_interval=0.2, token=new_token()).start()
    cfg = srv.api_client().configuration
    with client.ApiClient(cfg) as api:
        v1 = client.CoreV1Api(api)
        v1.create_namespaced_config_map("default", client.V1ConfigMap(metadata=client.V1ObjectMeta(name="k")))
        rv = v1.list_namespaced_config_map("default").metadata.resource_version
        # A read timeout bounds the wait: were the watch not dropped, read() would end in ReadTimeoutError.
        resp = v1.list_namespaced_config_map("default", watch=True, resource_version=rv, _preload_content=False,
                                             _request_timeout=(5, 5))
        deadline = time.monotonic() + 2
        while not srv._httpd.open_watches() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(srv._httpd.open_watches()) == 1
        srv.drop_watches()
        # A dropped watch is cut mid-body: no terminating chunk, so urllib3 reports the chunked body as
        # incomplete (a clean end would return the body; a watch left open would time out instead).
        start = time.monotonic()
        with pytest.raises(urllib3.exceptions.ProtocolError, match="IncompleteRead"):
            resp.read()
        assert time.monotonic() - start < 2, "the dropped watch did not end promptly"
        deadline = time.monotonic() + 2
        while srv._httpd.open_watches() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not srv._httpd.open_watches(), "the server still holds the dropped watch"
        srv.stop()
    port = srv.port
    srv2 = APIServer(port=port, store=srv.store, fresh_window=True).start()  # same token and certificate
    try:
        cfg.host = srv2.url
        with client.ApiClient(cfg) as api:
            v1 = client.CoreV1Api(api)
            assert v1.read_namespaced_config_map("k", "default").metadata.name == "k"
            with pytest.raises(ApiException) as exc:
                list(watch.Watch().stream(v1.list_namespaced_config_map, "default", resource_version=rv,
                                          timeout_seconds=1))
            assert exc.value.status == 410
    finally:
        srv2.stop()
