"""``agent --mesh-identity`` with the netns runtime (network namespaces, real Envoy sidecars as uid 1337,
the real mesh CA and Sign service over TLS, the agent's token from the API server's TokenRequest): a
sidecar gets its own key and certificate before Envoy starts, serves TLS with it, renews it without a
restart or a failed request, keeps it when renewal fails (Event), loses the directory with the sidecar; a
restarted agent adopts and renews; a new root reaches every sidecar's bundle; and with ``--xds-mtls`` the
sidecar authenticates to an ``--xds-auth mtls`` xDS server with its workload certificate."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import ssl
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tests.agent.manifests import SERVICES, WORKLOAD
from tests.agent.rig import NODE, Cluster, require
from tests.identity.mesh import make_ca, pem, secret
from tests.identity.realsigner import CA_SECRET, SERVER_NAME, RealSigner
from trafficmgr import hookimpl
from trafficmgr.core.agent.agent import Agent, AgentConfig
from trafficmgr.core.agent.identity import REASON_RENEWAL_FAILED, IdentityConfig
from trafficmgr.core.agent.netns_runtime import ProcessRuntime
from trafficmgr.core.identity import BUNDLE_CONFIGMAP, files
from trafficmgr.core.plugins import PluginHost
from trafficmgr.testing import netns
from trafficmgr.testing.backends import HttpBackend
from trafficmgr.testing.cluster import http_get
from trafficmgr.testing.envoy import wait_for
from trafficmgr.testing.netns import NetNS

# 10.244.81.0/24: addresses no other test uses (the runtime finds namespaces by pod IP).
APP_IP, REVIEWS_IP, BLOCKED_IP = "10.244.81.2", "10.244.81.11", "10.244.81.12"
TLS_PORT = 15443
CA_NS = "trafficmgr"  # the control plane's namespace: CA Secret, trust bundle ConfigMap, the agent's pod
SPIFFE = "spiffe://cluster.local/ns/default/sa/web"
TTL_S = 20  # workload certificate lifetime in these tests: renewal due 10 s after issue

POD = """
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  labels: {{app: web}}
  ownerReferences: [{{apiVersion: apps/v1, kind: ReplicaSet, name: web-6c9f, uid: u-rs-web, controller: true}}]
