"""The real signing side for the agent-side tests: the mesh CA (:class:`MeshCA`, generate mode, publishing
the trust bundle ConfigMap) and the Sign service (:class:`IdentityServer`, TLS on 127.0.0.1) on a test
API server, with the ServiceAccounts, the node and the agent's pod, and tokens from the API server's
TokenRequest (official client)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from trafficmgr.core.identity import BUNDLE_CONFIGMAP
from trafficmgr.core.identity.ca import MeshCA
from trafficmgr.core.identity.server import IdentityServer, SignOptions
from trafficmgr.core.kube.client import KubeClient

NS = "trafficmgr"
AGENT_SA = "trafficmgr-agent"
AUDIENCE = "trafficmgr"
SERVER_NAME = "trafficmgr.trafficmgr.svc"
CA_SECRET = "mesh-ca"


class RealSigner:
    """CA + Sign service for ``node`` (its agent pod ``agent-<node>`` in :data:`NS`)."""

    def __init__(self, store: Any, kube: KubeClient, node: str = "node-1", ttl_s: float = 3600,
                 trust_domain: str = "cluster.local") -> None:
        self.store = store
        self.kube = kube
        self.node = node
        for obj in ({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
                    {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": AGENT_SA, "namespace": NS}},
                    {"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}},
                    {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"agent-{node}", "namespace": NS},
                     "spec": {"serviceAccountName": AGENT_SA, "nodeName": node, "hostNetwork": True,
                              "containers": [{"name": "agent", "image": "trafficmgr"}]}}):
            try:
                store.create(obj)
            except Exception:  # noqa: BLE001 - already there (a second signer in one test)
                pass
        self.options = SignOptions(trust_domain=trust_domain, audience=AUDIENCE, agent_namespace=NS,
                                   agent_service_account=AGENT_SA, ttl=dt.timedelta(seconds=ttl_s))
        self.ca = MeshCA(kube, NS, CA_SECRET, trust_domain=trust_domain).start()
        assert self.ca.wait_ready(15), self.ca.error
        self.port = 0
        self.server: IdentityServer | None = None
        self.start()

    def start(self) -> RealSigner:
        self.server = IdentityServer(self.ca, self.kube, self.options, "127.0.0.1", self.port, [SERVER_NAME]).start()
        self.port = self.server.port
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(0)
            self.server = None

    def close(self) -> None:
        self.stop()
        self.ca.stop()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def bundle(self) -> bytes:
        return self.ca.trust_bundle().encode()

    def published(self) -> bool:
        try:
            return bool(self.store.get("configmaps", BUNDLE_CONFIGMAP, NS)["data"]["ca.crt"])
        except Exception:  # noqa: BLE001 - not yet
            return False

    def token(self, namespace: str, service_account: str, pod: str | None) -> str:
        """A TokenRequest (audience :data:`AUDIENCE`) bound to ``pod`` when given, through the official client."""
        from kubernetes import client as k8s

        ref = None
        if pod is not None:
            uid = self.store.get("pods", pod, namespace)["metadata"]["uid"]
            ref = k8s.V1BoundObjectReference(kind="Pod", api_version="v1", name=pod, uid=uid)
        body = k8s.AuthenticationV1TokenRequest(spec=k8s.V1TokenRequestSpec(
            audiences=[AUDIENCE], expiration_seconds=3600, bound_object_ref=ref))
        answer = k8s.CoreV1Api(self.kube.api).create_namespaced_service_account_token(service_account, namespace, body)
        return str(answer.status.token)

    def agent_token(self) -> str:
        return self.token(NS, AGENT_SA, f"agent-{self.node}")
