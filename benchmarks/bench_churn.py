"""Control-plane memory under churn (a benchmark, not a test).

    python benchmarks/bench_churn.py [--services 1000] [--pods 3] [--changes 20000] [--cycles 2000]
                                     [--warmup 1000] [--no-envoy] [--tracemalloc]

The control plane as ``trafficmgr serve`` runs it (every built-in plugin, watches over HTTP, the xDS
server, ``freeze_gc``), in this process, against the test API server in a subprocess (its memory is not
counted), with one real Envoy sidecar connected over xDS when the binary is installed. Then, through the
API, as a cluster would see them:

- ``--changes`` label changes, alternating between a pod's ``traffic.endpoint.weight`` and a service's
  ``traffic.request.timeout`` / ``traffic.retries.5xx``, each with a value not seen before (so every cache
  keyed by label values sees new keys);
- ``--cycles`` pod create/delete cycles (a new pod with a new IP in one service, the EndpointSlice
  controller adds it, then it is deleted), spread evenly over the label changes.

RSS (``/proc/self/status`` VmRSS) is read after the first ``--warmup`` label changes and at the end, each
time once the sync loop has caught up (its queue empty, no build for 0.5 s) and after ``gc.collect()``.
Prints one JSON object; ``growth_pct`` is the end RSS against the warm-up RSS (the target: within 10 %).
``--tracemalloc`` traces allocations from the start (slower, and its own bookkeeping adds to RSS) and also
prints the net growth of live Python blocks and the 15 allocation sites that grew most between the two
points; ``--inspect`` prints the control plane's containers (dicts, lists, sets) whose length grew.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from trafficmgr.bench import Api, _start_envoy, load, rss_mb

MERGE = "application/merge-patch+json"


def settle(cp: Any, quiet: float = 0.5, timeout: float = 120) -> None:
    """Wait until the sync loop has applied every queued event and not built for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    builds, since = cp.builds, time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        if cp.builds != builds or not cp._queue.empty():
            builds, since = cp.builds, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
    raise RuntimeError("the control plane did not catch up")


def container_sizes(root: Any, path: str = "cp", depth: int = 4, seen: set[int] | None = None) -> dict[str, int]:
    """``len()`` of every dict, list, set and deque reachable from ``root`` through attributes of trafficmgr
    objects (``--inspect``: which of them grew is where memory goes)."""
    seen = set() if seen is None else seen
    out: dict[str, int] = {}
    if id(root) in seen or depth < 0:
        return out
    seen.add(id(root))
    attrs = getattr(root, "__dict__", None)
    names = list(attrs) if isinstance(attrs, dict) else list(getattr(type(root), "__slots__", ()))
    for name in names:
        value = getattr(root, name, None)
        where = f"{path}.{name}"
        if isinstance(value, (dict, list, set, frozenset, tuple)) or type(value).__name__ == "deque":
            try:
                out[where] = len(value)
            except TypeError:
                pass
            if isinstance(value, dict) and len(value) < 64:  # small dicts of objects: per-kind tables, watchers
                for key, item in value.items():
                    if type(item).__module__.startswith("trafficmgr"):
                        out.update(container_sizes(item, f"{where}[{key!r}]", depth - 1, seen))
            if isinstance(value, list) and len(value) < 64:
                for i, item in enumerate(value):
                    if type(item).__module__.startswith("trafficmgr"):
                        out.update(container_sizes(item, f"{where}[{i}]", depth - 1, seen))
        elif type(value).__module__.startswith("trafficmgr"):
            out.update(container_sizes(value, where, depth - 1, seen))
    return out


