"""Who may use the API server (issue 16 item 10): bearer token, Host header, write content types.

A web page can send a "simple" cross-site request (text/plain, form or multipart body, no custom header,
no credentials it does not know) to 127.0.0.1; local mode's kubelet runs a pod's command, so a created
object is code execution. Each test sends such requests over a real socket and checks both the answer
(a Kubernetes ``Status``) and that nothing was created.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from trafficmgr.apiserver import APIServer
from trafficmgr.apiserver.access import bearer_matches, host_allowed, new_token, write_private_file
from trafficmgr.core.kube.client import load_api_client
from trafficmgr.testing.cluster import Kubectl

CONFIGMAP = json.dumps({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "from-a-page"},
                        "data": {"k": "v"}})
POD = json.dumps({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "from-a-page"},
                  "spec": {"containers": [{"name": "c", "image": "trafficmgr", "command": ["sh", "-c", "id"]}]}})


def _request(srv: APIServer, method: str, path: str, body: str | None = None, headers: dict[str, str] | None = None,
             host: str | None = None) -> tuple[int, Any]:
    """One request over a fresh TLS connection that verifies the server's certificate; ``host`` replaces
    the Host header. Returns (status, parsed JSON body or None)."""
    assert srv.credentials is not None
    ctx = ssl.create_default_context(cadata=srv.credentials.cert_pem)
    conn = http.client.HTTPSConnection("127.0.0.1", srv.port, timeout=10, context=ctx)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host if host is not None else f"127.0.0.1:{srv.port}")
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        data = body.encode() if body is not None else b""
        if body is not None:
            conn.putheader("Content-Length", str(len(data)))
        conn.endheaders(data or None)
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw and resp.getheader("Content-Type") == "application/json" else None
    finally:
        conn.close()


def _auth(srv: APIServer) -> dict[str, str]:
    return {"Authorization": f"Bearer {srv.token}"}


def _assert_status(body: Any, code: int, reason: str) -> None:
    assert body["kind"] == "Status" and body["apiVersion"] == "v1" and body["status"] == "Failure", body
    assert body["code"] == code and body["reason"] == reason, body


def _configmaps(srv: APIServer) -> list[str]:
    return [o["metadata"]["name"] for o in srv.store.list("configmaps", "default")["items"]]


@pytest.fixture
def srv() -> Any:
    s = APIServer(token=new_token()).start()
    yield s
    s.stop()


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"])
@pytest.mark.parametrize("kind", ["configmaps", "pods"])
def test_simple_cross_site_post_without_token_is_refused(srv: APIServer, ctype: str, kind: str) -> None:
    """What a page can send without a preflight: 401 without the token, nothing created."""
    body = CONFIGMAP if kind == "configmaps" else POD
    code, st = _request(srv, "POST", f"/api/v1/namespaces/default/{kind}", body, {"Content-Type": ctype})
    assert code == 401
    _assert_status(st, 401, "Unauthorized")
    assert srv.store.list(kind, "default")["items"] == []


@pytest.mark.parametrize("ctype", ["text/plain", "text/plain; charset=utf-8", "application/x-www-form-urlencoded",
                                   "multipart/form-data; boundary=x", "application/cbor"])
def test_write_with_token_needs_a_json_yaml_or_patch_type(srv: APIServer, ctype: str) -> None:
    code, st = _request(srv, "POST", "/api/v1/namespaces/default/configmaps", CONFIGMAP,
                        {**_auth(srv), "Content-Type": ctype})
    assert code == 415
    _assert_status(st, 415, "UnsupportedMediaType")
    assert _configmaps(srv) == []
    srv.store.create(json.loads(CONFIGMAP))
    for method in ("PUT", "PATCH"):
        code, st = _request(srv, method, "/api/v1/namespaces/default/configmaps/from-a-page",
                            json.dumps({"data": {"k": "changed"}}), {**_auth(srv), "Content-Type": ctype})
        assert code == 415, method
    assert srv.store.get("configmaps", "from-a-page", "default")["data"] == {"k": "v"}


def test_write_without_content_type_is_json_unless_a_browser_sent_it(srv: APIServer) -> None:
    """kube-apiserver reads a body without Content-Type as JSON (the official Python client sends creates
    so); a page can send one too (fetch with a Blob body), but a browser always adds Origin/Sec-Fetch-*."""
    for browser in ({"Origin": "https://attacker.example"}, {"Sec-Fetch-Site": "cross-site"}):
        code, st = _request(srv, "POST", "/api/v1/namespaces/default/configmaps", CONFIGMAP, {**_auth(srv), **browser})
        assert code == 415, browser
        _assert_status(st, 415, "UnsupportedMediaType")
    assert _configmaps(srv) == []
    code, _ = _request(srv, "POST", "/api/v1/namespaces/default/configmaps", CONFIGMAP, _auth(srv))
    assert code == 201 and _configmaps(srv) == ["from-a-page"]


@pytest.mark.parametrize("ctype", ["application/json", "application/yaml", "application/json; charset=utf-8"])
def test_write_with_token_and_json_or_yaml_is_created(srv: APIServer, ctype: str) -> None:
    body = CONFIGMAP if "json" in ctype else yaml.safe_dump(json.loads(CONFIGMAP))
    code, obj = _request(srv, "POST", "/api/v1/namespaces/default/configmaps", body, {**_auth(srv), "Content-Type": ctype})
    assert code == 201 and obj["metadata"]["name"] == "from-a-page"


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:{port}", "127.0.0.1.nip.io:{port}",
                                  "localhost.attacker.example", "10.0.0.1:{port}", "", "[::1", "127.0.0.1:x"])
def test_foreign_host_is_refused_even_with_the_token(srv: APIServer, host: str) -> None:
    """DNS rebinding: the page's own name resolves to 127.0.0.1, so the request arrives with its Host."""
    code, st = _request(srv, "POST", "/api/v1/namespaces/default/configmaps", CONFIGMAP,
                        {**_auth(srv), "Content-Type": "application/json"}, host=host.format(port=srv.port))
    assert code == 403
    _assert_status(st, 403, "Forbidden")
    code, _ = _request(srv, "GET", "/api/v1/namespaces/default/configmaps", headers=_auth(srv),
                       host=host.format(port=srv.port))
    assert code == 403
    assert _configmaps(srv) == []


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.1:{port}", "localhost:{port}", "LOCALHOST", "[::1]:{port}",
                                  "[::1]"])
