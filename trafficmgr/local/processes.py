"""Child processes of local mode: pid files, stopping, and removing leftovers of a demo killed hard.

Every child runs in its own session (so a terminal's Ctrl-C reaches only the demo, which then stops the
children in order) and has a pid file under the state directory. A child's command line always contains
the state directory (its config, pod directory or kubeconfig path), which is how a leftover is told apart
from an unrelated process that got the same pid.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterable


def write_pid(path: str, pid: int) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{pid}\n")


def cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _signal(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # its own session: the group id is its pid
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def terminate_all(procs: Iterable[subprocess.Popen[bytes]], timeout: float = 5.0) -> None:
    """SIGTERM every process (and its group) at once, SIGKILL what is left after ``timeout``, reap all."""
    procs = [p for p in procs if p is not None]
    for p in procs:
        if p.poll() is None:
            _signal(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal(p.pid, signal.SIGKILL)
            p.wait(5)


def kill_leftovers(state_dir: str) -> list[int]:
    """Kill processes recorded by ``*.pid`` files under ``state_dir`` whose command line still names
    ``state_dir`` (a previous demo that did not stop cleanly); removes the pid files. Returns the pids."""
    marker = os.path.abspath(state_dir).encode()
    killed = []
    for root, _dirs, files in os.walk(state_dir):
        for name in files:
            if not name.endswith(".pid"):
                continue
            path = os.path.join(root, name)
            try:
                with open(path, encoding="utf-8") as f:
                    pid = int(f.read().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid > 1 and marker in cmdline(pid):
                _signal(pid, signal.SIGKILL)
                killed.append(pid)
            try:
                os.remove(path)
            except OSError:
                pass
    for pid in killed:
        deadline = time.monotonic() + 5
        while cmdline(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    return killed
