"""gateway_api status through the real pieces: the local API server with the project's Gateway API CRDs
(installed with ``kubectl apply -f``), the real control plane with the ingress and gateway_api plugins
and a real gateway Envoy (``GatewayCluster``); every status is read back with kubectl."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

import trafficmgr.core.kube.watch as watch_module
from trafficmgr.apiserver.crds import GATEWAY_API_CRDS
from trafficmgr.core.plugins import PluginHost
from trafficmgr.plugins import gateway_api
from trafficmgr.testing import free_port
from trafficmgr.testing.cluster import GatewayCluster

CONTROLLER = "trafficmgr.io/gateway-controller"
WEB_IP, WEB_PORT = "127.0.31.2", 8080


def plugins() -> PluginHost:
    return PluginHost.load(["ingress"], extra=[("gateway_api", gateway_api)])


@pytest.fixture
def gw(envoy_binary: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[GatewayCluster]:
    # The CRDs are installed after the control plane started: its watches list them again quickly.
    monkeypatch.setattr(watch_module, "NOT_SERVED_RETRY", 0.2)
    with GatewayCluster(plugins=plugins()) as c:
        c.kubectl("apply", "-f", str(GATEWAY_API_CRDS))
        c.backend("web", WEB_IP, WEB_PORT)
        c.apply(f"""
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec: {{selector: {{app: web}}, ports: [{{name: http, port: 80, targetPort: {WEB_PORT}}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: web-1, namespace: default, labels: {{app: web}}}}
spec: {{nodeName: node-1, containers: [{{name: app, image: web}}]}}
status: {{podIP: {WEB_IP}, conditions: [{{type: Ready, status: "True"}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: traffic-ingress, namespace: default}}
spec: {{clusterIP: 10.96.0.50, ports: [{{name: http, port: 80}}]}}
""")
        yield c
        assert c.cp.nacks() == [], f"Envoy rejected config: {c.cp.nacks()}"


def expose(c: GatewayCluster, *ports: int) -> None:
    """The gateway Service (``--gateway-service``) exposes these Gateway listener ports (as the chart's
    ``gateway.gatewayAPIPorts``: target port ``gw-<port>``) besides port 80."""
    extra = "".join(f", {{name: gw-{p}, port: {p}, targetPort: gw-{p}}}" for p in ports)
    c.apply(f"""
apiVersion: v1
kind: Service
metadata: {{name: traffic-ingress, namespace: default}}
spec: {{clusterIP: 10.96.0.50, ports: [{{name: http, port: 80}}{extra}]}}
""")


def get(c: GatewayCluster, kind: str, name: str, ns: str | None = "default") -> dict[str, Any]:
    args = ["get", kind, name, "-o", "json"] + (["-n", ns] if ns else [])
    return json.loads(c.kubectl(*args))  # type: ignore[no-any-return]


def conds(items: list[dict[str, Any]]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in items}


def wait(what: str, fn: Any, timeout: float = 20.0) -> Any:
    end = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < end:
        try:
            last = fn()
            if last:
                return last
        except (KeyError, IndexError, StopIteration, AssertionError) as exc:
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"{what}: last {last!r}")


def route_parent(c: GatewayCluster, name: str, kind: str = "httproute", ns: str = "default") -> dict[str, Any]:
    parents = [p for p in get(c, kind, name, ns)["status"]["parents"] if p["controllerName"] == CONTROLLER]
    assert len(parents) == 1, parents
    return parents[0]


GATEWAY = f"""
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {{name: traffic}}
spec: {{controllerName: {CONTROLLER}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {{name: theirs}}
spec: {{controllerName: example.com/another-controller}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: gw, namespace: default}}
spec:
  gatewayClassName: traffic
  listeners:
  - {{name: http, port: HTTP_PORT, protocol: HTTP, hostname: "*.example.com"}}
  - {{name: https, port: HTTPS_PORT, protocol: HTTPS, tls: {{mode: Terminate, certificateRefs: [{{name: missing}}]}}}}
  - {{name: https-other-ns, port: HTTPS_PORT, protocol: HTTPS, hostname: other.example.com,
     tls: {{certificateRefs: [{{name: cert, namespace: certs}}]}}}}
  - {{name: tcp, port: TCP_PORT, protocol: TCP}}
  - {{name: ingress-port, port: INGRESS_PORT, protocol: HTTP}}
  - {{name: hidden, port: HIDDEN_PORT, protocol: HTTP, hostname: hidden.example.com}}
"""


def route(name: str, rules: str, ns: str = "default", parent: str = "{name: gw, namespace: default}",
          hostnames: str = '["app.example.com"]') -> str:
    return f"""
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}, namespace: {ns}}}
spec:
  parentRefs: [{parent}]
  hostnames: {hostnames}
  rules: {rules}
"""


ROUTES = "".join([
    route("good", "[{backendRefs: [{name: web, port: 80}]}]"),
    route("missing-backend", "[{matches: [{path: {type: PathPrefix, value: /missing}}], backendRefs: [{name: nope, port: 80}]}]"),
    route("forbidden", "[{matches: [{path: {type: PathPrefix, value: /forbidden}}], "
                       "backendRefs: [{name: web, namespace: prod, port: 80}]}]"),
    route("bad-kind", "[{matches: [{path: {type: PathPrefix, value: /kind}}], "
                      "backendRefs: [{group: example.com, kind: Bucket, name: b, port: 80}]}]"),
    route("other-host", "[{backendRefs: [{name: web, port: 80}]}]", hostnames='["app.example.net"]',
          parent="{name: gw, sectionName: http}"),
    route("no-section", "[{backendRefs: [{name: web, port: 80}]}]", parent="{name: gw, sectionName: nope}"),
    route("unsupported", "[{matches: [{path: {type: PathPrefix, value: /ext}}], "
                         "filters: [{type: ExtensionRef, extensionRef: {group: example.com, kind: Magic, name: m}}], "
                         "backendRefs: [{name: web, port: 80}]}]"),
    route("mesh-only", "[{backendRefs: [{name: web, port: 80}]}]", parent="{group: '', kind: Service, name: web}"),
    route("foreign", "[{backendRefs: [{name: web, port: 80}]}]", parent="{name: theirs-gw}"),
])


def test_every_status_reason_read_back_with_kubectl(gw: GatewayCluster) -> None:
    http_port, https_port, tcp_port, hidden_port = free_port(), free_port(), free_port(), free_port()
    expose(gw, http_port, https_port)
    manifest = (GATEWAY.replace("HTTP_PORT", str(http_port)).replace("HTTPS_PORT", str(https_port))
                .replace("TCP_PORT", str(tcp_port)).replace("INGRESS_PORT", str(gw.gateway_port))
                .replace("HIDDEN_PORT", str(hidden_port)))
    gw.kubectl.apply(manifest + "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: team}\n---\n"
                     "apiVersion: v1\nkind: Namespace\nmetadata: {name: prod}\n" + ROUTES
                     + route("other-ns", "[{backendRefs: [{name: web, port: 80}]}]", ns="team"))

    cls = wait("GatewayClass status", lambda: get(gw, "gatewayclass", "traffic", None)["status"]["conditions"])
    assert conds(cls)["Accepted"] == ("True", "Accepted")
    theirs = get(gw, "gatewayclass", "theirs", None).get("status", {}).get("conditions", [])
    assert ("True", "Accepted") not in conds(theirs).values()  # another controller's class: not ours to accept

    def ready(s: dict[str, Any]) -> bool:  # the Service's exposed ports may reach the plan after the Gateway
        return conds({ls["name"]: ls for ls in s["listeners"]}["http"]["conditions"])["Programmed"][0] == "True"

    status = wait("Gateway status", lambda: (s := get(gw, "gateway", "gw")["status"]) and s.get("listeners") and ready(s) and s)
    assert status["addresses"] == [{"type": "IPAddress", "value": "10.96.0.50"}]
    assert conds(status["conditions"]) == {"Accepted": ("True", "ListenersNotValid"), "Programmed": ("True", "Programmed")}
    listeners = {ls["name"]: ls for ls in status["listeners"]}
    assert conds(listeners["http"]["conditions"]) == {
        "Accepted": ("True", "Accepted"), "Programmed": ("True", "Programmed"),
        "ResolvedRefs": ("True", "ResolvedRefs"), "Conflicted": ("False", "NoConflicts")}
    assert listeners["http"]["supportedKinds"] == [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute"},
                                                   {"group": "gateway.networking.k8s.io", "kind": "GRPCRoute"}]
    assert conds(listeners["https"]["conditions"])["ResolvedRefs"] == ("False", "InvalidCertificateRef")
    assert conds(listeners["https"]["conditions"])["Programmed"] == ("False", "Invalid")
    assert conds(listeners["https-other-ns"]["conditions"])["ResolvedRefs"] == ("False", "RefNotPermitted")
    assert conds(listeners["tcp"]["conditions"])["Accepted"] == ("False", "UnsupportedProtocol")
    assert listeners["tcp"]["supportedKinds"] == []
    assert conds(listeners["ingress-port"]["conditions"])["Accepted"] == ("False", "PortUnavailable")
    # A valid listener on a port the gateway Service does not expose: served, but not ready for clients.
    hidden = {c["type"]: c for c in listeners["hidden"]["conditions"]}
    assert conds(listeners["hidden"]["conditions"]) == {
        "Accepted": ("True", "Accepted"), "Programmed": ("False", "Pending"),
        "ResolvedRefs": ("True", "ResolvedRefs"), "Conflicted": ("False", "NoConflicts")}
    assert f"port {hidden_port} is not exposed by the gateway Service default/traffic-ingress" in hidden["Programmed"]["message"]
    for c in status["conditions"] + [c for ls in status["listeners"] for c in ls["conditions"]]:
        assert c["observedGeneration"] == 1 and c["lastTransitionTime"].endswith("Z") and c["message"]

    expected = {
        "good": (("True", "Accepted"), ("True", "ResolvedRefs")),
        "missing-backend": (("True", "Accepted"), ("False", "BackendNotFound")),
        "forbidden": (("True", "Accepted"), ("False", "RefNotPermitted")),
        "bad-kind": (("True", "Accepted"), ("False", "InvalidKind")),
        "other-host": (("False", "NoMatchingListenerHostname"), ("True", "ResolvedRefs")),
        "no-section": (("False", "NoMatchingParent"), ("True", "ResolvedRefs")),
        "unsupported": (("False", "UnsupportedValue"), ("True", "ResolvedRefs")),
    }
    for name, (accepted, resolved) in expected.items():
        p = wait(f"{name} status", lambda name=name: route_parent(gw, name))
        got = conds(p["conditions"])
        assert (got["Accepted"], got["ResolvedRefs"]) == (accepted, resolved), (name, p)
        assert p["parentRef"]["name"] == "gw" and p["parentRef"]["kind"] == "Gateway"
    team = wait("other-ns status", lambda: route_parent(gw, "other-ns", ns="team"))
    assert conds(team["conditions"])["Accepted"] == ("False", "NotAllowedByListeners")
    # A route whose parent is another class's Gateway gets no status from us; a Service parent (GAMMA) is
    # the mesh's, ours (mesh.py): Accepted.
    assert not get(gw, "httproute", "foreign").get("status", {}).get("parents")
    mesh = wait("mesh-only status", lambda: route_parent(gw, "mesh-only"))
    assert mesh["parentRef"]["kind"] == "Service" and conds(mesh["conditions"])["Accepted"] == ("True", "Accepted")
    # attachedRoutes counts Accepted routes only (good, missing-backend, forbidden, bad-kind).
    assert listeners["http"]["attachedRoutes"] == 4 or wait(
        "attachedRoutes", lambda: {ls["name"]: ls for ls in get(gw, "gateway", "gw")["status"]["listeners"]}["http"]["attachedRoutes"] == 4)

    # The data plane agrees: the accepted route serves, the bad backend's share answers 500.
    gw.wait_config(lambda: _get(gw, http_port, "/", "app.example.com")[0] == 200, message="HTTPRoute not served")
    assert _get(gw, http_port, "/missing", "app.example.com")[0] == 500
    assert _get(gw, http_port, "/ext", "app.example.com")[0] == 200  # the unsupported rule is not served: "good" answers


def _get(c: GatewayCluster, port: int, path: str, host: str) -> tuple[int, str]:
    from trafficmgr.testing.cluster import http_get

    try:
        return http_get(f"http://127.0.0.1:{port}{path}", 5.0, {"Host": host})
    except OSError as exc:
        return 0, str(exc)


def test_transition_time_kept_and_written_only_when_different(gw: GatewayCluster) -> None:
    port = free_port()
    gw.kubectl.apply(GATEWAY.split("---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway")[0]
                     + f"""---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: gw, namespace: default}}
