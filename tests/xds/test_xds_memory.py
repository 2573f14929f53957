"""Server memory with many streams: shared first answers, and the heap given back after a burst of writes."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from trafficmgr.core import cache, wire
from trafficmgr.core.cache import Resource
from trafficmgr.core.xds import responder, responses
from trafficmgr.testing import ControlPlane, wait_for

DELTA = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"


def big(type_url: str, name: str, size: int, refs: tuple[tuple[str, str], ...] = ()) -> Resource:
    """A resource of ``size`` opaque bytes (the server never parses bodies; the client here neither)."""
    body = name.encode() * (size // len(name))
    version = cache.content_version(body)
    any_bytes = wire.field_str(1, type_url) + wire.field(2, body)
    delta = wire.field_str(1, version) + wire.field(2, any_bytes) + wire.field_str(3, name)
    return Resource(type_url, name, body, version, refs, any_bytes, delta)


class Stream:
    """A delta ADS stream accepting messages of any size (Envoy's limit is far above gRPC's 4 MB default)."""

    def __init__(self, port: int, node_id: str) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", -1)])
        self.node_id = node_id
        self._requests: queue.Queue[Any] = queue.Queue()
        rpc = self.channel.stream_stream(DELTA, request_serializer=lambda m: m.SerializeToString(),
                                         response_deserializer=discovery_pb2.DeltaDiscoveryResponse.FromString)
        self._responses = rpc(iter(self._requests.get, None))

    def ask(self, type_url: str, names: list[str] | None = None, nonce: str = "") -> discovery_pb2.DeltaDiscoveryResponse:
        req = discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, resource_names_subscribe=names or [],
                                                  response_nonce=nonce, node=base_pb2.Node(id=self.node_id))
        self._requests.put(req)
        return next(self._responses)

    def close(self) -> None:
        self._requests.put(None)
        self.channel.close()


@pytest.fixture
def streams(xds_server: ControlPlane) -> Iterator[list[Stream]]:
    made: list[Stream] = []
    yield made
    for s in made:
        s.close()


def test_first_answers_of_every_type_are_encoded_once_for_all_streams(
    xds_server: ControlPlane, streams: list[Stream], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A mesh whose four first answers add up to 20 MB (at 10k services x 10 endpoints they are 16.4 MB):
    # every stream connecting after the first must get the same cached message of every type, not encode
    # (and have gRPC buffer) a copy of its own because the types evicted each other from the cache.
    mb = 1 << 20
    xds_server.cache.set_view("sidecar", cache.Snapshot.build({
        cache.CLUSTER: [big(cache.CLUSTER, "a", 5 * mb, ((cache.ENDPOINT, "a"),))],
        cache.ENDPOINT: [big(cache.ENDPOINT, "a", 5 * mb)],
        cache.LISTENER: [big(cache.LISTENER, "web", 5 * mb, ((cache.ROUTE, "web"),))],
        cache.ROUTE: [big(cache.ROUTE, "web", 5 * mb)],
    }))
    encoded: list[Any] = []
    put = responses.DELTA_MESSAGES.put

    def counting_put(key: Any, value: bytes) -> bytes:
        encoded.append(key)
        return put(key, value)

    monkeypatch.setattr(responses.DELTA_MESSAGES, "put", counting_put)
    nonces = []
    for i in range(3):
        xds_server.nodes[f"node-{i}"] = "sidecar"
        s = Stream(xds_server.port, f"node-{i}")
        streams.append(s)
        got = []
        for type_url, names in ((cache.CLUSTER, None), (cache.ENDPOINT, ["a"]), (cache.LISTENER, None),
                                (cache.ROUTE, ["web"])):
            r = s.ask(type_url, names, got[-1].nonce if got else "")
            assert r.type_url == type_url and len(r.resources) == 1
            got.append(r)
        nonces.append([r.nonce for r in got])
    assert nonces[0] == nonces[1] == nonces[2], "streams in the same state share the nonce (and the message)"
    assert len(encoded) == 4, f"each first answer encoded once, not once per stream: {len(encoded)} encodings"


def test_heap_is_trimmed_after_a_burst_of_stream_writes(
    xds_server: ControlPlane, streams: list[Stream], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Streams connecting with no cache change at all (a wave of sidecars starting) still leave the
    # allocator's high-water mark behind: the server gives it back once their writes pause.
    trims: list[float] = []
    monkeypatch.setattr(responder, "release_memory", lambda: trims.append(time.monotonic()))
    monkeypatch.setattr(responder, "TRIM_AFTER_BYTES", 1 << 20)
    monkeypatch.setattr(responder, "TRIM_DELAY", 0.2)
    xds_server.nodes["node-1"] = "sidecar"
    xds_server.cache.set_view("sidecar", cache.Snapshot.build({
        cache.CLUSTER: [big(cache.CLUSTER, "a", 2 << 20, ((cache.ENDPOINT, "a"),))],
        cache.ENDPOINT: [big(cache.ENDPOINT, "a", 100)],
    }))
    wait_for(lambda: len(trims) == 1, 3)  # the cache change's own trim
    time.sleep(0.5)
    trims.clear()
    s = Stream(xds_server.port, "node-1")
    streams.append(s)
    written = time.monotonic()
    assert len(s.ask(cache.CLUSTER).resources) == 1
    wait_for(lambda: len(trims) == 1, 3)
    assert trims[0] - written >= 0.2, "trimmed once the writes paused, not during them"
    time.sleep(0.5)
    assert len(trims) == 1, "once per burst"


def test_a_first_answer_in_flight_keeps_no_per_name_maps(xds_server: ControlPlane, streams: list[Stream]) -> None:
    # Until its ACK, a response is kept to undo it on a NACK. A first answer (every resource, none of which
    # the client had) must not cost the stream dicts of every name: only the shared resources' list.
    xds_server.nodes["node-1"] = "sidecar"
    names = sorted(f"c{i}" for i in range(50))
    xds_server.cache.set_view("sidecar", cache.Snapshot.build({
        cache.CLUSTER: [big(cache.CLUSTER, n, 10, ((cache.ENDPOINT, n),)) for n in names],
        cache.ENDPOINT: [big(cache.ENDPOINT, n, 10) for n in names],
    }))
    s = Stream(xds_server.port, "node-1")
    streams.append(s)
    r = s.ask(cache.CLUSTER)
    assert sorted(x.name for x in r.resources) == names

    def state() -> tuple[Any, ...]:
        (stream,) = xds_server.server.server._streams
        st = stream.types[cache.CLUSTER]
        (sent,) = st.inflight.values()
        return sent.previous, st.known.over, sorted(st.known)

    # The push ends (``known`` rebased on the type set) just after the client got the response.
    wait_for(lambda: xds_server.server.call(state)[2] == names, 3)
    previous, over, _ = xds_server.server.call(state)
    assert previous == {} and over == {}, f"no per-name map per stream for a first answer: {previous}"
