"""Simulated xDS clients for the benchmark: K ADS streams that behave like Envoy.

Each stream subscribes to clusters and listeners (wildcard), then to the endpoints and routes those name,
and ACKs every response. Run as ``python -m trafficmgr.bench.clients --target HOST:PORT --clients K
[--delta]``; it reads commands on stdin and answers on stdout, one JSON line each:

- ``{"cmd": "ready"}`` -> ``{"ready": n}`` once every stream has ACKed at least one endpoints response;
- ``{"cmd": "wait", "since": T, "type": "endpoints"}`` -> ``{"latency_ms": [...]}``: for every stream,
  the time from wall-clock ``T`` until it ACKed the first response of that type received after the
  command arrived (the caller sends the command right after making the change);
- ``{"cmd": "quit"}``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from trafficmgr.core import cache

SOTW = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
DELTA = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
SHORT = {cache.CLUSTER: "clusters", cache.ENDPOINT: "endpoints", cache.LISTENER: "listeners", cache.ROUTE: "routes"}


class SimClient:
    """One simulated Envoy stream."""

    def __init__(self, channel: grpc.aio.Channel, node_id: str, delta: bool) -> None:
        self.node = base_pb2.Node(id=node_id, cluster="bench")
        self.delta = delta
        self.channel = channel
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.acked: dict[str, float] = {}  # short type -> time of the last ACK
        self.counts: dict[str, int] = {}
        self.eds_names: frozenset[str] = frozenset()
        self.rds_names: frozenset[str] = frozenset()
        # The sorted subscriptions every state-of-the-world ACK repeats, kept instead of re-sorted per ACK:
        # the measuring process must not be what the figures measure (Envoy does this in C++).
        self.eds_sorted: list[str] = []
        self.rds_sorted: list[str] = []
        self.first = True

    def _req(self, type_url: str, **kw: Any) -> Any:
        cls = discovery_pb2.DeltaDiscoveryRequest if self.delta else discovery_pb2.DiscoveryRequest
        msg = cls(type_url=type_url, **kw)
        if self.first:
            msg.node.CopyFrom(self.node)
            self.first = False
        return msg

    async def run(self) -> None:
        method = DELTA if self.delta else SOTW
        resp_cls = discovery_pb2.DeltaDiscoveryResponse if self.delta else discovery_pb2.DiscoveryResponse
        call = self.channel.stream_stream(method, request_serializer=_serialize,
                                          response_deserializer=resp_cls.FromString)(request_iterator=None)
        await call.write(self._req(cache.CLUSTER))
        await call.write(self._req(cache.LISTENER))
        async for resp in call:
            await self._on_response(call, resp)

    async def _on_response(self, call: Any, resp: Any) -> None:
        t = resp.type_url
        if self.delta:
            names = [r.name for r in resp.resources]
        else:
            names = []
            if t in (cache.CLUSTER, cache.LISTENER):
                for any_msg in resp.resources:
                    names.append(_name_of(t, any_msg))
        if t == cache.CLUSTER and names:
            new = _shared(frozenset(names) if not self.delta or not self.eds_names else self.eds_names | frozenset(names))
            if new != self.eds_names:
                added = new - self.eds_names
                self.eds_names = new
                self.eds_sorted = _sorted(new)
                if self.delta:
                    await call.write(self._req(cache.ENDPOINT, resource_names_subscribe=sorted(added)))
                else:
                    await call.write(self._req(cache.ENDPOINT, resource_names=self.eds_sorted))
        if t == cache.LISTENER and names:
            routes = set()
            for any_msg in resp.resources:
                routes |= _route_names(any_msg.resource if self.delta else any_msg)
            if routes - self.rds_names:
                added = frozenset(routes) - self.rds_names
                self.rds_names = _shared(self.rds_names | frozenset(routes))
                self.rds_sorted = _sorted(self.rds_names)
                if self.delta:
                    await call.write(self._req(cache.ROUTE, resource_names_subscribe=sorted(added)))
                else:
                    await call.write(self._req(cache.ROUTE, resource_names=self.rds_sorted))
        # ACK
        if self.delta:
            await call.write(self._req(t, response_nonce=resp.nonce))
        else:
            # The subscribed names (10k at 10k services) every ACK repeats are serialized once per set and
            # shared; the ACK's own fields follow (concatenated protobuf messages merge, lists append).
            subscribed = self.eds_sorted if t == cache.ENDPOINT else self.rds_sorted if t == cache.ROUTE else []
            ack = self._req(t, response_nonce=resp.nonce, version_info=resp.version_info).SerializeToString()
            await call.write(_names_bytes(subscribed) + ack if subscribed else ack)
        short = SHORT.get(t, t)
        now = time.time()
        self.acked[short] = now
        self.counts[short] = self.counts.get(short, 0) + 1
        self.queue.put_nowait((short, now))


def _serialize(msg: Any) -> bytes:
    return msg if isinstance(msg, bytes) else msg.SerializeToString()


_SETS: dict[frozenset[str], frozenset[str]] = {}
_SORTED: dict[int, list[str]] = {}
_NAMES_BYTES: dict[int, bytes] = {}
_STRINGS: dict[str, str] = {}


def _shared(names: frozenset[str]) -> frozenset[str]:
    """One object per distinct subscription set: a thousand clients subscribed to the same 10k clusters
    hold one set (the measuring process must not need gigabytes to measure)."""
    return _SETS.setdefault(names, names)


def _sorted(names: frozenset[str]) -> list[str]:
    out = _SORTED.get(id(names))
    if out is None:
        out = _SORTED[id(names)] = sorted(names)
    return out


def _names_bytes(names: list[str]) -> bytes:
    """``resource_names`` (field 3 of a DiscoveryRequest) of a shared sorted list, serialized once."""
    out = _NAMES_BYTES.get(id(names))
    if out is None:
        out = _NAMES_BYTES[id(names)] = discovery_pb2.DiscoveryRequest(resource_names=names).SerializeToString()
    return out


def _name_of(type_url: str, any_msg: Any) -> str:
    """A resource's ``name`` (field 1, which serializers write first) read from its bytes, else parsed."""
    data = any_msg.value
    if data[:1] == b"\x0a":
        length, shift, pos = 0, 0, 1
        while pos < len(data):
            b = data[pos]
            length |= (b & 0x7F) << shift
            pos += 1
            if not b & 0x80:
                name = data[pos:pos + length].decode()
                return _STRINGS.setdefault(name, name)
            shift += 7
    from trafficmgr.core.protos import message_class

    msg: Any = message_class(type_url)()  # an Envoy resource: generated code without stubs
    msg.ParseFromString(data)
    return msg.name


