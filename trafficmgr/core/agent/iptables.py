"""The sidecar's traffic capture: iptables nat rules in a pod's network namespace.

Every rule lives in one chain (:data:`CHAIN`) plus a single jump from ``OUTPUT``, so removal is exact:
delete the jump, flush and delete the chain; nothing else in the namespace is touched. Both
:func:`install` and :func:`remove` are idempotent.

Rules (nat ``OUTPUT``): TCP from the pod is redirected to the sidecar's port, except traffic of the
proxy's own uid or gid (Envoy's upstream and xDS connections), to loopback, or to ``exclude_ports``
(the Envoy admin port, so Prometheus scrapes and health checks reach it).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Sequence

CHAIN = "TRAFFICMGR_OUTPUT"
JUMP = ["OUTPUT", "-p", "tcp", "-j", CHAIN]

#: Runs an argv inside the target namespace; returns the completed process (never raises on status).
Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


class IptablesError(RuntimeError):
    """An iptables command failed; the message holds the command and its stderr."""


def netns_runner(netns_path: str | None) -> Runner:
    """A :data:`Runner` for the namespace at ``netns_path`` (``/proc/<pid>/ns/net``, ``/var/run/netns/x``);
    ``None`` runs in the caller's own namespace."""

    def run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        prefix = ["nsenter", f"--net={netns_path}"] if netns_path else []
        return subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=30)

    return run


def available() -> str | None:
    """None when iptables and nsenter can be run, else why not."""
    for tool in ("iptables", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install iptables util-linux)"
    return None


def _ipt(run: Runner, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["iptables", "-w", "-t", "nat", *args]
    proc = run(argv)
    if check and proc.returncode != 0:
        raise IptablesError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def rules(to_port: int = 10000, proxy_uid: int = 1337, exclude_ports: Sequence[int] = (8900,)) -> list[list[str]]:
    """The rules of :data:`CHAIN`, in order (each an ``iptables -A`` argument list)."""
    out = [
        [CHAIN, "-m", "owner", "--uid-owner", str(proxy_uid), "-j", "RETURN"],
        [CHAIN, "-m", "owner", "--gid-owner", str(proxy_uid), "-j", "RETURN"],
        [CHAIN, "-d", "127.0.0.0/8", "-j", "RETURN"],
    ]
    out += [[CHAIN, "-p", "tcp", "--dport", str(p), "-j", "RETURN"] for p in exclude_ports]
    out.append([CHAIN, "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(to_port)])
    return out


def install(run: Runner, to_port: int = 10000, proxy_uid: int = 1337, exclude_ports: Sequence[int] = (8900,)) -> None:
    """Install (or re-install, replacing the chain's content) the redirect rules. Raises :class:`IptablesError`."""
    if _ipt(run, "-L", CHAIN, "-n", check=False).returncode == 0:
        _ipt(run, "-F", CHAIN)
    else:
        _ipt(run, "-N", CHAIN)
    for rule in rules(to_port, proxy_uid, exclude_ports):
        _ipt(run, "-A", *rule)
    if _ipt(run, "-C", *JUMP, check=False).returncode != 0:
        _ipt(run, "-A", *JUMP)


def remove(run: Runner) -> None:
    """Remove the jump and the chain; a namespace without them is left as it is. Raises :class:`IptablesError`."""
    for _ in range(100):  # every copy of the jump (a crash between -C and -A could duplicate it)
        if _ipt(run, "-D", *JUMP, check=False).returncode != 0:
            break
    if _ipt(run, "-L", CHAIN, "-n", check=False).returncode == 0:
        _ipt(run, "-F", CHAIN)
        _ipt(run, "-X", CHAIN)


def installed(run: Runner) -> bool:
    """True when the jump from OUTPUT to :data:`CHAIN` is present."""
    return _ipt(run, "-C", *JUMP, check=False).returncode == 0


def dump(run: Runner) -> str:
    """``iptables -t nat -S`` of the namespace (for tests and debugging)."""
    return _ipt(run, "-S").stdout
