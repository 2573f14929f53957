"""Delta xDS: a client that reconnects (to another control-plane replica, or a restarted one) after a
cluster changed gets that cluster's endpoints again when it asks for endpoints, even though its
``initial_resource_versions`` show it has them: Envoy keeps a replaced cluster warming until its
endpoints come again, and without them it waited for its 15 s initial-fetch timeout (seen in
``tests/e2e/test_replicas_failover.py`` before the fix: 16.6 s for a label change to apply)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from xds_client import AdsClient
from xds_resources import eds_cluster, web_snapshot

from trafficmgr.core import cache
from trafficmgr.testing import ControlPlane

A = ("127.0.0.1", 1001, 100)
B = ("127.0.0.2", 1002, 10)


@pytest.fixture
def cp(xds_server: ControlPlane) -> Iterator[ControlPlane]:
    xds_server.nodes["node-1"] = "sidecar"
    xds_server.cache.set_view("sidecar", web_snapshot(10000, {"a": [A], "b": [B]}))
    yield xds_server


def _replace_cluster_a(cp: ControlPlane, timeout_ms: int) -> None:
    """The current snapshot with cluster "a" changed (its connect timeout), its endpoints unchanged."""
    from envoy.config.cluster.v3 import cluster_pb2

    from trafficmgr.core.protos import duration_ms

    snap = cp.cache.get("sidecar")
    msg = cluster_pb2.Cluster.FromString(eds_cluster("a").body)
    msg.connect_timeout.CopyFrom(duration_ms(timeout_ms))
    types = {t: list(ts.resources.values()) for t, ts in snap.types.items()}
    types[cache.CLUSTER] = [r for r in types[cache.CLUSTER] if r.name != "a"]
    types[cache.CLUSTER].append(cache.Resource.from_message(msg, "a", refs=[(cache.ENDPOINT, "a")]))
    cp.cache.set_view("sidecar", cache.Snapshot.build(types, snap))


def _versions(resp: object) -> dict[str, str]:
    return {r.name: r.version for r in resp.resources}  # type: ignore[attr-defined]


def test_reconnect_after_a_cluster_changed_gets_its_endpoints_again(cp: ControlPlane) -> None:
    first = AdsClient(cp.port, node_id="node-1", delta=True)
    try:
        first.send(type_url=cache.CLUSTER)
        clusters = first.recv()
        first.ack(clusters)
        first.send(type_url=cache.ENDPOINT, resource_names_subscribe=["a", "b"])
        endpoints = first.recv()
        first.ack(endpoints)
        held = {cache.CLUSTER: _versions(clusters), cache.ENDPOINT: _versions(endpoints)}
        assert sorted(held[cache.ENDPOINT]) == ["a", "b"]
    finally:
        first.close()

    _replace_cluster_a(cp, 2500)  # while the client is away
    again = AdsClient(cp.port, node_id="node-1", delta=True)
    try:
        # Envoy's order after a reconnect: clusters first (with the versions it has), then endpoints.
        again.send(type_url=cache.CLUSTER, initial_resource_versions=held[cache.CLUSTER])
        clusters = again.recv()
        assert [r.name for r in clusters.resources] == ["a"] and not clusters.removed_resources
        again.ack(clusters)
        again.send(type_url=cache.ENDPOINT, resource_names_subscribe=["a", "b"],
                   initial_resource_versions=held[cache.ENDPOINT])
        endpoints = again.recv()  # before the fix: nothing (the client "has" them)
        assert endpoints.type_url == cache.ENDPOINT
        assert [r.name for r in endpoints.resources] == ["a"], "only the replaced cluster's endpoints"
        assert _versions(endpoints) == {"a": held[cache.ENDPOINT]["a"]}
        again.ack(endpoints)
        assert again.silent(0.3)
    finally:
        again.close()


def test_reconnect_without_changes_gets_nothing_more(cp: ControlPlane) -> None:
    """Unchanged clusters force nothing: a reconnect holding the current versions is sent nothing."""
    first = AdsClient(cp.port, node_id="node-1", delta=True)
    try:
        first.send(type_url=cache.CLUSTER)
        clusters = first.recv()
        first.ack(clusters)
        first.send(type_url=cache.ENDPOINT, resource_names_subscribe=["a", "b"])
        endpoints = first.recv()
        first.ack(endpoints)
    finally:
        first.close()
    again = AdsClient(cp.port, node_id="node-1", delta=True)
    try:
        again.send(type_url=cache.CLUSTER, initial_resource_versions=_versions(clusters))
        empty = again.recv()  # a wildcard type's first answer is always sent, even empty
        assert not empty.resources and not empty.removed_resources
        again.ack(empty)
        again.send(type_url=cache.ENDPOINT, resource_names_subscribe=["a", "b"],
                   initial_resource_versions=_versions(endpoints))
        assert again.silent(0.3)
    finally:
        again.close()
