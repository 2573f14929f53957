"""Patch algorithms: JSON patch (RFC 6902), JSON merge patch (RFC 7386), strategic merge patch."""

from __future__ import annotations

import copy
from typing import Any

from .errors import ApiError

MERGE_KEYS: dict[str, str] = {
    "containers": "name", "initContainers": "name", "ephemeralContainers": "name",
    "env": "name", "volumes": "name", "volumeMounts": "mountPath", "volumeDevices": "devicePath",
    "imagePullSecrets": "name", "hostAliases": "ip", "conditions": "type", "ownerReferences": "uid",
    "topologySpreadConstraints": "topologyKey", "resourceClaims": "name", "ephemeralContainerStatuses": "name",
}
PRIMITIVE_MERGE_LISTS = {"finalizers"}


def merge_key_for(field: str, *lists: list | None) -> str | None:
    """Strategic-merge key of list ``field`` (``ports``: containerPort for containers, else port)."""
    if field == "ports":
        for lst in lists:
            for item in lst or []:
                if isinstance(item, dict) and "containerPort" in item:
                    return "containerPort"
        return "port"
    return MERGE_KEYS.get(field)


def strip_directives(value: Any) -> Any:
    """Return ``value`` without ``$``-prefixed patch directive keys (recursively)."""
    if isinstance(value, dict):
        return {k: strip_directives(v) for k, v in value.items() if not k.startswith("$")}
    if isinstance(value, list):
        return [strip_directives(v) for v in value if not (isinstance(v, dict) and v.get("$patch") == "delete")]
    return value


