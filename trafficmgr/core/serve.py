"""Run the control plane against a Kubernetes cluster, given the options of ``trafficmgr serve``
(the command line itself is :mod:`trafficmgr.cli.serve`)."""

from __future__ import annotations

import argparse
import datetime
import logging
import threading
from typing import TYPE_CHECKING, Any

import attrs

from trafficmgr.core.plugins import PluginHost
from trafficmgr.core.signals import stop_on_signals

if TYPE_CHECKING:
    import grpc

    from trafficmgr.core.admin import AdminServer, AdminState
    from trafficmgr.core.identity.ca import MeshCA
    from trafficmgr.core.identity.server import IdentityServer
    from trafficmgr.core.kube.client import KubeClient
    from trafficmgr.core.kube.leader import LeaseTiming

log = logging.getLogger(__name__)


class ServeError(Exception):
    """A startup problem to show the user as one line."""


def run_serve(args: argparse.Namespace, plugins: PluginHost, stop: threading.Event | None = None) -> int:
    """Start watches, xDS and admin; block until SIGTERM/SIGINT (or ``stop``); drain and exit 0."""
    from trafficmgr.core.controlplane import ControlPlane
    from trafficmgr.core.kube.client import KubeClient, load_api_client
    from trafficmgr.core.xds.server import XdsServerThread

    if args.sidecar_inbound_port and args.sidecar_inbound_port == args.sidecar_port:
        raise ServeError(f"--sidecar-inbound-port and --sidecar-port are both {args.sidecar_port}: "
                         "the sidecar's inbound and outbound listeners need different ports")
    _check_identity_options(args)  # before Kubernetes: a bad option is reported as such
    mesh = mesh_options(args)
    lease = lease_options(args)
    try:
        api = load_api_client(args.kubeconfig, args.context)
    except Exception as exc:  # noqa: BLE001 - config errors come in many types
        raise ServeError(f"cannot load Kubernetes configuration: {exc}") from None
    args.sidecar_address = getattr(args, "sidecar_address", "0.0.0.0")
    from trafficmgr.core.access import parse_selector, warn_if_open

    try:
        parse_selector(args.xds_gateway_selector)
    except ValueError as exc:
        raise ServeError(f"--xds-gateway-selector: {exc}") from None
    stop = stop_on_signals(stop)
    kube = KubeClient(api)
    ca = _start_mesh_ca(mesh, kube) if mesh is not None else None
    try:
        credentials = _xds_credentials(args, ca, mesh, stop)
        warn_if_open(args.xds_auth)
        cp = ControlPlane(plugins, args, kube, freeze_gc=True)
        from trafficmgr.core.kube.leader import LEADER, LeaderElector

        if lease is not None:
            cp.leader = LeaderElector(api, lease.name, lease.namespace, lease.identity, lease.timing)
        else:
            LEADER.set(1)  # --no-leader-election: this process writes
        xds = XdsServerThread(cp.cache, args.xds_address, args.xds_port, credentials, cp.authorize,
                              max_streams_per_peer=getattr(args, "xds_max_streams_per_peer", 128),
                              node_timeout=getattr(args, "xds_node_timeout", 10.0),
                              max_request_bytes=getattr(args, "xds_max_request_mib", 4) << 20)
        try:
            xds.start()
        except OSError as exc:
            raise ServeError(f"cannot listen for xDS on {args.xds_address}:{args.xds_port}: {exc} (use --xds-port)") from None
    except BaseException:
        if ca is not None:
            ca.stop()
        raise
    cp.xds = xds
    servers = _http_servers(cp, args)
    identity = _identity_server(mesh, ca, kube) if mesh is not None and ca is not None else None
    try:
        for server in servers:
            server.start()
        if identity is not None:
            identity.start(stop)
    except OSError as exc:
        for server in servers:
            server.stop()
        xds.stop()
        if ca is not None:
            ca.stop()
        raise ServeError(str(exc)) from None
    cp.start_watches(args.namespace)
    log.info("trafficmgr serving xDS on %s:%d, %s, plugins: %s; %s", args.xds_address, xds.port,
             ", ".join(f"{'admin' if i == 0 else 'metrics'} on {s.url}" for i, s in enumerate(servers)), ", ".join(plugins.infos),
             f"replica {lease.identity}, writes while it holds Lease {lease.namespace}/{lease.name}" if lease is not None
             else "leader election off: this process writes status and Events")
    stop.wait()
    log.info("shutting down: draining xDS streams")
    cp.stop()
    xds.stop(grace=2.0)
    for server in servers:
        server.stop()
    if identity is not None:
        identity.stop()
    if ca is not None:
        ca.stop()
    return 0


