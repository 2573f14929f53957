"""Control-plane process restart (issue 17, reliability): a real ``trafficmgr serve`` process against the
project's API server serves 20 real sidecar Envoys on loopback (each its own pod IP 127.x.y.z, the xDS
connection made from it, so ``--xds-auth peer-ip`` (the default) admits each as its pod; half speak
state-of-the-world xDS, half delta), and client traffic flows through 4 of them continuously (explicit
proxy on ``<pod IP>:15001``, as in local mode).

The serve process is killed with SIGKILL and started again (its cache rebuilt from the API alone):

1. no change meanwhile: every Envoy reconnects to the new process and ACKs exactly the config it had
   (its ``/config_dump``, timestamps aside, is identical before and after: same versions, same content);
2. a label changed while serve is down (``traffic.lb.policy=RING_HASH`` on the Service) reaches all 20
   Envoys after the restart;

and not one request fails meanwhile: Envoy keeps its last config while the control plane is away.
"""

from __future__ import annotations

import http.client
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from trafficmgr.apiserver import APIServer
from trafficmgr.core.agent.local_runtime import PROXY_PORT, add_explicit_proxy
from trafficmgr.core.bootstrap import bootstrap
from trafficmgr.testing.backends import HttpBackend
from trafficmgr.testing.cluster import http_get
from trafficmgr.testing.envoy import EnvoyProcess, free_port, wait_for

SIDECARS = 20
#: Sidecars that client traffic goes through during the outages (two state of the world, two delta).
TRAFFIC_THROUGH = (0, 7, 12, 19)
#: Half the sidecars speak delta xDS (a reconnect sends the versions they hold), half state of the world.
DELTA = frozenset(f"client-{i}" for i in range(1, SIDECARS, 2))
REVIEWS = "9080|default|reviews"
TYPES = ("clusters", "endpoints", "listeners", "routes")


def _block() -> str:
    """A random ``127.b.c`` block whose addresses are free here (parallel runs do not collide)."""
    rng = random.Random()
    for _ in range(50):
        prefix = f"127.{rng.randint(64, 250)}.{rng.randint(0, 255)}"
        with socket.socket() as s:
            try:
                s.bind((f"{prefix}.1", PROXY_PORT))
            except OSError:
                continue
        return prefix
    raise RuntimeError("no free 127.x.y.0/24 block")


class Serve:
    """``trafficmgr serve`` as a subprocess on fixed ports (a restart uses the same ones)."""

    def __init__(self, kubeconfig: Path, workdir: Path) -> None:
        self.xds_port, self.admin_port = free_port(), free_port()
        self.log_path = workdir / "serve.log"
        self.cmd = [sys.executable, "-m", "trafficmgr", "serve", "--kubeconfig", str(kubeconfig),
                    "--xds-address", "127.0.0.1", "--xds-port", str(self.xds_port),
                    "--admin-port", str(self.admin_port), "--explicit-proxy"]
        self.proc: subprocess.Popen[bytes] | None = None
        self.admin = f"http://127.0.0.1:{self.admin_port}"

    def start(self) -> Serve:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        def ready() -> bool:
            assert self.proc is not None and self.proc.poll() is None, f"serve exited:\n{self.log()}"
            try:
                return http_get(self.admin + "/readyz", 1)[0] == 200
            except OSError:
                return False

        wait_for(ready, 30, message="serve not ready")  # ready() fails with the log if serve exits
        return self

    def kill(self) -> None:
        """SIGKILL the process (no drain, no goodbye to the streams) and reap it."""
        assert self.proc is not None and self.proc.poll() is None, "serve is not running"
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def status(self) -> list[dict[str, Any]]:
        import json

        code, body = http_get(self.admin + "/debug/proxy-status")
        assert code == 200, body
        return list(json.loads(body))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""


class Traffic(threading.Thread):
    """Requests ``http://reviews:9080/`` through one sidecar's explicit proxy until stopped; records
    every outcome (HTTP status, or the error)."""

    def __init__(self, proxy_ip: str) -> None:
        super().__init__(name=f"traffic-{proxy_ip}", daemon=True)
        self.proxy_ip = proxy_ip
        self.outcomes: list[int | str] = []
        self.stop_flag = threading.Event()

    def run(self) -> None:
        while not self.stop_flag.is_set():
            conn = http.client.HTTPConnection(self.proxy_ip, PROXY_PORT, timeout=5)
            try:
                conn.request("GET", "http://reviews:9080/t", headers={"Host": "reviews:9080"})
                resp = conn.getresponse()
                resp.read()
                self.outcomes.append(resp.status)
            except OSError as exc:
                self.outcomes.append(f"{type(exc).__name__}: {exc}")
            finally:
                conn.close()
            time.sleep(0.02)

    def failures(self) -> list[int | str]:
        return [o for o in self.outcomes if o != 200]


