"""The :class:`~trafficmgr.core.kube.assemble.Assembler`'s reverse indexes: which pods to refresh when a
workload, a ReplicaSet or an IP changes (:class:`WorkloadIndex`, :class:`PodIndex`), and which services'
endpoints to rebuild when a slice or a pod changes (:class:`SliceIndex`).

Plain bookkeeping over object keys: no IR object is built here. Every one-to-many map holds only live
groups (an emptied set is dropped, see :func:`move`), so a deleted object leaves no trace.
"""

from __future__ import annotations

from typing import Any

from trafficmgr.core.model import EMPTY_LABELS, Labels

Key = tuple[str, str]  # (namespace, name)
WorkloadKey = tuple[str, str, str]  # (kind, namespace, name)
EndpointKey = tuple[str, str, str]  # (namespace, service, port name)


def move(index: dict[Any, set[Key]], key: Key, old: Any, new: Any) -> None:
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


def controller(obj: dict[str, Any], kind: str) -> str | None:
    """The name of ``obj``'s controlling owner of ``kind`` (None: it has none)."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("kind") == kind and ref.get("controller", True):
            name: str | None = ref.get("name")
            return name
    return None


#: A pod's controlling StatefulSet, DaemonSet and ReplicaSet names ("": none), see :func:`pod_controllers`.
Controllers = tuple[str, str, str]
NO_CONTROLLERS: Controllers = ("", "", "")


def pod_controllers(obj: dict[str, Any]) -> Controllers:
    """What :meth:`WorkloadIndex.owner_of` needs of a raw pod: its controlling owners of the kinds a pod
    inherits labels through (the pod's raw object is not kept, see the assembler)."""
    refs = (obj.get("metadata") or {}).get("ownerReferences")
    if not refs:
        return NO_CONTROLLERS
    return (controller(obj, "StatefulSet") or "", controller(obj, "DaemonSet") or "", controller(obj, "ReplicaSet") or "")


def _workload_key(namespace: str, owner: tuple[str, str] | None) -> WorkloadKey | None:
    return (owner[0], namespace, owner[1]) if owner else None


class WorkloadIndex:
    """The labels of every workload (Deployment, StatefulSet, DaemonSet) and the Deployment that owns
    each ReplicaSet: what a pod inherits its labels from."""

    __slots__ = ("labels", "rs_owner")

    def __init__(self) -> None:
        self.labels: dict[WorkloadKey, Labels] = {}
        self.rs_owner: dict[Key, str | None] = {}  # replicaset -> deployment name

    def set_labels(self, wkey: WorkloadKey, labels: Labels | None) -> bool:
        """Record a workload's labels (None: it is gone); True if they changed."""
        if self.labels.get(wkey, EMPTY_LABELS) == (EMPTY_LABELS if labels is None else labels):
            return False
        if labels is None:
            self.labels.pop(wkey, None)
        else:
            self.labels[wkey] = labels
        return True

    def set_replicaset(self, key: Key, obj: dict[str, Any] | None) -> bool:
        """Record a ReplicaSet's Deployment (``obj`` None: it is gone); True if that changed."""
        owner = controller(obj, "Deployment") if obj is not None else None
        if self.rs_owner.get(key) == owner and (obj is not None or key not in self.rs_owner):
            return False
        if obj is None:
            self.rs_owner.pop(key, None)
        else:
            self.rs_owner[key] = owner
        return True

    def owner_of(self, key: Key, controllers: Controllers) -> tuple[str, str] | None:
        """The workload ``(kind, name)`` of the pod ``key`` whose controllers are ``controllers`` (see
        :func:`pod_controllers`; a ReplicaSet's pod: its Deployment)."""
        sts, ds, rs = controllers
        if sts:
            return ("StatefulSet", sts)
        if ds:
            return ("DaemonSet", ds)
        if rs:
            deploy = self.rs_owner.get((key[0], rs))
            if deploy:
                return ("Deployment", deploy)
        return None

    def labels_of(self, namespace: str, owner: tuple[str, str] | None) -> Labels:
        """The labels of the workload ``owner`` in ``namespace`` (none: empty)."""
        return self.labels.get((owner[0], namespace, owner[1]), EMPTY_LABELS) if owner else EMPTY_LABELS


class PodIndex:
    """Per pod: its own labels, its workload, its ReplicaSet and its IP; and the reverse maps that find
    the pods of a workload, of a ReplicaSet or with an IP without scanning every pod."""

    __slots__ = ("own", "owner", "by_owner", "rs", "by_rs", "by_ip")

    def __init__(self) -> None:
        self.own: dict[Key, Labels] = {}  # pod -> its own labels
        self.owner: dict[Key, tuple[str, str] | None] = {}  # pod -> (workload kind, name)
        self.by_owner: dict[WorkloadKey, set[Key]] = {}
        self.rs: dict[Key, Key] = {}  # pod -> its ReplicaSet (the reverse of by_rs, so a delete is O(1))
        self.by_rs: dict[Key, set[Key]] = {}  # ReplicaSet -> its pods
        self.by_ip: dict[str, set[Key]] = {}

    def set_replicaset(self, key: Key, rs: Key | None) -> None:
        """The pod ``key`` now belongs to ReplicaSet ``rs`` (None: to none)."""
        move(self.by_rs, key, self.rs.pop(key, None), rs)
        if rs is not None:
            self.rs[key] = rs

    def set_owner(self, key: Key, owner: tuple[str, str] | None) -> None:
        """The pod ``key`` now belongs to workload ``owner`` (None: to none)."""
        old = self.owner.get(key)
        if old != owner:
            move(self.by_owner, key, _workload_key(key[0], old), _workload_key(key[0], owner))
            self.owner[key] = owner

    def set_ips(self, key: Key, old_ips: tuple[str, ...], new_ips: tuple[str, ...]) -> None:
        """The pod ``key`` had ``old_ips`` and now has ``new_ips`` (normalised; dual stack: several)."""
        if old_ips == new_ips:
            return
        for ip in old_ips:
            if ip not in new_ips:
                move(self.by_ip, key, ip, None)
        for ip in new_ips:
            if ip not in old_ips:
                move(self.by_ip, key, None, ip)

    def forget(self, key: Key) -> None:
        """The pod is gone: drop its labels and its workload (its ReplicaSet and IP are moved by the caller)."""
        self.own.pop(key, None)
        move(self.by_owner, key, _workload_key(key[0], self.owner.pop(key, None)), None)

    def of_owner(self, wkey: WorkloadKey) -> list[Key]:
        return list(self.by_owner.get(wkey, ()))

    def of_replicaset(self, key: Key) -> list[Key]:
        return list(self.by_rs.get(key, ()))

    def with_ip(self, ip: str) -> list[Key]:
        return list(self.by_ip.get(ip, ()))


class SliceIndex:
    """The EndpointSlices of each service, the pods each service's slices name (and the reverse), and the
    endpoint keys each service produced (to drop the stale ones)."""

    __slots__ = ("slice_service", "service_slices", "pod_services", "service_pods", "endpoint_keys")

    def __init__(self) -> None:
        self.slice_service: dict[Key, str] = {}  # slice -> its service's name
        self.service_slices: dict[Key, set[str]] = {}  # service -> its slices' names
        self.pod_services: dict[Key, set[Key]] = {}
        self.service_pods: dict[Key, set[Key]] = {}
        self.endpoint_keys: dict[Key, set[EndpointKey]] = {}

    def set_slice(self, key: Key, service: str | None) -> str | None:
        """The slice ``key`` now belongs to ``service`` (None or ``""``: to none); returns its previous one."""
        old = self.slice_service.pop(key, None)
        if old is not None:
            self.service_slices.get((key[0], old), set()).discard(key[1])
        if service:
            self.slice_service[key] = service
            self.service_slices.setdefault((key[0], service), set()).add(key[1])
        return old

    def slices_of(self, svc_key: Key) -> list[str]:
        """The names of the service's slices, sorted."""
        return sorted(self.service_slices.get(svc_key, ()))

    def services_of_pod(self, pod_key: Key) -> list[Key]:
        return list(self.pod_services.get(pod_key, ()))

    def set_service_pods(self, svc_key: Key, pods: set[Key]) -> None:
        """The service's slices now name exactly ``pods``."""
        previous = self.service_pods.get(svc_key, set())
        for pod_key in pods - previous:
            self.pod_services.setdefault(pod_key, set()).add(svc_key)
        for pod_key in previous - pods:
            services = self.pod_services.get(pod_key)
            if services is not None:
                services.discard(svc_key)
                if not services:
                    del self.pod_services[pod_key]
        if pods:
            self.service_pods[svc_key] = pods
        else:
            self.service_pods.pop(svc_key, None)

    def set_endpoint_keys(self, svc_key: Key, keys: set[EndpointKey]) -> set[EndpointKey]:
        """The service now produces the endpoints ``keys``; returns those it produced before."""
        old = self.endpoint_keys.get(svc_key, set())
        self.endpoint_keys[svc_key] = keys
        return old
