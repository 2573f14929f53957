"""The agent with the ``docker`` runtime against a real Docker engine: pods are a pause container plus an
app container sharing its network namespace; the sidecar joins it with ``network_mode=container:``."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.agent.manifests import SERVICES, WORKLOAD, pod
from tests.agent.rig import DOCKER_HOST, Cluster, DockerPod, capture_rules, captured
from trafficmgr.core.agent import iptables
from trafficmgr.core.agent.agent import AgentConfig, sidecar_bootstrap
from trafficmgr.core.agent.docker_runtime import WORKDIR, DockerRuntime, container_name
from trafficmgr.core.agent.runtime import PodRef, SidecarSpec
from trafficmgr.testing.backends import HttpBackend
from trafficmgr.testing.cluster import http_get
from trafficmgr.testing.envoy import free_port, wait_for

# 10.244.88.0/24: used by no other test.
APP_IP, REVIEWS_IP, BLOCKED_IP, GHOST_IP = "10.244.88.2", "10.244.88.11", "10.244.88.12", "10.244.88.30"
APP = "app-6c9f-d1"
RQ_COMPLETED = "cluster.9080|default|reviews.outbound.upstream_rq_completed"


class Env:
    def __init__(self, cluster: Cluster, api: Any, images: dict[str, str]) -> None:
        self.cluster, self.api, self.images = cluster, api, images
        self.pods: list[DockerPod] = []
        self.backends: list[HttpBackend] = []

    def runtime(self, host: str = DOCKER_HOST, image: str | None = None) -> DockerRuntime:
        # The sidecars' own directories under the test's temporary directory (a host path: dockerd mounts it).
        return DockerRuntime(host, self.images["envoy"] if image is None else image, state_dir=str(self.cluster.tmp / "state"))

    def docker_pod(self, name: str, addresses: list[str], uid: str | None = None) -> DockerPod:
        if uid is None:
            uid = self.cluster.store.get("pods", name, "default")["metadata"]["uid"]
        p = DockerPod(self.api, self.images["busybox"], name, uid, addresses)
        self.pods.append(p)
        return p

    def sidecars(self) -> list[dict[str, Any]]:
        return self.api.containers(all=True, filters={"label": "traffic.envoy.proxy"})

    def close(self) -> None:
        for b in self.backends:
            b.stop()
        for c in self.sidecars():  # whatever a failed test left
            self.api.remove_container(c["Id"], force=True)
        for p in self.pods:
            p.close()


@pytest.fixture
def env(cluster: Cluster, docker_api: Any, images: dict[str, str]) -> Iterator[Env]:
    e = Env(cluster, docker_api, images)
    try:
        cluster.apply(SERVICES.format(reviews_ip=REVIEWS_IP, blocked_ip=BLOCKED_IP))
        cluster.apply(WORKLOAD.format(app="app"))
        yield e
    finally:
        e.close()


def app_pod(env: Env) -> tuple[DockerPod, HttpBackend, HttpBackend]:
    env.cluster.apply(pod(APP, "app", ip=APP_IP))
    p = env.docker_pod(APP, [APP_IP, REVIEWS_IP, BLOCKED_IP])
    reviews = p.in_ns(lambda: HttpBackend("reviews-1", REVIEWS_IP, 9080).start())
    blocked = p.in_ns(lambda: HttpBackend("blocked-1", BLOCKED_IP, 9090).start())
    env.backends += [reviews, blocked]
    return p, reviews, blocked


def test_enable_routes_through_envoy_then_disable_leaves_nothing(env: Env) -> None:
    cluster = env.cluster
    p, reviews, blocked = app_pod(env)
    cluster.agent(env.runtime())
    reviews_url = f"http://{cluster.cluster_ip('reviews')}:9080/r"

    cluster.label("deployments", "app", {"traffic.envoy.enabled": "true"})
    sidecar_id = wait_for(lambda: cluster.annotation(APP), 20, message="annotation not set")
    info = env.api.inspect_container(sidecar_id)
    assert info["Name"] == "/" + container_name(APP, "default") == f"/envoy_{APP}_default"
    assert info["HostConfig"]["NetworkMode"] == f"container:{p.pause}"
    assert info["Config"]["User"] == "1337:1337" and info["State"]["Running"]
    # Mounted read-only, nothing else: the xDS socket's directory (the sidecar can connect but not replace
    # the socket) and the pod's own directory as Envoy's working directory (identity/ with mesh identity).
    uid = cluster.store.get("pods", APP, "default")["metadata"]["uid"]
    own = os.path.join(env.runtime().state_dir, uid)
    xds_dir = os.path.dirname(cluster.xds_socket)
    assert sorted((m["Source"], m["Destination"], m["RW"]) for m in info["Mounts"]) == sorted(
        [(xds_dir, xds_dir, False), (own, WORKDIR, False)])
    assert info["Config"]["WorkingDir"] == WORKDIR and os.path.isdir(own)
    assert {k: v for k, v in info["Config"]["Labels"].items() if k.startswith("traffic.envoy.")} == {
        "traffic.envoy.proxy": "true", "traffic.envoy.pod": APP, "traffic.envoy.namespace": "default",
        "traffic.envoy.pod-uid": cluster.store.get("pods", APP, "default")["metadata"]["uid"]}
    assert captured(p.netns)

    # The app container's requests to the labeled service go through Envoy (its counter moves by
    # exactly the number of requests); the unlabeled port is blocked and its backend never reached.
    wait_for(lambda: p.wget(reviews_url)[0] == 0, 15, message="no answer through the sidecar")
    before = p.stat(RQ_COMPLETED)
    for _ in range(4):
        code, body = p.wget(reviews_url)
        assert code == 0 and '"backend": "reviews-1"' in body.replace('":"', '": "')
    assert p.stat(RQ_COMPLETED) == before + 4
    code, out = p.wget(f"http://{cluster.cluster_ip('blocked')}:9090/")
    assert code != 0 and "404 Not Found" in out  # the sidecar's "port not enabled" answer
    assert blocked.hits == 0

    # Disable: rules, container and annotation all go; traffic is direct again.
    cluster.label("deployments", "app", {"traffic.envoy.enabled": "false"})
    wait_for(lambda: cluster.annotation(APP) == "", 20, message="annotation not cleared")
    assert env.sidecars() == [] and not os.path.exists(own), "the container and its directory are gone"
    assert iptables.CHAIN not in capture_rules(p.netns)
    hits = reviews.hits
    assert p.wget(f"http://{REVIEWS_IP}:9080/direct")[0] == 0 and reviews.hits == hits + 1
    assert cluster.events(APP) == []


def test_restarted_agent_adopts_and_removes_orphans(env: Env, tmp_path: Any) -> None:
    cluster = env.cluster
    p, _, _ = app_pod(env)
    cluster.label("deployments", "app", {"traffic.envoy.enabled": "true"})
    agent = cluster.agent(env.runtime())
    sidecar_id = wait_for(lambda: cluster.annotation(APP), 20, message="annotation not set")
    agent.stop()

    # An orphan: a sidecar (and its rules) for a pod the API server does not know.
    ghost = env.docker_pod("ghost", [GHOST_IP], uid="uid-ghost")
    runtime = env.runtime()
    ref = PodRef("ghost", "default", "uid-ghost", GHOST_IP)
    config = AgentConfig("node-1", f"unix:{cluster.xds_socket}")
    orphan = runtime.start(SidecarSpec(ref, sidecar_bootstrap(ref, config), xds_socket=cluster.xds_socket),
                           runtime.pod_network(ref))
    iptables.install(iptables.netns_runner(ghost.netns))
    assert {s.id for s in runtime.list()} == {sidecar_id, orphan.id}

    # The agent as the DaemonSet runs it: the CLI, in its own process.
    health = free_port()
    log_path = tmp_path / "agent.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "trafficmgr", "agent", "--runtime", "docker", "--docker-host", DOCKER_HOST,
         "--envoy-image", env.images["envoy"], "--xds-address", f"unix:{cluster.xds_socket}",
         "--kubeconfig", str(cluster.kubeconfig), "--health-port", str(health), "--health-address", "127.0.0.1",
         "--log-level", "info"],
        env={**os.environ, "NODE_NAME": "node-1"}, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: [s.id for s in runtime.list()] == [sidecar_id], 20,
                 message="orphan not removed or app sidecar replaced")
        assert iptables.CHAIN not in capture_rules(ghost.netns), "the orphan's rules are removed too"
        assert captured(p.netns)
        assert cluster.annotation(APP) == sidecar_id
        assert wait_for(lambda: http_get(f"http://127.0.0.1:{health}/readyz", 2)[0] == 200, 10)
        assert http_get(f"http://127.0.0.1:{health}/healthz", 2)[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(15)
    assert rc == 0, log_path.read_text()
    [left] = runtime.list()
    assert left.id == sidecar_id and left.running, "sidecars outlive the agent"

    # `trafficmgr proxies` shows it; --remove-all (the DaemonSet's preStop) removes it and its rules.
    out = subprocess.run([sys.executable, "-m", "trafficmgr", "proxies", "--docker-host", DOCKER_HOST],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0].split() == ["ID", "POD", "NAMESPACE", "STATUS", "STATE"]
    assert out[1].split()[:3] == [sidecar_id, APP, "default"] and out[1].split()[-1] == "running"
    log = subprocess.run([sys.executable, "-m", "trafficmgr", "proxies", "--docker-host", DOCKER_HOST,
                          "--id", sidecar_id[:8], "--log"], capture_output=True, text=True, check=True).stdout
    assert "starting main dispatch loop" in log
    subprocess.run([sys.executable, "-m", "trafficmgr", "proxies", "--docker-host", DOCKER_HOST, "--remove-all"],
                   capture_output=True, text=True, check=True)
    assert env.sidecars() == [] and iptables.CHAIN not in capture_rules(p.netns)


def test_missing_image_is_a_warning_event_and_leaves_nothing(env: Env) -> None:
    cluster = env.cluster
    app_pod(env)
    cluster.label("deployments", "app", {"traffic.envoy.enabled": "true"})
    # A registry on a closed loopback port: the pull fails at once without leaving the machine.
    cluster.agent(env.runtime(image="127.0.0.1:9/trafficmgr/missing:1"))
    event = wait_for(lambda: next((e for e in cluster.events(APP) if e["reason"] == "SidecarFailed"), None), 15,
                     message="no Warning Event")
    assert event["type"] == "Warning" and "127.0.0.1:9/trafficmgr/missing:1" in event["message"]
    assert env.sidecars() == [] and cluster.annotation(APP) is None


class DeletingRuntime(DockerRuntime):
    """Deletes the pod from the API server right after starting its sidecar (before the agent annotates it)."""

    def __init__(self, env: Env, p: DockerPod) -> None:
        super().__init__(DOCKER_HOST, env.images["envoy"], state_dir=env.runtime().state_dir)
        self.env, self.p = env, p
        self.starts = 0

    def start(self, spec: SidecarSpec, network: Any) -> Any:
        sidecar = super().start(spec, network)
        self.starts += 1
        self.env.cluster.store.delete("pods", spec.pod.name, spec.pod.namespace)
        return sidecar


def test_pod_deleted_mid_start_leaves_nothing(env: Env) -> None:
    cluster = env.cluster
    p, _, _ = app_pod(env)
    cluster.label("deployments", "app", {"traffic.envoy.enabled": "true"})
    runtime = DeletingRuntime(env, p)
    agent = cluster.agent(runtime)
    wait_for(lambda: runtime.starts == 1 and cluster.pod(APP) is None, 20)
    wait_for(lambda: env.sidecars() == [], 20, message="sidecar of the deleted pod left behind")
    assert iptables.CHAIN not in capture_rules(p.netns)
    cluster.settle(agent)
    assert runtime.starts == 1 and env.sidecars() == []


class SocketProxy:
    """A Unix socket forwarding to the Docker engine; stopping it makes the daemon "down"."""

    def __init__(self, path: str, target: str) -> None:
        self.path, self.target = path, target
        self.server: socket.socket | None = None
        self.conns: list[socket.socket] = []

    def start(self) -> SocketProxy:
        if os.path.exists(self.path):
            os.unlink(self.path)
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(self.path)
        self.server.listen(16)
        threading.Thread(target=self._accept, args=(self.server,), daemon=True).start()
        return self

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX)
            upstream.connect(self.target)
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
                c.close()
            except OSError:
                pass
        self.conns = []
        if os.path.exists(self.path):
            os.unlink(self.path)


def test_docker_daemon_down_then_back(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    cluster = env.cluster
    app_pod(env)
    proxy = SocketProxy(str(cluster.tmp / "docker.sock"), DOCKER_HOST[len("unix://"):])
    cluster.label("deployments", "app", {"traffic.envoy.enabled": "true"})
    with caplog.at_level(logging.ERROR, logger="trafficmgr.core.agent.agent"):
        agent = cluster.agent(env.runtime(host=f"unix://{proxy.path}"))
        wait_for(lambda: any("unreachable" in r.getMessage() for r in caplog.records), 10, message="no clear error")
    [record] = [r for r in caplog.records if "unreachable" in r.getMessage()]  # logged once, not per retry
    assert f"docker at unix://{proxy.path}" in record.getMessage()
    ok, reason = agent.ready()
    assert not ok and "unreachable" in reason
    assert env.sidecars() == [] and cluster.annotation(APP) is None

    proxy.start()  # the daemon is back: the agent catches up within its backoff (at most 1 s here)
    try:
        sidecar_id = wait_for(lambda: cluster.annotation(APP), 20, message="no recovery")
        assert [c["Id"] for c in env.sidecars()] == [sidecar_id]
        assert agent.ready()[0]
    finally:
        agent.stop()
        proxy.stop()
