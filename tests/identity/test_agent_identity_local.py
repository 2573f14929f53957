"""The ``local`` runtime (``trafficmgr demo``, no root, the host's network): Envoy runs with its state
directory as working directory, so the identity a ``SidecarSpec.prepare`` writes there is what its
relative SDS paths read, and a rewrite is served without a restart."""

from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from tests.identity.mesh import make_ca, pem
from tests.identity.test_agent_identity_netns import TlsProbe
from trafficmgr.core.agent.agent import AgentConfig, sidecar_bootstrap
from trafficmgr.core.agent.local_runtime import LocalRuntime
from trafficmgr.core.agent.runtime import PodNetwork, PodRef, SidecarSpec
from trafficmgr.core.identity import client, files
from trafficmgr.testing.envoy import free_port, wait_for

POD_IP = "127.0.83.2"  # a loopback address no other test uses
SPIFFE = "spiffe://cluster.local/ns/default/sa/web"


def issue(ca: tuple[x509.Certificate, object]) -> tuple[bytes, bytes, int]:
    key = client.new_key()
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(ca[0].subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(SPIFFE)]), critical=True)
            .sign(ca[1], hashes.SHA256()))  # type: ignore[arg-type]
    return client.key_pem(key), cert.public_bytes(serialization.Encoding.PEM), cert.serial_number


def served_serial(port: int) -> int:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection((POD_IP, port), timeout=3) as raw, ctx.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_local_runtime_runs_envoy_in_its_directory(tmp_path: Path, envoy_binary: str) -> None:
    ca = make_ca("root")
    key, chain, first = issue(ca)
    runtime = LocalRuntime(str(tmp_path / "state"))
    pod = PodRef("web-1", "default", "uid-1", POD_IP)
    config = sidecar_bootstrap(pod, AgentConfig("node-1", f"unix:{tmp_path}/none.sock", admin_port=free_port(), stats_port=0),
                               own_netns=False)
    TlsProbe().trafficmgr_bootstrap(config, "sidecar", None)
    for source in ("cds_config", "lds_config"):  # no control plane here: do not wait for it before listening
        config["dynamic_resources"][source]["initial_fetch_timeout"] = "0.2s"
    tls_port = free_port()
    config["static_resources"]["listeners"][-1]["address"]["socket_address"] = {"address": POD_IP, "port_value": tls_port}
    written: list[str] = []

    def prepare(directory: str) -> None:
        files.write(directory, key, chain, pem(ca[0]))
        written.append(directory)

    sidecar = runtime.start(SidecarSpec(pod, config, os.geteuid(), prepare=prepare), PodNetwork(None))
    try:
        assert written == [runtime.workdir(sidecar)]
        pid = int(open(os.path.join(written[0], "sidecar.json")).read().split('"pid": ')[1].split(",")[0])
        assert os.readlink(f"/proc/{pid}/cwd") == written[0]
        assert wait_for(lambda: served_serial(tls_port), 20, message="no TLS from the identity files") == first
        key2, chain2, second = issue(ca)
        files.write(written[0], key2, chain2, pem(ca[0]))
        wait_for(lambda: served_serial(tls_port) == second, 10, message="the rewrite is not served")
        assert runtime.list()[0].running and os.path.exists(f"/proc/{pid}")
    finally:
        runtime.remove(sidecar)
    assert not os.path.exists(written[0])
