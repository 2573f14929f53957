"""``trafficmgr identity`` (a pod's own certificate: the gateway) as a process against the real Sign
service (mesh CA, TLS) with a token bound to the pod (API server TokenRequest), and ``trafficmgr bootstrap
--xds-mtls``."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from tests.identity.mesh import Api, make_ca, pem
from tests.identity.realsigner import SERVER_NAME, RealSigner
from trafficmgr.core.identity import client, files
from trafficmgr.testing.envoy import wait_for

SPIFFE = "spiffe://example.org/ns/ingress/sa/traffic-ingress"
CMD = [sys.executable, "-m", "trafficmgr", "identity"]


@pytest.fixture
def signer(tmp_path: Path) -> Iterator[RealSigner]:
    api = Api(tmp_path)
    api.store.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ingress"}})
    api.store.create({"apiVersion": "v1", "kind": "ServiceAccount",
                      "metadata": {"name": "traffic-ingress", "namespace": "ingress"}})
    api.store.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "gw-0", "namespace": "ingress"},
                      "spec": {"serviceAccountName": "traffic-ingress", "nodeName": "node-1",
                               "containers": [{"name": "envoy", "image": "envoy"}]}})
    s = RealSigner(api.store, api.kube, "node-1", ttl_s=3600, trust_domain="example.org")
    try:
        yield s
    finally:
        s.close()
        api.stop()


def args(signer: RealSigner, tmp: Path, *extra: str) -> list[str]:
    (tmp / "token").write_text(signer.token("ingress", "traffic-ingress", "gw-0"))
    (tmp / "bundle.pem").write_bytes(signer.bundle())
    uid = signer.store.get("pods", "gw-0", "ingress")["metadata"]["uid"]
    return [*CMD, "--dir", str(tmp / "proxy"), "--token-file", str(tmp / "token"), "--ca-address", signer.address,
            "--ca-server-name", SERVER_NAME, "--bundle-file", str(tmp / "bundle.pem"), "--pod", "ingress/gw-0",
            "--pod-uid", uid, "--service-account", "traffic-ingress", "--trust-domain", "example.org", *extra]


def serial(directory: Path) -> int:
    return x509.load_pem_x509_certificates(files.read_chain(str(directory)) or b"")[0].serial_number


def test_once_writes_the_identity_and_check_reads_it(signer: RealSigner, tmp_path: Path) -> None:
    proc = subprocess.run(args(signer, tmp_path, "--once"), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    proxy = tmp_path / "proxy"
    chain = files.read_chain(str(proxy)) or b""
    assert client.leaf_uris(chain) == [SPIFFE]
    assert stat.S_IMODE(os.stat(proxy / "identity" / "key.pem").st_mode) == 0o400
    assert (proxy / "identity" / "bundle.pem").read_bytes() == signer.bundle()
    assert json.loads((proxy / "identity" / "cert.yaml").read_text())["resources"][0]["name"] == files.CERT_SECRET
    ok = subprocess.run([*CMD, "--check", "--dir", str(proxy)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "valid until" in ok.stdout

    # --check fails when less than 10 % of the lifetime is left.
    key = client.new_key()
    ca = make_ca("root")
    now = dt.datetime.now(dt.UTC)
    old = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(ca[0].subject).public_key(key.public_key())
           .serial_number(1).not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(seconds=3))
           .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(SPIFFE)]), critical=True)
           .sign(ca[1], hashes.SHA256()))
    files.write(str(proxy), client.key_pem(key), old.public_bytes(serialization.Encoding.PEM), pem(ca[0]))
    bad = subprocess.run([*CMD, "--check", "--dir", str(proxy)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "of its lifetime left" in bad.stderr
    none = subprocess.run([*CMD, "--check", "--dir", str(tmp_path / "empty")], capture_output=True, text=True, timeout=60)
    assert none.returncode == 1 and "no certificate" in none.stderr

    # A refusal is one clear line and exit 1: another pod's name with this pod's token ...
    argv = args(signer, tmp_path, "--once")
    argv[argv.index("--pod") + 1] = "ingress/gw-1"
    denied = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert denied.returncode == 1 and "PERMISSION_DENIED" in denied.stderr and "Traceback" not in denied.stderr
    # ... and the signer away.
    signer.stop()
    down = subprocess.run(args(signer, tmp_path, "--once", "--timeout", "3"), capture_output=True, text=True, timeout=60)
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr and "Traceback" not in down.stderr


def test_loop_renews_at_half_life_and_survives_failures(signer: RealSigner, tmp_path: Path) -> None:
    signer.stop()
    signer.options = attrs.evolve(signer.options, ttl=dt.timedelta(seconds=8))  # below serve's 60 s minimum to keep the test short: ~4 s renewals
    signer.start()
    log = (tmp_path / "log").open("wb")
    proc = subprocess.Popen([*args(signer, tmp_path), "--min-backoff", "0.2", "--max-backoff", "0.5",
                             "--log-level", "info"], stdout=log, stderr=subprocess.STDOUT)
    proxy = tmp_path / "proxy"
    try:
        first = wait_for(lambda: serial(proxy), 20, message="no first certificate")
        second = wait_for(lambda: serial(proxy) != first and serial(proxy), 20, message="not renewed at half-life")
        signer.stop()
        wait_for(lambda: (tmp_path / "log").read_text().count("renewing the certificate failed") >= 3, 30,
                 message="failures are not retried")
        assert serial(proxy) == second, "the current certificate stays while renewal fails"
        signer.start()
        wait_for(lambda: serial(proxy) != second, 20, message="no renewal after the signer is back")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        log.close()
    text = (tmp_path / "log").read_text()
    assert "renewing the certificate failed" in text and "retrying in" in text


@pytest.mark.parametrize(("change", "message"), [
    ({"--pod": "gw-0"}, "--pod 'gw-0': use NAMESPACE/NAME"),
    ({"--pod-uid": "$(POD_UID)"}, "not a pod uid"),
    ({"--service-account": "Bad/SA"}, "not a ServiceAccount name"),
    ({"--trust-domain": "spiffe://x"}, "--trust-domain: bad trust domain"),
    ({"--ca-address": "nohost"}, "--ca-address: signing service address 'nohost' must be HOST:PORT"),
    ({"--token-file": "/nonexistent/token"}, "--token-file /nonexistent/token: no such file"),
    ({"--bundle-file": "/nonexistent/b.pem"}, "--bundle-file /nonexistent/b.pem: no such file"),
    ({"--pod-uid": None}, "--pod-uid is required"),
])
def test_bad_arguments_are_named(signer: RealSigner, tmp_path: Path, change: dict[str, str | None], message: str) -> None:
    argv = args(signer, tmp_path, "--once")
    for flag, value in change.items():
        i = argv.index(flag)
        if value is None:
            del argv[i:i + 2]
        else:
            argv[i + 1] = value
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_bootstrap_xds_mtls_reads_the_identity_files(tmp_path: Path) -> None:
    base = [sys.executable, "-m", "trafficmgr", "bootstrap", "--node-id", "gw-0", "--node-cluster", "traffic-ingress",
            "--xds-address", "trafficmgr.trafficmgr.svc:15010", "--plugins", ""]
    proc = subprocess.run([*base, "--xds-mtls", "--xds-tls-ca-server-name", "trafficmgr.trafficmgr.svc"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    tls = json.loads(proc.stdout)["static_resources"]["clusters"][0]["transport_socket"]["typed_config"]
    common = tls["common_tls_context"]
    assert common["tls_certificate_sds_secret_configs"] == [files.sds_config(files.CERT_SECRET)]
    combined = common["combined_validation_context"]
    assert combined["validation_context_sds_secret_config"] == files.sds_config(files.BUNDLE_SECRET)
    assert combined["default_validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "DNS", "matcher": {"exact": "trafficmgr.trafficmgr.svc"}}]
    assert tls["sni"] == "trafficmgr.trafficmgr.svc" and common["alpn_protocols"] == ["h2"]
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    both = subprocess.run([*base, "--xds-mtls", "--xds-tls-cert", str(cert)], capture_output=True, text=True, timeout=60)
    assert both.returncode == 1 and "exclude each other" in both.stderr
    alone = subprocess.run([*base, "--xds-tls-ca-server-name", "x.svc"], capture_output=True, text=True, timeout=60)
    assert alone.returncode == 1 and "needs --xds-mtls" in alone.stderr
