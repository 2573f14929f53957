"""The Helm chart renders valid Kubernetes objects for every supported value combination.

helm comes from .ci/install.d/helm.sh; manifests are checked against the Kubernetes 1.30 and 1.32 OpenAPI
schemas in strict mode (unknown fields are errors) by kubernetes-validate, offline (1.30: the chart's
ValidatingAdmissionPolicy is admissionregistration.k8s.io/v1, GA in 1.30).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.helm.chart import BUILTIN_PLUGINS, CHART, NAMESPACE, RELEASE, container, find, one, pod_spec, render, run_helm

#: Mesh identity off (and the mtls plugin, which needs it): xDS mTLS from Secrets, as before identity existed.
NO_IDENTITY: dict[str, Any] = {"meshIdentity": {"enabled": False}, "plugins": [p for p in BUILTIN_PLUGINS if p != "mtls"]}

HASH = "--hash=sha256:" + "c" * 64
# name -> values; the combinations the issue names plus one that turns on every optional knob.
COMBOS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "only-lb": {"plugins": ["lb"]},
    "no-tls": {"plugins": [p for p in BUILTIN_PLUGINS if p != "tls"]},
    "agent-docker": {"agent": {"runtime": "docker"}},
    "agent-netns": {"agent": {"runtime": "netns"}},
    "no-prometheus-no-zipkin": {"prometheus": {"enabled": False}, "zipkin": {"enabled": False}},
    "everything": {
        "extraPlugins": ["served_by"],
        "extraPipPackages": [f"trafficmgr-served-by==0.1.0 {HASH}", f"extra-dep[fast]==2.0 {HASH} {HASH.replace('c', 'd')}"],
        "extraPipArgs": ["--index-url", "https://pypi.example.com/simple"],
        "image": {"digest": "sha256:" + "a" * 64},
        "envoyImage": {"digest": "sha256:" + "b" * 64},
        "imagePullSecrets": [{"name": "regcred"}],
        "controlPlane": {"watchNamespace": "shop", "replicas": 2, "xdsAuth": "mtls", "xdsTls": {"secretName": "xds-server"}},
        "networkPolicy": {"metricsFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
                          "nodeCIDRs": ["10.250.0.0/16"], "prometheusFrom": [{"podSelector": {"matchLabels": {"app": "grafana"}}}]},
        "gateway": {"podDisruptionBudget": {"enabled": True}, "replicas": 2, "xdsTls": {"secretName": "xds-gateway"},
                    "service": {"externalTrafficPolicy": "Local", "loadBalancerSourceRanges": ["10.0.0.0/8"]},
                    "ingressClass": {"default": True}},
        "prometheus": {"ingress": {"enabled": True}},
        "zipkin": {"address": "zipkin.tracing.svc:9411", "enabled": False},
        "rbac": {"extraRules": [{"apiGroups": ["example.com"], "resources": ["widgets"], "verbs": ["get", "list", "watch"]}]},
    },
    "minimal": {"agent": {"enabled": False}, "gateway": {"enabled": False}, "prometheus": {"enabled": False},
                "zipkin": {"enabled": False}, "plugins": []},
    "insecure-xds-no-policies": {"controlPlane": {"xdsAuth": "none", "allowInsecureXds": True},
                                 "networkPolicy": {"enabled": False}, "agentPodPolicy": {"enabled": False},
                                 "extraPipRequireHashes": False, "extraPipPackages": ["trafficmgr-served-by"]},
}
KUBE_VERSIONS = ["1.30.0", "1.32.0"]


@pytest.mark.parametrize("combo", COMBOS)
def test_helm_lint_strict(combo: str) -> None:
    proc = run_helm("lint", "--strict", values=COMBOS[combo])
    assert "0 chart(s) failed" in proc.stdout, proc.stdout


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("combo", COMBOS)
def test_rendered_manifests_validate_strict(combo: str, kube_version: str) -> None:
    objects = render(COMBOS[combo], kube_version=kube_version)
    assert objects
    errors = []
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message} at {list(exc.path)}")
    assert not errors, "\n".join(errors)


def test_strict_validation_catches_an_unknown_field() -> None:
    """The validator really is strict (else the test above could not fail)."""
    svc = one(render({}), "Service", "traffic-ingress")
    svc["spec"]["bogus"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(svc, "1.32.0", strict=True)


def _all_containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(obj)
    return [*spec.get("initContainers", []), *spec["containers"]]


def _workloads(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] in ("Deployment", "DaemonSet")]


@pytest.mark.parametrize("combo", COMBOS)
def test_every_container_is_locked_down(combo: str) -> None:
    """Read-only root, no privilege escalation, all capabilities dropped (the agent adds back only what
    its runtime needs), resources set; non-root everywhere but the agent."""
    for obj in _workloads(render(COMBOS[combo])):
        name = obj["metadata"]["name"]
        spec = pod_spec(obj)
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert not spec.get("hostNetwork"), name
        for c in _all_containers(obj):
            sc = c["securityContext"]
            where = f"{name}/{c['name']}"
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert not sc.get("privileged"), where
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], where
            assert "@sha256:" in c["image"] or ":" in c["image"].rsplit("/", 1)[-1], f"{where}: untagged image {c['image']}"
        if name != f"{RELEASE}-agent":
            assert spec["securityContext"]["runAsNonRoot"] is True, name
            assert not spec.get("hostPID"), name
            assert all("add" not in c["securityContext"]["capabilities"] for c in _all_containers(obj)), name
        for c in spec["containers"]:
            assert c.get("livenessProbe") and c.get("readinessProbe"), f"{name}/{c['name']}"


def test_control_plane_deployment_and_service() -> None:
    objects = render({})
    dep = one(objects, "Deployment", RELEASE)
    cp = container(dep, "control-plane")
    assert cp["args"][0] == "serve"
    # /debug/* on loopback only; metrics and health on their own port, which is all the Service exposes.
    assert {"--xds-port=18000", "--admin-address=127.0.0.1", "--admin-port=18080", "--metrics-address=0.0.0.0",
            "--metrics-port=18090"} <= set(cp["args"])
    assert not [a for a in cp["args"] if a.startswith("--admin-address=") and a != "--admin-address=127.0.0.1"]
    assert cp["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http-metrics"}
    assert cp["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http-metrics"}
    assert cp["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http-metrics"}
    assert {p["name"]: p["containerPort"] for p in cp["ports"]} == {"grpc-xds": 18000, "http-metrics": 18090, "grpc-identity": 15012}
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "18090" and annotations["prometheus.io/path"] == "/metrics"
    assert pod_spec(dep)["serviceAccountName"] == RELEASE
    # The ingress plugin is told which gateway it configures (else it would assume namespace "default").
    assert {"--ingress-class=traffic", "--gateway-port=10000", "--gateway-service=traffic-ingress",
            f"--gateway-namespace={NAMESPACE}"} <= set(cp["args"])
    lb_only = container(one(render({"plugins": ["lb"]}), "Deployment", RELEASE), "control-plane")["args"]
    assert not [a for a in lb_only if a.startswith(("--ingress-class", "--gateway-"))]
    svc = one(objects, "Service", RELEASE)
    assert {p["port"]: p["targetPort"] for p in svc["spec"]["ports"]} == {18000: "grpc-xds", 18090: "http-metrics", 15012: "grpc-identity"}
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize(("values", "expected"), [
    ({}, ",".join(BUILTIN_PLUGINS)),
    ({"plugins": ["lb"]}, "lb"),
    ({"plugins": ["lb", "fault"], "extraPlugins": ["served_by"]}, "lb,fault,served_by"),
    ({"plugins": []}, ""),
])
def test_plugin_selection_reaches_every_component(values: dict[str, Any], expected: str) -> None:
    objects = render(values)
    args = [
        container(one(objects, "Deployment", RELEASE), "control-plane")["args"],
        container(one(objects, "DaemonSet", f"{RELEASE}-agent"), "agent")["args"],
        container(one(objects, "Deployment", f"{RELEASE}-gateway"), "bootstrap", init=True)["args"],
    ]
    for a in args:
        assert f"--plugins={expected}" in a, a


def test_the_selection_is_a_valid_plugins_option() -> None:
    """What the chart passes is accepted by the code's own parser."""
    from trafficmgr.core.plugins import parse_selection

    arg = next(a for a in container(one(render({}), "Deployment", RELEASE), "control-plane")["args"] if a.startswith("--plugins="))
    assert parse_selection(arg.split("=", 1)[1]) == BUILTIN_PLUGINS


