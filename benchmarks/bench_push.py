"""The xDS push alone: our server against the minimal ADS loop on the same snapshot, in one run.

No API server and no watches: a one-endpoint change is built in this process and published to the
snapshot cache; the time is from the publication to the last simulated client's ACK (p50 of --changes).
The simulated clients are ``trafficmgr.bench.clients`` in a subprocess, as in ``trafficmgr bench``.

    python benchmarks/bench_push.py --clients 100 --mode delta
    python benchmarks/bench_push.py --clients 1000 --mode delta --change cluster

``--change cluster`` changes a service label instead (``traffic.lb.policy``: its Cluster changes, and its
endpoints must follow, unchanged, because Envoy warms a replaced cluster until they arrive); the time is
to the last ACK of those endpoints. The minimal loop has nothing to compare that with: ours only.
"""

from __future__ import annotations

import argparse
import json
import time

import attrs
from bench_build import make_model

from trafficmgr.bench import Clients, _pct
from trafficmgr.bench.minimal import MinimalAds
from trafficmgr.core.cache import SnapshotCache
from trafficmgr.core.model import Labels
from trafficmgr.core.plugins import PluginHost
from trafficmgr.core.translate.builder import Builder
from trafficmgr.core.xds.server import XdsServerThread


def measure(sim: Clients, changes: int, push: object) -> float:
    """p50 over ``changes`` of the time from ``push(i)`` to the last client's ACK of endpoints."""
    worst = []
    for i in range(changes):
        sim.ask(cmd="drain")
        since = time.time()
        push(i)  # type: ignore[operator]
        latencies = sim.ask(cmd="wait", since=since, type="endpoints", timeout=60)["latency_ms"]
        worst.append(max(latencies) if latencies else float("nan"))
    return _pct(worst, 0.5)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--services", type=int, default=1000)
    p.add_argument("--endpoints", type=int, default=10)
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--mode", choices=("sotw", "delta"), default="delta")
    p.add_argument("--changes", type=int, default=30)
    p.add_argument("--change", choices=("endpoint", "cluster"), default="endpoint")
    args = p.parse_args()
    delta = args.mode == "delta"
    model = make_model(args.services, args.endpoints)
    builder = Builder(PluginHost.load())
    cache = SnapshotCache(lambda node_id, cluster, peer: "sidecar")
    cache.set_view("sidecar", builder.build(model)["sidecar"])
    xds = XdsServerThread(cache, "127.0.0.1", 0).start()
    key = ("default", "svc-0011", "http")

    def publish(i: int) -> None:
        nonlocal model
        if args.change == "cluster":
            svc = model.services[key[:2]]
            policy = ("RANDOM", "LEAST_REQUEST")[i % 2]
            svc = attrs.evolve(svc, labels=Labels({**svc.labels, "traffic.lb.policy": policy}))
            model = attrs.evolve(model, services={**model.services, key[:2]: svc})
        else:
            eps = list(model.endpoints[key])
            eps[0] = attrs.evolve(eps[0], labels=Labels({"traffic.endpoint.weight": 1 + i % 120}))
            model = attrs.evolve(model, endpoints={**model.endpoints, key: tuple(eps)})
        cache.set_view("sidecar", builder.build(model)["sidecar"])

    result: dict[str, object] = {"clients": args.clients, "mode": args.mode, "change": args.change}
    runs = (("ours", lambda: f"127.0.0.1:{xds.port}", publish),) + ((("minimal", None, None),) if args.change == "endpoint" else ())
    for name, target, push in runs:
        minimal = None
        if name == "minimal":
            minimal = MinimalAds(cache.get("sidecar")).start()  # type: ignore[arg-type]
            target, push = (lambda m=minimal: f"127.0.0.1:{m.port}"), (lambda i, m=minimal: m.push(f"m{i}"))
        sim = Clients(target(), args.clients, delta, args.services, args.endpoints)  # type: ignore[misc]
        try:
            if sim.ask(cmd="ready", timeout=180)["ready"] < args.clients:
                raise SystemExit("not every simulated client got its configuration")
            time.sleep(1)
            result[f"{name}_p50_ms"] = round(measure(sim, args.changes, push), 2)
        finally:
            sim.close()
            if minimal is not None:
                minimal.stop()
    xds.stop(0.5)
    if "minimal_p50_ms" in result:
        result["ratio"] = round(result["ours_p50_ms"] / result["minimal_p50_ms"], 2)  # type: ignore[operator]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
