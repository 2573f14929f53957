"""The snapshot cache's consistency gate: a snapshot with a dangling reference or an unreferenced named
resource is refused and the previous one keeps being served; derived type sets keep it exact."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from xds_resources import eds_cluster, load_assignment, web_snapshot

from trafficmgr.core import cache

A = ("127.0.0.1", 1001, 100)


def test_dangling_and_unreferenced_resources_are_refused_and_the_previous_snapshot_stays() -> None:
    good = web_snapshot(10000, {"a": [A], "b": [A]})
    assert good.errors() == []
    sc = cache.SnapshotCache()
    sc.set_view("sidecar", good, notify=False)

    types = {t: dict(ts.resources) for t, ts in good.types.items()}
    del types[cache.ENDPOINT]["b"]  # cluster b's endpoints are gone
    types[cache.ENDPOINT]["x"] = load_assignment("x", [A])  # nobody references x
    bad = cache.Snapshot.build({t: list(r.values()) for t, r in types.items()})
    assert bad.errors() == ["clusters 'b' references missing endpoints 'b'",
                            "endpoints 'x' is not referenced by any resource"]
    with pytest.raises(cache.InconsistentSnapshot, match="references missing endpoints 'b'"):
        sc.set_view("sidecar", bad, notify=False)
    assert sc.get("sidecar") is good and sc.rejected["sidecar"] == bad.errors()


def test_derived_type_sets_keep_references_exact() -> None:
    snap = web_snapshot(10000, {"a": [A], "b": [A]})
    assert snap.errors() == []  # as in the pipeline: the base passed the gate (its caches are filled)
    clusters, endpoints = snap.types[cache.CLUSTER], snap.types[cache.ENDPOINT]

    def with_types(**changed: cache.TypeSet) -> cache.Snapshot:
        return cache.Snapshot({**snap.types, **{getattr(cache, k): v for k, v in changed.items()}})

    # Same names, new references: cluster "a" now names endpoints "a2", which do not exist.
    moved = cache.Resource(cache.CLUSTER, "a", eds_cluster("a").body + b" ", "v2", refs=((cache.ENDPOINT, "a2"),))
    assert with_types(CLUSTER=clusters.derive({"a": moved})).errors() == [
        "clusters 'a' references missing endpoints 'a2'", "endpoints 'a' is not referenced by any resource"]
    # Same names and references (an endpoint change): still consistent.
    assert with_types(ENDPOINT=endpoints.derive({"a": load_assignment("a", [A, A])})).errors() == []
    # A removed, still referenced resource; then its referrer removed too, which the route still names.
    assert with_types(ENDPOINT=endpoints.derive({"b": None})).errors() == ["clusters 'b' references missing endpoints 'b'"]
    assert with_types(ENDPOINT=endpoints.derive({"b": None}), CLUSTER=clusters.derive({"b": None})).errors() == [
        "routes 'web' references missing clusters 'b'"]


_names = st.sampled_from(["a", "b", "c", "d", "e"])
_resource = st.builds(lambda name, n, ref: cache.Resource(cache.CLUSTER, name, f"{name}{n}".encode(), f"v{n}",
                                                          refs=((cache.ENDPOINT, ref),) if ref else ()),
                      _names, st.integers(0, 3), st.sampled_from(["", "x", "y"]))


@settings(max_examples=200, deadline=None)
@given(st.lists(_resource, max_size=5), st.dictionaries(_names, st.one_of(st.none(), _resource), max_size=5),
       st.booleans())
def test_derive_equals_a_fresh_type_set(base: list[cache.Resource], raw_changes: dict[str, cache.Resource | None],
                                        warm: bool) -> None:
    """Whatever is added, replaced (with other references) or removed, several at once: the derived set
    equals one built from scratch, caches included (``warm``: the parent's caches were filled first)."""
    start = cache.TypeSet(cache.CLUSTER, {r.name: r for r in base}.values())
    if warm:
        start.names(), start.refs()
    changes = {n: (None if r is None else attrs.evolve(r, name=n)) for n, r in raw_changes.items()}
    expected = dict(start.resources)
    for name, res in changes.items():
        if res is None:
            expected.pop(name, None)
        else:
            expected[name] = res
    fresh = cache.TypeSet(cache.CLUSTER, expected.values())
    derived = start.derive(changes)
    assert list(derived.resources.items()) == list(fresh.resources.items())
    assert (derived.version, derived.names(), derived.refs()) == (fresh.version, fresh.names(), fresh.refs())


def test_bounded_cache_evicts_least_recently_used_by_count_and_size() -> None:
    b: cache.Bounded[str, bytes] = cache.Bounded(3, max_size=10, size=len)
    for k in "abc":
        b.put(k, b"xx")
    assert b.get("a") == b"xx"  # "a" is now the most recently used
    b.put("d", b"xx")  # four entries: the least recently used ("b") goes
    assert [k for k in "abcd" if b.get(k) is not None] == ["a", "c", "d"]
    b.put("e", b"x" * 9)  # 2 + 2 + 2 + 9 > 10 bytes: the oldest go until it fits
    assert [k for k in "acde" if b.get(k) is not None] == ["e"] and len(b) == 1
    b.put("huge", b"x" * 50)  # the newest entry always stays, even alone over the size
    assert b.get("huge") is not None and len(b) == 1


def test_a_passing_composition_is_not_checked_again_but_a_new_one_is() -> None:
    snap = web_snapshot(10000, {"a": [A], "b": [A]})
    assert snap.errors() == []
    endpoints = snap.types[cache.ENDPOINT]
    same_sets = cache.Snapshot({**snap.types, cache.ENDPOINT: endpoints.derive({"a": load_assignment("a", [A, A])})})
    assert same_sets.errors() == []
    broken = cache.Snapshot({**snap.types, cache.ENDPOINT: endpoints.derive({"b": None})})
    assert broken.errors() == ["clusters 'b' references missing endpoints 'b'"]