spec:
  gatewayClassName: traffic
  listeners: [{{name: http, port: {port}, protocol: HTTP}}]
""" + route("r", "[{backendRefs: [{name: web, port: 80}]}]", hostnames="[]"))
    first = wait("route status", lambda: route_parent(gw, "r"))
    accepted = {c["type"]: c for c in first["conditions"]}["Accepted"]
    assert accepted["status"] == "True" and accepted["observedGeneration"] == 1
    path = "/apis/gateway.networking.k8s.io/v1/namespaces/default/httproutes/r"
    wait("settled", lambda: len([s for s in gw.cp.status.written if s.path == path]) == 1)
    time.sleep(1.5)  # later builds (other objects) must not write it again, nor move the transition time
    gw.apply("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: unrelated, namespace: default}\ndata: {a: b}\n")
    time.sleep(1.0)
    assert len([s for s in gw.cp.status.written if s.path == path]) == 1
    # A spec change (generation 2) that keeps Accepted=True: observedGeneration moves, lastTransitionTime stays.
    gw.kubectl("patch", "httproute", "r", "--type=merge", "-p",
               json.dumps({"spec": {"rules": [{"backendRefs": [{"name": "web", "port": 80}]},
                                              {"matches": [{"path": {"type": "Exact", "value": "/x"}}],
                                               "backendRefs": [{"name": "web", "port": 80}]}]}}))
    second = wait("generation 2", lambda: (p := route_parent(gw, "r")) and
                  {c["type"]: c for c in p["conditions"]}["Accepted"]["observedGeneration"] == 2 and p)
    again = {c["type"]: c for c in second["conditions"]}["Accepted"]
    assert again["lastTransitionTime"] == accepted["lastTransitionTime"]
    # A change of status (the backend goes away): ResolvedRefs flips and gets a new transition time.
    old_resolved = {c["type"]: c for c in second["conditions"]}["ResolvedRefs"]
    time.sleep(1.1)  # transition times have one-second resolution
    gw.delete("services", "web")
    third = wait("BackendNotFound", lambda: (p := route_parent(gw, "r")) and
                 conds(p["conditions"])["ResolvedRefs"] == ("False", "BackendNotFound") and p)
    flipped = {c["type"]: c for c in third["conditions"]}
    assert flipped["ResolvedRefs"]["lastTransitionTime"] > old_resolved["lastTransitionTime"]
    assert flipped["Accepted"]["lastTransitionTime"] == accepted["lastTransitionTime"]


def test_other_controllers_entries_are_kept(gw: GatewayCluster) -> None:
    port = free_port()
    gw.kubectl.apply(GATEWAY.split("---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway")[0] + f"""---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: gw, namespace: default}}
