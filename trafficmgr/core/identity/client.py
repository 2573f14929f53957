"""The caller's side of the signing RPC: make a workload key and CSR, ask the control plane to sign, check
the answer (the node agent for its sidecars, ``trafficmgr identity`` for a pod's own certificate).

The key is EC P-256, made here and never sent anywhere: only the CSR (public key + the SPIFFE URI SAN)
leaves the node. The RPC is ``/trafficmgr.identity.v1.Identity/Sign`` over gRPC with TLS, JSON bytes both
ways (see :data:`METHOD`); the server is verified against the mesh trust bundle and the name
``server_name`` (``--ca-server-name``, else the address's host); the bearer token is read from its file on
every call (the kubelet rotates projected tokens). The answer is checked before it is used: the leaf's
public key must be ours, its only URI SAN the one asked for, and the chain must lead to a root of the
trust bundle the server sent, so a confused or compromised server cannot make a proxy present a
certificate for another identity or one its peers would reject.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Sequence
from typing import Any

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from trafficmgr.core.identity import DEFAULT_PORT, METHOD

#: Largest answer accepted (a chain and a bundle of a few certificates are a few KiB).
MAX_RESPONSE = 256 * 1024


class IdentityError(Exception):
    """Getting a certificate failed; ``code`` is the gRPC status name when the server answered
    (``PERMISSION_DENIED``, ``UNAVAILABLE``, ...), else ``""``."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


@attrs.frozen
class Issued:
    """A key and the certificate chain issued for it, with the trust bundle and the leaf's validity."""

    key_pem: bytes = attrs.field(repr=False)
    chain_pem: bytes
    bundle_pem: bytes
    not_before: dt.datetime
    not_after: dt.datetime
    received: dt.datetime = attrs.field(factory=lambda: dt.datetime.now(dt.UTC))

    def renew_at(self) -> dt.datetime:
        """When a renewal is due: see :func:`renew_at`."""
        return renew_at(self.not_before, self.not_after, self.received)


def renew_at(not_before: dt.datetime, not_after: dt.datetime, issued: dt.datetime) -> dt.datetime:
    """Half-life, counted from when the certificate was ``issued`` (received; not before ``not_before``):
    signers backdate ``notBefore`` (a minute, for clock skew), and half of *that* lifetime would renew a
    60 s certificate at once, again and again."""
    start = min(max(not_before, issued), not_after)
    return start + (not_after - start) / 2


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) of the signing service; raises ``ValueError`` with the reason."""
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"signing service address {text!r} must be HOST:PORT (e.g. trafficmgr.trafficmgr.svc:{DEFAULT_PORT})")
    return host, int(port)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def make_csr(key: ec.EllipticCurvePrivateKey, spiffe_id: str) -> bytes:
    """A PEM CSR whose only SAN is the URI ``spiffe_id`` (empty subject: SPIFFE names the workload by URI)."""
    from cryptography.hazmat.primitives import hashes

    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
           .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=True)
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


def read_token(path: str) -> str:
    """The bearer token in ``path`` (whitespace stripped); raises :class:`IdentityError`."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as exc:
        raise IdentityError(f"cannot read the token file {path}: {exc.strerror or exc}") from None
    if not token or any(c.isspace() for c in token):
        raise IdentityError(f"the token file {path} holds no token (empty, or more than one word)")
    return token


def load_certs(pem: bytes, what: str) -> list[x509.Certificate]:
    """Every certificate in ``pem``; raises :class:`IdentityError` naming ``what`` when there is none."""
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise IdentityError(f"{what}: not PEM certificates ({exc})") from None
    if not certs:
        raise IdentityError(f"{what}: no certificate")
    return certs


def _uris(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def verify_chain(chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate],
                 now: dt.datetime | None = None) -> None:
    """Raise :class:`IdentityError` unless each certificate of ``chain`` is signed by the next and the last
    by (or is) one of ``roots``, and every one is valid at ``now``."""
    now = now or dt.datetime.now(dt.UTC)
    for cert in chain:
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise IdentityError(f"certificate {cert.subject.rfc4514_string() or _uris(cert)} is not valid now "
                                f"({cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} .. {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ})")
    for child, parent in zip(chain, chain[1:], strict=False):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise IdentityError(f"the chain is broken: {child.subject.rfc4514_string() or 'the leaf'} is not "
                                f"signed by {parent.subject.rfc4514_string()} ({type(exc).__name__})") from None
    last = chain[-1]
    for root in roots:
        if root == last:
            return
        try:
            last.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):  # not this root (wrong name, signature or key type)
            continue
        if root.not_valid_before_utc <= now <= root.not_valid_after_utc:
            return
    raise IdentityError(f"the chain does not lead to a root of the trust bundle (its top is issued by "
                        f"{last.issuer.rfc4514_string()})")


