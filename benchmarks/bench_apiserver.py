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

Then (``--lists``, on by default) ``lists``: the pods list over one keep-alive HTTPS connection, timed from
the request to the last byte of the answer (the client does not decode it), as a control plane's first
list: ``full_s`` (twice: ``full_s`` lists the first and second), and paged with ``limit`` 500 and 5000
(``pages``, ``total_s``, ``page_p50_ms``, following ``metadata.continue`` to the end; a server that ignores
``limit`` answers one page), the answer's size and the server's RSS before and after the lists.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import time
from typing import Any

from trafficmgr.bench import Api, load


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def lists(api: Api, path: str = "/api/v1/pods") -> dict[str, Any]:
    """Time the list at ``path``: whole (twice) and paged with limit 500 and 5000 (see the module doc)."""
    conn = http.client.HTTPSConnection("127.0.0.1", api.port, timeout=120, context=api.ssl_context)

    def get(query: str) -> tuple[float, bytes]:
        t = time.perf_counter()
        conn.request("GET", path + query, headers=api.auth)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"GET {path}{query}: {resp.status} {body[:300]!r}")
        return time.perf_counter() - t, body

    rss0 = _rss_mb(api.proc.pid)
    out: dict[str, Any] = {"full_s": []}
    for _ in range(2):
        seconds, body = get("")
        out["full_s"].append(round(seconds, 3))
    out["full_mb"] = round(len(body) / 1e6, 1)
    out["items"] = len(json.loads(body)["items"])
    for limit in (500, 5000):
        times, token, items = [], "", 0
        while True:
            seconds, body = get(f"?limit={limit}" + (f"&continue={token}" if token else ""))
            times.append(seconds)
            page = json.loads(body)  # (decoding is not timed)
            items += len(page["items"])
            token = page["metadata"].get("continue", "")
            if not token:
                break
        out[f"limit_{limit}"] = {"pages": len(times), "items": items, "total_s": round(sum(times), 3),
                                 "page_p50_ms": round(statistics.median(times) * 1000, 1),
                                 "page_max_ms": round(max(times) * 1000, 1)}
    out["server_rss_mb_before_after"] = [rss0, _rss_mb(api.proc.pid)]
    conn.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--services", type=int, default=10000)
    p.add_argument("--pods", type=int, default=10)
    p.add_argument("--connections", type=int, default=2, help="keep-alive connections per client process")
    p.add_argument("--processes", type=int, default=2, help="client processes")
    p.add_argument("--window", type=int, default=16, help="pipelined requests in flight per connection")
    p.add_argument("--lists", action=argparse.BooleanOptionalAction, default=True,
                   help="time the pods list, whole and paged, after loading")
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
        if args.lists:
            result["lists"] = lists(api)
    finally:
        api.stop()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