def _strip_times(value: Any) -> Any:
    """``value`` without ``last_updated`` fields (the only part of a config dump that differs when the
    same config is received again)."""
    if isinstance(value, dict):
        return {k: _strip_times(v) for k, v in value.items() if k != "last_updated"}
    if isinstance(value, list):
        return [_strip_times(v) for v in value]
    return value


def _dump(envoy: EnvoyProcess) -> Any:
    return _strip_times(envoy.config_dump(include_eds=True))


def _lb_policy(envoy: EnvoyProcess) -> str:
    for cluster in envoy.dynamic("clusters"):
        if cluster.get("name", "").startswith(REVIEWS):
            return str(cluster.get("lb_policy", "ROUND_ROBIN"))
    return ""


def _synced(serve: Serve, node_ids: set[str]) -> bool:
    """Every node has exactly one stream to ``serve`` and it ACKed what was last sent, on every type.

    One exception: a delta stream that reconnects already holding the current endpoints and routes (its
    ``initial_resource_versions`` match) is sent nothing for them, so the new server has no state for
    those types (``proxy-status`` shows ``-``); that Envoy's config is compared separately."""
    streams = serve.status()
    seen = [s["node_id"] for s in streams]
    if sorted(seen) != sorted(node_ids):
        return False
    for s in streams:
        for t in TYPES:
            state = s.get(t) or {}
            assert not state.get("last_nack"), f"{s['node_id']} NACKed {t}: {state['last_nack']}"
            if state.get("sent") is None and s["mode"] == "delta" and t in ("endpoints", "routes"):
                continue
            if state.get("sent") is None or state.get("acked") != state.get("sent"):
                return False
    return True


def _acked(serve: Serve) -> dict[tuple[str, str], str]:
    """(node id, type) -> version ACKed on its stream (types the stream has no state for left out)."""
    return {(s["node_id"], t): s[t]["acked"] for s in serve.status() for t in TYPES if s[t]["acked"] is not None}


def _summary(serve: Serve) -> list[str]:
    """One line per stream: node id and sent/acked version of each type."""
    return [f"{s['node_id']} " + " ".join(f"{t}={(s.get(t) or {}).get('sent')}/{(s.get(t) or {}).get('acked')}" for t in TYPES)
            for s in serve.status()]


def _wait_synced(serve: Serve, node_ids: set[str], what: str, timeout: float = 30) -> None:
    """Wait for :func:`_synced`; fail with the streams as they are at the timeout."""
    try:
        wait_for(lambda: _synced(serve, node_ids), timeout)
    except TimeoutError:
        raise AssertionError(f"{what}: {_summary(serve)}\n{serve.log()}") from None


@pytest.fixture
def mesh(tmp_path: Path, envoy_binary: str) -> Iterator[dict[str, Any]]:
    prefix = _block()
    api = APIServer().start()
    kubeconfig = tmp_path / "kubeconfig"
    api.write_kubeconfig(str(kubeconfig))
    store = api.store
    backends: list[HttpBackend] = []
    envoys: list[EnvoyProcess] = []
    serve = Serve(kubeconfig, tmp_path)

    def pod(name: str, ip: str, labels: dict[str, str]) -> None:
        store.create({"apiVersion": "v1", "kind": "Pod",
                      "metadata": {"name": name, "namespace": "default", "labels": labels},
                      "spec": {"nodeName": "node-1", "containers": [{"name": "app", "image": "app"}]}})
        store.patch("pods", name, {"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                                              "conditions": [{"type": "Ready", "status": "True"}]}},
                    "default", patch_type="merge", subresource="status")

    try:
        store.create({"apiVersion": "v1", "kind": "Service",
                      "metadata": {"name": "reviews", "namespace": "default", "labels": {"traffic.port.9080": "http"}},
                      "spec": {"selector": {"app": "reviews"}, "ports": [{"name": "http", "port": 9080}]}})
        for i in (1, 2):
            ip = f"{prefix}.{200 + i}"
            backends.append(HttpBackend(f"reviews-{i}", ip, 9080).start())
            pod(f"reviews-{i}", ip, {"app": "reviews"})
        clients = [(f"client-{i}", f"{prefix}.{10 + i}") for i in range(SIDECARS)]
        for name, ip in clients:
            pod(name, ip, {"app": "client", "traffic.envoy.enabled": "true"})
        api.wait_idle(5)
        serve.start()

        def start_envoy(item: tuple[str, str]) -> EnvoyProcess:
            name, ip = item
            delta = name in DELTA
            config = bootstrap(f"{name}.default", "sidecar", "127.0.0.1", serve.xds_port, admin_port=0, delta=delta,
                               xds_source_address=ip, xds_retry_base_s=0.25, xds_retry_max_s=1.0)
            envoy = EnvoyProcess(add_explicit_proxy(config, ip), tmp_path / name, timeout=40)
            envoys.append(envoy)
            return envoy.start()

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(start_envoy, clients))
        yield {"api": api, "store": store, "serve": serve, "envoys": envoys, "clients": clients,
               "backends": backends, "node_ids": {f"{name}.default" for name, _ in clients}}
    finally:
        for envoy in envoys:
            envoy.stop()
        serve.stop()
        for b in backends:
            b.stop()
        api.stop()


