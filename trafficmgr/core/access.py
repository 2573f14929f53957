"""xDS access control: which connection may claim which proxy identity.

Modes (``trafficmgr serve --xds-auth``):

- ``peer-ip`` (default): the connection's source IP names the pod. Only a *live* pod holds an IP: phase
  ``Running`` (or ``Pending`` with an IP), no ``deletionTimestamp``, not ``hostNetwork``; its IPs are
  ``status.podIPs`` (dual stack), compared normalised (``::ffff:10.0.0.1`` is ``10.0.0.1``). Exactly one
  live pod must hold the peer's IP, else the claim is refused (a Succeeded pod keeps its ``podIP`` in the
  API after the network gave the address to a new pod: it is ignored, the new pod decides). A sidecar
  stream claiming node id ``<pod>.<namespace>`` is accepted when that pod is live and is the one holding
  the IP; a gateway stream (node cluster ``traffic-ingress``) when the pod holding the IP is in
  ``--xds-gateway-namespace``, matches ``--xds-gateway-selector`` and runs as
  ``--xds-gateway-service-account`` (labels can be set by many; the ServiceAccount is fixed at creation
  and needs the right to create pods using it).
- ``mtls``: the xDS server requires a client certificate from ``--xds-client-ca``; only its URI SANs
  of the form ``spiffe://<--trust-domain>/ns/<namespace>/sa/<serviceaccount>`` count (no CN, no DNS-SAN
  fallback). A sidecar's must name the claimed pod's namespace and ServiceAccount, the pod existing and
  live; a gateway's the gateway namespace and ServiceAccount.
- ``none``: every claim is believed (development only; logged loudly at startup).

Unix socket (``--xds-address unix:``): a connection carries the kernel's credentials of the connecting
process instead of an IP (:mod:`trafficmgr.core.xds.unixpeer`). In every mode but ``none``, a gateway
claim needs a uid of ``unix_gateway_uids`` (``--xds-unix-gateway-uids``, default: the server's own uid),
a sidecar claim one of ``unix_sidecar_uids`` (``--xds-unix-sidecar-uids``, default: the proxy uid 1337,
root and the server's uid); a sidecar's pod, when known, must be live. Processes of an allowed sidecar
uid are not told apart (every sidecar gets the same view, which holds no secret); in ``mtls`` mode the
certificate is checked as well.

Checks run when a stream identifies itself and again on every change of the model, so a pod that is
deleted, terminating or finished, or whose IP moves to another pod, loses its stream.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence

from trafficmgr.core import metrics
from trafficmgr.core.identity import spiffe
from trafficmgr.core.model import GATEWAY_CLUSTER, Pod, is_ip, normalize_ip
from trafficmgr.core.once import Seen
from trafficmgr.core.xds import unixpeer

log = logging.getLogger(__name__)

MODES = ("peer-ip", "mtls", "none")
DEFAULT_TRUST_DOMAIN = "cluster.local"
#: ``--xds-gateway-service-account`` default: the gateway's usual name (the Helm chart passes its own).
DEFAULT_GATEWAY_SERVICE_ACCOUNT = "traffic-ingress"
#: The agent's default ``--proxy-uid``: the uid sidecar Envoys run as.
PROXY_UID = 1337
#: How many distinct refusals are remembered to log each once (oldest forgotten first).
LOGGED_MAX = 1024
#: Longest node id quoted in a log line or refusal message (node ids are chosen by the client).
NODE_ID_SHOWN = 100
_DNS_LABELS = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

#: ``pods_by_ip(ip)``: ``(pod, its Kubernetes labels)`` of every pod that has or had ``ip``.
PodsByIp = Callable[[str], Sequence[tuple[Pod, Mapping[str, str]]]]


def parse_selector(text: str) -> dict[str, str]:
    """``app=traffic-ingress,tier=edge`` -> dict; raises ValueError with a clear message."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise ValueError(f"bad label selector {text!r}: use key=value[,key=value]")
        out[key.strip()] = value.strip()
    return out


def parse_uids(text: str) -> frozenset[int]:
    """``0,1337`` -> uids; raises ValueError with a clear message (empty text: no uid)."""
    out: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        if not part.isdigit() or int(part) > 0xFFFFFFFE:
            raise ValueError(f"bad uid {part!r} in {text!r}: use comma-separated numbers, e.g. 0,1337")
        out.add(int(part))
    return frozenset(out)


def check_trust_domain(text: str) -> str:
    """A SPIFFE trust domain (lowercase DNS-like name, no scheme or path); raises ValueError."""
    if not text or len(text) > 255 or not _DNS_LABELS.match(text):
        raise ValueError(f"bad trust domain {text!r}: use a lowercase name such as cluster.local")
    return text


