"""Mesh identity for tests and benchmarks: a throwaway CA that writes proxy working directories.

:class:`MeshTestCA` signs workload certificates the way the mesh CA does (one URI SAN, serverAuth +
clientAuth) and writes them with :func:`trafficmgr.core.identity.files.write`, so a sidecar Envoy started
with that directory as its working directory (``SidecarPod(cwd=...)``, ``LocalCluster(client_cwd=...)``,
``LocalCluster.peer_pod(cwd=...)``) serves the identity over file-based SDS. Test-only: the key is kept in
memory and the root lives one day.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import textwrap

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trafficmgr.core.identity import files
from trafficmgr.testing.cluster import PROXY_UID


class MeshTestCA:
    """A throwaway root that signs workload certificates with one URI SAN, as the mesh CA does."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mtls test root")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self.key.public_key())
                     .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
                     .not_valid_after(now + datetime.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                                  data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                                  crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def identity_dir(self, spiffe_id: str) -> str:
        """A new proxy working directory with ``identity/`` for ``spiffe_id`` (readable by the proxy's uid).
        The caller removes it."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        leaf = (x509.CertificateBuilder().subject_name(x509.Name([]))
                .issuer_name(self.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(hours=2))
                .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=True)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                               critical=False)
                .sign(self.key, hashes.SHA256()))
        base = tempfile.mkdtemp(prefix="tm-mtls-")
        os.chmod(base, 0o755)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        files.write(base, key_pem, leaf.public_bytes(serialization.Encoding.PEM), self.pem, uid=PROXY_UID)
        return base


def meshed_pod(name: str, ip: str, app: str, sa: str) -> str:
    """A Pod whose sidecar is LIVE (the node agent's annotation) running as ServiceAccount ``sa``."""
    return textwrap.dedent(f"""\
        apiVersion: v1
        kind: Pod
        metadata: {{name: {name}, namespace: default, labels: {{app: {app}}}, annotations: {{traffic.envoy.proxy: {name}.default}}}}
        spec: {{nodeName: node-1, serviceAccountName: {sa}, containers: [{{name: app, image: {app}}}]}}
        status: {{podIP: {ip}, conditions: [{{type: Ready, status: "True"}}]}}
        """)
