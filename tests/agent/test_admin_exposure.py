"""Issue 16 item 1 and item 7 (first bullet): Envoy admin is off the pod network.

A real node agent (``netns`` runtime) gives a pod in its own network namespace a sidecar; a gateway Envoy
runs in a second namespace with the bootstrap ``trafficmgr bootstrap`` prints by default; an "attacker"
pod in a third namespace is linked to both by veth pairs (nothing leaves the three namespaces). From the
attacker, the mutating admin endpoints are POSTed to the stats port 8900 and to every other port the
Envoys listen on (read with ``ss`` inside their namespaces): nothing reaches admin, the Envoys keep
serving, and ``GET /stats/prometheus`` on 8900 still returns the cluster metrics. On the old layout
(admin on ``<pod IP>:8900``, an admin runtime layer) the first ``/quitquitquit`` answered 200 and the
sidecar exited.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent.manifests import SERVICES, WORKLOAD, pod
from tests.agent.rig import Cluster, captured
from trafficmgr import cli
from trafficmgr.core.agent.health import admin_get
from trafficmgr.core.agent.netns_runtime import ProcessRuntime
from trafficmgr.core.envoy import find_envoy
from trafficmgr.core.model import GATEWAY_CLUSTER
from trafficmgr.testing.backends import HttpBackend
from trafficmgr.testing.envoy import wait_for
from trafficmgr.testing.netns import NetNS, world_executable

# 10.244.81.0/24: addresses no other test uses (the netns runtime finds namespaces by pod IP).
APP_IP, REVIEWS_IP, BLOCKED_IP = "10.244.81.2", "10.244.81.11", "10.244.81.12"
ATTACKER_IP, GATEWAY_IP = "10.244.81.50", "10.244.81.60"
#: The admin requests a pod must not be able to make (each answered 200 on the old layout).
ABUSE = ("/quitquitquit", "/runtime_modify?trafficmgr.abuse=1", "/logging?level=debug", "/drain_listeners")
REVIEWS = "9080|default|reviews"
INGRESS = """
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: web, namespace: default}
spec:
  ingressClassName: traffic
  rules:
  - http:
      paths:
      - {path: /r, pathType: Prefix, backend: {service: {name: reviews, port: {number: 9080}}}}
"""


def request(ns: NetNS, ip: str, port: int, method: str, path: str) -> int | str:
    """``method path`` to ``ip:port`` from inside ``ns``: the HTTP status, or the connection error's name."""
    def go() -> int | str:
        conn = http.client.HTTPConnection(ip, port, timeout=3)
        try:
            conn.request(method, path)
            resp = conn.getresponse()
            resp.read()
            return resp.status
        except OSError as exc:
            return type(exc).__name__
        finally:
            conn.close()

    return ns.in_ns(go)


def envoy_ports(ns: NetNS, pid: int) -> dict[int, str]:
    """port -> address of every TCP socket the Envoy ``pid`` listens on in ``ns``."""
    out = ns.run("ss", "-ltnpH").stdout
    ports: dict[int, str] = {}
    for line in out.splitlines():
        if f"pid={pid}," not in line:
            continue
        address, _, port = line.split()[3].rpartition(":")
        ports[int(port)] = address
    return ports


def admin(ns: NetNS, path: str, method: str = "GET") -> str:
    """Envoy admin of the Envoy in ``ns`` (127.0.0.1:15000 there): the pod's own view."""
    if method == "GET":
        status, body = admin_get(ns.path, "127.0.0.1", 15000, path, 3)
        assert status == 200, f"{path}: {status}"
        return body.decode()

    def post() -> str:
        conn = http.client.HTTPConnection("127.0.0.1", 15000, timeout=3)
        conn.request("POST", path)
        return conn.getresponse().read().decode()

    return ns.in_ns(post)


def stat(ns: NetNS, name: str) -> int:
    text = admin(ns, "/stats?filter=" + re.escape(name).replace("\\|", "."))
    return sum(int(v) for k, _, v in (ln.partition(": ") for ln in text.splitlines()) if k == name)


def curl(ns: NetNS, url: str) -> tuple[int, str]:
    proc = ns.run("curl", "-sS", "-m", "3", "-o", "-", "-w", "\n%{http_code}", url, check=False)
    if proc.returncode != 0:
        return 0, proc.stderr.strip()
    body, _, code = proc.stdout.rpartition("\n")
    return int(code or 0), body


