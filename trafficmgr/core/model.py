"""The intermediate representation (IR) between Kubernetes and Envoy.

Every class is a frozen ``attrs`` class with slots. Plugins and the builder read these objects, never raw
Kubernetes dicts. Objects are replaced, never mutated: the Kubernetes layer keeps the same instance for an
object that did not change, so the builder can detect change with an identity check (``is``) and rebuild
only what a change affects.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping
from typing import Any

import attrs

SIDECAR = "sidecar"
GATEWAY = "gateway"
#: The role of resources every view shares (clusters and endpoints): their hooks see this, not a view's.
SHARED = "shared"
ROLES = (SIDECAR, GATEWAY)
#: ``traffic.port.<port>`` labels (declared by the core's own labels, ``corelabels``).
PORT_PREFIX = "traffic.port."
#: Traffic protocols of a port. ``http2`` and ``grpc`` are HTTP routed per request, sent upstream as HTTP/2.
HTTP, HTTP2, GRPC, TCP, DIRECT = "http", "http2", "grpc", "tcp", "direct"
PROTOCOLS = (HTTP, HTTP2, GRPC, TCP, DIRECT)
HTTP_PROTOCOLS = frozenset({HTTP, HTTP2, GRPC})
#: Protocols whose upstream connections speak HTTP/2 (h2c), whatever the client spoke.
HTTP2_UPSTREAM = frozenset({HTTP2, GRPC})
#: Service ``appProtocol`` values (Kubernetes' standard ones and plain names) -> traffic protocol. Any other
#: value means "unknown": like a port without a label (blocked for sidecars).
APP_PROTOCOLS = {
    "http": HTTP, "kubernetes.io/ws": HTTP, "kubernetes.io/wss": HTTP,
    "kubernetes.io/h2c": HTTP2, "http2": HTTP2, "h2c": HTTP2, "grpc": GRPC, "tcp": TCP,
}


def port_protocol(label: str | None, app_protocol: str | None) -> str | None:
    """A port's traffic protocol: its ``traffic.port.<port>`` label wins, else its ``appProtocol``
    (case-insensitive, see :data:`APP_PROTOCOLS`), else None."""
    if label is not None:
        return label
    return APP_PROTOCOLS.get((app_protocol or "").lower())
GATEWAY_CLUSTER = "traffic-ingress"


class Labels(Mapping[str, Any]):
    """Parsed, valid ``traffic.*`` label values of one object (read-only mapping key -> parsed value).

    Only labels that were present *and* valid are here; look defaults up with :meth:`value`.
    """

    __slots__ = ("_items", "_dict", "_hash")

    def __init__(self, items: Mapping[str, Any] | None = None) -> None:
        self._dict: dict[str, Any] = dict(sorted((items or {}).items()))
        self._items = tuple(self._dict.items())
        self._hash: int | None = None

    def __getitem__(self, key: str) -> Any:
        return self._dict[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._dict)

    def __len__(self) -> int:
        return len(self._dict)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Labels):
            return self._items == other._items
        return NotImplemented

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(self._items)
        return self._hash

    def __repr__(self) -> str:
        return f"Labels({self._dict!r})"

    def value(self, key: str, default: Any = None) -> Any:
        """The parsed value of ``key``, or ``default`` when absent/invalid."""
        return self._dict.get(key, default)

    def merged(self, override: Labels) -> Labels:
        """A new Labels where ``override`` wins over ``self``."""
        if not self._dict:
            return override
        if not override._dict:
            return self
        return Labels({**self._dict, **override._dict})


EMPTY_LABELS = Labels()


@attrs.frozen(slots=True)
class ObjectRef:
    """Identity of a Kubernetes object, used for events and error reports."""

    kind: str
    namespace: str
    name: str
    uid: str = ""
    resource_version: str = ""

    def __str__(self) -> str:
        return f"{self.kind}/{self.namespace}/{self.name}" if self.namespace else f"{self.kind}/{self.name}"


#: Event reason of a label value that was ignored (its default applies).
INVALID_LABEL = "InvalidTrafficLabel"
#: Event reason of a label value that was limited to what Envoy takes (the limit applies).
CLAMPED_LABEL = "TrafficConfigClamped"


@attrs.frozen(slots=True)
class LabelError:
    """A ``traffic.*`` label value on one object that does not apply as written: with ``reason``
    :data:`INVALID_LABEL` it was ignored and its default applies; with :data:`CLAMPED_LABEL` it was valid
    but beyond what Envoy takes, and the limit applies (``message`` says which)."""

    ref: ObjectRef
    key: str
    value: str
    message: str
    reason: str = INVALID_LABEL

    @property
    def clamped(self) -> bool:
        return self.reason == CLAMPED_LABEL

    def __str__(self) -> str:
        what = "clamped label" if self.clamped else "invalid label"
        return f"{self.ref}: {what} {self.key}={self.value!r}: {self.message}"


@attrs.frozen(slots=True)
class ServicePort:
    """One port of a Service. ``protocol`` is the traffic protocol (:data:`PROTOCOLS`) or None (unlabeled:
    traffic to it from a sidecar is blocked); see :func:`port_protocol`. ``app_protocol`` is the port's
    ``appProtocol`` as written."""

    name: str
    port: int
    target_port: int | str
    protocol: str | None = None
    transport: str = "TCP"
    app_protocol: str | None = None


@attrs.frozen(slots=True)
class Endpoint:
    """A ready (or not) address behind a service port: pod IP and resolved target port."""

    address: str
    port: int
    ready: bool = True
    pod: str | None = None
    namespace: str = ""
    node: str | None = None
    labels: Labels = EMPTY_LABELS
    #: The endpoint's pod runs a trafficmgr sidecar: its annotation ``traffic.envoy.proxy`` is set and not
    #: ``ingress`` (the node agent sets it once the sidecar is LIVE). Plugins may rely on the pod's
    #: inbound listener being there (the ``mtls`` plugin sends such endpoints mutual TLS).
    sidecar: bool = False


@attrs.frozen(slots=True)
class Service:
    """A Kubernetes Service. ``labels`` are its parsed traffic labels. Endpoints live in
    :attr:`Model.endpoints` so that a pod change leaves the Service object untouched.

    The builder also makes one with ``kind="Pod"`` for a pod that carries ``traffic.port.<port>`` labels:
    ``cluster_ip`` is then the pod IP, ``headless`` is True and ``labels`` are the pod's labels, so that
    plugins apply a pod's labels to traffic addressed to that pod directly."""

    namespace: str
    name: str
    ports: tuple[ServicePort, ...] = ()
    cluster_ip: str | None = None
    labels: Labels = EMPTY_LABELS
    headless: bool = False
    uid: str = ""
    load_balancer: tuple[str, ...] = ()  # status.loadBalancer.ingress addresses (ip or hostname)
    kind: str = "Service"  # "Pod": a pod's own labeled ports (traffic addressed to the pod IP directly)

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    def cluster_name(self, port: ServicePort) -> str:
        """The Envoy cluster name ``<port>|<namespace>|<service>.outbound`` (kept from the original)."""
        return f"{port.port}|{self.namespace}|{self.name}.outbound"

    def hostnames(self) -> tuple[str, ...]:
        """Names a client may use for this service, without port."""
        if self.kind == "Pod":
            return (self.cluster_ip,) if self.cluster_ip else ()
        n, ns = self.name, self.namespace
        return (n, f"{n}.{ns}", f"{n}.{ns}.svc", f"{n}.{ns}.svc.cluster.local")


