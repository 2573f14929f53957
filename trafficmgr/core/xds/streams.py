"""What the ADS server knows about each open stream: the peer, the node, and per resource type what was
sent, ACKed and NACKed (SotW) or what the client has (delta, :class:`Known`), and its :class:`Inbox`.

Only the server loop touches these objects; they hold no logic beyond their own bookkeeping. The limits
that keep one client from exhausting the server (any pod can open streams) are here too.
"""

from __future__ import annotations

import asyncio
import collections
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grpc

from trafficmgr.core import cache as cache_mod
from trafficmgr.core.cache import TypeSet

#: What :meth:`Inbox.get` returns besides requests: the cache changed / the stream is over.
CHANGED = object()
CLOSED = object()

#: Requests read ahead per stream (each up to the request size limit, so this bounds a stream's buffered
#: requests). Beyond it the reader stops reading and HTTP/2 flow control holds the client back; Envoy's
#: bursts (a request per type, ACKs) just wait for the handler a moment.
MAX_PENDING_REQUESTS = 4
#: Names one stream may subscribe to per type. A sidecar at 10k services with two ports each subscribes to
#: 20k endpoint names; ten times that is refused (each name costs the server ~100 bytes per stream).
MAX_NAMES_PER_TYPE = 200_000
#: Node id / cluster length accepted (a pod name is <= 253 characters, a namespace <= 63).
MAX_NODE_FIELD = 1024
#: Client-supplied text kept (NACK error details) and logged (node ids, type URLs, error details).
MAX_ERROR_DETAIL = 4096
MAX_LOGGED = 200


