"""The mesh CA: the key and certificate that sign workload certificates, kept in a Kubernetes Secret.

The Secret (default ``trafficmgr-mesh-ca`` in the control plane's namespace) has cert-manager's CA-Issuer
format, type ``kubernetes.io/tls``:

- ``tls.crt``: the signing CA certificate, optionally followed by its chain up to a root;
- ``tls.key``: its private key;
- ``ca.crt``: the trusted roots (the trust bundle); absent: the root at the end of ``tls.crt``.

Modes: ``generate`` (default) creates an EC P-256 self-signed root (10 years) on first start with one
``create``; a replica that loses the race (409 AlreadyExists) reads the winner's, so every replica signs
with the same CA. ``provided`` never creates anything: it waits for the Secret (logging that it does).

The Secret is watched: a change applies without restart (the trust bundle, the signing CA, the serving
certificates made from it). The trust bundle is published in ConfigMap ``trafficmgr-trust-bundle`` (key
``ca.crt``), written only when it differs, so replicas do not fight over it.

Root rotation with overlap: (1) add the new root to ``ca.crt`` (bundle: old + new; still signing with the
old CA); (2) once the node agents have the new bundle, switch ``tls.crt``/``tls.key`` to the new CA (new
certificates chain to the new root, old ones are still trusted); (3) after the longest workload TTL,
remove the old root from ``ca.crt``.

Safety: the CA key is read from the Secret into this process's memory and never written anywhere else,
never logged, never sent (serving certificates get fresh keys of their own, see :meth:`MeshCA.serving_cert`).
Nothing here ever logs a PEM block.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trafficmgr.core import metrics
from trafficmgr.core.identity import BUNDLE_CONFIGMAP, BUNDLE_KEY

if TYPE_CHECKING:
    import grpc

    from trafficmgr.core.kube.client import KubeClient
    from trafficmgr.core.kube.watch import Watcher

log = logging.getLogger(__name__)

DEFAULT_SECRET = "trafficmgr-mesh-ca"
MODES = ("generate", "provided")
#: Lifetime of a generated root.
ROOT_LIFETIME = datetime.timedelta(days=3650)
#: notBefore of issued certificates lies this far back (clocks of nodes differ a little).
BACKDATE = datetime.timedelta(minutes=1)
#: Smallest and largest RSA key accepted in a CSR.
MIN_RSA_BITS, MAX_RSA_BITS = 2048, 8192
#: How often the ConfigMap is checked even without a Secret change (someone may have edited it).
REPUBLISH_SECONDS = 60.0

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey


class CAError(Exception):
    """The CA Secret is unusable (the message names the Secret and the key), or the CA is not loaded."""


class CSRError(ValueError):
    """A certificate signing request that cannot be signed (the message says why)."""


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def not_after(cert: x509.Certificate) -> datetime.datetime:
    return cert.not_valid_after_utc


def _self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


@attrs.frozen(slots=True)
class Material:
    """A loaded, checked CA: ``cert`` signs with ``key``; ``chain`` are the certificates after it in
    ``tls.crt`` (intermediates, maybe the root); ``roots`` the trust bundle."""

    cert: x509.Certificate
    key: PrivateKey
    chain: tuple[x509.Certificate, ...]
    roots: tuple[x509.Certificate, ...]
    version: str = ""
    #: PEM of the signing CA and its intermediates (what follows a leaf in an issued chain; a
    #: self-signed root at the end of ``tls.crt`` is left out unless it is the signing CA itself).
    chain_pem: str = ""

    @property
    def bundle_pem(self) -> str:
        return "".join(pem(c) for c in self.roots)

    @property
    def expires(self) -> datetime.datetime:
        """When the signing CA (or a certificate above it) expires: no leaf outlives it."""
        return min(not_after(c) for c in (self.cert, *self.chain))


def _certs(data: bytes, where: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CAError(f"{where}: not PEM certificates") from None
    return certs


def load_material(data: dict[str, str], where: str, version: str = "") -> Material:
    """Check and load a CA Secret's ``data`` (base64 values, as the API returns them); ``where`` names the
    Secret in errors (``Secret ns/name``). Raises :class:`CAError` naming the key at fault."""

    def raw(key: str, required: bool = True) -> bytes | None:
        value = data.get(key)
        if value is None:
            if required:
                raise CAError(f"{where}: key {key} missing (a kubernetes.io/tls CA Secret needs tls.crt and tls.key)")
            return None
        try:
            return base64.b64decode(value, validate=True)
        except ValueError:
            raise CAError(f"{where}: key {key} is not base64") from None

    cert_pem, key_pem = raw("tls.crt"), raw("tls.key")
    assert cert_pem is not None and key_pem is not None
    ca_pem = raw("ca.crt", required=False)
    certs = _certs(cert_pem, f"{where} key tls.crt")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise CAError(f"{where}: key tls.key is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        raise CAError(f"{where}: key tls.key: unsupported key type {type(key).__name__}")
    cert, chain = certs[0], tuple(certs[1:])
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, pub) != cert.public_key().public_bytes(serialization.Encoding.DER, pub):
        raise CAError(f"{where}: key tls.key does not match the first certificate of tls.crt")
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        basic = None
    if basic is None or not basic.ca:
        raise CAError(f"{where}: key tls.crt: the certificate is not a CA (basicConstraints CA:TRUE missing)")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not usage.key_cert_sign:
            raise CAError(f"{where}: key tls.crt: the CA certificate's keyUsage lacks keyCertSign")
    except x509.ExtensionNotFound:
        pass
    now = datetime.datetime.now(datetime.UTC)
    if not_after(cert) <= now:
        raise CAError(f"{where}: key tls.crt: the CA certificate expired at {not_after(cert).isoformat()}")
    roots = _certs(ca_pem, f"{where} key ca.crt") if ca_pem is not None and ca_pem.strip() else []
    top = certs[-1]
    if _self_signed(top) and all(r.fingerprint(hashes.SHA256()) != top.fingerprint(hashes.SHA256()) for r in roots):
        roots.append(top)
    if not roots:
        raise CAError(f"{where}: key ca.crt missing and tls.crt ends without a self-signed root: "
                      "no trust bundle (add the root as ca.crt)")
    # tls.crt must chain up to one of the roots (its own certificates, then the roots).
    current = cert
    for issuer in chain:
        if not _issued_by(current, issuer):
            raise CAError(f"{where}: key tls.crt: certificate {issuer.subject.rfc4514_string()!r} did not issue "
                          f"{current.subject.rfc4514_string()!r} (order: signing CA first, then up to the root)")
        current = issuer
    if not any(_same(current, r) or _issued_by(current, r) for r in roots):
        raise CAError(f"{where}: key tls.crt does not chain to any root in ca.crt")
    chain_pem = "".join(pem(c) for c in (cert, *chain) if c is cert or not _self_signed(c))
    return Material(cert=cert, key=key, chain=chain, roots=tuple(roots), version=version, chain_pem=chain_pem)


def _short(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:200]


def _same(a: x509.Certificate, b: x509.Certificate) -> bool:
    return a.fingerprint(hashes.SHA256()) == b.fingerprint(hashes.SHA256())


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _hash_for(key: PrivateKey) -> hashes.HashAlgorithm | None:
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def generate_root(trust_domain: str, lifetime: datetime.timedelta = ROOT_LIFETIME) -> dict[str, str]:
    """A new self-signed EC P-256 root as the ``data`` of a CA Secret (base64 values)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                      x509.NameAttribute(NameOID.COMMON_NAME, "trafficmgr mesh root CA")])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE).not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return {k: base64.b64encode(v).decode() for k, v in (("tls.crt", cert_pem), ("tls.key", key_pem), ("ca.crt", cert_pem))}


