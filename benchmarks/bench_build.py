"""Build + serialize benchmark of the core pipeline (not a test).

    python benchmarks/bench_build.py [--services 1000] [--endpoints 10] [--repeat 5]

Prints one JSON object: cold build time, resources and bytes produced, and for a one-endpoint change the
build time and the number of resources re-serialized (the target is exactly one ClusterLoadAssignment).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import attrs

from trafficmgr.core.model import Endpoint, Labels, Model, Service, ServicePort
from trafficmgr.core.plugins import PluginHost
from trafficmgr.core.translate.builder import Builder


def make_model(services: int, endpoints: int) -> Model:
    svcs, eps = {}, {}
    for i in range(services):
        name = f"svc-{i:04d}"
        labels = {"traffic.port.9080": "http"}
        if i % 4 == 0:
            labels.update({"traffic.lb.policy": "RING_HASH", "traffic.hash.cookie.name": "session"})
        svc = Service("default", name, (ServicePort("http", 9080, 9080, "http"),),
                      cluster_ip=f"10.96.{i // 250}.{i % 250 + 1}", labels=Labels(labels))
        svcs[svc.key] = svc
        eps[("default", name, "http")] = tuple(
            Endpoint(f"10.{100 + i // 250}.{i % 250}.{j + 1}", 9080, pod=f"{name}-{j}", namespace="default",
                     labels=Labels({"traffic.endpoint.weight": 100}))
            for j in range(endpoints)
        )
    return Model(services=svcs, endpoints=eps)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--services", type=int, default=1000)
    p.add_argument("--endpoints", type=int, default=10)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    plugins = PluginHost.load()
    model = make_model(args.services, args.endpoints)

    cold = []
    for _ in range(args.repeat):
        builder = Builder(plugins)
        t = time.perf_counter()
        snaps = builder.build(model)
        cold.append(time.perf_counter() - t)
    sidecar = snaps["sidecar"]
    nbytes = sum(len(r.body) for ts in sidecar.types.values() for r in ts.resources.values())

    incremental, reserialized = [], []
    key = ("default", "svc-0007", "http")
    for i in range(args.repeat):
        eps = list(model.endpoints[key])
        eps[0] = attrs.evolve(eps[0], labels=Labels({"traffic.endpoint.weight": 10 + i}))
        model = attrs.evolve(model, endpoints={**model.endpoints, key: tuple(eps)})
        t0, c0 = time.perf_counter(), time.process_time()
        builder.build(model)
        incremental.append((time.perf_counter() - t0, time.process_time() - c0))
        reserialized.append(builder.stats.total_serialized)

    print(json.dumps({
        "services": args.services,
        "endpoints_per_service": args.endpoints,
        "cold_build_s_median": round(statistics.median(cold), 4),
        "cold_build_s_all": [round(c, 4) for c in cold],
        "sidecar_resources": sidecar.resource_count(),
        "sidecar_bytes": nbytes,
        "incremental_wall_ms_median": round(statistics.median(w for w, _ in incremental) * 1000, 3),
        "incremental_cpu_ms_median": round(statistics.median(c for _, c in incremental) * 1000, 3),
        "incremental_resources_reserialized": reserialized,
        "plugins": sorted(plugins.infos),
    }, indent=2))


if __name__ == "__main__":
    main()
