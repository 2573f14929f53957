"""Helpers for the Helm chart tests: find helm, render the chart with values, pick objects."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

from trafficmgr.testing.prereq import missing

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "trafficmgr"
CI_HELM = "/opt/trafficmgr-ci/bin/helm"  # installed by .ci/install.d/helm.sh
RELEASE = "trafficmgr"
NAMESPACE = "traffic-system"
BUILTIN_PLUGINS = ["lb", "fault", "tracing", "circuit_breaker", "ingress", "tls", "ratelimit", "mtls", "gateway_api", "accesslog"]


def need(tool: str, found: str | None) -> str:
    """The tool's path; a missing tool fails under CI and skips elsewhere."""
    if found:
        return found
    missing(f"{tool} not found (bash .ci/install.d/helm.sh installs it)")


def helm_path() -> str:
    env = os.environ.get("TRAFFICMGR_HELM")
    for candidate in (env, CI_HELM, shutil.which("helm")):
        if candidate and os.access(candidate, os.X_OK):
            return need("helm", candidate)
    return need("helm", None)


def run_helm(*args: str, values: dict[str, Any] | None = None, check: bool = True, chart: Path = CHART) -> subprocess.CompletedProcess[str]:
    """Run ``helm <args> <chart> [-f values.yaml]``."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(values or {}, f)
        f.flush()
        proc = subprocess.run([helm_path(), *args, str(chart), "-f", f.name], capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stderr}")
    return proc


def render(values: dict[str, Any] | None = None, kube_version: str = "1.32.0", chart: Path = CHART) -> list[dict[str, Any]]:
    """Every object ``helm template`` renders for these values."""
    proc = run_helm("template", RELEASE, "--namespace", NAMESPACE, "--kube-version", kube_version, values=values, chart=chart)
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}: {[(o['kind'], o['metadata']['name']) for o in objects]}"
    return found[0]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]


def container(obj: dict[str, Any], name: str, init: bool = False) -> dict[str, Any]:
    key = "initContainers" if init else "containers"
    (c,) = [c for c in pod_spec(obj).get(key, []) if c["name"] == name]
    return c


def prometheus_config(objects: list[dict[str, Any]]) -> dict[str, Any]:
    cm = one(objects, "ConfigMap", f"{RELEASE}-prometheus")
    return yaml.safe_load(cm["data"]["prometheus.yml"])