@attrs.frozen(slots=True)
class LeaseOptions:
    """``serve``'s leader election options, checked (see :func:`lease_options`)."""

    name: str
    namespace: str
    identity: str
    timing: LeaseTiming


def lease_options(args: argparse.Namespace) -> LeaseOptions | None:
    """The checked leader election options (None with ``--no-leader-election``; its other options are
    then an error). Sets ``args.replica_name`` to the identity (proxy-status shows the same name).
    Raises :class:`ServeError` naming the option."""
    import os

    from trafficmgr.core.identity import server as srv
    from trafficmgr.core.kube.leader import DEFAULT_LEASE_NAME, DEFAULT_LEASE_SECONDS, check_timing, default_identity

    name = getattr(args, "replica_name", None) or default_identity()
    if not name.strip() or len(name) > 253 or any(c.isspace() for c in name):
        raise ServeError(f"--replica-name {name!r}: one word of at most 253 characters")
    args.replica_name = name
    flags = ("lease_name", "lease_namespace", "lease_duration", "lease_renew_deadline", "lease_retry_period")
    if not getattr(args, "leader_election", True):
        for flag in flags:
            if getattr(args, flag, None) is not None:
                raise ServeError(f"--{flag.replace('_', '-')} needs leader election (drop --no-leader-election)")
        return None
    lease_name = getattr(args, "lease_name", None) or DEFAULT_LEASE_NAME
    namespace = getattr(args, "lease_namespace", None) or os.environ.get("POD_NAMESPACE") or "default"
    try:
        srv.check_name(lease_name, "Lease name")
    except ValueError as exc:
        raise ServeError(f"--lease-name: {exc}") from None
    try:
        srv.check_namespace(namespace)
    except ValueError as exc:
        raise ServeError(f"--lease-namespace: {exc}") from None
    duration = getattr(args, "lease_duration", None)
    try:
        timing = check_timing(DEFAULT_LEASE_SECONDS if duration is None else duration,
                              getattr(args, "lease_renew_deadline", None), getattr(args, "lease_retry_period", None))
    except ValueError as exc:
        raise ServeError(f"--lease-duration/--lease-renew-deadline/--lease-retry-period: {exc}") from None
    return LeaseOptions(lease_name, namespace, name, timing)


def _http_servers(state: AdminState, args: argparse.Namespace) -> list[AdminServer]:
    """The admin endpoint (every route; ``/debug/*`` behind ``--admin-token-file`` when given) and, with
    ``--metrics-port``, the metrics endpoint (``/metrics``, ``/healthz``, ``/readyz`` only). Nothing is bound
    yet; :meth:`AdminServer.start` refuses ``/debug/*`` on a non-loopback address without a token."""
    from trafficmgr.core.admin import METRICS_ROUTES, AdminError, AdminServer, read_token_file

    token_file = getattr(args, "admin_token_file", None)
    try:
        token = read_token_file(token_file) if token_file else None
    except AdminError as exc:
        raise ServeError(str(exc)) from None
    servers = [AdminServer(state, args.admin_address, args.admin_port, token=token)]
    metrics_port = getattr(args, "metrics_port", None)
    if metrics_port is not None:
        servers.append(AdminServer(state, getattr(args, "metrics_address", "0.0.0.0"), metrics_port,
                                   routes=METRICS_ROUTES, flag="--metrics-port"))
    return servers


def _check_identity_options(args: argparse.Namespace) -> None:
    """Validate the identity options (``--xds-gateway-service-account``, ``--trust-domain``, the Unix-socket
    uid lists) in place: uid lists become frozensets (None: the default of
    :class:`~trafficmgr.core.access.AccessControl`)."""
    import re

    from trafficmgr.core.access import check_trust_domain, parse_uids

    sa = getattr(args, "xds_gateway_service_account", None)
    if sa is not None and not re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", sa):
        raise ServeError(f"--xds-gateway-service-account {sa!r}: not a ServiceAccount name "
                         "(lowercase letters, digits, '-' and '.')")
    try:
        check_trust_domain(getattr(args, "trust_domain", None) or "cluster.local")
    except ValueError as exc:
        raise ServeError(f"--trust-domain: {exc}") from None
    for flag in ("xds_unix_gateway_uids", "xds_unix_sidecar_uids"):
        text = getattr(args, flag, None)
        if isinstance(text, str):
            try:
                setattr(args, flag, parse_uids(text))
            except ValueError as exc:
                raise ServeError(f"--{flag.replace('_', '-')}: {exc}") from None


