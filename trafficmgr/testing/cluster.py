"""End-to-end building blocks: the test API server with real kubectl, ``trafficmgr serve`` as a
subprocess, and an Envoy sidecar in a pod network namespace (iptables redirect, uid 1337).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trafficmgr.core.bootstrap import ADMIN_PORT, STATS_PORT, add_stats_listener, bootstrap
from trafficmgr.core.envoy import find_envoy
from trafficmgr.testing.envoy import free_port, wait_for
from trafficmgr.testing.netns import NetNS, world_executable

PROXY_UID = 1337


class Kubectl:
    """The real ``kubectl`` against a kubeconfig, with its own HOME (fresh discovery cache) when given.

    ``kubectl(*args)`` returns stdout and fails the test on a non-zero exit; :meth:`run` returns the
    whole ``CompletedProcess`` (``check=False`` to look at a failure); :meth:`json` parses ``-o json``.
    """

    def __init__(self, kubeconfig: Path | str, home: Path | str | None = None) -> None:
        self.env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
        if home is not None:
            self.env["HOME"] = str(home)

    def run(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["kubectl", *args], input=input, capture_output=True, text=True, env=self.env, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def __call__(self, *args: str, input: str | None = None) -> str:
        return self.run(*args, input=input).stdout

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "-o", "json"))

    def apply(self, manifest: str) -> None:
        self("apply", "-f", "-", input=manifest)

    def set_pod_status(self, name: str, ip: str, ready: bool, namespace: str = "default", node: str = "node-1") -> None:
        """What a kubelet does: write podIP and the Ready condition through the status subresource."""
        status = {"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "192.0.2.1",
                             "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}
        self("patch", "pod", name, "-n", namespace, "--subresource=status", "--type=merge", "-p", json.dumps(status))


def http_get(url: str, timeout: float = 5.0, headers: dict[str, str] | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


class ServeProcess:
    """``trafficmgr serve`` as a subprocess (like a Deployment would run it)."""

    def __init__(self, kubeconfig: Path, workdir: Path, xds_socket: str, args: Sequence[str] = ()) -> None:
        self.admin_port = free_port()
        self.xds_socket = xds_socket
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "serve.log"
        self.cmd = [
            sys.executable, "-m", "trafficmgr", "serve", "--kubeconfig", str(kubeconfig),
            "--xds-address", f"unix:{xds_socket}", "--admin-port", str(self.admin_port), *args,
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self, timeout: float = 30.0) -> ServeProcess:
        if os.path.exists(self.xds_socket):
            os.unlink(self.xds_socket)
        self.proc = subprocess.Popen(self.cmd, stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(self._ready, timeout)
        except TimeoutError:
            raise AssertionError(f"trafficmgr serve not ready within {timeout}s; log:\n{self.log()}") from None
        os.chmod(self.xds_socket, 0o777)  # the sidecar runs as an unprivileged uid
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"trafficmgr serve exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return http_get(self.admin_url + "/readyz", 1)[0] == 200
        except OSError:
            return False

    def get_json(self, path: str) -> Any:
        code, body = http_get(self.admin_url + path)
        assert code == 200, f"{path}: {code} {body}"
        return json.loads(body)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path.exists() else ""

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
            return None


class SidecarPod:
    """A pod network namespace whose outbound TCP is redirected to an Envoy sidecar (uid 1337).

    ``addresses``: every pod IP that lives in this test network (client and backends); all are on the
    namespace's loopback, so nothing leaves it.
    """

    def __init__(self, node_id: str, addresses: Sequence[str], xds_socket: str, workdir: Path | None = None,
                 delta: bool = False, admin_port: int = ADMIN_PORT, customize: Any = None, inbound_port: int = 0,
                 stats_port: int = STATS_PORT, cwd: Path | str | None = None, envoy_args: Sequence[str] = ()) -> None:
        """``customize(config)`` may change the bootstrap dict (e.g. the plugins' ``trafficmgr_bootstrap``);
        ``cwd``: Envoy's working directory, as the node agent sets it to the proxy's state directory (its
        mesh identity files are ``identity/`` below it: ``trafficmgr.core.identity.files``); ``envoy_args``:
        more Envoy options (e.g. ``--drain-time-s``);
        ``inbound_port``: also capture connections arriving from other namespaces (see :meth:`NetNS.link`),
        as the node agent does. The layout is the agent's: admin on ``127.0.0.1:admin_port`` inside the
        namespace, the stats-only listener on ``addresses[0]:stats_port`` (0: none)."""
        self.node_id = node_id
        self.addresses = list(addresses)
        self.ns = NetNS("tmpod")
        try:
            self.ns.add_pod_network(addresses)
            self.ns.redirect_outbound(10000, PROXY_UID, exclude_ports=(stats_port,) if stats_port else (),
                                      inbound_port=inbound_port)
        except BaseException:
            self.ns.delete()
            raise
        self.admin_port = admin_port
        self.stats_port = stats_port
        # Not under pytest's tmp_path: the sidecar's uid must be able to read its bootstrap.
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="tm-sidecar-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o777)
        config = bootstrap(node_id, "sidecar", f"unix:{xds_socket}", 0, admin_port=admin_port, delta=delta)
        if stats_port:
            add_stats_listener(config, self.addresses[0], stats_port)
        if customize is not None:
            customize(config)
        self.config_path = self.workdir / "envoy.json"
        self.config_path.write_text(json.dumps(config))
        os.chmod(self.config_path, 0o644)
        self.log_path = self.workdir / "envoy.log"
        self.cwd = cwd
        self.envoy_args = tuple(envoy_args)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> SidecarPod:
        envoy = world_executable(find_envoy())
        cmd = self.ns.exec_args(
            "setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}", "--clear-groups",
            envoy, "-c", str(self.config_path), "--disable-hot-restart", "--concurrency", "1", "-l", "info", *self.envoy_args,
        )
        self.proc = subprocess.Popen(cmd, stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT, start_new_session=True,
                                     cwd=self.cwd)
        try:
            wait_for(self._live, timeout)
        except TimeoutError:
            raise AssertionError(f"sidecar Envoy not LIVE within {timeout}s; log:\n{self.log()}") from None
        return self

    def _live(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"Envoy exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return self.admin("/ready").strip() == "LIVE"
        except OSError:
            return False

    def admin(self, path: str) -> str:
        """GET the sidecar's admin endpoint from inside the pod namespace."""
        return self.ns.in_ns(lambda: http_get(f"http://127.0.0.1:{self.admin_port}{path}", 3)[1])

    def listener_config(self, name: str) -> str:
        """The JSON of dynamic listener ``name`` from the sidecar's config dump ("" when absent)."""
        for item in json.loads(self.admin("/config_dump?resource=dynamic_listeners")).get("configs", []):
            if item.get("name") == name:
                return json.dumps(item)
        return ""

    def stat(self, name: str) -> int:
        """A counter or gauge of the sidecar Envoy. A name Envoy does not have is an error (a typo must
        not read as 0), reported with the stats that share its prefix."""
        for line in self.admin("/stats?filter=" + urllib.parse.quote(f"^{re.escape(name)}$")).splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        prefix = re.escape(name.rsplit(".", 1)[0])
        similar = [line.partition(": ")[0] for line in self.admin("/stats?filter=" + urllib.parse.quote(f"^{prefix}")).splitlines()]
        raise AssertionError(f"the sidecar has no stat {name!r}; under its prefix: {similar[:20]}")

    def get_many(self, address: str, port: int, host: str, n: int, path: str = "/",
                 headers: dict[str, str] | None = None, timeout: float = 30.0) -> list[tuple[int, bytes]]:
        """``n`` sequential GETs from inside the pod on one keep-alive connection to ``address:port`` with
        ``Host: host`` (redirected to the sidecar like any application request): (status, body) each."""
        import http.client

        def run() -> list[tuple[int, bytes]]:
            conn = http.client.HTTPConnection(address, port, timeout=timeout)
            out = []
            try:
                for _ in range(n):
                    conn.request("GET", path, headers={"Host": host, **(headers or {})})
                    resp = conn.getresponse()
                    out.append((resp.status, resp.read()))
            finally:
                conn.close()
            return out

        return self.in_ns(run)

    def curl(self, url: str, *args: str, timeout: float = 5.0) -> tuple[int, str]:
        """Run the real ``curl`` inside the pod namespace; returns (HTTP status or 0, body/stderr)."""
        proc = self.ns.run("curl", "-sS", "-m", str(timeout), "-o", "-", "-w", "\n%{http_code}", *args, url, check=False)
        if proc.returncode != 0:
            return 0, proc.stderr.strip()
        body, _, code = proc.stdout.rpartition("\n")
        return int(code or 0), body

    def in_ns(self, fn: Any, timeout: float = 60.0) -> Any:
        """Run ``fn()`` inside the pod network namespace (sockets it makes belong there). Not for grpcio
        clients: grpcio connects from its own threads, which stay in the host's namespace; run them as a
        process in the namespace (``self.ns.run(sys.executable, "-c", ...)``)."""
        return self.ns.in_ns(fn, timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(5)
        self.ns.delete()
        shutil.rmtree(self.workdir, ignore_errors=True)


def store_events(store: Any, name: str | None = None, reason: str | None = None,
                 namespace: str = "default") -> list[dict[str, Any]]:
    """The Events in the test API server's ``store`` for ``namespace``, only those about object ``name``
    and/or with ``reason`` when given."""
    return [e for e in store.list("events", namespace)["items"]
            if (name is None or (e.get("involvedObject") or {}).get("name") == name)
            and (reason is None or e.get("reason") == reason)]


class LocalCluster:
    """In-process end-to-end rig for feature tests (no subprocess but Envoy):

    the test API server (with its EndpointSlice controller), a real :class:`ControlPlane` watching it
    through the official client, its xDS server on a Unix socket, and a :class:`SidecarPod` named
    ``client.default`` whose namespace also holds every backend pod address.

    ``apply(yaml)`` creates or replaces objects (pods get ``status`` with their IP and readiness
    from the manifest, as a kubelet would); ``label(kind, name, {k: v or None})`` patches labels;
    ``backend(name, ip, port)`` starts an :class:`HttpBackend` inside the pod network.
    """

    def __init__(self, pod_addresses: Sequence[str], plugins: Any = None, options: Any = None,
                 delta: bool = False, client_ip: str = "10.244.0.2", client_cwd: Path | str | None = None) -> None:
        import argparse

        from trafficmgr.apiserver import APIServer
        from trafficmgr.apiserver.access import new_token
        from trafficmgr.core.controlplane import ControlPlane
        from trafficmgr.core.kube.client import KubeClient, load_api_client
        from trafficmgr.core.plugins import PluginHost
        from trafficmgr.core.xds.server import XdsServerThread

        self.client_ip = client_ip
        self.addresses = [client_ip, *pod_addresses]
        self.tmp = Path(tempfile.mkdtemp(prefix="tm-cluster-"))
        os.chmod(self.tmp, 0o755)
        self.api = APIServer(token=new_token()).start()  # the kubeconfig carries the token, as local mode's does
        self.store = self.api.store
        kubeconfig = self.tmp / "kubeconfig"
        self.api.write_kubeconfig(str(kubeconfig))
        self.kubeconfig = kubeconfig
        opts = options or argparse.Namespace()
        for key, value in {"sidecar_port": 10000, "sidecar_address": "0.0.0.0"}.items():
            if not hasattr(opts, key):
                setattr(opts, key, value)
        self.plugins = plugins if plugins is not None else PluginHost.load()
        self.cp = ControlPlane(self.plugins, opts, KubeClient(load_api_client(str(kubeconfig))))
        self.xds_socket = str(self.tmp / "xds.sock")
        self.xds = XdsServerThread(self.cp.cache, f"unix:{self.xds_socket}", 0, authorizer=self.cp.authorize).start()
        os.chmod(self.xds_socket, 0o777)
        self.cp.xds = self.xds
        self.backends: list[Any] = []
        self.peers: list[SidecarPod] = []
        self.options = opts
        self.pod: SidecarPod | None = None
        try:  # a failed start must not leave a network namespace (or an Envoy) behind
            self.cp.start_watches()
            if not self.cp.wait_ready(15):
                raise AssertionError(f"control plane not ready: {self.cp.ready()[1]}")
            self.apply(f"""
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: default, labels: {{app: client}}}}
spec: {{nodeName: node-1, containers: [{{name: client, image: client}}]}}
status: {{podIP: {client_ip}, conditions: [{{type: Ready, status: "True"}}]}}
""")
            self.pod = SidecarPod("client.default", self.addresses, self.xds_socket, delta=delta, cwd=client_cwd,
                                  customize=lambda cfg: self.plugins.call_all(
                                      "trafficmgr_bootstrap", bootstrap=cfg, role="sidecar", options=opts))
            self.pod.start()
        except BaseException:
            self.close()
            raise

    def apply(self, manifests: str) -> None:
        """Create or replace each object of a multi-document YAML string (status included)."""
        import yaml

        from trafficmgr.apiserver.errors import ApiError

        for obj in (d for d in yaml.safe_load_all(manifests) if d):
            meta = obj.setdefault("metadata", {})
            meta.setdefault("namespace", "default")
            status = obj.get("status")
            try:
                current = self.store.get(obj["kind"].lower() + "s", meta["name"], meta["namespace"])
            except ApiError:
                current = None
            if current is None:
                self.store.create(obj)
            else:
                obj["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                self.store.update(obj)
            if status is not None:
                self.store.patch(obj["kind"].lower() + "s", meta["name"], {"status": status}, meta["namespace"],
                                 patch_type="merge", subresource="status")

    def label(self, kind: str, name: str, labels: dict[str, str | None], namespace: str = "default") -> None:
        """Set (value) or remove (None) labels, like ``kubectl label``."""
        plural = {"service": "services", "pod": "pods", "deployment": "deployments",
                  "statefulset": "statefulsets", "daemonset": "daemonsets"}[kind.lower()]
        self.store.patch(plural, name, {"metadata": {"labels": labels}}, namespace, patch_type="merge")

    def events(self, name: str | None = None, reason: str | None = None, namespace: str = "default") -> list[dict[str, Any]]:
        """The Events of ``namespace`` (see :func:`store_events`)."""
        return store_events(self.store, name, reason, namespace)

    def wait_event(self, name: str, reason: str, text: str = "", timeout: float = 10.0) -> dict[str, Any]:
        """Wait for a Warning Event about ``name`` with ``reason`` whose message contains ``text``."""
        def found() -> dict[str, Any] | None:
            return next((e for e in self.events(name, reason) if text in e["message"] and e["type"] == "Warning"), None)

        return wait_for(found, timeout, message=f"no {reason} event on {name} containing {text!r}: {self.events(name)}")

    def backend(self, name: str, ip: str, port: int) -> Any:
        """An HttpBackend listening on ``ip:port`` inside the pod network."""
        from trafficmgr.testing.backends import HttpBackend

        assert self.pod is not None, "the client pod is started by __init__"
        b = self.pod.in_ns(lambda: HttpBackend(name, host=ip, port=port).start())
        self.backends.append(b)
        return b

    def peer_pod(self, name: str, ip: str, inbound_port: int = 15006, cwd: Path | str | None = None,
                 envoy_args: Sequence[str] = ()) -> SidecarPod:
        """A second sidecar pod ``<name>.default`` (the Pod object must exist) in its own network namespace,
        linked to the client pod's by a veth pair and capturing inbound connections as the node agent
        does: traffic from the client pod to ``ip`` crosses a real network boundary into its sidecar."""
        peer = SidecarPod(f"{name}.default", [ip], self.xds_socket, inbound_port=inbound_port, cwd=cwd, envoy_args=envoy_args,
                          customize=lambda cfg: self.plugins.call_all("trafficmgr_bootstrap", bootstrap=cfg, role="sidecar",
                                                                      options=self.options))
        self.peers.append(peer)
        assert self.pod is not None, "the client pod is started by __init__"
        self.pod.ns.link(peer.ns, self.addresses, [ip])
        return peer.start()

    def peer_backend(self, peer: SidecarPod, name: str, port: int) -> Any:
        """An HttpBackend on the peer pod's address, inside its namespace."""
        from trafficmgr.testing.backends import HttpBackend

        b = peer.in_ns(lambda: HttpBackend(name, host=peer.addresses[0], port=port).start())
        self.backends.append(b)
        return b

    def cluster_ip(self, service: str, namespace: str = "default") -> str:
        return self.store.get("services", service, namespace)["spec"]["clusterIP"]

    def wait_config(self, predicate: Any, timeout: float = 10.0, message: str = "") -> Any:
        """Poll until ``predicate()`` is truthy (e.g. the sidecar's config dump shows a change). On timeout
        the error also tells what the control plane and the client sidecar were doing (a flake in CI is
        then told apart: no build, a rejected snapshot, or an Envoy that did not apply it)."""
        try:
            return wait_for(predicate, timeout, message=message)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self._state()}") from exc.__cause__

    def _state(self) -> str:
        snap = self.cp.cache.get("sidecar")
        versions = {t: ts.version for t, ts in snap.types.items()} if snap is not None else None
        envoy = self.pod.log() if self.pod is not None else ""
        return (f"control plane: builds={self.cp.builds} ready={self.cp.ready()} last_error={self.cp.last_error!r} "
                f"sidecar snapshot versions={versions}\nclient sidecar's Envoy log (tail):\n{envoy[-2500:]}")

    def close(self) -> None:
        for b in self.backends:
            b.stop()
        for peer in self.peers:
            peer.stop()
        if self.pod is not None:
            self.pod.stop()
        self.cp.stop()
        self.xds.stop(0.5)
        self.api.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class GatewayCluster:
    """In-process rig for ingress gateway tests (no network namespace needed):

    the test API server, a real :class:`ControlPlane` watching it, its xDS server on loopback TCP, and
    one gateway Envoy (node cluster ``traffic-ingress``) whose ingress listener is on
    ``127.0.0.1:<gateway_port>`` (a free port unless given). Backends are :class:`HttpBackend` on
    127.0.0.x loopback addresses used as pod IPs. ``apply``/``label`` work as in :class:`LocalCluster`.
    """

    NODE_ID = "traffic-ingress-test"

    def __init__(self, plugins: Any = None, options: Any = None, delta: bool = False,
                 gateway_port: int | None = None) -> None:
        import argparse

        from trafficmgr.apiserver import APIServer
        from trafficmgr.apiserver.access import new_token
        from trafficmgr.core.controlplane import ControlPlane
        from trafficmgr.core.kube.client import KubeClient, load_api_client
        from trafficmgr.core.model import GATEWAY_CLUSTER
        from trafficmgr.core.plugins import PluginHost
        from trafficmgr.core.xds.server import XdsServerThread
        from trafficmgr.testing.envoy import EnvoyProcess

        self.tmp = Path(tempfile.mkdtemp(prefix="tm-gateway-"))
        self.api = APIServer(token=new_token()).start()  # the kubeconfig carries the token, as local mode's does
        self.store = self.api.store
        self.kubeconfig = self.tmp / "kubeconfig"
        self.api.write_kubeconfig(str(self.kubeconfig))
        self.kubectl = Kubectl(self.kubeconfig, self.tmp)
        self.gateway_port = gateway_port or free_port()
        opts = options or argparse.Namespace()
        for key, value in {"sidecar_port": 10000, "sidecar_address": "0.0.0.0",
                           "gateway_port": self.gateway_port, "gateway_address": "127.0.0.1"}.items():
            if getattr(opts, key, None) is None:
                setattr(opts, key, value)
        self.options = opts
        self.plugins = plugins if plugins is not None else PluginHost.load()
        self.cp = ControlPlane(self.plugins, opts, KubeClient(load_api_client(str(self.kubeconfig))))
        self.xds = XdsServerThread(self.cp.cache, "127.0.0.1", 0).start()
        self.cp.xds = self.xds
        self.backends: list[Any] = []
        self.envoy: Any = None
        try:
            self.cp.start_watches()
            if not self.cp.wait_ready(15):
                raise AssertionError(f"control plane not ready: {self.cp.ready()[1]}")
            config = bootstrap(self.NODE_ID, GATEWAY_CLUSTER, "127.0.0.1", self.xds.port, admin_port=0, delta=delta)
            self.envoy = EnvoyProcess(config, self.tmp / "envoy").start()
        except BaseException:
            self.close()
            raise

    def apply(self, manifests: str) -> None:
        """Create or replace each object (pods get their ``status``), as :meth:`LocalCluster.apply`."""
        LocalCluster.apply(self, manifests)  # type: ignore[arg-type]

    def label(self, kind: str, name: str, labels: dict[str, str | None], namespace: str = "default") -> None:
        LocalCluster.label(self, kind, name, labels, namespace)  # type: ignore[arg-type]

    def delete(self, plural: str, name: str, namespace: str = "default") -> None:
        self.store.delete(plural, name, namespace)

    def events(self, name: str | None = None, reason: str | None = None, namespace: str = "default") -> list[dict[str, Any]]:
        return store_events(self.store, name, reason, namespace)

    def wait_event(self, name: str, reason: str, text: str = "", timeout: float = 10.0) -> dict[str, Any]:
        return LocalCluster.wait_event(self, name, reason, text, timeout)  # type: ignore[arg-type]

    def backend(self, name: str, ip: str, port: int) -> Any:
        """An HttpBackend on ``ip:port`` (a 127.0.0.x address standing for a pod IP)."""
        from trafficmgr.testing.backends import HttpBackend

        b = HttpBackend(name, host=ip, port=port).start()
        self.backends.append(b)
        return b

    def get(self, path: str, host: str | None = None, timeout: float = 5.0,
            headers: dict[str, str] | None = None) -> tuple[int, str]:
        """GET ``path`` through the gateway's plain HTTP port with ``Host: host``."""
        hdrs = dict(headers or {})
        if host:
            hdrs["Host"] = host
        return http_get(f"http://127.0.0.1:{self.gateway_port}{path}", timeout, hdrs)

    def wait_config(self, predicate: Any, timeout: float = 10.0, message: str = "") -> Any:
        """Poll ``predicate`` until truthy; fails fast with Envoy's log if it died."""
        return self.envoy.wait_for(predicate, timeout, message=message)

    def close(self) -> None:
        for b in self.backends:
            b.stop()
        if self.envoy is not None:
            self.envoy.stop()
        self.cp.stop()
        self.xds.stop(0.5)
        self.api.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> GatewayCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
