"""Sidecars as Envoy processes: ``netns`` (any container runtime: containerd, CRI-O) and ``local``.

``netns`` finds the pod's network namespace on the node by its pod IP (the one namespace under
``/var/run/netns``, where CNI plugins and ``ip netns`` put them, holding it: see
:meth:`ProcessRuntime.pod_network`) and runs Envoy there with
``nsenter --net=<ns> setpriv --reuid=<uid>``. ``local`` runs Envoy in the host's own network without
root (local mode: it binds the pod IP, nothing is captured).

Each sidecar has a state directory ``<state-dir>/<id>/`` holding ``sidecar.json`` (pod, namespace,
pod uid, netns, pid), ``envoy.json`` and ``envoy.log``: that is how an agent restart finds (adopts)
the processes, which run in their own session and outlive the agent. It is Envoy's working directory
(``Popen(cwd=)``), so the workload identity in ``identity/`` below it is what Envoy's relative SDS paths
name.

Known limit of these runtimes: every sidecar shares the node's filesystem and runs as the same proxy
uid, so one sidecar's Envoy (uid 1337) could read another sidecar's ``identity/key.pem`` (the files are
0400 for that uid, the directory 0700 for it). Only the ``docker`` runtime separates them (each container
mounts only its own pod's directory). A per-sidecar uid would fix it but breaks the iptables owner match
(one uid is exempt from capture); not done.
"""

from __future__ import annotations

import builtins
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from typing import Any

from trafficmgr.core.agent.runtime import (
    ENVOY_ARGS,
    LABEL_NAMESPACE,
    LABEL_POD,
    LABEL_POD_UID,
    LABEL_PROXY,
    AmbiguousNetwork,
    NetworkNotReady,
    PodNetwork,
    PodRef,
    Runtime,
    Sidecar,
    SidecarError,
    SidecarSpec,
    host_netns_identities,
    netns_identity,
    refuse_host_netns,
)

DEFAULT_STATE_DIR = "/var/run/trafficmgr/sidecars"
DEFAULT_NETNS_DIR = "/var/run/netns"
#: How long the addresses read from a namespace are reused by pod IP lookups (seconds).
ADDRESS_CACHE_S = 2.0


