"""The chart's mesh identity wiring: who gets a token for the signing service, where certificates live,
who may reach the signing port."""

from __future__ import annotations

from typing import Any

from tests.helm.chart import BUILTIN_PLUGINS, NAMESPACE, RELEASE, container, find, one, pod_spec, render, run_helm

SERVER = f"{RELEASE}.{NAMESPACE}.svc"


def _args(c: dict[str, Any]) -> list[str]:
    return list(c.get("args") or [])


def _token_volume(spec: dict[str, Any]) -> dict[str, Any]:
    (vol,) = [v for v in spec["volumes"] if v["name"] == "identity-token"]
    (source,) = vol["projected"]["sources"]
    return source["serviceAccountToken"]


def test_control_plane_runs_the_signing_service_and_mtls() -> None:
    objects = render({})
    cp = one(objects, "Deployment", RELEASE)
    args = _args(container(cp, "control-plane"))
    for flag in ("--mesh-identity", "--mtls", "--mesh-ca-mode=generate", f"--mesh-ca-secret={RELEASE}-mesh-ca",
                 f"--mesh-ca-namespace={NAMESPACE}", "--identity-port=15012", "--identity-audience=trafficmgr",
                 f"--identity-agent-service-account={NAMESPACE}/{RELEASE}-agent",
                 f"--identity-dns-names={SERVER},{SERVER}.cluster.local"):
        assert flag in args, (flag, args)
    ports = {p["name"]: p["port"] for p in one(objects, "Service", RELEASE)["spec"]["ports"]}
    assert ports["grpc-identity"] == 15012


def test_agent_gets_an_audience_bound_token_and_the_signing_address() -> None:
    agent = one(render({}), "DaemonSet", f"{RELEASE}-agent")
    token = _token_volume(pod_spec(agent))
    # Audience-bound: the Kubernetes API server refuses this token, only the signing service accepts it.
    assert token["audience"] == "trafficmgr" and token["expirationSeconds"] <= 3600
    args = _args(container(agent, "agent"))
    assert "--mesh-identity" in args and f"--ca-address={SERVER}:15012" in args and f"--ca-server-name={SERVER}" in args
    assert "--identity-token-file=/var/run/secrets/trafficmgr/token" in args
    assert "--xds-mtls" not in args
    assert "--xds-mtls" in _args(container(one(render({"controlPlane": {"xdsAuth": "mtls"}}), "DaemonSet", f"{RELEASE}-agent"), "agent"))


def test_gateway_fetches_its_own_certificate_into_a_memory_volume_envoy_reads_read_only() -> None:
    gw = one(render({}), "Deployment", f"{RELEASE}-gateway")
    spec = pod_spec(gw)
    assert _token_volume(spec)["audience"] == "trafficmgr"
    assert spec["automountServiceAccountToken"] is False  # no Kubernetes API token in the gateway
    init = container(gw, "identity-init", init=True)
    side = container(gw, "identity")
    assert "--once" in _args(init) and "--once" not in _args(side)
    for c in (init, side):
        assert "--pod=$(POD_NAMESPACE)/$(POD_NAME)" in _args(c) and f"--service-account={RELEASE}-gateway" in _args(c)
    assert side["livenessProbe"]["exec"]["command"][:3] == ["trafficmgr", "identity", "--check"]
    envoy = container(gw, "envoy")
    assert envoy["workingDir"] == "/var/run/trafficmgr/proxy"
    (mount,) = [m for m in envoy["volumeMounts"] if m["name"] == "proxy"]
    assert mount["readOnly"] is True and mount["mountPath"] == envoy["workingDir"]
    (vol,) = [v for v in spec["volumes"] if v["name"] == "proxy"]
    assert vol["emptyDir"]["medium"] == "Memory"
    # The init container runs before Envoy: the inits run in order and the bootstrap init is independent.
    names = [c["name"] for c in spec["initContainers"]]
    assert names.index("identity-init") > names.index("bootstrap")


def test_signing_port_is_open_to_the_agent_and_gateway_only() -> None:
    policy = one(render({}), "NetworkPolicy", RELEASE)
    (rule,) = [r for r in policy["spec"]["ingress"] if {"port": 15012, "protocol": "TCP"} in r["ports"]]
    components = sorted(p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in rule["from"])
    assert components == ["agent", "gateway"]
    assert all("namespaceSelector" not in p for p in rule["from"])  # this namespace only


def test_xds_mtls_needs_no_secret_with_mesh_identity_and_uses_workload_certificates() -> None:
    objects = render({"controlPlane": {"xdsAuth": "mtls"}})
    cp_args = _args(container(one(objects, "Deployment", RELEASE), "control-plane"))
    assert "--xds-auth=mtls" in cp_args and not any(a.startswith("--xds-tls-cert") for a in cp_args)
    boot = _args(container(one(objects, "Deployment", f"{RELEASE}-gateway"), "bootstrap", init=True))
    assert "--xds-mtls" in boot and not any(a.startswith("--xds-tls-cert") for a in boot)


def test_disabling_mesh_identity_removes_it_everywhere() -> None:
    objects = render({"meshIdentity": {"enabled": False}, "plugins": [p for p in BUILTIN_PLUGINS if p != "mtls"]})
    text = repr(objects)
    for needle in ("--mesh-identity", "identity-token", "grpc-identity", "--mtls", "identity-init"):
        assert needle not in text, needle
    assert not find(objects, "Role", f"{RELEASE}-mesh-ca")


def test_bad_combinations_fail_at_render_with_the_fix() -> None:
    proc = run_helm("template", RELEASE, "--namespace", NAMESPACE, values={"meshIdentity": {"enabled": False}}, check=False)
    assert proc.returncode != 0 and "mtls needs meshIdentity.enabled=true" in proc.stderr
    proc = run_helm("template", RELEASE, "--namespace", NAMESPACE, check=False, values={
        "meshIdentity": {"enabled": False}, "plugins": ["lb"], "controlPlane": {"xdsAuth": "mtls"}})
    assert proc.returncode != 0 and "secretName" in proc.stderr
    for bad in ({"meshIdentity": {"ca": {"mode": "offline"}}}, {"meshIdentity": {"workloadCertTTL": "1d"}},
                {"meshIdentity": {"trustDomain": "Bad_Domain"}}):
        proc = run_helm("template", RELEASE, "--namespace", NAMESPACE, values=bad, check=False)
        assert proc.returncode != 0 and "meshIdentity" in proc.stderr, (bad, proc.stderr)
