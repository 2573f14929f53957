"""Writes ``status`` subresources that plugins ask for (``trafficmgr_object_status``), asynchronously.

Each ``(path, resource_version, status)`` is written at most once; writes never block the sync loop, and
failures are retried a few times with backoff. A 404 (the object is gone) is not retried.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Iterable

from trafficmgr.core.build.context import ObjectStatus
from trafficmgr.core.kube.client import ApiException, KubeClient

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 5


class StatusWriter:
    """Merge-patches ``<path>/status`` from a background thread; ``written`` lists successful writes."""

    def __init__(self, client: KubeClient | None, max_remembered: int = 50000) -> None:
        self.client = client
        self._seen: OrderedDict[tuple[str, str, str], None] = OrderedDict()
        self._max = max_remembered
        self._queue: queue.Queue[tuple[ObjectStatus, int] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.written: list[ObjectStatus] = []

    def start(self) -> None:
        if self.client is not None and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="status", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=5)
            self._thread = None

    def submit(self, statuses: Iterable[ObjectStatus]) -> None:
        """Queue the writes not already done (or queued) for the same version and content."""
        for st in statuses:
            key = (st.path, st.resource_version, json.dumps(st.status, sort_keys=True))
            with self._lock:
                if key in self._seen:
                    continue
                self._seen[key] = None
                if len(self._seen) > self._max:
                    self._seen.popitem(last=False)
            if self._thread is not None:
                self._queue.put((st, 0))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            st, attempt = item
            try:
                assert self.client is not None
                self.client.request("PATCH", st.path + "/status", body={"status": st.status},
                                    content_type="application/merge-patch+json")
                with self._lock:
                    self.written.append(st)
                    del self.written[:-1000]
            except ApiException as exc:
                if exc.status == 404:
                    continue
                self._retry(st, attempt, exc)
            except Exception as exc:  # noqa: BLE001 - the API may be down: retry a few times
                self._retry(st, attempt, exc)

    def _retry(self, st: ObjectStatus, attempt: int, exc: BaseException) -> None:
        if attempt + 1 < MAX_ATTEMPTS:
            threading.Timer(0.5 * 2**attempt, self._queue.put, [(st, attempt + 1)]).start()
        else:
            log.warning("could not write the status of %s: %s", st.path, exc)
            with self._lock:  # let a later build ask again
                self._seen.pop((st.path, st.resource_version, json.dumps(st.status, sort_keys=True)), None)
