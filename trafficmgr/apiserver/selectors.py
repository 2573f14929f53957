"""Label and field selector parsing (Kubernetes string syntax)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from .errors import ApiError

LabelMatcher = Callable[[dict], bool]
FieldMatcher = Callable[[dict], bool]

_SET_RE = re.compile(r"^\s*([A-Za-z0-9_./-]+)\s+(in|notin)\s+\((.*)\)\s*$")
_OP_RE = re.compile(r"^\s*([A-Za-z0-9_./-]+)\s*(==|!=|=)\s*([A-Za-z0-9_./-]*)\s*$")
_EXISTS_RE = re.compile(r"^\s*(!?)\s*([A-Za-z0-9_./-]+)\s*$")


def _split_top(s: str) -> list[str]:
    parts: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in s:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p for p in parts if p.strip()]


def _label_requirement(key: str, op: str, values: set[str]) -> LabelMatcher:
    """One requirement of a label selector: ``in``/``notin`` ``values``, ``==``/``!=`` its one value, ``exists`` or ``!exists``."""
    if op == "in":
        return lambda labels: labels.get(key) in values
    if op == "notin":
        return lambda labels: labels.get(key) not in values
    if op in ("==", "!="):
        (value,) = values
        if op == "==":
            return lambda labels: labels.get(key) == value
        return lambda labels: labels.get(key) != value
    if op == "exists":
        return lambda labels: key in labels
    return lambda labels: key not in labels


class LabelSelector:
    """A compiled label selector: call it with a labels dict. ``pinned`` holds the ``(key, value)`` pairs
    every matching object must carry (``k=v``, ``k==v``, ``k in (v)``), which the store answers from its
    label index before checking the whole selector."""

    __slots__ = ("_reqs", "pinned")

    def __init__(self, reqs: list[LabelMatcher], pinned: tuple[tuple[str, str], ...]) -> None:
        self._reqs = reqs
        self.pinned = pinned

    def __call__(self, labels: dict) -> bool:
        return all(r(labels) for r in self._reqs)


def pinned_pairs(matcher: object) -> tuple[tuple[str, str], ...]:
    """The ``(key, value)`` pairs a matcher requires (a :class:`LabelSelector`'s ``pinned``; none for
    any other callable)."""
    return matcher.pinned if isinstance(matcher, LabelSelector) else ()


def parse_label_selector(selector: str | None) -> LabelSelector | None:
    """Compile a label selector string (``=``, ``==``, ``!=``, ``in``, ``notin``, ``key``, ``!key``).

    Returns a predicate over a labels dict, or None for an empty selector. Raises ApiError(400).
    """
    if not selector or not selector.strip():
        return None
    reqs: list[LabelMatcher] = []
    pinned: list[tuple[str, str]] = []
    for part in _split_top(selector):
        m = _SET_RE.match(part)
        if m:
            key, op, vals = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",") if v.strip()}
            reqs.append(_label_requirement(key, op, vals))
            if op == "in" and len(vals) == 1:
                pinned.append((key, next(iter(vals))))
            continue
        m = _OP_RE.match(part)
        if m:
            key, op, val = m.groups()
            reqs.append(_label_requirement(key, "!=" if op == "!=" else "==", {val}))
            if op != "!=":
                pinned.append((key, val))
            continue
        m = _EXISTS_RE.match(part)
        if m:
            neg, key = m.groups()
            reqs.append(_label_requirement(key, "!exists" if neg else "exists", set()))
            continue
        raise ApiError.bad_request(f"unable to parse requirement: {part!r}")
    return LabelSelector(reqs, tuple(pinned))


def match_label_map(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """True if every key/value of an equality selector map is present in ``labels``."""
    return all(labels.get(k) == v for k, v in selector.items())


def match_label_selector_obj(selector: dict | None, labels: dict[str, str]) -> bool:
    """Evaluate a metav1.LabelSelector dict (matchLabels + matchExpressions); empty matches all."""
    if not selector:
        return True
    if not match_label_map(selector.get("matchLabels") or {}, labels):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, vals = expr["key"], expr["operator"], set(expr.get("values") or [])
        if op == "In" and labels.get(key) not in vals:
            return False
        if op == "NotIn" and labels.get(key) in vals:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def field_value(obj: dict, path: str) -> str:
    """Value of a dotted field path rendered as a selector string ('' when missing)."""
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, dict):
            return ""
        cur = cur.get(part)
        if cur is None:
            return ""
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return str(cur)


def _field_requirement(path: str, value: str, *, equal: bool) -> FieldMatcher:
    """One requirement of a field selector: the field at ``path`` equals (or differs from) ``value``."""
    if equal:
        return lambda obj: field_value(obj, path) == value
    return lambda obj: field_value(obj, path) != value


def parse_field_selector(selector: str | None) -> FieldMatcher | None:
    """Compile a field selector (``path=value``, ``path==value``, ``path!=value``, comma-joined)."""
    if not selector or not selector.strip():
        return None
    reqs: list[Callable[[dict], bool]] = []
    for part in selector.split(","):
        part = part.strip()
        if not part:
            continue
        if "!=" in part:
            path, _, val = part.partition("!=")
            reqs.append(_field_requirement(path.strip(), val.strip(), equal=False))
        elif "==" in part or "=" in part:
            path, _, val = part.partition("==") if "==" in part else part.partition("=")
            reqs.append(_field_requirement(path.strip(), val.strip(), equal=True))
        else:
            raise ApiError.bad_request(f"invalid field selector: {part!r}")
    return lambda obj: all(r(obj) for r in reqs)
