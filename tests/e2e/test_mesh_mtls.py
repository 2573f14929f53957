"""Issue 18 end to end: mesh identity and mutual TLS with every real part joined.

The local API server, the control plane (plugin ``mtls`` on), the mesh CA and its signing service, and a
real node agent (``netns`` runtime, ``--mesh-identity``) that gives two pods sidecars: it makes their keys,
gets their certificates signed with its own pod-bound token, and installs the iptables capture. A third
pod has no sidecar. The pods live in network namespaces joined by veth pairs (nothing is routed out).

What a user would observe: the bytes between the two meshed pods are TLS (read on the veth: the request's
canary never appears, the client's SNI does), the server application sees the caller's SPIFFE ID, Envoy
counts the handshakes; a pod without a sidecar can call a ``permissive`` service but not a ``strict`` one;
a meshed pod calls a pod without a sidecar in plaintext; authorization by ServiceAccount answers 200 / 403;
a CA root rotation with overlap loses no request; no private key appears in any API object, Event or log.
"""

from __future__ import annotations

import base64
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.agent.rig import NODE, Cluster, require
from tests.identity.mesh import key_pem, make_ca, pem
from tests.identity.realsigner import CA_SECRET, NS, SERVER_NAME, RealSigner
from trafficmgr.core.agent.agent import Agent, AgentConfig
from trafficmgr.core.agent.identity import IdentityConfig
from trafficmgr.core.agent.netns_runtime import ProcessRuntime
from trafficmgr.core.envoy import find_envoy
from trafficmgr.core.identity import files
from trafficmgr.core.model import GATEWAY_CLUSTER
from trafficmgr.core.plugins import PluginHost
from trafficmgr.plugins import mtls
from trafficmgr.testing import netns
from trafficmgr.testing.backends import HttpBackend
from trafficmgr.testing.cluster import http_get
from trafficmgr.testing.envoy import wait_for
from trafficmgr.testing.netns import NetNS, world_executable

# 10.244.83.0/24: addresses no other test uses (the netns runtime finds namespaces by pod IP).
CLIENT_IP, SERVER_IP, OUTSIDER_IP = "10.244.83.2", "10.244.83.11", "10.244.83.50"
TD = "cluster.local"
CLIENT_ID = f"spiffe://{TD}/ns/default/sa/productpage"
SNI = "outbound_.9080_._.reviews.default.svc.cluster.local"

OBJECTS = f"""
apiVersion: v1
kind: Pod
metadata: {{name: productpage-1, labels: {{app: productpage, traffic.envoy.enabled: "true"}}}}
spec: {{nodeName: {NODE}, serviceAccountName: productpage, containers: [{{name: app, image: app}}]}}
status: {{podIP: {CLIENT_IP}, phase: Running, conditions: [{{type: Ready, status: "True"}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: reviews-1, labels: {{app: reviews, traffic.envoy.enabled: "true"}}}}
spec: {{nodeName: {NODE}, serviceAccountName: reviews, containers: [{{name: app, image: app}}]}}
status: {{podIP: {SERVER_IP}, phase: Running, conditions: [{{type: Ready, status: "True"}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: outsider-1, labels: {{app: outsider}}}}
spec: {{nodeName: {NODE}, serviceAccountName: outsider, containers: [{{name: app, image: app}}]}}
status: {{podIP: {OUTSIDER_IP}, phase: Running, conditions: [{{type: Ready, status: "True"}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: reviews, labels: {{traffic.port.9080: http}}}}
spec:
  selector: {{app: reviews}}
  ports: [{{name: http, port: 9080, targetPort: 9080}}]
---
apiVersion: v1
kind: Service
metadata: {{name: outsider, labels: {{traffic.port.8080: http}}}}
spec:
  selector: {{app: outsider}}
  ports: [{{name: http, port: 8080, targetPort: 8080}}]
"""


