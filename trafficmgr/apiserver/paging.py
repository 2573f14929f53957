"""Paged lists: ``limit`` and ``continue`` as kube-apiserver serves them ("Retrieving large results sets in
chunks" in the Kubernetes API concepts).

``limit=N`` (N > 0) answers at most N items; when more remain, ``metadata.continue`` holds an opaque token
and, when the list has no label or field selector, ``metadata.remainingItemCount`` how many. Every page of
one list shows the collection as it was at the first page (its ``metadata.resourceVersion`` is the same on
every page): the first page keeps a :class:`Snapshot`, the sorted matching stored objects (references:
the store never mutates a stored object in place, see ``store.py``), and the token names it and the last
key answered. A later page bisects that key in the snapshot: it costs O(log n + page), not a new sort.

Deviations from kube-apiserver, whose token holds only a key and an etcd revision: a snapshot lives at most
``ttl`` seconds (default 300, about etcd's compaction interval) and there are at most ``max_snapshots``
holding at most ``max_items`` references in all (the oldest go first), so a client that opens lists and
never continues them cannot grow memory without bound, and a snapshot is dropped once its last page is
answered (sending that page's token again is then 410, as a compacted one); a token whose snapshot is gone gets 410 Expired
with kube's message and, as kube, a token in the error's ``metadata.continue`` that continues from the
same key at the latest state (an inconsistent list). A ``continue`` sent with another namespace, label or
field selector than its first page is refused with 400 (kube would apply the new selection to the rest).
"""

from __future__ import annotations

import base64
import binascii
import bisect
import json
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

from .errors import ApiError
from .selectors import parse_field_selector, parse_label_selector

if TYPE_CHECKING:
    from .discovery import ResourceType
    from .store import Store

TTL = 300.0  # seconds a snapshot (and so its continue tokens) stays usable
MAX_SNAPSHOTS = 64  # snapshots kept at once (the oldest is dropped first)
MAX_ITEMS = 1_000_000  # object references all snapshots hold together (8 MB of pointers; the objects they
# keep alive are those replaced or deleted since their first page: at most this many)

CONTINUE_EXPIRED = ("The provided continue parameter is too old to display a consistent list result. You can "
                    "start a new list without the continue parameter.")
INCONSISTENT_CONTINUE = ("The provided continue parameter is too old to display a consistent list result. You can "
                         "start a new list without the continue parameter, or use the continue token in this "
                         "response to retrieve the remainder of the results. Continuing with the provided token "
                         "results in an inconsistent list - objects that were created, modified, or deleted "
                         "between the time the first chunk was returned and now may show up in the list.")
_TOKEN_VERSION = "meta.k8s.io/v1"


def _key(obj: dict) -> tuple[str, str]:
    md = obj["metadata"]
    return md.get("namespace", ""), md["name"]


class ContinueExpired(ApiError):
    """410 Expired for a continue token whose snapshot is gone; the Status carries, in
    ``metadata.continue``, a token that continues from the same key at the latest state."""

    def __init__(self, inconsistent_token: str) -> None:
        super().__init__(410, "Expired", INCONSISTENT_CONTINUE)
        self.inconsistent_token = inconsistent_token

    def status(self) -> dict:
        st = super().status()
        st["metadata"] = {"continue": self.inconsistent_token}
        return st


@attrs.define(eq=False)
class Snapshot:
    """The matching objects of one list as of ``rv``, sorted by (namespace, name); never modified."""

    id: str
    kind: str  # the resource type's key
    scope: tuple[str, str, str]  # namespace, labelSelector, fieldSelector of the first page
    rv: str
    items: list[dict]
    created: float


@attrs.frozen
class Page:
    """One answer: ``items`` (stored objects: not to be mutated), the list ``rv``, ``continue_token`` when
    more remain, ``remaining`` (remainingItemCount) when more remain and the list has no selector."""

    items: list[dict]
    rv: str
    continue_token: str | None = None
    remaining: int | None = None

    def list_metadata(self) -> dict[str, Any]:
        """The ListMeta of this page, in kube-apiserver's field order."""
        md: dict[str, Any] = {"resourceVersion": self.rv}
        if self.continue_token is not None:
            md["continue"] = self.continue_token
        if self.remaining is not None:
            md["remainingItemCount"] = self.remaining
        return md


class Snapshots:
    """The snapshots of open paged lists, bounded in age (``ttl``), count and referenced items. Thread-safe."""

    def __init__(self, ttl: float = TTL, max_snapshots: int = MAX_SNAPSHOTS, max_items: int = MAX_ITEMS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.max_snapshots = max(1, max_snapshots)
        self.max_items = max(1, max_items)
        self.clock = clock
        self._snaps: OrderedDict[str, Snapshot] = OrderedDict()
        self._items = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._snaps)

    @property
    def items_held(self) -> int:
        return self._items

    def new(self, kind: str, scope: tuple[str, str, str], rv: str, items: list[dict]) -> Snapshot:
        """Keep ``items`` (sorted) as a new snapshot, dropping expired and, past the bounds, oldest ones."""
        snap = Snapshot(secrets.token_hex(8), kind, scope, rv, items, self.clock())
        with self._lock:
            self._expire()
            self._snaps[snap.id] = snap
            self._items += len(items)
            while len(self._snaps) > 1 and (len(self._snaps) > self.max_snapshots or self._items > self.max_items):
                self._drop(next(iter(self._snaps)))
        return snap

    def get(self, snap_id: str) -> Snapshot | None:
        """The live snapshot ``snap_id``; None when unknown, expired or dropped."""
        with self._lock:
            self._expire()
            return self._snaps.get(snap_id)

    def drop(self, snap_id: str) -> None:
        """Forget snapshot ``snap_id`` (its list was read to the end); nothing when already gone."""
        with self._lock:
            if snap_id in self._snaps:
                self._drop(snap_id)

    def clear(self) -> None:
        """Drop every snapshot (a compaction: every outstanding continue token expires)."""
        with self._lock:
            self._snaps.clear()
            self._items = 0

    def _expire(self) -> None:
        cutoff = self.clock() - self.ttl
        while self._snaps:
            first = next(iter(self._snaps.values()))
            if first.created > cutoff:
                break
            self._drop(first.id)

    def _drop(self, snap_id: str) -> None:
        snap = self._snaps.pop(snap_id)
        self._items -= len(snap.items)


