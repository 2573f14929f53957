"""The dashboard's routes table: rows plugins return from ``trafficmgr_dashboard_routes``, checked."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

log = logging.getLogger(__name__)

KINDS = ("Ingress", "HTTPRoute", "GRPCRoute")
_LISTS = ("hosts", "matches", "backends")


def route_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """One row of the contract (``kind``, ``namespace``, ``name``, ``hosts``, ``matches``, ``backends``,
    ``status``: strings and lists of strings), from what a plugin returned. Raises ``TypeError`` for a
    row that is not a mapping with a ``kind`` and a ``name``; list items are turned into strings."""
    if not isinstance(row, Mapping) or not isinstance(row.get("kind"), str) or not isinstance(row.get("name"), str):
        raise TypeError(f"a dashboard route row must be a dict with str 'kind' and 'name', not {row!r:.200}")
    out: dict[str, Any] = {"kind": row["kind"], "namespace": str(row.get("namespace") or ""), "name": row["name"]}
    for key in _LISTS:
        value = row.get(key) or ()
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            value = (value,)
        out[key] = [str(v) for v in value]
    out["status"] = str(row.get("status") or "")
    return out


def route_rows(rows: Iterable[Any]) -> list[dict[str, Any]]:
    """:func:`route_row` of each row, sorted by kind, namespace and name; a bad row is left out (logged at
    debug level: a plugin bug must not take the whole table down)."""
    out = []
    for row in rows:
        try:
            out.append(route_row(row))
        except TypeError as exc:
            log.debug("dashboard route row left out: %s", exc)
    return sorted(out, key=lambda r: (r["kind"], r["namespace"], r["name"]))
