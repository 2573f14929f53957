"""ingress plugin: Ingresses served by a real gateway Envoy (node cluster ``traffic-ingress``).

The README's "Ingress gateway" walkthrough (samples/ingress.yaml), hosts and path types, the default
IngressClass, conflicts, missing backends, service policies at the gateway, and Ingress status.

Hooks exercised here: ``trafficmgr_watch_kinds`` (Ingress, IngressClass), ``trafficmgr_port_protocols``
(backends are http without labels), ``trafficmgr_resources`` and ``trafficmgr_listener`` (the gateway
listener, routes and, with tls, SNI chains), ``trafficmgr_route`` at the gateway, and
``trafficmgr_object_status`` (Ingress ``status.loadBalancer``).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.plugins.gateway import served_by
from trafficmgr.core import cache
from trafficmgr.core.plugins import PluginHost
from trafficmgr.core.translate.builder import Builder
from trafficmgr.testing.cluster import GatewayCluster
from trafficmgr.testing.envoy import wait_for
from trafficmgr.testing.golden import build_from_manifests, load_manifests

ROOT = Path(__file__).resolve().parents[2]
# Pod IPs are loopback addresses, so the gateway (on loopback) reaches them without a network namespace.
BACKENDS = {
    "productpage": ("127.0.10.1", 9080), "reviews": ("127.0.10.2", 9080), "ratings": ("127.0.10.3", 9080),
    "prometheus": ("127.0.10.4", 9090), "zipkin": ("127.0.10.5", 9411), "web": ("127.0.10.6", 8080),
    "web2": ("127.0.10.7", 8080),
}


def service_and_pod(name: str, labels: str = "{}") -> str:
    ip, port = BACKENDS[name]
    return f"""
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default, labels: {labels}}}
spec:
  selector: {{app: {name}}}
  ports: [{{name: http, port: {port}, targetPort: {port}}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: {name}-1, namespace: default, labels: {{app: {name}}}}}
spec: {{nodeName: node-1, containers: [{{name: app, image: {name}, ports: [{{containerPort: {port}}}]}}]}}
status: {{podIP: {ip}, conditions: [{{type: Ready, status: "True"}}]}}
---
"""


@pytest.fixture(params=["sotw", "delta"])
def gw(request: pytest.FixtureRequest, envoy_binary: str) -> Iterator[GatewayCluster]:
    with GatewayCluster(delta=request.param == "delta") as c:
        for name, (ip, port) in BACKENDS.items():
            c.backend(name, ip, port)
        c.apply("".join(service_and_pod(n) for n in BACKENDS))
        yield c
        assert c.cp.nacks() == [], f"Envoy rejected config: {c.cp.nacks()}"


def test_readme_sample_routes_paths(gw: GatewayCluster) -> None:
    """samples/ingress.yaml: the README's curl commands reach the right services through the gateway."""
    assert served_by(gw, "/productpage")[0] == 0  # no Ingress yet: no gateway listener
    gw.apply((ROOT / "samples" / "ingress.yaml").read_text())
    gw.wait_config(lambda: gw.get("/productpage")[0] == 200, message="sample Ingress not served")
    assert served_by(gw, "/productpage") == (200, "productpage")
    assert served_by(gw, "/reviews/0") == (200, "reviews")
    assert served_by(gw, "/ratings") == (200, "ratings")
    assert served_by(gw, "/api/v1/label/__name__/values") == (200, "prometheus")
    assert served_by(gw, "/api/v2/spans") == (200, "zipkin")
    # Prefix is element-wise: /productpagex is not under /productpage.
    assert gw.get("/productpagex")[0] == 404
    assert gw.get("/")[0] == 404
    # The backend saw the original path and host.
    req = gw.backends[1].requests[-1]
    assert req["path"] == "/reviews/0"


def test_hosts_wildcards_path_types_default_backend(gw: GatewayCluster) -> None:
    gw.apply("""
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: hosts, namespace: default}
spec:
  ingressClassName: traffic
  defaultBackend: {service: {name: web, port: {name: http}}}
  rules:
  - host: shop.example.com
    http:
      paths:
      - {path: /, pathType: Prefix, backend: {service: {name: productpage, port: {number: 9080}}}}
      - {path: /reviews, pathType: Exact, backend: {service: {name: reviews, port: {name: http}}}}
      - {path: /rat, pathType: ImplementationSpecific, backend: {service: {name: ratings, port: {number: 9080}}}}
  - host: "*.example.com"
    http:
      paths:
      - {path: /metrics, pathType: Prefix, backend: {service: {name: prometheus, port: {number: 9090}}}}
""")
    gw.wait_config(lambda: served_by(gw, "/", "shop.example.com") == (200, "productpage"))
    # Exact: only that path; the host's "/" prefix takes the rest.
    assert served_by(gw, "/reviews", "shop.example.com") == (200, "reviews")
    assert served_by(gw, "/reviews/1", "shop.example.com") == (200, "productpage")
    # ImplementationSpecific is a plain string prefix.
    assert served_by(gw, "/ratings", "shop.example.com") == (200, "ratings")
    # Host match ignores the port and case.
    assert served_by(gw, "/", f"SHOP.example.com:{gw.gateway_port}") == (200, "productpage")
    # Wildcard: exactly one more label; otherwise (and for other paths) the default backend.
    assert served_by(gw, "/metrics", "a.example.com") == (200, "prometheus")
    assert served_by(gw, "/metrics", "a.b.example.com") == (200, "web")
    assert served_by(gw, "/other", "a.example.com") == (200, "web")
    assert served_by(gw, "/anything", "unknown.test") == (200, "web")


