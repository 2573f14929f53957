"""End to end: real kubectl -> test API server -> `trafficmgr serve` -> a real Envoy sidecar in a pod
network namespace (iptables redirect, uid 1337) -> backends in that namespace."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from trafficmgr.apiserver import APIServer
from trafficmgr.testing.backends import HttpBackend
from trafficmgr.testing.cluster import Kubectl, ServeProcess, SidecarPod
from trafficmgr.testing.envoy import no_nacks, wait_for
from trafficmgr.testing.netns import require as _require_netns

CLIENT_IP = "10.244.0.2"
REVIEWS = {"reviews-1": "10.244.0.11", "reviews-2": "10.244.0.12"}

SERVICE = """
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080, targetPort: web}]
"""

POD = """
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: default, labels: {{app: {app}}}}}
spec:
  nodeName: node-1
  containers: [{{name: app, image: app, ports: [{{name: web, containerPort: 9081}}]}}]
"""


@pytest.fixture
def cluster(tmp_path: Path, envoy_binary: str) -> Iterator[dict]:
    _require_netns()
    api = APIServer().start()
    kubeconfig = tmp_path / "kubeconfig"
    api.write_kubeconfig(str(kubeconfig))
    kubectl = Kubectl(kubeconfig, tmp_path / "home")
    sock_dir = Path(f"/tmp/tm-xds-{os.getpid()}-{tmp_path.name[-8:]}")
    sock_dir.mkdir(mode=0o755, exist_ok=True)
    os.chmod(sock_dir, 0o755)
    serve = ServeProcess(kubeconfig, tmp_path / "serve", str(sock_dir / "xds.sock")).start()
    pod: SidecarPod | None = None
    backends: list[HttpBackend] = []
    try:
        kubectl.apply(SERVICE)
        for name, ip in REVIEWS.items():
            kubectl.apply(POD.format(name=name, app="reviews"))
            kubectl.set_pod_status(name, ip, ready=True)
        kubectl.apply(POD.format(name="client", app="client"))
        kubectl.set_pod_status("client", CLIENT_IP, ready=True)
        pod = SidecarPod("client.default", [CLIENT_IP, *REVIEWS.values()], serve.xds_socket)
        for name, ip in REVIEWS.items():
            backends.append(pod.in_ns(lambda n=name, a=ip: HttpBackend(n, host=a, port=9081).start()))
        pod.start()
        yield {"api": api, "kubectl": kubectl, "serve": serve, "pod": pod, "backends": backends}
    finally:
        for b in backends:
            b.stop()
        if pod is not None:
            pod.stop()
        rc = serve.stop()
        api.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)
        assert rc == 0, f"serve did not exit cleanly on SIGTERM ({rc}):\n{serve.log()}"


class TcpEcho:
    """A raw TCP echo server on ``ip:port`` (bound inside the pod namespace by the caller) that counts the
    connections it accepted and the bytes it received."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.accepted = 0
        self.received = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @classmethod
    def bind(cls, ip: str, port: int) -> TcpEcho:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((ip, port))
        sock.listen(16)
        return cls(sock)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            with conn:
                conn.settimeout(5)
                try:
                    while data := conn.recv(4096):
                        self.received += len(data)
                        conn.sendall(data)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


def _tcp_exchange(ip: str, port: int, payload: bytes = b"ping\n") -> bytes:
    """Connect (the sidecar's capture answers), send ``payload`` and return what comes back: the echo, or
    b"" when the other end closes or resets without answering (possibly before the send completes). No
    half-close: a proxy may drop a connection whose client closed before the upstream one was made. A
    failed connect raises; no answer and no close within 3 s is an error too."""
    out = b""
    with socket.create_connection((ip, port), timeout=3) as s:
        try:
            s.sendall(payload)
            while len(out) < len(payload) and (data := s.recv(4096)):
                out += data
        except OSError as exc:
            if exc.errno not in (errno.ENOTCONN, errno.EPIPE, errno.ECONNRESET):
                raise
    return out


