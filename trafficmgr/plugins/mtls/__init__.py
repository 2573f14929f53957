"""Mutual TLS between sidecars, and authorization by workload identity (``serve --mtls``).

Off unless ``serve --mtls`` is given: then nothing here changes any resource. With it, every proxy of the
mesh needs its identity files (``trafficmgr.core.identity.files``, written by the node agent with
``--mesh-identity``); the shared xDS config names them by relative path, so it is the same for every
sidecar.

Client side (clusters and endpoints, shared by sidecars and gateways):

- an endpoint whose pod runs a sidecar (:attr:`Endpoint.sidecar`) gets the metadata
  ``envoy.transport_socket_match: {trafficmgr.mtls: "true"}``; EDS clusters get a
  ``transport_socket_matches`` entry ``mtls`` for it: TLS with the workload certificate, the peer
  verified against the trust bundle and its URI SAN under ``spiffe://<trust domain>/``, SNI
  ``outbound_.<port>_._.<svc>.<ns>.svc.cluster.local`` and ALPN :data:`ALPN_HTTP` (plus ``h2`` on
  http2/grpc ports, which the server then negotiates so that its connection manager speaks HTTP/2) or
  :data:`ALPN_TCP`.
  Endpoints without a sidecar (and headless or direct clusters, which have no endpoint list) stay
  plaintext. ``traffic.mtls=disable`` on the Service: no match entry, plaintext.

Server side (the sidecars' shared ``inbound`` listener):

- TLS twins of the core's chains (``tls_inspector``; ``transport_protocol: tls`` and our ALPN), which
  terminate with the workload certificate, require a client certificate chaining to the bundle, and on
  HTTP chains set ``x-forwarded-client-cert`` to the peer's URI (``SANITIZE_SET``: a client cannot
  forge it). Plaintext chains stay (``permissive``).
- ``traffic.mtls=strict`` (Service, or its Namespace unless the Service says otherwise): a network RBAC
  filter on every plaintext chain closes connections to the pods (IP and port) of those services that
  carry no client certificate.
- Authorization labels on a Service (:data:`ALLOW_NAMESPACE`, :data:`ALLOW_SA`): only those
  identities reach its pods' endpoint ports: one RBAC policy per service (DENY for every other principal,
  plaintext included), stat prefix ``rbac_<ns>_<svc>.``; HTTP requests are answered 403 by an HTTP RBAC
  filter, TCP connections (and HTTP the inspector did not recognise in time) are closed by a network
  RBAC filter. A malformed authorization label is reported (Warning Event ``InvalidTrafficLabel``) and
  that service denies everything (fail closed for it only).

The per-service policy needs the model, so it is contributed by ``trafficmgr_network_filters``; the TLS
twins depend only on the listener and options, so ``trafficmgr_listener`` adds them.
"""

from __future__ import annotations

import argparse
import functools
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as net_rbac_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from google.protobuf import json_format, struct_pb2

from trafficmgr.plugin import (
    ALL_CHAINS,
    GRPC,
    HCM_FILTER,
    HTTP2,
    HTTP_PROTOCOLS,
    SIDECAR,
    TCP_CHAINS,
    HttpFilter,
    LabelSpec,
    NetworkFilter,
    ObjectRef,
    WatchKind,
    duration_ms,
    hookimpl,
    identity_files,
    labels,
    pack,
)

if TYPE_CHECKING:
    from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment

    from trafficmgr.plugin import BuildContext, Endpoint, EndpointPair, Model, Service, ServicePort

log = logging.getLogger(__name__)

MODE = "traffic.mtls"
PERMISSIVE, STRICT, DISABLE = "permissive", "strict", "disable"
#: ``traffic.allow.namespace.<namespace>=true``: every workload of that namespace may call the Service.
ALLOW_NAMESPACE = "traffic.allow.namespace."
#: ``traffic.allow.sa.<namespace>.<serviceaccount>=true``: that ServiceAccount may call the Service.
ALLOW_SA = "traffic.allow.sa."
ALLOW_PREFIX = "traffic.allow."
ALPN_HTTP = "trafficmgr-mtls-http"
ALPN_TCP = "trafficmgr-mtls-tcp"
ALPN_H2 = "h2"
MATCH_NAME = "mtls"
METADATA_KEY = "trafficmgr.mtls"
INVALID_LABEL = "InvalidTrafficLabel"
NAMESPACE = "Namespace"
#: The kind name of this plugin's Namespace watch in ``model.extra`` (the core's own is ``Model.namespaces``).
NAMESPACE_MODES = "mtls.Namespace"
#: The plugin's second view of Services: only their authorization labels (kind name of model.extra).
AUTHZ = "mtls.ServiceAuthorization"
TLS_INSPECTOR = "envoy.filters.listener.tls_inspector"
NETWORK_RBAC = "envoy.filters.network.rbac"
STRICT_ORDER, AUTHZ_ORDER = 100, 200

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
_SA_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?\Z")


