"""The Sign service (:mod:`trafficmgr.core.identity.server`): real gRPC over TLS (the serving certificate
from the mesh CA, verified against the trust bundle), tokens from the local API server's TokenRequest and
checked with its TokenReview through the official client. The agent and the pod itself get certificates;
every refusal has its gRPC code, reason text and metric; no key material or token in the logs."""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from kubernetes import client as k8s

from tests.identity.mesh import NS, Api, csr, uri_sans, verify_chain, weak_rsa_csr
from trafficmgr.apiserver import ApiError
from trafficmgr.core import metrics
from trafficmgr.core.identity import BUNDLE_CONFIGMAP, METHOD
from trafficmgr.core.identity import server as srv
from trafficmgr.core.identity.ca import MeshCA
from trafficmgr.core.identity.server import IdentityServer, Review, SignOptions
from trafficmgr.core.identity.spiffe import spiffe_id

AGENT_SA = "trafficmgr-agent"
AUDIENCE = "trafficmgr"
REVIEWS = spiffe_id("cluster.local", "default", "reviews")
RATINGS = spiffe_id("cluster.local", "default", "ratings")


def _pod(ns: str, name: str, sa: str, node: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns},
            "spec": {"serviceAccountName": sa, "nodeName": node, "containers": [{"name": "c", "image": "busybox"}], **spec}}


class Mesh:
    """API server with two nodes, an agent pod on each, workload pods; the CA and the Sign service."""

    def __init__(self, tmp: Path) -> None:
        self.api = Api(tmp)
        store = self.api.store
        for ns, sa in ((NS, AGENT_SA), ("default", "reviews"), ("default", "ratings")):
            store.create({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, "namespace": ns}})
        for node in ("node-a", "node-b"):
            store.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}})
            store.create(_pod(NS, f"agent-{node[-1]}", AGENT_SA, node, hostNetwork=True))
        store.create(_pod("default", "reviews-1", "reviews", "node-a"))
        store.create(_pod("default", "ratings-1", "ratings", "node-b"))
        store.create(_pod("default", "hostnet", "reviews", "node-a", hostNetwork=True))
        self.ca = MeshCA(self.api.kube, NS, "mesh-ca").start()
        self.server = IdentityServer(self.ca, self.api.kube, SignOptions(agent_namespace=NS, agent_service_account=AGENT_SA),
                                     "127.0.0.1", 0, ["trafficmgr.trafficmgr.svc"]).start()
        self.core = k8s.CoreV1Api(self.api.kube.api)

    def uid(self, ns: str, name: str) -> str:
        return self.api.store.get("pods", name, ns)["metadata"]["uid"]

    def token(self, ns: str, sa: str, pod: str | None = None, audience: str = AUDIENCE) -> str:
        """A TokenRequest through the official client (bound to ``pod`` when given)."""
        ref = k8s.V1BoundObjectReference(kind="Pod", api_version="v1", name=pod, uid=self.uid(ns, pod)) if pod else None
        body = k8s.AuthenticationV1TokenRequest(spec=k8s.V1TokenRequestSpec(audiences=[audience], expiration_seconds=3600,
                                                              bound_object_ref=ref))
        answer = self.core.create_namespaced_service_account_token(sa, ns, body)
        return str(answer.status.token)

    def agent_token(self, node: str) -> str:
        return self.token(NS, AGENT_SA, f"agent-{node[-1]}")

    def call(self, request: bytes | dict[str, Any], token: str | None) -> dict[str, Any]:
        """One Sign call over TLS, the server verified against the published trust bundle."""
        bundle = self.api.store.get("configmaps", BUNDLE_CONFIGMAP, NS)["data"]["ca.crt"]
        creds = grpc.ssl_channel_credentials(bundle.encode())
        body = request if isinstance(request, bytes) else json.dumps(request).encode()
        metadata = [("authorization", f"Bearer {token}")] if token is not None else []
        with grpc.secure_channel(f"127.0.0.1:{self.server.port}", creds, options=[("grpc.enable_http_proxy", 0)]) as ch:
            answer = ch.unary_unary(METHOD)(body, metadata=metadata, timeout=10)
        return json.loads(answer)

    def request(self, ns: str, pod: str, uri: str | None = None, csr_pem: str | None = None,
                uid: str | None = None) -> dict[str, Any]:
        return {"csr": csr_pem or csr([uri or REVIEWS])[0], "pod": {"namespace": ns, "name": pod,
                                                                    "uid": uid or self.uid(ns, pod)}}

    def stop(self) -> None:
        self.server.stop()
        self.ca.stop()
        self.api.stop()


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    m = Mesh(tmp_path)
    try:
        m.ca.wait_ready(10)
        _wait_configmap(m)
        yield m
    finally:
        m.stop()


