"""Issue 16 items 6 and the Unix-socket item: strict SPIFFE identities with ``--xds-auth mtls`` (real
Envoys holding client certificates made here, bootstraps from ``trafficmgr bootstrap --xds-tls-*``, against
``trafficmgr serve``), and Unix-socket xDS judged by the connecting process's uid (``SO_PEERCRED``)."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from trafficmgr.apiserver import APIServer
from trafficmgr.core.access import refused_count
from trafficmgr.core.bootstrap import XdsTls, bootstrap, xds_transport_socket
from trafficmgr.core.controlplane import ControlPlane
from trafficmgr.core.envoy import find_envoy
from trafficmgr.core.kube.client import KubeClient, load_api_client
from trafficmgr.core.plugins import PluginHost
from trafficmgr.core.xds import unixpeer
from trafficmgr.core.xds.server import XdsServerThread
from trafficmgr.testing.cluster import http_get
from trafficmgr.testing.envoy import EnvoyProcess, free_port, wait_for
from trafficmgr.testing.prereq import missing

TD = "example.org"


# -- certificates ---------------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class CA:
    """A throwaway CA issuing EC P-256 certificates with the SANs asked for."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder().subject_name(_name("test-ca")).issuer_name(_name("test-ca"))
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.path = directory / "ca.crt"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str, cn: str, sans: list[x509.GeneralName]) -> tuple[Path, Path]:
        """(cert file, key file) of a new leaf ``name`` (no SAN extension when ``sans`` is empty)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(self.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=1))
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert, key_path = self.dir / f"{name}.crt", self.dir / f"{name}.key"
        cert.write_bytes(builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert, key_path


def _spiffe(ns: str, sa: str, td: str = TD) -> x509.GeneralName:
    return x509.UniformResourceIdentifier(f"spiffe://{td}/ns/{ns}/sa/{sa}")


def _pod(name: str, ip: str, sa: str, labels: dict[str, str] | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default", "labels": labels or {}},
            "spec": {"serviceAccountName": sa, "containers": [{"name": "c", "image": "x"}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}


def _refused_metric(admin_url: str) -> float:
    code, body = http_get(admin_url + "/metrics")
    assert code == 200
    for line in body.splitlines():
        if line.startswith('trafficmgr_xds_streams_refused_total{reason="permission"}'):
            return float(line.split()[-1])
    return 0.0


def _live(e: EnvoyProcess) -> bool:
    try:
        return e.admin("/ready").strip() == "LIVE"
    except Exception:  # noqa: BLE001 - 503 while initializing
        return False


def _cli_bootstrap(out: Path, node_id: str, cluster: str, xds: str, cert: Path, key: Path, ca: Path) -> dict:
    """The bootstrap ``trafficmgr bootstrap --xds-tls-*`` writes (admin on a free loopback port, no stats)."""
    subprocess.run([sys.executable, "-m", "trafficmgr", "bootstrap", "--node-id", node_id, "--node-cluster", cluster,
                    "--xds-address", xds, "--admin-port", str(free_port()), "--stats-port", "0", "--plugins", "",
                    "--xds-tls-cert", str(cert), "--xds-tls-key", str(key), "--xds-tls-ca", str(ca), "-o", str(out)],
                   check=True, capture_output=True, text=True)
    return json.loads(out.read_text())


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[APIServer, Path]]:
    server = APIServer().start()
    kubeconfig = tmp_path / "kubeconfig"
    server.write_kubeconfig(str(kubeconfig))
    try:
        yield server, kubeconfig
    finally:
        server.stop()


# -- mtls -----------------------------------------------------------------------------------------


def test_mtls_serves_only_the_spiffe_identity_of_the_pod_and_the_gateway(
        api: tuple[APIServer, Path], tmp_path: Path, envoy_binary: str) -> None:
    """``serve --xds-auth mtls --trust-domain example.org``: real Envoys whose bootstraps come from
    ``trafficmgr bootstrap --xds-tls-cert/--xds-tls-key/--xds-tls-ca``. The right SPIFFE ID is served (a
    sidecar and the gateway); a wrong trust domain, a wrong ServiceAccount, a CN-only certificate and a
    DNS SAN spelled like the SPIFFE ID are refused and counted."""
    server, kubeconfig = api
    server.store.create(_pod("client", "10.0.0.5", "reviews"))
    ca = CA(tmp_path)
    srv_cert, srv_key = ca.issue("server", "xds", [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    certs = {
        "right": ca.issue("right", "client.default", [_spiffe("default", "reviews")]),
        "gateway": ca.issue("gateway", "traffic-ingress", [_spiffe("default", "traffic-ingress")]),
        "other-td": ca.issue("other-td", "client.default", [_spiffe("default", "reviews", "cluster.local")]),
        "other-sa": ca.issue("other-sa", "client.default", [_spiffe("default", "default")]),
        "cn-only": ca.issue("cn-only", "client.default", []),
        "dns-san": ca.issue("dns-san", "client.default", [x509.DNSName("client.default")]),
    }
    port, admin_port = free_port(), free_port()
    log = (tmp_path / "serve.log").open("wb")
    serve = subprocess.Popen(
        [sys.executable, "-m", "trafficmgr", "serve", "--kubeconfig", str(kubeconfig), "--plugins", "lb",
         "--xds-address", "127.0.0.1", "--xds-port", str(port), "--admin-port", str(admin_port),
         "--xds-auth", "mtls", "--trust-domain", TD, "--xds-gateway-namespace", "default",
         "--xds-tls-cert", str(srv_cert), "--xds-tls-key", str(srv_key), "--xds-client-ca", str(ca.path)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    admin = f"http://127.0.0.1:{admin_port}"
    envoys: dict[str, EnvoyProcess] = {}
    try:
        wait_for(lambda: _ready(admin, serve, tmp_path), 30, message="serve not ready")
        before = _refused_metric(admin)
        claims = {"right": ("client.default", "sidecar"), "gateway": ("traffic-ingress-0", "traffic-ingress"),
                  "other-td": ("client.default", "sidecar"), "other-sa": ("client.default", "sidecar"),
                  "cn-only": ("client.default", "sidecar"), "dns-san": ("client.default", "sidecar")}
        for name, (node, cluster) in claims.items():
            cert, key = certs[name]
            cfg = _cli_bootstrap(tmp_path / f"{name}.json", node, cluster, f"127.0.0.1:{port}", cert, key, ca.path)
            assert cfg["static_resources"]["clusters"][0]["transport_socket"]["name"] == "envoy.transport_sockets.tls"
            envoys[name] = EnvoyProcess(cfg, tmp_path / name, wait="admin").start()
        wait_for(lambda: _live(envoys["right"]) and _live(envoys["gateway"]), 20,
                 message="the sidecar and the gateway with the right SPIFFE IDs must be served")
        wait_for(lambda: _refused_metric(admin) >= before + 4, 20, message="the four wrong certificates must be refused")
        assert not any(_live(envoys[n]) for n in ("other-td", "other-sa", "cn-only", "dns-san"))
        code, body = http_get(admin + "/debug/proxy-status")
        assert code == 200
        assert {s["node_id"] for s in json.loads(body)} == {"client.default", "traffic-ingress-0"}
        text = (tmp_path / "serve.log").read_text()
        assert "spiffe://cluster.local/ns/default/sa/reviews" in text  # the refusal names what was presented
    finally:
        for e in envoys.values():
            e.stop()
        serve.terminate()
        serve.wait(15)
        log.close()


def _ready(admin: str, proc: subprocess.Popen[bytes], tmp: Path) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"serve exited {proc.returncode}:\n{(tmp / 'serve.log').read_text()[-3000:]}")
    try:
        return http_get(admin + "/readyz", 1)[0] == 200
    except OSError:
        return False


def test_bootstrap_tls_flags_are_all_or_nothing_and_checked(tmp_path: Path) -> None:
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    base = [sys.executable, "-m", "trafficmgr", "bootstrap", "--node-id", "n", "--node-cluster", "sidecar",
            "--xds-address", "cp:18000", "--plugins", ""]
    half = subprocess.run([*base, "--xds-tls-cert", str(cert)], capture_output=True, text=True)
    assert half.returncode == 1 and "needs --xds-tls-key and --xds-tls-ca too" in half.stderr
    gone = subprocess.run([*base, "--xds-tls-cert", str(cert), "--xds-tls-key", str(cert), "--xds-tls-ca",
                           str(tmp_path / "nope.pem")], capture_output=True, text=True)
    assert gone.returncode == 1 and "--xds-tls-ca" in gone.stderr and "no such readable file" in gone.stderr
    # The server's name is checked against the xDS host: DNS SAN for a name, IP SAN for an IP, none over unix:.
    tls = XdsTls("c", "k", "ca")
    dns = xds_transport_socket(tls, "traffic-control.traffic-system")["typed_config"]
    assert dns["sni"] == "traffic-control.traffic-system"
    assert dns["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "DNS", "matcher": {"exact": "traffic-control.traffic-system"}}]
    ip = xds_transport_socket(tls, "10.0.0.1")["typed_config"]
    assert "sni" not in ip and ip["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"][0][
        "san_type"] == "IP_ADDRESS"
    unix = xds_transport_socket(tls, "unix:/run/x.sock")["typed_config"]
    assert "match_typed_subject_alt_names" not in unix["common_tls_context"]["validation_context"]
    assert "transport_socket" not in bootstrap("n", "sidecar", "cp", 18000, admin_port=0)["static_resources"]["clusters"][0]


# -- Unix socket ----------------------------------------------------------------------------------

class EnvoyAs:
    """An Envoy run as ``uid`` (``setpriv``) from ``bootstrap`` (admin on a fixed loopback port)."""

    def __init__(self, uid: int, config: dict, workdir: Path) -> None:
        from trafficmgr.core.envoy import envoy_command, start_envoy
        from trafficmgr.testing.netns import world_executable

        workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(workdir, 0o777)
        self.admin_port = config["admin"]["address"]["socket_address"]["port_value"]
        path = workdir / "envoy.json"
        path.write_text(json.dumps(config))
        os.chmod(path, 0o644)
        cmd = envoy_command(path, binary=world_executable(find_envoy()), log_path=workdir / "envoy.log")
        self.proc = start_envoy(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *cmd],
                                workdir / "envoy.out")

    def live(self) -> bool:
        try:
            return http_get(f"http://127.0.0.1:{self.admin_port}/ready", 1)[1].strip() == "LIVE"
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def test_unix_socket_claims_are_judged_by_the_peer_uid(api: tuple[APIServer, Path], tmp_path: Path,
                                                       envoy_binary: str) -> None:
    """Over ``unix:`` the kernel's credentials of the connecting process decide: a gateway claim only from
    an allowed uid (default: the server's own), a sidecar claim only from a sidecar uid (default 1337, 0,
    the server's); a real Envoy of the server's uid is served as the gateway over the same socket."""
    if os.getuid() != 0:
        missing("needs root to run clients as other uids (setpriv)")
    server, kubeconfig = api
    server.store.create(_pod("client", "10.0.0.5", "default"))
    world = Path(tempfile.mkdtemp(prefix="tm-uid-"))  # not under pytest's 0700 tmp: other uids read it
    os.chmod(world, 0o755)
    sock_dir = world / "sock"
    sock_dir.mkdir()
    os.chmod(sock_dir, 0o777)
    socket_path = str(sock_dir / "xds.sock")
    cp = ControlPlane(PluginHost.load(["lb"]), argparse.Namespace(xds_auth="peer-ip", sidecar_address="127.0.0.1",
                                                                  sidecar_port=0, xds_gateway_namespace="default"),
                      KubeClient(load_api_client(str(kubeconfig))))
    xds = XdsServerThread(cp.cache, f"unix:{socket_path}", 0, authorizer=cp.authorize).start()
    os.chmod(socket_path, 0o777)
    cp.xds = xds
    cp.start_watches()
    envoys: dict[str, EnvoyAs] = {}
    try:
        assert cp.wait_ready(10)
        before = refused_count()
        claims = {"sidecar-1337": (1337, "client.default", "sidecar"), "gateway-1337": (1337, "gw", "traffic-ingress"),
                  "sidecar-4242": (4242, "client.default", "sidecar"), "gateway-own": (os.getuid(), "gw", "traffic-ingress")}
        for name, (uid, node, cluster) in claims.items():
            cfg = bootstrap(node, cluster, f"unix:{socket_path}", 0, admin_port=free_port())
            envoys[name] = EnvoyAs(uid, cfg, world / name)
        wait_for(lambda: envoys["sidecar-1337"].live() and envoys["gateway-own"].live(), 20,
                 message="the sidecar uid's sidecar and the server uid's gateway must be served")
        wait_for(lambda: refused_count() >= before + 2, 15, message="uid 1337's gateway and uid 4242's sidecar claims")
        assert not envoys["gateway-1337"].live() and not envoys["sidecar-4242"].live()
        peers = {(s["node_id"], s["peer"].split(",")[0]) for s in xds.status()}
        assert peers == {("client.default", "unix:uid=1337"), ("gw", f"unix:uid={os.getuid()}")}
    finally:
        for e in envoys.values():
            e.stop()
        cp.stop()
        xds.stop(0.5)
        stopped = not os.path.exists(socket_path)
        shutil.rmtree(world, ignore_errors=True)
    assert stopped, "the server removes its socket when it stops"


def test_unix_relay_passes_bytes_both_ways_with_half_close_and_names_the_peer() -> None:
    """The relay in front of a plain server: what the client sends arrives whole, the server's answer after
    the client's EOF comes back, and while connected the inner connection maps to this process's
    credentials (a connection that did not come through the relay maps to nothing)."""
    async def run() -> tuple[bytes, list[str]]:
        relay = unixpeer.UnixPeerRelay(os.path.join(tempfile.mkdtemp(prefix="tm-relay-"), "pub.sock"))
        peers: list[str] = []

        async def count(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            peers.append(relay.peer_of("unix:" + w.get_extra_info("peername")))
            n = 0
            while data := await r.read(1 << 16):
                n += len(data)
            w.write(str(n).encode())
            await w.drain()
            w.close()

        inner = await asyncio.start_unix_server(count, relay.inner)
        await relay.start()
        try:
            r, w = await asyncio.open_unix_connection(relay.path)
            for _ in range(64):
                w.write(b"x" * 65536)
                await w.drain()
            w.write_eof()
            answer = await asyncio.wait_for(r.read(), 10)
            w.close()
            r2, w2 = await asyncio.open_unix_connection(relay.inner)  # around the relay
            w2.write_eof()
            await asyncio.wait_for(r2.read(), 10)
            w2.close()
            return answer, peers
        finally:
            await relay.stop()
            inner.close()

    answer, peers = asyncio.run(run())
    assert answer == str(64 * 65536).encode()
    assert peers[0] == f"unix:uid={os.getuid()},gid={os.getgid()},pid={os.getpid()}"
    assert unixpeer.parse(peers[0]) == unixpeer.PeerCred(pid=os.getpid(), uid=os.getuid(), gid=os.getgid())
    assert peers[1] == ""
    assert unixpeer.parse("10.0.0.1") is None and unixpeer.parse("unix:uid=x") is None


@pytest.mark.parametrize(("args", "message"), [
    (["--xds-unix-gateway-uids", "root"], "--xds-unix-gateway-uids: bad uid 'root'"),
    (["--xds-unix-sidecar-uids", "1337,-1"], "--xds-unix-sidecar-uids: bad uid '-1'"),
    (["--trust-domain", "spiffe://cluster.local"], "--trust-domain: bad trust domain"),
    (["--xds-gateway-service-account", "Gate_Way"], "--xds-gateway-service-account 'Gate_Way': not a ServiceAccount name"),
])
def test_serve_refuses_bad_identity_options_before_anything_else(args: list[str], message: str) -> None:
    out = subprocess.run([sys.executable, "-m", "trafficmgr", "serve", "--kubeconfig", "/nonexistent", *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and message in out.stderr, out.stderr
