"""xDS access control: which connection may claim which proxy identity.

Modes (``trafficmgr serve --xds-auth``):

- ``peer-ip`` (default): a sidecar stream claiming node id ``<pod>.<namespace>`` is accepted only from that
  pod's IP; a gateway stream (node cluster ``traffic-ingress``) only from the IP of a pod selected as a
  gateway (``--xds-gateway-selector`` in ``--xds-gateway-namespace``). Connections over a Unix socket
  carry no IP: they are accepted when the xDS server listens on one (its file permissions are then the
  access control).
- ``mtls``: the xDS server requires a client certificate from ``--xds-client-ca``; a sidecar's certificate
  must name it with URI SAN ``spiffe://<trust domain>/ns/<namespace>/pod/<pod>`` (or CN ``<pod>.<namespace>``),
  a gateway's with URI SAN ``spiffe://<trust domain>/ns/<namespace>/gateway/<name>`` (or CN
  ``traffic-ingress``).
- ``none``: every claim is believed (development only; logged loudly at startup).

Checks run when a stream identifies itself and again on every change of the model, so a pod that is
deleted or whose IP moves to another pod loses its stream.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence

from trafficmgr.core import metrics
from trafficmgr.core.model import GATEWAY_CLUSTER, Pod

log = logging.getLogger(__name__)

MODES = ("peer-ip", "mtls", "none")
_SIDECAR_URI = re.compile(r"^spiffe://[^/]+/ns/(?P<ns>[^/]+)/pod/(?P<pod>[^/]+)$")
_GATEWAY_URI = re.compile(r"^spiffe://[^/]+/ns/[^/]+/gateway/[^/]+$")


def parse_selector(text: str) -> dict[str, str]:
    """``app=traffic-ingress,tier=edge`` -> dict; raises ValueError with a clear message."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise ValueError(f"bad label selector {text!r}: use key=value[,key=value]")
        out[key.strip()] = value.strip()
    return out


class AccessControl:
    """Decides whether a stream may claim its node identity (see the module docstring)."""

    def __init__(
        self,
        mode: str,
        pods: Mapping[tuple[str, str], Pod],
        pods_by_ip: Callable[[str], Sequence[tuple[str, str, Mapping[str, str]]]],
        gateway_namespace: str = "default",
        gateway_selector: Mapping[str, str] | None = None,
        unix_socket: bool = False,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown --xds-auth mode {mode!r}; use one of {', '.join(MODES)}")
        self.mode = mode
        self.pods = pods
        self.pods_by_ip = pods_by_ip
        self.gateway_namespace = gateway_namespace
        self.gateway_selector = dict(gateway_selector or {"app": "traffic-ingress"})
        self.unix_socket = unix_socket
        self._logged: set[tuple[str, str, str]] = set()

    def __call__(self, node_id: str, node_cluster: str, peer: str, identities: tuple[str, ...] = ()) -> None:
        """Raise PermissionError (with the reason) when the claim is not allowed."""
        if self.mode == "none":
            return
        gateway = node_cluster == GATEWAY_CLUSTER or node_id == GATEWAY_CLUSTER
        try:
            if self.mode == "mtls":
                self._check_mtls(node_id, gateway, identities)
            else:
                self._check_peer_ip(node_id, gateway, peer)
        except PermissionError as exc:
            key = (node_id, peer, str(exc))
            if key not in self._logged:
                self._logged.add(key)
                log.warning("refused xDS stream claiming %s %r from %s: %s", "gateway" if gateway else "node",
                            node_id, peer or "a Unix socket", exc)
            raise

    def _check_peer_ip(self, node_id: str, gateway: bool, peer: str) -> None:
        if not peer:
            if self.unix_socket:
                return
            raise PermissionError("the connection has no IP address to check")
        if gateway:
            for ns, _name, labels in self.pods_by_ip(peer):
                if ns == self.gateway_namespace and all(labels.get(k) == v for k, v in self.gateway_selector.items()):
                    return
            sel = ",".join(f"{k}={v}" for k, v in self.gateway_selector.items())
            raise PermissionError(f"{peer} is not the IP of a gateway pod ({sel} in namespace {self.gateway_namespace})")
        pod_name, _, namespace = node_id.rpartition(".")
        pod = self.pods.get((namespace, pod_name))
        if pod is None:
            return  # unknown node: it gets nothing until the pod exists, and is checked again then
        if pod.ip != peer:
            raise PermissionError(f"node {node_id} is pod IP {pod.ip or '(none yet)'}, not {peer}")

    def _check_mtls(self, node_id: str, gateway: bool, identities: tuple[str, ...]) -> None:
        if not identities:
            raise PermissionError("no verified client certificate")
        if gateway:
            if any(_GATEWAY_URI.match(i) or i == GATEWAY_CLUSTER for i in identities):
                return
            raise PermissionError(f"certificate {list(identities)} is not a gateway identity")
        for ident in identities:
            m = _SIDECAR_URI.match(ident)
            if (m and f"{m.group('pod')}.{m.group('ns')}" == node_id) or ident == node_id:
                return
        raise PermissionError(f"certificate {list(identities)} does not name node {node_id}")


def warn_if_open(mode: str) -> None:
    if mode == "none":
        log.warning("=" * 72)
        log.warning("--xds-auth none: ANY client reaching the xDS port can claim ANY proxy identity,")
        log.warning("including the ingress gateway's, and receive its TLS private keys. Development only.")
        log.warning("=" * 72)


def refused_count(reason: str = "permission") -> float:
    return metrics.REGISTRY.get_sample_value("trafficmgr_xds_streams_refused_total", {"reason": reason}) or 0.0


__all__ = ["AccessControl", "MODES", "parse_selector", "refused_count", "warn_if_open"]