def _wait_configmap(m: Mesh) -> None:
    import time

    end = time.monotonic() + 10
    while time.monotonic() < end:
        try:
            m.api.store.get("configmaps", BUNDLE_CONFIGMAP, NS)
            return
        except ApiError:
            time.sleep(0.05)
    raise AssertionError("trust bundle ConfigMap not published")


def _signed() -> float:
    return metrics.REGISTRY.get_sample_value("trafficmgr_certificates_signed_total") or 0.0


def _refused(reason: str) -> float:
    return metrics.REGISTRY.get_sample_value("trafficmgr_certificate_requests_refused_total", {"reason": reason}) or 0.0


def test_the_agent_gets_a_certificate_for_a_pod_on_its_node(mesh: Mesh) -> None:
    before = _signed()
    text, key = csr([REVIEWS])
    answer = mesh.call(mesh.request("default", "reviews-1", csr_pem=text), mesh.agent_token("node-a"))
    assert set(answer) == {"certificate_chain", "trust_bundle", "expires"}
    assert answer["trust_bundle"] == mesh.api.store.get("configmaps", BUNDLE_CONFIGMAP, NS)["data"]["ca.crt"]
    leaf = verify_chain(answer["certificate_chain"], answer["trust_bundle"])
    assert uri_sans(leaf) == [REVIEWS]
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    assert leaf.public_key().public_bytes(serialization.Encoding.DER, pub) == key.public_key().public_bytes(serialization.Encoding.DER, pub)
    lifetime = leaf.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(hours=23, minutes=59) < lifetime <= dt.timedelta(hours=24)
    assert answer["expires"] == leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert _signed() == before + 1


def test_a_pod_gets_its_own_certificate_with_a_token_bound_to_it(mesh: Mesh) -> None:
    answer = mesh.call(mesh.request("default", "ratings-1", RATINGS), mesh.token("default", "ratings", "ratings-1"))
    assert uri_sans(verify_chain(answer["certificate_chain"], answer["trust_bundle"])) == [RATINGS]


