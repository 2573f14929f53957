"""``trafficmgr serve``: run the control plane against a Kubernetes cluster."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from trafficmgr.core.plugins import PluginHost

log = logging.getLogger(__name__)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Core options of ``serve`` (plugin options are added by ``trafficmgr_add_arguments``)."""
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster config, else ~/.kube/config)")
    parser.add_argument("--context", help="kubeconfig context")
    parser.add_argument("--namespace", help="watch only this namespace (default: all namespaces)")
    parser.add_argument("--xds-address", default="0.0.0.0", help="xDS listen address (default 0.0.0.0)")
    parser.add_argument("--xds-port", type=_port, default=18000, help="xDS (ADS gRPC) port (default 18000)")
    parser.add_argument("--admin-address", default="127.0.0.1",
                        help="admin/metrics listen address (default 127.0.0.1; binding elsewhere exposes /debug views)")
    parser.add_argument("--admin-port", type=_port, default=18080, help="admin/metrics port (default 18080)")
    parser.add_argument("--sidecar-port", type=_port, default=10000, help="sidecar outbound listener port (default 10000)")


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number (0..65535)")
    return value


class ServeError(Exception):
    """A startup problem to show the user as one line."""


def run_serve(args: argparse.Namespace, plugins: PluginHost, stop: threading.Event | None = None) -> int:
    """Start watches, xDS and admin; block until SIGTERM/SIGINT (or ``stop``); drain and exit 0."""
    from trafficmgr.core.admin import AdminServer
    from trafficmgr.core.controlplane import ControlPlane
    from trafficmgr.core.kube.client import KubeClient, load_api_client
    from trafficmgr.core.xds.server import XdsServerThread

    try:
        api = load_api_client(args.kubeconfig, args.context)
    except Exception as exc:  # noqa: BLE001 - config errors come in many types
        raise ServeError(f"cannot load Kubernetes configuration: {exc}") from None
    args.sidecar_address = getattr(args, "sidecar_address", "0.0.0.0")
    cp = ControlPlane(plugins, args, KubeClient(api))
    xds = XdsServerThread(cp.cache, args.xds_address, args.xds_port)
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
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("shutting down: draining xDS streams")
    cp.stop()
    xds.stop(grace=2.0)
    admin.stop()
    return 0
