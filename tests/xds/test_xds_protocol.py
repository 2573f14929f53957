"""ADS state machine through a Python gRPC client (fast, no Envoy)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from xds_client import AdsClient
from xds_resources import eds_cluster, web_snapshot

from trafficmgr.core import cache, metrics
from trafficmgr.core.cache import TypeSet
from trafficmgr.core.xds.server import PortInUse, XdsServerThread, parse_peer
from trafficmgr.testing import ControlPlane, wait_for

A = ("127.0.0.1", 1001, 100)
B = ("127.0.0.2", 1002, 10)


@pytest.fixture
def cp(xds_server: ControlPlane) -> ControlPlane:
    xds_server.nodes["node-1"] = "sidecar"
    xds_server.nodes["node-2"] = "sidecar"
    xds_server.cache.set_view("sidecar", web_snapshot(10000, {"a": [A], "b": [B]}))
    return xds_server


@pytest.fixture
def clients(cp: ControlPlane) -> Iterator[list[AdsClient]]:
    made: list[AdsClient] = []
    yield made
    for c in made:
        c.close()


def connect(cp: ControlPlane, clients: list[AdsClient], **kw: object) -> AdsClient:
    c = AdsClient(cp.port, **kw)  # type: ignore[arg-type]
    clients.append(c)
    return c


def publish(cp: ControlPlane, clusters: dict, **kw: object) -> None:
    cp.cache.set_view("sidecar", web_snapshot(10000, clusters, previous=cp.cache.get("sidecar"), **kw))  # type: ignore[arg-type]


def subscribed(cp: ControlPlane, type_url: str) -> list[set[str]]:
    """Names each open stream is subscribed to for ``type_url`` (read on the server loop)."""
    def streams() -> list[set[str]]:
        return [set(s.types[type_url].names or ()) for s in cp.server.server._streams if type_url in s.types]

    return cp.server.call(streams)


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


# -- state of the world -----------------------------------------------------------------------------


def test_sotw_ack_gets_no_response_and_new_version_is_pushed(cp: ControlPlane, clients: list[AdsClient]) -> None:
    c = connect(cp, clients)
    c.send(type_url=cache.CLUSTER)
    r1 = c.recv()
    assert [x.type_url for x in r1.resources] == [cache.CLUSTER] * 2
    c.ack(r1)
    assert c.silent(0.4), "a plain ACK must not be answered (ping-pong)"

    publish(cp, {"a": [A], "b": [B], "c": [A]})
    r2 = c.recv()
    assert r2.version_info != r1.version_info and len(r2.resources) == 3
    c.ack(r2)
    assert c.silent(0.3)
    st = cp.status()[0]["clusters"]
    assert st["sent"] == st["acked"] == r2.version_info and st["last_nack"] is None


def test_sotw_named_types_and_stale_nonce(cp: ControlPlane, clients: list[AdsClient]) -> None:
    c = connect(cp, clients)
    c.send(type_url=cache.ENDPOINT, resource_names=["a"])
    r1 = c.recv()
    assert len(r1.resources) == 1
    # Push a newer version before the client ACKs r1: r1's nonce becomes stale.
    publish(cp, {"a": [A, B], "b": [B]})
    r2 = c.recv()
    c.send(type_url=cache.ENDPOINT, resource_names=["a", "b"], response_nonce=r1.nonce, version_info=r1.version_info)
    assert c.silent(0.3), "a request with a stale nonce is ignored"
    # Names changed with the current nonce: answered with the new selection.
    c.send(type_url=cache.ENDPOINT, resource_names=["a", "b"], response_nonce=r2.nonce, version_info=r2.version_info)
    r3 = c.recv()
    assert len(r3.resources) == 2


def test_sotw_nack_is_recorded_and_not_resent(cp: ControlPlane, clients: list[AdsClient]) -> None:
    c = connect(cp, clients)
    c.send(type_url=cache.CLUSTER)
    good = c.recv()
    c.ack(good)
    publish(cp, {"a": [A], "b": [B], "c": [A]})
    bad = c.recv()
    before = sample("trafficmgr_xds_nacks_total", type="clusters")
    c.send(type_url=cache.CLUSTER, version_info=good.version_info, response_nonce=bad.nonce, error="bad cluster c")
    assert c.silent(0.5), "the rejected version must not be resent"
    assert sample("trafficmgr_xds_nacks_total", type="clusters") == before + 1
    nack = cp.status()[0]["clusters"]["last_nack"]
    assert nack["error"] == "bad cluster c" and nack["version"] == bad.version_info
    assert nack["nonce"] == bad.nonce and nack["resources"] == ["a", "b", "c"]
    assert cp.nacks()[-1]["node_id"] == "node-1"
    # An unrelated change (endpoints) still flows; a newer cluster version is sent, and its ACK clears the NACK.
    publish(cp, {"a": [A], "b": [B]})
    fixed = c.recv()
    assert fixed.version_info == good.version_info and len(fixed.resources) == 2
    c.ack(fixed)
    wait_for(lambda: cp.status()[0]["clusters"]["last_nack"] is None, 2)


def test_sotw_nacked_version_is_answered_again_for_another_subscription(cp: ControlPlane, clients: list[AdsClient]) -> None:
    """A rejected response is not resent, but when the client then subscribes to more names (a new
    cluster's endpoints) it gets an answer, although the version string is the same."""
    c = connect(cp, clients)
    c.send(type_url=cache.ENDPOINT, resource_names=["a"])
    r = c.recv()
    c.send(type_url=cache.ENDPOINT, resource_names=["a"], response_nonce=r.nonce, error="bad endpoints a")
    assert c.silent(0.3), "the rejected response must not be resent"
    c.send(type_url=cache.ENDPOINT, resource_names=["a", "b"], response_nonce=r.nonce)
    again = c.recv()
    assert again.version_info == r.version_info and len(again.resources) == 2


def test_sotw_reconnect_with_current_version_is_answered(cp: ControlPlane, clients: list[AdsClient]) -> None:
    c = connect(cp, clients)
    c.send(type_url=cache.CLUSTER)
    r = c.recv()
    c.close()
    c2 = connect(cp, clients)
    c2.send(type_url=cache.CLUSTER, version_info=r.version_info)  # empty nonce: a reconnect
    again = c2.recv()
    assert again.version_info == r.version_info


def test_same_view_streams_share_response_bytes(
    cp: ControlPlane, clients: list[AdsClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[str] = []
    original = TypeSet.select

    def counting_select(self: TypeSet, names: frozenset[str] | None) -> list:
        built.append(self.type_url)
        return original(self, names)

    monkeypatch.setattr(TypeSet, "select", counting_select)
    publish(cp, {"a": [A], "b": [B], "x": [B]})  # fresh TypeSets: nothing cached yet
    c1 = connect(cp, clients, node_id="node-1")
    c2 = connect(cp, clients, node_id="node-2")
    r1s, r2s = [], []
    for c, out in ((c1, r1s), (c2, r2s)):
        c.send(type_url=cache.CLUSTER)
        out.append(c.recv())
        c.send(type_url=cache.ENDPOINT, resource_names=["a", "b"])
        out.append(c.recv())
    for r1, r2 in zip(r1s, r2s):
        # Nonces are unique per stream, not across streams: streams getting the same version share one
        # nonce and so one bytes object for the whole response.
        assert r1.nonce == r2.nonce
        assert c1.raw[r1.nonce] == c2.raw[r2.nonce]
        assert c1.body_without_nonce(r1) == c2.body_without_nonce(r2)
    # One body build per (type, names), shared by both streams.
    assert built == [cache.CLUSTER, cache.ENDPOINT]


# -- delta ------------------------------------------------------------------------------------------


def test_delta_wildcard_first_reply_even_empty(xds_server: ControlPlane, clients: list[AdsClient]) -> None:
    xds_server.nodes["node-1"] = "sidecar"
    xds_server.cache.set_view("sidecar", cache.Snapshot.build({}))
    c = connect(xds_server, clients, delta=True)
    c.send(type_url=cache.CLUSTER)
    r = c.recv()
    assert len(r.resources) == 0 and not r.removed_resources and r.type_url == cache.CLUSTER
    c.send(type_url=cache.ENDPOINT, resource_names_subscribe=["nothing-yet"])
    assert c.silent(0.3), "named resources that do not exist are not answered"
    # Also when the node becomes known only later.
    late = connect(xds_server, clients, delta=True, node_id="late")
    late.send(type_url=cache.LISTENER)
    assert late.silent(0.3)
    xds_server.nodes["late"] = "sidecar"
    xds_server.cache.notify()
    r = late.recv()
    assert r.type_url == cache.LISTENER and len(r.resources) == 0


def test_delta_diff_ack_and_subscriptions(cp: ControlPlane, clients: list[AdsClient]) -> None:
    c = connect(cp, clients, delta=True)
    c.send(type_url=cache.CLUSTER)
    r1 = c.recv()
    assert sorted(x.name for x in r1.resources) == ["a", "b"]
    c.ack(r1)
    assert c.silent(0.3), "a plain ACK must not be answered"
    c.send(type_url=cache.ENDPOINT, resource_names_subscribe=["a"])
    e1 = c.recv()
    assert [x.name for x in e1.resources] == ["a"]
    c.ack(e1, resource_names_subscribe=["b"])
    e2 = c.recv()
    assert [x.name for x in e2.resources] == ["b"]
    c.ack(e2)
    # Only the changed endpoint is sent.
    publish(cp, {"a": [A], "b": [B, A]})
    e3 = c.recv()
    assert e3.type_url == cache.ENDPOINT and [x.name for x in e3.resources] == ["b"]
    c.ack(e3)
    # Unsubscribed names are no longer sent.
    c.send(type_url=cache.ENDPOINT, resource_names_unsubscribe=["b"])
    wait_for(lambda: subscribed(cp, cache.ENDPOINT) == [{"a"}], 2)
    publish(cp, {"a": [A], "b": [B]})
    assert c.silent(0.4)


def test_delta_first_answers_are_shared_and_known_maps_are_not_copied(cp: ControlPlane, clients: list[AdsClient]) -> None:
    publish(cp, {"a": [A], "b": [B], "x": [B]})
    c1, c2 = connect(cp, clients, node_id="node-1", delta=True), connect(cp, clients, node_id="node-2", delta=True)
    firsts = []
    for c in (c1, c2):
        c.send(type_url=cache.CLUSTER)
        r = c.recv()
        c.ack(r)
        firsts.append(r)
    # A new stream's first answer is one message for every stream with the same subscription.
    assert firsts[0].nonce == firsts[1].nonce and c1.raw[firsts[0].nonce] == c2.raw[firsts[1].nonce]
    # In sync, each stream's record of what its client has is the shared TypeSet, not a copy.
    states = cp.server.call(lambda: [s.types[cache.CLUSTER].known for s in cp.server.server._streams])
    current = cp.cache.get("sidecar").types[cache.CLUSTER]
    assert [k.base for k in states] == [current, current] and all(k.over == {} for k in states)
    assert all(sorted(k) == ["a", "b", "x"] for k in states)


def test_known_map_copy_on_write() -> None:
    from trafficmgr.core.cache import Resource
    from trafficmgr.core.xds.streams import Known

    def ts(**versions: str) -> TypeSet:
        return TypeSet(cache.CLUSTER, [Resource(cache.CLUSTER, n, b"", v) for n, v in versions.items()])

    k = Known({"old": "0"})
    assert not k.empty() and k.get("old") == "0" and "old" in k
    k.rebase(ts(a="1", b="1", c="1"), frozenset({"a", "b"}))
    assert sorted(k) == ["a", "b"] and k.get("c") is None and "c" not in k  # out of scope
    k["c"] = "2"
    assert k.pop("a") == "1" and "a" not in k and k.get("a", "none") == "none"
    assert k.pop("missing") is None
    k["b"] = "3"
    assert sorted(k) == ["b", "c"] and k.get("b") == "3"
    assert Known().empty() and not k.empty()


def test_delta_reconnect_gets_only_the_diff(cp: ControlPlane, clients: list[AdsClient]) -> None:
    c = connect(cp, clients, delta=True)
    c.send(type_url=cache.CLUSTER)
    r1 = c.recv()
    versions = {x.name: x.version for x in r1.resources}
    c.close()
    # While disconnected: "b" removed, "c" added, "a" unchanged.
    publish(cp, {"a": [A], "c": [B]})
    c2 = connect(cp, clients, delta=True)
    c2.send(type_url=cache.CLUSTER, initial_resource_versions=versions)
    updates = c2.recv()
    assert [x.name for x in updates.resources] == ["c"] and not updates.removed_resources
    removals = c2.recv()
    assert not removals.resources and list(removals.removed_resources) == ["b"]


def test_delta_push_sends_updates_before_removals(cp: ControlPlane, clients: list[AdsClient]) -> None:
    c = connect(cp, clients, delta=True)
    c.send(type_url=cache.CLUSTER)
    c.ack(c.recv())
    c.send(type_url=cache.LISTENER)
    c.ack(c.recv())
    c.send(type_url=cache.ROUTE, resource_names_subscribe=["web"])
    c.ack(c.recv())
    # Drop cluster "b" and its route: the route update must come before the cluster removal.
    publish(cp, {"a": [A]})
    seen = []
    for _ in range(2):
        r = c.recv()
        seen.append((cache.short_name(r.type_url), [x.name for x in r.resources], list(r.removed_resources)))
    assert seen == [("routes", ["web"], []), ("clusters", [], ["b"])]


def test_delta_nack_keeps_known_versions(cp: ControlPlane, clients: list[AdsClient]) -> None:
    c = connect(cp, clients, delta=True)
    c.send(type_url=cache.CLUSTER)
    c.ack(c.recv())
    publish(cp, {"a": [A], "b": [B], "c": [A]})
    bad = c.recv()
    assert [x.name for x in bad.resources] == ["c"]
    c.send(type_url=cache.CLUSTER, response_nonce=bad.nonce, error="no c")
    assert c.silent(0.5), "rejected resource versions are not resent"
    assert cp.status()[0]["clusters"]["last_nack"]["resources"] == ["c"]
    publish(cp, {"a": [A], "b": [B], "c": [A], "d": [A]})  # a newer version: only "d" is new to the client
    fixed = c.recv()
    assert [x.name for x in fixed.resources] == ["d"] and not fixed.removed_resources
    c.ack(fixed)
    time.sleep(0.2)
    assert cp.status()[0]["clusters"]["last_nack"] is not None, "the rejected 'c' is still served"
    # Dropping 'c' resolves the NACK; the client never had it, so nothing needs to be sent.
    publish(cp, {"a": [A], "b": [B], "d": [A]})
    wait_for(lambda: cp.status()[0]["clusters"]["last_nack"] is None, 2)
    assert c.silent(0.3)


# -- identity ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_unknown_node_gets_config_once_known(cp: ControlPlane, clients: list[AdsClient], delta: bool) -> None:
    before = sample("trafficmgr_xds_streams_refused_total", reason="unknown")
    c = connect(cp, clients, delta=delta, node_id="stranger")
    c.send(type_url=cache.CLUSTER)
    assert c.silent(0.4)
    assert sample("trafficmgr_xds_streams_refused_total", reason="unknown") == before + 1
    assert [s["view"] for s in cp.status()] == [None]
    cp.nodes["stranger"] = "sidecar"
    cp.cache.notify()
    r = c.recv()
    assert len(r.resources) == 2
    assert cp.status()[0]["view"] == "sidecar"


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_permission_error_aborts_stream(cp: ControlPlane, clients: list[AdsClient], delta: bool) -> None:
    def resolver(node_id: str, cluster: str, peer: str) -> str | None:
        assert peer == "127.0.0.1"
        raise PermissionError(f"{node_id} may not impersonate")

    cp.resolver = resolver
    before = sample("trafficmgr_xds_streams_refused_total", reason="permission")
    c = connect(cp, clients, delta=delta, node_id="impostor")
    c.send(type_url=cache.CLUSTER)
    with pytest.raises(grpc.RpcError) as info:
        c.recv()
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "impersonate" in info.value.details()
    assert sample("trafficmgr_xds_streams_refused_total", reason="permission") == before + 1
    wait_for(lambda: cp.status() == [], 2)


# -- server plumbing --------------------------------------------------------------------------------


def test_port_in_use_is_a_clear_oserror(cp: ControlPlane) -> None:
    with pytest.raises(PortInUse) as info:
        XdsServerThread(cp.cache, "127.0.0.1", cp.port).start()
    assert isinstance(info.value, OSError) and str(cp.port) in str(info.value)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(PortInUse):
            XdsServerThread(cache.SnapshotCache(), "127.0.0.1", s.getsockname()[1]).start()


def test_stop_closes_streams_and_connected_gauge(cp: ControlPlane) -> None:
    c = AdsClient(cp.port, delta=True)
    c.send(type_url=cache.CLUSTER)
    c.recv()
    assert sample("trafficmgr_xds_connected_proxies", role="sidecar", mode="delta") >= 1
    cp.stop()
    with pytest.raises((EOFError, grpc.RpcError)):
        for _ in range(10):
            c.recv(2)
    assert sample("trafficmgr_xds_connected_proxies", role="sidecar", mode="delta") == 0
    c.close()
    cp.start()  # the fixture stops it again


def test_parse_peer() -> None:
    assert parse_peer("ipv4:10.1.2.3:5555") == "10.1.2.3"
    assert parse_peer("ipv6:[::1]:5555") == "::1"
    assert parse_peer("ipv6:%5Bfd00::5%5D:80") == "fd00::5"
    assert parse_peer("unix:/tmp/sock") == ""


@pytest.mark.parametrize("mode", ["sotw", "delta"])
def test_thousand_streams_get_a_push_quickly(xds_server: ControlPlane, mode: str) -> None:
    """1000 streams on the server's one loop: a change reaches (and is ACKed by) all of them quickly."""
    n = 1000
    xds_server.resolver = lambda node_id, cluster, peer: "sidecar"
    clusters = {f"c{i}": [("127.0.0.1", 1000 + i, 1)] for i in range(100)}
    xds_server.cache.set_view("sidecar", web_snapshot(10000, clusters))
    script = Path(__file__).with_name("xds_load_client.py")
    proc = subprocess.Popen([sys.executable, str(script), str(xds_server.port), str(n), mode], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
        assert len(xds_server.status()) == n
        def sent() -> float:
            return sample("trafficmgr_xds_responses_sent_total", type="clusters", mode=mode)

        def acked() -> float:
            return sample("trafficmgr_xds_push_to_ack_seconds_count", type="clusters")

        sent0, acked0 = sent(), acked()
        start = time.monotonic()
        clusters["new"] = [("127.0.0.1", 9, 1)]
        xds_server.cache.set_view("sidecar", web_snapshot(10000, clusters, previous=xds_server.cache.get("sidecar")))
        wait_for(lambda: acked() - acked0 >= n, 20)
        elapsed = time.monotonic() - start
        assert sent() - sent0 == n, "exactly one response per stream"
        assert elapsed < 5, elapsed  # ~0.2 s measured on 2 cores
    finally:
        proc.kill()
        proc.wait()


def _replace_cluster_a(cp: ControlPlane, timeout_ms: int) -> None:
    """Publish the current snapshot with cluster "a" changed (its connect timeout) and nothing else."""
    from envoy.config.cluster.v3 import cluster_pb2

    from trafficmgr.core.protos import duration_ms

    snap = cp.cache.get("sidecar")
    msg = cluster_pb2.Cluster.FromString(eds_cluster("a").body)
    msg.connect_timeout.CopyFrom(duration_ms(timeout_ms))
    types = {t: list(ts.resources.values()) for t, ts in snap.types.items()}
    types[cache.CLUSTER] = [r for r in types[cache.CLUSTER] if r.name != "a"]
    types[cache.CLUSTER].append(cache.Resource.from_message(msg, "a", refs=[(cache.ENDPOINT, "a")]))
    cp.cache.set_view("sidecar", cache.Snapshot.build(types, snap))


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_replaced_cluster_gets_its_endpoints_again_in_one_shared_message(
        cp: ControlPlane, clients: list[AdsClient], delta: bool) -> None:
    """Envoy warms a replaced cluster until its endpoints arrive again, so they follow even though they
    did not change: only the replaced cluster's (delta), in one message every stream in the same state
    shares (same nonce, same bytes), also when the same endpoints version is forced again."""
    streams = [connect(cp, clients, node_id=n, delta=delta) for n in ("node-1", "node-2")]
    names: dict[str, list[str]] = {} if delta else {"resource_names": ["a", "b"]}  # a SotW ACK repeats them
    for c in streams:
        c.send(type_url=cache.CLUSTER)
        c.ack(c.recv())
        if delta:
            c.send(type_url=cache.ENDPOINT, resource_names_subscribe=["a", "b"])
        else:
            c.send(type_url=cache.ENDPOINT, resource_names=["a", "b"])
        c.ack(c.recv(), **names)
    endpoints_version = cp.cache.get("sidecar").types[cache.ENDPOINT].version
    nonces = []
    for timeout_ms in (2000, 3000, 2000):
        _replace_cluster_a(cp, timeout_ms)
        got = []
        for c in streams:
            clusters = c.recv()
            assert clusters.type_url == cache.CLUSTER
            c.ack(clusters)
            eps = c.recv()
            assert eps.type_url == cache.ENDPOINT
            if delta:
                assert [x.name for x in eps.resources] == ["a"] and not eps.removed_resources
            else:
                assert eps.version_info == endpoints_version and len(eps.resources) == 2
            c.ack(eps, **names)
            got.append((eps.nonce, c.raw[eps.nonce]))
        assert got[0] == got[1], "both streams were forced by the same change: one shared response"
        assert all(c.silent(0.2) for c in streams)
        nonces.append(got[0][0])
    assert cp.cache.get("sidecar").types[cache.ENDPOINT].version == endpoints_version
    if not delta:
        # The change undone (2000 ms again) brings the same content back, but not an earlier nonce: a
        # late request carrying it could pass for the answer. (Delta may reuse a nonce once it is ACKed,
        # and never while it is in flight: each delta response gets exactly one answer.)
        assert len(set(nonces)) == 3, nonces