def clip(text: str, limit: int = MAX_LOGGED) -> str:
    """``text`` cut to ``limit`` characters, saying how much was cut (for client-supplied strings)."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...[{len(text) - limit} more characters]"


class Refused(Exception):
    """A stream the server ends: ``reason`` is the ``trafficmgr_xds_streams_refused_total`` label,
    ``code`` the gRPC status, the message its details."""

    def __init__(self, reason: str, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.code = code


def too_many_names(count: int) -> Refused:
    return Refused("too_many_names", grpc.StatusCode.RESOURCE_EXHAUSTED,
                   f"{count} resource names for one type; the limit is {MAX_NAMES_PER_TYPE}")


class Inbox:
    """What a stream's handler has to do next: requests, read ahead at most ``limit`` (then
    :meth:`put` waits, so gRPC stops reading and HTTP/2 flow control holds the client back), a coalesced
    "the cache changed" flag (any number of changes while the handler is busy, e.g. blocked writing to a
    slow client, is one push of the latest versions), and "closed".

    Memory per stream is bounded by ``limit`` requests whatever the client does."""

    __slots__ = ("requests", "limit", "changed", "closed", "drain", "_wake", "_room")

    def __init__(self, limit: int = MAX_PENDING_REQUESTS) -> None:
        self.requests: collections.deque[Any] = collections.deque()
        self.limit = limit
        self.changed = False
        self.closed = False
        self.drain = False  # closed by the client: the requests already read are still handled
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    async def put(self, request: Any) -> None:
        """Queue a request; waits while ``limit`` requests are pending."""
        while len(self.requests) >= self.limit and not self.closed:
            self._room.clear()
            await self._room.wait()
        self.requests.append(request)
        self._wake.set()

    def signal_change(self) -> None:
        self.changed = True
        self._wake.set()

    def close(self, drain: bool = False) -> None:
        """No more requests; ``drain``: hand out the pending ones first (else :data:`CLOSED` comes next)."""
        self.drain = drain and not self.closed
        self.closed = True
        self._wake.set()
        self._room.set()

    async def get(self) -> Any:
        """The next request, else :data:`CHANGED` (once per burst of changes); :data:`CLOSED` first of all."""
        while True:
            if self.closed and not (self.drain and self.requests):
                return CLOSED
            if self.requests:
                item = self.requests.popleft()
                self._room.set()
                return item
            if self.changed:
                self.changed = False
                return CHANGED
            self._wake.clear()
            await self._wake.wait()


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
    """The verified client certificate's URI SANs only (gRPC's ``peer_uri``; empty without mutual TLS).
    Not the CN, nor DNS SANs: access control accepts only SPIFFE URIs, and a DNS SAN or CN spelled like
    one must not pass for it."""
    try:
        auth = context.auth_context() or {}
    except Exception:  # noqa: BLE001 - no auth context on insecure transports in some versions
        return ()
    return tuple(v.decode(errors="replace") if isinstance(v, bytes) else str(v) for v in auth.get("peer_uri", ()))


def peer_cert_expiry(context: Any) -> float | None:
    """The notAfter (seconds since the epoch) of the client certificate of a mutual-TLS stream (gRPC's
    ``x509_pem_cert``); None without one. Shown by ``proxy-status``; never used to authorize."""
    try:
        pems = (context.auth_context() or {}).get("x509_pem_cert") or ()
    except Exception:  # noqa: BLE001 - no auth context on insecure transports in some versions
        return None
    if not pems:
        return None
    from cryptography import x509

    try:
        pem = pems[0] if isinstance(pems[0], bytes) else str(pems[0]).encode()
        return x509.load_pem_x509_certificate(pem).not_valid_after_utc.timestamp()
    except ValueError:
        return None


class TypeState:
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
        self.known = Known()  # name -> version the client has (optimistic after a send)
        self.inflight: collections.OrderedDict[str, DeltaSent] = collections.OrderedDict()
        self.rejected: dict[str, str] = {}  # name -> NACKed version, never resent
        self.synced_version: str | None = None  # TypeSet version ``known`` was last diffed against
        self.synced_ts: TypeSet | None = None  # that TypeSet itself (for the shared fast diff)
        self.force: set[str] = set()  # names to resend even if the client has them (a replaced cluster's)
        self.force_tag = ""  # the version of the type set whose update forced them

    def status(self) -> dict[str, Any]:
        return {"sent": self.sent_version, "acked": self.acked_version, "last_nack": self.last_nack}


class Known:
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


class DeltaSent:
    """One delta response awaiting its ACK: what it changed, so a NACK can undo it.

    Holds the response's own list of resources (and removed names) and, per name, only a version the
    client had before (most names of a push have none: a first answer sends thousands the client never
    had), so a response in flight costs a pointer per resource, not two per-stream dicts of them."""

    __slots__ = ("version", "updates", "removed", "previous", "at")

    def __init__(self, version: str, updates: Sequence[cache_mod.Resource], removed: Sequence[str],
                 previous: dict[str, str]) -> None:
        self.version = version
        self.updates = updates
        self.removed = removed
        self.previous = previous  # name -> version known before this response (absent: unknown)
        self.at = time.monotonic()

    def sent(self) -> Iterator[tuple[str, str | None]]:
        """(name, version sent) for every name of the response; ``None``: removed."""
        for r in self.updates:
            yield r.name, r.version
        for name in self.removed:
            yield name, None


class Stream:
    """One ADS stream (SotW or delta): its peer and node, its resolved view, and a :class:`TypeState` per type."""

    __slots__ = (
        "mode", "context", "peer", "node_id", "node_cluster", "identified", "view", "role", "connected_at",
        "types", "inbox", "unknown_logged", "identities", "unknown_types", "cert_expiry", "early_force",
    )

    def __init__(self, mode: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.mode = mode
        self.context = context
        self.peer = parse_peer(context.peer())
        self.identities = peer_identities(context)
        self.cert_expiry = peer_cert_expiry(context)
        self.node_id = ""
        self.node_cluster = ""
        self.identified = False
        self.view: str | None = None
        self.role: str | None = None  # role label (metrics.proxy_role) of CONNECTED_PROXIES currently counted
        self.connected_at = time.time()
        self.types: dict[str, TypeState] = {}
        self.inbox = Inbox()
        self.unknown_logged = False
        self.unknown_types = 0  # requests for types this server does not serve (ignored)
        # Delta: dependent names (type -> names) to resend once the client first asks for that type on
        # this stream (a replaced cluster sent before its endpoints' type was asked for; see DeltaProtocol).
        self.early_force: dict[str, set[str]] = {}

    def signal_change(self) -> None:
        self.inbox.signal_change()