spec: {{gatewayClassName: traffic, listeners: [{{name: http, port: {port}, protocol: HTTP}}]}}
""" + route("shared", "[{backendRefs: [{name: web, port: 80}]}]", hostnames="[]",
            parent="{name: gw}, {name: theirs-gw}"))
    theirs = {"parentRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "theirs-gw"},
              "controllerName": "example.com/another-controller",
              "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "theirs",
                              "observedGeneration": 1, "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
    wait("ours", lambda: route_parent(gw, "shared", "httproute"))
    current = get(gw, "httproute", "shared")["status"]["parents"]
    gw.kubectl("patch", "httproute", "shared", "--subresource=status", "--type=merge", "-p",
               json.dumps({"status": {"parents": current + [theirs]}}))
    time.sleep(1.0)
    gw.apply("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: nudge, namespace: default}\ndata: {a: b}\n")
    time.sleep(1.0)
    parents = get(gw, "httproute", "shared")["status"]["parents"]
    assert theirs in parents and len(parents) == 2


@pytest.mark.parametrize(("address", "expected"), [("127.0.0.1", [{"type": "IPAddress", "value": "127.0.0.1"}]),
                                                   ("0.0.0.0", []), ("::", [])])
def test_addresses_without_the_gateway_service(address: str, expected: list[dict[str, str]]) -> None:
    """No ``--gateway-service`` Service: a specific ``--gateway-address`` (local mode) is the address;
    a wildcard one is none (and Programmed is False, AddressNotAssigned)."""
    import argparse

    from trafficmgr.plugin import Model
    from trafficmgr.plugins.gateway_api import status

    opts = argparse.Namespace(gateway_address=address, gateway_service="traffic-ingress", gateway_namespace="default")
    assert status.gateway_addresses(Model(), opts) == expected


def test_programmed_false_address_not_assigned_without_any_address() -> None:
    import argparse

    from tests.plugins.test_gateway_api_plan import gateway, gclass, model
    from trafficmgr.plugins.gateway_api import plan, status

    opts = argparse.Namespace(gateway_address="0.0.0.0", gateway_service="traffic-ingress", gateway_namespace="default",
                              gateway_port=10000)
    mdl = model(gclass(), gateway())
    (st,) = [s for s in status.statuses(plan.build(mdl, opts), mdl, opts) if s.path.endswith("/gateways/gw")]
    cond = {c["type"]: c for c in st.status["conditions"]}["Programmed"]
    assert (cond["status"], cond["reason"]) == ("False", "AddressNotAssigned") and "default/traffic-ingress" in cond["message"]
    assert st.status["addresses"] == []


def test_conflicts_route_kinds_and_class_parameters_read_back(gw: GatewayCluster) -> None:
    port, other = free_port(), free_port()
    expose(gw, port, other)
    gw.kubectl.apply(f"""
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {{name: traffic}}
spec: {{controllerName: {CONTROLLER}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {{name: with-params}}
spec: {{controllerName: {CONTROLLER}, parametersRef: {{group: example.com, kind: Config, name: c}}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: first, namespace: default}}
spec:
  gatewayClassName: traffic
  listeners:
  - {{name: a, port: {port}, protocol: HTTP, hostname: x.example.com}}
  - {{name: same-host, port: {port}, protocol: HTTP, hostname: x.example.com}}
  - {{name: kinds, port: {other}, protocol: HTTP, allowedRoutes: {{kinds: [{{kind: TCPRoute}}, {{kind: HTTPRoute}}]}}}}
""")
    time.sleep(1.1)  # the second Gateway is younger (creationTimestamp has one-second resolution)
    gw.kubectl.apply(f"""
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: second, namespace: default}}
spec:
  gatewayClassName: traffic
  listeners: [{{name: tls, port: {port}, protocol: HTTPS, tls: {{certificateRefs: [{{name: missing}}]}}}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: on-params, namespace: default}}
