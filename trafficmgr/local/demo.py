"""``trafficmgr demo``: a complete traffic manager on this machine, without a cluster, Docker or root.

In the foreground it runs, as its supervised children (threads of this process or child processes):

- the kubectl-compatible API server on loopback (``<state dir>/kubeconfig``), with the Deployment ->
  ReplicaSet -> Pod controllers and the local kubelet (:mod:`.kubelet`: pods are processes on their own
  127.1.x.y pod IPs) and a userspace kube-proxy (:mod:`.kubeproxy`: ClusterIPs from 127.2.0.0/16);
- ``trafficmgr serve --explicit-proxy`` (xDS 18000, admin 18080: ``trafficmgr proxy-status`` works
  without flags);
- the ingress gateway Envoy: HTTP on ``127.0.0.1:--http-port``, HTTPS on ``127.0.0.1:--https-port``, its
  stats-only listener (``GET /stats/prometheus`` and ``/ready``) on ``127.0.0.1:--admin-port`` and its full
  admin on its pod IP ``127.1.0.1:15000`` (as a sidecar's in local mode; loopback is no boundary between
  local processes anyway);
- the node agent with the ``local`` runtime: a sidecar Envoy per Envoy-enabled pod, explicit HTTP proxy
  on ``<pod IP>:15001``;
- the Zipkin-compatible collector on 127.0.0.1:9411 (with ``--tracing-provider opentelemetry`` the Envoys
  export OTLP/gRPC to the same collector on 127.0.0.1:``--otlp-port``, 4317 by default, and the Zipkin API
  shows those traces);
- Prometheus (when the ``prometheus`` binary is installed; else one line says how to get it) on the
  reserved pod IP after the gateway's (``127.1.0.2:9090``), behind the Service ``prometheus``, with the
  Helm chart's scrape configuration (:mod:`.prometheus`);

then applies ``samples/bookinfo.yaml`` and ``samples/ingress.yaml`` and prints one line starting with
``ready`` when everything answers. SIGINT/SIGTERM stop every child within 10 s.

Gateway API: before the control plane starts, the API server gets the Gateway API CRDs the project ships
(``trafficmgr/plugins/gateway_api/crds``), the GatewayClass ``traffic`` (controllerName
``trafficmgr.io/gateway-controller``) and the Gateway ``traffic`` in ``default`` with one HTTP listener
``http`` on ``--gateway-api-port`` (default 8081; the shared gateway binds it on 127.0.0.1 like
``--http-port``, so it is checked free at start like the other ports).

The gateway: the ingress plugin serves plain HTTP and TLS on one listener port (``--gateway-port``), so
the gateway's listener is on the HTTP port and a static TCP listener on the HTTPS port forwards to it
(both ports accept both; TLS is told apart by Envoy's TLS inspector). Its xDS connection comes from the
address of a ``traffic-ingress`` Pod object (127.1.0.1, label ``app=traffic-ingress``), so
``--xds-auth peer-ip`` (the default) holds in local mode too; sidecars connect from their pod IPs.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import attrs
import yaml

from trafficmgr.core.signals import stop_on_signals
from trafficmgr.local import processes
from trafficmgr.local import prometheus as prom

log = logging.getLogger(__name__)

GATEWAY = "traffic-ingress"
GATEWAY_CLASS = "traffic"  # the demo's GatewayClass and Gateway (Gateway API)
GATEWAY_CONTROLLER = "trafficmgr.io/gateway-controller"
STATS_PORT = prom.STATS_PORT  # the gateway's and sidecars' stats-only listener on their pod IPs
NAMESPACE = "default"
SAMPLES = ("bookinfo.yaml", "ingress.yaml")
READY_TIMEOUT_S = 120.0
ZIPKIN_FLUSH_MS = 1000


class DemoError(Exception):
    """A startup problem shown to the user as one line."""


@attrs.define
class DemoConfig:
    """The ``demo`` options."""

    state_dir: str = ".trafficmgr"
    http_port: int = 8080
    https_port: int = 8443
    admin_port: int = 8900
    api_port: int = 0
    xds_port: int = 18000
    serve_admin_port: int = 18080
    zipkin_port: int = 9411
    pod_cidr: str = "127.1.0.0/16"
    service_cidr: str = "127.2.0.0/16"
    samples_dir: str = ""
    #: the port of the HTTP listener of the demo's Gateway ``traffic`` (Gateway API), on 127.0.0.1
    gateway_api_port: int = 8081
    #: ``zipkin`` (default) or ``opentelemetry``: what the Envoys send to the built-in collector
    tracing_provider: str = "zipkin"
    #: the collector's OTLP/gRPC port on 127.0.0.1 (bound only with ``tracing_provider`` opentelemetry)
    otlp_port: int = 4317

    @property
    def otlp(self) -> bool:
        return self.tracing_provider == "opentelemetry"

    @property
    def gateway_ip(self) -> str:
        return str(ipaddress.IPv4Network(self.pod_cidr).network_address + 1)

    @property
    def prometheus_ip(self) -> str:
        """Prometheus' pod IP (reserved like the gateway's): port 9090 there never collides with a user's."""
        return str(ipaddress.IPv4Network(self.pod_cidr).network_address + 2)

    def ports(self) -> list[tuple[int, str, str]]:
        """(port, flag, what) of every loopback port the demo binds."""
        out = [(self.http_port, "--http-port", "gateway HTTP"), (self.https_port, "--https-port", "gateway HTTPS"),
               (self.admin_port, "--admin-port", "gateway stats"), (self.xds_port, "--xds-port", "control plane xDS"),
               (self.serve_admin_port, "--serve-admin-port", "control plane admin"),
               (self.zipkin_port, "--zipkin-port", "Zipkin collector"),
               (self.gateway_api_port, "--gateway-api-port", "Gateway API listener")]
        if self.otlp:
            out.append((self.otlp_port, "--otlp-port", "OTLP collector"))
        if self.api_port:
            out.append((self.api_port, "--api-port", "API server"))
        return out


