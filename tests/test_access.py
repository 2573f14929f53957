"""xDS access control (issue: every proxy gets only its own config; keys only to verified gateways)."""

from __future__ import annotations

import argparse
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trafficmgr import hookimpl
from trafficmgr.apiserver import APIServer
from trafficmgr.core import access, cache
from trafficmgr.core.access import AccessControl, refused_count
from trafficmgr.core.bootstrap import bootstrap
from trafficmgr.core.controlplane import ControlPlane
from trafficmgr.core.kube.assemble import POD, Assembler
from trafficmgr.core.kube.client import KubeClient, load_api_client
from trafficmgr.core.model import Endpoint, Labels, Model, Pod, Service, ServicePort, normalize_ip
from trafficmgr.core.plugins import PluginHost
from trafficmgr.core.translate.builder import Builder
from trafficmgr.core.xds import unixpeer
from trafficmgr.core.xds.server import XdsServerThread
from trafficmgr.testing.envoy import EnvoyProcess, wait_for

CLIENT_IP, GATEWAY_IP = "127.0.0.21", "127.0.0.31"


def _pod(name: str, ip: str, labels: dict[str, str], sa: str = "", phase: str = "Running", ips: tuple[str, ...] = (),
         host_network: bool = False) -> dict:
    spec: dict = {"nodeName": "n1", "containers": [{"name": "c", "image": "x"}]}
    if sa:
        spec["serviceAccountName"] = sa
    if host_network:
        spec["hostNetwork"] = True
    status: dict = {"phase": phase, "podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}
    if ips:
        status["podIPs"] = [{"ip": i} for i in ips]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default", "labels": labels},
            "spec": spec, "status": status}


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[dict]:
    api = APIServer().start()
    api.store.create(_pod("client", CLIENT_IP, {"app": "client"}))
    api.store.create(_pod("traffic-ingress-0", GATEWAY_IP, {"app": "traffic-ingress"}, sa="traffic-ingress"))
    kubeconfig = tmp_path / "kubeconfig"
    api.write_kubeconfig(str(kubeconfig))
    cp = ControlPlane(PluginHost.load(["lb"]), argparse.Namespace(xds_auth="peer-ip", sidecar_address="127.0.0.1", sidecar_port=0),
                      KubeClient(load_api_client(str(kubeconfig))))
    xds = XdsServerThread(cp.cache, "127.0.0.1", 0, authorizer=cp.authorize).start()
    cp.xds = xds
    cp.start_watches()
    assert cp.wait_ready(10)
    try:
        yield {"api": api, "cp": cp, "xds": xds, "tmp": tmp_path}
    finally:
        cp.stop()
        xds.stop(0.5)
        api.stop()


def _envoy(plane: dict, name: str, node_id: str, cluster: str, source: str) -> EnvoyProcess:
    cfg = bootstrap(node_id, cluster, "127.0.0.1", plane["xds"].port, admin_port=0, xds_source_address=source)
    return EnvoyProcess(cfg, plane["tmp"] / name, wait="admin").start()


def _live(e: EnvoyProcess) -> bool:
    try:
        return e.admin("/ready").strip() == "LIVE"
    except Exception:  # noqa: BLE001 - 503 while initializing
        return False


def test_peer_ip_refuses_impersonators_and_serves_the_real_pods(plane: dict, envoy_binary: str) -> None:
    before = refused_count()
    real = _envoy(plane, "real", "client.default", "sidecar", CLIENT_IP)
    fake = _envoy(plane, "fake", "client.default", "sidecar", "127.0.0.22")
    fake_gw = _envoy(plane, "fake-gw", "attacker", "traffic-ingress", "127.0.0.23")
    gw = _envoy(plane, "gw", "traffic-ingress-0", "traffic-ingress", GATEWAY_IP)
    try:
        wait_for(lambda: _live(real) and _live(gw), 15, message="the real sidecar and gateway must be served")
        wait_for(lambda: refused_count() >= before + 2, 10, message="impersonators were not refused")
        assert not _live(fake) and not _live(fake_gw)
        streams = {(s["node_id"], s["peer"]) for s in plane["xds"].status()}
        assert ("client.default", CLIENT_IP) in streams and ("traffic-ingress-0", GATEWAY_IP) in streams
        assert not any(peer in ("127.0.0.22", "127.0.0.23") for _, peer in streams)

        # The pod behind the identity changes: its IP moves. The old connection loses the identity.
        refused = refused_count()
        plane["api"].store.patch("pods", "client", {"status": {"podIP": "127.0.0.25"}}, "default",
                                 patch_type="merge", subresource="status")
        wait_for(lambda: refused_count() > refused, 10, message="a moved pod's old stream was not refused")
        wait_for(lambda: ("client.default", CLIENT_IP) not in {(s["node_id"], s["peer"]) for s in plane["xds"].status()}, 10)
    finally:
        for e in (real, fake, fake_gw, gw):
            e.stop()


