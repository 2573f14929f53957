"""``kubernetes.io/tls`` Secrets -> validated :class:`TlsSecret` IR objects.

Validation happens once per Secret version, in ``convert``: a Secret Envoy would reject (bad PEM, a key
that does not match the certificate, an encrypted key) keeps only its error, never its key material.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import ssl
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import attrs

TLS_TYPE = "kubernetes.io/tls"
SECRET = "Secret"
_CERT_BLOCK = re.compile(r"-----BEGIN CERTIFICATE-----\s+[A-Za-z0-9+/=\s]+?-----END CERTIFICATE-----")
_KEY_BLOCK = re.compile(r"-----BEGIN ((RSA |EC )?PRIVATE KEY)-----\s+[A-Za-z0-9+/=\s]+?-----END \1-----")


@attrs.frozen(slots=True)
class TlsSecret:
    """A TLS Secret. ``error`` is non-empty when it cannot be served (then cert and key are empty)."""

    namespace: str
    name: str
    uid: str = ""
    certificate_chain: str = attrs.field(default="", repr=False)
    private_key: str = attrs.field(default="", repr=False)
    error: str = ""


@contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    """A path to ``data`` that never touches a disk where possible (memfd on Linux)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("trafficmgr-tls", 0)
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.NamedTemporaryFile() as f:  # pragma: no cover - non-Linux
        f.write(data)
        f.flush()
        yield f.name


def validate(cert: str, key: str) -> str:
    """Why Envoy could not serve this certificate chain and key ("" when it can)."""
    if not cert.strip():
        return "tls.crt is empty"
    if not key.strip():
        return "tls.key is empty"
    blocks = _CERT_BLOCK.findall(cert)
    if not blocks or "-----BEGIN" in _CERT_BLOCK.sub("", cert):
        return "tls.crt is not a PEM certificate chain"
    for block in _CERT_BLOCK.finditer(cert):
        try:
            ssl.PEM_cert_to_DER_cert(block.group(0))
        except (ValueError, binascii.Error):
            return "tls.crt holds a malformed PEM certificate"
    if "ENCRYPTED" in key:
        return "tls.key is encrypted (Envoy needs an unencrypted key)"
    if len(_KEY_BLOCK.findall(key)) != 1:
        return "tls.key is not exactly one PEM private key"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        with _memory_file(cert.encode()) as cert_path, _memory_file(key.encode()) as key_path:
            context.load_cert_chain(cert_path, key_path, password=b"")
    except ssl.SSLError as exc:
        if exc.reason in ("KEY_VALUES_MISMATCH", "NO_CERTIFICATE_ASSIGNED") or "mismatch" in str(exc):
            return "tls.key does not match the certificate in tls.crt"
        return f"tls.crt/tls.key rejected: {exc.reason or exc}"
    return ""


def _decode(data: dict[str, Any], key: str) -> str:
    value = data.get(key) or ""
    try:
        return base64.b64decode(value, validate=True).decode("ascii")
    except (binascii.Error, UnicodeDecodeError):
        return ""


def convert_secret(raw: dict[str, Any], ctx: Any) -> TlsSecret | None:
    """A raw Secret -> :class:`TlsSecret` (None for other Secret types)."""
    if raw.get("type") != TLS_TYPE:
        return None
    meta = raw.get("metadata") or {}
    data = raw.get("data") or {}
    cert, key = _decode(data, "tls.crt"), _decode(data, "tls.key")
    base = TlsSecret(meta.get("namespace") or "default", meta.get("name") or "", meta.get("uid") or "")
    error = validate(cert, key)
    if error:
        return attrs.evolve(base, error=error)
    return attrs.evolve(base, certificate_chain=cert, private_key=key)