@pytest.fixture
def net(cluster: Cluster) -> Iterator[tuple[NetNS, NetNS, NetNS, list[HttpBackend]]]:
    """(pod, gateway, attacker) namespaces; the attacker is linked to the pod and to the gateway."""
    made: list[NetNS] = []
    backends: list[HttpBackend] = []
    try:
        app, gw, attacker = (NetNS(prefix) for prefix in ("tmadm", "tmadmgw", "tmadmx"))
        made += [app, gw, attacker]
        app.add_pod_network([APP_IP, REVIEWS_IP, BLOCKED_IP])
        gw.add_pod_network([GATEWAY_IP])
        attacker.add_pod_network([ATTACKER_IP])
        attacker.link(app, [ATTACKER_IP], [APP_IP])
        attacker.link(gw, [ATTACKER_IP], [GATEWAY_IP])
        backends.append(app.in_ns(lambda: HttpBackend("reviews-1", REVIEWS_IP, 9080).start()))
        # "Another host" listening on port 8900, which the capture used to exempt for outbound traffic.
        backends.append(app.in_ns(lambda: HttpBackend("other-8900", REVIEWS_IP, 8900).start()))
        cluster.apply(SERVICES.format(reviews_ip=REVIEWS_IP, blocked_ip=BLOCKED_IP))
        cluster.apply(WORKLOAD.format(app="web"))
        yield app, gw, attacker, backends
    finally:
        for b in backends:
            b.stop()
        for ns in made:
            ns.delete()


