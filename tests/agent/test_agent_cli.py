"""``trafficmgr bootstrap``, ``proxies`` and ``agent`` option handling; the sidecar bootstrap; the ``local``
runtime through ``proxies`` (list, log, remove-all)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from trafficmgr import cli, hookimpl
from trafficmgr.core.agent.agent import AgentConfig, parse_xds_address, sidecar_bootstrap
from trafficmgr.core.agent.netns_runtime import ProcessRuntime
from trafficmgr.core.agent.runtime import PodRef, SidecarSpec
from trafficmgr.core.plugins import PluginHost
from trafficmgr.testing.cluster import http_get
from trafficmgr.testing.envoy import free_port, wait_for


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TRAFFICMGR_PLUGINS", "NODE_NAME", "DOCKER_HOST"):
        monkeypatch.delenv(name, raising=False)


def validate(envoy: str, path: Path) -> None:
    proc = subprocess.run([envoy, "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.mark.parametrize("address", ["10.0.0.1:18000", "unix:/run/trafficmgr/xds.sock"])
def test_bootstrap_command_output_is_accepted_by_envoy(envoy_binary: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str], address: str) -> None:
    out_file = tmp_path / "envoy.json"
    code, out, err = run(capsys, "bootstrap", "--node-id", "ingress", "--node-cluster", "gateway",
                         "--xds-address", address, "--delta", "--zipkin-address", "10.0.0.9:9411",
                         "--zipkin-flush-spans", "1", "-o", str(out_file))
    assert code == 0 and out == "" and err == ""
    config = json.loads(out_file.read_text())
    assert config["node"]["id"] == "ingress" and config["node"]["cluster"] == "gateway"
    # admin on loopback of the pod; the stats-only listener on 0.0.0.0:8900 forwards there
    assert config["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 15000}
    stats = next(lst for lst in config["static_resources"]["listeners"] if lst["name"] == "stats")
    assert stats["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 8900}
    assert all("admin_layer" not in layer for layer in config["layered_runtime"]["layers"])
    assert config["dynamic_resources"]["ads_config"]["api_type"] == "DELTA_GRPC"
    # the tracing plugin's trafficmgr_bootstrap hook ran with the command's plugin options
    static = next(layer["static_layer"] for layer in config["layered_runtime"]["layers"] if "static_layer" in layer)
    assert static["tracing.zipkin.min_flush_spans"] == 1
    validate(envoy_binary, out_file)

    code, out, _ = run(capsys, "bootstrap", "--node-id", "x", "--node-cluster", "gateway", "--xds-address", address,
                       "--plugins", "lb")
    assert code == 0 and "layered_runtime" in json.loads(out) and "tracing.zipkin" not in out


class Marker:
    @hookimpl
    def trafficmgr_bootstrap(self, bootstrap: dict[str, Any], role: str, options: Any) -> None:
        bootstrap["node"].setdefault("metadata", {})["role_seen"] = role


def test_sidecar_bootstrap(envoy_binary: str, tmp_path: Path) -> None:
    pod = PodRef("web-1", "shop", "uid-1", "10.244.5.6")
    plugins = PluginHost.load([], extra=[("marker", Marker())])
    tcp = sidecar_bootstrap(pod, AgentConfig("n", "control.kube-system:18000", admin_port=15001, stats_port=8901), plugins)
    assert tcp["node"]["id"] == "web-1.shop" and tcp["node"]["cluster"] == "sidecar"
    assert tcp["node"]["metadata"] == {"role_seen": "sidecar"}
    # admin on loopback of the pod's namespace, only the stats listener on the pod IP
    assert tcp["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 15001}
    stats = next(lst for lst in tcp["static_resources"]["listeners"] if lst["name"] == "stats")
    assert stats["address"]["socket_address"] == {"address": "10.244.5.6", "port_value": 8901}
    xds = tcp["static_resources"]["clusters"][0]
    assert xds["upstream_bind_config"]["source_address"]["address"] == "10.244.5.6", "the control plane sees the pod IP"
    assert xds["type"] == "STRICT_DNS"
    unix = sidecar_bootstrap(pod, AgentConfig("n", "unix:/tmp/x/xds.sock"))
    assert "upstream_bind_config" not in unix["static_resources"]["clusters"][0]
    for i, config in enumerate((tcp, unix)):
        path = tmp_path / f"{i}.json"
        path.write_text(json.dumps(config))
        validate(envoy_binary, path)


@pytest.mark.parametrize("text", ["", "host", "host:", ":80", "host:0", "host:70000", "unix:relative.sock"])
def test_bad_xds_addresses(text: str) -> None:
    with pytest.raises(ValueError, match="xDS address"):
        parse_xds_address(text)


def test_xds_addresses() -> None:
    assert parse_xds_address("10.0.0.1:18000") == ("10.0.0.1", 18000)
    assert parse_xds_address("[fd00::1]:18000") == ("fd00::1", 18000)
    assert parse_xds_address("unix:/run/x.sock") == ("unix:/run/x.sock", 0)


@pytest.mark.parametrize(("argv", "message"), [
    (["agent", "--xds-address", "cp:18000", "--envoy-image", "e"], "--node-name is required"),
    (["agent", "--node-name", "n", "--xds-address", "cp:18000"], "--envoy-image is required with --runtime docker"),
    (["agent", "--node-name", "n", "--xds-address", "cp", "--runtime", "netns"], "must be HOST:PORT or unix:/path"),
    (["agent", "--node-name", "n", "--xds-address", "cp:1", "--runtime", "netns", "--inbound-port", "10000"],
     "--proxy-port and --inbound-port must differ"),
    (["bootstrap", "--node-id", "a", "--node-cluster", "b", "--xds-address", "nope"], "must be HOST:PORT"),
    (["proxies", "--log"], "--log needs --id PREFIX"),
    (["proxies", "--admin", "/config_dump"], "--admin needs --id PREFIX"),
    (["proxies", "--id", "a", "--admin", "config_dump"], "an admin path starts with /"),
    (["bootstrap", "--node-id", "a", "--node-cluster", "b", "--xds-address", "cp:1", "--stats-port", "15000"],
     "--stats-port and --admin-port must differ"),
    (["agent", "--node-name", "n", "--xds-address", "cp:1", "--runtime", "netns", "--stats-port", "15000"],
     "--admin-port and --stats-port must differ"),
    (["proxies", "--docker-host", "unix:///nonexistent/docker.sock"],
     "Docker daemon at unix:///nonexistent/docker.sock unreachable"),
])
def test_cli_errors_are_one_line(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("trafficmgr: error: ") and message in err, err


@pytest.fixture
def world_readable_dir() -> Iterator[str]:
    """A directory Envoy can read after dropping to the proxy uid (pytest's tmp_path is 0700 root)."""
    path = tempfile.mkdtemp(prefix="tm-local-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_local_runtime_through_proxies(envoy_binary: str, capsys: pytest.CaptureFixture[str], world_readable_dir: str) -> None:
    """The ``local`` runtime (no namespace, no rules): Envoy in the host network with its admin on the
    pod IP; ``proxies`` lists it, prints its log and removes it."""
    state_dir = world_readable_dir
    runtime = ProcessRuntime(state_dir, use_netns=False)
    assert not runtime.captures_traffic and runtime.name == "local"
    pod = PodRef("web-1", "default", "uid-1", "127.0.77.2")
    admin = free_port()
    config = sidecar_bootstrap(pod, AgentConfig("n", "127.0.0.1:1", admin_port=admin, stats_port=0), own_netns=False)
    sidecar = runtime.start(SidecarSpec(pod, config), runtime.pod_network(pod))
    try:
        wait_for(lambda: http_get(f"http://127.0.77.2:{admin}/ready", 2)[1].strip() in ("LIVE", "PRE_INITIALIZING"), 15)
        assert runtime.start(SidecarSpec(pod, config), runtime.pod_network(pod)) == sidecar, "idempotent"
        base = ("proxies", "--runtime", "local", "--state-dir", state_dir)
        code, out, _ = run(capsys, *base, "--json")
        [row] = json.loads(out)
        assert code == 0 and row["id"] == sidecar.id and row["pod"] == "web-1" and row["state"] == "running"
        assert row["status"].startswith("Up ")
        code, out, _ = run(capsys, *base)
        assert out.split("\n")[1].split()[:3] == [sidecar.id, "web-1", "default"]
        code, out, _ = run(capsys, *base, "--id", sidecar.id[:6], "--log", "--tail", "50")
        assert code == 0 and "admin address: 127.0.77.2" in out
        code, _, err = run(capsys, *base, "--id", "zzz")
        assert code == 1 and "no sidecar with an id starting with 'zzz'" in err
        # --admin: GET on the sidecar's admin, wherever its bootstrap put it (local mode: the pod IP)
        code, out, _ = run(capsys, *base, "--id", sidecar.id[:6], "--admin", "/server_info")
        assert code == 0 and json.loads(out)["state"] in ("LIVE", "PRE_INITIALIZING")
        code, _, err = run(capsys, *base, "--id", sidecar.id[:6], "--admin", "/nonexistent")
        assert code == 1 and "GET /nonexistent answered 404" in err, err
        code, _, err = run(capsys, *base, "--id", "zzz", "--admin", "/server_info")
        assert code == 1 and "no sidecar with an id starting with 'zzz'" in err
    finally:
        # The pod's annotation names this sidecar: --remove-all clears it (Prometheus stops scraping).
        from trafficmgr.apiserver import APIServer

        api = APIServer().start()
        kubeconfig = os.path.join(state_dir, "kubeconfig")
        api.write_kubeconfig(kubeconfig)
        api.store.create({"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": "web-1", "namespace": "default", "annotations": {"traffic.envoy.proxy": sidecar.id}},
            "spec": {"containers": [{"name": "web", "image": "web"}]}})
        try:
            code, out, err = run(capsys, "proxies", "--runtime", "local", "--state-dir", state_dir, "--remove-all",
                                 "--kubeconfig", kubeconfig)
            annotation = api.store.get("pods", "web-1", "default")["metadata"]["annotations"]["traffic.envoy.proxy"]
        finally:
            api.stop()
    assert code == 0 and sidecar.id in out and err == "", err
    assert annotation == ""
    assert runtime.list() == []
    code, out, err = run(capsys, "proxies", "--runtime", "local", "--state-dir", state_dir)
    assert code == 0 and out == "" and "No sidecars" in err


def test_remove_all_without_kubernetes_says_annotations_were_left(capsys: pytest.CaptureFixture[str]) -> None:
    from trafficmgr.cli.agent import _clear_annotations
    from trafficmgr.core.agent.runtime import Sidecar

    sidecar = Sidecar(id="abc", pod="web-1", namespace="default", pod_uid="u", status="Exited", state="exited")
    _clear_annotations([sidecar], "/nonexistent/kubeconfig")
    err = capsys.readouterr().err
    assert err.startswith("annotations not cleared (no Kubernetes configuration") and len(err.splitlines()) == 1, err


def test_cli_local_runtime_serves_the_explicit_proxy(tmp_path: Path) -> None:
    """``--runtime local`` must make the demo's runtime, whose sidecars also serve the explicit proxy on
    <pod IP>:15001 (a plain process runtime without it was made before; traffic through the explicit
    proxy is tested in tests/local/test_demo.py)."""
    from trafficmgr.core.agent.local_runtime import LocalRuntime
    from trafficmgr.core.agent.run import make_runtime

    args = cli.build_parser().parse_args(["proxies", "--runtime", "local", "--state-dir", str(tmp_path)])
    runtime = make_runtime(args)
    assert type(runtime) is LocalRuntime and runtime.name == "local" and not runtime.captures_traffic
