"""What the SotW and delta protocols share on the way out: the stream's snapshot, the push order, writing
a response (counted), and the ACK/NACK bookkeeping (the server's bounded NACK history).

One :class:`Responder` per server, used by both :class:`~trafficmgr.core.xds.sotw.SotwProtocol` and
:class:`~trafficmgr.core.xds.delta.DeltaProtocol`; only the server loop calls it.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import Iterable
from typing import Any

from trafficmgr.core import cache as cache_mod
from trafficmgr.core import metrics
from trafficmgr.core.cache import TYPE_ORDER, Snapshot, SnapshotCache
from trafficmgr.core.xds.responses import Nonces
from trafficmgr.core.xds.streams import MAX_ERROR_DETAIL, Stream, TypeState, clip

log = logging.getLogger("trafficmgr.xds")

#: NACKs kept (``/debug/nacks``). Each holds at most MAX_ERROR_DETAIL characters of the client's error
#: text and NACK_RESOURCES names (plus the count): the history stays under ~3 MB whatever clients send.
NACK_HISTORY = 500
NACK_RESOURCES = 100

#: Bytes written after which the heap is trimmed once the writes pause (:meth:`Responder.write`).
TRIM_AFTER_BYTES = 32 << 20
#: Seconds without a write of that burst before trimming.
TRIM_DELAY = 2.0

#: When a resource of the key type is (re)sent, the resources it references of the value type follow.
DEPENDENT = {cache_mod.CLUSTER: cache_mod.ENDPOINT, cache_mod.LISTENER: cache_mod.ROUTE}


def ordered(types: Iterable[str]) -> list[str]:
    """Type URLs in push order (known types first, in ``TYPE_ORDER``)."""
    present = set(types)
    return [t for t in TYPE_ORDER if t in present] + sorted(present.difference(TYPE_ORDER))


class Responder:
    """Snapshots, nonces, counted writes and the NACK history of one server."""

    def __init__(self, cache: SnapshotCache) -> None:
        self.cache = cache
        self.nonces = Nonces()
        self.nacks: collections.deque[dict[str, Any]] = collections.deque(maxlen=NACK_HISTORY)
        self._sent_metric: dict[tuple[str, str], Any] = {}
        self._written = 0  # bytes written since the last trim
        self._trim: asyncio.TimerHandle | None = None

    def snapshot(self, stream: Stream) -> Snapshot | None:
        """The snapshot of the stream's view (None: the node is unknown, or its view has none yet)."""
        return self.cache.get(stream.view) if stream.view is not None else None

    async def write(self, stream: Stream, st: TypeState, data: bytes) -> None:
        """Send one encoded response of ``st``'s type on ``stream``."""
        key = (st.short, stream.mode)
        counter = self._sent_metric.get(key)
        if counter is None:
            counter = self._sent_metric[key] = metrics.RESPONSES_SENT.labels(*key)
        await stream.context.write(data)
        counter.inc()
        self._written += len(data)
        if self._written >= TRIM_AFTER_BYTES:
            self.trim_soon()

    def trim_soon(self) -> None:
        """Give the heap back :data:`TRIM_DELAY` seconds after the last call (debounced).

        Each write is copied into the stream's gRPC buffers until sent: a wave of streams connecting
        (first answers of megabytes each) or a push to a thousand streams leaves the allocator holding the
        high-water mark, not the live memory (1000 delta streams at 10k services: 955 MB in sync before a
        trim, 392 MB after). Called by the server after a cache change too."""
        if self._trim is not None:
            self._trim.cancel()
        self._trim = asyncio.get_running_loop().call_later(TRIM_DELAY, self._trimmed)

    def _trimmed(self) -> None:
        self._trim = None
        self._written = 0
        release_memory()

    def record_nack(
        self, stream: Stream, st: TypeState, nonce: str, version: str | None, error: str, resources: list[str]
    ) -> None:
        # The error text comes from the client: keep (and log) a bounded prefix of it.
        nack = {"nonce": clip(nonce), "version": version, "error": clip(error, MAX_ERROR_DETAIL),
                "resources": resources[:NACK_RESOURCES], "at": time.time()}
        if len(resources) > NACK_RESOURCES:
            nack["resources_total"] = len(resources)
        st.last_nack = nack
        st.nacked_version = version
        st.nacked_names = st.sent_names
        self.nacks.append(
            {"node_id": stream.node_id, "node_cluster": stream.node_cluster, "view": stream.view,
             "type": st.short, "mode": stream.mode, **nack}
        )
        metrics.NACKS.labels(st.short).inc()
        log.warning(
            "NACK from %r for %s version %s (%d resources): %s",
            clip(stream.node_id), st.short, version, len(resources), clip(error),
        )

    def acked(self, st: TypeState, sent_at: float, clear_nack: bool = True) -> None:
        metrics.PUSH_TO_ACK.labels(st.short).observe(time.monotonic() - sent_at)
        if clear_nack:
            st.last_nack = None
            st.nacked_version = None


def release_memory() -> None:
    """Return the allocator's free memory to the system (glibc ``malloc_trim``; nothing elsewhere)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, loaded once (None elsewhere)."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