# -- options and labels --------------------------------------------------------------------------


@hookimpl
def trafficmgr_add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    if command == "serve":
        parser.add_argument("--mtls", action="store_true", default=False,
                            help="mutual TLS between sidecars (workload certificates of the mesh CA: every proxy needs "
                                 "its identity files, e.g. agent --mesh-identity) and the traffic.mtls / traffic.allow.* "
                                 "labels (plugin mtls)")


@hookimpl
def trafficmgr_labels() -> list[LabelSpec]:
    return [LabelSpec(MODE, frozenset({labels.SERVICE, NAMESPACE}), labels.choice(PERMISSIVE, STRICT, DISABLE), PERMISSIVE,
                      "with serve --mtls: permissive (TLS and plaintext accepted), strict (plaintext to the pods refused), "
                      "disable (plaintext both ways, Service only); on a Namespace (permissive or strict): the default of its Services")]


def enabled(options: argparse.Namespace) -> bool:
    """``--mtls``, and sidecars have an inbound listener to terminate it (not with
    ``--sidecar-inbound-port 0`` or local mode's ``--explicit-proxy``: then nothing changes, and that is
    logged once, as clients would otherwise send TLS that nothing on the pod accepts)."""
    if not getattr(options, "mtls", False):
        return False
    if getattr(options, "explicit_proxy", False) or not getattr(options, "sidecar_inbound_port", 15006):
        if not _warned:
            _warned.append(True)
            log.error("--mtls is ignored: the sidecars have no inbound listener to terminate it "
                      "(--sidecar-inbound-port 0 or --explicit-proxy)")
        return False
    return True


_warned: list[bool] = []


def trust_domain(options: argparse.Namespace) -> str:
    return str(getattr(options, "trust_domain", None) or "cluster.local")


# -- watched objects ------------------------------------------------------------------------------


@attrs.frozen(slots=True)
class NamespaceMode:
    name: str
    mode: str | None  # None: no (valid) traffic.mtls label


@attrs.frozen(slots=True)
class Authorization:
    """The authorization labels of one Service: who may call it. ``error`` set: deny everyone."""

    namespace: str
    name: str
    namespaces: tuple[str, ...] = ()
    service_accounts: tuple[tuple[str, str], ...] = ()
    error: str = ""


def convert_namespace(raw: dict[str, Any], ctx: Any) -> NamespaceMode | None:
    meta = raw.get("metadata") or {}
    name = str(meta.get("name") or "")
    value = (meta.get("labels") or {}).get(MODE)
    if not name or value is None:
        return None
    ref = ObjectRef(NAMESPACE, "", name, str(meta.get("uid") or ""))
    parsed, errors = ctx.labels.parse(ref, {MODE: value})
    mode = parsed.value(MODE)
    if errors:  # not a value at all: the core's Namespace watch reports it (one Event, not two)
        return NamespaceMode(name, None)
    if mode == DISABLE:
        # disable is per Service: clients choose TLS in hooks that see the Service, not its Namespace.
        ctx.report(ref, f"invalid value {value!r} for label {MODE} on a Namespace: must be {PERMISSIVE} or {STRICT} "
                        f"({DISABLE} is set on each Service); the default ({PERMISSIVE}) applies", INVALID_LABEL)
        mode = None
    return NamespaceMode(name, mode)


