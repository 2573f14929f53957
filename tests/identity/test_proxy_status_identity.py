"""``trafficmgr proxy-status`` identity columns (issue 18) and ``config-dump`` without private keys.

Real Envoys connect to an in-process control plane (the one ``serve`` runs) over plain or mutual-TLS xDS;
the real CLI reads the real admin endpoint.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import ipaddress
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from trafficmgr.apiserver import APIServer
from trafficmgr.core.admin import AdminServer
from trafficmgr.core.bootstrap import XdsTls, bootstrap
from trafficmgr.core.controlplane import ControlPlane
from trafficmgr.core.kube.client import KubeClient, load_api_client
from trafficmgr.core.model import GATEWAY_CLUSTER
from trafficmgr.core.plugins import PluginHost
from trafficmgr.core.xds.server import XdsServerThread
from trafficmgr.testing.cluster import GatewayCluster
from trafficmgr.testing.envoy import EnvoyProcess, wait_for

TD = "example.org"
GATEWAY_NODE = "traffic-ingress-0"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class CA:
    """A throwaway CA; leaves expire at a whole second chosen by the test (so the table can be checked)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(_name("ca")).issuer_name(_name("ca"))
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.path = directory / "ca.crt"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str, san: x509.GeneralName, not_after: dt.datetime) -> tuple[Path, Path, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(self.cert.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)).not_valid_after(not_after)
                .add_extension(x509.SubjectAlternativeName([san]), critical=False)
                .sign(self.key, hashes.SHA256()))
        cert_path, key_path = self.dir / f"{name}.crt", self.dir / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_path, key_path, key


def _spiffe(ns: str, sa: str) -> str:
    return f"spiffe://{TD}/ns/{ns}/sa/{sa}"


def _pod(name: str, ip: str, sa: str | None, sidecar: bool) -> dict:
    md: dict[str, Any] = {"name": name, "namespace": "default"}
    if sidecar:
        md["annotations"] = {"traffic.envoy.proxy": f"{name}.default"}  # what the node agent writes once LIVE
    spec: dict[str, Any] = {"nodeName": "node-1", "containers": [{"name": "c", "image": "x"}]}
    if sa:
        spec["serviceAccountName"] = sa
    return {"apiVersion": "v1", "kind": "Pod", "metadata": md, "spec": spec,
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}


class Plane:
    """The control plane ``serve`` runs, in process, with its admin endpoint; Envoys added by :meth:`envoy`."""

    def __init__(self, tmp: Path, options: argparse.Namespace, credentials: grpc.ServerCredentials | None) -> None:
        self.tmp = tmp
        self.api = APIServer().start()
        self.api.store.create(_pod("web", "10.0.0.5", "reviews", sidecar=True))
        self.api.store.create(_pod("legacy", "10.0.0.6", None, sidecar=False))
        kubeconfig = tmp / "kubeconfig"
        self.api.write_kubeconfig(str(kubeconfig))
        self.cp = ControlPlane(PluginHost.load(["lb"]), options, KubeClient(load_api_client(str(kubeconfig))))
        self.xds = XdsServerThread(self.cp.cache, "127.0.0.1", 0, credentials, self.cp.authorize).start()
        self.cp.xds = self.xds
        self.cp.start_watches()
        assert self.cp.wait_ready(10)
        self.admin = AdminServer(self.cp, "127.0.0.1", 0)
        self.admin.start()
        self.envoys: list[EnvoyProcess] = []

    def envoy(self, node: str, cluster: str, tls: XdsTls | None = None) -> None:
        cfg = bootstrap(node, cluster, "127.0.0.1", self.xds.port, admin_port=0, xds_tls=tls)
        self.envoys.append(EnvoyProcess(cfg, self.tmp / node, wait="admin").start())

    def wait_streams(self, nodes: set[str]) -> None:
        wait_for(lambda: {s["node_id"] for s in self.cp.proxy_status() if s.get("view")} == nodes, 20,
                 message=f"streams of {nodes}: {self.cp.proxy_status()}")

    def cli(self, *args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "trafficmgr", *args, "--server", self.admin.url],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def close(self) -> None:
        for e in self.envoys:
            e.stop()
        self.admin.stop()
        self.cp.stop()
        self.xds.stop(0.5)
        self.api.stop()


def _options(**kw: Any) -> argparse.Namespace:
    return argparse.Namespace(sidecar_address="127.0.0.1", sidecar_port=0, trust_domain=TD,
                              xds_gateway_namespace="default", **kw)


def _rows(table: str) -> dict[str, dict[str, str]]:
    """Rows of the proxy-status table by node, cells cut at the header's column starts."""
    lines = table.splitlines()
    header = lines[0]
    titles = ["NODE", "ROLE", "MODE", "CDS", "EDS", "LDS", "RDS", "SDS", "REPLICA", "IDENTITY", "CERT EXPIRES", "MTLS"]
    starts = [header.index(t) for t in titles]
    assert starts == sorted(starts), header
    out = {}
    for line in lines[1:]:
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        out[cells[0]] = dict(zip(titles, cells, strict=True))
    return out


