"""The sidecar plan: what the outbound side serves, decided before any Envoy message is built.

Protocol-neutral and testable without protobufs: which destination IP:port goes to which service port
with which protocol, which ports carry HTTP (one route configuration each) or plain TCP, and which ports
need a blocked chain. Two destinations claiming the same IP:port would make Envoy reject the listener:
the first one (in service order) wins and the other is reported.
"""

from __future__ import annotations

import attrs

from trafficmgr.core.model import HTTP_PROTOCOLS, PROTOCOLS, ObjectRef, Service, ServicePort
from trafficmgr.core.translate.memo import Memo
from trafficmgr.core.translate.services import Changes, ServiceState

REASON_CONFLICT = "TrafficConfigConflict"


@attrs.frozen(slots=True)
class Destination:
    """Connections to ``ips`` on ``port.port`` go to ``service``'s port (protocol ``port.protocol``)."""

    service: Service
    port: ServicePort
    ips: tuple[str, ...]
    #: ``(namespace, service, port name or number)``: names the destination's chain and virtual host.
    key: tuple[str, str, str] = attrs.field(eq=False)
    http: bool = attrs.field(eq=False)

    @classmethod
    def of(cls, service: Service, port: ServicePort, ips: tuple[str, ...]) -> Destination:
        return cls(service, port, ips, (service.namespace, service.name, port.name or str(port.port)), port.protocol in HTTP_PROTOCOLS)


@attrs.frozen(slots=True)
class Conflict:
    ref: ObjectRef
    message: str


@attrs.frozen(slots=True)
class SidecarPlan:
    """The outbound side of every sidecar (one plan is shared by all of them)."""

    destinations: tuple[Destination, ...] = ()
    conflicts: tuple[Conflict, ...] = ()

    @property
    def http_ports(self) -> tuple[int, ...]:
        """Ports with HTTP destinations: one route configuration each."""
        return tuple(sorted({d.port.port for d in self.destinations if d.http}))

    @property
    def tcp_ports(self) -> tuple[int, ...]:
        """Ports with TCP (or direct) destinations: the HTTP inspector is skipped there."""
        return tuple(sorted({d.port.port for d in self.destinations if not d.http}))

    @property
    def blocked_ports(self) -> tuple[int, ...]:
        """Ports with destinations where other addresses still need the blocked 404 (Envoy matches the
        destination port before the IP and does not fall back to less specific ports)."""
        return tuple(sorted({d.port.port for d in self.destinations} - set(self.tcp_ports)))


def candidates(state: ServiceState) -> tuple[Destination, ...]:
    """Every destination ``state`` asks for, before conflicts: its address (pods: the pod IP; headless
    services: the endpoints' addresses) on each served port."""
    svc = state.svc
    out = []
    for port, ips in zip(state.ports(), _ips(state)):
        if ips:
            out.append(Destination.of(svc, port, ips))
    return tuple(out)


class Planner:
    """Makes the :class:`SidecarPlan`; the same plan object while no destination changed."""

    def __init__(self) -> None:
        self._candidates: Memo[tuple[str, str], tuple[Destination, ...]] = Memo("destinations")
        self._plan: SidecarPlan | None = None

    def plan(self, changes: Changes) -> SidecarPlan:
        changed = self._plan is None or bool(changes.removed)
        self._candidates.drop(s.key for s in changes.removed)
        for old, new in changes.replaced:
            before = self._candidates.peek(new.key) if old is not None else None
            # Only a headless service's destinations depend on its endpoints.
            inputs = (new.svc, new.eps if new.svc.headless and new.svc.kind != "Pod" else None)
            after = self._candidates.get(new.key, inputs, candidates, new)
            changed = changed or after != before
        if changed or self._plan is None:
            self._plan = self._resolve(changes.states)
        return self._plan

    def _resolve(self, states: list[ServiceState]) -> SidecarPlan:
        seen: dict[tuple[str, int], Destination] = {}
        conflicts: list[Conflict] = []
        out: list[Destination] = []
        peek = self._candidates.peek
        for state in states:
            for dest in peek(state.key) or ():
                port = dest.port.port
                claims = [(ip, port) for ip in dest.ips]
                if seen.keys().isdisjoint(claims):  # the usual case: nothing to resolve
                    seen.update(dict.fromkeys(claims, dest))
                    out.append(dest)
                    continue
                kept = []
                for claim in claims:
                    owner = seen.get(claim)
                    if owner is None:
                        seen[claim] = dest
                        kept.append(claim[0])
                        continue
                    svc = dest.service
                    conflicts.append(Conflict(
                        ObjectRef("Service", svc.namespace, svc.name, svc.uid),
                        f"{claim[0]}:{port} is already served by {owner.service.cluster_name(owner.port)}; "
                        f"ignored for {svc.cluster_name(dest.port)}"))
                if kept:
                    out.append(attrs.evolve(dest, ips=tuple(kept)))
        return SidecarPlan(tuple(out), tuple(conflicts))


def _ips(state: ServiceState) -> tuple[tuple[str, ...], ...]:
    """Per served port (as :meth:`ServiceState.ports`), the addresses a client dials."""
    svc = state.svc
    out: list[tuple[str, ...]] = []
    for port, eps in zip(svc.ports, state.eps):
        if port.protocol not in PROTOCOLS:
            continue
        if svc.kind == "Pod" or not svc.headless:
            out.append((svc.cluster_ip,) if svc.cluster_ip else ())
        else:
            out.append(tuple(sorted({e.address for e in eps or ()})))
    return tuple(out)
