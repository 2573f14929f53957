"""Thread-safe in-memory object store with resourceVersions, watch history and owner GC.

Objects are plain dicts in their wire form. Stored objects are never mutated in place: every write
stores a fresh dict, so readers may hold references without copying (public getters still copy).

No write costs more as the store grows: objects are indexed by namespace, by label ``(key, value)`` and by
owner uid (kept exact on every commit), so a namespaced list, a list whose label selector pins a value
(``app=x``, ``app in (x)``), a namespace deletion's cascade and an owner's garbage collection visit only
the objects they concern (see ``tests/apiserver/test_scale.py``).

The JSON encoding of each stored object is kept once made (:meth:`Store.encoded`, dropped when the object
is replaced or deleted), so a list answer joins bytes instead of encoding every object again; paged lists
(``limit``/``continue``) keep their snapshots in :attr:`Store.list_snapshots` (see ``paging.py``).
"""

from __future__ import annotations

import builtins
import copy
import datetime as _dt
import gc
import json
import logging
import queue
import re
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from . import crds as _crds
from . import paging as _paging
from . import patch as _patch
from .discovery import BY_GVK, BY_KEY, RESOURCES, ResourceType, resolve
from .errors import ApiError
from .selectors import FieldMatcher, LabelMatcher, parse_field_selector, parse_label_selector, pinned_pairs

log = logging.getLogger(__name__)

PATCH_JSON = "application/json-patch+json"
PATCH_MERGE = "application/merge-patch+json"
PATCH_STRATEGIC = "application/strategic-merge-patch+json"
PATCH_APPLY = "application/apply-patch+yaml"
_PATCH_ALIASES = {"json": PATCH_JSON, "merge": PATCH_MERGE, "strategic": PATCH_STRATEGIC, "apply": PATCH_APPLY}

_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
EVENTS_CORE = BY_KEY["events"]
EVENTS_V1 = BY_KEY["events.events.k8s.io"]
_EVENT_FIELD_MAP = [("involvedObject", "regarding"), ("message", "note"), ("source", "deprecatedSource"),
                    ("firstTimestamp", "deprecatedFirstTimestamp"), ("lastTimestamp", "deprecatedLastTimestamp"),
                    ("count", "deprecatedCount"), ("reportingComponent", "reportingController")]
_EVENT_SAME = ("metadata", "reason", "type", "action", "eventTime", "series", "related", "reportingInstance")


def core_to_events_v1(obj: dict) -> dict:
    """Convert a stored core/v1 Event to its events.k8s.io/v1 form (both share one storage)."""
    out: dict = {"apiVersion": "events.k8s.io/v1", "kind": "Event"}
    for k in _EVENT_SAME:
        if k in obj:
            out[k] = obj[k]
    for core, new in _EVENT_FIELD_MAP:
        if obj.get(core) not in (None, ""):
            out[new] = obj[core]
    if not out.get("eventTime"):
        ts = obj.get("lastTimestamp") or obj.get("firstTimestamp") or obj["metadata"].get("creationTimestamp")
        if ts:
            out["eventTime"] = ts.replace("Z", ".000000Z") if ts.endswith("Z") and "." not in ts else ts
    return out


def events_v1_to_core(obj: dict) -> dict:
    """Convert an events.k8s.io/v1 Event to the core/v1 storage form."""
    out: dict = {"apiVersion": "v1", "kind": "Event"}
    for k in _EVENT_SAME:
        if k in obj:
            out[k] = obj[k]
    for core, new in _EVENT_FIELD_MAP:
        if obj.get(new) not in (None, ""):
            out[core] = obj[new]
    return out


_PROTECTED_NAMESPACES = {"default", "kube-system", "kube-public"}
_GENERATION_KINDS = {"Deployment", "ReplicaSet", "StatefulSet", "DaemonSet", "Ingress", "IngressClass",
                     "EndpointSlice"}
_GEN_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"

Admission = Callable[[ResourceType, dict, "dict | None"], None]
Listener = Callable[["WatchEvent"], None]


_ATOMIC = frozenset({str, int, float, bool, type(None)})

_ENCODER = json.JSONEncoder(separators=(",", ":"), check_circular=False)  # made once, not per answer
# The C encoder JSONEncoder.encode builds on every call, built once (encode_json runs once per object).
_c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
_C_ENCODE = (_c_make_encoder(None, _ENCODER.default, json.encoder.encode_basestring_ascii, None, ":", ",", False,
                             False, True) if _c_make_encoder is not None else None)


def encode_json(obj: Any) -> bytes:
    """Compact JSON (what the API server answers; ``_ENCODER.encode``): an encoding of a list equals its
    head, its items' encodings joined by commas and its tail, byte for byte."""
    if _C_ENCODE is not None and type(obj) is dict:
        return "".join(_C_ENCODE(obj, 0)).encode()
    return _ENCODER.encode(obj).encode()


def clone(value: Any) -> Any:
    """A deep copy of JSON-shaped data (dicts, lists, strings, numbers, booleans, None), several times
    faster than ``copy.deepcopy`` (no memo: JSON has no shared references to keep); any other value inside
    is copied by ``copy.deepcopy``."""
    t = type(value)
    if t is dict:
        return {k: v if type(v) in _ATOMIC else clone(v) for k, v in value.items()}
    if t is list:
        return [v if type(v) in _ATOMIC else clone(v) for v in value]
    if t in _ATOMIC:
        return value
    return copy.deepcopy(value)


_NOW: tuple[int, str] = (0, "")