def measure(cp: Any) -> float:
    settle(cp)
    gc.collect()
    return round(rss_mb(), 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--services", type=int, default=1000)
    p.add_argument("--pods", type=int, default=3, help="ready pods per service at the start")
    p.add_argument("--changes", type=int, default=20_000)
    p.add_argument("--cycles", type=int, default=2_000)
    p.add_argument("--warmup", type=int, default=1_000)
    p.add_argument("--no-envoy", action="store_true")
    p.add_argument("--tracemalloc", action="store_true")
    p.add_argument("--inspect", action="store_true", help="print the containers of the control plane that grew")
    args = p.parse_args()

    from trafficmgr.core.controlplane import ControlPlane
    from trafficmgr.core.kube.client import KubeClient, load_api_client
    from trafficmgr.core.plugins import PluginHost
    from trafficmgr.core.xds.server import XdsServerThread

    if args.tracemalloc:  # from the start: the warm-up snapshot must hold every live block, not just new ones
        tracemalloc.start(12)
    workdir = Path(tempfile.mkdtemp(prefix="tm-churn-"))
    api = Api(workdir)
    cp = xds = envoy = None
    result: dict[str, Any] = {"services": args.services, "pods": args.services * args.pods, "changes": args.changes,
                              "cycles": args.cycles, "warmup": args.warmup}
    try:
        load(api, args.services, args.pods)
        result["rss_mb_before_control_plane"] = round(rss_mb(), 1)
        options = argparse.Namespace(xds_auth="none", sidecar_port=10000, sidecar_address="0.0.0.0",
                                     zipkin_address="127.0.0.1:9411")
        cp = ControlPlane(PluginHost.load(), options, KubeClient(load_api_client(str(api.kubeconfig))), freeze_gc=True)
        xds = XdsServerThread(cp.cache, "127.0.0.1", 0, authorizer=cp.authorize).start()
        cp.xds = xds
        cp.start_watches()
        if not cp.wait_ready(300):
            raise RuntimeError(f"control plane not ready: {cp.ready()[1]}")
        if not args.no_envoy:
            envoy = _start_envoy(xds.port, workdir)
        result["real_envoy"] = envoy is not None
        result["rss_mb_after_first_build"] = measure(cp)

        per_cycle = max(1, (args.changes - args.warmup) // max(1, args.cycles))
        cycles = 0
        started = time.perf_counter()

        def change(n: int) -> None:
            i = (n * 7919) % args.services  # spread over the services
            if n % 2 == 0:
                api.request("PATCH", f"/api/v1/namespaces/default/pods/svc-{i}-{n % args.pods}",
                            {"metadata": {"labels": {"traffic.endpoint.weight": str(1 + n % 128)}}}, MERGE)
            else:
                labels = ({"traffic.request.timeout": str(1000 + n)} if n % 4 == 1 else
                          {"traffic.retries.5xx": str(1 + n % 5), "traffic.request.timeout": None})
                api.request("PATCH", f"/api/v1/namespaces/default/services/svc-{i}", {"metadata": {"labels": labels}}, MERGE)

        def cycle(k: int) -> None:
            i = (k * 104729) % args.services
            n = 1_000_000 + k  # a new IP each time, outside the loaded pods' range
            name = f"churn-{k}"
            api.request("POST", "/api/v1/namespaces/default/pods", {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "default", "labels": {"app": f"svc-{i}"}},
                "spec": {"nodeName": "node-1", "containers": [{"name": "app", "image": "app"}]},
                "status": {"podIP": f"10.{64 + n // 65536 % 128}.{(n // 256) % 256}.{n % 256}",
                           "conditions": [{"type": "Ready", "status": "True"}]}})
            api.request("DELETE", f"/api/v1/namespaces/default/pods/{name}", {})

        for n in range(args.warmup):
            change(n)
        result["rss_mb_after_warmup"] = warm = measure(cp)
        sizes = container_sizes(cp) if args.inspect else {}
        if args.tracemalloc:
            before = tracemalloc.take_snapshot()
        for n in range(args.warmup, args.changes):
            change(n)
            if (n - args.warmup) % per_cycle == 0 and cycles < args.cycles:
                cycle(cycles)
                cycles += 1
        while cycles < args.cycles:
            cycle(cycles)
            cycles += 1
        result["rss_mb_end"] = end = measure(cp)
        result["seconds"] = round(time.perf_counter() - started, 1)
        result["builds"] = cp.builds
        result["growth_pct"] = round((end - warm) / warm * 100, 2)
        result["nacks"] = len(xds.nacks())
        result["model_pods"] = len(cp.assembler.pods)
        if args.inspect:
            grown = {k: (sizes.get(k, 0), v) for k, v in container_sizes(cp).items() if v > sizes.get(k, 0)}
            result["containers_grown"] = {k: f"{a} -> {b}" for k, (a, b) in sorted(grown.items(), key=lambda kv: kv[1][0] - kv[1][1])}
        print(json.dumps(result, indent=2), flush=True)
        if args.tracemalloc:
            after = tracemalloc.take_snapshot()
            result["tracemalloc_net_mb"] = round(sum(st.size_diff for st in after.compare_to(before, "filename")) / 2**20, 2)
            print(json.dumps({"tracemalloc_net_mb": result["tracemalloc_net_mb"]}), flush=True)
            for stat in after.compare_to(before, "traceback")[:15]:
                print(stat)
                for line in stat.traceback.format(most_recent_first=True)[:12]:
                    print("   ", line)
    finally:
        if envoy is not None:
            envoy.stop()
        if cp is not None:
            cp.stop()
        if xds is not None:
            xds.stop(0.5)
        api.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
