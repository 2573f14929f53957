"""The Sign RPC client (``core/identity/client.py``) against a real gRPC TLS server: the key stays here,
the token is re-read per call, the server is verified, and a wrong answer is refused."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.identity.signer import SERVER_NAME, StandInCA, StandInSigner
from trafficmgr.core.identity import client

SPIFFE = "spiffe://cluster.local/ns/default/sa/web"
POD = ("default", "web-1", "uid-1")


@pytest.fixture
def signer() -> Iterator[StandInSigner]:
    s = StandInSigner(ttl_s=600).start()
    try:
        yield s
    finally:
        s.stop()


def test_issue_checks_and_rereads_the_token(signer: StandInSigner, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("agent-token\n")
    sign = client.SignClient(signer.address, str(token), SERVER_NAME, timeout_s=5)
    issued = sign.issue(SPIFFE, POD, signer.ca.pem)
    leaf = x509.load_pem_x509_certificates(issued.chain_pem)[0]
    key = serialization.load_pem_private_key(issued.key_pem, None)
    assert leaf.public_key() == key.public_key()
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier) == [SPIFFE]
    assert issued.not_after - issued.not_before == dt.timedelta(seconds=660)
    # Half of the lifetime left when it arrived (the signer backdates notBefore by a minute: not counted).
    assert abs((issued.renew_at() - issued.received).total_seconds() - 300) < 5
    # Only the CSR left: no private key in the request.
    request = signer.requests[-1]
    assert request["pod"] == {"namespace": "default", "name": "web-1", "uid": "uid-1"}
    assert "PRIVATE KEY" not in str(request)
    # The token file is read on every call (kubelet rotation).
    token.write_text("rotated")
    with pytest.raises(client.IdentityError) as err:
        sign.issue(SPIFFE, POD, signer.ca.pem)
    assert err.value.code == "UNAUTHENTICATED" and signer.tokens[-1] == "rotated"
    signer.token = "rotated"
    sign.issue(SPIFFE, POD, signer.ca.pem)


def test_the_server_is_verified(signer: StandInSigner, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("agent-token")
    calls = len(signer.tokens)
    other = StandInCA("another-root")
    with pytest.raises(client.IdentityError) as err:  # not signed by the bundle
        client.SignClient(signer.address, str(token), SERVER_NAME, timeout_s=3).issue(SPIFFE, POD, other.pem)
    assert err.value.code == "UNAVAILABLE"
    with pytest.raises(client.IdentityError):  # the certificate does not carry this name
        client.SignClient(signer.address, str(token), "evil.example", timeout_s=3).issue(SPIFFE, POD, signer.ca.pem)
    assert len(signer.tokens) == calls  # the token was never sent to an unverified server
    # Without --ca-server-name the host is the name (here an IP SAN).
    client.SignClient(signer.address, str(token), timeout_s=3).issue(SPIFFE, POD, signer.ca.pem)


def test_a_wrong_answer_is_refused(signer: StandInSigner) -> None:
    key = client.new_key()
    other = client.new_key()
    good = signer.ca.leaf(key.public_key(), [x509.UniformResourceIdentifier(SPIFFE)], dt.timedelta(minutes=5))
    client.check_issued(key, SPIFFE, good + signer.ca.pem, signer.ca.pem)
    with pytest.raises(client.IdentityError, match="not for our key"):
        client.check_issued(other, SPIFFE, good, signer.ca.pem)
    with pytest.raises(client.IdentityError, match="names .*sa/other"):
        wrong = signer.ca.leaf(key.public_key(), [x509.UniformResourceIdentifier(SPIFFE[:-3] + "other")],
                               dt.timedelta(minutes=5))
        client.check_issued(key, SPIFFE, wrong, signer.ca.pem)
    with pytest.raises(client.IdentityError, match="does not lead to a root"):
        client.check_issued(key, SPIFFE, good, StandInCA("another-root").pem)
    with pytest.raises(client.IdentityError, match="not PEM|no certificate"):
        client.check_issued(key, SPIFFE, b"junk", signer.ca.pem)


def test_bad_inputs_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        client.SignClient("nohost", str(tmp_path / "t"))
    with pytest.raises(client.IdentityError, match="cannot read the token file"):
        client.read_token(str(tmp_path / "missing"))
    (tmp_path / "empty").write_text(" \n")
    with pytest.raises(client.IdentityError, match="holds no token"):
        client.read_token(str(tmp_path / "empty"))
