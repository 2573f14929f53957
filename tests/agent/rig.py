"""Test rig for the node agent: the test API server, the real control plane serving xDS on a Unix socket,
"pods" made of Docker containers (a pause container whose network namespace holds the pod addresses on
its loopback, no route out, plus an app container joined to it), and the agent under test."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from trafficmgr.core.agent.agent import Agent, AgentConfig
from trafficmgr.core.agent.runtime import Runtime
from trafficmgr.testing.cluster import http_get, store_events
from trafficmgr.testing.envoy import wait_for
from trafficmgr.testing.netns import run_in_netns
from trafficmgr.testing.prereq import missing

T = TypeVar("T")
NODE = "node-1"
#: Default socket of the Docker engine that .ci/install.d/docker.sh starts.
DOCKER_HOST = os.environ.get("TRAFFICMGR_TEST_DOCKER_HOST", "unix:///run/trafficmgr-ci/docker.sock")


def require(reason: str | None) -> None:
    """Skip when ``reason`` (a missing prerequisite) is set, but fail under CI."""
    if reason:
        missing(f"the node agent tests cannot run: {reason}")


def in_netns(path: str, fn: Callable[[], T], timeout: float = 30.0) -> T:
    """Run ``fn()`` in the network namespace at ``path`` (see :func:`run_in_netns`)."""
    return run_in_netns(path, fn, timeout)


def captured(netns: str, inbound: bool = False) -> bool:
    """The agent's capture is installed in the namespace: the IPv4 redirect (and inbound one) and, where
    the namespace has IPv6, the IPv6 refusal."""
    from trafficmgr.core.agent import iptables

    return iptables.installed(iptables.netns_runner(netns), inbound)


def capture_rules(netns: str) -> str:
    """The namespace's IPv4 nat rules and, where it has IPv6, its ip6tables filter rules."""
    from trafficmgr.core.agent import iptables

    run = iptables.netns_runner(netns)
    return iptables.dump(run) + iptables.dump6(run)


class Cluster:
    """API server + control plane (xDS on ``unix:<xds_socket>``)."""

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        """``options``: extra control-plane options (e.g. ``mtls=True`` for the mtls plugin)."""
        from trafficmgr.apiserver import APIServer
        from trafficmgr.core.controlplane import ControlPlane
        from trafficmgr.core.kube.client import KubeClient, load_api_client
        from trafficmgr.core.plugins import PluginHost
        from trafficmgr.core.xds.server import XdsServerThread

        # Under /tmp with short names: the socket directory is bind-mounted into sidecar containers.
        self.tmp = Path(tempfile.mkdtemp(prefix="tm-agent-"))
        os.chmod(self.tmp, 0o755)
        self.api = APIServer().start()
        self.store = self.api.store
        self.kubeconfig = self.tmp / "kubeconfig"
        self.api.write_kubeconfig(str(self.kubeconfig))
        self.plugins = PluginHost.load()
        opts = argparse.Namespace(sidecar_port=10000, sidecar_address="0.0.0.0", **(options or {}))
        self.cp = ControlPlane(self.plugins, opts, KubeClient(load_api_client(str(self.kubeconfig))))
        sock_dir = self.tmp / "xds"
        sock_dir.mkdir(mode=0o755)
        os.chmod(sock_dir, 0o755)
        self.xds_socket = str(sock_dir / "xds.sock")
        self.xds = XdsServerThread(self.cp.cache, f"unix:{self.xds_socket}", 0).start()
        os.chmod(self.xds_socket, 0o777)  # the sidecar runs as uid 1337
        self.cp.xds = self.xds
        self.cp.start_watches()
        assert self.cp.wait_ready(15), self.cp.ready()
        self.agents: list[Agent] = []

    def kube_client(self) -> Any:
        from trafficmgr.core.kube.client import KubeClient, load_api_client

        return KubeClient(load_api_client(str(self.kubeconfig)))

    def agent(self, runtime: Runtime, **config: Any) -> Agent:
        """Start an in-process agent for :data:`NODE` and wait until its watches are synced."""
        cfg = AgentConfig(node_name=NODE, xds_address=f"unix:{self.xds_socket}", resync_s=config.pop("resync_s", 2.0),
                          min_backoff_s=0.2, max_backoff_s=1.0, **config)
        agent = Agent(self.kube_client(), runtime, cfg, self.plugins).start()
        self.agents.append(agent)
        wait_for(agent.synced, 10, message="agent watches not synced")
        return agent

    @staticmethod
    def settle(agent: Agent, passes: int = 2) -> None:
        """Make ``agent`` run ``passes`` more reconcile passes (after everything queued so far)."""
        target = agent.passes + passes

        def done() -> bool:
            if agent.passes >= target:
                return True
            agent.kick()  # queued kicks are merged into one pass: kick again until enough passes ran
            return False

        wait_for(done, 10, message="agent does not reconcile")

    def apply(self, manifests: str) -> None:
        for obj in (d for d in yaml.safe_load_all(manifests) if d):
            meta = obj.setdefault("metadata", {})
            meta.setdefault("namespace", "default")
            status = obj.pop("status", None)
            plural = obj["kind"].lower() + "s"
            self.store.create(obj)
            if status is not None:
                self.store.patch(plural, meta["name"], {"status": status}, meta["namespace"], patch_type="merge",
                                 subresource="status")

    def label(self, plural: str, name: str, labels: dict[str, str | None], namespace: str = "default") -> None:
        self.store.patch(plural, name, {"metadata": {"labels": labels}}, namespace, patch_type="merge")

    def pod(self, name: str, namespace: str = "default") -> dict[str, Any] | None:
        from trafficmgr.apiserver.errors import ApiError

        try:
            return self.store.get("pods", name, namespace)
        except ApiError:
            return None

    def annotation(self, name: str, namespace: str = "default") -> str | None:
        pod = self.pod(name, namespace)
        return ((pod or {}).get("metadata", {}).get("annotations") or {}).get("traffic.envoy.proxy")

    def events(self, name: str, namespace: str = "default") -> list[dict[str, Any]]:
        return store_events(self.store, name, namespace=namespace)

    def cluster_ip(self, service: str) -> str:
        return self.store.get("services", service, "default")["spec"]["clusterIP"]

    def close(self) -> None:
        for agent in self.agents:
            agent.stop()
        self.cp.stop()
        self.xds.stop(0.5)
        self.api.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


