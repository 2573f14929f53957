"""``trafficmgr zipkin``, ``trafficmgr text-response``, ``trafficmgr bookinfo``, ``trafficmgr grpc-echo`` and
``trafficmgr ws-echo``: the small apps of :mod:`trafficmgr.apps` as commands (each also runs with
``python -m trafficmgr.apps.<module>``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from trafficmgr.apps import bookinfo, grpc_echo, text_response, ws_echo, zipkin
from trafficmgr.apps.base import AppCommand
from trafficmgr.cli import CliError, register_command


def _run(app: AppCommand) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return app.serve(args)
        except OSError as exc:
            raise CliError(f"cannot listen on {args.host}:{args.port}: {exc} (use --port)") from None

    return run


for _app in (zipkin.COMMAND, text_response.COMMAND, bookinfo.COMMAND, grpc_echo.COMMAND, ws_echo.COMMAND):
    register_command(_app.name, _app.help, _app.add_arguments, _run(_app), replace=True)
