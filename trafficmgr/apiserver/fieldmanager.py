"""Server-side apply with field ownership (a correct subset of Kubernetes' structured-merge-diff).

Contract of :func:`apply` (``PATCH`` with ``application/apply-patch+yaml`` on a main resource):

- The fields an apply sets are owned by its ``fieldManager`` and recorded in ``metadata.managedFields``
  (``operation: Apply``, ``fieldsType: FieldsV1``, the trie format kube-apiserver uses: ``f:<field>``,
  ``k:{"<merge key>":<value>}`` for items of keyed lists, ``v:<json>`` for set members, ``.`` for a list
  item itself).
- Setting a field another manager owns to a *different* value is a 409 Conflict with kube-apiserver's
  message (``Apply failed with 1 conflict: conflict with "other": .data.a``) and one
  ``FieldManagerConflict`` cause per field; ``force=true`` (``kubectl apply --server-side
  --force-conflicts``) takes the fields over instead. The same value is shared ownership, no conflict.
- A field the manager applied before and omits now is removed from the object, unless another manager
  still owns it.
- The manager ``kubectl`` takes over without conflict the fields the object's
  ``last-applied-configuration`` annotation sets to their live values (moving from ``kubectl apply`` to
  ``kubectl apply --server-side``, as on a cluster).
- ``dryRun`` computes and returns the result without storing it.

Other writes through the HTTP API (create, PUT, merge/strategic/JSON patches, ``scale``) are
``Update`` managers (``fieldManager``, else the User-Agent's product name, as kube-apiserver does): the
fields a write changes (defaults included, e.g. a Service's ``sessionAffinity``) become that manager's
and leave every other manager's set, so an apply that changes a field ``kubectl scale`` or ``kubectl
edit`` set conflicts as on a cluster (``conflict with "kubectl" with subresource "scale" using apps/v1``).

Limits (documented in the README): writes by the server's own controllers (status, allocated
clusterIPs, EndpointSlices) and to ``/status`` are not attributed; managedFields a client sends in an
update replace the stored ones (as on a cluster) but the writer's own entry is recomputed. Lists are keyed by their strategic-merge key alone
(``containers`` by name, Service ``ports`` by port, container ``ports`` by containerPort, ``env`` by
name, ...), ``finalizers`` are a set and other lists are atomic (owned whole). No schema-driven
defaulting or type check beyond what create/update do.
"""

from __future__ import annotations

import contextvars
import copy
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .discovery import ResourceType
from .errors import ApiError
from .patch import PRIMITIVE_MERGE_LISTS, merge_key_for, strategic_merge
from .store import EVENTS_V1, PATCH_APPLY, Store, now_iso

Path = tuple[str, ...]

# metadata fields the server sets or that identify the object: never owned (as in kube-apiserver)
_META_IGNORED = {"name", "namespace", "uid", "resourceVersion", "generation", "creationTimestamp",
                 "deletionTimestamp", "deletionGracePeriodSeconds", "managedFields", "selfLink", "generateName"}


_COMPACT = json.JSONEncoder(separators=(",", ":"), sort_keys=True)  # made once, not per call


def _compact(v: Any) -> str:
    return _COMPACT.encode(v)


def _list_style(field: str, items: list) -> tuple[str, str | None]:
    """("map", key) for keyed lists, ("set", None) for primitive merge lists, ("atomic", None) else."""
    if field in PRIMITIVE_MERGE_LISTS and all(not isinstance(i, (dict, list)) for i in items):
        return "set", None
    key = merge_key_for(field, items)
    if key is not None and items and all(isinstance(i, dict) and key in i for i in items):
        return "map", key
    return "atomic", None


def _walk(value: Any, path: Path, field: str, out: set[Path]) -> None:
    if isinstance(value, dict):
        if not value:
            out.add(path)
        for k, v in value.items():
            _walk(v, path + ("f:" + k,), k, out)
    elif isinstance(value, list):
        style, key = _list_style(field, value)
        if style == "map" and key is not None:
            for item in value:
                p = path + ("k:" + _compact({key: item[key]}),)
                out.add(p)
                for k, v in item.items():
                    _walk(v, p + ("f:" + k,), k, out)
        elif style == "set" and value:
            for item in value:
                out.add(path + ("v:" + _compact(item),))
        else:
            out.add(path)
    else:
        out.add(path)


