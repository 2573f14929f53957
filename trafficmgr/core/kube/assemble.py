"""Raw Kubernetes objects -> the IR, incrementally.

The :class:`Assembler` keeps the current IR objects and replaces only those an event affects; an object
whose IR did not change keeps its identity, which is what makes the builder incremental. It is owned by
one thread (the sync loop); the xDS resolver only reads ``pods`` (single dict lookups). The reverse
indexes that say what an event affects are in :mod:`trafficmgr.core.kube.indexes`.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterable, Mapping
from operator import attrgetter
from types import MappingProxyType
from typing import Any

import attrs

from trafficmgr.core import gcpause, metrics
from trafficmgr.core.contrib import WatchKind
from trafficmgr.core.kube.client import Kind
from trafficmgr.core.kube.indexes import Controllers, PodIndex, SliceIndex, WorkloadIndex, controller, pod_controllers
from trafficmgr.core.kube.watch import ListPage
from trafficmgr.core.labels import PREFIX as TRAFFIC_PREFIX
from trafficmgr.core.labels import LabelRegistry
from trafficmgr.core.model import (
    EMPTY_LABELS,
    PORT_PREFIX,
    Endpoint,
    LabelError,
    Labels,
    Model,
    ModelDelta,
    Namespace,
    ObjectRef,
    Pod,
    Service,
    ServicePort,
    load_balancer_addresses,
    normalize_ip,
    port_protocol,
)

log = logging.getLogger(__name__)

SERVICE = Kind("Service", "v1", "services")
ENDPOINT_SLICE = Kind("EndpointSlice", "discovery.k8s.io/v1", "endpointslices")
POD = Kind("Pod", "v1", "pods")
REPLICA_SET = Kind("ReplicaSet", "apps/v1", "replicasets")
DEPLOYMENT = Kind("Deployment", "apps/v1", "deployments")
STATEFUL_SET = Kind("StatefulSet", "apps/v1", "statefulsets")
DAEMON_SET = Kind("DaemonSet", "apps/v1", "daemonsets")
#: Cluster-scoped: their traffic labels (``Model.namespaces``) are defaults for what runs in them.
NAMESPACE = Kind("Namespace", "v1", "namespaces", namespaced=False)
CORE_KINDS: tuple[Kind, ...] = (SERVICE, ENDPOINT_SLICE, POD, REPLICA_SET, DEPLOYMENT, STATEFUL_SET, DAEMON_SET, NAMESPACE)
SERVICE_NAME_LABEL = "kubernetes.io/service-name"

Key = tuple[str, str]


def _meta(obj: dict[str, Any]) -> dict[str, Any]:
    return obj.get("metadata") or {}


#: Set by the node agent on a pod once its sidecar is LIVE (value: the sidecar's id; ``ingress`` marks a
#: gateway pod, which has no inbound listener).
PROXY_ANNOTATION = "traffic.envoy.proxy"


def has_sidecar(obj: dict[str, Any]) -> bool:
    """The pod runs a trafficmgr sidecar (:attr:`~trafficmgr.core.model.Endpoint.sidecar`)."""
    value = (_meta(obj).get("annotations") or {}).get(PROXY_ANNOTATION)
    return isinstance(value, str) and value not in ("", "ingress")


def _key(obj: dict[str, Any]) -> Key:
    m = _meta(obj)
    return (m.get("namespace") or "", m.get("name") or "")


def pod_ips(ip: str | None, pod_ips: Any) -> tuple[str, ...]:
    """``status.podIP`` and ``status.podIPs`` (dual stack) as one normalised, duplicate-free tuple,
    ``podIP`` first; malformed entries are skipped."""
    out: list[str] = []
    for text in [ip, *((p.get("ip") if isinstance(p, dict) else None) for p in (pod_ips or []))]:
        if isinstance(text, str) and text:
            norm = _normalize_ip(text)
            if norm not in out:
                out.append(norm)
    return tuple(out)


def _normalize_ip(text: str) -> str:
    """:func:`~trafficmgr.core.model.normalize_ip`, with a fast path for the common case, text that is
    already a canonical dotted-quad IPv4 address (returned as is: inet_ntoa(inet_aton(t)) == t holds
    only for four decimal octets 0-255 without leading zeros, which ``ipaddress`` prints unchanged).
    ``ipaddress`` costs ~10 us per address: a second of a 100k-pod relist."""
    try:
        if socket.inet_ntoa(socket.inet_aton(text)) == text:
            return text
    except (OSError, ValueError):
        pass
    return normalize_ip(text)


_ENDPOINT_ORDER = attrgetter("address", "port")


def _k8s_labels(obj: dict[str, Any]) -> dict[str, str]:
    labels = _meta(obj).get("labels")
    return labels if isinstance(labels, dict) else {}


def _pod_from(key: Key, obj: dict[str, Any], labels: Labels) -> Pod:
    """The model's pod for the raw ``obj`` with ``labels``."""
    meta = _meta(obj)
    status = obj.get("status") or {}
    spec = obj.get("spec") or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    ports = tuple(
        (p.get("name") or "", int(p.get("containerPort", 0)))
        for c in spec.get("containers") or []
        for p in c.get("ports") or []
    )
    ip = status.get("podIP") or None
    return Pod(
        namespace=key[0], name=key[1], ip=ip, node=spec.get("nodeName") or None,
        ready=ready, labels=labels, uid=meta.get("uid") or "", ports=ports,
        ips=pod_ips(ip, status.get("podIPs")), phase=str(status.get("phase") or "Pending"),
        terminating=bool(meta.get("deletionTimestamp")), host_network=bool(spec.get("hostNetwork")),
        service_account=str(spec.get("serviceAccountName") or spec.get("serviceAccount") or ""),
        sidecar=has_sidecar(obj),
    )


