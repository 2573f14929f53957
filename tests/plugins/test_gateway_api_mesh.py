"""Gateway API mesh routes (GAMMA producer routes) through a real sidecar Envoy.

The rig: the project's API server with the Gateway API CRDs, the real control plane with every built-in
plugin, and a sidecar pod (``client.default``) whose outbound traffic to ClusterIPs goes through its
Envoy. Service ``reviews`` selects both ``reviews-v1`` and ``reviews-v2`` pods; Services ``reviews-v1``
and ``reviews-v2`` select one each. HTTPRoutes whose parentRef is Service ``reviews`` change where the
client's requests to ``reviews`` go. Service ``shop/ratings`` (pod ``ratings-1``) is the parent of the
consumer-route test: the client's namespace (``default``) is the consumer namespace.
"""

from __future__ import annotations

import functools
import json
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from trafficmgr.apiserver.crds import GATEWAY_API_CRDS, load_manifests
from trafficmgr.apiserver.errors import ApiError
from trafficmgr.core.kube import watch as watch_module
from trafficmgr.testing.cluster import LocalCluster
from trafficmgr.testing.envoy import wait_for
from trafficmgr.testing.manifests import pod, service
from trafficmgr.testing.netns import require as _require_netns

PODS = {"reviews-v1": "10.244.0.11", "reviews-v2": "10.244.0.12"}
RATINGS_IP = "10.244.0.13"
PORT = 9080
ROUTES: list[tuple[str, str]] = []


