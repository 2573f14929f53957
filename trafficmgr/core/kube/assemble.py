"""Raw Kubernetes objects -> the IR, incrementally.

The :class:`Assembler` keeps the current IR objects and replaces only those an event affects; an object
whose IR did not change keeps its identity, which is what makes the builder incremental. It is owned by
one thread (the sync loop); the xDS resolver only reads ``pods`` (single dict lookups).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from trafficmgr.core import metrics
from trafficmgr.core.contrib import WatchKind
from trafficmgr.core.kube.client import Kind
from trafficmgr.core.labels import LabelRegistry
from trafficmgr.core.model import (
    EMPTY_LABELS,
    PORT_PREFIX,
    Endpoint,
    LabelError,
    Labels,
    Model,
    ObjectRef,
    Pod,
    Service,
    ServicePort,
    load_balancer_addresses,
)

log = logging.getLogger(__name__)

SERVICE = Kind("Service", "v1", "services")
ENDPOINT_SLICE = Kind("EndpointSlice", "discovery.k8s.io/v1", "endpointslices")
POD = Kind("Pod", "v1", "pods")
REPLICA_SET = Kind("ReplicaSet", "apps/v1", "replicasets")
DEPLOYMENT = Kind("Deployment", "apps/v1", "deployments")
STATEFUL_SET = Kind("StatefulSet", "apps/v1", "statefulsets")
DAEMON_SET = Kind("DaemonSet", "apps/v1", "daemonsets")
CORE_KINDS: tuple[Kind, ...] = (SERVICE, ENDPOINT_SLICE, POD, REPLICA_SET, DEPLOYMENT, STATEFUL_SET, DAEMON_SET)
SERVICE_NAME_LABEL = "kubernetes.io/service-name"

Key = tuple[str, str]


def _meta(obj: dict[str, Any]) -> dict[str, Any]:
    return obj.get("metadata") or {}


def _key(obj: dict[str, Any]) -> Key:
    m = _meta(obj)
    return (m.get("namespace") or "", m.get("name") or "")


def ref_of(kind: str, obj: dict[str, Any]) -> ObjectRef:
    m = _meta(obj)
    return ObjectRef(kind, m.get("namespace") or "", m.get("name") or "", m.get("uid") or "", m.get("resourceVersion") or "")


class ConvertContext:
    """What a plugin's ``WatchKind.convert`` receives besides the raw object."""

    def __init__(self, labels: LabelRegistry, report: Callable[[ObjectRef, str, str], None]) -> None:
        self.labels = labels
        self.report = report


