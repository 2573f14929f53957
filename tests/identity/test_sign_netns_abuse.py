"""The signing service's port, abused from another pod's network namespace.

The real Sign service (mesh CA, TokenReview against the local API server) listens inside a "control plane"
network namespace; an attacker pod in its own namespace, linked to it by a veth pair (nothing routed out),
runs a client process there with every credential a pod can hold: no valid token, its own pod-bound token
asking for another pod or another identity, and a stolen agent token of another node. Each is refused with
its gRPC code; the one legitimate request (its own identity) is signed, so the path itself works; and the
port answers nothing but Sign.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.identity.realsigner import AGENT_SA, NS, SERVER_NAME, RealSigner
from trafficmgr.core.identity.server import IdentityServer
from trafficmgr.core.kube.client import KubeClient, load_api_client
from trafficmgr.testing import netns
from trafficmgr.testing.envoy import wait_for
from trafficmgr.testing.netns import NetNS
from trafficmgr.testing.prereq import missing

CP_IP, ATTACKER_IP, VICTIM_IP = "10.244.86.1", "10.244.86.2", "10.244.86.3"
TD = "cluster.local"

PODS = [
    {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, "namespace": "default"}}
    for sa in ("victim", "attacker")
] + [
    {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"},
     "spec": {"nodeName": "node-1", "serviceAccountName": sa, "containers": [{"name": "app", "image": "app"}]},
     "status": {"podIP": ip, "phase": "Running"}}
    for name, sa, ip in (("victim-1", "victim", VICTIM_IP), ("attacker-1", "attacker", ATTACKER_IP))
] + [
    # The agent of another node (its token is what an attacker who owns that node holds).
    {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "agent-node-2", "namespace": NS},
     "spec": {"nodeName": "node-2", "serviceAccountName": AGENT_SA, "hostNetwork": True,
              "containers": [{"name": "agent", "image": "trafficmgr"}]}},
]

# Runs inside the attacker's namespace (a process: grpcio's threads would leave a thread's namespace).
CLIENT = """
import json, sys
import grpc
from trafficmgr.core.identity.client import IdentityError, SignClient, make_csr, new_key
address, bundle_file, cases = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
bundle = open(bundle_file, "rb").read()
out = {}
for name, case in cases.items():
    client = SignClient(address, case["token_file"], server_name=case["server_name"], timeout_s=10)
    key = new_key()
    request = {"csr": make_csr(key, case["spiffe_id"]).decode(), "pod": case["pod"]}
    try:
        answer = client.call(request, bundle)
        out[name] = ["OK", answer["certificate_chain"][:30]]
    except IdentityError as exc:
        out[name] = [exc.code, str(exc)]
# Anything but Sign on the same port.
creds = grpc.ssl_channel_credentials(root_certificates=bundle)
opts = [("grpc.enable_http_proxy", 0), ("grpc.ssl_target_name_override", cases["own"]["server_name"])]
with grpc.secure_channel(address, creds, options=opts) as ch:
    try:
        ch.unary_unary("/trafficmgr.identity.v1.Identity/Bundle")(b"{}", timeout=10)
        out["other_method"] = ["OK", ""]
    except grpc.RpcError as exc:
        out["other_method"] = [exc.code().name, exc.details() or ""]
