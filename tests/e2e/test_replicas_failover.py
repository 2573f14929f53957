"""Several control-plane replicas (issue 20): three real ``trafficmgr serve`` processes against the
project's API server, leader election on a ``coordination.k8s.io/v1`` Lease, 10 real sidecar Envoys on
loopback spread over the replicas (each bootstrap lists all three xDS addresses with
``xds_prefer_first``, rotated so Envoy *i* prefers replica *i* mod 3), client traffic through every
Envoy the whole time (explicit proxy on ``<pod IP>:15001`` to two loopback backends).

1. Before the failover: the Ingress's status is written once and the label-error Event once, although
   three replicas build the same model (only the Lease holder writes).
2. The leader is SIGKILLed (no release). While no replica leads, a label changes
   (``traffic.lb.policy=RING_HASH`` on ``reviews``), a second Service gets an invalid label and a second
   Ingress appears.
3. Another replica holds the Lease (read with the real kubectl) within the lease duration plus two retry
   periods (the bound of the election algorithm, see ``trafficmgr.core.kube.leader``); the label change
   reaches all 10 Envoys within a few seconds, typically before there is a new leader (the ones connected
   to the dead replica reconnect to a survivor, delta ones included); the new leader
   writes the second Ingress's status and the second Event once each, and does not write the first ones
   again (they are already in the API).
4. Not one request failed, on any Envoy.

The Lease lasts 4 s here instead of the default 15 s only to keep the test short: the election code path
is the same, a failover just takes ~4-6 s instead of ~15-19 s.
"""

from __future__ import annotations

import datetime
import http.client
import json
import os
import random
import shutil
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
from trafficmgr.core.model import INVALID_LABEL
from trafficmgr.testing.backends import HttpBackend
from trafficmgr.testing.cluster import Kubectl, http_get
from trafficmgr.testing.envoy import EnvoyProcess, free_port, wait_for
from trafficmgr.testing.prereq import missing

REPLICAS = 3
SIDECARS = 10
LEASE = "trafficmgr"
LEASE_SECONDS = 4
RETRY_SECONDS = 1.0  # what serve derives from a 4 s lease (duration / 7.5, at least 1 s)
REVIEWS = "9080|default|reviews"
GATEWAY_IP = "10.96.0.80"


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


class Replica:
    """One ``trafficmgr serve`` process (replica ``cp-<i>``) with a 4 s Lease."""

    def __init__(self, index: int, kubeconfig: Path, workdir: Path) -> None:
        self.name = f"cp-{index}"
        self.xds_port, self.admin_port = free_port(), free_port()
        self.log_path = workdir / f"{self.name}.log"
        self.cmd = [sys.executable, "-m", "trafficmgr", "serve", "--kubeconfig", str(kubeconfig),
                    "--xds-address", "127.0.0.1", "--xds-port", str(self.xds_port),
                    "--admin-port", str(self.admin_port), "--explicit-proxy", "--replica-name", self.name,
                    "--lease-namespace", "default", "--lease-duration", str(LEASE_SECONDS)]
        self.proc: subprocess.Popen[bytes] | None = None
        self.admin = f"http://127.0.0.1:{self.admin_port}"

    def start(self) -> Replica:
        env = {k: v for k, v in os.environ.items() if k not in ("POD_NAME", "POD_NAMESPACE")}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        return self

    def wait_ready(self) -> None:
        def ready() -> bool:
            assert self.proc is not None and self.proc.poll() is None, f"{self.name} exited:\n{self.log()}"
            try:
                return http_get(self.admin + "/readyz", 1)[0] == 200
            except OSError:
                return False

        wait_for(ready, 30, message=f"{self.name} not ready")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        assert self.proc is not None and self.proc.poll() is None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.alive:
            self.kill()

    def nodes(self) -> set[str]:
        code, body = http_get(self.admin + "/debug/proxy-status")
        assert code == 200, body
        return {s["node_id"] for s in json.loads(body)}

    def leader_gauge(self) -> float:
        code, body = http_get(self.admin + "/metrics")
        assert code == 200, body
        for line in body.splitlines():
            if line.startswith("trafficmgr_leader "):
                return float(line.split()[1])
        raise AssertionError("no trafficmgr_leader in /metrics")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""


class Traffic(threading.Thread):
    """Requests ``http://reviews:9080/`` through one sidecar's explicit proxy until stopped."""

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
            time.sleep(0.1)

    def failures(self) -> list[int | str]:
        return [o for o in self.outcomes if o != 200]


