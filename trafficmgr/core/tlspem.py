"""Whether Envoy can serve a PEM certificate chain and private key (for plugins that take them from
Kubernetes Secrets: ``tls`` for Ingresses, ``gateway_api`` for Gateway listeners).

Checked once per Secret version, when the Secret is converted, so that a Secret Envoy would reject (bad
PEM, a key that does not match the certificate, an encrypted key) keeps only its error and never reaches
Envoy, where it would fail the whole listener.
"""

from __future__ import annotations

import binascii
import os
import re
import ssl
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

_CERT_BLOCK = re.compile(r"-----BEGIN CERTIFICATE-----\s+[A-Za-z0-9+/=\s]+?-----END CERTIFICATE-----")
_KEY_BLOCK = re.compile(r"-----BEGIN ((RSA |EC )?PRIVATE KEY)-----\s+[A-Za-z0-9+/=\s]+?-----END \1-----")


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


def tls_pem_error(cert: str, key: str) -> str:
    """Why Envoy could not serve this certificate chain (``tls.crt``) and key (``tls.key``): one line, or ""
    when it can. The pair is loaded with OpenSSL, as Envoy will load it."""
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
    except (ssl.SSLError, OSError) as exc:
        if getattr(exc, "reason", None) in ("KEY_VALUES_MISMATCH", "NO_CERTIFICATE_ASSIGNED") or "mismatch" in str(exc):
            return "tls.key does not match the certificate in tls.crt"
        return f"tls.crt/tls.key rejected: {getattr(exc, 'reason', None) or exc}"
    return ""
