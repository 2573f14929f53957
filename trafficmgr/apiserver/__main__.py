"""``python -m trafficmgr.apiserver --port N --kubeconfig PATH``: run the API server in the foreground."""

from __future__ import annotations

import argparse
import logging
import sys

from trafficmgr.core import argtypes

from .server import APIServer


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, serve until interrupted; returns the exit code."""
    p = argparse.ArgumentParser(prog="python -m trafficmgr.apiserver", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=argtypes.port, default=8080)
    p.add_argument("--kubeconfig", help="write a kubeconfig pointing at this server to PATH")
    p.add_argument("--history", type=argtypes.int_at_least(1), default=10000, help="watch event window size")
    p.add_argument("--workload-controllers", action="store_true",
                   help="run Deployment/ReplicaSet/Pod controllers with the fake pod runtime")
    p.add_argument("--no-endpointslice-controller", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO)
    srv = APIServer(host=args.host, port=args.port, history=args.history,
                    endpointslice_controller=not args.no_endpointslice_controller,
                    workload_controllers=args.workload_controllers)
    srv.start()
    if args.kubeconfig:
        srv.write_kubeconfig(args.kubeconfig)
    print(f"trafficmgr apiserver listening on {srv.url}", file=sys.stderr, flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
