"""Reusable test harness: a control plane in a thread, real Envoy processes, programmable HTTP backends.

Typical use (the pytest fixtures in ``tests/conftest.py`` wrap exactly this)::

    cp = ControlPlane().start()
    cp.nodes["sidecar-1"] = "sidecar"
    cp.cache.set_view("sidecar", snapshot)
    with HttpBackend("a") as a, EnvoyProcess(cp.bootstrap("sidecar-1"), tmp_path) as envoy:
        ...
"""

from trafficmgr.core.envoy import EnvoyNotFound, find_envoy
from trafficmgr.testing.backends import HttpBackend
from trafficmgr.testing.envoy import ControlPlane, EnvoyProcess, EnvoyStartError, free_port, no_nacks, wait_for

__all__ = [
    "ControlPlane",
    "EnvoyNotFound",
    "EnvoyProcess",
    "EnvoyStartError",
    "HttpBackend",
    "find_envoy",
    "free_port",
    "no_nacks",
    "wait_for",
]
