"""Reading the proxies' Envoy stats on demand: what the dashboard's numbers come from.

Why the control plane reads the Envoys itself (and not Prometheus): every proxy already serves its stats
on the stats-only listener (``<pod IP>:8900``, GET ``/stats/prometheus`` only, see
:func:`trafficmgr.core.bootstrap.stats_listener`), in a cluster and in local mode alike, so the
dashboard works without a Prometheus installed, and its numbers are seconds old instead of a scrape
interval old. Which proxies are read is the caller's choice (the control plane: every live sidecar pod
of the model, whichever replica holds its xDS stream, and the gateways connected to this replica; see
:func:`trafficmgr.core.telemetry.dashboard.stats_targets`).

Cost and bounds: nothing is read until someone asks for the data (``GET /debug/dashboard/data``);
answers are cached ``min_interval`` seconds (concurrent askers share one round); at most ``workers``
requests run at once, each with a ``timeout`` and a body cap of :data:`MAX_BYTES`, and a round lasts at
most ``round_budget`` seconds (in a mesh too big for one round, each round reads first the proxies whose
last read is oldest, so all of them are read over a few rounds); Envoy is asked only for
the few stats used (``usedonly`` and :data:`~trafficmgr.core.telemetry.promtext.STATS_FILTER`). Readings
older than ``window`` seconds are dropped, and so are the readings of proxies no longer asked about.

Safety: the scraper connects only to the addresses it is given (pod IPs from the Kubernetes API, on the
configured stats port): a proxy cannot make the control plane connect elsewhere, and an answer is only
parsed for numbers (a proxy can lie about its own traffic, nothing more).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor, wait

from trafficmgr.core.telemetry.promtext import STATS_FILTER, Reading, parse

log = logging.getLogger(__name__)

DEFAULT_WINDOW_S = 30.0
DEFAULT_MIN_INTERVAL_S = 2.0
DEFAULT_TIMEOUT_S = 2.0
DEFAULT_WORKERS = 8
MAX_BYTES = 8 << 20
STATS_PATH = "/stats/prometheus?usedonly&filter=" + urllib.parse.quote(STATS_FILTER, safe="")

Fetch = Callable[[str, float], str]


def fetch(url: str, timeout: float) -> str:
    """GET ``url`` (no proxy from the environment: the address is a pod's) and return at most
    :data:`MAX_BYTES` of its body as text. ``timeout`` bounds the whole exchange (not only each socket
    operation: a proxy that sends one byte at a time cannot hold a worker longer); raises
    ``TimeoutError`` past it."""
    deadline = time.monotonic() + timeout
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    chunks: list[bytes] = []
    size = 0
    with opener.open(url, timeout=timeout) as resp:
        while size < MAX_BYTES:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no complete answer within {timeout}s")
            chunk = resp.read1(min(65536, MAX_BYTES - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


def stats_url(ip: str, port: int) -> str:
    """The stats URL of a proxy whose stats-only listener is on ``ip:port``."""
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}{STATS_PATH}"


class StatsScraper:
    """Keeps the recent readings of each proxy (keyed by a name, e.g. its node id), newest last."""

    def __init__(self, window: float = DEFAULT_WINDOW_S, min_interval: float = DEFAULT_MIN_INTERVAL_S,
                 timeout: float = DEFAULT_TIMEOUT_S, workers: int = DEFAULT_WORKERS, fetcher: Fetch = fetch,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self.min_interval = min_interval
        self.timeout = timeout
        self.workers = max(1, workers)
        #: The longest one round of reading may take (then the answer goes out with what was read).
        self.round_budget = 2 * timeout + 0.5
        self.fetcher = fetcher
        self.clock = clock
        self.readings: dict[str, collections.deque[tuple[float, Reading]]] = {}
        self.errors: dict[str, str] = {}
        self._attempted: dict[str, float] = {}  # when each target's last read ended (within a round)
        self._last = -1e18
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None

    def collect(self, targets: Mapping[str, str]) -> dict[str, list[tuple[float, Reading]]]:
        """Read every target (name -> stats URL) unless the last round is younger than ``min_interval``
        (then only targets never read before); returns each target's readings within the window (oldest first; a target that never answered has
        none). Thread-safe; blocks at most about ``timeout`` seconds per ``workers`` targets."""
        with self._lock:
            now = self.clock()
            if now - self._last >= self.min_interval:
                self._round(targets, now)
                self._last = self.clock()
            else:  # targets that appeared since the last round get their first reading now
                new = {name: url for name, url in targets.items() if name not in self.readings and name not in self.errors}
                if new:
                    self._round(new, now, forget=False)
            return {name: list(self.readings.get(name, ())) for name in targets}

    def _round(self, targets: Mapping[str, str], now: float, forget: bool = True) -> None:
        if forget:
            for gone in set(self.readings) - set(targets):
                del self.readings[gone]
            for gone in set(self.errors) - set(targets):
                del self.errors[gone]
            for gone in set(self._attempted) - set(targets):
                del self._attempted[gone]
        if not targets:
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="stats-scrape")
        # Proxies read longest ago (or never) first: when a round cannot read them all within its budget,
        # the next round goes on with the others instead of reading the same ones again.
        order = sorted(targets, key=lambda name: self._attempted.get(name, -1e18))
        futures = {name: self._executor.submit(self.fetcher, targets[name], self.timeout) for name in order}
        done, _ = wait(futures.values(), timeout=self.round_budget)
        for name, future in futures.items():
            if future not in done:
                future.cancel()  # not started: dropped; started: its answer is ignored
                continue
            self._attempted[name] = now
            try:
                text = future.result()
            except Exception as exc:  # noqa: BLE001 - one unreachable proxy must not hide the others
                self.errors[name] = f"{type(exc).__name__}: {exc}"[:300]
                log.debug("stats of %s (%s): %s", name, targets[name], exc)
                continue
            self.errors.pop(name, None)
            history = self.readings.setdefault(name, collections.deque())
            history.append((self.clock(), parse(text)))
        for history in self.readings.values():
            while history and history[0][0] < now - self.window:
                history.popleft()

    def close(self) -> None:
        """Stop the worker threads (idempotent)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