def service_account(pod: Pod) -> str:
    """The pod's ServiceAccount (Kubernetes runs a pod that names none as ``default``)."""
    return pod.service_account or "default"


def shorten(node_id: str) -> str:
    """A client-chosen node id cut to :data:`NODE_ID_SHOWN` characters for logs and messages."""
    return node_id if len(node_id) <= NODE_ID_SHOWN else node_id[:NODE_ID_SHOWN] + "..."


class AccessControl:
    """Decides whether a stream may claim its node identity (see the module docstring)."""

    def __init__(
        self,
        mode: str,
        pods: Mapping[tuple[str, str], Pod],
        pods_by_ip: PodsByIp,
        gateway_namespace: str = "default",
        gateway_selector: Mapping[str, str] | None = None,
        gateway_service_account: str = DEFAULT_GATEWAY_SERVICE_ACCOUNT,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        unix_gateway_uids: Iterable[int] | None = None,
        unix_sidecar_uids: Iterable[int] | None = None,
    ) -> None:
        """``unix_gateway_uids`` default: this process's uid; ``unix_sidecar_uids`` default:
        :data:`PROXY_UID`, 0 and this process's uid."""
        if mode not in MODES:
            raise ValueError(f"unknown --xds-auth mode {mode!r}; use one of {', '.join(MODES)}")
        self.mode = mode
        self.pods = pods
        self.pods_by_ip = pods_by_ip
        self.gateway_namespace = gateway_namespace
        self.gateway_selector = dict(gateway_selector or {"app": "traffic-ingress"})
        self.gateway_service_account = gateway_service_account
        self.trust_domain = check_trust_domain(trust_domain)
        own = os.getuid()
        self.unix_gateway_uids = frozenset(unix_gateway_uids if unix_gateway_uids is not None else {own})
        self.unix_sidecar_uids = frozenset(unix_sidecar_uids if unix_sidecar_uids is not None else {PROXY_UID, 0, own})
        # Refusals already logged (bounded: node ids are chosen by clients), least recently seen first.
        self._logged = Seen(LOGGED_MAX)

    def __call__(self, node_id: str, node_cluster: str, peer: str, identities: tuple[str, ...] = ()) -> None:
        """Raise PermissionError (with the reason) when the claim is not allowed. ``peer``: the client's
        IP, or a Unix-socket peer's credentials (:func:`~trafficmgr.core.xds.unixpeer.describe`)."""
        if self.mode == "none":
            return
        gateway = node_cluster == GATEWAY_CLUSTER or node_id == GATEWAY_CLUSTER
        try:
            cred = unixpeer.parse(peer)
            if cred is not None:
                self._check_unix(node_id, gateway, cred)
            if self.mode == "mtls":
                self._check_mtls(node_id, gateway, identities)
            elif cred is None:
                self._check_peer_ip(node_id, gateway, peer)
        except PermissionError as exc:
            self._log_once(node_id, gateway, peer, str(exc))
            raise

    def _log_once(self, node_id: str, gateway: bool, peer: str, reason: str) -> None:
        if not self._logged.first((node_id[:NODE_ID_SHOWN + 1], peer, reason)):
            return
        log.warning("refused xDS stream claiming %s %r from %s: %s", "gateway" if gateway else "node",
                    shorten(node_id), peer or "an unknown peer", reason)

    # -- Unix socket ------------------------------------------------------------------------------

    def _check_unix(self, node_id: str, gateway: bool, cred: unixpeer.PeerCred) -> None:
        if gateway:
            if cred.uid not in self.unix_gateway_uids:
                raise PermissionError(f"Unix-socket peer uid {cred.uid} may not claim the gateway "
                                      f"(allowed uids: {_uids(self.unix_gateway_uids)}; --xds-unix-gateway-uids)")
            return
        if cred.uid not in self.unix_sidecar_uids:
            raise PermissionError(f"Unix-socket peer uid {cred.uid} may not claim a sidecar "
                                  f"(allowed uids: {_uids(self.unix_sidecar_uids)}; --xds-unix-sidecar-uids)")
        if self.mode == "peer-ip":
            pod = self._claimed_pod(node_id)
            if pod is not None and not pod.live:
                raise PermissionError(f"pod {pod.namespace}/{pod.name} is {_state(pod)}")

    # -- peer-ip ----------------------------------------------------------------------------------

    def _check_peer_ip(self, node_id: str, gateway: bool, peer: str) -> None:
        ip = normalize_ip(peer)
        if not ip or ip == peer and not is_ip(peer):
            raise PermissionError("the connection has no IP address or peer credentials to check")
        holders = [(pod, labels) for pod, labels in self.pods_by_ip(ip) if ip in pod.holds_ips]
        if len(holders) > 1:
            names = ", ".join(sorted(f"{p.namespace}/{p.name}" for p, _ in holders))
            raise PermissionError(f"{ip} is held by {len(holders)} live pods ({names}): ambiguous, refused")
        if gateway:
            if not holders:
                raise PermissionError(f"{ip} is not the IP of a live pod (Running or Pending, not terminating, "
                                      "not hostNetwork)")
            pod, labels = holders[0]
            where = f"pod {pod.namespace}/{pod.name} ({ip})"
            if pod.namespace != self.gateway_namespace:
                raise PermissionError(f"{where} is not in the gateway namespace {self.gateway_namespace}")
            if not all(labels.get(k) == v for k, v in self.gateway_selector.items()):
                sel = ",".join(f"{k}={v}" for k, v in self.gateway_selector.items())
                raise PermissionError(f"{where} does not match the gateway selector {sel}")
            if service_account(pod) != self.gateway_service_account:
                raise PermissionError(f"{where} runs as ServiceAccount {service_account(pod)}, not the gateway's "
                                      f"{self.gateway_service_account} (--xds-gateway-service-account)")
            return
        claimed = self._claimed_pod(node_id)
        if claimed is None:
            return  # unknown node: it gets nothing until the pod exists, and is checked again then
        if not claimed.live:
            raise PermissionError(f"pod {claimed.namespace}/{claimed.name} is {_state(claimed)}")
        if claimed.host_network:
            raise PermissionError(f"pod {claimed.namespace}/{claimed.name} uses the host network: its IP proves nothing")
        if ip not in claimed.holds_ips:
            shown = ", ".join(claimed.holds_ips) or "(none yet)"
            raise PermissionError(f"node {shorten(node_id)} is pod IP {shown}, not {ip}")

    def _claimed_pod(self, node_id: str) -> Pod | None:
        pod_name, _, namespace = node_id.rpartition(".")
        return self.pods.get((namespace, pod_name)) if pod_name else None

    # -- mtls -------------------------------------------------------------------------------------

    def _check_mtls(self, node_id: str, gateway: bool, identities: tuple[str, ...]) -> None:
        ids = {(p[1], p[2]) for p in map(spiffe.parse, identities) if p and p[0] == self.trust_domain}
        if not identities:
            raise PermissionError("no verified client certificate with a URI SAN")
        if gateway:
            want = (self.gateway_namespace, self.gateway_service_account)
            if want in ids:
                return
            raise PermissionError(f"certificate {_shown(identities)} is not the gateway identity "
                                  f"{spiffe.spiffe_id(self.trust_domain, *want)}")
        pod = self._claimed_pod(node_id)
        if pod is None:
            raise PermissionError(f"node {shorten(node_id)} is not a known pod")
        if not pod.live:
            raise PermissionError(f"pod {pod.namespace}/{pod.name} is {_state(pod)}")
        want = (pod.namespace, service_account(pod))
        if want in ids:
            return
        raise PermissionError(f"certificate {_shown(identities)} does not name node {shorten(node_id)}: "
                              f"want {spiffe.spiffe_id(self.trust_domain, *want)}")


def _state(pod: Pod) -> str:
    return "terminating" if pod.terminating and pod.phase in ("Running", "Pending") else pod.phase or "in no phase"


def _uids(uids: frozenset[int]) -> str:
    return ",".join(str(u) for u in sorted(uids)) or "none"


def _shown(identities: tuple[str, ...]) -> str:
    return str([i[:200] for i in identities[:4]])


def warn_if_open(mode: str) -> None:
    if mode == "none":
        log.warning("=" * 72)
        log.warning("--xds-auth none: ANY client reaching the xDS port can claim ANY proxy identity,")
        log.warning("including the ingress gateway's, and receive its TLS private keys. Development only.")
        log.warning("=" * 72)


def refused_count(reason: str = "permission") -> float:
    return metrics.REGISTRY.get_sample_value("trafficmgr_xds_streams_refused_total", {"reason": reason}) or 0.0


__all__ = ["AccessControl", "DEFAULT_GATEWAY_SERVICE_ACCOUNT", "DEFAULT_TRUST_DOMAIN", "MODES", "PROXY_UID",
           "check_trust_domain", "parse_selector", "parse_uids", "refused_count", "service_account", "warn_if_open"]
