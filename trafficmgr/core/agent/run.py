"""Run the node agent given the options of ``trafficmgr agent`` (the command line itself is
:mod:`trafficmgr.cli.agent`), and make the sidecar runtime those options select."""

from __future__ import annotations

import argparse
import logging
import threading

from trafficmgr.core.agent.runtime import Runtime
from trafficmgr.core.plugins import PluginHost
from trafficmgr.core.signals import stop_on_signals

log = logging.getLogger(__name__)

#: Values of ``--runtime``.
RUNTIMES = ("docker", "netns", "local")


class AgentStartError(Exception):
    """A startup problem to show the user as one line."""


def make_runtime(args: argparse.Namespace) -> Runtime:
    """The runtime selected by ``args.runtime`` and its options (``docker_host``, ``envoy_image``,
    ``state_dir`` (every runtime: sidecars' own directories), ``netns_dir``)."""
    if args.runtime == "docker":
        from trafficmgr.core.agent.docker_runtime import DockerRuntime

        return DockerRuntime(args.docker_host, getattr(args, "envoy_image", "") or "", state_dir=args.state_dir)
    if args.runtime == "local":  # with the explicit proxy on <pod IP>:15001, as in `trafficmgr demo`
        from trafficmgr.core.agent.local_runtime import LocalRuntime

        return LocalRuntime(args.state_dir)
    from trafficmgr.core.agent.netns_runtime import ProcessRuntime

    return ProcessRuntime(args.state_dir, args.netns_dir)


def run_agent(args: argparse.Namespace, plugins: PluginHost, stop: threading.Event | None = None) -> int:
    """Manage the sidecars of this node's pods until SIGTERM/SIGINT (or ``stop``), serving /healthz and
    /readyz on ``args.health_port`` (0: not); returns 0. The sidecars stay when it returns: a restarted
    agent adopts them. Raises :class:`AgentStartError` when it cannot start."""
    from trafficmgr.core.agent.agent import Agent, AgentConfig, HealthServer
    from trafficmgr.core.kube.client import KubeClient, load_api_client

    try:
        api = load_api_client(args.kubeconfig)
    except Exception as exc:  # noqa: BLE001 - config errors come in many types
        raise AgentStartError(f"cannot load Kubernetes configuration: {exc}") from None
    config = AgentConfig(
        node_name=args.node_name, xds_address=args.xds_address, admin_port=args.admin_port, stats_port=args.stats_port,
        proxy_uid=args.proxy_uid,
        proxy_port=args.proxy_port, inbound_port=args.inbound_port, namespace=args.namespace, delta=args.delta, resync_s=args.resync,
        identity=getattr(args, "identity_config", None), xds_mtls=bool(getattr(args, "xds_mtls", False)),
    )
    agent = Agent(KubeClient(api), make_runtime(args), config, plugins, args).start()
    health = None
    if args.health_port:
        try:
            health = HealthServer(agent, args.health_address, args.health_port).start()
        except OSError as exc:
            agent.stop()
            raise AgentStartError(f"cannot listen on {args.health_address}:{args.health_port}: {exc} (use --health-port)") from None
    log.info("node agent for %s: runtime %s, xDS %s", args.node_name, agent.runtime.describe(), args.xds_address)
    stop = stop_on_signals(stop)
    stop.wait()
    # Sidecars stay: a restarted agent adopts them (`trafficmgr proxies --remove-all` removes them).
    agent.stop()
    if health is not None:
        health.stop()
    return 0
