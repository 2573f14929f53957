"""The sidecar's traffic capture: iptables nat rules in a pod's network namespace.

Every rule lives in two chains (:data:`CHAIN`, :data:`INBOUND_CHAIN`) plus one jump each from ``OUTPUT``
and ``PREROUTING``, so removal is exact: delete the jumps, flush and delete the chains; nothing else in
the namespace is touched. Both :func:`install` and :func:`remove` are idempotent.

Rules (nat ``OUTPUT``): TCP from the pod is redirected to the sidecar's outbound port, except traffic of
the proxy's own uid or gid (Envoy's upstream and xDS connections) and to loopback (so the pod's own
processes and the agent reach Envoy admin on 127.0.0.1:15000 as before). No destination port is exempt:
a connection to port 8900 of another host is captured like any other (blocked unless that port is labeled).

Rules (nat ``PREROUTING``, when an inbound port is given): TCP arriving at the pod from outside is
redirected to the sidecar's inbound port, except to ``exclude_ports`` (the stats-only listener's port,
8900, so Prometheus and probes reach it directly). Envoy then connects to the pod's own address as its
proxy uid, which the ``OUTPUT`` rules let through.

IPv6 (ip6tables filter ``OUTPUT``, chain :data:`CHAIN` there too): the sidecar listens on IPv4 only, so
outbound TCP over IPv6 is refused with a TCP reset (clients fall back to IPv4 at once) with the same
exceptions; without this rule it would bypass the sidecar, and with it the "blocked unless a port is
labeled" promise. Where a namespace has no IPv6 (disabled in the kernel) there is nothing to capture; an
agent without ``ip6tables`` logs a warning once and captures IPv4 only.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

CHAIN = "TRAFFICMGR_OUTPUT"
JUMP = ["OUTPUT", "-p", "tcp", "-j", CHAIN]
INBOUND_CHAIN = "TRAFFICMGR_INBOUND"
INBOUND_JUMP = ["PREROUTING", "-p", "tcp", "-j", INBOUND_CHAIN]

#: (binary, table) of the IPv4 redirect rules and of the IPv6 refusal rules.
NAT4 = ("iptables", "nat")
FILTER6 = ("ip6tables", "filter")

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
    for tool in ("iptables", "iptables-restore", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install iptables util-linux)"
    return None


def _ipt(run: Runner, *args: str, check: bool = True, table: tuple[str, str] = NAT4) -> subprocess.CompletedProcess[str]:
    argv = [table[0], "-w", "-t", table[1], *args]
    proc = run(argv)
    if check and proc.returncode != 0:
        raise IptablesError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _let_through(proxy_uid: int, loopback: str) -> list[list[str]]:
    """What :data:`CHAIN` never touches: the proxy's own uid/gid and loopback. No port is exempt: an
    outbound exemption by port would let the app reach that port on every host without the sidecar."""
    return [
        [CHAIN, "-m", "owner", "--uid-owner", str(proxy_uid), "-j", "RETURN"],
        [CHAIN, "-m", "owner", "--gid-owner", str(proxy_uid), "-j", "RETURN"],
        [CHAIN, "-d", loopback, "-j", "RETURN"],
    ]


def rules(to_port: int = 10000, proxy_uid: int = 1337) -> list[list[str]]:
    """The rules of :data:`CHAIN`, in order (each an ``iptables -A`` argument list)."""
    return [*_let_through(proxy_uid, "127.0.0.0/8"),
            [CHAIN, "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(to_port)]]


def rules6(proxy_uid: int = 1337) -> list[list[str]]:
    """The rules of :data:`CHAIN` in the ip6tables filter table, in order."""
    # Only connection attempts: the reset itself passes OUTPUT too, and must not be rejected in turn.
    return [*_let_through(proxy_uid, "::1/128"),
            [CHAIN, "-p", "tcp", "--syn", "-j", "REJECT", "--reject-with", "tcp-reset"]]


_warned_no_ip6tables = False


def _ipv6(run: Runner) -> bool:
    """True when the namespace has IPv6 and ip6tables can manage it."""
    global _warned_no_ip6tables
    if shutil.which(FILTER6[0]) is None:
        if not _warned_no_ip6tables:
            _warned_no_ip6tables = True
            log.warning("ip6tables is not installed: outbound IPv6 of pods is not captured (apt-get install iptables)")
        return False
    proc = _ipt(run, "-L", "OUTPUT", "-n", check=False, table=FILTER6)
    if proc.returncode == 0:
        return True
    # "Address family not supported" where IPv6 is disabled: nothing to capture then. Anything else
    # means IPv6 may be there and uncaptured: say so.
    if "not supported" not in proc.stderr:
        log.warning("ip6tables cannot be used (%s): outbound IPv6 of this pod is not captured", proc.stderr.strip())
    return False


def inbound_rules(inbound_port: int, exclude_ports: Sequence[int] = (8900,)) -> list[list[str]]:
    """The rules of :data:`INBOUND_CHAIN`, in order: ``exclude_ports`` (the stats listener) and the
    inbound port itself are not redirected."""
    out = [[INBOUND_CHAIN, "-p", "tcp", "--dport", str(p), "-j", "RETURN"] for p in (*exclude_ports, inbound_port)]
    out.append([INBOUND_CHAIN, "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(inbound_port)])
    return out


def _fill(run: Runner, chain: str, chain_rules: list[list[str]], jump: list[str], table: tuple[str, str] = NAT4) -> None:
    """Replace the content of ``chain`` (created if missing) and add ``jump`` where missing, in one
    ``iptables-restore --noflush`` transaction (declaring a chain there empties it; nothing else in the
    table is touched). A re-install, which every full resync of the agent does, so never shows the chain
    empty or half filled: flushing it and appending rule by rule let a pod's connections made meanwhile
    past the sidecar (tests/agent/test_capture_resync.py)."""
    lines = [f"*{table[1]}", f":{chain} - [0:0]", *(_restore_rule(rule) for rule in chain_rules)]
    if _ipt(run, "-C", *jump, check=False, table=table).returncode != 0:
        lines.append(_restore_rule(jump))
    lines.append("COMMIT")
    # The rules go through a file (a Runner passes no stdin): created by mkstemp (mode 0600, a new name,
    # O_EXCL) and owned by the agent, so no other user can swap its content before iptables-restore reads
    # it; it is read inside the pod's network namespace only (nsenter --net shares our mount namespace).
    with tempfile.NamedTemporaryFile("w", prefix="trafficmgr-iptables-", suffix=".rules") as f:
        f.write("\n".join(lines) + "\n")
        f.flush()
        argv = [f"{table[0]}-restore", "-w", "--noflush", f.name]
        proc = run(argv)
    if proc.returncode != 0:
        raise IptablesError(f"{' '.join(argv[:-1])} (chain {chain} of table {table[1]}) failed ({proc.returncode}): "
                            f"{proc.stderr.strip()}")


def _restore_rule(rule: list[str]) -> str:
    """``-A`` line of an iptables-restore file (our rules' arguments never hold blanks or quotes)."""
    if any(set(arg) & set(" \t\n\"'#") for arg in rule):
        raise IptablesError(f"iptables rule argument with a blank, quote or '#': {rule}")
    return " ".join(["-A", *rule])


def _drop(run: Runner, chain: str, jump: list[str], table: tuple[str, str] = NAT4) -> None:
    for _ in range(100):  # every copy of the jump (a crash between -C and -A could duplicate it)
        if _ipt(run, "-D", *jump, check=False, table=table).returncode != 0:
            break
    if _ipt(run, "-L", chain, "-n", check=False, table=table).returncode == 0:
        _ipt(run, "-F", chain, table=table)
        _ipt(run, "-X", chain, table=table)


def install(run: Runner, to_port: int = 10000, proxy_uid: int = 1337, exclude_ports: Sequence[int] = (8900,),
            inbound_port: int = 0) -> None:
    """Install (or re-install, replacing the chains' content) the redirect rules; ``exclude_ports`` are
    exempt from the inbound redirect only (the stats listener's port); ``inbound_port`` 0: no inbound
    capture (an inbound chain left from an earlier install is removed). Raises :class:`IptablesError`."""
    _fill(run, CHAIN, rules(to_port, proxy_uid), JUMP)
    if _ipv6(run):
        _fill(run, CHAIN, rules6(proxy_uid), JUMP, FILTER6)
    if inbound_port:
        _fill(run, INBOUND_CHAIN, inbound_rules(inbound_port, exclude_ports), INBOUND_JUMP)
    else:
        _drop(run, INBOUND_CHAIN, INBOUND_JUMP)


def remove(run: Runner) -> None:
    """Remove the jumps and the chains; a namespace without them is left as it is. Raises :class:`IptablesError`."""
    _drop(run, CHAIN, JUMP)
    _drop(run, INBOUND_CHAIN, INBOUND_JUMP)
    if _ipv6(run):
        _drop(run, CHAIN, JUMP, FILTER6)


def installed(run: Runner, inbound: bool = False) -> bool:
    """True when the jump from OUTPUT to :data:`CHAIN` (and with ``inbound`` the one from PREROUTING, and
    where the namespace has IPv6 the ip6tables one) is present."""
    if _ipt(run, "-C", *JUMP, check=False).returncode != 0:
        return False
    if inbound and _ipt(run, "-C", *INBOUND_JUMP, check=False).returncode != 0:
        return False
    return not _ipv6(run) or _ipt(run, "-C", *JUMP, check=False, table=FILTER6).returncode == 0


def dump(run: Runner) -> str:
    """``iptables -t nat -S`` of the namespace (for tests and debugging)."""
    return _ipt(run, "-S").stdout


def dump6(run: Runner) -> str:
    """``ip6tables -t filter -S`` of the namespace ("" without IPv6)."""
    return _ipt(run, "-S", table=FILTER6).stdout if _ipv6(run) else ""