def samples_dir() -> Path:
    """The shipped manifests: ``samples/`` of the source tree, else the copy installed with the package."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent.parent / "samples", here / "samples"):
        if (candidate / SAMPLES[0]).is_file():
            return candidate
    raise DemoError(f"cannot find the demo manifests ({', '.join(SAMPLES)}) next to the trafficmgr package")


def check_ports(config: DemoConfig) -> None:
    """Raise :class:`DemoError` naming the port and its flag when a port is taken (or given twice)."""
    seen: dict[int, str] = {}
    for port, flag, what in config.ports():
        if port in seen:
            raise DemoError(f"port {port} is given to both {seen[port]} and {flag}; choose another with {flag}")
        seen[port] = flag
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError as exc:
                raise DemoError(f"port {port} ({what}) is already in use on 127.0.0.1 ({exc.strerror}); "
                                f"stop what uses it or choose another with {flag}") from None


def _get(url: str, timeout: float = 2.0, proxy: str | None = None) -> tuple[int, bytes]:
    handlers = [urllib.request.ProxyHandler({"http": proxy} if proxy else {})]
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class Child:
    """One supervised child process (own session, pid file, log file), restarted when it exits."""

    MAX_RESTARTS = 5

    def __init__(self, name: str, argv: list[str], run_dir: Path, env: dict[str, str] | None = None) -> None:
        self.name, self.argv, self.env = name, argv, env
        self.log_path = run_dir / f"{name}.log"
        self.pid_path = run_dir / f"{name}.pid"
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._restart_at = 0.0

    def start(self) -> Child:
        with open(self.log_path, "ab") as logf:
            try:
                self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                             start_new_session=True, env=self.env)
            except OSError as exc:
                raise DemoError(f"cannot start {self.name} ({self.argv[0]}): {exc}") from None
        processes.write_pid(str(self.pid_path), self.proc.pid)
        return self

    def supervise(self) -> str | None:
        """Restart the child when it exited (with backoff); returns a message when that happened."""
        if self.proc is None or self.proc.poll() is None:
            return None
        if self._restart_at == 0.0:
            code = self.proc.returncode
            if self.restarts >= self.MAX_RESTARTS:
                raise DemoError(f"{self.name} keeps exiting (status {code}); see {self.log_path}")
            self._restart_at = time.monotonic() + min(8.0, 0.5 * 2 ** self.restarts)
            return f"{self.name} exited with status {code} (log: {self.log_path}); restarting"
        if time.monotonic() >= self._restart_at:
            self._restart_at = 0.0
            self.restarts += 1
            self.start()
        return None

    def tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return ""


class Demo:
    """Everything ``trafficmgr demo`` runs; :meth:`start`, :meth:`wait_ready`, :meth:`run`, :meth:`stop`."""

    def __init__(self, config: DemoConfig, out: Any = None) -> None:
        self.config = config
        self.out = out or sys.stdout
        self.state = Path(config.state_dir).resolve()
        self.run_dir = self.state / "run"
        self.kubeconfig = self.state / "kubeconfig"
        self.children: list[Child] = []
        self.api: Any = None
        self.kubelet: Any = None
        self.kubeproxy: Any = None
        self.agent: Any = None
        self.runtime: Any = None
        self.plugins: Any = None
        self.prometheus: Child | None = None
        self.pod_discovery: prom.PodDiscovery | None = None
        self.stop_event = threading.Event()

    # -- helpers ------------------------------------------------------------------------------

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def options(self) -> argparse.Namespace:
        """Options the plugins' bootstrap hooks read (the same values ``serve`` gets)."""
        c = self.config
        return argparse.Namespace(zipkin_address=f"127.0.0.1:{c.zipkin_port}",
                                  tracing_provider=c.tracing_provider, otlp_address=f"127.0.0.1:{c.otlp_port}",
                                  zipkin_flush_spans=5, zipkin_flush_interval=ZIPKIN_FLUSH_MS)

    def _python_child(self, name: str, args: list[str]) -> Child:
        """``trafficmgr <args>`` as a child (through the container wrapper: its command line names the
        state directory, which is how leftovers of a killed demo are found)."""
        argv = [sys.executable, "-m", "trafficmgr.cli.container", "--ip", "127.0.0.1", "--dir", str(self.run_dir),
                "--", *args]
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env["PYTHONUNBUFFERED"] = "1"
        child = Child(name, argv, self.run_dir, env).start()
        self.children.append(child)
        return child

    # -- start --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start everything (see the module docstring); raises :class:`DemoError`."""
        from trafficmgr.core.plugins import PluginHost

        check_ports(self.config)
        samples = Path(self.config.samples_dir) if self.config.samples_dir else samples_dir()
        self.state.mkdir(parents=True, exist_ok=True)
        self._cleanup_leftovers()
        self.run_dir.mkdir(exist_ok=True)
        self.plugins = PluginHost.load(None)
        self._start_api()
        self._python_child("zipkin", ["zipkin", "--host", "127.0.0.1", "--port", str(self.config.zipkin_port)]
                           + (["--otlp-port", str(self.config.otlp_port)] if self.config.otlp else []))
        self._start_serve()
        self._start_agent()
        self._create_gateway_objects()
        self._start_gateway()
        self._start_prometheus()
        for name in SAMPLES:
            self.apply(samples / name)

    def _cleanup_leftovers(self) -> None:
        from trafficmgr.core.agent.local_runtime import LocalRuntime

        killed = processes.kill_leftovers(str(self.state))
        runtime = LocalRuntime(str(self.state / "sidecars"))
        for sidecar in runtime.list():
            runtime.remove(sidecar)
            killed.append(0)
        if killed:
            self.say(f"removed {len(killed)} processes left by a previous demo in {self.state}")
        shutil.rmtree(self.state / "pods", ignore_errors=True)

    def _start_api(self) -> None:
        from trafficmgr.apiserver import APIServer
        from trafficmgr.apiserver.access import TokenError, new_token
        from trafficmgr.local.kubelet import LocalKubelet
        from trafficmgr.local.kubeproxy import KubeProxy

        c = self.config
        try:
            pods = ipaddress.IPv4Network(c.pod_cidr)
            services = ipaddress.IPv4Network(c.service_cidr)
        except ValueError as exc:
            raise DemoError(f"--pod-cidr/--service-cidr: {exc}") from None
        for net, flag in ((pods, "--pod-cidr"), (services, "--service-cidr")):
            if not net.subnet_of(ipaddress.IPv4Network("127.0.0.0/8")) or net.num_addresses < 16:
                raise DemoError(f"{flag} {net} must be a loopback network (inside 127.0.0.0/8) with at least 16 addresses")
        # The kubelet runs a pod's command: writing to this server is running code as this user. So it takes
        # a random bearer token that only the kubeconfig (mode 0600) holds, serves HTTPS (kubectl sends a
        # token only over TLS), checks Host (DNS rebinding) and write content types (cross-site posts):
        # see trafficmgr/apiserver/access.py.
        try:
            api = APIServer(port=c.api_port, workload_controllers=True, service_cidr=c.service_cidr,
                            token=new_token())
        except TokenError as exc:
            raise DemoError(f"cannot start the API server: {exc}") from None
        self.kubelet = LocalKubelet(api.store, str(self.state), c.pod_cidr, reserved=(c.gateway_ip, c.prometheus_ip)).attach()
        api.controllers.runtime = self.kubelet
        try:
            self.api = api.start()
        except OSError as exc:
            raise DemoError(f"cannot start the API server on 127.0.0.1:{c.api_port}: {exc.strerror} (use --api-port)") from None
        self.api.write_kubeconfig(self.kubeconfig)
        self._install_gateway_api()
        self.kubeproxy = KubeProxy(self.api.store).start()
        self.say(f"API server on {self.api.url} (kubeconfig with its token: {self.kubeconfig})")

    def _install_gateway_api(self) -> None:
        """The Gateway API CRDs, the GatewayClass ``traffic`` and the Gateway ``traffic`` (before the control
        plane starts: its first sync sees them). The listener binds 127.0.0.1 only (``--gateway-address``
        of local mode), on a port ``check_ports`` found free."""
        from trafficmgr.apiserver.crds import GATEWAY_API_CRDS, load_manifests
        from trafficmgr.apiserver.errors import ApiError

        store = self.api.store
        try:
            for crd in load_manifests(GATEWAY_API_CRDS):
                store.create(crd)
            store.create({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
                          "metadata": {"name": GATEWAY_CLASS},
                          "spec": {"controllerName": GATEWAY_CONTROLLER,
                                   "description": "trafficmgr's shared gateway proxies"}})
            store.create({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                          "metadata": {"name": GATEWAY_CLASS, "namespace": NAMESPACE},
                          "spec": {"gatewayClassName": GATEWAY_CLASS, "listeners": [
                              {"name": "http", "protocol": "HTTP", "port": self.config.gateway_api_port,
                               "allowedRoutes": {"namespaces": {"from": "Same"}}}]}})
        except (OSError, ValueError, ApiError) as exc:
            raise DemoError(f"cannot install the Gateway API objects: {exc}") from None

    def _start_serve(self) -> None:
        c = self.config
        self._python_child("serve", [
            "serve", "--kubeconfig", str(self.kubeconfig), "--xds-address", "127.0.0.1", "--xds-port", str(c.xds_port),
            "--admin-port", str(c.serve_admin_port), "--explicit-proxy", "--xds-gateway-namespace", NAMESPACE,
            "--gateway-address", "127.0.0.1", "--gateway-port", str(c.http_port), "--gateway-namespace", NAMESPACE,
            "--zipkin-address", f"127.0.0.1:{c.zipkin_port}",
            "--tracing-provider", c.tracing_provider, "--otlp-address", f"127.0.0.1:{c.otlp_port}",
            # The dashboard links each Service to its recent traces in the collector (its meshService query).
            "--dashboard-traces-url", f"http://127.0.0.1:{c.zipkin_port}",
            "--log-level", "info",
        ])

    def _start_agent(self) -> None:
        from trafficmgr.core.agent.agent import Agent, AgentConfig
        from trafficmgr.core.agent.local_runtime import LocalRuntime, current_uid
        from trafficmgr.core.kube.client import KubeClient
        from trafficmgr.local.kubelet import NODE_NAME

        self.runtime = LocalRuntime(str(self.state / "sidecars"))
        config = AgentConfig(node_name=NODE_NAME, xds_address=f"127.0.0.1:{self.config.xds_port}",
                             proxy_uid=current_uid(), resync_s=30.0)
        self.agent = Agent(KubeClient(self.api.api_client()), self.runtime, config, self.plugins, self.options()).start()

    def _create_gateway_objects(self) -> None:
        """The gateway's Pod (its IP is its xDS identity), its LoadBalancer Service (Ingress status shows
        127.0.0.1), the default IngressClass ``traffic`` and the Service ``zipkin`` (the collector), as the
        Helm chart would create them."""
        c, store = self.config, self.api.store
        store.create({"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass", "metadata": {
            "name": "traffic", "annotations": {"ingressclass.kubernetes.io/is-default-class": "true"}},
            "spec": {"controller": "trafficmgr.io/ingress-controller"}})
        # Labelled and annotated like the chart's gateway pods, and with their stats port name (http-stats,
        # the stats-only listener on the pod IP): the chart's Prometheus job envoy-gateway keys on these.
        store.create({"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": GATEWAY, "namespace": NAMESPACE, "labels": {
                "app": GATEWAY, prom.INSTANCE_LABEL: prom.RELEASE, prom.COMPONENT_LABEL: "gateway"},
            "annotations": {"traffic.envoy.proxy": "ingress"}},
            # The ServiceAccount `serve --xds-gateway-service-account` expects (its default, traffic-ingress).
            "spec": {"serviceAccountName": GATEWAY, "containers": [{"name": "envoy", "image": "envoy", "ports": [
                {"name": "http", "containerPort": c.http_port}, {"name": "https", "containerPort": c.https_port},
                {"name": "http-stats", "containerPort": STATS_PORT}]}]}})
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        store.patch("pods", GATEWAY, {"status": {
            "phase": "Running", "podIP": c.gateway_ip, "podIPs": [{"ip": c.gateway_ip}], "hostIP": "127.0.0.1",
            "startTime": now, "conditions": [{"type": t, "status": "True", "lastTransitionTime": now}
                                             for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")],
            "containerStatuses": [{"name": "envoy", "image": "envoy", "ready": True, "started": True,
                                   "restartCount": 0, "state": {"running": {"startedAt": now}}}]}},
            namespace=NAMESPACE, subresource="status")
        store.create({"apiVersion": "v1", "kind": "Service", "metadata": {
            "name": GATEWAY, "namespace": NAMESPACE, "labels": {"app": GATEWAY}},
            "spec": {"type": "LoadBalancer", "ports": [
                {"name": "http", "port": c.http_port, "targetPort": c.http_port},
                {"name": "https", "port": c.https_port, "targetPort": c.https_port},
                # The Gateway API listener's port, named as the chart names it (the plugin reports a listener
                # on a port its gateway Service does not expose as Pending).
                {"name": f"gw-{c.gateway_api_port}", "port": c.gateway_api_port, "targetPort": c.gateway_api_port}]}})
        store.patch("services", GATEWAY, {"status": {"loadBalancer": {"ingress": [{"ip": "127.0.0.1"}]}}},
                    namespace=NAMESPACE, subresource="status")
        # The collector as Service "zipkin" (samples/ingress.yaml routes /api/v2 to it), like the chart's.
        store.create({"apiVersion": "v1", "kind": "Service", "metadata": {
            "name": "zipkin", "namespace": NAMESPACE, "labels": {"app": "zipkin"}},
            "spec": {"ports": [{"name": "http", "port": 9411, "targetPort": c.zipkin_port}]}})
        store.create({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {
            "name": "zipkin-local", "namespace": NAMESPACE, "labels": {"kubernetes.io/service-name": "zipkin"}},
            "addressType": "IPv4", "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}}],
            "ports": [{"name": "http", "port": c.zipkin_port, "protocol": "TCP"}]})

    def gateway_bootstrap(self) -> dict[str, Any]:
        from trafficmgr.core.bootstrap import ADMIN_PORT, add_stats_listener, bootstrap, stats_listener

        c = self.config
        https = {
            "name": "https",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": c.https_port}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                "stat_prefix": "https", "cluster": "gateway_listener"}}]}],
        }
        to_http = {"name": "gateway_listener", "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
            "cluster_name": "gateway_listener", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": "127.0.0.1", "port_value": c.http_port}}}}]}]}}
        # Admin (mutating endpoints) on the gateway's pod IP like a local sidecar's; the user-facing
        # --admin-port serves only the read-only stats (see add_stats_listener).
        config = bootstrap(GATEWAY, GATEWAY, "127.0.0.1", c.xds_port, admin_port=ADMIN_PORT, admin_address=c.gateway_ip,
                           xds_source_address=c.gateway_ip,
                           static_resources={"listeners": [https], "clusters": [to_http]})
        add_stats_listener(config, "127.0.0.1", c.admin_port)
        # The same stats-only listener (GET/HEAD /stats/prometheus and /ready only, see stats_listener) on the
        # gateway's pod IP, port 8900, as a sidecar's and the chart's gateway's: what Prometheus scrapes
        # (the seed README's `instance='<ingress pod IP>:8900'`). Loopback, like the pod IP itself.
        pod_stats, _ = stats_listener(c.gateway_ip, STATS_PORT, c.gateway_ip, ADMIN_PORT)
        pod_stats["name"] = "stats_pod_ip"
        config["static_resources"]["listeners"].append(pod_stats)
        self.plugins.call_all("trafficmgr_bootstrap", bootstrap=config, role=GATEWAY, options=self.options())
        return config

    def _start_gateway(self) -> None:
        from trafficmgr.core.envoy import EnvoyNotFound, find_envoy

        directory = self.state / "gateway"
        directory.mkdir(exist_ok=True)
        path = directory / "envoy.json"
        path.write_text(json.dumps(self.gateway_bootstrap(), indent=2))
        try:
            envoy = find_envoy()
        except EnvoyNotFound as exc:
            raise DemoError(str(exc)) from None
        child = Child("gateway", [envoy, "-c", str(path), "--disable-hot-restart", "--concurrency", "2",
                                  "--log-level", "warning"], self.run_dir).start()
        self.children.append(child)

    def _start_prometheus(self) -> None:
        """Prometheus as the Service ``prometheus`` (port 9090, what samples/ingress.yaml routes /api/v1 to),
        or one line saying how to get it. Bound to its reserved loopback pod IP only (``--pod-cidr`` is
        inside 127.0.0.0/8); config and TSDB under ``<state dir>/prometheus``, emptied at each start."""
        c, store = self.config, self.api.store
        binary = prom.find_binary()
        if binary is None:
            self.say(prom.INSTALL_HINT)
            return
        home = self.state / "prometheus"
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir()
        (home / "prometheus.yml").write_text(yaml.safe_dump(prom.local_config(home / "sd", NAMESPACE), sort_keys=False))
        self.pod_discovery = prom.PodDiscovery(
            store, home / "sd", NAMESPACE, [prom.control_plane_pod(NAMESPACE, c.serve_admin_port)]).start()
        self.prometheus = Child("prometheus", prom.argv(binary, self.state, c.prometheus_ip), self.run_dir,
                                {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}).start()
        self.children.append(self.prometheus)
        store.create({"apiVersion": "v1", "kind": "Service", "metadata": {
            "name": "prometheus", "namespace": NAMESPACE, "labels": {"app": "prometheus"}},
            "spec": {"ports": [{"name": "http", "port": prom.PORT, "targetPort": prom.PORT}]}})
        store.create({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {
            "name": "prometheus-local", "namespace": NAMESPACE, "labels": {"kubernetes.io/service-name": "prometheus"}},
            "addressType": "IPv4", "endpoints": [{"addresses": [c.prometheus_ip], "conditions": {"ready": True}}],
            "ports": [{"name": "http", "port": prom.PORT, "protocol": "TCP"}]})

    def apply(self, path: Path) -> None:
        """Create every object of a manifest file (like ``kubectl create -f``)."""
        from trafficmgr.apiserver.errors import ApiError

        try:
            docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        except (OSError, yaml.YAMLError) as exc:
            raise DemoError(f"cannot read {path}: {exc}") from None
        for doc in docs:
            try:
                self.api.store.create(doc)
            except ApiError as exc:
                raise DemoError(f"{path}: {doc.get('kind')} {doc.get('metadata', {}).get('name')}: {exc}") from None
        self.say(f"applied {path}")

    # -- readiness ----------------------------------------------------------------------------

    def missing(self) -> list[str]:
        """What does not answer yet (empty: ready)."""
        c, store = self.config, self.api.store
        out: list[str] = []
        for child in self.children:
            if child.proc is not None and child.proc.poll() is not None:
                out.append(f"{child.name} exited ({child.tail()})")
        deployments, _ = store.list_raw(_rt("deployments.apps"), NAMESPACE)
        for d in deployments:
            want = (d.get("spec") or {}).get("replicas", 1)
            if ((d.get("status") or {}).get("readyReplicas") or 0) < want:
                out.append(f"deployment {d['metadata']['name']} not ready")
        checks: list[tuple[str, str, str | None]] = [
            ("control plane", f"http://127.0.0.1:{c.serve_admin_port}/readyz", None),
            ("zipkin", f"http://127.0.0.1:{c.zipkin_port}/api/v2/services", None),
            ("gateway", f"http://127.0.0.1:{c.http_port}/productpage", None),
        ]
        if self.prometheus is not None:
            checks.append(("prometheus", f"http://{c.prometheus_ip}:{prom.PORT}/-/ready", None))
        client = self.client_pod()
        if client is None or not client[1]:
            out.append("client sidecar not started")
        else:
            checks.append(("client sidecar", "http://reviews:9080/reviews/0", f"http://{client[0]}:15001"))
        for what, url, proxy in checks:
            try:
                status, _ = _get(url, proxy=proxy)
            except OSError as exc:
                out.append(f"{what}: {exc}")
                continue
            if status != 200:
                out.append(f"{what} answers {status}")
        return out

    def client_pod(self) -> tuple[str, str] | None:
        """(pod IP, sidecar id) of the client pod, if it runs."""
        pods, _ = self.api.store.list_raw(_rt("pods"), NAMESPACE, lambda labels: labels.get("app") == "client")
        for p in pods:
            ip = (p.get("status") or {}).get("podIP")
            if ip:
                return ip, ((p["metadata"].get("annotations") or {}).get("traffic.envoy.proxy") or "")
        return None

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        missing = self.missing()
        while missing:
            if self.stop_event.wait(0.3):
                raise KeyboardInterrupt
            for child in self.children:
                message = child.supervise()
                if message:
                    self.say(message)
            if time.monotonic() > deadline:
                raise DemoError(f"not ready after {timeout:.0f}s: {'; '.join(missing)} (logs in {self.state})")
            missing = self.missing()
        c = self.config
        self.say(f"ready: http://127.0.0.1:{c.http_port}/productpage (gateway HTTP), https://127.0.0.1:{c.https_port} "
                 f"(gateway HTTPS), http://127.0.0.1:{c.admin_port}/stats/prometheus (gateway stats), "
                 f"http://127.0.0.1:{c.zipkin_port}/api/v2/traces (Zipkin), "
                 + (f"http://127.0.0.1:{c.http_port}/api/v1/query (Prometheus on the gateway; itself on "
                    f"http://{c.prometheus_ip}:{prom.PORT}), " if self.prometheus is not None else "")
                 + f"http://127.0.0.1:{c.serve_admin_port}/dashboard/ (dashboard), "
                 f"http://127.0.0.1:{c.serve_admin_port} (control plane admin); in another shell:")
        self.say(f"export KUBECONFIG={self.kubeconfig}")

    # -- run / stop ---------------------------------------------------------------------------

    def run(self) -> int:
        """Start, wait until ready, supervise until SIGINT/SIGTERM, stop. Returns the exit status."""
        stop_on_signals(self.stop_event)
        try:
            self.start()
            self.wait_ready()
            while not self.stop_event.wait(0.5):
                for child in self.children:
                    message = child.supervise()
                    if message:
                        self.say(message)
            return 0
        except KeyboardInterrupt:
            return 0
        finally:
            self.say("stopping")
            self.stop()
            self.say("stopped")

    def stop(self) -> None:
        """Stop every child: within 10 s, nothing left behind (pods, sidecars, Envoy, serve, Zipkin)."""
        if self.agent is not None:
            with contextlib.suppress(Exception):
                self.agent.stop()
        if self.pod_discovery is not None:
            self.pod_discovery.stop()
        procs = [c.proc for c in self.children if c.proc is not None]
        threads = [threading.Thread(target=processes.terminate_all, args=(procs, 4.0))]
        if self.kubelet is not None:
            threads.append(threading.Thread(target=self.kubelet.close, args=(4.0,)))
        if self.runtime is not None:
            for sidecar in self.runtime.list():
                threads.append(threading.Thread(target=self.runtime.remove, args=(sidecar,)))
        for t in threads:
            t.start()
        for t in threads:
            t.join(9)
        for child in self.children:
            with contextlib.suppress(OSError):
                child.pid_path.unlink()
        if self.kubeproxy is not None:
            self.kubeproxy.close()
        if self.api is not None:
            self.api.stop()


def _rt(key: str) -> Any:
    from trafficmgr.apiserver.discovery import BY_KEY

    return BY_KEY[key]
