"""A relist (the initial list, or after a 410) refreshes each service's endpoints once, at its end, and
gives the same model whatever order the kinds arrive in."""

from __future__ import annotations

import gc
import weakref

import pytest

from trafficmgr.apiserver.controllers import Controllers
from trafficmgr.apiserver.store import Store
from trafficmgr.core.kube import assemble
from trafficmgr.core.kube.assemble import CORE_KINDS, Assembler
from trafficmgr.core.kube.watch import ListPage
from trafficmgr.core.plugins import PluginHost
from trafficmgr.testing.kit import load_manifests
from trafficmgr.testing.manifests import join, pod, service

PODS = 8


def _lists() -> dict[str, list[dict]]:
    docs = [service("web")] + [pod(f"web-{i}", f"10.244.0.{i + 1}", "web", labels={"traffic.endpoint.weight": str(i + 1)})
                               for i in range(PODS)]
    store = Store()
    controllers = Controllers(store, endpointslices=True)
    controllers.start()
    try:
        for obj in load_manifests(join(*docs)):
            store.create(obj)
        controllers.wait_idle()
        return {k.plural: store.list(k.plural)["items"] for k in CORE_KINDS}
    finally:
        controllers.stop()


@pytest.mark.parametrize("order", ["listed", "reversed"])
def test_relist_refreshes_endpoints_once_per_service(order: str, monkeypatch: pytest.MonkeyPatch) -> None:
    lists = _lists()
    made = []
    real = assemble.Endpoint
    monkeypatch.setattr(assemble, "Endpoint", lambda **kw: made.append(kw) or real(**kw))
    asm = Assembler(PluginHost.load(["lb"]).labels)
    kinds = CORE_KINDS if order == "listed" else list(reversed(CORE_KINDS))
    for kind in kinds:
        asm.apply("RELIST", kind, lists[kind.plural])
    model = asm.model()
    [eps] = [v for k, v in model.endpoints.items() if k[1] == "web"]
    # Every endpoint carries its pod's weight label, whichever kind came first ...
    assert sorted(e.labels.value("traffic.endpoint.weight") for e in eps) == list(range(1, PODS + 1))
    # ... and each endpoint was made once or twice (slices, then pods), not once per pod of the service.
    assert len(made) <= 2 * PODS, len(made)


def _owned(kind: str, name: str, owner_kind: str, owner: str, labels: dict[str, str] | None = None) -> dict:
    return {"kind": kind, "metadata": {"name": name, "namespace": "default", "uid": f"uid-{name}", "labels": labels or {},
                                       "ownerReferences": [{"kind": owner_kind, "name": owner, "controller": True}]}}


def test_pod_follows_its_current_replicaset_and_deletes_cleanly() -> None:
    """A pod's workload labels come through the ReplicaSet that owns it now: after its owner reference
    moves to another ReplicaSet, a change of the old one's Deployment no longer touches it, and a
    deleted pod leaves no trace in the ReplicaSet index (found without scanning every ReplicaSet)."""
    asm = Assembler(PluginHost.load(["lb"]).labels)
    weight = "traffic.endpoint.weight"
    for name, value in (("d1", "5"), ("d2", "7")):
        asm.apply("ADDED", assemble.DEPLOYMENT, {"kind": "Deployment", "metadata": {
            "name": name, "namespace": "default", "uid": f"uid-{name}", "labels": {weight: value}}})
    asm.apply("ADDED", assemble.REPLICA_SET, _owned("ReplicaSet", "rs-a", "Deployment", "d1"))
    asm.apply("ADDED", assemble.REPLICA_SET, _owned("ReplicaSet", "rs-b", "Deployment", "d2"))
    pod = _owned("Pod", "p", "ReplicaSet", "rs-a")
    pod["status"] = {"podIP": "10.244.0.9"}
    asm.apply("ADDED", assemble.POD, pod)
    assert asm.model().pods[("default", "p")].labels.value(weight) == 5

    pod["metadata"]["ownerReferences"][0]["name"] = "rs-b"
    asm.apply("MODIFIED", assemble.POD, pod)
    assert asm.model().pods[("default", "p")].labels.value(weight) == 7
    asm.apply("MODIFIED", assemble.DEPLOYMENT, {"kind": "Deployment", "metadata": {
        "name": "d1", "namespace": "default", "uid": "uid-d1", "labels": {weight: "1"}}})
    asm.apply("MODIFIED", assemble.REPLICA_SET, _owned("ReplicaSet", "rs-a", "Deployment", "d2"))
    assert asm.model().pods[("default", "p")].labels.value(weight) == 7

    asm.apply("DELETED", assemble.POD, pod)
    assert ("default", "p") not in asm.model().pods
    index = asm._pod_index
    assert index.by_rs == {} and index.rs == {} and index.by_owner == {} and index.by_ip == {}


# -- paged lists, and what is kept of raw objects -------------------------------------------------------

class _Obj(dict):  # type: ignore[type-arg]
    """A raw object that can be weakly referenced (a plain dict cannot): to see whether anything kept it."""


