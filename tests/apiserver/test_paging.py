"""Lists through the real protocol: answers assembled from per-object cached encodings, and paged lists
(``limit``/``continue``) as kube-apiserver serves them, with the official client, raw HTTP and kubectl."""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from trafficmgr.apiserver import APIServer, paging
from trafficmgr.apiserver import store as store_mod
from trafficmgr.apiserver.access import new_token
from trafficmgr.testing.cluster import Kubectl

WIDGETS = {
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": "gadgets.paging.trafficmgr.io"},
    "spec": {"group": "paging.trafficmgr.io", "scope": "Namespaced",
             "names": {"plural": "gadgets", "kind": "Gadget"},
             "versions": [{"name": "v1", "served": True, "storage": True,
                           "schema": {"openAPIV3Schema": {"type": "object",
                                                          "x-kubernetes-preserve-unknown-fields": True}}},
                          {"name": "v2", "served": True, "storage": False,
                           "schema": {"openAPIV3Schema": {"type": "object",
                                                          "x-kubernetes-preserve-unknown-fields": True}}}]}}


@pytest.fixture(scope="module")
def srv() -> Iterator[APIServer]:
    s = APIServer(token=new_token()).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def v1(srv: APIServer) -> Iterator[client.CoreV1Api]:
    with srv.api_client() as c:
        yield client.CoreV1Api(c)


def _raw(srv: APIServer, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    assert srv.credentials is not None
    ctx = ssl.create_default_context(cadata=srv.credentials.cert_pem)
    conn = http.client.HTTPSConnection("127.0.0.1", srv.port, timeout=10, context=ctx)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {srv.token}", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _get(srv: APIServer, path: str) -> tuple[int, Any]:
    code, body = _raw(srv, path)
    return code, json.loads(body)


def _namespace(srv: APIServer, name: str, pods: int, labels: Any = None) -> None:
    st = srv.store
    st.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    for i in range(pods):
        lab = labels(i) if labels else {"app": "a"}
        st.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"p{i:03d}", "labels": lab},
                   "spec": {"containers": [{"name": "c", "image": "x"}]}}, namespace=name)


def _pages(srv: APIServer, path: str, limit: int) -> list[dict]:
    sep = "&" if "?" in path else "?"
    out, token = [], ""
    while True:
        code, body = _get(srv, f"{path}{sep}limit={limit}" + (f"&continue={token}" if token else ""))
        assert code == 200, body
        out.append(body)
        token = body["metadata"].get("continue", "")
        if not token:
            return out


# ---- (1) list answers from cached per-object encodings ---------------------------------------------


