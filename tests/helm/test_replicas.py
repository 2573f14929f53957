"""The chart's control plane with several replicas (issue 20): 2 by default, a PodDisruptionBudget and a
topology spread over nodes, POD_NAME/POD_NAMESPACE, the Lease flags, and a Role for the Lease that is
limited to the release namespace (and to the Lease's name where Kubernetes allows it)."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from tests.helm.chart import NAMESPACE, RELEASE, container, find, one, pod_spec, render, run_helm
from trafficmgr.cli.serve import add_serve_arguments
from trafficmgr.core.serve import lease_options

SELECTOR = {"app.kubernetes.io/name": "trafficmgr", "app.kubernetes.io/instance": RELEASE,
            "app.kubernetes.io/component": "control-plane"}


def _control_plane(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objects, "Deployment", RELEASE)


def _serve_args(objects: list[dict[str, Any]]) -> list[str]:
    args = container(_control_plane(objects), "control-plane")["args"]
    assert args[0] == "serve"
    return list(args[1:])


def test_two_replicas_spread_over_nodes_with_a_disruption_budget() -> None:
    objects = render({})
    deployment = _control_plane(objects)
    assert deployment["spec"]["replicas"] == 2
    spec = pod_spec(deployment)
    assert deployment["spec"]["template"]["metadata"]["labels"].items() >= SELECTOR.items()
    assert spec["topologySpreadConstraints"] == [{
        "maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway",
        "labelSelector": {"matchLabels": SELECTOR}}]
    pdb = one(objects, "PodDisruptionBudget", RELEASE)
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"] == {"minAvailable": 1, "selector": {"matchLabels": SELECTOR}}
    env = {e["name"]: e.get("valueFrom") for e in container(deployment, "control-plane")["env"]}
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}


def test_one_replica_has_no_budget_and_no_spread() -> None:
    objects = render({"controlPlane": {"replicas": 1}})
    assert _control_plane(objects)["spec"]["replicas"] == 1
    assert "topologySpreadConstraints" not in pod_spec(_control_plane(objects))
    assert not find(objects, "PodDisruptionBudget", RELEASE)
    assert "--lease-name=trafficmgr" in _serve_args(objects), "one replica still elects itself (a second may come)"


def test_lease_flags_are_what_serve_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rendered serve arguments, parsed by serve's own parser and checked by serve's own code."""
    args = _serve_args(render({"controlPlane": {"leaderElection": {"leaseDuration": 30}}}))
    assert [a for a in args if a.startswith("--lease")] == [
        f"--lease-name={RELEASE}", f"--lease-namespace={NAMESPACE}", "--lease-duration=30"]
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    parsed, _ = parser.parse_known_args(args)
    monkeypatch.setenv("POD_NAME", "trafficmgr-5d8f-abcde")
    lease = lease_options(parsed)
    assert lease is not None
    assert (lease.name, lease.namespace, lease.identity, lease.timing.duration) == (
        RELEASE, NAMESPACE, "trafficmgr-5d8f-abcde", 30)
    assert lease.timing.retry_period + lease.timing.renew_deadline < 30


def test_lease_role_only_in_the_release_namespace_and_only_for_its_name() -> None:
    objects = render({})
    role = one(objects, "Role", f"{RELEASE}-leader-election")
    assert role["metadata"]["namespace"] == NAMESPACE
    # get/update on the one Lease; create cannot be limited by name (Kubernetes does not know it yet)
    assert role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": [RELEASE], "verbs": ["get", "update"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
    ]
    binding = one(objects, "RoleBinding", f"{RELEASE}-leader-election")
    assert binding["metadata"]["namespace"] == NAMESPACE
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": f"{RELEASE}-leader-election"}
    sa = pod_spec(_control_plane(objects))["serviceAccountName"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]
    for cluster_role in find(objects, "ClusterRole"):  # nothing cluster-wide for Leases
        assert not [r for r in cluster_role["rules"] if "leases" in r.get("resources", [])], cluster_role["metadata"]["name"]
    assert not find(render({"rbac": {"create": False}}), "Role", f"{RELEASE}-leader-election")


def test_no_leader_election_only_with_one_replica() -> None:
    one_replica = render({"controlPlane": {"replicas": 1, "leaderElection": {"enabled": False}}})
    args = _serve_args(one_replica)
    assert "--no-leader-election" in args and not [a for a in args if a.startswith("--lease")]
    assert not find(one_replica, "Role", f"{RELEASE}-leader-election")
    proc = run_helm("template", RELEASE, values={"controlPlane": {"leaderElection": {"enabled": False}}}, check=False)
    assert proc.returncode != 0
    assert "leaderElection.enabled=false needs controlPlane.replicas 1" in proc.stderr


@pytest.mark.parametrize(("values", "message"), [
    ({"controlPlane": {"replicas": 3, "podDisruptionBudget": {"minAvailable": 3}}}, "minAvailable must be less than"),
    ({"controlPlane": {"leaderElection": {"leaseDuration": 2}}}, "leaseDuration"),
    ({"controlPlane": {"topologySpread": {"maxSkew": 0}}}, "maxSkew"),
])
def test_bad_values_fail_at_render(values: dict[str, Any], message: str) -> None:
    proc = run_helm("template", RELEASE, values=values, check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