def _streams(plane: dict) -> set[tuple[str, str]]:
    return {(s["node_id"], s["peer"]) for s in plane["xds"].status()}


def test_peer_ip_judges_each_claim_by_the_one_live_pod_holding_the_ip(plane: dict, envoy_binary: str) -> None:
    """Issue 16 item 2, through the real xDS server and real Envoys connecting from the pod IPs: a Succeeded
    gateway pod and a new pod share an IP (judged by the new pod: no gateway); a hostNetwork pod with the
    gateway's labels, a pod with the gateway's labels but another ServiceAccount, two live pods with one
    IP: refused; the second address of a dual-stack pod: served; a served pod that starts terminating
    loses its stream."""
    store = plane["api"].store
    gw = dict(labels={"app": "traffic-ingress"}, sa="traffic-ingress")
    for obj in [_pod("gw-old", "127.0.0.41", phase="Succeeded", **gw), _pod("newcomer", "127.0.0.41", {"app": "other"}),
                _pod("gw-hostnet", "127.0.0.42", host_network=True, **gw),
                _pod("gw-wrong-sa", "127.0.0.43", {"app": "traffic-ingress"}, sa="default"),
                _pod("twin-a", "127.0.0.44", {}), _pod("twin-b", "127.0.0.44", {}, phase="Pending"),
                _pod("dual", "fd00::45", {}, ips=("fd00::45", "127.0.0.45"))]:
        store.create(obj)
    wait_for(lambda: ("default", "dual") in plane["cp"].assembler.pods, 10)
    before = refused_count()
    refused = {"gw-reused-ip": ("traffic-ingress", "127.0.0.41"), "gw-hostnet": ("traffic-ingress", "127.0.0.42"),
               "gw-wrong-sa": ("traffic-ingress", "127.0.0.43"), "twin-a.default": ("sidecar", "127.0.0.44")}
    served = {"newcomer.default": ("sidecar", "127.0.0.41"), "dual.default": ("sidecar", "127.0.0.45")}
    envoys = {node: _envoy(plane, node, node, cluster, ip) for node, (cluster, ip) in {**refused, **served}.items()}
    try:
        wait_for(lambda: all(_live(envoys[n]) for n in served), 20, message="newcomer and dual must be served")
        wait_for(lambda: refused_count() >= before + len(refused), 15, message="every impersonator must be refused")
        assert not any(_live(envoys[n]) for n in refused)
        streams = _streams(plane)
        assert {(n, ip) for n, (_, ip) in served.items()} <= streams
        assert not {n for n, _ in streams} & set(refused)

        # The served pod starts terminating: the re-check on the model change drops its stream.
        refused_now = refused_count()
        store.patch("pods", "newcomer", {"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}}, "default",
                    patch_type="merge")
        wait_for(lambda: plane["cp"].assembler.pods[("default", "newcomer")].terminating, 10,
                 message="the API server did not keep deletionTimestamp")
        wait_for(lambda: refused_count() > refused_now, 10, message="a terminating pod's stream was not refused")
        wait_for(lambda: "newcomer.default" not in {n for n, _ in _streams(plane)}, 10)
        assert ("dual.default", "127.0.0.45") in _streams(plane)
    finally:
        for e in envoys.values():
            e.stop()


GW_LABELS = {"app": "traffic-ingress"}


def _ac(mode: str, pods: list[tuple[Pod, dict[str, str]]], **kw: object) -> AccessControl:
    """An AccessControl over ``pods`` (indexed by their IPs, as the assembler does: any phase)."""
    by_ip: dict[str, list[tuple[Pod, dict[str, str]]]] = {}
    for pod, labels in pods:
        for ip in pod.ips or ((pod.ip,) if pod.ip else ()):
            by_ip.setdefault(ip, []).append((pod, labels))
    return AccessControl(mode, {p.key: p for p, _ in pods}, lambda ip: by_ip.get(normalize_ip(ip), []), **kw)  # type: ignore[arg-type]


def _refused(ac: AccessControl, node: str, cluster: str, peer: str, ids: tuple[str, ...] = (), match: str | None = None) -> None:
    with pytest.raises(PermissionError, match=match):
        ac(node, cluster, peer, ids)


def test_access_control_unit_rules() -> None:
    pods = [(Pod("default", "client", ip="10.0.0.5"), {}),
            (Pod("ingress", "gw-0", ip="10.0.0.9", service_account="traffic-ingress"), GW_LABELS),
            (Pod("default", "gw-x", ip="10.0.0.8", service_account="traffic-ingress"), GW_LABELS)]
    ac = _ac("peer-ip", pods, gateway_namespace="ingress")
    ac("client.default", "sidecar", "10.0.0.5")
    ac("unknown.default", "sidecar", "10.0.0.7")  # unknown: allowed to wait, gets nothing
    ac("gw-0", "traffic-ingress", "10.0.0.9")
    for node, cluster, peer in [("client.default", "sidecar", "10.0.0.6"), ("gw", "traffic-ingress", "10.0.0.8"),
                                ("client.default", "sidecar", ""), ("traffic-ingress", "", "10.0.0.5")]:
        _refused(ac, node, cluster, peer)
    AccessControl("none", {}, lambda ip: [])("anything", "traffic-ingress", "1.2.3.4")
    with pytest.raises(ValueError, match="unknown --xds-auth"):
        AccessControl("trust-me", {}, lambda ip: [])
    with pytest.raises(ValueError, match="bad trust domain"):
        AccessControl("mtls", {}, lambda ip: [], trust_domain="spiffe://x")


def test_peer_ip_counts_only_live_pods_holding_the_ip() -> None:
    """Issue 16 item 2: an IP names the one live pod holding it (Running, or Pending with an IP; not
    terminating; not hostNetwork), podIPs honoured and compared normalised."""
    old_gw = Pod("ingress", "gw-old", ip="10.0.0.9", phase="Succeeded", service_account="traffic-ingress")
    new_pod = Pod("default", "newcomer", ip="10.0.0.9", phase="Running")
    pending_gw = Pod("ingress", "gw-1", ip="10.0.0.10", phase="Pending", service_account="traffic-ingress")
    hostnet_gw = Pod("ingress", "gw-host", ip="192.0.2.1", host_network=True, service_account="traffic-ingress")
    wrong_sa = Pod("ingress", "gw-sa", ip="10.0.0.11", service_account="default")
    no_sa = Pod("ingress", "gw-nosa", ip="10.0.0.12")  # Kubernetes runs it as "default"
    wrong_ns = Pod("default", "gw-ns", ip="10.0.0.13", service_account="traffic-ingress")
    twin_a, twin_b = Pod("default", "twin-a", ip="10.0.0.14"), Pod("default", "twin-b", ip="10.0.0.14", phase="Pending")
    dying = Pod("default", "dying", ip="10.0.0.15", terminating=True)
    failed = Pod("default", "failed", ip="10.0.0.16", phase="Failed")
    dual = Pod("default", "dual", ip="fd00::20", ips=("fd00::20", "10.0.0.20"))
    v4 = Pod("default", "v4", ip="10.0.0.21", ips=("10.0.0.21",))
    terminating_gw = Pod("ingress", "gw-bye", ip="10.0.0.22", terminating=True, service_account="traffic-ingress")
    ac = _ac("peer-ip", [(old_gw, GW_LABELS), (new_pod, {}), (pending_gw, GW_LABELS), (hostnet_gw, GW_LABELS),
                         (wrong_sa, GW_LABELS), (no_sa, GW_LABELS), (wrong_ns, GW_LABELS), (twin_a, {}), (twin_b, {}),
                         (dying, {}), (failed, {}), (dual, {}), (v4, {}), (terminating_gw, GW_LABELS)],
             gateway_namespace="ingress")
    # A Succeeded gateway pod and a new pod share an IP: judged by the live pod only.
    _refused(ac, "gw", "traffic-ingress", "10.0.0.9", match="pod default/newcomer .* not in the gateway namespace")
    ac("newcomer.default", "sidecar", "10.0.0.9")
    _refused(ac, "gw-old.ingress", "sidecar", "10.0.0.9", match="Succeeded")
    ac("gw", "traffic-ingress", "10.0.0.10")  # Pending with an IP counts
    _refused(ac, "gw", "traffic-ingress", "192.0.2.1", match="not the IP of a live pod")  # hostNetwork
    _refused(ac, "gw-host.ingress", "sidecar", "192.0.2.1", match="host network")
    _refused(ac, "gw", "traffic-ingress", "10.0.0.11", match="ServiceAccount default, not the gateway's traffic-ingress")
    _refused(ac, "gw", "traffic-ingress", "10.0.0.12", match="ServiceAccount default")
    _refused(ac, "gw", "traffic-ingress", "10.0.0.13", match="not in the gateway namespace")
    _refused(ac, "gw", "traffic-ingress", "10.0.0.22", match="not the IP of a live pod")  # terminating
    for node in ("twin-a.default", "twin-b.default"):
        _refused(ac, node, "sidecar", "10.0.0.14", match="held by 2 live pods")
    _refused(ac, "dying.default", "sidecar", "10.0.0.15", match="terminating")
    _refused(ac, "failed.default", "sidecar", "10.0.0.16", match="Failed")
    ac("dual.default", "sidecar", "10.0.0.20")  # the second of its podIPs
    ac("dual.default", "sidecar", "fd00:0:0::20")  # IPv6, written another way
    ac("dual.default", "sidecar", "::ffff:10.0.0.20")  # an IPv4-mapped IPv6 peer
    ac("v4.default", "sidecar", "::ffff:10.0.0.21")
    _refused(ac, "dual.default", "sidecar", "10.0.0.21", match="is pod IP fd00::20, 10.0.0.20, not 10.0.0.21")
    ac_sa = _ac("peer-ip", [(wrong_sa, GW_LABELS)], gateway_namespace="ingress", gateway_service_account="default")
    ac_sa("gw", "traffic-ingress", "10.0.0.11")


def test_mtls_accepts_only_spiffe_ids_of_the_trust_domain() -> None:
    """Issue 16 item 6: sidecar spiffe://<td>/ns/<ns>/sa/<sa> of the claimed live pod; gateway
    spiffe://<td>/ns/<gateway ns>/sa/<gateway SA>; no CN or DNS-SAN fallbacks, other trust domains refused."""
    pods = [(Pod("default", "client", ip="10.0.0.5", service_account="reviews"), {}),
            (Pod("default", "plain", ip="10.0.0.6"), {}),
            (Pod("default", "done", ip="10.0.0.7", phase="Succeeded", service_account="reviews"), {})]
    ac = _ac("mtls", pods, gateway_namespace="ingress", trust_domain="example.org")
    ac("client.default", "sidecar", "", ("spiffe://example.org/ns/default/sa/reviews",))
    ac("plain.default", "sidecar", "", ("https://x/y", "spiffe://example.org/ns/default/sa/default"))
    ac("gw-0", "traffic-ingress", "", ("spiffe://example.org/ns/ingress/sa/traffic-ingress",))
    for node, cluster, ids, why in [
        ("client.default", "sidecar", ("spiffe://cluster.local/ns/default/sa/reviews",), "does not name"),  # trust domain
        ("client.default", "sidecar", ("spiffe://example.org/ns/default/sa/other",), "does not name"),  # SA
        ("client.default", "sidecar", ("spiffe://example.org/ns/other/sa/reviews",), "does not name"),  # namespace
        ("client.default", "sidecar", ("spiffe://example.org/ns/default/pod/client",), "does not name"),  # old form
        ("client.default", "sidecar", ("client.default",), "does not name"),  # a CN-like / DNS-SAN-like name
        ("client.default", "sidecar", (), "no verified client certificate"),
        ("done.default", "sidecar", ("spiffe://example.org/ns/default/sa/reviews",), "Succeeded"),
        ("ghost.default", "sidecar", ("spiffe://example.org/ns/default/sa/default",), "not a known pod"),
        ("gw-0", "traffic-ingress", ("spiffe://example.org/ns/default/sa/traffic-ingress",), "not the gateway"),
        ("gw-0", "traffic-ingress", ("spiffe://example.org/ns/ingress/sa/default",), "not the gateway"),
        ("gw-0", "traffic-ingress", ("spiffe://cluster.local/ns/ingress/sa/traffic-ingress",), "not the gateway"),
        ("gw-0", "traffic-ingress", ("traffic-ingress",), "not the gateway"),
    ]:
        _refused(ac, node, cluster, "", ids, match=why)


def test_unix_socket_peers_are_judged_by_uid() -> None:
    """Over a Unix socket the peer is the kernel's credentials: the gateway only for the allowed uids,
    sidecars only for the sidecar uids (and a known pod must be live)."""
    pods = [(Pod("default", "client", ip="10.0.0.5"), {}), (Pod("default", "done", phase="Succeeded"), {})]
    ac = _ac("peer-ip", pods, unix_gateway_uids={0}, unix_sidecar_uids={1337})
    peer = lambda uid: unixpeer.describe(unixpeer.PeerCred(pid=42, uid=uid, gid=uid))  # noqa: E731
    ac("gw", "traffic-ingress", peer(0))
    _refused(ac, "gw", "traffic-ingress", peer(1337), match="uid 1337 may not claim the gateway")
    ac("client.default", "sidecar", peer(1337))
    ac("unknown.default", "sidecar", peer(1337))
    _refused(ac, "client.default", "sidecar", peer(1000), match="uid 1000 may not claim a sidecar")
    _refused(ac, "done.default", "sidecar", peer(1337), match="Succeeded")
    _refused(ac, "client.default", "sidecar", "unix:", match="no IP address or peer credentials")
    default = _ac("peer-ip", pods)
    default("gw", "traffic-ingress", peer(os.getuid()))
    default("client.default", "sidecar", peer(1337))
    if os.getuid() != 1337:
        _refused(default, "gw", "traffic-ingress", peer(1337))


def test_refusal_log_is_bounded_and_node_ids_are_cut(caplog: pytest.LogCaptureFixture) -> None:
    ac = _ac("peer-ip", [])
    for i in range(5000):
        _refused(ac, f"{'x' * 5000}-{i}", "traffic-ingress", "10.9.0.1")
    assert len(ac._logged) <= access.LOGGED_MAX
    assert max(len(r.getMessage()) for r in caplog.records if r.name == "trafficmgr.core.access") < 400
    lines = len(caplog.records)
    _refused(ac, "y.default", "traffic-ingress", "10.9.0.1")
    _refused(ac, "y.default", "traffic-ingress", "10.9.0.1")
    assert len(caplog.records) == lines + 1  # logged once


def test_assembler_reads_phase_deletion_host_network_service_account_and_pod_ips() -> None:
    asm = Assembler(PluginHost.load([]).labels)
    base = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "default", "labels": {"a": "b"}},
            "spec": {"serviceAccountName": "reviews", "containers": []},
            "status": {"phase": "Running", "podIP": "10.0.0.5", "podIPs": [{"ip": "10.0.0.5"}, {"ip": "FD00:0::5"}]}}
    asm.apply("ADDED", POD, base)
    pod = asm.pods[("default", "p")]
    assert (pod.ips, pod.phase, pod.service_account, pod.live, pod.host_network) == (
        ("10.0.0.5", "fd00::5"), "Running", "reviews", True, False)
    assert [p.name for p, labels in asm.pods_with_ip("fd00::5")] == ["p"]
    assert [labels for p, labels in asm.pods_with_ip("::ffff:10.0.0.5")] == [{"a": "b"}]
    moved = {**base, "metadata": {**base["metadata"], "deletionTimestamp": "2026-01-01T00:00:00Z"},
             "spec": {"hostNetwork": True}, "status": {"phase": "Succeeded", "podIP": "10.0.0.6"}}
    asm.apply("MODIFIED", POD, moved)
    pod = asm.pods[("default", "p")]
    assert (pod.ips, pod.terminating, pod.host_network, pod.service_account, pod.live, pod.holds_ips) == (
        ("10.0.0.6",), True, True, "", False, ())
    assert asm.pods_with_ip("fd00::5") == [] and asm.pods_with_ip("10.0.0.5") == []
    asm.apply("DELETED", POD, moved)
    assert asm.pods_with_ip("10.0.0.6") == []


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _certs(tmp: Path) -> Path:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
             "-subj", "/CN=test-ca", cwd=tmp)
    for name, san in [("server", "DNS:localhost,IP:127.0.0.1"), ("client", "URI:spiffe://cluster.local/ns/default/sa/default"),
                      ("other", "URI:spiffe://cluster.local/ns/default/sa/other")]:
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=tmp)
        (tmp / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "1", "-extfile", f"{name}.ext", cwd=tmp)
    return tmp