spec: {{nodeName: node-1, serviceAccountName: web, containers: [{{name: app, image: app}}]}}
status: {{podIP: {ip}, phase: Running, conditions: [{{type: Ready, status: "True"}}]}}
"""


class TlsProbe:
    """A bootstrap plugin: a static TLS listener on 127.0.0.1 of the pod (loopback is not captured)
    answering 200, its certificate from the sidecar's identity files (file-based SDS, relative to
    Envoy's working directory)."""

    @hookimpl
    def trafficmgr_bootstrap(self, bootstrap: dict[str, Any], role: str, options: Any) -> None:
        hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
               "stat_prefix": "tlsprobe", "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                   "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
               "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
                   {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "tls ok"}}}]}]}}
        tls = {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "common_tls_context": {"tls_certificate_sds_secret_configs": [files.sds_config(files.CERT_SECRET)]}}}
        bootstrap["static_resources"].setdefault("listeners", []).append({
            "name": "tlsprobe", "address": {"socket_address": {"address": "127.0.0.1", "port_value": TLS_PORT}},
            "filter_chains": [{"transport_socket": tls, "filters": [
                {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}]})


@pytest.fixture
def cluster(envoy_binary: str) -> Iterator[Cluster]:
    require(netns.available())
    c = Cluster()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def signer(cluster: Cluster) -> Iterator[RealSigner]:
    # Shorter than the 60 s `serve --workload-cert-ttl` accepts, to see renewals at half-life (10 s) soon;
    # the agent's renewal arithmetic does not depend on the lifetime (its floor, MIN_RENEWAL_S, is 5 s).
    s = RealSigner(cluster.store, cluster.kube_client(), NODE, ttl_s=TTL_S)
    try:
        wait_for(s.published, 10, message=f"ConfigMap {BUNDLE_CONFIGMAP} not published")
        yield s
    finally:
        s.close()


@pytest.fixture
def podnet(cluster: Cluster) -> Iterator[NetNS]:
    ns = NetNS("tmident")
    backends: list[HttpBackend] = []
    try:
        ns.add_pod_network([APP_IP, REVIEWS_IP, BLOCKED_IP])
        backends.append(ns.in_ns(lambda: HttpBackend("reviews-1", REVIEWS_IP, 9080).start()))
        cluster.apply(SERVICES.format(reviews_ip=REVIEWS_IP, blocked_ip=BLOCKED_IP))
        cluster.apply(WORKLOAD.format(app="web"))
        cluster.label("deployments", "web", {"traffic.envoy.enabled": "true"})
        yield ns
    finally:
        for b in backends:
            b.stop()
        ns.delete()


def start_agent(cluster: Cluster, runtime: ProcessRuntime, signer: RealSigner, token: Path,
                xds_address: str | None = None, xds_mtls: bool = False) -> Agent:
    identity = IdentityConfig(ca_address=signer.address, token_file=str(token), ca_server_name=SERVER_NAME,
                              ca_namespace=CA_NS, timeout_s=3, min_backoff_s=0.3, max_backoff_s=1.0)
    cfg = AgentConfig(node_name=NODE, xds_address=xds_address or f"unix:{cluster.xds_socket}", resync_s=2.0,
                      min_backoff_s=0.2, max_backoff_s=1.0, identity=identity, xds_mtls=xds_mtls)
    plugins = PluginHost.load(extra=[("tlsprobe", TlsProbe())])
    agent = Agent(cluster.kube_client(), runtime, cfg, plugins).start()
    cluster.agents.append(agent)
    wait_for(agent.synced, 10, message="agent watches not synced")
    return agent


def tls_get() -> int:
    """In the pod's namespace: the serial of the certificate the sidecar's TLS listener presents, after a
    ``GET /`` on that connection answered 200."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", TLS_PORT), timeout=3) as raw, ctx.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
        tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while not data.endswith(b"tls ok") and (chunk := tls.recv(4096)):  # not until Envoy's delayed close (1 s)
            data += chunk
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"tls ok"), data[:200]
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def served_serial(ns: NetNS) -> int:
    return ns.in_ns(tls_get, timeout=10)


def file_serial(workdir: str) -> int:
    return x509.load_pem_x509_certificates(files.read_chain(workdir) or b"")[0].serial_number


def envoy_stat(ns: NetNS, name: str) -> int:
    text = ns.in_ns(lambda: http_get(f"http://127.0.0.1:15000/stats?filter=^{name}$", 3)[1])
    for line in text.splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    raise AssertionError(f"no stat {name}")


def test_sidecar_identity_renewal_failure_adoption_removal(cluster: Cluster, signer: RealSigner,
                                                           podnet: NetNS, tmp_path: Path) -> None:
    ns = podnet
    token = tmp_path / "token"
    token.write_text(signer.agent_token())
    state_dir = tempfile.mkdtemp(prefix="tm-ident-state-")
    runtime = ProcessRuntime(state_dir)
    agent = start_agent(cluster, runtime, signer, token)
    assert agent.identity is not None
    cluster.apply(POD.format(name="web-6c9f-i1", ip=APP_IP))
    sidecar_id = wait_for(lambda: cluster.annotation("web-6c9f-i1"), 20, message="annotation not set")
    workdir = runtime.workdir(runtime.list()[0])
    assert workdir == os.path.join(state_dir, sidecar_id)

    # identity/: the key readable by the proxy uid only (and root), the cert for the pod's SPIFFE ID.
    top = os.path.join(workdir, files.DIRECTORY)
    st = os.stat(top)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (1337, 0o700)
    key = os.stat(os.path.join(top, files.KEY))
    assert (key.st_uid, stat.S_IMODE(key.st_mode)) == (1337, 0o400)
    leaf = x509.load_pem_x509_certificates(files.read_chain(workdir) or b"")[0]
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier) == [SPIFFE]
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= dt.timedelta(seconds=TTL_S + 61)  # + backdating
    # Envoy runs with its state directory as working directory (the relative SDS paths resolve there).
    pid = json.load(open(os.path.join(workdir, "sidecar.json")))["pid"]
    assert os.readlink(f"/proc/{pid}/cwd") == workdir

    # The sidecar serves TLS with that certificate ...
    first = wait_for(lambda: served_serial(ns), 15, message="the sidecar's TLS listener does not answer")
    assert first == file_serial(workdir)
    uptime = envoy_stat(ns, "server.uptime")

    # ... and after the renewal (at half of TTL_S) presents the new one: same Envoy, no failed request.
    results: list[int | str] = []
    stop = threading.Event()

    def hammer() -> None:  # one thread inside the pod's namespace, a new TLS connection per request
        while not stop.is_set():
            try:
                results.append(tls_get())
            except Exception as exc:  # noqa: BLE001 - counted as a failure
                results.append(f"{type(exc).__name__}: {exc}")
            time.sleep(0.02)

    t = threading.Thread(target=lambda: ns.in_ns(hammer, timeout=120), daemon=True)
    t.start()
    try:
        wait_for(lambda: agent.identity.renewals >= 1 and file_serial(workdir) != first, 40,
                 message="the certificate was not renewed at half-life")
        renewed = file_serial(workdir)
        wait_for(lambda: renewed in results, 10, message="Envoy does not present the renewed certificate")
        time.sleep(1)
    finally:
        stop.set()
        t.join(15)
    failures = [r for r in results if isinstance(r, str)]
    assert not failures, failures[:3]
    assert set(results) <= {first, renewed} and results[-1] == renewed, "no going back to the old certificate"
    assert json.load(open(os.path.join(workdir, "sidecar.json")))["pid"] == pid and os.path.exists(f"/proc/{pid}")
    assert envoy_stat(ns, "server.uptime") > uptime, "Envoy was not restarted"
    print(f"renewal: {len(results)} TLS requests, 0 failed, old serial then new")

    # Renewal failure (the signer is stopped): retried with backoff, a Warning Event on the pod, old cert kept.
    signer.stop()
    failed = agent.identity.failures
    agent.identity.renew_now()
    event = wait_for(lambda: [e for e in cluster.events("web-6c9f-i1") if e["reason"] == REASON_RENEWAL_FAILED], 15,
                     message="no CertificateRenewalFailed Event")[0]
    assert event["type"] == "Warning" and "UNAVAILABLE" in event["message"] and SPIFFE in event["message"]
    assert "expires at" in event["message"]
    wait_for(lambda: agent.identity.failures >= failed + 3, 15, message="renewal is not retried")
    assert file_serial(workdir) == renewed and served_serial(ns) == renewed, "the current certificate is kept"
    signer.start()  # same port
    wait_for(lambda: file_serial(workdir) != renewed, 15, message="no renewal once the signer is back")
    third = file_serial(workdir)
    wait_for(lambda: served_serial(ns) == third, 10)

    # A restarted agent adopts the sidecar and its certificate (expiry read from identity/cert.pem).
    agent.stop()
    token.write_text(signer.agent_token())  # a new token (kubelet rotation): re-read per call
    agent2 = start_agent(cluster, ProcessRuntime(state_dir), signer, token)
    assert agent2.identity is not None
    cluster.settle(agent2)
    [(spiffe_id, expiry, due, _)] = agent2.identity.entries().values()
    leaf = x509.load_pem_x509_certificates(files.read_chain(workdir) or b"")[0]
    assert spiffe_id == SPIFFE and expiry == leaf.not_valid_after_utc.timestamp()
    written = os.stat(os.path.join(top, files.CERT)).st_mtime
    assert abs(due - (written + (expiry - written) / 2)) < 2, "renewal due at half of what was left when issued"
    assert file_serial(workdir) == third, "adopting does not re-issue a valid certificate"
    # The new agent did it (its counter moves just after the files are swapped: wait for both).
    wait_for(lambda: file_serial(workdir) != third and agent2.identity.renewals >= 1, 45,
             message="the adopted sidecar is not renewed at half-life by the new agent")

    # Root rotation step 1 (a new root added to the CA Secret's ca.crt): the control plane publishes the
    # bundle, the agent rewrites every sidecar's bundle.pem.
    new_root = pem(make_ca("next-root")[0])
    old = signer.bundle()
    cluster.store.patch("secrets", CA_SECRET, {"data": {"ca.crt": secret(b"", None, old + new_root)["data"]["ca.crt"]}},
                        CA_NS, patch_type="merge")
    bundle = os.path.join(top, files.BUNDLE)
    wait_for(lambda: open(bundle, "rb").read().count(b"BEGIN CERTIFICATE") == 2, 20, message="bundle.pem not rewritten")
    assert new_root in open(bundle, "rb").read()

    # Removing the sidecar removes its directory, identity included.
    cluster.label("pods", "web-6c9f-i1", {"traffic.envoy.enabled": "false"})
    wait_for(lambda: cluster.annotation("web-6c9f-i1") == "", 15, message="annotation not cleared")
    assert not os.path.exists(workdir) and agent2.identity.entries() == {}
    os.rmdir(state_dir)


def test_sidecar_authenticates_to_mtls_xds_with_its_workload_certificate(
        cluster: Cluster, signer: RealSigner, podnet: NetNS, tmp_path: Path) -> None:
    """``serve --xds-auth mtls`` end to end (the xDS server as serve makes it: TLS with a serving
    certificate of the mesh CA requiring a client certificate chaining to the trust bundle,
    :class:`AccessControl` in mtls mode): the agent's sidecar presents its workload certificate through the
    identity files and gets its config."""
    from trafficmgr.core.access import AccessControl, refused_count
    from trafficmgr.core.identity.ca import ServingCredentials
    from trafficmgr.core.xds.server import XdsServerThread

    creds = ServingCredentials(signer.ca, [SERVER_NAME], ["127.0.0.1"], client_auth=True).credentials()
    access = AccessControl("mtls", cluster.cp.assembler.pods, cluster.cp.assembler.pods_with_ip)
    sock = os.path.join(os.path.dirname(cluster.xds_socket), "mtls.sock")
    xds = XdsServerThread(cluster.cp.cache, f"unix:{sock}", 0, credentials=creds, authorizer=access).start()
    os.chmod(sock, 0o777)
    refused = refused_count()
    try:
        token = tmp_path / "token"
        token.write_text(signer.agent_token())
        state_dir = tempfile.mkdtemp(prefix="tm-ident-state-")
        runtime = ProcessRuntime(state_dir)
        start_agent(cluster, runtime, signer, token, xds_address=f"unix:{sock}", xds_mtls=True)
        cluster.apply(POD.format(name="web-6c9f-m1", ip=APP_IP))
        wait_for(lambda: cluster.annotation("web-6c9f-m1"), 20, message="annotation not set")
        config = json.load(open(os.path.join(runtime.workdir(runtime.list()[0]), "envoy.json")))
        tls = config["static_resources"]["clusters"][0]["transport_socket"]["typed_config"]["common_tls_context"]
        assert tls["tls_certificate_sds_secret_configs"] == [files.sds_config(files.CERT_SECRET)]

        # The sidecar got its config over the mTLS stream: a request through it reaches the labeled service.
        def through_sidecar() -> bool:
            proc = ns_curl(podnet, f"http://{cluster.cluster_ip('reviews')}:9080/r")
            return proc == 200

        wait_for(through_sidecar, 20, message="the sidecar got no config over mTLS xDS")
        [stream] = [s for s in xds.status() if s["node_id"] == "web-6c9f-m1.default"]
        assert stream["identities"] == [SPIFFE], "the sidecar presented its workload certificate"
        assert refused_count() == refused, "the workload certificate was refused"
        runtime_sidecars = runtime.list()
        for s in runtime_sidecars:
            runtime.remove(s)
    finally:
        xds.stop(0.5)


def ns_curl(ns: NetNS, url: str) -> int:
    proc = ns.run("curl", "-sS", "-m", "3", "-o", "/dev/null", "-w", "%{http_code}", url, check=False)
    return int(proc.stdout or 0) if proc.returncode == 0 else 0
