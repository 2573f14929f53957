"""The admin endpoint: routes, status codes, config dumps, and private-key redaction."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import urllib.error
import urllib.request
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2
from google.protobuf import json_format

from trafficmgr.core import render
from trafficmgr.core.admin import AdminError, AdminServer, AdminState
from trafficmgr.core.cache import Resource
from trafficmgr.core.labels import LabelSpec
from trafficmgr.core.plugins import PluginHost, PluginInfo
from trafficmgr.core.protos import pack

NODE = "web-1.default"


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A self-signed certificate and its private key made with the openssl CLI."""
    d = tmp_path_factory.mktemp("tls")
    key, cert = d / "key.pem", d / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "30", "-subj", "/CN=shop.example.test/O=trafficmgr", "-addext",
         "subjectAltName=DNS:shop.example.test,DNS:www.example.test,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    serial = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-serial"], check=True,
                            capture_output=True, text=True).stdout.strip().split("=", 1)[1]
    enddate = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-enddate"], check=True,
                             capture_output=True, text=True).stdout.strip().split("=", 1)[1]
    return {"key": key.read_text(), "cert": cert.read_text(), "serial": serial.lower().lstrip("0"), "enddate": enddate}


def _secret(name: str, cert: str, key: str, as_bytes: bool = False) -> Resource:
    s = secret_pb2.Secret(name=name)
    if as_bytes:
        s.tls_certificate.certificate_chain.inline_bytes = cert.encode()
        s.tls_certificate.private_key.inline_bytes = key.encode()
    else:
        s.tls_certificate.certificate_chain.inline_string = cert
        s.tls_certificate.private_key.inline_string = key
    return Resource.from_message(s, name)


def _tls_listener(cert: str, key: str) -> Resource:
    """A listener with an inline key nested in a transport socket's ``Any`` (generic redaction)."""
    ctx = tls_pb2.DownstreamTlsContext()
    tc = ctx.common_tls_context.tls_certificates.add()
    tc.certificate_chain.inline_string = cert
    tc.private_key.inline_string = key
    lst = listener_pb2.Listener(name="https")
    chain = lst.filter_chains.add()
    chain.transport_socket.CopyFrom(base_pb2.TransportSocket(name="envoy.transport_sockets.tls", typed_config=pack(ctx)))
    return Resource.from_message(lst, "https")


class FakeState:
    """An :class:`AdminState` with canned data; tests flip its fields."""

    def __init__(self, tls: dict[str, Any]) -> None:
        self.is_healthy = True
        self.readiness: tuple[bool, str] = (False, "waiting for the first Kubernetes sync")
        self.streams: list[dict[str, Any]] = [{
            "node_id": NODE, "node_cluster": "default", "view": "sidecar", "peer": "127.0.0.1:5555",
            "mode": "sotw", "connected_at": 1700000000.0,
            "clusters": {"sent": "aaaa", "acked": "aaaa", "last_nack": None},
            "endpoints": {"sent": None, "acked": None, "last_nack": None},
            "listeners": {"sent": None, "acked": None, "last_nack": None},
            "routes": {"sent": None, "acked": None, "last_nack": None},
            "secrets": {"sent": None, "acked": None, "last_nack": None},
        }]
        self.cluster = cluster_pb2.Cluster(name="9080|default|reviews.outbound", type=cluster_pb2.Cluster.EDS)
        self.resources = {
            "clusters": [Resource.from_message(self.cluster, self.cluster.name)],
            "listeners": [_tls_listener(tls["cert"], tls["key"])],
            "secrets": [_secret("shop-tls", tls["cert"], tls["key"]), _secret("shop-tls-bytes", tls["cert"], tls["key"], True)],
        }
        self.host = PluginHost.load(["lb"])
        self.fail = False

    def proxy_status(self) -> list[dict[str, Any]]:
        if self.fail:
            raise RuntimeError("boom")
        return self.streams

    def config_dump(self, node_id: str) -> dict[str, list[Resource]] | None:
        return self.resources if node_id == NODE else None

    def healthy(self) -> bool:
        return self.is_healthy

    def ready(self) -> tuple[bool, str]:
        return self.readiness

    def nacks(self) -> list[dict[str, Any]]:
        return [{"node_id": NODE, "type": "clusters", "error": "bad", "version": "v2", "nonce": "3", "resources": [], "at": 1.0}]

    def plugins_info(self) -> list[PluginInfo]:
        return list(self.host.infos.values())

    def labels(self) -> list[LabelSpec]:
        return self.host.labels.specs


@pytest.fixture
def state(tls_files: dict[str, Any]) -> FakeState:
    return FakeState(tls_files)