def test_serve_killed_and_restarted_keeps_traffic_and_resyncs_20_envoys(mesh: dict[str, Any]) -> None:
    serve: Serve = mesh["serve"]
    envoys: list[EnvoyProcess] = mesh["envoys"]
    node_ids: set[str] = mesh["node_ids"]
    started = time.monotonic()
    _wait_synced(serve, node_ids, "not every Envoy synced")
    wait_for(lambda: all(_lb_policy(e) == "ROUND_ROBIN" for e in envoys), 10, message="reviews cluster missing")
    before = [_dump(e) for e in envoys]
    versions = _acked(serve)
    assert len(versions) == SIDECARS * len(TYPES), "a fresh stream gets every type"

    traffic = [Traffic(mesh["clients"][i][1]) for i in TRAFFIC_THROUGH]
    for t in traffic:
        t.start()
    try:
        wait_for(lambda: all(t.outcomes.count(200) >= 3 for t in traffic), 10,
                 message="no traffic through the sidecars")

        # 1. SIGKILL, a few seconds of outage, start again: the same config, from the API alone.
        serve.kill()
        wait_for(lambda: all(e.stats().get("control_plane.connected_state") == 0 for e in envoys), 10,
                 message="the Envoys did not notice the control plane was gone")
        time.sleep(1.0)
        serve.start()
        _wait_synced(serve, node_ids, "not every Envoy resynced after the restart")
        again = _acked(serve)
        assert {k: v for k, v in versions.items() if k in again} == again, \
            "the restarted control plane serves other versions than before"
        assert all(node.split(".")[0] in DELTA for node, t in set(versions) - set(again)), \
            "only delta streams may have been sent nothing (see _synced)"
        assert all(e.stats().get("control_plane.connected_state") == 1 for e in envoys)
        after = [_dump(e) for e in envoys]
        for (name, _), old, new in zip(mesh["clients"], before, after, strict=True):
            assert new == old, f"{name}: config after the restart differs from before"

        # 2. A label changed while serve is down applies once it is back, on every Envoy.
        serve.kill()
        mesh["store"].patch("services", "reviews", {"metadata": {"labels": {"traffic.lb.policy": "RING_HASH"}}},
                            "default", patch_type="merge")
        time.sleep(1.0)
        assert all(_lb_policy(e) == "ROUND_ROBIN" for e in envoys), "nobody could have sent the change yet"
        serve.start()
        wait_for(lambda: all(_lb_policy(e) == "RING_HASH" for e in envoys), 30,
                 message="the change made during the outage did not reach every Envoy")
        _wait_synced(serve, node_ids, "not every Envoy ACKed the change", 15)
        time.sleep(0.5)  # traffic over the new cluster too
    finally:
        for t in traffic:
            t.stop_flag.set()
        for t in traffic:
            t.join(10)
    outcomes = [o for t in traffic for o in t.outcomes]
    failures = [f for t in traffic for f in t.failures()]
    print(f"\n{len(outcomes)} requests through {len(traffic)} of {len(envoys)} sidecars across two SIGKILL "
          f"restarts, {len(failures)} failed; {time.monotonic() - started:.1f} s")
    assert not failures, f"{len(failures)} of {len(outcomes)} requests failed: {failures[:10]}"
    assert len(outcomes) > 100
    assert all(b.hits > 0 for b in mesh["backends"])
    assert all(e.stats().get("cluster_manager.cds.update_rejected", 0) == 0 for e in envoys)