def parse_allow(items: Mapping[str, str]) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...], list[str]]:
    """The namespaces and (namespace, serviceaccount) pairs of ``traffic.allow.*`` labels, and one error
    text per malformed label."""
    namespaces: set[str] = set()
    accounts: set[tuple[str, str]] = set()
    errors: list[str] = []
    for key, value in sorted(items.items()):
        if not key.startswith(ALLOW_PREFIX):
            continue
        if value != "true":
            errors.append(f"label {key}={value!r}: the value must be \"true\"")
            continue
        if key.startswith(ALLOW_NAMESPACE):
            ns = key[len(ALLOW_NAMESPACE):]
            if not _DNS_LABEL.fullmatch(ns) or len(ns) > 63:
                errors.append(f"label {key}: {ns!r} is not a namespace name (lowercase letters, digits and '-')")
                continue
            namespaces.add(ns)
        elif key.startswith(ALLOW_SA):
            ns, dot, sa = key[len(ALLOW_SA):].partition(".")
            if not dot or not _DNS_LABEL.fullmatch(ns) or not _SA_NAME.fullmatch(sa):
                errors.append(f"label {key}: expected {ALLOW_SA}<namespace>.<serviceaccount> (namespace: lowercase letters, "
                              f"digits and '-'; serviceaccount: also '.')")
                continue
            accounts.add((ns, sa))
        else:
            errors.append(f"label {key}: unknown authorization label (use {ALLOW_NAMESPACE}<namespace> or "
                          f"{ALLOW_SA}<namespace>.<serviceaccount>)")
    return tuple(sorted(namespaces)), tuple(sorted(accounts)), errors


def convert_service(raw: dict[str, Any], ctx: Any) -> Authorization | None:
    """Only Services with ``traffic.allow.*`` labels are kept (the rest are open to every caller)."""
    meta = raw.get("metadata") or {}
    items = {k: str(v) for k, v in (meta.get("labels") or {}).items() if k.startswith(ALLOW_PREFIX)}
    if not items:
        return None
    ns, name = str(meta.get("namespace") or "default"), str(meta.get("name") or "")
    namespaces, accounts, errors = parse_allow(items)
    if errors:
        ref = ObjectRef("Service", ns, name, str(meta.get("uid") or ""))
        message = "; ".join(errors) + ": the Service denies every caller until this is fixed"
        ctx.report(ref, message, INVALID_LABEL)
        return Authorization(ns, name, error=message)
    return Authorization(ns, name, namespaces, accounts)


@hookimpl
def trafficmgr_watch_kinds() -> list[WatchKind]:
    # Services a second time (their traffic.allow.* keys carry names, which the label registry cannot
    # declare), and Namespaces (the core does not watch them) for their traffic.mtls label.
    return [WatchKind(NAMESPACE_MODES, "v1", "namespaces", convert_namespace, namespaced=False),
            WatchKind(AUTHZ, "v1", "services", convert_service)]


# -- client side ----------------------------------------------------------------------------------


@functools.cache
def _sds(name: str) -> secret_pb2.SdsSecretConfig:
    """Parsed once per name (every rebuilt cluster and the listener copy it: ``append`` copies)."""
    return json_format.ParseDict(identity_files.sds_config(name), secret_pb2.SdsSecretConfig())


def common_tls_context(options: argparse.Namespace, alpn: Iterable[str]) -> tls_pb2.CommonTlsContext:
    """The workload certificate, and the peer verified against the trust bundle and the trust domain."""
    ctx = tls_pb2.CommonTlsContext(alpn_protocols=list(alpn))
    ctx.tls_certificate_sds_secret_configs.append(_sds(identity_files.CERT_SECRET))
    combined = ctx.combined_validation_context
    san = combined.default_validation_context.match_typed_subject_alt_names.add()
    san.san_type = common_pb2.SubjectAltNameMatcher.URI
    san.matcher.prefix = f"spiffe://{trust_domain(options)}/"
    combined.validation_context_sds_secret_config.CopyFrom(_sds(identity_files.BUNDLE_SECRET))
    return ctx


def service_mode(service: Service, namespaces: Mapping[str, str | None] | None = None) -> str:
    mode = service.labels.value(MODE)
    if mode is None and namespaces is not None:
        mode = namespaces.get(service.namespace)
    return str(mode or PERMISSIVE)


