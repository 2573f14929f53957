"""Which pods may get a sidecar (:mod:`trafficmgr.core.agent.eligibility`): the pure checks of the raw Pod.
The agent's reaction to a refusal (no sidecar, an Event) is in ``test_capture_refusals.py``."""

from __future__ import annotations

from typing import Any

import pytest

from trafficmgr.core.agent.eligibility import refusal


def pod(spec: dict[str, Any] | None = None, **container_sc: Any) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "app", "image": "app"}
    if container_sc:
        container["securityContext"] = container_sc
    return {"metadata": {"name": "p", "namespace": "default"},
            "spec": {"containers": [container], **(spec or {})}}


def test_a_plain_pod_is_allowed() -> None:
    assert refusal(pod(), 1337) is None
    assert refusal(pod({"hostNetwork": False}, runAsUser=1000, runAsGroup=3000), 1337) is None
    assert refusal(pod({"securityContext": {"runAsUser": 1000, "fsGroup": 2000, "supplementalGroups": [4000]}}), 1337) is None
    assert refusal({}, 1337) is None  # nothing to object to (the agent never sees such a pod)


@pytest.mark.parametrize("field, what", [("runAsUser", "uid"), ("runAsGroup", "gid")])
def test_a_container_running_as_the_proxy_uid_or_gid_is_refused(field: str, what: str) -> None:
    reason = refusal(pod(**{field: 1337}), 1337)
    assert reason is not None
    assert f"container app runs as {what} 1337 (securityContext.{field})" in reason
    assert "bypass the sidecar" in reason and "--proxy-uid" in reason
    # The same ids are fine for a proxy running as another uid.
    assert refusal(pod(**{field: 1337}), 2000) is None


def test_the_pod_securitycontext_applies_to_containers_without_their_own() -> None:
    spec = {"securityContext": {"runAsUser": 1337}}
    reason = refusal(pod(spec), 1337)
    assert reason is not None and "(the pod's securityContext.runAsUser)" in reason
    # A container that sets its own uid is not affected by the pod's.
    assert refusal(pod(spec, runAsUser=1000), 1337) is None


@pytest.mark.parametrize("kind", ["initContainers", "ephemeralContainers"])
def test_every_container_of_the_pod_counts(kind: str) -> None:
    p = pod()
    p["spec"][kind] = [{"name": "helper", "securityContext": {"runAsGroup": 1337}}]
    reason = refusal(p, 1337)
    assert reason is not None and "container helper runs as gid 1337" in reason


def test_group_membership_is_refused_too() -> None:
    """A member of the proxy's group can run a set-gid program with that primary gid (see the module)."""
    groups = refusal(pod({"securityContext": {"supplementalGroups": [5, 1337]}}), 1337)
    assert groups is not None and "supplementalGroups include 1337" in groups and "set-gid" in groups
    fs = refusal(pod({"securityContext": {"fsGroup": 1337}}), 1337)
    assert fs is not None and "fsGroup is 1337" in fs


def test_host_network_is_refused() -> None:
    reason = refusal(pod({"hostNetwork": True}), 1337)
    assert reason is not None and "hostNetwork: true" in reason and "the whole node's traffic" in reason


def test_every_problem_is_named() -> None:
    p = pod({"hostNetwork": True, "securityContext": {"fsGroup": 1337}}, runAsUser=1337)
    reason = refusal(p, 1337)
    assert reason is not None
    assert [part.split(" ")[0:2] for part in reason.split("; ")] == [["the", "pod"], ["container", "app"], ["the", "pod's"]]


def test_malformed_ids_are_not_taken_for_the_proxy_uid() -> None:
    # The API server rejects these; the check must not crash on them or treat True as uid 1.
    assert refusal(pod(runAsUser="1337"), 1337) is None
    assert refusal(pod(runAsUser=True), 1) is None
    assert refusal({"spec": {"containers": [None], "securityContext": "x"}}, 1337) is None