def load_balancer_addresses(status: Mapping[str, Any]) -> tuple[str, ...]:
    """The addresses in an object's ``status.loadBalancer.ingress`` (a Service's or an Ingress's): the ``ip``
    of each entry, else its ``hostname``; entries with neither are skipped. ``status`` is the object's
    ``status`` mapping (``{}`` when it has none)."""
    ingress = (status.get("loadBalancer") or {}).get("ingress") or []
    return tuple(i.get("ip") or i.get("hostname") for i in ingress if i.get("ip") or i.get("hostname"))


def is_ip(text: str) -> bool:
    """Whether ``text`` is an IPv4 or IPv6 address (not a host name)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def normalize_ip(text: str) -> str:
    """The canonical text of an IP address: ``ipaddress`` form, IPv4-mapped IPv6 (``::ffff:10.0.0.1``)
    as IPv4, zone ids kept; text that is not an IP is returned unchanged (it then matches nothing)."""
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return text
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


@attrs.frozen(slots=True)
class Pod:
    """A pod with its *effective* traffic labels (workload labels merged, the pod's own labels win)."""

    namespace: str
    name: str
    ip: str | None = None
    node: str | None = None
    ready: bool = False
    labels: Labels = EMPTY_LABELS
    uid: str = ""
    ports: tuple[tuple[str, int], ...] = ()  # (container port name, number)
    #: Every pod IP (``status.podIPs``, dual stack; ``ip`` first), each normalised by :func:`normalize_ip`.
    ips: tuple[str, ...] = ()
    phase: str = "Running"  # ``status.phase`` (from Kubernetes: always set; absent is read as ``Pending``)
    terminating: bool = False  # ``metadata.deletionTimestamp`` is set
    host_network: bool = False  # ``spec.hostNetwork``: its "IP" is the node's, shared by every such pod
    service_account: str = ""  # ``spec.serviceAccountName`` ("" = not given: Kubernetes means ``default``)
    sidecar: bool = False  # annotation ``traffic.envoy.proxy`` set and not ``ingress`` (see Endpoint.sidecar)

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @property
    def live(self) -> bool:
        """Running, or Pending, and not being deleted: the pod may still act (a Succeeded or Failed pod
        keeps its ``podIP`` in the API after the network gave the address to another pod)."""
        return self.phase in ("Running", "Pending") and not self.terminating

    @property
    def holds_ips(self) -> tuple[str, ...]:
        """The IPs that identify this pod and no other: its normalised IPs while it is :attr:`live` and
        not ``hostNetwork``; empty otherwise (such a pod proves nothing by its address)."""
        if not self.live or self.host_network:
            return ()
        return self.ips or ((normalize_ip(self.ip),) if self.ip else ())

    @property
    def has_port_labels(self) -> bool:
        """True when the pod opens ports of its own (``traffic.port.<port>`` labels)."""
        return any(k.startswith(PORT_PREFIX) for k in self.labels)

    @property
    def node_id(self) -> str:
        """The Envoy node id of this pod's sidecar: ``<pod>.<namespace>``."""
        return f"{self.name}.{self.namespace}"


@attrs.frozen(slots=True)
class Namespace:
    """A Kubernetes Namespace with its parsed traffic labels (``Namespace`` is a label kind)."""

    name: str
    labels: Labels = EMPTY_LABELS
    uid: str = ""


_NO_KEYS: frozenset[Any] = frozenset()


@attrs.frozen(slots=True)
class ModelDelta:
    """What changed between the previous :class:`Model` the Kubernetes layer handed out and this one.

    ``services``: keys of Services whose object or any of whose endpoints changed (added, replaced or
    removed); ``pods`` / ``port_pods``: pod keys whose entry in that table changed; ``namespaces``: names;
    ``extra``: plugin kinds (``model.extra`` keys) with any change. A key may be listed although its value
    ended up equal (a change and its revert in one batch): consumers compare, the delta only bounds the work.
    """

    services: frozenset[tuple[str, str]] = _NO_KEYS
    pods: frozenset[tuple[str, str]] = _NO_KEYS
    port_pods: frozenset[tuple[str, str]] = _NO_KEYS
    namespaces: frozenset[str] = _NO_KEYS
    extra: frozenset[str] = _NO_KEYS

    @property
    def empty(self) -> bool:
        return not (self.services or self.pods or self.port_pods or self.namespaces or self.extra)


@attrs.frozen(slots=True)
class Model:
    """Everything the builder needs, as of one point in time.

    ``endpoints`` maps ``(namespace, service, port name)`` to its endpoints. ``extra`` holds objects of
    kinds that plugins asked to watch (see ``trafficmgr_watch_kinds``), by kind then ``(namespace, name)``.

    The Kubernetes layer hands out read-only views of its live tables, not copies: a Model and its
    mappings are valid only during the build (and the hook calls) that received it. Keep the IR objects
    in them (they are immutable), never the Model or a mapping, across builds. ``delta`` says what changed
    since the previous Model (None: unknown, treat everything as changed).
    """

    services: Mapping[tuple[str, str], Service] = attrs.field(factory=dict)
    endpoints: Mapping[tuple[str, str, str], tuple[Endpoint, ...]] = attrs.field(factory=dict)
    pods: Mapping[tuple[str, str], Pod] = attrs.field(factory=dict)
    extra: Mapping[str, Mapping[tuple[str, str], Any]] = attrs.field(factory=dict)
    #: The pods carrying their own ``traffic.port.<port>`` labels (derived from ``pods`` unless given:
    #: the Kubernetes layer keeps it up to date so the builder never scans every pod).
    port_pods: Mapping[tuple[str, str], Pod] = attrs.field(
        default=attrs.Factory(lambda self: {k: p for k, p in self.pods.items() if p.ip and p.has_port_labels}, takes_self=True)
    )

    namespaces: Mapping[str, Namespace] = attrs.field(factory=dict)
    delta: ModelDelta | None = None

    def endpoints_of(self, service: Service, port: ServicePort) -> tuple[Endpoint, ...]:
        return self.endpoints.get((service.namespace, service.name, port.name), ())