def now_iso() -> str:
    """Current UTC time in Kubernetes RFC 3339 form (seconds precision; formatted once per second)."""
    global _NOW
    second = int(time.time())
    cached = _NOW
    if cached[0] != second:
        cached = _NOW = (second, _dt.datetime.fromtimestamp(second, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    return cached[1]


def random_suffix(n: int = 5) -> str:
    """Random name suffix from the alphabet Kubernetes uses for generateName."""
    return "".join(secrets.choice(_GEN_ALPHABET) for _ in range(n))


class WatchEvent:
    """A committed change: ``type`` ADDED/MODIFIED/DELETED, ``obj`` new (or last) state, ``old`` prior."""

    __slots__ = ("type", "rv", "rt", "obj", "old")

    def __init__(self, type: str, rv: int, rt: ResourceType, obj: dict, old: dict | None) -> None:
        self.type = type
        self.rv = rv
        self.rt = rt
        self.obj = obj
        self.old = old


class Watcher:
    """A registered watch; events arrive on ``queue`` as ``(type, obj)``; ``None`` means closed."""

    def __init__(self, rt: ResourceType, namespace: str | None, labels: LabelMatcher | None,
                 fields: FieldMatcher | None) -> None:
        self.rt = rt
        self.namespace = namespace
        self.labels = labels
        self.fields = fields
        self.queue: queue.SimpleQueue[tuple[str, dict] | None] = queue.SimpleQueue()
        self.convert: Callable[[dict], dict] | None = None
        self.closed = False
        self.finished = False  # ended by finish(): the consumer ends its output cleanly
        self.on_close: list[Callable[[], None]] = []

    def matches(self, obj: dict | None) -> bool:
        if obj is None:
            return False
        md = obj.get("metadata", {})
        if self.namespace and md.get("namespace") != self.namespace:
            return False
        if self.labels and not self.labels(md.get("labels") or {}):
            return False
        if self.fields and not self.fields(obj):
            return False
        return True

    def offer(self, ev: WatchEvent) -> None:
        if self.convert is not None:
            ev = WatchEvent(ev.type, ev.rv, ev.rt, self.convert(ev.obj),
                            self.convert(ev.old) if ev.old is not None else None)
        new_m = self.matches(ev.obj)
        if ev.type == "ADDED":
            if new_m:
                self.queue.put(("ADDED", ev.obj))
        elif ev.type == "DELETED":
            if new_m:
                self.queue.put(("DELETED", ev.obj))
        else:
            old_m = self.matches(ev.old)
            if new_m and old_m:
                self.queue.put(("MODIFIED", ev.obj))
            elif new_m:
                self.queue.put(("ADDED", ev.obj))
            elif old_m:
                self.queue.put(("DELETED", ev.obj))

    def finish(self) -> None:
        """End the watch cleanly: the consumer sees ``None`` (an HTTP watch ends its response), no closer runs."""
        if not self.closed:
            self.closed = self.finished = True
            self.queue.put(None)

    def close(self) -> None:
        """Stop the watch: the consumer sees ``None`` and socket-level closers run."""
        if not self.closed:
            self.closed = True
            self.queue.put(None)
            for fn in self.on_close:
                try:
                    fn()
                except Exception:
                    # A closer that fails must not keep the others from running, nor fail close(): log it.
                    log.warning("watch closer %r failed", fn, exc_info=True)


def _rt_for(resource: str | ResourceType | None, obj: dict | None = None,
            custom: _crds.Registry | None = None) -> ResourceType:
    if isinstance(resource, ResourceType):
        return resource
    if resource:
        try:
            return resolve(resource)
        except KeyError:
            found = custom.resolve(resource) if custom is not None else None
            if found is not None:
                return found
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({resource})") from None
    if obj is not None:
        key = (obj.get("apiVersion", ""), obj.get("kind", ""))
        if key in BY_GVK:
            return BY_GVK[key]
        found = custom.by_gvk(*key) if custom is not None else None
        if found is not None:
            return found
        raise ApiError.bad_request(f"no kind {key[1]!r} is registered for version {key[0]!r}")
    raise ApiError.bad_request("resource or object kind required")


def _view(rt: ResourceType, obj: dict) -> dict:
    """A custom resource as read at ``rt``'s version (all versions of a CRD share storage; conversion None)."""
    if rt.custom and obj.get("apiVersion") != rt.api_version:
        return {**obj, "apiVersion": rt.api_version}
    return obj


class Store:
    """The object store. All public methods are thread-safe and raise ``ApiError`` on failure.

    ``resource`` arguments accept a plural (``pods``), resource key (``deployments.apps``), kind,
    short name, ``apiVersion/Kind`` or a ``ResourceType``; when omitted the object's
    ``apiVersion``/``kind`` decide.
    """

    def __init__(self, history: int = 10000,
                 namespaces: Iterable[str] = ("default", "kube-system", "kube-public", "kube-node-lease"),
                 freeze_every: int = 0, continue_ttl: float = _paging.TTL) -> None:
        self._lock = threading.RLock()
        self._freeze_every = max(0, freeze_every)
        self._commits = 0
        self._objects: dict[str, dict[tuple[str, str], dict]] = {r.key: {} for r in RESOURCES}
        self._rv = 0
        self._history: deque[WatchEvent] = deque(maxlen=max(1, history))
        self._window_start = 0
        self._watchers: dict[str, set[Watcher]] = {r.key: set() for r in RESOURCES}
        self._objects[EVENTS_V1.key] = self._objects[EVENTS_CORE.key]
        self._watchers[EVENTS_V1.key] = self._watchers[EVENTS_CORE.key]
        # Indexes kept by _commit: kind key -> namespace -> name -> object; kind key -> (label key, label
        # value) -> {(namespace, name)} (string values only: a selector value is a string); owner uid ->
        # {(kind key, namespace, name)} of the objects whose ownerReferences name it.
        self._by_ns: dict[str, dict[str, dict[str, dict]]] = {r.key: {} for r in RESOURCES}
        self._by_label: dict[str, dict[tuple[str, str], set[tuple[str, str]]]] = {r.key: {} for r in RESOURCES}
        self._by_ns[EVENTS_V1.key] = self._by_ns[EVENTS_CORE.key]
        self._by_label[EVENTS_V1.key] = self._by_label[EVENTS_CORE.key]
        self._applied: dict[str, dict[str, Any]] = {}  # uid -> field manager -> its last applied body
        # id(stored object) -> its encode_json bytes, for stored objects only: an entry is added (under the
        # lock) only while the object is stored and dropped when _commit replaces or deletes it, so the id
        # cannot be reused by another object while the entry exists. Ints and bytes: nothing the garbage
        # collector tracks. Costs about the JSON size of the objects once answered, listed or watched
        # (~75 MB of bytes at 100k pods; the server's RSS grew ~110 MB in bench_apiserver.py).
        self._json: dict[int, bytes] = {}
        # The snapshots behind continue tokens of paged lists (bounded: see paging.py).
        self.list_snapshots = _paging.Snapshots(ttl=continue_ttl)
        self._listeners: list[Listener] = []
        self._admission: list[Admission] = []
        self._dependents: dict[str, set[tuple[str, str, str]]] = {}
        self._uids: dict[str, tuple[str, str, str]] = {}
        # The access.Credentials (token, serving certificate) of the last APIServer started on this store:
        # a server restarted on the same data keeps them, as a real API server keeps its certificates.
        self.credentials: Any = None
        # freeze_every: every that many commits, freeze_heap() (0: never). For a process that is this store's
        # server alone (python -m trafficmgr.apiserver): in a shared process it would also freeze the
        # other objects alive then.
        # The tokens.TokenAuthority of those servers (its token-signing key), made on first use: a restart keeps it.
        self.tokens: Any = None
        # The kinds CustomResourceDefinitions serve on this store (see crds.py); their buckets are made
        # when a CRD is established and kept (empty) after it is deleted.
        self.crds = _crds.Registry()
        for ns in namespaces:
            self.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})

    def _rt_for(self, resource: str | ResourceType | None, obj: dict | None = None) -> ResourceType:
        return _rt_for(resource, obj, self.crds)

    def resource_type(self, resource: str) -> ResourceType:
        """The served type a plural, ``plural.group``, kind, short name or ``apiVersion/Kind`` names
        (builtin or custom); ApiError 404 when none."""
        return self._rt_for(resource)

    def resource_types(self) -> builtins.list[ResourceType]:
        """Every served type: the builtin ones, then those of established CustomResourceDefinitions."""
        return [*RESOURCES, *self.crds.types()]

    def _type_by_key(self, key: str) -> ResourceType | None:
        return BY_KEY.get(key) or next((r for r in self.crds.types() if r.key == key), None)

    @property
    def lock(self) -> threading.RLock:
        return self._lock

    @property
    def resource_version(self) -> str:
        """Current global resourceVersion (string)."""
        return str(self._rv)

    def add_admission(self, fn: Admission) -> None:
        """Register ``fn(rt, new_obj, old_obj_or_None)`` to mutate objects before create/update commits."""
        self._admission.append(fn)

    def subscribe(self, fn: Listener) -> None:
        """Register an in-process listener called (under the store lock) for every committed event."""
        with self._lock:
            self._listeners.append(fn)

    def unsubscribe(self, fn: Listener) -> None:
        with self._lock:
            if fn in self._listeners:
                self._listeners.remove(fn)

    # ---- reads -------------------------------------------------------------------------------

    def get(self, resource: str | ResourceType, name: str, namespace: str | None = None) -> dict:
        """Return a copy of one object; ``ApiError`` 404 when absent."""
        return clone(self.get_raw(resource, name, namespace))

    def get_raw(self, resource: str | ResourceType, name: str, namespace: str | None = None) -> dict:
        """Like ``get`` but returns the stored dict itself (must not be mutated)."""
        rt = self._rt_for(resource)
        ns = (namespace or "default") if rt.namespaced else ""
        with self._lock:
            obj = self._objects.get(rt.key, {}).get((ns, name))
        if obj is None:
            raise ApiError.not_found(rt, name)
        return core_to_events_v1(obj) if rt is EVENTS_V1 else _view(rt, obj)

    def list(self, resource: str | ResourceType, namespace: str | None = None,
             label_selector: str | None = None, field_selector: str | None = None,
             copy_items: bool = True) -> dict:
        """Return a ``<Kind>List`` dict with ``metadata.resourceVersion`` and matching ``items``.

        ``namespace=None`` lists across all namespaces. Items are sorted by namespace/name.
        """
        rt = self._rt_for(resource)
        items, rv = self.list_raw(rt, namespace, parse_label_selector(label_selector),
                                  parse_field_selector(field_selector))
        if copy_items:
            items = clone(items)
        return {"kind": rt.list_kind, "apiVersion": rt.api_version,
                "metadata": {"resourceVersion": rv}, "items": items}

    def list_raw(self, rt: ResourceType, namespace: str | None, labels: LabelMatcher | None = None,
                 fields: FieldMatcher | None = None) -> tuple[builtins.list[dict], str]:
        """Stored (uncopied) matching objects and the list resourceVersion."""
        with self._lock:
            bucket = self._objects.get(rt.key, {})
            rv = str(self._rv)
            pinned = pinned_pairs(labels)
            index = self._by_label.get(rt.key)
            if pinned and index is not None:  # the objects carrying the rarest pinned pair, then the rest
                found = min((index.get(pair, set()) for pair in pinned), key=len)
                ns_only = namespace if namespace and rt.namespaced else None
                objs = [bucket[k] for k in found if ns_only is None or k[0] == ns_only]
            elif namespace and rt.namespaced:
                objs = list(self._by_ns.get(rt.key, {}).get(namespace, {}).values())
            else:
                objs = list(bucket.values())
        objs.sort(key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]))
        if rt is EVENTS_V1:
            objs = [core_to_events_v1(o) for o in objs]
        elif rt.custom:
            objs = [_view(rt, o) for o in objs]
        if labels:
            objs = [o for o in objs if labels(o["metadata"].get("labels") or {})]
        if fields:
            objs = [o for o in objs if fields(o)]
        return objs, rv

    def encoded(self, rt: ResourceType, objs: builtins.list[dict]) -> builtins.list[bytes]:
        """``encode_json`` of each of ``objs`` (of type ``rt``), from the cache for stored objects; those
        encoded here are cached when still stored (checked under the lock: a stale one is not kept)."""
        cache = self._json
        out: builtins.list[bytes] = [cache.get(id(obj)) or b"" for obj in objs]  # b"": not cached
        missed = [i for i, data in enumerate(out) if not data]
        if not missed:
            return out
        encode = encode_json
        for i in missed:
            out[i] = encode(objs[i])
        with self._lock:
            bucket = self._objects.get(rt.key)
            if bucket is not None:
                for i in missed:
                    obj = objs[i]
                    md = obj.get("metadata")
                    if isinstance(md, dict) and bucket.get((md.get("namespace", ""), md.get("name", ""))) is obj:
                        cache[id(obj)] = out[i]
        return out

    def encoded_one(self, rt: ResourceType, obj: dict) -> bytes:
        """``encoded`` for one object."""
        return self.encoded(rt, [obj])[0]

    def count(self, resource: str | ResourceType) -> int:
        rt = self._rt_for(resource)
        with self._lock:
            return len(self._objects[rt.key])

    def owned(self, resource: str | ResourceType, owner_uid: str, namespace: str | None = None) -> builtins.list[dict]:
        """Stored (uncopied) objects of ``resource`` whose ``ownerReferences`` name ``owner_uid``, by name
        (from the owner index: the cost does not grow with the store)."""
        rt = self._rt_for(resource)
        with self._lock:
            bucket = self._objects.get(rt.key, {})
            objs = [bucket[(ns, name)] for key, ns, name in self._dependents.get(owner_uid, ())
                    if key == rt.key and (namespace is None or ns == namespace) and (ns, name) in bucket]
        return sorted(objs, key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]))

    # ---- writes ------------------------------------------------------------------------------

    def create(self, obj: dict, namespace: str | None = None, resource: str | ResourceType | None = None,
               dry_run: bool = False, *, adopt: bool = False) -> dict:
        """Create ``obj`` (copied); fills uid, resourceVersion, creationTimestamp, generation.

        Honours ``metadata.generateName``. ``namespace`` overrides/sets ``metadata.namespace``
        (default ``default`` for namespaced kinds). 409 AlreadyExists, 404 if the namespace is missing.
        Returns a copy of the stored object. ``adopt``: the caller hands ``obj`` over (a freshly decoded
        request body, a dict a controller just built, sharing nothing with a stored object) and gets the
        stored object itself back: neither may be touched afterwards (nothing is copied).
        """
        rt = self._rt_for(resource, obj)
        if rt is EVENTS_V1:
            return core_to_events_v1(self.create(events_v1_to_core(obj), namespace, EVENTS_CORE, dry_run))
        obj = obj if adopt else clone(obj)
        obj["apiVersion"], obj["kind"] = rt.api_version, rt.kind
        md = obj.setdefault("metadata", {})
        if rt.namespaced:
            md["namespace"] = namespace or md.get("namespace") or "default"
        else:
            md.pop("namespace", None)
        with self._lock:
            if not md.get("name"):
                if not md.get("generateName"):
                    raise ApiError.invalid(rt, "", "metadata.name: Required value: name or generateName is required")
                for _ in range(100):
                    md["name"] = md["generateName"] + random_suffix()
                    if (md.get("namespace", ""), md["name"]) not in self._objects[rt.key]:
                        break
            name = md["name"]
            self._validate_name(rt, name)
            ns = md.get("namespace", "")
            if rt.namespaced and ("", ns) not in self._objects["namespaces"]:
                raise ApiError(404, "NotFound", f'namespaces "{ns}" not found',
                               {"name": ns, "kind": "namespaces"})
            if (ns, name) in self._objects[rt.key]:
                raise ApiError.already_exists(rt, name)
            md["uid"] = str(uuid.uuid4())
            md["creationTimestamp"] = now_iso()
            md.pop("resourceVersion", None)
            md.pop("deletionTimestamp", None)
            if rt.kind in _GENERATION_KINDS:
                md["generation"] = 1
            self._defaults(rt, obj)
            self.crds.prepare(rt, obj, None)
            for fn in self._admission:
                fn(rt, obj, None)
            if dry_run:
                return obj if adopt else clone(obj)
            self._commit(rt, "ADDED", obj, None)
            return obj if adopt else clone(obj)

    def update(self, obj: dict, namespace: str | None = None, resource: str | ResourceType | None = None,
               subresource: str | None = None, dry_run: bool = False, *, adopt: bool = False) -> dict:
        """Replace an object (PUT semantics). 409 Conflict when ``metadata.resourceVersion`` is stale.

        ``subresource="status"`` replaces only ``status``; a main-resource update of a kind with a
        status subresource keeps the stored status. Bumps ``generation`` when ``spec`` changes.
        ``adopt``: as for :meth:`create` (the result is the stored object itself, not a copy).
        """
        rt = self._rt_for(resource, obj)
        if rt is EVENTS_V1:
            return core_to_events_v1(self.update(events_v1_to_core(obj), namespace, EVENTS_CORE, subresource,
                                                 dry_run))
        obj = obj if adopt else clone(obj)
        md = obj.setdefault("metadata", {})
        name = md.get("name")
        if not name:
            raise ApiError.invalid(rt, "", "metadata.name: Required value")
        ns = (namespace or md.get("namespace") or "default") if rt.namespaced else ""
        with self._lock:
            old = self._objects[rt.key].get((ns, name))
            if old is None:
                raise ApiError.not_found(rt, name)
            rv = md.get("resourceVersion")
            if rv and rv != old["metadata"]["resourceVersion"]:
                raise ApiError.conflict(rt, name)
            return self._replace(rt, old, obj, subresource, dry_run, adopt)

    def _replace(self, rt: ResourceType, old: dict, obj: dict, subresource: str | None, dry_run: bool,
                 adopt: bool = False) -> dict:
        omd = old["metadata"]
        if subresource == "status":
            new = dict(old)
            if "status" in obj:
                new["status"] = obj["status"]
            else:
                new.pop("status", None)
            new["metadata"] = dict(omd)
            self.crds.prepare(rt, new, old, "status")
        else:
            new = obj
            new["apiVersion"], new["kind"] = rt.api_version, rt.kind
            md = new.setdefault("metadata", {})
            for k in ("uid", "creationTimestamp", "name"):
                md[k] = omd[k]
            if rt.namespaced:
                md["namespace"] = omd["namespace"]
            else:
                md.pop("namespace", None)
            if "generation" in omd:
                md["generation"] = omd["generation"]
            if rt.has_status and subresource is None:
                if "status" in old:
                    new["status"] = old["status"]
                else:
                    new.pop("status", None)
            if new.get("spec") != old.get("spec") and "generation" in omd:
                md["generation"] = omd["generation"] + 1
            self._defaults(rt, new)
            self.crds.prepare(rt, new, old)
            for fn in self._admission:
                fn(rt, new, old)
        new["metadata"].pop("resourceVersion", None)
        cmp_old = {k: v for k, v in old.items() if k != "metadata"}
        cmp_new = {k: v for k, v in new.items() if k != "metadata"}
        if cmp_old == cmp_new and _md_equal(omd, new["metadata"]):
            return old if adopt else clone(old)
        if dry_run:  # nothing stored: the answer keeps the stored version, as kube-apiserver's does
            out = clone(new)
            out["metadata"]["resourceVersion"] = omd["resourceVersion"]
            return out
        self._commit(rt, "MODIFIED", new, old)
        return new if adopt else clone(new)

    def patch(self, resource: str | ResourceType, name: str, body: Any, namespace: str | None = None,
              patch_type: str = PATCH_MERGE, subresource: str | None = None,
              field_manager: str | None = None, dry_run: bool = False) -> dict:
        """Patch an object. ``patch_type`` is a content type or ``json|merge|strategic|apply``.

        ``body`` is the decoded patch (list for JSON patch, dict otherwise). ``apply`` creates the
        object when absent (server-side apply). Returns a copy of the result.
        """
        rt = self._rt_for(resource)
        ptype = _PATCH_ALIASES.get(patch_type, patch_type)
        ns = (namespace or "default") if rt.namespaced else ""
        with self._lock:
            old = self._objects[rt.key].get((ns, name))
            if old is None:
                if ptype == PATCH_APPLY:
                    obj = clone(body)
                    obj.setdefault("metadata", {})["name"] = name
                    _set_managed(obj, field_manager, "Apply")
                    created = self.create(obj, namespace=ns or None, resource=rt, dry_run=dry_run)
                    if not dry_run:
                        self._applied.setdefault(created["metadata"]["uid"], {})[field_manager or ""] = \
                            clone(body)
                    return created
                raise ApiError.not_found(rt, name)
            base = core_to_events_v1(old) if rt is EVENTS_V1 else old
            if ptype == PATCH_APPLY and subresource is None:
                body = self._apply_deletions(rt, base, body, field_manager)
            if ptype == PATCH_JSON:
                new = _patch.json_patch(base, body)
            elif ptype == PATCH_MERGE:
                new = _patch.merge_patch(base, body)
            elif ptype == PATCH_STRATEGIC:
                new = _patch.strategic_merge(base, body)
            elif ptype == PATCH_APPLY:
                if not isinstance(body, dict):
                    raise ApiError.bad_request("apply patch must be an object")
                new = _patch.strategic_merge(base, body)
                _set_managed(new, field_manager, "Apply")
            else:
                raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - "
                               f"accepted media types include: {PATCH_JSON}, {PATCH_MERGE}, {PATCH_STRATEGIC}, "
                               f"{PATCH_APPLY}")
            if not isinstance(new, dict):
                raise ApiError.bad_request("patch did not produce an object")
            new = clone(new)
            nmd = new.setdefault("metadata", {})
            if nmd.get("name", name) != name:
                raise ApiError.bad_request("the name of the object does not match the name in the URL")
            nmd["name"] = name
            rv = (body.get("metadata") or {}).get("resourceVersion") if isinstance(body, dict) else None
            if rv and rv != old["metadata"]["resourceVersion"]:
                raise ApiError.conflict(rt, name)
            if subresource != "status" and ptype != PATCH_APPLY:
                _set_managed(new, field_manager, "Update")
            if rt is EVENTS_V1:
                return core_to_events_v1(self._replace(EVENTS_CORE, old, events_v1_to_core(new), subresource,
                                                       dry_run))
            return self._replace(rt, old, new, subresource, dry_run)

    def apply(self, obj: dict, field_manager: str = "trafficmgr", namespace: str | None = None,
              force: bool = True) -> dict:
        """Server-side apply (simplified): create when absent, else strategic-merge ``obj`` into it and
        drop fields this ``field_manager`` applied before but omits now. ``force`` is accepted for
        API symmetry; conflicts between managers are never reported."""
        rt = self._rt_for(None, obj)
        md = obj.get("metadata") or {}
        return self.patch(rt, md["name"], obj, namespace=namespace or md.get("namespace"),
                          patch_type=PATCH_APPLY, field_manager=field_manager)

    def delete(self, resource: str | ResourceType, name: str, namespace: str | None = None,
               dry_run: bool = False) -> dict:
        """Delete immediately and garbage-collect dependents (ownerReferences uid, namespace contents).

        Returns the last state of the deleted object; 404 when absent.
        """
        rt = self._rt_for(resource)
        ns = (namespace or "default") if rt.namespaced else ""
        with self._lock:
            old = self._objects[rt.key].get((ns, name))
            if old is None:
                raise ApiError.not_found(rt, name)
            if rt.key == "namespaces" and name in _PROTECTED_NAMESPACES:
                raise ApiError(403, "Forbidden", f'namespaces "{name}" is forbidden: this namespace may not be deleted',
                               {"name": name, "kind": "namespaces"})
            if not dry_run:
                self._delete_cascade(EVENTS_CORE if rt is EVENTS_V1 else rt, old)
            return core_to_events_v1(old) if rt is EVENTS_V1 else clone(old)

    def delete_collection(self, resource: str | ResourceType, namespace: str | None = None,
                          label_selector: str | None = None, field_selector: str | None = None) -> builtins.list[dict]:
        """Delete every matching object; returns copies of the deleted objects."""
        rt = self._rt_for(resource)
        with self._lock:
            items, _ = self.list_raw(rt, namespace, parse_label_selector(label_selector),
                                     parse_field_selector(field_selector))
            for obj in items:
                md = obj["metadata"]
                cur = self._objects[rt.key].get((md.get("namespace", ""), md["name"]))
                if cur is not None:
                    self._delete_cascade(EVENTS_CORE if rt is EVENTS_V1 else rt, cur)
            return clone(items)

    def _delete_cascade(self, rt: ResourceType, obj: dict) -> None:
        md = obj["metadata"]
        key = (md.get("namespace", ""), md["name"])
        if key not in self._objects[rt.key]:
            return
        if rt.key == _crds.CRD.key:  # its custom resources go first, as the CRD's cleanup finalizer does
            for crt in self.crds.types_of(md["name"])[:1]:
                for child in list(self._objects.get(crt.key, {}).values()):
                    self._delete_cascade(crt, child)
        self._commit(rt, "DELETED", obj, None)
        if rt.key == "namespaces":
            done: set[str] = set()
            for other in self.resource_types():
                if other.namespaced and other.key not in done:
                    done.add(other.key)
                    for child in list(self._by_ns.get(other.key, {}).get(md["name"], {}).values()):
                        self._delete_cascade(other, child)
        for dkey, dns, dname in list(self._dependents.pop(md["uid"], ())):
            dependent = self._objects[dkey].get((dns, dname))
            if dependent is None:
                continue
            owners = [r.get("uid") for r in dependent["metadata"].get("ownerReferences") or []]
            dep_rt = self._type_by_key(dkey)
            if dep_rt is not None and all(not self._uid_alive(u) for u in owners):
                self._delete_cascade(dep_rt, dependent)

    def _uid_alive(self, uid: str | None) -> bool:
        return bool(uid) and uid in self._uids

    # ---- watch -------------------------------------------------------------------------------

    def watch(self, resource: str | ResourceType, namespace: str | None = None,
              resource_version: str | None = None, label_selector: str | None = None,
              field_selector: str | None = None) -> Watcher:
        """Register a watch. rv absent/"0": current objects arrive first as ADDED; else events after rv.

        Raises ApiError 410 Expired when rv is older than the history window. Call ``stop_watch``
        (or ``Watcher.close``) when done.
        """
        rt = self._rt_for(resource)
        w = Watcher(rt, namespace if rt.namespaced else None, parse_label_selector(label_selector),
                    parse_field_selector(field_selector))
        storage_rt = EVENTS_CORE if rt is EVENTS_V1 else rt
        if rt is EVENTS_V1:
            w.convert = core_to_events_v1
        elif rt.custom:
            w.convert = lambda o: _view(rt, o)
        with self._lock:
            if resource_version in (None, "", "0"):
                current = (self._by_ns.get(rt.key, {}).get(w.namespace, {}) if w.namespace
                           else self._objects.get(rt.key, {}))
                for obj in current.values():
                    if w.convert is not None:
                        obj = w.convert(obj)
                    if w.matches(obj):
                        w.queue.put(("ADDED", obj))
            else:
                try:
                    rv = int(resource_version)
                except ValueError:
                    raise ApiError.bad_request(f"invalid resource version {resource_version!r}") from None
                if rv < self._window_start:
                    raise ApiError.expired(f"too old resource version: {rv} ({self._window_start + 1})")
                for ev in self._history:
                    if ev.rv > rv and ev.rt.key == storage_rt.key:
                        w.offer(ev)
            self._watchers.setdefault(rt.key, set()).add(w)
        return w

    def stop_watch(self, w: Watcher) -> None:
        with self._lock:
            self._watchers.get(w.rt.key, set()).discard(w)
        w.close()

    def watchers(self) -> builtins.list[Watcher]:
        with self._lock:
            return [w for ws in self._watchers.values() for w in ws]

    def expire_history(self) -> None:
        """Drop the event window (like a compaction): a later watch from any resourceVersion issued
        before this call gets 410 Expired, and so does every continue token issued before it; versions
        listed afterwards watch normally."""
        with self._lock:
            self._history.clear()
            self._rv += 1
            self._window_start = self._rv
        self.list_snapshots.clear()  # as a compaction, it also expires every continue token

    def freeze_heap(self) -> None:
        """Collect the process's cyclic garbage, then move every surviving object out of the garbage
        collector's sight (``gc.freeze``), under the store lock.

        For a process that is this store's server alone (``python -m trafficmgr.apiserver``), which runs
        with automatic collections off and calls this every ``freeze_every`` commits and periodically: the
        store's objects are acyclic JSON trees that reference counting frees when they are replaced, yet
        the collector would walk each of them in its young collections and again in every full one (at
        100k pods a full collection takes ~1 s, and there are ten while loading: about half of a create's
        CPU). This collection walks only what was allocated since the last freeze, once. Reference
        cycles formed later among frozen objects are never collected; the store's objects form none."""
        with self._lock:
            started = time.perf_counter()
            gc.collect()
            gc.freeze()
        log.debug("heap frozen in %.0f ms (%d objects frozen)", (time.perf_counter() - started) * 1000,
                  gc.get_freeze_count())

    def bookmark_version(self, w: Watcher) -> str | None:
        """Current rv if ``w`` has no pending events (safe to bookmark), else None."""
        with self._lock:
            return str(self._rv) if w.queue.empty() else None

    # ---- internals ---------------------------------------------------------------------------

    def _commit(self, rt: ResourceType, type: str, obj: dict, old: dict | None) -> None:
        self._commits += 1
        if self._freeze_every and self._commits % self._freeze_every == 0:
            self.freeze_heap()
        self._rv += 1
        md = obj["metadata"]
        key = (md.get("namespace", ""), md["name"])
        prev = self._objects[rt.key].get(key)
        if prev is not None:
            self._unindex(rt.key, key, prev, None if type == "DELETED" else obj)
            self._json.pop(id(prev), None)
        if type == "DELETED":
            obj = dict(obj)
            obj["metadata"] = md = dict(md)
            md["resourceVersion"] = str(self._rv)
            self._objects[rt.key].pop(key, None)
            names = self._by_ns[rt.key].get(key[0])
            if names is not None:
                names.pop(key[1], None)
                if not names:
                    del self._by_ns[rt.key][key[0]]
            self._uids.pop(md["uid"], None)
            self._applied.pop(md["uid"], None)
        else:
            md["resourceVersion"] = str(self._rv)
            self._objects[rt.key][key] = obj
            self._by_ns[rt.key].setdefault(key[0], {})[key[1]] = obj
            self._index(rt.key, key, obj, prev)
            self._uids[md["uid"]] = (rt.key, key[0], key[1])
        ev = WatchEvent(type, self._rv, rt, obj, old)
        if rt.key == _crds.CRD.key:
            added, removed = self.crds.committed(type, obj)
            for crt in added:
                self._objects.setdefault(crt.key, {})
                self._by_ns.setdefault(crt.key, {})
                self._by_label.setdefault(crt.key, {})
                self._watchers.setdefault(crt.key, set())
            if type == "DELETED":  # watches on the CRD's kinds end (their clients relist and get 404)
                for crt in removed:
                    for w in list(self._watchers.get(crt.key, ())):
                        self._watchers[crt.key].discard(w)
                        w.finish()
        if len(self._history) == self._history.maxlen:
            self._window_start = self._history[0].rv
        self._history.append(ev)
        for w in self._watchers[rt.key]:
            w.offer(ev)
        for fn in self._listeners:
            fn(ev)

    def _index(self, kind: str, key: tuple[str, str], obj: dict, prev: dict | None) -> None:
        """Add ``obj``'s label pairs and owner uids to the indexes (those ``prev`` had are there already)."""
        labels = _labels(obj)
        had = _labels(prev) if prev is not None else {}
        index = self._by_label[kind]
        for pair in labels.items():
            if had.get(pair[0]) != pair[1]:
                index.setdefault(pair, set()).add(key)
        owners = _owner_uids(obj)
        for uid in owners.difference(_owner_uids(prev) if prev is not None else ()):
            self._dependents.setdefault(uid, set()).add((kind, key[0], key[1]))

    def _unindex(self, kind: str, key: tuple[str, str], prev: dict, new: dict | None) -> None:
        """Remove ``prev``'s label pairs and owner uids from the indexes, except those ``new`` keeps."""
        keep = _labels(new) if new is not None else {}
        index = self._by_label[kind]
        for pair in _labels(prev).items():
            if keep.get(pair[0]) != pair[1]:
                keys = index.get(pair)
                if keys is not None:
                    keys.discard(key)
                    if not keys:
                        del index[pair]
        owners = _owner_uids(prev)
        for uid in owners.difference(_owner_uids(new) if new is not None else ()):
            deps = self._dependents.get(uid)
            if deps is not None:
                deps.discard((kind, key[0], key[1]))
                if not deps:
                    del self._dependents[uid]

    def _apply_deletions(self, rt: ResourceType, current: dict, applied: Any, manager: str | None) -> Any:
        """Turn an apply body into a strategic patch that also removes fields this manager dropped."""
        if not isinstance(applied, dict):
            return applied
        uid = current["metadata"]["uid"]
        last = self._applied.get(uid, {}).get(manager or "")
        if last is None and manager == "kubectl":
            ann = (current["metadata"].get("annotations") or {}).get("kubectl.kubernetes.io/last-applied-configuration")
            if ann:
                try:
                    last = json.loads(ann)
                except ValueError:
                    last = None
        self._applied.setdefault(uid, {})[manager or ""] = clone(applied)
        if not isinstance(last, dict):
            return applied
        dels = _patch.removals(last, applied)
        if not dels:
            return applied
        return _patch.combine_removals(dels, applied)

    def _validate_name(self, rt: ResourceType, name: str) -> None:
        if len(name) > 253 or not _NAME_RE.match(name):
            raise ApiError.invalid(rt, name, f'metadata.name: Invalid value: "{name}": a lowercase RFC 1123 '
                                   "subdomain must consist of lower case alphanumeric characters, '-' or '.', "
                                   "and must start and end with an alphanumeric character")

    @staticmethod
    def _defaults(rt: ResourceType, obj: dict) -> None:
        kind = rt.kind
        if kind == "Secret":
            sd = obj.pop("stringData", None)
            if sd:
                import base64
                data = obj.setdefault("data", {}) or {}
                obj["data"] = data
                for k, v in sd.items():
                    data[k] = base64.b64encode(str(v).encode()).decode()
            obj.setdefault("type", "Opaque")
        elif kind == "Service":
            spec = obj.setdefault("spec", {})
            if not spec.get("type"):
                spec["type"] = "ClusterIP"
            if spec["type"] != "ExternalName":
                spec.setdefault("sessionAffinity", "None")
            for p in spec.get("ports") or []:
                p.setdefault("protocol", "TCP")
                if spec["type"] != "ExternalName":
                    p.setdefault("targetPort", p.get("port"))
        elif kind == "Pod":
            obj.setdefault("status", {}).setdefault("phase", "Pending")
            spec = obj.setdefault("spec", {})
            for c in spec.get("containers") or []:
                for p in c.get("ports") or []:
                    p.setdefault("protocol", "TCP")
        elif kind in ("Deployment", "ReplicaSet", "StatefulSet", "DaemonSet"):
            spec = obj.setdefault("spec", {})
            if kind != "DaemonSet":
                spec.setdefault("replicas", 1)
            for c in ((spec.get("template") or {}).get("spec") or {}).get("containers") or []:
                for p in c.get("ports") or []:
                    p.setdefault("protocol", "TCP")
        elif kind == "Namespace":
            obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
            obj["status"] = {"phase": "Active"}
            md = obj["metadata"]
            md.setdefault("labels", {})["kubernetes.io/metadata.name"] = md["name"]
        elif kind == "Event":
            if rt.group == "":
                obj.setdefault("count", 1)


