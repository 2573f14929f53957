"""Output helpers shared by the CLI and the admin endpoint: tables, YAML/JSON, label and plugin rows,
proxy sync cells, and redaction of private keys in resource dumps.

Contracts:
- :func:`resource_dict` never returns PEM private key material: every ``private_key``, ``pkcs12``,
  ``password``, ``session_ticket_keys`` and ``generic_secret`` field is replaced by ``{"redacted": true}``,
  and any other string that still looks like a private key (PEM text, or base64 of PEM) is redacted too.
- Rendering is deterministic (same input, same text), so README samples and tests are stable.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import importlib
import json
import os
import pkgutil
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import yaml
from google.protobuf import json_format
from google.protobuf.message import Message

from trafficmgr.core import cache
from trafficmgr.core.labels import LabelSpec
from trafficmgr.core.plugins import PluginInfo

#: Order of kinds in the ``On`` column (then any other kind, alphabetically).
KIND_ORDER = ("Service", "Pod", "Deployment", "StatefulSet", "DaemonSet")
#: xDS type short names, in push order (the CLI's ``--type`` values).
TYPES: tuple[str, ...] = tuple(cache.SHORT_NAMES)
#: Column titles of ``proxy-status`` for each short type name.
TYPE_COLUMNS = {"clusters": "CDS", "endpoints": "EDS", "listeners": "LDS", "routes": "RDS", "secrets": "SDS"}
REDACTED: dict[str, bool] = {"redacted": True}
_SECRET_FIELDS = frozenset({"private_key", "pkcs12", "password", "session_ticket_keys", "generic_secret", "private_key_provider"})
_PEM_KEY = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")


# -- generic output -------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Left-aligned columns separated by two spaces (like ``kubectl get``); ends with a newline."""
    body = [[str(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in body:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in [list(headers), *body]:
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    return "\n".join(lines) + "\n"


def to_json(data: Any) -> str:
    """Indented JSON with a trailing newline (keys keep their insertion order)."""
    return json.dumps(data, indent=2) + "\n"


def to_yaml(data: Any) -> str:
    """Block-style YAML (keys keep their insertion order)."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


# -- labels ---------------------------------------------------------------------------------------


def format_default(value: Any) -> str:
    """A label default as users type it: ``false``, ``100``, ``ROUND_ROBIN``, ``""``; None -> ``none``."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if value == "":
        return '""'
    return str(value)


def format_kinds(kinds: Iterable[str]) -> str:
    """``Pod, Deployment, StatefulSet, DaemonSet`` in :data:`KIND_ORDER`."""
    rank = {k: i for i, k in enumerate(KIND_ORDER)}
    return ", ".join(sorted(kinds, key=lambda k: (rank.get(k, len(rank)), k)))


def label_row(spec: LabelSpec) -> dict[str, Any]:
    """One label as a JSON-able dict (``trafficmgr labels --json``, ``/debug/labels``)."""
    default = spec.default if isinstance(spec.default, (bool, int, float, str, type(None))) else str(spec.default)
    return {
        "label": spec.key,
        "on": [k for k in format_kinds(spec.kinds).split(", ") if k],
        "default": default,
        "default_text": format_default(spec.default),
        "values": spec.allowed,
        "plugin": spec.plugin,
        "description": spec.doc,
    }


def labels_table(specs: Iterable[LabelSpec]) -> str:
    """The ``trafficmgr labels`` table."""
    headers = ("LABEL", "ON", "DEFAULT", "VALUES", "PLUGIN", "DESCRIPTION")
    return table(headers, [(s.key, format_kinds(s.kinds), format_default(s.default), s.allowed, s.plugin, s.doc) for s in specs])


def labels_markdown(specs: Iterable[LabelSpec]) -> str:
    """The README label table: ``| Label | On | Default | Values | Meaning |`` (regenerate, don't edit)."""
    lines = ["| Label | On | Default | Values | Meaning |", "|---|---|---|---|---|"]
    for s in specs:
        cells = [f"`{s.key}`", format_kinds(s.kinds), f"`{format_default(s.default)}`" if s.default is not None else "none",
                 s.allowed, s.doc]
        cells[3:] = [c.replace("`", "\\`") for c in cells[3:]]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


# -- plugins --------------------------------------------------------------------------------------


def plugin_source(info: PluginInfo) -> str:
    """``core`` for the core pseudo-plugin, ``builtin`` for plugins shipped in ``trafficmgr``,
    else ``third-party``."""
    if info.name == "core" and info.builtin:
        return "core"
    return "builtin" if info.builtin else "third-party"


def plugin_row(info: PluginInfo) -> dict[str, Any]:
    """One plugin as a JSON-able dict (``trafficmgr plugins list --json``, ``/debug/plugins``)."""
    return {
        "name": info.name,
        "version": info.version,
        "distribution": info.distribution,
        "source": plugin_source(info),
        "module": info.module,
        "loaded": info.loaded,
        "hooks": list(info.hooks),
        "depends": list(info.depends),
    }


def plugins_table(infos: Iterable[PluginInfo], hook_names: bool = False) -> str:
    """The ``trafficmgr plugins list`` table; NEEDS names the plugins each one builds on
    (``TRAFFICMGR_DEPENDS``); HOOKS is a count, or the names with ``hook_names``. A plugin that is
    installed but not selected is not imported: it shows ``(not loaded)`` and NEEDS ``?``."""
    rows = []
    for info in infos:
        needs = ",".join(info.depends) or "-" if info.loaded else "?"
        if not info.loaded:
            hooks = "(not loaded)"
        elif hook_names:
            hooks = ", ".join(h.removeprefix("trafficmgr_") for h in info.hooks) or "-"
        else:
            hooks = str(len(info.hooks))
        rows.append((info.name, info.version or "-", info.distribution or "-", plugin_source(info), needs, hooks))
    return table(("NAME", "VERSION", "DISTRIBUTION", "SOURCE", "NEEDS", "HOOKS"), rows)


# -- proxy status ---------------------------------------------------------------------------------


def _short_version(version: Any) -> str:
    return "-" if version in (None, "") else str(version)[:8]


def sync_cell(entry: Mapping[str, Any] | None) -> str:
    """One CDS/EDS/... cell of ``proxy-status``.

    ``-`` = not subscribed (nothing sent or acked); ``SYNCED`` = the last version sent was ACKed; ``NACK: <error>`` = not synced and
    Envoy rejected a response (error cut to 60 characters); else ``STALE (sent X, acked Y)`` with
    versions cut to 8 characters.
    """
    if not entry:
        return "-"
    sent, acked, nack = entry.get("sent"), entry.get("acked"), entry.get("last_nack")
    if sent in (None, "") and acked in (None, "") and not nack:
        return "-"
    if sent not in (None, "") and sent == acked:
        return "SYNCED"
    if nack:
        error = " ".join(str(nack.get("error") or "rejected").split())
        return f"NACK: {error[:60]}"
    return f"STALE (sent {_short_version(sent)}, acked {_short_version(acked)})"


def identity_cell(stream: Mapping[str, Any]) -> str:
    """The ``IDENTITY`` cell: the verified SPIFFE ID, or the expected one followed by ``(expected)``, or ``-``."""
    identity = stream.get("identity")
    if not identity:
        return "-"
    return str(identity) if stream.get("identity_verified") else f"{identity} (expected)"


def expiry_cell(stream: Mapping[str, Any]) -> str:
    """The ``CERT EXPIRES`` cell: the xDS client certificate's notAfter in UTC (RFC 3339), ``-`` without mTLS."""
    when = stream.get("cert_expiry")
    if not isinstance(when, (int, float)):
        return "-"
    return _dt.datetime.fromtimestamp(when, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def proxy_status_table(streams: Iterable[Mapping[str, Any]]) -> str:
    """The ``trafficmgr proxy-status`` table, sorted by node id, then replica. ``REPLICA`` (the control
    plane replica holding the stream; after the sync columns) and the identity columns (``IDENTITY``, ``CERT EXPIRES``, ``MTLS``)
    are shown when the admin endpoints report them (an older server does not)."""
    streams = sorted(streams, key=lambda s: (str(s.get("node_id")), str(s.get("replica")), str(s.get("connected_at"))))
    identity = any("identity" in s for s in streams)
    replica = any("replica" in s for s in streams)
    rows = []
    for s in streams:
        row = [s.get("node_id") or "-", s.get("view") or "-", s.get("mode") or "-", *(sync_cell(s.get(t)) for t in TYPES),
               *([s.get("replica") or "-"] if replica else [])]
        if identity:
            row += [identity_cell(s), expiry_cell(s), s.get("mtls") or "-"]
        rows.append(row)
    extra = ("IDENTITY", "CERT EXPIRES", "MTLS") if identity else ()
    return table(("NODE", "ROLE", "MODE", *TYPE_COLUMNS.values(), *(("REPLICA",) if replica else ()), *extra), rows)


# -- resources and redaction ----------------------------------------------------------------------


def _import_type(type_name: str) -> bool:
    """Import the generated module(s) of the package holding message ``type_name``; True if any loaded."""
    package = type_name.rsplit(".", 1)[0]
    try:
        pkg = importlib.import_module(package)
    except ImportError:
        return False
    loaded = False
    for mod in pkgutil.iter_modules(getattr(pkg, "__path__", [])):
        if mod.name.endswith("_pb2"):
            try:
                importlib.import_module(f"{package}.{mod.name}")
                loaded = True
            except ImportError:
                continue
    return loaded


def message_dict(message: Message) -> dict[str, Any]:
    """``MessageToDict(message, preserving_proto_field_name=True)``, importing the generated modules of
    ``Any`` payloads that are not loaded yet (for example a filter the builder never imported)."""
    tried: set[str] = set()
    while True:
        try:
            return json_format.MessageToDict(message, preserving_proto_field_name=True)
        except (TypeError, KeyError, json_format.Error) as exc:
            m = re.search(r"type\.googleapis\.com/([\w.]+)", str(exc))
            if not m or m.group(1) in tried or not _import_type(m.group(1)):
                raise
            tried.add(m.group(1))


def _looks_like_key(value: str) -> bool:
    if _PEM_KEY.search(value):
        return True
    if len(value) >= 40 and re.fullmatch(r"[A-Za-z0-9+/=\s]+", value):
        try:
            return _PEM_KEY.search(base64.b64decode(value, validate=False).decode("latin-1")) is not None
        except (binascii.Error, ValueError):
            return False
    return False


def redact(data: Any) -> Any:
    """A copy of a ``MessageToDict`` tree with secret fields replaced by ``{"redacted": true}``."""
    if isinstance(data, dict):
        return {k: dict(REDACTED) if k in _SECRET_FIELDS else redact(v) for k, v in data.items()}
    if isinstance(data, list):
        return [redact(v) for v in data]
    if isinstance(data, str) and _looks_like_key(data):
        return dict(REDACTED)
    return data


def _pem_text(source: Mapping[str, Any] | None) -> str | None:
    """The PEM text of an inline DataSource dict (``inline_string`` or base64 ``inline_bytes``)."""
    if not source:
        return None
    if "inline_string" in source:
        return str(source["inline_string"])
    if "inline_bytes" in source:
        try:
            return base64.b64decode(source["inline_bytes"]).decode("ascii", "replace")
        except (binascii.Error, ValueError):
            return None
    return None


def certificate_info(pem: str) -> dict[str, Any]:
    """Subject, SANs, serial (hex) and not-after (ISO 8601, UTC) of the first certificate in ``pem``.

    Uses ``cryptography`` when installed, else the standard library's certificate decoder; on a
    parse failure returns ``{"error": ...}``.
    """
    first = re.search(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem, re.S)
    if not first:
        return {"error": "no PEM certificate found"}
    try:
        return _cert_info_cryptography(first.group(0))
    except ImportError:
        pass
    except Exception as exc:  # noqa: BLE001 - a bad certificate must not break a dump
        return {"error": f"cannot parse certificate: {exc}"}
    try:
        return _cert_info_ssl(first.group(0))
    except Exception as exc:  # noqa: BLE001 - likewise
        return {"error": f"cannot parse certificate: {exc}"}


def _cert_info_cryptography(pem: str) -> dict[str, Any]:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(pem.encode())
    sans: list[str] = []
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans += [f"DNS:{n}" for n in ext.get_values_for_type(x509.DNSName)]
        sans += [f"IP:{n}" for n in ext.get_values_for_type(x509.IPAddress)]
        sans += [f"URI:{n}" for n in ext.get_values_for_type(x509.UniformResourceIdentifier)]
    except x509.ExtensionNotFound:
        pass
    not_after = cert.not_valid_after_utc
    return {
        "subject": cert.subject.rfc4514_string(),
        "sans": sans,
        "serial": format(cert.serial_number, "x"),
        "not_after": not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _cert_info_ssl(pem: str) -> dict[str, Any]:
    import ssl

    fd, path = tempfile.mkstemp(suffix=".pem")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(pem)
        decoded = ssl._ssl._test_decode_cert(path)  # type: ignore[attr-defined]  # private, no stub
    finally:
        os.unlink(path)
    short = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C",
             "stateOrProvinceName": "ST", "localityName": "L", "domainComponent": "DC"}
    subject = ",".join(f"{short.get(k, k)}={v}" for rdn in reversed(decoded.get("subject", ())) for k, v in rdn)
    sans = [f"{'IP' if kind == 'IP Address' else kind}:{value}" for kind, value in decoded.get("subjectAltName", ())]
    not_after = _dt.datetime.strptime(decoded["notAfter"], "%b %d %H:%M:%S %Y %Z")
    return {
        "subject": subject,
        "sans": sans,
        "serial": decoded.get("serialNumber", "").lower().lstrip("0") or "0",
        "not_after": not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def resource_dict(resource: cache.Resource) -> dict[str, Any]:
    """``{"name", "version", "config"}`` for a config dump, private keys redacted (see module docstring).

    For a Secret with a ``tls_certificate``, ``"certificate"`` adds the certificate's subject, SANs,
    serial and not-after.
    """
    config = message_dict(resource.message())
    out: dict[str, Any] = {"name": resource.name, "version": resource.version, "config": redact(config)}
    if resource.type_url == cache.SECRET and "tls_certificate" in config:
        pem = _pem_text(config["tls_certificate"].get("certificate_chain"))
        out["certificate"] = certificate_info(pem) if pem else {"error": "certificate is not inline"}
    return out
