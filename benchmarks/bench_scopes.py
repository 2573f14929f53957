"""Scoped sidecar views benchmark (not a test).

    python benchmarks/bench_scopes.py [--services 10000] [--namespaces 100] [--endpoints 10] [--scopes 100]

The model is built in process (as bench_build.py does): ``--services`` Services spread evenly over
``--namespaces`` namespaces, ``--endpoints`` ready endpoints each, and one sidecar pod per scope. The first
build has no scope (every pod gets the full view ``sidecar``); then ``--scopes`` pods are labelled
``traffic.scope=namespace`` (pod i: its own namespace i, plus namespace i+1 for every other pod: distinct
scopes of one and two namespaces). Prints one JSON object: bytes and resources of the full view and of each
scoped view, build times (cold full, adding the scopes, one endpoint change with and without scopes and
how many resources it re-serialized, one Service relabelled with and without scopes and the CPU time of
that spent in the scoped views), and the process RSS after each step (Linux VmRSS).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path
from typing import Any

import attrs

from trafficmgr.core import cache
from trafficmgr.core.model import Endpoint, Labels, Model, ModelDelta, Namespace, Pod, Service, ServicePort
from trafficmgr.core.plugins import PluginHost
from trafficmgr.core.translate.builder import Builder


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def make_model(services: int, namespaces: int, endpoints: int, pods: int) -> Model:
    svcs, eps = {}, {}
    for i in range(services):
        ns, name = f"ns-{i % namespaces:03d}", f"svc-{i:05d}"
        svc = Service(ns, name, (ServicePort("http", 9080, 9080, "http"),),
                      cluster_ip=f"10.96.{i // 250}.{i % 250 + 1}", labels=Labels({"traffic.port.9080": "http"}))
        svcs[svc.key] = svc
        eps[(ns, name, "http")] = tuple(
            Endpoint(f"10.{100 + i // 250}.{i % 250}.{j + 1}", 9080, pod=f"{name}-{j}", namespace=ns) for j in range(endpoints))
    clients = {}
    for i in range(pods):
        p = Pod(f"ns-{i % namespaces:03d}", f"client-{i:03d}", ip=f"10.250.{i // 250}.{i % 250 + 1}",
                labels=Labels({"traffic.envoy.enabled": True}))
        clients[p.key] = p
    nss = {f"ns-{i:03d}": Namespace(f"ns-{i:03d}") for i in range(namespaces)}
    return Model(services=svcs, endpoints=eps, pods=clients, port_pods={}, namespaces=nss)


def view_size(snap: cache.Snapshot) -> tuple[int, int]:
    return snap.resource_count(), sum(len(r.body) for ts in snap.types.values() for r in ts.resources.values())


def endpoint_change(builder: Builder, model: Model, key: tuple[str, str, str],
                    repeat: int, salt: int) -> tuple[tuple[float, float, list[int]], Model]:
    """Median wall and CPU ms of builds after changing one endpoint address of ``key``, the resources
    re-serialized per build, and the last model."""
    wall, cpu, serialized = [], [], []
    for i in range(repeat):
        eps = list(model.endpoints[key])
        eps[0] = attrs.evolve(eps[0], address=f"10.99.{salt}.{i + 1}")
        model = attrs.evolve(model, endpoints={**model.endpoints, key: tuple(eps)},
                             delta=ModelDelta(services=frozenset({key[:2]})))
        t0, c0 = time.perf_counter(), time.process_time()
        builder.build(model)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        serialized.append(builder.stats.total_serialized)
    return (round(statistics.median(wall) * 1000, 3), round(statistics.median(cpu) * 1000, 3), serialized), model


class ScopedTimer:
    """CPU seconds spent in the builder's scoped views (``builder.scoped.build``) since the last reset."""

    def __init__(self, builder: Builder) -> None:
        self.seconds = 0.0
        real = builder.scoped.build

        def timed(*args: Any, **kwargs: Any) -> Any:
            c0 = time.process_time()
            try:
                return real(*args, **kwargs)
            finally:
                self.seconds += time.process_time() - c0

        builder.scoped.build = timed  # type: ignore[method-assign]