@pytest.fixture
def admin(state: FakeState) -> Any:
    server = AdminServer(state, port=0)
    server.start()
    yield server
    server.stop()


def get(server: AdminServer, path: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(server.url + path, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def _protocol_methods() -> set[str]:
    return {n for n, v in vars(AdminState).items() if callable(v) and not n.startswith("_")}


def test_fake_state_satisfies_protocol(state: FakeState) -> None:
    s: AdminState = state  # type-checked use of the Protocol
    assert s.healthy()
    assert _protocol_methods() == {"proxy_status", "config_dump", "healthy", "ready", "nacks", "plugins_info", "labels"}


def test_serve_control_plane_implements_admin_state() -> None:
    """What ``trafficmgr serve`` hands to AdminServer has every AdminState method."""
    from trafficmgr.core import controlplane

    missing = {m for m in _protocol_methods() if not callable(getattr(controlplane.ControlPlane, m, None))}
    assert not missing, f"ControlPlane lacks AdminState methods: {sorted(missing)}"


def test_healthz(admin: AdminServer, state: FakeState) -> None:
    assert get(admin, "/healthz")[0::2] == (200, "ok\n")
    state.is_healthy = False
    assert get(admin, "/healthz")[0] == 503


def test_readyz_reports_reason(admin: AdminServer, state: FakeState) -> None:
    status, _, body = get(admin, "/readyz")
    assert status == 503 and "first Kubernetes sync" in body
    state.readiness = (True, "")
    assert get(admin, "/readyz")[0::2] == (200, "ready\n")


def test_metrics_exposition(admin: AdminServer) -> None:
    status, ctype, body = get(admin, "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    assert "# TYPE trafficmgr_xds_nacks_total counter" in body
    assert "trafficmgr_build_duration_seconds_bucket" in body


def test_proxy_status_nacks_plugins_labels(admin: AdminServer, state: FakeState) -> None:
    assert json.loads(get(admin, "/debug/proxy-status")[2]) == state.streams
    assert json.loads(get(admin, "/debug/nacks")[2])[0]["error"] == "bad"
    plugins = {p["name"]: p for p in json.loads(get(admin, "/debug/plugins")[2])}
    assert plugins["lb"]["source"] == "builtin" and plugins["core"]["source"] == "core"
    assert "trafficmgr_labels" in plugins["lb"]["hooks"]
    labels = {row["label"]: row for row in json.loads(get(admin, "/debug/labels")[2])}
    assert labels["traffic.lb.policy"]["default"] == "ROUND_ROBIN"
    assert labels["traffic.lb.policy"]["plugin"] == "lb"
    assert labels["traffic.envoy.enabled"]["on"] == ["Pod", "Deployment", "StatefulSet", "DaemonSet"]


def test_config_dump_clusters(admin: AdminServer, state: FakeState) -> None:
    status, ctype, body = get(admin, f"/debug/config-dump?node_id={NODE}&type=clusters")
    assert status == 200 and ctype == "application/json"
    dump = json.loads(body)
    assert dump["node_id"] == NODE and dump["view"] == "sidecar"
    assert list(dump["resources"]) == ["clusters"]
    (cluster,) = dump["resources"]["clusters"]
    assert cluster["name"] == state.cluster.name
    assert cluster["version"] == state.resources["clusters"][0].version
    assert cluster["config"] == json_format.MessageToDict(state.cluster, preserving_proto_field_name=True)


def test_config_dump_all_types_in_push_order(admin: AdminServer) -> None:
    dump = json.loads(get(admin, f"/debug/config-dump?node_id={NODE}")[2])
    assert list(dump["resources"]) == ["clusters", "listeners", "secrets"]


def test_config_dump_errors(admin: AdminServer) -> None:
    status, ctype, body = get(admin, "/debug/config-dump?node_id=nobody.default")
    assert status == 404 and ctype == "application/json"
    assert "unknown node id 'nobody.default'" in json.loads(body)["error"]
    status, _, body = get(admin, f"/debug/config-dump?node_id={NODE}&type=pods")
    assert status == 400
    assert json.loads(body)["error"] == "unknown type 'pods'; valid types: clusters, endpoints, listeners, routes, secrets"
    status, _, body = get(admin, "/debug/config-dump")
    assert status == 400 and "node_id" in json.loads(body)["error"]


def test_unknown_path_and_failing_state(admin: AdminServer, state: FakeState) -> None:
    status, _, body = get(admin, "/nope")
    assert status == 404 and "/debug/config-dump" in json.loads(body)["error"]
    state.fail = True
    status, _, body = get(admin, "/debug/proxy-status")
    assert status == 500 and json.loads(body)["error"] == "RuntimeError: boom"
    assert get(admin, "/healthz")[0] == 200  # still serving


def _key_fragments(pem: str) -> list[str]:
    """Pieces of a PEM key that must never appear: its PEM text, its base64 lines, and base64 of the PEM."""
    lines = [ln for ln in pem.splitlines() if ln and not ln.startswith("-----")]
    return [pem.strip(), *lines[1:-1], base64.b64encode(pem.encode()).decode()[:60]]


def test_config_dump_never_emits_private_keys(admin: AdminServer, tls_files: dict[str, Any]) -> None:
    body = get(admin, f"/debug/config-dump?node_id={NODE}")[2]
    assert "PRIVATE KEY" not in body
    for fragment in _key_fragments(tls_files["key"]):
        assert fragment not in body
    dump = json.loads(body)
    for secret in dump["resources"]["secrets"]:
        assert secret["config"]["tls_certificate"]["private_key"] == {"redacted": True}
    nested = dump["resources"]["listeners"][0]["config"]["filter_chains"][0]["transport_socket"]["typed_config"]
    assert nested["common_tls_context"]["tls_certificates"][0]["private_key"] == {"redacted": True}
    # the certificate itself stays visible
    assert "BEGIN CERTIFICATE" in dump["resources"]["secrets"][0]["config"]["tls_certificate"]["certificate_chain"]["inline_string"]


def test_config_dump_describes_certificates(admin: AdminServer, tls_files: dict[str, Any]) -> None:
    dump = json.loads(get(admin, f"/debug/config-dump?node_id={NODE}&type=secrets")[2])
    infos = [s["certificate"] for s in dump["resources"]["secrets"]]
    assert infos[0] == infos[1]  # inline_string and inline_bytes give the same description
    info = infos[0]
    assert "CN=shop.example.test" in info["subject"] and "O=trafficmgr" in info["subject"]
    assert info["sans"] == ["DNS:shop.example.test", "DNS:www.example.test", "IP:127.0.0.1"]
    assert info["serial"] == tls_files["serial"]
    import datetime

    expected = datetime.datetime.strptime(tls_files["enddate"], "%b %d %H:%M:%S %Y %Z")
    assert info["not_after"] == expected.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_certificate_info_without_cryptography(tls_files: dict[str, Any]) -> None:
    """The standard-library fallback describes the certificate the same way."""
    via_ssl = render._cert_info_ssl(tls_files["cert"])
    via_crypto = render.certificate_info(tls_files["cert"])
    assert via_ssl["sans"] == via_crypto["sans"]
    assert via_ssl["serial"] == via_crypto["serial"]
    assert via_ssl["not_after"] == via_crypto["not_after"]
    assert "CN=shop.example.test" in via_ssl["subject"]


def test_redact_catches_stray_key_material(tls_files: dict[str, Any]) -> None:
    tree = {"a": [{"note": tls_files["key"]}, {"b64": base64.b64encode(tls_files["key"].encode()).decode()}],
            "ok": "hello", "password": {"inline_string": "hunter2"}}
    out = render.redact(tree)
    assert out == {"a": [{"note": {"redacted": True}}, {"b64": {"redacted": True}}], "ok": "hello", "password": {"redacted": True}}


def test_port_in_use_names_port_and_flag(state: FakeState) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(AdminError, match=rf"admin port {port} .*already in use.*--admin-port"):
            AdminServer(state, port=port).start()


def test_start_stop_is_idempotent_and_frees_the_port(state: FakeState) -> None:
    server = AdminServer(state, port=0)
    server.start()
    server.start()
    port = server.port
    server.stop()
    server.stop()
    assert server.port == port
    again = AdminServer(state, port=port)
    with again:
        assert get(again, "/healthz")[0] == 200


# -- the metrics endpoint, loopback admin and the bearer token (issue 16, item 5) ---------------------


def _get_with(server_url: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    request = urllib.request.Request(server_url + path, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


def test_metrics_endpoint_serves_metrics_and_health_but_no_debug_view(state: FakeState) -> None:
    from trafficmgr.core.admin import METRICS_ROUTES

    with AdminServer(state, "127.0.0.1", 0, routes=METRICS_ROUTES, flag="--metrics-port") as metrics:
        status, _, body = _get_with(metrics.url, "/metrics")
        assert status == 200 and "# TYPE" in body
        assert _get_with(metrics.url, "/healthz")[0] == 200
        assert _get_with(metrics.url, "/readyz")[0] == 503  # FakeState is not ready yet
        for path in ("/debug/proxy-status", f"/debug/config-dump?node_id={NODE}", "/debug/nacks", "/debug/plugins", "/debug/labels"):
            status, _, body = _get_with(metrics.url, path)
            assert status == 404, path
            assert NODE not in body and "BEGIN CERTIFICATE" not in body, path


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "my-host.example"])
def test_debug_views_off_loopback_need_a_token(state: FakeState, host: str) -> None:
    with pytest.raises(AdminError, match="--admin-token-file"):
        AdminServer(state, host, 0).start()


@pytest.mark.parametrize("host", ["127.0.0.1", "127.5.0.1", "::1", "localhost"])
def test_loopback_is_recognised(host: str) -> None:
    from trafficmgr.core.admin import is_loopback

    assert is_loopback(host)
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1") and not is_loopback("::")


def test_token_guards_debug_views_only(state: FakeState) -> None:
    token = "s3cret-token-0123456789"
    with AdminServer(state, "127.0.0.1", 0, token=token) as admin:
        status, headers, body = _get_with(admin.url, "/debug/proxy-status")
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer") and NODE not in body
        for wrong in ("Bearer nope", f"Basic {token}", f"Bearer {token}x", f"Bearer {token[:-1]}", "Bearer"):
            assert _get_with(admin.url, "/debug/proxy-status", {"Authorization": wrong})[0] == 401, wrong
        status, _, body = _get_with(admin.url, "/debug/proxy-status", {"Authorization": f"Bearer {token}"})
        assert status == 200 and NODE in body
        assert _get_with(admin.url, "/metrics")[0] == 200  # metrics and health need no token
        assert _get_with(admin.url, "/healthz")[0] == 200


@pytest.mark.parametrize(("content", "message"), [
    ("", "at least 16 characters"), ("short\n", "at least 16 characters"), ("has a space in the token", "no spaces"),
])
def test_bad_token_file_is_a_clear_error(tmp_path: Any, content: str, message: str) -> None:
    from trafficmgr.core.admin import read_token_file

    path = tmp_path / "token"
    path.write_text(content)
    with pytest.raises(AdminError, match=message):
        read_token_file(str(path))
    with pytest.raises(AdminError, match="cannot read"):
        read_token_file(str(tmp_path / "missing"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_splits_metrics_from_debug_and_proxy_status_sends_the_token(tmp_path: Any) -> None:
    """The real ``trafficmgr serve``: /metrics and health on --metrics-port (404 for /debug/*), the admin
    endpoint on loopback with a token; ``proxy-status`` fails without ``--token-file`` and works with it;
    ``--admin-address 0.0.0.0`` without a token is one clear error."""
    import subprocess
    import sys
    import time

    from trafficmgr.apiserver import APIServer

    api = APIServer().start()
    kubeconfig = tmp_path / "kubeconfig"
    api.write_kubeconfig(str(kubeconfig))
    token_file = tmp_path / "token"
    token_file.write_text("0123456789abcdef0123\n")
    admin_port, metrics_port = _free_port(), _free_port()
    base = [sys.executable, "-m", "trafficmgr", "serve", "--kubeconfig", str(kubeconfig), "--xds-address", "127.0.0.1",
            "--xds-port", "0", "--plugins", "lb"]
    proc = subprocess.Popen([*base, "--admin-port", str(admin_port), "--admin-token-file", str(token_file),
                             "--metrics-address", "127.0.0.1", "--metrics-port", str(metrics_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        metrics_url, admin_url = f"http://127.0.0.1:{metrics_port}", f"http://127.0.0.1:{admin_port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if _get_with(metrics_url, "/readyz")[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "serve did not become ready"
            time.sleep(0.2)
        assert "trafficmgr_" in _get_with(metrics_url, "/metrics")[2]
        assert _get_with(metrics_url, "/debug/proxy-status")[0] == 404
        assert _get_with(metrics_url, "/debug/config-dump?node_id=x")[0] == 404
        assert _get_with(admin_url, "/debug/proxy-status")[0] == 401
        cli = [sys.executable, "-m", "trafficmgr", "proxy-status", "--server", admin_url, "--json"]
        denied = subprocess.run(cli, capture_output=True, text=True, timeout=60)
        assert denied.returncode == 1 and "bearer token" in denied.stderr, denied.stderr
        allowed = subprocess.run([*cli, "--token-file", str(token_file)], capture_output=True, text=True, timeout=60)
        assert allowed.returncode == 0 and json.loads(allowed.stdout) == [], allowed.stderr
        exposed = subprocess.run([*base, "--admin-address", "0.0.0.0", "--admin-port", str(_free_port())],
                                 capture_output=True, text=True, timeout=60)
        assert exposed.returncode == 1 and "--admin-token-file" in exposed.stderr and "Traceback" not in exposed.stderr, exposed.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        api.stop()
