"""A small mesh for the dashboard's data: the control plane ``serve`` runs (in process, with its admin
endpoint), the test API server, and one real sidecar Envoy per meshed pod on its own loopback pod IP,
as local mode runs them: the explicit proxy on ``<pod IP>:15001`` and the stats-only listener on
``<pod IP>:<stats port>`` (what the control plane reads). Backends are HttpBackends on pod IPs."""

from __future__ import annotations

import random
import socket
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from trafficmgr.apiserver import APIServer
from trafficmgr.core.admin import AdminServer
from trafficmgr.core.agent.local_runtime import PROXY_PORT, add_explicit_proxy
from trafficmgr.core.bootstrap import add_stats_listener, bootstrap
from trafficmgr.core.controlplane import ControlPlane
from trafficmgr.core.kube.client import KubeClient, load_api_client
from trafficmgr.core.model import GATEWAY_CLUSTER
from trafficmgr.core.plugins import PluginHost
from trafficmgr.core.xds.server import XdsServerThread
from trafficmgr.testing.backends import HttpBackend
from trafficmgr.testing.cluster import LocalCluster
from trafficmgr.testing.envoy import EnvoyProcess, free_port, wait_for
from trafficmgr.testing.kit import make_options


def _block() -> tuple[int, int]:
    rng = random.Random()
    for _ in range(50):
        a, b = rng.randint(64, 250), rng.randint(0, 255)
        try:
            with socket.socket() as s:
                s.bind((f"127.{a}.{b}.254", 0))
            return a, b
        except OSError:
            continue
    raise RuntimeError("no usable 127.x.y.0/24 block")


