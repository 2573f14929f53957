"""Local mode's Prometheus: the Helm chart's scrape configuration, fed by pod discovery from the demo.

``trafficmgr demo`` runs the ``prometheus`` binary (Debian package ``prometheus``) when it is installed,
behind the Service ``prometheus`` (port 9090) that ``samples/ingress.yaml`` routes ``/api/v1`` to.

The scrape configuration is the chart's (``helm/trafficmgr/templates/_prometheus.tpl``;
:func:`chart_config` renders the same document, and ``tests/helm/test_prometheus.py`` checks that they
are equal): jobs ``envoy`` (every sidecar's stats-only listener, ``<pod IP>:8900``), ``envoy-gateway``
and ``trafficmgr`` (the control plane's ``/metrics``), with the chart's relabelling unchanged.

Only the discovery differs. The chart uses ``kubernetes_sd_configs`` (role ``pod``), but Debian builds
Prometheus without Kubernetes service discovery, so local mode swaps each job's
``kubernetes_sd_configs`` for ``file_sd_configs`` and :class:`PodDiscovery` writes the files: for every
pod, the targets and ``__meta_kubernetes_*`` labels that Kubernetes discovery gives (one target per
container port, ``<pod IP>:<port>``; one ``<pod IP>`` target for a container without ports), rewritten
whenever a pod changes. The relabelling then keeps and rewrites exactly what it would in a cluster.
Processes of the demo that are not Pod objects (the control plane) are described as the chart's pod for
them would be (:func:`control_plane_pod`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: The release name and labels local mode gives its own components, as ``helm install trafficmgr`` would.
RELEASE = "trafficmgr"
INSTANCE_LABEL = "app.kubernetes.io/instance"
COMPONENT_LABEL = "app.kubernetes.io/component"
#: Prometheus' port (the chart's Service port) and the sidecars' stats-only port (chart ``agent.statsPort``).
PORT = 9090
STATS_PORT = 8900
#: Shorter than the chart's 15s so the demo's numbers follow a few requests quickly.
SCRAPE_INTERVAL = "5s"
RETENTION = "6h"
INSTALL_HINT = ("prometheus is not installed, so the sample Ingress's /api/v1 (Prometheus queries) answers 503; "
                "install it with 'apt install prometheus' and restart the demo")


def find_binary() -> str | None:
    """The ``prometheus`` executable on ``PATH``, or None."""
    return shutil.which("prometheus")


def chart_config(release: str = RELEASE, namespace: str = "default", stats_port: int = STATS_PORT,
                 scrape_interval: str = "15s") -> dict[str, Any]:
    """The chart's ``prometheus.yml`` (template ``trafficmgr.prometheusConfig``) for these values:
    ``.Release.Name``, ``.Release.Namespace``, ``.Values.agent.statsPort`` and
    ``.Values.prometheus.scrapeInterval``. Kept equal to the template by tests/helm/test_prometheus.py."""
    owned = {"role": "pod", "namespaces": {"names": [namespace]}}
    meta = [{"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"}]

    def component(name: str, port_name: str) -> dict[str, Any]:
        return {"source_labels": ["__meta_kubernetes_pod_label_app_kubernetes_io_instance",
                                  "__meta_kubernetes_pod_label_app_kubernetes_io_component",
                                  "__meta_kubernetes_pod_container_port_name"],
                "regex": f"{release};{name};{port_name}", "action": "keep"}

    return {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "scrape_configs": [
            {"job_name": "envoy", "metrics_path": "/stats/prometheus", "kubernetes_sd_configs": [{"role": "pod"}],
             "relabel_configs": [
                 {"source_labels": ["__meta_kubernetes_pod_annotation_traffic_envoy_proxy"], "regex": ".+", "action": "keep"},
                 {"source_labels": ["__meta_kubernetes_pod_annotation_traffic_envoy_proxy"], "regex": "ingress", "action": "drop"},
                 {"source_labels": ["__meta_kubernetes_pod_phase"], "regex": "Running", "action": "keep"},
                 {"source_labels": ["__address__"], "regex": r"([^:]+)(?::\d+)?", "replacement": f"${{1}}:{stats_port}",
                  "target_label": "__address__"},
                 *meta]},
            {"job_name": "envoy-gateway", "metrics_path": "/stats/prometheus", "kubernetes_sd_configs": [dict(owned)],
             "relabel_configs": [component("gateway", "http-stats"), *meta]},
            {"job_name": "trafficmgr", "metrics_path": "/metrics", "kubernetes_sd_configs": [dict(owned)],
             "relabel_configs": [component("control-plane", "http-metrics"), *meta]},
        ],
    }


def local_config(sd_dir: Path, namespace: str = "default", scrape_interval: str = SCRAPE_INTERVAL) -> dict[str, Any]:
    """:func:`chart_config` with each job's ``kubernetes_sd_configs`` replaced by a ``file_sd_configs``
    reading ``<sd_dir>/<job>.json``, which :class:`PodDiscovery` writes."""
    config = chart_config(namespace=namespace, scrape_interval=scrape_interval)
    for job in config["scrape_configs"]:
        job.pop("kubernetes_sd_configs")
        # refresh_interval: a backstop; Prometheus also watches the directory (inotify).
        job["file_sd_configs"] = [{"files": [str(sd_dir / f"{job['job_name']}.json")], "refresh_interval": "10s"}]
    return config


def _job_namespaces(job: dict[str, Any]) -> set[str] | None:
    """Namespaces a chart job's Kubernetes discovery looks at (None: all)."""
    names: set[str] = set()
    for sd in job.get("kubernetes_sd_configs", []):
        listed = (sd.get("namespaces") or {}).get("names")
        if not listed:
            return None
        names.update(listed)
    return names


