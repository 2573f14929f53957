"""Re-installing the capture rules (every full resync of the agent does) never lets a connection past
the sidecar: the chain is replaced in one transaction, never seen empty or half filled.

Found by ``test_agent_watch_loss.py``: a rule dump taken during a resync showed a partly filled chain.
Before the fix, re-installing flushed the chain and appended the rules one command at a time; a pod's
connection made in that window went straight to its destination (here: a third of the connections
made during 20 re-installs).
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterator

import pytest

from tests.agent.rig import require
from trafficmgr.core.agent import iptables
from trafficmgr.testing import netns
from trafficmgr.testing.backends import HttpBackend

POD_IP = "10.244.95.2"  # no other test uses 10.244.95.0/24
SERVICE = "10.96.95.5"  # a ClusterIP: routed to the namespace's loopback, only ever reached through capture


@pytest.fixture
def ns() -> Iterator[netns.NetNS]:
    require(netns.available() or iptables.available())
    with netns.NetNS("tmrsy") as n:
        n.add_pod_network([POD_IP])
        yield n


def test_reinstall_during_traffic_lets_no_connection_past_the_sidecar(ns: netns.NetNS) -> None:
    run = iptables.netns_runner(ns.path)
    sidecar = ns.in_ns(lambda: HttpBackend("sidecar", "0.0.0.0", 10000).start())
    direct = ns.in_ns(lambda: HttpBackend("direct", "0.0.0.0", 9999).start())
    stop = threading.Event()
    made: list[int] = []

    def connect_forever() -> None:
        while not stop.is_set():
            conn = http.client.HTTPConnection(SERVICE, 9999, timeout=3)
            try:
                conn.request("GET", "/")
                conn.getresponse().read()
                made.append(1)
            finally:
                conn.close()

    try:
        iptables.install(run, 10000, 1337, (8900,), inbound_port=15006)
        client = threading.Thread(target=lambda: ns.in_ns(connect_forever, timeout=120), daemon=True)
        client.start()
        for _ in range(20):  # what 20 full resyncs of the agent do to a set-up pod
            iptables.install(run, 10000, 1337, (8900,), inbound_port=15006)
        stop.set()
        client.join(10)
        assert len(made) > 20, "too few connections to tell"
        assert direct.hits == 0, f"{direct.hits} of {len(made)} connections bypassed the sidecar during re-installs"
        assert sidecar.hits == len(made)
        assert iptables.installed(run, inbound=True)
    finally:
        stop.set()
        sidecar.stop()
        direct.stop()