def _first_response(port: int, node_id: str, tmp: Path, cert: str | None) -> discovery_pb2.DiscoveryResponse:
    creds = grpc.ssl_channel_credentials(
        root_certificates=(tmp / "ca.crt").read_bytes(),
        private_key=(tmp / f"{cert}.key").read_bytes() if cert else None,
        certificate_chain=(tmp / f"{cert}.crt").read_bytes() if cert else None,
    )
    channel = grpc.secure_channel(f"127.0.0.1:{port}", creds, options=[("grpc.ssl_target_name_override", "localhost")])
    try:
        rpc = channel.stream_stream("/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
                                    request_serializer=lambda m: m.SerializeToString(),
                                    response_deserializer=discovery_pb2.DiscoveryResponse.FromString)
        req = discovery_pb2.DiscoveryRequest(node=base_pb2.Node(id=node_id, cluster="sidecar"), type_url=cache.CLUSTER)
        return next(iter(rpc(iter([req]), timeout=5)))
    finally:
        channel.close()


def test_mtls_serves_the_named_client_only(tmp_path: Path) -> None:
    tmp = _certs(tmp_path)
    model = Model(pods={("default", "client"): Pod("default", "client", ip="10.0.0.5")})
    cp = ControlPlane(PluginHost.load([]), argparse.Namespace(xds_auth="mtls"))
    cp.assembler.pods.update(model.pods)
    cp.publish_model(model)
    creds = grpc.ssl_server_credentials([((tmp / "server.key").read_bytes(), (tmp / "server.crt").read_bytes())],
                                        root_certificates=(tmp / "ca.crt").read_bytes(), require_client_auth=True)
    xds = XdsServerThread(cp.cache, "127.0.0.1", 0, credentials=creds, authorizer=cp.authorize).start()
    try:
        assert _first_response(xds.port, "client.default", tmp, "client").type_url == cache.CLUSTER
        with pytest.raises(grpc.RpcError) as denied:
            _first_response(xds.port, "client.default", tmp, "other")
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "does not name node client.default" in denied.value.details()
        with pytest.raises(grpc.RpcError) as no_cert:
            _first_response(xds.port, "client.default", tmp, None)
        assert no_cert.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        xds.stop(0.5)


