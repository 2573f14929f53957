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

Limits (any pod can reach the xDS port; each refusal is counted in ``trafficmgr_xds_streams_refused_total``
under the reason named here):

- a request over ``max_request_bytes`` (default :data:`MAX_REQUEST_BYTES`) ends the stream
  (``too_large``, ``RESOURCE_EXHAUSTED``);
- at most ``max_streams_per_peer`` open streams per client IP, unknown nodes included (``too_many_streams``);
  Unix-socket peers are not capped (no IP to count by: they are local processes that the socket's file
  permissions let connect, and their claims are judged by their uid, see :mod:`trafficmgr.core.access`);
- a stream must name its node in its first request (``no_node``, ``bad_node``) within ``node_timeout``
  seconds (``no_node_timeout``);
- requests for a type this server does not serve are ignored, keep no state and are counted
  (``unknown_type``, per request); more than :data:`~trafficmgr.core.xds.streams.MAX_NAMES_PER_TYPE`
  names per type ends the stream (``too_many_names``);
- requests are read ahead at most :data:`~trafficmgr.core.xds.streams.MAX_PENDING_REQUESTS` per stream,
  and changes coalesce (:class:`~trafficmgr.core.xds.streams.Inbox`): a slow client holds at most the one
  response being written, never a queue of versions;
