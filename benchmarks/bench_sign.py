"""Signing benchmark of the mesh CA's Sign service (not a test; issue 18).

    python benchmarks/bench_sign.py [--count 1000] [--pods 100] [--concurrency 1]

One process runs the local API server (TokenRequest/TokenReview), the mesh CA (generate mode: EC P-256
root) and the Sign service on loopback, and a client that asks for ``--count`` workload certificates
(EC P-256 CSRs, made before the clock starts) over gRPC TLS with the node agent's pod-bound token, for
``--pods`` pods of its node in turn. Each request is a full one: TokenReview (cached after the first, as
in serve), a pod GET, the CSR checks, the signature. Prints one JSON line: wall time, process CPU time
(everything in the process: API server, service, client), per-certificate figures, and the CA's signing
alone (``MeshCA.sign`` in a loop, no RPC) for comparison.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from kubernetes import client as k8s

from trafficmgr.apiserver import APIServer
from trafficmgr.apiserver.access import new_token
from trafficmgr.core.identity import METHOD
from trafficmgr.core.identity.ca import MeshCA
from trafficmgr.core.identity.client import make_csr, new_key
from trafficmgr.core.identity.server import IdentityServer, SignOptions
from trafficmgr.core.identity.spiffe import spiffe_id
from trafficmgr.core.kube.client import KubeClient, load_api_client

NS = "trafficmgr"


def _csr(uri: str) -> str:
    return make_csr(new_key(), uri).decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--pods", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="bench-sign-"))
    api = APIServer(port=0, token=new_token()).start()
    api.write_kubeconfig(str(tmp / "kubeconfig"))
    kube = KubeClient(load_api_client(str(tmp / "kubeconfig")))
    store = api.store
    store.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    for ns, sa in ((NS, "trafficmgr-agent"), ("default", "reviews")):
        store.create({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, "namespace": ns}})
    store.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}})
    containers = [{"name": "c", "image": "x"}]
    store.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "agent-a", "namespace": NS},
                  "spec": {"serviceAccountName": "trafficmgr-agent", "nodeName": "node-a", "containers": containers}})
    pods = []
    for i in range(args.pods):
        obj = store.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"reviews-{i}", "namespace": "default"},
                            "spec": {"serviceAccountName": "reviews", "nodeName": "node-a", "containers": containers}})
        pods.append({"namespace": "default", "name": obj["metadata"]["name"], "uid": obj["metadata"]["uid"]})
    ca = MeshCA(kube, NS).start()
    server = IdentityServer(ca, kube, SignOptions(agent_namespace=NS), "127.0.0.1", 0).start()
    ref = k8s.V1BoundObjectReference(kind="Pod", api_version="v1", name="agent-a",
                                     uid=store.get("pods", "agent-a", NS)["metadata"]["uid"])
    token = k8s.CoreV1Api(kube.api).create_namespaced_service_account_token(
        "trafficmgr-agent", NS, k8s.AuthenticationV1TokenRequest(
            spec=k8s.V1TokenRequestSpec(audiences=["trafficmgr"], bound_object_ref=ref))).status.token
    uri = spiffe_id("cluster.local", "default", "reviews")
    bodies = [json.dumps({"csr": _csr(uri), "pod": pods[i % len(pods)]}).encode() for i in range(args.count)]
    channel = grpc.secure_channel(f"127.0.0.1:{server.port}", grpc.ssl_channel_credentials(ca.trust_bundle().encode()),
                                  options=[("grpc.enable_http_proxy", 0)])
    sign = channel.unary_unary(METHOD)
    metadata = [("authorization", f"Bearer {token}")]
    sign(bodies[0], metadata=metadata, timeout=10)  # warm-up: connection, TLS, the TokenReview cache
    errors = 0
    lock = threading.Lock()

    def one(body: bytes) -> None:
        nonlocal errors
        try:
            answer = json.loads(sign(body, metadata=metadata, timeout=30))
            assert answer["certificate_chain"].startswith("-----BEGIN CERTIFICATE-----")
        except Exception:  # noqa: BLE001 - counted
            with lock:
                errors += 1

    cpu0, wall0 = time.process_time(), time.perf_counter()
    if args.concurrency <= 1:
        for body in bodies:
            one(body)
    else:
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(one, bodies))
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    # The CA's signing alone (CSR checks + issuing), no RPC, no API server.
    csrs = [json.loads(b)["csr"] for b in bodies[:200]]
    cpu1, wall1 = time.process_time(), time.perf_counter()
    for text in csrs:
        ca.sign(text, uri, dt.timedelta(hours=24))
    ca_ms = (time.perf_counter() - wall1) * 1000 / len(csrs)
    ca_cpu_ms = (time.process_time() - cpu1) * 1000 / len(csrs)
    channel.close()
    server.stop()
    ca.stop()
    api.stop()
    print(json.dumps({
        "certificates": args.count, "errors": errors, "concurrency": args.concurrency,
        "wall_s": round(wall, 3), "process_cpu_s": round(cpu, 3),
        "per_cert_ms": round(wall * 1000 / args.count, 3), "cpu_per_cert_ms": round(cpu * 1000 / args.count, 3),
        "certs_per_s": round(args.count / wall, 1), "ca_sign_only_ms": round(ca_ms, 3),
        "ca_sign_only_cpu_ms": round(ca_cpu_ms, 3), "python": sys.version.split()[0],
    }))


if __name__ == "__main__":
    main()
