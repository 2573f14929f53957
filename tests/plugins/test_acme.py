"""The original README's "Https ingress gateway using certification from Let's encrypt", for real, on loopback.

Debian's ``pebble`` (an ACME server) stands in for Let's Encrypt and ``pebble-challtestsrv`` for public
DNS (every name resolves to 127.0.0.1); pebble's HTTP-01 validation port is the gateway's port.
``certbot certonly --manual --preferred-challenges http`` runs with an auth hook that does what the README
tells the user to do, through the API with the real ``kubectl``: put the challenge data into
samples/http-text-response.yaml's RESPONSE_BODY and apply it, apply an Ingress routing
``/.well-known/acme-challenge/<token>`` to that service, and wait until the gateway answers it. The
test plays the kubelet for that Deployment (the app runs in-process on its pod IP and picks up the new
RESPONSE_BODY). Then ``kubectl create secret tls`` from certbot's files, the README's HTTPS Ingress, and
an HTTPS request with SNI that verifies the presented chain against pebble's root.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.plugins.tlscerts import https_get, make_ca, make_leaf, serial_of_der
from trafficmgr.apps.text_response import TextResponseServer
from trafficmgr.testing.cluster import GatewayCluster, http_get
from trafficmgr.testing.envoy import free_port, wait_for
from trafficmgr.testing.prereq import missing

ROOT = Path(__file__).resolve().parents[2]
HOST = "shop.trafficmgr.test"
APP_IP = "127.0.12.1"

BACKENDS = f"""
apiVersion: v1
kind: Pod
metadata: {{name: http-text-response-1, namespace: default, labels: {{app: http-text-response}}}}
spec: {{nodeName: node-1, containers: [{{name: app, image: trafficmgr, ports: [{{name: http, containerPort: 8080}}]}}]}}
status: {{podIP: {APP_IP}, conditions: [{{type: Ready, status: "True"}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: productpage, namespace: default}}
spec:
  selector: {{app: productpage}}
  ports: [{{name: http, port: 9080, targetPort: 9080}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: productpage-1, namespace: default, labels: {{app: productpage}}}}
spec: {{nodeName: node-1, containers: [{{name: app, image: productpage}}]}}
status: {{podIP: 127.0.12.2, conditions: [{{type: Ready, status: "True"}}]}}
"""

# What the README's user does when certbot shows the challenge (run by certbot as --manual-auth-hook).
AUTH_HOOK = r'''
import os, subprocess, sys, time, urllib.request
domain, token, validation = os.environ["CERTBOT_DOMAIN"], os.environ["CERTBOT_TOKEN"], os.environ["CERTBOT_VALIDATION"]
sample = open(os.environ["TM_SAMPLE"]).read()
old = [l for l in sample.splitlines() if "value:" in l and "RESPONSE_BODY" not in l][0]
sample = sample.replace(old, old.split("value:")[0] + "value: " + repr(validation).replace("'", '"'))
ingress = f"""
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{name: https-ingress, namespace: default}}
spec:
  ingressClassName: traffic
  rules:
  - host: {domain}
    http:
      paths:
      - path: /.well-known/acme-challenge/{token}
        pathType: ImplementationSpecific
        backend:
          service: {{name: http-text-response, port: {{number: 8080}}}}
"""
for manifest in (sample, ingress):
    subprocess.run(["kubectl", "apply", "-f", "-"], input=manifest, text=True, check=True, capture_output=True)
# The user presses ENTER once the challenge URL answers; here: poll it through the gateway.
url = f"http://127.0.0.1:{os.environ['TM_GATEWAY_PORT']}/.well-known/acme-challenge/{token}"
for _ in range(200):
    try:
        req = urllib.request.Request(url, headers={"Host": domain})
        if urllib.request.urlopen(req, timeout=2).read().decode() == validation:
            sys.exit(0)
    except OSError:
        pass
    time.sleep(0.05)
sys.exit("challenge not served through the gateway")
'''

HTTPS_INGRESS = f"""
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{name: https-ingress, namespace: default}}
spec:
  ingressClassName: traffic
  tls:
  - hosts: [{HOST}]
    secretName: ingressgateway-certs
  rules:
  - host: {HOST}
    http:
      paths:
      - path: /productpage
        pathType: Prefix
        backend:
          service: {{name: productpage, port: {{number: 9080}}}}