def merge_patch(target: Any, patch: Any) -> Any:
    """Apply an RFC 7386 JSON merge patch; returns a new value (inputs untouched)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = merge_patch(result.get(k), v)
    return result


def _decode_pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ApiError.bad_request(f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc: Any, parts: list[str], path: str) -> Any:
    cur = doc
    for p in parts:
        try:
            cur = cur[int(p)] if isinstance(cur, list) else cur[p]
        except (KeyError, IndexError, ValueError, TypeError):
            raise ApiError(422, "Invalid", f"the server rejected our request due to an error in our request: "
                           f"path {path!r} not found") from None
    return cur


def json_patch(doc: Any, ops: list[dict]) -> Any:
    """Apply an RFC 6902 JSON patch (add/remove/replace/move/copy/test); returns a new document."""
    if not isinstance(ops, list):
        raise ApiError.bad_request("json patch must be a list of operations")
    doc = copy.deepcopy(doc)

    def add(parts: list[str], value: Any, path: str) -> None:
        nonlocal doc
        if not parts:
            doc = value
            return
        parent = _walk(doc, parts[:-1], path)
        last = parts[-1]
        if isinstance(parent, list):
            if last == "-":
                parent.append(value)
            else:
                idx = int(last)
                if idx > len(parent):
                    raise ApiError(422, "Invalid", f"index out of range in {path!r}")
                parent.insert(idx, value)
        elif isinstance(parent, dict):
            parent[last] = value
        else:
            raise ApiError(422, "Invalid", f"cannot add at {path!r}")

    def remove(parts: list[str], path: str) -> Any:
        parent = _walk(doc, parts[:-1], path)
        last = parts[-1]
        try:
            if isinstance(parent, list):
                return parent.pop(int(last))
            return parent.pop(last)
        except (KeyError, IndexError, ValueError, AttributeError):
            raise ApiError(422, "Invalid", f"unable to remove nonexistent key at {path!r}") from None

    for op in ops:
        kind, path = op.get("op"), op.get("path", "")
        parts = _decode_pointer(path)
        if kind == "add":
            add(parts, copy.deepcopy(op.get("value")), path)
        elif kind == "remove":
            remove(parts, path)
        elif kind == "replace":
            if not parts:
                doc = copy.deepcopy(op.get("value"))
                continue
            remove(parts, path)
            add(parts, copy.deepcopy(op.get("value")), path)
        elif kind in ("move", "copy"):
            src = _decode_pointer(op.get("from", ""))
            value = remove(src, op["from"]) if kind == "move" else copy.deepcopy(_walk(doc, src, op["from"]))
            add(parts, value, path)
        elif kind == "test":
            if _walk(doc, parts, path) != op.get("value"):
                raise ApiError(422, "Invalid", f"test operation failed at {path!r}")
        else:
            raise ApiError.bad_request(f"unknown json patch op {kind!r}")
    return doc


def _merge_list(orig: list | None, patch: list, field: str) -> list:
    orig = list(orig or [])
    if any(isinstance(i, dict) and i.get("$patch") == "replace" for i in patch):
        return [strip_directives(i) for i in patch if not (isinstance(i, dict) and "$patch" in i)]
    if field in PRIMITIVE_MERGE_LISTS:
        return orig + [v for v in patch if v not in orig]
    key = merge_key_for(field, orig, patch)
    if key is None or not all(isinstance(i, dict) for i in patch) or not all(isinstance(i, dict) for i in orig):
        return strip_directives(patch)
    result = list(orig)
    for item in patch:
        if item.get("$patch") == "delete":
            result = [o for o in result if o.get(key) != item.get(key)]
            continue
        for idx, o in enumerate(result):
            if key in item and o.get(key) == item.get(key):
                result[idx] = strategic_merge(o, item)
                break
        else:
            result.append(strip_directives(item))
    return result


def _order(items: list, order: list, field: str) -> list:
    key = merge_key_for(field, items)
    if key is None:
        pos = {repr(v): i for i, v in enumerate(order)}
        return sorted(items, key=lambda v: pos.get(repr(v), len(pos)))
    by_key: dict[Any, int] = {o.get(key): i for i, o in enumerate(order) if isinstance(o, dict)}
    return sorted(items, key=lambda v: by_key.get(v.get(key) if isinstance(v, dict) else None, len(by_key)))


def strategic_merge(original: Any, patch: Any) -> Any:
    """Apply a strategic merge patch; lists merge by well-known keys (containers by name, ...).

    Supports ``null`` deletion, ``$patch: replace|delete|merge``, ``$setElementOrder/<f>``,
    ``$deleteFromPrimitiveList/<f>`` and ``$retainKeys``. Returns a new value.
    """
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    directive = patch.get("$patch")
    if directive == "replace":
        return strip_directives(patch)
    if directive == "delete":
        return None
    result = dict(original) if isinstance(original, dict) else {}
    orders: dict[str, list] = {}
    deletes: dict[str, list] = {}
    for k, v in patch.items():
        if k.startswith("$setElementOrder/"):
            orders[k.split("/", 1)[1]] = v
            continue
        if k.startswith("$deleteFromPrimitiveList/"):
            deletes[k.split("/", 1)[1]] = v
            continue
        if k.startswith("$"):
            continue
        if v is None:
            result.pop(k, None)
        elif isinstance(v, dict):
            merged = strategic_merge(result.get(k), v)
            if merged is None:
                result.pop(k, None)
            else:
                result[k] = merged
        elif isinstance(v, list):
            result[k] = _merge_list(result.get(k), v, k)
        else:
            result[k] = v
    for k, vals in deletes.items():
        if isinstance(result.get(k), list):
            result[k] = [v for v in result[k] if v not in vals]
    for k, order in orders.items():
        if isinstance(result.get(k), list):
            result[k] = _order(result[k], order, k)
    retain = patch.get("$retainKeys")
    if isinstance(retain, list):
        result = {k: v for k, v in result.items() if k in retain or k not in (original or {})}
    return result


def removals(last: dict, new: dict) -> dict:
    """Strategic patch deleting what ``last`` had and ``new`` lacks (null keys, ``$patch: delete`` items)."""
    out: dict = {}
    for k, v in last.items():
        if k not in new and not isinstance(v, (dict, list)):
            out[k] = None
            continue
        nv = new.get(k, type(v)())
        if isinstance(v, dict) and isinstance(nv, dict):
            sub = removals(v, nv)
            if sub:
                out[k] = sub
        elif isinstance(v, list) and isinstance(nv, list):
            key = merge_key_for(k, v, nv)
            if key is None or not all(isinstance(i, dict) for i in v + nv):
                if k not in new:
                    out[k] = None
                continue
            items = []
            new_by_key = {i.get(key): i for i in nv}
            for item in v:
                kv = item.get(key)
                if kv not in new_by_key:
                    items.append({key: kv, "$patch": "delete"})
                else:
                    sub = removals(item, new_by_key[kv])
                    if sub:
                        items.append({key: kv, **sub})
            if items:
                out[k] = items
    return out


def combine_removals(dels: dict, applied: dict) -> dict:
    """Merge a ``removals`` patch into a full applied object, yielding one strategic patch."""
    out = dict(applied)
    for k, v in dels.items():
        if v is None or k not in out:
            out[k] = v
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = combine_removals(v, out[k])
        elif isinstance(v, list) and isinstance(out.get(k), list):
            key = merge_key_for(k, v, out[k])
            by_key = {i.get(key): i for i in v if isinstance(i, dict)}
            merged = []
            for item in out[k]:
                d = by_key.get(item.get(key)) if isinstance(item, dict) else None
                if d is not None and d.get("$patch") != "delete":
                    sub = {kk: vv for kk, vv in d.items() if kk != key}
                    item = combine_removals(sub, item)
                merged.append(item)
            merged.extend(i for i in v if isinstance(i, dict) and i.get("$patch") == "delete")
            out[k] = merged
    return out