def _labels(obj: dict) -> dict[str, str]:
    """``obj``'s labels with string values (what the label index holds)."""
    labels = obj["metadata"].get("labels")
    if not labels or not isinstance(labels, dict):
        return {}
    return {k: v for k, v in labels.items() if isinstance(k, str) and isinstance(v, str)}


def _owner_uids(obj: dict) -> set[str]:
    return {ref["uid"] for ref in obj["metadata"].get("ownerReferences") or []
            if isinstance(ref, dict) and isinstance(ref.get("uid"), str) and ref["uid"]}


def _md_equal(a: dict, b: dict) -> bool:
    """Metadata equal but for resourceVersion and managedFields timestamps (a change of field ownership,
    e.g. a second server-side apply manager sharing a field, is a change to store)."""
    skip = ("resourceVersion", "managedFields")
    if _ownership(a) != _ownership(b):
        return False
    return {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}


def _ownership(md: dict) -> list[str]:
    return sorted(json.dumps({k: v for k, v in e.items() if k != "time"} if isinstance(e, dict) else e,
                             sort_keys=True) for e in md.get("managedFields") or [])


def _set_managed(obj: dict, manager: str | None, operation: str) -> None:
    if not manager:
        return
    md = obj.setdefault("metadata", {})
    entries = [e for e in md.get("managedFields") or [] if not (e.get("manager") == manager
                                                                and e.get("operation") == operation)]
    entries.append({"manager": manager, "operation": operation, "apiVersion": obj.get("apiVersion", "v1"),
                    "time": now_iso(), "fieldsType": "FieldsV1", "fieldsV1": {}})
    md["managedFields"] = entries
