"""The mesh CA (:mod:`trafficmgr.core.identity.ca`) against the real local API server through the official
client: generate mode (one Secret even when two replicas race), provided mode (cert-manager format with an
intermediate), bad Secrets (clear errors), the trust bundle ConfigMap, rotation without restart."""

from __future__ import annotations

import datetime as dt
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from tests.identity.mesh import NS, Api, api_fixture, csr, key_pem, make_ca, pem, secret, uri_sans, verify_chain
from trafficmgr.apiserver import ApiError
from trafficmgr.core import metrics
from trafficmgr.core.identity import BUNDLE_CONFIGMAP
from trafficmgr.core.identity.ca import CAError, CSRError, MeshCA
from trafficmgr.core.identity.spiffe import spiffe_id

ID = spiffe_id("cluster.local", "default", "reviews")
DAY = dt.timedelta(hours=24)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    yield from api_fixture(tmp_path)


def _wait(predicate: object, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def test_generate_creates_the_secret_once_even_when_two_replicas_race(api: Api) -> None:
    """Two MeshCA instances both find no Secret and both make a root (held at a barrier so they really
    race); one create wins, the other gets 409 and reads the winner's: both sign with one CA."""
    barrier = threading.Barrier(2)

    class Racing(MeshCA):
        def _generate(self) -> dict[str, str]:
            data = super()._generate()
            barrier.wait(10)
            return data

    creates: list[str] = []
    api.store.subscribe(lambda ev: creates.append(ev.obj["metadata"]["name"])
                        if ev.type == "ADDED" and ev.obj.get("kind") == "Secret" else None)
    cas = [Racing(api.kube, NS, "mesh-ca", publish=False) for _ in range(2)]
    errors: list[BaseException] = []

    def load(ca: MeshCA) -> None:
        try:
            ca.load()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=load, args=(ca,)) for ca in cas]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors
    assert creates == ["mesh-ca"]
    assert sorted(ca.created for ca in cas) == [False, True]
    fingerprints = {ca.material().cert.fingerprint(hashes.SHA256()) for ca in cas}
    assert len(fingerprints) == 1
    stored = api.store.get("secrets", "mesh-ca", NS)
    assert stored["type"] == "kubernetes.io/tls" and set(stored["data"]) == {"tls.crt", "tls.key", "ca.crt"}
    root = cas[0].material().cert
    assert root.not_valid_after_utc - root.not_valid_before_utc > dt.timedelta(days=3640)
    # A later start reads it again (no new root).
    again = MeshCA(api.kube, NS, "mesh-ca", publish=False)
    assert again.load() and not again.created
    assert again.material().cert.fingerprint(hashes.SHA256()) in fingerprints


def test_provided_cert_manager_secret_with_an_intermediate(api: Api, tmp_path: Path) -> None:
    """tls.crt = intermediate (the signing CA), ca.crt = the offline root: issued chains verify to ca.crt
    (cryptography's path validation and ``openssl verify``); the leaf has the URI SAN, 24 h, our
    extensions; the bundle is ca.crt; provided mode never creates anything."""
    root = make_ca("offline-root")
    inter = make_ca("mesh-intermediate", issuer=root)
    ca = MeshCA(api.kube, NS, "mesh-ca", mode="provided", publish=False)
    assert ca.load() is False  # absent: waited for, not created
    with pytest.raises(ApiError):
        api.store.get("secrets", "mesh-ca", NS)
    api.store.create(secret(pem(inter[0]), key_pem(inter[1]), pem(root[0])))
    assert ca.load() is True
    chain, expires = ca.sign(csr([ID])[0], ID, DAY)
    certs = x509.load_pem_x509_certificates(chain.encode())
    assert [c.subject for c in certs[1:]] == [inter[0].subject]  # leaf + signing CA
    leaf = verify_chain(chain, ca.trust_bundle())
    assert uri_sans(leaf) == [ID]
    assert abs((leaf.not_valid_after_utc - leaf.not_valid_before_utc) - (DAY + dt.timedelta(minutes=1))) < dt.timedelta(seconds=5)
    assert expires == leaf.not_valid_after_utc
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {x509.oid.ExtendedKeyUsageOID.SERVER_AUTH, x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH}
    assert ca.trust_bundle().encode() == pem(root[0])
    (tmp_path / "root.pem").write_bytes(pem(root[0]))
    (tmp_path / "inter.pem").write_bytes(pem(inter[0]))
    (tmp_path / "leaf.pem").write_bytes(pem(leaf))
    out = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "root.pem"), "-untrusted",
                          str(tmp_path / "inter.pem"), str(tmp_path / "leaf.pem")], capture_output=True, text=True)
    assert out.returncode == 0 and ": OK" in out.stdout, out.stdout + out.stderr
    # Against the intermediate alone (no root) the chain does not verify: the check above means something.
    with pytest.raises(x509.verification.VerificationError):
        verify_chain(pem(leaf), pem(make_ca("other-root")[0]))


