"""A plugin that fails in each kind of hook (issue 17): serving continues, logged and counted, or the command
stops with one clear message. The policy per hook is ``trafficmgr.core.plugins.HOOK_POLICY`` (documented in
docs/plugins.md); ``test_every_hook_has_a_policy_and_a_test`` keeps this file covering every entry.

Runtime hooks: one :class:`LocalCluster` per test (the test API server, the real control plane watching it,
a real Envoy sidecar in a pod network namespace with outbound capture) with :class:`Failing` registered for
one hook. Two services: ``good`` and ``other``. The test checks that requests through the sidecar keep
being answered, that a label change and a new endpoint still reach Envoy, what became of the failing
plugin's part of the config, the log line and ``trafficmgr_plugin_errors_total{plugin,hook}``.

Startup hooks and imports: ``trafficmgr`` run as a subprocess with a plugin installed in a
``TRAFFICMGR_PLUGIN_PATH`` directory: exit status 1 and exactly one line on stderr naming the plugin and hook.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.route.v3.route_components_pb2 import Route
from envoy.extensions.filters.http.fault.v3.fault_pb2 import HTTPFault
from envoy.extensions.filters.network.rbac.v3.rbac_pb2 import RBAC as NetworkRBAC

from trafficmgr import hookimpl
from trafficmgr.core import metrics, plugins
from trafficmgr.core.contrib import HttpFilter, NetworkFilter, ObjectStatus, ServiceRoutes, WatchKind
from trafficmgr.core.plugins import PluginHost
from trafficmgr.testing.cluster import LocalCluster
from trafficmgr.testing.envoy import wait_for
from trafficmgr.testing.manifests import join, pod, service
from trafficmgr.testing.netns import require as _require_netns

GOOD_IP, OTHER_IP, NEW_IP, BARE_IP, OTHER2_IP = "10.244.0.11", "10.244.0.12", "10.244.0.13", "10.244.0.14", "10.244.0.15"
MANIFESTS = join(
    service("good"), pod("good-1", GOOD_IP, "good"),
    service("other"), pod("other-1", OTHER_IP, "other"),
    # No traffic.port label: only Failing.trafficmgr_port_protocols makes its port http.
    service("bare", http=False), pod("bare-1", BARE_IP, "bare"),
)
PLUGIN = "failing"
EXTRA_CLUSTER = "failing-extra"
EXTRA_FILTER = "failing.fault"
EXTRA_NETWORK_FILTER = "failing.rbac"
EXTRA_ROUTE = "failing-route"


def errors(hook: str) -> float:
    return metrics.REGISTRY.get_sample_value("trafficmgr_plugin_errors_total", {"plugin": PLUGIN, "hook": hook}) or 0.0


class Failing:
    """Implements every runtime hook. Before ``armed`` it succeeds (contributions visible in Envoy's config);
    once armed, the hook named ``hook`` makes a visible change to what it got (mutate hooks) and raises."""

    def __init__(self, hook: str) -> None:
        self.hook = hook
        self.armed = False
        self.calls = 0

    def _fail(self, hook: str) -> bool:
        if self.armed and hook == self.hook:
            self.calls += 1
            return True
        return False

    # mutate hooks: half a change, then the error
    @hookimpl
    def trafficmgr_cluster(self, cluster: Any) -> None:
        if self._fail("trafficmgr_cluster"):
            cluster.connect_timeout.FromMilliseconds(4321)
            raise RuntimeError("test failure in trafficmgr_cluster")

    @hookimpl
    def trafficmgr_endpoints(self, assignment: Any) -> None:
        if self._fail("trafficmgr_endpoints"):
            for locality in assignment.endpoints:
                del locality.lb_endpoints[:]
            raise RuntimeError("test failure in trafficmgr_endpoints")

    @hookimpl
    def trafficmgr_virtual_host(self, vhost: Any) -> None:
        if self._fail("trafficmgr_virtual_host"):
            del vhost.routes[:]
            raise RuntimeError("test failure in trafficmgr_virtual_host")

    @hookimpl
    def trafficmgr_route(self, route: Any) -> None:
        if self._fail("trafficmgr_route"):
            route.route.cluster = "nowhere"
            raise RuntimeError("test failure in trafficmgr_route")

    @hookimpl
    def trafficmgr_http_connection_manager(self, hcm: Any) -> None:
        if self._fail("trafficmgr_http_connection_manager"):
            hcm.stat_prefix = "failing_hcm"
            raise RuntimeError("test failure in trafficmgr_http_connection_manager")

    @hookimpl
    def trafficmgr_listener(self, listener: Any) -> None:
        if self._fail("trafficmgr_listener"):
            del listener.filter_chains[:]
            raise RuntimeError("test failure in trafficmgr_listener")

    # contribution hooks
    @hookimpl
    def trafficmgr_http_filters(self, role: str) -> list[HttpFilter]:
        if self._fail("trafficmgr_http_filters"):
            raise RuntimeError("test failure in trafficmgr_http_filters")
        return [HttpFilter(EXTRA_FILTER, 150, HTTPFault())] if role == "sidecar" else []

    @hookimpl
    def trafficmgr_network_filters(self, role: str) -> list[Any]:
        if self._fail("trafficmgr_network_filters"):
            raise RuntimeError("test failure in trafficmgr_network_filters")
        # An RBAC filter without rules lets everything through.
        return [NetworkFilter(EXTRA_NETWORK_FILTER, 150, NetworkRBAC(stat_prefix="failing_plugin."))] if role == "inbound" else []

    @hookimpl
    def trafficmgr_resources(self, role: str, ctx: Any) -> list[Any]:
        if self._fail("trafficmgr_resources"):
            raise RuntimeError("test failure in trafficmgr_resources")
        if role != "sidecar":
            return []
        c = Cluster(name=EXTRA_CLUSTER, type=Cluster.STATIC)
        c.connect_timeout.FromSeconds(1)
        return [ctx.resource(c, EXTRA_CLUSTER)]

    @hookimpl
    def trafficmgr_service_routes(self, role: str) -> list[ServiceRoutes]:
        if self._fail("trafficmgr_service_routes"):
            raise RuntimeError("test failure in trafficmgr_service_routes")
        if role != "sidecar":
            return []
        route = Route(name=EXTRA_ROUTE)  # bare's own cluster, named so the config dump shows it
        route.match.prefix = "/"
        route.route.cluster = "9080|default|bare.outbound"
        return [ServiceRoutes("default", "bare", 9080, (route,))]

    @hookimpl
    def trafficmgr_port_protocols(self) -> list[tuple[str, str, int | str, str]]:
        if self._fail("trafficmgr_port_protocols"):
            raise RuntimeError("test failure in trafficmgr_port_protocols")
        return [("default", "bare", 9080, "http")]

    @hookimpl
    def trafficmgr_object_status(self) -> list[ObjectStatus]:
        if self._fail("trafficmgr_object_status"):
            raise RuntimeError("test failure in trafficmgr_object_status")
        return []

    @hookimpl
    def trafficmgr_dashboard_routes(self) -> list[dict[str, Any]]:
        if self._fail("trafficmgr_dashboard_routes"):
            raise RuntimeError("test failure in trafficmgr_dashboard_routes")
        return [{"kind": "HTTPRoute", "namespace": "default", "name": "failing-route"}]

    @hookimpl
    def trafficmgr_dashboard_endpoint_columns(self, endpoints: tuple[Any, ...]) -> list[dict[str, Any]]:
        if self._fail("trafficmgr_dashboard_endpoint_columns"):
            raise RuntimeError("test failure in trafficmgr_dashboard_endpoint_columns")
        return [{"name": "failing_column", "values": [1] * len(endpoints)}]

    @hookimpl
    def trafficmgr_watch_kinds(self) -> list[WatchKind]:
        def convert(raw: dict[str, Any], ctx: Any) -> Any:
            if self._fail("trafficmgr_watch_kinds.convert"):
                raise RuntimeError("test failure in WatchKind.convert")
            return raw["metadata"]["name"]

        def keep(extra: Any) -> Any:
            if self._fail("trafficmgr_watch_kinds.keep"):
                raise RuntimeError("test failure in WatchKind.keep")
            return set(extra.get("ConfigMap", {}))

        return [WatchKind("ConfigMap", "v1", "configmaps", convert, keep=keep)]


# Runtime hooks and what the failing plugin's part of the config must look like in Envoy afterwards.
RUNTIME_HOOKS = [h for h, p in plugins.HOOK_POLICY.items() if p != plugins.STARTUP] + [
    "trafficmgr_watch_kinds.convert", "trafficmgr_watch_kinds.keep"]
STARTUP_CASES = {  # FAILPLUG_HOOK value -> (command, the hook named in the message)
    "import": ("serve", "failed to import"),
    "add_arguments": ("serve", "trafficmgr_add_arguments"),
    "conflict": ("serve", "trafficmgr_add_arguments"),
    "labels": ("serve", "trafficmgr_labels"),
    "labels_type": ("serve", "trafficmgr_labels"),
    "watch_kinds": ("serve", "trafficmgr_watch_kinds"),
    "bootstrap": ("bootstrap", "trafficmgr_bootstrap"),
}


def test_every_hook_has_a_policy_and_a_test() -> None:
    host = PluginHost()
    assert set(plugins.HOOK_POLICY) == set(host.hook_names())
    covered = {h for h in RUNTIME_HOOKS} | {f"trafficmgr_{c}" for c in STARTUP_CASES}
    assert set(plugins.HOOK_POLICY) <= covered
    for name in host.hook_names():  # the hookspec docstring states the policy
        doc = getattr(host.pm.hook, name).spec.function.__doc__ or ""
        words = {plugins.ISOLATED: "errors are isolated", plugins.LAST_GOOD: "last good",
                 plugins.STARTUP: "startup error"}[plugins.HOOK_POLICY[name]]
        assert words in doc, f"{name}'s docstring does not say {words!r}"


@pytest.fixture
def cluster_for(envoy_binary: str) -> Iterator[Any]:
    _require_netns()
    made: list[LocalCluster] = []

    def make(failing: Failing) -> LocalCluster:
        host = PluginHost.load(["lb", "fault", "circuit_breaker"], extra=[(PLUGIN, failing)])
        c = LocalCluster([GOOD_IP, OTHER_IP, NEW_IP, BARE_IP, OTHER2_IP], plugins=host)
        made.append(c)
        for name, ip in (("good-1", GOOD_IP), ("other-1", OTHER_IP), ("new-1", NEW_IP), ("bare-1", BARE_IP),
                         ("other-2", OTHER2_IP)):
            c.backend(name, ip, 9080)
        c.apply(MANIFESTS)
        c.store.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm-1", "namespace": "default"}})
        return c

    yield make
    for c in made:
        c.close()


def _dump(c: LocalCluster) -> dict[str, Any]:
    assert c.pod is not None
    return json.loads(c.pod.admin("/config_dump?include_eds"))


def _clusters(c: LocalCluster) -> dict[str, dict[str, Any]]:
    out = {}
    for cfg in _dump(c)["configs"]:
        for entry in cfg.get("dynamic_active_clusters", []):
            out[entry["cluster"]["name"]] = entry["cluster"]
    return out


def _route_timeouts(c: LocalCluster) -> dict[str, str]:
    """Route timeout by target cluster, over every route configuration Envoy holds."""
    out = {}
    for cfg in _dump(c)["configs"]:
        for rc in cfg.get("dynamic_route_configs", []):
            for vh in rc["route_config"].get("virtual_hosts", []):
                for r in vh.get("routes", []):
                    action = r.get("route") or {}
                    if "cluster" in action:
                        out[action["cluster"]] = action.get("timeout", "")
    return out


def _endpoints(c: LocalCluster, name: str) -> set[str]:
    assert c.pod is not None
    text = c.pod.admin("/clusters")
    return {line.split("::")[1] for line in text.splitlines() if line.startswith(name + "::") and line.count("::") >= 3
            and line.split("::")[2] == "health_flags"}


def _text(c: LocalCluster) -> str:
    assert c.pod is not None
    return c.pod.admin("/config_dump")


@pytest.mark.parametrize("hook", RUNTIME_HOOKS)
def test_failing_runtime_hook_keeps_serving_and_updating(hook: str, cluster_for: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="trafficmgr.core.plugins")
    failing = Failing(hook)
    c = cluster_for(failing)
    assert c.pod is not None
    good, other, bare = (f"http://{c.cluster_ip(n)}:9080/" for n in ("good", "other", "bare"))
    for url in (good, other, bare):
        wait_for(lambda url=url: c.pod.curl(url)[0] == 200, 15, message=f"{url} not served before the failure")
    wait_for(lambda: EXTRA_CLUSTER in _clusters(c) and EXTRA_FILTER in _text(c) and EXTRA_ROUTE in _text(c), 10,
             message="the plugin's contributions did not reach Envoy before the failure")
    before = errors(hook)

    failing.armed = True
    # Changes that make the control plane build (and so call the failing hook): a label and an endpoint
    # for `other`.
    c.label("service", "other", {"traffic.request.timeout": "2500"})
    c.apply(pod("other-2", OTHER2_IP, "other"))
    c.apply(service("late", port=9091, app="good", target_port=9080))  # a new port: listeners are rebuilt
    other_cluster = next(n for n in _route_timeouts(c) if "|other" in n)
    wait_for(lambda: _route_timeouts(c).get(other_cluster) == "2.500s", 15, message="label change not applied")
    # Converted when an object of the kind changes; keep() runs when some plugin kind changed.
    if hook in ("trafficmgr_watch_kinds.convert", "trafficmgr_watch_kinds.keep"):
        c.store.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm-2", "namespace": "default"}})
    # Called only when someone reads the dashboard's data (not by builds): its rows are left out.
    if hook == "trafficmgr_dashboard_routes":
        assert not [r for r in c.cp.dashboard_data()["routes"] if r["name"] == "failing-route"]
    if hook == "trafficmgr_dashboard_endpoint_columns":  # its column is left out, lb's is there
        assert [h["name"] for h in c.cp.dashboard_data()["upstream_columns"]] == ["weight"]
    wait_for(lambda: errors(hook) > before, 10, message=f"{hook} failure not counted")
    assert failing.calls >= 1

    # Serving continues, and later changes still apply: a timeout on `good`, a new endpoint for `good`.
    for url in (good, other, bare):
        assert c.pod.curl(url)[0] == 200, f"{url} no longer served after {hook} failed"
    c.label("service", "good", {"traffic.request.timeout": "1500"})
    good_cluster = next(n for n in _route_timeouts(c) if "|good" in n)
    wait_for(lambda: _route_timeouts(c).get(good_cluster) == "1.500s", 15, message=f"updates stopped after {hook} failed")
    c.apply(pod("new-1", NEW_IP, "good"))
    wait_for(lambda: f"{NEW_IP}:9080" in _endpoints(c, good_cluster), 15, message=f"new endpoint not applied after {hook} failed")
    for url in (good, other, bare):
        assert c.pod.curl(url)[0] == 200

    # The failing plugin's own part: a mutation is undone, a contribution is its last good one.
    clusters = _clusters(c)
    assert all(cl.get("connect_timeout") != "4.321s" for cl in clusters.values())
    assert "failing_hcm" not in _text(c)
    assert EXTRA_CLUSTER in clusters and EXTRA_FILTER in _text(c)  # LAST_GOOD (and untouched by the others)
    assert EXTRA_NETWORK_FILTER in _text(c)
    assert EXTRA_ROUTE in _text(c)  # its service routes: LAST_GOOD too

    # One log line naming the plugin and the hook, however often it failed.
    lines = [r.getMessage() for r in caplog.records if f"plugin '{PLUGIN}' hook {hook} failed" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "serving continues" in lines[0] and "test failure" in lines[0]
    # Model objects of a watched kind: a failed convert leaves that object out, a failed keep all of them.
    extra = c.cp.assembler.model().extra.get("ConfigMap", {})
    if hook == "trafficmgr_watch_kinds.keep":
        assert extra == {}
    elif hook == "trafficmgr_watch_kinds.convert":
        assert ("default", "cm-1") in extra and ("default", "cm-2") not in extra


def test_last_good_is_not_used_before_a_success(caplog: pytest.LogCaptureFixture) -> None:
    """A LAST_GOOD hook that never succeeded contributes nothing (and a bad item counts as a failure)."""
    class Bad:
        @hookimpl
        def trafficmgr_http_filters(self) -> list[Any]:
            return ["not a filter"]

    host = PluginHost.load(["lb"], extra=[("bad", Bad())])
    before = metrics.REGISTRY.get_sample_value("trafficmgr_plugin_errors_total", {"plugin": "bad", "hook": "trafficmgr_http_filters"}) or 0
    assert host.collect("trafficmgr_http_filters", what="sidecar filters", role="sidecar", ctx=None) == []
    after = metrics.REGISTRY.get_sample_value("trafficmgr_plugin_errors_total", {"plugin": "bad", "hook": "trafficmgr_http_filters"})
    assert after == before + 1
    assert any("returned str, not an HttpFilter" in r.getMessage() for r in caplog.records)


def test_failure_log_memory_is_bounded() -> None:
    class Noisy:
        @hookimpl
        def trafficmgr_object_status(self, model: Any) -> list[Any]:
            raise RuntimeError(f"failure {model}")

    host = PluginHost.load(["lb"], extra=[("noisy", Noisy())])
    for i in range(1024 + 100):
        host.collect("trafficmgr_object_status", model=i, options=None)
    assert len(host._logged) == 1024 == plugins.LOGGED_FAILURES_MAX  # noqa: SLF001


# -- startup: the CLI ------------------------------------------------------------------------------

FAILPLUG = '''"""A test plugin that fails where $FAILPLUG_HOOK says."""
import os

from trafficmgr import hookimpl

FAIL = os.environ.get("FAILPLUG_HOOK", "")
if FAIL == "import":
    raise ImportError("failplug needs libfailplug.so (test)")


@hookimpl
def trafficmgr_add_arguments(parser, command):
    if FAIL == "add_arguments":
        raise RuntimeError("failplug cannot add its options (test)")
    if FAIL == "conflict":
        parser.add_argument("--xds-port")


@hookimpl
def trafficmgr_labels():
    if FAIL == "labels":
        raise RuntimeError("failplug cannot declare its labels (test)")
    if FAIL == "labels_type":
        return ["traffic.failplug"]
    return []


@hookimpl
def trafficmgr_watch_kinds():
    if FAIL == "watch_kinds":
        raise RuntimeError("failplug cannot name its kinds (test)")
    return []


@hookimpl
def trafficmgr_bootstrap(bootstrap, role):
    if FAIL == "bootstrap":
        raise RuntimeError("failplug cannot change the bootstrap (test)")
'''

KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:9"}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
"""


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("failplug")
    (d / "failplug").mkdir()
    (d / "failplug" / "__init__.py").write_text(FAILPLUG)
    info = d / "trafficmgr_failplug-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: trafficmgr-failplug\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[trafficmgr.plugins]\nfailplug = failplug\n")
    (d / "kubeconfig").write_text(KUBECONFIG)
    return d


