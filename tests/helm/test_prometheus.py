"""The bundled Prometheus' config: promtool accepts it, and its relabeling picks exactly the Envoys
(pods annotated traffic.envoy.proxy, on their stats-only port: Envoy admin is on 127.0.0.1) and the control
plane's /metrics (on its metrics port: /debug/* is on loopback).

Debian's promtool is built without Kubernetes service discovery, so it checks a copy whose
``kubernetes_sd_configs`` are swapped for ``file_sd_configs`` (everything else, relabeling included, is
checked as rendered); which pods the relabeling keeps is checked by applying the rules below.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helm.chart import NAMESPACE, RELEASE, need, prometheus_config, render

COMBOS = {
    "defaults": {},
    "only-lb": {"plugins": ["lb"]},
    "other-ports": {"agent": {"adminPort": 15001, "statsPort": 9100}, "gateway": {"adminPort": 9901, "statsPort": 9102},
                    "controlPlane": {"adminPort": 9090, "metricsPort": 9091},
                    "prometheus": {"scrapeInterval": "30s"}},
}


def promtool_check(config: dict[str, Any], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    promtool = need("promtool", shutil.which("promtool"))
    targets = tmp_path / "targets.json"
    targets.write_text("[]")
    config = yaml.safe_load(yaml.safe_dump(config))
    for job in config["scrape_configs"]:
        sd = job.pop("kubernetes_sd_configs")
        assert all(s["role"] == "pod" for s in sd), sd
        job["file_sd_configs"] = [{"files": [str(targets)]}]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("combo", COMBOS)
def test_promtool_accepts_the_config(combo: str, tmp_path: Path) -> None:
    proc = promtool_check(prometheus_config(render(COMBOS[combo])), tmp_path)
    assert proc.returncode == 0 and "SUCCESS" in proc.stdout, proc.stdout + proc.stderr


def test_promtool_rejects_a_broken_relabel_regex(tmp_path: Path) -> None:
    """The check above can fail: a bad regex in the rendered config is an error."""
    config = prometheus_config(render({}))
    config["scrape_configs"][0]["relabel_configs"][0]["regex"] = "(ingress"
    assert promtool_check(config, tmp_path).returncode != 0


def relabel(rules: list[dict[str, Any]], labels: dict[str, str]) -> dict[str, str] | None:
    """Prometheus relabeling (keep, drop, replace) of one target: the labels left, or None if dropped."""
    labels = dict(labels)
    for rule in rules:
        action = rule.get("action", "replace")
        value = rule.get("separator", ";").join(labels.get(name, "") for name in rule.get("source_labels", []))
        match = re.fullmatch(rule.get("regex", "(.*)"), value)  # Prometheus anchors regexes
        if action == "keep" and not match:
            return None
        if action == "drop" and match:
            return None
        if action == "replace" and match:
            replacement = re.sub(r"\$\{(\d+)\}|\$(\d+)", lambda m, match=match: match.group(int(m.group(1) or m.group(2))) or "",
                                 rule.get("replacement", "$1"))
            labels[rule["target_label"]] = replacement
    return labels


def pod_target(name: str, namespace: str, address: str, port_name: str = "", annotations: dict[str, str] | None = None,
               labels: dict[str, str] | None = None, phase: str = "Running") -> dict[str, str]:
    """What kubernetes_sd role: pod gives for one container port of a pod."""
    out = {"__address__": address, "__meta_kubernetes_namespace": namespace, "__meta_kubernetes_pod_name": name,
           "__meta_kubernetes_pod_phase": phase, "__meta_kubernetes_pod_container_port_name": port_name}
    for k, v in (annotations or {}).items():
        out["__meta_kubernetes_pod_annotation_" + re.sub(r"[^a-zA-Z0-9_]", "_", k)] = v
    for k, v in (labels or {}).items():
        out["__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", k)] = v
    return out


def scraped(config: dict[str, Any], target: dict[str, str]) -> dict[str, str]:
    """job -> scraped address for every job that keeps the target."""
    out = {}
    for job in config["scrape_configs"]:
        result = relabel(job["relabel_configs"], target)
        if result is not None:
            out[job["job_name"]] = f"{result['__address__']}{job['metrics_path']}"
    return out


@pytest.mark.parametrize("combo", ["defaults", "other-ports"])
def test_relabeling_scrapes_envoys_and_the_control_plane(combo: str) -> None:
    values = COMBOS[combo]
    config = prometheus_config(render(values))
    sidecar_admin = values.get("agent", {}).get("statsPort", 8900)
    gw_admin = values.get("gateway", {}).get("statsPort", 8900)
    cp_admin = values.get("controlPlane", {}).get("metricsPort", 18090)
    ours = {"app.kubernetes.io/instance": RELEASE}

    # A sidecar pod: scraped once per pod (every container port maps to the Envoy admin port).
    sidecar = {"traffic.envoy.proxy": "4f2a9c"}
    assert scraped(config, pod_target("reviews-1", "default", "10.1.0.7:9080", "http", sidecar)) == {
        "envoy": f"10.1.0.7:{sidecar_admin}/stats/prometheus"}
    assert scraped(config, pod_target("reviews-1", "default", "10.1.0.7", "", sidecar)) == {
        "envoy": f"10.1.0.7:{sidecar_admin}/stats/prometheus"}
    # No sidecar, a removed sidecar (annotation emptied), a finished pod: not scraped.
    assert scraped(config, pod_target("web", "default", "10.1.0.8:80", "http")) == {}
    assert scraped(config, pod_target("web", "default", "10.1.0.8:80", "http", {"traffic.envoy.proxy": ""})) == {}
    assert scraped(config, pod_target("job", "default", "10.1.0.9:80", "http", sidecar, phase="Succeeded")) == {}
    # The gateway: its stats container port only.
    gw_labels = {**ours, "app.kubernetes.io/component": "gateway"}
    gateway = {"traffic.envoy.proxy": "ingress"}
    assert scraped(config, pod_target("gw", NAMESPACE, f"10.1.0.10:{gw_admin}", "http-stats", gateway, gw_labels)) == {
        "envoy-gateway": f"10.1.0.10:{gw_admin}/stats/prometheus"}
    assert scraped(config, pod_target("gw", NAMESPACE, "10.1.0.10:10000", "http-gateway", gateway, gw_labels)) == {}
    # The control plane: /metrics on its metrics port, not the xDS port; another release's is not ours.
    cp_labels = {**ours, "app.kubernetes.io/component": "control-plane"}
    assert scraped(config, pod_target("cp", NAMESPACE, f"10.1.0.11:{cp_admin}", "http-metrics", labels=cp_labels)) == {
        "trafficmgr": f"10.1.0.11:{cp_admin}/metrics"}
    assert scraped(config, pod_target("cp", NAMESPACE, "10.1.0.11:18000", "grpc-xds", labels=cp_labels)) == {}
    other = {"app.kubernetes.io/instance": "other", "app.kubernetes.io/component": "control-plane"}
    assert scraped(config, pod_target("cp2", NAMESPACE, f"10.1.0.12:{cp_admin}", "http-metrics", labels=other)) == {}


def test_gateway_and_control_plane_port_names_match_the_config() -> None:
    """The relabeling keys on container port names: the pods must really have them."""
    objects = render({})
    ports = {o["metadata"]["name"]: {p["name"] for c in o["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
             for o in objects if o["kind"] == "Deployment"}
    assert "http-metrics" in ports[RELEASE] and "http-stats" in ports[f"{RELEASE}-gateway"]
    assert not any("http-admin" in names for names in ports.values())  # admin endpoints are on loopback


def test_prometheus_is_optional() -> None:
    objects = render({"prometheus": {"enabled": False}})
    assert not [o for o in objects if "prometheus" in o["metadata"]["name"]]


@pytest.mark.parametrize("combo", ["defaults", "other-ports"])
def test_local_mode_uses_the_charts_config(combo: str) -> None:
    """``trafficmgr demo``'s Prometheus (trafficmgr/local/prometheus.py) scrapes with exactly the chart's
    configuration; only the discovery is swapped (see the next test)."""
    from trafficmgr.local import prometheus

    values = COMBOS[combo]
    expected = prometheus_config(render(values))
    assert prometheus.chart_config(RELEASE, NAMESPACE, stats_port=values.get("agent", {}).get("statsPort", 8900),
                                   scrape_interval=values.get("prometheus", {}).get("scrapeInterval", "15s")) == expected


def test_local_mode_config_and_discovery(tmp_path: Path) -> None:
    """The demo's config passes promtool, and the targets its discovery writes for the local gateway pod,
    a sidecar pod and the control plane go through the chart's relabelling as in a cluster."""
    from trafficmgr.local import prometheus

    config = prometheus.local_config(tmp_path / "sd", "default")
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    promtool = need("promtool", shutil.which("promtool"))
    proc = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    gateway = {"metadata": {"name": "traffic-ingress", "namespace": "default", "annotations": {"traffic.envoy.proxy": "ingress"},
                            "labels": {prometheus.INSTANCE_LABEL: prometheus.RELEASE, prometheus.COMPONENT_LABEL: "gateway"}},
               "spec": {"containers": [{"name": "envoy", "ports": [{"name": "http", "containerPort": 8080},
                                                                   {"name": "http-stats", "containerPort": 8900}]}]},
               "status": {"phase": "Running", "podIP": "127.1.0.1"}}
    sidecar = {"metadata": {"name": "client-1", "namespace": "shop", "annotations": {"traffic.envoy.proxy": "c1"}},
               "spec": {"containers": [{"name": "app", "ports": [{"containerPort": 9080}, {"containerPort": 9081}]}]},
               "status": {"phase": "Running", "podIP": "127.1.0.5"}}
    plain = {"metadata": {"name": "web", "namespace": "default"}, "spec": {"containers": [{"name": "app"}]},
             "status": {"phase": "Running", "podIP": "127.1.0.6"}}
    pending = {**sidecar, "metadata": {**sidecar["metadata"], "name": "new"}, "status": {"phase": "Pending"}}
    files = prometheus.discovery_files([gateway, sidecar, plain, pending, prometheus.control_plane_pod("default", 18080)])
    chart = {job["job_name"]: job for job in prometheus.chart_config()["scrape_configs"]}
    scraped = set()
    for job, groups in files.items():
        for group in groups:
            (address,) = group["targets"]
            kept = relabel(chart[job]["relabel_configs"], {"__address__": address, **group["labels"]})
            if kept is not None:
                scraped.add((job, kept["__address__"], kept["namespace"], kept["pod"]))
    assert scraped == {("envoy-gateway", "127.1.0.1:8900", "default", "traffic-ingress"),
                       ("envoy", "127.1.0.5:8900", "shop", "client-1"),
                       ("trafficmgr", "127.0.0.1:18080", "default", "trafficmgr")}
    # gateway and control-plane jobs look at the release namespace only, as their kubernetes_sd_configs do
    assert not [g for g in files["envoy-gateway"] if g["labels"]["__meta_kubernetes_namespace"] != "default"]