@hookimpl
def trafficmgr_cluster(cluster: cluster_pb2.Cluster, service: Service, port: ServicePort, ctx: BuildContext) -> None:
    """EDS clusters of Services: mutual TLS to the endpoints marked as meshed (ORIGINAL_DST and STATIC
    clusters have no endpoint list to mark: plaintext)."""
    if not enabled(ctx.options) or cluster.type != cluster_pb2.Cluster.EDS or service.kind != "Service":
        return
    if service_mode(service) == DISABLE:
        return
    if port.protocol in (HTTP2, GRPC):
        # "h2" as well: the server's connection manager (codec AUTO) speaks HTTP/2 over TLS only when
        # that is the negotiated protocol, and the server prefers it (the chain matches on ALPN_HTTP).
        alpn = [ALPN_HTTP, ALPN_H2]
    else:
        alpn = [ALPN_HTTP] if port.protocol in HTTP_PROTOCOLS else [ALPN_TCP]
    upstream = tls_pb2.UpstreamTlsContext(
        sni=f"outbound_.{port.port}_._.{service.name}.{service.namespace}.svc.cluster.local",
        common_tls_context=common_tls_context(ctx.options, alpn))
    match = cluster.transport_socket_matches.add(name=MATCH_NAME)
    match.match.fields[METADATA_KEY].string_value = "true"
    match.transport_socket.name = "envoy.transport_sockets.tls"
    match.transport_socket.typed_config.CopyFrom(pack(upstream))


@hookimpl
def trafficmgr_endpoints(assignment: ClusterLoadAssignment, service: Service, pairs: tuple[EndpointPair, ...],
                         ctx: BuildContext) -> None:
    """Mark the endpoints whose pod runs a sidecar (the cluster's ``mtls`` match selects them)."""
    if not enabled(ctx.options) or service_mode(service) == DISABLE:
        return
    for endpoint, lb in pairs:
        if endpoint.sidecar:
            fields = lb.metadata.filter_metadata["envoy.transport_socket_match"].fields
            fields[METADATA_KEY].CopyFrom(struct_pb2.Value(string_value="true"))


# -- server side: TLS twins of the inbound chains -------------------------------------------------


def _xfcc(hcm_any: Any) -> Any:
    hcm = hcm_pb2.HttpConnectionManager()
    hcm_any.Unpack(hcm)
    # SANITIZE_SET: the header the application sees is the one this proxy set from the verified peer.
    hcm.forward_client_cert_details = hcm_pb2.HttpConnectionManager.SANITIZE_SET
    hcm.set_current_client_cert_details.uri = True
    return pack(hcm)


def _twin(chain: listener_components_pb2.FilterChain, name: str, port: int | None, alpn: list[str],
          tls: Any) -> listener_components_pb2.FilterChain:
    twin = listener_components_pb2.FilterChain(name=name)
    if port is not None:
        twin.filter_chain_match.destination_port.value = port
    twin.filter_chain_match.transport_protocol = "tls"
    twin.filter_chain_match.application_protocols.extend(alpn)
    for f in chain.filters:
        added = twin.filters.add()
        added.CopyFrom(f)
        if f.name == HCM_FILTER:
            added.typed_config.CopyFrom(_xfcc(f.typed_config))
    twin.transport_socket.name = "envoy.transport_sockets.tls"
    twin.transport_socket.typed_config.CopyFrom(tls)
    return twin


@hookimpl
def trafficmgr_listener(listener: listener_pb2.Listener, listener_name: str, ctx: BuildContext) -> None:
    """The inbound listener's TLS twins: mTLS from meshed clients, next to the plaintext chains."""
    if listener_name != "inbound" or ctx.role != SIDECAR or not enabled(ctx.options):
        return
    # The server's preference decides: "h2" when an HTTP/2 client offers it (see trafficmgr_cluster).
    downstream = tls_pb2.DownstreamTlsContext(common_tls_context=common_tls_context(ctx.options, [ALPN_H2, ALPN_HTTP, ALPN_TCP]))
    # Safe to add to every pod's inbound listener: a twin serves only connections that offer our ALPN
    # with a client certificate chaining to the trust bundle (anything else fails the handshake or takes
    # the unchanged plaintext chains), and forwards to the same address as the chain it copies.
    downstream.require_client_certificate.value = True
    tls = pack(downstream)
    # Before the HTTP inspector (which leaves TLS alone). It waits for the client's first bytes, at
    # most the listener's 1 s timeout: a plaintext client of a server-first protocol waits that long.
    inspector = listener_components_pb2.ListenerFilter(name=TLS_INSPECTOR, typed_config=pack(tls_inspector_pb2.TlsInspector()))
    at = next((i + 1 for i, f in enumerate(listener.listener_filters) if f.name == "envoy.filters.listener.original_dst"), 0)
    listener.listener_filters.insert(at, inspector)
    listener.listener_filters_timeout.CopyFrom(duration_ms(1000))
    listener.continue_on_listener_filters_timeout = True
    twins = []
    tcp = listener.default_filter_chain
    for chain in listener.filter_chains:
        prefix, _, port = chain.name.rpartition("|")
        if prefix == "inbound|http":
            p = int(port)
            twins.append(_twin(chain, f"inbound|mtls|http|{p}", p, [ALPN_HTTP], tls))
            # A client that calls this port TCP (another service names it tcp) still gets bytes through.
            twins.append(_twin(tcp, f"inbound|mtls|tcp|{p}", p, [ALPN_TCP], tls))
    twins.append(_twin(tcp, "inbound|mtls|tcp", None, [ALPN_TCP, ALPN_HTTP], tls))
    listener.filter_chains.extend(twins)