def field_set(obj: dict, rt: ResourceType) -> set[Path]:
    """The fields ``obj`` (an applied configuration) sets, as paths; identity and server fields excluded,
    and ``status`` when the kind has a status subresource (applies to the main resource do not set it)."""
    out: set[Path] = set()
    for k, v in obj.items():
        if k in ("apiVersion", "kind") or (k == "status" and rt.has_status):
            continue
        if k == "metadata" and isinstance(v, dict):
            for mk, mv in v.items():
                if mk not in _META_IGNORED:
                    _walk(mv, ("f:metadata", "f:" + mk), mk, out)
            continue
        _walk(v, ("f:" + k,), k, out)
    return out


# ---- FieldsV1 ------------------------------------------------------------------------------------

def encode(paths: set[Path]) -> dict:
    """FieldsV1 trie of ``paths`` (a path that also has children is marked with ``"."``)."""
    root: dict = {}
    for p in sorted(paths):
        node = root
        for el in p:
            node = node.setdefault(el, {})
        node["."] = node.get(".", {})
    return _finish(root)


def _finish(node: dict) -> dict:
    children = {k: _finish(v) for k, v in node.items() if k != "."}
    if "." in node and children:
        return {".": {}, **children}
    return children


def decode(fields: Any) -> set[Path]:
    """Paths of a FieldsV1 trie (entries that are not dicts are ignored)."""
    out: set[Path] = set()

    def walk(node: Any, path: Path) -> None:
        if not isinstance(node, dict):
            return
        if path and (not node or "." in node):
            out.add(path)
        for k, v in node.items():
            if k != ".":
                walk(v, path + (k,))

    walk(fields, ())
    return out


def path_string(p: Path) -> str:
    """A path as kube-apiserver prints it: ``.spec.containers[name="app"].image``, ``.metadata.finalizers[="x"]``."""
    out = []
    for el in p:
        kind, _, rest = el.partition(":")
        if kind == "f":
            out.append("." + rest)
        elif kind == "k":
            keys = json.loads(rest)
            out.append("[" + ",".join(f"{k}={_compact(v)}" for k, v in keys.items()) + "]")
        elif kind == "v":
            out.append(f"[={rest}]")
        else:
            out.append(f"[{rest}]")
    return "".join(out)


# ---- values at paths -----------------------------------------------------------------------------

_MISSING = object()


def _step(cur: Any, el: str) -> Any:
    kind, _, rest = el.partition(":")
    if kind == "f":
        return cur.get(rest, _MISSING) if isinstance(cur, dict) else _MISSING
    if not isinstance(cur, list):
        return _MISSING
    if kind == "k":
        keys = json.loads(rest)
        for item in cur:
            if isinstance(item, dict) and all(item.get(k) == v for k, v in keys.items()):
                return item
        return _MISSING
    if kind == "v":
        v = json.loads(rest)
        return v if v in cur else _MISSING
    return _MISSING


def value_at(obj: Any, p: Path) -> Any:
    """The value at ``p`` in ``obj`` (``_MISSING`` when absent). A keyed list item compares as present."""
    cur = obj
    for el in p:
        cur = _step(cur, el)
        if cur is _MISSING:
            return _MISSING
    return cur


def _leaf_equal(a: Any, b: Any) -> bool:
    # a list item or a map present in both is "the same" at its own path: its fields are compared at theirs
    if isinstance(a, dict) and isinstance(b, dict):
        return True
    return a == b


def remove_path(obj: Any, p: Path) -> None:
    """Remove the value at ``p`` from ``obj`` in place (nothing when absent)."""
    parent = value_at(obj, p[:-1])
    if parent is _MISSING:
        return
    kind, _, rest = p[-1].partition(":")
    if kind == "f" and isinstance(parent, dict):
        parent.pop(rest, None)
    elif kind == "k" and isinstance(parent, list):
        keys = json.loads(rest)
        parent[:] = [i for i in parent if not (isinstance(i, dict) and all(i.get(k) == v for k, v in keys.items()))]
    elif kind == "v" and isinstance(parent, list):
        v = json.loads(rest)
        parent[:] = [i for i in parent if i != v]


