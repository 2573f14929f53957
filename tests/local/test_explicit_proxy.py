"""``serve --explicit-proxy`` in the builder: the sidecar view gains the internal listener
``outbound_proxy`` and route configuration ``outbound|proxy`` (what local-mode sidecars serve on
``<pod IP>:15001``; traffic through it is proven in ``test_demo.py``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from trafficmgr.core import cache
from trafficmgr.core.plugins import PluginHost
from trafficmgr.core.translate.builder import default_options
from trafficmgr.core.translate.explicit_proxy import PROXY_LISTENER, PROXY_ROUTE
from trafficmgr.core.translate.sidecar_outbound import BLOCKED_BODY
from trafficmgr.testing.golden import build_from_manifests, load_manifests

MANIFESTS = Path(__file__).parent.parent / "golden" / "sidecar" / "http_tcp_direct.in.yaml"


def _build(explicit: bool) -> cache.Snapshot:
    options = default_options()
    options.explicit_proxy = explicit
    snaps, _ = build_from_manifests(load_manifests(MANIFESTS), PluginHost.load(["fault"]), options)
    assert snaps["sidecar"].errors() == []  # the consistency gate: every RDS name referenced by a listener
    return snaps["sidecar"]


def test_explicit_proxy_listener_and_routes() -> None:
    snap = _build(True)
    listeners = snap.types[cache.LISTENER].resources
    proxy = listeners[PROXY_LISTENER]
    assert proxy.refs == ((cache.ROUTE, PROXY_ROUTE),)
    msg = proxy.message()
    assert msg.HasField("internal_listener") and not msg.HasField("address")
    outbound = listeners["outbound"].message()
    assert outbound.bind_to_port.value is False  # nothing is redirected in local mode; no port clash
    routes = snap.types[cache.ROUTE].resources[PROXY_ROUTE].message()
    per_port = snap.types[cache.ROUTE].resources["outbound|9080"].message()
    # the same virtual hosts as the redirected sidecar's (policies included) after a CONNECT route each
    # (proxy tunnels: grpcio), then the blocked catch-all
    for proxied, original in zip(routes.virtual_hosts[:-1], per_port.virtual_hosts, strict=True):
        connect = proxied.routes[0]
        assert connect.match.HasField("connect_matcher") and connect.route.cluster == original.routes[0].route.cluster
        assert connect.route.upgrade_configs[0].upgrade_type == "CONNECT"
        assert connect.route.upgrade_configs[0].HasField("connect_config")  # terminated here
        assert list(proxied.routes[1:]) == list(original.routes) and proxied.domains == original.domains
    assert list(routes.virtual_hosts[-1].domains) == ["*"]
    assert routes.virtual_hosts[-1].routes[0].direct_response.status == 404
    assert routes.virtual_hosts[-1].routes[0].direct_response.body.inline_string == BLOCKED_BODY
    assert "reviews:9080" in routes.virtual_hosts[0].domains
    # the sidecar's HTTP filters (fault) are on the proxy's connection manager too
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2

    hcm = hcm_pb2.HttpConnectionManager()
    msg.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    assert [f.name for f in hcm.http_filters] == ["envoy.filters.http.fault", "envoy.filters.http.router"]
    assert hcm.rds.route_config_name == PROXY_ROUTE
    assert [u.upgrade_type for u in hcm.upgrade_configs] == ["websocket", "CONNECT"]


def test_without_the_option_nothing_changes() -> None:
    snap = _build(False)
    assert PROXY_LISTENER not in snap.types[cache.LISTENER].resources
    assert PROXY_ROUTE not in snap.types[cache.ROUTE].resources
    assert not snap.types[cache.LISTENER].resources["outbound"].message().HasField("bind_to_port")


def test_serve_flag() -> None:
    from trafficmgr.cli.serve import add_serve_arguments

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    assert parser.parse_args(["--explicit-proxy"]).explicit_proxy is True
    assert parser.parse_args([]).explicit_proxy is False