def _route_names(any_msg: Any) -> set[str]:
    from envoy.config.listener.v3 import listener_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2

    lst = listener_pb2.Listener()
    lst.ParseFromString(any_msg.value)
    out = set()
    for chain in lst.filter_chains:
        for f in chain.filters:
            if f.typed_config.type_url.endswith("HttpConnectionManager"):
                hcm = hcm_pb2.HttpConnectionManager()
                hcm.ParseFromString(f.typed_config.value)
                if hcm.HasField("rds"):
                    out.add(hcm.rds.route_config_name)
    return out


async def main_async(args: argparse.Namespace) -> None:
    channels = [grpc.aio.insecure_channel(args.target, options=[("grpc.max_receive_message_length", -1)])
                for _ in range(max(1, args.clients // 100))]
    # Node ids of pods that exist (``svc-<i>-<j>.default``), as real sidecars would claim.
    n_pods = args.services * args.pods
    clients = [SimClient(channels[i % len(channels)], f"svc-{(i % n_pods) // args.pods}-{i % args.pods}.default", args.delta)
               for i in range(args.clients)]
    tasks: list[asyncio.Task[None]] = []

    async def connect() -> None:
        """Streams open in waves of ``--wave``, the next once the last has its endpoints (or after 60 s):
        at 10k services each first answer is megabytes, and a thousand at once needed over 12 GB here."""
        for start in range(0, len(clients), args.wave):
            wave = clients[start:start + args.wave]
            tasks.extend(asyncio.create_task(c.run()) for c in wave)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not all("endpoints" in c.acked for c in wave):
                await asyncio.sleep(0.02)

    connecting = asyncio.create_task(connect())
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def out(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    while True:
        line = await reader.readline()
        if not line:
            break
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        if cmd["cmd"] == "ready":
            deadline = time.monotonic() + cmd.get("timeout", 120)
            while time.monotonic() < deadline and not all("endpoints" in c.acked and "routes" in c.acked for c in clients):
                await asyncio.sleep(0.05)
            # Like Envoy (C++), the measuring side must not add garbage-collector pauses of its own: move
            # the initial configuration out of the collector's sight (see trafficmgr.core.controlplane).
            gc.collect()
            gc.freeze()
            out({"ready": sum(1 for c in clients if "endpoints" in c.acked)})
        elif cmd["cmd"] == "drain":
            for c in clients:
                while not c.queue.empty():
                    c.queue.get_nowait()
            out({"drained": True})
        elif cmd["cmd"] == "wait":
            since, want = cmd["since"], cmd.get("type", "endpoints")

            async def first(c: SimClient, want: str, since: float) -> float:
                while True:
                    short, t = await c.queue.get()
                    if short == want and t >= since:
                        return (t - since) * 1000

            try:
                lat = await asyncio.wait_for(asyncio.gather(*(first(c, want, since) for c in clients)), cmd.get("timeout", 60))
            except TimeoutError:
                lat = []
            out({"latency_ms": lat})
    connecting.cancel()
    for t in tasks:
        t.cancel()
    for ch in channels:
        await ch.close(grace=None)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--target", required=True)
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--delta", action="store_true")
    p.add_argument("--services", type=int, default=1000, help="services loaded (node ids name their pods)")
    p.add_argument("--pods", type=int, default=10, help="pods per service")
    p.add_argument("--wave", type=int, default=100, help="streams opened at once (the next wave after their endpoints)")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
