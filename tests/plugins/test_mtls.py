"""The ``mtls`` plugin end to end (``serve --mtls``): a client pod and a server pod in two network
namespaces joined by a veth pair, each with its own sidecar Envoy running in a working directory that
holds its mesh identity (``identity/``, written with ``trafficmgr.core.identity.files.write`` from a
test CA made here with ``cryptography``). The server pod's connections are captured by the agent's nat
PREROUTING rules and cross its ``inbound`` listener.

An *unmeshed* client is a process in the client pod running as the proxy's uid (1337): the capture
rules leave it alone, so it speaks plaintext straight to the server pod, as a pod without a sidecar
would.
"""

from __future__ import annotations

import argparse
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest

from trafficmgr.plugins import mtls
from trafficmgr.testing.cluster import LocalCluster, SidecarPod
from trafficmgr.testing.envoy import wait_for
from trafficmgr.testing.manifests import join, service
from trafficmgr.testing.mesh import MeshTestCA, meshed_pod
from trafficmgr.testing.netns import require as _require_netns

SERVER_IP = "10.244.1.5"  # the meshed server pod, in its own namespace
PLAIN_IP = "10.244.0.9"  # a pod without a sidecar (its backend lives in the client pod's namespace)
PROXY_UID = 1337
TD = "cluster.local"
CLIENT_ID = f"spiffe://{TD}/ns/default/sa/client"
INBOUND = "listener.inbound"
#: A changed policy replaces the inbound listener's filter chains; connections accepted by the old chains
#: (the client sidecar keeps its upstream connections) end after Envoy's drain time. The node agent should
#: run sidecars with these options under --mtls (Envoy's default drain is 600 s).
DRAIN = ("--drain-time-s", "2", "--drain-strategy", "immediate")
#: How long a changed policy may take to apply to a client that keeps its connection open.
DRAIN_WAIT = 10.0


def plain_pod(name: str, ip: str, app: str) -> str:
    return textwrap.dedent(f"""\
        apiVersion: v1
        kind: Pod
        metadata: {{name: {name}, namespace: default, labels: {{app: {app}}}}}
        spec: {{nodeName: node-1, containers: [{{name: app, image: {app}}}]}}
        status: {{podIP: {ip}, conditions: [{{type: Ready, status: "True"}}]}}
        """)


# A client outside the mesh: runs as the proxy's uid in the client pod, so nothing captures it.
UNMESHED = """
import socket, sys, time
host, port, wait, data = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4].encode().decode("unicode_escape").encode("latin-1")
s = socket.create_connection((host, port), timeout=5)
time.sleep(wait)
try:
    s.sendall(data)
    got = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
        if got.startswith(b"HTTP/") and b"\\r\\n\\r\\n" in got or got.startswith(b"PONG"):
            break
except (ConnectionResetError, BrokenPipeError):
    got = b"<reset>"
print(repr(got))
"""


class Rig:
    def __init__(self, c: LocalCluster, server: SidecarPod, web: Any, ca: MeshTestCA) -> None:
        self.c, self.server, self.web, self.ca = c, server, web, ca
        assert c.pod is not None
        self.client: SidecarPod = c.pod

    def until(self, status: int, service: str = "web") -> float:
        """Seconds until a meshed GET answers ``status`` (a changed policy reaches kept connections when
        the old chains drained)."""
        start = time.monotonic()
        wait_for(lambda: self.get(service) == status, DRAIN_WAIT, message=f"{service} never answered {status}")
        return time.monotonic() - start

    def get(self, service: str = "web", port: int = 8080, headers: dict[str, str] | None = None) -> int:
        [(status, _)] = self.client.get_many(self.c.cluster_ip(service), port, f"{service}:{port}", 1, "/hello", headers, timeout=10)
        return status

    def unmeshed(self, ip: str, port: int, data: str, wait: float = 0.0) -> bytes:
        """What a plaintext client outside the mesh receives after sending ``data`` (after ``wait`` s)."""
        proc = self.client.ns.run("setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}", "--clear-groups",
                                  "python3", "-c", UNMESHED, ip, str(port), str(wait), data, check=False)
        assert proc.returncode == 0, proc.stderr
        return eval(proc.stdout.strip())  # noqa: S307 - our own repr() of bytes

    def unmeshed_get(self, ip: str = SERVER_IP, port: int = 8080, wait: float = 0.0, extra: str = "") -> bytes:
        return self.unmeshed(ip, port, f"GET /hello HTTP/1.1\\r\\nHost: web\\r\\n{extra}Connection: close\\r\\n\\r\\n", wait)

    def stat(self, pod: SidecarPod, name: str) -> int:
        return pod.stat(name)

    def labels(self, labels: dict[str, str | None], kind: str = "service", name: str = "web") -> None:
        self.c.label(kind, name, labels)

    def wait_listener(self, predicate: Any, message: str) -> None:
        self.c.wait_config(lambda: predicate(self.server.listener_config("inbound")), timeout=15, message=message)


