"""A deduplicating background writer to the Kubernetes API (Events, status subresources).

``offer(key, item)`` queues ``item`` unless ``key`` was offered before (a bounded memory of keys). A
worker thread calls ``write(item)``; failures are retried with backoff (0.5 s doubling, 5 attempts), a
404 (the object is gone) is dropped, and after the last attempt the key is forgotten so that a later
offer may try again. Writing never blocks the caller.

With several control-plane replicas only the leader writes (``leading``, see
:mod:`trafficmgr.core.kube.leader`). A writer that does not lead *holds* what it would have written
(the latest item per :meth:`BackgroundWriter.slot`, bounded) instead of writing it, and checks
``leading()`` again right before each write, so a replica that loses the Lease stops writing at once
(an item it had queued is held, not written). :meth:`BackgroundWriter.resume` (leadership gained)
queues the held items; each is first compared with the API (:meth:`BackgroundWriter.already_written`:
the old leader may have written it before it died), so a new leader writes what was missed, once.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

from trafficmgr.core.kube.client import ApiException, KubeClient

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 5


def _always() -> bool:
    return True


class BackgroundWriter:
    """Subclasses implement :meth:`write` (and may override :meth:`describe` for log lines,
    :meth:`slot` and :meth:`already_written` for leadership changes).

    ``leading``: whether this replica may write now (None: always, a single replica)."""

    thread_name = "writer"

    #: How many items a follower holds at most (the oldest dropped): a new leader checks each with a request.
    max_held = 50000

    def __init__(self, client: KubeClient | None, max_remembered: int = 50000,
                 leading: Callable[[], bool] | None = None) -> None:
        self.client = client
        self.leading: Callable[[], bool] = leading or _always
        self._seen: OrderedDict[Hashable, None] = OrderedDict()
        self._held: OrderedDict[Hashable, tuple[Hashable, Any]] = OrderedDict()
        self._max = max_remembered
        self._queue: queue.Queue[tuple[Hashable, Any, int, bool] | None] = queue.Queue()
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
        """Queue ``item`` (held instead while not leading) unless ``key`` was seen; True when it is new."""
        with self._lock:
            if key in self._seen:
                return False
            self._seen[key] = None
            if len(self._seen) > self._max:
                self._seen.popitem(last=False)
        if not self.leading():
            self.hold(key, item)
        elif self._thread is not None:
            self._queue.put((key, item, 0, False))
        return True

    def hold(self, key: Hashable, item: Any) -> None:
        """Keep ``item`` for :meth:`resume` (the latest per slot; the oldest dropped past the bound)."""
        with self._lock:
            slot = self.slot(key, item)
            self._held[slot] = (key, item)
            self._held.move_to_end(slot)
            if len(self._held) > self.max_held:
                self._held.popitem(last=False)

    @property
    def held(self) -> int:
        """How many items wait for leadership."""
        return len(self._held)

    def resume(self) -> int:
        """Leadership gained: queue every held item, each checked with :meth:`already_written` before it
        is written. Returns how many were queued."""
        with self._lock:
            items = list(self._held.values())
            self._held.clear()
        if self._thread is None:
            return 0
        for key, item in items:
            self._queue.put((key, item, 0, True))
        return len(items)

    def slot(self, key: Hashable, item: Any) -> Hashable:
        """What a newer held item replaces (default: nothing, each key is its own slot)."""
        return key

    def already_written(self, item: Any) -> bool:
        """Whether the API already shows ``item`` (asked only for held items, after a leadership change)."""
        return False

    def write(self, item: Any) -> None:
        raise NotImplementedError

    def describe(self, item: Any) -> str:
        return repr(item)

    def _run(self) -> None:
        while True:
            entry = self._queue.get()
            if entry is None:
                return
            key, item, attempt, check = entry
            if not self.leading():  # lost the Lease since this was queued: never write as a follower
                self.hold(key, item)
                continue
            try:
                if check and self.already_written(item):
                    continue
                self.write(item)
            except ApiException as exc:
                if exc.status == 404:
                    continue
                self._retry(key, item, attempt, check, exc)
            except Exception as exc:  # noqa: BLE001 - the API may be down: retry a few times
                self._retry(key, item, attempt, check, exc)

    def _retry(self, key: Hashable, item: Any, attempt: int, check: bool, exc: BaseException) -> None:
        if attempt + 1 < MAX_ATTEMPTS:
            threading.Timer(0.5 * 2**attempt, self._queue.put, [(key, item, attempt + 1, check)]).start()
            return
        log.warning("could not write %s: %s", self.describe(item), exc)
        with self._lock:  # a later offer may try again
            self._seen.pop(key, None)
