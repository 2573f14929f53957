"""accesslog plugin: ``traffic.accesslog=on`` makes a real Envoy write one JSON line per request to its
stdout (the sidecar's outbound side, the ingress gateway), only for the labeled Service even when another
Service shares the port; off and invalid values change nothing.

Reading the lines: Envoy buffers its stdout access log and writes it every 10 s (or past 64 KiB); the
tests have it write the buffer at once with the admin's ``POST /reopen_logs`` (:func:`flush`, the
production configuration is unchanged). "No line" is proven with a barrier: after the request that must
not log, a request to a Service that logs (``logged``, through the same Envoy, which runs one worker)
and its line awaited. Envoy writes a line when a request's stream ends, appends lines to one buffer per
file in that order and writes the buffer whole, so once the barrier's line is in the file, a line of the
earlier request would be too."""

from __future__ import annotations

import contextlib
import http.client
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from trafficmgr.core.kube.events import INVALID_LABEL
from trafficmgr.plugins.accesslog import FORMAT, LABEL, LOG_TYPE, NAMESPACE, access_lines
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

#: The barrier: a Service that always logs (its own port, so web's and api's routes are not shared with it).
BARRIER = """
apiVersion: v1
kind: Service
metadata: {name: logged, labels: {traffic.port.9180: http, traffic.accesslog: "on"}}
spec: {selector: {app: logged}, ports: [{port: 9180}]}
---
apiVersion: v1
kind: Pod
metadata: {name: logged-1, labels: {app: logged}}
spec: {containers: [{name: app, image: logged}]}
"""
BARRIER_MARK = '{"destination": "Service/default/logged"}'


def flush(envoy: Any) -> None:
    """Have Envoy write its buffered stdout now: ``POST /reopen_logs`` wakes the access-log flush thread
    (left alone it writes every 10 s, ``--file-flush-interval-msec``)."""
    envoy.admin("/reopen_logs", method="POST")


def stdout_lines(envoy: Any) -> list[dict[str, Any]]:
    """The access-log lines Envoy wrote to its stdout (``envoy.out`` in its working directory), after a
    :func:`flush`: every line of a request that ended before this call (and maybe later ones)."""
    flush(envoy)
    path = Path(envoy.workdir) / "envoy.out"
    text = path.read_text(errors="replace") if path.exists() else ""
    return [json.loads(line) for line in access_lines(text)]


def wait_line(envoy: Any, request_id: str, timeout: float = 10.0) -> dict[str, Any]:
    """The access-log line of the request with ``x-request-id: request_id`` (waits for Envoy to write it)."""
    def find() -> dict[str, Any] | None:
        return next((line for line in stdout_lines(envoy) if line.get("request_id") == request_id), None)

    found: dict[str, Any] = envoy.wait_for(find, timeout, message=f"no access-log line for request {request_id}")
    return found


def marked_routes(envoy: Any) -> list[str]:
    """The destinations named by the plugin's route metadata in the Envoy's route configurations."""
    return sorted(json.dumps(m) for rc in envoy.dynamic("routes") for vh in rc.get("virtual_hosts", [])
                  for r in vh.get("routes", []) if (m := r.get("metadata", {}).get("filter_metadata", {}).get(NAMESPACE)))


def ids(envoy: Any) -> list[Any]:
    return [line.get("request_id") for line in stdout_lines(envoy)]


def barrier(mesh: SidecarMesh, request_id: str) -> list[Any]:
    """Send a request that logs (to ``logged``) and wait for its line; then the request ids of every
    line so far, which include those of all requests answered before this call."""
    assert mesh.get("logged", "/", headers={"x-request-id": request_id}).status == 200
    wait_line(mesh.envoy, request_id)
    return ids(mesh.envoy)


