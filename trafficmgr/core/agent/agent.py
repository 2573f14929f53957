"""The node agent: one per node, it runs an Envoy sidecar for every enabled pod of its node.

Watches the pods of its node (``spec.nodeName=<node>``) and the workloads (ReplicaSets, Deployments,
StatefulSets, DaemonSets), and resolves ``traffic.envoy.enabled`` exactly like the control plane (the
same :class:`~trafficmgr.core.kube.assemble.Assembler`: the Pod's label wins over its workload's).

One thread reconciles desired against actual state after every batch of watch events, every
``resync_s`` and when a retry is due:

- enabled pod with an IP: start the sidecar in the pod's network namespace, install the iptables rules
  there, then annotate the pod ``traffic.envoy.proxy=<sidecar id>``;
- disabled, terminating or deleted pod: remove the rules first, then stop and remove the sidecar, then
  set the annotation to ``""``;
- enabled pod whose traffic a sidecar could not capture (:mod:`.eligibility`: it runs as the proxy's uid
  or gid, or uses the node's network): like a disabled pod, plus a ``SidecarFailed`` Event saying why;
- a sidecar whose pod is gone (or is a new pod with the same name) is an orphan and is removed.

Sidecars survive agent restarts; a new agent adopts them (found by their labels). Every step is
idempotent; a failed step is retried with exponential backoff and reported as a ``Warning`` Event on the
pod; one bad pod never stops the others, and an unreachable runtime (Docker daemon down) is logged once
and retried until it returns.

The health checks (the agent's ``/healthz`` and ``/readyz``, and the wait for a new sidecar to be LIVE)
are in :mod:`trafficmgr.core.agent.health`.

With mesh identity (``AgentConfig.identity``) every new sidecar gets its workload certificate before
Envoy starts (a failure is a failed start: retried, reported), adopted sidecars are renewed from the
certificate they have, and the certificates are renewed by :mod:`trafficmgr.core.agent.identity`.
"""

from __future__ import annotations

import argparse
import logging
import queue
import threading
import time
from typing import Any

import attrs

from trafficmgr.core.agent import eligibility, iptables
from trafficmgr.core.agent.health import HealthServer as HealthServer
from trafficmgr.core.agent.health import wait_live as wait_live
from trafficmgr.core.agent.identity import IdentityConfig, IdentityManager
from trafficmgr.core.agent.runtime import (
    NetworkNotReady,
    PodNetwork,
    PodRef,
    Runtime,
    RuntimeUnavailable,
    Sidecar,
    SidecarError,
    SidecarSpec,
)
from trafficmgr.core.bootstrap import (
    ADMIN_ADDRESS,
    ADMIN_PORT,
    STATS_PORT,
    XdsIdentityTls,
    add_stats_listener,
    bootstrap,
)
from trafficmgr.core.corelabels import ENVOY_ENABLED
from trafficmgr.core.identity.spiffe import pod_service_account
from trafficmgr.core.kube.assemble import DAEMON_SET, DEPLOYMENT, POD, REPLICA_SET, STATEFUL_SET, Assembler
from trafficmgr.core.kube.client import Kind, KubeClient
from trafficmgr.core.kube.events import EventRecorder
from trafficmgr.core.kube.watch import Watcher
from trafficmgr.core.model import ObjectRef, Pod
from trafficmgr.core.plugins import PluginHost

log = logging.getLogger(__name__)

#: The pod annotation naming its sidecar (``""`` once the sidecar is removed).
ANNOTATION = "traffic.envoy.proxy"
#: Event reasons.
REASON_FAILED = "SidecarFailed"
REASON_WAITING = "SidecarWaiting"
#: A pod whose network stays missing this many attempts (about 15 s with the default backoff) gets an Event.
NETWORK_REPORT_AFTER = 5
SIDECAR_CLUSTER = "sidecar"
WATCHED_KINDS: tuple[Kind, ...] = (POD, REPLICA_SET, DEPLOYMENT, STATEFUL_SET, DAEMON_SET)

Key = tuple[str, str]  # (namespace, pod name)


