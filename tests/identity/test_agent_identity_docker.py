"""``agent --mesh-identity`` with the docker runtime (the test Docker engine, the sidecar image, the real
mesh CA and Sign service): each sidecar container mounts only its own pod's directory (read-only, as its
working directory), serves TLS with its own workload certificate, and picks up a renewal written on the
node through the bind mount without a restart."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tests.agent.conftest import cluster, docker_api, images  # noqa: F401 - fixtures
from tests.agent.rig import DOCKER_HOST, Cluster, DockerPod
from tests.identity.realsigner import RealSigner
from tests.identity.test_agent_identity_netns import POD, TLS_PORT, start_agent
from trafficmgr.core.agent.docker_runtime import WORKDIR, DockerRuntime
from trafficmgr.core.identity import client, files
from trafficmgr.testing.envoy import wait_for

# 10.244.83.0/24: used by no other test.
PODS = {"web-6c9f-da": ("10.244.83.2", "web"), "web-6c9f-db": ("10.244.83.3", "other")}


@pytest.fixture
def signer(cluster: Cluster) -> Iterator[RealSigner]:  # noqa: F811 - the imported fixture
    s = RealSigner(cluster.store, cluster.kube_client(), "node-1", ttl_s=3600)
    try:
        wait_for(s.published, 10)
        yield s
    finally:
        s.close()


def served_serial(p: DockerPod) -> int:
    import socket
    import ssl

    def probe() -> int:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", TLS_PORT), timeout=3) as raw, ctx.wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number

    return p.in_ns(probe)


def test_docker_sidecars_see_only_their_own_identity(
        cluster: Cluster, signer: RealSigner, tmp_path: Path,  # noqa: F811 - the imported fixtures
        docker_api: Any,  # noqa: F811
        images: dict[str, str],  # noqa: F811
) -> None:
    token = tmp_path / "token"
    token.write_text(signer.agent_token())
    state = str(cluster.tmp / "state")
    runtime = DockerRuntime(DOCKER_HOST, images["envoy"], state_dir=state)
    agent = start_agent(cluster, runtime, signer, token)  # type: ignore[arg-type]
    assert agent.identity is not None
    cluster.apply("""
apiVersion: apps/v1
kind: ReplicaSet
metadata: {name: web-6c9f}
spec:
  selector: {matchLabels: {app: web}}
  template: {metadata: {labels: {app: web, traffic.envoy.enabled: "true"}}, spec: {containers: [{name: app, image: app}]}}
""")
    pods: dict[str, DockerPod] = {}
    try:
        for name, (ip, sa) in PODS.items():
            cluster.apply(POD.format(name=name, ip=ip).replace("serviceAccountName: web", f"serviceAccountName: {sa}"))
            cluster.label("pods", name, {"traffic.envoy.enabled": "true"})
            uid = cluster.store.get("pods", name, "default")["metadata"]["uid"]
            pods[name] = DockerPod(docker_api, images["busybox"], name, uid, [ip])
        ids = {name: wait_for(lambda n=name: cluster.annotation(n), 30, message=f"{name}: no sidecar") for name in PODS}
        for name, (_, sa) in PODS.items():
            uid = cluster.store.get("pods", name, "default")["metadata"]["uid"]
            own = os.path.join(state, uid)
            info = docker_api.inspect_container(ids[name])
            mounts = {(m["Source"], m["Destination"], m["RW"]) for m in info["Mounts"]}
            assert (own, WORKDIR, False) in mounts and info["Config"]["WorkingDir"] == WORKDIR
            others = [m for m in mounts if m[0].startswith(state) and m[0] != own]
            assert not others, f"{name} sees another pod's directory: {others}"
            assert client.leaf_uris(files.read_chain(own) or b"") == [f"spiffe://cluster.local/ns/default/sa/{sa}"]
            first = x509.load_pem_x509_certificates(files.read_chain(own) or b"")[0].serial_number
            assert wait_for(lambda p=pods[name]: served_serial(p), 20, message=f"{name}: no TLS") == first

        # A renewal written on the node reaches the running container through its read-only bind mount.
        name = "web-6c9f-da"
        own = os.path.join(state, cluster.store.get("pods", name, "default")["metadata"]["uid"])
        before = docker_api.inspect_container(ids[name])["State"]
        old = served_serial(pods[name])
        agent.identity.renew_now(ids[name])
        new = wait_for(lambda: (s := x509.load_pem_x509_certificates(files.read_chain(own) or b"")[0].serial_number) != old
                       and s, 15, message="not renewed")
        wait_for(lambda: served_serial(pods[name]) == new, 15, message="the container's Envoy kept the old certificate")
        after = docker_api.inspect_container(ids[name])["State"]
        assert after["StartedAt"] == before["StartedAt"] and after["Running"], "no restart"

        cluster.label("pods", name, {"traffic.envoy.enabled": "false"})
        wait_for(lambda: cluster.annotation(name) == "", 20)
        assert not os.path.exists(own), "the pod's directory goes with its sidecar"
    finally:
        for c in docker_api.containers(all=True, filters={"label": "traffic.envoy.proxy"}):
            docker_api.remove_container(c["Id"], force=True)
        for p in pods.values():
            p.close()