def _lb_policy(envoy: EnvoyProcess) -> str:
    for cluster in envoy.dynamic("clusters"):
        if cluster.get("name", "").startswith(REVIEWS):
            return str(cluster.get("lb_policy", "ROUND_ROBIN"))
    return ""


def _active_lb_policy(envoy: EnvoyProcess) -> str:
    """:func:`_lb_policy` from a config dump of the active reviews cluster only (cheap to poll often)."""
    dump = json.loads(envoy.admin("/config_dump?resource=dynamic_active_clusters&name_regex=" + REVIEWS.replace("|", "%5C%7C") + ".*"))
    for item in dump.get("configs", []):
        cluster = item.get("cluster") or {}
        if cluster.get("name", "").startswith(REVIEWS):
            return str(cluster.get("lb_policy", "ROUND_ROBIN"))
    return ""


def _lease_spec(kubectl: Kubectl) -> dict[str, Any]:
    proc = kubectl.run("get", "lease", LEASE, "-n", "default", "-o", "json", check=False)
    return dict(json.loads(proc.stdout).get("spec") or {}) if proc.returncode == 0 else {}


def _instant(micro_time: str) -> float:
    """Epoch seconds of a Lease's MicroTime (``2026-12-07T06:50:01.123456Z``)."""
    return datetime.datetime.fromisoformat(micro_time.replace("Z", "+00:00")).timestamp()


def _holder(kubectl: Kubectl) -> str:
    proc = kubectl.run("get", "lease", LEASE, "-n", "default", "-o", "json", check=False)
    if proc.returncode != 0:
        return ""
    return str((json.loads(proc.stdout).get("spec") or {}).get("holderIdentity") or "")


def _ingress(name: str) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": name, "namespace": "default"},
            "spec": {"ingressClassName": "traffic", "rules": [{"host": f"{name}.example", "http": {"paths": [
                {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "reviews", "port": {"number": 9080}}}}]}}]}}


def _service(name: str, labels: dict[str, str], ports: list[dict[str, Any]], selector: dict[str, str] | None = None,
             cluster_ip: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"ports": ports}
    if selector:
        spec["selector"] = selector
    if cluster_ip:
        spec["clusterIP"] = cluster_ip
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default", "labels": labels},
            "spec": spec}


