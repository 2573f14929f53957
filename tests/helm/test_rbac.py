"""The control plane's ClusterRole grants exactly what the selected plugins' watched kinds need.

The expected rules are derived from the code (``kinds_of(PluginHost.load(selection))``: get/list/watch per
group/resource) plus the fixed writes (Events create/patch; Ingress status update/patch with ``ingress``;
TokenReviews with mesh identity), so the chart and the code cannot drift apart. Grants limited to named
objects (``resourceNames``) are only allowed where a test below names them.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.helm.chart import BUILTIN_PLUGINS, NAMESPACE, RELEASE, find, one, render, run_helm
from trafficmgr.core.controlplane import kinds_of
from trafficmgr.core.plugins import PluginHost

Grant = tuple[str, str, str]  # (apiGroup, resource, verb)
READ = ("get", "list", "watch")

SELECTIONS = [
    BUILTIN_PLUGINS,
    [p for p in BUILTIN_PLUGINS if p != "mtls"],
    ["lb"],
    [p for p in BUILTIN_PLUGINS if p != "tls"],
    [p for p in BUILTIN_PLUGINS if p not in ("ingress", "tls", "gateway_api")],
    ["ingress"],
    ["tls", "ingress", "lb"],
    [],
]


def _group(kind: Any) -> str:
    return kind.api_version.rpartition("/")[0]


def reads_of(selection: list[str]) -> set[tuple[str, str]]:
    """(group, plural) of every kind the control plane watches with this plugin selection."""
    return {(_group(k), k.plural) for k in kinds_of(PluginHost.load(selection))}


def expected_grants(selection: list[str], mesh_identity: bool = True) -> set[Grant]:
    grants = {(g, r, v) for g, r in reads_of(selection) for v in READ}
    grants |= {("", "events", "create"), ("", "events", "patch")}
    if mesh_identity:
        grants.add(("authentication.k8s.io", "tokenreviews", "create"))
    if "ingress" in selection:
        grants |= {("networking.k8s.io", "ingresses/status", v) for v in ("update", "patch")}
    if "gateway_api" in selection:
        grants |= {("gateway.networking.k8s.io", f"{kind}/status", v) for v in ("update", "patch")
                   for kind in ("gatewayclasses", "gateways", "httproutes", "grpcroutes")}
    return grants


def grants_of(role: dict[str, Any], named: bool = False) -> set[Grant]:
    """Every (group, resource, verb) the role grants; ``named`` True: only what it grants on any name
    (rules with ``resourceNames`` left out), else rules with names fail the test."""
    out: set[Grant] = set()
    for rule in role["rules"]:
        assert set(rule) <= {"apiGroups", "resources", "verbs", "resourceNames"}, f"unexpected rule fields (nonResourceURLs?): {rule}"
        if "resourceNames" in rule:
            assert named, f"{role['metadata']['name']}: a rule limited to names where none was expected: {rule}"
            continue
        out |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    return out


def named_grants_of(role: dict[str, Any]) -> set[tuple[str, str, str, str]]:
    """(group, resource, verb, name) of the rules limited to named objects."""
    return {(g, r, v, n) for rule in role["rules"] if "resourceNames" in rule
            for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"] for n in rule["resourceNames"]}


@pytest.mark.parametrize("selection", SELECTIONS, ids=lambda s: ",".join(s) or "none")
def test_cluster_role_matches_the_watched_kinds(selection: list[str]) -> None:
    role = one(render({"plugins": selection}), "ClusterRole", RELEASE)
    actual, expected = grants_of(role), expected_grants(selection)
    assert actual == expected, f"chart grants more: {sorted(actual - expected)}; chart lacks: {sorted(expected - actual)}"


def test_core_kinds_are_what_the_chart_calls_core() -> None:
    """With no plugin the chart grants exactly the core's kinds (independent of any plugin)."""
    assert reads_of([]) == {("", "services"), ("discovery.k8s.io", "endpointslices"), ("", "pods"), ("", "namespaces"),
                            ("apps", "replicasets"), ("apps", "deployments"), ("apps", "statefulsets"), ("apps", "daemonsets")}


def test_secrets_only_with_tls() -> None:
    """Reading Secrets (any name) needs the tls or gateway_api plugin (certificates of Ingresses and
    Gateways); mesh identity reads only its CA Secret, by name."""
    def reads_secrets(values: dict[str, Any]) -> bool:
        roles = find(render(values), "ClusterRole") + find(render(values), "Role")
        return any(g == "" and r == "secrets" and v in READ for role in roles for g, r, v in grants_of(role, named=True))

    assert reads_secrets({})
    assert not reads_secrets({"plugins": [p for p in BUILTIN_PLUGINS if p not in ("tls", "gateway_api")]})
    assert reads_secrets({"plugins": [p for p in BUILTIN_PLUGINS if p != "tls"]})
    assert not reads_secrets({"plugins": ["lb"]})