class Mesh:
    """See the module docstring. ``ip(n)`` is pod address ``n`` of this mesh's 127.a.b.0/24 block."""

    GATEWAY_HOST = 2  # the gateway pod's address: ip(2); its ingress listener on ip(2):gateway_port

    def __init__(self, plugins: PluginHost, stats_port: int = 8900, **options: Any) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="tm-telemetry-"))
        self.block = _block()
        self.gateway_ip = self.ip(self.GATEWAY_HOST)
        self.gateway_port = free_port(self.gateway_ip)
        options = {"gateway_address": self.gateway_ip, "gateway_port": self.gateway_port, **options}
        self.stats_port = stats_port
        self.api = APIServer().start()
        self.store = self.api.store
        kubeconfig = self.tmp / "kubeconfig"
        self.api.write_kubeconfig(str(kubeconfig))
        self.options = make_options(plugins, {"explicit_proxy": True, "xds_auth": "none", "sidecar_address": "0.0.0.0",
                                              "sidecar_port": 10000, "dashboard_stats_port": stats_port, **options})
        self.plugins = plugins
        self.cp = ControlPlane(plugins, self.options, KubeClient(load_api_client(str(kubeconfig))))
        self.xds = XdsServerThread(self.cp.cache, "127.0.0.1", 0, authorizer=self.cp.authorize).start()
        self.cp.xds = self.xds
        self.admin = AdminServer(self.cp, "127.0.0.1", 0)
        self.envoys: dict[str, EnvoyProcess] = {}
        self.backends: list[HttpBackend] = []
        try:
            self.cp.start_watches()
            assert self.cp.wait_ready(15), self.cp.ready()
            self.admin.start()
        except BaseException:
            self.close()
            raise

    def ip(self, n: int) -> str:
        return f"127.{self.block[0]}.{self.block[1]}.{n}"

    def apply(self, manifests: str) -> None:
        LocalCluster.apply(self, manifests)  # type: ignore[arg-type]

    def label(self, kind: str, name: str, labels: dict[str, str | None], namespace: str = "default") -> None:
        LocalCluster.label(self, kind, name, labels, namespace)  # type: ignore[arg-type]

    def backend(self, name: str, ip: str, port: int = 9080) -> HttpBackend:
        b = HttpBackend(name, ip, port).start()
        self.backends.append(b)
        return b

    def sidecar(self, pod: str, ip: str) -> EnvoyProcess:
        """Start the sidecar of ``pod`` (node ``<pod>.default``) on pod IP ``ip``: explicit proxy on
        ``ip:15001``, stats-only listener on ``ip:<stats port>``; stats flushed every second (histograms)."""
        config = bootstrap(f"{pod}.default", f"{pod}.default", "127.0.0.1", self.xds.port, admin_port=free_port())
        config = add_explicit_proxy(config, ip)
        add_stats_listener(config, ip, self.stats_port)
        config["stats_flush_interval"] = "1s"
        envoy = EnvoyProcess(config, self.tmp / pod).start()
        self.envoys[pod] = envoy
        return envoy

    def gateway(self) -> EnvoyProcess:
        """Start a gateway Envoy (node cluster ``traffic-ingress``) that connects to xDS from its pod's IP
        (:attr:`gateway_ip`: how the control plane finds its stats) with its stats-only listener on
        ``gateway_ip:<stats port>``; the ingress plugin's listener is on ``gateway_ip:gateway_port``."""
        ip = self.gateway_ip
        config = bootstrap("traffic-ingress-1", GATEWAY_CLUSTER, "127.0.0.1", self.xds.port, admin_port=free_port(),
                           xds_source_address=ip)
        add_stats_listener(config, ip, self.stats_port)
        config["stats_flush_interval"] = "1s"
        envoy = EnvoyProcess(config, self.tmp / "gateway").start()
        self.envoys["gateway"] = envoy
        return envoy

    def call(self, pod_ip: str, url: str, timeout: float = 5.0) -> int:
        """GET ``url`` through the sidecar of the pod at ``pod_ip`` (its explicit proxy, as apps do)."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": f"http://{pod_ip}:{PROXY_PORT}"}))
        try:
            with opener.open(url, timeout=timeout) as resp:
                resp.read()
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            exc.read()
            return int(exc.code)

    def data(self, token: str | None = None) -> dict[str, Any]:
        """``GET /debug/dashboard/data`` from the admin endpoint."""
        import json

        req = urllib.request.Request(f"{self.admin.url}/debug/dashboard/data",
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(req, timeout=30) as resp:
            return dict(json.loads(resp.read()))

    def wait_data(self, predicate: Any, timeout: float = 20.0, message: str = "") -> dict[str, Any]:
        last: dict[str, Any] = {}

        def check() -> dict[str, Any] | None:
            nonlocal last
            last = self.data()
            return last if predicate(last) else None

        try:
            return wait_for(check, timeout, interval=0.5, message=message)
        except (AssertionError, TimeoutError) as exc:
            errors = getattr(self.cp._scraper, "errors", None)  # noqa: SLF001 - what the stats reader could not read
            raise AssertionError(f"{exc}; stats errors: {errors}; last data: {last}") from None

    def close(self) -> None:
        for e in self.envoys.values():
            e.stop()
        for b in self.backends:
            b.stop()
        self.admin.stop()
        self.cp.stop()
        self.xds.stop()
        self.api.stop()


def service(name: str, labels: dict[str, str] | None = None) -> str:
    lab = {"traffic.port.9080": "http", **(labels or {})}
    return f"""
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default, labels: {lab}}}
spec: {{selector: {{app: {name}}}, ports: [{{name: http, port: 9080}}]}}
"""


def pod(name: str, app: str, ip: str, sidecar: bool = True, labels: dict[str, str] | None = None) -> str:
    annotations = f"{{traffic.envoy.proxy: {name}.default}}" if sidecar else "{}"
    lab = {"app": app, **(labels or {})}
    return f"""
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: default, labels: {lab}, annotations: {annotations}}}
spec: {{nodeName: node-1, containers: [{{name: c, image: x, ports: [{{containerPort: 9080}}]}}]}}
status: {{podIP: {ip}, conditions: [{{type: Ready, status: "True"}}]}}
"""
