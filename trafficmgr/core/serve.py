"""``trafficmgr serve``: run the control plane against a Kubernetes cluster."""

from __future__ import annotations

import argparse
import logging
import threading

from trafficmgr.core.argtypes import listen_port, port
from trafficmgr.core.signals import stop_on_signals
from trafficmgr.core.plugins import PluginHost

log = logging.getLogger(__name__)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Core options of ``serve`` (plugin options are added by ``trafficmgr_add_arguments``)."""
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster config, else ~/.kube/config)")
    parser.add_argument("--context", help="kubeconfig context")
    parser.add_argument("--namespace", help="watch only this namespace (default: all namespaces)")
    parser.add_argument("--xds-address", default="0.0.0.0", help="xDS listen address (default 0.0.0.0)")
    parser.add_argument("--xds-port", type=port, default=18000, help="xDS (ADS gRPC) port (default 18000; 0: any free port)")
    parser.add_argument("--admin-address", default="127.0.0.1",
                        help="admin/metrics listen address (default 127.0.0.1; binding elsewhere exposes /debug views)")
    parser.add_argument("--admin-port", type=port, default=18080, help="admin/metrics port (default 18080; 0: any free port)")
    parser.add_argument("--sidecar-port", type=listen_port, default=10000, help="sidecar outbound listener port (default 10000)")
    parser.add_argument("--sidecar-inbound-port", type=port, default=15006,
                        help="sidecar inbound listener port that the agent redirects connections to the pod to "
                             "(default 15006; 0: no inbound listener)")
    parser.add_argument("--explicit-proxy", action="store_true",
                        help="local mode (no iptables): sidecars also serve explicit HTTP proxy requests "
                             "(internal listener outbound_proxy, see 'trafficmgr demo')")
    parser.add_argument("--xds-auth", choices=("peer-ip", "mtls", "none"), default="peer-ip",
                        help="who may claim a proxy identity: peer-ip (default), mtls, none (development only)")
    parser.add_argument("--xds-gateway-namespace", metavar="NS",
                        help="namespace of the gateway pods (default: $POD_NAMESPACE or default)")
    parser.add_argument("--xds-gateway-selector", metavar="K=V[,K=V]", default="app=traffic-ingress",
                        help="labels of the gateway pods allowed to claim the gateway role (default app=traffic-ingress)")
    parser.add_argument("--xds-tls-cert", metavar="FILE", help="xDS server certificate (PEM; with --xds-auth mtls)")
    parser.add_argument("--xds-tls-key", metavar="FILE", help="xDS server private key (PEM; with --xds-auth mtls)")
    parser.add_argument("--xds-client-ca", metavar="FILE", help="CA that signs proxy client certificates (with --xds-auth mtls)")


class ServeError(Exception):
    """A startup problem to show the user as one line."""


def run_serve(args: argparse.Namespace, plugins: PluginHost, stop: threading.Event | None = None) -> int:
    """Start watches, xDS and admin; block until SIGTERM/SIGINT (or ``stop``); drain and exit 0."""
    from trafficmgr.core.admin import AdminServer
    from trafficmgr.core.controlplane import ControlPlane
    from trafficmgr.core.kube.client import KubeClient, load_api_client
    from trafficmgr.core.xds.server import XdsServerThread

    if args.sidecar_inbound_port and args.sidecar_inbound_port == args.sidecar_port:
        raise ServeError(f"--sidecar-inbound-port and --sidecar-port are both {args.sidecar_port}: "
                         "the sidecar's inbound and outbound listeners need different ports")
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
    xds = XdsServerThread(cp.cache, args.xds_address, args.xds_port, credentials, cp.authorize)
    try:
        xds.start()
    except OSError as exc:
        raise ServeError(f"cannot listen for xDS on {args.xds_address}:{args.xds_port}: {exc} (use --xds-port)") from None
    cp.xds = xds
    admin = AdminServer(cp, args.admin_address, args.admin_port)
    try:
        admin.start()
    except OSError as exc:
        xds.stop()
        raise ServeError(str(exc)) from None
    cp.start_watches(args.namespace)
    log.info("trafficmgr serving xDS on %s:%d, admin on http://%s:%d, plugins: %s",
             args.xds_address, xds.port, args.admin_address, admin.port, ", ".join(plugins.infos))
    stop = stop_on_signals(stop)
    stop.wait()
    log.info("shutting down: draining xDS streams")
    cp.stop()
    xds.stop(grace=2.0)
    admin.stop()
    return 0


def _xds_credentials(args: argparse.Namespace):  # -> grpc.ServerCredentials | None
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


def selection_from_argv(argv: list[str]) -> str | None:
    """The ``--plugins`` value in ``argv`` (``--plugins X`` or ``--plugins=X``), else None."""
    for i, arg in enumerate(argv):
        if arg == "--plugins" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--plugins="):
            return arg.split("=", 1)[1]
    return None


def load_selected_plugins(parser: argparse.ArgumentParser) -> None:
    """Load the plugins selected on the command line (or by the environment) and let them add options.

    A selection error is kept and raised by ``run`` so other commands keep working.
    """
    from trafficmgr.core import cli

    if not cli.CURRENT_ARGV or "serve" not in cli.CURRENT_ARGV:
        parser.set_defaults(_plugins=None, _plugin_error=None)
        return
    try:
        host = PluginHost.load(selection_from_argv(cli.CURRENT_ARGV))
    except Exception as exc:  # noqa: BLE001 - reported by run()
        parser.set_defaults(_plugins=None, _plugin_error=exc)
        return
    host.call_all("trafficmgr_add_arguments", parser=parser, command="serve")
    parser.set_defaults(_plugins=host, _plugin_error=None)


def _setup(parser: argparse.ArgumentParser) -> None:
    add_serve_arguments(parser)
    parser.add_argument("--plugins", metavar="LIST",
                        help="comma-separated plugins to load (default: $TRAFFICMGR_PLUGINS or every installed plugin)")
    load_selected_plugins(parser)


def _run(args: argparse.Namespace) -> int:
    from trafficmgr.core.cli import CliError

    if args._plugin_error is not None:
        raise args._plugin_error
    plugins = args._plugins or PluginHost.load(args.plugins)
    try:
        return run_serve(args, plugins)
    except ServeError as exc:
        raise CliError(str(exc)) from None


def _register() -> None:
    from trafficmgr.core.cli import register_command

    register_command("serve", "run the control plane against a Kubernetes cluster", _setup, _run, replace=True)


_register()