def _reviews_cluster_hosts(pod: SidecarPod) -> set[str]:
    hosts = set()
    for line in pod.admin("/clusters").splitlines():
        if line.startswith("9080|default|reviews.outbound::") and "::cx_active::" in line:
            hosts.add(line.split("::")[1].split(":")[0])
    return hosts


def test_label_unblocks_then_endpoints_follow_pods(cluster: dict) -> None:
    pod: SidecarPod = cluster["pod"]
    kubectl: Kubectl = cluster["kubectl"]
    url = "http://10.96.0.1:9080/reviews/0"
    svc_ip = kubectl("get", "svc", "reviews", "-o", "jsonpath={.spec.clusterIP}")
    url = f"http://{svc_ip}:9080/reviews/0"

    # Unlabeled port: blocked by the sidecar with a clear 404.
    code, body = pod.curl(url)
    assert code == 404 and "port not enabled" in body

    labeled_at = time.monotonic()
    kubectl("label", "svc", "reviews", "traffic.port.9080=http")
    wait_for(lambda: pod.curl(url, timeout=1)[0] == 200, 5, message="label did not unblock the port")
    assert time.monotonic() - labeled_at < 2.0  # issue: within a second, plus curl/kubectl overhead

    served = {json.loads(pod.curl(url)[1])["backend"] for _ in range(20)}
    assert served == set(REVIEWS), "both ready pods receive traffic through Envoy"
    assert pod.stat("cluster.9080|default|reviews.outbound.upstream_rq_completed") >= 20

    # Traffic addressed to a pod IP directly is blocked until the pod labels that port.
    direct = f"http://{REVIEWS['reviews-1']}:9081/direct"
    assert pod.curl(direct)[0] == 404, pod.curl(direct)
    kubectl("label", "pod", "reviews-1", "traffic.port.9081=http")
    wait_for(lambda: pod.curl(direct, timeout=1)[0] == 200, 5, message="pod port label did not unblock the pod IP")
    assert json.loads(pod.curl(direct)[1])["backend"] == "reviews-1"
    assert pod.curl(f"http://{REVIEWS['reviews-2']}:9081/direct")[0] == 404  # the other pod is not labeled

    # Raw TCP to an unlabeled port of a pod: the sidecar closes the connection, no byte is answered and
    # the backend never sees a connection. Labeling the port tcp opens it (so the check can see traffic).
    echo = pod.in_ns(lambda: TcpEcho.bind(REVIEWS["reviews-1"], 9090))
    try:
        for _ in range(3):
            assert pod.in_ns(lambda: _tcp_exchange(REVIEWS["reviews-1"], 9090)) == b""
        assert (echo.accepted, echo.received) == (0, 0)
        kubectl("label", "pod", "reviews-1", "traffic.port.9090=tcp")
        wait_for(lambda: pod.in_ns(lambda: _tcp_exchange(REVIEWS["reviews-1"], 9090)) == b"ping\n", 5,
                 message="the tcp port label did not open raw TCP to the pod")
        assert echo.accepted >= 1 and echo.received >= 5
    finally:
        echo.close()

    # Not ready -> removed from Envoy's endpoints.
    kubectl.set_pod_status("reviews-2", REVIEWS["reviews-2"], ready=False)
    wait_for(lambda: _reviews_cluster_hosts(pod) == {REVIEWS["reviews-1"]}, 5, message="not-ready pod still an endpoint")
    assert {json.loads(pod.curl(url)[1])["backend"] for _ in range(10)} == {"reviews-1"}

    # Deleted -> no endpoints left, requests fail with 503 (no healthy upstream), not blocked.
    kubectl("delete", "pod", "reviews-1")
    wait_for(lambda: _reviews_cluster_hosts(pod) == set(), 5, message="deleted pod still an endpoint")
    assert pod.curl(url)[0] == 503

    # Other ports of the Service IP stay blocked: HTTP gets the 404, raw TCP a close without a byte.
    assert pod.curl(f"http://{svc_ip}:9999/")[0] == 404
    assert pod.in_ns(lambda: _tcp_exchange(svc_ip, 9999)) == b""
    status = cluster["serve"].get_json("/debug/proxy-status")
    assert [s["node_id"] for s in status] == ["client.default"]
    no_nacks(status)