class Mesh:
    def __init__(self, cluster: Cluster, signer: RealSigner, runtime: ProcessRuntime, agent: Agent,
                 client: NetNS, server: NetNS, outsider: NetNS, reviews: HttpBackend, outside_app: HttpBackend) -> None:
        self.cluster, self.signer, self.runtime, self.agent = cluster, signer, runtime, agent
        self.client, self.server, self.outsider = client, server, outsider
        self.reviews, self.outside_app = reviews, outside_app
        self.log_lines: list[str] = []

    def get(self, service: str = "reviews", port: int = 9080, path: str = "/hello",
            headers: dict[str, str] | None = None, ns: NetNS | None = None) -> int:
        """A GET from an application of the client pod (captured: through its sidecar) to the service."""
        ip = self.cluster.cluster_ip(service)
        return int((ns or self.client).in_ns(lambda: http_get(f"http://{ip}:{port}{path}", 5, headers)[0], timeout=15))

    def outsider_get(self, path: str = "/hello") -> int | str:
        """A plaintext GET from the pod without a sidecar straight to the reviews pod: status or error name."""
        def go() -> int | str:
            try:
                return http_get(f"http://{SERVER_IP}:9080{path}", 5)[0]
            except OSError as exc:
                return type(exc).__name__
        return self.outsider.in_ns(go, timeout=15)

    def stat(self, ns: NetNS, name: str) -> int:
        text = ns.in_ns(lambda: http_get(f"http://127.0.0.1:15000/stats?filter=^{name.replace('|', '.')}$", 3)[1])
        found = [int(v) for k, _, v in (ln.partition(": ") for ln in text.splitlines()) if k == name]
        assert found, f"no stat {name}"
        return found[0]

    def workdir(self, pod: str) -> str:
        (sidecar,) = [s for s in self.runtime.list() if s.pod == pod]
        return str(self.runtime.workdir(sidecar))

    def leaf(self, pod: str) -> x509.Certificate:
        return x509.load_pem_x509_certificates(files.read_chain(self.workdir(pod)) or b"")[0]


def veth_towards(ns: NetNS, peer_ip: str) -> str:
    """The interface of ``ns`` its route to ``peer_ip`` uses (a veth end)."""
    words = ns.run("ip", "-o", "route", "get", peer_ip).stdout.split()
    return words[words.index("dev") + 1]


