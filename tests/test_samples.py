"""The manifests of samples/: valid Kubernetes objects (strict schema validation, offline), containers of
the trafficmgr image whose args are real command lines, and samples/protocols.yaml run in local mode (API
server, local kubelet and kube-proxy, as ``trafficmgr demo`` runs pods) answering gRPC and WebSocket calls
through its Service ClusterIPs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from websockets.sync.client import connect

from trafficmgr import cli
from trafficmgr.apiserver.discovery import BY_KEY
from trafficmgr.apps.grpc_echo import ECHO_METHOD, STREAM_METHOD
from trafficmgr.testing.envoy import wait_for

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
FILES = sorted(SAMPLES.glob("*.yaml"))
KUBE_VERSIONS = ["1.29.0", "1.32.0"]
NO_PROXY = [("grpc.enable_http_proxy", 0)]


def objects(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def by_kind(objs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def test_samples_found() -> None:
    assert {p.name for p in FILES} >= {"bookinfo.yaml", "ingress.yaml", "http-text-response.yaml", "protocols.yaml"}


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_sample_validates_strict(path: Path, kube_version: str) -> None:
    errors = []
    for obj in objects(path):
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message} at {list(exc.path)}")
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_trafficmgr_containers_run_real_commands(path: Path) -> None:
    """A container of the trafficmgr image runs its ``args`` as a ``trafficmgr`` command line (the image's
    entrypoint; local mode does the same): each must parse."""
    cli.load_command_modules()
    for deploy in by_kind(objects(path), "Deployment").values():
        for c in deploy["spec"]["template"]["spec"]["containers"]:
            if c["image"].split(":")[0].endswith("trafficmgr") and not c.get("command"):
                args = [str(a) for a in c["args"]]
                try:
                    cli.build_parser(args).parse_args(args)
                except SystemExit:
                    pytest.fail(f"{path.name}: Deployment {deploy['metadata']['name']}: args {args} are not a trafficmgr command line")


def test_protocols_sample_ports_and_client() -> None:
    objs = objects(SAMPLES / "protocols.yaml")
    services = by_kind(objs, "Service")
    assert services["grpc-echo"]["spec"]["ports"] == [{"name": "grpc", "port": 9090, "targetPort": "grpc", "appProtocol": "grpc"}]
    assert services["ws-echo"]["spec"]["ports"] == [{"name": "ws", "port": 8765, "targetPort": "ws", "appProtocol": "kubernetes.io/ws"}]
    deployments = by_kind(objs, "Deployment")
    assert deployments["protocols-client"]["metadata"]["labels"]["traffic.envoy.enabled"] == "true"
    assert not set(deployments) & set(by_kind(objects(SAMPLES / "bookinfo.yaml"), "Deployment")), "applies next to bookinfo"
    for name, service in services.items():
        selector = service["spec"]["selector"]
        assert selector.items() <= deployments[name]["spec"]["template"]["metadata"]["labels"].items()


# -- local mode -----------------------------------------------------------------------------------


@pytest.fixture
def local_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """API server + local kubelet (pods on 127.41.0.x) + userspace kube-proxy (ClusterIPs 127.42.0.x)."""
    from trafficmgr.apiserver import APIServer
    from trafficmgr.local.kubelet import LocalKubelet
    from trafficmgr.local.kubeproxy import KubeProxy

    for key in list(os.environ):
        if key.lower().endswith("_proxy"):  # the clients below call loopback addresses directly
            monkeypatch.delenv(key)
    api = APIServer(port=0, workload_controllers=True, service_cidr="127.42.0.0/24")
    kubelet = LocalKubelet(api.store, str(tmp_path), "127.41.0.0/24").attach()
    api.controllers.runtime = kubelet
    api.start()
    proxy = KubeProxy(api.store).start()
    try:
        yield api.store
    finally:
        proxy.close()
        kubelet.close()
        api.stop()


def test_protocols_sample_serves_in_local_mode(local_cluster: Any) -> None:
    store = local_cluster
    for obj in objects(SAMPLES / "protocols.yaml"):
        store.create(obj)

    def ready_pods(app: str) -> list[str]:
        pods = [p for p in store.list_raw(BY_KEY["pods"], "default")[0] if p["metadata"]["labels"].get("app") == app]
        ready = [p["metadata"]["name"] for p in pods
                 if any(c["type"] == "Ready" and c["status"] == "True" for c in (p.get("status") or {}).get("conditions") or [])]
        return ready if len(ready) == 2 else []

    grpc_pods = set(wait_for(lambda: ready_pods("grpc-echo"), 60, message="grpc-echo pods not ready"))
    ws_pods = set(wait_for(lambda: ready_pods("ws-echo"), 60, message="ws-echo pods not ready"))
    grpc_ip = store.get("services", "grpc-echo", "default")["spec"]["clusterIP"]
    ws_ip = store.get("services", "ws-echo", "default")["spec"]["clusterIP"]

    def served_by() -> str:  # one connection per call: kube-proxy balances connections
        with grpc.insecure_channel(f"{grpc_ip}:9090", options=NO_PROXY) as ch:
            reply, call = ch.unary_unary(ECHO_METHOD).with_call(b"through the ClusterIP", timeout=5)
            assert reply == b"through the ClusterIP"
            return dict(call.initial_metadata())["x-pod"]

    wait_for(lambda: {served_by() for _ in range(6)} == grpc_pods, 20, message="both grpc-echo pods should answer")
    with grpc.insecure_channel(f"{grpc_ip}:9090", options=NO_PROXY) as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stream = ch.unary_stream(STREAM_METHOD)(b"s", metadata=(("x-count", "2"), ("x-interval-ms", "10")), timeout=5)
        assert list(stream) == [b"s", b"s"]

    hellos = set()
    for _ in range(6):
        with connect(f"ws://{ws_ip}:8765/", open_timeout=5) as ws:
            hellos.add(ws.recv(timeout=5))
            ws.send(b"bin")
            assert ws.recv(timeout=5) == b"bin"
    assert hellos == {f"hello from {name}" for name in ws_pods}
