"""``trafficmgr bootstrap`` with several control-plane replicas (issue 20): the xDS cluster lists every
address, with the reconnect backoff of the ADS stream; ``--xds-prefer-first`` puts the first at priority
0 and the others at 1 with a TCP health check. The bootstrap is shown whole (the golden below) and the
real Envoy accepts it (``--mode validate``). That Envoys actually move to a surviving replica without a
failed request is ``tests/e2e/test_replicas_failover.py``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from trafficmgr import cli
from trafficmgr.core.bootstrap import XdsTls, bootstrap

ADDRESSES = "127.0.0.1:18000,127.0.0.2:18000,127.0.0.3:18001"


def _endpoint(ip: str, port: int) -> dict[str, Any]:
    return {"endpoint": {"address": {"socket_address": {"address": ip, "port_value": port}}}}


#: The xDS cluster of ``bootstrap --xds-address ADDRESSES --xds-prefer-first`` (the golden).
PREFER_FIRST = {
    "name": "xds_cluster",
    "type": "STATIC",
    "connect_timeout": "1s",
    "health_checks": [{"timeout": "1s", "interval": "2s", "no_traffic_interval": "2s", "unhealthy_threshold": 1,
                       "healthy_threshold": 1, "tcp_health_check": {}}],
    "load_assignment": {"cluster_name": "xds_cluster", "endpoints": [
        {"priority": 0, "lb_endpoints": [_endpoint("127.0.0.1", 18000)]},
        {"priority": 1, "lb_endpoints": [_endpoint("127.0.0.2", 18000)]},
        {"priority": 1, "lb_endpoints": [_endpoint("127.0.0.3", 18001)]},
    ]},
    "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {"connection_keepalive": {"interval": "15s", "timeout": "5s"}}},
    }},
}
ADS = {"api_type": "GRPC", "transport_api_version": "V3", "set_node_on_first_message_only": True,
       "grpc_services": [{"envoy_grpc": {"cluster_name": "xds_cluster", "retry_policy": {
           "retry_back_off": {"base_interval": "0.25s", "max_interval": "3.0s"}}}}]}


def _bootstrap(capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, dict[str, Any] | None, str]:
    code = cli.main(["bootstrap", "--node-id", "web-1.default", "--node-cluster", "sidecar", "--stats-port", "0",
                     "--plugins", "", *extra])
    out, err = capsys.readouterr()
    return code, json.loads(out) if code == 0 else None, err


def test_several_addresses_prefer_first_golden(capsys: pytest.CaptureFixture[str]) -> None:
    code, config, err = _bootstrap(capsys, "--xds-address", ADDRESSES, "--xds-prefer-first")
    assert code == 0, err
    assert config is not None
    (xds,) = config["static_resources"]["clusters"]
    assert xds == PREFER_FIRST
    assert config["dynamic_resources"]["ads_config"] == ADS


def test_several_addresses_round_robin(capsys: pytest.CaptureFixture[str]) -> None:
    code, config, err = _bootstrap(capsys, "--xds-address", ADDRESSES)
    assert code == 0, err
    assert config is not None
    (xds,) = config["static_resources"]["clusters"]
    assert "health_checks" not in xds
    assert xds["load_assignment"]["endpoints"] == [{"lb_endpoints": [
        _endpoint("127.0.0.1", 18000), _endpoint("127.0.0.2", 18000), _endpoint("127.0.0.3", 18001)]}]
    one = bootstrap("web-1.default", "sidecar", "127.0.0.1", 18000, admin_port=0)
    assert one["static_resources"]["clusters"][0]["load_assignment"]["endpoints"] == [
        {"lb_endpoints": [_endpoint("127.0.0.1", 18000)]}], "one address: unchanged"


@pytest.mark.parametrize(("addresses", "extra", "message"), [
    ("127.0.0.1:1,cp.example:2", (), "--xds-address: several xDS addresses must all be IPs or all DNS names"),
    ("127.0.0.1:1,unix:/run/x.sock", (), "--xds-address: several xDS addresses must all be HOST:PORT (not unix:/path)"),
    ("127.0.0.1:1,127.0.0.1:1", (), "--xds-address: 127.0.0.1:1 is listed twice"),
    ("127.0.0.1:1,nope", (), "xDS address 'nope' must be HOST:PORT or unix:/path"),
    ("127.0.0.1:1", ("--xds-prefer-first",), "--xds-address: preferring the first xDS address needs more than one"),
])
def test_bad_addresses_are_one_line_errors(capsys: pytest.CaptureFixture[str], addresses: str, extra: tuple[str, ...],
                                           message: str) -> None:
    code, _, err = _bootstrap(capsys, "--xds-address", addresses, *extra)
    assert code != 0
    assert err.strip() == f"trafficmgr: error: {message}", err


def test_tls_accepts_any_replica_san() -> None:
    config = bootstrap("web-1.default", "sidecar", "127.0.0.1", 18000, admin_port=0,
                       xds_tls=XdsTls("c.pem", "k.pem", "ca.pem"), xds_more=[("127.0.0.2", 18000)])
    tls = config["static_resources"]["clusters"][0]["transport_socket"]["typed_config"]
    assert tls["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "IP_ADDRESS", "matcher": {"exact": "127.0.0.1"}},
        {"san_type": "IP_ADDRESS", "matcher": {"exact": "127.0.0.2"}}]


def test_envoy_accepts_the_bootstraps(capsys: pytest.CaptureFixture[str], envoy_binary: str, tmp_path: Path) -> None:
    for extra in ((), ("--xds-prefer-first",)):
        code, config, err = _bootstrap(capsys, "--xds-address", ADDRESSES, *extra)
        assert code == 0 and config is not None, err
        path = tmp_path / "bootstrap.json"
        path.write_text(json.dumps(config))
        proc = subprocess.run([envoy_binary, "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
