"""The dashboard's plugin columns of upstream rows: what plugins return from
``trafficmgr_dashboard_endpoint_columns``, checked and merged into the rows.

The core knows no column by name (the ``lb`` plugin's ``weight`` is one): a column is a ``name`` (the
rows' key), a ``title`` and one value per row. A bad column is left out whole, logged once per name and
reason (a bounded memory: names come from plugins).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from trafficmgr.core.once import Seen

log = logging.getLogger(__name__)

#: Keys the core sets on every upstream row: no column may take them.
CORE_KEYS = frozenset({"pod", "address", "rps", "error_rate"})
NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
MAX_TEXT = 200
MAX_TITLE = 40
_logged = Seen(256)


def _value(v: Any) -> int | float | str | None:
    if v is None or isinstance(v, (int, float)) and not isinstance(v, bool):
        return v
    if isinstance(v, str):
        return v[:MAX_TEXT]
    raise TypeError(f"a value must be an int, a float, a str or None, not {type(v).__name__}")


def _check(column: Any, rows: int, taken: set[str]) -> dict[str, Any]:
    """The column as ``{"name", "title", "values"}``; ValueError/TypeError saying what is wrong."""
    if not isinstance(column, Mapping):
        raise TypeError(f"a column must be a dict, not {type(column).__name__}")
    name = column.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ValueError(f"name {name!r:.60} must match {NAME.pattern}")
    if name in CORE_KEYS:
        raise ValueError(f"name {name!r} is one of the core's keys ({', '.join(sorted(CORE_KEYS))})")
    if name in taken:
        raise ValueError(f"name {name!r} is already an earlier plugin's column")
    title = column.get("title", name)
    if not isinstance(title, str) or not title:
        raise TypeError("title must be a non-empty str")
    values = column.get("values")
    if not isinstance(values, (list, tuple)):
        raise TypeError(f"values must be a list, not {type(values).__name__}")
    if len(values) != rows:
        raise ValueError(f"values must be a list of {rows} (one per endpoint), not {len(values)}")
    return {"name": name, "title": title[:MAX_TITLE], "values": [_value(v) for v in values]}


def add_columns(rows: Sequence[dict[str, Any]], columns: Iterable[Any]) -> list[dict[str, str]]:
    """Put each good column's values into ``rows`` (the upstream rows, in the order the hook's
    ``endpoints`` had) under its name; returns the columns' heads ``[{"name", "title"}]`` in order. A bad
    column changes no row."""
    heads: list[dict[str, str]] = []
    taken: set[str] = set()
    checked = []
    for column in columns:
        try:
            good = _check(column, len(rows), taken)
        except (TypeError, ValueError) as exc:
            name = column.get("name") if isinstance(column, Mapping) else None
            if _logged.first((str(name)[:60], str(exc))):
                log.warning("dashboard column %r left out: %s", str(name)[:60], exc)
            continue
        taken.add(good["name"])
        checked.append(good)
        heads.append({"name": good["name"], "title": good["title"]})
    for good in checked:
        for row, value in zip(rows, good["values"]):
            row[good["name"]] = value
    return heads