def encode_token(rv: int, start: tuple[str, str], snap_id: str | None) -> str:
    """An opaque continue token (base64url JSON, as kube's): list ``rv`` (-1: the latest), the last key
    answered, and the snapshot it continues (None: a new one at the latest state)."""
    doc: dict[str, Any] = {"v": _TOKEN_VERSION, "rv": rv, "start": "/".join(k for k in start if k)}
    if snap_id is not None:
        doc["snap"] = snap_id
    return base64.urlsafe_b64encode(json.dumps(doc, separators=(",", ":")).encode()).decode().rstrip("=")


def decode_token(token: str) -> tuple[int, tuple[str, str], str | None]:
    """``(rv, start key, snapshot id or None)`` of a token; ApiError 400 naming the problem."""
    def bad(why: str) -> ApiError:
        return ApiError.bad_request(f"invalid continue token: {why}")

    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        doc = json.loads(raw)
    except (binascii.Error, ValueError) as e:
        raise bad(f"not base64url-encoded JSON ({e})") from None
    if not isinstance(doc, dict):
        raise bad("not a JSON object")
    if doc.get("v") != _TOKEN_VERSION:
        raise bad(f"unrecognized encoded version {doc.get('v')!r}")
    rv, start, snap = doc.get("rv"), doc.get("start"), doc.get("snap")
    if not isinstance(rv, int) or isinstance(rv, bool) or rv == 0 or rv < -1:
        raise bad("incorrect encoded start resourceVersion")
    if not isinstance(start, str) or not start:
        raise bad("encoded start key empty")
    parts = start.split("/")
    if len(parts) > 2 or not all(parts):
        raise bad(f"invalid start key {start!r}")
    if snap is not None and not isinstance(snap, str):
        raise bad("invalid snapshot id")
    key = (parts[0], parts[1]) if len(parts) == 2 else ("", parts[0])
    return rv, key, snap


def parse_limit(value: str | None) -> int:
    """The ``limit`` query parameter; 0 when absent. Zero or negative means no limit, as kube-apiserver
    (it pages only when limit > 0); anything but an integer is 400."""
    if value is None or value == "":
        return 0
    try:
        return int(value)
    except ValueError:
        raise ApiError.bad_request(f'limit: Invalid value: "{value}": must be an integer') from None


def list_page(store: Store, rt: ResourceType, namespace: str | None, label_selector: str | None,
              field_selector: str | None, limit: str | None, continue_: str | None,
              resource_version: str | None = None) -> Page:
    """One page of a list request (the whole list when neither ``limit`` > 0 nor ``continue`` is given).

    Raises ApiError 400 for a bad limit, a malformed token, a token of another list or a resourceVersion
    sent with a token; 410 Expired when the token's snapshot is gone (its ``metadata.continue`` carries
    a token continuing at the latest state)."""
    n = parse_limit(limit)
    labels = parse_label_selector(label_selector)
    fields = parse_field_selector(field_selector)
    ns = namespace if rt.namespaced else None
    scope = (ns or "", label_selector or "", field_selector or "")
    counted = not labels and not fields  # remainingItemCount only without selectors, as kube
    snaps = store.list_snapshots
    if not continue_:
        items, rv = store.list_raw(rt, ns, labels, fields)
        if n <= 0 or len(items) <= n:
            return Page(items, rv)
        return _page(snaps.new(rt.key, scope, rv, items), 0, n, counted)
    rv_num, start, snap_id = decode_token(continue_)
    if resource_version not in (None, "", "0"):
        raise ApiError.bad_request("specifying resource version is not allowed when using continue")
    if snap_id is None or rv_num == -1:  # continue at the latest state (a token from a 410's answer)
        items, rv = store.list_raw(rt, ns, labels, fields)
        snap = snaps.new(rt.key, scope, rv, items)
    else:
        found = snaps.get(snap_id)
        if found is None:
            raise ContinueExpired(encode_token(-1, start, None))
        snap = found
        if snap.kind != rt.key or snap.scope != scope or snap.rv != str(rv_num):
            raise ApiError.bad_request(
                "invalid continue token: it continues a list of another resource, namespace, label selector or "
                "field selector (send the same ones as the first page)")
    at = bisect.bisect_right(snap.items, start, key=_key)
    page = _page(snap, at, n if n > 0 else len(snap.items), counted)
    if page.continue_token is None:
        snaps.drop(snap.id)
    return page


def _page(snap: Snapshot, at: int, n: int, counted: bool) -> Page:
    end = at + n
    items = snap.items[at:end]
    if end >= len(snap.items) or not items:
        return Page(items, snap.rv)
    token = encode_token(int(snap.rv), _key(items[-1]), snap.id)
    return Page(items, snap.rv, token, len(snap.items) - end if counted else None)
