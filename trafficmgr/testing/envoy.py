"""Real Envoy processes and an in-process control plane for tests.

``EnvoyProcess`` owns one Envoy: it writes the bootstrap, starts Envoy in its own process group, waits
for the admin endpoint, and always kills it by pid on exit (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from trafficmgr.core import envoy as envoy_mod
from trafficmgr.core.bootstrap import bootstrap as make_bootstrap
from trafficmgr.core.cache import SnapshotCache
from trafficmgr.core.xds.server import XdsServerThread

T = TypeVar("T")


class EnvoyStartError(RuntimeError):
    """Envoy exited or did not become ready in time (the message ends with the tail of its log)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], T | None], timeout: float = 10.0, interval: float = 0.05, message: str = "") -> T:
    """Poll ``predicate`` until it returns something truthy (returned); raise ``TimeoutError`` otherwise.

    Exceptions raised by ``predicate`` count as "not yet"; the last one is chained to the timeout.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
            last_exc = None
        except Exception as exc:  # noqa: BLE001 - documented: a predicate that raises is "not yet"; the last error is chained
            last_exc = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(message or f"condition not met within {timeout}s") from last_exc
        time.sleep(interval)


class EnvoyProcess:
    """One Envoy started from ``bootstrap`` in ``workdir`` (``envoy.json``, ``envoy.log``).

    ``wait``: ``"live"`` (admin ``/ready`` answers LIVE, i.e. initial xDS fetch done), ``"admin"`` (admin
    answers at all) or ``None``. The admin port is taken from Envoy itself (``--admin-address-path``),
    so the bootstrap may use admin port 0.
    """

    def __init__(
        self,
        bootstrap: Mapping[str, Any],
        workdir: Path,
        concurrency: int = 1,
        log_level: str = "info",
        wait: str | None = "live",
        timeout: float = 20.0,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.bootstrap = dict(bootstrap)
        self.workdir = Path(workdir)
        self.concurrency = concurrency
        self.log_level = log_level
        self.wait = wait
        self.timeout = timeout
        self.extra_args = extra_args
        self.config_path = self.workdir / "envoy.json"
        self.log_path = self.workdir / "envoy.log"
        self.address_path = self.workdir / "admin.address"
        self.proc: subprocess.Popen[bytes] | None = None
        self.admin_url = ""

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> EnvoyProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.bootstrap, indent=2, sort_keys=True))
        self.address_path.unlink(missing_ok=True)
        cmd = envoy_mod.envoy_command(
            self.config_path,
            concurrency=self.concurrency,
            log_level=self.log_level,
            log_path=self.log_path,
            admin_address_path=self.address_path,
            extra_args=self.extra_args,
        )
        self.proc = envoy_mod.start_envoy(cmd, self.workdir / "envoy.out")
        try:
            self._wait_admin()
            if self.wait == "live":
                self.wait_live()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_admin(self) -> None:
        if self.wait is None:
            return
        deadline = time.monotonic() + self.timeout
        while not self.address_path.exists() or not self.address_path.read_text().strip():
            self._check_alive()
            if time.monotonic() > deadline:
                raise EnvoyStartError(f"Envoy admin did not come up within {self.timeout}s{self._tail()}")
            time.sleep(0.02)
        address = self.address_path.read_text().strip()
        self.admin_url = f"http://{address}"

    def wait_live(self, timeout: float | None = None) -> None:
        """Wait until ``/ready`` says LIVE (raises :class:`EnvoyStartError` with the log tail)."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            try:
                if self.admin("/ready").strip() == "LIVE":
                    return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                state = ""
                try:
                    state = json.loads(self.admin("/server_info")).get("state", "")
                except Exception:  # noqa: BLE001 - best effort: the state only decorates the EnvoyStartError below
                    pass
                raise EnvoyStartError(f"Envoy not LIVE within {timeout}s (state {state!r}){self._tail()}")
            time.sleep(0.05)

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise EnvoyStartError(f"Envoy exited with status {self.proc.returncode}{self._tail()}")

    def _tail(self, lines: int = 40) -> str:
        text = ""
        for path in (self.log_path, self.workdir / "envoy.out"):
            if path.exists():
                text += "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) + "\n"
        return f"\n--- tail of Envoy log ({self.workdir}) ---\n{text}" if text else ""

    def stop(self) -> None:
        """Kill Envoy by pid (SIGTERM, then SIGKILL); safe to call repeatedly."""
        if self.proc is not None:
            envoy_mod.stop_process(self.proc, grace=3.0)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def __enter__(self) -> EnvoyProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- admin -----------------------------------------------------------------------------------

    def admin(self, path: str, method: str = "GET", timeout: float = 5.0) -> str:
        """Body of an admin request (``path`` starts with ``/``); raises on HTTP errors."""
        req = urllib.request.Request(self.admin_url + path, method=method)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read().decode()

    def stats(self) -> dict[str, int]:
        """Counters and gauges by name (histograms and text stats left out)."""
        data = json.loads(self.admin("/stats?format=json"))
        out: dict[str, int] = {}
        for item in data.get("stats", []):
            value = item.get("value")
            if isinstance(value, int):
                out[item["name"]] = value
        return out

    def prometheus(self) -> str:
        return self.admin("/stats/prometheus")

    def config_dump(self, include_eds: bool = True) -> dict[str, Any]:
        return json.loads(self.admin("/config_dump?include_eds" if include_eds else "/config_dump"))

    def dynamic(self, kind: str) -> list[dict[str, Any]]:
        """Active dynamic resources of ``kind`` (``clusters``, ``listeners``, ``routes``, ``endpoints``)
        from the config dump, as dicts."""
        key = {
            "clusters": ("ClustersConfigDump", "dynamic_active_clusters", "cluster"),
            "listeners": ("ListenersConfigDump", "dynamic_listeners", "active_state"),
            "routes": ("RoutesConfigDump", "dynamic_route_configs", "route_config"),
            "endpoints": ("EndpointsConfigDump", "dynamic_endpoint_configs", "endpoint_config"),
        }[kind]
        out = []
        for section in self.config_dump(include_eds=kind == "endpoints")["configs"]:
            if section.get("@type", "").endswith(key[0]):
                for item in section.get(key[1], []):
                    value = item.get(key[2])
                    if kind == "listeners" and value is not None:
                        value = value.get("listener")
                    if value is not None:
                        out.append(value)
        return out

    def clusters(self) -> str:
        return self.admin("/clusters")

    def wait_for(self, predicate: Callable[[], T | None], timeout: float = 10.0, message: str = "") -> T:
        """Like :func:`wait_for`, and fails fast with the log tail if Envoy died."""

        def check() -> T | None:
            self._check_alive()
            return predicate()

        try:
            return wait_for(check, timeout=timeout, message=message)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}{self._tail(15)}") from exc.__cause__


