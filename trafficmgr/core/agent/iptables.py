"""The sidecar's traffic capture: iptables nat rules in a pod's network namespace.

Every rule lives in two chains (:data:`CHAIN`, :data:`INBOUND_CHAIN`) plus one jump each from ``OUTPUT``
and ``PREROUTING``, so removal is exact: delete the jumps, flush and delete the chains; nothing else in
the namespace is touched. Both :func:`install` and :func:`remove` are idempotent.

Rules (nat ``OUTPUT``): TCP from the pod is redirected to the sidecar's outbound port, except traffic of
the proxy's own uid or gid (Envoy's upstream and xDS connections), to loopback, or to ``exclude_ports``
(the Envoy admin port, so Prometheus scrapes and health checks reach it).

Rules (nat ``PREROUTING``, when an inbound port is given): TCP arriving at the pod from outside is
redirected to the sidecar's inbound port, except to ``exclude_ports``. Envoy then connects to the pod's
own address as its proxy uid, which the ``OUTPUT`` rules let through.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Sequence

CHAIN = "TRAFFICMGR_OUTPUT"
JUMP = ["OUTPUT", "-p", "tcp", "-j", CHAIN]
INBOUND_CHAIN = "TRAFFICMGR_INBOUND"
INBOUND_JUMP = ["PREROUTING", "-p", "tcp", "-j", INBOUND_CHAIN]

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


def inbound_rules(inbound_port: int, exclude_ports: Sequence[int] = (8900,)) -> list[list[str]]:
    """The rules of :data:`INBOUND_CHAIN`, in order."""
    out = [[INBOUND_CHAIN, "-p", "tcp", "--dport", str(p), "-j", "RETURN"] for p in (*exclude_ports, inbound_port)]
    out.append([INBOUND_CHAIN, "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(inbound_port)])
    return out


def _fill(run: Runner, chain: str, chain_rules: list[list[str]], jump: list[str]) -> None:
    if _ipt(run, "-L", chain, "-n", check=False).returncode == 0:
        _ipt(run, "-F", chain)
    else:
        _ipt(run, "-N", chain)
    for rule in chain_rules:
        _ipt(run, "-A", *rule)
    if _ipt(run, "-C", *jump, check=False).returncode != 0:
        _ipt(run, "-A", *jump)


def _drop(run: Runner, chain: str, jump: list[str]) -> None:
    for _ in range(100):  # every copy of the jump (a crash between -C and -A could duplicate it)
        if _ipt(run, "-D", *jump, check=False).returncode != 0:
            break
    if _ipt(run, "-L", chain, "-n", check=False).returncode == 0:
        _ipt(run, "-F", chain)
        _ipt(run, "-X", chain)


def install(run: Runner, to_port: int = 10000, proxy_uid: int = 1337, exclude_ports: Sequence[int] = (8900,),
            inbound_port: int = 0) -> None:
    """Install (or re-install, replacing the chains' content) the redirect rules; ``inbound_port`` 0:
    no inbound capture (an inbound chain left from an earlier install is removed). Raises
    :class:`IptablesError`."""
    _fill(run, CHAIN, rules(to_port, proxy_uid, exclude_ports), JUMP)
    if inbound_port:
        _fill(run, INBOUND_CHAIN, inbound_rules(inbound_port, exclude_ports), INBOUND_JUMP)
    else:
        _drop(run, INBOUND_CHAIN, INBOUND_JUMP)


def remove(run: Runner) -> None:
    """Remove the jumps and the chains; a namespace without them is left as it is. Raises :class:`IptablesError`."""
    _drop(run, CHAIN, JUMP)
    _drop(run, INBOUND_CHAIN, INBOUND_JUMP)


def installed(run: Runner, inbound: bool = False) -> bool:
    """True when the jump from OUTPUT to :data:`CHAIN` (and with ``inbound`` the one from PREROUTING)
    is present."""
    if _ipt(run, "-C", *JUMP, check=False).returncode != 0:
        return False
    return not inbound or _ipt(run, "-C", *INBOUND_JUMP, check=False).returncode == 0


def dump(run: Runner) -> str:
    """``iptables -t nat -S`` of the namespace (for tests and debugging)."""
    return _ipt(run, "-S").stdout