class ProcessRuntime(Runtime):
    """Envoy processes with state directories (see the module docstring)."""

    name = "netns"

    def __init__(self, state_dir: str = DEFAULT_STATE_DIR, netns_dir: str = DEFAULT_NETNS_DIR,
                 envoy: str | None = None, use_netns: bool = True) -> None:
        self.state_dir = state_dir
        self.netns_dir = netns_dir
        self._envoy = envoy
        self.use_netns = use_netns
        self.captures_traffic = use_netns
        self.name = "netns" if use_netns else "local"
        self._children: dict[int, subprocess.Popen[bytes]] = {}  # reaped by us while we are their parent
        # namespace path -> (when read, its identity, its `ip -o addr show`): see _addresses
        self._addresses: dict[str, tuple[float, tuple[int, int], str]] = {}

    def describe(self) -> str:
        return f"{self.name} (state in {self.state_dir})"

    # -- pods ---------------------------------------------------------------------------------

    def pod_network(self, pod: PodRef) -> PodNetwork:
        """The one namespace under ``netns_dir`` that holds the pod IP.

        Why by IP, and why it must be unique: containerd (``cni-<random uuid>``) and CRI-O (``<random
        uuid>``) name the namespaces they create there without the pod's name, uid or sandbox id, so the
        pod IP on one of its interfaces is what ties a namespace to the pod. The first match is not good
        enough: an old sandbox not torn down yet (a recreated pod, a pod IP handed on) can hold the same
        IP, and a sidecar (with its capture rules) in the wrong namespace would intercept another pod's
        traffic while leaving this pod's uncaptured. So: several names of one namespace (bind mounts) count
        once; several namespaces holding the IP are refused (:class:`AmbiguousNetwork`, retried until
        only one is left); the node's and the agent's own namespace are never a pod's (a hostNetwork
        pod's IP is the node's: :func:`~.runtime.refuse_host_netns`)."""
        if not self.use_netns:
            return PodNetwork(None)
        try:
            names = sorted(os.listdir(self.netns_dir))
        except FileNotFoundError:
            names = []
        found: dict[tuple[int, int], builtins.list[str]] = {}  # namespace identity -> its paths
        for name in names:
            path = os.path.join(self.netns_dir, name)
            ident = netns_identity(path)
            if ident is None:
                continue  # removed meanwhile, or not a namespace
            if _has_address(self._addresses_of(path, ident), pod.ip):
                found.setdefault(ident, []).append(path)
        if not found:
            raise NetworkNotReady(f"no network namespace under {self.netns_dir} holds the pod IP {pod.ip} (yet)")
        host = host_netns_identities()
        for ident, paths in found.items():
            if ident in host:
                refuse_host_netns(paths[0], pod)
        if len(found) > 1:
            listed = ", ".join(" = ".join(paths) for paths in found.values())
            raise AmbiguousNetwork(
                f"{len(found)} network namespaces hold the pod IP {pod.ip} ({listed}): an old sandbox not torn "
                f"down yet? No sidecar until exactly one does (the agent does not guess which is the pod's)")
        [paths] = found.values()
        return PodNetwork(paths[0], paths[0])

    def _addresses_of(self, path: str, ident: tuple[int, int]) -> str:
        """``ip -o addr show`` inside the namespace at ``path`` ("" when it cannot be read), remembered for
        :data:`ADDRESS_CACHE_S`: every lookup reads every namespace, so a reconcile pass over N pods would
        otherwise run N x N ``nsenter``; a recreated namespace (another identity) is read again at once."""
        now = time.monotonic()
        cached = self._addresses.get(path)
        if cached is not None and cached[1] == ident and now - cached[0] < ADDRESS_CACHE_S:
            return cached[2]
        proc = subprocess.run(["nsenter", f"--net={path}", "ip", "-o", "addr", "show"],
                              capture_output=True, text=True, timeout=10)
        text = proc.stdout if proc.returncode == 0 else ""
        if len(self._addresses) > 4096:  # namespaces come and go: forget the old ones now and then
            self._addresses = {k: v for k, v in self._addresses.items() if now - v[0] < ADDRESS_CACHE_S}
        self._addresses[path] = (now, ident, text)
        return text

    # -- sidecars -----------------------------------------------------------------------------

    def list(self) -> list[Sidecar]:
        out = []
        for state in self._states():
            out.append(self._sidecar(state))
        return sorted(out, key=lambda s: (s.namespace, s.pod, s.id))

    def _states(self) -> builtins.list[dict[str, Any]]:  # `list` is the method above
        try:
            ids = os.listdir(self.state_dir)
        except FileNotFoundError:
            return []
        states = []
        for sid in ids:
            try:
                with open(os.path.join(self.state_dir, sid, "sidecar.json"), encoding="utf-8") as f:
                    state = json.load(f)
            except (OSError, ValueError):
                continue  # half-written by a start that crashed: start() removes it on failure
            if state.get("id") == sid:
                states.append(state)
        return states

    def _alive(self, state: dict[str, Any]) -> bool:
        pid = int(state.get("pid") or 0)
        child = self._children.get(pid)
        if child is not None and child.poll() is not None:
            self._children.pop(pid, None)
            return False
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            return False
        # pid reuse: the process must still be this sidecar's Envoy (its config path names the id)
        return state["id"].encode() in cmdline

    def _sidecar(self, state: dict[str, Any]) -> Sidecar:
        labels = state.get("labels") or {}
        alive = self._alive(state)
        age = max(0, int(time.time() - float(state.get("started") or 0)))
        return Sidecar(
            id=state["id"], pod=labels.get(LABEL_POD, ""), namespace=labels.get(LABEL_NAMESPACE, ""),
            pod_uid=labels.get(LABEL_POD_UID, ""), status=f"Up {_age(age)}" if alive else "Exited",
            state="running" if alive else "exited",
        )

    def start(self, spec: SidecarSpec, network: PodNetwork) -> Sidecar:
        for state in self._states():
            labels = state.get("labels") or {}
            if labels.get(LABEL_POD_UID) == spec.pod.uid and labels.get(LABEL_POD) == spec.pod.name and self._alive(state):
                return self._sidecar(state)
        if self.use_netns and (network.netns is None or not os.path.exists(network.netns)):
            raise NetworkNotReady(f"network namespace {network.netns} of pod {spec.pod.namespace}/{spec.pod.name} is gone")
        if self.use_netns:
            refuse_host_netns(network.netns, spec.pod)  # never Envoy (and so never capture) in the node's namespace
        sid = uuid.uuid4().hex
        directory = os.path.join(self.state_dir, sid)
        try:
            return self._start(spec, network, sid, directory)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise

    def _start(self, spec: SidecarSpec, network: PodNetwork, sid: str, directory: str) -> Sidecar:
        os.makedirs(self.state_dir, mode=0o755, exist_ok=True)
        os.chmod(self.state_dir, 0o755)  # the proxy uid reads its bootstrap below it
        os.makedirs(directory, mode=0o755)
        os.chmod(directory, 0o755)
        config_path = os.path.join(directory, "envoy.json")
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump(spec.config, f)
        os.chmod(config_path, 0o644)
        if spec.prepare is not None:
            spec.prepare(directory)
        envoy = self._envoy_binary()
        argv = [envoy, "-c", config_path, *ENVOY_ARGS]
        if os.geteuid() == 0:
            argv = ["setpriv", f"--reuid={spec.proxy_uid}", f"--regid={spec.proxy_uid}", "--clear-groups", *argv]
        if self.use_netns:
            argv = ["nsenter", f"--net={network.netns}", *argv]
        log = open(os.path.join(directory, "envoy.log"), "ab")  # handed to the child, closed below
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=directory,
                                    start_new_session=True)  # outlives the agent
        except OSError as exc:
            raise SidecarError(f"cannot run Envoy ({argv[0]}): {exc}") from None
        finally:
            log.close()
        self._children[proc.pid] = proc
        state = {
            "id": sid, "pid": proc.pid, "netns": network.netns, "started": time.time(),
            "labels": {LABEL_PROXY: sid, LABEL_POD: spec.pod.name, LABEL_NAMESPACE: spec.pod.namespace,
                       LABEL_POD_UID: spec.pod.uid},
        }
        tmp = os.path.join(directory, "sidecar.json.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(state, f)
        os.replace(tmp, os.path.join(directory, "sidecar.json"))
        time.sleep(0.05)
        if proc.poll() is not None:
            text = _tail(os.path.join(directory, "envoy.log"), 5)
            self._children.pop(proc.pid, None)
            raise SidecarError(f"Envoy exited at once with status {proc.returncode}: {text}")
        return self._sidecar(state)

    def _envoy_binary(self) -> str:
        from trafficmgr.core.envoy import EnvoyNotFound, find_envoy

        try:
            path = self._envoy or find_envoy()
        except EnvoyNotFound as exc:
            raise SidecarError(str(exc)) from None
        if os.geteuid() != 0:
            return path
        # The proxy uid must be able to execute it (site-packages may sit in root's home).
        from trafficmgr.core.envoy import world_executable

        return world_executable(path, os.path.join(os.path.dirname(self.state_dir.rstrip("/")) or "/", "bin"))

    def remove(self, sidecar: Sidecar) -> None:
        directory = os.path.join(self.state_dir, sidecar.id)
        state = next((s for s in self._states() if s["id"] == sidecar.id), None)
        if state is not None and self._alive(state):
            pid = int(state["pid"])
            _signal(pid, signal.SIGTERM)
            deadline = time.monotonic() + 5
            while self._alive(state) and time.monotonic() < deadline:
                time.sleep(0.05)
            if self._alive(state):
                _signal(pid, signal.SIGKILL)
                while self._alive(state) and time.monotonic() < deadline + 5:
                    time.sleep(0.05)
            child = self._children.pop(pid, None)
            if child is not None:
                child.wait(5)
        shutil.rmtree(directory, ignore_errors=True)

    def workdir(self, sidecar: Sidecar) -> str:
        return os.path.join(self.state_dir, sidecar.id)

    def sidecar_netns(self, sidecar: Sidecar) -> str | None:
        for state in self._states():
            if state["id"] == sidecar.id:
                path = state.get("netns")
                return path if path and os.path.exists(path) else None
        return None

    def logs(self, sidecar: Sidecar, tail: int | None = None) -> str:
        path = os.path.join(self.state_dir, sidecar.id, "envoy.log")
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines(keepends=True)
        except FileNotFoundError:
            return ""
        return "".join(lines[-tail:] if tail else lines)


def _has_address(ip_output: str, address: str) -> bool:
    for line in ip_output.splitlines():
        fields = line.split()
        for i, field in enumerate(fields[:-1]):
            if field in ("inet", "inet6") and fields[i + 1].split("/")[0] == address:
                return True
    return False


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _age(seconds: int) -> str:
    if seconds < 60:
        return f"{seconds} seconds"
    if seconds < 3600:
        return f"{seconds // 60} minutes"
    return f"{seconds // 3600} hours"


def _tail(path: str, n: int) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return " | ".join(line.strip() for line in f.read().splitlines()[-n:])
    except OSError:
        return ""