class ControlPlane:
    """A :class:`SnapshotCache` with a node-id -> view resolver and an xDS server thread.

    ``nodes`` maps node ids to view names; ``resolver`` (if set) replaces that lookup entirely.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.nodes: dict[str, str] = {}
        self.resolver: Callable[[str, str, str], str | None] | None = None
        self.cache = SnapshotCache(self._resolve)
        self.host = host
        self.port = port
        self.thread: XdsServerThread | None = None

    def _resolve(self, node_id: str, node_cluster: str, peer: str) -> str | None:
        if self.resolver is not None:
            return self.resolver(node_id, node_cluster, peer)
        return self.nodes.get(node_id)

    def start(self) -> ControlPlane:
        """Start (or restart, on the same port) the xDS server."""
        self.thread = XdsServerThread(self.cache, self.host, self.port).start()
        self.port = self.thread.port
        return self

    def stop(self, grace: float = 0.5) -> None:
        if self.thread is not None:
            self.thread.stop(grace)
            self.thread = None

    @property
    def server(self) -> XdsServerThread:
        assert self.thread is not None, "control plane not running"
        return self.thread

    def status(self) -> list[dict[str, Any]]:
        return self.server.status()

    def nacks(self) -> list[dict[str, Any]]:
        return self.server.nacks()

    def bootstrap(self, node_id: str, node_cluster: str = "test", delta: bool = False, **kw: Any) -> dict[str, Any]:
        """An Envoy bootstrap pointing at this control plane (admin port chosen by Envoy)."""
        kw.setdefault("admin_port", 0)
        return make_bootstrap(node_id, node_cluster, self.host, self.port, delta=delta, **kw)


def no_nacks(status: list[dict[str, Any]]) -> None:
    """Assert that ``status`` (``proxy-status``: one dict per xDS stream) has at least one stream and no
    type of any stream has a standing NACK."""
    assert status, "no proxy has an xDS stream"
    for stream in status:
        for type_name, state in stream.items():
            if isinstance(state, dict) and "last_nack" in state:
                assert state["last_nack"] is None, f"{stream.get('node_id')}: {type_name} NACKed: {state['last_nack']}"
