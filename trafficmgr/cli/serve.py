"""``trafficmgr serve``: the command line of the control plane (:func:`trafficmgr.core.serve.run_serve`
runs it)."""

from __future__ import annotations

import argparse

from trafficmgr.cli import CliError, plugins_of, register_command
from trafficmgr.core.access import DEFAULT_GATEWAY_SERVICE_ACCOUNT, DEFAULT_TRUST_DOMAIN, PROXY_UID
from trafficmgr.core.argtypes import int_at_least, listen_port, port, positive_seconds
from trafficmgr.core.bootstrap import STATS_PORT
from trafficmgr.core.kube.watch import LIST_PAGE_SIZE
from trafficmgr.core.serve import ServeError, run_serve


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Core options of ``serve`` (plugin options are added by ``trafficmgr_add_arguments``)."""
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster config, else ~/.kube/config)")
    parser.add_argument("--context", help="kubeconfig context")
    parser.add_argument("--namespace", help="watch only this namespace (default: all namespaces)")
    parser.add_argument("--list-page-size", metavar="N", type=int_at_least(0), default=LIST_PAGE_SIZE,
                        help=f"objects per list request (limit/continue; default {LIST_PAGE_SIZE}; 0: whole lists)")
    parser.add_argument("--xds-address", default="0.0.0.0", help="xDS listen address (default 0.0.0.0)")
    parser.add_argument("--xds-port", type=port, default=18000, help="xDS (ADS gRPC) port (default 18000; 0: any free port)")
    parser.add_argument("--admin-address", default="127.0.0.1",
                        help="admin endpoint address: /debug/*, /metrics, /healthz, /readyz (default 127.0.0.1; "
                             "another address needs --admin-token-file)")
    parser.add_argument("--admin-port", type=port, default=18080, help="admin endpoint port (default 18080; 0: any free port)")
    parser.add_argument("--admin-token-file", metavar="FILE",
                        help="bearer token (one line, >= 16 characters) that /debug/* requires "
                             "(Authorization: Bearer ...); required when --admin-address is not loopback")
    parser.add_argument("--metrics-address", default="0.0.0.0",
                        help="metrics endpoint address (default 0.0.0.0; only with --metrics-port)")
    parser.add_argument("--metrics-port", type=port, default=None,
                        help="serve /metrics, /healthz and /readyz (nothing else) on this port too "
                             "(default: none, they are on the admin port only; 0: any free port)")
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
    parser.add_argument("--xds-gateway-service-account", metavar="NAME", default=DEFAULT_GATEWAY_SERVICE_ACCOUNT,
                        help="ServiceAccount the gateway pods run as (spec.serviceAccountName); with peer-ip a pod "
                             "claiming the gateway role must also run as it, with mtls it is the gateway's SPIFFE "
                             f"identity (default {DEFAULT_GATEWAY_SERVICE_ACCOUNT})")
    parser.add_argument("--trust-domain", metavar="DOMAIN", default=DEFAULT_TRUST_DOMAIN,
                        help="SPIFFE trust domain of the proxies' client certificates with --xds-auth mtls: "
                             f"spiffe://DOMAIN/ns/<namespace>/sa/<serviceaccount> (default {DEFAULT_TRUST_DOMAIN})")
    parser.add_argument("--xds-unix-gateway-uids", metavar="UID[,UID]", default=None,
                        help="with --xds-address unix:/path, the uids whose processes may claim the gateway role "
                             "over the socket (default: the uid serve runs as)")
    parser.add_argument("--xds-unix-sidecar-uids", metavar="UID[,UID]", default=None,
                        help="with --xds-address unix:/path, the uids whose processes may claim a sidecar over the "
                             f"socket (default: {PROXY_UID} (the agent's --proxy-uid), 0 and the uid serve runs as)")
    parser.add_argument("--xds-tls-cert", metavar="FILE", help="xDS server certificate (PEM; with --xds-auth mtls)")
    parser.add_argument("--xds-tls-key", metavar="FILE", help="xDS server private key (PEM; with --xds-auth mtls)")
    parser.add_argument("--xds-client-ca", metavar="FILE", help="CA that signs proxy client certificates (with --xds-auth mtls)")
    # Limits of the xDS server (any pod can reach the xDS port); see trafficmgr.core.xds.server.
    parser.add_argument("--xds-max-streams-per-peer", metavar="N", type=int_at_least(0), default=128,
                        help="open xDS streams allowed per client IP, unknown nodes included; Unix-socket clients "
                             "are not capped (default 128: every pod of a node behind one address; 0: no cap)")
    parser.add_argument("--xds-node-timeout", metavar="SECONDS", type=positive_seconds, default=10.0,
                        help="close xDS streams that do not name their node within this time (default 10)")
    parser.add_argument("--xds-max-request-mib", metavar="MIB", type=int_at_least(1), default=4,
                        help="largest xDS request accepted, in MiB (default 4: a delta request naming 30k "
                             "resources; 10k Services with two ports need 2.6 MB)")
    add_dashboard_arguments(parser)
    add_leader_arguments(parser)
    add_identity_arguments(parser)


def add_dashboard_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the dashboard's data comes from (``GET /debug/dashboard/data``, see :mod:`trafficmgr.core.telemetry`)."""
    parser.add_argument("--dashboard-stats-port", metavar="PORT", type=port, default=STATS_PORT,
                        help="port of the proxies' stats-only listener on their pod IPs, which the dashboard's data "
                             f"reads on demand (GET /stats/prometheus; default {STATS_PORT}, the agent's --stats-port; "
                             "0: read no stats, every number is null)")
    parser.add_argument("--dashboard-window", metavar="SECONDS", type=positive_seconds, default=30.0,
                        help="rates and latency quantiles span at most this many seconds of readings (default 30)")
    parser.add_argument("--dashboard-traces-url", metavar="URL", type=_http_url, default=None,
                        help="base URL of the trace collector's query API as the dashboard's users reach it "
                             "(e.g. http://127.0.0.1:9411 for 'trafficmgr zipkin'): each service links to "
                             "URL/api/v2/traces?meshService=<name>.<namespace> (default: no link)")