class DockerPod:
    """A "pod" on the test Docker engine: a pause container (labels as the kubelet sets them) whose
    network namespace gets ``addresses`` on its loopback (no route out) and ClusterIPs routed locally,
    plus an app container sharing that namespace."""

    def __init__(self, api: Any, image: str, name: str, uid: str, addresses: list[str], namespace: str = "default") -> None:
        self.api = api
        self.name = name
        self.ip = addresses[0]
        labels = {"io.kubernetes.pod.name": name, "io.kubernetes.pod.namespace": namespace,
                  "io.kubernetes.pod.uid": uid, "io.kubernetes.docker.type": "podsandbox",
                  "trafficmgr.test": "1"}
        suffix = uuid.uuid4().hex[:6]
        self.pause = api.create_container(image, ["sleep", "3600"], labels=labels, name=f"k8s_POD_{name}_{suffix}",
                                          host_config=api.create_host_config(network_mode="none"))["Id"]
        self.app = ""
        try:
            api.start(self.pause)
            pid = api.inspect_container(self.pause)["State"]["Pid"]
            self.netns = f"/proc/{pid}/ns/net"
            self._ip("link", "set", "lo", "up")
            for addr in addresses:
                self._ip("addr", "add", f"{addr}/32", "dev", "lo")
            self._ip("route", "add", "local", "10.96.0.0/16", "dev", "lo")
            self.app = api.create_container(image, ["sleep", "3600"], name=f"k8s_app_{name}_{suffix}",
                                            labels={"trafficmgr.test": "1"},
                                            host_config=api.create_host_config(network_mode=f"container:{self.pause}"))["Id"]
            api.start(self.app)
        except BaseException:
            self.close()
            raise

    def _ip(self, *args: str) -> None:
        subprocess.run(["nsenter", f"--net={self.netns}", "ip", *args], check=True, capture_output=True)

    def in_ns(self, fn: Callable[[], T]) -> T:
        return in_netns(self.netns, fn)

    def wget(self, url: str, timeout: int = 3) -> tuple[int, str]:
        """The app container's ``wget``: (0 on success else its exit code, output)."""
        ex = self.api.exec_create(self.app, ["timeout", str(timeout), "wget", "-q", "-O", "-", url])
        out = self.api.exec_start(ex["Id"]).decode(errors="replace")
        return self.api.exec_inspect(ex["Id"])["ExitCode"], out

    def stat(self, name: str) -> int:
        """A counter of the sidecar's admin endpoint (127.0.0.1:15000 inside the pod's namespace)."""
        text = self.in_ns(lambda: http_get(f"http://127.0.0.1:15000/stats?filter=^{name.replace('|', '.')}$", 3)[1])
        for line in text.splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        return 0

    def close(self) -> None:
        for cid in (self.app, self.pause):
            if cid:
                try:
                    self.api.remove_container(cid, force=True)
                except Exception:  # noqa: BLE001 - already gone
                    pass