class LeakySecrets:
    """A misbehaving plugin that offers a Secret to every role."""

    @hookimpl
    def trafficmgr_resources(self, ctx):  # type: ignore[no-untyped-def]
        from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

        secret = secret_pb2.Secret(name="leak")
        secret.tls_certificate.private_key.inline_string = KEY_PEM
        return [ctx.resource(secret, "leak")]


#: The leaky plugin's key; ``KEY_MARK`` is in no other resource.
KEY_MARK = "bGVha2VkLWtleS1tYXRlcmlhbA"
KEY_PEM = f"-----BEGIN PRIVATE KEY-----\n{KEY_MARK}\n-----END PRIVATE KEY-----\n"


def served_bytes(snapshot: cache.Snapshot) -> bytes:
    """Every byte the xDS server can send for this view: each type's state-of-the-world response body
    (all names) and each resource's delta-xDS encoding."""
    parts = []
    for types in snapshot.types.values():
        parts.append(types.sotw_body(None))
        parts.extend(r.delta_bytes for r in types.select(None))
    return b"".join(parts)


names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(names, st.integers(1, 65535), st.sampled_from(["http", "tcp", "direct", None]),
                          st.booleans(), st.lists(st.integers(1, 250), max_size=4)), max_size=12, unique_by=lambda t: t[0]))
def test_no_sidecar_view_ever_contains_a_secret(services: list) -> None:
    svcs, eps = {}, {}
    for i, (name, port, proto, headless, hosts) in enumerate(services):
        svc = Service("default", name, (ServicePort("p", port, port, proto),), cluster_ip=None if headless else f"10.96.0.{i + 1}",
                      headless=headless, labels=Labels({}))
        svcs[svc.key] = svc
        eps[("default", name, "p")] = tuple(Endpoint(f"10.244.0.{h}", port) for h in hosts)
    plugins = PluginHost.load(extra=[("leaky", LeakySecrets())])
    snaps = Builder(plugins).build(Model(services=svcs, endpoints=eps))
    assert not snaps["sidecar"].types[cache.SECRET].resources
    sidecar = served_bytes(snaps["sidecar"])
    leaked = b"PRIVATE KEY" in sidecar or KEY_MARK.encode() in sidecar
    assert not leaked, "private key material in the bytes served to sidecars"
    # The check sees key material where it is served: the gateway view carries the plugin's Secret.
    assert KEY_PEM.encode() in served_bytes(snaps["gateway"])