def _http_url(text: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise argparse.ArgumentTypeError(f"{text!r} is not an http(s) base URL (http://host:port[/path])")
    return text.rstrip("/")


def add_leader_arguments(parser: argparse.ArgumentParser) -> None:
    """Leader election among replicas (:mod:`trafficmgr.core.kube.leader`): every replica serves xDS, only
    the holder of the Lease writes status and Events."""
    parser.add_argument("--leader-election", action=argparse.BooleanOptionalAction, default=True,
                        help="elect one writer among the replicas with a coordination.k8s.io/v1 Lease (default on); "
                             "--no-leader-election: this process writes status and Events without a Lease "
                             "(one replica only: several would each write them)")
    parser.add_argument("--lease-name", metavar="NAME", default=None,
                        help="name of the Lease (default trafficmgr; the chart sets the release name)")
    parser.add_argument("--lease-namespace", metavar="NS", default=None,
                        help="namespace of the Lease (default: $POD_NAMESPACE, else default)")
    parser.add_argument("--lease-duration", metavar="SECONDS", type=int_at_least(3), default=None,
                        help="how long a Lease not renewed keeps others from taking over, whole seconds (default 15); "
                             "a leader that dies is replaced within it plus two retry periods")
    parser.add_argument("--lease-renew-deadline", metavar="SECONDS", type=positive_seconds, default=None,
                        help="a leader that could not renew for this long stops writing (default 2/3 of the lease "
                             "duration; renew deadline + retry period must stay below the lease duration)")
    parser.add_argument("--lease-retry-period", metavar="SECONDS", type=positive_seconds, default=None,
                        help="how often the leader renews and the others try to acquire (default lease duration / "
                             "7.5, at least 1)")
    parser.add_argument("--replica-name", metavar="NAME", default=None,
                        help="this replica's name, unique among the replicas: the Lease's holderIdentity and "
                             "proxy-status's replica column (default: $POD_NAME, else <hostname>-<pid>)")


def add_identity_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the mesh CA and the signing service (``--mesh-identity``; see
    :mod:`trafficmgr.core.identity.ca` and :mod:`trafficmgr.core.identity.server`). Their defaults are
    None so :func:`trafficmgr.core.serve.mesh_options` can refuse them without ``--mesh-identity``."""
    parser.add_argument("--mesh-identity", action="store_true",
                        help="run the mesh CA and the Sign service that gives workloads their certificates "
                             "(spiffe://<trust domain>/ns/<ns>/sa/<sa>); with --xds-auth mtls and no --xds-tls-* "
                             "files the xDS server's certificate and client CA come from it too")
    parser.add_argument("--mesh-ca-mode", choices=("generate", "provided"), default=None,
                        help="generate (default): create the CA Secret with a new EC P-256 root on first start; "
                             "provided: use the Secret you supply (cert-manager CA format), never create it")
    parser.add_argument("--mesh-ca-secret", metavar="NAME", default=None,
                        help="the CA Secret (kubernetes.io/tls: tls.crt, tls.key, optional ca.crt = trusted roots; "
                             "default trafficmgr-mesh-ca)")
    parser.add_argument("--mesh-ca-namespace", metavar="NS", default=None,
                        help="namespace of the CA Secret and the trafficmgr-trust-bundle ConfigMap "
                             "(default: $POD_NAMESPACE, else trafficmgr)")
    parser.add_argument("--workload-cert-ttl", metavar="DURATION", default=None,
                        help="lifetime of workload certificates, 60s..365d (default 24h; e.g. 12h, 90m)")
    parser.add_argument("--identity-address", metavar="IP", default=None,
                        help="address of the Sign service (gRPC over TLS; default 0.0.0.0)")
    parser.add_argument("--identity-port", metavar="PORT", type=port, default=None,
                        help="port of the Sign service (default 15012; 0: no Sign service)")
    parser.add_argument("--identity-dns-names", metavar="NAME[,NAME]", default=None,
                        help="DNS names in the Sign service's (and a mesh-CA xDS server's) certificate "
                             "(default trafficmgr.<ns>.svc,trafficmgr.<ns>.svc.cluster.local)")
    parser.add_argument("--identity-audience", metavar="AUDIENCE", default=None,
                        help="audience the callers' ServiceAccount tokens must be for (default trafficmgr)")
    parser.add_argument("--identity-agent-service-account", metavar="NS/NAME", default=None,
                        help="ServiceAccount of the node agents, who may ask for the pods of their own node "
                             "(default <mesh CA namespace>/trafficmgr-agent)")


def _setup(parser: argparse.ArgumentParser) -> None:
    add_serve_arguments(parser)
    parser.add_argument("--plugins", metavar="LIST",
                        help="comma-separated plugins to load (default: $TRAFFICMGR_PLUGINS or every installed plugin)")


def _run(args: argparse.Namespace) -> int:
    plugins = plugins_of(args)
    try:
        return run_serve(args, plugins)
    except ServeError as exc:
        raise CliError(str(exc)) from None


register_command("serve", "run the control plane against a Kubernetes cluster", _setup, _run, replace=True, plugin_options=True)
