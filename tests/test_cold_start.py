"""Cold start (issue 20: first snapshot at 10k services x 10 pods <= 8 s, ``benchmarks/bench_cold.py``):
the garbage collector is held off from ``start_watches`` to the first publish of a ``freeze_gc`` control
plane, the hold nests across threads, and the assembler's fast IPv4 normalisation equals the general one."""

from __future__ import annotations

import argparse
import gc
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from trafficmgr.apiserver import APIServer
from trafficmgr.core import controlplane as cp_mod
from trafficmgr.core import gcpause
from trafficmgr.core.controlplane import ControlPlane
from trafficmgr.core.kube.assemble import _normalize_ip, pod_ips
from trafficmgr.core.kube.client import KubeClient, load_api_client
from trafficmgr.core.model import normalize_ip
from trafficmgr.core.plugins import PluginHost
from trafficmgr.testing.manifests import pod, service


@pytest.fixture
def gc_enabled() -> Any:
    was = gc.isenabled()
    gc.enable()
    yield
    if not was:
        gc.disable()


def test_paused_nests_across_threads(gc_enabled: None) -> None:
    inner_started, release = threading.Event(), threading.Event()

    def other() -> None:
        with gcpause.paused():
            inner_started.set()
            release.wait(5)

    t = threading.Thread(target=other)
    with gcpause.paused():
        assert not gc.isenabled()
        t.start()
        assert inner_started.wait(5)
    assert not gc.isenabled(), "the other thread's pause still runs"
    release.set()
    t.join(5)
    assert gc.isenabled()


def test_paused_keeps_a_disabled_collector_disabled(gc_enabled: None) -> None:
    gc.disable()
    with gcpause.paused():
        pass
    assert not gc.isenabled()
    gc.enable()
    with pytest.raises(RuntimeError):
        gcpause.resume()


