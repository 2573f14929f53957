"""The WebSocket echo app (trafficmgr.apps.ws_echo), called with the ``websockets`` client and plain HTTP,
on loopback only."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from trafficmgr import cli
from trafficmgr.apps.ws_echo import WsEchoServer
from trafficmgr.testing.envoy import free_port, wait_for


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Newer websockets clients honour the proxy variables; these connections are to loopback."""
    for key in list(os.environ):
        if key.lower().endswith("_proxy"):
            monkeypatch.delenv(key)


@pytest.fixture
def app() -> Iterator[WsEchoServer]:
    with WsEchoServer("127.0.0.1", 0, pod_name="ws-pod-1") as server:
        yield server


def test_hello_then_text_and_binary_echo(app: WsEchoServer) -> None:
    with connect(app.url, open_timeout=5) as ws:
        assert ws.recv(timeout=5) == "hello from ws-pod-1"
        ws.send("ping ü")
        assert ws.recv(timeout=5) == "ping ü"  # text stays text
        ws.send(b"\x00\xffbinary")
        assert ws.recv(timeout=5) == b"\x00\xffbinary"  # binary stays binary
        big = os.urandom(512 * 1024)
        ws.send(big)
        assert ws.recv(timeout=5) == big
        for i in range(20):
            ws.send(f"m{i}")
        assert [ws.recv(timeout=5) for _ in range(20)] == [f"m{i}" for i in range(20)]
    assert app.connections == 1


def test_any_path_and_concurrent_connections(app: WsEchoServer) -> None:
    with connect(app.url + "/some/path?x=1", open_timeout=5) as a, connect(app.url + "/", open_timeout=5) as b:
        assert a.recv(timeout=5) == b.recv(timeout=5) == "hello from ws-pod-1"
        a.send("to a")
        b.send("to b")
        assert (a.recv(timeout=5), b.recv(timeout=5)) == ("to a", "to b")


def test_plain_http_gets_426(app: WsEchoServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=5)
    conn.request("GET", "/")
    resp = conn.getresponse()
    body = resp.read().decode()
    conn.close()
    assert resp.status == 426
    assert (resp.getheader("Upgrade") or "").lower() == "websocket"
    assert "WebSocket" in body


def test_stop_closes_open_connections_with_going_away() -> None:
    app = WsEchoServer("127.0.0.1", 0, pod_name="p").start()
    with connect(app.url, open_timeout=5) as ws:
        assert ws.recv(timeout=5) == "hello from p"
        app.stop()
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=5)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001
    with WsEchoServer("127.0.0.1", app.port, pod_name="again") as again, connect(again.url, open_timeout=5) as ws:
        assert ws.recv(timeout=5) == "hello from again"


def test_a_taken_port_is_an_error(app: WsEchoServer, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(OSError):
        WsEchoServer("127.0.0.1", app.port).start()
    assert cli.main(["ws-echo", "--address", "127.0.0.1", "--port", str(app.port)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"trafficmgr: error: cannot listen on 127.0.0.1:{app.port}"), err


@pytest.mark.parametrize("entry", [["trafficmgr", "ws-echo"], ["trafficmgr.apps.ws_echo"]], ids=["cli", "module"])
def test_command_serves_until_sigterm(entry: list[str]) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", *entry, "--address", "127.0.0.1", "--port", str(port), "--pod-name", "cli-pod"],
                            stderr=subprocess.PIPE, text=True)
    try:
        assert f"127.0.0.1:{port}" in (proc.stderr.readline() if proc.stderr else "")
        with connect(f"ws://127.0.0.1:{port}/chat", open_timeout=5) as ws:
            assert ws.recv(timeout=5) == "hello from cli-pod"
            ws.send("x")
            assert ws.recv(timeout=5) == "x"
            proc.send_signal(signal.SIGTERM)  # with a connection open: closed with 1001, then exit 0
            assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_local_mode_pod_listens_on_its_pod_ip(tmp_path: Path) -> None:
    """Run as the local kubelet runs a container: the default ``--address 0.0.0.0`` binds the pod IP."""
    port, ip = free_port(), "127.0.31.9"
    proc = subprocess.Popen([sys.executable, "-m", "trafficmgr.cli.container", "--ip", ip, "--dir", str(tmp_path), "--",
                             "ws-echo", "--port", str(port)], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "POD_NAME": "ws-echo-abc"})
    try:
        def hello() -> str:
            with connect(f"ws://{ip}:{port}", open_timeout=2) as ws:
                return str(ws.recv(timeout=2))

        assert wait_for(hello, 15, message="ws-echo not serving on the pod IP") == "hello from ws-echo-abc"
        with pytest.raises(OSError):
            connect(f"ws://127.0.0.1:{port}", open_timeout=2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