@pytest.fixture(scope="module")
def rig(envoy_binary: str) -> Iterator[Rig]:
    _require_netns()
    ca = MeshTestCA()
    client_dir = ca.identity_dir(CLIENT_ID)
    server_dir = ca.identity_dir(f"spiffe://{TD}/ns/default/sa/web")
    options = argparse.Namespace(mtls=True, trust_domain=TD)
    with LocalCluster([PLAIN_IP], options=options, client_cwd=client_dir) as c:
        c.apply(join(
            meshed_pod("web-1", SERVER_IP, "web", "web"),
            plain_pod("plain-1", PLAIN_IP, "plain"),
            service("web", port=8080, labels={"traffic.port.8080": "http"}),
            service("plain", port=8080, labels={"traffic.port.8080": "http"}, app="plain"),
            service("echo", port=7070, labels={"traffic.port.7070": "tcp"}, app="web", http=False),
        ))
        server = c.peer_pod("web-1", SERVER_IP, cwd=server_dir, envoy_args=DRAIN)
        web = c.peer_backend(server, "web", 8080)
        c.backend("plain", PLAIN_IP, 8080)
        from tests.e2e.test_kube_inbound import _PingPong, tcp_server

        echo = server.in_ns(lambda: tcp_server(SERVER_IP, 7070, _PingPong))
        r = Rig(c, server, web, ca)
        r.wait_listener(lambda cfg: "inbound|mtls|http|8080" in cfg, "the server sidecar has no TLS twin chains")
        c.wait_config(lambda: mtls.METADATA_KEY in r.client.admin("/config_dump?include_eds"), timeout=15,
                      message="the client has no endpoint marked for mTLS")
        try:
            yield r
        finally:
            echo.shutdown()


@pytest.fixture
def fresh(rig: Rig) -> Iterator[Rig]:
    """Each test leaves the Services and the Namespace as the fixture made them."""
    yield rig
    for name in ("web", "echo"):
        raw = rig.c.store.get("services", name, "default")["metadata"].get("labels") or {}
        drop: dict[str, str | None] = {k: None for k in raw if k.startswith(("traffic.allow.", "traffic.mtls"))}
        if drop:
            rig.c.label("service", name, drop)
    rig.c.store.patch("namespaces", "default", {"metadata": {"labels": {mtls.MODE: None}}}, patch_type="merge")
    rig.wait_listener(lambda cfg: "trafficmgr.mtls.strict" not in cfg and "trafficmgr.mtls.authz" not in cfg,
                      "the policies did not go away")


def test_tls_on_the_wire_and_the_application_sees_the_callers_identity(fresh: Rig) -> None:
    r = fresh
    client_hs = r.stat(r.client, "cluster.8080|default|web.outbound.ssl.handshake")
    server_hs = r.stat(r.server, f"{INBOUND}.ssl.handshake")
    # A client cannot forge the header: the server's sidecar replaces it with the verified peer's URI.
    assert r.get(headers={"x-forwarded-client-cert": "URI=spiffe://cluster.local/ns/kube-system/sa/admin"}) == 200
    seen = r.web.requests[-1]
    assert seen["headers"]["x-forwarded-client-cert"].endswith(f";URI={CLIENT_ID}"), seen
    assert "kube-system" not in str(seen["headers"])
    assert r.stat(r.client, "cluster.8080|default|web.outbound.ssl.handshake") > client_hs
    assert r.stat(r.server, f"{INBOUND}.ssl.handshake") > server_hs
    assert r.stat(r.server, "http.inbound_http.downstream_rq_total") >= 1
    assert r.c.cp.nacks() == []


