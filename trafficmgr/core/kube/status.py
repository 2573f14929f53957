"""Writes ``status`` subresources that plugins ask for (``trafficmgr_object_status``), asynchronously.

Each ``(path, resource_version, status)`` is written at most once; writes never block the sync loop, and
failures are retried a few times with backoff. A 404 (the object is gone) is not retried.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from trafficmgr.core.contrib import ObjectStatus
from trafficmgr.core.kube.client import KubeClient
from trafficmgr.core.kube.writer import BackgroundWriter


class StatusWriter(BackgroundWriter):
    """Merge-patches ``<path>/status`` from a background thread; ``written`` lists successful writes."""

    thread_name = "status"

    def __init__(self, client: KubeClient | None, max_remembered: int = 50000) -> None:
        super().__init__(client, max_remembered)
        self.written: list[ObjectStatus] = []

    def submit(self, statuses: Iterable[ObjectStatus]) -> None:
        """Queue the writes not already done (or queued) for the same version and content."""
        for st in statuses:
            self.offer((st.path, st.resource_version, json.dumps(st.status, sort_keys=True)), st)

    def write(self, st: ObjectStatus) -> None:
        assert self.client is not None
        self.client.request("PATCH", st.path + "/status", body={"status": st.status},
                            content_type="application/merge-patch+json")
        with self._lock:
            self.written.append(st)
            del self.written[:-1000]

    def describe(self, st: ObjectStatus) -> str:
        return f"the status of {st.path}"