class _Lines(logging.Handler):
    """Keeps every formatted log record (with arguments and tracebacks) of this process."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


class Sniffer:
    """Every frame on one interface of a namespace (AF_PACKET, made inside it) until :meth:`stop`."""

    def __init__(self, ns: NetNS, ifname: str) -> None:
        self.data = bytearray()
        self._stop = threading.Event()
        ready = threading.Event()

        def capture() -> None:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
            s.bind((ifname, 0))
            s.settimeout(0.1)
            ready.set()
            with s:
                while not self._stop.is_set():
                    try:
                        self.data += s.recv(65535)
                    except TimeoutError:
                        pass

        self._thread = threading.Thread(target=lambda: ns.in_ns(capture, timeout=120), daemon=True)
        self._thread.start()
        assert ready.wait(10), "sniffer did not start"

    def stop(self) -> bytes:
        time.sleep(0.3)  # frames of the last answer
        self._stop.set()
        self._thread.join(10)
        return bytes(self.data)


@pytest.fixture(scope="module")
def mesh(envoy_binary: str) -> Iterator[Mesh]:
    require(netns.available())
    cluster = Cluster(options={"mtls": True, "trust_domain": TD})
    made: list[NetNS] = []
    backends: list[HttpBackend] = []
    signer: RealSigner | None = None
    state_dir = tempfile.mkdtemp(prefix="tm-mesh-state-")
    captured = _Lines()
    root = logging.getLogger()
    level = root.level
    root.addHandler(captured)
    root.setLevel(logging.DEBUG)
    try:
        signer = RealSigner(cluster.store, cluster.kube_client(), NODE, ttl_s=3600)
        wait_for(signer.published, 10, message="trust bundle not published")
        client, server, outsider = NetNS("tmmc"), NetNS("tmms"), NetNS("tmmo")
        made += [client, server, outsider]
        client.add_pod_network([CLIENT_IP])
        server.add_pod_network([SERVER_IP])
        outsider.add_pod_network([OUTSIDER_IP])
        client.link(server, [CLIENT_IP], [SERVER_IP])
        outsider.link(server, [OUTSIDER_IP], [SERVER_IP])
        client.link(outsider, [CLIENT_IP], [OUTSIDER_IP])
        reviews = server.in_ns(lambda: HttpBackend("reviews", SERVER_IP, 9080).start())
        outside_app = outsider.in_ns(lambda: HttpBackend("outsider", OUTSIDER_IP, 8080).start())
        backends += [reviews, outside_app]
        token = Path(state_dir) / "agent-token"
        token.write_text(signer.agent_token())
        runtime = ProcessRuntime(state_dir)
        identity = IdentityConfig(ca_address=signer.address, token_file=str(token), ca_server_name=SERVER_NAME,
                                  ca_namespace=NS, timeout_s=3, min_backoff_s=0.3, max_backoff_s=1.0)
        cfg = AgentConfig(node_name=NODE, xds_address=f"unix:{cluster.xds_socket}", resync_s=2.0,
                          min_backoff_s=0.2, max_backoff_s=1.0, identity=identity)
        agent = Agent(cluster.kube_client(), runtime, cfg, PluginHost.load()).start()
        cluster.agents.append(agent)
        wait_for(agent.synced, 10, message="agent watches not synced")
        cluster.apply(OBJECTS)
        for pod in ("productpage-1", "reviews-1"):
            wait_for(lambda pod=pod: cluster.annotation(pod), 30, message=f"no sidecar for {pod}")
        m = Mesh(cluster, signer, runtime, agent, client, server, outsider, reviews, outside_app)
        m.log_lines = captured.lines
        # The agent's annotation marks the endpoint meshed; the server's inbound side has its TLS chains.
        wait_for(lambda: mtls.METADATA_KEY in client.in_ns(
            lambda: http_get("http://127.0.0.1:15000/config_dump?include_eds", 3)[1]), 20,
            message="the client sidecar has no endpoint marked for mTLS")
        wait_for(lambda: "inbound|mtls|http|9080" in server.in_ns(
            lambda: http_get("http://127.0.0.1:15000/config_dump?resource=dynamic_listeners", 3)[1]), 20,
            message="the server sidecar has no TLS chain for 9080")
        wait_for(lambda: m.get() == 200, 20, message="no answer through the two sidecars")
        yield m
    finally:
        root.removeHandler(captured)
        root.setLevel(level)
        for b in backends:
            b.stop()
        if signer is not None:
            signer.close()
        cluster.close()
        for ns in made:
            ns.delete()
        subprocess.run(["rm", "-rf", state_dir], check=False)


@pytest.fixture
def fresh(mesh: Mesh) -> Iterator[Mesh]:
    """Each test leaves the reviews Service's labels as the fixture made them."""
    yield mesh
    raw = mesh.cluster.store.get("services", "reviews", "default")["metadata"].get("labels") or {}
    drop: dict[str, str | None] = {k: None for k in raw if k.startswith(("traffic.allow.", "traffic.mtls"))}
    if drop:
        mesh.cluster.label("services", "reviews", drop)
        wait_for(lambda: mesh.outsider_get() == 200, 30, message="the reviews policy did not go away")
        # The client sidecar's kept connection to the server sidecar is on the old filter chains until
        # Envoy drains them (gradually, over its drain time): wait until the meshed client is served again.
        wait_for(lambda: all(mesh.get() == 200 for _ in range(20)), 120, message="the old policy kept answering")


def test_certificates_come_from_the_agent_and_name_each_pods_serviceaccount(mesh: Mesh) -> None:
    for pod, sa in (("productpage-1", "productpage"), ("reviews-1", "reviews")):
        leaf = mesh.leaf(pod)
        uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier)
        assert uris == [f"spiffe://{TD}/ns/default/sa/{sa}"]
        assert os.stat(os.path.join(mesh.workdir(pod), files.DIRECTORY, files.KEY)).st_mode & 0o077 == 0


