"""TokenRequest and TokenReview (authentication.k8s.io/v1) through the official client and the real kubectl."""

from __future__ import annotations

import base64
import datetime as dt
import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from trafficmgr.apiserver import APIServer
from trafficmgr.apiserver.tokens import DEFAULT_AUDIENCE
from trafficmgr.testing.cluster import Kubectl

EXTRA = "authentication.kubernetes.io/"
AUD = "trafficmgr"


@pytest.fixture(scope="module")
def ns(api) -> str:
    v1 = client.CoreV1Api(api)
    v1.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="tok")))
    return "tok"


@pytest.fixture
def clock(server: APIServer) -> Iterator[list[float]]:
    """Moves the token authority's clock: ``clock[0]`` seconds are added to the real time."""
    offset = [0.0]
    authority = server.token_authority
    authority.clock = lambda: time.time() + offset[0]
    yield offset
    authority.clock = time.time


def _sa(api, ns: str, name: str) -> client.V1ServiceAccount:
    return client.CoreV1Api(api).create_namespaced_service_account(
        ns, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=name)))


def _pod(api, ns: str, name: str, sa: str | None, node: str = "node-a") -> client.V1Pod:
    return client.CoreV1Api(api).create_namespaced_pod(ns, client.V1Pod(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1PodSpec(service_account_name=sa, node_name=node,
                              containers=[client.V1Container(name="c", image="x")])))


def _token(api, ns: str, sa: str, audiences: list[str] | None = None, pod: str | None = None,
           seconds: int | None = None, pod_uid: str | None = None) -> client.V1TokenRequest:
    ref = client.V1BoundObjectReference(kind="Pod", api_version="v1", name=pod, uid=pod_uid) if pod else None
    body = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(
        audiences=audiences or [], expiration_seconds=seconds, bound_object_ref=ref))
    return client.CoreV1Api(api).create_namespaced_service_account_token(sa, ns, body)


def _review(api, token: str, audiences: list[str] | None = None) -> client.V1TokenReviewStatus:
    body = client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token, audiences=audiences))
    return client.AuthenticationV1Api(api).create_token_review(body).status


def _refused(status: client.V1TokenReviewStatus, why: str) -> None:
    assert not status.authenticated, status
    assert status.error and status.error.startswith("[invalid bearer token, "), status.error
    assert why in status.error, status.error
    assert not (status.user and status.user.username), status.user


class _Err:
    def __init__(self, e: ApiException) -> None:
        self.status = e.status
        self.body = json.loads(e.body).get("message", "") if e.body else ""


def _api_error(fn, *args, **kw) -> _Err:  # type: ignore[no-untyped-def]
    with pytest.raises(ApiException) as e:
        fn(*args, **kw)
    return _Err(e.value)


def _http(server: APIServer, method: str, path: str, token: str | None = None) -> int:
    """The HTTP status of a bare request (the admin token unless ``token``)."""
    ctx = ssl.create_default_context(cadata=server.credentials.cert_pem)  # type: ignore[union-attr]
    req = urllib.request.Request(server.url + path, method=method,
                                 headers={"Authorization": f"Bearer {token or server.token}"})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return e.code


# ---- kubectl ---------------------------------------------------------------------------------------


def test_kubectl_create_token_bound_to_pod(kubectl: Kubectl, api, ns: str) -> None:
    kubectl("create", "serviceaccount", "kc", "-n", ns)
    pod = _pod(api, ns, "kc-pod", "kc", node="node-k")
    token = kubectl("create", "token", "kc", "-n", ns, "--audience", AUD, "--bound-object-kind", "Pod",
                    "--bound-object-name", "kc-pod").strip()
    sa = client.CoreV1Api(api).read_namespaced_service_account("kc", ns)
    st = _review(api, token, [AUD])
    assert st.authenticated and st.error is None
    assert st.audiences == [AUD]
    assert st.user.username == f"system:serviceaccount:{ns}:kc"
    assert st.user.uid == sa.metadata.uid
    assert st.user.groups == ["system:serviceaccounts", f"system:serviceaccounts:{ns}", "system:authenticated"]
    assert st.user.extra[EXTRA + "pod-name"] == ["kc-pod"]
    assert st.user.extra[EXTRA + "pod-uid"] == [pod.metadata.uid]
    assert st.user.extra[EXTRA + "node-name"] == ["node-k"]
    assert EXTRA + "node-uid" not in st.user.extra  # no Node object node-k
    assert st.user.extra[EXTRA + "credential-id"][0].startswith("JTI=")
    # a TokenReview created by kubectl
    review = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
              "spec": {"token": token, "audiences": [AUD]}}
    out = json.loads(kubectl("create", "-f", "-", "-o", "json", input=json.dumps(review)))
    assert out["status"]["authenticated"] is True
    assert out["status"]["user"]["username"] == f"system:serviceaccount:{ns}:kc"
    # kubectl's refusals are kube-apiserver's
    bad = kubectl.run("create", "token", "nobody", "-n", ns, check=False)
    assert bad.returncode != 0 and 'serviceaccounts "nobody" not found' in bad.stderr
    bad = kubectl.run("create", "token", "kc", "-n", ns, "--bound-object-kind", "Pod", "--bound-object-name",
                      "ghost", check=False)
    assert bad.returncode != 0 and 'pods "ghost" not found' in bad.stderr
    bad = kubectl.run("create", "token", "kc", "-n", ns, "--duration", "1m", check=False)
    assert bad.returncode != 0 and "may not specify a duration less than 10 minutes" in bad.stderr