def test_sidecar_logs_requests_to_the_labeled_service_only(trafficmgr_envoy: Callable[..., SidecarMesh]) -> None:
    # A collector address nothing listens on (spans are dropped): tracing needs one to be on at all.
    mesh = trafficmgr_envoy(WEB_API + "---" + BARRIER, options={"zipkin_address": "127.0.0.1:9"})
    assert mesh.build is not None and mesh.build.warnings == []
    assert marked_routes(mesh.envoy) == [BARRIER_MARK]
    mesh.label("service", "web", {LABEL: "on"})
    assert mesh.build.warnings == [] and marked_routes(mesh.envoy) == sorted(
        [BARRIER_MARK, '{"destination": "Service/default/web"}'])
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
    seen = ids(mesh.envoy)
    assert seen.count("rid-web-1") == 1 and "rid-api-1" not in seen

    # Traced requests carry their trace id (Zipkin here: the B3 trace id the caller sent and sampled).
    mesh.label("service", "web", {"traffic.tracing.enabled": "true"})
    trace = "463ac35c9f6413ad48485a3953bb6124"
    mesh.get("web", "/traced", headers={"x-request-id": "rid-traced", "x-b3-traceid": trace,
                                        "x-b3-spanid": "a2fb4a1d1a96d312", "x-b3-sampled": "1"})
    assert wait_line(mesh.envoy, "rid-traced")["trace_id"] == trace

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
    seen = barrier(mesh, "barrier-off")
    assert seen[before:] == ["barrier-off"], seen[before:]
    assert marked_routes(mesh.envoy) == [BARRIER_MARK]


def test_a_label_changes_only_that_services_chain_and_route(trafficmgr_build: Callable[..., BuildResult]) -> None:
    """Shared connection managers always carry the (filtered) access log, a redirected outbound chain
    only while its destination is labeled: ``on`` changes only the labeled Service's chain and route
    (its metadata); ``off`` and an invalid value change nothing, the latter with an InvalidTrafficLabel
    warning."""
    def resources(result: BuildResult) -> dict[tuple[str, str, str], bytes]:
        return {(view, type_url, name): res.message().SerializeToString(deterministic=True)
                for view, snap in result.snapshots.items() for type_url, ts in snap.types.items()
                for name, res in ts.resources.items()}

    def logging_chains(result: BuildResult, listener: str) -> list[str]:
        return [c.get("name", "") for c in result.sidecar.listeners[listener].get("filter_chains", [])
                if '"access_log"' in json.dumps(c)]

    base = trafficmgr_build(WEB_API)
    assert base.warnings == []
    assert logging_chains(base, "outbound") == []
    assert logging_chains(base, "inbound") == ["inbound|http|9080"]  # shared by every sidecar: always there
    off = WEB_API.replace("labels: {traffic.port.9080: http}}\nspec: {selector: {app: web}",
                          "labels: {traffic.port.9080: http, traffic.accesslog: \"off\"}}\nspec: {selector: {app: web}")
    assert off != WEB_API
    result = trafficmgr_build(off)
    assert result.warnings == [] and resources(result) == resources(base)
    result = trafficmgr_build(off.replace('traffic.accesslog: "off"', 'traffic.accesslog: "yes"'))
    assert resources(result) == resources(base)
    [warning] = result.warnings
    assert INVALID_LABEL in warning and LABEL in warning and "one of off, on" in warning, warning
    result = trafficmgr_build(off.replace('traffic.accesslog: "off"', 'traffic.accesslog: "ON"'))  # case-insensitive
    assert result.warnings == []
    changed = sorted(k[2] for k, v in resources(result).items() if resources(base).get(k) != v)
    assert changed == ["outbound", "outbound|9080"], changed  # the outbound listener and port 9080's routes
    assert logging_chains(result, "outbound") == ["9080|default|web.outbound"]
    base_chains = {c["name"]: c for c in base.sidecar.listeners["outbound"]["filter_chains"]}
    for c in result.sidecar.listeners["outbound"]["filter_chains"]:
        assert c["name"] == "9080|default|web.outbound" or c == base_chains[c["name"]], c["name"]
    vhosts = {vh["name"]: vh for vh in result.sidecar.routes["outbound|9080"]["virtual_hosts"]}
    assert vhosts["web.default:9080"]["routes"][0]["metadata"]["filter_metadata"][NAMESPACE] == {
        "destination": "Service/default/web"}
    assert "metadata" not in vhosts["api.default:9080"]["routes"][0]
    assert vhosts["api.default:9080"] == {vh["name"]: vh for vh in base.sidecar.routes["outbound|9080"]["virtual_hosts"]}[
        "api.default:9080"]


