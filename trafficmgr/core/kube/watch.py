"""List (in pages) + watch with resourceVersion, bookmarks, relist on 410, and reconnect with backoff and jitter.

Each :class:`Watcher` runs in its own thread and hands events to one callback (the sync loop's queue).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import attrs

from trafficmgr.core.kube.client import ApiException, Kind, KubeClient

log = logging.getLogger(__name__)

#: Objects per list request by default (``limit``; client-go's pager uses 500). Paging bounds what one answer
#: costs the API server and this process: a 100k-pod list is one ~70 MB answer decoded into ~470 MB of dicts
#: at once without it; with it each page's objects are converted (and dropped) while the next page is made,
#: at most four pages queued (see the control plane). 1000: cold start at 10k services x 10 pods measured
#: 7.8 s at 500 and 6.3 s at 2000 per page (``benchmarks/bench_cold.py``, same sitting; RSS 627 / 638 MB).
LIST_PAGE_SIZE = 1000

#: Seconds between lists of a kind the API server does not serve (404), by default.
NOT_SERVED_RETRY = 30.0

# Event handed to the sink: ("RELIST", kind, [objects]) after a (re)list (with ``hand_pages``: ("RELIST",
# kind, ListPage) per page of it), or (type, kind, object).
Sink = Callable[[str, Kind, Any], None]


@attrs.frozen(slots=True)
class ListPage:
    """One page of a (re)list of a kind. ``first``: the list starts (anything an earlier, unfinished list of
    the kind handed over is superseded); ``last``: it is complete, and objects no page of it listed are gone.
    Pages of one list show the collection at one resourceVersion (the API server's ``continue`` contract)."""

    items: list[dict[str, Any]]
    first: bool
    last: bool


class Watcher(threading.Thread):
    """Keeps one kind in sync. ``synced`` is set after the first successful list, or the first list the
    API server answers 404 (a kind it does not serve: no objects; listed again every ``not_served_retry``
    seconds)."""

    def __init__(
        self,
        client: KubeClient,
        kind: Kind,
        sink: Sink,
        namespace: str | None = None,
        field_selector: str = "",
        label_selector: str = "",
        watch_timeout: float = 300.0,
        max_backoff: float = 10.0,
        not_served_retry: float | None = None,
        page_size: int | None = None,
        hand_pages: bool = False,
    ) -> None:
        """``page_size``: ``limit`` of each list request (None: :data:`LIST_PAGE_SIZE`; 0: one request for
        the whole list);
        ``hand_pages``: each page goes to the sink as it arrives (a :class:`ListPage`), else the whole
        list once it is complete."""
        super().__init__(name=f"watch-{kind.plural}", daemon=True)
        self.client = client
        self.kind = kind
        self.sink = sink
        self.path = kind.path(namespace)
        self.selectors: dict[str, str] = {}
        if field_selector:
            self.selectors["fieldSelector"] = field_selector
        if label_selector:
            self.selectors["labelSelector"] = label_selector
        self.watch_timeout = watch_timeout
        self.max_backoff = max_backoff
        self.synced = threading.Event()
        self._stop = threading.Event()
        self.resource_version = ""
        self.relists = 0
        self._down_since: float | None = None
        #: True while a list answered 404 (the kind is not served: e.g. a CRD not installed).
        self.not_served = False
        self.not_served_retry = NOT_SERVED_RETRY if not_served_retry is None else not_served_retry
        self.page_size = LIST_PAGE_SIZE if page_size is None else page_size
        self.hand_pages = hand_pages
        self.pages = 0  # list requests answered (all lists)

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            try:
                if not self.resource_version:
                    self._list()
                self._watch()
                backoff = 0.2
            except _Expired:
                log.info("%s: resourceVersion %s expired, relisting", self.kind.plural, self.resource_version)
                self.resource_version = ""
            except _NotServed:
                # The API server does not serve this kind (a plugin's CustomResourceDefinition is not
                # installed): it has no objects, which must not keep the control plane from being ready.
                # Listed again every ``not_served_retry`` seconds, so installing the CRD later is noticed.
                self._stop.wait(self.not_served_retry)
            except Exception as exc:  # noqa: BLE001 - any failure means: wait, then reconnect
                if self._stop.is_set():
                    return
                self._unreachable(exc)
                delay = backoff * (0.5 + random.random())
                self._stop.wait(delay)
                backoff = min(backoff * 2, self.max_backoff)

    def _unreachable(self, exc: BaseException) -> None:
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            log.warning("Kubernetes API %s unreachable while watching %s (%s); serving the last good config, retrying",
                        self.client.host, self.kind.plural, _short(exc))
        else:
            log.debug("watch %s still failing: %s", self.kind.plural, _short(exc))

    def _recovered(self) -> None:
        if self._down_since is not None:
            log.warning("Kubernetes API reachable again for %s after %.1fs", self.kind.plural, time.monotonic() - self._down_since)
            self._down_since = None

    def _list(self) -> None:
        """List the kind, a page of ``page_size`` objects per request, each page handed over as it
        arrives (see :class:`ListPage`). A ``continue`` token that expired mid-list (410) starts the list
        again from its first page."""
        token = ""
        first = True
        listed: list[dict[str, Any]] = []
        while True:
            query = dict(self.selectors)
            if self.page_size > 0:
                query["limit"] = str(self.page_size)
            if token:
                query["continue"] = token
            try:
                data = self.client.list(self.path, query)
            except ApiException as exc:
                if exc.status == 410 and token:
                    log.info("%s: list continue token expired after %d page(s); listing again", self.kind.plural,
                             self.pages)
                    raise _Expired() from None
                if exc.status != 404:
                    raise
                self._not_served()
                raise _NotServed() from None
            if self.not_served:
                log.warning("%s: now served by the Kubernetes API", self.kind.plural)
                self.not_served = False
            self._recovered()
            self.pages += 1
            meta = data.get("metadata") or {}
            token = str(meta.get("continue") or "")
            items = data.get("items") or []
            if not token:
                self.resource_version = meta.get("resourceVersion", "")
            if self.hand_pages:
                self.sink("RELIST", self.kind, ListPage(items, first=first, last=not token))
            else:
                listed.extend(items)
                if not token:
                    self.sink("RELIST", self.kind, listed)
            first = False
            if not token:
                break
        self.relists += 1
        self.synced.set()

    def _not_served(self) -> None:
        self._recovered()
        if not self.not_served:
            log.warning("%s: not served by the Kubernetes API (%s; is its CustomResourceDefinition installed?): "
                        "taken as having no objects, listed again every %.0fs", self.kind.plural, self.path,
                        self.not_served_retry)
        self.not_served = True
        self.sink("RELIST", self.kind, ListPage([], first=True, last=True) if self.hand_pages else [])
        self.synced.set()

    def _watch(self) -> None:
        query = {
            **self.selectors,
            "resourceVersion": self.resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(int(self.watch_timeout)),
        }
        try:
            stream = self.client.watch(self.path, query, timeout=self.watch_timeout + 30)
            for event in stream:
                if self._stop.is_set():
                    return
                self._recovered()
                etype = event.get("type")
                obj = event.get("object") or {}
                if etype == "ERROR":
                    if obj.get("code") in (410, 504) or obj.get("reason") in ("Expired", "Gone"):
                        raise _Expired()
                    raise RuntimeError(f"watch error: {obj.get('message', obj)}")
                rv = obj.get("metadata", {}).get("resourceVersion")
                if rv:
                    self.resource_version = rv
                if etype == "BOOKMARK":
                    continue
                if etype in ("ADDED", "MODIFIED", "DELETED"):
                    self.sink(etype, self.kind, obj)
        except ApiException as exc:
            # 410: our version expired; 404: the kind stopped being served (its CRD was deleted). Both:
            # list again at once (the list's 404 handling makes it empty), not "API unreachable".
            if exc.status in (410, 404):
                raise _Expired() from None
            raise


class _Expired(Exception):
    pass


class _NotServed(Exception):
    pass


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]
