"""Load generator: ``python xds_load_client.py PORT N sotw|delta`` opens N ADS streams (asyncio, 10
channels), ACKs every CDS response, prints ``READY`` once all got their first response, then runs until
killed."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
SERVICE = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"


async def stream(channel: grpc.aio.Channel, i: int, delta: bool, first: asyncio.Future[None]) -> None:
    queue: asyncio.Queue[object] = asyncio.Queue()

    async def requests() -> AsyncIterator[object]:
        while True:
            yield await queue.get()

    req_cls = discovery_pb2.DeltaDiscoveryRequest if delta else discovery_pb2.DiscoveryRequest
    resp_cls = discovery_pb2.DeltaDiscoveryResponse if delta else discovery_pb2.DiscoveryResponse
    method = SERVICE + ("DeltaAggregatedResources" if delta else "StreamAggregatedResources")
    call = channel.stream_stream(method, request_serializer=lambda m: m.SerializeToString(), response_deserializer=resp_cls.FromString)(requests())
    queue.put_nowait(req_cls(node=base_pb2.Node(id=f"load-{i}"), type_url=CDS))
    async for resp in call:
        if not first.done():
            first.set_result(None)
        ack = req_cls(type_url=CDS, response_nonce=resp.nonce)
        if not delta:
            ack.version_info = resp.version_info
        queue.put_nowait(ack)


async def main(port: int, n: int, delta: bool) -> None:
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(10)]
    loop = asyncio.get_running_loop()
    firsts = [loop.create_future() for _ in range(n)]
    tasks = [asyncio.create_task(stream(channels[i % 10], i, delta, firsts[i])) for i in range(n)]
    await asyncio.gather(*firsts)
    print("READY", flush=True)
    await asyncio.gather(*tasks)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "delta"))