"""


def _require(*tools: str) -> None:
    absent = [t for t in tools if shutil.which(t) is None]
    if absent:
        missing(f"{', '.join(absent)} not installed (apt-get install pebble certbot; see .ci/install.d/acme.apt)")


class Proc:
    """A subprocess we own (killed by pid at teardown), logging to a file."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self.proc = subprocess.Popen(args, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def text(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@pytest.fixture
def acme(tmp_path: Path, envoy_binary: str) -> Iterator[dict]:
    """pebble-challtestsrv (DNS: everything is 127.0.0.1) + pebble (HTTP-01 validation on the gateway port)
    + the gateway rig with the http-text-response app."""
    _require("pebble", "pebble-challtestsrv", "certbot", "kubectl")
    ca = make_ca(tmp_path / "pki", "pebble listener test CA")
    listener = make_leaf(ca, tmp_path / "pki", ["localhost"], 7, days=30)  # pebble's own HTTPS (certbot trusts ca)
    (tmp_path / "pebble.crt").write_text(listener.cert)
    (tmp_path / "pebble.key").write_text(listener.key)
    procs: list[Proc] = []
    with GatewayCluster() as gw:
        try:
            dns_port, acme_port, mgmt_port, cts_mgmt = free_port(), free_port(), free_port(), free_port()
            procs.append(Proc(["pebble-challtestsrv", "-dns01", f"127.0.0.1:{dns_port}", "-http01", "", "-https01", "",
                               "-tlsalpn01", "", "-management", f"127.0.0.1:{cts_mgmt}", "-defaultIPv4", "127.0.0.1",
                               "-defaultIPv6", ""], tmp_path / "challtestsrv.log"))
            config = {"pebble": {
                "listenAddress": f"127.0.0.1:{acme_port}", "managementListenAddress": f"127.0.0.1:{mgmt_port}",
                "certificate": str(tmp_path / "pebble.crt"), "privateKey": str(tmp_path / "pebble.key"),
                "httpPort": gw.gateway_port, "tlsPort": free_port(), "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
            }}
            (tmp_path / "pebble.json").write_text(json.dumps(config))
            env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0", "PEBBLE_AUTHZREUSE": "0"}
            procs.append(Proc(["pebble", "-config", str(tmp_path / "pebble.json"), "-dnsserver", f"127.0.0.1:{dns_port}"],
                              tmp_path / "pebble.log", env))
            ctx = ssl.create_default_context(cafile=str(ca.cert_path))

            def directory() -> bool:
                with urllib.request.urlopen(f"https://localhost:{acme_port}/dir", timeout=2, context=ctx) as r:
                    return r.status == 200

            wait_for(directory, 15, message=f"pebble did not start:\n{procs[-1].text()}")
            with TextResponseServer("", APP_IP, 8080) as app:
                gw.apply(BACKENDS)
                gw.backend("productpage", "127.0.12.2", 9080)
                kubelet = _Kubelet(gw, app)
                try:
                    yield {"gw": gw, "ca": ca, "ctx": ctx, "acme_port": acme_port, "mgmt_port": mgmt_port,
                           "tmp": tmp_path, "app": app}
                finally:
                    kubelet.stop()
        finally:
            for p in procs:
                p.stop()


