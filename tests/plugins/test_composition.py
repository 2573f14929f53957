"""Every policy plugin at once (lb, circuit_breaker, fault, ratelimit, tracing): Envoy accepts the
composition and traffic flows; disabling one plugin removes exactly its part of the config."""

from __future__ import annotations

import argparse
import http.client
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.plugins.golden_cases import builtin_plugins, case_options
from trafficmgr.apps.zipkin import ZipkinCollector
from trafficmgr.core.plugins import PluginHost, builtin_names
from trafficmgr.plugins import ratelimit, tracing
from trafficmgr.testing.cluster import LocalCluster
from trafficmgr.testing.golden import build_from_manifests, load_manifests, render
from trafficmgr.testing.netns import require as _require_netns

CASE = Path(__file__).resolve().parent.parent / "golden" / "plugins" / "all_plugins.in.yaml"
COLLECTOR_IP = "10.244.0.50"


def test_every_policy_label_on_one_service_still_serves_200(envoy_binary: str) -> None:
    _require_netns()
    docs = load_manifests(CASE)
    pod_ip = next(d for d in docs if d["kind"] == "Pod")["status"]["podIP"]
    options = argparse.Namespace(zipkin_address=f"{COLLECTOR_IP}:9411", zipkin_flush_spans=1)
    with LocalCluster([pod_ip, COLLECTOR_IP], options=options) as c:
        zipkin = c.pod.in_ns(lambda: ZipkinCollector(host=COLLECTOR_IP, port=9411).start())
        try:
            c.backend("reviews", pod_ip, 9080)
            c.apply(yaml.safe_dump_all(docs))
            host = c.cluster_ip("reviews")

            def get() -> tuple[int, float, str]:
                conn = http.client.HTTPConnection(host, 9080, timeout=10)
                start = time.monotonic()
                conn.request("GET", "/reviews/0", headers={"Host": "reviews:9080", "x-user": "alice"})
                resp = conn.getresponse()
                resp.read()
                elapsed = time.monotonic() - start
                conn.close()
                return resp.status, elapsed, resp.getheader("x-backend") or ""

            status, elapsed, backend = c.wait_config(lambda: (r := c.pod.in_ns(get))[0] == 200 and r, timeout=10,
                                                     message="no 200 through the composed config")
            assert backend == "reviews"
            assert elapsed >= 0.010, "traffic.fault.delay.time=10 at 100 % must delay the request"
            c.wait_config(lambda: len(zipkin.spans()) >= 1, message="tracing: no span reached the collector")
            dump = c.pod.admin("/config_dump")
            for expected in ("RING_HASH", "envoy.tracers.zipkin", ratelimit.RATELIMIT_FILTER, ratelimit.BANDWIDTH_FILTER,
                             "envoy.filters.http.fault", "consecutive_5xx", "max_requests"):
                assert expected in dump, f"{expected} missing from the sidecar's config"
            assert c.cp.nacks() == []
            assert all(st[t]["sent"] == st[t]["acked"] for st in c.cp.proxy_status()
                       for t in ("clusters", "endpoints", "listeners", "routes")), c.cp.proxy_status()
        finally:
            zipkin.stop()


# -- disabling a plugin removes exactly its effect (golden renderer) --------------------------------


def _rendered(plugins: PluginHost) -> tuple[dict[str, Any], list[str]]:
    snaps, warnings = build_from_manifests(load_manifests(CASE), plugins, case_options("all_plugins"))
    return yaml.safe_load(render(snaps)), warnings


def _walk(node: Any, fn: Callable[[dict[str, Any]], None]) -> None:
    if isinstance(node, dict):
        fn(node)
        for value in node.values():
            _walk(value, fn)
    elif isinstance(node, list):
        for value in node:
            _walk(value, fn)


def _strip_ratelimit(node: dict[str, Any]) -> None:
    names = (ratelimit.RATELIMIT_FILTER, ratelimit.BANDWIDTH_FILTER)
    if "http_filters" in node:
        node["http_filters"] = [f for f in node["http_filters"] if f["name"] not in names]
    per_filter = node.get("typed_per_filter_config")
    if per_filter is not None:
        for name in names:
            per_filter.pop(name, None)
        if not per_filter:
            del node["typed_per_filter_config"]


def _strip_tracing(node: dict[str, Any]) -> None:
    if "stat_prefix" in node and "http_filters" in node:  # a connection manager
        node.pop("tracing", None)
    if "match" in node and "route" in node:  # a route
        node.pop("tracing", None)
    clusters = node.get("clusters")  # a view's cluster list
    if isinstance(clusters, list):
        node["clusters"] = [r for r in clusters if r.get("name") != tracing.COLLECTOR_CLUSTER]


@pytest.mark.parametrize("plugin, strip", [("ratelimit", _strip_ratelimit), ("tracing", _strip_tracing)])
def test_disabling_a_plugin_removes_exactly_its_parts(plugin: str, strip: Callable[[dict[str, Any]], None]) -> None:
    full, full_warnings = _rendered(builtin_plugins())
    without, warnings = _rendered(PluginHost.load([n for n in builtin_names() if n != plugin]))
    assert full != without, f"{plugin} changes nothing in the all_plugins case"
    _walk(full, strip)
    assert full == without
    assert warnings == full_warnings == []