def test_admin_is_unreachable_from_other_pods_and_8900_serves_only_stats(
        cluster: Cluster, net: tuple[NetNS, NetNS, NetNS, list[HttpBackend]], capsys: pytest.CaptureFixture[str]) -> None:
    app, gw, attacker, (reviews, other_8900) = net
    state_dir = tempfile.mkdtemp(prefix="tm-admin-state-")
    gw_dir = Path(tempfile.mkdtemp(prefix="tm-admin-gw-"))
    gateway: subprocess.Popen[bytes] | None = None
    try:
        # The sidecar, made by the real agent (its bootstrap, its capture rules, its LIVE probe).
        cluster.apply(pod("web-6c9f-a1", "web", ip=APP_IP))
        cluster.label("deployments", "web", {"traffic.envoy.enabled": "true"})
        cluster.agent(ProcessRuntime(state_dir))
        sidecar_id = wait_for(lambda: cluster.annotation("web-6c9f-a1"), 20, message="annotation not set")
        assert captured(app.path, inbound=True)
        pid = json.load(open(os.path.join(state_dir, sidecar_id, "sidecar.json")))["pid"]

        # The gateway, from `trafficmgr bootstrap` with its defaults, in its own namespace, serving an
        # Ingress (so it has its traffic listener, port 10000, too).
        cluster.store.create({"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
                              "metadata": {"name": "traffic"}, "spec": {"controller": "trafficmgr.io/ingress-controller"}})
        cluster.apply(INGRESS)
        assert cli.main(["bootstrap", "--node-id", "traffic-ingress-1", "--node-cluster", GATEWAY_CLUSTER,
                         "--xds-address", f"unix:{cluster.xds_socket}", "-o", str(gw_dir / "envoy.json")]) == 0
        capsys.readouterr()
        os.chmod(gw_dir, 0o755)
        gateway = subprocess.Popen(
            gw.exec_args(world_executable(find_envoy()), "-c", str(gw_dir / "envoy.json"), "--disable-hot-restart",
                         "--concurrency", "1", "-l", "info"),
            stdout=open(gw_dir / "envoy.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: gateway.poll() is None and _ready(gw), 20,
                 message=f"gateway not LIVE: {(gw_dir / 'envoy.log').read_text()[-3000:]}")

        # Traffic through the sidecar works before (and is counted).
        reviews_url = f"http://{cluster.cluster_ip('reviews')}:9080/r"
        assert curl(app, reviews_url)[0] == 200

        # What listens: the sidecar's admin and the gateway's only on loopback, 8900 on the pod network.
        sidecar_ports, gateway_ports = envoy_ports(app, pid), envoy_ports(gw, gateway.pid)
        assert sidecar_ports[15000] == "127.0.0.1" and sidecar_ports[8900] == APP_IP, sidecar_ports
        assert gateway_ports[15000] == "127.0.0.1" and gateway_ports[8900] in ("0.0.0.0", "*"), gateway_ports
        assert {10000, 15006} <= set(sidecar_ports), sidecar_ports
        assert 10000 in gateway_ports, gateway_ports

        answers: dict[tuple[str, int, str], int | str] = {}
        for target, ports in ((APP_IP, sidecar_ports), (GATEWAY_IP, gateway_ports)):
            for port in sorted(ports):
                for path in ABUSE:
                    answers[(target, port, path)] = request(attacker, target, port, "POST", path)
        for (target, port, path), answer in answers.items():
            if port == 8900:
                assert answer == 404, f"{target}:8900 POST {path}: {answer}"
            else:  # refused, reset, or a status of a listener that is not admin
                assert answer in ("ConnectionRefusedError", "ConnectionResetError", "RemoteDisconnected",
                                  "TimeoutError", 403, 404, 405, 503), f"{target}:{port} POST {path}: {answer}"
        # Reading admin through 8900 is refused too, whatever the path spelling or method.
        for path in ("/config_dump", "/clusters", "/stats", "//quitquitquit", "/ready/../quitquitquit",
                     "/stats/prometheus/../../quitquitquit", "/stats%2Fprometheus"):
            assert request(attacker, APP_IP, 8900, "GET", path) in (400, 404), path
        assert request(attacker, APP_IP, 8900, "POST", "/stats/prometheus") == 405
        assert request(attacker, GATEWAY_IP, 8900, "PUT", "/ready") == 405

        # Both Envoys still run, unchanged: no drain, no runtime key, no debug logging.
        assert gateway.poll() is None and os.path.exists(f"/proc/{pid}")
        assert request(attacker, GATEWAY_IP, 10000, "GET", "/elsewhere") == 404  # the gateway's routes answer
        for ns in (app, gw):
            assert json.loads(admin(ns, "/server_info"))["state"] == "LIVE"
            assert "trafficmgr.abuse" not in admin(ns, "/runtime")
            assert stat(ns, "listener_manager.total_listeners_draining") == 0
            assert not [ln for ln in admin(ns, "/logging", "POST").splitlines() if ln.strip().endswith(": debug")]
        before = stat(app, f"cluster.{REVIEWS}.outbound.upstream_rq_completed")
        assert curl(app, reviews_url)[0] == 200
        assert stat(app, f"cluster.{REVIEWS}.outbound.upstream_rq_completed") == before + 1

        # Prometheus still reads the metrics on 8900 (sidecar and gateway; ?usedonly too), and probes /ready.
        for target in (APP_IP, GATEWAY_IP):
            assert request(attacker, target, 8900, "GET", "/ready") == 200
            assert request(attacker, target, 8900, "HEAD", "/stats/prometheus") == 200
        text = attacker.in_ns(lambda: _get(APP_IP, 8900, "/stats/prometheus?usedonly"))
        assert f'envoy_cluster_outbound_upstream_rq_completed{{envoy_cluster_name="{REVIEWS}"}} {before + 1}' in text
        assert "envoy_cluster_upstream_rq" in attacker.in_ns(lambda: _get(GATEWAY_IP, 8900, "/stats/prometheus"))

        # The node operator reads admin through the agent's namespace access: `proxies --admin`.
        base = ["proxies", "--runtime", "netns", "--state-dir", state_dir, "--id", sidecar_id[:8]]
        assert cli.main([*base, "--admin", "/config_dump?resource=dynamic_listeners"]) == 0
        out, _ = capsys.readouterr()
        # ?resource=dynamic_listeners: one DynamicListener per entry.
        names = [c["name"] for c in json.loads(out)["configs"] if "active_state" in c]
        assert "outbound" in names, out[:1500]
        assert cli.main([*base, "--admin", "/quitquitquit"]) == 1  # GET only: Envoy wants POST
        _, err = capsys.readouterr()
        assert "answered 405" in err and os.path.exists(f"/proc/{pid}"), err

        # Item 7: outbound connections to port 8900 of another host are captured (blocked: not labeled).
        code, body = curl(app, f"http://{REVIEWS_IP}:8900/")
        assert code == 404 and "port not enabled" in body and other_8900.hits == 0, (code, body)
    finally:
        if gateway is not None and gateway.poll() is None:
            gateway.kill()
            gateway.wait(10)
        for agent in cluster.agents:
            agent.stop()
        subprocess.run([sys.executable, "-m", "trafficmgr", "proxies", "--runtime", "netns", "--state-dir", state_dir,
                        "--remove-all", "--kubeconfig", str(cluster.kubeconfig)], capture_output=True, timeout=60)
        shutil.rmtree(state_dir, ignore_errors=True)
        shutil.rmtree(gw_dir, ignore_errors=True)


def _ready(ns: NetNS) -> bool:
    try:
        return admin_get(ns.path, "127.0.0.1", 15000, "/ready", 2)[1].strip() == b"LIVE"
    except OSError:
        return False


def _get(ip: str, port: int, path: str) -> str:
    conn = http.client.HTTPConnection(ip, port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        assert resp.status == 200, resp.status
        return resp.read().decode()
    finally:
        conn.close()