def _xds_credentials(args: argparse.Namespace, ca: MeshCA | None = None, mesh: MeshOptions | None = None,
                     stop: threading.Event | None = None) -> grpc.ServerCredentials | None:
    """Server credentials for ``--xds-auth mtls`` (client certificates required), else None. With
    ``--mesh-identity`` and none of the three files, the certificate comes from the mesh CA (remade at
    half-life and after a CA change) and the trust bundle is the client CA, both followed without restart."""
    flags = ("xds_tls_cert", "xds_tls_key", "xds_client_ca")
    if args.xds_auth != "mtls":
        for flag in flags:
            if getattr(args, flag):
                raise ServeError(f"--{flag.replace('_', '-')} needs --xds-auth mtls")
        return None
    import grpc

    if ca is not None and mesh is not None and not any(getattr(args, flag) for flag in flags):
        from trafficmgr.core.identity.ca import ServingCredentials
        from trafficmgr.core.identity.server import serving_sans

        if not ca.ready:
            log.warning("--xds-auth mtls with the mesh CA: xDS starts once %s exists", ca.where)
            if not ca.wait_ready(stop=stop):
                raise ServeError(f"stopped while waiting for {ca.where}")
        dns, ips = serving_sans(mesh.dns_names, args.xds_address)
        return ServingCredentials(ca, dns, ips, client_auth=True).credentials()
    files = {}
    for flag in flags:
        path = getattr(args, flag)
        if not path:
            hint = " (or --mesh-identity without any --xds-tls-* file: the mesh CA makes them)" if mesh else ""
            raise ServeError(f"--xds-auth mtls needs --{flag.replace('_', '-')}{hint}")
        try:
            with open(path, "rb") as f:
                files[flag] = f.read()
        except OSError as exc:
            raise ServeError(f"--{flag.replace('_', '-')}: cannot read {path}: {exc.strerror}") from None
    return grpc.ssl_server_credentials(
        [(files["xds_tls_key"], files["xds_tls_cert"])], root_certificates=files["xds_client_ca"], require_client_auth=True
    )


# -- mesh identity ---------------------------------------------------------------------------------


@attrs.frozen(slots=True)
class MeshOptions:
    """``serve --mesh-identity`` and its options, checked (see :func:`mesh_options`)."""

    mode: str
    secret: str
    namespace: str
    ttl: datetime.timedelta
    address: str
    port: int
    dns_names: list[str]
    audience: str
    agent_namespace: str
    agent_service_account: str
    trust_domain: str


_MESH_FLAGS = ("mesh_ca_mode", "mesh_ca_secret", "mesh_ca_namespace", "workload_cert_ttl", "identity_address",
               "identity_port", "identity_dns_names", "identity_audience", "identity_agent_service_account")


