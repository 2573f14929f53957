"""Writes ``status`` subresources that plugins ask for (``trafficmgr_object_status``), asynchronously.

Each ``(path, resource_version, status)`` is written at most once; writes never block the sync loop, and
failures are retried a few times with backoff. A 404 (the object is gone) is not retried.

With several replicas only the leader writes (see :mod:`trafficmgr.core.kube.writer`); a follower holds
the latest status per object path that its last build asked for, and a new leader writes each held one
whose merge patch would change the object as the API shows it now (none the old leader already wrote).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable, Iterable
from typing import Any

from trafficmgr.core.contrib import ObjectStatus
from trafficmgr.core.kube.client import KubeClient
from trafficmgr.core.kube.writer import BackgroundWriter


class StatusWriter(BackgroundWriter):
    """Merge-patches ``<path>/status`` from a background thread; ``written`` lists successful writes."""

    thread_name = "status"

    def __init__(self, client: KubeClient | None, max_remembered: int = 50000,
                 leading: Callable[[], bool] | None = None) -> None:
        super().__init__(client, max_remembered, leading)
        self.written: list[ObjectStatus] = []

    def submit(self, statuses: Iterable[ObjectStatus]) -> None:
        """Queue the writes not already done (or queued) for the same version and content. Not leading,
        hold them instead, and drop held ones for paths this build no longer asks for (the object
        already shows them, as the model sees it)."""
        statuses = list(statuses)
        if not self.leading():
            paths = {st.path for st in statuses}
            with self._lock:
                for slot in [s for s in self._held if s not in paths]:
                    del self._held[slot]
        for st in statuses:
            self.offer((st.path, st.resource_version, json.dumps(st.status, sort_keys=True)), st)

    def write(self, st: ObjectStatus) -> None:
        assert self.client is not None
        self.client.request("PATCH", st.path + "/status", body={"status": st.status},
                            content_type="application/merge-patch+json")
        with self._lock:
            self.written.append(st)
            del self.written[:-1000]

    def slot(self, key: Hashable, item: Any) -> Hashable:
        path: str = item.path
        return path  # a newer status of the same object replaces the held one

    def already_written(self, st: ObjectStatus) -> bool:
        """True when merging ``st.status`` into the object's current status would change nothing."""
        assert self.client is not None
        current = self.client.request("GET", st.path)
        return _merge_is_noop(current.get("status") or {}, st.status)

    def describe(self, st: ObjectStatus) -> str:
        return f"the status of {st.path}"


def _merge_is_noop(current: Any, patch: Any) -> bool:
    """Whether the JSON merge patch ``patch`` leaves ``current`` unchanged (RFC 7386: dicts merge, None
    removes a key, anything else replaces)."""
    if not isinstance(patch, dict):
        return bool(current == patch)
    if not isinstance(current, dict):
        return False
    for key, value in patch.items():
        if value is None:
            if key in current:
                return False
        elif key not in current or not _merge_is_noop(current[key], value):
            return False
    return True