def test_default_ingress_class(gw: GatewayCluster) -> None:
    """An Ingress without class is served only while IngressClass ``traffic`` is the default class;
    an Ingress of another class never is."""
    gw.apply("""
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: classless, namespace: default}
spec:
  rules:
  - host: classless.test
    http:
      paths: [{path: /, pathType: Prefix, backend: {service: {name: web, port: {number: 8080}}}}]
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: nginx, namespace: default}
spec:
  ingressClassName: nginx
  rules:
  - host: nginx.test
    http:
      paths: [{path: /, pathType: Prefix, backend: {service: {name: web2, port: {number: 8080}}}}]
---
apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata: {name: traffic}
spec: {controller: trafficmgr.io/ingress}
""")
    # Not the default class yet: nothing is served (the gateway has no Ingress at all).
    wait_for(lambda: gw.cp.builds >= 1 and gw.cp.assembler.extra["Ingress"].get(("default", "classless")))
    assert served_by(gw, "/", "classless.test")[0] == 0
    gw.store.patch("ingressclasses", "traffic",
                   {"metadata": {"annotations": {"ingressclass.kubernetes.io/is-default-class": "true"}}}, patch_type="merge")
    gw.wait_config(lambda: served_by(gw, "/", "classless.test") == (200, "web"))
    assert served_by(gw, "/", "nginx.test")[0] == 404


