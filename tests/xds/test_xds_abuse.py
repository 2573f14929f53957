"""The xDS server under abuse (issue 16 item 4): ``trafficmgr serve`` as a subprocess (its RSS is
measured) against the project's API server, a real Envoy sidecar as the legitimate client, and abusive
gRPC clients in another process (``xds_abuse_client.py``) connecting from several loopback addresses:

- 10k streams with random (unknown) node ids from 8 addresses: at most ``--xds-max-streams-per-peer``
  (default 128) stay open per address, the rest are refused (``too_many_streams``);
- streams that never name their node are closed after ``--xds-node-timeout`` (``no_node_timeout``);
- a 6 MiB request is refused and counted (``too_large``), a 20 MiB request and a 10 MB error detail are
  refused by gRPC's own limit (twice the request limit);
- requests for types the server does not serve keep no state and get no answer (``unknown_type``);
- 100 NACKs with 3.5 MiB error details each (from the legitimate pod's IP, so the stream is served):
  the NACK history keeps 4 KiB of each;

while the real Envoy keeps receiving updates (a label change shows in its config) and the server's RSS
stays within :data:`RSS_GROWTH_BOUND` of its size before the abuse.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2
from xds_client import AdsClient

from trafficmgr.apiserver import APIServer
from trafficmgr.core import cache
from trafficmgr.core.access import refused_count
from trafficmgr.core.bootstrap import bootstrap
from trafficmgr.core.cache import SnapshotCache
from trafficmgr.core.xds.server import XdsServerThread
from trafficmgr.core.xds.streams import CHANGED, CLOSED, MAX_NAMES_PER_TYPE, Inbox
from trafficmgr.testing.cluster import Kubectl, http_get
from trafficmgr.testing.envoy import EnvoyProcess, free_port, wait_for

CLIENT = str(Path(__file__).with_name("xds_abuse_client.py"))
#: The server's RSS may grow at most this much over its size before the abuse. Measured here with the
#: limits: +85 MiB at peak (the flood +42: 1024 open streams and 9k refused ones; the big requests +16;
#: the NACKs +27, transient: at most 4 read-ahead requests of 3.5 MiB, parsed). The same run against the
#: server before the limits: +879 MiB (flood +307, big requests +90, unknown types +52, NACKs +429).
RSS_GROWTH_BOUND = 150 << 20
STREAMS = 10_000
SOURCES = [f"127.0.0.{i}" for i in range(2, 10)]  # 8 peers for the flood
CAP = 128  # serve's default --xds-max-streams-per-peer

MANIFESTS = """
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default, labels: {traffic.port.9080: http}}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080}]
---
apiVersion: v1
kind: Pod
metadata: {name: legit, namespace: default, labels: {app: client, traffic.envoy.enabled: "true"}}
spec:
  nodeName: node-1
  containers: [{name: app, image: app}]
"""


class Rss:
    """Samples a process's resident set size every 50 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.peak = max(self.peak, self.now())
            except (OSError, AssertionError):
                return

    def __enter__(self) -> Rss:
        self.peak = self.now()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def abuse(port: int, scenario: str, timeout: float = 90, **kw: Any) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, CLIENT, str(port), scenario, json.dumps(kw)],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{scenario}: {proc.stderr[-3000:]}"
    return json.loads(proc.stdout.splitlines()[0])


