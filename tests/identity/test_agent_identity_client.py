"""The Sign RPC client (``core/identity/client.py``) against the real Sign service (mesh CA, TLS, tokens
from the API server's TokenRequest): the key stays here, the token is re-read per call, the server is
verified, and a wrong answer is refused."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from tests.identity.mesh import Api, make_ca, pem
from tests.identity.realsigner import SERVER_NAME, RealSigner
from trafficmgr.core.identity import client

SPIFFE = "spiffe://cluster.local/ns/default/sa/web"


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[tuple[Api, RealSigner]]:
    api = Api(tmp_path)
    api.store.create({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "web", "namespace": "default"}})
    signer = RealSigner(api.store, api.kube, "node-1", ttl_s=600)
    api.store.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-1", "namespace": "default"},
                      "spec": {"serviceAccountName": "web", "nodeName": "node-1", "containers": [{"name": "c", "image": "x"}]}})
    try:
        yield api, signer
    finally:
        signer.close()
        api.stop()


def pod(api: Api) -> tuple[str, str, str]:
    return ("default", "web-1", api.store.get("pods", "web-1", "default")["metadata"]["uid"])


def leaf(issuer: tuple[x509.Certificate, Any], public_key: Any, uri: str) -> bytes:
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(issuer[0].subject).public_key(public_key)
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(minutes=5))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
            .sign(issuer[1], hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def test_issue_checks_and_rereads_the_token(mesh: tuple[Api, RealSigner], tmp_path: Path) -> None:
    api, signer = mesh
    token = tmp_path / "token"
    token.write_text(signer.agent_token() + "\n")
    sign = client.SignClient(signer.address, str(token), SERVER_NAME, timeout_s=5)
    issued = sign.issue(SPIFFE, pod(api), signer.bundle())
    cert = x509.load_pem_x509_certificates(issued.chain_pem)[0]
    key = serialization.load_pem_private_key(issued.key_pem, None)
    assert cert.public_key() == key.public_key()
    assert client.leaf_uris(issued.chain_pem) == [SPIFFE]
    assert issued.bundle_pem == signer.bundle()
    # Half of the lifetime left when it arrived (the CA backdates notBefore: not counted).
    assert abs((issued.renew_at() - issued.received).total_seconds() - 300) < 5
    # The token file is read on every call (kubelet rotation): a bad one is refused, a good one works again.
    token.write_text("not-a-token")
    with pytest.raises(client.IdentityError) as err:
        sign.issue(SPIFFE, pod(api), signer.bundle())
    assert err.value.code == "UNAUTHENTICATED"
    token.write_text(signer.agent_token())
    sign.issue(SPIFFE, pod(api), signer.bundle())
    # Another ServiceAccount's identity is refused by the server with its reason.
    with pytest.raises(client.IdentityError) as err:
        sign.issue("spiffe://cluster.local/ns/default/sa/other", pod(api), signer.bundle())
    assert err.value.code == "PERMISSION_DENIED" and "sa/other" in str(err.value)


def test_the_server_is_verified(mesh: tuple[Api, RealSigner], tmp_path: Path) -> None:
    api, signer = mesh
    token = tmp_path / "token"
    token.write_text(signer.agent_token())
    other = pem(make_ca("another-root")[0])
    with pytest.raises(client.IdentityError) as err:  # not signed by the bundle
        client.SignClient(signer.address, str(token), SERVER_NAME, timeout_s=3).issue(SPIFFE, pod(api), other)
    assert err.value.code == "UNAVAILABLE"
    with pytest.raises(client.IdentityError) as err:  # the certificate does not carry this name
        client.SignClient(signer.address, str(token), "evil.example", timeout_s=3).issue(SPIFFE, pod(api), signer.bundle())
    assert err.value.code == "UNAVAILABLE"
    # Without --ca-server-name the host is the name (here the IP SAN 127.0.0.1 of a loopback listener).
    client.SignClient(signer.address, str(token), timeout_s=3).issue(SPIFFE, pod(api), signer.bundle())


def test_a_wrong_answer_is_refused() -> None:
    ca = make_ca("root")
    key, other = client.new_key(), client.new_key()
    good = leaf(ca, key.public_key(), SPIFFE)
    client.check_issued(key, SPIFFE, good, pem(ca[0]))
    with pytest.raises(client.IdentityError, match="not for our key"):
        client.check_issued(other, SPIFFE, good, pem(ca[0]))
    with pytest.raises(client.IdentityError, match="names .*sa/other"):
        client.check_issued(key, SPIFFE, leaf(ca, key.public_key(), SPIFFE[:-3] + "other"), pem(ca[0]))
    with pytest.raises(client.IdentityError, match="does not lead to a root"):
        client.check_issued(key, SPIFFE, good, pem(make_ca("another-root")[0]))
    intermediate = make_ca("intermediate", issuer=ca)
    chained = leaf(intermediate, key.public_key(), SPIFFE) + pem(intermediate[0])
    client.check_issued(key, SPIFFE, chained, pem(ca[0]))  # leaf + intermediate up to the bundle's root
    with pytest.raises(client.IdentityError, match="chain is broken"):
        client.check_issued(key, SPIFFE, leaf(intermediate, key.public_key(), SPIFFE) + pem(make_ca("x")[0]), pem(ca[0]))
    with pytest.raises(client.IdentityError, match="not PEM|no certificate"):
        client.check_issued(key, SPIFFE, b"junk", pem(ca[0]))


def test_bad_inputs_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        client.SignClient("nohost", str(tmp_path / "t"))
    with pytest.raises(client.IdentityError, match="cannot read the token file"):
        client.read_token(str(tmp_path / "missing"))
    (tmp_path / "empty").write_text(" \n")
    with pytest.raises(client.IdentityError, match="holds no token"):
        client.read_token(str(tmp_path / "empty"))


def test_retry_backoff_is_capped_and_jittered() -> None:
    from trafficmgr.core.agent.identity import backoff

    assert [backoff(n, 1.0, 60.0, rand=lambda: 1.0) for n in (1, 2, 3, 7, 8, 50)] == [1, 2, 4, 60, 60, 60]
    assert [backoff(n, 1.0, 60.0, rand=lambda: 0.0) for n in (1, 2, 7)] == [0.5, 1, 30]  # down by up to half
    delays = {round(backoff(3, 1.0, 60.0), 3) for _ in range(50)}
    assert len(delays) > 10 and all(2 <= d <= 4 for d in delays)