def test_plaintext_client_permissive_accepted_strict_refused(fresh: Rig) -> None:
    r = fresh
    answer = r.unmeshed_get(extra="x-forwarded-client-cert: URI=spiffe://cluster.local/ns/x/sa/forged\r\n")
    assert answer.startswith(b"HTTP/1.1 200"), answer
    # Plaintext: the core's connection manager drops a client's XFCC (SANITIZE), so it cannot be forged.
    assert "forged" not in str(r.web.requests[-1]["headers"])
    r.labels({mtls.MODE: mtls.STRICT})
    r.wait_listener(lambda cfg: "trafficmgr.mtls.strict" in cfg, "no strict policy")
    denied = r.stat(r.server, "mtls_strict.rbac.denied")
    assert r.unmeshed_get() in (b"", b"<reset>")  # closed without an answer
    assert r.stat(r.server, "mtls_strict.rbac.denied") > denied
    assert r.get() == 200  # meshed clients still get in
    # The strict policy covers the pod's endpoint ports of that service only: the TCP port of "echo"
    # on the same pod still takes plaintext.
    assert r.unmeshed(SERVER_IP, 7070, "PING\\r\\n") == b"PONG\r\n"


def test_namespace_label_is_the_default_and_a_bad_value_is_reported(fresh: Rig) -> None:
    r = fresh
    r.c.store.patch("namespaces", "default", {"metadata": {"labels": {mtls.MODE: "sometimes"}}}, patch_type="merge")
    wait_for(lambda: next((e for e in r.c.store.list("events", namespace="default")["items"]
                           if e["involvedObject"].get("kind") == "Namespace" and e["reason"] == "InvalidTrafficLabel"
                           and e["message"] == "invalid value 'sometimes' for label traffic.mtls: must be one of permissive, strict, "
                           "disable; the default (permissive) applies"), None),
             10, message="no Event on the Namespace")
    r.c.store.patch("namespaces", "default", {"metadata": {"labels": {mtls.MODE: mtls.STRICT}}}, patch_type="merge")
    r.wait_listener(lambda cfg: "trafficmgr.mtls.strict" in cfg, "the Namespace label made nothing strict")
    assert r.unmeshed_get() in (b"", b"<reset>")
    assert r.unmeshed(SERVER_IP, 7070, "PING\\r\\n") in (b"", b"<reset>")  # "echo" is strict too
    r.labels({mtls.MODE: mtls.PERMISSIVE})  # the Service's own label wins over its Namespace's
    wait_for(lambda: r.unmeshed_get().startswith(b"HTTP/1.1 200"), 10, message="the Service's permissive label did not win")
    assert r.unmeshed(SERVER_IP, 7070, "PING\\r\\n") in (b"", b"<reset>")
    # disable is per Service (clients decide TLS per cluster): refused on a Namespace, with an Event.
    r.c.store.patch("namespaces", "default", {"metadata": {"labels": {mtls.MODE: mtls.DISABLE}}}, patch_type="merge")
    wait_for(lambda: any(e["involvedObject"].get("kind") == "Namespace" and "invalid value 'disable'" in e["message"]
                         for e in r.c.store.list("events", namespace="default")["items"]), 10, message="no Event for disable")


def test_meshed_client_to_an_endpoint_without_sidecar_speaks_plaintext(fresh: Rig) -> None:
    r = fresh
    before = r.stat(r.client, "cluster.8080|default|plain.outbound.ssl.handshake")
    assert r.get("plain") == 200  # TLS to a plain HTTP backend would fail
    assert r.stat(r.client, "cluster.8080|default|plain.outbound.ssl.handshake") == before