@pytest.fixture
def plane_factory(tmp_path: Path) -> Iterator[Any]:
    planes: list[Plane] = []

    def make(options: argparse.Namespace, credentials: grpc.ServerCredentials | None = None) -> Plane:
        planes.append(Plane(tmp_path, options, credentials))
        return planes[-1]

    yield make
    for p in planes:
        p.close()


def test_proxy_status_shows_the_verified_identity_and_certificate_expiry_over_mtls(
        plane_factory: Any, tmp_path: Path, envoy_binary: str) -> None:
    """``--xds-auth mtls``: IDENTITY is the SPIFFE ID of each Envoy's client certificate (no ``(expected)``),
    CERT EXPIRES its notAfter; MTLS ``mtls`` only for the sidecar whose pod is marked as one, with ``--mtls``."""
    ca = CA(tmp_path)
    soon = dt.datetime.now(dt.UTC).replace(microsecond=0)
    expiry = {"web": soon + dt.timedelta(hours=5, seconds=7), "legacy": soon + dt.timedelta(hours=9, seconds=3),
              "gateway": soon + dt.timedelta(hours=30, seconds=1)}
    srv_cert, srv_key, _ = ca.issue("server", x509.IPAddress(ipaddress.ip_address("127.0.0.1")), expiry["gateway"])
    credentials = grpc.ssl_server_credentials([(srv_key.read_bytes(), srv_cert.read_bytes())],
                                              root_certificates=ca.path.read_bytes(), require_client_auth=True)
    plane = plane_factory(_options(xds_auth="mtls", mtls=True), credentials)
    for node, cluster, name, sa in (("web.default", "sidecar", "web", "reviews"),
                                    ("legacy.default", "sidecar", "legacy", "default"),
                                    (GATEWAY_NODE, GATEWAY_CLUSTER, "gateway", "traffic-ingress")):
        cert, key, _ = ca.issue(name, x509.UniformResourceIdentifier(_spiffe("default", sa)), expiry[name])
        plane.envoy(node, cluster, XdsTls(str(cert), str(key), str(ca.path)))
    plane.wait_streams({"web.default", "legacy.default", GATEWAY_NODE})

    rows = _rows(plane.cli("proxy-status"))
    rfc = {k: v.strftime("%Y-%m-%dT%H:%M:%SZ") for k, v in expiry.items()}
    assert rows["web.default"]["IDENTITY"] == _spiffe("default", "reviews")
    assert rows["web.default"]["CERT EXPIRES"] == rfc["web"]
    assert rows["web.default"]["MTLS"] == "mtls"
    assert rows["legacy.default"]["IDENTITY"] == _spiffe("default", "default")  # no serviceAccountName: default
    assert rows["legacy.default"]["CERT EXPIRES"] == rfc["legacy"]
    assert rows["legacy.default"]["MTLS"] == "plaintext"  # its pod is not marked as running a sidecar
    assert rows[GATEWAY_NODE]["IDENTITY"] == _spiffe("default", "traffic-ingress")
    assert rows[GATEWAY_NODE]["CERT EXPIRES"] == rfc["gateway"]
    assert rows[GATEWAY_NODE]["MTLS"] == "plaintext"

    streams = {s["node_id"]: s for s in json.loads(plane.cli("proxy-status", "--json"))}
    web = streams["web.default"]
    assert web["identity"] == _spiffe("default", "reviews") and web["identity_verified"] is True
    assert web["identities"] == [_spiffe("default", "reviews")]
    assert web["cert_expiry"] == expiry["web"].timestamp() and web["mtls"] == "mtls"


def test_proxy_status_shows_the_expected_identity_without_mtls(plane_factory: Any, envoy_binary: str) -> None:
    """Plain xDS: IDENTITY is the one expected from the pod's ServiceAccount (or the gateway's), marked
    ``(expected)``; CERT EXPIRES ``-``; without ``--mtls`` every proxy is ``plaintext``."""
    plane = plane_factory(_options(xds_auth="none"))
    plane.envoy("web.default", "sidecar")
    plane.envoy(GATEWAY_NODE, GATEWAY_CLUSTER)
    plane.wait_streams({"web.default", GATEWAY_NODE})
    rows = _rows(plane.cli("proxy-status"))
    assert rows["web.default"]["IDENTITY"] == f"{_spiffe('default', 'reviews')} (expected)"
    assert rows["web.default"]["CERT EXPIRES"] == "-"
    assert rows["web.default"]["MTLS"] == "plaintext"
    assert rows[GATEWAY_NODE]["IDENTITY"] == f"{_spiffe('default', 'traffic-ingress')} (expected)"
    assert rows[GATEWAY_NODE]["MTLS"] == "plaintext"
    web = next(s for s in json.loads(plane.cli("proxy-status", "--json")) if s["node_id"] == "web.default")
    assert web["identity_verified"] is False and web["cert_expiry"] is None and web["identities"] == []


