"""The control plane's ClusterRole grants exactly what the selected plugins' watched kinds need.

The expected rules are derived from the code (``kinds_of(PluginHost.load(selection))``: get/list/watch per
group/resource) plus the fixed writes (Events create/patch; Ingress status update/patch with ``ingress``),
so the chart and the code cannot drift apart.
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
    ["lb"],
    [p for p in BUILTIN_PLUGINS if p != "tls"],
    [p for p in BUILTIN_PLUGINS if p not in ("ingress", "tls")],
    ["ingress"],
    ["tls", "ingress", "lb"],
    [],
]


def _group(kind: Any) -> str:
    return kind.api_version.rpartition("/")[0]


def reads_of(selection: list[str]) -> set[tuple[str, str]]:
    """(group, plural) of every kind the control plane watches with this plugin selection."""
    return {(_group(k), k.plural) for k in kinds_of(PluginHost.load(selection))}


def expected_grants(selection: list[str]) -> set[Grant]:
    grants = {(g, r, v) for g, r in reads_of(selection) for v in READ}
    grants |= {("", "events", "create"), ("", "events", "patch")}
    if "ingress" in selection:
        grants |= {("networking.k8s.io", "ingresses/status", v) for v in ("update", "patch")}
    return grants


def grants_of(role: dict[str, Any]) -> set[Grant]:
    out: set[Grant] = set()
    for rule in role["rules"]:
        assert set(rule) <= {"apiGroups", "resources", "verbs"}, f"unexpected rule fields (resourceNames/nonResourceURLs?): {rule}"
        out |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    return out


@pytest.mark.parametrize("selection", SELECTIONS, ids=lambda s: ",".join(s) or "none")
def test_cluster_role_matches_the_watched_kinds(selection: list[str]) -> None:
    role = one(render({"plugins": selection}), "ClusterRole", RELEASE)
    actual, expected = grants_of(role), expected_grants(selection)
    assert actual == expected, f"chart grants more: {sorted(actual - expected)}; chart lacks: {sorted(expected - actual)}"


def test_core_kinds_are_what_the_chart_calls_core() -> None:
    """With no plugin the chart grants exactly the core's kinds (independent of any plugin)."""
    assert reads_of([]) == {("", "services"), ("discovery.k8s.io", "endpointslices"), ("", "pods"),
                            ("apps", "replicasets"), ("apps", "deployments"), ("apps", "statefulsets"), ("apps", "daemonsets")}


def test_secrets_only_with_tls() -> None:
    def reads_secrets(values: dict[str, Any]) -> bool:
        roles = find(render(values), "ClusterRole") + find(render(values), "Role")
        return any(g == "" and r == "secrets" for role in roles for g, r, _ in grants_of(role))

    assert reads_secrets({})
    assert not reads_secrets({"plugins": [p for p in BUILTIN_PLUGINS if p != "tls"]})
    assert not reads_secrets({"plugins": ["lb"]})


@pytest.mark.parametrize("values", [{}, {"plugins": ["lb"]}, {"controlPlane": {"watchNamespace": "shop"}},
                                    {"rbac": {"extraRules": [{"apiGroups": ["example.com"], "resources": ["widgets"], "verbs": ["list"]}]}}])
def test_no_wildcards_and_no_cluster_admin(values: dict[str, Any]) -> None:
    objects = render(values)
    for role in find(objects, "ClusterRole") + find(objects, "Role"):
        for g, r, v in grants_of(role):
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
    assert grants_of(one(objects, "ClusterRole", f"{RELEASE}-cluster")) == {("networking.k8s.io", "ingressclasses", v) for v in READ}
    one(objects, "ClusterRoleBinding", f"{RELEASE}-cluster")
    args = one(objects, "Deployment", RELEASE)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=shop" in args


@pytest.mark.parametrize("selection", [["tls"], ["tls", "lb"]])
def test_tls_without_ingress_fails_at_render(selection: list[str]) -> None:
    """The chart refuses what the control plane would refuse at startup, with the same fix."""
    proc = run_helm("template", RELEASE, "--namespace", NAMESPACE, values={"plugins": selection}, check=False)
    assert proc.returncode != 0
    assert "tls needs ingress" in proc.stderr and "add ingress to plugins" in proc.stderr
