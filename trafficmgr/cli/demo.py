"""``trafficmgr demo``: the command line of :mod:`trafficmgr.local.demo`."""

from __future__ import annotations

import argparse

from trafficmgr.cli import CliError, register_command
from trafficmgr.core.argtypes import listen_port as _port
from trafficmgr.core.argtypes import port as _any_port
from trafficmgr.local.demo import Demo, DemoConfig, DemoError


def _setup(parser: argparse.ArgumentParser) -> None:
    d = DemoConfig()
    parser.add_argument("--state-dir", metavar="DIR", default=d.state_dir,
                        help=f"kubeconfig, logs and process state (default {d.state_dir})")
    parser.add_argument("--http-port", type=_port, default=d.http_port, help=f"gateway HTTP on 127.0.0.1 (default {d.http_port})")
    parser.add_argument("--https-port", type=_port, default=d.https_port, help=f"gateway HTTPS on 127.0.0.1 (default {d.https_port})")
    parser.add_argument("--admin-port", type=_port, default=d.admin_port,
                        help=f"gateway stats-only listener (GET /stats/prometheus, /ready) on 127.0.0.1 (default {d.admin_port})")
    parser.add_argument("--api-port", type=_any_port, default=d.api_port, help="API server port (default 0: any free port)")
    parser.add_argument("--xds-port", type=_port, default=d.xds_port, help=f"control plane xDS port (default {d.xds_port})")
    parser.add_argument("--serve-admin-port", type=_port, default=d.serve_admin_port,
                        help=f"control plane admin port, used by proxy-status/config-dump (default {d.serve_admin_port})")
    parser.add_argument("--zipkin-port", type=_port, default=d.zipkin_port, help=f"Zipkin collector port (default {d.zipkin_port})")
    parser.add_argument("--gateway-api-port", type=_port, default=d.gateway_api_port,
                        help=f"the HTTP listener of the Gateway 'traffic' (Gateway API) on 127.0.0.1 "
                             f"(default {d.gateway_api_port})")
    parser.add_argument("--tracing-provider", choices=("zipkin", "opentelemetry"), default=d.tracing_provider,
                        help="what the Envoys send to the built-in collector: zipkin (JSON, B3 headers; the default) "
                             "or opentelemetry (OTLP/gRPC to --otlp-port, W3C traceparent)")
    parser.add_argument("--otlp-port", type=_port, default=d.otlp_port,
                        help=f"the collector's OTLP/gRPC port on 127.0.0.1 with --tracing-provider opentelemetry "
                             f"(default {d.otlp_port})")
    parser.add_argument("--pod-cidr", default=d.pod_cidr, help=f"loopback network of pod IPs (default {d.pod_cidr})")
    parser.add_argument("--service-cidr", default=d.service_cidr, help=f"loopback network of ClusterIPs (default {d.service_cidr})")


def _run(args: argparse.Namespace) -> int:
    config = DemoConfig(args.state_dir, args.http_port, args.https_port, args.admin_port, args.api_port, args.xds_port,
                        args.serve_admin_port, args.zipkin_port, args.pod_cidr, args.service_cidr,
                        gateway_api_port=args.gateway_api_port, tracing_provider=args.tracing_provider,
                        otlp_port=args.otlp_port)
    try:
        return Demo(config).run()
    except DemoError as exc:
        raise CliError(str(exc)) from None


register_command("demo", "run a complete local traffic manager with the bookinfo demo (no cluster, Docker or root)",
                 _setup, _run, replace=True)
