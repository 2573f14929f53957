"""Who may talk to the API server: bearer token, ``Host`` header and write media types.

Local mode's API server drives a kubelet that runs a container's ``command``, so a write to it is code
execution as the user running ``trafficmgr demo``. Three checks, each against a different attacker:

- **Bearer token** (other local users and processes, which can all reach loopback): a random token
  (:func:`new_token`) that only the kubeconfig (mode 0600, :func:`write_private_file`) carries;
  compared in constant time (:func:`bearer_matches`).
- **Host header** (DNS rebinding: a web page whose own host name later resolves to 127.0.0.1 is
  same-origin with the API server, so the browser would let it read responses): only loopback names
  and the server's own bind address (:func:`host_allowed`). A rebinding page always sends its own DNS
  name as ``Host``, never an IP literal.
- **Write media types** (cross-site "simple" requests: a page may POST ``text/plain``,
  ``application/x-www-form-urlencoded`` or ``multipart/form-data`` to any origin without a CORS
  preflight): writes need a JSON/YAML/patch/protobuf type (:data:`WRITE_MEDIA_TYPES`), which a browser
  only sends cross-origin after a preflight that this server never grants (it sends no CORS headers). A
  write without any Content-Type is JSON (kube-apiserver's rule; the official Python client relies on
  it) unless it comes from a browser (:func:`from_browser`).
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import os
import re
import secrets
import ssl
import tempfile
from collections.abc import Mapping, Sequence
from email.message import Message
from pathlib import Path

import attrs

#: Request media types a write (POST/PUT/PATCH) may carry: what the handlers decode (JSON, YAML, the four
#: patch types, protobuf). None of them is a type a browser sends cross-origin without a preflight.
WRITE_MEDIA_TYPES = frozenset({
    "application/json",
    "application/yaml",
    "application/merge-patch+json",
    "application/strategic-merge-patch+json",
    "application/json-patch+json",
    "application/apply-patch+yaml",
    "application/vnd.kubernetes.protobuf",
})

#: Host names always accepted (with any port): the loopback names a local client uses.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

_TOKEN_RE = re.compile(r"[A-Za-z0-9._~+/=-]{16,4096}")  # RFC 6750 b64token, at least 16 characters
_PORT_RE = re.compile(r"[0-9]{1,5}")


class TokenError(ValueError):
    """A token (or token file) that cannot be used; the message says why."""


def new_token() -> str:
    """A fresh random bearer token (256 bits, URL-safe base64)."""
    return secrets.token_urlsafe(32)


def check_token(token: str) -> str:
    """Return ``token`` if it is a usable bearer token (RFC 6750 characters, 16-4096 long), else raise."""
    if not _TOKEN_RE.fullmatch(token):
        raise TokenError("the API server token must be 16 to 4096 characters of A-Z a-z 0-9 . _ ~ + / = -")
    return token


def read_token_file(path: str | Path) -> str:
    """The token in ``path`` (surrounding whitespace stripped); :class:`TokenError` if unreadable or invalid."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenError(f"cannot read the token file {path}: {exc}") from None
    try:
        return check_token(text.strip())
    except TokenError as exc:
        raise TokenError(f"{path}: {exc}") from None


def bearer_matches(authorization: str | None, token: str) -> bool:
    """True when the ``Authorization`` header value is ``Bearer <token>`` (constant-time comparison)."""
    scheme, _, presented = (authorization or "").strip().partition(" ")
    ok_scheme = scheme.lower() == "bearer"
    # compare_digest runs in time independent of where the strings differ (it leaks only the length).
    ok_token = hmac.compare_digest(presented.strip().encode("utf-8", "replace"), token.encode())
    return ok_scheme and ok_token