def ref_of(kind: str, obj: dict[str, Any]) -> ObjectRef:
    m = _meta(obj)
    return ObjectRef(kind, m.get("namespace") or "", m.get("name") or "", m.get("uid") or "", m.get("resourceVersion") or "")


class PodSource:
    """What the assembler keeps of a raw Pod after converting it, instead of the raw object (a decoded pod
    is ~4.7 KB of dicts and strings even when small: 470 MB at 100k pods, and real pods are larger):
    ``base``, the pod as built from the object with its own labels (the model's pod unless its workload
    adds labels), its Kubernetes labels (:meth:`Assembler.pods_with_ip`) and its controllers (its workload
    is looked up again when a ReplicaSet or workload changes)."""

    __slots__ = ("base", "k8s_labels", "controllers")

    def __init__(self, base: Pod, k8s_labels: dict[str, str], controllers: Controllers) -> None:
        self.base = base
        self.k8s_labels = k8s_labels
        self.controllers = controllers


#: One endpoint of a slice: (addresses, ready, its pod's key or None, node name or None).
SliceEndpoint = tuple[tuple[str, ...], bool, Key | None, str | None]


class SliceSource:
    """What the assembler keeps of a raw EndpointSlice: its ports ``(name, number)`` and endpoints
    (:data:`SliceEndpoint`), or ``usable`` False for an address type other than IPv4/IPv6."""

    __slots__ = ("usable", "ports", "endpoints")

    def __init__(self, obj: dict[str, Any], namespace: str) -> None:
        self.usable = obj.get("addressType", "IPv4") in ("IPv4", "IPv6")
        ports: list[tuple[str, int]] = []
        for port in obj.get("ports") or []:
            number = port.get("port")
            if number is None:
                continue
            try:
                ports.append((port.get("name") or "", int(number)))
            except (TypeError, ValueError):
                log.warning("EndpointSlice %s/%s: port %r is not a number: ignored", namespace,
                            _meta(obj).get("name"), number)
        self.ports = tuple(ports)
        endpoints: list[SliceEndpoint] = []
        for ep in obj.get("endpoints") or []:
            cond = ep.get("conditions") or {}
            target = ep.get("targetRef") or {}
            pod_key = (target.get("namespace") or namespace, target.get("name") or "") if target.get("kind") == "Pod" else None
            endpoints.append((tuple(ep.get("addresses") or ()), cond.get("ready") is not False and not cond.get("terminating", False),
                              pod_key, ep.get("nodeName")))
        self.endpoints = tuple(endpoints)


class ConvertContext:
    """What a plugin's ``WatchKind.convert`` receives besides the raw object."""

    def __init__(self, labels: LabelRegistry, report: Callable[[ObjectRef, str, str], None]) -> None:
        self.labels = labels
        self.report = report