def mesh_options(args: argparse.Namespace) -> MeshOptions | None:
    """The checked mesh identity options (None without ``--mesh-identity``; its options alone are an
    error). Raises :class:`ServeError` with one line naming the option."""
    import ipaddress
    import os

    from trafficmgr.core.identity import DEFAULT_PORT
    from trafficmgr.core.identity import ca as ca_mod
    from trafficmgr.core.identity import server as srv

    if not getattr(args, "mesh_identity", False):
        for flag in _MESH_FLAGS:
            if getattr(args, flag, None) is not None:
                raise ServeError(f"--{flag.replace('_', '-')} needs --mesh-identity")
        return None

    def opt(flag: str, default: Any) -> Any:
        value = getattr(args, flag, None)
        return default if value is None else value

    def check(flag: str, fn: Any, value: Any) -> Any:
        try:
            return fn(value)
        except ValueError as exc:
            raise ServeError(f"--{flag.replace('_', '-')}: {exc}") from None

    namespace = check("mesh_ca_namespace", srv.check_namespace,
                      opt("mesh_ca_namespace", os.environ.get("POD_NAMESPACE") or "trafficmgr"))
    secret = check("mesh_ca_secret", lambda v: srv.check_name(v, "Secret name"), opt("mesh_ca_secret", ca_mod.DEFAULT_SECRET))
    ttl = check("workload_cert_ttl", srv.check_ttl, opt("workload_cert_ttl", "24h"))
    address = opt("identity_address", "0.0.0.0")
    check("identity_address", lambda v: ipaddress.ip_address(v.strip("[]")), address)
    names_text = opt("identity_dns_names", f"trafficmgr.{namespace}.svc,trafficmgr.{namespace}.svc.cluster.local")
    names = [n.strip() for n in names_text.split(",") if n.strip()]

    def dns_name(name: str) -> str:
        if len(name) > 253 or not all(_dns_label(label) for label in name.split(".")):
            raise ValueError(f"{name!r} is not a DNS name")
        return name

    for name in names:
        check("identity_dns_names", dns_name, name)
    audience = opt("identity_audience", srv.DEFAULT_AUDIENCE)
    if not audience.strip() or len(audience) > 256 or any(c.isspace() for c in audience):
        raise ServeError(f"--identity-audience {audience!r}: one word, no spaces")
    sa_text = opt("identity_agent_service_account", f"{namespace}/{srv.DEFAULT_AGENT_SERVICE_ACCOUNT}")
    agent_ns, slash, agent_sa = sa_text.partition("/")
    if not slash:
        raise ServeError(f"--identity-agent-service-account {sa_text!r}: use NAMESPACE/NAME")
    check("identity_agent_service_account", srv.check_namespace, agent_ns)
    check("identity_agent_service_account", lambda v: srv.check_name(v, "ServiceAccount name"), agent_sa)
    return MeshOptions(mode=opt("mesh_ca_mode", "generate"), secret=secret, namespace=namespace, ttl=ttl,
                       address=address, port=opt("identity_port", DEFAULT_PORT), dns_names=names,
                       audience=audience, agent_namespace=agent_ns, agent_service_account=agent_sa,
                       trust_domain=getattr(args, "trust_domain", None) or "cluster.local")


def _dns_label(label: str) -> bool:
    import re

    return bool(re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", label))


def _start_mesh_ca(mesh: MeshOptions, kube: KubeClient) -> MeshCA:
    """Load (generate mode: create) the CA and start following its Secret; a bad Secret is a ServeError."""
    from trafficmgr.core.identity.ca import CAError, MeshCA

    ca = MeshCA(kube, mesh.namespace, mesh.secret, mesh.mode, mesh.trust_domain)
    try:
        return ca.start()
    except CAError as exc:
        ca.stop()
        raise ServeError(f"mesh CA: {exc}") from None


class _IdentityStarter:
    """Starts the Sign service now when the CA is loaded (a bind error is then a ServeError), else from a
    thread once it is (provided mode: the Secret may come later)."""

    def __init__(self, server: IdentityServer | None) -> None:
        self.server = server
        self._thread: threading.Thread | None = None

    def start(self, stop: threading.Event) -> None:
        server = self.server
        if server is None:
            return
        if server.ca.ready:
            server.start()
            return

        def later() -> None:
            if server.ca.wait_ready(stop=stop):
                try:
                    server.start()
                except OSError as exc:
                    log.error("mesh identity: %s; stopping", exc)
                    stop.set()

        self._thread = threading.Thread(target=later, name="identity-start", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


def _identity_server(mesh: MeshOptions, ca: MeshCA, kube: KubeClient) -> _IdentityStarter:
    """The Sign service (``--identity-port 0``: none).

    Safety of this listener: see :mod:`trafficmgr.core.identity.server` (any pod may reach it; it serves
    only Sign, and signs only after TokenReview and the pod checks bind the identity to the caller)."""
    from trafficmgr.core.identity.server import IdentityServer, SignOptions

    if mesh.port == 0:
        log.info("mesh identity: --identity-port 0, no Sign service (the CA still publishes the trust bundle)")
        return _IdentityStarter(None)
    options = SignOptions(trust_domain=mesh.trust_domain, audience=mesh.audience, agent_namespace=mesh.agent_namespace,
                          agent_service_account=mesh.agent_service_account, ttl=mesh.ttl)
    return _IdentityStarter(IdentityServer(ca, kube, options, mesh.address, mesh.port, mesh.dns_names))
