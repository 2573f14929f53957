"""Helpers for tests that request through a GatewayCluster's gateway Envoy (ingress and tls)."""

from __future__ import annotations

import json

from trafficmgr.testing.cluster import GatewayCluster


def backend_of(body: str) -> str:
    try:
        return json.loads(body)["backend"]
    except (ValueError, KeyError):
        return f"<not a backend: {body[:80]!r}>"


def served_by(c: GatewayCluster, path: str, host: str | None = None) -> tuple[int, str]:
    """(status, backend name or body); status 0 when the gateway refuses the connection (no listener:
    no Ingress is served)."""
    try:
        status, body = c.get(path, host)
    except OSError as exc:
        return 0, str(exc)
    return status, backend_of(body) if status == 200 else body
