"""``python -m trafficmgr.apiserver --port N --kubeconfig PATH``: run the API server in the foreground.

Every request needs ``Authorization: Bearer <token>``: the token comes from ``--token-file`` or, without
it, is generated at start; either way it is written into ``--kubeconfig`` (mode 0600). One of the two
options is required, else nobody could use the server.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import threading
import time

from trafficmgr.core import argtypes

from .access import TokenError, new_token, read_token_file
from .server import APIServer
from .store import Store

#: Commits between two heap freezes, and seconds between two when there are fewer (see ``Store.freeze_heap``).
FREEZE_EVERY = 20000
FREEZE_PERIOD = 30.0


def manage_gc(store: Store, period: float = FREEZE_PERIOD) -> threading.Thread:
    """Turn the process's automatic garbage collections off and collect (then freeze) every ``period``
    seconds on a daemon thread, besides every ``FREEZE_EVERY`` commits (the store does that): this process
    holds the store's acyclic objects and little else, and the periodic collection reclaims the reference
    cycles the request threads leave behind."""
    gc.disable()

    def loop() -> None:
        while True:
            time.sleep(period)
            store.freeze_heap()

    thread = threading.Thread(target=loop, name="apiserver-gc", daemon=True)
    thread.start()
    return thread


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, serve until interrupted; returns the exit code."""
    p = argparse.ArgumentParser(prog="python -m trafficmgr.apiserver", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=argtypes.port, default=8080)
    p.add_argument("--kubeconfig", help="write a kubeconfig pointing at this server, with its token, to PATH (mode 0600)")
    p.add_argument("--token-file", metavar="PATH",
                   help="the bearer token every request must carry (default: a random one, see --kubeconfig)")
    p.add_argument("--history", type=argtypes.int_at_least(1), default=10000, help="watch event window size")
    p.add_argument("--workload-controllers", action="store_true",
                   help="run Deployment/ReplicaSet/Pod controllers with the fake pod runtime")
    p.add_argument("--no-endpointslice-controller", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if not args.kubeconfig and not args.token_file:
        p.error("give --kubeconfig (the generated token is written into it) or --token-file")
    try:
        token = read_token_file(args.token_file) if args.token_file else new_token()
    except TokenError as exc:
        p.error(f"--token-file: {exc}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO)
    srv = APIServer(host=args.host, port=args.port, history=args.history,
                    endpointslice_controller=not args.no_endpointslice_controller,
                    workload_controllers=args.workload_controllers, token=token, freeze_every=FREEZE_EVERY)
    manage_gc(srv.store)
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