# ---- apply ---------------------------------------------------------------------------------------

def _entry(manager: str, api_version: str, paths: set[Path]) -> dict:
    return {"manager": manager, "operation": "Apply", "apiVersion": api_version, "time": now_iso(),
            "fieldsType": "FieldsV1", "fieldsV1": encode(paths)}


def _manager_label(e: dict) -> str:
    label = f'conflict with "{e.get("manager", "")}"'
    if e.get("subresource"):
        label += f' with subresource "{e["subresource"]}"'
    if e.get("operation") == "Update":  # the identifier kube-apiserver prints has no timestamp
        label += f' using {e.get("apiVersion", "")}'
    return label


def conflict_error(conflicts: list[tuple[dict, Path]]) -> ApiError:
    """409 as kube-apiserver words it, with one FieldManagerConflict cause per field."""
    causes = [{"reason": "FieldManagerConflict", "message": _manager_label(e), "field": path_string(p)}
              for e, p in conflicts]
    if len(conflicts) == 1:
        e, p = conflicts[0]
        msg = f"Apply failed with 1 conflict: {_manager_label(e)}: {path_string(p)}"
    else:
        by_manager: dict[str, list[str]] = {}
        for e, p in conflicts:
            by_manager.setdefault(_manager_label(e), []).append(path_string(p))
        lines = []
        for label in sorted(by_manager):
            lines.append(label)
            lines.extend(f"- {s}" for s in by_manager[label])
        msg = f"Apply failed with {len(conflicts)} conflicts: " + "\n".join(lines)
    return ApiError(409, "Conflict", msg, {"causes": causes})


def _from_last_applied(live: dict, rt: ResourceType) -> set[Path]:
    """Fields of the client-side apply annotation whose live value is still the applied one: an apply by
    ``kubectl`` takes them over without conflict (moving from ``kubectl apply`` to ``--server-side``)."""
    ann = (live["metadata"].get("annotations") or {}).get("kubectl.kubernetes.io/last-applied-configuration")
    try:
        last = json.loads(ann) if ann else None
    except ValueError:
        return set()
    if not isinstance(last, dict):
        return set()
    return {p for p in field_set(last, rt) if _leaf_equal(value_at(live, p), value_at(last, p))}


