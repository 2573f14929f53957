"""accesslog plugin: ``traffic.accesslog=on`` makes a real Envoy write one JSON line per request to its
stdout (the sidecar's outbound side, the ingress gateway), only for the labeled Service even when another
Service shares the port; off and invalid values change nothing."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from trafficmgr.core.kube.events import INVALID_LABEL
from trafficmgr.plugins.accesslog import FORMAT, LABEL, LOG_TYPE, access_lines
from trafficmgr.testing.kit import BuildResult, SidecarMesh

WEB_API = """
apiVersion: v1
kind: Service
metadata: {name: web, labels: {traffic.port.9080: http}}
spec: {selector: {app: web}, ports: [{port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: api, labels: {traffic.port.9080: http}}
spec: {selector: {app: api}, ports: [{port: 9080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, labels: {app: web}}
spec: {containers: [{name: app, image: web}]}
---
apiVersion: v1
kind: Pod
metadata: {name: api-1, labels: {app: api}}
spec: {containers: [{name: app, image: api}]}
"""


def stdout_lines(envoy: Any) -> list[dict[str, Any]]:
    """The access-log lines Envoy wrote to its stdout so far (``envoy.out`` in its working directory)."""
    path = Path(envoy.workdir) / "envoy.out"
    text = path.read_text(errors="replace") if path.exists() else ""
    return [json.loads(line) for line in access_lines(text)]


def wait_line(envoy: Any, request_id: str, timeout: float = 10.0) -> dict[str, Any]:
    """The access-log line of the request with ``x-request-id: request_id`` (waits for Envoy to write it)."""
    def find() -> dict[str, Any] | None:
        return next((line for line in stdout_lines(envoy) if line.get("request_id") == request_id), None)

    found: dict[str, Any] = envoy.wait_for(find, timeout, message=f"no access-log line for request {request_id}")
    return found


def logging_listeners(envoy: Any) -> list[str]:
    """Names of the Envoy's dynamic listeners whose configuration has an access log."""
    return [str((lst.get("listener") or lst).get("name")) for lst in envoy.dynamic("listeners")
            if '"access_log"' in json.dumps(lst)]


def ids(envoy: Any) -> list[str]:
    return [line.get("request_id") for line in stdout_lines(envoy)]


def test_sidecar_logs_requests_to_the_labeled_service_only(trafficmgr_envoy: Callable[..., SidecarMesh]) -> None:
    mesh = trafficmgr_envoy(WEB_API)
    assert mesh.build is not None and mesh.build.warnings == []
    assert not logging_listeners(mesh.envoy)
    mesh.label("service", "web", {LABEL: "on"})
    assert mesh.build.warnings == [] and logging_listeners(mesh.envoy)
    web = mesh.backends["web-1"]

    r = mesh.get("web", "/hello?x=1", headers={"x-request-id": "rid-web-1"})
    assert r.status == 200
    other = mesh.get("api", "/other", headers={"x-request-id": "rid-api-1"})  # same port, unlabeled Service
    assert other.status == 200
    line = wait_line(mesh.envoy, "rid-web-1")
    assert line["log"] == LOG_TYPE and set(line) == set(FORMAT)
    assert line["direction"] == "outbound" and line["destination"] == "Service/default/web"
    assert line["method"] == "GET" and line["authority"] == "web:9080" and line["path"] == "/hello?x=1"
    assert line["protocol"] == "HTTP/1.1" and line["status"] == 200 and line["response_flags"] == "-"
    assert line["upstream_host"] == f"{web.host}:{web.port}"
    assert line["upstream_cluster"] == "9080|default|web.outbound"
    assert isinstance(line["duration_ms"], int) and line["duration_ms"] >= 0
    assert line["bytes_sent"] == len(r.body) and line["bytes_received"] == 0
    assert line["peer_identity"] is None and line["upstream_identity"] is None  # plaintext both ways
    assert line["start_time"].endswith("Z")

    # A failing upstream and a POST with a body: the status and sizes are the real ones.
    web.set(status=503)
    r = mesh.request("POST", "web", "/orders", headers={"x-request-id": "rid-web-2"}, body=b"0123456789")
    assert r.status == 503
    line = wait_line(mesh.envoy, "rid-web-2")
    assert line["status"] == 503 and line["method"] == "POST" and line["bytes_received"] == 10
    web.set(status=200)

    # One line per request: a barrier request to web, logged after api's; api's never is.
    mesh.get("web", "/", headers={"x-request-id": "rid-web-3"})
    wait_line(mesh.envoy, "rid-web-3")
    assert ids(mesh.envoy).count("rid-web-1") == 1 and "rid-api-1" not in ids(mesh.envoy)

    # Label the other Service too: its requests log with their own destination.
    mesh.label("service", "api", {LABEL: "on"})
    mesh.get("api", "/x", headers={"x-request-id": "rid-api-2"})
    assert wait_line(mesh.envoy, "rid-api-2")["destination"] == "Service/default/api"

    # Off (removed from both): no line at all (and, below, no access log in the configuration).
    mesh.label("service", "web", {LABEL: "off"})
    mesh.label("service", "api", {LABEL: None})
    before = len(stdout_lines(mesh.envoy))
    for i in range(3):
        assert mesh.get("web", "/", headers={"x-request-id": f"rid-off-{i}"}).status == 200
        assert mesh.get("api", "/", headers={"x-request-id": f"rid-off-api-{i}"}).status == 200
    time.sleep(1.5)  # stdout lines are written within the request's completion; give a slow machine time
    assert len(stdout_lines(mesh.envoy)) == before
    assert not logging_listeners(mesh.envoy)


def test_without_the_label_the_configuration_is_unchanged(trafficmgr_build: Callable[..., BuildResult]) -> None:
    """No label (or off, or an invalid value): the same bytes as without the plugin; an invalid value is
    an InvalidTrafficLabel warning and nothing else."""
    plugins = ["lb", "fault", "tracing", "ratelimit"]
    without = trafficmgr_build(WEB_API, plugins=plugins).render()
    assert trafficmgr_build(WEB_API, plugins=[*plugins, "accesslog"]).render() == without
    off = WEB_API.replace("labels: {traffic.port.9080: http}}\nspec: {selector: {app: web}",
                          "labels: {traffic.port.9080: http, traffic.accesslog: \"off\"}}\nspec: {selector: {app: web}")
    assert off != WEB_API
    result = trafficmgr_build(off, plugins=[*plugins, "accesslog"])
    assert result.warnings == [] and result.render() == without
    bad = off.replace('traffic.accesslog: "off"', 'traffic.accesslog: "yes"')
    result = trafficmgr_build(bad, plugins=[*plugins, "accesslog"])
    assert result.render() == without
    [warning] = result.warnings
    assert INVALID_LABEL in warning and LABEL in warning and "one of off, on" in warning, warning
    on = off.replace('traffic.accesslog: "off"', 'traffic.accesslog: "ON"')  # choices are case-insensitive
    result = trafficmgr_build(on, plugins=[*plugins, "accesslog"])
    assert result.warnings == [] and result.render() != without


def test_invalid_value_logs_nothing(trafficmgr_envoy: Callable[..., SidecarMesh]) -> None:
    mesh = trafficmgr_envoy(WEB_API)
    mesh.label("service", "web", {LABEL: "yes"})
    assert mesh.build is not None
    assert [w for w in mesh.build.warnings if INVALID_LABEL in w and LABEL in w], mesh.build.warnings
    assert mesh.get("web", "/", headers={"x-request-id": "rid-bad"}).status == 200
    time.sleep(1.5)
    assert stdout_lines(mesh.envoy) == []
    assert not logging_listeners(mesh.envoy)


GATEWAY_MANIFESTS = """
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec: {{selector: {{app: web}}, ports: [{{port: 80, targetPort: {web_port}}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: api}}
spec: {{selector: {{app: api}}, ports: [{{port: 80, targetPort: {api_port}}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: web-1, labels: {{app: web}}}}
spec: {{containers: [{{name: app, image: web}}]}}
status: {{phase: Running, podIP: {web_ip}, podIPs: [{{ip: {web_ip}}}], conditions: [{{type: Ready, status: "True"}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: api-1, labels: {{app: api}}}}
spec: {{containers: [{{name: app, image: api}}]}}
status: {{phase: Running, podIP: {api_ip}, podIPs: [{{ip: {api_ip}}}], conditions: [{{type: Ready, status: "True"}}]}}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{name: shop}}
spec:
  ingressClassName: traffic
  rules:
  - host: shop.example
    http:
      paths:
      - {{path: /web, pathType: Prefix, backend: {{service: {{name: web, port: {{number: 80}}}}}}}}
      - {{path: /api, pathType: Prefix, backend: {{service: {{name: api, port: {{number: 80}}}}}}}}
"""


def test_gateway_logs_routes_to_the_labeled_service(trafficmgr_gateway: Callable[..., Any]) -> None:
    gw = trafficmgr_gateway(plugins=["ingress", "accesslog"])
    web = gw.backend("web-1", "127.0.0.71", 0)
    api = gw.backend("api-1", "127.0.0.72", 0)
    gw.apply(GATEWAY_MANIFESTS.format(web_port=web.port, api_port=api.port, web_ip=web.host, api_ip=api.host))
    gw.wait_config(lambda: gw.get("/web", host="shop.example")[0] == 200, message="no route to web")
    gw.label("service", "web", {LABEL: "on"})

    def by_path(path: str) -> dict[str, Any] | None:
        return next((x for x in stdout_lines(gw.envoy) if x.get("path") == path), None)

    def logged() -> dict[str, Any] | None:
        gw.get("/web/page", host="shop.example")
        return by_path("/web/page")

    gw.wait_config(logged, timeout=15, message="the gateway never logged a request to web")
    status, _ = gw.get("/api/x", host="shop.example")
    assert status == 200
    # The gateway is the edge: it makes its own x-request-id (one sent from outside is not kept).
    status, body = gw.get("/web/y?q=2", host="shop.example", headers={"x-request-id": "from-outside"})
    assert status == 200
    line = gw.wait_config(lambda: by_path("/web/y?q=2"), message="no line for /web/y?q=2")
    assert line["direction"] == "gateway" and line["destination"] == "Service/default/web"
    assert line["authority"] == "shop.example" and line["method"] == "GET" and line["status"] == 200
    assert line["upstream_host"] == f"{web.host}:{web.port}" and line["bytes_sent"] == len(body.encode())
    assert line["request_id"] and line["request_id"] != "from-outside"
    assert by_path("/api/x") is None  # api shares the gateway's listener and route configuration

    # An invalid value: the Warning Event, and the previous (valid) state is not what applies: the default (off).
    gw.label("service", "web", {LABEL: "loud"})
    gw.wait_event("web", INVALID_LABEL, LABEL)

    def quiet() -> bool:
        n = len(stdout_lines(gw.envoy))
        gw.get("/web/z", host="shop.example")
        time.sleep(0.5)
        return len(stdout_lines(gw.envoy)) == n

    gw.wait_config(quiet, timeout=15, message="the gateway still logs with an invalid label value")