@pytest.fixture
def mesh(tmp_path: Path, envoy_binary: str) -> Iterator[dict[str, Any]]:
    if shutil.which("kubectl") is None:
        missing("kubectl not found (bash .ci/install.d/kubectl.sh installs it)")
    prefix = _block()
    api = APIServer().start()
    kubeconfig = tmp_path / "kubeconfig"
    api.write_kubeconfig(str(kubeconfig))
    store = api.store
    # Every status write and Event the replicas make, counted where they land (the API server runs here).
    writes: list[tuple[str, str]] = []
    patch, create = store.patch, store.create

    def counting_patch(resource: Any, name: str, body: Any, namespace: str | None = None, *a: Any, **kw: Any) -> Any:
        if getattr(resource, "plural", resource) == "ingresses" and kw.get("subresource") == "status":
            writes.append(("status", name))
        return patch(resource, name, body, namespace, *a, **kw)

    def counting_create(obj: dict[str, Any], *a: Any, **kw: Any) -> Any:
        out = create(obj, *a, **kw)
        if obj.get("kind") == "Event":
            writes.append(("event", out["involvedObject"]["name"]))
        return out

    store.patch, store.create = counting_patch, counting_create  # type: ignore[method-assign]
    backends: list[HttpBackend] = []
    envoys: list[EnvoyProcess] = []
    replicas = [Replica(i, kubeconfig, tmp_path) for i in range(REPLICAS)]

    def pod(name: str, ip: str, labels: dict[str, str]) -> None:
        store.create({"apiVersion": "v1", "kind": "Pod",
                      "metadata": {"name": name, "namespace": "default", "labels": labels},
                      "spec": {"nodeName": "node-1", "containers": [{"name": "app", "image": "app"}]}})
        store.patch("pods", name, {"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                                              "conditions": [{"type": "Ready", "status": "True"}]}},
                    "default", patch_type="merge", subresource="status")

    try:
        store.create(_service("reviews", {"traffic.port.9080": "http"}, [{"name": "http", "port": 9080}], {"app": "reviews"}))
        store.create(_service("traffic-ingress", {}, [{"name": "http", "port": 80}], {"app": "traffic-ingress"}, GATEWAY_IP))
        store.create(_service("details", {"traffic.lb.policy": "FAST"}, [{"name": "http", "port": 9080}], {"app": "details"}))
        store.create(_ingress("web"))
        for i in (1, 2):
            ip = f"{prefix}.{200 + i}"
            backends.append(HttpBackend(f"reviews-{i}", ip, 9080).start())
            pod(f"reviews-{i}", ip, {"app": "reviews"})
        clients = [(f"client-{i}", f"{prefix}.{10 + i}") for i in range(SIDECARS)]
        for name, ip in clients:
            pod(name, ip, {"app": "client", "traffic.envoy.enabled": "true"})
        api.wait_idle(5)
        for r in replicas:
            r.start()
        for r in replicas:
            r.wait_ready()

        def start_envoy(index: int) -> EnvoyProcess:
            name, ip = clients[index]
            order = [replicas[(index + k) % REPLICAS] for k in range(REPLICAS)]  # Envoy i prefers replica i % 3
            config = bootstrap(f"{name}.default", "sidecar", "127.0.0.1", order[0].xds_port, admin_port=0,
                               delta=index % 2 == 1, xds_source_address=ip, xds_retry_base_s=0.25, xds_retry_max_s=1.0,
                               xds_more=[("127.0.0.1", r.xds_port) for r in order[1:]], xds_prefer_first=True)
            envoy = EnvoyProcess(add_explicit_proxy(config, ip), tmp_path / name, timeout=40)
            envoys.append(envoy)
            return envoy.start()

        with ThreadPoolExecutor(5) as pool:
            started = list(pool.map(start_envoy, range(SIDECARS)))
        yield {"api": api, "store": store, "replicas": replicas, "envoys": started, "clients": clients,
               "backends": backends, "writes": writes, "kubectl": Kubectl(kubeconfig, tmp_path),
               "node_ids": [f"{name}.default" for name, _ in clients]}
    finally:
        for envoy in envoys:
            envoy.stop()
        for r in replicas:
            r.stop()
        for b in backends:
            b.stop()
        api.stop()


def _events(store: Any, name: str) -> list[dict[str, Any]]:
    return [e for e in store.list("events", "default")["items"]
            if e["involvedObject"]["name"] == name and e["reason"] == INVALID_LABEL]


def test_leader_killed_another_takes_over_writes_once_no_failed_request(mesh: dict[str, Any]) -> None:
    replicas: list[Replica] = mesh["replicas"]
    envoys: list[EnvoyProcess] = mesh["envoys"]
    store, kubectl, writes = mesh["store"], mesh["kubectl"], mesh["writes"]
    node_ids: list[str] = mesh["node_ids"]
    t0 = time.monotonic()

    # Every Envoy on its preferred replica, with the config; one leader, known to kubectl and /metrics.
    wait_for(lambda: all({node_ids[i] for i in range(SIDECARS) if i % REPLICAS == k} <= replicas[k].nodes()
                         for k in range(REPLICAS)), 30, message="the Envoys did not connect to their first replica")
    wait_for(lambda: all(_lb_policy(e) == "ROUND_ROBIN" for e in envoys), 20, message="reviews cluster missing")
    wait_for(lambda: _holder(kubectl) != "", 15, message="nobody took the Lease")
    holder = _holder(kubectl)
    leader = next(r for r in replicas if r.name == holder)
    assert [r.leader_gauge() for r in replicas] == [1.0 if r is leader else 0.0 for r in replicas]

    # 1. written once although three replicas see the same model
    wait_for(lambda: store.get("ingresses", "web", "default").get("status", {}).get("loadBalancer"), 15,
             message="Ingress status not written")
    wait_for(lambda: _events(store, "details"), 15, message="label-error Event not written")
    time.sleep(2 * RETRY_SECONDS)  # time for a second (wrong) write to show
    assert sorted(writes) == [("event", "details"), ("status", "web")], writes
    assert store.get("ingresses", "web", "default")["status"]["loadBalancer"] == {"ingress": [{"ip": GATEWAY_IP}]}

    traffic = [Traffic(ip) for _, ip in mesh["clients"]]
    for t in traffic:
        t.start()
    try:
        wait_for(lambda: all(t.outcomes.count(200) >= 3 for t in traffic), 15, message="no traffic through the sidecars")

        # 2. SIGKILL the leader; change things while nobody leads
        leader.kill()
        killed_at, killed_wall = time.monotonic(), time.time()
        # The dead leader's last renewal: nobody writes the Lease until another replica takes it.
        last_renewal = _instant(store.get("leases", LEASE, "default")["spec"]["renewTime"])
        store.patch("services", "reviews", {"metadata": {"labels": {"traffic.lb.policy": "RING_HASH"}}}, "default",
                    patch_type="merge")
        store.create(_service("ratings", {"traffic.lb.policy": "SLOW"}, [{"name": "http", "port": 9080}], {"app": "ratings"}))
        store.create(_ingress("shop"))

        # 3. the change applies on every Envoy (followers build and serve it; the dead one's Envoys move),
        # and another replica takes the Lease. When each Envoy has the change is polled (only the Envoys
        # still without it, a small config dump each: the poll's own cost stays out of the figure); when
        # the Lease was taken is the new holder's acquireTime, read with kubectl afterwards.
        applied: dict[int, float] = {}

        def progress() -> bool:
            for i, e in enumerate(envoys):
                if i not in applied and _active_lb_policy(e) == "RING_HASH":
                    applied[i] = time.monotonic() - killed_at
            lease = store.get("leases", LEASE, "default")["spec"]
            return len(applied) == len(envoys) and lease.get("holderIdentity") not in ("", holder)

        try:
            wait_for(progress, 30, interval=0.05)
        except TimeoutError:
            policies = [_lb_policy(e) for e in envoys]
            raise AssertionError(f"after the SIGKILL of {holder}: the label change on {sorted(applied)} of the Envoys "
                                 f"(now {policies}); Lease {store.get('leases', LEASE, 'default')['spec']}") from None
        applied_after = max(applied.values())
        lease = _lease_spec(kubectl)
        new_holder = str(lease.get("holderIdentity") or "")
        acquired = _instant(lease["acquireTime"])
        took_over = acquired - killed_wall
        survivors = [r for r in replicas if r is not leader]
        assert new_holder in {r.name for r in survivors}, lease
        wait_for(lambda: set(node_ids) == survivors[0].nodes() | survivors[1].nodes(), 20,
                 message="not every Envoy reconnected to a surviving replica")
        wait_for(lambda: store.get("ingresses", "shop", "default").get("status", {}).get("loadBalancer"), 15,
                 message="the new leader did not write the new Ingress's status")
        wait_for(lambda: _events(store, "ratings"), 15, message="the new leader did not write the new label-error Event")
        time.sleep(2 * RETRY_SECONDS)
        time.sleep(1.0)  # traffic over the new cluster too
    finally:
        for t in traffic:
            t.stop_flag.set()
        for t in traffic:
            t.join(10)

    assert sorted(writes) == [("event", "details"), ("event", "ratings"), ("status", "shop"), ("status", "web")], \
        f"each status and Event written once: {writes}"
    assert len(_events(store, "details")) == len(_events(store, "ratings")) == 1
    new_leader = next(r for r in survivors if r.name == new_holder)
    assert [r.leader_gauge() for r in survivors] == [1.0 if r is new_leader else 0.0 for r in survivors]
    outcomes = [o for t in traffic for o in t.outcomes]
    failures = [f for t in traffic for f in t.failures()]
    print(f"\nLease taken over {took_over:.1f} s after the SIGKILL, {acquired - last_renewal:.1f} s after the last renewal "
          f"(lease {LEASE_SECONDS} s, retry {RETRY_SECONDS:g} s); "
          f"the change made meanwhile on all {SIDECARS} Envoys after {applied_after:.1f} s; {len(outcomes)} requests "
          f"through {len(traffic)} sidecars, {len(failures)} failed; {time.monotonic() - t0:.1f} s")
    # The design's promise (trafficmgr.core.kube.leader): a replica that dies without releasing is replaced
    # after the lease duration plus at most two retry periods, counted from its last renewal (a candidate's
    # clock starts when it sees that renewal, and it checks once per retry period). Both instants are the
    # replicas' own records in the Lease, so neither kubectl's latency nor this test's polling counts; 0.25 s
    # for the candidates' two Lease round trips to the API server.
    assert acquired - last_renewal <= LEASE_SECONDS + 2 * RETRY_SECONDS + 0.25, \
        f"taken {acquired - last_renewal:.2f} s after the last renewal ({took_over:.2f} s after the SIGKILL)"
    # Serving needs no leader: the change is on every Envoy within the dead replica's health-check interval
    # (2 s) plus the reconnect backoff (<= 1 s), not after Envoy's 15 s initial-fetch timeout (a delta
    # Envoy reconnecting with the old endpoints' versions used to keep the changed cluster warming so long).
    assert applied_after <= 8.0, f"the change made during the failover took {applied_after:.1f} s to reach every Envoy"
    assert not failures, f"{len(failures)} of {len(outcomes)} requests failed: {failures[:10]}"
    assert all(t.outcomes.count(200) > 10 for t in traffic)
    assert all(b.hits > 0 for b in mesh["backends"])
