"""A stand-in signing service for the agent-side tests until the real one (``core/identity/server.py``)
lands: a real gRPC server (TLS, the contract's generic handler and JSON messages) signing with a CA made
here with the ``cryptography`` package. It authorizes by a fixed token only (no TokenReview).

Temporary: replaced by the real server in the integration tests when it is committed."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import threading
from concurrent import futures
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trafficmgr.core.identity.client import METHOD

SERVER_NAME = "trafficmgr.trafficmgr.svc"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class StandInCA:
    """A root CA (EC P-256) issuing leaves."""

    def __init__(self, cn: str = "test-mesh-root") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def leaf(self, public_key: Any, sans: list[x509.GeneralName], ttl: dt.timedelta) -> bytes:
        now = dt.datetime.now(dt.UTC)
        cert = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(self.cert.subject)
                .public_key(public_key).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + ttl)
                .add_extension(x509.SubjectAlternativeName(sans), critical=True)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                               critical=False)
                .sign(self.key, hashes.SHA256()))
        return cert.public_bytes(serialization.Encoding.PEM)

    def serving(self, names: list[str], ips: list[str]) -> tuple[bytes, bytes]:
        """(key PEM, certificate PEM) for a server named ``names`` and ``ips``."""
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        cert = self.leaf(key.public_key(), sans, dt.timedelta(hours=1))
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption()), cert


class StandInSigner:
    """The Sign RPC on ``127.0.0.1:<port>`` (TLS, server name :data:`SERVER_NAME` and 127.0.0.1)."""

    def __init__(self, token: str = "agent-token", ttl_s: float = 3600.0) -> None:
        self.ca = StandInCA()
        self.token = token
        self.ttl_s = ttl_s
        self.tokens: list[str] = []
        self.requests: list[dict[str, Any]] = []
        self.refuse: str | None = None  # set: every call fails UNAVAILABLE with this text
        self.lock = threading.Lock()
        self.server: grpc.Server | None = None
        self.port = 0

    def start(self, port: int = 0) -> StandInSigner:
        key, cert = self.ca.serving([SERVER_NAME], ["127.0.0.1"])
        creds = grpc.ssl_server_credentials([(key, cert)])
        server = grpc.server(futures.ThreadPoolExecutor(4))
        handler = grpc.method_handlers_generic_handler(
            "trafficmgr.identity.v1.Identity", {"Sign": grpc.unary_unary_rpc_method_handler(self._sign)})
        server.add_generic_rpc_handlers((handler,))
        self.port = server.add_secure_port(f"127.0.0.1:{port}", creds)
        server.start()
        self.server = server
        assert METHOD == "/trafficmgr.identity.v1.Identity/Sign"
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(0).wait(5)
            self.server = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _sign(self, body: bytes, context: grpc.ServicerContext) -> bytes:
        meta = dict(context.invocation_metadata())
        token = str(meta.get("authorization", "")).removeprefix("Bearer ")
        with self.lock:
            self.tokens.append(token)
        if self.refuse:
            context.abort(grpc.StatusCode.UNAVAILABLE, self.refuse)
        if token != self.token:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad token")
        request = json.loads(body)
        with self.lock:
            self.requests.append(request)
        csr = x509.load_pem_x509_csr(request["csr"].encode())
        sans = list(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
        chain = self.ca.leaf(csr.public_key(), sans, dt.timedelta(seconds=self.ttl_s)) + self.ca.pem
        answer = {"certificate_chain": chain.decode(), "trust_bundle": self.ca.pem.decode(),
                  "expires": (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self.ttl_s)).isoformat()}
        return json.dumps(answer).encode()
