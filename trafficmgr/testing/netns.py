"""Network namespaces for tests: a "pod" network with no route to the outside.

Everything a test sends to a pod address stays inside a namespace the test created: pod IPs live on a
dummy interface inside it, ClusterIP ranges are routed to that dummy interface (packets to them only
ever get redirected to the sidecar by iptables), and there is no default route. Code runs inside the
namespace either as a subprocess (``ip netns exec``) or in a thread switched with ``setns(2)``, so
sockets made in that thread belong to the namespace.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import threading
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, or ``ip``/``iptables`` missing)."""


def available() -> str | None:
    """None when namespaces with iptables can be used, else the reason they cannot."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "iptables", "setpriv"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install iproute2 iptables util-linux)"
    return None


def _run(args: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def run_in_netns(path: str, fn: Callable[[], T], timeout: float = 60.0, thread_name: str = "netns") -> T:
    """Run ``fn()`` in a new thread switched into the network namespace at ``path`` (a ``/run/netns``
    or ``/proc/<pid>/ns/net`` file); return its result or raise its exception. Only that thread moves."""
    result: Future[T] = Future()

    def target() -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({path}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result.set_result(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            result.set_exception(exc)

    threading.Thread(target=target, name=thread_name, daemon=True).start()
    return result.result(timeout)


class NetNS:
    """A named network namespace with loopback up; ``delete()`` (or the context manager) removes it."""

    def __init__(self, prefix: str = "tm") -> None:
        reason = available()
        if reason:
            raise NetnsUnavailable(reason)
        self.name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        _run(["ip", "netns", "add", self.name])
        self.path = f"/var/run/netns/{self.name}"
        self.ip("link", "set", "lo", "up")

    def __enter__(self) -> NetNS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()

    def ip(self, *args: str) -> None:
        _run(["ip", "-n", self.name, *args])

    def exec_args(self, *cmd: str) -> list[str]:
        """The argv that runs ``cmd`` inside the namespace."""
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run(self.exec_args(*cmd), check=check)

    def add_pod_network(self, addresses: Sequence[str], routed: Sequence[str] = ("10.96.0.0/16",)) -> None:
        """Put ``addresses`` (pod IPs, /32) on the namespace's loopback device and route ``routed``
        (ClusterIP ranges, only ever redirected to the sidecar) there too. No default route is added:
        nothing can leave the namespace. (Loopback, because sandboxes often lack the dummy driver.)"""
        for addr in addresses:
            self.ip("addr", "add", f"{addr}/32", "dev", "lo")
        for cidr in routed:
            self.ip("route", "add", "local", cidr, "dev", "lo")

    def redirect_outbound(self, to_port: int = 10000, proxy_uid: int = 1337, exclude_ports: Sequence[int] = (8900,),
                          inbound_port: int = 0) -> None:
        """nat OUTPUT: redirect TCP to ``to_port`` except the proxy's own uid and loopback; with
        ``inbound_port``, nat PREROUTING too: TCP arriving from another namespace goes to that port, except
        to ``exclude_ports`` (the stats listener) (the node agent's rules:
        :func:`trafficmgr.core.agent.iptables.install`)."""
        from trafficmgr.core.agent import iptables

        iptables.install(iptables.netns_runner(self.path), to_port, proxy_uid, exclude_ports, inbound_port)

    def link(self, other: NetNS, local: Sequence[str], remote: Sequence[str]) -> None:
        """Connect this namespace to ``other`` with a veth pair: ``remote`` addresses (which live in
        ``other``) are routed over it from here, ``local`` ones (which live here) from there. Nothing
        else is routed, so traffic still cannot leave the two namespaces."""
        tag = uuid.uuid4().hex[:6]
        here, there = f"tm{tag}a", f"tm{tag}b"
        _run(["ip", "link", "add", here, "netns", self.name, "type", "veth", "peer", "name", there, "netns", other.name])
        # Each end carries its pod's first address, as a pod's eth0 does: nat REDIRECT of arriving
        # traffic rewrites the destination to the incoming interface's address (none: dropped).
        self.ip("addr", "add", f"{local[0]}/32", "dev", here)
        other.ip("addr", "add", f"{remote[0]}/32", "dev", there)
        self.ip("link", "set", here, "up")
        other.ip("link", "set", there, "up")
        for addr in remote:
            self.ip("route", "add", f"{addr}/32", "dev", here, "src", local[0])
        for addr in local:
            other.ip("route", "add", f"{addr}/32", "dev", there, "src", remote[0])

    def in_ns(self, fn: Callable[[], T], timeout: float = 60.0) -> T:
        """Run ``fn()`` in a new thread switched into this namespace; return its result (or raise)."""
        return run_in_netns(self.path, fn, timeout, thread_name=f"netns-{self.name}")

    def delete(self) -> None:
        pids = _run(["ip", "netns", "pids", self.name], check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), 9)
            except (ProcessLookupError, ValueError):
                pass
        _run(["ip", "netns", "del", self.name], check=False)


def world_executable(path: str, cache_dir: str = "/tmp/trafficmgr-bin") -> str:
    """See :func:`trafficmgr.core.envoy.world_executable` (tests keep their copy under /tmp)."""
    from trafficmgr.core.envoy import world_executable as make

    return make(path, cache_dir)


def require() -> None:
    """In a test: skip when namespaces cannot be made here, but fail under ``CI`` (no silent skips)."""
    from trafficmgr.testing.prereq import missing

    reason = available()
    if reason:
        missing(f"the network-namespace tests cannot run: {reason}")