# -- config-dump never prints a private key -------------------------------------------------------

SHOP = """
apiVersion: v1
kind: Service
metadata: {name: shop, namespace: default}
spec:
  selector: {app: shop}
  ports: [{name: http, port: 8080, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: shop-1, namespace: default, labels: {app: shop}, annotations: {traffic.envoy.proxy: shop-1.default}}
spec: {nodeName: node-1, containers: [{name: app, image: shop}]}
status: {podIP: 127.0.11.1, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: https, namespace: default}
spec:
  ingressClassName: traffic
  tls:
  - {hosts: [shop.example.com], secretName: shop-tls}
  rules:
  - host: shop.example.com
    http:
      paths: [{path: /, pathType: Prefix, backend: {service: {name: shop, port: {number: 8080}}}}]
"""


def _key_fragments(key: ec.EllipticCurvePrivateKey) -> list[str]:
    """Strings any rendering of ``key`` would contain: the PEM body's lines, its base64 DER, the base64 of
    the PEM (an ``inline_bytes`` form), the private scalar in hex and decimal."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    trad = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption()).decode()
    lines = [ln for text in (pem, trad) for ln in text.splitlines() if ln and not ln.startswith("-----")]
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    scalar = key.private_numbers().private_value
    return [*lines, base64.b64encode(der).decode()[:40], base64.b64encode(pem.encode()).decode()[:40],
            f"{scalar:x}", str(scalar)]


def test_config_dump_never_prints_a_private_key(tmp_path: Path, envoy_binary: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A gateway TLS Secret (tls plugin) reaches the gateway Envoy over SDS (it serves TLS), yet no output of
    ``config-dump`` (every type, YAML and JSON, gateway and sidecar) nor of ``/debug/config-dump`` holds
    "PRIVATE KEY" or any bytes of the key; the certificate itself is shown. (The 16 ``config-dump`` runs
    call the CLI's ``main`` in this process, what ``python -m trafficmgr`` runs, without paying 16
    interpreter starts.)"""
    from trafficmgr import cli

    ca = CA(tmp_path)
    cert, _, key = ca.issue("shop", x509.DNSName("shop.example.com"), dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    b64 = lambda s: base64.b64encode(s.encode()).decode()  # noqa: E731
    secret = (f"apiVersion: v1\nkind: Secret\nmetadata: {{name: shop-tls, namespace: default}}\n"
              f"type: kubernetes.io/tls\ndata:\n  tls.crt: {b64(cert.read_text())}\n  tls.key: {b64(key_pem)}\n")
    with GatewayCluster(plugins=PluginHost.load(["lb", "ingress", "tls"])) as c:
        c.apply(SHOP)
        c.apply(secret)
        admin = AdminServer(c.cp, "127.0.0.1", 0)
        admin.start()
        try:
            # the key is really in what the gateway gets: its Envoy holds the secret (SDS) and serves TLS
            c.envoy.wait_for(lambda: "shop.example.com" in c.envoy.admin("/certs"), 20,
                             message="the gateway Envoy never loaded the certificate")
            outputs: dict[str, str] = {}
            for node in (GatewayCluster.NODE_ID, "shop-1.default"):
                for fmt in ("yaml", "json"):
                    for typ in (None, "secrets", "listeners", "clusters"):
                        args = ["config-dump", "--node-id", node, "-o", fmt, *(["--type", typ] if typ else [])]
                        capsys.readouterr()
                        code = cli.main([*args, "--server", admin.url])
                        out, err = capsys.readouterr()
                        assert code == 0, err
                        outputs[" ".join(args)] = out
                from trafficmgr.testing.cluster import http_get

                code, body = http_get(f"{admin.url}/debug/config-dump?node_id={node}")
                assert code == 200
                outputs[f"/debug/config-dump {node}"] = body
        finally:
            admin.stop()
    fragments = _key_fragments(key)
    for what, text in outputs.items():
        assert "PRIVATE KEY" not in text, what
        leaked = [f for f in fragments if f in text]
        assert not leaked, f"{what} shows key material: {leaked[:2]}"
    gateway_secrets = outputs[f"config-dump --node-id {GatewayCluster.NODE_ID} -o yaml --type secrets"]
    assert "default/shop-tls" in gateway_secrets and "redacted: true" in gateway_secrets  # the secret is there
    assert "DNS:shop.example.com" in gateway_secrets  # and its certificate is shown
