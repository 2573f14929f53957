"""HTTPS on the ingress gateway from ``kubernetes.io/tls`` Secrets referenced by Ingress ``spec.tls``.

- One SNI filter chain per Secret (its hosts from every served Ingress), on the ingress listener's port,
  ALPN ``h2`` and ``http/1.1``; certificates come over SDS, to gateway proxies only.
- Updating the Secret rotates the certificate without restarting Envoy (same SDS name, new content).
- A request on an SNI chain for a host its certificate does not name gets 421 (the ingress plugin gives
  each chain with ``server_names`` its own route configuration: ``ingress/misdirected.py``).
- A missing or invalid Secret: its hosts are not served over TLS and the Ingress gets a Warning Event;
  everything else keeps working and Envoy never sees the bad Secret.
- Only TLS Secrets referenced by an Ingress are in the model (other plugins never see other keys).
- A host claimed by two Secrets: the oldest Ingress wins. A ``tls`` entry without hosts is the default
  certificate (TLS without SNI or with an SNI no chain names).

Builds on the ingress plugin (``TRAFFICMGR_DEPENDS``): the chains are planned from the model in this
plugin's ``trafficmgr_resources`` (a per-role hook, which runs before the ingress plugin's because a
plugin's hooks run before those of the plugins it depends on), kept in ``ctx.scratch``, and added to the
ingress listener by ``trafficmgr_listener``, which reads nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2

from trafficmgr.plugin import GATEWAY, WatchKind, ads_config_source, hookimpl, pack
from trafficmgr.plugins.ingress import HOST_RE, INGRESS, LISTENER, PLAIN_CHAIN, Ingress, served
from trafficmgr.plugins.tls.certs import SECRET, TLS_TYPE, TlsSecret, convert_secret

if TYPE_CHECKING:
    from trafficmgr.plugin import BuildContext, Resource

TRAFFICMGR_DEPENDS = ("ingress",)
REASON_SECRET = "IngressTLSSecretInvalid"
REASON_CONFLICT = "IngressTLSConflict"
ALPN = ("h2", "http/1.1")
DEFAULT_HOSTS = ("",)  # a tls entry without hosts


@attrs.frozen(slots=True)
class TlsChain:
    """One SNI chain: ``hosts`` (empty = default certificate) served with ``secret``."""

    secret: TlsSecret
    hosts: tuple[str, ...]

    @property
    def sds_name(self) -> str:
        return f"{self.secret.namespace}/{self.secret.name}"


@hookimpl
def trafficmgr_watch_kinds() -> list[WatchKind]:
    return [WatchKind(SECRET, "v1", "secrets", convert_secret, field_selector=f"type={TLS_TYPE}", keep=referenced)]


def referenced(extra: Mapping[str, Mapping[tuple[str, str], Any]]) -> set[tuple[str, str]]:
    """Only TLS Secrets some Ingress references (``spec.tls[].secretName``) are in the model."""
    return {(ing.namespace, t.secret_name) for ing in (extra.get(INGRESS) or {}).values() for t in ing.tls}


def tls_chains(ctx: BuildContext) -> list[TlsChain]:
    """The TLS chains of the served Ingresses, planned again only when they or the Secrets change."""
    ingresses = served(ctx)
    secrets = ctx.model.extra.get(SECRET) or {}
    key = (tuple(ingresses), secrets)
    memo = ctx.memo.get("tls")
    if memo is not None and memo[0] == key:
        return memo[1]  # type: ignore[no-any-return]
    chains = _plan(ctx, ingresses)
    ctx.memo["tls"] = (key, chains)
    return chains


def _plan(ctx: BuildContext, ingresses: list[Ingress]) -> list[TlsChain]:
    secrets: dict[tuple[str, str], TlsSecret] = dict(ctx.model.extra.get(SECRET) or {})
    claimed: dict[str, tuple[Ingress, str]] = {}
    hosts_by_secret: dict[tuple[str, str], list[str]] = {}
    for ing in ingresses:
        for entry in ing.tls:
            ref = (ing.namespace, entry.secret_name)
            hosts = entry.hosts or DEFAULT_HOSTS
            shown = ", ".join(h or "(default certificate)" for h in hosts)
            secret = secrets.get(ref)
            if not entry.secret_name or secret is None:
                ctx.report(ing.ref, f"TLS secret {entry.secret_name!r} (type {TLS_TYPE}) not found in namespace "
                           f"{ing.namespace}: {shown} not served over TLS", REASON_SECRET)
                continue
            if secret.error:
                ctx.report(ing.ref, f"TLS secret {ing.namespace}/{entry.secret_name}: {secret.error}; "
                           f"{shown} not served over TLS", REASON_SECRET)
                continue
            for host in hosts:
                if host and not HOST_RE.match(host):
                    ctx.report(ing.ref, f"TLS host {host!r} is not a valid DNS name or wildcard; ignored", REASON_SECRET)
                    continue
                owner = claimed.get(host)
                if owner is not None and owner[1] != entry.secret_name + "\0" + ing.namespace:
                    ctx.report(ing.ref, f"TLS host {host or '(default certificate)'!r} already uses secret {owner[1].split(chr(0))[0]!r} "
                               f"of Ingress {owner[0].namespace}/{owner[0].name} (the older one wins); ignored here", REASON_CONFLICT)
                    continue
                if owner is None:
                    claimed[host] = (ing, entry.secret_name + "\0" + ing.namespace)
                    hosts_by_secret.setdefault(ref, []).append(host)
    return [TlsChain(secrets[ref], tuple(sorted(hosts))) for ref, hosts in sorted(hosts_by_secret.items())]


@hookimpl
def trafficmgr_listener(listener: listener_pb2.Listener, role: str, listener_name: str, ctx: BuildContext) -> None:
    """Add one TLS chain per Secret to the ingress listener, with the plain chain's HTTP handling."""
    if role != GATEWAY or listener_name != LISTENER:
        return
    if SCRATCH not in ctx.scratch:
        raise RuntimeError("the TLS chains were not planned before the ingress listener was built "
                           "(the tls plugin's trafficmgr_resources must run before the ingress plugin's)")
    chains: list[TlsChain] = ctx.scratch[SCRATCH]
    if not chains:
        return
    plain = next((c for c in listener.filter_chains if c.name == PLAIN_CHAIN), None)
    if plain is None:
        return
    for tc in chains:
        chain = listener.filter_chains.add(name=f"https|{tc.sds_name}")
        chain.filter_chain_match.transport_protocol = "tls"
        chain.filter_chain_match.server_names.extend(h for h in tc.hosts if h)
        for f in plain.filters:
            copy = chain.filters.add()
            copy.CopyFrom(f)
            if copy.typed_config.Is(hcm_pb2.HttpConnectionManager.DESCRIPTOR):
                hcm = hcm_pb2.HttpConnectionManager()
                copy.typed_config.Unpack(hcm)
                hcm.stat_prefix = "ingress_https"
                copy.typed_config.CopyFrom(pack(hcm))
        tls = tls_pb2.DownstreamTlsContext()
        tls.common_tls_context.alpn_protocols.extend(ALPN)
        sds = tls.common_tls_context.tls_certificate_sds_secret_configs.add(name=tc.sds_name)
        sds.sds_config.CopyFrom(ads_config_source())
        chain.transport_socket.name = "envoy.transport_sockets.tls"
        chain.transport_socket.typed_config.CopyFrom(pack(tls))


@hookimpl
def trafficmgr_resources(role: str, ctx: BuildContext) -> list[Resource]:
    """Plan the TLS chains for the ingress listener (into ``ctx.scratch``) and contribute the SDS secrets
    they use (gateway view only)."""
    if role != GATEWAY:
        return []
    chains = ctx.scratch[SCRATCH] = tls_chains(ctx) if served(ctx) else []
    memo = ctx.memo.get("tls.secrets")
    if memo is not None and memo[0] is chains:
        return memo[1]  # type: ignore[no-any-return]  # tls_chains memoized them: not serialized again
    out: list[Any] = []
    for tc in chains:
        msg = secret_pb2.Secret(name=tc.sds_name)
        msg.tls_certificate.certificate_chain.inline_string = tc.secret.certificate_chain
        msg.tls_certificate.private_key.inline_string = tc.secret.private_key
        out.append(ctx.resource(msg, tc.sds_name))
    ctx.memo["tls.secrets"] = (chains, out)
    return out


SCRATCH = "tls.chains"