- NACK details are kept and logged truncated, the NACK history is bounded (:mod:`.responder`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
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
from trafficmgr.core.xds.responder import release_memory as release_memory
from trafficmgr.core.xds.sotw import SotwProtocol
from trafficmgr.core.xds.streams import CHANGED, CLOSED, MAX_NODE_FIELD, Refused, Stream, clip
from trafficmgr.core.xds.streams import parse_peer as parse_peer
from trafficmgr.core.xds.streams import peer_identities as peer_identities
from trafficmgr.core.xds.unixpeer import UnixPeerRelay

log = logging.getLogger("trafficmgr.xds")

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
SOTW = "sotw"
DELTA = "delta"

T = TypeVar("T")

#: The largest request accepted by default (``trafficmgr serve --xds-max-request-mib``). The biggest real
#: one: a sidecar's (or the gateway's) delta EDS request after a reconnect, every endpoint name both in
#: ``resource_names_subscribe`` and ``initial_resource_versions``; measured 2.56 MB at 10k Services with
#: two ports each (20k names like ``9080|production-apps|payments-backend-00000.outbound``, ~128 bytes a
#: name; SotW: 1.08 MB). 4 MiB covers ~30k such names; raise it for bigger meshes.
MAX_REQUEST_BYTES = 4 << 20
#: Types this server serves; requests for others are ignored (no state kept).
KNOWN_TYPES = frozenset(cache_mod.TYPE_ORDER)
#: Default of ``trafficmgr serve --xds-max-streams-per-peer``: a node runs at most 110 pods by default
#: (kubelet ``maxPods``); when a node's sidecars reach the control plane from one address (SNAT, or the
#: agent on the host network) they all still fit. Sidecars normally connect from their own pod IP (one
#: stream each, two during a reconnect).
DEFAULT_MAX_STREAMS_PER_PEER = 128
#: Default of ``--xds-node-timeout``: Envoy sends its node in the first request, right after connecting.
DEFAULT_NODE_TIMEOUT = 10.0


class _Rejected:
    """What the request deserializer hands the handler instead of a request it refuses."""

    __slots__ = ("reason", "code", "message")

    def __init__(self, reason: str, code: grpc.StatusCode, message: str) -> None:
        self.reason, self.code, self.message = reason, code, message


def _deserializer(cls: Any, limit: int) -> Callable[[bytes], Any]:
    """Parse requests of ``cls``; one over ``limit`` bytes (or not parseable) becomes a :class:`_Rejected`.

    gRPC's own receive limit is twice ``limit``: a bigger message is not even buffered, gRPC ends the
    stream with RESOURCE_EXHAUSTED itself (grpcio does not tell the handler why, so those are not
    counted); between the two the request is refused here and counted as ``too_large``. Per stream the
    server buffers at most one message of ``2 * limit`` bytes."""

    def parse(data: bytes) -> Any:
        if len(data) > limit:
            return _Rejected("too_large", grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"request of {len(data)} bytes; the limit is {limit}")
        try:
            return cls.FromString(data)
        except Exception:  # noqa: BLE001 - protobuf raises DecodeError and others on garbage
            return _Rejected("bad_request", grpc.StatusCode.INVALID_ARGUMENT, "the request is not a valid message")

    return parse


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
                 credentials: grpc.ServerCredentials | None = None, authorizer: Authorizer | None = None,
                 max_streams_per_peer: int = 0, node_timeout: float = DEFAULT_NODE_TIMEOUT,
                 max_request_bytes: int = MAX_REQUEST_BYTES) -> None:
        """``max_streams_per_peer``: open streams allowed per client IP (0: no cap; ``trafficmgr serve``
        defaults to :data:`DEFAULT_MAX_STREAMS_PER_PEER`); ``node_timeout``: seconds a stream may stay
        without naming its node; ``max_request_bytes``: the largest request accepted."""
        if max_streams_per_peer < 0 or node_timeout <= 0 or max_request_bytes < 1024:
            raise ValueError("max_streams_per_peer must be >= 0, node_timeout > 0, max_request_bytes >= 1024")
        self.cache = cache
        self.host = host
        self.port = port
        self.credentials = credentials
        self.authorizer = authorizer
        self.max_streams_per_peer = max_streams_per_peer
        self.node_timeout = node_timeout
        self.max_request_bytes = max_request_bytes
        self._server: grpc.aio.Server | None = None
        self._streams: set[Stream] = set()
        self._per_peer: dict[str, int] = {}  # client IP -> open streams (Unix-socket peers not counted)
        self._refusals_logged: dict[str, tuple[float, int]] = {}  # reason -> (last logged, suppressed since)
        self._relay: UnixPeerRelay | None = None  # listening on a Unix socket: who connected
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
                ("grpc.max_receive_message_length", 2 * self.max_request_bytes),
                ("grpc.max_send_message_length", -1),
                # Envoy sends HTTP/2 keepalive pings (bootstrap): never answer them with GOAWAY.
                ("grpc.http2.max_ping_strikes", 0),
                ("grpc.http2.min_ping_interval_without_data_ms", 1000),
                ("grpc.keepalive_permit_without_calls", 1),
            ]
        )
        handlers = {
            "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self._sotw_rpc, request_deserializer=_deserializer(discovery_pb2.DiscoveryRequest, self.max_request_bytes)
            ),
            "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self._delta_rpc, request_deserializer=_deserializer(discovery_pb2.DeltaDiscoveryRequest, self.max_request_bytes)
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
            stream.inbox.close()
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
        while True:
            generation = await self.cache.wait_change(generation)
            for stream in list(self._streams):
                stream.signal_change()
            # A push to many streams makes large transient buffers (a state-of-the-world response per
            # stream); give the memory back once the burst is over instead of keeping the high-water mark.
            self._out.trim_soon()

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
                "identities": list(s.identities),  # the mTLS client certificate's URI SANs
                "cert_expiry": s.cert_expiry,  # its notAfter (epoch seconds); None without mTLS
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
        # The per-peer cap counts IP peers only: a Unix-socket peer ("" or "unix:...") is a process on
        # this host allowed by the socket's file permissions (the demo, the test kit, a node agent).
        peer = stream.peer if stream.peer and not stream.peer.startswith("unix:") else ""
        cap = self.max_streams_per_peer
        if peer and cap and self._per_peer.get(peer, 0) >= cap:
            self._refused(Refused("too_many_streams", grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  f"{peer} has {cap} xDS streams open already (--xds-max-streams-per-peer)"))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"too many xDS streams from {peer} (limit {cap})")
        if peer:
            self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
        protocol: SotwProtocol | DeltaProtocol = self._sotw if mode == SOTW else self._delta
        reader = asyncio.create_task(self._read(requests, stream))
        self._streams.add(stream)
        try:
            try:
                await self._handle(stream, protocol)
            except Refused as exc:
                self._refused(exc, stream)
                await context.abort(exc.code, str(exc))
        finally:
            self._streams.discard(stream)
            reader.cancel()
            if peer:
                left = self._per_peer.pop(peer, 1) - 1
                if left > 0:
                    self._per_peer[peer] = left
            if stream.role is not None:
                metrics.CONNECTED_PROXIES.labels(stream.role, mode).dec()

    async def _handle(self, stream: Stream, protocol: SotwProtocol | DeltaProtocol) -> None:
        """Serve the stream until it closes; raises :class:`Refused` to end it with an error."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.node_timeout
        while True:
            if stream.identified:
                item = await stream.inbox.get()
            else:
                try:
                    item = await asyncio.wait_for(stream.inbox.get(), max(0.0, deadline - loop.time()))
                except TimeoutError:
                    raise Refused("no_node_timeout", grpc.StatusCode.UNAUTHENTICATED,
                                  f"no request naming the node within {self.node_timeout:g} s") from None
            if item is CLOSED:
                return
            if item is CHANGED:
                await self._on_change(stream)
                continue
            if isinstance(item, _Rejected):
                raise Refused(item.reason, item.code, item.message)
            if not stream.identified:
                await self._identify(stream, item)
            if item.type_url not in KNOWN_TYPES:
                # No state for it and no answer (as for a resource that does not exist), but counted:
                # Envoy asks only for the types its config names, and this server serves all of those.
                stream.unknown_types += 1
                metrics.STREAMS_REFUSED.labels("unknown_type").inc()
                if stream.unknown_types == 1:
                    log.info("xDS node %r asked for type %r, which this server does not serve: ignored",
                             clip(stream.node_id), clip(item.type_url))
                continue
            await protocol.on_request(stream, item)

    def _refused(self, exc: Refused, stream: Stream | None = None) -> None:
        """Count a refusal; log it, at most once per reason every 10 s (refusals can come in floods)."""
        metrics.STREAMS_REFUSED.labels(exc.reason).inc()
        now = time.monotonic()
        last, suppressed = self._refusals_logged.get(exc.reason, (-1e9, 0))
        if now - last < 10.0:
            self._refusals_logged[exc.reason] = (last, suppressed + 1)
            return
        self._refusals_logged[exc.reason] = (now, 0)
        who = f"node {clip(stream.node_id)!r} " if stream is not None and stream.node_id else ""
        peer = (stream.peer or "a Unix socket") if stream is not None else "?"
        more = f" ({suppressed} more for this reason since the last such line)" if suppressed else ""
        log.warning("xDS stream %sfrom %s refused (%s): %s%s", who, peer, exc.reason, exc, more)

    @staticmethod
    async def _read(requests: AsyncIterator[Any], stream: Stream) -> None:
        try:
            async for request in requests:
                await stream.inbox.put(request)  # waits while the handler is behind (back-pressure)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the RPC broke; the handler ends the stream
            log.debug("xDS stream read ended: %r", exc)
        stream.inbox.close(drain=True)

    async def _identify(self, stream: Stream, request: Any) -> None:
        node = request.node
        if not node.id:
            raise Refused("no_node", grpc.StatusCode.INVALID_ARGUMENT,
                          "the first request of a stream must name the node (node.id)")
        if len(node.id) > MAX_NODE_FIELD or len(node.cluster) > MAX_NODE_FIELD:
            raise Refused("bad_node", grpc.StatusCode.INVALID_ARGUMENT,
                          f"node id or cluster longer than {MAX_NODE_FIELD} characters")
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
                clip(stream.node_id), clip(stream.node_cluster), stream.peer, clip(str(exc)),
            )
            await stream.context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc) or "node not authorized")
            raise AssertionError("unreachable") from exc  # abort() raises
        except Exception:
            log.exception("resolver failed for node %r; treating it as unknown", clip(stream.node_id))
            view = None
        if view is None and not stream.unknown_logged:
            stream.unknown_logged = True
            metrics.STREAMS_REFUSED.labels("unknown").inc()
            log.info(
                "xDS stream from unknown node %r cluster %r peer %s: waiting for it to appear",
                clip(stream.node_id), clip(stream.node_cluster), stream.peer,
            )
        if view is not None and stream.view is None and stream.unknown_logged:
            log.info("xDS node %r is now known as view %r", clip(stream.node_id), view)
        stream.view = view
        role = metrics.proxy_role(view)  # a bounded label value: never the view name (one per traffic.scope)
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


class XdsServerThread:
    """An :class:`XdsServer` on its own asyncio loop in a daemon thread (for sync code and tests)."""

    def __init__(self, cache: SnapshotCache, host: str = "127.0.0.1", port: int = 18000,
                 credentials: grpc.ServerCredentials | None = None, authorizer: Authorizer | None = None,
                 max_streams_per_peer: int = 0, node_timeout: float = DEFAULT_NODE_TIMEOUT,
                 max_request_bytes: int = MAX_REQUEST_BYTES) -> None:
        self.cache = cache
        self.host = host
        self.server = XdsServer(cache, host, port, credentials, authorizer, max_streams_per_peer, node_timeout,
                                max_request_bytes)
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