@attrs.define
class AgentConfig:
    """Agent settings (the ``trafficmgr agent`` options)."""

    node_name: str
    xds_address: str  # host:port or unix:/path
    admin_port: int = ADMIN_PORT  # Envoy admin on 127.0.0.1 inside the pod's network namespace
    stats_port: int = STATS_PORT  # the stats-only listener on the pod IP (0: none)
    proxy_uid: int = 1337
    proxy_port: int = 10000
    inbound_port: int = 15006  # 0: connections to the pod are not captured
    namespace: str | None = None
    delta: bool = False
    resync_s: float = 30.0
    min_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    identity: IdentityConfig | None = None  # mesh identity: workload certificates for every sidecar
    xds_mtls: bool = False  # sidecars present their workload certificate to xDS (serve --xds-auth mtls)


def parse_xds_address(text: str) -> tuple[str, int]:
    """``host:port`` -> (host, port); ``unix:/path`` -> (``unix:/path``, 0). Raises ``ValueError``."""
    text = text.strip()
    if text.startswith("unix:"):
        if not text[len("unix:"):].startswith("/"):
            raise ValueError(f"xDS address {text!r}: a Unix socket must be an absolute path (unix:/path)")
        return text, 0
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"xDS address {text!r} must be HOST:PORT or unix:/path")
    return host, int(port)


def sidecar_bootstrap(pod: PodRef, config: AgentConfig, plugins: PluginHost | None = None,
                      options: argparse.Namespace | None = None, own_netns: bool = True) -> dict[str, Any]:
    """The bootstrap of ``pod``'s sidecar: node id ``<pod>.<namespace>``; Envoy admin on
    ``127.0.0.1:admin_port`` inside the pod's network namespace (only the pod's own processes and the
    node agent reach it); the stats-only listener (``GET /stats/prometheus`` and ``/ready``, see
    :func:`~trafficmgr.core.bootstrap.stats_listener`) on the pod IP at ``stats_port``, scraped by
    Prometheus like the original's PodIP:8900; xDS from the pod IP over TCP (the control plane sees the
    pod as peer), over mutual TLS with the workload identity files when ``config.xds_mtls``
    (:class:`~trafficmgr.core.bootstrap.XdsIdentityTls`); then every plugin's ``trafficmgr_bootstrap`` hook.

    ``own_netns`` False (the ``local`` runtime: every sidecar shares the host's loopback, so one
    127.0.0.1 port cannot serve them all): admin is on the pod IP at ``admin_port`` instead. Local mode
    has no isolation between pods anyway (every process of the user reaches every loopback address)."""
    host, port = parse_xds_address(config.xds_address)
    tcp = not host.startswith("unix:")
    result = bootstrap(
        pod.node_id, SIDECAR_CLUSTER, host, port, admin_port=config.admin_port,
        admin_address=ADMIN_ADDRESS if own_netns else pod.ip,
        delta=config.delta, xds_source_address=pod.ip if tcp else None,
        xds_tls=XdsIdentityTls() if config.xds_mtls else None,
    )
    if config.stats_port:
        add_stats_listener(result, pod.ip, config.stats_port)
    if plugins is not None:
        plugins.call_all("trafficmgr_bootstrap", bootstrap=result, role=SIDECAR_CLUSTER,
                         options=options or argparse.Namespace())
    return result


@attrs.define
class _Retry:
    failures: int = 0
    due: float = 0.0


