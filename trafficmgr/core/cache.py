"""Versioned snapshots of Envoy resources, one per view (a role such as ``sidecar`` or ``gateway``).

Contracts:
- A :class:`Resource` is serialized exactly once; its bytes, its ``Any`` encoding and its delta
  ``Resource`` encoding are shared by every proxy and every response that carries it.
- Versions are derived from content: unchanged resources keep their version and are not resent.
- A :class:`Snapshot` is immutable and deterministic (sorted by name); :meth:`SnapshotCache.set_view`
  refuses a snapshot that fails the consistency gate, and the previous one keeps being served.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Generic, TypeVar

import attrs
import immutables
from google.protobuf.message import Message

from trafficmgr.core import wire

TYPE_PREFIX = "type.googleapis.com/"
CLUSTER = TYPE_PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT = TYPE_PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = TYPE_PREFIX + "envoy.config.listener.v3.Listener"
ROUTE = TYPE_PREFIX + "envoy.config.route.v3.RouteConfiguration"
SECRET = TYPE_PREFIX + "envoy.extensions.transport_sockets.tls.v3.Secret"

#: Push order (make-before-break): clusters before endpoints, listeners before routes.
TYPE_ORDER: tuple[str, ...] = (CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET)
#: Short names used by the CLI and admin views.
SHORT_NAMES: dict[str, str] = {
    "clusters": CLUSTER,
    "endpoints": ENDPOINT,
    "listeners": LISTENER,
    "routes": ROUTE,
    "secrets": SECRET,
}
#: Types whose resources are requested by name (others are wildcard).
NAMED_TYPES = frozenset({ENDPOINT, ROUTE, SECRET})


def content_version(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


K = TypeVar("K")
V = TypeVar("V")


class Bounded(Generic[K, V]):
    """A thread-safe least-recently-used map bounded by entry count and, with ``size``, by total size
    (the newest entry always stays). For the caches the xDS path shares between streams and servers."""

    def __init__(self, max_items: int, max_size: int = 0, size: Callable[[V], int] | None = None) -> None:
        self.max_items, self.max_size, self._size = max_items, max_size, size
        self._items: collections.OrderedDict[K, V] = collections.OrderedDict()
        self._total = 0
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> V:
        """Store ``value`` (replacing any under ``key``) and return it."""
        with self._lock:
            old = self._items.pop(key, None)
            if self._size is not None:
                self._total += self._size(value) - (self._size(old) if old is not None else 0)
            self._items[key] = value
            while len(self._items) > 1 and (len(self._items) > self.max_items
                                            or (self.max_size and self._total > self.max_size)):
                _, dropped = self._items.popitem(last=False)
                if self._size is not None:
                    self._total -= self._size(dropped)
            return value

    def __len__(self) -> int:
        return len(self._items)


@attrs.frozen(slots=True, eq=False)
class Resource:
    """One serialized xDS resource.

    ``refs`` lists ``(type_url, name)`` of the resources this one needs (a cluster's EDS name, a
    listener's RDS and SDS names); the consistency gate checks them.
    """

    type_url: str
    name: str
    body: bytes
    version: str
    refs: tuple[tuple[str, str], ...] = ()
    any_bytes: bytes = b""
    delta_bytes: bytes = b""

    @classmethod
    def from_message(cls, msg: Message, name: str, refs: Iterable[tuple[str, str]] = ()) -> Resource:
        """Serialize ``msg`` (deterministically) once and wrap it."""
        body = msg.SerializeToString(deterministic=True)
        type_url = TYPE_PREFIX + msg.DESCRIPTOR.full_name
        version = content_version(body)
        any_bytes = wire.field_str(1, type_url) + wire.field(2, body)
        delta = wire.field_str(1, version) + wire.field(2, any_bytes) + wire.field_str(3, name)
        return cls(type_url, name, body, version, tuple(sorted(set(refs))), any_bytes, delta)

    def message(self) -> Message:
        """Parse the bytes back into a message (for config dumps and tests; not on the hot path)."""
        from trafficmgr.core.protos import message_class

        msg = message_class(self.type_url)()
        msg.ParseFromString(self.body)
        return msg


def _entry_hash(r: Resource) -> int:
    return int.from_bytes(hashlib.blake2b(r.name.encode() + b"\0" + r.version.encode(), digest_size=8).digest(), "big")


class ResourceMap(Mapping[str, "Resource"]):
    """Resources by name, iterated in name order; immutable.

    Backed by a persistent hash map (``immutables.Map``, a HAMT): a set derived with a few changes shares
    everything else with its base, so :meth:`TypeSet.derive` costs O(changes * log n) instead of a copy of
    every entry (at 10k services the copy of the cluster and endpoint sets was most of what a one-pod change
    cost beyond its own resources). The sorted names are computed on first iteration and shared with
    derived maps that hold the same names."""

    __slots__ = ("_map", "_keys")

    def __init__(self, items: immutables.Map[str, Resource] | Mapping[str, Resource] | None = None,
                 _keys: list[str] | None = None) -> None:
        self._map: immutables.Map[str, Resource] = (
            items if isinstance(items, immutables.Map) else immutables.Map(items or {}))
        self._keys = _keys

    def __getitem__(self, name: str) -> Resource:
        return self._map[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self._map.get(name, default)

    def __contains__(self, name: object) -> bool:
        return name in self._map

    def __len__(self) -> int:
        return len(self._map)

    def __iter__(self) -> Iterator[str]:
        return iter(self.sorted_names())

    def sorted_names(self) -> list[str]:
        if self._keys is None:
            self._keys = sorted(self._map)
        return self._keys

    def ordered(self) -> list[Resource]:
        """Every resource, in name order."""
        m = self._map
        return [m[n] for n in self.sorted_names()]

    def updated(self, changes: Iterable[tuple[str, Resource | None]], same_names: bool) -> ResourceMap:
        """A new map with ``changes`` applied (``None`` removes); ``same_names``: no name is added or
        removed (the sorted names are shared)."""
        with self._map.mutate() as m:
            for name, res in changes:
                if res is None:
                    m.pop(name, None)
                else:
                    m[name] = res
            new = m.finish()
        return ResourceMap(new, self._keys if same_names else None)

    def __repr__(self) -> str:
        return f"ResourceMap({len(self)} resources)"


class TypeSet:
    """All resources of one type in one view; immutable once built; caches response bodies."""

    __slots__ = ("type_url", "resources", "version", "_bodies", "_responses", "_lock", "_names", "_refs", "_acc",
                 "_base", "_changed", "__weakref__")

    def __init__(self, type_url: str, resources: Iterable[Resource], _sorted: ResourceMap | None = None,
                 _acc: int | None = None) -> None:
        self.type_url = type_url
        self.resources: ResourceMap = _sorted if _sorted is not None else ResourceMap({r.name: r for r in resources})
        if _acc is None:
            _acc = 0
            for r in self.resources.values():
                _acc ^= _entry_hash(r)
        # The version is an XOR of per-resource hashes, so a derived TypeSet updates it in O(changes).
        self._acc = _acc
        self.version = f"{_acc:016x}" if self.resources else "empty"
        self._bodies: dict[frozenset[str] | None, bytes] = {}
        # Complete responses (nonce appended): few are live at once (a push, its subscriptions), ~1 MB each.
        self._responses: Bounded[tuple[str, frozenset[str] | None], bytes] = Bounded(16)
        self._lock = threading.Lock()
        self._names: frozenset[str] | None = None
        self._refs: dict[str, frozenset[str]] | None = None
        # Set by derive(): the TypeSet this one was derived from (weakly) and the names that changed.
        self._base: weakref.ref[TypeSet] | None = None
        self._changed: frozenset[str] = frozenset()

    def changed_since(self, base: TypeSet) -> frozenset[str] | None:
        """The names whose resources differ from ``base``'s when this set was derived from ``base`` in one
        :meth:`derive` step (``frozenset()`` when it is ``base``); None when unknown (compare yourself)."""
        if base is self:
            return frozenset()
        if self._base is not None and self._base() is base:
            return self._changed
        return None

    def names(self) -> frozenset[str]:
        """The resource names (computed once)."""
        if self._names is None:
            self._names = frozenset(self.resources)
        return self._names

    def refs(self) -> dict[str, frozenset[str]]:
        """The names the resources reference, by referenced type (computed once)."""
        if self._refs is None:
            by_type: dict[str, set[str]] = {}
            for r in self.resources.values():
                for rtype, rname in r.refs:
                    names = by_type.get(rtype)
                    if names is None:
                        by_type[rtype] = names = set()
                    names.add(rname)
            self._refs = {t: frozenset(names) for t, names in by_type.items()}
        return self._refs

    def derive(self, changes: Mapping[str, Resource | None]) -> TypeSet:
        """A new TypeSet with ``changes`` applied (``None`` removes the name): O(changes * log n) (the
        names are sorted again, lazily, only when a name was added or removed)."""
        if not changes:
            return self
        mine = self.resources
        acc = self._acc
        added = removed = False
        same_refs = True
        applied: list[tuple[str, Resource | None]] = []
        for name, res in changes.items():
            old = mine.get(name)
            if old is res:
                continue
            if old is not None:
                acc ^= _entry_hash(old)
            if res is None:
                if old is not None:
                    removed = True
                    applied.append((name, None))
            else:
                added = added or old is None
                same_refs = same_refs and old is not None and old.refs == res.refs
                applied.append((name, res))
                acc ^= _entry_hash(res)
        if not applied:  # every change was already there: the same set (identity means unchanged)
            return self
        resources = mine.updated(applied, same_names=not added and not removed)
        derived = TypeSet(self.type_url, (), _sorted=resources, _acc=acc)
        derived._base = weakref.ref(self)
        derived._changed = frozenset(name for name, _ in applied)
        if not added and not removed:  # the same names; and the same references when no ref changed
            derived._names = self._names
            if same_refs:
                derived._refs = self._refs
        return derived

    def same_as(self, resources: Mapping[str, Resource]) -> bool:
        """True when ``resources`` holds exactly the same Resource objects."""
        if len(resources) != len(self.resources):
            return False
        mine = self.resources
        return all(mine.get(name) is r for name, r in resources.items())

    def select(self, names: frozenset[str] | None) -> list[Resource]:
        """The resources named (all of them for ``None``), sorted by name; unknown names are skipped."""
        if names is None:
            return self.resources.ordered()
        return [self.resources[n] for n in sorted(names) if n in self.resources]

    def sotw_response(self, names: frozenset[str] | None, nonce: str, share: bool = True) -> bytes:
        """:meth:`sotw_body` with ``nonce`` appended, cached (``share``): streams sharing a nonce share the
        bytes. A nonce of one stream only is not cached (it would push shared responses out)."""
        if not share:
            return self.sotw_body(names) + wire.field_str(5, nonce)
        key = (nonce, names)
        data = self._responses.get(key)
        return data if data is not None else self._responses.put(key, self.sotw_body(names) + wire.field_str(5, nonce))

    def sotw_body(self, names: frozenset[str] | None) -> bytes:
        """A ``DiscoveryResponse`` without nonce for ``names`` (all for ``None``), built once and cached.

        Append ``wire.field_str(5, nonce)`` to complete it.
        """
        body = self._bodies.get(names)
        if body is None:
            parts = [wire.field_str(1, self.version)]
            parts.extend(wire.field(2, r.any_bytes) for r in self.select(names))
            parts.append(wire.field_str(4, self.type_url))
            body = b"".join(parts)
            with self._lock:
                if len(self._bodies) > 256:
                    self._bodies.clear()
                self._bodies[names] = body
        return body


#: Name/reference set compositions that passed the consistency gate (see :meth:`Snapshot.errors`).
#: Room for every view of a build (the scoped sidecar views too) and a few older compositions.
_CONSISTENT: Bounded[tuple[int, ...], tuple[Any, ...]] = Bounded(128)


class InconsistentSnapshot(ValueError):
    """The snapshot references resources it does not contain (or contains unreferenced ones)."""


class Snapshot:
    """Immutable resources of one view, by type. Equal inputs give byte-identical snapshots."""

    __slots__ = ("types", "version", "_count")

    def __init__(self, types: Mapping[str, TypeSet]) -> None:
        self.types: dict[str, TypeSet] = {t: types.get(t) or TypeSet(t, ()) for t in TYPE_ORDER}
        self.version = "-".join(self.types[t].version[:6] for t in TYPE_ORDER)
        self._count = sum(len(ts.resources) for ts in self.types.values())

    @classmethod
    def build(cls, resources: Mapping[str, Iterable[Resource] | TypeSet], previous: Snapshot | None = None) -> Snapshot:
        """Make a snapshot, reusing ``previous``'s TypeSets (and their cached bodies) where unchanged.

        A value may be a ready :class:`TypeSet` (shared by several views as is)."""
        types: dict[str, TypeSet] = {}
        for type_url in TYPE_ORDER:
            given = resources.get(type_url, ())
            if isinstance(given, TypeSet):  # already built (and shared between views)
                types[type_url] = given
                continue
            by_name = {r.name: r for r in given}
            old = previous.types.get(type_url) if previous else None
            types[type_url] = old if old is not None and old.same_as(by_name) else TypeSet(type_url, by_name.values())
        return cls(types)

    def errors(self) -> list[str]:
        """Consistency problems: dangling references and unreferenced named resources.

        Set operations over per-TypeSet caches; a snapshot made of the very name and reference sets of
        one that passed (an endpoint change keeps them all) is not checked again."""
        parts = tuple(x for ts in self.types.values() for x in (ts.names(), ts.refs()))
        key = tuple(map(id, parts))
        if _CONSISTENT.get(key) is not None:  # the held parts keep these ids from being reused
            return []
        problems = self._problems()
        if not problems:
            _CONSISTENT.put(key, parts)
        return problems

    def _problems(self) -> list[str]:
        by_type: dict[str, frozenset[str]] = {}
        for ts in self.types.values():
            for rtype, names in ts.refs().items():
                have = by_type.get(rtype)
                by_type[rtype] = names if have is None else have | names
        problems: list[str] = []
        for rtype, names in by_type.items():
            held = self.types.get(rtype)
            for rname in sorted(names - (held.names() if held is not None else frozenset())):
                holders = [r for t in self.types.values() for r in t.resources.values() if (rtype, rname) in r.refs]
                problems.append(f"{short_name(holders[0].type_url)} {holders[0].name!r} references missing {short_name(rtype)} {rname!r}")
        for t in NAMED_TYPES:
            for name in sorted(self.types[t].names() - by_type.get(t, set())):
                problems.append(f"{short_name(t)} {name!r} is not referenced by any resource")
        return problems

    def resource_count(self) -> int:
        return self._count


def short_name(type_url: str) -> str:
    for short, full in SHORT_NAMES.items():
        if full == type_url:
            return short
    return type_url.rsplit(".", 1)[-1]


Resolver = Callable[[str, str, str], "str | None"]


class SnapshotCache:
    """The current snapshot of each view, plus change notification for xDS streams.

    ``resolver(node_id, node_cluster, peer_address)`` returns the view name a connecting proxy gets, or
    None for an unknown/refused node. Snapshots are set from any thread; streams wait on the asyncio
    loop given to :meth:`attach_loop`.
    """

    def __init__(self, resolver: Resolver | None = None) -> None:
        self._views: dict[str, Snapshot] = {}
        self.resolver: Resolver = resolver or (lambda node_id, cluster, peer: None)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None
        self.generation = 0
        self._lock = threading.Lock()
        self.rejected: dict[str, list[str]] = {}

    def attach_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Bind change notification to the xDS server's loop (call from that loop)."""
        self._loop = loop
        self._changed = asyncio.Event()

    def views(self) -> dict[str, Snapshot]:
        return dict(self._views)

    def get(self, view: str) -> Snapshot | None:
        return self._views.get(view)

    def resolve(self, node_id: str, node_cluster: str, peer: str = "") -> str | None:
        return self.resolver(node_id, node_cluster, peer)

    def set_view(self, view: str, snapshot: Snapshot, notify: bool = True) -> None:
        """Publish ``snapshot`` for ``view`` after the consistency gate; with ``notify=False`` the caller
        wakes the streams once itself (see :meth:`notify`) after publishing several views.

        Raises :class:`InconsistentSnapshot` (and keeps serving the previous snapshot) when it fails.
        The snapshot already served (it passed the gate then) returns at once.
        """
        if self._views.get(view) is snapshot:
            return
        problems = snapshot.errors()
        if problems:
            self.rejected[view] = problems
            raise InconsistentSnapshot(f"view {view!r}: " + "; ".join(problems[:5]))
        self.rejected.pop(view, None)
        with self._lock:
            if self._views.get(view) is snapshot:
                return
            self._views[view] = snapshot
        if notify:
            self.notify()

    def drop_view(self, view: str) -> None:
        """Stop serving ``view`` (a scoped sidecar view no pod uses any more); streams still resolved to it
        re-resolve at the next :meth:`notify`."""
        with self._lock:
            self._views.pop(view, None)
        self.rejected.pop(view, None)

    def notify(self) -> None:
        """Wake every stream so it re-resolves its node and compares versions."""
        with self._lock:
            self.generation += 1
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._wake()
        else:
            loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    async def wait_change(self, generation: int) -> int:
        """Wait until the cache generation is past ``generation``; return the new generation."""
        while self.generation <= generation:
            assert self._changed is not None, "attach_loop() first"
            await self._changed.wait()
        return self.generation
