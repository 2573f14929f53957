"""The ADS server: state-of-the-world and delta xDS over ``grpc.aio``, one asyncio loop, no thread per stream.

Responses are assembled from bytes cached in :mod:`trafficmgr.core.cache` (each resource is serialized
once, each SotW body once per name set); a push to a stream is a concatenation plus a nonce.

Protocol rules (the behaviour Envoy 1.40 was observed to expect of a management server):
- SotW: answer a request only if it is the first of its type on the stream, its names changed, or a
  newer version exists; a plain ACK gets no answer; a request with a stale nonce is ignored.
- A NACK (``error_detail`` set) is recorded and the rejected version is not resent; a newer version is.
- Pushes follow ``cache.TYPE_ORDER`` (CDS, EDS, LDS, RDS, SDS); in delta, all additions/updates of a
  push go out before any ``removed_resources``.
- Unknown node (resolver returns None): nothing is sent, the stream stays open and is re-resolved on
  every cache change. Resolver raising ``PermissionError``: the stream is aborted with
  ``PERMISSION_DENIED``.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from typing import Any, TypeVar

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from trafficmgr.core import cache as cache_mod
from trafficmgr.core import metrics, wire
from trafficmgr.core.cache import NAMED_TYPES, TYPE_ORDER, Bounded, Resource, Snapshot, SnapshotCache, TypeSet

log = logging.getLogger("trafficmgr.xds")

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
SOTW = "sotw"
DELTA = "delta"
NACK_HISTORY = 500
_MAX_INFLIGHT = 64

_CHANGED = object()
_CLOSED = object()

T = TypeVar("T")


class PortInUse(OSError):
    """The xDS server could not bind its address (usually: the port is already in use)."""


def parse_peer(peer: str) -> str:
    """The IP address in a gRPC peer string (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``, URL-encoded forms);
    ``""`` for other transports."""
    peer = urllib.parse.unquote(peer or "")
    scheme, _, rest = peer.partition(":")
    if scheme == "ipv4":
        return rest.rsplit(":", 1)[0]
    if scheme == "ipv6":
        if rest.startswith("["):
            return rest[1:].split("]", 1)[0]
        return rest.rsplit(":", 1)[0]
    return ""


def peer_identities(context: Any) -> tuple[str, ...]:
    """The verified client certificate's URI/DNS SANs and CN (empty without mutual TLS)."""
    try:
        auth = context.auth_context() or {}
    except Exception:  # noqa: BLE001 - no auth context on insecure transports in some versions
        return ()
    out: list[str] = []
    for key in ("x509_subject_alternative_name", "x509_common_name"):
        out.extend(v.decode() if isinstance(v, bytes) else str(v) for v in auth.get(key, ()))
    return tuple(out)


#: ``authorizer(node_id, node_cluster, peer_ip, identities)``: raise PermissionError to refuse a stream.
Authorizer = Callable[[str, str, str, tuple[str, ...]], None]


class _TypeState:
    """What one stream knows about one resource type."""

    __slots__ = (
        "type_url", "short", "names", "wildcard", "sent_version", "sent_nonce", "sent_at", "sent_typeset",
        "acked_version", "last_nack", "nacked_version", "known", "inflight", "rejected", "synced_version",
        "synced_ts", "force", "force_tag", "recent_nonces", "sent_names", "nacked_names",
    )

    def __init__(self, type_url: str) -> None:
        self.type_url = type_url
        self.short = cache_mod.short_name(type_url)
        self.names: frozenset[str] | None = None  # SotW: None = wildcard
        self.wildcard = False  # delta
        self.sent_version: str | None = None
        self.sent_nonce = ""
        # SotW: the last nonces sent; a shared nonce that comes back (a change undone) is not reused, so
        # a late request carrying the earlier one cannot pass for an answer to the new response.
        self.recent_nonces: collections.deque[str] = collections.deque(maxlen=8)
        self.sent_at = 0.0
        self.sent_typeset: TypeSet | None = None
        self.acked_version: str | None = None
        self.last_nack: dict[str, Any] | None = None
        self.nacked_version: str | None = None
        # SotW: the subscription the last response answered, and the one of the NACKed response: a
        # rejected version is not sent again for the same names, but another subscription may work.
        self.sent_names: frozenset[str] | None = None
        self.nacked_names: frozenset[str] | None = None
        # delta only
        self.known = _Known()  # name -> version the client has (optimistic after a send)
        self.inflight: collections.OrderedDict[str, _DeltaSent] = collections.OrderedDict()
        self.rejected: dict[str, str] = {}  # name -> NACKed version, never resent
        self.synced_version: str | None = None  # TypeSet version ``known`` was last diffed against
        self.synced_ts: TypeSet | None = None  # that TypeSet itself (for the shared fast diff)
        self.force: set[str] = set()  # names to resend even if the client has them (a replaced cluster's)
        self.force_tag = ""  # the version of the type set whose update forced them

    def status(self) -> dict[str, Any]:
        return {"sent": self.sent_version, "acked": self.acked_version, "last_nack": self.last_nack}