def service_change(builder: Builder, timer: ScopedTimer, model: Model, key: tuple[str, str],
                   repeat: int) -> tuple[tuple[float, float, float], Model]:
    """Median wall and CPU ms of builds after relabelling the Service ``key`` (a new Service object: its
    chain and virtual host are made again, the full view's outbound side is translated again), the median
    CPU ms of that spent in the scoped views, and the last model."""
    wall, cpu, scoped = [], [], []
    for i in range(repeat):
        svc = model.services[key]
        svc = attrs.evolve(svc, labels=Labels({**dict(svc.labels.items()), "bench-rev": str(i)}))
        model = attrs.evolve(model, services={**model.services, key: svc}, delta=ModelDelta(services=frozenset({key})))
        timer.seconds = 0.0
        t0, c0 = time.perf_counter(), time.process_time()
        builder.build(model)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        scoped.append(timer.seconds)
    return (round(statistics.median(wall) * 1000, 3), round(statistics.median(cpu) * 1000, 3),
            round(statistics.median(scoped) * 1000, 3)), model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--services", type=int, default=10000)
    p.add_argument("--namespaces", type=int, default=100)
    p.add_argument("--endpoints", type=int, default=10)
    p.add_argument("--scopes", type=int, default=100)
    p.add_argument("--repeat", type=int, default=7)
    args = p.parse_args()
    plugins = PluginHost.load()
    rss_start = rss_mb()
    model = make_model(args.services, args.namespaces, args.endpoints, args.scopes)
    gc.collect()
    rss_model = rss_mb()

    builder = Builder(plugins)
    timer = ScopedTimer(builder)
    t = time.perf_counter()
    snaps = builder.build(model)
    cold_full = time.perf_counter() - t
    full_resources, full_bytes = view_size(snaps["sidecar"])
    gc.collect()
    rss_full = rss_mb()
    key = ("ns-007", "svc-00007", "http")
    unscoped_change, model = endpoint_change(builder, model, key, args.repeat, 1)
    unscoped_service, model = service_change(builder, timer, model, key[:2], args.repeat)

    pods = dict(model.pods)
    for i, (k, pod) in enumerate(sorted(pods.items())):
        labels: dict[str, object] = {"traffic.envoy.enabled": True, "traffic.scope": "namespace"}
        if i % 2:
            labels["traffic.scope.namespaces"] = (f"ns-{(i + 1) % args.namespaces:03d}",)
        pods[k] = attrs.evolve(pod, labels=Labels(labels))
    scoped_model = attrs.evolve(model, pods=pods, delta=ModelDelta(pods=frozenset(pods)))
    t = time.perf_counter()
    snaps = builder.build(scoped_model)
    add_scopes = time.perf_counter() - t
    scoped = {v: view_size(s) for v, s in snaps.items() if v.startswith("sidecar~")}
    gc.collect()
    rss_scoped = rss_mb()
    scoped_change, scoped_model = endpoint_change(builder, scoped_model, key, args.repeat, 2)
    scoped_service, scoped_model = service_change(builder, timer, scoped_model, key[:2], args.repeat)

    t = time.perf_counter()
    cold_scoped = Builder(plugins).build(attrs.evolve(scoped_model, delta=None))
    cold_with_scopes = time.perf_counter() - t
    assert len([v for v in cold_scoped if v.startswith("sidecar~")]) == len(scoped)

    sizes = sorted(scoped.values())
    print(json.dumps({
        "services": args.services, "namespaces": args.namespaces, "endpoints_per_service": args.endpoints,
        "distinct_scopes": len(scoped),
        "full_view": {"resources": full_resources, "bytes": full_bytes},
        "scoped_view_resources_median": statistics.median(r for r, _ in sizes),
        "scoped_view_bytes_median": statistics.median(b for _, b in sizes),
        "scoped_view_bytes_max": max(b for _, b in sizes),
        "cold_build_full_s": round(cold_full, 3),
        "add_scopes_build_s": round(add_scopes, 3),
        "cold_build_with_scopes_s": round(cold_with_scopes, 3),
        "endpoint_change_unscoped": dict(zip(("wall_ms", "cpu_ms", "serialized"), unscoped_change, strict=True)),
        "endpoint_change_with_scopes": dict(zip(("wall_ms", "cpu_ms", "serialized"), scoped_change, strict=True)),
        "service_change_unscoped": dict(zip(("wall_ms", "cpu_ms", "scoped_views_cpu_ms"), unscoped_service, strict=True)),
        "service_change_with_scopes": dict(zip(("wall_ms", "cpu_ms", "scoped_views_cpu_ms"), scoped_service, strict=True)),
        "rss_mb": {"start": rss_start, "model": rss_model, "full_view_built": rss_full, "with_scopes": rss_scoped},
    }, indent=1))


if __name__ == "__main__":
    main()
