"""A relist (the initial list, or after a 410) refreshes each service's endpoints once, at its end, and
gives the same model whatever order the kinds arrive in."""

from __future__ import annotations

import pytest

from trafficmgr.apiserver.controllers import Controllers
from trafficmgr.apiserver.store import Store
from trafficmgr.core.kube import assemble
from trafficmgr.core.kube.assemble import CORE_KINDS, Assembler
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