def test_loopback_hosts_are_accepted(srv: APIServer, host: str) -> None:
    code, _ = _request(srv, "GET", "/api/v1/namespaces/default/configmaps", headers=_auth(srv),
                       host=host.format(port=srv.port))
    assert code == 200


@pytest.mark.parametrize("auth", [None, "Bearer", "Bearer wrong-token-of-some-length", "Basic dXNlcjpwYXNz",
                                  "bearer{token}x", "{token}"])
@pytest.mark.parametrize("path", ["/version", "/healthz", "/api", "/apis", "/openapi/v3", "/api/v1/pods",
                                  "/api/v1/namespaces/default/configmaps?watch=true"])
def test_every_request_needs_the_token(srv: APIServer, auth: str | None, path: str) -> None:
    headers = {"Authorization": auth.format(token=srv.token)} if auth is not None else {}
    code, st = _request(srv, "GET", path, headers=headers)
    assert code == 401
    _assert_status(st, 401, "Unauthorized")


def test_token_scheme_is_case_insensitive(srv: APIServer) -> None:
    assert _request(srv, "GET", "/version", headers={"Authorization": f"bearer {srv.token}"})[0] == 200
    assert bearer_matches(f"Bearer {srv.token}", srv.token or "")
    assert not bearer_matches(f"Bearer {srv.token}x", srv.token or "")


