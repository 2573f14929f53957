"""Built-in controllers: EndpointSlices + Service clusterIPs, and optional Deployment/ReplicaSet/Pod
(rolling updates, revisions, status and Events as kube-controller-manager's; see the workloads section).

Controllers run on one worker thread fed by store events; bursts of writes are coalesced, so a
slice reflects a change within milliseconds (``Controllers.wait_idle`` waits for quiescence).

A pod event costs the same however many Services and pods exist: it recomputes the EndpointSlices only
of the Services whose selector matches the pod (before or after the change), found through an index of
Service selectors by one of their ``(key, value)`` pairs; a ReplicaSet finds its pods through an index by
controller uid, a Deployment its ReplicaSets through the store's owner index.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import ipaddress
import json
import logging
import queue
import threading
import time
from typing import Any, Protocol

from .discovery import BY_KEY, ResourceType
from .errors import ApiError
from .selectors import LabelSelector, match_label_map, match_label_selector_obj
from .store import Store, WatchEvent, now_iso, random_suffix

log = logging.getLogger(__name__)

MANAGED_BY = "endpointslice-controller.k8s.io"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"

PODS, SERVICES, SLICES = BY_KEY["pods"], BY_KEY["services"], BY_KEY["endpointslices.discovery.k8s.io"]
ENDPOINTS = BY_KEY["endpoints"]
SKIP_MIRROR_LABEL = "endpointslice.kubernetes.io/skip-mirror"
DEPLOYMENTS, REPLICASETS = BY_KEY["deployments.apps"], BY_KEY["replicasets.apps"]
EVENTS = BY_KEY["events"]


class PodRuntime(Protocol):
    """Hook that "runs" controller-created pods (local mode may start processes).

    A runtime may also have ``log_file(pod, container) -> str | None``: the file holding that container's
    output, which the API server serves as ``pods/<name>/log`` (``kubectl logs``; see :mod:`.podlogs`).
    """

    def start(self, pod: dict) -> dict | None:
        """Called after a pod is created; return a ``status`` dict to store, or None to leave it Pending."""

    def stop(self, pod: dict) -> None:
        """Called after a controller-owned pod is deleted."""


class FakePodRuntime:
    """Default runtime: every pod is immediately Running and Ready with an IP from 10.244.0.0/16."""

    def __init__(self, node_name: str = "trafficmgr-node") -> None:
        self.node_name = node_name
        self._next = 2

    def start(self, pod: dict) -> dict | None:
        n, self._next = self._next, self._next + 1
        ip = str(ipaddress.IPv4Address("10.244.0.0") + n)
        now = now_iso()
        containers = (pod.get("spec") or {}).get("containers") or []
        return {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "10.0.0.1", "startTime": now,
            "conditions": [{"type": t, "status": "True", "lastTransitionTime": now}
                           for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")],
            "containerStatuses": [{"name": c.get("name"), "image": c.get("image", ""), "ready": True,
                                   "started": True, "restartCount": 0,
                                   "state": {"running": {"startedAt": now}}} for c in containers],
        }

    def stop(self, pod: dict) -> None:
        return None


def pod_ready(pod: dict) -> bool:
    """True when the pod's ``Ready`` condition is ``True``."""
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return c.get("status") == "True"
    return False


def _short_hash(data: object, n: int) -> str:
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).digest()
    return "".join(_ALPHABET[b % len(_ALPHABET)] for b in digest[:n])


