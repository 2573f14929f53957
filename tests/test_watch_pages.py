"""The watcher lists in pages (``limit``/``continue``, as client-go's pager does): each page is handed
over as it arrives (``hand_pages``, the control plane) or the whole list once complete (other users), and a
``continue`` token that expired mid-list (410) starts the list again from its first page."""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path
from typing import Any

from trafficmgr.apiserver import APIServer
from trafficmgr.core.controlplane import ControlPlane
from trafficmgr.core.kube.client import ApiException, Kind, KubeClient, load_api_client
from trafficmgr.core.kube.watch import ListPage, Watcher
from trafficmgr.core.plugins import PluginHost
from trafficmgr.testing.kit import load_manifests
from trafficmgr.testing.manifests import join, pod, service

KIND = Kind("Widget", "example.com/v1", "widgets")


class PagedStandIn:
    """Answers lists in pages of ``limit`` from ``objects`` with a continue token (its offset); the first
    continued request of the first list answers 410 Expired, as an API server does for an old token."""

    host = "test"

    def __init__(self, objects: list[dict[str, Any]]) -> None:
        self.objects = objects
        self.queries: list[dict[str, Any]] = []
        self.expired_once = False

    def list(self, path: str, query: dict[str, Any]) -> dict[str, Any]:
        self.queries.append(dict(query))
        limit = int(query["limit"])
        start = int(query.get("continue") or 0)
        if start and not self.expired_once:
            self.expired_once = True
            raise ApiException(status=410, reason="Expired")
        end = start + limit
        meta = {"resourceVersion": "42"}
        if end < len(self.objects):
            meta["continue"] = str(end)
        return {"metadata": meta, "items": self.objects[start:end]}

    def watch(self, path: str, query: dict[str, Any], timeout: float) -> Any:
        time.sleep(0.05)
        return iter(())


def _run(watcher: Watcher) -> None:
    watcher.start()
    try:
        assert watcher.synced.wait(5)
    finally:
        watcher.stop()


def test_pages_are_handed_over_and_an_expired_token_starts_again() -> None:
    objects = [{"metadata": {"name": f"w{i}"}} for i in range(7)]
    client = PagedStandIn(objects)
    events: list[Any] = []
    lock = threading.Lock()

    def sink(etype: str, kind: Kind, obj: Any) -> None:
        with lock:
            events.append(obj)

    w = Watcher(client, KIND, sink, page_size=3, hand_pages=True)  # type: ignore[arg-type]
    _run(w)
    # First attempt: page 1, then 410 on the continue -> a new list from the start, 3 pages.
    assert [q.get("continue") for q in client.queries] == [None, "3", None, "3", "6"]
    assert all(q["limit"] == "3" for q in client.queries)
    assert events == [
        ListPage(objects[0:3], first=True, last=False),
        ListPage(objects[0:3], first=True, last=False),
        ListPage(objects[3:6], first=False, last=False),
        ListPage(objects[6:7], first=False, last=True),
    ]
    assert w.resource_version == "42" and w.relists == 1


def test_without_hand_pages_the_whole_list_is_handed_over_once() -> None:
    objects = [{"metadata": {"name": f"w{i}"}} for i in range(5)]
    client = PagedStandIn(objects)
    client.expired_once = True  # no 410 here
    events: list[Any] = []
    w = Watcher(client, KIND, lambda t, k, o: events.append((t, o)), page_size=2)  # type: ignore[arg-type]
    _run(w)
    assert events == [("RELIST", objects)]
    assert len(client.queries) == 3


def test_the_control_plane_lists_in_pages_from_the_api_server(tmp_path: Path) -> None:
    """Against the project's API server (kube-apiserver's limit/continue protocol): with a page size of 3
    every kind with more objects is listed in several requests, and the first snapshot has everything."""
    api = APIServer().start()
    cp = None
    try:
        docs = [service(f"s{i}") for i in range(4)] + [pod(f"s{i}-{j}", f"10.244.{i}.{j + 1}", f"s{i}")
                                                       for i in range(4) for j in range(2)]
        for obj in load_manifests(join(*docs)):
            api.store.create(obj)
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        cp = ControlPlane(PluginHost.load(["lb"]), argparse.Namespace(list_page_size=3),
                          KubeClient(load_api_client(str(kubeconfig))))
        cp.start_watches()
        assert cp.wait_ready(20), cp.ready()[1]
        pods = [w for w in cp.watchers if w.kind.plural == "pods"][0]
        assert pods.page_size == 3 and pods.pages == 3  # 8 pods: 3 + 3 + 2
        assert cp.model is not None and len(cp.model.pods) == 8
        assert sorted(k[1] for k in cp.model.services if k[1] != "kubernetes") == ["s0", "s1", "s2", "s3"]
        assert all(len(eps) == 2 for eps in cp.model.endpoints.values())
    finally:
        if cp is not None:
            cp.stop()
        api.stop()


def test_kinds_reading_the_same_objects_share_one_watch(tmp_path: Path) -> None:
    """The mtls plugin reads Services too (their traffic.allow.* labels): one list and watch of Services
    serves both the core and the plugin, and each gets every event."""
    from trafficmgr.plugins import mtls

    api = APIServer().start()
    cp = None
    try:
        for obj in load_manifests(join(service("web", labels={mtls.ALLOW_NAMESPACE + "shop": "true"}), service("db"))):
            api.store.create(obj)
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        cp = ControlPlane(PluginHost.load(["lb", "mtls"]), argparse.Namespace(list_page_size=1),
                          KubeClient(load_api_client(str(kubeconfig))))
        cp.start_watches()
        assert cp.wait_ready(20), cp.ready()[1]
        paths = [w.path for w in cp.watchers]
        assert len(paths) == len(set(paths)), paths
        assert [w.kind.kind for w in cp.watchers if w.kind.plural == "services"] == ["Service"]
        assert ("default", "web") in cp.assembler.services
        assert list(cp.assembler.extra[mtls.AUTHZ]) == [("default", "web")]
        # A watch event reaches both: the label removed -> the plugin's object is gone.
        api.store.patch("services", "web", {"metadata": {"labels": {mtls.ALLOW_NAMESPACE + "shop": None}}}, "default")
        deadline = time.monotonic() + 10
        while cp.assembler.extra[mtls.AUTHZ] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not cp.assembler.extra[mtls.AUTHZ]
    finally:
        if cp is not None:
            cp.stop()
        api.stop()


def test_the_connection_pool_holds_every_watch(tmp_path: Path) -> None:
    """With every plugin the control plane holds more API connections at once (a watch stream per watcher,
    plus the status and Event writers and the leader elector) than the official client's default pool (5 x
    CPUs: 10 on two cores); past it urllib3 discards connections and each list page pays a new TLS handshake
    (seen as "Connection pool is full" at 10k services)."""
    api = APIServer().start()
    cp = None
    try:
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        kube = KubeClient(load_api_client(str(kubeconfig)))
        cp = ControlPlane(PluginHost.load(), argparse.Namespace(), kube)
        cp.start_watches()
        assert cp.wait_ready(20), cp.ready()[1]
        assert kube.api.rest_client.pool_manager.connection_pool_kw["maxsize"] >= len(cp.watchers) + 3
    finally:
        if cp is not None:
            cp.stop()
        api.stop()
