"""Model preparation: the effective destinations of a build and what changed since the last one.

Effective services are the model's Services with protocols implied by plugins
(``trafficmgr_port_protocols``) applied, plus pods that label their own ports (``traffic.port.<port>`` on a
Pod). Each destination's state (the Service object and its endpoints) is compared with the last build's,
so the translators after this one work in O(changed services).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

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


@attrs.define
class Changes:
    """Every destination of this build (sorted by key) and the ones that differ from the last build."""

    states: list[ServiceState]
    replaced: list[tuple[ServiceState | None, ServiceState]]
    removed: list[ServiceState]

    @property
    def any(self) -> bool:
        return bool(self.replaced or self.removed)

    def pairs(self) -> list[tuple[ServiceState | None, ServiceState | None]]:
        """``(before, after)`` for every changed destination; ``after`` is None when it was removed."""
        return [*self.replaced, *((old, None) for old in self.removed)]


class ServiceTable:
    """Keeps the last build's destination states; ``update(model)`` returns the :class:`Changes`."""

    def __init__(self, plugins: PluginHost, options: argparse.Namespace, reporter: Reporter) -> None:
        self.plugins = plugins
        self.options = options
        self.reporter = reporter
        self._states: dict[tuple[str, str], ServiceState] = {}
        self._implied: Memo[tuple[str, str], Service] = Memo("implied protocols")
        self._pods: Memo[tuple[str, str], Service] = Memo("pod destinations")

    def update(self, model: Model) -> Changes:
        get_eps, previous = model.endpoints.get, self._states
        states: list[ServiceState] = []
        replaced: list[tuple[ServiceState | None, ServiceState]] = []
        added = False
        for svc in self._effective(model):
            state = previous.get((svc.namespace, svc.name))
            # Unchanged when the same Service object and equal endpoints (identity first, in C).
            if state is None or state.svc is not svc or tuple(map(get_eps, state.ep_keys)) != state.eps:
                keys = tuple((svc.namespace, svc.name, p.name) for p in svc.ports)
                added = added or state is None
                new = ServiceState(svc, tuple(map(get_eps, keys)), keys)
                replaced.append((state, new))
                state = new
            states.append(state)
        removed: list[ServiceState] = []
        if added or len(states) != len(previous):
            live = {s.key: s for s in states}
            removed = [s for k, s in previous.items() if k not in live]
            self._states = live
        else:  # the same destinations: update the replaced ones in place, O(changes)
            for _, new in replaced:
                previous[new.key] = new
        return Changes(states, replaced, removed)

    def _effective(self, model: Model) -> list[Service]:
        """Services sorted by key, with protocols implied by plugins applied, then pod destinations."""
        implied: dict[tuple[str, str], list[tuple[int | str, str]]] = {}
        for ns, name, port, proto in self.plugins.collect("trafficmgr_port_protocols", model=model, options=self.options):
            implied.setdefault((ns, name), []).append((port, proto))
        out: list[Service] = []
        for key in sorted(model.services):
            svc = model.services[key]
            if key in implied:
                extra = tuple(sorted(implied[key], key=str))
                svc = self._implied.get(key, (svc, extra), _apply_implied, svc, extra)
            out.append(svc)
        self._implied.keep_only(lambda k: k in implied and k in model.services)
        out.extend(self._pod_destinations(model))
        return out

    def _pod_destinations(self, model: Model) -> list[Service]:
        """Service-like destinations for pods with their own ``traffic.port.<port>`` labels."""
        out: list[Service] = []
        for key, pod in model.port_pods.items():
            if key in model.services:
                self.reporter(ObjectRef("Pod", pod.namespace, pod.name, pod.uid),
                              f"pod {pod.name} has traffic.port labels but a Service of the same name exists; "
                              "its own ports are ignored", "TrafficConfigConflict")
                continue
            out.append(self._pods.get(key, (pod,), pod_destination, pod))
        self._pods.keep_only(lambda k: k in model.port_pods and k not in model.services)
        return sorted(out, key=lambda s: (s.namespace, s.name))


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