def test_leaf_never_outlives_the_signing_ca(api: Api) -> None:
    root = make_ca("short-root", days=2)
    api.store.create(secret(pem(root[0]), key_pem(root[1])))
    ca = MeshCA(api.kube, NS, "mesh-ca", mode="provided", publish=False)
    ca.load()
    chain, expires = ca.sign(csr([ID])[0], ID, dt.timedelta(days=30))
    assert expires == root[0].not_valid_after_utc
    assert metrics.REGISTRY.get_sample_value("trafficmgr_ca_expiry_timestamp_seconds") == root[0].not_valid_after_utc.timestamp()


@pytest.mark.parametrize("case, expected", [
    ("missing-key", "Secret trafficmgr/mesh-ca: key tls.key missing"),
    ("missing-cert", "Secret trafficmgr/mesh-ca: key tls.crt missing"),
    ("key-mismatch", "Secret trafficmgr/mesh-ca: key tls.key does not match the first certificate of tls.crt"),
    ("not-a-ca", "Secret trafficmgr/mesh-ca: key tls.crt: the certificate is not a CA"),
    ("no-root", "Secret trafficmgr/mesh-ca: key ca.crt missing and tls.crt ends without a self-signed root"),
    ("wrong-root", "Secret trafficmgr/mesh-ca: key tls.crt does not chain to any root in ca.crt"),
    ("garbage", "Secret trafficmgr/mesh-ca key tls.crt: not PEM certificates"),
])
def test_a_bad_secret_is_a_clear_error_naming_the_secret_and_key(api: Api, case: str, expected: str) -> None:
    root, other = make_ca("root"), make_ca("other")
    inter = make_ca("inter", issuer=root)
    leaf = make_ca("not-ca", issuer=root, ca=False)
    obj = {
        "missing-key": secret(pem(root[0]), None),
        "missing-cert": {**secret(b"", key_pem(root[1])), "data": {"tls.key": secret(b"", key_pem(root[1]))["data"]["tls.key"]}},
        "key-mismatch": secret(pem(root[0]), key_pem(other[1])),
        "not-a-ca": secret(pem(leaf[0]), key_pem(leaf[1]), pem(root[0])),
        "no-root": secret(pem(inter[0]), key_pem(inter[1])),
        "wrong-root": secret(pem(inter[0]), key_pem(inter[1]), pem(other[0])),
        "garbage": secret(b"hello", key_pem(root[1])),
    }[case]
    api.store.create(obj)
    for mode in ("provided", "generate"):  # generate mode never overwrites a Secret it finds
        ca = MeshCA(api.kube, NS, "mesh-ca", mode=mode, publish=False)
        with pytest.raises(CAError) as info:
            ca.load()
        assert str(info.value).startswith(expected), str(info.value)
        assert "PRIVATE KEY" not in str(info.value)
    assert api.store.get("secrets", "mesh-ca", NS)["data"] == obj["data"]