class _Kubelet(threading.Thread):
    """Plays the kubelet for the http-text-response Deployment: its RESPONSE_BODY becomes the app's body."""

    def __init__(self, gw: GatewayCluster, app: TextResponseServer) -> None:
        super().__init__(daemon=True)
        self.gw, self.app = gw, app
        self._halt = threading.Event()
        self.start()

    def run(self) -> None:
        while not self._halt.wait(0.05):
            try:
                deploy = self.gw.store.get("deployments", "http-text-response", "default")
            except Exception:  # noqa: BLE001 - not created yet
                continue
            for c in deploy["spec"]["template"]["spec"]["containers"]:
                for e in c.get("env") or []:
                    if e["name"] == "RESPONSE_BODY":
                        self.app.body = e.get("value", "")

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def test_lets_encrypt_walkthrough_with_pebble(acme: dict) -> None:
    gw: GatewayCluster = acme["gw"]
    tmp: Path = acme["tmp"]
    hook = tmp / "auth_hook.py"
    hook.write_text(AUTH_HOOK)
    env = {**gw.kubectl.env, "REQUESTS_CA_BUNDLE": str(acme["ca"].cert_path), "TM_GATEWAY_PORT": str(gw.gateway_port),
           "TM_SAMPLE": str(ROOT / "samples" / "http-text-response.yaml")}
    certbot = subprocess.run(
        ["certbot", "certonly", "--manual", "--preferred-challenges", "http", "-d", HOST,
         "--manual-auth-hook", f"{sys.executable} {hook}",
         "--server", f"https://localhost:{acme['acme_port']}/dir",
         "--non-interactive", "--agree-tos", "--register-unsafely-without-email",
         "--config-dir", str(tmp / "letsencrypt"), "--work-dir", str(tmp / "work"), "--logs-dir", str(tmp / "logs")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert certbot.returncode == 0, f"certbot failed:\n{certbot.stdout}\n{certbot.stderr}"
    # The challenge really went through the gateway to the text-response app.
    assert acme["app"].hits >= 1
    live = tmp / "letsencrypt" / "live" / HOST
    # README: kubectl create secret tls ingressgateway-certs --key .../privkey.pem --cert .../fullchain.pem
    gw.kubectl("create", "secret", "tls", "ingressgateway-certs", "--key", str(live / "privkey.pem"),
               "--cert", str(live / "fullchain.pem"), "-n", "default")
    gw.kubectl.apply(HTTPS_INGRESS)
    # Trust only pebble's root (fetched from its management API) and check the name, as a browser would.
    with urllib.request.urlopen(f"https://localhost:{acme['mgmt_port']}/roots/0", timeout=5, context=acme["ctx"]) as r:
        root = r.read().decode()
    (tmp / "pebble-root.pem").write_text(root)

    def https_ok() -> bool:
        status, body = https_get("127.0.0.1", gw.gateway_port, HOST, "/productpage", str(tmp / "pebble-root.pem"))
        return status == 200 and json.loads(body)["backend"] == "productpage"

    gw.wait_config(https_ok, 10, message="HTTPS with the ACME certificate not served")
    cert_der = ssl.PEM_cert_to_DER_cert((live / "cert.pem").read_text())
    served = ssl.create_default_context(cafile=str(tmp / "pebble-root.pem"))
    with socket.create_connection(("127.0.0.1", gw.gateway_port), timeout=3) as raw:
        with served.wrap_socket(raw, server_hostname=HOST) as tls:
            peer = tls.getpeercert(binary_form=True)
            assert peer is not None
            assert serial_of_der(peer) == serial_of_der(cert_der)
    # Plain HTTP keeps serving the same Ingress on the same port.
    assert http_get(f"http://127.0.0.1:{gw.gateway_port}/productpage", 3, {"Host": HOST})[0] == 200
    assert gw.cp.nacks() == []


def test_text_response_app(tmp_path: Path) -> None:
    """``trafficmgr text-response`` (the real command) answers any path with RESPONSE_BODY; SIGTERM stops it."""
    port = free_port()
    env = {**os.environ, "RESPONSE_BODY": "token.key-authorization"}
    proc = Proc([sys.executable, "-m", "trafficmgr", "text-response", "--host", "127.0.0.1", "--port", str(port)],
                tmp_path / "app.log", env)
    try:
        wait_for(lambda: http_get(f"http://127.0.0.1:{port}/.well-known/acme-challenge/abc", 1)
                 == (200, "token.key-authorization"), 15, message="text-response not answering")
        assert http_get(f"http://127.0.0.1:{port}/", 1) == (200, "token.key-authorization")
        assert _call(port, "POST", "/x", b"ignored")[:2] == (200, b"token.key-authorization")
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(10) == 0, proc.text()
    finally:
        proc.stop()


def _call(port: int, method: str, path: str = "/", body: bytes | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, bytes, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read(), resp
    finally:
        conn.close()


@pytest.fixture
def text_app() -> Iterator[TextResponseServer]:
    with TextResponseServer("the body", "127.0.0.1", 0) as app:
        yield app


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_text_response_answers_every_method_with_the_body(text_app: TextResponseServer, method: str) -> None:
    body = b"x" * 100_000 if method in ("POST", "PUT", "PATCH") else None
    status, data, resp = _call(text_app.port, method, "/any/path?q=1", body)
    assert (status, data) == (200, b"the body")
    assert resp.getheader("Content-Type") == "text/plain; charset=utf-8"
    assert resp.getheader("Content-Length") == "8"
    if method == "OPTIONS":
        assert set((resp.getheader("Allow") or "").split(", ")) == {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"}


def test_text_response_head_has_headers_only(text_app: TextResponseServer) -> None:
    status, data, resp = _call(text_app.port, "HEAD", "/token")
    assert (status, data, resp.getheader("Content-Length")) == (200, b"", "8")
    # On the wire: HEAD then GET on one connection; the GET's status line follows the HEAD's headers at once.
    with socket.create_connection(("127.0.0.1", text_app.port), timeout=5) as s:
        s.sendall(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    head, rest = raw.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200") and rest.startswith(b"HTTP/1.1 200")
    assert rest.endswith(b"\r\n\r\nthe body")


def test_text_response_discards_bodies_and_keeps_the_connection(text_app: TextResponseServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", text_app.port, timeout=5)
    try:
        conn.request("POST", "/a", body=b"a" * 70_000)  # Content-Length, more than one read
        first = conn.getresponse()
        assert (first.status, first.read()) == (200, b"the body")
        conn.request("PUT", "/b", body=iter([b"chunk one", b"", b"x" * 70_000]), encode_chunked=True)  # chunked
        second = conn.getresponse()
        assert (second.status, second.read()) == (200, b"the body")
        conn.request("GET", "/c", body=b"a GET with a body")
        third = conn.getresponse()
        assert (third.status, third.read()) == (200, b"the body")
        assert not third.will_close
    finally:
        conn.close()
    assert text_app.hits == 3
    # Chunked with extensions and trailers, raw.
    with socket.create_connection(("127.0.0.1", text_app.port), timeout=5) as s:
        s.sendall(b"DELETE / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"3;ext=1\r\nabc\r\n0\r\nX-Trailer: y\r\n\r\n"
                  b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    assert raw.count(b"HTTP/1.1 200 OK") == 2 and raw.endswith(b"the body")


@pytest.mark.parametrize("headers", [{"Content-Length": "-1"}, {"Content-Length": "abc"}, {"Transfer-Encoding": "gzip"},
                                     {"Transfer-Encoding": "chunked"}])
def test_text_response_bad_body_framing_is_400(text_app: TextResponseServer, headers: dict[str, str]) -> None:
    """A body whose end cannot be found (bad length, unknown coding, bad chunk size) is 400 and the
    connection is closed."""
    with socket.create_connection(("127.0.0.1", text_app.port), timeout=5) as s:
        fields = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        s.sendall(f"POST / HTTP/1.1\r\nHost: x\r\n{fields}\r\nzz\r\n".encode())
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    assert raw.startswith(b"HTTP/1.1 400"), raw[:200]
    assert text_app.hits == 0

