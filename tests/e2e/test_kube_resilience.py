"""Watch resilience: API restarts, expired resourceVersions (410) and dropped watches lose no update, and
requests through Envoy keep working meanwhile."""

from __future__ import annotations

import argparse
import threading
import time
import urllib.error
import urllib.request

from trafficmgr.apiserver import APIServer
from trafficmgr.core.controlplane import ControlPlane
from trafficmgr.core.kube.client import KubeClient, load_api_client
from trafficmgr.testing.cluster import LocalCluster
from trafficmgr.testing.envoy import wait_for
from trafficmgr.testing.manifests import join, pod, service
from trafficmgr.testing.netns import require as _require_netns

PODS = {"reviews-1": "10.244.0.11", "reviews-2": "10.244.0.12", "reviews-3": "10.244.0.13"}




class Traffic(threading.Thread):
    """Sends requests through the sidecar until stopped; records every status."""

    def __init__(self, c: LocalCluster, url: str) -> None:
        super().__init__(daemon=True)
        self.c, self.url = c, url
        self.statuses: list[int] = []
        self.stop_flag = threading.Event()

    def run(self) -> None:
        def loop() -> None:
            while not self.stop_flag.is_set():
                try:
                    with urllib.request.urlopen(self.url, timeout=3) as r:
                        self.statuses.append(r.status)
                except urllib.error.HTTPError as e:
                    self.statuses.append(e.code)
                except OSError:
                    self.statuses.append(0)
                time.sleep(0.01)

        self.c.pod.in_ns(loop, timeout=600)


def _fresh_version(c: LocalCluster) -> str:
    """Snapshot version of a control plane built from scratch against the same API."""
    cp = ControlPlane(c.plugins, argparse.Namespace(sidecar_port=10000, sidecar_address="0.0.0.0"),
                      KubeClient(load_api_client(str(c.kubeconfig))))
    cp.start_watches()
    try:
        assert cp.wait_ready(15)
        snap = cp.cache.get("sidecar")
        assert snap is not None
        return snap.version
    finally:
        cp.stop()


def test_restart_expire_and_drop_lose_nothing(envoy_binary: str) -> None:
    _require_netns()
    with LocalCluster(list(PODS.values())) as c:
        for name, ip in PODS.items():
            c.backend(name, ip, 9080)
        c.apply(join(service("reviews"), pod("reviews-1", PODS["reviews-1"], "reviews")))
        url = f"http://{c.cluster_ip('reviews')}:9080/"
        wait_for(lambda: c.pod.curl(url)[0] == 200, 10)
        traffic = Traffic(c, url)
        traffic.start()
        try:
            # 1. Dropped watch connections, with a change made while they reconnect.
            c.api.drop_watches()
            c.apply(pod("reviews-2", PODS["reviews-2"], "reviews"))
            # 2. The API server goes away; changes happen meanwhile (straight into its store).
            port, store = c.api.port, c.store
            c.api.stop()
            time.sleep(0.5)
            c.store.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "reviews-3", "namespace": "default",
                            "labels": {"app": "reviews"}}, "spec": {"nodeName": "node-1", "containers": [{"name": "app", "image": "x"}]},
                            "status": {"podIP": PODS["reviews-3"], "conditions": [{"type": "Ready", "status": "True"}]}})
            c.store.patch("services", "reviews", {"metadata": {"labels": {"traffic.lb.policy": "LEAST_REQUEST"}}}, "default")
            time.sleep(1.0)
            # 3. It comes back on the same port with the same data, every old resourceVersion expired (410).
            c.api = APIServer(port=port, store=store, fresh_window=True).start()
            c.store.delete("pods", "reviews-1", "default")
            # 4. And the watches drop once more.
            time.sleep(0.3)
            c.api.drop_watches()
            c.label("service", "reviews", {"traffic.hash.header.name": "x-user"})
            c.api.wait_idle(5)

            expected = _fresh_version(c)
            wait_for(lambda: (c.cp.cache.get("sidecar") or object()).version == expected, 20,  # type: ignore[attr-defined]
                     message="served config did not converge to a from-scratch build")
            # Every served kind's watch came back with an expired resourceVersion: each must list again. The
            # config can converge before the kinds it does not depend on are back (their backoff runs on).
            served = [w for w in c.cp.watchers if not w.not_served]
            assert served, c.cp.watchers
            try:
                wait_for(lambda: all(w.relists >= 2 for w in served), 20)
            except TimeoutError:
                raise AssertionError(f"410 must force a relist of every served kind; still at one list after 20 s: "
                                     f"{[w.kind.plural for w in served if w.relists < 2]}") from None
        finally:
            traffic.stop_flag.set()
            traffic.join(10)
        ok = traffic.statuses.count(200)
        assert ok > 50 and ok == len(traffic.statuses), f"requests failed during the outage: {sorted(set(traffic.statuses))}"
        wait_for(lambda: {PODS["reviews-2"], PODS["reviews-3"]} == {
            line.split("::")[1].split(":")[0] for line in c.pod.admin("/clusters").splitlines()
            if line.startswith("9080|default|reviews.outbound::") and "::cx_active::" in line}, 10,
            message="Envoy's endpoints do not match the final pods")
