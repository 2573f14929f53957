"""accesslog plugin, the pod side and identities: a Pod labeled ``traffic.accesslog=on`` has its own sidecar
log the requests arriving at it (the shared ``inbound`` listener, selected by node id), with the caller's
SPIFFE id when the call came over mutual TLS; a labeled Service's client sidecar logs the server's id.
Two sidecar pods in network namespaces (as ``tests/plugins/test_mtls.py``), ``serve --mtls``."""

from __future__ import annotations

import argparse
import json
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.plugins.test_mtls import CLIENT_ID, DRAIN, PLAIN_IP, SERVER_IP, TD
from trafficmgr.plugins.accesslog import LABEL, LOG_TYPE, access_lines
from trafficmgr.testing.cluster import LocalCluster, SidecarPod
from trafficmgr.testing.envoy import wait_for
from trafficmgr.testing.manifests import join, service
from trafficmgr.testing.mesh import MeshTestCA, meshed_pod
from trafficmgr.testing.netns import require as _require_netns

SERVER_ID = f"spiffe://{TD}/ns/default/sa/web"


def flush(pod: SidecarPod) -> None:
    """Have the sidecar write its buffered stdout now (``POST /reopen_logs`` on its admin, inside the pod's
    namespace); left alone Envoy writes its access log every 10 s."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(f"http://127.0.0.1:{pod.admin_port}/reopen_logs", method="POST")
    pod.in_ns(lambda: opener.open(req, timeout=3).read())


def lines(pod: SidecarPod) -> list[dict[str, Any]]:
    """The access-log lines in a sidecar's output (its ``envoy.log``: stdout and stderr), after a
    :func:`flush`: every line of a request that ended before this call."""
    flush(pod)
    text = pod.log_path.read_text(errors="replace") if pod.log_path.exists() else ""
    return [json.loads(x) for x in access_lines(text)]


def line_of(pod: SidecarPod, request_id: str) -> dict[str, Any] | None:
    return next((x for x in lines(pod) if x.get("request_id") == request_id), None)


@pytest.fixture(scope="module")
def mesh(envoy_binary: str) -> Iterator[tuple[LocalCluster, SidecarPod, Any]]:
    _require_netns()
    ca = MeshTestCA()
    options = argparse.Namespace(mtls=True, trust_domain=TD)
    with LocalCluster([PLAIN_IP], options=options, client_cwd=ca.identity_dir(CLIENT_ID)) as c:
        c.apply(join(meshed_pod("web-1", SERVER_IP, "web", "web"),
                     service("web", port=8080, labels={"traffic.port.8080": "http"})))
        server = c.peer_pod("web-1", SERVER_IP, cwd=ca.identity_dir(SERVER_ID), envoy_args=DRAIN)
        web = c.peer_backend(server, "web", 8080)
        c.wait_config(lambda: "inbound|mtls|http|8080" in server.listener_config("inbound"), timeout=15,
                      message="the server sidecar has no TLS chains")
        yield c, server, web


def get(c: LocalCluster, request_id: str, path: str = "/hello") -> int:
    assert c.pod is not None
    [(status, _)] = c.pod.get_many(c.cluster_ip("web"), 8080, "web:8080", 1, path, {"x-request-id": request_id}, timeout=10)
    return status


def test_pod_label_logs_inbound_on_its_own_sidecar_with_the_callers_identity(
        mesh: tuple[LocalCluster, SidecarPod, Any]) -> None:
    c, server, web = mesh
    assert c.pod is not None
    client = c.pod
    c.label("pod", "web-1", {LABEL: "on"})
    c.wait_config(lambda: "web-1.default" in server.listener_config("inbound"), timeout=15,
                  message="the inbound listener does not list the labeled pod")

    def logged() -> dict[str, Any] | None:
        return line_of(server, "in-1") if get(c, "in-1") == 200 else None

    # Listener updates reach kept connections after the drain: retry with the same id until one is logged.
    line = wait_for(logged, 15, message="the server's sidecar never logged an inbound request")
    assert line["log"] == LOG_TYPE and line["direction"] == "inbound" and line["destination"] is None
    assert line["method"] == "GET" and line["path"] == "/hello" and line["status"] == 200
    assert line["authority"] == "web:8080" and line["request_id"] == "in-1"  # the caller's id is kept inbound
    assert line["upstream_cluster"] == "inbound|passthrough" and line["upstream_host"] == f"{SERVER_IP}:8080"
    assert line["peer_identity"] == CLIENT_ID  # the mTLS peer (URI SAN of the client sidecar's certificate)
    assert line["bytes_sent"] > 0 and web.requests[-1]["path"] == "/hello"
    # The client's sidecar has the same (shared) inbound listener, but it is not a labeled pod's; and
    # the Service is not labeled, so its outbound side logs nothing either.
    assert lines(client) == []

    # The Service labeled too: the client sidecar logs its outbound request, with the server's identity.
    c.label("service", "web", {LABEL: "on"})
    wait_for(lambda: get(c, "both-1") == 200 and line_of(client, "both-1"), 15, message="the client never logged")
    out = line_of(client, "both-1")
    assert out is not None and out["direction"] == "outbound" and out["destination"] == "Service/default/web"
    assert out["upstream_identity"] == SERVER_ID and out["peer_identity"] is None  # the app's side is plaintext
    assert out["upstream_host"] == f"{SERVER_IP}:8080" and out["status"] == 200
    inbound = wait_for(lambda: line_of(server, "both-1"), 10, message="no inbound line for both-1")
    assert inbound["peer_identity"] == CLIENT_ID

    # Both labels removed: neither sidecar logs.
    c.label("pod", "web-1", {LABEL: None})
    c.label("service", "web", {LABEL: None})
    c.wait_config(lambda: "web-1.default" not in server.listener_config("inbound"), timeout=15,
                  message="the inbound listener still lists the pod")

    def quiet() -> bool:
        # Connections accepted before the change keep their old chains until drained (2 s): a request on
        # one may still log; once a request adds no line on either side, the change is in force.
        n_server, n_client = len(lines(server)), len(lines(client))
        get(c, "after-1")
        time.sleep(2.5)  # for the inbound side's line (written when its stream ends, maybe after the answer)
        return len(lines(server)) == n_server and len(lines(client)) == n_client

    wait_for(quiet, 20, message="a sidecar still logs after the labels were removed")