# -- server side: strict mode and authorization -----------------------------------------------------


@attrs.frozen(slots=True)
class Target:
    """The pods (IPs) and endpoint ports of one service."""

    ips: tuple[str, ...]
    ports: tuple[int, ...]


def _target(model: Model, service: Service) -> Target:
    eps: list[Endpoint] = [e for p in service.ports for e in model.endpoints_of(service, p)]
    return Target(tuple(sorted({e.address for e in eps})), tuple(sorted({e.port for e in eps})))


def _permission(target: Target) -> rbac_pb2.Permission:
    perm = rbac_pb2.Permission()
    ips = perm.and_rules.rules.add().or_rules
    for ip in target.ips:
        ips.rules.add().destination_ip.CopyFrom(address_pb2.CidrRange(address_prefix=ip, prefix_len={"value": 128 if ":" in ip else 32}))
    ports = perm.and_rules.rules.add().or_rules
    for port in target.ports:
        ports.rules.add().destination_port = port
    return perm


def _allowed(auth: Authorization, td: str) -> rbac_pb2.Principal:
    """Every principal the service does *not* allow (the DENY policy's principal)."""
    if auth.error:
        return rbac_pb2.Principal(any=True)
    allowed = rbac_pb2.Principal()
    ids = allowed.or_ids.ids
    for ns in auth.namespaces:
        ids.add().authenticated.principal_name.prefix = f"spiffe://{td}/ns/{ns}/sa/"
    for ns, sa in auth.service_accounts:
        ids.add().authenticated.principal_name.exact = f"spiffe://{td}/ns/{ns}/sa/{sa}"
    if not ids:
        return rbac_pb2.Principal(any=True)
    return rbac_pb2.Principal(not_id=allowed)


def _rbac(policy: str, permission: rbac_pb2.Permission, principal: rbac_pb2.Principal) -> rbac_pb2.RBAC:
    """A DENY policy. Why it is safe to put in the listener every sidecar shares: the permission names
    destination pod IPs and ports (the address the caller dialled, restored by original_dst), so it
    only ever applies to the pods of its service; the principals come from a client certificate Envoy
    verified (chained to the trust bundle, URI SAN under ``spiffe://<trust domain>/``): a plaintext
    connection has none, so it is denied wherever a rule asks for an identity."""
    rules = rbac_pb2.RBAC(action=rbac_pb2.RBAC.DENY)
    rules.policies[policy].permissions.append(permission)
    rules.policies[policy].principals.append(principal)
    return rules