def refused(admin: str) -> dict[str, float]:
    code, text = http_get(admin + "/metrics")
    assert code == 200
    out = {}
    for line in text.splitlines():
        if line.startswith("trafficmgr_xds_streams_refused_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            out[reason] = float(line.rsplit(" ", 1)[1])
    return out


@pytest.fixture
def served(tmp_path: Path, envoy_binary: str) -> Iterator[dict[str, Any]]:
    api = APIServer().start()
    kubeconfig = tmp_path / "kubeconfig"
    api.write_kubeconfig(str(kubeconfig))
    kubectl = Kubectl(kubeconfig, tmp_path / "home")
    xds_port, admin_port = free_port(), free_port()
    log = open(tmp_path / "serve.log", "wb")
    serve = subprocess.Popen(
        [sys.executable, "-m", "trafficmgr", "serve", "--kubeconfig", str(kubeconfig),
         "--xds-address", "127.0.0.1", "--xds-port", str(xds_port), "--admin-port", str(admin_port),
         "--xds-node-timeout", "2"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    envoy: EnvoyProcess | None = None
    admin = f"http://127.0.0.1:{admin_port}"
    try:
        def ready() -> bool:
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                return http_get(admin + "/readyz", 1)[0] == 200
            except OSError:
                return False

        wait_for(ready, 30, message="serve not ready")
        kubectl.apply(MANIFESTS)
        kubectl.set_pod_status("legit", "127.0.0.1", ready=True)
        config = bootstrap("legit.default", "sidecar", "127.0.0.1", xds_port, admin_port=0,
                           xds_source_address="127.0.0.1")
        envoy = EnvoyProcess(config, tmp_path / "envoy").start()
        yield {"kubectl": kubectl, "serve": serve, "envoy": envoy, "port": xds_port, "admin": admin,
               "log": tmp_path / "serve.log"}
    finally:
        if envoy is not None:
            envoy.stop()
        serve.terminate()
        try:
            serve.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, 9)
            serve.wait(5)
        api.stop()


def lb_policy(envoy: EnvoyProcess) -> str:
    for cluster in envoy.dynamic("clusters"):
        if cluster.get("name", "").startswith("9080|default|reviews"):
            return str(cluster.get("lb_policy", "ROUND_ROBIN"))
    return ""


def test_abusive_clients_do_not_exhaust_the_server(served: dict[str, Any]) -> None:
    envoy: EnvoyProcess = served["envoy"]
    port: int = served["port"]
    wait_for(lambda: lb_policy(envoy) == "ROUND_ROBIN", 10, message="Envoy never got the reviews cluster")
    before = refused(served["admin"])
    time.sleep(1.0)  # let the startup allocations settle
    started = time.monotonic()
    with Rss(served["serve"].pid) as rss:
        baseline = rss.now()
        phases: list[tuple[str, int]] = []
        flood_log = served["log"].with_name("flood.log")
        flood = subprocess.Popen([sys.executable, CLIENT, str(port), "flood",
                                  json.dumps({"sources": SOURCES, "total": STREAMS})],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(flood_log, "wb"), text=True)
        try:
            assert flood.stdout is not None
            line = flood.stdout.readline()
            assert line, f"flood client failed: {flood_log.read_text()[-3000:]}"
            codes = json.loads(line)["codes"]
            # Every address keeps exactly CAP streams of unknown nodes; everything else is refused.
            assert codes.get("open", 0) == CAP * len(SOURCES), codes
            # Every other stream ended. The server refuses each with RESOURCE_EXHAUSTED (counted exactly in
            # its metrics, below); on a loaded machine grpc-aio reports some of those to this client as
            # CANCELLED or INTERNAL (the abort races the client's write: 1368 + 9 of 8976 in one full-suite run).
            assert sum(codes.values()) == STREAMS, codes
            assert set(codes) <= {"open", "RESOURCE_EXHAUSTED", "CANCELLED", "INTERNAL"}, codes
            assert codes.get("RESOURCE_EXHAUSTED", 0) > STREAMS * 0.5, codes
            exhausted = codes.get("RESOURCE_EXHAUSTED", 0)

            phases.append(('flood', rss.peak))
            silent = abuse(port, "silent", src="127.0.0.10", n=50)
            assert silent["codes"] == {"UNAUTHENTICATED": 50}, silent
            assert silent["seconds"] < 15, silent  # closed after --xds-node-timeout 2 (+5 s of quiet to be sure)

            phases.append(('silent', rss.peak))
            big = abuse(port, "big", src="127.0.0.11", sizes_mib=[6, 20], error_mib=10)["results"]
            assert [code for code, _ in big] == ["RESOURCE_EXHAUSTED"] * 3, big
            assert "the limit is 4194304" in big[0][1], big

            phases.append(('big', rss.peak))
            unknown = abuse(port, "unknown", src="127.0.0.12", n=1000, names=1000)
            assert unknown == {"answered": False, "ended": False}, unknown

            phases.append(('unknown types', rss.peak))
            # From the legitimate pod's IP, claiming its node: served, so its NACKs are recorded.
            nacks = abuse(port, "nacks", src="127.0.0.1", node_id="legit.default", n=100, error_mib=3.5)
            assert nacks == {"sent": 100, "ended": False}, nacks

            phases.append(('nacks', rss.peak))
            # The real Envoy still gets updates while the flood's streams are open.
            served["kubectl"]("label", "svc", "reviews", "traffic.lb.policy=RING_HASH")
            wait_for(lambda: lb_policy(envoy) == "RING_HASH", 15, message="Envoy did not get the label change")
            peak = rss.peak
            phases.append(("label", peak))
        finally:
            if flood.stdin is not None:
                flood.stdin.close()
            flood.wait(30)
    elapsed = time.monotonic() - started
    after = refused(served["admin"])
    grew = {reason: after.get(reason, 0) - before.get(reason, 0) for reason in after}
    print(f"\nRSS before {baseline / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB "
          f"(+{(peak - baseline) / 2**20:.0f} MiB), {elapsed:.0f} s; refused: {grew}; peak after each phase: "
          + ", ".join(f"{name} {value / 2**20:.0f}" for name, value in phases))
    assert peak - baseline < RSS_GROWTH_BOUND, f"RSS grew {(peak - baseline) / 2**20:.0f} MiB"
    # Every refusal the client saw is counted, and nothing beyond the streams over the cap; a stream the
    # client's grpc cancelled before the server's handler ran (CANCELLED above, under load) is not a
    # refusal: 24 of 8976 in one clean-clone CI run, 0 when the test runs alone.
    assert exhausted <= grew["too_many_streams"] <= STREAMS - CAP * len(SOURCES), (exhausted, grew)
    assert grew["no_node_timeout"] == 50
    assert grew["too_large"] == 1  # the 6 MiB one; 20 MiB and 10 MB are over gRPC's own limit
    assert grew["unknown_type"] == 1000
    assert grew["unknown"] >= CAP * len(SOURCES)

    # The NACK history kept 4 KiB of each 3.5 MiB error (and the server logged no more than that).
    code, body = http_get(served["admin"] + "/debug/nacks")
    assert code == 200
    history = [n for n in json.loads(body) if n["node_id"] == "legit.default"]
    assert len(history) == 100
    assert all(len(n["error"]) < 4200 for n in history), max(len(n["error"]) for n in history)
    assert served["log"].stat().st_size < 5 << 20
    assert envoy.stats().get("cluster_manager.cds.update_rejected", 0) == 0


# -- the same limits, one at a time, on an in-process server ----------------------------------------


@pytest.fixture
def xds() -> Iterator[XdsServerThread]:
    server = XdsServerThread(SnapshotCache(), "127.0.0.1", 0, max_streams_per_peer=3, node_timeout=1.0).start()
    try:
        yield server
    finally:
        server.stop()


def _ended(client: AdsClient) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        client.recv(timeout=5)
    code: grpc.StatusCode = info.value.code()
    return code


def test_a_stream_must_name_its_node(xds: XdsServerThread) -> None:
    before = refused_count("no_node")
    client = AdsClient(xds.port, node_id="")
    client.send(type_url=cache.CLUSTER)
    assert _ended(client) == grpc.StatusCode.INVALID_ARGUMENT
    assert refused_count("no_node") == before + 1
    client.close()


def test_too_many_names_end_the_stream(xds: XdsServerThread) -> None:
    before = refused_count("too_many_names")
    client = AdsClient(xds.port, node_id="names.default")
    client.send(type_url=cache.ENDPOINT, resource_names=[f"e{i}" for i in range(MAX_NAMES_PER_TYPE + 1)])
    assert _ended(client) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused_count("too_many_names") == before + 1
    client.close()


def test_per_peer_cap_counts_unknown_nodes_and_frees_closed_streams(xds: XdsServerThread) -> None:
    clients = [AdsClient(xds.port, node_id=f"unknown-{i}.default") for i in range(3)]
    for c in clients:
        c.send(type_url=cache.CLUSTER)
    wait_for(lambda: len(xds.status()) == 3, 5)
    extra = AdsClient(xds.port, node_id="one-too-many.default")
    extra.send(type_url=cache.CLUSTER)
    assert _ended(extra) == grpc.StatusCode.RESOURCE_EXHAUSTED
    extra.close()
    clients.pop().close()
    wait_for(lambda: len(xds.status()) == 2, 5)
    again = AdsClient(xds.port, node_id="fits-again.default")
    again.send(type_url=cache.CLUSTER)
    assert again.silent(0.5)  # open, waiting for its node to appear
    for c in [*clients, again]:
        c.close()


def test_unix_socket_clients_are_not_capped(tmp_path: Path) -> None:
    sock = tmp_path / "xds.sock"
    server = XdsServerThread(SnapshotCache(), f"unix:{sock}", 0, max_streams_per_peer=1).start()
    channel = grpc.insecure_channel(f"unix:{sock}", options=[("grpc.enable_http_proxy", 0)])
    calls = []
    done = threading.Event()

    def requests(node_id: str) -> Iterator[discovery_pb2.DiscoveryRequest]:
        req = discovery_pb2.DiscoveryRequest(type_url=cache.CLUSTER)
        req.node.id = node_id
        yield req
        done.wait(10)  # keep the stream open

    try:
        rpc = channel.stream_stream("/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
                                    request_serializer=lambda m: m.SerializeToString())
        calls = [rpc(requests(f"local-{i}.default")) for i in range(5)]
        wait_for(lambda: len(server.status()) == 5, 5, message="the Unix-socket streams were capped")
    finally:
        done.set()
        for c in calls:
            c.cancel()
        channel.close()
        server.stop()


def test_inbox_bounds_requests_and_coalesces_changes() -> None:
    async def run() -> None:
        inbox = Inbox(limit=2)
        await inbox.put(1)
        await inbox.put(2)
        third = asyncio.ensure_future(inbox.put(3))
        await asyncio.sleep(0.05)
        assert not third.done()  # the reader waits: back-pressure
        for _ in range(100):
            inbox.signal_change()
        assert await inbox.get() == 1
        await asyncio.sleep(0.01)
        assert third.done()
        assert [await inbox.get(), await inbox.get()] == [2, 3]
        assert await inbox.get() is CHANGED  # 100 changes, one push
        inbox.close()
        assert await inbox.get() is CLOSED

    asyncio.run(run())
