"""The chart's admission policy for the agent's pod writes (issue 16 item 3) and its NetworkPolicies.

The ValidatingAdmissionPolicy's CEL is evaluated with cel-python (``celpy``) the way the API server
evaluates it: matchConditions decide whether the policy applies, then every validation must be true (an
evaluation error denies: failurePolicy Fail). The NetworkPolicies are evaluated by a small model of the
ingress rules (pod and namespace selectors, ipBlock, ports) to check who reaches which port.
"""

from __future__ import annotations

import copy
import ipaddress
from pathlib import Path
from typing import Any

import pytest

from tests.helm.chart import CHART, NAMESPACE, RELEASE, find, one, render
from trafficmgr.testing.prereq import missing

AGENT_USER = f"system:serviceaccount:{NAMESPACE}:{RELEASE}-agent"
NODE_KEY = "authentication.kubernetes.io/node-name"
POLICY = f"{RELEASE}-agent-pod-writes"


# -- ValidatingAdmissionPolicy: structure ---------------------------------------------------------------


def test_agent_pod_policy_structure() -> None:
    objects = render({})
    vap = one(objects, "ValidatingAdmissionPolicy", POLICY)
    assert vap["apiVersion"] == "admissionregistration.k8s.io/v1"
    spec = vap["spec"]
    assert spec["failurePolicy"] == "Fail"
    assert spec["matchConstraints"]["resourceRules"] == [{
        "apiGroups": [""], "apiVersions": ["*"], "operations": ["CREATE", "UPDATE", "DELETE", "CONNECT"], "resources": ["pods", "pods/*"]}]
    assert spec["matchConditions"] == [{"name": "is-the-trafficmgr-agent", "expression": f'request.userInfo.username == "{AGENT_USER}"'}]
    assert all(v["reason"] == "Forbidden" and v["message"] for v in spec["validations"])
    text = str(spec)
    assert NODE_KEY in text and "traffic.envoy.proxy" in text
    binding = one(objects, "ValidatingAdmissionPolicyBinding", POLICY)
    assert binding["spec"] == {"policyName": POLICY, "validationActions": ["Deny"]}
    # The agent's ServiceAccount (the policy's user) is the one the DaemonSet runs as.
    ds = one(objects, "DaemonSet", f"{RELEASE}-agent")
    assert AGENT_USER.endswith(":" + ds["spec"]["template"]["spec"]["serviceAccountName"])
    # RBAC stays pods get/list/watch/patch: the policy narrows patch, RBAC cannot.
    role = one(objects, "ClusterRole", f"{RELEASE}-agent")
    assert [r["verbs"] for r in role["rules"] if r["resources"] == ["pods"]] == [["get", "list", "watch", "patch"]]
    for values in ({"agent": {"enabled": False}}, {"agentPodPolicy": {"enabled": False}}):
        rendered = render(values)
        assert not find(rendered, "ValidatingAdmissionPolicy") and not find(rendered, "ValidatingAdmissionPolicyBinding")


def test_chart_requires_kubernetes_1_30() -> None:
    """admissionregistration.k8s.io/v1 ValidatingAdmissionPolicy and the token's node claim are 1.30+."""
    import yaml

    assert yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"] == ">=1.30.0-0"


# -- ValidatingAdmissionPolicy: CEL evaluated --------------------------------------------------------------


def _celpy() -> Any:
    try:
        import celpy
    except ImportError:
        missing("cel-python (celpy) is not installed: pip install cel-python==0.5.0")
    return celpy