spec: {{gatewayClassName: with-params, listeners: [{{name: h, port: {free_port()}, protocol: HTTP}}]}}
""")

    def listener_conds(name: str) -> dict[str, dict[str, tuple[str, str]]]:
        return {ls["name"]: conds(ls["conditions"]) for ls in get(gw, "gateway", name)["status"]["listeners"]}

    first = wait("first", lambda: (x := listener_conds("first")) and len(x) == 3 and x["a"]["Programmed"][0] == "True" and x)
    assert first["a"]["Conflicted"] == ("False", "NoConflicts") and first["a"]["Programmed"] == ("True", "Programmed")
    assert first["same-host"]["Conflicted"] == ("True", "HostnameConflict")
    assert first["same-host"]["Programmed"] == ("False", "Invalid")
    assert first["kinds"]["ResolvedRefs"] == ("False", "InvalidRouteKinds")
    kinds = {ls["name"]: ls for ls in get(gw, "gateway", "first")["status"]["listeners"]}["kinds"]["supportedKinds"]
    assert kinds == [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute"}]
    second = wait("second", lambda: listener_conds("second"))
    assert second["tls"]["Conflicted"] == ("True", "ProtocolConflict")
    cls = wait("class with parameters", lambda: get(gw, "gatewayclass", "with-params", None)["status"]["conditions"])
    assert conds(cls)["Accepted"] == ("False", "InvalidParameters")
    on_params = wait("its Gateway", lambda: conds(get(gw, "gateway", "on-params")["status"]["conditions"])["Accepted"][1] == "Invalid")
    assert on_params