class _Known:
    """What a delta client has: name -> version. Copy on write over a shared TypeSet.

    After a complete push the client has exactly the current TypeSet (within its subscription), so
    :meth:`rebase` points at that TypeSet, which every stream in sync shares, instead of keeping a
    thousand-entry dict per stream; later differences (a send in flight, a NACK, an unsubscribe) are
    kept in a small override dict (``None``: the client does not have it)."""

    __slots__ = ("base", "scope", "over")

    def __init__(self, initial: Mapping[str, str] | None = None) -> None:
        self.base: TypeSet | None = None
        self.scope: frozenset[str] | None = None  # None: every name of ``base``
        self.over: dict[str, str | None] = dict(initial or {})

    def rebase(self, ts: TypeSet, scope: frozenset[str] | None) -> None:
        """The client has exactly ``ts``'s resources within ``scope`` (None: all of them)."""
        self.base, self.scope, self.over = ts, scope, {}

    def _base_version(self, name: str) -> str | None:
        if self.base is None or (self.scope is not None and name not in self.scope):
            return None
        r = self.base.resources.get(name)
        return r.version if r is not None else None

    def get(self, name: str, default: str | None = None) -> str | None:
        over = self.over
        if name in over:
            v = over[name]
        else:
            v = self._base_version(name)
        return default if v is None else v

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __setitem__(self, name: str, version: str) -> None:
        self.over[name] = version

    def pop(self, name: str, default: str | None = None) -> str | None:
        v = self.get(name)
        if self._base_version(name) is not None:
            self.over[name] = None
        else:
            self.over.pop(name, None)
        return default if v is None else v

    def empty(self) -> bool:
        return self.base is None and not any(v is not None for v in self.over.values())

    def __iter__(self) -> Iterator[str]:
        over = self.over
        if self.base is not None:
            scope = self.scope
            for name in self.base.resources:
                if name not in over and (scope is None or name in scope):
                    yield name
        for name, v in over.items():
            if v is not None:
                yield name


class _DeltaSent:
    __slots__ = ("version", "previous", "sent", "at")

    def __init__(self, version: str, previous: dict[str, str | None], sent: dict[str, str | None]) -> None:
        self.version = version
        self.previous = previous  # name -> version known before this response (None: unknown)
        self.sent = sent  # name -> version sent (None: removed)
        self.at = time.monotonic()