def _manifests() -> str:
    docs = [service("reviews"), service("reviews-v1", app="reviews-v1"), service("reviews-v2", app="reviews-v2"),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n"]
    for name, ip in PODS.items():
        docs.append(pod(f"{name}-abc", ip, "reviews", labels={"version": name}))
    docs += [service("ratings", namespace="shop"), pod("ratings-1", RATINGS_IP, "ratings", namespace="shop")]
    out = "---\n".join(docs)
    # reviews-v1/v2 select by version (service() selects app=<app>): patch the selectors.
    for v in PODS:
        out = out.replace(f'"selector": {{"app": "{v}"}}', f'"selector": {{"version": "{v}"}}')
    return out


@pytest.fixture(scope="module")
def cluster(envoy_binary: str) -> Iterator[LocalCluster]:
    _require_netns()
    mp = pytest.MonkeyPatch()
    mp.setattr(watch_module, "NOT_SERVED_RETRY", 0.2)  # the CRDs come after the control plane started
    try:
        with LocalCluster([*PODS.values(), RATINGS_IP]) as c:
            for crd in load_manifests(GATEWAY_API_CRDS):
                c.store.create(crd)
            for name, ip in PODS.items():
                c.backend(name, ip, PORT)
            c.backend("ratings-1", RATINGS_IP, PORT)
            c.apply(_manifests())
            c.wait_config(lambda: _spread(c, 20)["reviews-v1"] > 0, timeout=20, message="reviews not routed")
            yield c
    finally:
        mp.undo()


@pytest.fixture(autouse=True)
def _clean(cluster: LocalCluster) -> Iterator[None]:
    yield
    for b in cluster.backends:
        b.reset()
    for ns, name in list(ROUTES):
        try:
            cluster.store.delete("httproutes", name, ns)
        except ApiError:
            pass
    for plural, name, ns in (("referencegrants", "from-default", "shop"), ("services", "closed", "shop")):
        try:
            cluster.store.delete(plural, name, ns)
        except ApiError:
            pass
    ROUTES.clear()


def httproute(name: str, rules: str, parent: str = "{group: '', kind: Service, name: reviews}",
              namespace: str = "default") -> str:
    ROUTES.append((namespace, name))
    return f"""
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  parentRefs: [{parent}]
  rules: {rules}
"""


def _request(c: LocalCluster, path: str = "/", headers: dict[str, str] | None = None,
             method: str = "GET", service: str = "reviews", namespace: str = "default") -> tuple[int, dict[str, Any]]:
    url = f"http://{c.cluster_ip(service, namespace)}:{PORT}{path}"

    def run() -> tuple[int, dict[str, Any]]:
        req = urllib.request.Request(url, headers=headers or {}, method=method)
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            body = exc.read()
            try:
                return exc.code, json.loads(body)
            except ValueError:
                return exc.code, {"body": body.decode(errors="replace")}
        except (urllib.error.URLError, OSError) as exc:  # a connection reset while the configuration changes
            return 0, {"body": str(exc)}

    assert c.pod is not None
    return c.pod.in_ns(run)  # type: ignore[no-any-return]


def _served(c: LocalCluster, path: str = "/", headers: dict[str, str] | None = None, method: str = "GET") -> str:
    status, body = _request(c, path, headers, method)
    return str(body["backend"]) if status == 200 else f"<{status}>"


def _spread(c: LocalCluster, n: int, headers: dict[str, str] | None = None) -> Counter[str]:
    return Counter(_served(c, "/", headers) for _ in range(n))


def _parent(c: LocalCluster, name: str, namespace: str = "default") -> dict[str, Any] | None:
    obj = c.store.get("httproutes", name, namespace)
    return next(iter((obj.get("status") or {}).get("parents") or []), None)


def _conds(parent: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in parent["conditions"]}


def test_weighted_split_then_removed_route_gives_default_routing_back(cluster: LocalCluster) -> None:
    """reviews -> 90 % reviews-v1, 10 % reviews-v2 (checked statistically); deleting the route brings back
    the Service's own routing (both pods, about half each)."""
    c = cluster
    c.apply(httproute("split", "[{backendRefs: [{name: reviews-v1, port: 9080, weight: 90}, "
                               "{name: reviews-v2, port: 9080, weight: 10}]}]"))
    # The split is in place once a v1-heavy sample is seen (the default gives about 50/50).
    c.wait_config(lambda: _spread(c, 40)["reviews-v1"] >= 32, timeout=15, message="mesh route not applied")
    n = 400
    seen = _spread(c, n)
    assert set(seen) <= {"reviews-v1", "reviews-v2"}, seen
    # Binomial(400, 0.1): mean 40, sd 6; 4 sd either side.
    assert 16 <= seen["reviews-v2"] <= 64, seen
    c.store.delete("httproutes", "split", "default")
    c.wait_config(lambda: _spread(c, 40)["reviews-v2"] >= 8, timeout=15, message="default routing not back")
    back = _spread(c, 200)
    assert 60 <= back["reviews-v2"] <= 140, back  # round robin over both pods again


def test_header_path_and_method_matches_and_404_for_no_match(cluster: LocalCluster) -> None:
    """``x-canary: true`` -> reviews-v2; POST /admin... -> reviews-v2; everything else under / -> v1; a
    route without a catch-all rule answers 404 for requests no rule matches (GAMMA)."""
    c = cluster
    c.apply(httproute("canary", """
  - matches: [{headers: [{name: x-canary, value: "true"}]}, {path: {type: PathPrefix, value: /admin}, method: POST}]
    backendRefs: [{name: reviews-v2, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /}}]
    backendRefs: [{name: reviews-v1, port: 9080}]"""))
    c.wait_config(lambda: _served(c, "/", {"x-canary": "true"}) == "reviews-v2"
                  and _spread(c, 10) == Counter({"reviews-v1": 10}), timeout=15, message="header match not applied")
    assert _spread(c, 20, {"x-canary": "true"}) == Counter({"reviews-v2": 20})
    assert _spread(c, 20, {"x-canary": "false"}) == Counter({"reviews-v1": 20})
    assert _served(c, "/admin/x", method="POST") == "reviews-v2"
    assert _served(c, "/admin/x", method="GET") == "reviews-v1"
    assert _served(c, "/administrator", method="POST") == "reviews-v1"  # element-wise prefix
    # Only a /v2 rule: other paths match no rule.
    c.apply(httproute("canary", "[{matches: [{path: {type: PathPrefix, value: /v2}}], backendRefs: [{name: reviews-v2, port: 9080}]}]"))
    c.wait_config(lambda: _served(c, "/other") == "<404>", timeout=15, message="unmatched request not 404")
    assert _served(c, "/v2/x") == "reviews-v2"


def test_header_modifier_and_backend_label_policy(cluster: LocalCluster) -> None:
    """RequestHeaderModifier reaches the backend; the backend Service's label policy
    (traffic.retries.5xx) applies to the mesh route that sends to it."""
    c = cluster
    c.apply(httproute("modify", """
  - filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-mesh, value: routed}], remove: [x-drop]}}]
    backendRefs: [{name: reviews-v2, port: 9080}]"""))

    def modified() -> bool:
        status, body = _request(c, "/", {"x-drop": "1"})
        return status == 200 and body["backend"] == "reviews-v2" and body["headers"].get("x-mesh") == "routed" \
            and "x-drop" not in body["headers"]
    c.wait_config(modified, timeout=15, message="header modifier not applied")
    v2 = next(b for b in c.backends if b.name == "reviews-v2")
    v2.reset().set(statuses=[503, 503])
    assert _served(c, "/no-retries") == "<503>"
    c.label("service", "reviews-v2", {"traffic.retries.5xx": "2"})
    try:
        def retried() -> bool:
            v2.reset().set(statuses=[503, 503])
            return _served(c, "/retried") == "reviews-v2" and v2.hits == 3
        c.wait_config(retried, timeout=15, message="the backend Service's retries label did not apply to the mesh route")
    finally:
        c.label("service", "reviews-v2", {"traffic.retries.5xx": None})


def test_status_per_service_parent_and_bad_route_changes_nothing_else(cluster: LocalCluster) -> None:
    """Accepted/ResolvedRefs per Service parent (our controllerName); a missing Service or port is
    NoMatchingParent, a missing backend ResolvedRefs=False BackendNotFound, an unsupported filter UnsupportedValue; the good
    route keeps being served throughout."""
    c = cluster
    c.apply(httproute("good", "[{backendRefs: [{name: reviews-v2, port: 9080}]}]"))
    c.wait_config(lambda: _spread(c, 10) == Counter({"reviews-v2": 10}), timeout=15, message="good route not served")
    c.apply(httproute("missing-svc", "[{backendRefs: [{name: reviews-v1, port: 9080}]}]",
                      parent="{group: '', kind: Service, name: nope}")
            + "---" + httproute("missing-port", "[{backendRefs: [{name: reviews-v1, port: 9080}]}]",
                                parent="{group: '', kind: Service, name: reviews, port: 1234}")
            + "---" + httproute("bad-backend", "[{matches: [{path: {type: PathPrefix, value: /gone}}], "
                                               "backendRefs: [{name: gone, port: 9080}]}]")
            + "---" + httproute("bad-filter", "[{matches: [{path: {type: PathPrefix, value: /ext}}], "
                                              "filters: [{type: ExtensionRef, extensionRef: {group: x.io, kind: M, name: m}}], "
                                              "backendRefs: [{name: reviews-v1, port: 9080}]}]"))
    want = {"good": ("True", "Accepted", "True", "ResolvedRefs"),
            "missing-svc": ("False", "NoMatchingParent", "True", "ResolvedRefs"),
            "missing-port": ("False", "NoMatchingParent", "True", "ResolvedRefs"),
            "bad-backend": ("True", "Accepted", "False", "BackendNotFound"),
            "bad-filter": ("False", "UnsupportedValue", "True", "ResolvedRefs")}
    for name, (acc, acc_reason, res, res_reason) in want.items():
        p = wait_for(functools.partial(_parent, c, name), 15, message=f"no status on {name}")
        assert p["controllerName"] == "trafficmgr.io/gateway-controller"
        assert p["parentRef"]["kind"] == "Service"
        assert _conds(p) == {"Accepted": (acc, acc_reason), "ResolvedRefs": (res, res_reason)}, (name, p)
    # Nothing else changed: the good route still sends everything to v2; the bad backend's rule answers
    # 500; the unsupported rule is not served (its path goes to the good route's catch-all).
    assert _spread(c, 20) == Counter({"reviews-v2": 20})
    assert _served(c, "/gone") == "<500>"
    assert _served(c, "/ext") == "reviews-v2"


def test_rewrite_mirror_and_redirect(cluster: LocalCluster) -> None:
    """URLRewrite ReplacePrefixMatch reaches the backend rewritten; RequestMirror sends the mirror target a
    copy (the client gets the primary's answer); RequestRedirect answers the client with Location."""
    c = cluster
    c.apply(httproute("filters", """
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}},
              {type: RequestMirror, requestMirror: {backendRef: {name: reviews-v1, port: 9080}}}]
    backendRefs: [{name: reviews-v2, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /moved}}]
    filters: [{type: RequestRedirect, requestRedirect: {hostname: example.com, statusCode: 301}}]
  - backendRefs: [{name: reviews-v2, port: 9080}]"""))
    def redirect() -> tuple[int, str]:  # urllib would follow it: plain http.client
        import http.client

        conn = http.client.HTTPConnection(c.cluster_ip("reviews"), PORT, timeout=5)
        try:
            conn.request("GET", "/moved/x")
            resp = conn.getresponse()
            return resp.status, resp.getheader("location") or ""
        finally:
            conn.close()

    pod = c.pod
    assert pod is not None
    c.wait_config(lambda: pod.in_ns(redirect) == (301, f"http://example.com:{PORT}/moved/x"), timeout=15,
                  message="redirect not applied")
    v1 = next(b for b in c.backends if b.name == "reviews-v1")
    v1.reset()
    status, body = _request(c, "/old/page")
    assert status == 200 and body["backend"] == "reviews-v2" and body["path"] == "/new/page"
    wait_for(lambda: v1.hits >= 1, 5, message="the mirror target saw no copy")
    assert v1.requests[-1]["path"] == "/new/page"


def test_route_on_a_tcp_service_port_is_not_accepted(cluster: LocalCluster) -> None:
    """A mesh route whose parent Service port is labelled tcp gets no HTTP routes in the sidecars: its
    parent status says so (Accepted False NotAllowedByListeners, naming the port and protocol), not
    Accepted True; the same route on the Service's http port next to it is accepted."""
    from trafficmgr.testing.manifests import service as svc

    c = cluster
    c.apply(svc("legacy", labels={"traffic.port.9080": "tcp"}) + "---\n" + httproute(
        "on-tcp", "[{backendRefs: [{name: reviews-v1, port: 9080}]}]", parent="{group: '', kind: Service, name: legacy}"))
    try:
        p = wait_for(lambda: _parent(c, "on-tcp"), 15, message="no status on on-tcp")
        assert _conds(p) == {"Accepted": ("False", "NotAllowedByListeners"), "ResolvedRefs": ("True", "ResolvedRefs")}, p
        msg = {x["type"]: x["message"] for x in p["conditions"]}["Accepted"]
        assert "Service default/legacy port 9080 (tcp) is not HTTP" in msg, msg
        c.label("service", "legacy", {"traffic.port.9080": "http"})
        wait_for(lambda: (q := _parent(c, "on-tcp")) is not None and _conds(q)["Accepted"] == ("True", "Accepted"), 15,
                 message="the route is accepted once the port is http")
    finally:
        c.store.delete("services", "legacy", "default")


def test_http_and_grpc_routes_on_one_service_port_the_older_wins(cluster: LocalCluster) -> None:
    """An HTTPRoute and a younger GRPCRoute on the same Service port: the specification's rule (one
    listener hostname takes one kind; the older route, then namespace/name, wins): the GRPCRoute is
    Accepted False NotAllowedByListeners naming the HTTPRoute, the HTTPRoute stays Accepted and served."""
    import time

    c = cluster
    c.apply(httproute("http-first", "[{backendRefs: [{name: reviews-v2, port: 9080}]}]"))
    c.wait_config(lambda: _spread(c, 10) == Counter({"reviews-v2": 10}), timeout=15, message="HTTPRoute not served")
    time.sleep(1.1)  # creationTimestamp has one-second resolution: the GRPCRoute is younger
    c.apply("""
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: grpc-second, namespace: default}
spec:
  parentRefs: [{group: '', kind: Service, name: reviews, port: 9080}]
  rules: [{backendRefs: [{name: reviews-v1, port: 9080}]}]
""")
    try:
        def grpc_parent() -> dict[str, Any] | None:
            obj = c.store.get("grpcroutes", "grpc-second", "default")
            return next(iter((obj.get("status") or {}).get("parents") or []), None)

        p = wait_for(grpc_parent, 15, message="no status on the GRPCRoute")
        assert _conds(p)["Accepted"] == ("False", "NotAllowedByListeners"), p
        msg = {x["type"]: x["message"] for x in p["conditions"]}["Accepted"]
        assert "already routed by HTTPRoute default/http-first" in msg, msg
        winner = wait_for(lambda: _parent(c, "http-first"), 15, message="no status on the HTTPRoute")
        assert _conds(winner)["Accepted"] == ("True", "Accepted")
        assert _spread(c, 20) == Counter({"reviews-v2": 20})
    finally:
        c.store.delete("grpcroutes", "grpc-second", "default")


def _view(c: LocalCluster) -> str | None:
    return next((s.get("view") for s in c.cp.proxy_status() if s.get("node_id") == "client.default"), None)


def test_consumer_route_applies_to_its_namespace_callers_and_wins_over_the_producer_route(cluster: LocalCluster) -> None:
    """GAMMA (GEP-1294): the producer route of ``shop/ratings`` applies to every caller; a consumer route in
    another namespace (``other``) does not apply to the client (namespace ``default``); a consumer route in
    the client's namespace replaces the producer route for the client only (matches, redirect, backends in
    its own namespace), Accepted True; a backend in a third namespace needs a ReferenceGrant
    (RefNotPermitted, then served once granted); deleting it gives the client the producer route and its
    previous view back."""
    import http.client

    from trafficmgr.core.model import SIDECAR
    from trafficmgr.core.translate.scopes import consumer_view_name

    c = cluster
    c.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: other}\n")
    ratings = "{group: '', kind: Service, name: ratings, namespace: shop, port: 9080}"

    def ask(path: str = "/", headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        return _request(c, path, headers, service="ratings", namespace="shop")

    def by_producer() -> bool:
        status, body = ask()
        return status == 200 and body["backend"] == "ratings-1" and body["headers"].get("x-by") == "producer"

    c.apply(httproute("producer", """
  - filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-by, value: producer}]}}]
    backendRefs: [{name: ratings, port: 9080}]""", parent="{group: '', kind: Service, name: ratings, port: 9080}",
                      namespace="shop")
            + "---" + httproute("elsewhere", "[{filters: [{type: RequestRedirect, requestRedirect: {hostname: other.example}}]}]",
                                parent=ratings, namespace="other")
            + "---\n" + service("closed", namespace="shop", app="ratings", http=False)
            + "---" + httproute("unenabled", "[{backendRefs: [{name: reviews-v1, port: 9080}]}]",
                                parent="{group: '', kind: Service, name: closed, namespace: shop}"))
    c.wait_config(by_producer, timeout=15, message="producer route not served")
    elsewhere = wait_for(lambda: _parent(c, "elsewhere", "other"), 15, message="no status on the other namespace's route")
    assert _conds(elsewhere) == {"Accepted": ("True", "Accepted"), "ResolvedRefs": ("True", "ResolvedRefs")}, elsewhere
    # A consumer route cannot enable another namespace's Service port (unlabelled: not in the mesh).
    unenabled = wait_for(lambda: _parent(c, "unenabled"), 15, message="no status on the route to an unlabelled port")
    assert _conds(unenabled)["Accepted"] == ("False", "NotAllowedByListeners"), unenabled
    msg = {x["type"]: x["message"] for x in unenabled["conditions"]}["Accepted"]
    assert "not enabled for the mesh by the Service's owner" in msg and "(not served)" in msg, msg
    assert _view(c) == SIDECAR  # neither route applies to the client: its view is unchanged
    status, body = _request(c, service="closed", namespace="shop")
    assert status == 404 and "port not enabled" in body["body"], (status, body)
    assert by_producer()

    c.apply(httproute("mine", """
  - matches: [{headers: [{name: x-canary, value: "true"}]}]
    backendRefs: [{name: reviews-v2, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /moved}}]
    filters: [{type: RequestRedirect, requestRedirect: {hostname: example.com, statusCode: 302}}]
  - matches: [{path: {type: PathPrefix, value: /r}}]
    backendRefs: [{name: ratings, namespace: shop, port: 9080}]
  - backendRefs: [{name: reviews-v1, port: 9080}]""", parent=ratings))
    mine_view = consumer_view_name("default", None)
    wait_for(lambda: _view(c) == mine_view, 15, message=f"client not moved to its consumer view: {_view(c)}")
    c.wait_config(lambda: ask()[1].get("backend") == "reviews-v1", timeout=15, message="consumer route not served")
    status, body = ask()
    assert status == 200 and "x-by" not in body["headers"]  # the producer route does not apply here
    assert ask("/", {"x-canary": "true"})[1]["backend"] == "reviews-v2"

    def redirect() -> tuple[int, str]:
        conn = http.client.HTTPConnection(c.cluster_ip("ratings", "shop"), PORT, timeout=5)
        try:
            conn.request("GET", "/moved/x")
            resp = conn.getresponse()
            return resp.status, resp.getheader("location") or ""
        finally:
            conn.close()

    pod = c.pod
    assert pod is not None
    assert pod.in_ns(redirect) == (302, f"http://example.com:{PORT}/moved/x")
    p = wait_for(lambda: _parent(c, "mine"), 15, message="no status on the consumer route")
    assert p["controllerName"] == "trafficmgr.io/gateway-controller" and p["parentRef"]["namespace"] == "shop"
    assert _conds(p) == {"Accepted": ("True", "Accepted"), "ResolvedRefs": ("False", "RefNotPermitted")}, p
    assert ask("/r")[0] == 500  # the rule whose backend is not granted

    c.apply("""
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: from-default, namespace: shop}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: default}]
  to: [{group: "", kind: Service}]
""")
    c.wait_config(lambda: ask("/r")[1].get("backend") == "ratings-1", timeout=15, message="granted backend not served")
    wait_for(lambda: (q := _parent(c, "mine")) is not None and _conds(q)["ResolvedRefs"] == ("True", "ResolvedRefs"), 15,
             message="ResolvedRefs not True once granted")

    c.store.delete("httproutes", "mine", "default")
    wait_for(lambda: _view(c) == SIDECAR, 15, message=f"client not back on the full view: {_view(c)}")
    c.wait_config(by_producer, timeout=15, message="producer route not back for the client")
    assert c.cp.cache.get(mine_view) is None
