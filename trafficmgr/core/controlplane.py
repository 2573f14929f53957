"""The control plane: Kubernetes watches -> sync loop (assemble IR, build, publish) -> xDS + admin.

One thread (the sync loop) owns the IR and the builder. Watch threads only enqueue events; the loop
applies every queued event and then builds once, so bursts are batched without a fixed debounce delay.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from trafficmgr.core import cache as cache_mod
from trafficmgr.core import gcpause, metrics
from trafficmgr.core.access import DEFAULT_GATEWAY_SERVICE_ACCOUNT, DEFAULT_TRUST_DOMAIN, AccessControl, parse_selector
from trafficmgr.core.admin import proxy_identity, replica_name
from trafficmgr.core.cache import Resource, SnapshotCache
from trafficmgr.core.contrib import WatchKind
from trafficmgr.core.identity.spiffe import spiffe_id
from trafficmgr.core.kube.assemble import CORE_KINDS, Assembler
from trafficmgr.core.kube.client import Kind, KubeClient
from trafficmgr.core.kube.events import EventRecorder
from trafficmgr.core.kube.status import StatusWriter
from trafficmgr.core.kube.watch import Watcher
from trafficmgr.core.labels import LabelSpec
from trafficmgr.core.model import GATEWAY, GATEWAY_CLUSTER, SIDECAR, Endpoint, Model, ObjectRef
from trafficmgr.core.plugins import PluginHost, PluginInfo
from trafficmgr.core.translate.builder import Builder
from trafficmgr.core.translate.scopes import is_sidecar_view, view_of

log = logging.getLogger(__name__)

# How long the sync loop may keep applying queued events before it builds (bounds latency under load).
MAX_BATCH_SECONDS = 0.05
#: List pages (``RELIST`` events) queued for the sync loop at most; a watcher with one more waits.
MAX_QUEUED_PAGES = 4


def _as_kind(kind: Kind | WatchKind) -> Kind:
    return kind if isinstance(kind, Kind) else Kind(kind.kind, kind.api_version, kind.plural, kind.namespaced)


class ControlPlane:
    """Wires plugins, the IR, the builder and the snapshot cache together.

    Without a Kubernetes client it serves whatever :meth:`publish_model` is given (tests, local tools).
    Implements the admin endpoint's ``AdminState`` protocol.
    """

    def __init__(self, plugins: PluginHost, options: argparse.Namespace | None = None, kube: KubeClient | None = None,
                 freeze_gc: bool = False) -> None:
        """``freeze_gc``: the garbage collector is held off from :meth:`start_watches` until the first
        publish (the initial lists, their assembly and the first build make millions of objects that all
        stay: collections meanwhile free nothing and cost seconds at 10k services), then the start-up
        objects move out of its sight and its thresholds rise (process-wide, so only for the process that
        is the control plane: ``serve`` and the benchmark; see :func:`freeze_startup_objects`)."""
        self.freeze_gc = freeze_gc
        self._gc_held = False
        self._gc_lock = threading.Lock()  # also guards _relists_pending
        self._relists_pending = 0  # RELISTs queued and not yet applied (see synced())
        self._pages_applied = threading.Condition(self._gc_lock)  # signalled when one is applied
        self.plugins = plugins
        self.options = options or argparse.Namespace()
        self.kube = kube
        # Several replicas: ``leader`` (a LeaderElector, set by ``serve`` before start_watches) decides who
        # writes; None: this process alone writes (one replica, tests, local tools).
        self.leader: Any = None
        self.events = EventRecorder(kube, plugins.labels, leading=self.leading)
        self.status = StatusWriter(kube, leading=self.leading)
        self.builder = Builder(plugins, self.options, reporter=self.events.warn)
        self.cache = SnapshotCache(self.resolve)
        self.extra_kinds: list[WatchKind] = plugins.collect("trafficmgr_watch_kinds")
        self.assembler = Assembler(plugins.labels, self.extra_kinds, self.events.label_errors, self.events.warn)
        self.access = AccessControl(
            getattr(self.options, "xds_auth", None) or "peer-ip",
            self.assembler.pods,
            self.assembler.pods_with_ip,
            gateway_namespace=getattr(self.options, "xds_gateway_namespace", None) or os.environ.get("POD_NAMESPACE", "default"),
            gateway_selector=parse_selector(getattr(self.options, "xds_gateway_selector", None) or "app=traffic-ingress"),
            gateway_service_account=getattr(self.options, "xds_gateway_service_account", None) or DEFAULT_GATEWAY_SERVICE_ACCOUNT,
            trust_domain=getattr(self.options, "trust_domain", None) or DEFAULT_TRUST_DOMAIN,
            unix_gateway_uids=getattr(self.options, "xds_unix_gateway_uids", None),
            unix_sidecar_uids=getattr(self.options, "xds_unix_sidecar_uids", None),
        )
        self.xds: Any = None
        self.watchers: list[Watcher] = []
        self._queue: queue.Queue[tuple[str, Any, Any] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._published = threading.Event()
        self._stopping = threading.Event()
        self.builds = 0
        self.notified_at = 0.0  # wall clock of the last stream wake-up
        self.last_error = ""
        self._last_build_error = ""
        self.last_cycle: dict[str, float] = {}
        #: The last published model (its tables are live views: copy before reading off the sync thread).
        self.model: Model | None = None
        self._scraper: Any = None  # the dashboard's StatsScraper, made on the first request for its data
        self._scraper_lock = threading.Lock()

    # -- identity -----------------------------------------------------------------------------

    def authorize(self, node_id: str, node_cluster: str, peer: str, identities: tuple[str, ...] = ()) -> None:
        """The xDS server's authorizer: raises PermissionError for a claim the access mode refuses (over a
        Unix socket ``peer`` is the connecting process's credentials, see :mod:`trafficmgr.core.access`)."""
        self.access(node_id, node_cluster, peer, identities)

    def resolve(self, node_id: str, node_cluster: str, peer: str = "") -> str | None:
        """The view of a connecting proxy: gateways by node cluster, sidecars by ``<pod>.<namespace>``:
        ``sidecar``, or the shared view of the pod's ``traffic.scope`` (from the pod's current labels and
        its Namespace's: a view the next build makes is served from then on, the stream waits till then);
        a pod in a namespace with Gateway API consumer routes (as of the last build) gets its consumer view."""
        if node_cluster == GATEWAY_CLUSTER or node_id == GATEWAY_CLUSTER:
            return GATEWAY
        pod, _, namespace = node_id.rpartition(".")
        found = self.assembler.pods.get((namespace, pod)) if pod else None
        if found is not None:
            return view_of(found, self.assembler.namespaces, self.builder.scoped.consumer_namespaces)
        return None

    # -- lifecycle ----------------------------------------------------------------------------

    def watched_kinds(self) -> list[Kind | WatchKind]:
        return [*CORE_KINDS, *self.extra_kinds]

    def leading(self) -> bool:
        """Whether this replica may write to the API now (always without leader election)."""
        return self.leader is None or bool(self.leader.leading())

    def gained_leadership(self) -> None:
        """The elector's callback: write what this replica held back as a follower (the status its last
        build asked for, the Events it saw), each unless the API already shows it."""
        queued = self.events.resume() + self.status.resume()
        log.info("leader: writing %d held status update(s) and Event(s) not already in the API", queued)

    def start_watches(self, namespace: str | None = None) -> None:
        """Start one watcher per core kind and per plugin kind, and the sync loop (then the leader
        election, when ``leader`` is set: the writers run first so a quick win finds them ready)."""
        assert self.kube is not None
        with self._gc_lock:
            if self.freeze_gc and not self._published.is_set() and not self._gc_held:
                gcpause.pause()  # until the first publish (or stop): see __init__
                self._gc_held = True
        self.events.start()
        self.status.start()
        if self.leader is not None:
            self.leader.on_started = self.gained_leadership
            self.leader.start()
        # One watch per distinct (path, selectors): a plugin kind that reads the same objects as the core
        # (mtls reads Services' traffic.allow.* keys) shares the core's list and watch, each event handed
        # to every kind of the group, instead of listing 10k Services twice at start-up.
        groups: dict[tuple[str, str, str], list[Kind | WatchKind]] = {}
        for kind in self.watched_kinds():
            k = _as_kind(kind)
            key = (k.path(namespace), getattr(kind, "field_selector", ""), getattr(kind, "label_selector", ""))
            groups.setdefault(key, []).append(kind)
        for (_, fields, labels), kinds in groups.items():
            w = Watcher(
                self.kube, _as_kind(kinds[0]), self._fan_out(kinds), namespace=namespace,
                field_selector=fields, label_selector=labels,
                hand_pages=True, page_size=getattr(self.options, "list_page_size", None),
            )
            self.watchers.append(w)
            w.start()
        self._thread = threading.Thread(target=self._loop, name="sync", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self.leader is not None:  # first: a stopping replica writes nothing more, and hands the Lease on
            self.leader.stop()
        self._stopping.set()
        self._release_gc()
        if self._scraper is not None:
            self._scraper.close()
        for w in self.watchers:
            w.stop()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.events.stop()
        self.status.stop()

    def _fan_out(self, kinds: list[Kind | WatchKind]) -> Callable[[str, Any, Any], None]:
        """A watcher's sink that queues each event once per kind of its group (see start_watches)."""
        if len(kinds) == 1:
            return lambda etype, _kind, obj: self._enqueue(etype, kinds[0], obj)

        def sink(etype: str, _kind: Any, obj: Any) -> None:
            for kind in kinds:
                self._enqueue(etype, kind, obj)
        return sink

    def _enqueue(self, etype: str, kind: Any, obj: Any) -> None:
        """Queue one event for the sync loop. A list page waits while MAX_QUEUED_PAGES are queued and not
        applied: the watchers decode pages faster than the sync loop applies them, and without this bound a
        100k-pod list would be held decoded in the queue whole (what paging is there to avoid)."""
        if etype == "RELIST":
            with self._pages_applied:
                while self._relists_pending >= MAX_QUEUED_PAGES and not self._stopping.is_set():
                    self._pages_applied.wait(0.5)
                self._relists_pending += 1
        self._queue.put((etype, kind, obj))

    def _loop(self) -> None:
        while not self._stopping.is_set():
            item = self._queue.get()
            if item is None:
                return
            cpu0, wall0, started = time.thread_time(), time.perf_counter(), time.time()
            deadline = time.monotonic() + MAX_BATCH_SECONDS
            while item is not None:
                self._apply(item)
                if time.monotonic() > deadline:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    item = None
            if self.assembler.dirty and self.synced():
                try:
                    self.publish_model(self.assembler.model())
                except Exception as exc:  # noqa: BLE001 - the loop must outlive one bad build
                    self._build_failed(exc)
                    continue
                self._last_build_error = ""
                # What one event batch cost, end to end in this loop (for `trafficmgr bench`).
                self.last_cycle = {
                    "cpu_ms": (time.thread_time() - cpu0) * 1000,
                    "wall_ms": (time.perf_counter() - wall0) * 1000,
                    "serialized": self.builder.stats.total_serialized,
                    "started": started,  # wall clock when the batch's first event was taken
                    "notified": self.notified_at,  # streams were woken (pushes may start)
                    "published": time.time(),
                }

    def _build_failed(self, exc: Exception) -> None:
        """A build raised (a bug, or a plugin failure the host's isolation did not catch): every view keeps
        serving its last published snapshot, the error is logged (with the traceback, once per distinct
        message) and counted in ``trafficmgr_build_errors_total``, and the builder starts afresh, so the
        next change rebuilds everything instead of building on state the failed build left half-updated.
        Without this the sync thread would end: no update would ever be served again."""
        metrics.BUILD_ERRORS.inc()
        message = f"{type(exc).__name__}: {str(exc)[:500]}"
        self.last_error = f"build failed: {message}"
        if message != self._last_build_error:
            self._last_build_error = message
            log.error("build failed; the previous snapshots are still served and the next change rebuilds "
                      "everything (counted in trafficmgr_build_errors_total): %s", message, exc_info=exc)
        self.builder = Builder(self.plugins, self.options, reporter=self.events.warn)
        self.assembler.forget_changes()

    def _apply(self, item: tuple[str, Any, Any]) -> None:
        etype, kind, obj = item
        try:
            self.assembler.apply(etype, kind, obj)
        except Exception:  # one bad object must not stop the loop
            log.exception("failed to apply %s %s event", etype, getattr(kind, "kind", kind))
        finally:
            if etype == "RELIST":
                with self._pages_applied:
                    self._relists_pending -= 1
                    self._pages_applied.notify_all()

    def synced(self) -> bool:
        """Every watcher has listed once and every list handed over is applied: a watcher marks itself
        synced when it hands its list to the queue, and a long batch (a 100k-pod relist) can end at
        ``MAX_BATCH_SECONDS`` with another kind's list still queued; publishing then would serve a
        first snapshot without it (e.g. every endpoint without its pod's labels)."""
        with self._gc_lock:
            if self._relists_pending:
                return False
        return all(w.synced.is_set() for w in self.watchers)

    # -- building -----------------------------------------------------------------------------

    def publish_model(self, model: Model) -> None:
        """Build snapshots from ``model`` and publish every view that passes the consistency gate."""
        snapshots = self.builder.build(model)
        self.builds += 1
        self.model = model
        for view, snap in snapshots.items():
            try:
                self.cache.set_view(view, snap, notify=False)
            except cache_mod.InconsistentSnapshot as exc:
                metrics.SNAPSHOTS_REJECTED.labels(role=metrics.proxy_role(view)).inc()  # bounded: not the view name
                self.last_error = str(exc)
                log.error("snapshot not published, the previous one is still served: %s", exc)
        for view in self.cache.views():
            if view not in snapshots and view != SIDECAR and is_sidecar_view(view):
                self.cache.drop_view(view)  # a scope no pod has any more
        first = not self._published.is_set()
        self._published.set()
        # One wake-up per build for every stream (it also lets nodes that just became known resolve).
        self.cache.notify()
        self.notified_at = time.time()
        self.status.submit(self.plugins.collect("trafficmgr_object_status", what="object status", model=model, options=self.options))
        if first and self.freeze_gc:  # after the first snapshot is out, not before it
            freeze_startup_objects()
            self._release_gc()

    def _release_gc(self) -> None:
        """End the collector hold :meth:`start_watches` began (once; from the sync thread or stop())."""
        with self._gc_lock:
            if not self._gc_held:
                return
            self._gc_held = False
        gcpause.resume()

    def wait_ready(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.ready()[0]:
                return True
            time.sleep(0.02)
        return False

    # -- AdminState ---------------------------------------------------------------------------

    def healthy(self) -> bool:
        return self._thread is None or self._thread.is_alive()

    def ready(self) -> tuple[bool, str]:
        waiting = [w.kind.plural for w in self.watchers if not w.synced.is_set()]
        if waiting:
            return False, "waiting for the initial list of: " + ", ".join(waiting)
        if not self._published.is_set():
            return False, "no snapshot published yet"
        return True, "ok"

    @property
    def replica(self) -> str:
        """This replica's name (``serve --replica-name``, else ``$POD_NAME``, else ``<hostname>-<pid>``): every
        ``proxy-status`` row carries it, so a merged view across replicas shows who holds each stream."""
        return replica_name(getattr(self.options, "replica_name", None))

    def proxy_status(self) -> list[dict[str, Any]]:
        streams = self.xds.status() if self.xds is not None else []
        replica = self.replica
        a = self.access
        gateway = spiffe_id(a.trust_domain, a.gateway_namespace, a.gateway_service_account)
        mtls = bool(getattr(self.options, "mtls", False))  # the mtls plugin's serve --mtls
        for s in streams:
            pod_name, _, namespace = str(s.get("node_id") or "").rpartition(".")
            pod = self.assembler.pods.get((namespace, pod_name)) if is_sidecar_view(s.get("view")) else None
            s.update(proxy_identity(s, pod, a.trust_domain, gateway, mtls))
            s["replica"] = replica
        return streams

    def nacks(self) -> list[dict[str, Any]]:
        return self.xds.nacks() if self.xds is not None else []

    def config_dump(self, node_id: str) -> dict[str, list[Resource]] | None:
        cluster = GATEWAY_CLUSTER if node_id == GATEWAY_CLUSTER else ""
        for st in self.proxy_status():
            if st.get("node_id") == node_id:
                cluster = st.get("node_cluster", cluster)
                break
        view = self.resolve(node_id, cluster)
        snap = self.cache.get(view) if view else None
        if snap is None:
            return None
        return {cache_mod.short_name(t): list(ts.resources.values()) for t, ts in snap.types.items()}

    def plugins_info(self) -> list[PluginInfo]:
        return list(self.plugins.infos.values())

    def labels(self) -> list[LabelSpec]:
        return self.plugins.labels.specs

    def model_copy(self) -> Model | None:
        """A copy of the last published model's tables, safe to read off the sync thread (each table is
        copied in one C-level call, atomic under the GIL; the IR objects in them are immutable)."""
        model = self.model
        if model is None:
            return None

        def copy(table: Any) -> Any:
            return table.copy() if hasattr(table, "copy") else dict(table)

        return Model(services=copy(model.services), endpoints=copy(model.endpoints), pods=copy(model.pods),
                     port_pods=copy(model.port_pods), extra=model.extra, namespaces=copy(model.namespaces))

    def dashboard_data(self) -> dict[str, Any]:
        """The ``/debug/dashboard/data`` document (see :mod:`trafficmgr.core.telemetry`): reads the proxies'
        Envoy stats (at most every few seconds, only while someone asks), and this replica's proxy
        streams, NACKs, recent Warning Events and the plugins' route rows."""
        from trafficmgr.core import telemetry

        model = self.model_copy()
        streams = self.proxy_status()
        port = int(getattr(self.options, "dashboard_stats_port", telemetry.STATS_PORT) or 0)
        window = float(getattr(self.options, "dashboard_window", None) or telemetry.DEFAULT_WINDOW_S)
        with self._scraper_lock:
            if self._scraper is None:
                self._scraper = telemetry.StatsScraper(window=window)
        targets = telemetry.stats_targets(model, streams, port)
        readings = self._scraper.collect({name: t.url for name, t in targets.items()})

        def columns(endpoints: tuple[Endpoint, ...]) -> list[Any]:
            return self.plugins.collect("trafficmgr_dashboard_endpoint_columns", what="dashboard columns",
                                        endpoints=endpoints, model=model, options=self.options)

        services, edges, heads = telemetry.golden_signals(model, targets, readings, self.plugins.labels,
                                                          telemetry.traces_url_of(self.options), columns)
        routes = self.plugins.collect("trafficmgr_dashboard_routes", what="dashboard routes", model=model,
                                      options=self.options) if model is not None else []
        return {"generated": time.time(), "source": telemetry.SOURCE if port else "none", "window_s": window,
                "services": services, "edges": edges, "upstream_columns": heads,
                "proxies": telemetry.proxy_rows(streams, self.nacks()),
                "events": self.events.recent(),
                "routes": telemetry.route_rows(routes)}

    def report(self, ref: ObjectRef, message: str, reason: str) -> None:
        self.events.warn(ref, message, reason)


def kinds_of(plugins: PluginHost) -> Iterable[Kind | WatchKind]:
    """Every kind a control plane with these plugins watches (used by the Helm RBAC test)."""
    return [*CORE_KINDS, *plugins.collect("trafficmgr_watch_kinds")]


GC_THRESHOLDS = (10_000, 20, 100)


def freeze_startup_objects() -> None:
    """After the first build: move every object made so far (the listed cluster, the model, the first
    snapshots: over a million objects at 10k pods) out of the garbage collector's sight. Otherwise each
    later full collection scans them all and stalls every thread, pushes included, for ~150 ms (measured
    by ``trafficmgr bench``: ``gc_pauses_ms``). Reference counting still frees them when they are replaced;
    only reference cycles among them would stay, and the pipeline's data (attrs model, tuples, dicts,
    bytes) has none.

    No collection first: with the collector held off since the watches started, it would scan every one
    of those objects once more (1.3-1.9 s at 10k services x 10 pods, with every thread stalled just when
    the proxies fetch their first config) to free the start-up's few reference cycles (7965 objects of
    1.15 million, measured by ``benchmarks/bench_cold.py``), which now stay allocated instead: a one-time
    cost of about a megabyte."""
    start = time.perf_counter()
    gc.freeze()
    log.info("start-up objects frozen out of the garbage collector in %.1f ms (%d objects)",
             (time.perf_counter() - start) * 1000, gc.get_freeze_count())
    # Fewer, larger young collections, and full ones ten times rarer: with a thousand streams the
    # default thresholds (700, 10, 10) ran ~15 full collections of up to 140 ms in a 4-minute benchmark.
    gc.set_threshold(GC_THRESHOLDS[0], GC_THRESHOLDS[1], GC_THRESHOLDS[2])
