"""Where a proxy's workload identity lives on disk, and how Envoy reads it (the contract between the node
agent, which writes the files, and the plugins, whose Envoy config reads them).

Every proxy runs with its working directory set to its own state directory; the identity is in
``identity/`` below it, so one shared Envoy config (relative paths) serves every sidecar while each
reads only its own key:

- ``identity/cert.pem``: the workload certificate chain (leaf first, then any intermediate CA);
- ``identity/key.pem``: its private key (made on the node, never sent anywhere);
- ``identity/bundle.pem``: the trusted mesh roots (old and new during a root rotation);
- ``identity/cert.yaml`` / ``identity/bundle.yaml``: Envoy file-based SDS documents naming the above.

The three PEM files are symlinks into ``identity/..data/``, itself a symlink to a fresh timestamped
directory that :func:`write` swaps with one ``rename(2)`` (as Kubernetes' AtomicWriter does), so Envoy's
watch of ``identity/`` sees the key and the certificate change together and never reads a mismatched pair.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

#: The identity directory, relative to the proxy's working directory.
DIRECTORY = "identity"
CERT = "cert.pem"
KEY = "key.pem"
BUNDLE = "bundle.pem"
CERT_SDS = "cert.yaml"
BUNDLE_SDS = "bundle.yaml"
#: SDS secret names (file-based SDS: never served by the control plane).
CERT_SECRET = "trafficmgr-workload"
BUNDLE_SECRET = "trafficmgr-trust-bundle"
_DATA = "..data"
_SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


def _rel(name: str) -> str:
    return f"{DIRECTORY}/{name}"


def sds_config(secret: str) -> dict[str, Any]:
    """The ``SdsSecretConfig`` (JSON form) that makes Envoy read ``secret`` (:data:`CERT_SECRET` or
    :data:`BUNDLE_SECRET`) from the files, reloading when the directory changes."""
    document = CERT_SDS if secret == CERT_SECRET else BUNDLE_SDS
    return {"name": secret, "sds_config": {
        "path_config_source": {"path": _rel(document), "watched_directory": {"path": DIRECTORY}},
        "resource_api_version": "V3"}}


def _documents() -> dict[str, str]:
    import json

    cert = {"resources": [{"@type": _SECRET_TYPE, "name": CERT_SECRET, "tls_certificate": {
        "certificate_chain": {"filename": _rel(CERT)}, "private_key": {"filename": _rel(KEY)},
        "watched_directory": {"path": DIRECTORY}}}]}
    bundle = {"resources": [{"@type": _SECRET_TYPE, "name": BUNDLE_SECRET, "validation_context": {
        "trusted_ca": {"filename": _rel(BUNDLE)}, "watched_directory": {"path": DIRECTORY}}}]}
    return {CERT_SDS: json.dumps(cert, indent=1), BUNDLE_SDS: json.dumps(bundle, indent=1)}


def write(base: str, key_pem: bytes, chain_pem: bytes, bundle_pem: bytes, uid: int | None = None) -> None:
    """Write (or atomically replace) the identity below ``base`` (the proxy's working directory).

    The directory is mode 0700 and the files 0400, owned by ``uid`` (the proxy's user) when given and we
    are root: the proxy, and nothing else but root, reads the key."""
    top = os.path.join(base, DIRECTORY)
    os.makedirs(top, mode=0o700, exist_ok=True)
    fresh = os.path.join(top, f"..{time.time_ns()}")
    os.mkdir(fresh, 0o700)
    for name, data in ((KEY, key_pem), (CERT, chain_pem), (BUNDLE, bundle_pem)):
        path = os.path.join(fresh, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    for name, text in _documents().items():
        path = os.path.join(top, name)
        if not os.path.exists(path):
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(path + ".tmp", path)
    if uid is not None and os.geteuid() == 0:
        for path in (top, fresh, *(os.path.join(fresh, n) for n in (KEY, CERT, BUNDLE))):
            os.chown(path, uid, uid)
    data_link = os.path.join(top, _DATA)
    old = os.path.realpath(data_link) if os.path.islink(data_link) else None
    tmp_link = os.path.join(top, "..data_tmp")
    if os.path.lexists(tmp_link):
        os.unlink(tmp_link)
    os.symlink(os.path.basename(fresh), tmp_link)
    os.replace(tmp_link, data_link)  # the one atomic step
    for name in (KEY, CERT, BUNDLE):
        link = os.path.join(top, name)
        if not os.path.islink(link):
            os.symlink(os.path.join(_DATA, name), link + ".tmp")
            os.replace(link + ".tmp", link)
    if old and old != os.path.realpath(fresh):
        shutil.rmtree(old, ignore_errors=True)


def read_chain(base: str) -> bytes | None:
    """The current certificate chain below ``base``, or None when there is none yet."""
    try:
        with open(os.path.join(base, DIRECTORY, CERT), "rb") as f:
            return f.read()
    except OSError:
        return None
