"""The service table (``trafficmgr/core/translate/services.py``): the plugin-implied protocols of a build
are regrouped and compared by service only when the hook's items changed, and a change of them alone
(no Service in the delta) still re-derives the services it names. Incremental builds equal fresh ones
here and in tests/test_builder_incremental.py (which has no implying plugin)."""

from __future__ import annotations

from typing import Any

import attrs

from trafficmgr import hookimpl
from trafficmgr.core import cache
from trafficmgr.core.model import Labels, Model, ModelDelta, Pod, Service, ServicePort
from trafficmgr.core.plugins import PluginHost
from trafficmgr.core.translate.builder import Builder
from trafficmgr.core.translate.sidecar_outbound import OUTBOUND_LISTENER


class Item(tuple):  # type: ignore[type-arg]
    """A hook item that counts how often it was unpacked (iterated)."""

    unpacked = 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        Item.unpacked += 1
        return tuple.__iter__(self)


class Implies:
    """Implies ``http`` for port 8080 of the services in ``names`` (the same item objects each call)."""

    def __init__(self, names: list[str]) -> None:
        self.items = [Item(("default", n, 8080, "http")) for n in names]

    @hookimpl
    def trafficmgr_port_protocols(self) -> list[Any]:
        return list(self.items)


def _http_chains(snap: cache.Snapshot) -> set[str]:
    lst = snap.types[cache.LISTENER].resources[OUTBOUND_LISTENER].message()
    return {c.name for c in lst.filter_chains
            if not c.name.startswith("blocked") and any(f.name.endswith("http_connection_manager") for f in c.filters)}


def test_implied_protocols_are_diffed_only_when_the_hook_items_change() -> None:
    names = [f"s{i}" for i in range(300)]
    services = {("default", n): Service("default", n, (ServicePort("p", 8080, 8080, None),), cluster_ip=f"10.96.{i // 250}.{i % 250 + 1}")
                for i, n in enumerate(names)}
    plugin = Implies(names[:200])
    host = PluginHost.load([])
    host.register("implies", plugin)
    builder = Builder(host)
    pods = {("default", "c"): Pod("default", "c")}
    model = Model(services=services, pods=pods)
    snap = builder.build(model)["sidecar"]
    assert _http_chains(snap) == {f"8080|default|{n}.outbound" for n in names[:200]}
    # A pod change: the hook runs, returns equal items, and none of them is unpacked again (the old
    # code regrouped and compared all 200 on every build).
    Item.unpacked = 0
    pods = {("default", "c"): attrs.evolve(pods[("default", "c")], labels=Labels({"x": "y"}))}
    model = attrs.evolve(model, pods=pods, delta=ModelDelta(pods=frozenset(pods)))
    assert builder.build(model)["sidecar"].version == snap.version
    assert Item.unpacked == 0
    assert builder.services.examined == 0
    # The hook's result changes without any Service in the delta: exactly the services it names again.
    plugin.items = plugin.items[:199] + [Item(("default", "s250", 8080, "http"))]
    model = attrs.evolve(model, delta=ModelDelta(pods=frozenset(pods)))
    snaps = builder.build(model)
    assert builder.services.examined == 2  # s199 (no longer implied) and s250 (now implied)
    assert _http_chains(snaps["sidecar"]) == {f"8080|default|{n}.outbound" for n in [*names[:199], "s250"]}
    fresh = Builder(host).build(attrs.evolve(model, delta=None))
    assert {v: s.version for v, s in snaps.items()} == {v: s.version for v, s in fresh.items()}
