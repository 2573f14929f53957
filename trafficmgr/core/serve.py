"""Run the control plane against a Kubernetes cluster, given the options of ``trafficmgr serve``
(the command line itself is :mod:`trafficmgr.cli.serve`)."""

from __future__ import annotations

import argparse
import logging
import threading
from typing import TYPE_CHECKING

from trafficmgr.core.plugins import PluginHost
from trafficmgr.core.signals import stop_on_signals

if TYPE_CHECKING:
    import grpc

    from trafficmgr.core.admin import AdminServer, AdminState

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
    credentials = _xds_credentials(args)
    warn_if_open(args.xds_auth)
    cp = ControlPlane(plugins, args, KubeClient(api), freeze_gc=True)
    xds = XdsServerThread(cp.cache, args.xds_address, args.xds_port, credentials, cp.authorize,
                          max_streams_per_peer=getattr(args, "xds_max_streams_per_peer", 128),
                          node_timeout=getattr(args, "xds_node_timeout", 10.0),
                          max_request_bytes=getattr(args, "xds_max_request_mib", 4) << 20)
    try:
        xds.start()
    except OSError as exc:
        raise ServeError(f"cannot listen for xDS on {args.xds_address}:{args.xds_port}: {exc} (use --xds-port)") from None
    cp.xds = xds
    servers = _http_servers(cp, args)
    try:
        for server in servers:
            server.start()
    except OSError as exc:
        for server in servers:
            server.stop()
        xds.stop()
        raise ServeError(str(exc)) from None
    cp.start_watches(args.namespace)
    log.info("trafficmgr serving xDS on %s:%d, %s, plugins: %s", args.xds_address, xds.port,
             ", ".join(f"{'admin' if i == 0 else 'metrics'} on {s.url}" for i, s in enumerate(servers)), ", ".join(plugins.infos))
    stop = stop_on_signals(stop)
    stop.wait()
    log.info("shutting down: draining xDS streams")
    cp.stop()
    xds.stop(grace=2.0)
    for server in servers:
        server.stop()
    return 0


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


def _xds_credentials(args: argparse.Namespace) -> grpc.ServerCredentials | None:
    """Server credentials for ``--xds-auth mtls`` (client certificates required), else None."""
    if args.xds_auth != "mtls":
        for flag in ("xds_tls_cert", "xds_tls_key", "xds_client_ca"):
            if getattr(args, flag):
                raise ServeError(f"--{flag.replace('_', '-')} needs --xds-auth mtls")
        return None
    import grpc

    files = {}
    for flag in ("xds_tls_cert", "xds_tls_key", "xds_client_ca"):
        path = getattr(args, flag)
        if not path:
            raise ServeError(f"--xds-auth mtls needs --{flag.replace('_', '-')}")
        try:
            with open(path, "rb") as f:
                files[flag] = f.read()
        except OSError as exc:
            raise ServeError(f"--{flag.replace('_', '-')}: cannot read {path}: {exc.strerror}") from None
    return grpc.ssl_server_credentials(
        [(files["xds_tls_key"], files["xds_tls_cert"])], root_certificates=files["xds_client_ca"], require_client_auth=True
    )
