"""The API server's own request-head parser (``_Handler.parse_request``): what http.server answered, and
400 for header lines RFC 9112 lets a server refuse."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator

import pytest

from trafficmgr.apiserver import APIServer


@pytest.fixture(scope="module")
def plain() -> Iterator[APIServer]:
    srv = APIServer(token=None).start()  # plain HTTP: the raw requests below need no TLS
    yield srv
    srv.stop()


def _raw(srv: APIServer, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1]), data


def test_pipelined_requests_on_one_connection(plain: APIServer) -> None:
    """Two requests sent back to back on one keep-alive connection get two answers, in order."""
    body = b'{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"piped"}}'
    post = (b"POST /api/v1/namespaces/default/configmaps HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    get = b"GET /api/v1/namespaces/default/configmaps/piped HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", plain.port), timeout=10) as s:
        s.sendall(post + get)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", data)
    assert statuses == [b"201", b"200"], data[:500]


@pytest.mark.parametrize("line", [b"NoColonHere", b"Bad Name: x", b" folded: continuation", b"Host : 127.0.0.1"])
def test_malformed_header_lines_are_refused(plain: APIServer, line: bytes) -> None:
    code, _ = _raw(plain, b"GET /version HTTP/1.1\r\nHost: 127.0.0.1\r\n" + line + b"\r\n\r\n")
    assert code == 400


def test_too_many_or_too_long_headers(plain: APIServer) -> None:
    many = b"".join(b"X-%d: y\r\n" % i for i in range(101))
    assert _raw(plain, b"GET /version HTTP/1.1\r\nHost: 127.0.0.1\r\n" + many + b"\r\n")[0] == 431
    long = b"X-Long: " + b"a" * 70000 + b"\r\n"
    assert _raw(plain, b"GET /version HTTP/1.1\r\nHost: 127.0.0.1\r\n" + long + b"\r\n")[0] == 431


def test_header_lookups_are_case_insensitive_and_repeated_hosts_refused(plain: APIServer) -> None:
    assert _raw(plain, b"GET /version HTTP/1.1\r\nhOsT: 127.0.0.1\r\nConnection: close\r\n\r\n")[0] == 200
    # two Host headers: refused as before (the DNS-rebinding check sees both)
    assert _raw(plain, b"GET /version HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n\r\n")[0] == 403
    # an HTTP/2 request line: 505, written as http.server writes it (no status line: the version was refused)
    with socket.create_connection(("127.0.0.1", plain.port), timeout=10) as s:
        s.sendall(b"GET /version HTTP/2.0\r\nHost: 127.0.0.1\r\n\r\n")
        assert b"Error code: 505" in s.recv(65536)
