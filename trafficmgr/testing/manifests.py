"""Small Kubernetes manifest builders for tests (YAML text, as a user would write it)."""

from __future__ import annotations

import json
from collections.abc import Mapping


def _flow(value: object) -> str:
    return json.dumps(value)  # JSON is YAML flow style


def service(name: str, port: int = 9080, labels: Mapping[str, str] | None = None, namespace: str = "default",
            app: str | None = None, target_port: int | str | None = None, port_name: str = "http",
            http: bool = True) -> str:
    """A Service selecting ``app=<app or name>``; labeled ``traffic.port.<port>=http`` unless ``http`` is False."""
    all_labels = {f"traffic.port.{port}": "http"} if http else {}
    all_labels.update(labels or {})
    spec = {"selector": {"app": app or name},
            "ports": [{"name": port_name, "port": port, "targetPort": target_port if target_port is not None else port}]}
    meta = {"name": name, "namespace": namespace, "labels": all_labels}
    return f"apiVersion: v1\nkind: Service\nmetadata: {_flow(meta)}\nspec: {_flow(spec)}\n"


def pod(name: str, ip: str, app: str, ready: bool = True, labels: Mapping[str, str] | None = None,
        namespace: str = "default", node: str = "node-1") -> str:
    """A Pod with ``app=<app>`` (plus ``labels``) and the status a kubelet would report."""
    meta = {"name": name, "namespace": namespace, "labels": {"app": app, **(labels or {})}}
    spec = {"nodeName": node, "containers": [{"name": "app", "image": app}]}
    status = {"podIP": ip, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    return f"apiVersion: v1\nkind: Pod\nmetadata: {_flow(meta)}\nspec: {_flow(spec)}\nstatus: {_flow(status)}\n"


def join(*documents: str) -> str:
    """Several manifests as one multi-document YAML string."""
    return "---\n".join(documents)
