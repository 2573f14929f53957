"""The commands the chart runs are accepted by the real ``trafficmgr`` CLI, and the gateway's bootstrap
init container produces a bootstrap that the real Envoy accepts (``envoy --mode validate``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helm.chart import BUILTIN_PLUGINS, RELEASE, container, one, render
from trafficmgr import cli

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "only-lb": {"plugins": ["lb"]},
    "docker": {"agent": {"runtime": "docker"}, "zipkin": {"enabled": False}},
    "tracing-external-zipkin": {"plugins": ["tracing"], "zipkin": {"enabled": False, "address": "zipkin.obs:9411"},
                                "controlPlane": {"watchNamespace": "shop"}},
    "no-inbound-capture": {"agent": {"captureInbound": False}},
    "mtls": {"meshIdentity": {"enabled": False}, "plugins": [p for p in BUILTIN_PLUGINS if p != "mtls"],
             "controlPlane": {"xdsAuth": "mtls", "xdsTls": {"secretName": "cp"}}, "gateway": {"xdsTls": {"secretName": "gw"}}},
    "mesh-identity-mtls": {"controlPlane": {"xdsAuth": "mtls"}},
}


def parse(argv: list[str]) -> Any:
    """Parse like ``trafficmgr <argv>`` does (plugin options included) without running the command."""
    argv = [a.replace("$(NODE_NAME)", "node-1").replace("$(POD_NAME)", "gw-1").replace("$(POD_NAMESPACE)", "traffic-system")
            .replace("$(POD_UID)", "0c6b2c5e-7f1e-4a57-9d55-0b7c0c9b1a11") for a in argv]
    cli.load_command_modules()
    try:  # the parser for this argv: `serve` has the options of the plugins it selects
        return cli.build_parser(argv).parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"trafficmgr {' '.join(argv)}: rejected (exit {exc.code}); see the usage error above")


@pytest.mark.parametrize("name", VALUE_SETS)
def test_rendered_commands_parse(name: str) -> None:
    objects = render(VALUE_SETS[name])
    serve = parse(container(one(objects, "Deployment", RELEASE), "control-plane")["args"])
    assert serve.command == "serve"
    assert (serve.admin_address, serve.admin_port, serve.metrics_address, serve.metrics_port) == ("127.0.0.1", 18080, "0.0.0.0", 18090)
    assert serve.xds_gateway_service_account == f"{RELEASE}-gateway"
    agent_c = container(one(objects, "DaemonSet", f"{RELEASE}-agent"), "agent")
    agent = parse(agent_c["args"])
    assert agent.command == "agent" and agent.node_name == "node-1"
    # The agent redirects to the port the control plane puts the inbound listener on (0: neither).
    assert agent.inbound_port == serve.sidecar_inbound_port == (0 if name == "no-inbound-capture" else 15006)
    pre_stop = agent_c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "trafficmgr"
    proxies = parse(pre_stop[1:])
    assert proxies.command == "proxies" and proxies.remove_all
    assert (proxies.runtime, proxies.state_dir, proxies.netns_dir, proxies.docker_host) == (
        agent.runtime, agent.state_dir, agent.netns_dir, agent.docker_host)
    assert (agent.admin_port, agent.stats_port) == (15000, 8900)
    boot = parse(container(one(objects, "Deployment", f"{RELEASE}-gateway"), "bootstrap", init=True)["args"])
    assert boot.command == "bootstrap" and boot.node_cluster == "traffic-ingress"
    assert (boot.admin_address, boot.admin_port, boot.stats_port) == ("127.0.0.1", 15000, 8900)
    if name == "mtls":
        assert serve.xds_auth == "mtls" and serve.xds_client_ca and boot.xds_tls_cert and boot.xds_tls_ca
    mesh = name != "mtls"
    assert bool(serve.mesh_identity) == bool(agent.mesh_identity) == mesh
    if mesh:
        # The agent and the gateway reach the signing service the control plane runs, by the name its
        # certificate carries, with the audience it checks.
        assert agent.ca_address == f"{agent.ca_server_name}:{serve.identity_port}"
        assert agent.ca_server_name in serve.identity_dns_names.split(",")
        assert agent.mesh_ca_namespace == serve.mesh_ca_namespace and agent.trust_domain == serve.trust_domain
        gw = one(objects, "Deployment", f"{RELEASE}-gateway")
        for c in (container(gw, "identity-init", init=True), container(gw, "identity")):
            ident = parse(c["args"])
            assert ident.command == "identity" and ident.ca_address == agent.ca_address
            assert ident.ca_server_name == agent.ca_server_name and ident.trust_domain == serve.trust_domain
            assert ident.service_account == serve.xds_gateway_service_account
        assert bool(agent.xds_mtls) == bool(boot.xds_mtls) == (serve.xds_auth == "mtls")


def test_parse_rejects_what_the_cli_rejects() -> None:
    """The check above can fail: an option the CLI does not know is an error."""
    with pytest.raises(pytest.fail.Exception):
        parse(["serve", "--plugins=lb", "--zipkin-address=zipkin:9411"])  # tracing's option, tracing not loaded


@pytest.mark.parametrize("plugins", [BUILTIN_PLUGINS, ["lb"]], ids=["all", "lb"])
def test_gateway_bootstrap_is_accepted_by_envoy(plugins: list[str], envoy_binary: str, tmp_path: Path) -> None:
    dep = one(render({"plugins": plugins}), "Deployment", f"{RELEASE}-gateway")
    args = [a.replace("$(POD_NAME)", "trafficmgr-gateway-7d9c5bd8f-x2x8k") for a in container(dep, "bootstrap", init=True)["args"]]
    out = tmp_path / "bootstrap.json"
    args = [f"--output={out}" if a.startswith("--output=") else a for a in args]
    proc = subprocess.run([sys.executable, "-c", "import sys; from trafficmgr.cli import main; sys.exit(main())", *args],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    envoy_args = [a.replace("/etc/envoy/bootstrap.json", str(out)) for a in container(dep, "envoy")["args"]]
    check = subprocess.run([envoy_binary, "--mode", "validate", *envoy_args], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    text = out.read_text()
    assert '"traffic-ingress"' in text and f"{RELEASE}.traffic-system.svc" in text and '"port_value": 8900' in text