def _cluster(version: int, services: range, pods: int, weights: dict[int, int] | None = None) -> dict[str, list[dict]]:
    """Raw Services, Pods and EndpointSlices as a list would return them; ``version`` goes into every
    resourceVersion, so a relist of another version sees every object changed unless asked otherwise."""
    weights = weights or {}
    out: dict[str, list[dict]] = {"services": [], "pods": [], "endpointslices": []}
    for i in services:
        out["services"].append(_Obj(kind="Service", metadata={"name": f"s{i}", "namespace": "default", "uid": f"s{i}",
                                                              "resourceVersion": f"{version}-{i}"},
                                    spec={"clusterIP": f"10.96.0.{i}", "ports": [{"name": "http", "port": 80}]}))
        eps = []
        for j in range(pods):
            ip = f"10.244.{i}.{j + 1}"
            labels = {"app": f"s{i}"}
            if (i * pods + j) in weights:
                labels["traffic.endpoint.weight"] = str(weights[i * pods + j])
            out["pods"].append(_Obj(kind="Pod", metadata={"name": f"s{i}-{j}", "namespace": "default", "uid": f"p{i}-{j}",
                                                          "labels": labels, "resourceVersion": f"{version}-{i}-{j}"},
                                    status={"podIP": ip, "phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}))
            eps.append({"addresses": [ip], "conditions": {"ready": True},
                        "targetRef": {"kind": "Pod", "name": f"s{i}-{j}", "namespace": "default"}})
        out["endpointslices"].append(_Obj(metadata={"name": f"s{i}-abc", "namespace": "default", "resourceVersion": f"{version}-{i}",
                                                    "labels": {assemble.SERVICE_NAME_LABEL: f"s{i}"}},
                                          addressType="IPv4", ports=[{"name": "http", "port": 8080}], endpoints=eps))
    return out


_KINDS = {"services": assemble.SERVICE, "pods": assemble.POD, "endpointslices": assemble.ENDPOINT_SLICE}


def _state(asm: Assembler) -> tuple[dict, dict, dict]:
    model = asm.model()
    return dict(model.services), dict(model.pods), dict(model.endpoints)


def _paged(asm: Assembler, lists: dict[str, list[dict]], size: int) -> None:
    for plural, items in lists.items():
        pages = [items[k:k + size] for k in range(0, len(items), size)] or [[]]
        for n, page in enumerate(pages):
            asm.apply("RELIST", _KINDS[plural], ListPage(page, first=n == 0, last=n == len(pages) - 1))


@pytest.mark.parametrize("size", [1, 3, 7, 1000])
def test_a_paged_relist_gives_what_one_list_gives(size: int) -> None:
    """The watcher hands a list over page by page (``limit``/``continue``). Starting from one cluster
    state, a paged relist of another (services and pods added, removed, relabelled), after a list of a
    third state that failed half-way, ends in exactly the model a fresh assembler makes from one list."""
    labels = PluginHost.load(["lb"]).labels
    asm = Assembler(labels)
    for plural, items in _cluster(1, range(0, 6), 3).items():
        asm.apply("RELIST", _KINDS[plural], items)
    asm.model()
    aborted = _cluster(2, range(0, 9), 2)
    for plural, items in aborted.items():  # only a first page of each kind, then the list fails
        asm.apply("RELIST", _KINDS[plural], ListPage(items[:2], first=True, last=False))
    assert asm.relisting
    target = _cluster(3, range(3, 8), 3, weights={10: 5, 14: 9})
    _paged(asm, target, size)
    assert not asm.relisting
    fresh = Assembler(labels)
    for plural, items in target.items():
        fresh.apply("RELIST", _KINDS[plural], items)
    assert _state(asm) == _state(fresh)
    assert sorted(k[1] for k in asm.model().services) == [f"s{i}" for i in range(3, 8)]


def test_deletions_wait_for_the_last_page() -> None:
    """Objects missing from a paged list are deleted when its last page arrives, not before: a model built
    between pages still has them (what a watch would show until their DELETED events)."""
    asm = Assembler(PluginHost.load(["lb"]).labels)
    for plural, items in _cluster(1, range(0, 4), 2).items():
        asm.apply("RELIST", _KINDS[plural], items)
    asm.model()
    pods = _cluster(2, range(0, 2), 2)["pods"]
    asm.apply("RELIST", assemble.POD, ListPage(pods[:2], first=True, last=False))
    assert len(asm.model().pods) == 8
    asm.apply("RELIST", assemble.POD, ListPage(pods[2:], first=False, last=True))
    assert sorted(k[1] for k in asm.model().pods) == ["s0-0", "s0-1", "s1-0", "s1-1"]


def test_raw_objects_are_not_kept() -> None:
    """After conversion the assembler keeps no raw Pod, EndpointSlice or Service (a decoded pod is ~4.7 KB:
    470 MB at 100k pods); what later events need (labels, controllers, endpoints) is kept in small form,
    and still works: the pods are found by IP with their Kubernetes labels, and a relist with nothing
    changed changes nothing."""
    asm = Assembler(PluginHost.load(["lb"]).labels)
    lists = _cluster(1, range(0, 3), 2)
    refs = [weakref.ref(o) for items in lists.values() for o in items]
    for plural, items in lists.items():
        asm.apply("RELIST", _KINDS[plural], items)
    model = asm.model()
    assert len(model.pods) == 6 and len(model.endpoints) == 3
    del lists, items
    gc.collect()
    kept = [r() for r in refs if r() is not None]
    assert kept == [], f"{len(kept)} raw objects still referenced, e.g. {kept[0]['metadata']['name']}"
    [(pod, k8s_labels)] = asm.pods_with_ip("10.244.1.2")
    assert pod.name == "s1-1" and k8s_labels == {"app": "s1"}
    for plural, items in _cluster(1, range(0, 3), 2).items():
        asm.apply("RELIST", _KINDS[plural], items)
    assert not asm.dirty