def test_meshed_pods_talk_tls_on_the_wire_and_the_server_sees_the_callers_identity(mesh: Mesh) -> None:
    canary = f"canary-{uuid.uuid4().hex}"
    client_hs = mesh.stat(mesh.client, "cluster.9080|default|reviews.outbound.ssl.handshake")
    server_hs = mesh.stat(mesh.server, "listener.inbound.ssl.handshake")
    sniffer = Sniffer(mesh.server, veth_towards(mesh.server, CLIENT_IP))
    try:
        # New connections each time (a kept one would not show a handshake): Connection: close.
        statuses = [mesh.get(path=f"/{canary}", headers={"x-canary": canary, "connection": "close"}) for _ in range(3)]
    finally:
        wire = sniffer.stop()
    assert statuses == [200] * 3
    assert canary.encode() not in wire, "the request crossed the wire in plaintext"
    assert b"\x16\x03" in wire and SNI.encode() in wire, "no TLS ClientHello with the service's SNI on the wire"
    seen = [r for r in mesh.reviews.requests if canary in r["path"]]
    assert len(seen) == 3 and all(r["headers"]["x-forwarded-client-cert"].endswith(f";URI={CLIENT_ID}") for r in seen), seen
    assert mesh.stat(mesh.client, "cluster.9080|default|reviews.outbound.ssl.handshake") > client_hs
    assert mesh.stat(mesh.server, "listener.inbound.ssl.handshake") > server_hs
    # The sniffer sees plaintext when there is plaintext: the pod without a sidecar, on its own veth.
    sniffer = Sniffer(mesh.server, veth_towards(mesh.server, OUTSIDER_IP))
    try:
        assert mesh.outsider_get(f"/{canary}-plain") == 200
    finally:
        wire = sniffer.stop()
    assert f"{canary}-plain".encode() in wire


def test_a_pod_without_sidecar_may_call_permissive_not_strict(fresh: Mesh) -> None:
    m = fresh
    assert m.outsider_get() == 200
    m.cluster.label("services", "reviews", {mtls.MODE: mtls.STRICT})
    wait_for(lambda: m.outsider_get() != 200, 30, message="strict did not refuse plaintext")
    assert m.outsider_get() in ("ConnectionResetError", "RemoteDisconnected", "BadStatusLine", "ConnectionAbortedError")
    assert m.get() == 200, "the meshed client is refused under strict"


def test_a_meshed_pod_calls_a_pod_without_sidecar_in_plaintext(mesh: Mesh) -> None:
    before = mesh.stat(mesh.client, "cluster.8080|default|outsider.outbound.ssl.handshake")
    canary = f"canary-{uuid.uuid4().hex}"
    sniffer = Sniffer(mesh.outsider, veth_towards(mesh.outsider, CLIENT_IP))
    try:
        assert mesh.get("outsider", 8080, f"/{canary}") == 200
    finally:
        wire = sniffer.stop()
    assert canary.encode() in wire
    assert "x-forwarded-client-cert" not in mesh.outside_app.requests[-1]["headers"]
    assert mesh.stat(mesh.client, "cluster.8080|default|outsider.outbound.ssl.handshake") == before


def test_authorization_by_serviceaccount(fresh: Mesh) -> None:
    m = fresh
    m.cluster.label("services", "reviews", {"traffic.allow.sa.default.productpage": "true"})
    wait_for(lambda: m.outsider_get() == 403, 30, message="the rule did not apply (plaintext is not allowed)")
    assert m.get() == 200
    # Only another ServiceAccount allowed: productpage is refused with 403 (once the kept connection drained).
    m.cluster.label("services", "reviews", {"traffic.allow.sa.default.productpage": None,
                                            "traffic.allow.sa.default.ratings": "true"})
    wait_for(lambda: all(m.get() == 403 for _ in range(20)), 120, message="productpage was not refused")
    assert m.stat(m.server, "http.inbound_http.rbac.rbac_default_reviews.denied") >= 1
    # Another namespace allowed instead: still refused; this namespace allowed: 200.
    m.cluster.label("services", "reviews", {"traffic.allow.sa.default.ratings": None, "traffic.allow.namespace.shop": "true"})
    wait_for(lambda: all(m.get() == 403 for _ in range(20)), 120, message="another namespace's rule let productpage in")
    m.cluster.label("services", "reviews", {"traffic.allow.namespace.default": "true"})
    wait_for(lambda: all(m.get() == 200 for _ in range(20)), 120, message="the namespace rule did not allow")


