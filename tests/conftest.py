"""Shared fixtures: a control plane (cache + xDS server), real Envoys, HTTP backends.

Tests needing Envoy are skipped when the binary is missing, except under ``CI`` where they fail.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from trafficmgr.testing import ControlPlane, EnvoyProcess, HttpBackend


@pytest.fixture(scope="session")
def envoy_binary(trafficmgr_envoy_binary: str) -> str:
    """The kit's fixture (skips without Envoy, fails under ``CI``) under the name these tests use."""
    return trafficmgr_envoy_binary


@pytest.fixture
def xds_server() -> Iterator[ControlPlane]:
    """A running control plane on a free port: ``.cache``, ``.nodes`` (node id -> view), ``.status()``."""
    cp = ControlPlane().start()
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture
def envoy_factory(
    envoy_binary: str, xds_server: ControlPlane, tmp_path: Path
) -> Iterator[Callable[..., EnvoyProcess]]:
    """``envoy_factory(node_id, delta=False, wait="live", **bootstrap_kw)`` starts an Envoy against
    ``xds_server``; every Envoy is killed at teardown."""
    started: list[EnvoyProcess] = []

    def factory(node_id: str, delta: bool = False, wait: str | None = "live", **kw: Any) -> EnvoyProcess:
        workdir = tmp_path / f"envoy-{len(started)}-{node_id}"
        proc = EnvoyProcess(xds_server.bootstrap(node_id, delta=delta, **kw), workdir, wait=wait)
        started.append(proc)
        return proc.start()

    try:
        yield factory
    finally:
        for proc in started:
            proc.stop()


@pytest.fixture
def backend_factory() -> Iterator[Callable[..., HttpBackend]]:
    """``backend_factory(name, host="127.0.0.1", port=0)`` starts an :class:`HttpBackend`; all stopped
    at teardown."""
    started: list[HttpBackend] = []

    def factory(name: str, host: str = "127.0.0.1", port: int = 0) -> HttpBackend:
        backend = HttpBackend(name, host, port).start()
        started.append(backend)
        return backend

    try:
        yield factory
    finally:
        for backend in started:
            backend.stop()
