"""Helpers of the mesh CA and Sign service tests (test_ca*.py, test_sign*.py): the real local API server
with a kubeconfig, CA Secrets made here, CSRs, and chain verification with ``cryptography``."""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import verification
from cryptography.x509.oid import NameOID

from trafficmgr.apiserver import APIServer
from trafficmgr.core.kube.client import KubeClient, load_api_client

NS = "trafficmgr"


class Api:
    """The local API server (HTTPS + admin token) and a :class:`KubeClient` of the official client."""

    def __init__(self, tmp: Path) -> None:
        from trafficmgr.apiserver.access import new_token

        self.server = APIServer(port=0, token=new_token()).start()
        self.kubeconfig = tmp / "kubeconfig"
        self.server.write_kubeconfig(str(self.kubeconfig))
        self.kube = KubeClient(load_api_client(str(self.kubeconfig)))
        self.store = self.server.store
        self.store.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})

    def stop(self) -> None:
        self.server.stop()


def api_fixture(tmp_path: Path) -> Iterator[Api]:
    api = Api(tmp_path)
    try:
        yield api
    finally:
        api.stop()


def name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str, issuer: tuple[x509.Certificate, Any] | None = None, ca: bool = True,
            days: int = 365) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A CA certificate (self-signed, or issued by ``issuer``) and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(name(cn))
               .issuer_name(issuer[0].subject if issuer else name(cn)).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                                        critical=True)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256()), key


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def secret(tls_crt: bytes, tls_key: bytes | None, ca_crt: bytes | None = None, secret_name: str = "mesh-ca") -> dict[str, Any]:
    data = {"tls.crt": base64.b64encode(tls_crt).decode()}
    if tls_key is not None:
        data["tls.key"] = base64.b64encode(tls_key).decode()
    if ca_crt is not None:
        data["ca.crt"] = base64.b64encode(ca_crt).decode()
    return {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": {"name": secret_name, "namespace": NS}, "data": data}


def csr(uris: list[str] = (), dns: list[str] = (), key: Any = None) -> tuple[str, Any]:  # type: ignore[assignment]
    """(CSR PEM, key) with these SANs (EC P-256 key unless ``key`` is given)."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris] + [x509.DNSName(d) for d in dns]
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode(), key


def weak_rsa_csr(uri: str) -> str:
    return csr([uri], key=rsa.generate_private_key(65537, 1024))[0]


def verify_chain(chain_pem: str | bytes, bundle_pem: str | bytes) -> x509.Certificate:
    """Verify the leaf of ``chain_pem`` (with its intermediates) against the roots of ``bundle_pem`` as a
    TLS client certificate, with ``cryptography``'s RFC 5280 path validation; returns the leaf."""
    chain = x509.load_pem_x509_certificates(chain_pem.encode() if isinstance(chain_pem, str) else chain_pem)
    roots = x509.load_pem_x509_certificates(bundle_pem.encode() if isinstance(bundle_pem, str) else bundle_pem)
    verifier = verification.PolicyBuilder().store(verification.Store(roots)).build_client_verifier()
    verifier.verify(chain[0], chain[1:])
    return chain[0]


def uri_sans(cert: x509.Certificate) -> list[str]:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier)