def _bad_signature_csr() -> str:
    der = bytearray(x509.load_pem_x509_csr(csr([REVIEWS])[0].encode()).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte of the signature's last integer: still DER, no longer the key's signature
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()


DENIED, UNAUTH, INVALID = grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT
CASES: dict[str, tuple[grpc.StatusCode, str, str]] = {
    "agent of another node": (DENIED, "not_authorized", "agent on node-b asked for pod default/reviews-1 on node-a"),
    "pod of another SA in the CSR": (DENIED, "identity_mismatch",
                                     f"CSR asks for {RATINGS}, pod default/reviews-1 runs as sa/reviews"),
    "non-agent token for another pod": (DENIED, "not_authorized", "token bound to pod default/ratings-1"),
    "non-agent unbound token": (DENIED, "not_authorized",
                                "system:serviceaccount:default:ratings is not the node agent and its token is not bound"),
    "agent token not bound to its pod": (DENIED, "not_authorized", "the agent's token names no node"),
    "replaced pod (other uid)": (DENIED, "pod_not_signable", "pod default/reviews-1 has uid"),
    "host network pod": (DENIED, "pod_not_signable", "pod default/hostnet runs on the host network"),
    "missing pod": (DENIED, "pod_not_signable", "pod default/nope does not exist"),
    "no token": (UNAUTH, "unauthenticated", "no token"),
    "unknown token": (UNAUTH, "unauthenticated", "token not accepted: [invalid bearer token, not a token issued"),
    "expired token": (UNAUTH, "unauthenticated", "service account token has expired"),
    "wrong audience": (UNAUTH, "unauthenticated", "is invalid for the target audiences"),
    "two SANs": (INVALID, "bad_csr", "CSR has 2 subjectAltNames"),
    "DNS SAN": (INVALID, "bad_csr", "CSR subjectAltName is a DNSName, not a URI"),
    "weak RSA key": (INVALID, "bad_csr", "CSR key: RSA 1024 bits not accepted"),
    "bad CSR signature": (INVALID, "bad_csr", "CSR signature does not verify"),
    "not JSON": (INVALID, "bad_request", "request is not UTF-8 JSON"),
    "no uid": (INVALID, "bad_request", "pod.uid missing"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_refusals_have_their_code_reason_and_metric(mesh: Mesh, case: str, caplog: pytest.LogCaptureFixture) -> None:
    code, reason, message = CASES[case]
    agent_a = mesh.agent_token("node-a")
    token: str | None = agent_a
    request: bytes | dict[str, Any] = mesh.request("default", "reviews-1")
    if case == "agent of another node":
        token = mesh.agent_token("node-b")
    elif case == "pod of another SA in the CSR":
        request = mesh.request("default", "reviews-1", RATINGS)
    elif case == "non-agent token for another pod":
        token = mesh.token("default", "ratings", "ratings-1")
    elif case == "non-agent unbound token":
        token = mesh.token("default", "ratings")
    elif case == "agent token not bound to its pod":
        token = mesh.token(NS, AGENT_SA)
    elif case == "replaced pod (other uid)":
        request = mesh.request("default", "reviews-1", uid="0000-not-the-uid")
    elif case == "host network pod":
        request = mesh.request("default", "hostnet")
    elif case == "missing pod":
        request = mesh.request("default", "nope", uid="1234")
    elif case == "no token":
        token = None
    elif case == "unknown token":
        token = "eyJhbGciOiJIUzI1NiJ9.e30.c2lnbmF0dXJl"
    elif case == "expired token":
        from trafficmgr.apiserver.tokens import authority

        token = mesh.token(NS, AGENT_SA, "agent-a")
        tokens = authority(mesh.api.store)
        real = tokens.clock
        tokens.clock = lambda: real() + 2 * 3600  # the API server's clock moves past the token's expiry
    elif case == "wrong audience":
        token = mesh.token(NS, AGENT_SA, "agent-a", audience="vault")
    elif case == "two SANs":
        request = mesh.request("default", "reviews-1", csr_pem=csr([REVIEWS, RATINGS])[0])
    elif case == "DNS SAN":
        request = mesh.request("default", "reviews-1", csr_pem=csr(dns=["reviews.default.svc"])[0])
    elif case == "weak RSA key":
        request = mesh.request("default", "reviews-1", csr_pem=weak_rsa_csr(REVIEWS))
    elif case == "bad CSR signature":
        request = mesh.request("default", "reviews-1", csr_pem=_bad_signature_csr())
    elif case == "not JSON":
        request = b"csr=hello"
    elif case == "no uid":
        request = {"csr": csr([REVIEWS])[0], "pod": {"namespace": "default", "name": "reviews-1"}}
    before, signed = _refused(reason), _signed()
    caplog.set_level(logging.DEBUG)
    for _ in range(2):
        with pytest.raises(grpc.RpcError) as info:
            mesh.call(request, token)
        assert info.value.code() == code, (case, info.value.details())
        assert message in (info.value.details() or ""), (case, info.value.details())
    assert _refused(reason) == before + 2
    assert _signed() == signed
    refusals = [r.getMessage() for r in caplog.records if "certificate request refused" in r.getMessage()]
    assert len(refusals) == 1 and message in refusals[0], refusals  # logged once per (caller, reason)
    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert "PRIVATE KEY" not in logged and "CERTIFICATE REQUEST" not in logged
    for secret in (agent_a, token):
        assert not secret or secret not in logged


def test_a_deleted_pod_gets_nothing_while_the_token_review_is_cached(mesh: Mesh) -> None:
    """The agent's and the pod's TokenReview results are cached; the pod is read on every request, so a
    deleted pod (or one replaced under the same name) gets no certificate."""
    agent = mesh.agent_token("node-a")
    own = mesh.token("default", "reviews", "reviews-1")
    request = mesh.request("default", "reviews-1")
    mesh.call(request, agent)
    mesh.call(request, own)
    cached = len(mesh.server.service._reviews)
    assert cached == 2
    mesh.api.store.delete("pods", "reviews-1", "default")
    for token in (agent, own):
        with pytest.raises(grpc.RpcError) as info:
            mesh.call(request, token)
        assert info.value.code() == DENIED and "pod default/reviews-1 does not exist" in (info.value.details() or "")
    assert len(mesh.server.service._reviews) == cached  # the refusals came from the pod check, not a new review
    mesh.api.store.create(_pod("default", "reviews-1", "reviews", "node-a"))  # same name, new uid
    with pytest.raises(grpc.RpcError) as info:
        mesh.call(request, agent)
    assert info.value.code() == DENIED and "(replaced)" in (info.value.details() or "")


def test_requests_over_64_kib_are_refused_by_grpc(mesh: Mesh) -> None:
    request = mesh.request("default", "reviews-1")
    request["padding"] = "x" * (srv.MAX_REQUEST_BYTES + 1)
    with pytest.raises(grpc.RpcError) as info:
        mesh.call(request, mesh.agent_token("node-a"))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_no_certificate_before_the_ca_is_loaded(tmp_path: Path) -> None:
    """Provided mode without the Secret: the service answers UNAVAILABLE (checked on the service, since
    the TLS listener itself starts only once a CA exists to make its certificate)."""
    api = Api(tmp_path)
    try:
        ca = MeshCA(api.kube, NS, "absent", mode="provided", publish=False)
        assert not ca.load()
        service = srv.IdentityService(ca, api.kube, SignOptions())
        with pytest.raises(srv.Refusal) as info:
            service.sign(b"{}", "token")
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        assert "waiting for Secret trafficmgr/absent" in info.value.message
    finally:
        api.stop()


# -- the decision alone, from TokenReview results built here ------------------------------------


def _review(username: str, **extra: str) -> Review:
    keys = {"node": srv.EXTRA_NODE_NAME, "pod": srv.EXTRA_POD_NAME, "uid": srv.EXTRA_POD_UID}
    return Review(True, username, {keys[k]: (v,) for k, v in extra.items()}, ("trafficmgr",))


@pytest.mark.parametrize("review, pod_changes, expected", [
    (_review("system:serviceaccount:trafficmgr:trafficmgr-agent", node="node-a"), {}, REVIEWS),
    (_review("system:serviceaccount:default:reviews", pod="reviews-1", uid="u1"), {}, REVIEWS),
    (_review("system:serviceaccount:default:reviews", pod="reviews-1", uid="u1"), {"spec": {"nodeName": "node-a"}},
     "token of sa/reviews asked for pod default/reviews-1, which runs as sa/default"),
    (_review("admin"), {}, "admin is not a ServiceAccount"),
    (_review("system:serviceaccount:trafficmgr:trafficmgr-agent", node="node-a"),
     {"metadata": {"uid": "u1", "deletionTimestamp": "2026-01-01T00:00:00Z"}}, "is terminating"),
    (_review("system:serviceaccount:trafficmgr:trafficmgr-agent", node="node-a"),
     {"status": {"phase": "Succeeded"}}, "has finished (Succeeded)"),
])
def test_authorize_from_constructed_reviews(review: Review, pod_changes: dict[str, Any], expected: str) -> None:
    pod = _pod("default", "reviews-1", "reviews", "node-a")
    pod["metadata"]["uid"] = "u1"
    for key, value in pod_changes.items():
        pod[key] = value
    ref = srv.PodRef("default", "reviews-1", "u1")
    agent = SignOptions().agent_username
    if not expected.startswith("spiffe://"):
        with pytest.raises(srv.Refusal) as info:
            srv.authorize(review, pod, ref, agent, "cluster.local")
        assert expected in info.value.message and info.value.code == DENIED
        return
    assert srv.authorize(review, pod, ref, agent, "cluster.local")[0] == expected


def test_the_agents_sign_client_gets_a_checked_certificate(mesh: Mesh, tmp_path: Path) -> None:
    """The node agent's client (:class:`trafficmgr.core.identity.client.SignClient`) against this server:
    the server verified by the name in ``--identity-dns-names`` and the bundle, the answer checked (its
    key, the URI asked for, chains to the bundle)."""
    from trafficmgr.core.identity.client import SignClient

    token_file = tmp_path / "token"
    token_file.write_text(mesh.agent_token("node-a"))
    bundle = mesh.api.store.get("configmaps", BUNDLE_CONFIGMAP, NS)["data"]["ca.crt"].encode()
    client = SignClient(f"127.0.0.1:{mesh.server.port}", str(token_file), server_name="trafficmgr.trafficmgr.svc")
    issued = client.issue(REVIEWS, ("default", "reviews-1", mesh.uid("default", "reviews-1")), bundle)
    assert uri_sans(x509.load_pem_x509_certificates(issued.chain_pem)[0]) == [REVIEWS]