def _owner_ref(obj: dict, rt: ResourceType) -> dict:
    return {"apiVersion": rt.api_version, "kind": rt.kind, "name": obj["metadata"]["name"],
            "uid": obj["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}


def _controller_uid(obj: dict) -> str | None:
    for ref in obj["metadata"].get("ownerReferences") or []:
        if ref.get("controller"):
            return ref.get("uid")
    return None


class ClusterIPAllocator:
    """Admission hook: sequential Service clusterIPs from ``cidr``; ``None``/ExternalName untouched."""

    def __init__(self, store: Store, cidr: str = "10.96.0.0/16") -> None:
        self.net = ipaddress.IPv4Network(cidr)
        self.store = store
        self._next = 1
        self._used: set[str] | None = None

    def __call__(self, rt: ResourceType, obj: dict, old: dict | None) -> None:
        if rt is not SERVICES:
            return
        spec = obj.setdefault("spec", {})
        if spec.get("type") == "ExternalName":
            return
        if not spec.get("clusterIP") and old is not None and (old.get("spec") or {}).get("clusterIP"):
            spec["clusterIP"] = old["spec"]["clusterIP"]
        if not spec.get("clusterIP"):
            spec["clusterIP"] = self._allocate()
        spec.setdefault("clusterIPs", [spec["clusterIP"]])
        if spec["clusterIP"] != "None":
            spec.setdefault("ipFamilies", ["IPv4"])
            spec.setdefault("ipFamilyPolicy", "SingleStack")
        spec.setdefault("internalTrafficPolicy", "Cluster")
        if spec.get("type") in ("NodePort", "LoadBalancer"):
            old_ports = {(p.get("port"), p.get("protocol")): p.get("nodePort")
                         for p in ((old or {}).get("spec") or {}).get("ports") or []}
            for p in spec.get("ports") or []:
                if not p.get("nodePort"):
                    p["nodePort"] = old_ports.get((p.get("port"), p.get("protocol"))) or self._node_port()

    def _node_port(self) -> int:
        self._next_node_port = getattr(self, "_next_node_port", 30000) + 1
        return 30000 + (self._next_node_port - 30001) % 2768

    def _allocate(self) -> str:
        if self._used is None:
            items, _ = self.store.list_raw(SERVICES, None)
            self._used = {(s.get("spec") or {}).get("clusterIP", "") for s in items}
        while True:
            if self._next >= self.net.num_addresses - 1:
                raise ApiError(500, "InternalError", "clusterIP range exhausted")
            ip = str(self.net.network_address + self._next)
            self._next += 1
            if ip not in self._used:
                self._used.add(ip)
                return ip


class Controllers:
    """Runs the enabled controllers on a worker thread fed by store events.

    ``endpointslices``: EndpointSlice controller and clusterIP allocation (default on).
    ``workloads``: Deployment -> ReplicaSet -> Pod controllers using ``pod_runtime``
    (default ``FakePodRuntime``). ``service_cidr``: where Service clusterIPs come from.
    ``batch_interval``: seconds between the starts of two batches while writes keep coming (a write after
    a quiet interval is handled at once; what arrives within the interval is handled together).
    """

    def __init__(self, store: Store, endpointslices: bool = True, workloads: bool = False,
                 pod_runtime: PodRuntime | None = None, service_cidr: str = "10.96.0.0/16",
                 batch_interval: float = 0.02) -> None:
        self.store = store
        self.batch_interval = batch_interval
        self._last_batch = 0.0
        self.service_cidr = service_cidr
        self.endpointslices = endpointslices
        self.workloads = workloads
        self.runtime: PodRuntime = pod_runtime or FakePodRuntime()
        self._queue: queue.SimpleQueue[WatchEvent | None] = queue.SimpleQueue()
        self._pending = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._allocator: ClusterIPAllocator | None = None
        self._services: dict[str, dict[str, dict]] = {}
        self._pods: dict[str, dict[str, dict]] = {}
        self._label_index: dict[tuple[str, str, str], set[str]] = {}
        # Services by one pair of their selector (a pod carrying no such pair matches none of them): the
        # pair is the one fewest Services' selectors had when the Service was indexed, so a pair many
        # selectors share (version=v1) is not where a Service with a rarer pair (app=x) waits.
        self._selector_index: dict[tuple[str, str, str], set[str]] = {}
        self._selector_pair: dict[tuple[str, str], tuple[str, str, str]] = {}  # (ns, service) -> its pair
        self._pair_uses: dict[tuple[str, str, str], int] = {}  # (ns, key, value) -> selectors having it
        self._selector_pairs: dict[str, dict[str, list[tuple[str, str, str]]]] = {}  # ns -> service -> pairs
        self._pods_by_owner: dict[str, dict[tuple[str, str], None]] = {}  # controller uid -> {(ns, pod)}
        self._deadlines: dict[tuple[str, str], float] = {}  # rollouts in progress: when to check progress
        self._suffixes: dict[tuple[str, tuple], str] = {}  # (service uid, ports) -> slice name hash

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None or not (self.endpointslices or self.workloads):
            return
        if self.endpointslices:
            self._allocator = ClusterIPAllocator(self.store, self.service_cidr)
            self.store.add_admission(self._allocator)
        with self.store.lock:
            self.store.subscribe(self._on_event)
            for rt in (SERVICES, PODS, DEPLOYMENTS, REPLICASETS):
                items, _ = self.store.list_raw(rt, None)
                for obj in items:
                    self._on_event(WatchEvent("ADDED", 0, rt, obj, None))
        self._thread = threading.Thread(target=self._run, name="apiserver-controllers", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self.store.unsubscribe(self._on_event)
        if self._allocator is not None and self._allocator in self.store._admission:
            self.store._admission.remove(self._allocator)
        self._queue.put(None)
        self._thread.join(5)
        self._thread = None
        self._services.clear()
        self._pods.clear()
        self._label_index.clear()
        self._selector_index.clear()
        self._selector_pair.clear()
        self._pair_uses.clear()
        self._selector_pairs.clear()
        self._pods_by_owner.clear()
        self._deadlines.clear()

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Block until every queued event has been processed; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout)

    def _on_event(self, ev: WatchEvent) -> None:
        if ev.rt not in (SERVICES, PODS, DEPLOYMENTS, REPLICASETS):
            return
        with self._cond:
            self._pending += 1
        self._queue.put(ev)

    def _run(self) -> None:
        while True:
            try:
                ev = self._queue.get(timeout=self._next_deadline())
            except queue.Empty:
                self._check_deadlines()
                continue
            if ev is None:
                return
            # Under a stream of writes, a batch starts at most every batch_interval: what arrives meanwhile
            # joins it, so a Service whose pods arrive one request at a time is reconciled once per
            # interval, not once per pod. A write after a quiet interval is handled at once.
            wait = self._last_batch + self.batch_interval - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            self._last_batch = time.monotonic()
            batch = [ev]
            try:
                while True:
                    nxt = self._queue.get_nowait()
                    if nxt is None:
                        self._queue.put(None)
                        break
                    batch.append(nxt)
            except queue.Empty:
                pass
            try:
                self._process(batch)
            except Exception:
                log.exception("controller batch failed")
            with self._cond:
                self._pending -= len(batch)
                self._cond.notify_all()

    def _next_deadline(self) -> float | None:
        """Seconds until a rollout's progress deadline is due (None: no rollout in progress)."""
        if not self._deadlines or not self.workloads:
            return None
        return max(0.05, min(self._deadlines.values()) - time.monotonic())

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for key, due in list(self._deadlines.items()):
            if due <= now:
                self._deadlines.pop(key, None)
                self._guard(self._reconcile_deployment, *key)

    # ---- dispatch ----------------------------------------------------------------------------

    def _process(self, batch: list[WatchEvent]) -> None:
        dirty_svcs: set[tuple[str, str]] = set()
        dirty_rs: set[tuple[str, str]] = set()
        dirty_deploy: set[tuple[str, str]] = set()
        deleted_pods: list[dict] = []
        for ev in batch:
            md = ev.obj["metadata"]
            ns, name = md.get("namespace", ""), md["name"]
            if ev.rt is SERVICES:
                self._unindex_service(ns, name)
                if ev.type == "DELETED":
                    self._services.get(ns, {}).pop(name, None)
                else:
                    self._services.setdefault(ns, {})[name] = ev.obj
                    self._index_service(ns, name, ev.obj)
                dirty_svcs.add((ns, name))
            elif ev.rt is PODS:
                old = self._pods.get(ns, {}).get(name)
                if old is not None:
                    self._unindex(ns, name, old)
                self._own(ns, name, old, None if ev.type == "DELETED" else ev.obj)
                if ev.type == "DELETED":
                    self._pods.get(ns, {}).pop(name, None)
                    deleted_pods.append(ev.obj)
                else:
                    self._pods.setdefault(ns, {})[name] = ev.obj
                    self._index(ns, name, ev.obj)
                for lb in [(o["metadata"].get("labels") or {}) for o in (old, ev.obj) if o is not None]:
                    dirty_svcs.update((ns, sname) for sname in self._services_selecting(ns, lb))
                owner = self._owner_name(ev.obj, "ReplicaSet")
                if owner:
                    dirty_rs.add((ns, owner))
            elif ev.rt is REPLICASETS:
                dirty_rs.add((ns, name))
                owner = self._owner_name(ev.obj, "Deployment")
                if owner:
                    dirty_deploy.add((ns, owner))
            elif ev.rt is DEPLOYMENTS:
                dirty_deploy.add((ns, name))
        if self.endpointslices:
            for ns, name in sorted(dirty_svcs):
                self._guard(self._reconcile_slices, ns, name)
        if self.workloads:
            for pod in deleted_pods:
                if self._owner_name(pod, "ReplicaSet"):
                    self._guard(self.runtime.stop, pod)
            for ns, name in sorted(dirty_deploy):
                self._guard(self._reconcile_deployment, ns, name)
            for ns, name in sorted(dirty_rs):
                self._guard(self._reconcile_replicaset, ns, name)

    @staticmethod
    def _guard(fn, *args) -> None:  # type: ignore[no-untyped-def]
        try:
            fn(*args)
        except ApiError as e:
            log.debug("controller %s%s: %s", fn.__name__, args, e)
        except Exception:
            log.exception("controller %s%s failed", getattr(fn, "__name__", fn), args)

    @staticmethod
    def _owner_name(obj: dict, kind: str) -> str | None:
        for ref in obj["metadata"].get("ownerReferences") or []:
            if ref.get("kind") == kind and ref.get("controller"):
                return ref.get("name")
        return None

    def _index(self, ns: str, name: str, pod: dict) -> None:
        for k, v in (pod["metadata"].get("labels") or {}).items():
            self._label_index.setdefault((ns, k, v), set()).add(name)

    def _unindex(self, ns: str, name: str, pod: dict) -> None:
        for k, v in (pod["metadata"].get("labels") or {}).items():
            s = self._label_index.get((ns, k, v))
            if s is not None:
                s.discard(name)
                if not s:
                    del self._label_index[(ns, k, v)]

    def _own(self, ns: str, name: str, old: dict | None, new: dict | None) -> None:
        """Move a pod between the controller-uid index entries (kept in arrival order, as ``_pods``)."""
        before = _controller_uid(old) if old is not None else None
        after = _controller_uid(new) if new is not None else None
        if before == after:
            return
        owned = self._pods_by_owner.get(before) if before else None
        if owned is not None:
            owned.pop((ns, name), None)
            if not owned:
                del self._pods_by_owner[before]  # type: ignore[arg-type]
        if after:
            self._pods_by_owner.setdefault(after, {})[(ns, name)] = None

    def _index_service(self, ns: str, name: str, svc: dict) -> None:
        """Index a Service under the least shared ``(key, value)`` pair of its selector (none: no index)."""
        sel = (svc.get("spec") or {}).get("selector")
        if not sel or not isinstance(sel, dict):
            return
        pairs = sorted((ns, str(k), str(v)) for k, v in sel.items())
        for pair in pairs:
            self._pair_uses[pair] = self._pair_uses.get(pair, 0) + 1
        pick = min(pairs, key=lambda p: self._pair_uses[p])
        self._selector_index.setdefault(pick, set()).add(name)
        self._selector_pair[(ns, name)] = pick
        svc_pairs = self._selector_pairs.setdefault(ns, {})
        svc_pairs[name] = pairs

    def _unindex_service(self, ns: str, name: str) -> None:
        pick = self._selector_pair.pop((ns, name), None)
        if pick is None:
            return
        names = self._selector_index.get(pick)
        if names is not None:
            names.discard(name)
            if not names:
                del self._selector_index[pick]
        for pair in self._selector_pairs.get(ns, {}).pop(name, ()):
            left = self._pair_uses.get(pair, 0) - 1
            if left > 0:
                self._pair_uses[pair] = left
            else:
                self._pair_uses.pop(pair, None)

    def _services_selecting(self, ns: str, labels: dict) -> list[str]:
        """Names of the Services of ``ns`` whose selector matches ``labels``: only those indexed under one
        of the labels' pairs are checked."""
        out = []
        svcs = self._services.get(ns, {})
        for k, v in labels.items():
            for sname in self._selector_index.get((ns, str(k), str(v)), ()):
                svc = svcs.get(sname)
                sel = (svc.get("spec") or {}).get("selector") if svc is not None else None
                if sel and match_label_map(sel, labels):
                    out.append(sname)
        return out

    def _select_pods(self, ns: str, selector: dict[str, str]) -> list[dict]:
        sets = [self._label_index.get((ns, k, v), set()) for k, v in selector.items()]
        if not sets:
            return []
        names = set.intersection(*sorted(sets, key=len))
        pods = self._pods.get(ns, {})
        return [pods[n] for n in sorted(names) if n in pods]

    # ---- EndpointSlices ----------------------------------------------------------------------

    def _reconcile_slices(self, ns: str, name: str) -> None:
        svc = self._services.get(ns, {}).get(name)
        ours = LabelSelector([lambda lb: lb.get(SERVICE_NAME_LABEL) == name and lb.get(MANAGED_BY_LABEL) == MANAGED_BY],
                             ((SERVICE_NAME_LABEL, name), (MANAGED_BY_LABEL, MANAGED_BY)))
        existing, _ = self.store.list_raw(SLICES, ns, ours)
        spec = (svc or {}).get("spec") or {}
        selector = spec.get("selector")
        if svc is None or not selector or spec.get("type") == "ExternalName":
            for s in existing:
                self._delete_quiet(SLICES, s["metadata"]["name"], ns)
            try:
                mirrored = self.store.get_raw(ENDPOINTS, name, ns)
                if (mirrored["metadata"].get("labels") or {}).get(SKIP_MIRROR_LABEL) == "true":
                    self._delete_quiet(ENDPOINTS, name, ns)
            except ApiError:
                pass
            return
        publish_not_ready = bool(spec.get("publishNotReadyAddresses"))
        groups: dict[tuple, list[dict]] = {}
        for pod in self._select_pods(ns, selector):
            st = pod.get("status") or {}
            ip = st.get("podIP")
            if not ip or ":" in ip or st.get("phase") in ("Succeeded", "Failed"):
                continue
            ports = tuple(self._resolve_ports(spec, pod))
            ready = publish_not_ready or pod_ready(pod)
            ep: dict = {"addresses": [ip],
                        "conditions": {"ready": ready, "serving": ready, "terminating": False},
                        "targetRef": {"kind": "Pod", "namespace": ns, "name": pod["metadata"]["name"],
                                      "uid": pod["metadata"]["uid"]}}
            node = (pod.get("spec") or {}).get("nodeName")
            if node:
                ep["nodeName"] = node
            groups.setdefault(ports, []).append(ep)
        if not groups:
            groups[()] = []
        labels = dict(svc["metadata"].get("labels") or {})
        labels.update({SERVICE_NAME_LABEL: name, MANAGED_BY_LABEL: MANAGED_BY})
        self._write_endpoints(svc, groups, labels)
        # Every object written below is built here and shares nothing with another (the store adopts it).
        desired: dict[str, dict] = {}
        for ports, eps in groups.items():
            slice_name = f"{name}-{self._slice_suffix(svc['metadata']['uid'], ports)}"
            desired[slice_name] = {
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": slice_name, "namespace": ns, "labels": dict(labels),
                             "ownerReferences": [dict(_owner_ref(svc, SERVICES))]},
                "addressType": "IPv4",
                "endpoints": eps,
                "ports": [dict(p) for p in ports] if ports else None,
            }
        have = {s["metadata"]["name"]: s for s in existing}
        for slice_name, want in desired.items():
            cur = have.get(slice_name)
            if cur is None:
                try:
                    self.store.create(want, namespace=ns, resource=SLICES, adopt=True)
                except ApiError as e:
                    if e.code != 409:
                        raise
                    self.store.update(want, namespace=ns, resource=SLICES, adopt=True)
            elif (cur.get("endpoints") != want["endpoints"] or cur.get("ports") != want["ports"]
                  or cur["metadata"].get("labels") != labels):
                want["metadata"]["resourceVersion"] = cur["metadata"]["resourceVersion"]
                self.store.update(want, namespace=ns, resource=SLICES, adopt=True)
        for slice_name in have:
            if slice_name not in desired:
                self._delete_quiet(SLICES, slice_name, ns)

    def _slice_suffix(self, uid: str, ports: tuple) -> str:
        """The hash part of a slice's name for a Service uid and port set (remembered: one per pair)."""
        key = (uid, ports)
        suffix = self._suffixes.get(key)
        if suffix is None:
            if len(self._suffixes) > 1 << 20:
                self._suffixes.clear()
            suffix = self._suffixes[key] = _short_hash([uid, ports], 5)
        return suffix

    def _write_endpoints(self, svc: dict, groups: dict[tuple, list[dict]], labels: dict) -> None:
        ns, name = svc["metadata"]["namespace"], svc["metadata"]["name"]
        subsets = []
        for ports, eps in groups.items():
            if not eps:
                continue
            sub: dict = {}
            for key, ready in (("addresses", True), ("notReadyAddresses", False)):
                addrs = [{"ip": e["addresses"][0], "nodeName": e.get("nodeName"), "targetRef": dict(e["targetRef"])}
                         for e in eps if e["conditions"]["ready"] is ready]
                for a in addrs:
                    if a["nodeName"] is None:
                        del a["nodeName"]
                if addrs:
                    sub[key] = addrs
            if ports:
                sub["ports"] = [{k: v for k, v in p if k != "name" or v} for p in ports]
            subsets.append(sub)
        want: dict[str, Any] = {"apiVersion": "v1", "kind": "Endpoints",
                                "metadata": {"name": name, "namespace": ns, "labels": {**labels, SKIP_MIRROR_LABEL: "true"}},
                                "subsets": subsets}
        want["metadata"]["labels"].pop(MANAGED_BY_LABEL, None)
        want["metadata"]["labels"].pop(SERVICE_NAME_LABEL, None)
        try:
            cur = self.store.get_raw(ENDPOINTS, name, ns)
        except ApiError:
            self.store.create(want, namespace=ns, resource=ENDPOINTS, adopt=True)
            return
        if cur.get("subsets") != subsets or cur["metadata"].get("labels") != want["metadata"]["labels"]:
            self.store.update(want, namespace=ns, resource=ENDPOINTS, adopt=True)

    @staticmethod
    def _resolve_ports(spec: dict, pod: dict) -> list[tuple[tuple[str, object], ...]]:
        out = []
        for sp in spec.get("ports") or []:
            target = sp.get("targetPort", sp.get("port"))
            proto = sp.get("protocol", "TCP")
            port: int | None = None
            if isinstance(target, int):
                port = target
            elif isinstance(target, str) and target.isdigit():
                port = int(target)
            elif isinstance(target, str):
                for c in (pod.get("spec") or {}).get("containers") or []:
                    for cp in c.get("ports") or []:
                        if cp.get("name") == target and cp.get("protocol", "TCP") == proto:
                            port = cp.get("containerPort")
            if port is None:
                continue
            entry: list[tuple[str, object]] = [("name", sp.get("name", "")), ("port", port), ("protocol", proto)]
            if sp.get("appProtocol"):
                entry.append(("appProtocol", sp["appProtocol"]))
            out.append(tuple(entry))
        return out

    def _delete_quiet(self, rt: ResourceType, name: str, ns: str) -> None:
        try:
            self.store.delete(rt, name, ns)
        except ApiError:
            pass

    # ---- workloads ---------------------------------------------------------------------------
    #
    # As kube-controller-manager's deployment controller: a template change creates a new ReplicaSet
    # (named by the template's hash, revision = highest + 1; going back to an old template reuses its
    # ReplicaSet) and RollingUpdate scales it up by at most maxSurge over spec.replicas while scaling old
    # ones down only as far as maxUnavailable allows (Recreate: old ones to 0 first). Old ReplicaSets stay
    # at 0 replicas (revisionHistoryLimit, default 10). Status and the Available/Progressing conditions are
    # what kubectl rollout status reads; a rollout without progress for progressDeadlineSeconds is marked
    # ProgressDeadlineExceeded (checked by the worker's timer, see _run).

    def _reconcile_deployment(self, ns: str, name: str) -> None:
        try:
            d = self.store.get_raw(DEPLOYMENTS, name, ns)
        except ApiError:
            self._deadlines.pop((ns, name), None)
            return
        spec = d.get("spec") or {}
        template = spec.get("template") or {}
        want = _pruned(template)
        h = _short_hash(want, 10)
        rs_name = f"{name}-{h}"
        owned = [rs for rs in self.store.owned(REPLICASETS, d["metadata"]["uid"], ns)
                 if _controller_uid(rs) == d["metadata"]["uid"]]
        replicas = int(spec.get("replicas", 1))
        # the ReplicaSet whose template equals the Deployment's ignoring pod-template-hash (as the real
        # controller compares them: what `kubectl rollout undo` copies back finds its old ReplicaSet)
        new = next((rs for rs in owned if _pruned((rs.get("spec") or {}).get("template") or {}, True) == want), None)
        if new is not None:
            rs_name = new["metadata"]["name"]
        olds = sorted((rs for rs in owned if rs["metadata"]["name"] != rs_name),
                      key=lambda rs: rs["metadata"].get("creationTimestamp", ""))
        top = max((_revision(rs) for rs in owned), default=0)
        surge, unavailable = _rolling_bounds(spec, replicas)
        old_total = sum(_rs_replicas(rs) for rs in olds)
        recreate = (spec.get("strategy") or {}).get("type") == "Recreate"
        created = False
        if new is None and spec.get("paused"):  # the new template waits for resume: status only
            self._deployment_status(d, {"metadata": {"name": ""}, "spec": {"replicas": 0}}, olds, replicas,
                                    unavailable, False)
            return
        if new is None:
            first = 0 if recreate else max(0, min(replicas, replicas + surge - old_total))
            tmpl = json.loads(json.dumps(template))
            tmpl.setdefault("metadata", {}).setdefault("labels", {})["pod-template-hash"] = h
            sel = json.loads(json.dumps(spec.get("selector") or {}))
            sel.setdefault("matchLabels", {})["pod-template-hash"] = h
            new = self.store.create({
                "apiVersion": "apps/v1", "kind": "ReplicaSet",
                "metadata": {"name": rs_name, "namespace": ns, "labels": dict(tmpl["metadata"]["labels"]),
                             "annotations": {"deployment.kubernetes.io/revision": str(top + 1),
                                             "deployment.kubernetes.io/desired-replicas": str(replicas),
                                             "deployment.kubernetes.io/max-replicas": str(replicas + surge)},
                             "ownerReferences": [_owner_ref(d, DEPLOYMENTS)]},
                "spec": {"replicas": first, "selector": sel, "template": tmpl},
            }, namespace=ns, resource=REPLICASETS)
            created = True
            if first:
                self._event(d, DEPLOYMENTS, "ScalingReplicaSet", f"Scaled up replica set {rs_name} from 0 to {first}",
                            "deployment-controller")
        elif olds and _revision(new) < top and not spec.get("paused"):
            # back to an older template (rollout undo): its ReplicaSet becomes the newest revision
            new = self.store.patch(REPLICASETS, rs_name, {"metadata": {"annotations": {
                "deployment.kubernetes.io/revision": str(top + 1)}}}, namespace=ns)
        revision = str(_revision(new))
        if (d["metadata"].get("annotations") or {}).get("deployment.kubernetes.io/revision") != revision:
            d = self.store.patch(DEPLOYMENTS, name, {"metadata": {"annotations": {
                "deployment.kubernetes.io/revision": revision}}}, namespace=ns)
        if not spec.get("paused"):
            new, olds = self._roll(d, new, olds, replicas, surge, unavailable)
        self._cleanup_history(spec, olds, ns)
        self._deployment_status(d, new, olds, replicas, unavailable, created)

    def _roll(self, d: dict, new: dict, olds: list[dict], replicas: int, surge: int,
              unavailable: int) -> tuple[dict, list[dict]]:
        """One step of the rollout: scale the new ReplicaSet up and the old ones down within the bounds."""
        recreate = ((d.get("spec") or {}).get("strategy") or {}).get("type") == "Recreate"
        if recreate:
            out_olds = [self._scale_rs(d, rs, 0) for rs in olds]
            if all(int((rs.get("status") or {}).get("replicas", 0)) == 0 for rs in out_olds):
                new = self._scale_rs(d, new, replicas)
            return new, out_olds
        new_n = _rs_replicas(new)
        total = new_n + sum(_rs_replicas(rs) for rs in olds)
        if new_n > replicas:
            new = self._scale_rs(d, new, replicas)
        elif new_n < replicas:
            up = min(replicas - new_n, replicas + surge - total)
            if up > 0:
                new = self._scale_rs(d, new, new_n + up)
        if not olds:
            return new, olds
        # as the real controller: first drop old pods that are not available (within what the new
        # ReplicaSet's own unavailable pods leave), then old available ones down to minAvailable
        min_available = replicas - unavailable
        want = {rs["metadata"]["name"]: _rs_replicas(rs) for rs in olds}
        all_pods = _rs_replicas(new) + sum(want.values())
        cleanup = all_pods - min_available - (_rs_replicas(new) - _available(new))
        for rs in olds:
            unhealthy = want[rs["metadata"]["name"]] - _available(rs)
            down = min(cleanup, unhealthy)
            if down > 0:
                want[rs["metadata"]["name"]] -= down
                cleanup -= down
        budget = _available(new) + sum(_available(rs) for rs in olds) - min_available
        for rs in olds:
            down = min(budget, want[rs["metadata"]["name"]])
            if down > 0:
                want[rs["metadata"]["name"]] -= down
                budget -= down
        return new, [self._scale_rs(d, rs, want[rs["metadata"]["name"]]) for rs in olds]

    def _scale_rs(self, d: dict, rs: dict, n: int) -> dict:
        cur = _rs_replicas(rs)
        if cur == n:
            return rs
        name = rs["metadata"]["name"]
        rs = self.store.patch(REPLICASETS, name, {"spec": {"replicas": n}}, namespace=rs["metadata"]["namespace"])
        verb = "up" if n > cur else "down"
        self._event(d, DEPLOYMENTS, "ScalingReplicaSet", f"Scaled {verb} replica set {name} from {cur} to {n}",
                    "deployment-controller")
        return rs

    def _cleanup_history(self, spec: dict, olds: list[dict], ns: str) -> None:
        limit = int(spec.get("revisionHistoryLimit", 10))
        idle = [rs for rs in olds if _rs_replicas(rs) == 0 and int((rs.get("status") or {}).get("replicas", 0)) == 0]
        idle.sort(key=_revision)
        for rs in idle[:max(0, len(idle) - limit)]:
            self._delete_quiet(REPLICASETS, rs["metadata"]["name"], ns)

    def _deployment_status(self, d: dict, new: dict, olds: list[dict], replicas: int, unavailable: int,
                           created: bool) -> None:
        ns, name = d["metadata"]["namespace"], d["metadata"]["name"]
        spec, old_status = d.get("spec") or {}, d.get("status") or {}
        all_rs = [new, *olds]
        nst = new.get("status") or {}
        status: dict[str, Any] = {
            "observedGeneration": d["metadata"].get("generation", 1),
            "replicas": sum(int((rs.get("status") or {}).get("replicas", 0)) for rs in all_rs),
            "updatedReplicas": int(nst.get("replicas", 0)),
            "readyReplicas": sum(int((rs.get("status") or {}).get("readyReplicas", 0)) for rs in all_rs),
            "availableReplicas": sum(_available(rs) for rs in all_rs),
        }
        unavail = sum(_rs_replicas(rs) for rs in all_rs) - status["availableReplicas"]
        if unavail > 0:
            status["unavailableReplicas"] = unavail
        status = {k: v for k, v in status.items() if v or k == "observedGeneration"}
        old_conds = {c.get("type"): c for c in old_status.get("conditions") or []}
        now = now_iso()
        ok = status.get("availableReplicas", 0) >= replicas - unavailable
        conds = [_condition(old_conds.get("Available"), "Available", ok, now,
                            "MinimumReplicasAvailable" if ok else "MinimumReplicasUnavailable",
                            "Deployment has minimum availability." if ok
                            else "Deployment does not have minimum availability.", False)]
        rs_name = new["metadata"]["name"]
        complete = (status.get("updatedReplicas", 0) == replicas and status.get("replicas", 0) == replicas
                    and status.get("availableReplicas", 0) == replicas)
        prev = old_conds.get("Progressing")
        deadline = spec.get("progressDeadlineSeconds", 600)
        progressed = any(status.get(k) != old_status.get(k) for k in
                         ("replicas", "updatedReplicas", "readyReplicas", "availableReplicas"))
        if spec.get("paused"):
            prog = _condition(prev, "Progressing", None, now, "DeploymentPaused", "Deployment is paused", False)
        elif complete:
            prog = _condition(prev, "Progressing", True, now, "NewReplicaSetAvailable",
                              f'ReplicaSet "{rs_name}" has successfully progressed.', progressed)
        elif (prev is not None and prev.get("reason") == "ProgressDeadlineExceeded" and not created
              and not progressed and prev.get("message", "").startswith(f'ReplicaSet "{rs_name}"')):
            prog = prev
        elif created:
            prog = _condition(prev, "Progressing", True, now, "NewReplicaSetCreated",
                              f'Created new replica set "{rs_name}"', True)
        else:
            prog = _condition(prev, "Progressing", True, now, "ReplicaSetUpdated",
                              f'ReplicaSet "{rs_name}" is progressing.', progressed)
            if (isinstance(deadline, int) and prev is not None and not progressed
                    and _age_s(prog.get("lastUpdateTime")) >= deadline):
                prog = _condition(prev, "Progressing", False, now, "ProgressDeadlineExceeded",
                                  f'ReplicaSet "{rs_name}" has timed out progressing.', True)
        conds.append(prog)
        status["conditions"] = conds
        key = (ns, name)
        if prog.get("status") == "True" and not complete and isinstance(deadline, int):
            self._deadlines[key] = time.monotonic() + max(0.0, deadline - _age_s(prog.get("lastUpdateTime"))) + 0.5
        else:
            self._deadlines.pop(key, None)
        if old_status != status:
            gone = {k: None for k in old_status if k not in status}  # a merge patch removes them
            self.store.patch(DEPLOYMENTS, name, {"status": {**gone, **status}}, namespace=ns, subresource="status")

    def _event(self, obj: dict, rt: ResourceType, reason: str, message: str, component: str,
               type_: str = "Normal") -> None:
        """Record a core/v1 Event about ``obj`` (what ``kubectl get events``/``describe`` show)."""
        md = obj["metadata"]
        now = now_iso()
        try:
            self.store.create({
                "apiVersion": "v1", "kind": "Event",
                "metadata": {"name": f"{md['name']}.{random_suffix(10)}", "namespace": md.get("namespace", "default")},
                "involvedObject": {"apiVersion": rt.api_version, "kind": rt.kind, "name": md["name"],
                                   "namespace": md.get("namespace", "default"), "uid": md.get("uid"),
                                   "resourceVersion": md.get("resourceVersion")},
                "reason": reason, "message": message, "type": type_, "count": 1,
                "firstTimestamp": now, "lastTimestamp": now,
                "source": {"component": component}, "reportingComponent": component, "reportingInstance": "",
            }, namespace=md.get("namespace", "default"), resource=EVENTS)
        except ApiError as e:
            log.debug("event %s for %s: %s", reason, md["name"], e)

    def _reconcile_replicaset(self, ns: str, name: str) -> None:
        try:
            rs = self.store.get_raw(REPLICASETS, name, ns)
        except ApiError:
            return
        spec = rs.get("spec") or {}
        uid = rs["metadata"]["uid"]
        known = self._pods.get(ns, {})
        pods = [known[n] for pns, n in self._pods_by_owner.get(uid, {}) if pns == ns and n in known]
        want = spec.get("replicas", 1)
        if len(pods) < want:
            tmpl = spec.get("template") or {}
            for _ in range(want - len(pods)):
                md = json.loads(json.dumps(tmpl.get("metadata") or {}))
                md.update(name=f"{name}-{random_suffix()}", namespace=ns,
                          ownerReferences=[_owner_ref(rs, REPLICASETS)])
                pod = self.store.create({"apiVersion": "v1", "kind": "Pod", "metadata": md,
                                         "spec": json.loads(json.dumps(tmpl.get("spec") or {}))},
                                        namespace=ns, resource=PODS)
                self._event(rs, REPLICASETS, "SuccessfulCreate", f"Created pod: {md['name']}", "replicaset-controller")
                status = self.runtime.start(pod)
                if status:
                    pod = self.store.patch(PODS, pod["metadata"]["name"], {"status": status}, namespace=ns,
                                           subresource="status")
                pods.append(pod)
        elif len(pods) > want:
            # as the real controller: not-ready pods first, then the most recently created
            by_age = sorted(pods, key=lambda p: p["metadata"]["creationTimestamp"], reverse=True)
            doomed = sorted(by_age, key=pod_ready)[:len(pods) - want]
            for p in doomed:
                self._delete_quiet(PODS, p["metadata"]["name"], ns)
                self._event(rs, REPLICASETS, "SuccessfulDelete", f"Deleted pod: {p['metadata']['name']}",
                            "replicaset-controller")
            gone = {p["metadata"]["name"] for p in doomed}
            pods = [p for p in pods if p["metadata"]["name"] not in gone]
        matching = [p for p in pods if match_label_selector_obj(spec.get("selector"), p["metadata"].get("labels") or {})]
        ready = sum(1 for p in pods if pod_ready(p))
        status = {"replicas": len(pods), "fullyLabeledReplicas": len(matching), "readyReplicas": ready,
                  "availableReplicas": ready, "observedGeneration": rs["metadata"].get("generation", 1)}
        if rs.get("status") != status:
            self.store.patch(REPLICASETS, name, {"status": status}, namespace=ns, subresource="status")


def _pruned(value: Any, drop_hash: bool = False) -> Any:
    """``value`` without nulls and empty maps/lists (as Go's typed objects compare), optionally without
    the ``pod-template-hash`` label."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if drop_hash and k == "labels" and isinstance(v, dict):
                v = {lk: lv for lk, lv in v.items() if lk != "pod-template-hash"}
            v = _pruned(v, drop_hash)
            if v is not None and v != {} and v != []:
                out[k] = v
        return out
    if isinstance(value, list):
        return [_pruned(v, drop_hash) for v in value]
    return value


def _revision(rs: dict) -> int:
    try:
        return int((rs["metadata"].get("annotations") or {}).get("deployment.kubernetes.io/revision", 0))
    except ValueError:
        return 0


def _rs_replicas(rs: dict) -> int:
    return int((rs.get("spec") or {}).get("replicas", 1))


def _available(rs: dict) -> int:
    """Available pods of a ReplicaSet, not counting those its (just lowered) spec is about to delete."""
    return min(int((rs.get("status") or {}).get("availableReplicas", 0)), _rs_replicas(rs))


def _scaled(value: object, total: int, round_up: bool) -> int:
    """maxSurge/maxUnavailable: an int, or a percentage of ``total`` (surge rounds up, unavailable down)."""
    if isinstance(value, int):
        return max(0, value)
    if isinstance(value, str) and value.endswith("%") and value[:-1].isdigit():
        pct = int(value[:-1]) * total
        return max(0, -(-pct // 100) if round_up else pct // 100)
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return 0


def _rolling_bounds(spec: dict, replicas: int) -> tuple[int, int]:
    """(maxSurge, maxUnavailable) as the deployment controller resolves them (defaults 25 %/25 %; both 0
    is not allowed, so maxUnavailable becomes 1)."""
    ru = ((spec.get("strategy") or {}).get("rollingUpdate")) or {}
    surge = _scaled(ru.get("maxSurge", "25%"), replicas, True)
    unavailable = _scaled(ru.get("maxUnavailable", "25%"), replicas, False)
    if surge == 0 and unavailable == 0:
        unavailable = 1
    return surge, min(unavailable, replicas)


def _condition(prev: dict | None, type_: str, ok: bool | None, now: str, reason: str, message: str,
               progressed: bool) -> dict:
    """A Deployment condition (``ok`` None: Unknown) keeping ``lastTransitionTime`` while its status stays
    and ``lastUpdateTime`` while nothing changed (``progressed`` or a new reason/message updates it)."""
    status = "Unknown" if ok is None else "True" if ok else "False"
    same = prev is not None and prev.get("status") == status
    unchanged = same and prev is not None and prev.get("reason") == reason and prev.get("message") == message
    return {"type": type_, "status": status,
            "lastUpdateTime": prev.get("lastUpdateTime", now) if unchanged and not progressed and prev else now,
            "lastTransitionTime": prev.get("lastTransitionTime", now) if same and prev else now,
            "reason": reason, "message": message}


def _age_s(ts: str | None) -> float:
    if not ts:
        return 0.0
    try:
        t = _dt.datetime.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=_dt.UTC)
    except ValueError:
        return 0.0
    return (_dt.datetime.now(_dt.UTC) - t).total_seconds()