def check_issued(key: ec.EllipticCurvePrivateKey, spiffe_id: str, chain_pem: bytes, bundle_pem: bytes) -> Issued:
    """The :class:`Issued` of a signing answer, after checking it (see the module docstring)."""
    chain = load_certs(chain_pem, "the certificate chain")
    roots = load_certs(bundle_pem, "the trust bundle")
    leaf = chain[0]
    if leaf.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != \
            key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise IdentityError("the certificate is not for our key")
    uris = _uris(leaf)
    if uris != [spiffe_id]:
        raise IdentityError(f"the certificate names {uris or 'no URI'}, we asked for {spiffe_id}")
    verify_chain(chain, roots)
    return Issued(key_pem(key), chain_pem, bundle_pem, leaf.not_valid_before_utc, leaf.not_valid_after_utc)


def leaf_uris(chain_pem: bytes) -> list[str]:
    """The URI SANs of the leaf of ``chain_pem`` ([] when it cannot be read)."""
    try:
        return _uris(x509.load_pem_x509_certificates(chain_pem)[0])
    except (ValueError, IndexError):
        return []


def validity(chain_pem: bytes) -> tuple[dt.datetime, dt.datetime] | None:
    """(notBefore, notAfter) of the leaf of ``chain_pem``, None when it cannot be read."""
    try:
        leaf = x509.load_pem_x509_certificates(chain_pem)[0]
    except (ValueError, IndexError):
        return None
    return leaf.not_valid_before_utc, leaf.not_valid_after_utc


@attrs.frozen
class SignClient:
    """Calls the signing service at ``address`` (``host:port``).

    ``token_file`` is read on every call; ``server_name`` is the name the server's certificate must carry
    (default: the address's host, an IP then needing an IP SAN)."""

    address: str
    token_file: str
    server_name: str | None = None
    timeout_s: float = 10.0

    def __attrs_post_init__(self) -> None:
        parse_address(self.address)  # raises ValueError early

    def call(self, request: dict[str, Any], trust_bundle: bytes) -> dict[str, Any]:
        """One Sign call; the server's certificate must chain to ``trust_bundle``. Raises :class:`IdentityError`."""
        import grpc

        token = read_token(self.token_file)
        host, port = parse_address(self.address)
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        # No HTTP proxy: the signing service is inside the cluster, and grpcio would follow $https_proxy.
        options: list[tuple[str, Any]] = [("grpc.enable_http_proxy", 0),
                                          ("grpc.max_receive_message_length", MAX_RESPONSE)]
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        credentials = grpc.ssl_channel_credentials(root_certificates=trust_bundle)
        body = json.dumps(request).encode()
        with grpc.secure_channel(target, credentials, options=options) as channel:
            sign = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
            try:
                answer = sign(body, timeout=self.timeout_s, metadata=(("authorization", f"Bearer {token}"),))
            except grpc.RpcError as exc:
                code = exc.code().name if hasattr(exc, "code") and exc.code() is not None else ""
                details = exc.details() if hasattr(exc, "details") else str(exc)
                raise IdentityError(f"signing service {self.address}: {code}: {details}", code) from None
        try:
            result = json.loads(answer)
        except (ValueError, UnicodeDecodeError) as exc:
            raise IdentityError(f"signing service {self.address}: the answer is not JSON ({exc})") from None
        if not isinstance(result, dict) or not isinstance(result.get("certificate_chain"), str) \
                or not isinstance(result.get("trust_bundle"), str):
            raise IdentityError(f"signing service {self.address}: the answer lacks certificate_chain/trust_bundle")
        return result

    def issue(self, spiffe_id: str, pod: tuple[str, str, str], trust_bundle: bytes) -> Issued:
        """A new key and a checked certificate for ``spiffe_id``, asked for ``pod`` (namespace, name, uid)."""
        key = new_key()
        request = {"csr": make_csr(key, spiffe_id).decode(), "pod": {"namespace": pod[0], "name": pod[1], "uid": pod[2]}}
        answer = self.call(request, trust_bundle)
        return check_issued(key, spiffe_id, answer["certificate_chain"].encode(), answer["trust_bundle"].encode())


def read_file(path: str) -> bytes:
    """The bytes of ``path``; raises :class:`IdentityError`."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise IdentityError(f"cannot read {path}: {exc.strerror or exc}") from None


def current_key(base: str) -> bytes | None:
    """The key written below ``base`` (see :mod:`.files`), None when there is none."""
    from trafficmgr.core.identity import files

    try:
        with open(os.path.join(base, files.DIRECTORY, files.KEY), "rb") as f:
            return f.read()
    except OSError:
        return None