def test_kubectl_and_the_official_client_work_with_the_kubeconfig(srv: APIServer, tmp_path: Path) -> None:
    kc = srv.write_kubeconfig(tmp_path / "kubeconfig")
    kubectl = Kubectl(kc, tmp_path)
    kubectl.apply(yaml.safe_dump(json.loads(CONFIGMAP)))
    kubectl("label", "configmap", "from-a-page", "a=b")
    assert json.loads(kubectl("get", "configmap", "from-a-page", "-o", "json"))["metadata"]["labels"] == {"a": "b"}
    kubectl.apply(yaml.safe_dump({**json.loads(CONFIGMAP), "data": {"k": "v2"}}))  # apply again: a patch
    with load_api_client(str(kc)) as api:  # what `trafficmgr serve --kubeconfig` uses
        v1 = client.CoreV1Api(api)
        assert v1.read_namespaced_config_map("from-a-page", "default").data == {"k": "v2"}
        v1.create_namespaced_config_map("default", client.V1ConfigMap(metadata=client.V1ObjectMeta(name="c2")))
        v1.patch_namespaced_config_map("c2", "default", {"data": {"x": "1"}})
    assert sorted(_configmaps(srv)) == ["c2", "from-a-page"]
    # With another token kubectl is refused.
    cfg = yaml.safe_load(kc.read_text())
    cfg["users"][0]["user"] = {"token": new_token()}
    (tmp_path / "anon").write_text(yaml.safe_dump(cfg))
    proc = Kubectl(tmp_path / "anon", tmp_path).run("get", "configmaps", check=False)
    assert proc.returncode != 0 and "Unauthorized" in proc.stderr, proc.stderr


def test_kubeconfig_is_created_private(tmp_path: Path) -> None:
    """Created 0600 even under umask 0, and an existing wider file is replaced, not reused."""
    path = tmp_path / "kubeconfig"
    path.write_text("old")
    path.chmod(0o644)
    old = os.umask(0)
    try:
        write_private_file(path, "new")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["kubeconfig"]


def test_demo_kubeconfig_is_private_and_carries_the_token(tmp_path: Path) -> None:
    """``trafficmgr demo``'s API server start (the rest of the demo is tests/local/test_demo.py)."""
    from trafficmgr.local.demo import Demo, DemoConfig

    state = tmp_path / "state"
    state.mkdir()
    (state / "kubeconfig").write_text("left by an older demo")
    (state / "kubeconfig").chmod(0o644)
    demo = Demo(DemoConfig(state_dir=str(state)), out=open(os.devnull, "w"))  # noqa: SIM115
    demo._start_api()
    try:
        kc = state / "kubeconfig"
        assert stat.S_IMODE(kc.stat().st_mode) == 0o600
        cfg = yaml.safe_load(kc.read_text())
        assert cfg["users"][0]["user"]["token"] == demo.api.token and len(demo.api.token) >= 40
        assert cfg["clusters"][0]["cluster"]["server"] == f"https://127.0.0.1:{demo.api.port}"
        assert "default" in Kubectl(kc, tmp_path)("get", "namespaces")
        code, st = _request(demo.api, "POST", "/api/v1/namespaces/default/configmaps", CONFIGMAP,
                            {"Content-Type": "text/plain"})
        assert code == 401 and _configmaps(demo.api) == []
    finally:
        demo.stop()


def test_host_allowed_table() -> None:
    assert host_allowed("127.0.0.1:6443", "127.0.0.1")
    assert host_allowed("10.1.2.3:6443", "10.1.2.3")
    assert not host_allowed("10.1.2.4:6443", "10.1.2.3")
    assert host_allowed("10.1.2.4:6443", "0.0.0.0")  # a wildcard bind: any IP literal, never a name
    assert not host_allowed("evil.example:6443", "0.0.0.0")
    assert not host_allowed("::1", "127.0.0.1")  # IPv6 literals need brackets
    assert not host_allowed("[::1]:", "127.0.0.1")
    assert not host_allowed(None, "127.0.0.1")


def test_module_entry_point_requires_a_token(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m trafficmgr.apiserver``: no way to run it without a token; a bad token file is one clear error."""
    from trafficmgr.apiserver.__main__ import main

    (tmp_path / "short").write_text("abc\n")
    for args, says in ((["--port", "0"], "give --kubeconfig"),
                       (["--port", "0", "--token-file", str(tmp_path / "short")], "16 to 4096 characters"),
                       (["--port", "0", "--token-file", str(tmp_path / "missing")], "cannot read the token file")):
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 2 and says in capsys.readouterr().err