def test_csr_checks(api: Api) -> None:
    """sign() itself refuses what it must not sign (the Sign service maps these to INVALID_ARGUMENT)."""
    from tests.identity.mesh import weak_rsa_csr

    ca = MeshCA(api.kube, NS, "mesh-ca", publish=False)
    ca.load()
    other = spiffe_id("cluster.local", "default", "other")
    cases = {
        "two SANs": (csr([ID, other])[0], "CSR has 2 subjectAltNames"),
        "DNS SAN": (csr(dns=["reviews.default.svc"])[0], "CSR subjectAltName is a DNSName, not a URI"),
        "no SAN": (csr()[0], "CSR has no subjectAltName"),
        "weak RSA": (weak_rsa_csr(ID), "CSR key: RSA 1024 bits not accepted"),
        "other ID": (csr([other])[0], f"CSR asks for {other}, expected {ID}"),
        "not PEM": ("hello", "csr is not a PEM certificate signing request"),
    }
    for what, (text, message) in cases.items():
        with pytest.raises(CSRError) as info:
            ca.sign(text, ID, DAY)
        assert str(info.value).startswith(message), (what, str(info.value))


def test_bundle_configmap_published_and_rotation_applies_without_restart(api: Api) -> None:
    """The running CA publishes ca.crt in the ConfigMap (written only when it differs); step 1 of a
    rotation (new root added to ca.crt) updates the ConfigMap; step 2 (tls.crt/tls.key switched to the new
    CA) makes new certificates chain to the new root while old ones still verify against the bundle;
    step 3 (old root removed) drops it from the bundle."""
    old = make_ca("root-old")
    new = make_ca("root-new")
    api.store.create(secret(pem(old[0]), key_pem(old[1]), pem(old[0])))
    writes: list[str] = []
    api.store.subscribe(lambda ev: writes.append(ev.type)
                        if ev.obj.get("kind") == "ConfigMap" and ev.obj["metadata"]["name"] == BUNDLE_CONFIGMAP else None)
    ca = MeshCA(api.kube, NS, "mesh-ca", mode="provided").start()
    try:
        def bundle() -> str | None:
            try:
                return api.store.get("configmaps", BUNDLE_CONFIGMAP, NS)["data"]["ca.crt"]
            except ApiError:
                return None

        _wait(lambda: bundle() == pem(old[0]).decode())
        assert ca.publish_bundle() is False and writes == ["ADDED"]  # unchanged: not written again
        old_chain = ca.sign(csr([ID])[0], ID, DAY)[0]
        generation = ca.generation
        # (1) add the new root
        api.store.patch("secrets", "mesh-ca", {"data": secret(pem(old[0]), key_pem(old[1]), pem(old[0]) + pem(new[0]))["data"]},
                        NS, patch_type="merge")
        _wait(lambda: bundle() == (pem(old[0]) + pem(new[0])).decode())
        assert ca.generation > generation
        still_old = ca.sign(csr([ID])[0], ID, DAY)[0]
        verify_chain(still_old, pem(old[0]))
        # (2) switch the signing CA
        api.store.patch("secrets", "mesh-ca", {"data": secret(pem(new[0]), key_pem(new[1]), pem(old[0]) + pem(new[0]))["data"]},
                        NS, patch_type="merge")
        _wait(lambda: ca.material().cert.subject == new[0].subject)
        new_chain = ca.sign(csr([ID])[0], ID, DAY)[0]
        verify_chain(new_chain, pem(new[0]))
        with pytest.raises(x509.verification.VerificationError):
            verify_chain(new_chain, pem(old[0]))
        for chain in (old_chain, new_chain):
            verify_chain(chain, bundle() or "")
        # (3) remove the old root
        api.store.patch("secrets", "mesh-ca", {"data": secret(pem(new[0]), key_pem(new[1]), pem(new[0]))["data"]},
                        NS, patch_type="merge")
        _wait(lambda: bundle() == pem(new[0]).decode())
        # A bad change keeps the CA loaded before (and says why).
        api.store.patch("secrets", "mesh-ca", {"data": {"tls.key": secret(b"", key_pem(old[1]))["data"]["tls.key"]}},
                        NS, patch_type="merge")
        _wait(lambda: "does not match" in ca.error)
        assert ca.material().cert.subject == new[0].subject
        verify_chain(ca.sign(csr([ID])[0], ID, DAY)[0], bundle() or "")
    finally:
        ca.stop()