class Assembler:
    """Applies watch events to the IR. ``dirty`` is set whenever the model changed; what changed is
    collected until :meth:`model` hands it out as the model's :class:`~trafficmgr.core.model.ModelDelta`."""

    def __init__(
        self,
        labels: LabelRegistry,
        extra_kinds: Iterable[WatchKind] = (),
        on_label_errors: Callable[[list[LabelError]], None] | None = None,
        reporter: Callable[[ObjectRef, str, str], None] | None = None,
    ) -> None:
        self.labels = labels
        self.extra_kinds = {w.kind: w for w in extra_kinds}
        self.on_label_errors = on_label_errors or (lambda errors: None)
        self.convert_ctx = ConvertContext(labels, reporter or (lambda ref, msg, reason: log.warning("%s: %s", ref, msg)))
        self.services: dict[Key, Service] = {}
        self.pods: dict[Key, Pod] = {}
        self.endpoints: dict[tuple[str, str, str], tuple[Endpoint, ...]] = {}
        self.extra: dict[str, dict[Key, Any]] = {k: {} for k in self.extra_kinds}
        self.namespaces: dict[str, Namespace] = {}
        # Of the raw objects only what later events need: each object's resourceVersion (a relist applies
        # only what changed), and for pods and slices their converted sources.
        self._versions: dict[str, dict[Key, str]] = {k.kind: {} for k in CORE_KINDS}
        self._pod_src: dict[Key, PodSource] = {}
        self._slice_src: dict[Key, SliceSource] = {}
        # Keys listed so far by each kind's relist in progress (a paged list: see ListPage).
        self._seen: dict[str, set[Key]] = {}
        self._workloads = WorkloadIndex()
        self._pod_index = PodIndex()
        self._slices = SliceIndex()
        # Services whose endpoints wait: during a relist, until its end; before the first model(), until
        # then (the initial lists arrive one kind after the other: slices, then pods, would otherwise
        # compute every service's endpoints twice, 0.35 s at 10k services).
        self._deferred: set[Key] | None = set()
        self.port_pods: dict[Key, Pod] = {}
        self.dirty = True
        # What changed since the last model() (None before the first: every consumer starts from scratch).
        self._delta: dict[str, set[Any]] | None = None
        self._extra_view: Mapping[str, Mapping[Key, Any]] | None = None

    def _changed(self, table: str, key: Any) -> None:
        self.dirty = True
        if self._delta is not None:
            self._delta[table].add(key)

    # -- entry points -------------------------------------------------------------------------

    def apply(self, etype: str, kind: Kind | WatchKind, obj: Any) -> None:
        """Apply one watch event (``ADDED``/``MODIFIED``/``DELETED``) or a ``RELIST`` (obj: the whole list's
        items, or one :class:`~trafficmgr.core.kube.watch.ListPage` of a paged list)."""
        if etype == "RELIST":
            self._relist(kind, obj)
            return
        if kind.kind in self.extra_kinds:
            self._extra(kind.kind, obj, deleted=etype == "DELETED")
            return
        handler = getattr(self, "_on_" + kind.kind.lower(), None)
        if handler is None:
            return
        key = _key(obj)
        versions = self._versions.setdefault(kind.kind, {})
        if etype == "DELETED":
            versions.pop(key, None)
            handler(key, None)
        else:
            versions[key] = _meta(obj).get("resourceVersion") or ""
            handler(key, obj)

    def _relist(self, kind: Kind | WatchKind, items: list[dict[str, Any]] | ListPage) -> None:
        # A relist touches many objects of one service (its pods, its slices): refresh each service's
        # endpoints once at the end of the page instead of once per object (10 pods per service: 10x fewer).
        # The garbage collector is held off meanwhile (gcpause): a relist of 100k pods makes ~a million
        # long-lived IR objects, and the collections their allocation triggers would find nothing to free.
        page = items if isinstance(items, ListPage) else ListPage(items, first=True, last=True)
        with gcpause.paused():
            if self._deferred is not None:  # before the first model(): it refreshes them
                self._relist_page(kind, page)
                return
            self._deferred = set()
            try:
                self._relist_page(kind, page)
            finally:
                self._flush_endpoints()

    def _flush_endpoints(self) -> None:
        """Refresh the endpoints of every deferred service, and stop deferring."""
        deferred, self._deferred = self._deferred, None
        for svc_key in sorted(deferred or ()):
            self._refresh_endpoints(svc_key)

    def _relist_page(self, kind: Kind | WatchKind, page: ListPage) -> None:
        """Apply one page of a (re)list: its objects that are new or changed now; at its last page, delete
        the objects no page listed. A first page starts afresh (an earlier list that failed half-way leaves
        its objects applied, which is what a watch would have shown, and its deletions undone: done now)."""
        name = kind.kind
        if page.first or name not in self._seen:
            self._seen[name] = set()
        seen = self._seen[name]
        if name in self.extra_kinds:
            for obj in page.items:
                seen.add(_key(obj))
                self._extra(name, obj, deleted=False)
            if page.last:
                for key in [k for k in self.extra[name] if k not in seen]:
                    self._extra(name, {"metadata": {"namespace": key[0], "name": key[1]}}, deleted=True)
                del self._seen[name]
            return
        versions = self._versions.setdefault(name, {})
        for obj in page.items:
            key = _key(obj)
            seen.add(key)
            old = versions.get(key)
            if old is None or old != (_meta(obj).get("resourceVersion") or ""):
                self.apply("MODIFIED", kind, obj)
        if page.last:
            gone = [key for key in versions if key not in seen]
            del self._seen[name]
            for key in gone:
                self.apply("DELETED", kind, {"metadata": {"namespace": key[0], "name": key[1]}})

    @property
    def relisting(self) -> bool:
        """A paged list is half applied: some kind's first page is in, its last is not."""
        return bool(self._seen)

    def model(self) -> Model:
        """The current IR and what changed since the previous call. Core tables are read-only views of
        the live tables (O(1): nothing copied; valid until the next :meth:`apply`, the caller builds
        before applying more); each plugin kind is a snapshot, copied again only after it changed (a
        plugin may compare it with the last build's)."""
        if self._deferred is not None:
            self._flush_endpoints()
        self.dirty = False
        delta = self._delta
        self._delta = {"services": set(), "pods": set(), "port_pods": set(), "namespaces": set(), "extra": set()}
        if delta is None or delta["extra"] or self._extra_view is None:
            self._extra_view = self._extra_model(None if delta is None else delta["extra"])
        return Model(
            services=MappingProxyType(self.services),
            endpoints=MappingProxyType(self.endpoints),
            pods=MappingProxyType(self.pods),
            port_pods=MappingProxyType(self.port_pods),
            extra=self._extra_view,
            namespaces=MappingProxyType(self.namespaces),
            delta=None if delta is None else ModelDelta(**{k: frozenset(v) for k, v in delta.items()}),
        )

    def forget_changes(self) -> None:
        """The next :meth:`model` says "changes unknown" (``delta`` None): call it when the model handed out
        last was not built (a failed build), so the next builder starts from scratch."""
        self._delta = None
        self.dirty = True

    def _extra_model(self, changed: set[str] | None) -> Mapping[str, Mapping[Key, Any]]:
        """Plugin kinds for the model: the kinds in ``changed`` (None: all) copied again, the others'
        copies reused; a kind with ``WatchKind.keep`` shows only the keys it keeps (filtered again
        whenever any kind changed: keep() reads them all)."""
        last = self._extra_view or {}
        extra: dict[str, Mapping[Key, Any]] = {}
        for kind, table in self.extra.items():
            reuse = changed is not None and kind not in changed and kind in last and self.extra_kinds[kind].keep is None
            extra[kind] = last[kind] if reuse else MappingProxyType(dict(table))
        for kind, table in self.extra.items():
            keep = self.extra_kinds[kind].keep
            if keep is not None:
                try:
                    wanted = keep(extra)
                except Exception:  # a plugin's filter must not stop the build
                    log.exception("WatchKind %s keep() failed; none of its objects are in the model", kind)
                    wanted = ()
                extra[kind] = MappingProxyType({key: obj for key, obj in table.items() if key in wanted})
        return MappingProxyType(extra)

    # -- labels -------------------------------------------------------------------------------

    def _parse(self, kind: str, obj: dict[str, Any]) -> Labels:
        raw = _meta(obj).get("labels")
        if not raw or (isinstance(raw, dict) and not any(k.startswith(TRAFFIC_PREFIX) for k in raw)):
            return EMPTY_LABELS  # most objects (every pod but a few): no traffic label, nothing to parse
        parsed, errors = self.labels.parse(ref_of(kind, obj), raw)
        if errors:
            for e in errors:
                metrics.LABEL_ERRORS.labels(kind=kind, label=metrics.declared_label(self.labels, e.key)).inc()
            self.on_label_errors(errors)
        return parsed

    # -- services -----------------------------------------------------------------------------

    def _on_service(self, key: Key, obj: dict[str, Any] | None) -> None:
        if obj is None:
            if self.services.pop(key, None) is not None:
                self._changed("services", key)
            return
        spec = obj.get("spec") or {}
        if spec.get("type") == "ExternalName":
            log.info("service %s/%s is ExternalName: ignored", *key)
            if self.services.pop(key, None) is not None:
                self._changed("services", key)
            return
        labels = self._parse("Service", obj)
        ports = []
        for p in spec.get("ports") or []:
            number = int(p.get("port", 0))
            target = p.get("targetPort", number)
            if isinstance(target, str) and target.isdigit():
                target = int(target)
            ports.append(ServicePort(
                name=p.get("name") or "",
                port=number,
                target_port=target,
                protocol=port_protocol(labels.value(f"{PORT_PREFIX}{number}"), p.get("appProtocol")),
                transport=p.get("protocol") or "TCP",
                app_protocol=p.get("appProtocol"),
            ))
        cluster_ip = spec.get("clusterIP") or None
        headless = cluster_ip == "None"
        svc = Service(
            namespace=key[0], name=key[1], ports=tuple(ports),
            cluster_ip=None if headless else cluster_ip, labels=labels, headless=headless,
            uid=_meta(obj).get("uid") or "",
            load_balancer=load_balancer_addresses(obj.get("status") or {}),
        )
        self._set(self.services, key, svc, "services", key)

    def _set(self, table: dict[Any, Any], key: Any, value: Any, delta: str, delta_key: Any) -> bool:
        """``table[key] = value`` unless an equal value is there (the old object is kept: identity tells
        the builder nothing changed); a change is recorded as ``delta_key`` in the delta's ``delta`` set."""
        old = table.get(key)
        if old is not None and old == value:
            return False
        table[key] = value
        self._changed(delta, delta_key)
        return True

    # -- namespaces ---------------------------------------------------------------------------

    def _on_namespace(self, key: Key, obj: dict[str, Any] | None) -> None:
        name = key[1]
        if obj is None:
            if self.namespaces.pop(name, None) is not None:
                self._changed("namespaces", name)
            return
        ns = Namespace(name=name, labels=self._parse("Namespace", obj), uid=_meta(obj).get("uid") or "")
        self._set(self.namespaces, name, ns, "namespaces", name)

    # -- workloads and pods -------------------------------------------------------------------

    def _workload(self, kind: str, key: Key, obj: dict[str, Any] | None) -> None:
        wkey = (kind, key[0], key[1])
        if not self._workloads.set_labels(wkey, self._parse(kind, obj) if obj is not None else None):
            return
        for pod_key in self._pod_index.of_owner(wkey):
            self._refresh_pod(pod_key)

    def _on_deployment(self, key: Key, obj: dict[str, Any] | None) -> None:
        self._workload("Deployment", key, obj)

    def _on_statefulset(self, key: Key, obj: dict[str, Any] | None) -> None:
        self._workload("StatefulSet", key, obj)

    def _on_daemonset(self, key: Key, obj: dict[str, Any] | None) -> None:
        self._workload("DaemonSet", key, obj)

    def _on_replicaset(self, key: Key, obj: dict[str, Any] | None) -> None:
        if not self._workloads.set_replicaset(key, obj):
            return
        for pod_key in self._pod_index.of_replicaset(key):
            self._refresh_pod(pod_key)

    def _on_pod(self, key: Key, obj: dict[str, Any] | None) -> None:
        index = self._pod_index
        rs_name = controller(obj, "ReplicaSet") if obj is not None else None
        index.set_replicaset(key, (key[0], rs_name) if rs_name else None)
        if obj is None:
            index.forget(key)
            self._pod_src.pop(key, None)
            gone = self.pods.pop(key, None)
            if self.port_pods.pop(key, None) is not None:
                self._changed("port_pods", key)
            if gone is not None:
                index.set_ips(key, gone.ips, ())
                self._changed("pods", key)
                self._refresh_endpoints_of_pod(key)
            return
        own = index.own[key] = self._parse("Pod", obj)
        self._pod_src[key] = PodSource(_pod_from(key, obj, own), _k8s_labels(obj), pod_controllers(obj))
        self._refresh_pod(key)

    def _refresh_pod(self, key: Key) -> None:
        src = self._pod_src.get(key)
        if src is None:
            return
        index = self._pod_index
        owner = self._workloads.owner_of(key, src.controllers)
        index.set_owner(key, owner)
        base = src.base
        labels = self._workloads.labels_of(key[0], owner).merged(base.labels)
        pod = base if labels is base.labels else attrs.evolve(base, labels=labels)
        old = self.pods.get(key)
        index.set_ips(key, old.ips if old else (), pod.ips)
        changed = self._set(self.pods, key, pod, "pods", key)
        if pod.ip and pod.has_port_labels:
            stored = self.pods[key]  # the stored object: identity drives the builder's memo
            if self.port_pods.get(key) is not stored:
                self.port_pods[key] = stored
                self._changed("port_pods", key)
        elif self.port_pods.pop(key, None) is not None:
            self._changed("port_pods", key)
        if changed and (old is None or old.labels != pod.labels or old.sidecar != pod.sidecar):
            self._refresh_endpoints_of_pod(key)

    def pods_with_ip(self, ip: str) -> list[tuple[Pod, dict[str, str]]]:
        """``(pod, all its Kubernetes labels)`` of every pod that has or had ``ip`` among its IPs (any
        phase: access control decides which count; ``ip`` is compared normalised, see
        :func:`~trafficmgr.core.model.normalize_ip`). Called from the xDS threads: single reads only."""
        out = []
        for key in self._pod_index.with_ip(normalize_ip(ip)):
            src = self._pod_src.get(key)
            pod = self.pods.get(key)
            if src is not None and pod is not None:
                out.append((pod, dict(src.k8s_labels)))
        return out

    # -- endpoint slices ----------------------------------------------------------------------

    def _on_endpointslice(self, key: Key, obj: dict[str, Any] | None) -> None:
        service = ((_meta(obj).get("labels") or {}).get(SERVICE_NAME_LABEL) if obj is not None else None)
        if obj is None:
            self._slice_src.pop(key, None)
        else:
            self._slice_src[key] = SliceSource(obj, key[0])
        old_service = self._slices.set_slice(key, service)
        if service:
            self._refresh_endpoints((key[0], service))
        if old_service and old_service != service:
            self._refresh_endpoints((key[0], old_service))

    def _refresh_endpoints_of_pod(self, pod_key: Key) -> None:
        for svc_key in self._slices.services_of_pod(pod_key):
            self._refresh_endpoints(svc_key)

    def _refresh_endpoints(self, svc_key: Key) -> None:
        if self._deferred is not None:
            self._deferred.add(svc_key)
            return
        ns, svc = svc_key
        by_port: dict[str, list[Endpoint]] = {}
        pods_seen: set[Key] = set()
        sources = self._slice_src
        for slice_name in self._slices.slices_of(svc_key):
            sl = sources.get((ns, slice_name))
            if sl is None or not sl.usable:
                continue
            for pname, number in sl.ports:
                bucket = by_port.setdefault(pname, [])
                for addresses, ready, pod_key, node in sl.endpoints:
                    pod = self.pods.get(pod_key) if pod_key else None
                    if pod_key:
                        pods_seen.add(pod_key)
                    for addr in addresses:
                        bucket.append(Endpoint(
                            address=addr, port=number, ready=ready,
                            pod=pod_key[1] if pod_key else None, namespace=ns,
                            node=node, labels=pod.labels if pod else EMPTY_LABELS,
                            sidecar=pod.sidecar if pod else False,
                        ))
        self._slices.set_service_pods(svc_key, pods_seen)
        stale = [(ns, svc, p.name) for p in (self.services.get(svc_key) or Service(ns, svc)).ports if p.name not in by_port]
        previous = self._slices.set_endpoint_keys(svc_key, {(ns, svc, p) for p in by_port})
        stale += [k for k in previous if k[2] not in by_port]
        for k in stale:
            if k not in self.endpoints:
                continue
            del self.endpoints[k]
            self._changed("services", svc_key)
        for pname, eps in by_port.items():
            eps.sort(key=_ENDPOINT_ORDER)
            self._set(self.endpoints, (ns, svc, pname), tuple(eps), "services", svc_key)

    # -- plugin kinds -------------------------------------------------------------------------

    def _extra(self, kind: str, obj: dict[str, Any], deleted: bool) -> None:
        table = self.extra[kind]
        key = _key(obj)
        if deleted:
            if table.pop(key, None) is not None:
                self._changed("extra", kind)
            return
        try:
            value = self.extra_kinds[kind].convert(obj, self.convert_ctx)
        except Exception:  # a plugin converter must not stop the watch
            log.exception("converting %s %s/%s failed; object ignored", kind, *key)
            value = None
        if value is None:
            if table.pop(key, None) is not None:
                self._changed("extra", kind)
            return
        self._set(table, key, value, "extra", kind)