def test_kubectl_discovery_lists_token_apis(kubectl: Kubectl) -> None:
    out = kubectl("api-resources", "--api-group", "authentication.k8s.io", "-o", "wide", "--no-headers")
    fields = out.split()
    assert fields == ["tokenreviews", "authentication.k8s.io/v1", "false", "TokenReview", "create"], out


def test_discovery_documents(server: APIServer, api) -> None:
    core = client.CoreV1Api(api).get_api_resources()
    token = [r for r in core.resources if r.name == "serviceaccounts/token"]
    assert len(token) == 1 and token[0].verbs == ["create"] and token[0].kind == "TokenRequest"
    assert token[0].group == "authentication.k8s.io" and token[0].version == "v1"
    groups = {g.name: g for g in client.ApisApi(api).get_api_versions().groups}
    assert groups["authentication.k8s.io"].preferred_version.group_version == "authentication.k8s.io/v1"
    auth = client.AuthenticationV1Api(api).get_api_resources()
    assert [(r.name, r.verbs, r.namespaced) for r in auth.resources] == [("tokenreviews", ["create"], False)]


# ---- TokenRequest ----------------------------------------------------------------------------------


def test_token_request_expiry_default_and_cap(api, ns: str) -> None:
    _sa(api, ns, "exp")
    for asked, got in ((None, 3600), (7200, 7200), (100 * 3600, 48 * 3600)):
        before = dt.datetime.now(dt.UTC)
        tr = _token(api, ns, "exp", [AUD], seconds=asked)
        assert tr.spec.expiration_seconds == got
        left = (tr.status.expiration_timestamp - before).total_seconds()
        assert got - 5 <= left <= got + 5, (asked, left)
    # no audiences: the API server's own, and a review without audiences accepts it
    tr = _token(api, ns, "exp")
    assert tr.spec.audiences == [DEFAULT_AUDIENCE]
    st = _review(api, tr.status.token)
    assert st.authenticated and st.audiences == [DEFAULT_AUDIENCE]
    assert EXTRA + "pod-name" not in st.user.extra


def test_token_request_refusals(server: APIServer, api, ns: str) -> None:
    v1 = client.CoreV1Api(api)
    e = _api_error(_token, api, ns, "missing", [AUD])
    assert e.status == 404 and 'serviceaccounts "missing" not found' in e.body
    _sa(api, ns, "ref")
    _sa(api, ns, "other")
    pod = _pod(api, ns, "ref-pod", "ref")
    e = _api_error(_token, api, ns, "ref", [AUD], pod="no-such-pod")
    assert e.status == 404 and 'pods "no-such-pod" not found' in e.body
    e = _api_error(_token, api, ns, "other", [AUD], pod="ref-pod")  # the pod runs as "ref"
    assert e.status == 400 and "different serviceaccount name" in e.body
    e = _api_error(_token, api, ns, "ref", [AUD], pod="ref-pod", pod_uid="0000-stale")
    assert e.status == 409 and "does not match the UID in record" in e.body
    assert _token(api, ns, "ref", [AUD], pod="ref-pod", pod_uid=pod.metadata.uid).status.token
    e = _api_error(_token, api, ns, "ref", [AUD], seconds=599)
    assert e.status == 422 and "less than 10 minutes" in e.body
    body = {"spec": {"audiences": [AUD], "boundObjectRef": {"kind": "ConfigMap", "apiVersion": "v1", "name": "x"}}}
    e = _api_error(v1.create_namespaced_service_account_token, "ref", ns, body)
    assert e.status == 400 and "cannot bind token to object of type v1, Kind=ConfigMap" in e.body
    # a pod without spec.serviceAccountName runs as "default"
    _pod(api, ns, "plain-pod", None)
    e = _api_error(_token, api, ns, "ref", [AUD], pod="plain-pod")
    assert e.status == 400
    # create only
    assert _http(server, "GET", f"/api/v1/namespaces/{ns}/serviceaccounts/ref/token") == 405
    assert _http(server, "GET", "/apis/authentication.k8s.io/v1/tokenreviews") == 405