def test_list_bytes_equal_the_whole_encoding_for_every_kind(srv: APIServer) -> None:
    """Every list (core kinds, a namespace, events in both groups, a custom resource at its stored and at
    another version) is byte for byte the encoding of the whole list the server answered before, also
    after objects changed and were deleted between two lists (no stale cached encoding)."""
    st = srv.store
    _namespace(srv, "enc", 3)
    st.create({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s", "namespace": "enc"},
               "spec": {"ports": [{"port": 80}], "selector": {"app": "a"}}})
    st.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "enc"},
               "data": {"k": "é\u2028\"x"}})
    st.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s", "namespace": "enc"},
               "stringData": {"a": "b"}})
    st.create({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "namespace": "enc"},
               "spec": {"selector": {"matchLabels": {"app": "a"}},
                        "template": {"metadata": {"labels": {"app": "a"}}, "spec": {"containers": []}}}})
    st.create({"apiVersion": "v1", "kind": "Event", "metadata": {"name": "e", "namespace": "enc"},
               "involvedObject": {"kind": "Pod", "name": "p000"}, "message": "m", "reason": "R"})
    st.create(WIDGETS)
    st.create({"apiVersion": "paging.trafficmgr.io/v1", "kind": "Gadget", "metadata": {"name": "g",
               "namespace": "enc"}, "spec": {"n": 1}})
    paths = {
        "/api/v1/namespaces/enc/pods": ("pods", "enc"), "/api/v1/pods": ("pods", None),
        "/api/v1/namespaces/enc/services": ("services", "enc"), "/api/v1/namespaces": ("namespaces", None),
        "/api/v1/namespaces/enc/configmaps": ("configmaps", "enc"), "/api/v1/secrets": ("secrets", None),
        "/apis/apps/v1/namespaces/enc/deployments": ("deployments.apps", "enc"),
        "/api/v1/namespaces/enc/events": ("events", "enc"),
        "/apis/events.k8s.io/v1/namespaces/enc/events": ("events.events.k8s.io", "enc"),
        "/apis/discovery.k8s.io/v1/endpointslices": ("endpointslices.discovery.k8s.io", None),
        "/apis/paging.trafficmgr.io/v1/namespaces/enc/gadgets": ("paging.trafficmgr.io/v1/Gadget", "enc"),
        "/apis/paging.trafficmgr.io/v2/namespaces/enc/gadgets": ("paging.trafficmgr.io/v2/Gadget", "enc"),
    }

    def check() -> None:
        for path, (resource, ns) in paths.items():
            code, body = _raw(srv, path)
            rt = st.resource_type(resource)
            items, rv = st.list_raw(rt, ns)
            whole = json.JSONEncoder(separators=(",", ":")).encode(
                {"kind": rt.list_kind, "apiVersion": rt.api_version, "metadata": {"resourceVersion": rv},
                 "items": items}).encode()
            assert code == 200 and body == whole, path
            assert json.loads(body)["items"], path

    srv.wait_idle()
    check()
    check()  # from the cache now
    st.patch("pods", "p001", {"metadata": {"labels": {"changed": "yes"}}}, namespace="enc")
    st.patch("configmaps", "c", {"data": {"k": "new"}}, namespace="enc")
    st.patch("paging.trafficmgr.io/v1/Gadget", "g", {"spec": {"n": 2}}, namespace="enc")
    st.delete("pods", "p002", namespace="enc")
    srv.wait_idle()
    check()
    _, pods = _get(srv, "/api/v1/namespaces/enc/pods")
    assert [p["metadata"]["name"] for p in pods["items"]] == ["p000", "p001"]
    assert pods["items"][1]["metadata"]["labels"]["changed"] == "yes"


