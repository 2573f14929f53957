"""Loading the project's API server over HTTP: does a create cost more as the store grows? (not a test)

    python benchmarks/bench_apiserver.py [--services 10000] [--pods 10] [--connections 2] [--processes 2]
                                         [--window 16]

Starts ``python -m trafficmgr.apiserver`` (HTTPS, bearer token, EndpointSlice controller on: what
``trafficmgr bench`` and local mode run) and creates S Services, then S*P ready Pods through its REST API
as a cluster's clients would: one ``POST`` per object on keep-alive HTTPS connections
(:class:`trafficmgr.bench.loader.Loader`: ``--connections`` per client process, ``--processes`` client
processes). No bulk path: every object goes through routing, authentication, admission, field-manager
tracking, the store and the controllers exactly as a single create does.

Prints one JSON object: objects created, seconds, creates/s over the first and the last tenth of the
pods (``end_over_start`` ~1 means a create costs the same in a full store as in an empty one), the
server's CPU seconds (its ``/proc`` counters) and the EndpointSlices it made.
"""

from __future__ import annotations

import argparse
import json
import time

from trafficmgr.bench import Api, load


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--services", type=int, default=10000)
    p.add_argument("--pods", type=int, default=10)
    p.add_argument("--connections", type=int, default=2, help="keep-alive connections per client process")
    p.add_argument("--processes", type=int, default=2, help="client processes")
    p.add_argument("--window", type=int, default=16, help="pipelined requests in flight per connection")
    args = p.parse_args()
    import tempfile
    from pathlib import Path

    workdir = Path(tempfile.mkdtemp(prefix="tm-bench-apiserver-"))
    api = Api(workdir)
    try:
        cpu0 = api.cpu_seconds()
        t = time.perf_counter()
        stats = load(api, args.services, args.pods, connections=args.connections, processes=args.processes,
                     window=args.window)
        seconds = time.perf_counter() - t
        slices = api.count("/apis/discovery.k8s.io/v1/endpointslices")
        result = {
            "services": args.services, "pods": args.services * args.pods,
            "objects": args.services * (1 + args.pods), "seconds": round(seconds, 2),
            "creates_per_s": round(args.services * (1 + args.pods) / seconds, 1),
            "pods_per_s_first_tenth": stats["first_rate"], "pods_per_s_last_tenth": stats["last_rate"],
            "end_over_start": round(stats["last_rate"] / stats["first_rate"], 3) if stats["first_rate"] else None,
            "slices_settled_s": stats["settled_s"],
            "server_cpu_s": round(api.cpu_seconds() - cpu0, 2),
            "endpointslices": slices,
            "connections": args.connections, "processes": args.processes, "window": args.window,
        }
    finally:
        api.stop()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