class Assembler:
    """Applies watch events to the IR. ``dirty`` is set whenever the model changed."""

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
        self._raw: dict[str, dict[Key, dict[str, Any]]] = {k.kind: {} for k in CORE_KINDS}
        self._pod_own: dict[Key, Labels] = {}
        self._pod_owner: dict[Key, tuple[str, str] | None] = {}  # pod -> (workload kind, name)
        self._rs_owner: dict[Key, str | None] = {}  # replicaset -> deployment name
        self._workload_labels: dict[tuple[str, str, str], Labels] = {}
        self._owner_pods: dict[tuple[str, str, str], set[Key]] = {}
        self._slice_service: dict[Key, str] = {}
        self._service_slices: dict[Key, set[str]] = {}
        self._pod_services: dict[Key, set[Key]] = {}
        self._service_pods: dict[Key, set[Key]] = {}
        self._rs_pods: dict[Key, set[Key]] = {}  # ReplicaSet -> its pods
        self._pod_rs: dict[Key, Key] = {}  # pod -> its ReplicaSet (the reverse, so a delete is O(1))
        self._endpoint_keys: dict[Key, set[tuple[str, str, str]]] = {}
        self._deferred: set[Key] | None = None  # during a relist: services whose endpoints wait for its end
        self._ip_pods: dict[str, set[Key]] = {}
        self.port_pods: dict[Key, Pod] = {}
        self.dirty = True

    # -- entry points -------------------------------------------------------------------------

    def apply(self, etype: str, kind: Kind | WatchKind, obj: Any) -> None:
        """Apply one watch event (``ADDED``/``MODIFIED``/``DELETED``) or a ``RELIST`` (obj = items)."""
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
        raw = self._raw.setdefault(kind.kind, {})
        if etype == "DELETED":
            raw.pop(key, None)
            handler(key, None)
        else:
            raw[key] = obj
            handler(key, obj)

    def _relist(self, kind: Kind | WatchKind, items: list[dict[str, Any]]) -> None:
        # A relist touches many objects of one service (its pods, its slices): refresh each service's
        # endpoints once at the end instead of once per object (10 pods per service: 10x fewer).
        self._deferred = set()
        try:
            self._relist_items(kind, items)
        finally:
            deferred, self._deferred = self._deferred, None
            for svc_key in sorted(deferred):
                self._refresh_endpoints(svc_key)

    def _relist_items(self, kind: Kind | WatchKind, items: list[dict[str, Any]]) -> None:
        fresh = {_key(o): o for o in items}
        if kind.kind in self.extra_kinds:
            for key in list(self.extra[kind.kind]):
                if key not in fresh:
                    self._extra(kind.kind, {"metadata": {"namespace": key[0], "name": key[1]}}, deleted=True)
            for obj in fresh.values():
                self._extra(kind.kind, obj, deleted=False)
            return
        raw = self._raw.setdefault(kind.kind, {})
        for key in list(raw):
            if key not in fresh:
                self.apply("DELETED", kind, raw[key])
        for key, obj in fresh.items():
            old = raw.get(key)
            if old is None or _meta(old).get("resourceVersion") != _meta(obj).get("resourceVersion"):
                self.apply("MODIFIED", kind, obj)

    def model(self) -> Model:
        """A consistent copy of the current IR (cheap: shallow dict copies)."""
        self.dirty = False
        return Model(
            services=dict(self.services),
            endpoints=dict(self.endpoints),
            pods=dict(self.pods),
            port_pods=dict(self.port_pods),
            extra=self._extra_model(),
        )

    def _extra_model(self) -> dict[str, dict[Key, Any]]:
        """Plugin kinds for the model; a kind with ``WatchKind.keep`` shows only the keys it keeps."""
        extra = {k: dict(v) for k, v in self.extra.items()}
        for kind, table in extra.items():
            keep = self.extra_kinds[kind].keep
            if keep is not None:
                try:
                    wanted = keep(extra)
                except Exception:  # a plugin's filter must not stop the build
                    log.exception("WatchKind %s keep() failed; none of its objects are in the model", kind)
                    wanted = ()
                extra[kind] = {key: obj for key, obj in table.items() if key in wanted}
        return extra

    # -- labels -------------------------------------------------------------------------------

    def _parse(self, kind: str, obj: dict[str, Any]) -> Labels:
        parsed, errors = self.labels.parse(ref_of(kind, obj), _meta(obj).get("labels"))
        if errors:
            for e in errors:
                metrics.LABEL_ERRORS.labels(kind=kind, label=e.key).inc()
            self.on_label_errors(errors)
        return parsed

    # -- services -----------------------------------------------------------------------------

    def _on_service(self, key: Key, obj: dict[str, Any] | None) -> None:
        if obj is None:
            if self.services.pop(key, None) is not None:
                self.dirty = True
            return
        spec = obj.get("spec") or {}
        if spec.get("type") == "ExternalName":
            log.info("service %s/%s is ExternalName: ignored", *key)
            if self.services.pop(key, None) is not None:
                self.dirty = True
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
                protocol=labels.value(f"{PORT_PREFIX}{number}"),
                transport=p.get("protocol") or "TCP",
            ))
        cluster_ip = spec.get("clusterIP") or None
        headless = cluster_ip == "None"
        svc = Service(
            namespace=key[0], name=key[1], ports=tuple(ports),
            cluster_ip=None if headless else cluster_ip, labels=labels, headless=headless,
            uid=_meta(obj).get("uid") or "",
            load_balancer=load_balancer_addresses(obj.get("status") or {}),
        )
        self._set(self.services, key, svc)

    def _set(self, table: dict[Any, Any], key: Any, value: Any) -> bool:
        old = table.get(key)
        if old is not None and old == value:
            return False
        table[key] = value
        self.dirty = True
        return True

    # -- workloads and pods -------------------------------------------------------------------

    def _workload(self, kind: str, key: Key, obj: dict[str, Any] | None) -> None:
        wkey = (kind, key[0], key[1])
        labels = self._parse(kind, obj) if obj is not None else EMPTY_LABELS
        if self._workload_labels.get(wkey, EMPTY_LABELS) == labels:
            return
        if obj is None:
            self._workload_labels.pop(wkey, None)
        else:
            self._workload_labels[wkey] = labels
        for pod_key in list(self._owner_pods.get(wkey, ())):
            self._refresh_pod(pod_key)

    def _on_deployment(self, key: Key, obj: dict[str, Any] | None) -> None:
        self._workload("Deployment", key, obj)

    def _on_statefulset(self, key: Key, obj: dict[str, Any] | None) -> None:
        self._workload("StatefulSet", key, obj)

    def _on_daemonset(self, key: Key, obj: dict[str, Any] | None) -> None:
        self._workload("DaemonSet", key, obj)

    def _on_replicaset(self, key: Key, obj: dict[str, Any] | None) -> None:
        owner = None
        if obj is not None:
            owner = _controller(obj, "Deployment")
        if self._rs_owner.get(key) == owner and (obj is not None or key not in self._rs_owner):
            return
        if obj is None:
            self._rs_owner.pop(key, None)
        else:
            self._rs_owner[key] = owner
        for pod_key in list(self._rs_pods.get(key, ())):
            self._refresh_pod(pod_key)

    def _pod_workload(self, key: Key, obj: dict[str, Any]) -> tuple[str, str] | None:
        for kind in ("StatefulSet", "DaemonSet"):
            name = _controller(obj, kind)
            if name:
                return (kind, name)
        rs = _controller(obj, "ReplicaSet")
        if rs:
            deploy = self._rs_owner.get((key[0], rs))
            if deploy:
                return ("Deployment", deploy)
        return None

    def _on_pod(self, key: Key, obj: dict[str, Any] | None) -> None:
        rs_name = _controller(obj, "ReplicaSet") if obj is not None else None
        rs = (key[0], rs_name) if rs_name else None
        _move(self._rs_pods, key, self._pod_rs.pop(key, None), rs)
        if rs is not None:
            self._pod_rs[key] = rs
        if obj is None:
            self._pod_own.pop(key, None)
            owner = self._pod_owner.pop(key, None)
            _move(self._owner_pods, key, (owner[0], key[0], owner[1]) if owner else None, None)
            gone = self.pods.pop(key, None)
            self.port_pods.pop(key, None)
            if gone is not None:
                self._index_ip(key, gone.ip, None)
                self.dirty = True
                self._refresh_endpoints_of_pod(key)
            return
        self._pod_own[key] = self._parse("Pod", obj)
        self._refresh_pod(key)

    def _refresh_pod(self, key: Key) -> None:
        obj = self._raw["Pod"].get(key)
        if obj is None:
            return
        owner = self._pod_workload(key, obj)
        old_owner = self._pod_owner.get(key)
        if old_owner != owner:
            _move(self._owner_pods, key, (old_owner[0], key[0], old_owner[1]) if old_owner else None,
                  (owner[0], key[0], owner[1]) if owner else None)
            self._pod_owner[key] = owner
        own = self._pod_own.get(key, EMPTY_LABELS)
        workload = self._workload_labels.get((owner[0], key[0], owner[1]), EMPTY_LABELS) if owner else EMPTY_LABELS
        status = obj.get("status") or {}
        spec = obj.get("spec") or {}
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
        ports = tuple(
            (p.get("name") or "", int(p.get("containerPort", 0)))
            for c in spec.get("containers") or []
            for p in c.get("ports") or []
        )
        pod = Pod(
            namespace=key[0], name=key[1], ip=status.get("podIP") or None, node=spec.get("nodeName") or None,
            ready=ready, labels=workload.merged(own), uid=_meta(obj).get("uid") or "", ports=ports,
        )
        old = self.pods.get(key)
        self._index_ip(key, old.ip if old else None, pod.ip)
        changed = self._set(self.pods, key, pod)
        if pod.ip and pod.has_port_labels:
            self.port_pods[key] = self.pods[key]  # the stored object: identity drives the builder's memo
        else:
            self.port_pods.pop(key, None)
        if changed and (old is None or old.labels != pod.labels):
            self._refresh_endpoints_of_pod(key)

    def _index_ip(self, key: Key, old_ip: str | None, new_ip: str | None) -> None:
        _move(self._ip_pods, key, old_ip or None, new_ip or None)

    def pods_with_ip(self, ip: str) -> list[tuple[str, str, dict[str, str]]]:
        """``(namespace, name, all labels)`` of every pod whose IP is ``ip`` (for access control)."""
        out = []
        for key in list(self._ip_pods.get(ip, ())):
            raw = self._raw["Pod"].get(key)
            if raw is not None:
                out.append((key[0], key[1], dict(_meta(raw).get("labels") or {})))
        return out

    # -- endpoint slices ----------------------------------------------------------------------

    def _on_endpointslice(self, key: Key, obj: dict[str, Any] | None) -> None:
        old_service = self._slice_service.pop(key, None)
        if old_service is not None:
            self._service_slices.get((key[0], old_service), set()).discard(key[1])
        service = ((_meta(obj).get("labels") or {}).get(SERVICE_NAME_LABEL) if obj is not None else None)
        if service:
            self._slice_service[key] = service
            self._service_slices.setdefault((key[0], service), set()).add(key[1])
            self._refresh_endpoints((key[0], service))
        if old_service and old_service != service:
            self._refresh_endpoints((key[0], old_service))

    def _refresh_endpoints_of_pod(self, pod_key: Key) -> None:
        for svc_key in list(self._pod_services.get(pod_key, ())):
            self._refresh_endpoints(svc_key)

    def _refresh_endpoints(self, svc_key: Key) -> None:
        if self._deferred is not None:
            self._deferred.add(svc_key)
            return
        ns, svc = svc_key
        by_port: dict[str, list[Endpoint]] = {}
        pods_seen: set[Key] = set()
        raw_slices = self._raw["EndpointSlice"]
        for slice_name in sorted(self._service_slices.get(svc_key, ())):
            sl = raw_slices.get((ns, slice_name))
            if sl is None:
                continue
            if sl.get("addressType", "IPv4") not in ("IPv4", "IPv6"):
                continue
            for port in sl.get("ports") or []:
                number = port.get("port")
                if number is None:
                    continue
                pname = port.get("name") or ""
                bucket = by_port.setdefault(pname, [])
                for ep in sl.get("endpoints") or []:
                    cond = ep.get("conditions") or {}
                    ready = cond.get("ready") is not False and not cond.get("terminating", False)
                    target = ep.get("targetRef") or {}
                    pod_key = (target.get("namespace") or ns, target.get("name") or "") if target.get("kind") == "Pod" else None
                    pod = self.pods.get(pod_key) if pod_key else None
                    if pod_key:
                        pods_seen.add(pod_key)
                    for addr in ep.get("addresses") or []:
                        bucket.append(Endpoint(
                            address=addr, port=int(number), ready=ready,
                            pod=pod_key[1] if pod_key else None, namespace=ns,
                            node=ep.get("nodeName"), labels=pod.labels if pod else EMPTY_LABELS,
                        ))
        previous = self._service_pods.get(svc_key, set())
        for pod_key in pods_seen - previous:
            self._pod_services.setdefault(pod_key, set()).add(svc_key)
        for pod_key in previous - pods_seen:
            services = self._pod_services.get(pod_key)
            if services is not None:
                services.discard(svc_key)
                if not services:
                    del self._pod_services[pod_key]
        if pods_seen:
            self._service_pods[svc_key] = pods_seen
        else:
            self._service_pods.pop(svc_key, None)
        stale = [(ns, svc, p.name) for p in (self.services.get(svc_key) or Service(ns, svc)).ports if p.name not in by_port]
        stale += [k for k in self._endpoint_keys.get(svc_key, ()) if k[2] not in by_port]
        self._endpoint_keys[svc_key] = {(ns, svc, p) for p in by_port}
        for k in stale:
            if k not in self.endpoints:
                continue
            del self.endpoints[k]
            self.dirty = True
        for pname, eps in by_port.items():
            eps.sort(key=lambda e: (e.address, e.port))
            self._set(self.endpoints, (ns, svc, pname), tuple(eps))

    # -- plugin kinds -------------------------------------------------------------------------

    def _extra(self, kind: str, obj: dict[str, Any], deleted: bool) -> None:
        table = self.extra[kind]
        key = _key(obj)
        if deleted:
            if table.pop(key, None) is not None:
                self.dirty = True
            return
        try:
            value = self.extra_kinds[kind].convert(obj, self.convert_ctx)
        except Exception:  # a plugin converter must not stop the watch
            log.exception("converting %s %s/%s failed; object ignored", kind, *key)
            value = None
        if value is None:
            if table.pop(key, None) is not None:
                self.dirty = True
            return
        self._set(table, key, value)


def _move(index: dict[Any, set[Key]], key: Key, old: Any, new: Any) -> None:
    """Move ``key`` from the set under ``old`` to the one under ``new`` (None: none) in a one-to-many
    index; an emptied set is dropped, so the index holds only live groups."""
    if old == new:
        return
    if old is not None:
        keys = index.get(old)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del index[old]
    if new is not None:
        index.setdefault(new, set()).add(key)


def _controller(obj: dict[str, Any], kind: str) -> str | None:
    for ref in _meta(obj).get("ownerReferences") or []:
        if ref.get("kind") == kind and ref.get("controller", True):
            name: str | None = ref.get("name")
            return name
    return None
