"""Stopping long-running commands cleanly."""

from __future__ import annotations

import signal
import threading


def stop_on_signals(stop: threading.Event | None = None) -> threading.Event:
    """``stop`` (or a new Event), set by SIGTERM or SIGINT. The handlers are installed only on the main
    thread; elsewhere (tests) setting the event is the only way out."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    return stop
