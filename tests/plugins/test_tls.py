"""tls plugin: HTTPS on the gateway's one port, through a real gateway Envoy and Python's ``ssl`` client.

Certificates come from a throwaway CA made with ``openssl`` (tests/plugins/tlscerts.py); the client
verifies the chain against it and reads the presented certificate's serial number.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.plugins.gateway import served_by
from tests.plugins.tlscerts import CA, Cert, https_get, make_ca, make_leaf, secret_yaml, tls_handshake
from trafficmgr.core import cache
from trafficmgr.core.plugins import PluginError, PluginHost
from trafficmgr.testing.cluster import GatewayCluster
from trafficmgr.testing.golden import build_from_manifests, load_manifests

ROOT = Path(__file__).resolve().parents[2]

BACKENDS = """
apiVersion: v1
kind: Service
metadata: {name: shop, namespace: default}
spec:
  selector: {app: shop}
  ports: [{name: http, port: 8080, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: shop-1, namespace: default, labels: {app: shop}}
spec: {nodeName: node-1, containers: [{name: app, image: shop}]}
status: {podIP: 127.0.11.1, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Service
metadata: {name: blog, namespace: default}
spec:
  selector: {app: blog}
  ports: [{name: http, port: 8080, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: blog-1, namespace: default, labels: {app: blog}}
spec: {nodeName: node-1, containers: [{name: app, image: blog}]}
status: {podIP: 127.0.11.2, conditions: [{type: Ready, status: "True"}]}
"""

INGRESS = """
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: https, namespace: default}
spec:
  ingressClassName: traffic
  tls:
  - {hosts: [shop.example.com], secretName: shop-tls}
  - {hosts: ["*.blog.example.com"], secretName: blog-tls}
  - {hosts: [broken.example.com], secretName: broken-tls}
  rules:
  - host: shop.example.com
    http:
      paths: [{path: /, pathType: Prefix, backend: {service: {name: shop, port: {number: 8080}}}}]
  - host: "*.blog.example.com"
    http:
      paths: [{path: /, pathType: Prefix, backend: {service: {name: blog, port: {number: 8080}}}}]
  - host: broken.example.com
    http:
      paths: [{path: /, pathType: Prefix, backend: {service: {name: shop, port: {number: 8080}}}}]
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[CA, dict[str, Cert]]:
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d)
    certs = {
        "shop": make_leaf(ca, d, ["shop.example.com"], 0x5101),
        "shop2": make_leaf(ca, d, ["shop.example.com"], 0x5102, rsa=True),
        "blog": make_leaf(ca, d, ["*.blog.example.com"], 0xB109),
        "broken": make_leaf(ca, d, ["broken.example.com"], 0xB0B0),
    }
    return ca, certs


@pytest.fixture(params=["sotw", "delta"])
def gw(request: pytest.FixtureRequest, envoy_binary: str, pki: tuple[CA, dict[str, Cert]]) -> Iterator[GatewayCluster]:
    ca, certs = pki
    with GatewayCluster(delta=request.param == "delta") as c:
        c.backend("shop", "127.0.11.1", 8080)
        c.backend("blog", "127.0.11.2", 8080)
        c.apply(BACKENDS)
        c.apply(secret_yaml("shop-tls", certs["shop"].cert, certs["shop"].key))
        c.apply(secret_yaml("blog-tls", certs["blog"].cert, certs["blog"].key))
        # A key that belongs to another certificate: Envoy would reject this secret.
        c.apply(secret_yaml("broken-tls", certs["broken"].cert, certs["shop"].key))
        c.apply(INGRESS)
        c.wait_config(lambda: _serial(c, ca, "shop.example.com") == 0x5101, message="TLS not served")
        yield c
        assert c.cp.nacks() == [], f"Envoy rejected config: {c.cp.nacks()}"


def _serial(c: GatewayCluster, ca: CA, sni: str) -> int | None:
    return tls_handshake("127.0.0.1", c.gateway_port, sni, str(ca.cert_path))[0]


def test_sni_presents_the_right_certificate(gw: GatewayCluster, pki: tuple[CA, dict[str, Cert]]) -> None:
    ca, _ = pki
    serial, alpn = tls_handshake("127.0.0.1", gw.gateway_port, "shop.example.com", str(ca.cert_path))
    assert (serial, alpn) == (0x5101, "h2")
    assert tls_handshake("127.0.0.1", gw.gateway_port, "shop.example.com", str(ca.cert_path), alpn=("http/1.1",))[1] == "http/1.1"
    assert _serial(gw, ca, "a.blog.example.com") == 0xB109
    # HTTPS requests reach the backend of that host (hostname verified against the test CA).
    status, body = https_get("127.0.0.1", gw.gateway_port, "shop.example.com", "/cart", str(ca.cert_path))
    assert status == 200 and json.loads(body)["backend"] == "shop"
    status, body = https_get("127.0.0.1", gw.gateway_port, "x.blog.example.com", "/", str(ca.cert_path))
    assert status == 200 and json.loads(body)["backend"] == "blog"
    # Plain HTTP on the same port keeps working.
    assert served_by(gw, "/", "shop.example.com") == (200, "shop")
    # An SNI no chain serves: the handshake fails (no default certificate configured).
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _serial(gw, ca, "unknown.example.com")


def test_rotation_without_restart(gw: GatewayCluster, pki: tuple[CA, dict[str, Cert]]) -> None:
    ca, certs = pki
    pid = gw.envoy.pid
    modified = lambda: json.loads(gw.envoy.admin("/stats?format=json&filter=^listener_manager.listener_modified$"))["stats"][0]["value"]  # noqa: E731
    before = modified()
    gw.apply(secret_yaml("shop-tls", certs["shop2"].cert, certs["shop2"].key))
    gw.wait_config(lambda: _serial(gw, ca, "shop.example.com") == 0x5102, message="rotated certificate not served")
    assert gw.envoy.pid == pid and gw.envoy.proc.poll() is None
    # The rotation did not replace the listener (no drain): only the secret changed.
    assert modified() == before


def test_bad_secret_only_that_host_loses_tls(gw: GatewayCluster, pki: tuple[CA, dict[str, Cert]]) -> None:
    ca, certs = pki
    # (A "not found" Event may come first when the Ingress is seen before its Secret.)
    ev = gw.wait_event("https", "IngressTLSSecretInvalid", "does not match")
    assert "broken-tls" in ev["message"] and "broken.example.com" in ev["message"]
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _serial(gw, ca, "broken.example.com")
    assert served_by(gw, "/", "broken.example.com") == (200, "shop")  # plain HTTP still served
    assert _serial(gw, ca, "shop.example.com") == 0x5101
    # A bad PEM pushed over the good shop secret: shop loses TLS, nothing is NACKed, blog is untouched.
    gw.apply(secret_yaml("shop-tls", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", certs["shop"].key))
    gw.wait_event("https", "IngressTLSSecretInvalid", "shop-tls")

    def shop_tls_gone() -> bool:
        try:
            _serial(gw, ca, "shop.example.com")
        except (ssl.SSLError, ConnectionError):
            return True
        return False

    gw.wait_config(shop_tls_gone, message="invalid secret still served")
    assert _serial(gw, ca, "a.blog.example.com") == 0xB109
    # Fixing the Secret brings TLS back for that host.
    gw.apply(secret_yaml("broken-tls", certs["broken"].cert, certs["broken"].key))
    gw.wait_config(lambda: _serial(gw, ca, "broken.example.com") == 0xB0B0)
    assert gw.cp.nacks() == []


def test_missing_secret_then_created(gw: GatewayCluster, pki: tuple[CA, dict[str, Cert]]) -> None:
    ca, certs = pki
    gw.apply(INGRESS.replace("broken-tls", "later-tls"))
    gw.wait_event("https", "IngressTLSSecretInvalid", "'later-tls' (type kubernetes.io/tls) not found")
    gw.apply(secret_yaml("later-tls", certs["broken"].cert, certs["broken"].key))
    gw.wait_config(lambda: _serial(gw, ca, "broken.example.com") == 0xB0B0)
    assert [e for e in gw.events("https") if e["reason"] == "IngressTLSSecretInvalid"]


def test_secrets_go_to_gateways_only() -> None:
    """The sidecar view never holds a Secret; Opaque Secrets and unreferenced TLS Secrets are not served."""
    snaps, _ = build_from_manifests(load_manifests(ROOT / "tests/golden/plugins/tls_hosts.in.yaml"), PluginHost.load())
    assert snaps["sidecar"].types[cache.SECRET].resources == {}
    assert sorted(snaps["gateway"].types[cache.SECRET].resources) == ["default/default-tls", "default/shop-tls", "default/wildcard-tls"]
    # The tls plugin builds on the ingress plugin: selecting it alone is one clear startup error.
    with pytest.raises(PluginError, match="plugin 'tls' needs plugin 'ingress', which is not selected"):
        PluginHost.load(["tls"])


def test_validate_rejects_what_envoy_would(pki: tuple[CA, dict[str, Cert]]) -> None:
    from trafficmgr.plugins.tls.certs import validate

    _, certs = pki
    good = certs["shop"]
    assert validate(good.cert, good.key) == ""
    assert validate(certs["shop2"].cert, certs["shop2"].key) == ""  # RSA
    assert "does not match" in validate(good.cert, certs["shop2"].key)
    assert "does not match" in validate(good.cert, certs["blog"].key)
    assert "not a PEM" in validate("hello", good.key)
    assert "empty" in validate("", good.key)
    assert "encrypted" in validate(good.cert, good.key.replace("PRIVATE KEY", "ENCRYPTED PRIVATE KEY"))
    assert "private key" in validate(good.cert, "garbage")


def test_only_referenced_tls_secrets_are_in_the_model(pki: tuple[CA, dict[str, Cert]], tmp_path: Path) -> None:
    import yaml

    from trafficmgr.core.controlplane import kinds_of
    from trafficmgr.core.kube.assemble import Assembler

    _, certs = pki
    plugins = PluginHost.load(["ingress", "tls"])
    asm = Assembler(plugins.labels, plugins.collect("trafficmgr_watch_kinds"))
    secrets = [yaml.safe_load(secret_yaml(n, certs["shop"].cert, certs["shop"].key)) for n in ("shop-tls", "unused-tls")]
    for s in secrets:
        s["metadata"]["uid"] = s["metadata"]["name"]
    ingress = yaml.safe_load(INGRESS)
    kinds = {k.kind: k for k in kinds_of(plugins)}
    asm.apply("RELIST", kinds["Secret"], secrets)
    assert asm.model().extra["Secret"] == {}  # no Ingress yet
    asm.apply("ADDED", kinds["Ingress"], ingress)
    assert sorted(asm.model().extra["Secret"]) == [("default", "shop-tls")]
    asm.apply("DELETED", kinds["Ingress"], ingress)
    assert asm.model().extra["Secret"] == {}
