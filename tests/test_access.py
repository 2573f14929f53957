"""xDS access control (issue: every proxy gets only its own config; keys only to verified gateways)."""

from __future__ import annotations

import argparse
import json
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
from trafficmgr.core import cache
from trafficmgr.core.access import AccessControl, refused_count
from trafficmgr.core.bootstrap import bootstrap
from trafficmgr.core.controlplane import ControlPlane
from trafficmgr.core.kube.client import KubeClient, load_api_client
from trafficmgr.core.model import Endpoint, Labels, Model, Pod, Service, ServicePort
from trafficmgr.core.plugins import PluginHost
from trafficmgr.core.translate.builder import Builder
from trafficmgr.core.xds.server import XdsServerThread
from trafficmgr.testing.envoy import EnvoyProcess, wait_for

CLIENT_IP, GATEWAY_IP = "127.0.0.21", "127.0.0.31"


def _pod(name: str, ip: str, labels: dict[str, str]) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default", "labels": labels},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "x"}]},
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}}


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[dict]:
    api = APIServer().start()
    api.store.create(_pod("client", CLIENT_IP, {"app": "client"}))
    api.store.create(_pod("traffic-ingress-0", GATEWAY_IP, {"app": "traffic-ingress"}))
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


def test_access_control_unit_rules() -> None:
    pods = {("default", "client"): Pod("default", "client", ip="10.0.0.5")}
    by_ip = {"10.0.0.9": [("ingress", "gw-0", {"app": "traffic-ingress"})], "10.0.0.8": [("default", "gw-x", {"app": "traffic-ingress"})]}
    ac = AccessControl("peer-ip", pods, lambda ip: by_ip.get(ip, []), gateway_namespace="ingress")
    ac("client.default", "sidecar", "10.0.0.5")
    ac("unknown.default", "sidecar", "10.0.0.7")  # unknown: allowed to wait, gets nothing
    ac("gw-0", "traffic-ingress", "10.0.0.9")
    for node, cluster, peer in [("client.default", "sidecar", "10.0.0.6"), ("gw", "traffic-ingress", "10.0.0.8"),
                                ("client.default", "sidecar", ""), ("traffic-ingress", "", "10.0.0.5")]:
        with pytest.raises(PermissionError):
            ac(node, cluster, peer)
    mtls = AccessControl("mtls", pods, lambda ip: [])
    mtls("client.default", "sidecar", "", ("spiffe://cluster.local/ns/default/pod/client",))
    mtls("gw-0", "traffic-ingress", "", ("spiffe://cluster.local/ns/ingress/gateway/gw",))
    for node, cluster, ids in [("client.default", "sidecar", ("spiffe://cluster.local/ns/default/pod/other",)),
                               ("client.default", "sidecar", ()), ("gw-0", "traffic-ingress", ("spiffe://x/ns/default/pod/client",))]:
        with pytest.raises(PermissionError):
            mtls(node, cluster, "", ids)
    AccessControl("none", pods, lambda ip: [])("anything", "traffic-ingress", "1.2.3.4")
    with pytest.raises(ValueError, match="unknown --xds-auth"):
        AccessControl("trust-me", pods, lambda ip: [])


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _certs(tmp: Path) -> Path:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
             "-subj", "/CN=test-ca", cwd=tmp)
    for name, san in [("server", "DNS:localhost,IP:127.0.0.1"), ("client", "URI:spiffe://cluster.local/ns/default/pod/client"),
                      ("other", "URI:spiffe://cluster.local/ns/default/pod/other")]:
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
        secret.tls_certificate.private_key.inline_string = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
        return [ctx.resource(secret, "leak")]


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
    assert "PRIVATE KEY" not in json.dumps([r.name for r in snaps["sidecar"].types[cache.LISTENER].resources.values()])