def test_mesh_identity_roles_are_limited_to_the_ca_secret_and_trust_bundle_in_the_release_namespace() -> None:
    objects = render({})
    ca = one(objects, "Role", f"{RELEASE}-mesh-ca")
    assert ca["metadata"]["namespace"] == NAMESPACE
    assert named_grants_of(ca) == {("", "secrets", v, f"{RELEASE}-mesh-ca") for v in READ} | {
        ("", "configmaps", v, "trafficmgr-trust-bundle") for v in (*READ, "update", "patch")}
    # create cannot be limited to a name in Kubernetes RBAC; nothing else is granted on any name.
    assert grants_of(ca, named=True) == {("", "secrets", "create"), ("", "configmaps", "create")}
    agent = one(objects, "Role", f"{RELEASE}-agent-trust-bundle")
    assert agent["metadata"]["namespace"] == NAMESPACE
    assert named_grants_of(agent) == {("", "configmaps", v, "trafficmgr-trust-bundle") for v in READ}
    assert grants_of(agent, named=True) == set()
    for name, sa in ((f"{RELEASE}-mesh-ca", RELEASE), (f"{RELEASE}-agent-trust-bundle", f"{RELEASE}-agent")):
        binding = one(objects, "RoleBinding", name)
        assert binding["roleRef"]["name"] == name and binding["subjects"][0]["name"] == sa
    off = render({"meshIdentity": {"enabled": False}, "plugins": [p for p in BUILTIN_PLUGINS if p != "mtls"]})
    assert not find(off, "Role", f"{RELEASE}-mesh-ca") and not find(off, "Role", f"{RELEASE}-agent-trust-bundle")
    assert ("authentication.k8s.io", "tokenreviews", "create") not in grants_of(one(off, "ClusterRole", RELEASE))


@pytest.mark.parametrize("values", [{}, {"plugins": ["lb"]}, {"controlPlane": {"watchNamespace": "shop"}},
                                    {"rbac": {"extraRules": [{"apiGroups": ["example.com"], "resources": ["widgets"], "verbs": ["list"]}]}}])
def test_no_wildcards_and_no_cluster_admin(values: dict[str, Any]) -> None:
    objects = render(values)
    for role in find(objects, "ClusterRole") + find(objects, "Role"):
        for g, r, v in grants_of(role, named=True) | {t[:3] for t in named_grants_of(role)}:
            assert "*" not in (g, r, v), f"{role['metadata']['name']}: wildcard in {(g, r, v)}"
    for binding in find(objects, "ClusterRoleBinding") + find(objects, "RoleBinding"):
        assert binding["roleRef"]["name"] not in ("cluster-admin", "admin", "edit"), binding["metadata"]["name"]


def test_agent_role_matches_what_the_agent_watches_and_writes() -> None:
    """Derived from the agent's code: read its watched kinds, patch pods (the traffic.envoy.proxy
    annotation), write Events."""
    from trafficmgr.core.agent.agent import WATCHED_KINDS

    expected = {(_group(k), k.plural, v) for k in WATCHED_KINDS for v in READ}
    expected |= {("", "pods", "patch"), ("", "events", "create"), ("", "events", "patch")}
    assert grants_of(one(render({}), "ClusterRole", f"{RELEASE}-agent")) == expected


def test_prometheus_role() -> None:
    objects = render({})
    assert grants_of(one(objects, "ClusterRole", f"{RELEASE}-prometheus")) == {("", "pods", v) for v in READ}


def test_bindings_point_at_the_service_accounts_that_run_the_pods() -> None:
    objects = render({})
    for name in (RELEASE, f"{RELEASE}-agent", f"{RELEASE}-prometheus"):
        binding = one(objects, "ClusterRoleBinding", name)
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name}
        (subject,) = binding["subjects"]
        assert subject["kind"] == "ServiceAccount" and subject["name"] == name
        one(objects, "ServiceAccount", name)
    workloads = {o["metadata"]["name"]: o for o in objects if o["kind"] in ("Deployment", "DaemonSet")}
    assert workloads[RELEASE]["spec"]["template"]["spec"]["serviceAccountName"] == RELEASE
    assert workloads[f"{RELEASE}-agent"]["spec"]["template"]["spec"]["serviceAccountName"] == f"{RELEASE}-agent"


def test_watch_namespace_binds_the_role_in_that_namespace_only() -> None:
    objects = render({"controlPlane": {"watchNamespace": "shop"}})
    assert not find(objects, "ClusterRoleBinding", RELEASE)
    rb = one(objects, "RoleBinding", RELEASE)
    assert rb["metadata"]["namespace"] == "shop" and rb["roleRef"]["kind"] == "ClusterRole"
    # IngressClasses are cluster-scoped: a RoleBinding cannot grant them.
    assert grants_of(one(objects, "ClusterRole", f"{RELEASE}-cluster")) == {
        (g, r, v) for g, r in (("networking.k8s.io", "ingressclasses"), ("", "namespaces"),
                               ("gateway.networking.k8s.io", "gatewayclasses")) for v in READ} | {
        ("gateway.networking.k8s.io", "gatewayclasses/status", v) for v in ("update", "patch")}
    one(objects, "ClusterRoleBinding", f"{RELEASE}-cluster")
    args = one(objects, "Deployment", RELEASE)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=shop" in args


@pytest.mark.parametrize("selection", [["tls"], ["tls", "lb"]])
def test_tls_without_ingress_fails_at_render(selection: list[str]) -> None:
    """The chart refuses what the control plane would refuse at startup, with the same fix."""
    proc = run_helm("template", RELEASE, "--namespace", NAMESPACE, values={"plugins": selection}, check=False)
    assert proc.returncode != 0
    assert "tls needs ingress" in proc.stderr and "add ingress to plugins" in proc.stderr
    proc = run_helm("template", RELEASE, "--namespace", NAMESPACE, values={"plugins": ["gateway_api", "lb"]}, check=False)
    assert proc.returncode != 0 and "gateway_api needs ingress" in proc.stderr