print(json.dumps(out))
"""


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[dict[str, Any]]:
    reason = netns.available()
    if reason:
        missing(f"the signing-port abuse test needs network namespaces: {reason}")
    from trafficmgr.apiserver import APIServer
    from trafficmgr.apiserver.access import new_token

    api = APIServer(port=0, token=new_token()).start()
    made: list[NetNS] = []
    signer: RealSigner | None = None
    server: IdentityServer | None = None
    try:
        kubeconfig = tmp_path / "kubeconfig"
        api.write_kubeconfig(str(kubeconfig))
        kube = KubeClient(load_api_client(str(kubeconfig)))
        signer = RealSigner(api.store, kube, "node-1")
        for obj in PODS:
            api.store.create(obj)
        cp, attacker = NetNS("tmsgc"), NetNS("tmsga")
        made += [cp, attacker]
        cp.add_pod_network([CP_IP], routed=())
        attacker.add_pod_network([ATTACKER_IP], routed=())
        attacker.link(cp, [ATTACKER_IP], [CP_IP])
        # Bound inside the control plane's namespace: only that namespace's interfaces (and so the
        # attacker, over the veth) reach it. TokenReview and pod reads still go to the API server.
        server = IdentityServer(signer.ca, kube, signer.options, CP_IP, 0, [SERVER_NAME])
        cp.in_ns(server.start)
        bundle = tmp_path / "bundle.pem"
        bundle.write_bytes(signer.bundle())
        tokens: dict[str, Path] = {}
        for name, (ns, sa, pod) in {"attacker": ("default", "attacker", "attacker-1"),
                                    "agent2": (NS, AGENT_SA, "agent-node-2")}.items():
            tokens[name] = tmp_path / f"{name}.token"
            tokens[name].write_text(signer.token(ns, sa, pod))
        tokens["garbage"] = tmp_path / "garbage.token"
        tokens["garbage"].write_text("eyJhbGciOiJIUzI1NiJ9.not-a-token.at-all-0123456789")
        yield {"store": api.store, "attacker": attacker, "address": f"{CP_IP}:{server.port}",
               "bundle": bundle, "tokens": tokens}
    finally:
        if server is not None:
            server.stop(0)
        if signer is not None:
            signer.close()
        for ns in made:
            ns.delete()
        api.stop()


def _pod(store: Any, name: str) -> dict[str, str]:
    return {"namespace": "default", "name": name, "uid": store.get("pods", name, "default")["metadata"]["uid"]}


def test_the_signing_port_refuses_every_borrowed_identity_from_another_pods_namespace(rig: dict[str, Any]) -> None:
    store, tokens = rig["store"], rig["tokens"]
    victim = f"spiffe://{TD}/ns/default/sa/victim"
    attacker = f"spiffe://{TD}/ns/default/sa/attacker"

    def case(token: str, pod: str, spiffe_id: str) -> dict[str, Any]:
        return {"token_file": str(tokens[token]), "server_name": SERVER_NAME, "pod": _pod(store, pod), "spiffe_id": spiffe_id}

    cases = {
        "own": case("attacker", "attacker-1", attacker),  # legitimate: the path works
        "garbage_token": case("garbage", "victim-1", victim),
        "own_token_other_pod": case("attacker", "victim-1", victim),
        "own_pod_other_identity": case("attacker", "attacker-1", victim),
        "other_nodes_agent": case("agent2", "victim-1", victim),
    }

    def run() -> dict[str, list[str]]:
        proc = rig["attacker"].run(sys.executable, "-c", CLIENT, rig["address"], str(rig["bundle"]), json.dumps(cases),
                                   check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return dict(json.loads(proc.stdout.strip().splitlines()[-1]))

    got = wait_for(lambda: (r := run())["own"][0] == "OK" and r, 20, message="the attacker's own request never got through")
    assert got["own"][0] == "OK" and got["own"][1].startswith("-----BEGIN CERTIFICATE-----"), got["own"]
    assert got["garbage_token"][0] == "UNAUTHENTICATED", got
    assert got["own_token_other_pod"][0] == "PERMISSION_DENIED", got
    assert got["own_pod_other_identity"][0] == "PERMISSION_DENIED" and "sa/attacker" in got["own_pod_other_identity"][1], got
    assert got["other_nodes_agent"][0] == "PERMISSION_DENIED" and "node-2" in got["other_nodes_agent"][1], got
    assert got["other_method"][0] == "UNIMPLEMENTED", got


def test_the_port_is_reachable_only_where_it_is_bound(rig: dict[str, Any]) -> None:
    """Bound on the control plane namespace's address: the host's loopback does not reach it (a check
    that the listener above really is the one in the namespace)."""
    port = int(rig["address"].rsplit(":", 1)[1])
    proc = subprocess.run([sys.executable, "-c", f"import socket; socket.create_connection(('127.0.0.1', {port}), 2)"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "refused" in proc.stderr.lower(), proc
