"""Cold start of the control plane, phase by phase, against the project's API server (not a test).

    python benchmarks/bench_cold.py [--services 10000] [--pods 10] [--page-size N] [--profile]

Starts ``python -m trafficmgr.apiserver`` in a subprocess and loads S Services x P ready Pods through its
REST API (:func:`trafficmgr.bench.load`, what ``trafficmgr bench`` does: the EndpointSlice controller
makes the slices). Then, in this process, a :class:`~trafficmgr.core.controlplane.ControlPlane` (every
plugin, ``freeze_gc`` as ``serve`` runs it) is timed from ``start_watches()`` to its first published
snapshot (``wait_ready``), with the time split into:

- ``lists``: per kind, ``http_s`` (the list requests until their bodies are read) and ``decode_s`` (the rest
  of ``KubeClient.list``: the JSON decode), summed over the list's ``pages`` (``--page-size``); the watcher
  threads run in parallel and share the GIL;
- ``all_synced_s``: wall time until every watcher has listed once;
- ``relist_s``: the assembler's RELIST of each kind, its pages summed (in the sync thread);
- ``build_s``: the first ``Builder.build``; ``publish_s``: the rest of the first ``publish_model``
  (consistency gate, snapshot cache, status) without the garbage collector freeze, reported apart as
  ``freeze_s`` (it runs after the snapshot is out);
- ``rss_mb_at_ready`` / ``rss_mb_after_freeze``: this process's RSS then, and after the first collection;
- ``gc_s``: time in the garbage collector's collections until ready (any thread), and how many were full;
- ``cold_start_s``: ``start_watches()`` to ready (the figure with the 8 s target), and
  ``cold_start_cpu_s``, the CPU this process used meanwhile (all threads: on a shared machine the wall
  time also counts other processes' turns; the API server's own CPU is not in it).

Prints one JSON object. ``--profile`` prints a cProfile of the sync thread's RELISTs and first build.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import pstats
import tempfile
import threading
import time
from pathlib import Path
from typing import Any


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--services", type=int, default=10000)
    p.add_argument("--pods", type=int, default=10)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--page-size", type=int, default=None,
                   help="the watchers' list limit (default: trafficmgr.core.kube.watch.LIST_PAGE_SIZE; 0: no paging)")
    args = p.parse_args()

    from trafficmgr.bench import Api, load, rss_mb
    from trafficmgr.core import controlplane as cp_mod
    from trafficmgr.core.controlplane import ControlPlane
    from trafficmgr.core.kube import watch as watch_mod
    from trafficmgr.core.kube.client import KubeClient, load_api_client
    from trafficmgr.core.plugins import PluginHost

    if args.page_size is not None:
        watch_mod.LIST_PAGE_SIZE = args.page_size

    workdir = Path(tempfile.mkdtemp(prefix="tm-bench-cold-"))
    api = Api(workdir)
    result: dict[str, Any] = {"services": args.services, "pods": args.services * args.pods,
                              "page_size": watch_mod.LIST_PAGE_SIZE}
    lock = threading.Lock()
    lists: dict[str, dict[str, float]] = {}
    relists: dict[str, float] = {}
    marks: dict[str, float] = {}
    profile = cProfile.Profile() if args.profile else None
    try:
        loaded = load(api, args.services, args.pods)
        result["load_s"] = round(loaded["seconds"], 2)

        options = argparse.Namespace(xds_auth="none", sidecar_port=10000, sidecar_address="0.0.0.0",
                                     zipkin_address="127.0.0.1:9411")
        kube = KubeClient(load_api_client(str(api.kubeconfig)))
        cp = ControlPlane(PluginHost.load(), options, kube, freeze_gc=True)

        # Instrumentation only: wrap the pieces, do not change what they do.
        orig_call, orig_list = kube._call, kube.list
        read_done: dict[str, float] = {}

        def timed_call(method: str, path: str, *a: Any, **k: Any) -> Any:
            resp = orig_call(method, path, *a, **k)
            orig_read = resp.read

            def read(*ra: Any) -> Any:
                data = orig_read(*ra)
                read_done[path] = time.perf_counter()
                return data

            resp.read = read
            return resp

        def timed_list(path: str, query: dict[str, Any] | None = None, timeout: Any = 60) -> dict[str, Any]:
            t0 = time.perf_counter()
            obj = orig_list(path, query, timeout=timeout)
            t2 = time.perf_counter()
            t1 = read_done.get(path, t2)
            with lock:  # summed over the list's pages
                entry = lists.setdefault(path, {"http_s": 0.0, "decode_s": 0.0, "items": 0, "pages": 0})
                entry["http_s"] = round(entry["http_s"] + t1 - t0, 3)
                entry["decode_s"] = round(entry["decode_s"] + t2 - t1, 3)
                entry["items"] += len(obj.get("items", []))
                entry["pages"] += 1
            return obj

        kube._call = timed_call  # type: ignore[method-assign]
        kube.list = timed_list  # type: ignore[method-assign]

        orig_apply = cp.assembler.apply

        def timed_apply(etype: str, kind: Any, obj: Any) -> None:
            if etype != "RELIST":
                orig_apply(etype, kind, obj)
                return
            if profile is not None:
                profile.enable()
            t0 = time.perf_counter()
            orig_apply(etype, kind, obj)
            relists[kind.plural] = round(relists.get(kind.plural, 0.0) + time.perf_counter() - t0, 3)
            if profile is not None:
                profile.disable()

        cp.assembler.apply = timed_apply  # type: ignore[method-assign]
        orig_build = cp.builder.build

        def timed_build(model: Any) -> Any:
            marks["build_start"] = time.perf_counter()
            if profile is not None:
                profile.enable()
            out = orig_build(model)
            if profile is not None:
                profile.disable()
            marks["build_end"] = time.perf_counter()
            return out

        cp.builder.build = timed_build  # type: ignore[method-assign]
        orig_publish = cp.publish_model

        def timed_publish(model: Any) -> None:
            t0 = time.perf_counter()
            if profile is not None and not marks.get("published"):
                profile.enable()
            orig_publish(model)
            if profile is not None:
                profile.disable()
            marks.setdefault("publish_s", time.perf_counter() - t0)
            marks["published"] = 1

        cp.publish_model = timed_publish  # type: ignore[method-assign]
        orig_freeze = cp_mod.freeze_startup_objects

        def timed_freeze() -> None:
            t0 = time.perf_counter()
            orig_freeze()
            marks["freeze_s"] = time.perf_counter() - t0

        cp_mod.freeze_startup_objects = timed_freeze

        gc_time = [0.0, 0, 0.0]  # seconds in collections, full collections, start of the current one

        def on_gc(phase: str, info: dict[str, Any]) -> None:
            if phase == "start":
                gc_time[2] = time.perf_counter()
            else:
                gc_time[0] += time.perf_counter() - gc_time[2]
                gc_time[1] += info.get("generation") == 2

        gc.callbacks.append(on_gc)
        t, cpu0 = time.perf_counter(), time.process_time()
        cp.start_watches()
        synced_at = None
        while not cp.ready()[0]:
            if synced_at is None and cp.synced():
                synced_at = time.perf_counter()
            if time.perf_counter() - t > 300:
                raise RuntimeError(f"control plane not ready: {cp.ready()[1]}")
            time.sleep(0.005)
        cold, cpu = time.perf_counter() - t, time.process_time() - cpu0
        gc_until_ready = (round(gc_time[0], 3), gc_time[1])
        rss_at_ready = rss_mb()
        time.sleep(0.5)
        while "freeze_s" not in marks and time.perf_counter() - t < 120:
            time.sleep(0.05)
        result["cold_start_s"] = round(cold, 3)
        result["cold_start_cpu_s"] = round(cpu, 3)  # this process, every thread
        result["gc_s"], result["gc_full_collections"] = gc_until_ready  # start_watches() to ready
        result["all_synced_s"] = round((synced_at or time.perf_counter()) - t, 3)
        result["lists"] = {path.rsplit("/", 1)[-1]: v for path, v in sorted(lists.items())}
        result["relist_s"] = relists
        result["relist_total_s"] = round(sum(relists.values()), 3)
        build = marks.get("build_end", 0.0) - marks.get("build_start", 0.0)
        result["build_s"] = round(build, 3)
        result["publish_s"] = round(marks.get("publish_s", 0.0) - build - marks.get("freeze_s", 0.0), 3)
        result["freeze_s"] = round(marks.get("freeze_s", 0.0), 3)
        result["rss_mb_at_ready"] = round(rss_at_ready, 1)
        result["rss_mb_after_freeze"] = round(rss_mb(), 1)
        result["builds"] = cp.builds
        first = cp.cache.get("sidecar")
        result["resources"] = first.resource_count() if first is not None else None
        cp.stop()
    finally:
        api.stop()
    print(json.dumps(result, indent=2), flush=True)
    if profile is not None:
        pstats.Stats(profile).sort_stats("cumulative").print_stats(40)
        pstats.Stats(profile).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
