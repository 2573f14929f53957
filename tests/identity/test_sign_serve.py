"""``trafficmgr serve --mesh-identity`` as a process against the local API server: the CA Secret and the
trust-bundle ConfigMap appear, the Sign service answers over TLS, ``--xds-auth mtls`` without certificate
files serves xDS with a mesh-CA certificate to real Envoys holding signed workload certificates, and a
root rotation (Secret edits only) is followed without restart. Bad option values are one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from kubernetes import client as k8s

from tests.identity.mesh import NS, Api, csr, key_pem, make_ca, pem, secret, uri_sans, verify_chain
from trafficmgr.apiserver import ApiError
from trafficmgr.core.bootstrap import XdsTls, bootstrap
from trafficmgr.core.identity import BUNDLE_CONFIGMAP, METHOD
from trafficmgr.core.identity.ca import DEFAULT_SECRET
from trafficmgr.core.identity.spiffe import spiffe_id
from trafficmgr.testing.cluster import http_get
from trafficmgr.testing.envoy import EnvoyProcess, free_port, wait_for

REVIEWS = spiffe_id("cluster.local", "default", "reviews")


@pytest.mark.parametrize("argv, message", [
    (["--workload-cert-ttl", "1h"], "--workload-cert-ttl needs --mesh-identity"),
    (["--mesh-identity", "--workload-cert-ttl", "5s"], "--workload-cert-ttl: 5s is outside 60s..365d"),
    (["--mesh-identity", "--workload-cert-ttl", "soon"], "--workload-cert-ttl: 'soon' is not a duration"),
    (["--mesh-identity", "--identity-agent-service-account", "agent"], "use NAMESPACE/NAME"),
    (["--mesh-identity", "--identity-address", "localhost"], "--identity-address: 'localhost' does not appear to be"),
    (["--mesh-identity", "--identity-dns-names", "a_b.svc"], "--identity-dns-names: 'a_b.svc' is not a DNS name"),
    (["--mesh-identity", "--mesh-ca-secret", "Bad/Name"], "--mesh-ca-secret: 'Bad/Name' is not a valid Secret name"),
    (["--mesh-identity", "--mesh-ca-mode", "make"], "argument --mesh-ca-mode: invalid choice: 'make'"),
    (["--mesh-identity", "--identity-port", "70000"], "70000 is not a port number"),
])
def test_bad_option_values_are_one_line_errors(argv: list[str], message: str) -> None:
    out = subprocess.run([sys.executable, "-m", "trafficmgr", "serve", "--plugins", "lb", *argv],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert len([line for line in out.stderr.splitlines() if "error" in line]) == 1, out.stderr


def _pod(name: str, ip: str, sa: str, node: str, ns: str = "default") -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns},
            "spec": {"serviceAccountName": sa, "nodeName": node, "containers": [{"name": "c", "image": "x"}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}


def _live(e: EnvoyProcess) -> bool:
    """Envoy got its configuration over the TLS xDS connection (not merely LIVE: it also becomes LIVE
    after its initial fetch timeouts when xDS fails)."""
    try:
        stats = dict(line.split(": ", 1) for line in e.admin("/stats?filter=^(control_plane.connected_state|"
                                                             "cluster_manager.cds.update_success)$").splitlines())
        return stats.get("control_plane.connected_state") == "1" and int(stats.get("cluster_manager.cds.update_success", 0)) > 0
    except Exception:  # noqa: BLE001 - not answering yet
        return False


def _metric(admin: str, name: str) -> float:
    code, body = http_get(admin + "/metrics")
    assert code == 200
    for line in body.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.split()[-1])
    return 0.0


def test_serve_mesh_identity_signs_and_serves_xds_mtls_through_a_root_rotation(tmp_path: Path, envoy_binary: str) -> None:
    api = Api(tmp_path)
    store = api.store
    for ns, sa in ((NS, "trafficmgr-agent"), ("default", "reviews")):
        store.create({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, "namespace": ns}})
    store.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}})
    store.create(_pod("agent-a", "10.0.0.1", "trafficmgr-agent", "node-a", ns=NS))
    store.create(_pod("reviews-1", "10.0.0.5", "reviews", "node-a"))
    xds_port, admin_port, identity_port = free_port(), free_port(), free_port()
    log_path = tmp_path / "serve.log"
    log = log_path.open("wb")
    serve = subprocess.Popen(
        [sys.executable, "-m", "trafficmgr", "serve", "--log-level", "debug", "--kubeconfig", str(api.kubeconfig), "--plugins", "lb",
         "--xds-address", "127.0.0.1", "--xds-port", str(xds_port), "--admin-port", str(admin_port),
         "--xds-auth", "mtls", "--mesh-identity", "--mesh-ca-namespace", NS, "--workload-cert-ttl", "1h",
         "--identity-address", "127.0.0.1", "--identity-port", str(identity_port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    admin = f"http://127.0.0.1:{admin_port}"
    envoys: list[EnvoyProcess] = []
    core = k8s.CoreV1Api(api.kube.api)

    def running() -> None:
        if serve.poll() is not None:
            raise AssertionError(f"serve exited {serve.returncode}:\n{log_path.read_text()[-3000:]}")

    def until(predicate: Callable[[], object], message: str, timeout: float = 30) -> None:
        def check() -> bool:
            running()
            return bool(predicate())
        wait_for(check, timeout, message=message)

    def bundle() -> str | None:
        try:
            return store.get("configmaps", BUNDLE_CONFIGMAP, NS)["data"]["ca.crt"]
        except ApiError:
            return None

    def sign() -> tuple[str, str]:
        """(chain, key PEM) for reviews-1 from the Sign RPC with the agent's pod-bound token."""
        ref = k8s.V1BoundObjectReference(kind="Pod", api_version="v1", name="agent-a",
                                         uid=store.get("pods", "agent-a", NS)["metadata"]["uid"])
        token = core.create_namespaced_service_account_token("trafficmgr-agent", NS, k8s.AuthenticationV1TokenRequest(
            spec=k8s.V1TokenRequestSpec(audiences=["trafficmgr"], bound_object_ref=ref))).status.token
        text, key = csr([REVIEWS])
        request = {"csr": text, "pod": {"namespace": "default", "name": "reviews-1",
                                        "uid": store.get("pods", "reviews-1", "default")["metadata"]["uid"]}}
        creds = grpc.ssl_channel_credentials((bundle() or "").encode())
        with grpc.secure_channel(f"127.0.0.1:{identity_port}", creds, options=[("grpc.enable_http_proxy", 0)]) as ch:
            answer = json.loads(ch.unary_unary(METHOD)(json.dumps(request).encode(),
                                                            metadata=[("authorization", f"Bearer {token}")], timeout=10))
        assert uri_sans(verify_chain(answer["certificate_chain"], answer["trust_bundle"])) == [REVIEWS]
        return answer["certificate_chain"], key_pem(key).decode()

    def envoy(name: str, chain: str, key: str, trusted: str) -> EnvoyProcess:
        """A sidecar for reviews-1 whose xDS TLS uses ``chain``/``key`` and trusts only ``trusted``."""
        d = tmp_path / name
        d.mkdir()
        (d / "cert.pem").write_text(chain)
        (d / "key.pem").write_text(key)
        (d / "ca.pem").write_text(trusted)
        cfg = bootstrap("reviews-1.default", "sidecar", "127.0.0.1", xds_port, free_port(),
                        xds_tls=XdsTls(cert=str(d / "cert.pem"), key=str(d / "key.pem"), ca=str(d / "ca.pem")))
        e = EnvoyProcess(cfg, d / "run", wait="admin").start()
        envoys.append(e)
        return e

    try:
        until(lambda: http_get(admin + "/readyz", 1)[0] == 200, "serve not ready")
        until(bundle, "trust bundle ConfigMap not published")
        generated = store.get("secrets", DEFAULT_SECRET, NS)
        assert generated["type"] == "kubernetes.io/tls"
        old_root = bundle() or ""
        chain, key = sign()
        first = envoy("old", chain, key, old_root)
        until(lambda: _live(first), "a sidecar with a signed certificate must be served over mesh-CA mTLS")
        assert _metric(admin, "trafficmgr_certificates_signed_total") == 1.0
        assert _metric(admin, "trafficmgr_ca_expiry_timestamp_seconds") > time.time() + 9 * 365 * 86400

        # Rotation: (1) add the new root to ca.crt, (2) switch the signing CA; no restart.
        new_cert, new_key = make_ca("new-root", days=3650)
        data = generated["data"]
        store.patch("secrets", DEFAULT_SECRET, {"data": {"ca.crt": secret(pem(new_cert), None, old_root.encode() + pem(new_cert))["data"]["ca.crt"]}},
                    NS, patch_type="merge")
        until(lambda: (bundle() or "").count("BEGIN CERTIFICATE") == 2, "the new root must reach the ConfigMap")
        store.patch("secrets", DEFAULT_SECRET, {"data": {**secret(pem(new_cert), key_pem(new_key))["data"],
                                                         "ca.crt": secret(b"", None, old_root.encode() + pem(new_cert))["data"]["ca.crt"]}},
                    NS, patch_type="merge")
        assert data["tls.crt"] != store.get("secrets", DEFAULT_SECRET, NS)["data"]["tls.crt"]

        def signed_by_new_root() -> bool:
            try:
                verify_chain(sign()[0], pem(new_cert))
                return True
            except Exception:  # noqa: BLE001 - the old CA still signs until serve sees the change
                return False
        until(signed_by_new_root, "certificates must chain to the new root after tls.crt changed")
        chain2, key2 = sign()
        # An Envoy trusting only the new root: the xDS server's certificate was remade from the new CA,
        # and the new client certificate is accepted (the trust bundle is the xDS client CA).
        second = envoy("new", chain2, key2, pem(new_cert).decode())
        until(lambda: _live(second), "xDS must serve a certificate from the new CA and accept the new client cert")
        # The old certificate is still trusted (the bundle holds both roots) on a new connection.
        third = envoy("old-again", chain, key, old_root + pem(new_cert).decode())
        until(lambda: _live(third), "a certificate of the old root must still be accepted during the overlap")
        assert _live(first)
        running()
        text = log_path.read_text()
        assert "PRIVATE KEY" not in text and "CERTIFICATE REQUEST" not in text
        assert "mesh CA reloaded" in text
    finally:
        for e in envoys:
            e.stop()
        serve.terminate()
        serve.wait(15)
        log.close()
        api.stop()


