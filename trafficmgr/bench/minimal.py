"""The benchmark's lower bound: a minimal ADS loop that sends prebuilt bytes and nothing else.

It answers each stream's first request per type with a prebuilt response and ACKs are ignored; ``push()``
sends a prebuilt endpoints response to every stream. The real server's propagation latency divided by
this one's is the pipeline's overhead, measured in the same run on the same machine.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from trafficmgr.core import cache, wire

SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"


class MinimalAds:
    """``MinimalAds(snapshot).start()`` serves ``snapshot`` (SotW and delta) on 127.0.0.1:``port``."""

    def __init__(self, snapshot: cache.Snapshot, host: str = "127.0.0.1", port: int = 0) -> None:
        self.snapshot = snapshot
        self.host, self.port = host, port
        self.loop: asyncio.AbstractEventLoop | None = None
        self._streams: list[tuple[asyncio.Queue[bytes], bool]] = []
        self._nonce = 0
        self._thread: threading.Thread | None = None
        self._server: grpc.aio.Server | None = None

    def _sotw(self, type_url: str, version: str) -> bytes:
        ts = self.snapshot.types[type_url]
        self._nonce += 1
        body = ts.sotw_body(None)
        if version:
            body = wire.field_str(1, version) + body
        return body + wire.field_str(5, f"m{self._nonce}")

    def _delta(self, type_url: str, version: str, only_one: bool = False) -> bytes:
        """All resources (a first answer), or just one (a change, as the real server sends it)."""
        ts = self.snapshot.types[type_url]
        self._nonce += 1
        parts = [wire.field_str(1, version or ts.version)]
        resources = list(ts.resources.values())
        parts += [wire.field(2, r.delta_bytes) for r in (resources[:1] if only_one else resources)]
        parts += [wire.field_str(4, type_url), wire.field_str(5, f"m{self._nonce}")]
        return b"".join(parts)

    async def _serve(self, requests: Any, context: Any, delta: bool) -> Any:
        out: asyncio.Queue[bytes] = asyncio.Queue()
        entry = (out, delta)
        self._streams.append(entry)
        seen: set[str] = set()

        async def read() -> None:
            async for req in requests:
                if req.type_url not in seen and req.type_url in self.snapshot.types:
                    seen.add(req.type_url)
                    out.put_nowait(self._delta(req.type_url, "") if delta else self._sotw(req.type_url, ""))

        reader = asyncio.create_task(read())
        try:
            while True:
                yield await out.get()
        finally:
            reader.cancel()
            self._streams.remove(entry)

    async def _sotw_rpc(self, requests: Any, context: Any) -> Any:
        async for data in self._serve(requests, context, False):
            yield data

    async def _delta_rpc(self, requests: Any, context: Any) -> Any:
        async for data in self._serve(requests, context, True):
            yield data

    def push(self, version: str) -> None:
        """Send a prebuilt endpoints response (marked with ``version``) to every stream."""
        assert self.loop is not None

        def send() -> None:
            sotw = self._sotw(cache.ENDPOINT, version)
            delta = self._delta(cache.ENDPOINT, version, only_one=True)
            for q, is_delta in self._streams:
                q.put_nowait(delta if is_delta else sotw)

        self.loop.call_soon_threadsafe(send)

    def start(self) -> MinimalAds:
        started: Future[None] = Future()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self.loop = loop

            async def boot() -> None:
                server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
                handlers = {
                    "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                        self._sotw_rpc, request_deserializer=discovery_pb2.DiscoveryRequest.FromString),
                    "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                        self._delta_rpc, request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString),
                }
                server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
                self.port = server.add_insecure_port(f"{self.host}:{self.port}")
                await server.start()
                self._server = server

            loop.run_until_complete(boot())
            started.set_result(None)
            loop.run_forever()

        self._thread = threading.Thread(target=run, name="minimal-ads", daemon=True)
        self._thread.start()
        started.result(10)
        return self

    def stop(self) -> None:
        if self.loop is None or self._server is None:
            return
        asyncio.run_coroutine_threadsafe(self._server.stop(0), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