def apply(store: Store, rt: ResourceType, name: str, namespace: str | None, body: Any, manager: str | None,
          force: bool = False, dry_run: bool = False) -> tuple[int, dict]:
    """Server-side apply of ``body`` to ``rt``/``name`` as ``manager``; returns (HTTP code, object).

    201 when the object was created, else 200. Raises ``ApiError``: 400 for a body that is not an object
    of this kind or without a field manager, 409 for ownership conflicts (see the module docstring) or a
    stale ``metadata.resourceVersion``, 404 for a missing namespace.
    """
    if not manager:
        raise ApiError.bad_request("PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: "
                                   "is required for apply patch")
    if not isinstance(body, dict):
        raise ApiError.bad_request("apply patch must be an object")
    if rt is EVENTS_V1:  # stored as core/v1 Events: the store's plain apply (no field ownership)
        with updating(None, None):
            return 200, store.patch(rt, name, body, namespace=namespace, patch_type=PATCH_APPLY,
                                    field_manager=manager, dry_run=dry_run)
    if body.get("kind") and body["kind"] != rt.kind:
        raise ApiError.bad_request(f"the kind in the body ({body['kind']}) does not match the URL ({rt.kind})")
    if body.get("apiVersion") and body["apiVersion"] != rt.api_version:
        raise ApiError.bad_request(f"the apiVersion in the body ({body['apiVersion']}) does not match the URL "
                                   f"({rt.api_version})")
    md = body.get("metadata") or {}
    if not isinstance(md, dict):
        raise ApiError.bad_request("metadata must be an object")
    if md.get("name", name) != name:
        raise ApiError.bad_request("the name of the object does not match the name on the URL")
    if rt.namespaced and namespace and md.get("namespace", namespace) != namespace:
        raise ApiError.bad_request("the namespace of the provided object does not match the namespace sent on "
                                   "the request")
    if md.get("managedFields") is not None:  # kube-apiserver's words (e.g. for a get -o yaml file applied)
        raise ApiError.bad_request("metadata.managedFields must be nil")
    applied = copy.deepcopy(body)
    applied["apiVersion"], applied["kind"] = rt.api_version, rt.kind
    amd = applied.setdefault("metadata", {})
    amd["name"] = name
    for k in ("uid", "creationTimestamp", "generation", "deletionTimestamp", "selfLink"):
        amd.pop(k, None)
    if rt.has_status:
        applied.pop("status", None)
    mine = field_set(applied, rt)
    ns = (namespace or "default") if rt.namespaced else ""
    with store.lock:
        try:
            live = store.get_raw(rt, name, ns or None)
        except ApiError as err:
            if err.code != 404:
                raise
            live = None
        if live is None:
            if amd.get("resourceVersion"):
                raise ApiError.not_found(rt, name)
            amd["managedFields"] = [_entry(manager, rt.api_version, mine)]
            with updating(None, None):
                return 201, store.create(applied, namespace=ns or None, resource=rt, dry_run=dry_run)
        entries = [dict(e) for e in live["metadata"].get("managedFields") or [] if isinstance(e, dict)]
        own = [e for e in entries if e.get("manager") == manager and e.get("operation") == "Apply"
               and not e.get("subresource")]
        others = [e for e in entries if not any(e is o for o in own)]
        previous = decode(own[0].get("fieldsV1")) if own else set()
        conflicts: list[tuple[dict, Path]] = []
        for e in others:
            for p in sorted(mine & decode(e.get("fieldsV1"))):
                if not _leaf_equal(value_at(live, p), value_at(applied, p)):
                    conflicts.append((e, p))
        if conflicts and not force and manager == "kubectl":
            allowed = _from_last_applied(live, rt)
            conflicts_left = [(e, p) for e, p in conflicts if p not in allowed]
            if not conflicts_left:
                force = True  # upgrade from client-side apply, as kube-apiserver's lastAppliedManager does
            conflicts = conflicts if force else conflicts_left
        if conflicts and not force:
            raise conflict_error(conflicts)
        taken = {p for _, p in conflicts}
        kept: list[dict] = []
        still_owned: set[Path] = set()
        for e in others:
            if e.get("fieldsType", "FieldsV1") == "FieldsV1" and taken:
                left = decode(e.get("fieldsV1")) - taken
                if not left and e.get("operation") == "Apply":
                    continue  # a manager that lost every field is dropped, as kube-apiserver does
                e["fieldsV1"] = encode(left)
            still_owned |= decode(e.get("fieldsV1"))
            kept.append(e)
        new = copy.deepcopy(live)
        for p in sorted(previous - mine - still_owned, key=len):  # parents first: a dropped list item goes whole
            remove_path(new, p)
        merged = strategic_merge(new, {k: v for k, v in applied.items() if k != "metadata"})
        nmd = merged["metadata"] = strategic_merge(new["metadata"], {k: v for k, v in amd.items()
                                                                     if k != "resourceVersion"})
        if amd.get("resourceVersion"):
            nmd["resourceVersion"] = amd["resourceVersion"]  # a precondition: store.update checks it
        else:
            nmd.pop("resourceVersion", None)
        nmd["managedFields"] = [*kept, _entry(manager, rt.api_version, mine)] if mine else kept
        with updating(None, None):
            return 200, store.update(merged, namespace=ns or None, resource=rt, dry_run=dry_run)


# ---- Update managers -----------------------------------------------------------------------------

# (manager, subresource) of the HTTP write this thread is handling; None: not attributed (controllers,
# applies, in-process callers). Set by the API server around each write (see ``updating``).
_CURRENT: contextvars.ContextVar[tuple[str, str | None] | None] = contextvars.ContextVar("field_manager",
                                                                                          default=None)