class _Stream:
    __slots__ = (
        "mode", "context", "peer", "node_id", "node_cluster", "identified", "view", "role", "connected_at",
        "types", "queue", "change_pending", "unknown_logged", "identities",
    )

    def __init__(self, mode: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.mode = mode
        self.context = context
        self.peer = parse_peer(context.peer())
        self.identities = peer_identities(context)
        self.node_id = ""
        self.node_cluster = ""
        self.identified = False
        self.view: str | None = None
        self.role: str | None = None  # label of CONNECTED_PROXIES currently counted
        self.connected_at = time.time()
        self.types: dict[str, _TypeState] = {}
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.change_pending = False
        self.unknown_logged = False

    def signal_change(self) -> None:
        if not self.change_pending:
            self.change_pending = True
            self.queue.put_nowait(_CHANGED)


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
        self._streams: set[_Stream] = set()
        self._watcher: asyncio.Task[None] | None = None
        self._nacks: collections.deque[dict[str, Any]] = collections.deque(maxlen=NACK_HISTORY)
        self._nonces = itertools.count(1)
        self._nonce_prefix = os.urandom(3).hex()
        self._sent_metric: dict[tuple[str, str], Any] = {}
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
        if self.host.startswith("unix:"):  # a Unix socket: reachable from other network namespaces
            host, address = self.host, self.host
        else:
            host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
            address = f"{host}:{self.port}"
        try:
            if self.credentials is not None:
                bound = server.add_secure_port(address, self.credentials)
            else:
                bound = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise PortInUse(f"xDS server cannot bind {host}:{self.port} (port in use?): {exc}") from exc
        if not bound:
            raise PortInUse(f"xDS server cannot bind {host}:{self.port} (port in use?)")
        self.port = bound
        await server.start()
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
            stream.queue.put_nowait(_CLOSED)
        await stopping
        if self._watcher is not None:
            self._watcher.cancel()
            try:
                await self._watcher
            except asyncio.CancelledError:
                pass
        self._server = None

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
        return list(self._nacks)

    # -- streams ---------------------------------------------------------------------------------

    async def _sotw_rpc(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await self._serve(SOTW, requests, context)

    async def _delta_rpc(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await self._serve(DELTA, requests, context)

    async def _serve(self, mode: str, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if self.stopping:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "xDS server is stopping")
        stream = _Stream(mode, context)
        reader = asyncio.create_task(self._read(requests, stream.queue))
        self._streams.add(stream)
        try:
            while True:
                item = await stream.queue.get()
                if item is _CLOSED:
                    return
                if item is _CHANGED:
                    stream.change_pending = False
                    await self._on_change(stream)
                elif mode == SOTW:
                    await self._on_sotw_request(stream, item)
                else:
                    await self._on_delta_request(stream, item)
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
        queue.put_nowait(_CLOSED)

    async def _identify(self, stream: _Stream, node: Any) -> None:
        stream.identified = True
        stream.node_id = node.id
        stream.node_cluster = node.cluster
        await self._resolve(stream)

    async def _resolve(self, stream: _Stream) -> None:
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

    def _snapshot(self, stream: _Stream) -> Snapshot | None:
        return self.cache.get(stream.view) if stream.view is not None else None

    async def _on_change(self, stream: _Stream) -> None:
        if not stream.identified:
            return
        await self._resolve(stream)
        if stream.mode == SOTW:
            forced: dict[str, str] = {}  # dependent type -> version of the type set that forces it
            for type_url in _ordered(stream.types):
                st = stream.types[type_url]
                tag = forced.get(type_url)
                sent = await self._sotw_send(stream, st, force=tag is not None, tag=tag or "")
                if sent and type_url in _DEPENDENT:
                    # A replaced cluster (listener) warms until it gets its endpoints (routes) again,
                    # and Envoy does not always ask: resend them right after, even if unchanged.
                    forced[_DEPENDENT[type_url]] = st.sent_version or ""
        else:
            await self._delta_push(stream, [stream.types[t] for t in _ordered(stream.types)])

    def _nonce(self) -> str:
        return f"{self._nonce_prefix}-{next(self._nonces):x}"

    async def _write(self, stream: _Stream, st: _TypeState, data: bytes) -> None:
        key = (st.short, stream.mode)
        counter = self._sent_metric.get(key)
        if counter is None:
            counter = self._sent_metric[key] = metrics.RESPONSES_SENT.labels(*key)
        await stream.context.write(data)
        counter.inc()

    def _record_nack(
        self, stream: _Stream, st: _TypeState, nonce: str, version: str | None, error: str, resources: list[str]
    ) -> None:
        nack = {"nonce": nonce, "version": version, "error": error, "resources": resources, "at": time.time()}
        st.last_nack = nack
        st.nacked_version = version
        st.nacked_names = st.sent_names
        self._nacks.append(
            {"node_id": stream.node_id, "node_cluster": stream.node_cluster, "view": stream.view,
             "type": st.short, "mode": stream.mode, **nack}
        )
        metrics.NACKS.labels(st.short).inc()
        log.warning(
            "NACK from %r for %s version %s (%d resources): %s",
            stream.node_id, st.short, version, len(resources), error,
        )

    def _acked(self, st: _TypeState, sent_at: float, clear_nack: bool = True) -> None:
        metrics.PUSH_TO_ACK.labels(st.short).observe(time.monotonic() - sent_at)
        if clear_nack:
            st.last_nack = None
            st.nacked_version = None

    # -- state of the world ----------------------------------------------------------------------

    async def _on_sotw_request(self, stream: _Stream, req: discovery_pb2.DiscoveryRequest) -> None:
        if not stream.identified:
            await self._identify(stream, req.node)
        type_url = req.type_url
        names = _sotw_names(type_url, req.resource_names)
        st = stream.types.get(type_url)
        if st is None:
            st = stream.types[type_url] = _TypeState(type_url)
            st.names = names
            # After a reconnect Envoy sends its last accepted version with an empty nonce: answer it.
            st.acked_version = req.version_info or None
            await self._sotw_send(stream, st, force=True)
            return
        if st.sent_nonce and req.response_nonce != st.sent_nonce:
            return  # stale: a newer response is on its way to the client
        names_changed = names != st.names
        st.names = names
        if req.HasField("error_detail"):
            if st.sent_nonce:
                ts = st.sent_typeset
                rejected = [r.name for r in ts.select(st.names)] if ts is not None else []
                self._record_nack(stream, st, req.response_nonce, st.sent_version, req.error_detail.message, rejected)
        elif st.sent_nonce:
            st.acked_version = req.version_info
            if req.version_info == st.sent_version:
                self._acked(st, st.sent_at)
        await self._sotw_send(stream, st, force=names_changed, tag=_names_tag(names) if names_changed else "")

    async def _sotw_send(self, stream: _Stream, st: _TypeState, force: bool, tag: str = "") -> bool:
        """Send the current version of ``st``'s type if it is new (or ``force``); True if sent.

        ``tag`` names why a forced resend happens (the forcing version, the new subscription), so that
        every stream forced for the same reason shares one nonce and one response too."""
        snap = self._snapshot(stream)
        if snap is None:
            return False
        ts = snap.types.get(st.type_url)
        if ts is None:
            return False  # a type this control plane does not serve
        if ts.version == st.nacked_version and st.names == st.nacked_names:
            return False  # a rejected response is never sent again, forced or not
        if not force and ts.version == st.sent_version:
            return False
        # A nonce only has to be unique within a stream: every stream that gets this version for the
        # first time shares one nonce, so the whole response (often hundreds of KB) is one cached bytes
        # object for all of them instead of a copy per stream. A nonce this stream had lately (the same
        # version resent, a change undone) gets the publication generation added, which streams handling
        # the same push still share; only a repeat within one generation gets a per-stream nonce and copy.
        nonce = f"{self._nonce_prefix}.{ts.version}" + (f".{tag[:12]}" if tag else "")
        if nonce in st.recent_nonces:
            nonce = f"{nonce}.g{self.cache.generation}"
        if nonce in st.recent_nonces:
            nonce = self._nonce()
            data = ts.sotw_response(st.names, nonce, share=False)
        else:
            data = ts.sotw_response(st.names, nonce)
        st.sent_version = ts.version
        st.sent_nonce = nonce
        st.sent_names = st.names
        st.recent_nonces.append(nonce)
        st.sent_at = time.monotonic()
        st.sent_typeset = ts
        await self._write(stream, st, data)
        return True

    # -- delta -----------------------------------------------------------------------------------

    async def _on_delta_request(self, stream: _Stream, req: discovery_pb2.DeltaDiscoveryRequest) -> None:
        if not stream.identified:
            await self._identify(stream, req.node)
        type_url = req.type_url
        st = stream.types.get(type_url)
        subscribe = list(req.resource_names_subscribe)
        unsubscribe = list(req.resource_names_unsubscribe)
        if st is None:
            st = stream.types[type_url] = _TypeState(type_url)
            st.wildcard = type_url not in NAMED_TYPES and (not subscribe or "*" in subscribe)
            st.names = _intern_names(frozenset(n for n in subscribe if n != "*"))
            st.known = _Known(req.initial_resource_versions)
            await self._delta_push(stream, [st])
            return
        if req.response_nonce:
            sent = st.inflight.pop(req.response_nonce, None)
            if sent is not None:
                if req.HasField("error_detail"):
                    self._delta_nack(stream, st, req.response_nonce, sent, req.error_detail.message)
                else:
                    st.acked_version = sent.version
                    if req.response_nonce == st.sent_nonce:
                        # Delta NACKs are per resource: the NACK stands while a rejected one is served.
                        self._acked(st, sent.at, clear_nack=not st.rejected)
        if subscribe or unsubscribe:
            names = set(st.names or ())
            for name in subscribe:
                if name == "*":
                    st.wildcard = True
                else:
                    names.add(name)
            for name in unsubscribe:
                if name == "*":
                    st.wildcard = False
                else:
                    names.discard(name)
                    if not st.wildcard:
                        st.known.pop(name, None)
            st.names = _intern_names(frozenset(names))
            st.synced_version = None
        await self._delta_push(stream, [st])

    def _delta_nack(self, stream: _Stream, st: _TypeState, nonce: str, sent: _DeltaSent, error: str) -> None:
        # The client keeps what it had: restore our view of it, and never resend the rejected versions.
        for name, previous in sent.previous.items():
            if st.known.get(name) == sent.sent[name]:
                if previous is None:
                    st.known.pop(name, None)
                else:
                    st.known[name] = previous
            version = sent.sent[name]
            if version is not None:
                st.rejected[name] = version
        st.synced_version = None
        self._record_nack(stream, st, nonce, sent.version, error, sorted(sent.sent))

    async def _delta_push(self, stream: _Stream, states: Iterable[_TypeState]) -> None:
        """Send what differs for ``states``: every update first (in type order), then every removal."""
        snap = self._snapshot(stream)
        if snap is None:
            return
        plans: list[tuple[_TypeState, TypeSet, list[Resource], list[str], Any]] = []
        pending = list(states)
        for st in pending:
            ts = snap.types.get(st.type_url)
            if ts is None:
                continue
            force, st.force = st.force, set()
            tag = st.force_tag if force else ""
            if ts.version == st.synced_version and not force:
                continue  # nothing changed since the last diff (subscription changes reset it)
            prev = st.synced_ts
            shared: Any = None
            scope = "*" if st.wildcard else st.names
            if prev is not None and st.synced_version == prev.version and not st.rejected:
                updates, removed = _delta_diff_from(st, _transition(prev, ts)) if prev is not ts else ([], [])
                if force:
                    updates = _with_forced(st, ts, updates, force)
                # Every stream in sync with ``prev`` and with the same subscription (and the same forced
                # names, which follow from the same cluster transition) gets the same message.
                shared = (st.type_url, prev.version, ts.version, scope, frozenset(force), tag)
            else:
                if not st.rejected and st.known.empty():
                    # A first answer: the same for every new stream with this subscription.
                    shared = (st.type_url, "", ts.version, scope)
                updates, removed = _delta_diff(st, ts)
                if force:
                    updates = _with_forced(st, ts, updates, force)
                    shared = None
            st.synced_version = ts.version
            st.synced_ts = ts
            plans.append((st, ts, updates, removed, shared))
            dependent = stream.types.get(_DEPENDENT.get(st.type_url, ""))
            if updates and dependent is not None:
                # A replaced cluster (listener) warms until it gets its endpoints (routes) again: resend
                # the ones it references even if the client has them. Only those names: the dependent's
                # diff stays O(changes) and shared between streams.
                for r in updates:
                    for ref_type, ref_name in r.refs:
                        if ref_type == dependent.type_url and ref_name in dependent.known:
                            dependent.force.add(ref_name)
                            dependent.force_tag = ts.version
                if dependent.force and dependent not in pending:
                    pending.append(dependent)
            if (
                st.last_nack is not None
                and not st.rejected
                and not updates
                and not removed
                and st.sent_nonce not in st.inflight
            ):
                st.last_nack = None  # the rejected resources are no longer served; nothing to wait for
        for st, ts, updates, removed, shared in plans:
            # A wildcard type's first answer is always sent, even an empty one.
            if updates or (st.wildcard and not st.sent_nonce and not removed):
                await self._delta_send(stream, st, ts, updates, [], shared and (*shared, "u"))
        for st, ts, _, removed, shared in plans:
            if removed:
                await self._delta_send(stream, st, ts, [], removed, shared and (*shared, "r"))
        for st, ts, _, _, _ in plans:
            if not st.rejected:
                # The client now has exactly ``ts`` (optimistically): share it instead of a per-stream map.
                st.known.rebase(ts, None if st.wildcard else st.names)

    async def _delta_send(
        self, stream: _Stream, st: _TypeState, ts: TypeSet, updates: list[Resource], removed: list[str],
        shared: Any = None,
    ) -> None:
        """Send one delta response. With ``shared`` (a key that identifies the same message for every
        stream in the same state), the nonce and the encoded bytes are shared too (see ``_sotw_send``)."""
        # Equal keys, equal messages: the nonce is derived from the key (it need only be unique per stream).
        nonce = f"{self._nonce_prefix}.{ts.version}.{_token(shared)}" if shared else ""
        # A version can come back (content-addressed: a change undone); its shared nonce must not
        # collide with a response of that version still awaiting its ACK.
        if not nonce or nonce == st.sent_nonce or nonce in st.inflight:
            nonce, shared = self._nonce(), None
        previous: dict[str, str | None] = {}
        sent: dict[str, str | None] = {}
        for r in updates:
            previous[r.name] = st.known.get(r.name)
            sent[r.name] = r.version
            st.known[r.name] = r.version
        for name in removed:
            previous[name] = st.known.pop(name, None)
            sent[name] = None
        st.inflight[nonce] = _DeltaSent(ts.version, previous, sent)
        while len(st.inflight) > _MAX_INFLIGHT:
            st.inflight.popitem(last=False)
        st.sent_version = ts.version
        st.sent_nonce = nonce
        st.sent_at = time.monotonic()
        st.sent_typeset = ts
        data = _DELTA_MESSAGES.get((shared, nonce)) if shared else None
        if data is None:
            data = b"".join(
                [
                    wire.field_str(1, ts.version),
                    *(wire.field(2, r.delta_bytes) for r in updates),
                    wire.field_str(4, st.type_url),
                    *(wire.field_str(6, name) for name in removed),
                    wire.field_str(5, nonce),
                ]
            )
            if shared:
                _DELTA_MESSAGES.put((shared, nonce), data)
        await self._write(stream, st, data)


#: When a resource of the key type is (re)sent, the resources it references of the value type follow.
_DEPENDENT = {cache_mod.CLUSTER: cache_mod.ENDPOINT, cache_mod.LISTENER: cache_mod.ROUTE}


def _ordered(types: Iterable[str]) -> list[str]:
    """Type URLs in push order (known types first, in ``TYPE_ORDER``)."""
    present = set(types)
    return [t for t in TYPE_ORDER if t in present] + sorted(present.difference(TYPE_ORDER))


def _sotw_names(type_url: str, names: Iterable[str]) -> frozenset[str] | None:
    """Requested names; None means wildcard (CDS/LDS with no names, or ``*``)."""
    requested = frozenset(names)
    if "*" in requested or (not requested and type_url not in NAMED_TYPES):
        return None
    return _intern_names(requested)


def _token(key: Any) -> str:
    """A short token for a hashable key, in nonces: equal keys, equal tokens. A collision within one
    stream is caught where nonces are chosen (it then costs only a per-stream nonce)."""
    return f"{hash(key) & 0xFFFFFFFF:x}"


def _names_tag(names: frozenset[str] | None) -> str:
    """The token of a subscription."""
    return "all" if names is None else "n" + _token(names)


#: One shared object per distinct subscription (see :func:`_intern_names`).
_NAME_SETS: Bounded[frozenset[str], frozenset[str]] = Bounded(4096)


def _intern_names(names: frozenset[str]) -> frozenset[str]:
    """One shared object per distinct subscription: a thousand sidecars asking for the same thousand
    endpoint names hold one set (and one copy of the strings), not a thousand. Equal sets also hit the
    response-body cache by identity first."""
    canonical = _NAME_SETS.get(names)
    return canonical if canonical is not None else _NAME_SETS.put(names, names)


def _release_memory() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


#: Delta messages shared by the streams in the same state, by (shared key, nonce): first answers hold
#: every resource (~1 MB at 1000 services), hence the byte bound too.
_DELTA_MESSAGES: Bounded[Any, bytes] = Bounded(64, 16 << 20, len)
#: What changed between two type set versions, shared by every stream in sync with the older one.
_TRANSITIONS: Bounded[tuple[str, str, str], list[tuple[str, Resource | None]]] = Bounded(32)


def _transition(old: TypeSet, new: TypeSet) -> list[tuple[str, Resource | None]]:
    """What changed from ``old`` to ``new`` (``None`` = removed), computed once and shared by every stream
    that was in sync with ``old``: a push to N streams costs O(resources + N x changes), not O(N x resources)."""
    key = (new.type_url, old.version, new.version)
    changes = _TRANSITIONS.get(key)
    if changes is None:
        before, after = old.resources, new.resources
        changes = [(n, r) for n, r in after.items() if before.get(n) is not r]
        changes += [(n, None) for n in before if n not in after]
        _TRANSITIONS.put(key, changes)
    return changes


def _delta_diff_from(st: _TypeState, changes: list[tuple[str, Resource | None]]) -> tuple[list[Resource], list[str]]:
    """:func:`_delta_diff` for a stream whose ``known`` matched the previous TypeSet exactly."""
    names = st.names or frozenset()
    updates: list[Resource] = []
    removed: list[str] = []
    for name, res in changes:
        if not st.wildcard and name not in names:
            continue
        if res is None:
            if name in st.known:
                removed.append(name)
        elif st.known.get(name) != res.version:
            updates.append(res)
    return updates, sorted(removed)


def _with_forced(st: _TypeState, ts: TypeSet, updates: list[Resource], force: set[str]) -> list[Resource]:
    """``updates`` plus the resources named in ``force`` that are in scope and not already updated."""
    have = {r.name for r in updates}
    extra = [ts.resources[n] for n in sorted(force)
             if n not in have and n in ts.resources and (st.wildcard or n in (st.names or ()))
             and st.rejected.get(n) != ts.resources[n].version]
    return updates + extra if extra else updates


def _delta_diff(st: _TypeState, ts: TypeSet) -> tuple[list[Resource], list[str]]:
    """Resources the client lacks or has in another version, and names it has that are gone."""
    resources = ts.resources
    if st.wildcard:
        candidates: Iterable[Resource] = resources.values()
    else:
        candidates = [resources[n] for n in sorted(st.names or ()) if n in resources]
    known = st.known
    rejected = st.rejected
    for name in [n for n in rejected if n not in resources]:
        del rejected[name]
    if not rejected and known.empty():
        return list(candidates), []  # a first answer: everything in scope
    updates = []
    for r in candidates:
        if known.get(r.name) == r.version:
            continue
        bad = rejected.get(r.name)
        if bad is not None:
            if bad == r.version:
                continue
            del rejected[r.name]
        updates.append(r)
    in_scope: Callable[[str], bool] = (lambda n: True) if st.wildcard else (lambda n: n in (st.names or ()))
    removed = sorted(n for n in known if n not in resources and in_scope(n))
    return updates, removed


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
