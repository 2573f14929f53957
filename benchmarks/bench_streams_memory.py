"""Control-plane memory with many delta xDS streams (not a test).

    python benchmarks/bench_streams_memory.py [--services 10000] [--endpoints 10] [--clients 1000] [--tracemalloc]

The model is built in this process (as bench_push.py does: ``bench_build.make_model``), published to a
snapshot cache and served by our xDS server on a loop of its own; the start-up objects are frozen out of the
garbage collector as ``trafficmgr serve`` does. ``--clients`` simulated delta clients
(``trafficmgr.bench.clients`` in a subprocess, opening streams in waves of 100) connect and ACK everything;
then one endpoint change is pushed to all of them. Only this process (the control plane) is measured: its
Linux VmRSS after the build, at its peak while the streams connect (sampled every 50 ms), once every stream
has ACKed, at its peak during the push, and after it (``malloc_trim`` as the server does after a burst).
``--tracemalloc`` adds the top Python allocations by line once every stream is in sync (slow: tracing
every allocation roughly doubles the time; the gRPC core's buffers are C allocations it does not see).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import threading
import time
import tracemalloc
from pathlib import Path

import attrs
from bench_build import make_model

from trafficmgr.bench import Clients
from trafficmgr.core.cache import SnapshotCache
from trafficmgr.core.controlplane import freeze_startup_objects
from trafficmgr.core.model import Labels
from trafficmgr.core.plugins import PluginHost
from trafficmgr.core.translate.builder import Builder
from trafficmgr.core.xds.server import XdsServerThread, release_memory


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


class PeakSampler:
    """The highest VmRSS seen since the last :meth:`reset`, sampled every ``period`` seconds."""

    def __init__(self, period: float = 0.05) -> None:
        self.period, self.peak, self._stop = period, 0.0, threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.peak = max(self.peak, rss_mb())

    def reset(self) -> float:
        """The peak so far; starts a new one."""
        peak, self.peak = max(self.peak, rss_mb()), rss_mb()
        return peak

    def stop(self) -> None:
        self._stop.set()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--services", type=int, default=10000)
    p.add_argument("--endpoints", type=int, default=10)
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--tracemalloc", action="store_true", help="top Python allocations once in sync (slow)")
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args()
    result: dict[str, object] = {"services": args.services, "endpoints": args.endpoints, "clients": args.clients}
    model = make_model(args.services, args.endpoints)
    builder = Builder(PluginHost.load())
    cache = SnapshotCache(lambda node_id, cluster, peer: "sidecar")
    cache.set_view("sidecar", builder.build(model)["sidecar"])
    freeze_startup_objects()
    result["rss_built_mb"] = rss_mb()
    xds = XdsServerThread(cache, "127.0.0.1", 0).start()
    sampler = PeakSampler()
    if args.tracemalloc:
        tracemalloc.start(1)
    t0 = time.monotonic()
    sim = Clients(f"127.0.0.1:{xds.port}", args.clients, True, args.services, args.endpoints)
    try:
        ready = sim.ask(cmd="ready", timeout=600)["ready"]
        result["ready"] = ready
        result["connect_s"] = round(time.monotonic() - t0, 1)
        result["rss_peak_connect_mb"] = sampler.reset()
        time.sleep(3)  # the server trims memory 2 s after the last change; none here, but let writes finish
        gc.collect()
        result["rss_in_sync_mb"] = rss_mb()
        if args.tracemalloc:
            snap = tracemalloc.take_snapshot()
            result["tracemalloc_total_mb"] = round(sum(s.size for s in snap.statistics("filename")) / 2**20, 1)
            result["tracemalloc_peak_connect_mb"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
            result["tracemalloc_top"] = [
                f"{s.size / 2**20:.1f} MB {s.count} blocks {s.traceback[0].filename.rsplit('/', 2)[-1]}:{s.traceback[0].lineno}"
                for s in snap.statistics("lineno")[: args.top]
            ]
            tracemalloc.stop()
        # One endpoint change pushed to every stream.
        key = ("default", "svc-0011", "http")
        eps = list(model.endpoints[key])
        eps[0] = attrs.evolve(eps[0], labels=Labels({"traffic.endpoint.weight": 7}))
        model = attrs.evolve(model, endpoints={**model.endpoints, key: tuple(eps)})
        sampler.reset()
        sim.ask(cmd="drain")
        since = time.time()
        cache.set_view("sidecar", builder.build(model)["sidecar"])
        lat = sim.ask(cmd="wait", since=since, type="endpoints", timeout=120)["latency_ms"]
        result["push_acked"] = len(lat)
        result["push_max_ms"] = round(max(lat), 1) if lat else None
        result["rss_peak_push_mb"] = sampler.reset()
        time.sleep(3)
        release_memory()
        result["rss_after_push_mb"] = rss_mb()
        result["streams"] = len(xds.status())
    finally:
        sim.close()
        sampler.stop()
        xds.stop(0.5)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