@pytest.mark.parametrize(("values", "address"), [
    ({}, f"zipkin.{NAMESPACE}.svc:9411"),  # the Service zipkin.service.name (default "zipkin")
    ({"zipkin": {"service": {"name": ""}}}, f"{RELEASE}-zipkin.{NAMESPACE}.svc:9411"),
    ({"zipkin": {"enabled": False}}, None),
    ({"plugins": ["lb"]}, None),  # --zipkin-address is the tracing plugin's option: absent without it
    ({"zipkin": {"enabled": False, "address": "zipkin.obs:9411"}}, "zipkin.obs:9411"),
])
def test_zipkin_address(values: dict[str, Any], address: str | None) -> None:
    objects = render(values)
    args = container(one(objects, "Deployment", RELEASE), "control-plane")["args"]
    zipkin = [a.split("=", 1)[1] for a in args if a.startswith("--zipkin-address=")]
    assert zipkin == ([address] if address else [])
    deployed = bool(find(objects, "Deployment", f"{RELEASE}-zipkin"))
    assert deployed == (values.get("zipkin", {}).get("enabled", True))


@pytest.mark.parametrize("runtime", ["docker", "netns"])
def test_agent_gets_only_what_its_runtime_needs(runtime: str) -> None:
    ds = one(render({"agent": {"runtime": runtime}}), "DaemonSet", f"{RELEASE}-agent")
    spec = pod_spec(ds)
    agent = container(ds, "agent")
    args = agent["args"]
    assert args[0] == "agent" and f"--runtime={runtime}" in args
    assert "--node-name=$(NODE_NAME)" in args
    (node_env,) = [e for e in agent["env"] if e["name"] == "NODE_NAME"]
    assert node_env["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert f"--xds-address={RELEASE}.{NAMESPACE}.svc:18000" in args
    assert {"--admin-port=15000", "--stats-port=8900", "--proxy-uid=1337", "--health-port=18081"} <= set(args)
    assert agent["readinessProbe"]["httpGet"]["path"] == "/readyz"
    pre_stop = agent["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[:3] == ["trafficmgr", "proxies", "--remove-all"]
    # preStop addresses the same sidecars as the agent: the same runtime options.
    assert [a for a in pre_stop if a.split("=")[0] in ("--runtime", "--docker-host", "--netns-dir", "--state-dir")] == [
        a for a in args if a.split("=")[0] in ("--runtime", "--docker-host", "--netns-dir", "--state-dir")]
    host_paths = {v["name"]: v["hostPath"] for v in spec["volumes"] if "hostPath" in v}
    mounts = {m["name"]: m for m in agent["volumeMounts"]}
    caps = set(agent["securityContext"]["capabilities"]["add"])
    if runtime == "docker":
        # The sidecars' own directories (workload identity) on the node: the daemon bind-mounts host paths.
        assert host_paths == {"docker-socket": {"path": "/var/run/docker.sock", "type": "Socket"},
                              "state": {"path": "/var/run/trafficmgr", "type": "DirectoryOrCreate"}}
        assert "--docker-host=unix:///var/run/docker.sock" in args
        assert "--envoy-image=trafficmgr-envoy:1.40.0" in args
        assert spec["hostPID"] is True  # pod namespaces are /proc/<pid>/ns/net of host pids
        assert caps == {"NET_ADMIN", "NET_RAW", "SYS_ADMIN", "SYS_PTRACE"}
    else:
        assert host_paths == {"netns": {"path": "/var/run/netns", "type": "DirectoryOrCreate"}}
        assert mounts["netns"]["readOnly"] is True and mounts["netns"]["mountPropagation"] == "HostToContainer"
        assert not spec.get("hostPID")
        assert caps == {"NET_ADMIN", "NET_RAW", "SYS_ADMIN", "SETUID", "SETGID", "KILL"}
        assert not any(a.startswith(("--docker-host", "--envoy-image")) for a in args)


def test_gateway() -> None:
    objects = render({})
    dep = one(objects, "Deployment", f"{RELEASE}-gateway")
    spec = pod_spec(dep)
    assert spec["automountServiceAccountToken"] is False
    boot = container(dep, "bootstrap", init=True)
    assert boot["args"][0] == "bootstrap"
    assert {"--node-id=$(POD_NAME)", "--node-cluster=traffic-ingress", f"--xds-address={RELEASE}.{NAMESPACE}.svc:18000",
            "--admin-port=15000", "--stats-port=8900", "--output=/etc/envoy/bootstrap.json"} <= set(boot["args"])
    assert not [a for a in boot["args"] if a.startswith(("--admin-address", "--xds-tls"))]  # admin: 127.0.0.1 (default)
    envoy = container(dep, "envoy")
    assert envoy["image"] == "trafficmgr-envoy:1.40.0"
    assert envoy["args"][:2] == ["--config-path", "/etc/envoy/bootstrap.json"]
    assert envoy["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http-stats"}
    assert envoy["livenessProbe"]["tcpSocket"] == envoy["startupProbe"]["tcpSocket"] == {"port": "http-stats"}
    ports = {p["name"]: p["containerPort"] for p in envoy["ports"]}
    assert ports == {"http-gateway": 10000, "http-stats": 8900}  # no admin port: it is on 127.0.0.1
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations["traffic.envoy.proxy"] == "ingress" and annotations["prometheus.io/port"] == "8900"
    assert spec["securityContext"]["runAsUser"] == 1337
    svc = one(objects, "Service", "traffic-ingress")
    assert svc["spec"]["type"] == "LoadBalancer"
    assert {p["port"]: p["targetPort"] for p in svc["spec"]["ports"]} == {80: "http-gateway", 443: "http-gateway"}
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    ic = one(objects, "IngressClass", "traffic")
    # gateway.ingressClass.default "auto" without a cluster to look at (helm template): the default class
    assert ic["metadata"]["annotations"] == {"ingressclass.kubernetes.io/is-default-class": "true"}


def test_extra_pip_packages_are_hash_pinned_wheels_appended_after_site_packages() -> None:
    objects = render(COMBOS["everything"])
    requirements = one(objects, "ConfigMap", f"{RELEASE}-pip-requirements")["data"]["requirements.txt"]
    assert requirements.splitlines() == COMBOS["everything"]["extraPipPackages"]
    for obj in (one(objects, "Deployment", RELEASE), one(objects, "DaemonSet", f"{RELEASE}-agent"), one(objects, "Deployment", f"{RELEASE}-gateway")):
        init = container(obj, "install-plugins", init=True)
        assert init["args"] == ["--require-hashes", "--no-deps", "--only-binary=:all:", "--index-url", "https://pypi.example.com/simple",
                                "--requirement=/etc/trafficmgr-pip/requirements.txt"]
        assert "--target" in init["command"]
        assert pod_spec(obj)["initContainers"][0]["name"] == "install-plugins"  # before the bootstrap
        assert {"name": "pip-requirements", "mountPath": "/etc/trafficmgr-pip", "readOnly": True} in init["volumeMounts"]
        for c in _all_containers(obj):
            assert not [e for e in c.get("env", []) if e["name"] == "PYTHONPATH"], c["name"]  # would shadow the image
        main = next(c for c in _all_containers(obj) if c["name"] in ("control-plane", "agent", "bootstrap"))
        assert {"name": "TRAFFICMGR_PLUGIN_PATH", "value": "/opt/trafficmgr-plugins"} in main["env"]
        volumes = {v["name"]: v for v in pod_spec(obj)["volumes"]}
        assert "emptyDir" in volumes["plugins"] and volumes["pip-requirements"]["configMap"]["name"] == f"{RELEASE}-pip-requirements"
    assert not any(c["name"] == "install-plugins" for o in _workloads(render({})) for c in _all_containers(o))
    assert not find(render({}), "ConfigMap", f"{RELEASE}-pip-requirements")
    # extraPipRequireHashes=false: plain pip (development only), any requirement accepted.
    unpinned = container(one(render(COMBOS["insecure-xds-no-policies"]), "Deployment", RELEASE), "install-plugins", init=True)
    assert unpinned["args"] == ["--requirement=/etc/trafficmgr-pip/requirements.txt"]


@pytest.mark.parametrize("requirement", [
    "trafficmgr-served-by==0.1.0",                       # no hash
    "trafficmgr-served-by --hash=sha256:" + "c" * 64,    # no version pin
    "trafficmgr-served-by>=0.1 --hash=sha256:" + "c" * 64,
    "trafficmgr-served-by==0.1.0 --hash=sha256:" + "c" * 63,
    "trafficmgr-served-by==0.1.0 --hash=md5:" + "c" * 32,
    "git+https://example.com/x.git --hash=sha256:" + "c" * 64,
])
def test_unpinned_pip_packages_are_refused(requirement: str) -> None:
    proc = run_helm("template", RELEASE, values={"extraPipPackages": [requirement]}, check=False)
    assert proc.returncode != 0
    assert "extraPipPackages[0]" in proc.stderr and "<name>==<version> --hash=sha256:<64 hex digits>" in proc.stderr, proc.stderr
    assert "derived image" in proc.stderr


def test_image_digest_wins_over_tag() -> None:
    objects = render(COMBOS["everything"])
    assert container(one(objects, "Deployment", RELEASE), "control-plane")["image"] == "trafficmgr@sha256:" + "a" * 64
    assert container(one(objects, "Deployment", f"{RELEASE}-gateway"), "envoy")["image"] == "trafficmgr-envoy@sha256:" + "b" * 64
    assert container(one(render({}), "Deployment", RELEASE), "control-plane")["image"] == "trafficmgr:0.1.0"


@pytest.mark.parametrize(("values", "message"), [
    ({"plugins": ["lb", "loadbalancer"]}, "plugins.1 must be one of the following"),
    ({"controlPlane": {"xdsPort": 70000}}, "controlPlane.xdsPort: Must be less than or equal to 65535"),
    ({"gateway": {"listenerPort": 0}}, "gateway.listenerPort: Must be greater than or equal to 1"),
    ({"agent": {"adminPort": "8900"}}, "agent.adminPort: Invalid type. Expected: integer, given: string"),
    ({"agent": {"runtime": "containerd"}}, 'agent.runtime must be one of the following: "docker", "netns"'),
    ({"controlPlane": {"xdsPrt": 18000}}, "Additional property xdsPrt is not allowed"),
    ({"extraPlugins": ["bad name"]}, "extraPlugins.0: Does not match pattern"),
    ({"image": {"digest": "sha256:abc"}}, "image.digest: Does not match pattern"),
    ({"rbac": {"extraRules": [{"apiGroups": [""], "resources": ["*"], "verbs": ["get"]}]}}, "rbac.extraRules.0.resources.0"),
    ({**NO_IDENTITY, "controlPlane": {"xdsAuth": "mtls"}, "gateway": {"xdsTls": {"secretName": "gw"}}},
     "controlPlane.xdsTls.secretName: String length must be greater than or equal to 1"),
    ({**NO_IDENTITY, "controlPlane": {"xdsAuth": "mtls", "xdsTls": {"secretName": "cp"}}},
     "gateway.xdsTls.secretName: String length must be greater than or equal to 1"),
    ({"controlPlane": {"xdsAuth": "none"}}, "set controlPlane.allowInsecureXds=true too"),
    ({"networkPolicy": {"nodeCIDRs": ["10.0.0.0"]}}, "networkPolicy.nodeCIDRs.0: Does not match pattern"),
    ({"agent": {"statsPort": 0}}, "agent.statsPort: Must be greater than or equal to 1"),
])
def test_schema_rejects_bad_values(values: dict[str, Any], message: str) -> None:
    proc = run_helm("template", RELEASE, values=values, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


def _notes(values: dict[str, Any], tmp_path: Path) -> str:
    """NOTES.txt as `helm install` would print it (helm template does not render NOTES: render a copy
    of the chart where a ConfigMap carries the rendered text)."""
    chart = tmp_path / "trafficmgr"
    shutil.copytree(CHART, chart)
    (chart / "files").mkdir()
    shutil.copy(chart / "templates" / "NOTES.txt", chart / "files" / "NOTES.txt")
    (chart / "templates" / "zz-notes.yaml").write_text(
        'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\ndata:\n  notes: {{ tpl (.Files.Get "files/NOTES.txt") . | toJson }}\n'
    )
    return one(render(values, chart=chart), "ConfigMap", "notes")["data"]["notes"]


def test_notes_tell_what_to_do_next(tmp_path: Path) -> None:
    notes = _notes({}, tmp_path)
    assert f"rollout status deployment/{RELEASE}" in notes
    assert "traffic.envoy.enabled=true" in notes and "traffic.port.9080=http" in notes
    assert "get svc traffic-ingress -o jsonpath='{.status.loadBalancer.ingress[0].ip}'" in notes
    assert "WARNING" not in notes
    lb_only = _notes({"plugins": ["lb"]}, tmp_path / "2")
    assert 'the "ingress" plugin is not selected' in lb_only and "tracing" in lb_only


def test_xds_access_control_admits_exactly_the_gateway_pods() -> None:
    """With the default --xds-auth peer-ip, the control plane's gateway selector and ServiceAccount must
    match the gateway pods (else the gateway is refused), and must not match the control plane's or
    agent's pods."""
    from trafficmgr.core.access import AccessControl, parse_selector
    from trafficmgr.core.model import Pod

    objects = render({})
    cp = one(objects, "Deployment", RELEASE)
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in container(cp, "control-plane")["args"] if a.startswith("--xds-")}
    assert args["--xds-auth"] == "peer-ip"
    assert args["--xds-gateway-namespace"] == NAMESPACE
    gateway = one(objects, "Deployment", f"{RELEASE}-gateway")
    assert args["--xds-gateway-service-account"] == pod_spec(gateway)["serviceAccountName"] == f"{RELEASE}-gateway"
    one(objects, "ServiceAccount", args["--xds-gateway-service-account"])
    selector = parse_selector(args["--xds-gateway-selector"])
    workloads = {"gw": gateway, "cp": cp, "agent": one(objects, "DaemonSet", f"{RELEASE}-agent")}
    pods: dict[str, tuple[Pod, dict[str, str]]] = {}
    for i, (name, obj) in enumerate(workloads.items()):
        ip = f"10.0.0.{i + 1}"
        pod = Pod(NAMESPACE, name, ip=ip, ips=(ip,), service_account=pod_spec(obj)["serviceAccountName"])
        pods[ip] = (pod, obj["spec"]["template"]["metadata"]["labels"])
    # The gateway's labels on a pod of another ServiceAccount (e.g. one any namespace user can create).
    impostor = Pod(NAMESPACE, "impostor", ip="10.0.0.9", ips=("10.0.0.9",), service_account="default")
    pods["10.0.0.9"] = (impostor, gateway["spec"]["template"]["metadata"]["labels"])
    ac = AccessControl("peer-ip", {p.key: p for p, _ in pods.values()}, lambda ip: [pods[ip]] if ip in pods else [],
                       args["--xds-gateway-namespace"], selector, args["--xds-gateway-service-account"])
    ac("gw", "traffic-ingress", "10.0.0.1")
    for ip in ("10.0.0.2", "10.0.0.3", "10.0.0.9"):
        with pytest.raises(PermissionError):
            ac("gw", "traffic-ingress", ip)
    assert "xdsAuth" in yaml.safe_load((CHART / "values.yaml").read_text())["controlPlane"]
    assert run_helm("template", "t", str(CHART), values={"controlPlane": {"xdsAuth": "trust-me"}}, check=False).returncode != 0


def test_xds_mtls_mounts_the_secrets_and_passes_the_flags() -> None:
    """Without mesh identity, xDS mTLS uses certificates from Secrets (with it: tests/helm/test_mesh_identity.py)."""
    objects = render({**NO_IDENTITY, "controlPlane": {"xdsAuth": "mtls", "xdsTls": {"secretName": "xds-server"}},
                      "gateway": {"xdsTls": {"secretName": "xds-gateway"}}})
    cp = one(objects, "Deployment", RELEASE)
    args = container(cp, "control-plane")["args"]
    d = "/etc/trafficmgr/xds-tls"
    assert {"--xds-auth=mtls", f"--xds-tls-cert={d}/tls.crt", f"--xds-tls-key={d}/tls.key", f"--xds-client-ca={d}/ca.crt"} <= set(args)
    assert {"name": "xds-tls", "mountPath": d, "readOnly": True} in container(cp, "control-plane")["volumeMounts"]
    assert {"name": "xds-tls", "secret": {"secretName": "xds-server", "defaultMode": 0o440}} in pod_spec(cp)["volumes"]
    gw = one(objects, "Deployment", f"{RELEASE}-gateway")
    boot = container(gw, "bootstrap", init=True)
    assert {f"--xds-tls-cert={d}/tls.crt", f"--xds-tls-key={d}/tls.key", f"--xds-tls-ca={d}/ca.crt"} <= set(boot["args"])
    for c in (boot, container(gw, "envoy")):  # the bootstrap names the files, Envoy reads them
        assert {"name": "xds-tls", "mountPath": d, "readOnly": True} in c["volumeMounts"]
    assert {"name": "xds-tls", "secret": {"secretName": "xds-gateway", "defaultMode": 0o440}} in pod_spec(gw)["volumes"]
    plain = render({})
    assert not [a for a in container(one(plain, "Deployment", RELEASE), "control-plane")["args"] if a.startswith("--xds-tls")]
    assert all(v["name"] != "xds-tls" for o in _workloads(plain) for v in pod_spec(o)["volumes"])


def test_notes_warn_about_insecure_xds(tmp_path: Path) -> None:
    notes = _notes({"controlPlane": {"xdsAuth": "none", "allowInsecureXds": True}}, tmp_path)
    assert "WARNING: controlPlane.xdsAuth=none" in notes and "every Ingress TLS private key" in notes
    mtls = _notes({**NO_IDENTITY, "controlPlane": {"xdsAuth": "mtls", "xdsTls": {"secretName": "cp"}}, "gateway": {"xdsTls": {"secretName": "gw"}}},
                  tmp_path / "3")
    assert "WARNING: controlPlane.xdsAuth=mtls" in mtls and "refuses sidecar streams" in mtls
    # With mesh identity the sidecars have workload certificates: no warning, a note on the CA instead.
    meshed = _notes({"controlPlane": {"xdsAuth": "mtls"}}, tmp_path / "4")
    assert "WARNING" not in meshed and "Mesh identity is on" in meshed
    secure = _notes({}, tmp_path / "2")
    assert "xdsAuth=none" not in secure and "WARNING" not in secure
    assert f"port-forward deploy/{RELEASE} 18080" in secure and "svc/trafficmgr 18080" not in secure
