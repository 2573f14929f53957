"""``trafficmgr agent``, ``trafficmgr proxies`` and ``trafficmgr bootstrap`` (the agent itself runs with
:func:`trafficmgr.core.agent.run.run_agent`)."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
from typing import TYPE_CHECKING

from trafficmgr.cli import CliError, _write, plugins_of, register_command
from trafficmgr.core.agent.run import RUNTIMES, AgentStartError, make_runtime, run_agent
from trafficmgr.core.agent.runtime import Runtime, RuntimeUnavailable, Sidecar, SidecarError, find
from trafficmgr.core.argtypes import int_at_least, listen_port, port, positive_seconds
from trafficmgr.core.bootstrap import ADMIN_ADDRESS, ADMIN_PORT, STATS_PORT
from trafficmgr.core.plugins import ENV_SELECTION

if TYPE_CHECKING:
    from trafficmgr.core.agent.identity import IdentityConfig
    from trafficmgr.core.bootstrap import XdsIdentityTls, XdsTls

ENV_NODE_NAME = "NODE_NAME"
_DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
ENV_DOCKER_HOST = "DOCKER_HOST"


def _docker_host_default() -> str:
    from trafficmgr.core.agent.docker_runtime import DEFAULT_DOCKER_HOST

    return os.environ.get(ENV_DOCKER_HOST) or DEFAULT_DOCKER_HOST


def _add_runtime_options(parser: argparse.ArgumentParser, choices: tuple[str, ...]) -> None:
    from trafficmgr.core.agent.netns_runtime import DEFAULT_NETNS_DIR, DEFAULT_STATE_DIR

    parser.add_argument("--runtime", choices=choices, default="docker", help="how sidecars run (default: docker)")
    parser.add_argument("--docker-host", metavar="URL", default=_docker_host_default(),
                        help="Docker engine (default: $DOCKER_HOST or unix:///var/run/docker.sock)")
    parser.add_argument("--state-dir", metavar="DIR", default=DEFAULT_STATE_DIR,
                        help=f"the sidecars' own directories (their working directories: bootstrap, log, identity/); "
                             f"netns/local runtimes also record their processes there; docker: it must be the same path "
                             f"on the host (default {DEFAULT_STATE_DIR})")
    parser.add_argument("--netns-dir", metavar="DIR", default=DEFAULT_NETNS_DIR,
                        help=f"netns runtime: where pod network namespaces are found (default {DEFAULT_NETNS_DIR})")


# -- agent ------------------------------------------------------------------------------------------


def _setup_agent(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--node-name", metavar="NAME", default=os.environ.get(ENV_NODE_NAME),
                        help=f"this node (default: ${ENV_NODE_NAME}); only its pods are managed")
    parser.add_argument("--xds-address", metavar="HOST:PORT", required=True,
                        help="the control plane's xDS address as sidecars reach it (HOST:PORT or unix:/path)")
    parser.add_argument("--envoy-image", metavar="IMAGE", default="",
                        help="docker runtime: the sidecar image (Envoy at /usr/local/bin/envoy)")
    parser.add_argument("--kubeconfig", metavar="FILE", help="kubeconfig file (default: in-cluster config, else ~/.kube/config)")
    parser.add_argument("--namespace", metavar="NS", help="manage only pods of this namespace (default: all)")
    parser.add_argument("--plugins", metavar="SEL", default=None,
                        help=f"plugins whose labels and bootstrap hooks apply (default: ${ENV_SELECTION} or all installed)")
    parser.add_argument("--admin-port", type=listen_port, default=ADMIN_PORT,
                        help=f"sidecar Envoy admin port, on 127.0.0.1 inside the pod's network namespace (local runtime: "
                             f"on the pod IP) (default {ADMIN_PORT})")
    parser.add_argument("--stats-port", type=port, default=STATS_PORT,
                        help=f"the sidecar's stats-only listener on the pod IP: GET /stats/prometheus and /ready "
                             f"(default {STATS_PORT}; 0: none)")
    parser.add_argument("--proxy-uid", type=int_at_least(1), default=1337,
                        help="uid and gid Envoy runs as; its traffic is not redirected (default 1337)")
    parser.add_argument("--proxy-port", type=listen_port, default=10000,
                        help="the sidecar's outbound listener port that TCP is redirected to (default 10000)")
    parser.add_argument("--inbound-port", type=port, default=15006,
                        help="the sidecar's inbound listener port that connections to the pod are redirected to "
                             "(default 15006, as 'serve --sidecar-inbound-port'; 0: not captured)")
    parser.add_argument("--health-port", type=port, default=18081, help="/healthz and /readyz port (default 18081; 0 disables)")
    parser.add_argument("--health-address", default="0.0.0.0", help="/healthz and /readyz address (default 0.0.0.0)")
    parser.add_argument("--delta", action="store_true", help="sidecars use incremental (delta) xDS")
    parser.add_argument("--resync", type=positive_seconds, default=30.0, metavar="SECONDS",
                        help="full reconcile interval: rules re-checked, dead sidecars replaced (default 30)")
    _add_runtime_options(parser, RUNTIMES)
    _add_identity_options(parser)


def _add_identity_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("mesh identity (workload certificates for the sidecars)")
    g.add_argument("--mesh-identity", action="store_true",
                   help="give every sidecar a workload certificate (key made on this node, signed by the control "
                        "plane's signing service), renewed at half-life; needs --ca-address and --identity-token-file")
    g.add_argument("--ca-address", metavar="HOST:PORT",
                   help="the control plane's signing service ('serve --mesh-identity', port 15012 by default)")
    g.add_argument("--ca-server-name", metavar="NAME",
                   help="the name the signing service's certificate must carry (default: the host of --ca-address)")
    g.add_argument("--identity-token-file", metavar="FILE",
                   help="the agent's ServiceAccount token with the signing service's audience (a projected token; "
                        "re-read for every request)")
    g.add_argument("--mesh-ca-namespace", metavar="NS",
                   help="namespace of the control plane's trust bundle ConfigMap trafficmgr-trust-bundle "
                        "(default: $POD_NAMESPACE, else trafficmgr)")
    g.add_argument("--trust-domain", metavar="DOMAIN", default="cluster.local",
                   help="SPIFFE trust domain of the workload identities, as 'serve --trust-domain' (default cluster.local)")
    g.add_argument("--xds-mtls", action="store_true",
                   help="sidecars present their workload certificate to the xDS server and verify it against the "
                        "trust bundle (for 'serve --xds-auth mtls'); needs --mesh-identity")


def identity_config(args: argparse.Namespace) -> IdentityConfig | None:
    """The agent's :class:`IdentityConfig` from its options (None without ``--mesh-identity``); raises
    :class:`CliError` for a bad or missing one."""
    from trafficmgr.core.access import check_trust_domain
    from trafficmgr.core.agent.identity import IdentityConfig
    from trafficmgr.core.identity.client import parse_address

    if not args.mesh_identity:
        given = [f"--{f.replace('_', '-')}" for f in ("ca_address", "ca_server_name", "identity_token_file",
                                                      "mesh_ca_namespace", "xds_mtls") if getattr(args, f)]
        if given:
            raise CliError(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --mesh-identity")
        return None
    missing = [f"--{f.replace('_', '-')}" for f in ("ca_address", "identity_token_file") if not getattr(args, f)]
    if missing:
        raise CliError(f"--mesh-identity needs {' and '.join(missing)}")
    try:
        parse_address(args.ca_address)
    except ValueError as exc:
        raise CliError(f"--ca-address: {exc}") from None
    try:
        check_trust_domain(args.trust_domain)
    except ValueError as exc:
        raise CliError(f"--trust-domain: {exc}") from None
    if not os.path.isfile(args.identity_token_file):
        # Not fatal later (the kubelet may write it late, it is re-read per call), but a wrong path is a typo.
        raise CliError(f"--identity-token-file {args.identity_token_file}: no such file")
    namespace = args.mesh_ca_namespace or os.environ.get("POD_NAMESPACE") or "trafficmgr"
    return IdentityConfig(ca_address=args.ca_address, token_file=args.identity_token_file,
                          ca_server_name=args.ca_server_name or None, trust_domain=args.trust_domain,
                          ca_namespace=namespace)


def _run_agent(args: argparse.Namespace, stop: threading.Event | None = None) -> int:
    from trafficmgr.core.agent.agent import parse_xds_address

    if not args.node_name:
        raise CliError(f"--node-name is required (or set ${ENV_NODE_NAME}, e.g. from the pod's spec.nodeName)")
    try:
        parse_xds_address(args.xds_address)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if args.runtime == "docker" and not args.envoy_image:
        raise CliError("--envoy-image is required with --runtime docker")
    ports = {"--proxy-port": args.proxy_port, "--inbound-port": args.inbound_port, "--admin-port": args.admin_port,
             "--stats-port": args.stats_port}
    taken = [name for name, port in ports.items() if port and list(ports.values()).count(port) > 1]
    if taken:
        raise CliError(f"{' and '.join(taken)} must differ: each is a different listener of the sidecar")
    args.identity_config = identity_config(args)
    plugins = plugins_of(args)
    try:
        return run_agent(args, plugins, stop)
    except AgentStartError as exc:
        raise CliError(str(exc)) from None


# -- proxies ----------------------------------------------------------------------------------------


def _setup_proxies(parser: argparse.ArgumentParser) -> None:
    _add_runtime_options(parser, ("docker", "netns", "local"))
    parser.add_argument("--json", action="store_true", help="print a JSON list")
    parser.add_argument("--id", metavar="PREFIX", help="select the sidecar whose id starts with PREFIX")
    parser.add_argument("--log", action="store_true", help="with --id: print that sidecar's log")
    parser.add_argument("--access-log", action="store_true",
                        help="print the access-log lines (JSON, traffic.accesslog=on) of the sidecar of --id, or of "
                             "every sidecar of this node, each line then prefixed with NAMESPACE/POD and a space")
    parser.add_argument("--tail", type=int_at_least(0), default=None, metavar="N",
                        help="with --log: only the last N lines; with --access-log: the last N access-log lines (per sidecar)")
    parser.add_argument("--admin", metavar="PATH",
                        help="with --id: GET PATH (e.g. /config_dump, /clusters, /stats) from that sidecar's Envoy admin, "
                             "from inside its pod's network namespace (admin is not reachable from the pod network)")
    parser.add_argument("--admin-port", type=listen_port, default=ADMIN_PORT,
                        help=f"with --admin: the sidecars' admin port, as 'agent --admin-port' (default {ADMIN_PORT})")
    parser.add_argument("--remove-all", action="store_true",
                        help="remove every sidecar and its iptables rules, and clear the pods' traffic.envoy.proxy "
                             "annotation when Kubernetes is reachable (the DaemonSet's preStop)")
    parser.add_argument("--kubeconfig", metavar="FILE",
                        help="with --remove-all: kubeconfig for clearing annotations (default: in-cluster config, else ~/.kube/config)")


def _run_proxies(args: argparse.Namespace) -> int:
    from trafficmgr.core import render
    from trafficmgr.core.agent import iptables

    if args.log and not args.id:
        raise CliError("--log needs --id PREFIX")
    if args.access_log and (args.log or args.admin is not None or args.remove_all):
        raise CliError("--access-log cannot be combined with --log, --admin or --remove-all")
    if args.admin is not None:
        if not args.id:
            raise CliError("--admin needs --id PREFIX")
        if args.log:
            raise CliError("--admin and --log cannot be combined")
        if not args.admin.startswith("/") or any(c.isspace() or not c.isprintable() for c in args.admin):
            raise CliError(f"--admin {args.admin!r}: an admin path starts with / and has no spaces (e.g. /config_dump)")
    runtime = make_runtime(args)
    try:
        sidecars = runtime.list()
        if args.remove_all:
            failed = 0
            removed: list[Sidecar] = []
            for s in sidecars:
                try:
                    netns = runtime.sidecar_netns(s) if runtime.captures_traffic else None
                    if netns is not None:
                        iptables.remove(iptables.netns_runner(netns))
                    runtime.remove(s)
                    removed.append(s)
                    print(f"removed {s.id} ({s.namespace}/{s.pod})")
                except (SidecarError, iptables.IptablesError) as exc:
                    failed += 1
                    print(f"{s.id}: {exc}", file=sys.stderr)
            if removed:
                _clear_annotations(removed, args.kubeconfig)
            return 1 if failed else 0
        if args.id:
            try:
                sidecar = find(sidecars, args.id)
            except LookupError as exc:
                raise CliError(str(exc)) from None
            if args.log:
                _write(runtime.logs(sidecar, args.tail))
                return 0
            if args.access_log:
                _write_access_log(runtime, [sidecar], args.tail, prefix=False)
                return 0
            if args.admin is not None:
                return _admin_get(runtime, sidecar, args.admin, args.admin_port)
            sidecars = [sidecar]
        elif args.access_log:
            _write_access_log(runtime, sidecars, args.tail, prefix=True)
            return 0
    except RuntimeUnavailable as exc:
        raise CliError(str(exc)) from None
    finally:
        runtime.close()
    if args.json:
        _write(render.to_json([s.row() for s in sidecars]))
    elif not sidecars:
        print("No sidecars on this node.", file=sys.stderr)
    else:
        _write(render.table(("ID", "POD", "NAMESPACE", "STATUS", "STATE"),
                            [(s.id, s.pod, s.namespace, s.status, s.state) for s in sidecars]))
    return 0


def _write_access_log(runtime: Runtime, sidecars: list[Sidecar], tail: int | None, prefix: bool) -> None:
    """The access-log lines of ``sidecars`` (from their logs: Envoy's stdout, where the ``accesslog``
    plugin's stdout logger writes), the last ``tail`` of each; with ``prefix`` each line starts with
    ``<namespace>/<pod> ``. The whole log is read: the lines to keep are found by content."""
    from trafficmgr.plugins.accesslog import access_lines

    out: list[str] = []
    for s in sidecars:
        lines = access_lines(runtime.logs(s))
        if tail is not None:
            lines = lines[-tail:] if tail else []
        out.extend(f"{s.namespace}/{s.pod} {line}" if prefix else line for line in lines)
    _write("".join(line + "\n" for line in out))


def _admin_get(runtime: Runtime, sidecar: Sidecar, path: str, admin_port: int) -> int:
    """Print the answer of ``GET path`` on ``sidecar``'s admin, reached inside its pod's network namespace
    (local runtime: on the address its bootstrap names). Only GET: mutating admin endpoints need POST."""
    from trafficmgr.core.agent.health import admin_get

    if not sidecar.running:
        raise CliError(f"sidecar {sidecar.id[:12]} ({sidecar.namespace}/{sidecar.pod}) is not running ({sidecar.status})")
    admin_address = getattr(runtime, "admin_address", None)
    if not runtime.captures_traffic and admin_address is not None:
        try:
            netns, (address, port_) = None, admin_address(sidecar)
        except SidecarError as exc:
            raise CliError(str(exc)) from None
    else:
        netns = runtime.sidecar_netns(sidecar)
        if netns is None:
            raise CliError(f"the network namespace of sidecar {sidecar.id[:12]} ({sidecar.namespace}/{sidecar.pod}) is gone")
        address, port_ = ADMIN_ADDRESS, admin_port
    try:
        status, body = admin_get(netns, address, port_, path)
    except OSError as exc:
        raise CliError(f"sidecar {sidecar.id[:12]}: admin {address}:{port_} unreachable: {exc} "
                       "(is --admin-port the agent's?)") from None
    if status != 200:
        first = body.decode(errors="replace").strip().splitlines()[:1]
        raise CliError(f"sidecar {sidecar.id[:12]}: GET {path} answered {status}{': ' + first[0] if first else ''}")
    _write(body.decode(errors="replace"))
    return 0


def _clear_annotations(removed: list[Sidecar], kubeconfig: str | None) -> None:
    """Set ``traffic.envoy.proxy`` to "" on the pods whose sidecar was removed (as the agent does when it
    disables one), so Prometheus stops scraping an admin port that is gone. Best effort: without
    Kubernetes (or for a pod that is gone or has a newer sidecar) one line says so."""
    from trafficmgr.core.agent.agent import ANNOTATION
    from trafficmgr.core.kube.client import ApiException, KubeClient, load_api_client

    try:
        kube = KubeClient(load_api_client(kubeconfig))
    except Exception as exc:  # noqa: BLE001 - config errors come in many types
        print(f"annotations not cleared (no Kubernetes configuration: {_one_line(exc)})", file=sys.stderr)
        return
    for s in removed:
        path = f"/api/v1/namespaces/{s.namespace}/pods/{s.pod}"
        try:
            pod = kube.request("GET", path, timeout=5)
            if ((pod.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION) != s.id:
                continue  # not this sidecar's annotation (already cleared, or a newer sidecar)
            kube.request("PATCH", path, body={"metadata": {"annotations": {ANNOTATION: ""}}},
                         content_type="application/merge-patch+json", timeout=5)
        except ApiException as exc:
            if exc.status != 404:
                print(f"{s.namespace}/{s.pod}: annotation not cleared: {exc.status} {exc.reason}", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 - urllib3 and socket errors alike: the API is unreachable
            print(f"annotations not cleared (Kubernetes unreachable: {_one_line(exc)})", file=sys.stderr)
            return


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]


# -- bootstrap --------------------------------------------------------------------------------------


def _setup_bootstrap(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--node-id", metavar="ID", required=True, help="Envoy node id (sidecars: <pod>.<namespace>)")
    parser.add_argument("--node-cluster", metavar="CLUSTER", required=True,
                        help="Envoy node cluster (the gateway's role name for gateways, 'sidecar' for sidecars)")
    parser.add_argument("--xds-address", metavar="HOST:PORT[,HOST:PORT]", required=True,
                        help="the control plane's xDS address (HOST:PORT or unix:/path); several replicas outside a "
                             "cluster: comma-separated HOST:PORTs (all IPs or all names), Envoy moves to another when "
                             "its stream breaks")
    parser.add_argument("--xds-prefer-first", action="store_true",
                        help="with several --xds-address: use the first while it is up, the others only while it is "
                             "down (TCP health checks every 2 s)")
    parser.add_argument("--admin-port", type=listen_port, default=ADMIN_PORT, help=f"Envoy admin port (default {ADMIN_PORT})")
    parser.add_argument("--admin-address", default=ADMIN_ADDRESS,
                        help=f"Envoy admin address (default {ADMIN_ADDRESS}: admin has mutating endpoints, keep it "
                             "on loopback of the pod)")
    parser.add_argument("--stats-address", default="0.0.0.0",
                        help="address of the stats-only listener (GET /stats/prometheus and /ready) (default 0.0.0.0)")
    parser.add_argument("--stats-port", type=port, default=STATS_PORT,
                        help=f"port of the stats-only listener (default {STATS_PORT}; 0: none)")
    parser.add_argument("--delta", action="store_true", help="incremental (delta) xDS instead of state of the world")
    parser.add_argument("--xds-tls-cert", metavar="FILE",
                        help="client certificate (PEM) for mutual TLS to the xDS server ('serve --xds-auth mtls'); "
                             "with --xds-tls-key and --xds-tls-ca")
    parser.add_argument("--xds-tls-key", metavar="FILE", help="private key (PEM) of --xds-tls-cert")
    parser.add_argument("--xds-tls-ca", metavar="FILE",
                        help="CA (PEM) the xDS server's certificate must chain to; the certificate must also name "
                             "the host of --xds-address (DNS or IP SAN)")
    parser.add_argument("--xds-mtls", action="store_true",
                        help="mutual TLS to the xDS server with the proxy's workload identity: certificate, key and "
                             "trust bundle from identity/ below Envoy's working directory (as 'trafficmgr identity "
                             "--dir' and the node agent write them), reloaded on renewal; instead of --xds-tls-cert/-key/-ca")
    parser.add_argument("--xds-tls-ca-server-name", metavar="NAME",
                        help="with --xds-mtls: the DNS name the xDS server's certificate must carry, also sent as SNI "
                             "(default: the host of --xds-address)")
    parser.add_argument("--plugins", metavar="SEL", default=None,
                        help=f"plugins whose trafficmgr_bootstrap hooks apply (default: ${ENV_SELECTION} or all installed)")
    parser.add_argument("-o", "--output", metavar="FILE", default="-", help="write to FILE (default: stdout)")


def _xds_tls(args: argparse.Namespace) -> XdsTls | XdsIdentityTls | None:
    """``--xds-tls-cert/--xds-tls-key/--xds-tls-ca``: all three or none, each a readable file (the paths
    go into the bootstrap as given: they must be the same inside Envoy's container); or
    ``--xds-mtls`` (files relative to Envoy's working directory, not checked here)."""
    from trafficmgr.core.bootstrap import XdsIdentityTls, XdsTls

    files = {"--xds-tls-cert": args.xds_tls_cert, "--xds-tls-key": args.xds_tls_key, "--xds-tls-ca": args.xds_tls_ca}
    given = [flag for flag, path in files.items() if path]
    server_name = getattr(args, "xds_tls_ca_server_name", None)
    if getattr(args, "xds_mtls", False):
        if given:
            raise CliError(f"--xds-mtls and {', '.join(given)} exclude each other: the identity files are "
                           "the client certificate")
        if server_name is not None and not _DNS_NAME.match(server_name):
            raise CliError(f"--xds-tls-ca-server-name {server_name!r}: not a DNS name")
        return XdsIdentityTls(server_name=server_name or None)
    if server_name is not None:
        raise CliError("--xds-tls-ca-server-name needs --xds-mtls")
    if not given:
        return None
    if len(given) != len(files):
        missing = [flag for flag in files if flag not in given]
        raise CliError(f"{', '.join(given)} needs {' and '.join(missing)} too: client TLS to xDS takes all three")
    for flag, path in files.items():
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            raise CliError(f"{flag} {path}: no such readable file")
    return XdsTls(cert=args.xds_tls_cert, key=args.xds_tls_key, ca=args.xds_tls_ca)


def _run_bootstrap(args: argparse.Namespace) -> int:
    from trafficmgr.core.agent.agent import parse_xds_address
    from trafficmgr.core.bootstrap import add_stats_listener, bootstrap

    try:
        addresses = [parse_xds_address(a) for a in args.xds_address.split(",") if a.strip()]
        if not addresses:
            raise ValueError("--xds-address is empty")
        host, port = addresses[0]
        if args.stats_port and args.stats_port == args.admin_port:
            raise CliError("--stats-port and --admin-port must differ: the stats listener forwards to admin")
        config = bootstrap(args.node_id, args.node_cluster, host, port, admin_port=args.admin_port,
                           admin_address=args.admin_address, delta=args.delta, xds_tls=_xds_tls(args),
                           xds_more=addresses[1:], xds_prefer_first=args.xds_prefer_first)
    except ValueError as exc:
        raise CliError(f"--xds-address: {exc}" if not str(exc).startswith("xDS address") else str(exc)) from None
    if args.stats_port:
        add_stats_listener(config, args.stats_address, args.stats_port)
    plugins_of(args).call_all("trafficmgr_bootstrap", bootstrap=config, role=args.node_cluster, options=args)
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    if args.output in ("-", ""):
        _write(text)
    else:
        tmp = f"{args.output}.tmp{os.getpid()}"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, args.output)
        except OSError as exc:
            raise CliError(f"cannot write {args.output}: {exc.strerror or exc}") from None
    return 0


register_command("agent", "node agent: run Envoy sidecars for the enabled pods of this node", _setup_agent, _run_agent,
                 replace=True, plugin_options=True)
register_command("proxies", "list, inspect or remove the Envoy sidecars of this node", _setup_proxies, _run_proxies,
                 replace=True)
register_command("bootstrap", "print an Envoy bootstrap (JSON) for a proxy of the control plane", _setup_bootstrap,
                 _run_bootstrap, replace=True, plugin_options=True)
