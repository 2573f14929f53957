"""``--discover``'s transport: HTTP to each replica's admin endpoint through the API server's
``pods/portforward`` websocket (the official client's ``kubernetes.stream.portforward``).

No kube-apiserver can run here and the project's API server has no port-forward, so a stand-in speaks the
port-forward protocol as kube-apiserver (with the kubelet behind it) does: websocket subprotocol
``v4.channel.k8s.io``, a data and an error channel per port, each opened with a frame carrying the port
number (little-endian), data frames prefixed by their channel byte, an error text on the error channel
when the pod's port refuses, HTTP 404 (a ``Status``) for an unknown pod. Behind it are real admin
endpoints (``AdminServer``), one per "pod". tests/test_cli_replicas.py covers discovery against the
project's API server (and its 404 for port-forward).
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Iterator
from http import HTTPStatus
from typing import Any

import pytest
from kubernetes import client as k8s
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.sync.server import Server, ServerConnection, serve

from tests.test_cli_replicas import State, _stream
from trafficmgr.cli import replicas
from trafficmgr.core.admin import AdminServer
from trafficmgr.testing.envoy import free_port

_PATH = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/portforward\?ports=(\d+)$")


class PortForwardStandIn:
    """The ``pods/{name}/portforward`` websocket of an API server, for ``pods``: pod name -> the local
    port its admin endpoint really listens on (the pod's port in the request is ignored, as a pod's
    loopback is not ours)."""

    def __init__(self, pods: dict[str, int]) -> None:
        self.pods = pods
        self.requests: list[str] = []
        self.server: Server = serve(self._handle, "127.0.0.1", 0, subprotocols=["v4.channel.k8s.io"],  # type: ignore[list-item]
                                    process_request=self._check,
                                    close_timeout=0.5)  # the client answers no close frame: do not wait 10 s
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.socket.getsockname()[1]}"

    def _check(self, connection: ServerConnection, request: Request) -> Response | None:
        self.requests.append(request.path)
        m = _PATH.match(request.path)
        if m is None or m.group(2) not in self.pods:
            body = (b'{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",'
                    b'"message":"pods \\"%s\\" not found","reason":"NotFound","code":404}' % (m.group(2).encode() if m else b"?"))
            headers = Headers({"Content-Type": "application/json", "Content-Length": str(len(body))})
            return Response(HTTPStatus.NOT_FOUND, "Not Found", headers, body)
        return None

    def _handle(self, ws: ServerConnection) -> None:
        m = _PATH.match(ws.request.path if ws.request else "")
        assert m is not None
        pod, port = m.group(2), int(m.group(3))
        opening = port.to_bytes(2, "little")
        ws.send(b"\x00" + opening)
        ws.send(b"\x01" + opening)
        try:
            upstream = socket.create_connection(("127.0.0.1", self.pods[pod]), timeout=5)
        except OSError as exc:
            ws.send(b"\x01" + f"error forwarding port {port} to pod {pod}: {exc.strerror}".encode())
            ws.close()
            return

        def pump() -> None:
            try:
                while data := upstream.recv(65536):
                    ws.send(b"\x00" + data)
            except OSError:
                pass
            ws.close()

        threading.Thread(target=pump, daemon=True).start()
        try:
            for message in ws:
                assert isinstance(message, bytes) and message[:1] == b"\x00", message
                upstream.sendall(message[1:])
        except (ConnectionClosed, OSError):
            pass
        finally:
            upstream.close()

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(5)


@pytest.fixture
def admins() -> Iterator[dict[str, Any]]:
    a = AdminServer(State("trafficmgr-0", [_stream("web-1.default")]), port=0)  # type: ignore[arg-type]
    b = AdminServer(State("trafficmgr-1", [_stream("api-1.default"), _stream("db-1.default")]), port=0)  # type: ignore[arg-type]
    a.start()
    b.start()
    stand_in = PortForwardStandIn({"trafficmgr-0": a.port, "trafficmgr-1": b.port, "trafficmgr-2": free_port()})
    configuration = k8s.Configuration()
    configuration.host = stand_in.url
    try:
        yield {"stand_in": stand_in, "api": k8s.ApiClient(configuration)}
    finally:
        stand_in.stop()
        a.stop()
        b.stop()


def test_each_replica_through_its_port_forward(admins: dict[str, Any]) -> None:
    targets = [replicas.Target(name=f"trafficmgr-{i}", namespace="traffic-system", pod=f"trafficmgr-{i}", port=18080)
               for i in range(4)]
    asker = replicas.Asker(timeout=5, api_client=admins["api"])
    answers = asker.get_all(targets, "/debug/proxy-status")
    rows = replicas.merge_status(answers)
    assert [(r["node_id"], r["replica"]) for r in rows] == [
        ("api-1.default", "trafficmgr-1"), ("db-1.default", "trafficmgr-1"), ("web-1.default", "trafficmgr-0")]
    assert [a.replica for a in answers[:2]] == ["trafficmgr-0", "trafficmgr-1"], "named by the Trafficmgr-Replica header"
    # trafficmgr-2's admin port refuses: the error channel's text
    assert str(answers[2].error) == ("cannot reach the admin endpoint of pod traffic-system/trafficmgr-2 port 18080 "
                                     "(through the API server's port-forward): error forwarding port 18080 to pod "
                                     "trafficmgr-2: Connection refused")
    # trafficmgr-3 does not exist: the API server's 404, in one line
    assert str(answers[3].error) == ("cannot port-forward to pod traffic-system/trafficmgr-3 port 18080 (through the API "
                                     "server's port-forward): HTTP 404: pods \"trafficmgr-3\" not found")
    assert sorted(admins["stand_in"].requests) == sorted(
        f"/api/v1/namespaces/traffic-system/pods/trafficmgr-{i}/portforward?ports=18080" for i in range(4))

    # config-dump's second request, and a query string, go through a new port-forward too
    answer = asker.get(targets[1], "/debug/config-dump", {"node_id": "db-1.default"})
    assert answer.error is None and answer.data["node_id"] == "db-1.default" and answer.data["replica"] == "trafficmgr-1"
