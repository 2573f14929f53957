"""The sync loop's work for one pod label change, in-process (not a test).

    python benchmarks/bench_sync.py [--services 1000[,10000]] [--pods 10] [--changes 50] [--profile]

Everything the control plane's sync thread does for one watch event, without the API server and the
threads around it: the assembler applies a Pod MODIFIED (its ``traffic.endpoint.weight`` changed), the
model is copied, the builder builds both views, and both pass the consistency gate into the snapshot
cache. Objects come from the test API server's store (its EndpointSlice controller makes the slices), so
they are what a watch delivers. Prints one JSON object per size with the CPU time per change (p50, min,
max), the most resources one change re-serialized and the most destinations the builder looked at; with
several sizes also the p50 ratio of the last to the first (same run). ``--profile`` also prints a
cProfile of the measured changes.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import gc
import json
import pstats
import statistics
import time
from typing import Any

import yaml

from trafficmgr.apiserver.controllers import Controllers
from trafficmgr.apiserver.store import Store
from trafficmgr.core.cache import SnapshotCache
from trafficmgr.core.controlplane import freeze_startup_objects
from trafficmgr.core.kube import assemble
from trafficmgr.core.kube.assemble import CORE_KINDS, Assembler
from trafficmgr.core.plugins import PluginHost
from trafficmgr.core.translate.builder import Builder, default_options
from trafficmgr.testing.manifests import pod, service


def listed(services: int, pods: int) -> dict[str, list[dict[str, Any]]]:
    """What an initial list returns for ``services`` Services with ``pods`` ready pods each."""
    store = Store()
    controllers = Controllers(store, endpointslices=True)
    controllers.start()
    try:
        for i in range(services):
            store.create(yaml.safe_load(service(f"svc-{i}")))
            for j in range(pods):
                store.create(yaml.safe_load(pod(f"svc-{i}-{j}", f"10.{i // 250}.{i % 250}.{j + 1}", f"svc-{i}")))
        controllers.wait_idle()
    finally:
        controllers.stop()
    return {k.plural: store.list(k.plural)["items"] for k in CORE_KINDS}


def measure(services: int, pods: int, changes: int, profile: cProfile.Profile | None) -> dict[str, Any]:
    """Load ``services`` x ``pods``, build once, then time ``changes`` one-pod label changes."""
    start = time.perf_counter()
    lists = listed(services, pods)
    loaded = time.perf_counter() - start
    plugins = PluginHost.load()
    assembler = Assembler(plugins.labels)
    for kind in CORE_KINDS:
        assembler.apply("RELIST", kind, lists[kind.plural])
    builder = Builder(plugins, default_options())
    snapshots = SnapshotCache()

    def cycle(obj: dict[str, Any]) -> None:
        assembler.apply("MODIFIED", assemble.POD, obj)
        for view, snap in builder.build(assembler.model()).items():
            snapshots.set_view(view, snap, notify=False)

    start = time.perf_counter()
    cycle(lists["pods"][0])  # the first build
    cold = time.perf_counter() - start
    # As `trafficmgr serve` does after its first snapshot: the start-up objects (100k pods' worth at 10k
    # services) leave the garbage collector's sight, so a collection does not scan them all.
    freeze_startup_objects()
    target = copy.deepcopy(lists["pods"][len(lists["pods"]) // 2])
    times, serialized, examined = [], [], []
    for n in range(changes):
        target["metadata"].setdefault("labels", {})["traffic.endpoint.weight"] = str(1 + n % 100)
        obj = copy.deepcopy(target)  # a watch delivers a new dict each time
        start = time.thread_time()
        if profile is not None:
            profile.enable()
        cycle(obj)
        if profile is not None:
            profile.disable()
        times.append((time.thread_time() - start) * 1000)
        serialized.append(builder.stats.total_serialized)
        examined.append(builder.services.examined)
    gc.unfreeze()
    return {
        "services": services, "pods": services * pods, "changes": changes,
        "load_s": round(loaded, 1), "first_build_s": round(cold, 2),
        "cpu_ms_p50": round(statistics.median(times), 3), "cpu_ms_min": round(min(times), 3),
        "cpu_ms_max": round(max(times), 3), "serialized_max": max(serialized),
        "destinations_examined_max": max(examined),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--services", default="1000", help="comma-separated sizes, measured one after the other in this run")
    p.add_argument("--pods", type=int, default=10)
    p.add_argument("--changes", type=int, default=50)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    sizes = [int(x) for x in args.services.split(",") if x.strip()]
    profile = cProfile.Profile() if args.profile else None
    results = []
    for size in sizes:
        results.append(measure(size, args.pods, args.changes, profile))
        print(json.dumps(results[-1]), flush=True)
    if len(results) > 1:
        first, last = results[0], results[-1]
        print(json.dumps({"cpu_ms_p50_ratio": round(last["cpu_ms_p50"] / first["cpu_ms_p50"], 2),
                          "of": f"{last['services']} vs {first['services']} services"}))
    if profile is not None:
        pstats.Stats(profile).sort_stats("cumulative").print_stats(20)


if __name__ == "__main__":
    main()
