"""The ADS server: state-of-the-world and delta xDS over ``grpc.aio``, one asyncio loop, no thread per stream.

Responses are assembled from bytes cached in :mod:`trafficmgr.core.cache` (each resource is serialized
once, each SotW body once per name set); a push to a stream is a concatenation plus a nonce.

This module holds the gRPC side: binding and stopping the server, one task per stream that reads its
requests and the cache's change signals, identifying and authorizing the node, and
:class:`XdsServerThread` (the server on a loop of its own). The protocols are elsewhere:

- :mod:`~trafficmgr.core.xds.sotw` and :mod:`~trafficmgr.core.xds.delta`: the two ADS variants;
- :mod:`~trafficmgr.core.xds.responder`: snapshots, push order, counted writes, ACK/NACK bookkeeping;
- :mod:`~trafficmgr.core.xds.responses`: nonces and the response caches shared between streams;
- :mod:`~trafficmgr.core.xds.streams`: the per-stream state.

Unknown node (resolver returns None): nothing is sent, the stream stays open and is re-resolved on
every cache change. Resolver raising ``PermissionError``: the stream is aborted with ``PERMISSION_DENIED``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from trafficmgr.core import cache as cache_mod
from trafficmgr.core import metrics
from trafficmgr.core.cache import SnapshotCache
from trafficmgr.core.xds.delta import DeltaProtocol
from trafficmgr.core.xds.responder import NACK_HISTORY as NACK_HISTORY
from trafficmgr.core.xds.responder import Responder
from trafficmgr.core.xds.sotw import SotwProtocol
from trafficmgr.core.xds.streams import CHANGED, CLOSED, Stream
from trafficmgr.core.xds.streams import parse_peer as parse_peer
from trafficmgr.core.xds.streams import peer_identities as peer_identities
from trafficmgr.core.xds.unixpeer import UnixPeerRelay

log = logging.getLogger("trafficmgr.xds")

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
SOTW = "sotw"
DELTA = "delta"

T = TypeVar("T")


class PortInUse(OSError):
    """The xDS server could not bind its address (usually: the port is already in use)."""


#: ``authorizer(node_id, node_cluster, peer, identities)``: raise PermissionError to refuse a stream.
#: ``peer``: the client's IP over TCP; over a Unix socket ``unix:uid=<uid>,gid=<gid>,pid=<pid>`` (the
#: kernel's credentials of the connecting process, :mod:`~trafficmgr.core.xds.unixpeer`), ``""`` when
#: unknown. ``identities``: the verified client certificate's URI SANs (mutual TLS only).
Authorizer = Callable[[str, str, str, tuple[str, ...]], None]


class XdsServer:
    """ADS server for ``cache`` on ``host:port`` (port 0: any free port, see :attr:`port`).

    Run it on an asyncio loop: ``await start()`` ... ``await stop(grace)``.
    """

    def __init__(self, cache: SnapshotCache, host: str = "127.0.0.1", port: int = 18000,
                 credentials: grpc.ServerCredentials | None = None, authorizer: Authorizer | None = None) -> None:
        self.cache = cache
        self.host = host
        self.port = port
        self.credentials = credentials
        self.authorizer = authorizer
        self._server: grpc.aio.Server | None = None
        self._relay: UnixPeerRelay | None = None  # listening on a Unix socket: who connected
        self._streams: set[Stream] = set()
        self._watcher: asyncio.Task[None] | None = None
        self._out = Responder(cache)
        self._sotw = SotwProtocol(self._out)
        self._delta = DeltaProtocol(self._out)
        self.stopping = False

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind and start serving; raises :class:`PortInUse` when the address cannot be bound."""
        self.cache.attach_loop(asyncio.get_running_loop())
        server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 0),  # else a second server silently shares a busy port
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ("grpc.max_send_message_length", -1),
                # Envoy sends HTTP/2 keepalive pings (bootstrap): never answer them with GOAWAY.
                ("grpc.http2.max_ping_strikes", 0),
                ("grpc.http2.min_ping_interval_without_data_ms", 1000),
                ("grpc.keepalive_permit_without_calls", 1),
            ]
        )
        handlers = {
            "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self._sotw_rpc, request_deserializer=discovery_pb2.DiscoveryRequest.FromString
            ),
            "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self._delta_rpc, request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString
            ),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(ADS_SERVICE, handlers),))
        relay: UnixPeerRelay | None = None
        if self.host.startswith("unix:"):  # a Unix socket: reachable from other network namespaces
            # gRPC listens on a private socket; the relay owns the public path and tells the streams
            # who connected (SO_PEERCRED), see trafficmgr.core.xds.unixpeer.
            relay = UnixPeerRelay(self.host[len("unix:"):])
            host, address = self.host, "unix:" + relay.inner
        else:
            host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
            address = f"{host}:{self.port}"
        try:
            if self.credentials is not None:
                bound = server.add_secure_port(address, self.credentials)
            else:
                bound = server.add_insecure_port(address)
        except RuntimeError as exc:
            if relay is not None:
                await relay.stop()
            raise PortInUse(f"xDS server cannot bind {host}:{self.port} (port in use?): {exc}") from exc
        if not bound:
            if relay is not None:
                await relay.stop()
            raise PortInUse(f"xDS server cannot bind {host}:{self.port} (port in use?)")
        self.port = bound
        await server.start()
        if relay is not None:
            try:
                await relay.start()
            except OSError as exc:
                await server.stop(None)
                await relay.stop()
                raise PortInUse(f"xDS server cannot listen on {host}: {exc}") from exc
            self._relay = relay
        self._server = server
        self.stopping = False
        self._watcher = asyncio.create_task(self._watch_cache())
        log.info("xDS server listening on %s:%d", host, bound)

    async def stop(self, grace: float = 1.0) -> None:
        """Stop accepting streams, close the open ones (clients reconnect elsewhere/later), then stop."""
        self.stopping = True
        if self._server is None:
            return
        stopping = asyncio.ensure_future(self._server.stop(grace))
        for stream in list(self._streams):
            stream.queue.put_nowait(CLOSED)
        await stopping
        if self._watcher is not None:
            self._watcher.cancel()
            try:
                await self._watcher
            except asyncio.CancelledError:
                pass
        self._server = None
        if self._relay is not None:
            await self._relay.stop()
            self._relay = None

    async def _watch_cache(self) -> None:
        generation = self.cache.generation
        trim: asyncio.TimerHandle | None = None
        while True:
            generation = await self.cache.wait_change(generation)
            for stream in list(self._streams):
                stream.signal_change()
            # A push to many streams makes large transient buffers (a state-of-the-world response per
            # stream); give the memory back once the burst is over instead of keeping the high-water mark.
            if trim is not None:
                trim.cancel()
            trim = asyncio.get_running_loop().call_later(2.0, _release_memory)

    # -- introspection ---------------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        """One dict per open stream (call on the server loop, or via :meth:`XdsServerThread.status`)."""
        out = []
        for s in sorted(self._streams, key=lambda s: (s.node_id, s.connected_at)):
            item: dict[str, Any] = {
                "node_id": s.node_id,
                "node_cluster": s.node_cluster,
                "view": s.view,
                "peer": s.peer,
                "mode": s.mode,
                "connected_at": s.connected_at,
            }
            for short, type_url in cache_mod.SHORT_NAMES.items():
                st = s.types.get(type_url)
                item[short] = st.status() if st else {"sent": None, "acked": None, "last_nack": None}
            out.append(item)
        return out

    def nacks(self) -> list[dict[str, Any]]:
        """Recent NACKs, oldest first (bounded history)."""
        return list(self._out.nacks)

    # -- streams ---------------------------------------------------------------------------------

    async def _sotw_rpc(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await self._serve(SOTW, requests, context)

    async def _delta_rpc(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await self._serve(DELTA, requests, context)

    async def _serve(self, mode: str, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if self.stopping:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "xDS server is stopping")
        stream = Stream(mode, context)
        if self._relay is not None:  # a Unix socket: the peer is the connecting process's credentials
            stream.peer = self._relay.peer_of(context.peer())
        protocol: SotwProtocol | DeltaProtocol = self._sotw if mode == SOTW else self._delta
        reader = asyncio.create_task(self._read(requests, stream.queue))
        self._streams.add(stream)
        try:
            while True:
                item = await stream.queue.get()
                if item is CLOSED:
                    return
                if item is CHANGED:
                    stream.change_pending = False
                    await self._on_change(stream)
                else:
                    if not stream.identified:
                        await self._identify(stream, item.node)
                    await protocol.on_request(stream, item)
        finally:
            self._streams.discard(stream)
            reader.cancel()
            if stream.role is not None:
                metrics.CONNECTED_PROXIES.labels(stream.role, mode).dec()

    @staticmethod
    async def _read(requests: AsyncIterator[Any], queue: asyncio.Queue[Any]) -> None:
        try:
            async for request in requests:
                queue.put_nowait(request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the RPC broke; the handler ends the stream
            log.debug("xDS stream read ended: %r", exc)
        queue.put_nowait(CLOSED)

    async def _identify(self, stream: Stream, node: Any) -> None:
        stream.identified = True
        stream.node_id = node.id
        stream.node_cluster = node.cluster
        await self._resolve(stream)

    async def _resolve(self, stream: Stream) -> None:
        """(Re-)resolve the stream's view; aborts the RPC on ``PermissionError``."""
        try:
            if self.authorizer is not None:
                self.authorizer(stream.node_id, stream.node_cluster, stream.peer, stream.identities)
            view = self.cache.resolve(stream.node_id, stream.node_cluster, stream.peer)
        except PermissionError as exc:
            metrics.STREAMS_REFUSED.labels("permission").inc()
            log.warning(
                "xDS stream refused: node %r cluster %r peer %s: %s",
                stream.node_id, stream.node_cluster, stream.peer, exc,
            )
            await stream.context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc) or "node not authorized")
            raise AssertionError("unreachable") from exc  # abort() raises
        except Exception:
            log.exception("resolver failed for node %r; treating it as unknown", stream.node_id)
            view = None
        if view is None and not stream.unknown_logged:
            stream.unknown_logged = True
            metrics.STREAMS_REFUSED.labels("unknown").inc()
            log.info(
                "xDS stream from unknown node %r cluster %r peer %s: waiting for it to appear",
                stream.node_id, stream.node_cluster, stream.peer,
            )
        if view is not None and stream.view is None and stream.unknown_logged:
            log.info("xDS node %r is now known as view %r", stream.node_id, view)
        stream.view = view
        role = view if view is not None else "unknown"
        if role != stream.role:
            if stream.role is not None:
                metrics.CONNECTED_PROXIES.labels(stream.role, stream.mode).dec()
            metrics.CONNECTED_PROXIES.labels(role, stream.mode).inc()
            stream.role = role

    async def _on_change(self, stream: Stream) -> None:
        if not stream.identified:
            return
        await self._resolve(stream)
        await (self._sotw if stream.mode == SOTW else self._delta).on_change(stream)


def _release_memory() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class XdsServerThread:
    """An :class:`XdsServer` on its own asyncio loop in a daemon thread (for sync code and tests)."""

    def __init__(self, cache: SnapshotCache, host: str = "127.0.0.1", port: int = 18000,
                 credentials: grpc.ServerCredentials | None = None, authorizer: Authorizer | None = None) -> None:
        self.cache = cache
        self.host = host
        self.server = XdsServer(cache, host, port, credentials, authorizer)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.server.port

    def start(self, timeout: float = 10.0) -> XdsServerThread:
        """Start and return once listening; raises :class:`PortInUse` if the address cannot be bound."""
        started: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, args=(started,), name="xds-server", daemon=True)
        self._thread.start()
        try:
            started.result(timeout)
        except BaseException:
            self._thread.join(timeout)
            raise
        return self

    def _run(self, started: Future[None]) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self.loop = loop
        try:
            loop.run_until_complete(self.server.start())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller waiting on `started`
            started.set_exception(exc)
            loop.close()
            return
        started.set_result(None)
        try:
            loop.run_forever()
        finally:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def call(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Run ``fn()`` on the server loop (server state is only touched there) and return its result."""
        assert self.loop is not None, "start() first"

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def status(self) -> list[dict[str, Any]]:
        return self.call(self.server.status)

    def nacks(self) -> list[dict[str, Any]]:
        return self.call(self.server.nacks)

    def stop(self, grace: float = 1.0) -> None:
        """Close all streams, stop the server and its loop; idempotent."""
        loop, thread = self.loop, self._thread
        if loop is None or thread is None or loop.is_closed():
            return
        try:
            asyncio.run_coroutine_threadsafe(self.server.stop(grace), loop).result(grace + 10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            self._thread = None