def test_disable_sends_plaintext(fresh: Rig) -> None:
    r = fresh
    r.labels({mtls.MODE: mtls.DISABLE})
    r.c.wait_config(lambda: mtls.MATCH_NAME not in _cluster(r.client, "8080|default|web.outbound"), timeout=15,
                    message="the cluster still has the mtls match")
    before = r.stat(r.server, f"{INBOUND}.ssl.handshake")
    assert r.get() == 200
    assert r.stat(r.server, f"{INBOUND}.ssl.handshake") == before
    assert "x-forwarded-client-cert" not in {k.lower() for k in r.web.requests[-1]["headers"]}


def _cluster(pod: SidecarPod, name: str) -> str:
    import json

    for item in json.loads(pod.admin("/config_dump?resource=dynamic_active_clusters")).get("configs", []):
        if item.get("cluster", {}).get("name") == name:
            return json.dumps(item)
    return ""


def test_authorization_by_identity(fresh: Rig) -> None:
    r = fresh
    r.labels({"traffic.allow.sa.default.client": "true"})
    r.labels({"traffic.allow.sa.default.someone-else": "true"}, name="echo")
    r.wait_listener(lambda cfg: "rbac_default_web." in cfg and "rbac_default_echo." in cfg, "no authorization policies")
    assert r.get() == 200
    # HTTP from an identity the Service does not allow: 403, counted per service.
    r.labels({"traffic.allow.sa.default.client": None, "traffic.allow.namespace.shop": "true"})
    r.wait_listener(lambda cfg: "ns/default/sa/client" not in cfg, "the policy still allows the client")
    r.until(403)
    denied = r.stat(r.server, "http.inbound_http.rbac.rbac_default_web.denied")
    assert r.get() == 403
    assert r.stat(r.server, "http.inbound_http.rbac.rbac_default_web.denied") == denied + 1
    # Plaintext from outside the mesh: no identity, denied too (connection closed or 403).
    assert not r.unmeshed_get().startswith(b"HTTP/1.1 200")
    # ... also when it waits out the HTTP inspector (1 s) so the connection takes the TCP chain.
    tcp_denied = r.stat(r.server, "rbac_default_web.rbac.denied")
    assert r.unmeshed_get(wait=1.5) in (b"", b"<reset>")
    assert r.stat(r.server, "rbac_default_web.rbac.denied") == tcp_denied + 1
    # TCP: the meshed client's connection to "echo" is closed.
    echo_denied = r.stat(r.server, "rbac_default_echo.rbac.denied")
    ip = r.c.cluster_ip("echo")
    assert r.client.in_ns(lambda: _ping(ip)) in (b"", b"<reset>")
    assert r.stat(r.server, "rbac_default_echo.rbac.denied") == echo_denied + 1
    r.labels({"traffic.allow.sa.default.client": "true"}, name="echo")
    r.wait_listener(lambda cfg: "ns/default/sa/client" in cfg, "the echo policy does not allow the client")
    assert r.client.in_ns(lambda: _ping(ip)) == b"PONG\r\n"


def _ping(ip: str) -> bytes:
    import socket

    with socket.create_connection((ip, 7070), timeout=5) as s:
        try:
            s.sendall(b"PING\r\n")
            return s.recv(100)
        except ConnectionResetError:
            return b"<reset>"


def test_a_malformed_rule_is_reported_and_denies_that_service_only(fresh: Rig) -> None:
    r = fresh
    r.labels({"traffic.allow.namespace.Not_A_Namespace": "true"})
    event = r.c.wait_event("web", "InvalidTrafficLabel", "traffic.allow.namespace.Not_A_Namespace")
    assert event["message"] == ("label traffic.allow.namespace.Not_A_Namespace: 'Not_A_Namespace' is not a namespace name "
                                "(lowercase letters, digits and '-'): the Service denies every caller until this is fixed")
    r.wait_listener(lambda cfg: "rbac_default_web." in cfg, "no deny-all policy")
    r.until(403)
    assert r.client.in_ns(lambda: _ping(r.c.cluster_ip("echo"))) == b"PONG\r\n"  # same pod, other service
    r.labels({"traffic.allow.sa.default": "yes"}, name="echo")
    r.c.wait_event("echo", "InvalidTrafficLabel", "label traffic.allow.sa.default='yes': the value must be \"true\"")


