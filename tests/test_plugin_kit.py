"""The plugin author kit: ``trafficmgr plugins new`` writes a project that installs and passes its own tests;
the pytest fixtures (``trafficmgr_build``, ``trafficmgr_envoy``) build and serve what manifests produce
through a real Envoy on loopback; NACKs fail loudly; missing Envoy skips, or fails under ``CI``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from trafficmgr.cli import main, scaffold
from trafficmgr.testing.kit import BuildResult, NackingPlugin, SidecarMesh

SHOP = """
apiVersion: v1
kind: Service
metadata: {name: shop, labels: {traffic.port.8080: http}}
spec: {selector: {app: shop}, ports: [{name: http, port: 8080, targetPort: web}]}
---
apiVersion: v1
kind: Pod
metadata: {name: shop-1, labels: {app: shop}}
spec: {containers: [{name: app, image: shop, ports: [{name: web, containerPort: 9000}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: shop-2, labels: {app: shop}}
spec: {containers: [{name: app, image: shop, ports: [{name: web, containerPort: 9000}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: store, labels: {traffic.port.8081: http}}
spec: {selector: {app: cart}, ports: [{port: 8081}]}
---
apiVersion: v1
kind: Pod
metadata: {name: cart-1, namespace: store, labels: {app: cart}}
spec: {containers: [{name: app, image: cart}]}
"""

BREAK = "traffic.kit-test.break"


def Breaker() -> NackingPlugin:  # noqa: N802 - reads like the plugin object it returns
    return NackingPlugin(BREAK)


# -- scaffold --------------------------------------------------------------------------------------


def test_names_and_compatible_range() -> None:
    n = scaffold.Names.of("served-by")
    assert (n.entry_point, n.distribution, n.module, n.label, n.header) == (
        "served_by", "trafficmgr-served-by", "trafficmgr_served_by", "traffic.served-by.header", "x-served-by")
    assert scaffold.compatible_range("0.1.0") == ">=0.1,<0.2"
    assert scaffold.compatible_range("1.4.2") == ">=1.4,<2"
    for bad in ("", "Greeting", "1st", "a--b", "a b", "trafficmgr-x", "x" * 41):
        with pytest.raises(scaffold.ScaffoldError):
            scaffold.Names.of(bad)


def test_plugins_new_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins", "new", "greeting", "--directory", str(tmp_path)]) == 0
    root = tmp_path / "trafficmgr-greeting"
    assert "pip install -e" in capsys.readouterr().out
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == [
        ".gitignore", "README.md", "pyproject.toml", "tests/test_greeting.py", "trafficmgr_greeting.py"]
    pyproject = (root / "pyproject.toml").read_text()
    assert '[project.entry-points."trafficmgr.plugins"]\ngreeting = "trafficmgr_greeting"' in pyproject
    assert f'dependencies = ["trafficmgr{scaffold.compatible_range()}"]' in pyproject
    # An existing project is not overwritten without --force; bad names are one-line errors.
    assert main(["plugins", "new", "greeting", "-d", str(tmp_path)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["plugins", "new", "greeting", "-d", str(tmp_path), "--force"]) == 0
    assert main(["plugins", "new", "No!", "-d", str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith("trafficmgr: error: invalid plugin name 'No!'")


@pytest.mark.slow
def test_generated_project_installs_passes_its_tests_and_is_listed(tmp_path: Path, trafficmgr_envoy_binary: str) -> None:
    """The README's promise for ``plugins new``: ``pip install -e`` in a fresh virtual environment, its
    tests pass (the Envoy one included), ``trafficmgr plugins list`` shows it with its hooks."""
    scaffold.create("greeting", tmp_path)
    project = tmp_path / "trafficmgr-greeting"
    venv = tmp_path / "venv"
    # --system-site-packages: trafficmgr and its heavy dependencies (and pytest) come from this
    # interpreter's site; the plugin itself goes into the venv only.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "TRAFFICMGR_PLUGINS", "PYTHONPATH")}
    pip = subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-e", f"{project}[test]"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert pip.returncode == 0, pip.stdout + pip.stderr

    def pytest_run(extra_env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"], cwd=project,
                              capture_output=True, text=True, env={**env, **extra_env}, timeout=300)

    run = pytest_run({})
    assert run.returncode == 0 and "5 passed" in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]

    listed = subprocess.run([python, "-m", "trafficmgr", "plugins", "list", "--json"], capture_output=True, text=True,
                            env=env, timeout=60, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    row = {p["name"]: p for p in json.loads(listed.stdout)}["greeting"]
    assert row == {"name": "greeting", "version": "0.1.0", "distribution": "trafficmgr-greeting", "source": "third-party",
                   "module": "trafficmgr_greeting", "loaded": True,
                   "hooks": ["trafficmgr_labels", "trafficmgr_virtual_host"], "depends": []}
    table = subprocess.run([python, "-m", "trafficmgr", "plugins", "list", "--hooks"], capture_output=True, text=True,
                           env=env, timeout=60, cwd=tmp_path).stdout
    assert any(ln.split()[:1] == ["greeting"] and ln.endswith("labels, virtual_host") for ln in table.splitlines()), table
    # Not installed outside the venv.
    assert "greeting" not in json.dumps(json.loads(subprocess.run(
        [sys.executable, "-m", "trafficmgr", "plugins", "list", "--json"], capture_output=True, text=True, env=env,
        timeout=60).stdout))

    # The kit's Envoy fixtures skip without an Envoy binary, and fail instead under CI.
    missing = {"TRAFFICMGR_ENVOY": str(tmp_path / "no-envoy")}
    skipped = pytest_run(missing)
    assert skipped.returncode == 0 and "4 passed, 1 skipped" in skipped.stdout, skipped.stdout[-3000:]
    failed = pytest_run({**missing, "CI": "true"})
    assert failed.returncode == 1 and "4 passed, 1 error" in failed.stdout and "CI:" in failed.stdout, failed.stdout[-3000:]


# -- trafficmgr_build -------------------------------------------------------------------------------


def test_build_resources_by_type_and_name(trafficmgr_build: Callable[..., BuildResult]) -> None:
    result = trafficmgr_build(SHOP.replace("traffic.port.8080: http", "traffic.port.8080: http, traffic.lb.policy: RING_HASH"),
                              plugins=["lb", "fault"])
    assert result.warnings == [] and result.errors() == []
    side = result.sidecar
    assert side.cluster("shop", 8080)["lb_policy"] == "RING_HASH"
    assert sorted(side.clusters) == ["8080|default|shop.outbound", "8081|store|cart.outbound", "inbound|blackhole",
                                  "inbound|passthrough"]
    # Endpoints come from the pods (through the API server's EndpointSlice controller), named ports resolved.
    lbs = side.endpoints["8080|default|shop.outbound"]["endpoints"][0]["lb_endpoints"]
    assert sorted(e["endpoint"]["address"]["socket_address"]["port_value"] for e in lbs) == [9000, 9000]
    assert side.virtual_host("cart", 8081, "store")["domains"][:2] == ["cart:8081", "cart.store:8081"]
    assert side.http_filters() == [["envoy.filters.http.fault", "envoy.filters.http.router"]] * 2
    assert "outbound|8080" in side.routes and "outbound" in side.listeners
    assert result.gateway.listeners == {}
    with pytest.raises(KeyError, match="clusters:"):
        side.cluster("nope", 1)
    with pytest.raises(KeyError, match="virtual hosts:"):
        side.virtual_host("shop", 9999)
    assert "RING_HASH" in result.render(["sidecar"])


def test_build_options_and_plugin_objects(trafficmgr_build: Callable[..., BuildResult]) -> None:
    # Plugin options get their declared defaults (tracing's --zipkin-address ...), overridable.
    result = trafficmgr_build(SHOP, plugins=["tracing"], options={"zipkin_address": "127.0.0.9:9411"})
    assert result.options.zipkin_address == "127.0.0.9:9411"
    assert result.options.sidecar_port == 10000  # the builder's defaults too
    # A plugin object that is not installed is registered as an extra: its labels parse, its hooks run.
    broken = trafficmgr_build(SHOP.replace("traffic.port.8080: http", f"traffic.port.8080: http, {BREAK}: 'true'"),
                              plugins=["lb", Breaker()])
    assert broken.sidecar.cluster("shop", 8080)["lb_policy"] == "CLUSTER_PROVIDED"
    assert "NackingPlugin" in broken.plugins.infos
    with pytest.raises(TypeError):
        trafficmgr_build(SHOP, plugins="lb")


# -- trafficmgr_envoy -------------------------------------------------------------------------------


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_envoy_routes_to_every_service_and_pod(trafficmgr_envoy: Callable[..., SidecarMesh], delta: bool) -> None:
    mesh = trafficmgr_envoy(SHOP, plugins=["lb"], delta=delta)
    assert set(mesh.backends) == {"shop-1", "shop-2", "cart-1"}
    seen = {mesh.get("shop", "/x").json()["backend"] for _ in range(20)}
    # Round robin over two endpoints: 20 requests reach both (a miss would need 20 picks of one host,
    # which round robin never does).
    assert seen == {"shop-1", "shop-2"}
    r = mesh.get("cart", "/y", namespace="store", headers={"x-test": "1"})
    assert r.status == 200 and r.json()["headers"]["host"] == "cart.store:8081" and r.json()["headers"]["x-test"] == "1"
    assert mesh.backends["cart-1"].port == 8081  # targetPort defaults to the port
    # Programmable backends: the pod's answer passes through Envoy.
    mesh.backends["cart-1"].set(status=503)
    assert mesh.get("cart", "/", namespace="store").status == 503
    assert mesh.stats()["cluster.8081|store|cart.outbound.upstream_rq_503"] >= 1
    # A port without traffic.port.<port> gets the sidecar's blocked answer, as in a cluster.
    mesh.apply(SHOP.split("---")[0].replace("shop", "closed").replace("{traffic.port.8080: http}", "{}"))
    r = mesh.get("closed")
    assert r.status == 404 and "port not enabled" in r.text


def test_envoy_follows_label_changes_and_deletes(trafficmgr_envoy: Callable[..., SidecarMesh]) -> None:
    mesh = trafficmgr_envoy(SHOP, plugins=["fault"])
    assert mesh.get("shop").status == 200
    mesh.label("service", "shop", {"traffic.fault.abort.percentage": "100", "traffic.fault.abort.status": "418"})
    assert mesh.get("shop").status == 418  # label() returned only after Envoy ACKed: no polling needed
    mesh.label("service", "shop", {"traffic.fault.abort.percentage": None})
    assert mesh.get("shop").status == 200
    mesh.delete("pod", "shop-1")
    mesh.delete("pod", "shop-2")
    assert mesh.get("shop").status == 503  # no healthy upstream
    # A service added later gets its own address and backend.
    mesh.apply(SHOP.replace("shop", "shoe"))
    assert mesh.get("shoe").json()["backend"] in ("shoe-1", "shoe-2")


def test_envoy_nack_fails_loudly(trafficmgr_envoy: Callable[..., SidecarMesh]) -> None:
    mesh = trafficmgr_envoy(SHOP, plugins=["lb", Breaker()])
    with pytest.raises(AssertionError, match="NACK"):
        mesh.label("service", "shop", {BREAK: "true"})


def test_envoy_refuses_addresses_it_cannot_serve(trafficmgr_envoy: Callable[..., SidecarMesh],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="not a loopback address"):
        trafficmgr_envoy(SHOP.replace("spec: {selector: {app: shop}", "spec: {clusterIP: 10.96.0.5, selector: {app: shop}"))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(ValueError, match="port 80 needs root"):
        trafficmgr_envoy(SHOP.replace("port: 8080", "port: 80"))


def test_gateway_fixture(trafficmgr_gateway: Callable[..., Any]) -> None:
    gw = trafficmgr_gateway(plugins=["ingress"])
    gw.backend("web-1", "127.0.0.61", 0)
    ingress_yaml = """
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: web}
spec:
  ingressClassName: traffic
  rules: [{host: web.example, http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: web, port: {number: 80}}}}]}}]
"""
    port = gw.backends[0].port
    gw.apply(f"""
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec: {{selector: {{app: web}}, ports: [{{port: 80, targetPort: {port}}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: web-1, labels: {{app: web}}}}
spec: {{containers: [{{name: app, image: web}}]}}
status: {{phase: Running, podIP: 127.0.0.61, podIPs: [{{ip: 127.0.0.61}}], conditions: [{{type: Ready, status: "True"}}]}}
---
{ingress_yaml}""")
    status, body = gw.wait_config(lambda: (r := gw.get("/hello", host="web.example"))[0] == 200 and r,
                                  message="no 200 through the gateway")
    assert json.loads(body)["backend"] == "web-1"