class Policy:
    """Evaluates the rendered policy for one admission request (as the API server would)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.celpy = _celpy()
        self.env = self.celpy.Environment()
        self.spec = spec

    def _eval(self, expression: str, activation: dict[str, Any]) -> Any:
        return self.env.program(self.env.compile(expression)).evaluate(activation)

    def admits(self, request: dict[str, Any], obj: dict[str, Any] | None, old: dict[str, Any] | None) -> tuple[bool, str]:
        """``(allowed, message of the first failed validation)``."""
        from celpy import celtypes

        base = {"request": self.celpy.json_to_cel(request), "object": self.celpy.json_to_cel(obj),
                "oldObject": self.celpy.json_to_cel(old)}
        if not all(self._eval(c["expression"], base) for c in self.spec["matchConditions"]):
            return True, "policy does not apply"
        variables = {}
        for v in self.spec.get("variables", []):
            try:
                variables[celtypes.StringType(v["name"])] = self._eval(v["expression"], {**base, "variables": celtypes.MapType(variables)})
            except Exception:  # noqa: BLE001, S112 - lazily evaluated in Kubernetes: only an error if used
                continue
        activation = {**base, "variables": celtypes.MapType(variables)}
        for validation in self.spec["validations"]:
            try:
                ok = bool(self._eval(validation["expression"], activation))
            except Exception as exc:  # noqa: BLE001 - an evaluation error is a denial (failurePolicy Fail)
                return False, f"error: {exc}"
            if not ok:
                return False, validation["message"]
        return True, ""


@pytest.fixture(scope="module")
def policy() -> Policy:
    return Policy(one(render({}), "ValidatingAdmissionPolicy", POLICY)["spec"])


POD = {
    "apiVersion": "v1", "kind": "Pod",
    "metadata": {"name": "reviews-v1-abc", "namespace": "shop", "labels": {"app": "reviews", "traffic.envoy.enabled": "true"},
                 "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-12-01"},
                 "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "reviews-v1", "uid": "u1", "controller": True}]},
    "spec": {"nodeName": "node-a", "serviceAccountName": "reviews", "containers": [{"name": "app", "image": "reviews:1"}]},
}


def _request(operation: str = "UPDATE", user: str = AGENT_USER, node: str | None = "node-a", sub: str | None = None) -> dict[str, Any]:
    user_info: dict[str, Any] = {"username": user, "groups": ["system:serviceaccounts", "system:authenticated"]}
    if node is not None:
        user_info["extra"] = {NODE_KEY: [node], "authentication.kubernetes.io/pod-name": ["trafficmgr-agent-x1"]}
    request: dict[str, Any] = {"operation": operation, "userInfo": user_info, "namespace": "shop", "name": "reviews-v1-abc"}
    if sub:
        request["subResource"] = sub
    return request


def _changed(change: Any) -> dict[str, Any]:
    pod = copy.deepcopy(POD)
    change(pod)
    return pod


def _annotate(value: str, key: str = "traffic.envoy.proxy") -> Any:
    return lambda p: p["metadata"]["annotations"].__setitem__(key, value)


ALLOWED = {
    "annotate on its node": (_request(), _changed(_annotate("4f2a9c1e0b77"))),
    "clear the annotation": (_request(), _changed(_annotate(""))),
    "a pod without annotations": (_request(), {**POD, "metadata": {**POD["metadata"], "annotations": {"traffic.envoy.proxy": "x"}}}),
}
DENIED = {
    "another node's pod": (_request(node="node-b"), _changed(_annotate("4f2a9c1e0b77")), "its own node"),
    "no node in the token": (_request(node=None), _changed(_annotate("4f2a9c1e0b77")), "its own node"),
    "change a label": (_request(), _changed(lambda p: p["metadata"]["labels"].__setitem__("app", "ratings")), "labels"),
    "add a gateway label": (_request(), _changed(lambda p: p["metadata"]["labels"].__setitem__("app.kubernetes.io/component", "gateway")), "labels"),
    "remove a label": (_request(), _changed(lambda p: p["metadata"]["labels"].pop("traffic.envoy.enabled")), "labels"),
    "change another annotation": (_request(), _changed(_annotate("x", "kubectl.kubernetes.io/restartedAt")), "only the"),
    "add another annotation": (_request(), _changed(_annotate("true", "sidecar.istio.io/inject")), "only the"),
    "remove another annotation": (_request(), _changed(lambda p: p["metadata"]["annotations"].pop("kubectl.kubernetes.io/restartedAt")), "only the"),
    "change the image": (_request(), _changed(lambda p: p["spec"]["containers"][0].__setitem__("image", "evil:1")), "spec"),
    "add a finalizer": (_request(), _changed(lambda p: p["metadata"].__setitem__("finalizers", ["x/y"])), "finalizers"),
    "drop the owner": (_request(), _changed(lambda p: p["metadata"].pop("ownerReferences")), "owner references"),
    "claim the gateway role for Prometheus": (_request(), _changed(_annotate("ingress")), "ingress gateway"),
    "update a subresource": (_request(sub="status"), _changed(_annotate("4f2a9c1e0b77")), "no create, delete or subresource"),
}


@pytest.mark.parametrize("case", ALLOWED)
def test_agent_may_set_its_annotation_on_its_node(policy: Policy, case: str) -> None:
    request, new = ALLOWED[case]
    old = POD if case != "a pod without annotations" else {**POD, "metadata": {k: v for k, v in POD["metadata"].items() if k != "annotations"}}
    assert policy.admits(request, new, old) == (True, "")


@pytest.mark.parametrize("case", DENIED)
def test_agent_may_not_do_anything_else(policy: Policy, case: str) -> None:
    request, new, message = DENIED[case]
    allowed, why = policy.admits(request, new, POD)
    assert not allowed and message in why, why
    # The same request by any other user is not this policy's business.
    other = {**request, "userInfo": {**request["userInfo"], "username": "system:serviceaccount:shop:deployer"}}
    assert policy.admits(other, new, POD) == (True, "policy does not apply")


@pytest.mark.parametrize(("operation", "new", "old"), [("CREATE", POD, None), ("DELETE", None, POD), ("CONNECT", None, None)])
def test_agent_may_not_create_delete_or_connect(policy: Policy, operation: str, new: Any, old: Any) -> None:
    allowed, why = policy.admits(_request(operation), new, old)
    assert not allowed and "no create, delete or subresource" in why


# -- NetworkPolicies ---------------------------------------------------------------------------------------


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # the chart uses matchLabels only
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def reaches(policies: list[dict[str, Any]], target: dict[str, str], port: int, source: dict[str, Any]) -> bool:
    """Can ``source`` ({labels, namespace, ns_labels, ip}) open a TCP connection to ``port`` of a pod in the
    release namespace with labels ``target``? (NetworkPolicy ingress semantics; pods no policy selects are open.)"""
    selecting = [p for p in policies if _matches(p["spec"]["podSelector"], target) and "Ingress" in p["spec"]["policyTypes"]]
    if not selecting:
        return True
    for pol in selecting:
        for rule in pol["spec"].get("ingress") or []:
            if rule.get("ports") and not any(p["port"] == port and p.get("protocol", "TCP") == "TCP" for p in rule["ports"]):
                continue
            peers = rule.get("from")
            if not peers:
                return True
            for peer in peers:
                if "ipBlock" in peer:
                    if source.get("ip") and ipaddress.ip_address(source["ip"]) in ipaddress.ip_network(peer["ipBlock"]["cidr"]):
                        return True
                    continue
                if source.get("labels") is None:
                    continue  # not a pod: only ipBlock can match it
                ns_ok = (_matches(peer["namespaceSelector"], source["ns_labels"]) if "namespaceSelector" in peer
                         else source["namespace"] == NAMESPACE)
                if ns_ok and _matches(peer.get("podSelector", {}), source["labels"]):
                    return True
    return False


def _component(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "trafficmgr", "app.kubernetes.io/instance": RELEASE, "app.kubernetes.io/component": name}


def _pod(namespace: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"namespace": namespace, "ns_labels": {"kubernetes.io/metadata.name": namespace}, "labels": labels, "ip": "10.1.2.3"}


APP = _pod("shop", {"app": "reviews"})
PROM = _pod(NAMESPACE, _component("prometheus"))
GATEWAY = _pod(NAMESPACE, _component("gateway"))
OUTSIDE = {"labels": None, "ip": "203.0.113.9"}
NODE = {"labels": None, "ip": "10.250.3.4"}


def test_network_policies_default() -> None:
    policies = find(render({}), "NetworkPolicy")
    assert {p["metadata"]["name"] for p in policies} == {RELEASE, *(f"{RELEASE}-{c}" for c in ("gateway", "agent", "prometheus", "zipkin"))}
    cp, gw, agent, zipkin = _component("control-plane"), _component("gateway"), _component("agent"), _component("zipkin")
    # xDS: from any pod (sidecars run in application pods) and the gateway; never from outside the pod network.
    assert reaches(policies, cp, 18000, APP) and reaches(policies, cp, 18000, GATEWAY)
    assert not reaches(policies, cp, 18000, OUTSIDE)
    # Metrics: only the bundled Prometheus; the admin port is on loopback and has no rule.
    assert reaches(policies, cp, 18090, PROM) and not reaches(policies, cp, 18090, APP)
    assert not reaches(policies, cp, 18080, APP) and not reaches(policies, cp, 18080, PROM)
    # Gateway: its listener from anywhere, its stats from Prometheus only, its admin from nobody.
    assert reaches(policies, gw, 10000, OUTSIDE) and reaches(policies, gw, 10000, APP)
    assert reaches(policies, gw, 8900, PROM) and not reaches(policies, gw, 8900, APP) and not reaches(policies, gw, 15000, APP)
    # ... and from the control plane (the dashboard's numbers), which reaches nothing else of the gateway.
    CP = _pod(NAMESPACE, cp)
    assert reaches(policies, gw, 8900, CP) and not reaches(policies, gw, 15000, CP)
    # Agent: no pod at all (kubelet probes come from the node, which NetworkPolicy exempts).
    assert not reaches(policies, agent, 18081, APP) and not reaches(policies, agent, 18081, PROM)
    assert not reaches(policies, _component("prometheus"), 9090, APP)
    assert reaches(policies, zipkin, 9411, APP) and not reaches(policies, zipkin, 9411, OUTSIDE)


def test_network_policies_follow_the_values() -> None:
    watched = find(render({"controlPlane": {"watchNamespace": "shop"}}), "NetworkPolicy")
    cp = _component("control-plane")
    assert reaches(watched, cp, 18000, APP) and not reaches(watched, cp, 18000, _pod("other", {"app": "x"}))
    assert reaches(watched, cp, 18000, GATEWAY)
    extra = find(render({"networkPolicy": {"nodeCIDRs": ["10.250.0.0/16"],
                                           "metricsFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
                                           "prometheusFrom": [{"podSelector": {"matchLabels": {"app": "grafana"}}}]},
                         "prometheus": {"ingress": {"enabled": True}}}), "NetworkPolicy")
    monitoring = _pod("monitoring", {"app": "prometheus"})
    assert reaches(extra, cp, 18090, monitoring) and reaches(extra, cp, 18090, NODE) and not reaches(extra, cp, 18090, APP)
    assert reaches(extra, _component("agent"), 18081, NODE) and not reaches(extra, _component("agent"), 18081, APP)
    prometheus = _component("prometheus")
    assert reaches(extra, prometheus, 9090, GATEWAY) and reaches(extra, prometheus, 9090, _pod(NAMESPACE, {"app": "grafana"}))
    # Without Prometheus and without metricsFrom the metrics rule disappears instead of opening up.
    bare = find(render({"prometheus": {"enabled": False}}), "NetworkPolicy")
    assert not reaches(bare, cp, 18090, APP) and not reaches(bare, _component("gateway"), 8900, APP)
    assert reaches(bare, _component("gateway"), 8900, _pod(NAMESPACE, cp))  # the dashboard reads it without Prometheus too
    assert not find(render({"networkPolicy": {"enabled": False}}), "NetworkPolicy")


def test_every_network_policy_rule_says_why_it_is_safe() -> None:
    lines = (CHART / "templates" / "networkpolicy.yaml").read_text().splitlines()
    rules = [i for i, line in enumerate(lines) if line.strip() == "- ports:"]
    assert rules
    for i in rules:
        j = i - 1
        while lines[j].strip().startswith("#") and not lines[j].strip().startswith("# Safe"):
            j -= 1
        assert lines[j].strip().startswith("# Safe"), f"networkpolicy.yaml line {i + 1}: a rule without a '# Safe:' comment"


def test_policy_model_can_deny() -> None:
    """The evaluator above is not vacuous: a policy with no rules denies every pod source."""
    pol = {"spec": {"podSelector": {"matchLabels": {"a": "b"}}, "policyTypes": ["Ingress"], "ingress": []}}
    assert not reaches([pol], {"a": "b"}, 80, APP) and reaches([pol], {"a": "c"}, 80, APP)
    assert Path(CHART / "templates" / "networkpolicy.yaml").exists()
