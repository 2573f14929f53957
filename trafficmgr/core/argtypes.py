"""argparse ``type=`` converters shared by every command: a bad value is a usage error naming the range.

``type=int`` alone accepts ``--port 99999`` (and fails later with an ``OverflowError`` deep in a socket
call) or ``--tail -1``; these converters reject such values where argparse reports them.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable


def port(text: str) -> int:
    """A TCP port number, 0..65535 (0 means "any free port" or "off", as the option says)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number (0..65535)")
    return value


def listen_port(text: str) -> int:
    """A port something listens on or connects to, 1..65535."""
    value = port(text)
    if value == 0:
        raise argparse.ArgumentTypeError("0 is not a usable port here (1..65535)")
    return value


def int_at_least(minimum: int) -> Callable[[str], int]:
    """A converter for whole numbers >= ``minimum``."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is less than {minimum}")
        return value

    convert.__name__ = f"integer >= {minimum}"  # argparse names the type in some messages
    return convert


def positive_seconds(text: str) -> float:
    """A duration in seconds, > 0 (``0``, negatives, ``nan`` and ``inf`` are rejected)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a duration > 0 seconds")
    return value
