"""``python -m trafficmgr.cli.container --ip POD_IP --dir POD_DIR -- <trafficmgr args>``: run one
container of the trafficmgr image as a local process.

The image's entrypoint is ``trafficmgr``, so ``args`` are a ``trafficmgr`` command line. A pod has no
network namespace in local mode, so a bind to ``0.0.0.0`` (or ``""``) is made on the pod IP instead:
the app listens on ``<pod IP>:<port>`` as it would listen on every address of its own namespace.
``--dir`` is the pod's directory (working directory; it also marks the process as the demo's).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any


def bind_to(ip: str) -> None:
    """Make ``socket.bind(("0.0.0.0" | "", port))`` bind ``ip`` in this process."""
    original = socket.socket.bind

    def bind(self: socket.SocketType, address: Any) -> None:
        if isinstance(address, tuple) and self.family == socket.AF_INET and address[0] in ("", "0.0.0.0"):
            address = (ip, *address[1:])
        original(self, address)

    socket.socket.bind = bind  # type: ignore[method-assign]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trafficmgr.cli.container")
    parser.add_argument("--ip", required=True, help="the pod IP")
    parser.add_argument("--dir", required=True, help="the pod's directory")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then the trafficmgr command line")
    ns = parser.parse_args(argv)
    args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
    os.chdir(ns.dir)
    bind_to(ns.ip)
    from trafficmgr.cli import main as cli_main

    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