def test_conflict_oldest_wins_and_warning(gw: GatewayCluster) -> None:
    gw.apply("""
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: z-older, namespace: default}
spec:
  ingressClassName: traffic
  rules:
  - host: app.test
    http:
      paths: [{path: /x, pathType: Prefix, backend: {service: {name: web, port: {number: 8080}}}}]
""")
    gw.wait_config(lambda: served_by(gw, "/x", "app.test") == (200, "web"))
    # creationTimestamp has one-second resolution (equal ones fall back to name order, which here would
    # pick the other Ingress): create the second one in a later second.
    created = gw.store.get("ingresses", "z-older", "default")["metadata"]["creationTimestamp"]
    wait_for(lambda: dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ") > created, 2)
    gw.apply("""
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: a-newer, namespace: default}
spec:
  ingressClassName: traffic
  rules:
  - host: app.test
    http:
      paths:
      - {path: /x/, pathType: Prefix, backend: {service: {name: web2, port: {number: 8080}}}}
      - {path: /y, pathType: Prefix, backend: {service: {name: web2, port: {number: 8080}}}}
""")
    # The newer Ingress merges in (/y) but loses the conflicting path (/x/ = /x for Prefix).
    gw.wait_config(lambda: served_by(gw, "/y", "app.test") == (200, "web2"))
    assert served_by(gw, "/x/1", "app.test") == (200, "web")
    ev = gw.wait_event("a-newer", "IngressConflict", "default/z-older")
    assert "'/x'" in ev["message"]
    assert not [e for e in gw.events("z-older") if e["reason"] == "IngressConflict"]
    # Deleting the older Ingress hands the path to the newer one.
    gw.delete("ingresses", "z-older")
    gw.wait_config(lambda: served_by(gw, "/x/1", "app.test") == (200, "web2"))


def test_missing_backend_answers_503_rest_keeps_working(gw: GatewayCluster) -> None:
    gw.apply("""
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: partial, namespace: default}
spec:
  ingressClassName: traffic
  rules:
  - http:
      paths:
      - {path: /ok, pathType: Prefix, backend: {service: {name: web, port: {number: 8080}}}}
      - {path: /later, pathType: Prefix, backend: {service: {name: later, port: {number: 7070}}}}
      - {path: /badport, pathType: Prefix, backend: {service: {name: web, port: {name: grpc}}}}
""")
    gw.wait_config(lambda: served_by(gw, "/ok") == (200, "web"))
    status, body = gw.get("/later")
    assert status == 503 and "later:7070" in body
    assert gw.get("/badport")[0] == 503
    gw.wait_event("partial", "IngressBackendNotFound", "service 'later' not found")
    gw.wait_event("partial", "IngressBackendNotFound", "port 'grpc'")
    # The service appears (without any traffic.port label): the path starts working.
    gw.backend("later", "127.0.10.8", 7070)
    gw.apply("""
apiVersion: v1
kind: Service
metadata: {name: later, namespace: default}
spec:
  selector: {app: later}
  ports: [{port: 7070, targetPort: 7070}]
---
apiVersion: v1
kind: Pod
metadata: {name: later-1, namespace: default, labels: {app: later}}
spec: {nodeName: node-1, containers: [{name: app, image: later}]}
status: {podIP: 127.0.10.8, conditions: [{type: Ready, status: "True"}]}
""")
    gw.wait_config(lambda: served_by(gw, "/later") == (200, "later"))
    assert served_by(gw, "/ok") == (200, "web")


def test_service_policies_apply_fault_does_not(gw: GatewayCluster) -> None:
    """Retries (circuit_breaker plugin) apply at the gateway; fault injection does not."""
    gw.apply("""
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: policies, namespace: default}
spec:
  ingressClassName: traffic
  rules:
  - http:
      paths: [{path: /, pathType: Prefix, backend: {service: {name: web, port: {number: 8080}}}}]
""")
    gw.wait_config(lambda: served_by(gw, "/") == (200, "web"))
    web = next(b for b in gw.backends if b.name == "web")
    gw.label("service", "web", {"traffic.retries.5xx": "2", "traffic.fault.abort.percentage": "100",
                                "traffic.fault.abort.status": "418"})

    def retried() -> bool:
        web.reset().set(statuses=[503, 503])
        return gw.get("/")[0] == 200 and web.hits == 3

    gw.wait_config(retried, message="retries label not applied at the gateway")
    # Fault labels are ignored by the gateway: no 418, ever.
    web.reset()
    assert {gw.get("/")[0] for _ in range(20)} == {200}


def test_ingress_status_address(gw: GatewayCluster) -> None:
    """``status.loadBalancer.ingress`` = the gateway Service's ClusterIP, then its load-balancer IP;
    ``kubectl get ingress`` shows it as ADDRESS (``trafficmgr_object_status`` -> the core's StatusWriter)."""
    gw.apply("""
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: status, namespace: default}
spec:
  ingressClassName: traffic
  rules:
  - http:
      paths: [{path: /, pathType: Prefix, backend: {service: {name: web, port: {number: 8080}}}}]
---
apiVersion: v1
kind: Service
metadata: {name: traffic-ingress, namespace: default}
spec:
  type: LoadBalancer
  selector: {app: traffic-ingress}
  ports: [{name: http, port: 80, targetPort: 10000}, {name: https, port: 443, targetPort: 10000}]
""")
    cluster_ip = gw.store.get("services", "traffic-ingress", "default")["spec"]["clusterIP"]

    def address() -> list:
        st = gw.store.get("ingresses", "status", "default").get("status") or {}
        return (st.get("loadBalancer") or {}).get("ingress") or []

    wait_for(lambda: address() == [{"ip": cluster_ip}], 10, message=f"status not written: {address()}")
    gw.store.patch("services", "traffic-ingress", {"status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.80"}]}}},
                   "default", patch_type="merge", subresource="status")
    wait_for(lambda: address() == [{"ip": "192.0.2.80"}], 10, message=f"status not updated: {address()}")
    out = gw.kubectl("get", "ingress", "status", "-n", "default")
    assert "192.0.2.80" in out.splitlines()[1], out
    writes = len(gw.cp.status.written)
    gw.label("service", "web", {"traffic.lb.policy": "RANDOM"})  # a rebuild: no needless status write
    wait_for(lambda: gw.cp.assembler.services[("default", "web")].labels.value("traffic.lb.policy") == "RANDOM")
    wait_for(lambda: not gw.cp.assembler.dirty)
    assert len(gw.cp.status.written) == writes
    # Moved to another controller's class: this gateway no longer serves it, so its address goes away.
    gw.store.patch("ingresses", "status", {"spec": {"ingressClassName": "someone-else"}}, "default", patch_type="merge")
    wait_for(lambda: address() == [], 10, message=f"status of an Ingress no longer served was kept: {address()}")


# -- without Envoy ----------------------------------------------------------------------------------