def test_a_second_list_encodes_only_the_changed_objects(srv: APIServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each stored object is encoded once: a repeated list encodes nothing, a list after one change encodes
    that one object; a watch reuses the same encodings."""
    _namespace(srv, "once", 20)
    assert _get(srv, "/api/v1/namespaces/once/pods")[0] == 200
    encoded: list[str] = []
    real = store_mod.encode_json

    def counting(obj: Any) -> bytes:
        encoded.append(obj["metadata"]["name"])
        return real(obj)

    monkeypatch.setattr(store_mod, "encode_json", counting)
    code, body = _get(srv, "/api/v1/namespaces/once/pods")
    assert code == 200 and len(body["items"]) == 20 and encoded == []
    srv.store.patch("pods", "p007", {"metadata": {"labels": {"x": "y"}}}, namespace="once")
    code, body = _get(srv, "/api/v1/namespaces/once/pods")
    assert encoded == ["p007"] and body["items"][7]["metadata"]["labels"]["x"] == "y"
    code, raw = _raw(srv, "/api/v1/namespaces/once/pods?watch=1&timeoutSeconds=1")
    events = [json.loads(line) for line in raw.splitlines()]
    assert len(events) == 20 and encoded == ["p007"]
    assert events[7] == {"type": "ADDED", "object": body["items"][7]}


# ---- (2) limit and continue --------------------------------------------------------------------------


def test_pages_concatenate_to_the_full_list_with_the_official_client(srv: APIServer, v1: client.CoreV1Api) -> None:
    _namespace(srv, "pg", 25)
    full = v1.list_namespaced_pod("pg")
    seen, token, remaining = [], None, []
    rvs = set()
    while True:
        page = v1.list_namespaced_pod("pg", limit=10, _continue=token)
        assert len(page.items) <= 10
        seen += page.items
        rvs.add(page.metadata.resource_version)
        remaining.append(page.metadata.remaining_item_count)
        token = page.metadata._continue
        if not token:
            break
    assert [p.metadata.name for p in seen] == [p.metadata.name for p in full.items]
    assert [p.to_dict() for p in seen] == [p.to_dict() for p in full.items]
    assert remaining == [15, 5, None] and rvs == {full.metadata.resource_version}
    # Raw bytes: the pages' items are exactly the full list's items.
    open_lists = len(srv.store.list_snapshots)
    pages = _pages(srv, "/api/v1/namespaces/pg/pods", 7)
    assert len(srv.store.list_snapshots) == open_lists  # a list read to the end releases its snapshot
    assert [len(p["items"]) for p in pages] == [7, 7, 7, 4]
    assert [i for p in pages for i in p["items"]] == _get(srv, "/api/v1/namespaces/pg/pods")[1]["items"]
    assert "continue" not in pages[-1]["metadata"] and "remainingItemCount" not in pages[-1]["metadata"]


def test_limit_larger_than_the_collection_or_not_positive_is_the_whole_list(srv: APIServer) -> None:
    _namespace(srv, "big", 4)
    whole = _get(srv, "/api/v1/namespaces/big/pods")[1]
    for limit in ("4", "5", "500", "0", "-3"):
        code, body = _get(srv, f"/api/v1/namespaces/big/pods?limit={limit}")
        assert code == 200 and body == whole, limit
        assert body["metadata"] == {"resourceVersion": whole["metadata"]["resourceVersion"]}
    code, body = _get(srv, "/api/v1/namespaces/big/pods?limit=ten")
    assert code == 400 and body["reason"] == "BadRequest" and "limit" in body["message"]


def test_pages_show_the_collection_as_of_the_first_page(srv: APIServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Objects created, changed or deleted after the first page do not change the next pages (each costs a
    bisect and a slice of the snapshot, not a new list of the store); a new list shows the changes."""
    _namespace(srv, "snap", 9)
    st = srv.store
    first = _get(srv, "/api/v1/namespaces/snap/pods?limit=3")[1]
    before = _get(srv, "/api/v1/namespaces/snap/pods")[1]["items"]
    st.patch("pods", "p005", {"metadata": {"labels": {"app": "changed"}}}, namespace="snap")
    st.delete("pods", "p006", namespace="snap")
    st.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p004x"},
               "spec": {"containers": [{"name": "c", "image": "x"}]}}, namespace="snap")
    calls: list[object] = []
    real = st.list_raw
    monkeypatch.setattr(st, "list_raw", lambda *a, **k: calls.append(a) or real(*a, **k))
    rest, token = [], first["metadata"]["continue"]
    while token:
        code, page = _get(srv, f"/api/v1/namespaces/snap/pods?limit=3&continue={token}")
        assert code == 200 and page["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
        rest += page["items"]
        token = page["metadata"].get("continue")
    assert calls == []
    assert first["items"] + rest == before
    now = [p["metadata"]["name"] for p in _get(srv, "/api/v1/namespaces/snap/pods")[1]["items"]]
    assert now == ["p000", "p001", "p002", "p003", "p004", "p004x", "p005", "p007", "p008"]


def test_selectors_with_paging(srv: APIServer) -> None:
    _namespace(srv, "sel", 12, labels=lambda i: {"app": "a" if i % 3 else "b", "i": str(i)})
    q = "/api/v1/namespaces/sel/pods?labelSelector=app%3Da"
    pages = _pages(srv, q, 3)
    names = [i["metadata"]["name"] for p in pages for i in p["items"]]
    assert names == [f"p{i:03d}" for i in range(12) if i % 3]
    assert all("remainingItemCount" not in p["metadata"] for p in pages)  # unknown with a selector, as kube
    fpages = _pages(srv, "/api/v1/pods?fieldSelector=metadata.namespace%3Dsel", 5)
    assert [len(p["items"]) for p in fpages] == [5, 5, 2]
    token = _get(srv, q + "&limit=3")[1]["metadata"]["continue"]  # an open list (one read to the end is released)
    for other in ("/api/v1/namespaces/sel/pods?labelSelector=app%3Db", "/api/v1/namespaces/sel/pods",
                  "/api/v1/namespaces/default/pods?labelSelector=app%3Da",
                  "/api/v1/namespaces/sel/services?labelSelector=app%3Da"):
        code, body = _get(srv, f"{other}&limit=3&continue={token}" if "?" in other
                          else f"{other}?limit=3&continue={token}")
        assert code == 400 and body["reason"] == "BadRequest" and "invalid continue token" in body["message"], other


def test_malformed_token_and_resource_version_with_continue_are_bad_requests(srv: APIServer) -> None:
    _namespace(srv, "junk", 3)
    good = _get(srv, "/api/v1/namespaces/junk/pods?limit=1")[1]["metadata"]["continue"]

    def b64(doc: Any) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")

    for token in ("%%%", "bm90IGpzb24", b64([1]), b64({"v": "x", "rv": 5, "start": "a/b"}),
                  b64({"v": "meta.k8s.io/v1", "rv": 0, "start": "a/b"}),
                  b64({"v": "meta.k8s.io/v1", "rv": 5, "start": ""}),
                  b64({"v": "meta.k8s.io/v1", "rv": 5, "start": "../../x/y"})):
        code, body = _get(srv, f"/api/v1/namespaces/junk/pods?limit=1&continue={token}")
        assert code == 400 and body["reason"] == "BadRequest", token
        assert body["message"].startswith("invalid continue token: "), body["message"]
    code, body = _get(srv, f"/api/v1/namespaces/junk/pods?limit=1&continue={good}&resourceVersion=5")
    assert (code, body["message"]) == (400, "specifying resource version is not allowed when using continue")


def test_expired_token_is_410_with_a_token_for_the_rest(srv: APIServer, v1: client.CoreV1Api,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """After the snapshot's TTL (injected clock) or a compaction, a token gets 410 Expired with kube's
    message; the token in that Status continues from the same key at the latest state."""
    _namespace(srv, "exp", 6)
    snaps = srv.store.list_snapshots
    now = [time.monotonic()]
    monkeypatch.setattr(snaps, "clock", lambda: now[0])
    first = v1.list_namespaced_pod("exp", limit=2)
    now[0] += snaps.ttl + 1
    with pytest.raises(ApiException) as e:
        v1.list_namespaced_pod("exp", limit=2, _continue=first.metadata._continue)
    status = json.loads(e.value.body)
    assert e.value.status == 410 and status["reason"] == "Expired"
    assert status["message"].startswith("The provided continue parameter is too old to display a consistent "
                                        "list result. You can start a new list without the continue parameter")
    srv.store.delete("pods", "p003", namespace="exp")
    rest = v1.list_namespaced_pod("exp", limit=10, _continue=status["metadata"]["continue"])
    assert [p.metadata.name for p in rest.items] == ["p002", "p004", "p005"]  # the latest state
    assert rest.metadata.resource_version != first.metadata.resource_version
    # A compaction (expire_history) expires open tokens too.
    again = v1.list_namespaced_pod("exp", limit=2)
    srv.expire_history()
    with pytest.raises(ApiException) as e:
        v1.list_namespaced_pod("exp", limit=2, _continue=again.metadata._continue)
    assert e.value.status == 410


def test_snapshots_are_bounded_in_count_and_items() -> None:
    clock = [0.0]
    snaps = paging.Snapshots(ttl=10, max_snapshots=3, max_items=10, clock=lambda: clock[0])
    made = [snaps.new("pods", ("", "", ""), "1", [{}] * 2) for _ in range(5)]
    assert len(snaps) == 3 and snaps.get(made[0].id) is None and snaps.get(made[4].id) is made[4]
    big = snaps.new("pods", ("", "", ""), "1", [{}] * 9)
    assert len(snaps) == 1 and snaps.items_held == 9 and snaps.get(big.id) is big
    clock[0] = 10.5
    assert snaps.get(big.id) is None and snaps.items_held == 0


def test_kubectl_get_with_chunk_size_pages(srv: APIServer, tmp_path: Any) -> None:
    _namespace(srv, "kc", 5)
    kubectl = Kubectl(srv.write_kubeconfig(tmp_path / "kubeconfig"), tmp_path)
    run = kubectl.run("get", "pods", "-n", "kc", "--chunk-size=2", "--no-headers", "-v=6")
    assert [line.split()[0] for line in run.stdout.splitlines()] == [f"p{i:03d}" for i in range(5)]
    gets = [line for line in run.stderr.splitlines() if "/namespaces/kc/pods?" in line]
    assert len(gets) == 3 and sum("continue=" in line for line in gets) == 2, run.stderr
    table = kubectl("get", "pods", "-n", "kc", "--chunk-size=2").splitlines()
    assert [line.split()[0] for line in table] == ["NAME", "p000", "p001", "p002", "p003", "p004"]
