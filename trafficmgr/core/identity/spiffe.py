"""SPIFFE IDs of workloads: ``spiffe://<trust domain>/ns/<namespace>/sa/<service account>``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_ID = re.compile(r"^spiffe://(?P<td>[^/]+)/ns/(?P<ns>[^/]+)/sa/(?P<sa>[^/]+)$")


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    """The SPIFFE ID of a workload (``service_account`` "" means ``default``, as in Kubernetes)."""
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account or 'default'}"


def parse(text: str) -> tuple[str, str, str] | None:
    """``(trust domain, namespace, service account)`` of a workload SPIFFE ID, or None."""
    m = _ID.match(text)
    return (m["td"], m["ns"], m["sa"]) if m else None


def pod_service_account(pod: Mapping[str, Any]) -> str:
    """The ServiceAccount a raw pod runs as: ``spec.serviceAccountName``, else the deprecated
    ``spec.serviceAccount``, else ``default`` (as Kubernetes decides)."""
    spec = pod.get("spec") or {}
    return str(spec.get("serviceAccountName") or spec.get("serviceAccount") or "default")
