"""The chart and samples/ingress.yaml agree on Service names (``prometheus``, ``zipkin``: the original
project's), and the chart's IngressClass becomes the default class only when the cluster has none
(``gateway.ingressClass.default: auto``, a helm ``lookup`` checked against the project's real-protocol
API server with ``helm template --dry-run=server``)."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helm.chart import CHART, NAMESPACE, RELEASE, find, helm_path, one, render

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
DEFAULT = "ingressclass.kubernetes.io/is-default-class"


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _backends(ingress: dict[str, Any]) -> set[tuple[str, int]]:
    return {(p["backend"]["service"]["name"], p["backend"]["service"]["port"]["number"])
            for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]}


def test_sample_ingress_backends_exist_after_helm_install_in_the_same_namespace() -> None:
    """Every backend of samples/ingress.yaml is a Service of samples/bookinfo.yaml or of the chart (with
    that port), so the sample works after ``helm install`` into its namespace."""
    (ingress,) = [d for d in _docs(SAMPLES / "ingress.yaml") if d["kind"] == "Ingress"]
    services = {(s["metadata"]["name"], p["port"]) for s in [*_docs(SAMPLES / "bookinfo.yaml"), *render({})]
                if s["kind"] == "Service" for p in s["spec"]["ports"]}
    assert _backends(ingress) <= services, _backends(ingress) - services
    assert {("prometheus", 9090), ("zipkin", 9411)} <= _backends(ingress)
    # the chart's Services select its own Prometheus and Zipkin pods
    objects = render({})
    for svc, component in (("prometheus", "prometheus"), ("zipkin", "zipkin")):
        selector = one(objects, "Service", svc)["spec"]["selector"]
        pod_labels = one(objects, "Deployment", f"{RELEASE}-{component}")["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= pod_labels.items()


def test_service_names_are_values() -> None:
    objects = render({"prometheus": {"service": {"name": ""}, "ingress": {"enabled": True}}, "zipkin": {"service": {"name": "traces"}}})
    assert find(objects, "Service", f"{RELEASE}-prometheus") and find(objects, "Service", "traces")
    assert not find(objects, "Service", "prometheus") and not find(objects, "Service", "zipkin")
    # the Prometheus Ingress follows the Service name
    (ing,) = find(objects, "Ingress", f"{RELEASE}-prometheus")
    assert ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] == f"{RELEASE}-prometheus"


@pytest.mark.parametrize(("value", "marked"), [("auto", True), (True, True), (False, False)])
def test_ingress_class_default_without_a_cluster(value: object, marked: bool) -> None:
    ic = one(render({"gateway": {"ingressClass": {"default": value}}}), "IngressClass", "traffic")
    assert ((ic["metadata"].get("annotations") or {}).get(DEFAULT) == "true") == marked


def test_ingress_class_default_rejects_other_values() -> None:
    proc = subprocess.run([helm_path(), "template", RELEASE, str(CHART), "--set", "gateway.ingressClass.default=yes"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "gateway.ingressClass.default" in proc.stderr, proc.stderr


@pytest.fixture
def cluster() -> Iterator[tuple[Any, Path]]:
    """The project's API server (real Kubernetes protocol) and a kubeconfig for it."""
    from trafficmgr.apiserver import APIServer
    from trafficmgr.apiserver.access import new_token

    api = APIServer(port=0, token=new_token()).start()
    with tempfile.TemporaryDirectory() as tmp:
        kubeconfig = Path(tmp) / "kubeconfig"
        api.write_kubeconfig(kubeconfig)
        try:
            yield api, kubeconfig
        finally:
            api.stop()


def _ingress_class(name: str, default: bool | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if default is not None:
        meta["annotations"] = {DEFAULT: "true" if default else "false"}
    return {"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass", "metadata": meta, "spec": {"controller": f"example.com/{name}"}}


def _rendered_default(kubeconfig: Path, *set_args: str) -> bool:
    proc = subprocess.run([helm_path(), "template", RELEASE, str(CHART), "--dry-run=server", "--kubeconfig", str(kubeconfig),
                           "--namespace", NAMESPACE, *set_args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (ic,) = [d for d in yaml.safe_load_all(proc.stdout) if d and d["kind"] == "IngressClass"]
    return (ic["metadata"].get("annotations") or {}).get(DEFAULT) == "true"


@pytest.mark.parametrize(("existing", "marked"), [
    ([], True),                                                    # a cluster without any IngressClass
    ([("nginx", False), ("haproxy", None)], True),                 # classes, none default
    ([("nginx", True)], False),                                    # the cluster has a default: not a second one
    ([("traffic", True)], True),                                   # an upgrade: our own class stays default
])
def test_auto_defers_to_the_clusters_default_class(cluster: tuple[Any, Path], existing: list[tuple[str, bool | None]],
                                                  marked: bool) -> None:
    api, kubeconfig = cluster
    for name, default in existing:
        api.store.create(_ingress_class(name, default))
    assert _rendered_default(kubeconfig) == marked
    # true forces it (the newest default wins in Kubernetes 1.25+), false never marks it
    assert _rendered_default(kubeconfig, "--set", "gateway.ingressClass.default=true")
    assert not _rendered_default(kubeconfig, "--set", "gateway.ingressClass.default=false")


def _notes(kubeconfig: Path, namespace: str) -> str:
    """The NOTES of ``helm install --dry-run=server`` (kinds the project's API server does not serve, RBAC,
    admission policies and PodDisruptionBudgets, switched off: they do not change the notes checked here)."""
    proc = subprocess.run([helm_path(), "install", RELEASE, str(CHART), "--dry-run=server", "--kubeconfig", str(kubeconfig),
                           "--namespace", namespace, "--set", "rbac.create=false", "--set", "agentPodPolicy.enabled=false",
                           "--set", "networkPolicy.enabled=false", "--set", "controlPlane.podDisruptionBudget.enabled=false"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout[proc.stdout.index("NOTES:"):]


def test_notes_say_whether_the_class_is_default_and_where_the_sample_works(cluster: tuple[Any, Path]) -> None:
    api, kubeconfig = cluster
    notes = _notes(kubeconfig, "default")
    assert '"traffic" is the default IngressClass' in notes and "cannot reach" not in notes, notes
    api.store.create(_ingress_class("nginx", True))
    notes = _notes(kubeconfig, "shop")
    assert "\"traffic\" is NOT the default IngressClass: the cluster's default is nginx" in notes, notes
    assert "this release's are in shop" in notes and "prometheus.ingress.enabled=true" in notes, notes