def test_a_malformed_rule_is_an_event_and_denies_only_that_service(fresh: Mesh) -> None:
    m = fresh
    m.cluster.label("services", "reviews", {"traffic.allow.sa.default.productpage": "yes"})
    wait_for(lambda: [e for e in m.cluster.events("reviews") if e.get("reason") == "InvalidTrafficLabel"
                      and "traffic.allow.sa.default.productpage" in e.get("message", "")], 20, message="no Event")
    wait_for(lambda: all(m.get() == 403 for _ in range(20)), 120, message="the service did not fail closed")
    assert m.get("outsider", 8080) == 200, "another service was affected"


def key_needles(key_pem: bytes) -> list[str]:
    """Forms a workload key could take in text: its PEM body, the base64 of its PEM (a Secret's data), its
    private scalar in hex and decimal. (Not the body's first characters: every PKCS#8 P-256 key starts
    with the same ASN.1 header.)"""
    key = serialization.load_pem_private_key(key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    scalar = key.private_numbers().private_value
    body = "".join(key_pem.decode().splitlines()[1:-1])
    return [body, base64.b64encode(key_pem).decode(), f"{scalar:x}", str(scalar)]


def test_no_private_key_in_any_api_object_event_or_log(mesh: Mesh) -> None:
    keys = []
    for pod in ("productpage-1", "reviews-1"):
        with open(os.path.join(mesh.workdir(pod), files.DIRECTORY, files.KEY), "rb") as f:
            keys.append(f.read())
    store = mesh.cluster.store
    places = {
        "API objects": repr([store.list(plural) for plural in ("pods", "services", "events", "configmaps", "secrets")]),
        # Every log record of the control plane, signing service and agent since the fixture started.
        "logs": "\n".join(mesh.log_lines),
        # The sidecars' own logs.
        "Envoy logs": "".join(Path(p).read_text(errors="replace") for p in Path(mesh.runtime.state_dir).glob("*/envoy.log")),
    }
    assert places["logs"] and places["Envoy logs"], "nothing was captured: the check would prove nothing"
    for where, text in places.items():
        for needle in (n for k in keys for n in key_needles(k)):
            assert needle not in text, f"a workload private key is in the {where}"
    assert "PRIVATE KEY" not in places["logs"] + places["Envoy logs"]


def test_root_rotation_with_overlap_loses_no_request(mesh: Mesh) -> None:
    """The documented three steps, under continuous traffic between the two sidecars."""
    m = mesh
    store = m.cluster.store
    old = store.get("secrets", CA_SECRET, NS)["data"]
    old_root = base64.b64decode(old.get("ca.crt") or old["tls.crt"])
    new_cert, new_key = make_ca("mesh root 2")
    results: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            try:
                results.append(m.get(headers={"connection": "close"}))
            except Exception:  # noqa: BLE001 - counted as a failure
                results.append(0)

    worker = threading.Thread(target=traffic, daemon=True)
    worker.start()
    try:
        # 1. Both roots trusted; the old CA still signs. Wait until both sidecars' bundles hold the new root.
        store.patch("secrets", CA_SECRET, {"data": {"ca.crt": base64.b64encode(old_root + pem(new_cert)).decode()}}, NS,
                    patch_type="merge")
        for pod in ("productpage-1", "reviews-1"):
            wait_for(lambda pod=pod: pem(new_cert) in _bundle(m, pod), 30, message=f"{pod} did not get the new root")
        # 2. The new CA signs; renewed certificates chain to it.
        store.patch("secrets", CA_SECRET, {"data": {"tls.crt": base64.b64encode(pem(new_cert)).decode(),
                                                    "tls.key": base64.b64encode(key_pem(new_key)).decode()}}, NS,
                    patch_type="merge")
        # Certificates are renewed at half-life (30 min here): renew now, as time would; again until the
        # control plane's CA has seen the Secret change (a renewal before that is still the old CA's).
        identity = m.agent.identity
        assert identity is not None
        asked = [0.0]

        def renewed_by_new_ca(pod: str) -> bool:
            if m.leaf(pod).issuer == new_cert.subject:
                return True
            if time.monotonic() - asked[0] > 2:
                asked[0] = time.monotonic()
                identity.renew_now()
            return False

        for pod in ("productpage-1", "reviews-1"):
            wait_for(lambda pod=pod: renewed_by_new_ca(pod), 60, message=f"{pod} was not renewed by the new CA")
        time.sleep(2)
    finally:
        stop.set()
        worker.join(30)
    assert results and set(results) == {200}, f"{results.count(200)} of {len(results)} requests answered 200"
    logging.getLogger(__name__).info("root rotation: %d requests, all 200", len(results))


GATEWAY_ID = f"spiffe://{TD}/ns/default/sa/traffic-ingress"
GATEWAY_OBJECTS = f"""
apiVersion: v1
kind: ServiceAccount
metadata: {{name: traffic-ingress}}
---
apiVersion: v1
kind: Pod
metadata: {{name: traffic-ingress-1, labels: {{app: traffic-ingress}}}}
spec: {{nodeName: {NODE}, serviceAccountName: traffic-ingress, containers: [{{name: envoy, image: envoy}}]}}
status: {{podIP: 10.244.83.60, phase: Running, conditions: [{{type: Ready, status: "True"}}]}}
---
apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata: {{name: traffic}}
spec: {{controller: trafficmgr.io/ingress-controller}}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{name: reviews}}
spec:
  ingressClassName: traffic
  rules:
  - http:
      paths:
      - {{path: /gw, pathType: Prefix, backend: {{service: {{name: reviews, port: {{number: 9080}}}}}}}}
"""


def test_the_gateway_originates_mtls_with_its_own_certificate(mesh: Mesh, tmp_path: Path) -> None:
    """The gateway fetches its own certificate (``trafficmgr identity --once``, a token bound to its pod)
    and calls the meshed backend over mutual TLS: the backend sees the gateway's SPIFFE ID."""
    m = mesh
    m.cluster.apply(GATEWAY_OBJECTS)
    gw_dir = tmp_path / "gateway"
    gw_dir.mkdir()
    os.chmod(tmp_path, 0o755)
    token, bundle = tmp_path / "token", tmp_path / "bundle.pem"
    token.write_text(m.signer.token("default", "traffic-ingress", "traffic-ingress-1"))
    bundle.write_bytes(m.signer.bundle())
    uid = m.cluster.store.get("pods", "traffic-ingress-1", "default")["metadata"]["uid"]
    run = [sys.executable, "-m", "trafficmgr"]
    got = subprocess.run([*run, "identity", "--once", "--dir", str(gw_dir), "--token-file", str(token),
                          "--ca-address", m.signer.address, "--ca-server-name", SERVER_NAME, "--bundle-file", str(bundle),
                          "--pod", "default/traffic-ingress-1", "--pod-uid", uid, "--service-account", "traffic-ingress"],
                         capture_output=True, text=True, timeout=60)
    assert got.returncode == 0, got.stderr
    assert GATEWAY_ID in got.stdout + got.stderr
    boot = subprocess.run([*run, "bootstrap", "--node-id", "traffic-ingress-1", "--node-cluster", GATEWAY_CLUSTER,
                           "--xds-address", f"unix:{m.cluster.xds_socket}", "-o", str(gw_dir / "envoy.json")],
                          capture_output=True, text=True, timeout=60)
    assert boot.returncode == 0, boot.stderr
    log = open(tmp_path / "envoy.log", "ab")
    gateway = subprocess.Popen(m.outsider.exec_args(world_executable(find_envoy()), "-c", str(gw_dir / "envoy.json"),
                                                    "--disable-hot-restart", "--concurrency", "1", "-l", "info"),
                               cwd=gw_dir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    try:
        def through_gateway() -> int:
            try:
                return int(m.outsider.in_ns(lambda: http_get("http://127.0.0.1:10000/gw/hi", 5)[0], timeout=10))
            except OSError:
                return 0

        wait_for(lambda: through_gateway() == 200, 30,
                 message=f"no answer through the gateway: {(tmp_path / 'envoy.log').read_text()[-3000:]}")
        seen = [r for r in m.reviews.requests if r["path"] == "/gw/hi"]
        assert seen and seen[-1]["headers"]["x-forwarded-client-cert"].endswith(f";URI={GATEWAY_ID}"), seen[-1:]
    finally:
        gateway.kill()
        gateway.wait(10)


def _bundle(m: Mesh, pod: str) -> bytes:
    with open(os.path.join(m.workdir(pod), files.DIRECTORY, files.BUNDLE), "rb") as f:
        return f.read()