MAX_MANAGER_LEN = 128


def manager_for(field_manager: str | None, user_agent: str | None) -> str:
    """The manager of a write: ``fieldManager``, else the User-Agent's product (``kubectl/v1.32`` ->
    ``kubectl``), cut to 128 characters, as kube-apiserver names it. 400 for a ``fieldManager`` over
    128 characters or with control characters."""
    if field_manager:
        if len(field_manager) > MAX_MANAGER_LEN or any(ord(c) < 32 for c in field_manager):
            raise ApiError(400, "BadRequest", 'PatchOptions.meta.k8s.io "" is invalid: fieldManager: Invalid value: '
                           "must be at most 128 printable characters")
        return field_manager
    prefix = (user_agent or "").split("/")[0]
    if not prefix.isprintable():
        prefix = "".join(c for c in prefix if ord(c) >= 32)
    return prefix[:MAX_MANAGER_LEN] or "unknown"


@contextmanager
def updating(manager: str | None, subresource: str | None) -> Iterator[None]:
    """Attribute the store writes inside the block to ``manager`` (None: to nobody)."""
    token = _CURRENT.set((manager, subresource) if manager else None)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def _changed(rt: ResourceType, old: dict | None, new: dict) -> tuple[set[Path], set[Path]]:
    """(paths whose value ``new`` sets differently from ``old``, paths ``old`` had and ``new`` lacks)."""
    after = field_set(new, rt)
    if old is None:
        return after, set()
    before = field_set(old, rt)
    changed = {p for p in after if p not in before or not _leaf_equal(value_at(old, p), value_at(new, p))}
    return changed, before - after


def _norm(entries: list[dict], manager: str) -> list[str]:
    return sorted(_compact({k: v for k, v in e.items() if k != "time"}) for e in entries
                  if not (e.get("manager") == manager and e.get("operation") == "Update"))


def _on_write(rt: ResourceType, new: dict, old: dict | None) -> None:
    """Store admission hook: give the fields this write changes to its Update manager."""
    ctx = _CURRENT.get()
    if ctx is None:
        return
    manager, sub = ctx
    changed, removed = _changed(rt, old, new)
    requested = [e for e in new["metadata"].get("managedFields") or [] if isinstance(e, dict)]
    if old is not None:
        live = [e for e in old["metadata"].get("managedFields") or [] if isinstance(e, dict)]
        # the write's own Update entry (the store adds an empty one) aside, did the client change the
        # list (kubectl's client-side-apply upgrade replaces it with a JSON patch)? Then it is the base.
        if _norm(requested, manager) == _norm(live, manager):
            requested = live
    entries = [dict(e) for e in requested]
    mine: dict | None = None
    kept = []
    for e in entries:
        if e.get("manager") == manager and e.get("operation") == "Update" and e.get("subresource") == sub:
            mine = e
            continue
        if changed or removed:
            left = decode(e.get("fieldsV1")) - changed - removed
            if not left:
                continue  # a manager left with no field is dropped, as kube-apiserver does
            e["fieldsV1"] = encode(left)
        kept.append(e)
    owned = (decode(mine.get("fieldsV1")) - removed if mine else set()) | changed
    if owned:
        entry = {"manager": manager, "operation": "Update", "apiVersion": rt.api_version,
                 "time": now_iso() if changed or mine is None else mine.get("time", now_iso()),
                 "fieldsType": "FieldsV1", "fieldsV1": encode(owned)}
        if sub:
            entry["subresource"] = sub
        kept.append(entry)
    if kept:
        new["metadata"]["managedFields"] = kept
    else:
        new["metadata"].pop("managedFields", None)


def install(store: Store) -> None:
    """Track Update managers on ``store`` (idempotent): call before the store's other admission hooks
    (the API server does, in its constructor), so server allocations are nobody's."""
    if not getattr(store, "_field_manager_installed", False):
        store.add_admission(_on_write)
        store._field_manager_installed = True  # type: ignore[attr-defined]


__all__ = ["apply", "conflict_error", "decode", "encode", "field_set", "install", "manager_for",
           "path_string", "updating"]