def _run(plugin_dir: Path, fail: str, command: str) -> subprocess.CompletedProcess[str]:
    args = {"serve": ["serve", "--kubeconfig", str(plugin_dir / "kubeconfig"), "--xds-port", "0", "--admin-port", "0"],
            "bootstrap": ["bootstrap", "--node-id", "a.default", "--node-cluster", "sidecar", "--xds-address", "127.0.0.1:18000"]}[command]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRAFFICMGR_PLUGINS")}
    env.update(TRAFFICMGR_PLUGIN_PATH=str(plugin_dir), FAILPLUG_HOOK=fail)
    return subprocess.run([sys.executable, "-m", "trafficmgr", *args, "--plugins", "lb,failplug"],
                          capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.parametrize("fail", list(STARTUP_CASES))
def test_startup_failure_is_one_clear_message(plugin_dir: Path, fail: str) -> None:
    command, named = STARTUP_CASES[fail]
    start = time.monotonic()
    proc = _run(plugin_dir, fail, command)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("trafficmgr: error: plugin 'failplug'") and named in lines[0], lines[0]
    assert "Traceback" not in proc.stderr and "unexpected" not in lines[0]
    assert time.monotonic() - start < 30


def test_startup_hooks_pass_when_nothing_fails(plugin_dir: Path) -> None:
    """The same commands with the plugin not failing: bootstrap is written (so the failures above are the
    plugin's, not the command line's)."""
    proc = _run(plugin_dir, "", "bootstrap")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["node"]["id"] == "a.default"


def test_isolated_items_are_type_checked() -> None:
    """Contributions with the wrong shape fail their plugin's call, not the build."""
    class Wrong:
        @hookimpl
        def trafficmgr_resources(self) -> Any:
            return "cluster"  # not a list

    host = PluginHost.load(["lb"], extra=[("wrong", Wrong())])
    assert host.collect("trafficmgr_resources", what="sidecar resources", role="sidecar", model=None, ctx=None) == []
    assert (metrics.REGISTRY.get_sample_value("trafficmgr_plugin_errors_total",
                                              {"plugin": "wrong", "hook": "trafficmgr_resources"}) or 0) >= 1


# -- failures the isolation used to miss: they ended the build, or the sync thread -------------------


def _publish_with(plugin: object) -> Any:
    import argparse

    from trafficmgr.core.controlplane import ControlPlane
    from trafficmgr.core.model import Labels, Model, Service, ServicePort

    cp = ControlPlane(PluginHost.load(["lb"], extra=[(PLUGIN, plugin)]),
                      argparse.Namespace(sidecar_port=10000, sidecar_address="0.0.0.0"))
    svc = Service("default", "s", (ServicePort("http", 9080, 9080, "http"),), cluster_ip="10.0.0.1", labels=Labels({}))
    cp.publish_model(Model(services={svc.key: svc}, endpoints={}))
    return cp


def test_resource_of_a_type_not_served_fails_only_its_plugin() -> None:
    """Before: a KeyError in the builder (publish_model raised: in serve, the sync thread ended)."""
    from google.protobuf.empty_pb2 import Empty

    from trafficmgr.core.cache import Resource

    class Odd:
        @hookimpl
        def trafficmgr_resources(self) -> list[Any]:
            return [Resource.from_message(Empty(), "odd")]

    before = errors("trafficmgr_resources")
    cp = _publish_with(Odd())
    assert errors("trafficmgr_resources") == before + 2  # sidecar and gateway views
    snap = cp.cache.get("sidecar")
    assert snap is not None and "9080|default|s.outbound" in snap.types["type.googleapis.com/envoy.config.cluster.v3.Cluster"].resources


def test_sys_exit_in_a_plugin_is_a_plugin_failure() -> None:
    """Before: SystemExit went through the isolation; in the sync thread it ends the thread silently."""
    class Exits:
        @hookimpl
        def trafficmgr_cluster(self) -> None:
            sys.exit("a plugin must not exit the control plane")

    before = errors("trafficmgr_cluster")
    cp = _publish_with(Exits())
    assert errors("trafficmgr_cluster") == before + 1
    assert cp.cache.get("sidecar") is not None


def test_sync_loop_outlives_a_failing_build(caplog: pytest.LogCaptureFixture) -> None:
    """The real control plane watching the test API server: a build that raises (a builder bug, simulated by
    replacing the builder's build once) is logged and counted, the last snapshot stays served, and the
    next change is built by a fresh builder. Before, the sync thread ended and no change was served again."""
    import argparse
    import shutil
    import tempfile

    import yaml

    from trafficmgr.apiserver import APIServer
    from trafficmgr.apiserver.access import new_token
    from trafficmgr.core.controlplane import ControlPlane
    from trafficmgr.core.kube.client import KubeClient, load_api_client

    caplog.set_level(logging.ERROR, logger="trafficmgr.core.controlplane")
    tmp = Path(tempfile.mkdtemp(prefix="tm-buildfail-"))
    api = APIServer(token=new_token()).start()
    cp = None
    try:
        api.write_kubeconfig(str(tmp / "kubeconfig"))
        cp = ControlPlane(PluginHost.load(["lb"]), argparse.Namespace(sidecar_port=10000, sidecar_address="0.0.0.0"),
                          KubeClient(load_api_client(str(tmp / "kubeconfig"))))
        cp.start_watches()
        assert cp.wait_ready(15), cp.ready()[1]

        def clusters() -> set[str]:
            snap = cp.cache.get("sidecar")
            return set(snap.types["type.googleapis.com/envoy.config.cluster.v3.Cluster"].resources) if snap else set()

        api.store.create(yaml.safe_load(service("first")))
        wait_for(lambda: "9080|default|first.outbound" in clusters(), 10, message="first service not built")

        def broken(model: Any) -> Any:
            raise RuntimeError("builder bug (test)")

        cp.builder.build = broken  # type: ignore[method-assign]
        before = metrics.REGISTRY.get_sample_value("trafficmgr_build_errors_total") or 0.0
        api.store.create(yaml.safe_load(service("second")))
        wait_for(lambda: (metrics.REGISTRY.get_sample_value("trafficmgr_build_errors_total") or 0) > before, 10,
                 message="the failed build was not counted")
        assert cp.healthy() and "9080|default|first.outbound" in clusters()  # the last snapshot is still served
        assert "builder bug (test)" in cp.last_error
        assert [r for r in caplog.records if "build failed; the previous snapshots are still served" in r.getMessage()]

        api.store.create(yaml.safe_load(service("third")))
        wait_for(lambda: {"9080|default|second.outbound", "9080|default|third.outbound"} <= clusters(), 10,
                 message="no change was built after the failed build")
    finally:
        if cp is not None:
            cp.stop()
        api.stop()
        shutil.rmtree(tmp, ignore_errors=True)