def test_invalid_value_logs_nothing(trafficmgr_envoy: Callable[..., SidecarMesh]) -> None:
    mesh = trafficmgr_envoy(WEB_API + "---" + BARRIER)
    mesh.label("service", "web", {LABEL: "yes"})
    assert mesh.build is not None
    assert [w for w in mesh.build.warnings if INVALID_LABEL in w and LABEL in w], mesh.build.warnings
    assert mesh.get("web", "/", headers={"x-request-id": "rid-bad"}).status == 200
    assert barrier(mesh, "barrier-bad") == ["barrier-bad"]
    assert marked_routes(mesh.envoy) == [BARRIER_MARK]


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
apiVersion: v1
kind: Service
metadata: {{name: logged, labels: {{traffic.accesslog: "on"}}}}
spec: {{selector: {{app: logged}}, ports: [{{port: 80, targetPort: {logged_port}}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: logged-1, labels: {{app: logged}}}}
spec: {{containers: [{{name: app, image: logged}}]}}
status: {{phase: Running, podIP: {logged_ip}, podIPs: [{{ip: {logged_ip}}}], conditions: [{{type: Ready, status: "True"}}]}}
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
      - {{path: /logged, pathType: Prefix, backend: {{service: {{name: logged, port: {{number: 80}}}}}}}}
"""


def test_gateway_logs_routes_to_the_labeled_service(trafficmgr_gateway: Callable[..., Any]) -> None:
    gw = trafficmgr_gateway(plugins=["ingress", "accesslog"])
    web = gw.backend("web-1", "127.0.0.71", 0)
    api = gw.backend("api-1", "127.0.0.72", 0)
    logged_backend = gw.backend("logged-1", "127.0.0.73", 0)  # the barrier (see the module docstring)
    gw.apply(GATEWAY_MANIFESTS.format(web_port=web.port, api_port=api.port, web_ip=web.host, api_ip=api.host,
                                      logged_port=logged_backend.port, logged_ip=logged_backend.host))
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

    attempts = iter(range(1000))

    def quiet() -> bool:
        # The label reaches the gateway asynchronously: retried until a request to web logs nothing.
        k = next(attempts)
        assert gw.get(f"/web/z{k}", host="shop.example")[0] == 200
        assert gw.get(f"/logged/{k}", host="shop.example")[0] == 200  # the barrier
        gw.wait_config(lambda: by_path(f"/logged/{k}"), message=f"no line for the barrier /logged/{k}")
        return by_path(f"/web/z{k}") is None

    gw.wait_config(quiet, timeout=15, message="the gateway still logs with an invalid label value")


LOCAL_IPS = {"web-1": "127.0.91.11", "api-1": "127.0.91.12"}
LOCAL_CLIENT_IP = "127.0.91.60"


def test_local_mode_explicit_proxy_and_the_proxies_command(trafficmgr_build: Callable[..., BuildResult],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Local mode's sidecars (the ``local`` runtime, as ``trafficmgr demo`` runs them: Envoy's stdout is its
    log file) log explicit proxy requests to a labeled Service; ``trafficmgr proxies --access-log`` prints
    exactly those lines."""
    from trafficmgr import cli
    from trafficmgr.core.agent.agent import AgentConfig, sidecar_bootstrap
    from trafficmgr.core.agent.local_runtime import PROXY_PORT, LocalRuntime
    from trafficmgr.core.agent.runtime import PodRef, SidecarSpec
    from trafficmgr.core.model import SIDECAR
    from trafficmgr.testing.backends import HttpBackend
    from trafficmgr.testing.envoy import ControlPlane, free_port, wait_for

    backends = {name: HttpBackend(name, ip, 0).start() for name, ip in LOCAL_IPS.items()}
    manifests = WEB_API.replace("labels: {traffic.port.9080: http}}\nspec: {selector: {app: web}",
                                "labels: {traffic.port.9080: http, traffic.accesslog: \"on\"}}\nspec: {selector: {app: web}")
    for name, b in backends.items():
        manifests = manifests.replace(
            f"metadata: {{name: {name}, labels: {{app: {name[:3]}}}}}\nspec: {{containers: [{{name: app, image: {name[:3]}}}]}}",
            f"metadata: {{name: {name}, labels: {{app: {name[:3]}}}}}\nspec: {{containers: [{{name: app, image: {name[:3]}}}]}}\n"
            f"status: {{phase: Running, podIP: {b.host}, podIPs: [{{ip: {b.host}}}], conditions: [{{type: Ready, status: \"True\"}}]}}")
    manifests = manifests.replace("ports: [{port: 9080}]", "ports: [{port: 9080, targetPort: PORT}]")
    manifests = manifests.replace("targetPort: PORT}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: api",
                                  f"targetPort: {backends['web-1'].port}}}]}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: api", 1)
    manifests = manifests.replace("targetPort: PORT", f"targetPort: {backends['api-1'].port}")
    result = trafficmgr_build(manifests, options={"explicit_proxy": True})
    assert result.warnings == []
    cp = ControlPlane().start()
    pod = PodRef("client-2", "default", "uid-c2", LOCAL_CLIENT_IP)
    cp.nodes[pod.node_id] = SIDECAR
    cp.cache.set_view(SIDECAR, result.snapshots[SIDECAR])
    state_dir = tempfile.mkdtemp(prefix="tm-accesslog-")
    runtime = LocalRuntime(state_dir)
    config = sidecar_bootstrap(pod, AgentConfig("n", f"127.0.0.1:{cp.port}", admin_port=free_port(), stats_port=0),
                               own_netns=False)
    sidecar = runtime.start(SidecarSpec(pod, config), runtime.pod_network(pod))
    try:
        def via_proxy(service: str, request_id: str) -> int:
            conn = http.client.HTTPConnection(LOCAL_CLIENT_IP, PROXY_PORT, timeout=5)
            try:
                conn.request("GET", f"http://{service}:9080/local?x=1", headers={"x-request-id": request_id})
                resp = conn.getresponse()
                resp.read()
                return resp.status
            finally:
                conn.close()

        def logged() -> list[str] | None:
            with contextlib.suppress(OSError):
                if via_proxy("api", "local-api") == 200:
                    via_proxy("web", "local-web")
            found = [x for x in access_lines(runtime.logs(sidecar)) if '"local-web"' in x]
            return found or None

        wait_for(logged, 20, message=f"the local sidecar never logged an explicit proxy request: {runtime.logs(sidecar)[-3000:]}")
        base = ("proxies", "--runtime", "local", "--state-dir", state_dir)
        assert cli.main([*base, "--access-log"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out and all(x.startswith("default/client-2 {") for x in out), out
        rows = [json.loads(x.split(" ", 1)[1]) for x in out]
        web = next(r for r in rows if r["request_id"] == "local-web")
        assert web["direction"] == "outbound" and web["destination"] == "Service/default/web" and web["status"] == 200
        assert web["authority"] == "web:9080" and web["path"] == "/local?x=1"
        assert web["upstream_host"] == f"{backends['web-1'].host}:{backends['web-1'].port}"
        assert not [r for r in rows if r["request_id"] == "local-api"]  # the unlabeled Service
        # The whole log has Envoy's own lines too; --access-log leaves them out. --id and --tail:
        assert len(runtime.logs(sidecar).splitlines()) > len(out)
        assert cli.main([*base, "--id", sidecar.id[:8], "--access-log", "--tail", "1"]) == 0
        [last] = capsys.readouterr().out.splitlines()
        assert json.loads(last)["log"] == LOG_TYPE
        assert cli.main([*base, "--id", sidecar.id[:8], "--access-log", "--log"]) == 1
        assert "--access-log cannot be combined" in capsys.readouterr().err
    finally:
        runtime.remove(sidecar)
        cp.stop()
        for b in backends.values():
            b.stop()
        shutil.rmtree(state_dir, ignore_errors=True)


def test_access_lines_picks_only_access_log_objects() -> None:
    text = "\n".join([
        "[2026-12-07 04:00:00.000][1][info][main] starting",
        '{"log":"trafficmgr.accesslog/v1","status":200}',
        '{"log":"something else","status":200}',
        '{"status":200}',
        '["trafficmgr.accesslog/v1"]',
        '{"log":"trafficmgr.accesslog/v2","status":201}  ',
        '{"log":"trafficmgr.accesslog/v1","status":',  # still being written
    ])
    assert access_lines(text) == ['{"log":"trafficmgr.accesslog/v1","status":200}', '{"log":"trafficmgr.accesslog/v2","status":201}']