@pytest.mark.parametrize("labels,text", [
    ({"traffic.allow.sa.default": "true"}, "expected traffic.allow.sa.<namespace>.<serviceaccount>"),
    ({"traffic.allow.everyone": "true"}, "unknown authorization label"),
])
def test_parse_allow_errors(labels: dict[str, str], text: str) -> None:
    _, _, errors = mtls.parse_allow(labels)
    assert len(errors) == 1 and text in errors[0], errors


def test_parse_allow_accepts_serviceaccounts_with_dots() -> None:
    namespaces, accounts, errors = mtls.parse_allow({"traffic.allow.sa.ops.deploy.bot": "true", "traffic.allow.namespace.shop": "true"})
    assert (namespaces, accounts, errors) == (("shop",), (("ops", "deploy.bot"),), [])



def test_http2_crosses_mtls_as_http2(fresh: Rig, tmp_path: Any) -> None:
    """gRPC's transport: HTTP/2 from the client application stays HTTP/2 through both sidecars, over TLS
    (the server's connection manager recognises HTTP/2 by its preface: our ALPN names no HTTP version)."""
    import json
    import os
    import signal
    import subprocess

    from tests.e2e.test_kube_inbound import H2_BACKEND, H2_PORT
    from trafficmgr.core.envoy import find_envoy
    from trafficmgr.testing.netns import world_executable

    r = fresh
    r.c.apply(service("h2", port=H2_PORT, labels={f"traffic.port.{H2_PORT}": "http2"}, app="web"))
    r.wait_listener(lambda cfg: f"inbound|mtls|http|{H2_PORT}" in cfg, "no TLS twin for the h2 port")
    config = tmp_path / "h2.json"
    config.write_text(json.dumps(H2_BACKEND))
    os.chmod(tmp_path, 0o755)
    os.chmod(config, 0o644)
    envoy = subprocess.Popen(r.server.ns.exec_args(world_executable(find_envoy()), "-c", str(config), "--disable-hot-restart",
                                                   "--concurrency", "1", "-l", "warning"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        handshakes = r.stat(r.server, f"{INBOUND}.ssl.handshake")
        h2 = r.stat(r.server, "http.inbound_http.downstream_cx_http2_total")
        ip = r.c.cluster_ip("h2")

        def get() -> str:  # from the application: through the client's sidecar
            proc = r.client.ns.run("curl", "-sS", "-m", "5", "--http2-prior-knowledge", "-o", "/dev/null", "-D", "-",
                                   f"http://{ip}:{H2_PORT}/", check=False)
            return proc.stdout if proc.returncode == 0 and proc.stdout.lower().startswith("http/2 200") else ""

        headers = r.c.wait_config(get, timeout=15, message="no answer from the h2 backend").lower()
        assert "x-backend-protocol: http/2" in headers, headers
        assert r.stat(r.server, f"{INBOUND}.ssl.handshake") > handshakes
        assert r.stat(r.server, "http.inbound_http.downstream_cx_http2_total") > h2
    finally:
        os.killpg(envoy.pid, signal.SIGKILL)
        envoy.wait(5)
        r.c.store.delete("services", "h2", "default")


def test_the_agents_annotation_marks_the_endpoint(fresh: Rig) -> None:
    """A pod's endpoint is sent mTLS only once the node agent annotated it (its sidecar is LIVE), and
    again plaintext when the annotation is cleared (the agent does that when it removes the sidecar)."""
    r = fresh
    late_ip = "10.244.1.77"  # never dialled: only the client's endpoint list is looked at

    def metadata_of(ip: str) -> bool | None:
        import json

        for item in json.loads(r.client.admin("/config_dump?include_eds&resource=dynamic_endpoint_configs")).get("configs", []):
            for loc in item.get("endpoint_config", {}).get("endpoints", []):
                for lb in loc.get("lb_endpoints", []):
                    if lb["endpoint"]["address"]["socket_address"]["address"] == ip:
                        return mtls.METADATA_KEY in json.dumps(lb.get("metadata", {}))
        return None

    r.c.apply(plain_pod("late-1", late_ip, "late") + "---\n" + service("late", port=8080, labels={"traffic.port.8080": "http"}, app="late"))
    try:
        wait_for(lambda: metadata_of(late_ip) is False, 10, message="no plaintext endpoint for late-1")
        r.c.store.patch("pods", "late-1", {"metadata": {"annotations": {"traffic.envoy.proxy": "late-1.default"}}}, "default",
                        patch_type="merge")
        wait_for(lambda: metadata_of(late_ip) is True, 10, message="the annotated pod's endpoint is not marked")
        r.c.store.patch("pods", "late-1", {"metadata": {"annotations": {"traffic.envoy.proxy": ""}}}, "default", patch_type="merge")
        wait_for(lambda: metadata_of(late_ip) is False, 10, message="the cleared annotation left the endpoint marked")
    finally:
        r.c.store.delete("services", "late", "default")
        r.c.store.delete("pods", "late-1", "default")


def test_without_an_inbound_listener_mtls_changes_nothing_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    """Local mode (explicit proxy) or --sidecar-inbound-port 0: nothing on a pod could terminate TLS, so
    clients must not send it."""
    from tests.plugins.golden_cases import HERE, builtin_plugins
    from trafficmgr.core import cache
    from trafficmgr.core.translate.builder import default_options
    from trafficmgr.testing.golden import build_from_manifests, load_manifests

    def clusters(**options: Any) -> str:
        opts = default_options()
        for k, v in options.items():
            setattr(opts, k, v)
        snaps, _ = build_from_manifests(load_manifests(HERE / "mtls_mesh.in.yaml"), builtin_plugins(), opts)
        return str([r.message for r in snaps["sidecar"].types[cache.CLUSTER].resources.values()])

    assert mtls.ALPN_HTTP in clusters(mtls=True)
    mtls._warned.clear()
    with caplog.at_level("ERROR", logger=mtls.__name__):
        assert mtls.ALPN_HTTP not in clusters(mtls=True, sidecar_inbound_port=0)
    assert "--mtls is ignored: the sidecars have no inbound listener" in caplog.text


def test_server_first_protocol_over_mtls_is_not_delayed(fresh: Rig) -> None:
    """The client's sidecar starts TLS as soon as the application connects, so the server's TLS
    inspector has bytes at once: a server-first protocol's greeting arrives without waiting for the
    inspector's 1 s timeout (a plaintext client of such a protocol does wait it out under --mtls)."""
    import socket

    from tests.e2e.test_kube_inbound import GREETING, _Greeting, tcp_server

    r = fresh
    greeter = r.server.in_ns(lambda: tcp_server(SERVER_IP, 2525, _Greeting))
    try:
        r.c.apply(service("greeter", port=2525, labels={"traffic.port.2525": "tcp"}, app="web", http=False))
        ip = r.c.cluster_ip("greeter")
        r.c.wait_config(lambda: "2525|default|greeter.outbound" in _cluster(r.client, "2525|default|greeter.outbound"),
                        timeout=15, message="no greeter cluster")
        handshakes = r.stat(r.server, f"{INBOUND}.ssl.handshake")

        def greet() -> tuple[bytes, float]:
            start = time.monotonic()
            with socket.create_connection((ip, 2525), timeout=5) as s:
                data = s.recv(100)
                s.sendall(b"QUIT\r\n")
            return data, time.monotonic() - start

        data, took = r.client.in_ns(greet)
        assert data == GREETING
        assert took < 0.9, f"greeting took {took:.2f}s"
        assert r.stat(r.server, f"{INBOUND}.ssl.handshake") > handshakes
    finally:
        greeter.shutdown()
        r.c.store.delete("services", "greeter", "default")


def test_plan_from_the_model_delta_equals_a_fresh_plan() -> None:
    """The policy plan reuses the last one when a build's delta names no policy-relevant change (a pod of an
    unrelated Service, a new plain Service), and recomputes otherwise: after every step it equals a plan made
    from scratch without a delta. Fails if the fast path ignores endpoint changes of strict Services,
    authorization or Namespace-mode changes."""
    import attrs
    import yaml

    from trafficmgr.core.kube import assemble
    from trafficmgr.core.kube.assemble import Assembler
    from trafficmgr.core.kube.client import Kind
    from trafficmgr.core.plugins import PluginHost

    host = PluginHost.load(["mtls"])
    kinds = host.collect("trafficmgr_watch_kinds")
    asm = Assembler(host.labels, kinds)
    by_name = {k.kind: Kind(k.kind, k.api_version, k.plural, k.namespaced) for k in kinds}
    options = argparse.Namespace(mtls=True, trust_domain="cluster.local", sidecar_inbound_port=15006)

    def svc(name: str, labels: dict[str, str] | None = None, ns: str = "default") -> dict[str, Any]:
        obj: dict[str, Any] = yaml.safe_load(service(name, labels=labels, namespace=ns))
        obj["metadata"]["uid"] = f"uid-{ns}-{name}"
        obj["spec"]["clusterIP"] = f"10.96.3.{len(name)}"
        return obj

    def slice_of(name: str, ips: list[str], ns: str = "default") -> dict[str, Any]:
        return {"metadata": {"name": f"{name}-x", "namespace": ns, "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4", "ports": [{"name": "http", "port": 9080}],
                "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips]}

    def event(etype: str, kind: Any, obj: dict[str, Any]) -> None:
        asm.apply(etype, kind, obj)
        if kind is assemble.SERVICE:  # the plugin's own Service and Namespace watches see the same objects
            asm.apply(etype, by_name[mtls.AUTHZ], obj)
        if kind is assemble.NAMESPACE:
            asm.apply(etype, by_name[mtls.NAMESPACE_MODES], obj)

    steps: list[list[tuple[str, Any, dict[str, Any]]]] = [
        [("ADDED", assemble.SERVICE, svc("plain")), ("ADDED", assemble.ENDPOINT_SLICE, slice_of("plain", ["10.1.0.1"]))],
        [("ADDED", assemble.SERVICE, svc("locked", {mtls.MODE: mtls.STRICT})),
         ("ADDED", assemble.ENDPOINT_SLICE, slice_of("locked", ["10.1.1.1"]))],
        [("MODIFIED", assemble.ENDPOINT_SLICE, slice_of("plain", ["10.1.0.1", "10.1.0.2"]))],  # unrelated: fast path
        [("MODIFIED", assemble.ENDPOINT_SLICE, slice_of("locked", ["10.1.1.1", "10.1.1.2"]))],  # a strict Service's pods
        [("MODIFIED", assemble.SERVICE, svc("plain", {"traffic.allow.namespace.ops": "true"}))],  # authorization
        [("ADDED", assemble.SERVICE, svc("other", ns="shop")), ("ADDED", assemble.ENDPOINT_SLICE, slice_of("other", ["10.2.0.1"], "shop"))],
        [("ADDED", assemble.NAMESPACE, {"metadata": {"name": "shop", "uid": "ns-shop", "labels": {mtls.MODE: mtls.STRICT}}})],
        [("MODIFIED", assemble.SERVICE, svc("plain")), ("MODIFIED", assemble.SERVICE, svc("locked"))],  # policies removed
        [("MODIFIED", assemble.ENDPOINT_SLICE, slice_of("plain", ["10.1.0.3"]))],
    ]
    memo: dict[Any, Any] = {}
    mtls.plan(asm.model(), options, memo=memo)
    fast = 0
    for step in steps:
        for etype, kind, obj in step:
            event(etype, kind, obj)
        model = asm.model()
        last = memo.get("last")
        got = mtls.plan(model, options, memo=memo)
        fast += memo.get("last") is last and last is not None
        assert got == mtls.plan(attrs.evolve(model, delta=None), options, memo={}), step
    assert fast >= 2  # the unrelated endpoint changes reused the last plan
