"""The capture rules: exact install and removal inside a network namespace, idempotent both ways."""

from __future__ import annotations

import shutil
import socket
import sys
import threading
from collections.abc import Iterator

import pytest

from tests.agent.rig import require
from trafficmgr.core.agent import iptables
from trafficmgr.testing import netns
from trafficmgr.testing.prereq import missing


def _chain(rules: str, chain: str) -> list[str]:
    """The rules of ``chain`` in ``iptables -S`` output, in order."""
    return [ln for ln in rules.splitlines() if ln.startswith(f"-A {chain} ")]


@pytest.fixture
def ns() -> Iterator[netns.NetNS]:
    require(netns.available() or iptables.available())
    with netns.NetNS("tmipt") as n:
        yield n


def test_install_remove_is_exact_and_idempotent(ns: netns.NetNS) -> None:
    run = iptables.netns_runner(ns.path)
    # Something of the pod's own that removal must leave alone.
    ns.run("iptables", "-w", "-t", "nat", "-A", "OUTPUT", "-p", "udp", "-j", "RETURN")
    before = iptables.dump(run)
    assert not iptables.installed(run)

    iptables.install(run, 10000, 1337, (8900,))
    iptables.install(run, 10000, 1337, (8900,))  # again: same result, no duplicate jump or rules
    rules = iptables.dump(run)
    assert rules.count(f"-A OUTPUT -p tcp -j {iptables.CHAIN}") == 1
    chain = _chain(rules, iptables.CHAIN)
    assert chain == [
        f"-A {iptables.CHAIN} -m owner --uid-owner 1337 -j RETURN",
        f"-A {iptables.CHAIN} -m owner --gid-owner 1337 -j RETURN",
        f"-A {iptables.CHAIN} -d 127.0.0.0/8 -j RETURN",
        f"-A {iptables.CHAIN} -p tcp -j REDIRECT --to-ports 10000",
    ]
    assert iptables.installed(run)

    iptables.remove(run)
    assert iptables.dump(run) == before
    iptables.remove(run)  # nothing to remove: fine
    assert iptables.dump(run) == before and not iptables.installed(run)


def test_reinstall_replaces_changed_rules(ns: netns.NetNS) -> None:
    run = iptables.netns_runner(ns.path)
    iptables.install(run, 10000, 1337, (8900,), inbound_port=15006)
    iptables.install(run, 15001, 1000, (9901,), inbound_port=15006)
    rules = iptables.dump(run)
    assert "--to-ports 15001" in rules and "--to-ports 10000" not in rules
    assert "--uid-owner 1000" in rules and "--dport 9901" in rules and "--dport 8900" not in rules
    iptables.remove(run)
    assert iptables.CHAIN not in iptables.dump(run)


def test_failure_names_the_command(ns: netns.NetNS) -> None:
    run = iptables.netns_runner("/nonexistent/netns")
    with pytest.raises(iptables.IptablesError, match="iptables-restore -w --noflush .chain TRAFFICMGR_OUTPUT of table nat"):
        iptables.install(run)


def test_inbound_capture_is_exact_and_can_be_turned_off(ns: netns.NetNS) -> None:
    run = iptables.netns_runner(ns.path)
    before = iptables.dump(run)
    iptables.install(run, 10000, 1337, (8900,), inbound_port=15006)
    iptables.install(run, 10000, 1337, (8900,), inbound_port=15006)
    rules = iptables.dump(run)
    assert rules.count(f"-A PREROUTING -p tcp -j {iptables.INBOUND_CHAIN}") == 1
    assert _chain(rules, iptables.INBOUND_CHAIN) == [
        f"-A {iptables.INBOUND_CHAIN} -p tcp -m tcp --dport 8900 -j RETURN",
        f"-A {iptables.INBOUND_CHAIN} -p tcp -m tcp --dport 15006 -j RETURN",
        f"-A {iptables.INBOUND_CHAIN} -p tcp -j REDIRECT --to-ports 15006",
    ]
    assert iptables.installed(run, inbound=True)
    # Re-installed without an inbound port (agent --inbound-port 0): the inbound chain goes, outbound stays.
    iptables.install(run, 10000, 1337, (8900,))
    rules = iptables.dump(run)
    assert iptables.INBOUND_CHAIN not in rules and f"-A OUTPUT -p tcp -j {iptables.CHAIN}" in rules
    assert iptables.installed(run) and not iptables.installed(run, inbound=True)
    iptables.install(run, 10000, 1337, (8900,), inbound_port=15006)
    iptables.remove(run)
    assert iptables.dump(run) == before


V6_ADDR = "fd00::2"  # on the namespace's loopback only: the namespace has no route out


def _connect6(ns: netns.NetNS, port: int, uid: int | None = None) -> str:
    """Connect to [fd00::2]:port from inside ``ns`` (as ``uid`` when given): "ok" or the error's name."""
    code = ("import socket\ntry:\n"
            f"    socket.create_connection(('{V6_ADDR}', {port}), timeout=3).close(); print('ok')\n"
            "except OSError as e:\n    print(type(e).__name__)")
    prefix = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"] if uid is not None else []
    return ns.run(*prefix, sys.executable, "-c", code).stdout.strip()


def test_outbound_ipv6_is_refused_except_for_the_proxy_and_removal_is_exact(ns: netns.NetNS) -> None:
    """The sidecar listens on IPv4 only: without an IPv6 rule a pod's IPv6 connections would bypass it
    (and the "blocked unless labeled" promise). They are reset at once, except the proxy's own."""
    if shutil.which("ip6tables") is None:
        missing("ip6tables is not installed")
    ns.ip("link", "set", "lo", "up")
    ns.ip("-6", "addr", "add", f"{V6_ADDR}/128", "dev", "lo")
    server = ns.in_ns(lambda: socket.create_server((V6_ADDR, 0), family=socket.AF_INET6, backlog=16))
    port = server.getsockname()[1]
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                server.accept()[0].close()
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        run = iptables.netns_runner(ns.path)
        before = iptables.dump6(run)
        assert _connect6(ns, port) == "ok"

        iptables.install(run, 10000, 1337, (8900,))
        rules = iptables.dump6(run)
        assert rules.count(f"-A OUTPUT -p tcp -j {iptables.CHAIN}") == 1
        assert _chain(rules, iptables.CHAIN) == [
            f"-A {iptables.CHAIN} -m owner --uid-owner 1337 -j RETURN",
            f"-A {iptables.CHAIN} -m owner --gid-owner 1337 -j RETURN",
            f"-A {iptables.CHAIN} -d ::1/128 -j RETURN",
            f"-A {iptables.CHAIN} -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j REJECT --reject-with tcp-reset",
        ]
        assert iptables.installed(run)
        assert _connect6(ns, port) == "ConnectionRefusedError"  # a reset, not a 3 s timeout
        assert _connect6(ns, port, uid=1337) == "ok"

        # A namespace whose IPv6 rules went missing is not "installed": the agent's resync puts them back.
        ns.run("ip6tables", "-w", "-D", "OUTPUT", "-p", "tcp", "-j", iptables.CHAIN)
        assert not iptables.installed(run)
        iptables.install(run, 10000, 1337, (8900,))
        assert iptables.installed(run)

        iptables.remove(run)
        assert iptables.dump6(run) == before
        assert _connect6(ns, port) == "ok"
    finally:
        stop.set()
        server.close()
