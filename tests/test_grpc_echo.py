"""The gRPC echo app (trafficmgr.apps.grpc_echo), called the way any client would: grpcio's own channel on
the documented method paths with raw bytes, and the standard health service, on loopback only."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from trafficmgr import cli
from trafficmgr.apps.grpc_echo import ECHO_METHOD, SERVICE, STREAM_METHOD, GrpcEchoServer
from trafficmgr.testing.envoy import free_port, wait_for

#: grpcio honours http_proxy and friends; these calls are to loopback, never through a proxy.
NO_PROXY = [("grpc.enable_http_proxy", 0)]


@pytest.fixture
def app() -> Iterator[GrpcEchoServer]:
    with GrpcEchoServer("127.0.0.1", 0, pod_name="echo-pod-1") as server:
        yield server


@pytest.fixture
def channel(app: GrpcEchoServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(app.target, options=NO_PROXY) as ch:
        yield ch


def health_status(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target, options=NO_PROXY) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status


def test_unary_echo_answers_the_request_bytes_with_the_pod_name(channel: grpc.Channel) -> None:
    echo = channel.unary_unary(ECHO_METHOD)
    payload = bytes(range(256)) * 10
    reply, call = echo.with_call(payload, timeout=5)
    assert reply == payload
    assert ("x-pod", "echo-pod-1") in call.initial_metadata()
    assert call.code() == grpc.StatusCode.OK
    assert echo(b"", timeout=5) == b""


def test_server_stream_sends_count_messages_interval_apart(channel: grpc.Channel) -> None:
    stream = channel.unary_stream(STREAM_METHOD)
    call = stream(b"tick", metadata=(("x-count", "3"), ("x-interval-ms", "200")), timeout=10)
    assert ("x-pod", "echo-pod-1") in call.initial_metadata()
    times = []
    for message in call:
        assert message == b"tick"
        times.append(time.monotonic())
    assert len(times) == 3 and call.code() == grpc.StatusCode.OK
    assert times[-1] - times[0] >= 0.35  # two intervals of 200 ms (timer slack allowed for)


def test_stream_defaults_and_bounds(channel: grpc.Channel) -> None:
    stream = channel.unary_stream(STREAM_METHOD)
    start = time.monotonic()
    assert list(stream(b"d", timeout=10)) == [b"d"] * 3  # 3 messages, 100 ms apart
    assert time.monotonic() - start >= 0.18
    assert list(stream(b"z", metadata=(("x-count", "0"),), timeout=5)) == []
    assert len(list(stream(b"m", metadata=(("x-count", "500"), ("x-interval-ms", "0")), timeout=10))) == 500
    for key, value in (("x-count", "10001"), ("x-count", "-1"), ("x-count", "three"), ("x-interval-ms", "60001")):
        with pytest.raises(grpc.RpcError) as info:
            list(stream(b"x", metadata=((key, value),), timeout=5))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (key, value)
        assert key in (info.value.details() or "")


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  grpc.StatusCode.UNAUTHENTICATED])
def test_fail_code_aborts_echo_with_that_status(channel: grpc.Channel, code: grpc.StatusCode) -> None:
    echo = channel.unary_unary(ECHO_METHOD)
    with pytest.raises(grpc.RpcError) as info:
        echo.with_call(b"x", metadata=(("x-fail-code", str(code.value[0])),), timeout=5)
    assert info.value.code() == code
    assert "echo-pod-1" in (info.value.details() or "")
    assert ("x-pod", "echo-pod-1") in info.value.initial_metadata()  # type: ignore[attr-defined]


def test_fail_code_zero_answers_and_bad_values_are_invalid_argument(channel: grpc.Channel) -> None:
    echo = channel.unary_unary(ECHO_METHOD)
    assert echo(b"ok", metadata=(("x-fail-code", "0"),), timeout=5) == b"ok"
    for value in ("17", "UNAVAILABLE", ""):
        with pytest.raises(grpc.RpcError) as info:
            echo(b"x", metadata=(("x-fail-code", value),), timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, value


def test_unknown_method_is_unimplemented(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as info:
        channel.unary_unary(f"/{SERVICE}/Nope")(b"", timeout=5)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_health_service_serving(app: GrpcEchoServer) -> None:
    assert health_status(app.target) == health_pb2.HealthCheckResponse.SERVING
    assert health_status(app.target, SERVICE) == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as info:
        health_status(app.target, "no.such.Service")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_stop_ends_a_waiting_stream_and_frees_the_port() -> None:
    app = GrpcEchoServer("127.0.0.1", 0, pod_name="p").start()
    with grpc.insecure_channel(app.target, options=NO_PROXY) as ch:
        call = ch.unary_stream(STREAM_METHOD)(b"s", metadata=(("x-count", "5"), ("x-interval-ms", "60000")), timeout=30)
        assert next(call) == b"s"
        start = time.monotonic()
        app.stop(0.2)
        assert time.monotonic() - start < 5
        with pytest.raises(grpc.RpcError):
            list(call)
    with GrpcEchoServer("127.0.0.1", app.port, pod_name="again") as again:
        assert health_status(again.target) == health_pb2.HealthCheckResponse.SERVING


def test_a_taken_port_is_an_error_not_a_shared_port(app: GrpcEchoServer, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(OSError):
        GrpcEchoServer("127.0.0.1", app.port).start()
    assert cli.main(["grpc-echo", "--address", "127.0.0.1", "--port", str(app.port)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"trafficmgr: error: cannot listen on 127.0.0.1:{app.port}"), err


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}


@pytest.mark.parametrize("entry", [["trafficmgr", "grpc-echo"], ["trafficmgr.apps.grpc_echo"]], ids=["cli", "module"])
def test_command_serves_until_sigterm(entry: list[str]) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", *entry, "--address", "127.0.0.1", "--port", str(port), "--pod-name", "cli-pod"],
                            stderr=subprocess.PIPE, text=True, env=_env())
    try:
        assert f"127.0.0.1:{port}" in (proc.stderr.readline() if proc.stderr else "")
        target = f"127.0.0.1:{port}"
        assert health_status(target) == health_pb2.HealthCheckResponse.SERVING
        with grpc.insecure_channel(target, options=NO_PROXY) as ch:
            reply, call = ch.unary_unary(ECHO_METHOD).with_call(b"hi", timeout=5)
        assert reply == b"hi" and ("x-pod", "cli-pod") in call.initial_metadata()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_pod_name_defaults_to_pod_name_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAME", "from-env")
    assert GrpcEchoServer("127.0.0.1", 0).pod_name == "from-env"
    monkeypatch.delenv("POD_NAME")
    monkeypatch.setenv("HOSTNAME", "from-hostname")
    assert GrpcEchoServer("127.0.0.1", 0).pod_name == "from-hostname"


def test_local_mode_pods_listen_on_their_own_pod_ip(tmp_path: Path) -> None:
    """As the local kubelet runs a container (``trafficmgr.cli.container``): ``--address 0.0.0.0`` (the
    default) binds the pod IP, so two pods of a Deployment share the port on their own addresses."""
    port = free_port()
    procs = []
    try:
        for ip in ("127.0.31.1", "127.0.31.2"):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "trafficmgr.cli.container", "--ip", ip, "--dir", str(tmp_path), "--",
                 "grpc-echo", "--port", str(port)], stderr=subprocess.PIPE, text=True, env={**_env(), "POD_NAME": f"pod-{ip}"}))
        for ip in ("127.0.31.1", "127.0.31.2"):
            wait_for(lambda ip=ip: health_status(f"{ip}:{port}") == health_pb2.HealthCheckResponse.SERVING, 15,
                     message=f"grpc-echo not serving on {ip}:{port}")
            with grpc.insecure_channel(f"{ip}:{port}", options=NO_PROXY) as ch:
                _, call = ch.unary_unary(ECHO_METHOD).with_call(b"x", timeout=5)
            assert ("x-pod", f"pod-{ip}") in call.initial_metadata()
        with pytest.raises(grpc.RpcError):  # nothing on 0.0.0.0, so nothing on 127.0.0.1
            health_status(f"127.0.0.1:{port}")
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        assert [proc.wait(10) for proc in procs] == [0, 0]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