def plan(model: Model, options: argparse.Namespace,
         report: Callable[[ObjectRef, str], None] | None = None,
         memo: dict[Any, Any] | None = None) -> list[NetworkFilter | HttpFilter]:
    """The inbound listener's policies: one strict filter (the pods and endpoint ports of every strict
    Service), and per Service with authorization labels an RBAC network filter (TCP chains) and an RBAC
    HTTP filter. ``report(ref, message)`` gets the labels that cannot work as written. ``memo`` (kept
    across builds) makes unchanged policies the same filter objects, built once: only the Services that
    are strict or have authorization labels are looked at past their labels."""
    memo = {} if memo is None else memo
    namespaces = {ns.name: ns.mode for ns in (model.extra.get(NAMESPACE_MODES) or {}).values()}
    authz: Mapping[tuple[str, str], Authorization] = model.extra.get(AUTHZ) or {}
    td = trust_domain(options)
    last, memo["last"] = memo.get("last"), None  # set again only when this plan completes
    if last is not None and _unchanged(model, last[0], namespaces, authz):
        memo["last"] = last
        return list(last[1])
    out: list[NetworkFilter | HttpFilter] = []
    strict: list[Target] = []
    used: set[Any] = {"strict"}
    policy: set[tuple[str, str]] = set()
    for key in sorted(model.services):
        service = model.services[key]
        if service.kind != "Service":
            continue
        mode = service_mode(service, namespaces)
        auth = authz.get(key)
        if mode != STRICT and auth is None:
            continue  # no policy: its pods need no filter (the common case, so no endpoint walk)
        policy.add(key)
        target = _target(model, service)
        if not target.ips or not target.ports:
            continue
        ref = ObjectRef("Service", service.namespace, service.name, service.uid)
        # Clients reach a headless Service's pods by address (an ORIGINAL_DST cluster, no endpoint list
        # to mark for mTLS): they arrive in plaintext, so "strict" would refuse every one of them.
        if mode == STRICT and service.headless:
            if service.labels.value(MODE) == STRICT and report is not None:
                report(ref, f"{MODE}={STRICT} is not applied to a headless Service: its clients connect to pod addresses "
                            f"without mutual TLS")
        elif mode == STRICT:
            strict.append(target)
        if auth is None:
            continue
        if (service.headless or mode == DISABLE) and report is not None:
            why = "a headless Service" if service.headless else f"a Service with {MODE}={DISABLE}"
            report(ref, f"traffic.allow.* labels on {why}: its clients connect without mutual TLS, so none has an "
                        f"identity and every caller is denied")
        inputs = (target, auth, td)
        used.add(key)
        cached = memo.get(key)
        if cached is None or cached[0] != inputs:
            ns, name = key
            prefix = f"rbac_{ns}_{name}."
            rules = _rbac(f"{ns}/{name}", _permission(target), _allowed(auth, td))
            cached = memo[key] = (inputs, (
                NetworkFilter(f"trafficmgr.mtls.authz.{ns}.{name}", AUTHZ_ORDER,
                              net_rbac_pb2.RBAC(stat_prefix=prefix, rules=rules), TCP_CHAINS),
                HttpFilter(f"trafficmgr.mtls.authz.{ns}.{name}", AUTHZ_ORDER,
                           http_rbac_pb2.RBAC(rules=rules, rules_stat_prefix=prefix))))
        out.extend(cached[1])
    if strict:
        targets = tuple(strict)
        cached = memo.get("strict")
        if cached is None or cached[0] != targets:
            perm = rbac_pb2.Permission()
            for t in strict:
                perm.or_rules.rules.append(_permission(t))
            not_tls = rbac_pb2.Principal(not_id=rbac_pb2.Principal(authenticated=rbac_pb2.Principal.Authenticated()))
            cached = memo["strict"] = (targets, NetworkFilter(
                "trafficmgr.mtls.strict", STRICT_ORDER,
                net_rbac_pb2.RBAC(stat_prefix="mtls_strict.", rules=_rbac("strict", perm, not_tls)), ALL_CHAINS))
        out.append(cached[1])
    used.add("last")
    for gone in [k for k in memo if k not in used]:
        del memo[gone]  # Services that lost their policy or went away
    memo["last"] = (frozenset(policy), tuple(out))
    return out


def _unchanged(model: Model, policy_keys: frozenset[Any], namespaces: Mapping[str, str | None],
               authz: Mapping[tuple[str, str], Authorization]) -> bool:
    """The last plan still holds: the model's delta (relative to the model that plan was made from:
    ``plan`` runs on every build, and a failed one leaves no last plan) names no Namespace mode or
    authorization change, and no changed Service had or now has a policy. The common build (a pod or an
    unrelated Service changed) then costs O(changes), not a walk of every Service."""
    delta = model.delta
    if delta is None or NAMESPACE_MODES in delta.extra or AUTHZ in delta.extra:
        return False
    for key in delta.services:
        if key in policy_keys or key in authz:
            return False
        service = model.services.get(key)
        if service is not None and service.kind == "Service" and service_mode(service, namespaces) == STRICT:
            return False
    return True


@hookimpl
def trafficmgr_network_filters(role: str, ctx: BuildContext) -> list[NetworkFilter | HttpFilter]:
    if role != "inbound" or not enabled(ctx.options):
        return []
    # O(services) label lookups per build with --mtls, plus the endpoints of strict or restricted
    # Services; unchanged policies are the same filter objects (the core rebuilds the listener only when
    # the result differs).
    return plan(ctx.model, ctx.options, ctx.report, ctx.memo.setdefault("mtls.plan", {}))


__all__ = ["ALLOW_NAMESPACE", "ALLOW_SA", "ALPN_HTTP", "ALPN_TCP", "MODE", "plan"]
