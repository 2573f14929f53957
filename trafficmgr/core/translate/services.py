"""Model preparation: the effective destinations of a build and what changed since the last one.

Effective services are the model's Services with protocols implied by plugins
(``trafficmgr_port_protocols``) applied, plus pods that label their own ports (``traffic.port.<port>`` on a
Pod). Each destination's state (the Service object and its endpoints) is compared with the last build's,
so the translators after this one work in O(changed services).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from typing import Any

import attrs

from trafficmgr.core.model import (
    HTTP_PROTOCOLS,
    PORT_PREFIX,
    PROTOCOLS,
    Endpoint,
    Model,
    ObjectRef,
    Pod,
    Service,
    ServicePort,
)
from trafficmgr.core.plugins import PluginHost
from trafficmgr.core.translate.memo import Memo

Reporter = Callable[[ObjectRef, str, str], None]


@attrs.frozen(slots=True, eq=False)
class ServiceState:
    """One destination as the translators see it: the effective Service and, per port, its endpoints
    (``model.endpoints`` entries, None when absent)."""

    svc: Service
    eps: tuple[tuple[Endpoint, ...] | None, ...]
    ep_keys: tuple[tuple[str, str, str], ...]

    @property
    def key(self) -> tuple[str, str]:
        return (self.svc.namespace, self.svc.name)

    def ports(self) -> list[ServicePort]:
        """The ports with a protocol the translators serve."""
        return [p for p in self.svc.ports if p.protocol in PROTOCOLS]

    def http_target_ports(self) -> frozenset[int]:
        """The pod ports behind this destination's ``http`` ports (the inbound listener's HTTP chains)."""
        ports: set[int] = set()
        for port, eps in zip(self.svc.ports, self.eps):
            if port.protocol not in HTTP_PROTOCOLS:
                continue
            if self.svc.kind == "Pod":  # a pod's own labeled port
                ports.add(port.port)
            else:
                ports.update(e.port for e in eps or ())
        return frozenset(ports)


class Changes:
    """Every destination of this build (:attr:`states`, sorted: Services by key, then pod destinations by
    key) and the ones that differ from the last build (``replaced``: ``(before, after)``, ``before`` None
    when added; ``removed``)."""

    __slots__ = ("replaced", "removed", "_states", "_all")

    def __init__(self, states: list[ServiceState] | Callable[[], list[ServiceState]],
                 replaced: list[tuple[ServiceState | None, ServiceState]], removed: list[ServiceState]) -> None:
        self.replaced = replaced
        self.removed = removed
        self._states: list[ServiceState] | None = states if isinstance(states, list) else None
        self._all = states

    @property
    def states(self) -> list[ServiceState]:
        """Made on first use (O(destinations)): most builds never ask."""
        if self._states is None:
            assert callable(self._all)
            self._states = self._all()
        return self._states

    @property
    def any(self) -> bool:
        return bool(self.replaced or self.removed)

    def pairs(self) -> list[tuple[ServiceState | None, ServiceState | None]]:
        """``(before, after)`` for every changed destination; ``after`` is None when it was removed."""
        return [*self.replaced, *((old, None) for old in self.removed)]


class ServiceTable:
    """Keeps the last build's destination states; ``update(model)`` returns the :class:`Changes`.

    One decision per destination key (:meth:`_apply`): with ``model.delta`` it is made for the keys the
    delta names (plus those whose plugin-implied protocols changed): O(changes), not O(services); without
    it (first build, hand-made models, after a failed build) for every key, so a full rebuild and an
    incremental one cannot decide differently."""

    def __init__(self, plugins: PluginHost, options: argparse.Namespace, reporter: Reporter) -> None:
        self.plugins = plugins
        self.options = options
        self.reporter = reporter
        self._states: dict[tuple[str, str], ServiceState] = {}
        self._order: list[tuple[str, str]] | None = None  # sorted state keys (None: sort again)
        self._implied: Memo[tuple[str, str], Service] = Memo("implied protocols")
        self._implied_last: dict[tuple[str, str], tuple[tuple[int | str, str], ...]] = {}
        #: The hook's last items and the dict made from them.
        self._implied_made: tuple[list[Any] | None, dict[tuple[str, str], tuple[tuple[int | str, str], ...]]] = (None, {})
        self._pods: Memo[tuple[str, str], Service] = Memo("pod destinations")
        #: Destinations the last update looked at (all of them without a delta): for tests and benchmarks.
        self.examined = 0

    def update(self, model: Model) -> Changes:
        implied = self._implied_protocols(model)
        if model.delta is None or self._order is None and not self._states:
            # Unknown changes, or nothing to be incremental from (a fresh builder: a delta is relative
            # to the model some other builder saw): every key, the previous ones included.
            keys = model.services.keys() | model.port_pods.keys() | self._states.keys()
            changes = self._apply(model, keys, implied)
            self._implied.keep_only(lambda k: k in implied and k in model.services)
            self._pods.keep_only(lambda k: k in model.port_pods and k not in model.services)
            return changes
        delta = model.delta
        keys = set(delta.services) | delta.port_pods
        if implied is not self._implied_last:
            last = self._implied_last
            keys.update(k for k in implied.keys() | last.keys() if implied.get(k) != last.get(k))
        return self._apply(model, keys, implied)

    def _apply(self, model: Model, keys: Iterable[tuple[str, str]],
               implied: dict[tuple[str, str], tuple[tuple[int | str, str], ...]]) -> Changes:
        """The destination at each of ``keys`` now, compared with the last build's (same Service object and
        equal endpoints: unchanged, identity first)."""
        get_eps, states = model.endpoints.get, self._states
        replaced: list[tuple[ServiceState | None, ServiceState]] = []
        removed: list[ServiceState] = []
        examined = 0
        for key in sorted(keys):
            examined += 1
            old = states.get(key)
            svc = self._destination(model, key, implied)
            if svc is None:
                if old is not None:
                    removed.append(states.pop(key))
                    self._order = None
                continue
            if old is not None and old.svc is svc and tuple(map(get_eps, old.ep_keys)) == old.eps:
                continue
            new = _state(svc, get_eps)
            replaced.append((old, new))
            states[key] = new
            if old is None or old.svc.kind != svc.kind:
                self._order = None
        self.examined = examined
        self._implied_last = implied
        return Changes(self._sorted_states, replaced, removed)

    def _sorted_states(self) -> list[ServiceState]:
        if self._order is None:
            self._order = sorted(self._states, key=lambda k: (self._states[k].svc.kind == "Pod", k))
        return [self._states[k] for k in self._order]

    def _implied_protocols(self, model: Model) -> dict[tuple[str, str], tuple[tuple[int | str, str], ...]]:
        """The protocols plugins imply for unlabeled ports (``trafficmgr_port_protocols``), by service: the
        last build's dict (the same object) while the hook's items are equal to the last ones.

        The hook runs on every build (its contract: it may read any part of the model, so no part of the
        delta bounds its result); comparing its items is one list comparison, and only a changed result
        is regrouped and diffed by service."""
        items = self.plugins.collect("trafficmgr_port_protocols", model=model, options=self.options)
        last_items, last = self._implied_made
        if items == last_items:
            return last
        by_service: dict[tuple[str, str], list[tuple[int | str, str]]] = {}
        for ns, name, port, proto in items:
            by_service.setdefault((ns, name), []).append((port, proto))
        implied = {k: tuple(sorted(v, key=str)) for k, v in by_service.items()}
        self._implied_made = (items, implied)
        return implied

    def _destination(self, model: Model, key: tuple[str, str],
                     implied: dict[tuple[str, str], tuple[tuple[int | str, str], ...]]) -> Service | None:
        """The effective destination at ``key`` now: its Service (implied protocols applied), else the pod
        destination of a pod with its own port labels, else None."""
        svc = model.services.get(key)
        pod = model.port_pods.get(key)
        if svc is not None:
            if pod is not None:
                self._conflict(pod)
            self._pods.drop((key,))
            extra = implied.get(key)
            if extra is None:
                self._implied.drop((key,))
                return svc
            return self._implied.get(key, (svc, extra), _apply_implied, svc, extra)
        self._implied.drop((key,))
        if pod is None:
            self._pods.drop((key,))
            return None
        return self._pods.get(key, (pod,), pod_destination, pod)

    def _conflict(self, pod: Pod) -> None:
        self.reporter(ObjectRef("Pod", pod.namespace, pod.name, pod.uid),
                      f"pod {pod.name} has traffic.port labels but a Service of the same name exists; "
                      "its own ports are ignored", "TrafficConfigConflict")


def _state(svc: Service, get_eps: Callable[[tuple[str, str, str]], tuple[Endpoint, ...] | None]) -> ServiceState:
    keys = tuple((svc.namespace, svc.name, p.name) for p in svc.ports)
    return ServiceState(svc, tuple(map(get_eps, keys)), keys)


def pod_destination(pod: Pod) -> Service:
    """A pod's own labeled ports as a headless Service-like destination of kind ``Pod``."""
    ports = []
    for k, v in sorted(pod.labels.items()):
        if k.startswith(PORT_PREFIX):
            number = int(k[len(PORT_PREFIX):])
            ports.append(ServicePort(f"pod-{number}", number, number, v))
    return Service(pod.namespace, pod.name, tuple(ports), cluster_ip=pod.ip, labels=pod.labels,
                   headless=True, uid=pod.uid, kind="Pod")


def _apply_implied(svc: Service, implied: tuple[tuple[int | str, str], ...]) -> Service:
    ports = []
    for p in svc.ports:
        proto = p.protocol
        if proto is None:
            for which, implied_proto in implied:
                if which == p.port or (isinstance(which, str) and which == p.name):
                    proto = implied_proto
                    break
        ports.append(p if proto == p.protocol else attrs.evolve(p, protocol=proto))
    return attrs.evolve(svc, ports=tuple(ports))
