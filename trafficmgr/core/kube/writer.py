"""A deduplicating background writer to the Kubernetes API (Events, status subresources).

``offer(key, item)`` queues ``item`` unless ``key`` was offered before (a bounded memory of keys). A
worker thread calls ``write(item)``; failures are retried with backoff (0.5 s doubling, 5 attempts), a
404 (the object is gone) is dropped, and after the last attempt the key is forgotten so that a later
offer may try again. Writing never blocks the caller.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

from trafficmgr.core.kube.client import ApiException, KubeClient

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 5


class BackgroundWriter:
    """Subclasses implement :meth:`write` (and may override :meth:`describe` for log lines)."""

    thread_name = "writer"

    def __init__(self, client: KubeClient | None, max_remembered: int = 50000) -> None:
        self.client = client
        self._seen: OrderedDict[Hashable, None] = OrderedDict()
        self._max = max_remembered
        self._queue: queue.Queue[tuple[Hashable, Any, int] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        if self.client is not None and self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=5)
            self._thread = None

    def offer(self, key: Hashable, item: Any) -> bool:
        """Queue ``item`` unless ``key`` was seen; True when it is new."""
        with self._lock:
            if key in self._seen:
                return False
            self._seen[key] = None
            if len(self._seen) > self._max:
                self._seen.popitem(last=False)
        if self._thread is not None:
            self._queue.put((key, item, 0))
        return True

    def write(self, item: Any) -> None:
        raise NotImplementedError

    def describe(self, item: Any) -> str:
        return repr(item)

    def _run(self) -> None:
        while True:
            entry = self._queue.get()
            if entry is None:
                return
            key, item, attempt = entry
            try:
                self.write(item)
            except ApiException as exc:
                if exc.status == 404:
                    continue
                self._retry(key, item, attempt, exc)
            except Exception as exc:  # noqa: BLE001 - the API may be down: retry a few times
                self._retry(key, item, attempt, exc)

    def _retry(self, key: Hashable, item: Any, attempt: int, exc: BaseException) -> None:
        if attempt + 1 < MAX_ATTEMPTS:
            threading.Timer(0.5 * 2**attempt, self._queue.put, [(key, item, attempt + 1)]).start()
            return
        log.warning("could not write %s: %s", self.describe(item), exc)
        with self._lock:  # a later offer may try again
            self._seen.pop(key, None)