@attrs.frozen(slots=True)
class CheckedCSR:
    """A CSR whose signature, key and SAN were checked: ``uri`` is its one URI SAN."""

    csr: x509.CertificateSigningRequest
    uri: str


def check_csr(csr_pem: str | bytes) -> CheckedCSR:
    """Parse and check a workload CSR: valid signature, EC P-256/P-384 or RSA 2048..8192 key, exactly one
    SAN and that a URI. Raises :class:`CSRError` with the reason."""
    data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError:
        raise CSRError("csr is not a PEM certificate signing request") from None
    if not csr.is_signature_valid:
        raise CSRError("CSR signature does not verify (not signed by the key it carries)")
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1 | ec.SECP384R1):
            raise CSRError(f"CSR key: EC curve {key.curve.name} not accepted (use P-256 or P-384)")
    elif isinstance(key, rsa.RSAPublicKey):
        if not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
            raise CSRError(f"CSR key: RSA {key.key_size} bits not accepted (use {MIN_RSA_BITS}..{MAX_RSA_BITS})")
    else:
        raise CSRError(f"CSR key: {type(key).__name__.lstrip('_')} not accepted (use EC P-256/P-384 or RSA >= 2048)")
    try:
        sans = list(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        raise CSRError("CSR has no subjectAltName (it needs exactly one: the workload's SPIFFE ID URI)") from None
    except ValueError as exc:
        raise CSRError(f"CSR extensions do not parse: {exc}") from None
    if len(sans) != 1:
        raise CSRError(f"CSR has {len(sans)} subjectAltNames (it needs exactly one: the workload's SPIFFE ID URI)")
    if not isinstance(sans[0], x509.UniformResourceIdentifier):
        kind = type(sans[0]).__name__
        raise CSRError(f"CSR subjectAltName is a {kind}, not a URI (it needs exactly one: the workload's SPIFFE ID URI)")
    return CheckedCSR(csr, sans[0].value)


class MeshCA:
    """The mesh CA of one control-plane replica, loaded from (or created as) the Secret.

    :meth:`start` loads it (generate mode: creates it first if absent) and starts the Secret watch and
    the ConfigMap publisher; :meth:`sign` and :meth:`serving_cert` raise :class:`CAError` until a CA is
    loaded (provided mode without the Secret yet). ``generation`` counts loads, so holders of derived
    certificates (the serving certificates) know when to remake them; listeners added with
    :meth:`on_change` are called after each change."""

    def __init__(self, kube: KubeClient, namespace: str, secret: str = DEFAULT_SECRET, mode: str = "generate",
                 trust_domain: str = "cluster.local", publish: bool = True) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mesh CA mode {mode!r} (use {' or '.join(MODES)})")
        self.kube = kube
        self.namespace = namespace
        self.secret = secret
        self.mode = mode
        self.trust_domain = trust_domain
        self.publish = publish
        self.where = f"Secret {namespace}/{secret}"
        self.generation = 0
        self.error = ""  # why the last Secret version was not loaded ("" when it was)
        self._material: Material | None = None
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []
        self._ready = threading.Event()
        self._changed = threading.Event()
        self._stop = threading.Event()
        self._watcher: Watcher | None = None
        self._publisher: threading.Thread | None = None
        self.created = False  # this instance created the Secret (generate mode)

    # -- loading -------------------------------------------------------------------------------

    @property
    def _path(self) -> str:
        return f"/api/v1/namespaces/{self.namespace}/secrets"

    def _get_secret(self) -> dict[str, Any] | None:
        from trafficmgr.core.kube.client import ApiException

        try:
            return self.kube.request("GET", f"{self._path}/{self.secret}")
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise CAError(f"cannot read {self.where}: HTTP {exc.status} {exc.reason}") from None
        except Exception as exc:  # noqa: BLE001 - connection errors come in many types
            raise CAError(f"cannot read {self.where}: {_short(exc)}") from None

    def _generate(self) -> dict[str, str]:
        """The data of a new Secret (a separate step so tests can interleave two replicas)."""
        return generate_root(self.trust_domain)

    def _create_secret(self) -> dict[str, Any]:
        """Create the Secret with a new root; on 409 read the one another replica created first."""
        from trafficmgr.core.kube.client import ApiException

        body = {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                "metadata": {"name": self.secret, "namespace": self.namespace,
                             "labels": {"app.kubernetes.io/managed-by": "trafficmgr"}},
                "data": self._generate()}
        try:
            obj = self.kube.request("POST", self._path, body=body)
        except ApiException as exc:
            if exc.status != 409:
                raise CAError(f"cannot create {self.where}: HTTP {exc.status} {exc.reason}") from None
            log.info("%s was created by another replica meanwhile; using it", self.where)
            existing = self._get_secret()
            if existing is None:
                raise CAError(f"{self.where}: create said AlreadyExists but it cannot be read") from None
            return existing
        except Exception as exc:  # noqa: BLE001 - connection errors come in many types
            raise CAError(f"cannot create {self.where}: {_short(exc)}") from None
        self.created = True
        log.info("created the mesh CA (EC P-256 self-signed root, %d days) in %s", ROOT_LIFETIME.days, self.where)
        return obj

    def load(self) -> bool:
        """Read the Secret once (generate mode: create it when absent) and load it. Returns False when it
        does not exist (provided mode); raises :class:`CAError` when it is unusable."""
        secret = self._get_secret()
        if secret is None:
            if self.mode == "provided":
                return False
            secret = self._create_secret()
        self._apply(secret, raise_errors=True)
        return True

    def _apply(self, secret: dict[str, Any], raise_errors: bool = False) -> None:
        version = secret.get("metadata", {}).get("resourceVersion", "")
        with self._lock:
            if self._material is not None and version and version == self._material.version:
                return
        try:
            material = load_material(secret.get("data") or {}, self.where, version)
        except CAError as exc:
            if raise_errors:
                raise
            if str(exc) != self.error:
                keeping = "still signing with the CA loaded before" if self._material else "not signing"
                log.error("mesh CA not (re)loaded, %s: %s", keeping, exc)
            self.error = str(exc)
            return
        with self._lock:
            old = self._material
            self._material = material
            self.generation += 1
            self.error = ""
        metrics.CA_EXPIRY.set(material.expires.timestamp())
        if old is None:
            log.info("mesh CA loaded from %s: signing CA %r (expires %s), %d trusted root(s)", self.where,
                     material.cert.subject.rfc4514_string(), material.expires.isoformat(), len(material.roots))
        else:
            log.info("mesh CA reloaded from %s (resourceVersion %s): signing CA %r, %d trusted root(s)", self.where,
                     version, material.cert.subject.rfc4514_string(), len(material.roots))
        self._ready.set()
        self._changed.set()
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:  # a listener's bug must not stop the CA from reloading
                log.exception("mesh CA change listener failed")

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, watch: bool = True) -> MeshCA:
        """Load (or create) the CA, then watch the Secret and publish the bundle ConfigMap. Raises
        :class:`CAError` for an unusable Secret; in provided mode a missing Secret is waited for."""
        if not self.load():
            log.warning("waiting for %s (--mesh-ca-mode provided: it is never created here); no certificate is "
                        "signed until it exists", self.where)
        if watch:
            from trafficmgr.core.kube.client import Kind
            from trafficmgr.core.kube.watch import Watcher

            kind = Kind("Secret", "v1", "secrets")
            self._watcher = Watcher(self.kube, kind, self._on_event, namespace=self.namespace,
                                    field_selector=f"metadata.name={self.secret}")
            self._watcher.start()
        if self.publish:
            self._publisher = threading.Thread(target=self._publish_loop, name="mesh-ca-bundle", daemon=True)
            self._publisher.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._changed.set()
        if self._watcher is not None:
            self._watcher.stop()
        if self._publisher is not None:
            self._publisher.join(5)

    def _on_event(self, etype: str, kind: Any, obj: Any) -> None:
        if etype == "RELIST":
            mine = [o for o in obj if o.get("metadata", {}).get("name") == self.secret]
            if mine:
                self._apply(mine[0])
            return
        if etype == "DELETED":
            if self._material is not None:
                log.warning("%s was deleted; still signing with the CA loaded before (a restart in generate mode "
                            "would create a new root that no workload trusts yet)", self.where)
            return
        self._apply(obj)

    def wait_ready(self, timeout: float | None = None, stop: threading.Event | None = None) -> bool:
        """Block until a CA is loaded (or ``stop`` is set / ``timeout`` passes); logs every 30 s."""
        end = None if timeout is None else time.monotonic() + timeout
        last = time.monotonic()
        while not self._ready.wait(0.2):
            if (stop is not None and stop.is_set()) or (end is not None and time.monotonic() > end):
                return False
            if time.monotonic() - last > 30:
                last = time.monotonic()
                log.warning("still waiting for %s%s", self.where, f": {self.error}" if self.error else "")
        return True

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    # -- the trust bundle ConfigMap ------------------------------------------------------------

    def _publish_loop(self) -> None:
        while not self._stop.is_set():
            self._changed.wait(REPUBLISH_SECONDS)
            self._changed.clear()
            if self._stop.is_set():
                return
            if self._material is not None:
                try:
                    self.publish_bundle()
                except Exception as exc:  # noqa: BLE001 - retried on the next change or period
                    log.warning("cannot publish ConfigMap %s/%s (retrying): %s", self.namespace, BUNDLE_CONFIGMAP,
                                str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
                    self._stop.wait(2.0)
                    self._changed.set()

    def publish_bundle(self) -> bool:
        """Write the trust bundle to the ConfigMap if it differs (create when absent; on a conflict with
        another replica, read again). Returns True when it wrote."""
        from trafficmgr.core.kube.client import ApiException

        bundle = self.trust_bundle()
        path = f"/api/v1/namespaces/{self.namespace}/configmaps"
        for _ in range(5):
            try:
                current = self.kube.request("GET", f"{path}/{BUNDLE_CONFIGMAP}")
            except ApiException as exc:
                if exc.status != 404:
                    raise
                current = None
            if current is not None and (current.get("data") or {}).get(BUNDLE_KEY) == bundle:
                return False
            try:
                if current is None:
                    body = {"apiVersion": "v1", "kind": "ConfigMap",
                            "metadata": {"name": BUNDLE_CONFIGMAP, "namespace": self.namespace,
                                         "labels": {"app.kubernetes.io/managed-by": "trafficmgr"}},
                            "data": {BUNDLE_KEY: bundle}}
                    self.kube.request("POST", path, body=body)
                else:
                    current["data"] = {**(current.get("data") or {}), BUNDLE_KEY: bundle}
                    self.kube.request("PUT", f"{path}/{BUNDLE_CONFIGMAP}", body=current)
            except ApiException as exc:
                if exc.status == 409:  # another replica wrote first: compare again
                    continue
                raise
            log.info("trust bundle published in ConfigMap %s/%s (%d root(s))", self.namespace, BUNDLE_CONFIGMAP,
                     len(self.material().roots))
            return True
        return False

    # -- using the CA --------------------------------------------------------------------------

    def material(self) -> Material:
        m = self._material
        if m is None:
            raise CAError(f"mesh CA not loaded yet ({self.error or 'waiting for ' + self.where})")
        return m

    def trust_bundle(self) -> str:
        """PEM of every trusted root (old and new during a rotation)."""
        return self.material().bundle_pem

    def _issue(self, public_key: Any, sans: Sequence[x509.GeneralName], ttl: datetime.timedelta,
               subject: x509.Name | None = None) -> tuple[str, datetime.datetime]:
        m = self.material()
        now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)  # X.509 times have whole seconds
        end = min(now + ttl, m.expires)
        ca_ski: Any
        try:
            ca_ski = m.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
        except x509.ExtensionNotFound:
            aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(m.key.public_key())
        cert = (
            x509.CertificateBuilder().subject_name(subject or x509.Name([])).issuer_name(m.cert.subject)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            # An empty subject makes the SAN critical (RFC 5280 4.2.1.6), as SPIFFE X.509-SVIDs have it.
            .add_extension(x509.SubjectAlternativeName(list(sans)), critical=subject is None)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(aki, critical=False)
            .sign(m.key, _hash_for(m.key))  # type: ignore[arg-type]
        )
        return pem(cert) + m.chain_pem, cert.not_valid_after_utc

    def sign(self, csr: str | bytes | CheckedCSR, spiffe_id: str, ttl: datetime.timedelta) -> tuple[str, datetime.datetime]:
        """Sign a workload CSR (PEM, or already :func:`check_csr`-ed) whose only SAN must be ``spiffe_id``:
        ``(chain PEM, notAfter)``, the chain being the leaf, the signing CA and its intermediates. Raises
        :class:`CSRError` / :class:`CAError`."""
        checked = csr if isinstance(csr, CheckedCSR) else check_csr(csr)
        if checked.uri != spiffe_id:
            raise CSRError(f"CSR asks for {checked.uri}, expected {spiffe_id}")
        return self._issue(checked.csr.public_key(), [x509.UniformResourceIdentifier(spiffe_id)], ttl)

    def serving_cert(self, dns_names: Sequence[str], ips: Sequence[str], spiffe_id: str | None = None,
                     ttl: datetime.timedelta = datetime.timedelta(hours=24)) -> tuple[bytes, bytes, datetime.datetime]:
        """A TLS certificate for the control plane's own listeners: ``(key PEM, chain PEM, notAfter)``. The
        key is new, made here, and only kept in memory by the caller (the CA key never leaves)."""
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        if spiffe_id:
            sans.append(x509.UniformResourceIdentifier(spiffe_id))
        if not sans:
            raise ValueError("a serving certificate needs at least one DNS name or IP")
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0] if dns_names else ips[0])])
        chain, end = self._issue(key.public_key(), sans, ttl, subject=subject)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        return key_pem, chain.encode(), end


