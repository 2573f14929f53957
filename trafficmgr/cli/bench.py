"""``trafficmgr bench``: the command line of :mod:`trafficmgr.bench`."""

from __future__ import annotations

import argparse
import json

from trafficmgr.bench import run_bench
from trafficmgr.cli import CliError, register_command
from trafficmgr.core import argtypes


def _setup(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--services", type=argtypes.int_at_least(1), default=1000, help="services (default 1000)")
    parser.add_argument("--pods", type=argtypes.int_at_least(1), default=10, help="pods per service (default 10)")
    parser.add_argument("--clients", default="100,1000", help="simulated xDS clients, comma-separated (default 100,1000)")
    parser.add_argument("--changes", type=argtypes.int_at_least(1), default=20, help="label changes per propagation run (default 20)")
    parser.add_argument("--no-envoy", action="store_true", help="do not connect a real Envoy")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _run(args: argparse.Namespace) -> int:
    try:
        clients = tuple(int(c) for c in args.clients.split(",") if c.strip())
    except ValueError:
        raise CliError(f"--clients must be comma-separated numbers, not {args.clients!r}") from None
    if args.services < 1 or args.pods < 1 or not clients or min(clients) < 1 or args.changes < 1:
        raise CliError("--services, --pods, --clients and --changes must be positive")
    result = run_bench(args.services, args.pods, clients, args.changes, not args.no_envoy)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:36} {value}")
    return 0


register_command("bench", "scale benchmark of the whole pipeline (not a test)", _setup, _run, replace=True)