def test_unrelated_change_does_not_rebuild_gateway(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway is memoized on its inputs: a pod change elsewhere does not re-plan the Ingresses."""
    from trafficmgr.core.controlplane import kinds_of
    from trafficmgr.core.kube.assemble import Assembler
    from trafficmgr.plugins.ingress import gateway

    calls = []
    real = gateway.plan
    monkeypatch.setattr(gateway, "plan", lambda ctx: calls.append(1) or real(ctx))
    manifests = load_manifests(ROOT / "tests/golden/plugins/ingress_hosts_paths.in.yaml")
    plugins = PluginHost.load(["ingress", "tls", "lb", "circuit_breaker"])
    snaps, _ = build_from_manifests(manifests, plugins)
    assert calls == [1]
    # Same flow as the control plane: one assembler, one builder, successive models.
    asm = Assembler(plugins.labels, plugins.collect("trafficmgr_watch_kinds"))
    from trafficmgr.apiserver.controllers import Controllers
    from trafficmgr.apiserver.store import Store

    store = Store()
    ctl = Controllers(store, endpointslices=True)
    ctl.start()
    for m in manifests:
        store.create(m)
    ctl.wait_idle()
    for kind in kinds_of(plugins):
        asm.apply("RELIST", kind, store.list(kind.plural)["items"])
    builder = Builder(plugins)
    first = builder.build(asm.model())["gateway"]
    pod = store.get("pods", "productpage-1", "default")
    pod["metadata"].setdefault("labels", {})["traffic.endpoint.weight"] = "50"
    store.update(pod)
    ctl.wait_idle()
    ctl.stop()
    for kind in kinds_of(plugins):
        asm.apply("RELIST", kind, store.list(kind.plural)["items"])
    second = builder.build(asm.model())["gateway"]
    assert calls == [1, 1]
    assert first.types[cache.LISTENER] is second.types[cache.LISTENER]
    assert first.types[cache.ROUTE] is second.types[cache.ROUTE]
    assert first.types[cache.ENDPOINT] is not second.types[cache.ENDPOINT]  # the weight did change


def test_backends_count_as_http_without_labels() -> None:
    snaps, warnings = build_from_manifests(load_manifests(ROOT / "tests/golden/plugins/ingress_hosts_paths.in.yaml"),
                                           PluginHost.load(["ingress"]))
    assert sorted(snaps["sidecar"].types[cache.CLUSTER].resources) == [
        "9080|default|productpage.outbound", "9080|default|reviews.outbound", "9090|default|prometheus.outbound",
        "inbound|blackhole", "inbound|passthrough"]
    assert warnings == []


def test_bad_input_never_nacks(gw: GatewayCluster) -> None:
    """Odd but API-valid (and some invalid) Ingress content: reported or served, never rejected by Envoy."""
    gw.apply((ROOT / "tests/golden/plugins/ingress_conflicts.in.yaml").read_text())
    gw.apply("""
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: odd, namespace: default}
spec:
  ingressClassName: traffic
  rules:
  - host: odd.test
    http:
      paths:
      - {path: "/café/ü", pathType: Prefix, backend: {service: {name: web, port: {number: 8080}}}}
      - {path: "/a//b/../c%zz*[x]", pathType: Exact, backend: {service: {name: web, port: {number: 8080}}}}
      - {path: "/x/", pathType: Prefix, backend: {service: {name: web, port: {number: 8080}}}}
      - {path: "///", pathType: Prefix, backend: {service: {name: web, port: {number: 8080}}}}
      - {path: "/%s", pathType: ImplementationSpecific, backend: {service: {name: web, port: {number: 0}}}}
      - {path: "", pathType: Prefix, backend: {service: {name: web, port: {number: 8080}}}}
      - {path: "relative", pathType: Prefix, backend: {service: {name: web, port: {number: 8080}}}}
  - host: "*.*.test"
    http:
      paths: [{path: /, pathType: Prefix, backend: {service: {name: web, port: {number: 8080}}}}]
  - host: "ünï.test"
    http:
      paths: [{path: /, pathType: Prefix, backend: {service: {name: web, port: {number: 8080}}}}]
  - host: "%s" % {"a" * 300}
    http:
      paths: [{path: /, pathType: Prefix, backend: {service: {name: web, port: {number: 8080}}}}]
""".replace('"%s" % {"a" * 300}', "a" * 63 + ".test"))
    gw.wait_config(lambda: served_by(gw, "/x/1", "odd.test") == (200, "web"))
    gw.wait_event("odd", "InvalidIngress", "'relative'")
    gw.wait_event("odd", "InvalidIngress", "'*.*.test'")
    gw.wait_event("b-second", "IngressConflict")
    assert served_by(gw, "/", "app.example.com") == (200, "web")
    # Envoy took every listener/route version we sent.
    assert gw.cp.nacks() == []
    status = {s["node_id"]: s for s in gw.cp.proxy_status()}[GatewayCluster.NODE_ID]
    assert "NACK" not in json.dumps(status)
