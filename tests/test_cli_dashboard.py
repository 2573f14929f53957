"""``trafficmgr dashboard`` against a real admin endpoint (``AdminServer`` with its real routes, a state that
only has dashboard data): the printed URL, one-line errors, and the token-adding local proxy (what it
forwards, what it refuses)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pytest

from trafficmgr import cli
from trafficmgr.cli.dashboard import DashboardProxy
from trafficmgr.core.admin import AdminServer
from trafficmgr.dashboard import DATA_PATH, PAGE_PATH
from trafficmgr.testing.envoy import free_port

TOKEN = "s3cret-token-0123456789"
DATA = {"generated": 1796601600, "source": "envoy-stats", "window_s": 10, "services": [], "edges": [],
        "proxies": [], "events": [], "routes": []}


class _State:
    """What the admin routes under test read: the dashboard document."""

    def dashboard_data(self) -> dict[str, Any]:
        return DATA


@pytest.fixture
def admin() -> Iterator[AdminServer]:
    with AdminServer(_State(), "127.0.0.1", 0) as srv:  # type: ignore[arg-type]
        yield srv


@pytest.fixture
def admin_with_token() -> Iterator[AdminServer]:
    with AdminServer(_State(), "127.0.0.1", 0, token=TOKEN) as srv:  # type: ignore[arg-type]
        yield srv


@pytest.fixture
def token_file(tmp_path: Path) -> str:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return str(path)


def _get(port: int, path: str, host: str | None = None, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers={"Host": host or f"127.0.0.1:{port}"})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_prints_the_admin_url(admin: AdminServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["dashboard", "--no-browser", "--admin", f"127.0.0.1:{admin.port}"]) == 0
    assert capsys.readouterr().out == f"dashboard: http://127.0.0.1:{admin.port}{PAGE_PATH}\n"


@pytest.mark.parametrize(("argv", "error"), [
    (["--admin", "ftp://127.0.0.1:1"], "--admin must be an http(s) URL such as http://127.0.0.1:18080, not 'ftp://127.0.0.1:1'"),
    (["--admin", "127.0.0.1:99999"], "--admin has an invalid port"),
    (["--admin", "http://127.0.0.1:{closed}"], "cannot reach the trafficmgr admin endpoint at http://127.0.0.1:{closed}: "
                                               "connection refused (is 'trafficmgr serve' running? use --admin)"),
])
def test_bad_admin_urls(argv: list[str], error: str, capsys: pytest.CaptureFixture[str]) -> None:
    closed = free_port()
    argv = [a.format(closed=closed) for a in argv]
    assert cli.main(["dashboard", "--no-browser", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("trafficmgr: error: " + error.format(closed=closed)) and err.count("\n") == 1, err


def test_token_needed_and_refused(admin_with_token: AdminServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{admin_with_token.port}"
    assert cli.main(["dashboard", "--no-browser", "--admin", url]) == 1
    assert f"{url}{PAGE_PATH} needs a bearer token: give --token-file FILE" in capsys.readouterr().err
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token-0123456789")
    assert cli.main(["dashboard", "--no-browser", "--admin", url, "--token-file", str(wrong)]) == 1
    assert "the token in --token-file was refused" in capsys.readouterr().err
    assert cli.main(["dashboard", "--no-browser", "--admin", url, "--token-file", str(tmp_path / "nope")]) == 1
    assert "--token-file: cannot read" in capsys.readouterr().err


def test_no_dashboard_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    routes = {"/healthz": lambda s, q: (HTTPStatus.OK, "text/plain", b"ok")}
    with AdminServer(_State(), "127.0.0.1", 0, routes=routes) as srv:  # type: ignore[arg-type]
        assert cli.main(["dashboard", "--no-browser", "--admin", srv.url]) == 1
    assert "has no dashboard (/dashboard/ answers 404" in capsys.readouterr().err


def test_proxy_adds_the_token_and_forwards_only_the_dashboard(admin_with_token: AdminServer) -> None:
    proxy = DashboardProxy(admin_with_token.url, TOKEN)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        port = proxy.server_address[1]
        secret = proxy.secret
        # Loopback only: the proxy adds the token to what it forwards, so nothing off this host may reach it.
        assert proxy.server_address[0] == "127.0.0.1"
        assert proxy.url == f"http://127.0.0.1:{port}/{secret}{PAGE_PATH}" and len(secret) >= 20
        status, headers, body = _get(port, f"/{secret}{PAGE_PATH}")
        assert status == 200 and b"<title>trafficmgr dashboard</title>" in body
        assert headers["referrer-policy"] == "no-referrer" and "default-src 'self'" in headers["content-security-policy"]
        status, headers, body = _get(port, f"/{secret}{PAGE_PATH}dashboard.js")
        assert status == 200 and headers["content-type"].startswith("text/javascript")
        status, headers, body = _get(port, f"/{secret}{DATA_PATH}")
        assert status == 200 and json.loads(body) == DATA
        assert _get(port, f"/{secret}")[0] == 302 and _get(port, f"/{secret}")[1]["location"] == f"/{secret}{PAGE_PATH}"
        # Without the secret, or another one: nothing.
        assert _get(port, PAGE_PATH)[0] == 404
        assert _get(port, DATA_PATH)[0] == 404
        assert _get(port, f"/{secret[:-1]}x{DATA_PATH}")[0] == 404
        # Other admin paths are not forwarded, also not through dot segments or escapes.
        for path in ("/debug/proxy-status", "/debug/config-dump", "/metrics", f"{PAGE_PATH}../debug/nacks",
                     f"{PAGE_PATH}%2e%2e/debug/nacks", "/debug/dashboard/data/../../debug/nacks"):
            assert _get(port, f"/{secret}{path}")[0] == 404, path
        # DNS rebinding: another Host is refused; other methods too.
        assert _get(port, f"/{secret}{DATA_PATH}", host=f"evil.example:{port}")[0] == 403
        assert _get(port, f"/{secret}{DATA_PATH}", method="POST")[0] == 405
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_proxy_reports_an_unreachable_admin() -> None:
    proxy = DashboardProxy(f"http://127.0.0.1:{free_port()}", TOKEN, timeout=3)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        status, _, body = _get(proxy.server_address[1], f"/{proxy.secret}{DATA_PATH}")
        assert status == 502 and b"cannot reach the trafficmgr admin endpoint" in body
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_command_runs_the_proxy_until_sigterm(admin_with_token: AdminServer, token_file: str) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "trafficmgr", "dashboard", "--no-browser", "--admin",
                             admin_with_token.url, "--token-file", token_file],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")})
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("dashboard: http://127.0.0.1:") and "a local proxy adding the admin token" in line, line
        url = line.split()[1]
        port = int(url.split(":")[2].split("/")[0])
        status, _, body = _get(port, url.split(str(port), 1)[1].replace(PAGE_PATH, DATA_PATH))
        assert status == 200 and json.loads(body) == DATA
    finally:
        proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        assert proc.wait(10) == 0
        assert time.monotonic() - start < 5