def _split_host(value: str) -> tuple[str, str] | None:
    """``(name, port)`` of a Host header value (port "" when absent); None when malformed."""
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[1:end], value[end + 1:]
        if rest and (rest[0] != ":" or len(rest) == 1):
            return None
        port = rest[1:]
    elif value.count(":") > 1:
        return None  # an IPv6 literal must be in brackets
    else:
        name, colon, port = value.partition(":")
        if colon and not port:
            return None
    if port and not _PORT_RE.fullmatch(port):
        return None
    return name, port


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def host_allowed(host_header: str | None, bind_address: str) -> bool:
    """True when a request's ``Host`` is a loopback name or the server's own bind address (any port).

    A server bound to a wildcard address (0.0.0.0, ::) also accepts any IP literal: rebinding needs a
    DNS name, and the bearer token, not the Host check, is what authenticates.
    """
    parsed = _split_host((host_header or "").strip().lower())
    if parsed is None or not parsed[0]:
        return False
    name = parsed[0]
    if name in LOOPBACK_HOSTS:
        return True
    ip, bind_ip = _ip(name), _ip(bind_address)
    if ip is None:
        return name == bind_address.lower()
    if bind_ip is not None and bind_ip.is_unspecified:
        return True
    return ip == bind_ip


def from_browser(headers: Mapping[str, str] | Message) -> bool:
    """True when a request carries a header only browsers add (``Origin``, ``Sec-Fetch-*``).

    Browsers attach ``Origin`` to every cross-origin request that is not a GET/HEAD and ``Sec-Fetch-Site``
    to every request, and a page cannot remove either. kubectl, client-go and the official Python
    client send neither. Used to refuse a write without a Content-Type from a page, which can send one
    (``fetch`` with a Blob or ArrayBuffer body) without a CORS preflight.
    """
    return any(headers.get(name) is not None for name in ("Origin", "Sec-Fetch-Site", "Sec-Fetch-Mode"))


@attrs.frozen
class Credentials:
    """What a client needs to use a token-protected API server: the bearer token and the server's own
    self-signed TLS certificate (its CA data in the kubeconfig), plus the certificate's key.

    TLS is not for secrecy on loopback: kubectl (client-go) sends a kubeconfig's token only over
    ``https`` (kubernetes/kubectl#744), so a token-protected server must serve TLS.
    """

    token: str = attrs.field(repr=False)
    cert_pem: str = attrs.field(repr=False)
    key_pem: str = attrs.field(repr=False)

    @classmethod
    def generate(cls, token: str | None = None, hosts: Sequence[str] = ()) -> Credentials:
        """New credentials: ``token`` (random when None) and a certificate valid for the loopback names
        and ``hosts``."""
        return cls(check_token(token) if token is not None else new_token(), *_self_signed(hosts))

    def ssl_context(self) -> ssl.SSLContext:
        """A server-side context serving this certificate (TLS 1.2+)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        with tempfile.TemporaryDirectory(prefix="tm-apiserver-tls-") as d:  # mode 0700; gone once loaded
            cert, key = Path(d) / "tls.crt", Path(d) / "tls.key"
            cert.write_text(self.cert_pem)
            key.write_text(self.key_pem)
            ctx.load_cert_chain(cert, key)
        return ctx


def _self_signed(hosts: Sequence[str]) -> tuple[str, str]:
    """``(certificate PEM, key PEM)``: a self-signed P-256 certificate, its own CA, valid 1 year, for
    127.0.0.1, ::1, localhost and ``hosts`` (wildcard addresses skipped). Made with ``cryptography`` (a
    dependency), so ``pip install`` is all local mode needs."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    names: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                     x509.IPAddress(ipaddress.ip_address("::1")), x509.DNSName("localhost")]
    for host in hosts:
        ip = _ip(host)
        entry: x509.GeneralName = x509.IPAddress(ip) if ip is not None else x509.DNSName(host)
        if (ip is None or not ip.is_unspecified) and entry not in names:
            names.append(entry)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "trafficmgr-apiserver")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem.decode()


def write_private_file(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` readable by its owner only (0600), atomically.

    The file is created with mode 0600 (a temporary file in the same directory, opened ``O_EXCL``, then
    renamed over ``path``), so no other user can open it between creation and a later chmod, and an old
    file at ``path`` with a wider mode is replaced rather than reused.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")  # mkstemp: O_EXCL, mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return p


__all__ = ["LOOPBACK_HOSTS", "WRITE_MEDIA_TYPES", "Credentials", "TokenError", "bearer_matches", "check_token", "from_browser",
           "host_allowed", "new_token", "read_token_file", "write_private_file"]