def test_serve_provided_mode_waits_for_the_secret_and_refuses_a_bad_one(tmp_path: Path) -> None:
    """``--mesh-ca-mode provided``: no Secret is created; serve says it waits, and starts the Sign service
    once the Secret appears (the trust bundle is published then). A bad Secret at start is a one-line error
    naming the Secret and the key, exit 1."""
    api = Api(tmp_path)
    identity_port, admin_port = free_port(), free_port()
    base = [sys.executable, "-m", "trafficmgr", "serve", "--log-level", "info", "--kubeconfig", str(api.kubeconfig),
            "--plugins", "lb", "--xds-address", "127.0.0.1", "--xds-port", "0", "--admin-port", str(admin_port),
            "--mesh-identity", "--mesh-ca-mode", "provided", "--mesh-ca-namespace", NS, "--mesh-ca-secret", "my-ca",
            "--identity-address", "127.0.0.1", "--identity-port", str(identity_port)]
    log_path = tmp_path / "serve.log"
    log = log_path.open("wb")
    serve = subprocess.Popen(base, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: "waiting for Secret trafficmgr/my-ca" in log_path.read_text(), 30,
                 message="serve must say it waits for the Secret")
        with pytest.raises(ApiError):
            api.store.get("secrets", "my-ca", NS)
        root = make_ca("provided-root")
        api.store.create(secret(pem(root[0]), key_pem(root[1]), secret_name="my-ca"))

        def served() -> bool:
            assert serve.poll() is None, log_path.read_text()
            try:
                return api.store.get("configmaps", BUNDLE_CONFIGMAP, NS)["data"]["ca.crt"] == pem(root[0]).decode() \
                    and "Sign service on 127.0.0.1" in log_path.read_text()
            except ApiError:
                return False
        wait_for(served, 30, message="the Sign service must start and the bundle be published once the Secret exists")
    finally:
        serve.terminate()
        serve.wait(15)
        log.close()
    other = make_ca("other")
    api.store.update(secret(pem(root[0]), key_pem(other[1]), secret_name="my-ca"))
    try:
        out = subprocess.run(base, capture_output=True, text=True, timeout=60)
    finally:
        api.stop()
    assert out.returncode == 1
    assert "mesh CA: Secret trafficmgr/my-ca: key tls.key does not match the first certificate of tls.crt" in out.stderr
    assert "Traceback" not in out.stderr and "PRIVATE KEY" not in out.stderr