class ServingCredentials:
    """gRPC server credentials whose certificate comes from the mesh CA and follows it: remade at half
    its lifetime and whenever the CA changes (a new signing CA, a new trust bundle), with no restart
    (``grpc.dynamic_ssl_server_credentials`` asks :meth:`fetch` at each handshake; it returns None,
    "unchanged", except after a change). With ``client_auth`` the trust bundle is the client CA and a
    client certificate is required (``serve --xds-auth mtls``)."""

    def __init__(self, ca: MeshCA, dns_names: Sequence[str], ips: Sequence[str], client_auth: bool = False,
                 ttl: datetime.timedelta = datetime.timedelta(hours=24)) -> None:
        self.ca = ca
        self.dns_names = list(dns_names)
        self.ips = list(ips)
        self.client_auth = client_auth
        self.ttl = ttl
        self._lock = threading.Lock()
        self._generation = -1
        self._renew_at = 0.0
        self._config: Any = None

    def _make(self) -> Any:
        import grpc

        key, chain, end = self.ca.serving_cert(self.dns_names, self.ips, ttl=self.ttl)
        now = time.time()
        self._renew_at = now + max(30.0, (end.timestamp() - now) / 2)
        roots = self.ca.trust_bundle().encode() if self.client_auth else None
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=roots)

    def fetch(self) -> Any:
        """The new configuration after a CA change or at half-life, else None (keep the current one)."""
        with self._lock:
            if self.ca.generation == self._generation and time.time() < self._renew_at:
                return None
            try:
                generation = self.ca.generation
                self._config = self._make()
                self._generation = generation
            except Exception:  # noqa: BLE001 - keep serving the current certificate; retried next handshake
                log.exception("cannot renew the serving certificate from the mesh CA; keeping the current one")
                self._renew_at = time.time() + 30
                return None
            return self._config

    def credentials(self) -> grpc.ServerCredentials:
        """The ``grpc.ServerCredentials`` (the CA must be loaded)."""
        import grpc

        with self._lock:
            generation = self.ca.generation
            initial = self._make()
            self._generation = generation
        return grpc.dynamic_ssl_server_credentials(initial, self.fetch, require_client_authentication=self.client_auth)
