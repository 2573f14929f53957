"""Abusive ADS clients for tests/xds/test_xds_abuse.py, run as a separate process (grpcio in its own
process; its CPU and memory are not the server's).

``python xds_abuse_client.py PORT SCENARIO JSON_ARGS`` prints one JSON line with the outcome, then (for
``flood``) ``HOLD`` and keeps its streams open until stdin closes.

Every connection is made from a chosen loopback source address (``src``, e.g. ``127.0.0.5``) through a
relay in this process (gRPC cannot bind a source address): the server sees that address as the peer.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
SOTW = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
OPTIONS = [("grpc.enable_http_proxy", 0), ("grpc.use_local_subchannel_pool", 1),
           ("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


async def relay(server_port: int, src: str) -> int:
    """A listener on 127.0.0.1 whose connections go on to the server from ``src``; returns its port."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", server_port, local_addr=(src, 0))
        except OSError:
            writer.close()
            return
        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        except asyncio.CancelledError:  # the client is exiting
            pass

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    return int(server.sockets[0].getsockname()[1])


async def channels(server_port: int, src: str, n: int) -> list[grpc.aio.Channel]:
    port = await relay(server_port, src)
    return [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS) for _ in range(n)]


def open_stream(channel: grpc.aio.Channel) -> Any:
    return channel.stream_stream(SOTW, request_serializer=lambda m: m.SerializeToString(),
                                 response_deserializer=discovery_pb2.DiscoveryResponse.FromString)()


def request(node_id: str | None = None, **fields: Any) -> discovery_pb2.DiscoveryRequest:
    req = discovery_pb2.DiscoveryRequest(**fields)
    if node_id is not None:
        req.node.CopyFrom(base_pb2.Node(id=node_id, cluster="sidecar"))
    return req


async def write(call: Any, req: discovery_pb2.DiscoveryRequest) -> None:
    """Send ``req`` unless the server already ended the call (a refused stream)."""
    try:
        await call.write(req)
    except (grpc.RpcError, asyncio.InvalidStateError):
        pass


async def settle(calls: list[Any], quiet: float, limit: float) -> dict[str, int]:
    """Wait until every call ended or none has ended for ``quiet`` seconds (or ``limit``); count end codes
    (``open``: not ended). An ended call's code is final: once all ended, waiting longer changes nothing."""
    deadline = time.monotonic() + limit
    ended, last_change = -1, time.monotonic()
    while time.monotonic() < deadline:
        now_ended = sum(1 for c in calls if c.done())
        if now_ended == len(calls):
            break
        if now_ended != ended:
            ended, last_change = now_ended, time.monotonic()
        elif time.monotonic() - last_change > quiet:
            break
        await asyncio.sleep(0.2)
    codes: dict[str, int] = {}
    for c in calls:
        key = (await c.code()).name if c.done() else "open"
        codes[key] = codes.get(key, 0) + 1
    return codes


async def flood(port: int, sources: list[str], total: int) -> None:
    """``total`` streams spread over ``sources``, each naming a random (unknown) node."""
    chans = [ch for src in sources for ch in await channels(port, src, 4)]
    calls = []
    started = time.monotonic()
    for i in range(total):
        call = open_stream(chans[i % len(chans)])
        calls.append(call)
        await write(call, request(f"pod-{os.urandom(6).hex()}.ns-{i % 97}", type_url=CDS))
        if i % 200 == 199:
            await asyncio.sleep(0)  # let the loop move bytes
    codes = await settle(calls, quiet=3.0, limit=45.0)
    print(json.dumps({"codes": codes, "seconds": round(time.monotonic() - started, 1)}), flush=True)
    print("HOLD", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    os._exit(0)  # no orderly teardown of thousands of calls and relays


async def silent(port: int, src: str, n: int) -> None:
    """``n`` streams that never send a request."""
    chans = await channels(port, src, 2)
    started = time.monotonic()
    calls = [open_stream(chans[i % 2]) for i in range(n)]
    for c in calls:  # start the RPCs (initial metadata goes out without a message)
        await c.wait_for_connection()
    codes = await settle(calls, quiet=5.0, limit=30.0)  # quiet: longer than the test's --xds-node-timeout 2
    print(json.dumps({"codes": codes, "seconds": round(time.monotonic() - started, 1)}), flush=True)


async def big(port: int, src: str, sizes_mib: list[float], error_mib: float) -> None:
    """One stream per size with a first request of that size (resource names), and one whose second
    request carries ``error_mib`` MiB of error detail."""
    chans = await channels(port, src, 1)
    calls = []
    for size in sizes_mib:
        call = open_stream(chans[0])
        names = ["n" * 1000] * int(size * 1024 * 1024 / 1003)
        await write(call, request(f"big-{size}.ns", type_url=CDS, resource_names=names))
        calls.append(call)
    call = open_stream(chans[0])
    await write(call, request("nack-big.ns", type_url=CDS))
    req = request(type_url=CDS, response_nonce="x")
    req.error_detail.code = 13
    req.error_detail.message = "e" * int(error_mib * 1024 * 1024)
    await write(call, req)
    calls.append(call)
    await settle(calls, quiet=2.0, limit=30.0)
    out = [[(await c.code()).name, (await c.details())[:200]] if c.done() else ["open", ""] for c in calls]
    print(json.dumps({"results": out}), flush=True)


async def unknown_types(port: int, src: str, n: int, names: int) -> None:
    """One stream asking for ``n`` types the server does not serve, ``names`` names each."""
    chans = await channels(port, src, 1)
    call = open_stream(chans[0])
    for i in range(n):
        await call.write(request("unknown-types.ns" if i == 0 else None, type_url=f"type.googleapis.com/evil.T{i}",
                                 resource_names=[f"r{i}-{j}" for j in range(names)]))
    reading = asyncio.ensure_future(call.read())
    await asyncio.sleep(2.0)
    answered = reading.done() and not reading.exception() and reading.result() is not grpc.aio.EOF
    print(json.dumps({"answered": answered, "ended": call.done()}), flush=True)
    call.cancel()


async def nacks(port: int, src: str, node_id: str, n: int, error_mib: float) -> None:
    """A stream claiming ``node_id`` (from its pod IP): NACK its CDS response ``n`` times."""
    chans = await channels(port, src, 1)
    call = open_stream(chans[0])
    await call.write(request(node_id, type_url=CDS))
    resp = await asyncio.wait_for(call.read(), 20)
    text = "E" * int(error_mib * 1024 * 1024)
    for _ in range(n):
        req = request(type_url=CDS, response_nonce=resp.nonce, version_info="")
        req.error_detail.code = 13
        req.error_detail.message = text
        await call.write(req)
    await asyncio.sleep(0.5)
    ended = call.done()
    call.cancel()
    print(json.dumps({"sent": n, "ended": ended}), flush=True)


SCENARIOS = {"flood": flood, "silent": silent, "big": big, "unknown": unknown_types, "nacks": nacks}

if __name__ == "__main__":
    asyncio.run(SCENARIOS[sys.argv[2]](int(sys.argv[1]), **json.loads(sys.argv[3])))