# ---- TokenReview -----------------------------------------------------------------------------------


def test_review_pod_bound_token_with_node(api, ns: str) -> None:
    v1 = client.CoreV1Api(api)
    node = v1.create_node(client.V1Node(metadata=client.V1ObjectMeta(name="node-tok")))
    _sa(api, ns, "agent")
    pod = _pod(api, ns, "agent-x", "agent", node="node-tok")
    st = _review(api, _token(api, ns, "agent", [AUD, "other"], pod="agent-x").status.token, ["x", AUD])
    assert st.authenticated and st.audiences == [AUD]
    assert st.user.extra[EXTRA + "pod-uid"] == [pod.metadata.uid]
    assert st.user.extra[EXTRA + "node-name"] == ["node-tok"]
    assert st.user.extra[EXTRA + "node-uid"] == [node.metadata.uid]
    token = _token(api, ns, "agent", [AUD], pod="agent-x").status.token
    v1.delete_node("node-tok")
    _refused(_review(api, token, [AUD]), "node node-tok was deleted")


def test_review_refusals(api, ns: str, clock: list[float]) -> None:
    v1 = client.CoreV1Api(api)
    _sa(api, ns, "rv")
    _pod(api, ns, "rv-pod", "rv")
    token = _token(api, ns, "rv", [AUD], pod="rv-pod").status.token
    assert _review(api, token, [AUD]).authenticated
    # wrong audience
    _refused(_review(api, token, ["someone-else"]), 'token audiences ["trafficmgr"] is invalid')
    _refused(_review(api, token), "is invalid for the target audiences")  # the API server's own audience
    # unknown, truncated and tampered tokens
    _refused(_review(api, "not-a-token", [AUD]), "not a token issued by this API server")
    head, payload, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["kubernetes.io"]["serviceaccount"]["name"] = "admin"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    _refused(_review(api, f"{head}.{forged}.{sig}", [AUD]), "bad signature")
    _refused(_review(api, f"{head}.{payload}.", [AUD]), "bad signature")
    # expired: one hour and a second later
    clock[0] = 3601
    _refused(_review(api, token, [AUD]), "service account token has expired")
    clock[0] = 3590
    assert _review(api, token, [AUD]).authenticated
    clock[0] = 0
    # the bound pod replaced (same name, another uid), then deleted
    v1.delete_namespaced_pod("rv-pod", ns)
    _refused(_review(api, token, [AUD]), f"bound pod {ns}/rv-pod was deleted")
    _pod(api, ns, "rv-pod", "rv")
    _refused(_review(api, token, [AUD]), f"bound pod {ns}/rv-pod was replaced")
    # the ServiceAccount deleted, then recreated: the old tokens stay invalid
    unbound = _token(api, ns, "rv", [AUD]).status.token
    assert _review(api, unbound, [AUD]).authenticated
    v1.delete_namespaced_service_account("rv", ns)
    _refused(_review(api, unbound, [AUD]), f"service account {ns}/rv was deleted")
    _sa(api, ns, "rv")
    _refused(_review(api, unbound, [AUD]), f"service account {ns}/rv was replaced")
    # a review needs a token
    e = _api_error(client.AuthenticationV1Api(api).create_token_review, {"spec": {"token": ""}})
    assert e.status == 400 and "token is required" in e.body


def test_review_pod_being_deleted(server: APIServer, api, ns: str, clock: list[float]) -> None:
    _sa(api, ns, "gr")
    _pod(api, ns, "gr-pod", "gr")
    token = _token(api, ns, "gr", [AUD], pod="gr-pod").status.token
    # what a graceful deletion leaves for the kubelet: the pod with a deletionTimestamp
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    server.store.patch("pods", "gr-pod", {"metadata": {"deletionTimestamp": now}}, namespace=ns)
    assert _review(api, token, [AUD]).authenticated  # within the minute Kubernetes allows
    clock[0] = 61
    _refused(_review(api, token, [AUD]), "is being deleted")


def test_tokens_do_not_authenticate_api_calls(server: APIServer, api, ns: str) -> None:
    _sa(api, ns, "nope")
    token = _token(api, ns, "nope").status.token
    assert _http(server, "GET", "/api/v1/namespaces") == 200
    assert _http(server, "GET", "/api/v1/namespaces", token=token) == 401


def test_restart_on_the_same_store_keeps_accepting_tokens(server: APIServer, api, ns: str) -> None:
    _sa(api, ns, "keep")
    token = _token(api, ns, "keep", [AUD]).status.token
    again = APIServer(store=server.store).start()
    try:
        with again.api_client() as c:
            assert _review(c, token, [AUD]).authenticated
    finally:
        again.stop()
