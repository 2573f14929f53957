"""``kubernetes.io/tls`` Secrets -> validated :class:`TlsSecret` IR objects.

Validation happens once per Secret version, in ``convert``: a Secret Envoy would reject (bad PEM, a key
that does not match the certificate, an encrypted key) keeps only its error, never its key material.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import attrs

from trafficmgr.plugin import tls_pem_error

TLS_TYPE = "kubernetes.io/tls"
SECRET = "Secret"


@attrs.frozen(slots=True)
class TlsSecret:
    """A TLS Secret. ``error`` is non-empty when it cannot be served (then cert and key are empty)."""

    namespace: str
    name: str
    uid: str = ""
    certificate_chain: str = attrs.field(default="", repr=False)
    private_key: str = attrs.field(default="", repr=False)
    error: str = ""


#: Why Envoy could not serve a chain and key ("" when it can): the check shared with gateway_api.
validate = tls_pem_error


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