def _label_name(name: str) -> str:
    """Prometheus' label name sanitising (``strutil.SanitizeLabelName``)."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def pod_targets(pod: dict[str, Any]) -> list[dict[str, Any]]:
    """The target groups Prometheus' Kubernetes discovery (role ``pod``) gives for ``pod``: none without a
    pod IP, else one per container port (``<IP>:<port>``) and one ``<IP>`` per container without ports."""
    meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
    ip = status.get("podIP")
    if not ip:
        return []
    ready = next((c.get("status") for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
    base = {
        "__meta_kubernetes_namespace": meta.get("namespace") or "default",
        "__meta_kubernetes_pod_name": meta.get("name", ""),
        "__meta_kubernetes_pod_ip": ip,
        "__meta_kubernetes_pod_phase": status.get("phase") or "",
        "__meta_kubernetes_pod_ready": {"True": "true", "False": "false"}.get(ready or "", "unknown"),
        "__meta_kubernetes_pod_node_name": spec.get("nodeName") or "",
        "__meta_kubernetes_pod_host_ip": status.get("hostIP") or "",
        "__meta_kubernetes_pod_uid": meta.get("uid") or "",
    }
    for key, value in (meta.get("labels") or {}).items():
        base[f"__meta_kubernetes_pod_label_{_label_name(key)}"] = str(value)
        base[f"__meta_kubernetes_pod_labelpresent_{_label_name(key)}"] = "true"
    for key, value in (meta.get("annotations") or {}).items():
        base[f"__meta_kubernetes_pod_annotation_{_label_name(key)}"] = str(value)
        base[f"__meta_kubernetes_pod_annotationpresent_{_label_name(key)}"] = "true"
    for ref in meta.get("ownerReferences") or []:
        if ref.get("controller"):
            base["__meta_kubernetes_pod_controller_kind"] = ref.get("kind", "")
            base["__meta_kubernetes_pod_controller_name"] = ref.get("name", "")
    out = []
    for init, key in ((False, "containers"), (True, "initContainers")):
        for c in spec.get(key) or []:
            labels = {**base, "__meta_kubernetes_pod_container_name": c.get("name", ""),
                      "__meta_kubernetes_pod_container_image": c.get("image", ""),
                      "__meta_kubernetes_pod_container_init": "true" if init else "false"}
            ports = c.get("ports") or []
            if not ports:
                out.append({"targets": [ip], "labels": labels})
            for p in ports:
                out.append({"targets": [f"{ip}:{p['containerPort']}"], "labels": {
                    **labels, "__meta_kubernetes_pod_container_port_name": p.get("name", ""),
                    "__meta_kubernetes_pod_container_port_number": str(p["containerPort"]),
                    "__meta_kubernetes_pod_container_port_protocol": p.get("protocol", "TCP")}})
    return out


def control_plane_pod(namespace: str, metrics_port: int, address: str = "127.0.0.1") -> dict[str, Any]:
    """The chart's control-plane pod as discovery would see it, for ``trafficmgr serve`` (a process of the
    demo, not a Pod object): its ``/metrics`` on ``address:metrics_port`` (the port named ``http-metrics``)."""
    return {"metadata": {"name": RELEASE, "namespace": namespace,
                         "labels": {INSTANCE_LABEL: RELEASE, COMPONENT_LABEL: "control-plane", "app.kubernetes.io/name": "trafficmgr"}},
            "spec": {"containers": [{"name": "control-plane", "image": "trafficmgr",
                                     "ports": [{"name": "http-metrics", "containerPort": metrics_port}]}]},
            "status": {"phase": "Running", "podIP": address, "hostIP": address,
                       "conditions": [{"type": "Ready", "status": "True"}]}}


def discovery_files(pods: list[dict[str, Any]], namespace: str = "default") -> dict[str, list[dict[str, Any]]]:
    """job name -> the file_sd target groups of ``pods`` for that job of :func:`chart_config` (release
    namespace ``namespace``): what its ``kubernetes_sd_configs`` would discover (its namespaces only)."""
    out = {}
    for job in chart_config(namespace=namespace)["scrape_configs"]:
        namespaces = _job_namespaces(job)
        out[job["job_name"]] = [tg for pod in pods
                                if namespaces is None or ((pod.get("metadata") or {}).get("namespace") or "default") in namespaces
                                for tg in pod_targets(pod)]
    return out


class PodDiscovery:
    """Keeps the file_sd files of :func:`local_config` (same ``sd_dir`` and ``namespace``) equal to the pods
    of ``store`` (plus ``extra_pods``): rewritten (atomically, by rename) within ``delay`` seconds of any Pod change.

    ``store`` is the demo's in-process API server store (``subscribe``/``list_raw``)."""

    def __init__(self, store: Any, sd_dir: Path, namespace: str = "default", extra_pods: list[dict[str, Any]] | None = None,
                 delay: float = 0.2) -> None:
        self.store, self.sd_dir, self.namespace = store, sd_dir, namespace
        self.extra_pods = extra_pods or []
        self.delay = delay
        self._changed = threading.Event()
        self._stop = threading.Event()
        self._written: dict[str, str] = {}
        self._thread = threading.Thread(target=self._run, name="prometheus-sd", daemon=True)

    def _on_event(self, event: Any) -> None:
        if event.rt.key == "pods":
            self._changed.set()

    def start(self) -> PodDiscovery:
        self.sd_dir.mkdir(parents=True, exist_ok=True)
        self.write()
        self.store.subscribe(self._on_event)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.store.unsubscribe(self._on_event)
        self._stop.set()
        self._changed.set()
        self._thread.join(5)

    def write(self) -> None:
        """Write every job's file whose content changed."""
        from trafficmgr.apiserver.discovery import BY_KEY

        pods, _ = self.store.list_raw(BY_KEY["pods"], None)
        for job, groups in discovery_files([*pods, *self.extra_pods], self.namespace).items():
            text = json.dumps(groups, indent=1, sort_keys=True)
            if self._written.get(job) == text:
                continue
            path = self.sd_dir / f"{job}.json"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
            self._written[job] = text

    def _run(self) -> None:
        while not self._stop.is_set():
            self._changed.wait()
            if self._stop.wait(self.delay):  # let a burst of changes settle into one write
                return
            self._changed.clear()
            try:
                self.write()
            except Exception:  # a failed write must not end discovery; the next change retries
                log.exception("cannot write the Prometheus discovery files in %s", self.sd_dir)


def argv(binary: str, state_dir: Path, address: str, port: int = PORT) -> list[str]:
    """The Prometheus command line: config and TSDB under ``<state_dir>/prometheus`` (so the command line
    names the state directory, which is how a leftover of a killed demo is found), listening on
    ``address:port`` only. The admin API (``--web.enable-admin-api``: deleting series, snapshots) and
    lifecycle endpoints (``--web.enable-lifecycle``: quit, reload) stay off, Prometheus' defaults."""
    home = state_dir / "prometheus"
    return [binary, f"--config.file={home / 'prometheus.yml'}", f"--storage.tsdb.path={home / 'data'}",
            f"--storage.tsdb.retention.time={RETENTION}", f"--web.listen-address={address}:{port}",
            "--log.level=warn"]
