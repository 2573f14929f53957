"""Hold the cyclic garbage collector off while a bulk step allocates millions of long-lived objects.

Decoding a 100k-pod list (``json.loads``: ~3 million dicts, lists and strings) and assembling it triggers
the collector's full collections again and again: each scans every object allocated so far, all of them
alive, so at 10k services x 10 pods they cost seconds of the cold start and find nothing to free
(measured by ``benchmarks/bench_cold.py``: ``gc_s``). :func:`paused` disables the collector for the
duration of such a step. Reference counting still frees everything as usual; only reference cycles
made during the step wait for the next collection after it. Nestable and thread-safe: the collector
is enabled again when the last overlapping step ends, and only if it was enabled when the first began
(a process that disabled it itself keeps it disabled).
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["pause", "paused", "resume"]

_lock = threading.Lock()
_depth = 0
_reenable = False


def pause() -> None:
    """Disable the collector until the matching :func:`resume` (calls nest, across threads)."""
    global _depth, _reenable
    with _lock:
        if _depth == 0:
            _reenable = gc.isenabled()
            gc.disable()
        _depth += 1


def resume() -> None:
    """End one :func:`pause`; the last one enables the collector again if the first found it enabled."""
    global _depth
    with _lock:
        if _depth == 0:
            raise RuntimeError("gcpause.resume() without a matching pause()")
        _depth -= 1
        if _depth == 0 and _reenable:
            gc.enable()


@contextmanager
def paused() -> Iterator[None]:
    """Run the ``with`` body with the cyclic garbage collector disabled (see the module docstring)."""
    pause()
    try:
        yield
    finally:
        resume()