def test_control_plane_holds_the_collector_until_the_first_publish(tmp_path: Path, gc_enabled: None,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``freeze_gc`` control plane (what ``serve`` runs): no collection between ``start_watches`` and its
    first publish (the lists' decode, their assembly, the first build), enabled again after it."""
    seen: dict[str, Any] = {}
    # The real freeze moves every object of this test process out of the collector's sight for good:
    # record instead that it ran while the hold was on (the hold ends right after it).
    monkeypatch.setattr(cp_mod, "freeze_startup_objects", lambda: seen.setdefault("freeze_enabled", gc.isenabled()))
    api = APIServer().start()
    cp = None
    try:
        for i in range(3):
            api.store.create(yaml.safe_load(service(f"svc-{i}")))
            api.store.create(yaml.safe_load(pod(f"svc-{i}-0", f"10.1.{i}.1", f"svc-{i}")))
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        cp = ControlPlane(PluginHost.load(["lb"]), argparse.Namespace(), KubeClient(load_api_client(str(kubeconfig))),
                          freeze_gc=True)
        build = cp.builder.build

        def recording_build(model: Any) -> Any:
            seen.setdefault("build_enabled", gc.isenabled())
            return build(model)

        cp.builder.build = recording_build  # type: ignore[method-assign]
        cp.start_watches()
        assert not gc.isenabled()
        assert cp.wait_ready(20), cp.ready()[1]
        for _ in range(200):
            if gc.isenabled():
                break
            threading.Event().wait(0.01)
        assert seen == {"build_enabled": False, "freeze_enabled": False}
        assert gc.isenabled()
    finally:
        if cp is not None:
            cp.stop()
        api.stop()
    assert gc.isenabled()


def test_fast_ipv4_normalisation_equals_the_general_one() -> None:
    rng = random.Random(20)
    cases = ["10.0.0.1", "010.0.0.1", "1.2.3", "0x7f.0.0.1", "255.255.255.255", "256.1.1.1", "::ffff:10.0.0.1",
             "fe80::1%eth0", "abc", "", "1.2.3.4 ", "1.2.3.4\x00", "0.0.0.0", "::1", "2001:DB8::1", "1.2.3.04", "127.1"]
    for _ in range(20000):
        octets = [str(rng.choice([rng.randint(0, 300), f"0{rng.randint(0, 9)}"])) for _ in range(rng.choice([3, 4, 4, 5]))]
        cases.append(".".join(octets))
    for text in cases:
        assert _normalize_ip(text) == normalize_ip(text), text
    assert pod_ips("10.0.0.1", [{"ip": "10.0.0.1"}, {"ip": "::FFFF:10.0.0.2"}]) == ("10.0.0.1", "10.0.0.2")


def test_first_publish_waits_for_every_queued_list() -> None:
    """Watchers mark themselves synced when they hand their list to the sync queue; a batch that ends at
    ``MAX_BATCH_SECONDS`` (a slow relist) with another list still queued must not publish without it."""
    from trafficmgr.core.kube import assemble

    cp = ControlPlane(PluginHost.load(["lb"]), argparse.Namespace())

    class Listed:  # a watcher that has listed (handed its RELIST over)
        def __init__(self, kind: Any) -> None:
            self.kind = kind
            self.synced = threading.Event()
            self.synced.set()

        def stop(self) -> None:
            pass

    cp.watchers = [Listed(k) for k in assemble.CORE_KINDS]  # type: ignore[misc]
    apply = cp.assembler.apply

    def slow_services(etype: str, kind: Any, obj: Any) -> None:
        if etype == "RELIST" and kind is assemble.SERVICE:
            threading.Event().wait(cp_mod.MAX_BATCH_SECONDS * 3)  # longer than one batch may take
        apply(etype, kind, obj)

    cp.assembler.apply = slow_services  # type: ignore[method-assign]
    first: list[int] = []
    publish = cp.publish_model

    def recording_publish(model: Any) -> None:
        first.append(len(model.pods))
        publish(model)

    cp.publish_model = recording_publish  # type: ignore[method-assign]
    def watchers() -> None:  # hand the lists over as watcher threads do (at most MAX_QUEUED_PAGES queued)
        for kind in assemble.CORE_KINDS:
            items = {"services": [yaml.safe_load(service("svc-0"))],
                     "pods": [yaml.safe_load(pod("svc-0-0", "10.1.0.1", "svc-0"))]}.get(kind.plural, [])
            cp._enqueue("RELIST", kind, items)

    lister = threading.Thread(target=watchers, daemon=True)
    lister.start()
    while cp._queue.qsize() < 3:  # services, slices, pods queued before the loop starts
        time.sleep(0.001)
    cp._thread = threading.Thread(target=cp._loop, daemon=True)
    cp._thread.start()
    try:
        assert cp.wait_ready(10), cp.ready()[1]
        assert first[0] == 1, "the first snapshot was published before the pods' list was applied"
    finally:
        cp.stop()


def test_initial_lists_compute_each_services_endpoints_once() -> None:
    """Before the first model() the endpoints wait for it: the initial slices' list then the pods' list
    (the order they usually arrive in) compute each service's endpoints once, not once per list, and the
    result equals the usual one (pod labels on the endpoints)."""
    from trafficmgr.apiserver.controllers import Controllers
    from trafficmgr.apiserver.store import Store
    from trafficmgr.core.kube import assemble

    store = Store()
    controllers = Controllers(store, endpointslices=True)
    controllers.start()
    try:
        for i in range(3):
            store.create(yaml.safe_load(service(f"svc-{i}")))
            for j in range(2):
                p = yaml.safe_load(pod(f"svc-{i}-{j}", f"10.1.{i}.{j + 1}", f"svc-{i}"))
                p["metadata"]["labels"]["traffic.endpoint.weight"] = str(5 + j)
                store.create(p)
        controllers.wait_idle()
    finally:
        controllers.stop()
    lists = {k.plural: store.list(k.plural)["items"] for k in assemble.CORE_KINDS}
    labels = PluginHost.load(["lb"]).labels

    def assembled(order: list[str]) -> tuple[Any, int]:
        a = assemble.Assembler(labels)
        computed = 0
        refresh = a._refresh_endpoints

        def counting(svc_key: Any) -> None:
            nonlocal computed
            computed += a._deferred is None
            refresh(svc_key)

        a._refresh_endpoints = counting  # type: ignore[method-assign]
        by_plural = {k.plural: k for k in assemble.CORE_KINDS}
        for plural in order:
            a.apply("RELIST", by_plural[plural], lists[plural])
        return dict(a.model().endpoints), computed

    slices_first, computed = assembled(["services", "endpointslices", "pods"])
    pods_first, _ = assembled(["services", "pods", "endpointslices"])
    assert computed == 3, "each service's endpoints computed once"
    assert slices_first == pods_first and len(slices_first) == 3
    assert all(len(eps) == 2 and all(e.labels.value("traffic.endpoint.weight") for e in eps)
               for eps in slices_first.values())


def test_list_pages_wait_while_the_sync_loop_is_behind() -> None:
    """A watcher decodes pages faster than the sync loop applies them: it waits while MAX_QUEUED_PAGES are
    queued, so a paged 100k-pod list is never held decoded in the queue whole; every page is applied, in
    order."""
    from trafficmgr.core.kube import assemble
    from trafficmgr.core.kube.watch import ListPage

    cp = ControlPlane(PluginHost.load(["lb"]), argparse.Namespace())
    pending: list[int] = []
    applied: list[str] = []
    apply = cp.assembler.apply

    def slow(etype: str, kind: Any, obj: Any) -> None:
        if etype == "RELIST":
            pending.append(cp._relists_pending)
            time.sleep(0.01)
            applied.extend(p["metadata"]["name"] for p in obj.items)
        apply(etype, kind, obj)

    cp.assembler.apply = slow  # type: ignore[method-assign]
    pages = [ListPage([yaml.safe_load(pod(f"p{i}", f"10.1.0.{i + 1}", "a"))], first=i == 0, last=i == 19)
             for i in range(20)]
    lister = threading.Thread(target=lambda: [cp._enqueue("RELIST", assemble.POD, p) for p in pages], daemon=True)
    lister.start()
    cp._thread = threading.Thread(target=cp._loop, daemon=True)
    cp._thread.start()
    try:
        lister.join(10)
        assert not lister.is_alive()
        deadline = time.monotonic() + 10
        while len(applied) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert applied == [f"p{i}" for i in range(20)]
        assert max(pending) <= cp_mod.MAX_QUEUED_PAGES, pending
    finally:
        cp.stop()