class Agent:
    """The reconcile loop (see the module docstring). ``start()``, ``stop()``; sidecars are left running
    on stop (a restarted agent adopts them)."""

    def __init__(self, kube: KubeClient, runtime: Runtime, config: AgentConfig,
                 plugins: PluginHost | None = None, options: argparse.Namespace | None = None) -> None:
        self.kube = kube
        self.runtime = runtime
        self.config = config
        self.plugins = plugins or PluginHost.load([])
        self.options = options or argparse.Namespace()
        self.events = EventRecorder(kube)
        self.identity = (IdentityManager(kube, config.identity, self.events, config.proxy_uid if runtime.captures_traffic else None)
                         if config.identity is not None else None)
        self.assembler = Assembler(self.plugins.labels)
        self.raw_pods: dict[Key, dict[str, Any]] = {}
        self.watchers: list[Watcher] = []
        self._queue: queue.Queue[tuple[str, Kind, Any] | None] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._retries: dict[Key, _Retry] = {}
        self._runtime_retry = _Retry()
        self._runtime_down_since: float | None = None
        self._verified: dict[Key, tuple[str, str]] = {}  # pod -> (uid, sidecar id) fully set up
        self._last_resync = 0.0
        self.runtime_ok = False
        self.passes = 0
        self.last_error = ""

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> Agent:
        self.events.start()
        for kind in WATCHED_KINDS:
            selector = f"spec.nodeName={self.config.node_name}" if kind is POD else ""
            w = Watcher(self.kube, kind, self._enqueue, namespace=self.config.namespace, field_selector=selector)
            self.watchers.append(w)
            w.start()
        if self.identity is not None:
            self.identity.start()
        self._thread = threading.Thread(target=self._loop, name="agent", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for w in self.watchers:
            w.stop()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout=15)
        if self.identity is not None:
            self.identity.stop()
        self.events.stop()
        self.runtime.close()

    def synced(self) -> bool:
        return (bool(self.watchers) and all(w.synced.is_set() for w in self.watchers)
                and (self.identity is None or self.identity.synced()))

    def ready(self) -> tuple[bool, str]:
        """(ready, reason): watches synced, the runtime reachable on the last pass and, with mesh
        identity, the trust bundle known."""
        if not self.synced():
            return False, "watches not synced"
        if self.identity is not None and self.identity.bundle() is None:
            return False, f"no trust bundle yet ({self.identity.describe_bundle()})"
        if not self.runtime_ok:
            return False, f"runtime unreachable: {self.last_error}"
        return True, "ok"

    def kick(self) -> None:
        """Reconcile now (tests, signals)."""
        self._queue.put(("KICK", POD, None))

    def _enqueue(self, etype: str, kind: Kind, obj: Any) -> None:
        self._queue.put((etype, kind, obj))

    # -- the loop -----------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            timeout = self._next_wakeup() - time.monotonic()
            try:
                item = self._queue.get(timeout=max(0.01, timeout))
            except queue.Empty:
                item = ("TICK", POD, None)
            while item is not None:
                self._apply(item)
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if item is None or self._stop.is_set():
                return
            if self.synced():
                try:
                    self.reconcile()
                except Exception:  # the loop must survive anything
                    log.exception("reconcile pass failed; retrying")

    def _apply(self, item: tuple[str, Kind, Any]) -> None:
        etype, kind, obj = item
        if etype in ("KICK", "TICK"):
            return
        if kind.kind == "Pod":
            if etype == "RELIST":
                self.raw_pods = {_key(o): o for o in obj}
            elif etype == "DELETED":
                self.raw_pods.pop(_key(obj), None)
            else:
                self.raw_pods[_key(obj)] = obj
        self.assembler.apply(etype, kind, obj)

    def _next_wakeup(self) -> float:
        due = [self._last_resync + self.config.resync_s]
        due += [r.due for r in self._retries.values()]
        if not self.runtime_ok and self._runtime_retry.due:
            due.append(self._runtime_retry.due)
        return min(due)

    def reconcile(self) -> None:
        """One pass over every pod of the node and every sidecar of the runtime."""
        now = time.monotonic()
        if not self.runtime_ok and now < self._runtime_retry.due:
            return
        full = now - self._last_resync >= self.config.resync_s
        if full:
            self._last_resync = now
        try:
            sidecars = self.runtime.list()
        except Exception as exc:  # noqa: BLE001 - the runtime is away: try again later
            self._runtime_failed(exc)
            return
        self._runtime_recovered()
        self.passes += 1
        by_pod: dict[Key, list[Sidecar]] = {}
        for s in sidecars:
            by_pod.setdefault((s.namespace, s.pod), []).append(s)
        for key in sorted(set(self.raw_pods) | set(by_pod)):
            retry = self._retries.get(key)
            if retry is not None and now < retry.due:
                continue
            try:
                self.sync_pod(key, by_pod.get(key, []), verify=full or retry is not None)
            except NetworkNotReady as exc:
                self._retry(key, exc, report=False, reason=REASON_WAITING)
            except RuntimeUnavailable as exc:
                self._runtime_failed(exc)
                return
            except Exception as exc:  # noqa: BLE001 - one bad pod never stops the others
                self._retry(key, exc, report=True)
            else:
                self._retries.pop(key, None)

    def _retry(self, key: Key, exc: BaseException, report: bool, reason: str = REASON_FAILED) -> None:
        retry = self._retries.setdefault(key, _Retry())
        retry.failures += 1
        report = report or retry.failures >= NETWORK_REPORT_AFTER
        delay = min(self.config.max_backoff_s, self.config.min_backoff_s * 2 ** (retry.failures - 1))
        retry.due = time.monotonic() + delay
        message = str(exc) or type(exc).__name__
        self.last_error = message
        raw = self.raw_pods.get(key)
        if report and raw is not None:
            self.events.warn(_pod_ref(raw), f"sidecar: {message}", reason)  # also logs it
        else:
            log.info("pod %s/%s: %s (retrying in %.1fs)", key[0], key[1], message, delay)

    def _runtime_failed(self, exc: BaseException) -> None:
        self.runtime_ok = False
        self.last_error = str(exc)
        r = self._runtime_retry
        r.failures += 1
        delay = min(self.config.max_backoff_s, self.config.min_backoff_s * 2 ** (r.failures - 1))
        r.due = time.monotonic() + delay
        if self._runtime_down_since is None:
            self._runtime_down_since = time.monotonic()
            log.error("sidecar runtime %s unreachable: %s; retrying with backoff", self.runtime.describe(), exc)
        else:
            log.debug("runtime still unreachable: %s", exc)

    def _runtime_recovered(self) -> None:
        if self._runtime_down_since is not None:
            log.warning("sidecar runtime %s reachable again after %.1fs", self.runtime.describe(),
                        time.monotonic() - self._runtime_down_since)
            self._runtime_down_since = None
        self.runtime_ok = True
        self._runtime_retry = _Retry()

    # -- one pod ------------------------------------------------------------------------------

    def wanted(self, key: Key) -> bool:
        """Whether the pod ``key`` should have a sidecar now."""
        raw = self.raw_pods.get(key)
        pod: Pod | None = self.assembler.pods.get(key)
        if raw is None or pod is None or (raw.get("metadata") or {}).get("deletionTimestamp"):
            return False
        if (raw.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            return False
        return bool(pod.labels.value(ENVOY_ENABLED, False))

    def sync_pod(self, key: Key, sidecars: list[Sidecar], verify: bool = True) -> None:
        """Bring one pod to its desired state (idempotent). ``verify`` re-checks the iptables rules of an
        already set-up pod (done on full resyncs and retries, skipped on event-driven passes)."""
        raw = self.raw_pods.get(key)
        uid = ((raw or {}).get("metadata") or {}).get("uid") or ""
        ip = ((raw or {}).get("status") or {}).get("podIP") or ""
        wanted = self.wanted(key)
        # A pod whose traffic a sidecar could not capture (it runs as the proxy's uid or gid, or in the
        # node's network) gets none: treated like a disabled pod, plus a SidecarFailed Event saying why
        # (recorded once; a pod gaining such an ephemeral container loses its sidecar).
        refused = eligibility.refusal(raw, self.config.proxy_uid) if wanted and raw is not None else None
        if refused is not None and raw is not None:
            self.events.warn(_pod_ref(raw), f"sidecar: {refused}", REASON_FAILED)
        if not wanted or refused is not None:
            for s in sidecars:
                self._teardown(s)
            self._verified.pop(key, None)
            if raw is not None and _annotation(raw):
                self._annotate(key, "")
            return
        keep = [s for s in sidecars if s.pod_uid == uid and s.running]
        dead: list[tuple[Sidecar, str]] = []
        for s in sidecars:
            if s not in keep[:1]:
                if s.pod_uid == uid and not s.running:
                    dead.append((s, _one_line(self.runtime.logs(s, 3))))
                log.info("removing sidecar %s of %s/%s (%s)", s.id[:12], key[0], key[1],
                         "stale pod uid" if s.pod_uid != uid else s.state if not s.running else "duplicate")
                self._teardown(s)
        if dead and not keep:
            s, last = dead[0]
            self._verified.pop(key, None)
            raise SidecarError(f"sidecar {s.id[:12]} stopped ({s.status}); last log: {last or '(empty)'}")
        if not ip:
            return  # waits: the pod update with its IP triggers the next pass
        sidecar = keep[0] if keep else None
        if sidecar is not None and not verify and self._verified.get(key) == (uid, sidecar.id) and _annotation(raw) == sidecar.id:
            return
        pod = PodRef(key[1], key[0], uid, ip)
        network = self.runtime.pod_network(pod)
        if sidecar is None:
            sidecar = self._start(pod, network)
            if self.runtime.captures_traffic and not wait_live(network.netns, ADMIN_ADDRESS, self.config.admin_port, LIVE_TIMEOUT):
                # Capture anyway: the pod's traffic must not bypass the sidecar (it is blocked by default).
                log.warning("sidecar %s of %s/%s is not LIVE after %.0fs (control plane unreachable?); capturing anyway",
                            sidecar.id[:12], key[0], key[1], LIVE_TIMEOUT)
        if self.identity is not None and not self.identity.tracked(sidecar.id):
            self.identity.track(sidecar.id, self.runtime.workdir(sidecar), pod, pod_service_account(raw or {}), _pod_ref(raw or {}))
        if self.runtime.captures_traffic:
            run = iptables.netns_runner(network.netns)
            inbound = self.config.inbound_port
            if verify or not iptables.installed(run, bool(inbound)) or self._verified.get(key) != (uid, sidecar.id):
                # The stats port is exempt from the inbound redirect only (Prometheus reaches the stats
                # listener); outbound connections to it are captured like any other port.
                stats = (self.config.stats_port,) if self.config.stats_port else ()
                iptables.install(run, self.config.proxy_port, self.config.proxy_uid, stats, inbound)
        if _annotation(raw) != sidecar.id:
            self._annotate(key, sidecar.id)
        self._verified[key] = (uid, sidecar.id)

    def _start(self, pod: PodRef, network: PodNetwork) -> Sidecar:
        host, _ = parse_xds_address(self.config.xds_address)
        raw = self.raw_pods.get((pod.namespace, pod.name))
        spec = SidecarSpec(
            pod, sidecar_bootstrap(pod, self.config, self.plugins, self.options, own_netns=self.runtime.captures_traffic),
            self.config.proxy_uid,
            xds_socket=host[len("unix:"):] if host.startswith("unix:") else None,
            prepare=self.identity.prepare(pod, pod_service_account(raw or {})) if self.identity is not None else None,
        )
        sidecar = self.runtime.start(spec, network)
        log.info("started sidecar %s for pod %s/%s", sidecar.id[:12], pod.namespace, pod.name)
        return sidecar

    def _teardown(self, sidecar: Sidecar) -> None:
        """Rules first (no traffic is redirected to a dying Envoy), then the sidecar (and its directory,
        identity included; renewals of it stop first)."""
        if self.identity is not None:
            self.identity.forget(sidecar.id)
        if self.runtime.captures_traffic:
            netns = self.runtime.sidecar_netns(sidecar)
            if netns is not None:
                iptables.remove(iptables.netns_runner(netns))
        self.runtime.remove(sidecar)
        log.info("removed sidecar %s of %s/%s", sidecar.id[:12], sidecar.namespace, sidecar.pod)

    def _annotate(self, key: Key, value: str) -> None:
        from trafficmgr.core.kube.client import ApiException

        body = {"metadata": {"annotations": {ANNOTATION: value}}}
        try:
            self.kube.request("PATCH", f"/api/v1/namespaces/{key[0]}/pods/{key[1]}", body=body,
                              content_type="application/merge-patch+json")
        except ApiException as exc:
            if exc.status == 404:
                return  # the pod is gone: the next pass removes its sidecar
            raise


def _key(obj: dict[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return (meta.get("namespace") or "", meta.get("name") or "")


def _one_line(text: str, limit: int = 400) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines())[-limit:]


#: How long a new sidecar may take to get its first config before its pod's traffic is captured anyway.
LIVE_TIMEOUT = 10.0


def _annotation(raw: dict[str, Any] | None) -> str | None:
    return (((raw or {}).get("metadata") or {}).get("annotations") or {}).get(ANNOTATION)


def _pod_ref(raw: dict[str, Any]) -> ObjectRef:
    meta = raw.get("metadata") or {}
    return ObjectRef("Pod", meta.get("namespace") or "", meta.get("name") or "", meta.get("uid") or "",
                     meta.get("resourceVersion") or "")
