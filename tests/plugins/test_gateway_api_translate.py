"""gateway_api translation (``translate.py``): golden output for a hand-made Table exercising every field, and
the rules the golden file alone does not make obvious (memoization, contract errors, dropped header
changes, redirect ports). Behaviour through a real Envoy: ``test_gateway_api_envoy.py``.

The golden case is ``tests/golden/gateway_api/full_table.out.yaml``: the whole gateway view (listeners,
route configurations, Secrets, and the clusters, whose ``http`` backends show the gateway's HTTP/1.1
copies) built by the real builder with the ingress and circuit_breaker plugins. Regenerate with
``pytest --update-golden`` and review the diff.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.plugins import gateway_api_tables as T
from trafficmgr.core import cache
from trafficmgr.plugins.gateway_api import translate
from trafficmgr.plugins.gateway_api.table import (
    REGEX,
    Chain,
    HeaderChanges,
    Match,
    Redirect,
    Rewrite,
    Route,
    ServedPort,
    Table,
    VirtualHost,
)
from trafficmgr.testing.golden import build_from_manifests, check_golden, render
from trafficmgr.testing.kit import load_manifests

HERE = Path(__file__).resolve().parents[1] / "golden" / "gateway_api"
IPS = {n: f"10.1.0.{i + 1}" for i, n in enumerate((*T.SERVICES, T.GRPC_SERVICE))}
PEMS = {k: (f"-----BEGIN CERTIFICATE-----\n{k}\n-----END CERTIFICATE-----\n".encode(),
            f"-----BEGIN PRIVATE KEY-----\n{k}\n-----END PRIVATE KEY-----\n".encode()) for k in ("shop", "blog", "default")}
HTTP_PORT, HTTPS_PORT = 18080, 18443


def build(make_table: Any, **options: Any) -> tuple[dict[str, cache.Snapshot], list[str]]:
    return build_from_manifests(load_manifests(T.manifests(IPS)), T.plugins(make_table), T.options(**options))


def full(model: Any) -> Table:
    return T.full_table(model, HTTP_PORT, HTTPS_PORT, PEMS)


def test_golden_full_table(update_golden: bool) -> None:
    snaps, warnings = build(full)
    assert snaps["gateway"].errors() == []
    out = render(snaps, views=["gateway"]) + yaml.safe_dump({"warnings": warnings}, width=200)
    check_golden(out, HERE / "full_table.out.yaml", update_golden)


def test_names_and_refs() -> None:
    snaps, _ = build(full)
    gw = snaps["gateway"]
    assert sorted(gw.types[cache.LISTENER].resources) == [f"gateway_api|{HTTP_PORT}", f"gateway_api|{HTTPS_PORT}"]
    assert sorted(gw.types[cache.ROUTE].resources) == [
        f"gateway_api|{HTTP_PORT}|http", f"gateway_api|{HTTPS_PORT}|blog", f"gateway_api|{HTTPS_PORT}|default",
        f"gateway_api|{HTTPS_PORT}|shop"]
    assert sorted(gw.types[cache.SECRET].resources) == [
        "gateway_api|certs|default-tls", "gateway_api|default|blog-tls", "gateway_api|default|shop-tls"]
    https = gw.types[cache.LISTENER].resources[f"gateway_api|{HTTPS_PORT}"]
    assert (cache.SECRET, "gateway_api|default|shop-tls") in https.refs and (cache.ROUTE, f"gateway_api|{HTTPS_PORT}|shop") in https.refs
    # Secrets go to the gateway view only.
    assert snaps["sidecar"].types[cache.SECRET].resources == {}
    assert not [n for n in snaps["sidecar"].types[cache.LISTENER].resources if n.startswith("gateway_api")]


def test_same_table_same_resources() -> None:
    """An equal Table returns the very same Resource list (nothing rebuilt or serialized); a changed one
    does not."""
    from trafficmgr.core.translate.builder import Builder

    calls: list[int] = []
    tables: dict[str, Any] = {}

    def make(model: Any) -> Table:
        calls.append(1)
        return tables.get("t") or full(model)

    host = T.plugins(make)
    builder = Builder(host, T.options())
    model = _model(host)
    first = builder.build(model)["gateway"]
    assert builder.stats.serialized.get("RouteConfiguration", builder.stats.serialized.get("routes", 0)) > 0, builder.stats.serialized
    second = builder.build(model)["gateway"]
    assert len(calls) == 2  # a new (equal) Table each build
    assert builder.stats.serialized == {}, builder.stats.serialized
    assert second.types[cache.ROUTE] is first.types[cache.ROUTE]
    tables["t"] = Table(full(model).ports[:1])
    third = builder.build(model)["gateway"]
    assert sorted(third.types[cache.LISTENER].resources) == [f"gateway_api|{HTTP_PORT}"]


def _model(host: Any) -> Any:
    """The model of the test manifests (as build_from_manifests assembles it)."""
    from trafficmgr.apiserver.controllers import Controllers
    from trafficmgr.apiserver.store import Store
    from trafficmgr.core.controlplane import kinds_of
    from trafficmgr.core.kube.assemble import Assembler

    store = Store()
    controllers = Controllers(store, endpointslices=True)
    controllers.start()
    try:
        for obj in load_manifests(T.manifests(IPS)):
            store.create(obj)
        controllers.wait_idle()
    finally:
        controllers.stop()
    asm = Assembler(host.labels, host.collect("trafficmgr_watch_kinds"))
    for kind in kinds_of(host):
        asm.apply("RELIST", kind, store.list(kind.plural)["items"])
    return asm.model()


def _routes(snaps: dict[str, cache.Snapshot], name: str) -> list[Any]:
    rc = snaps["gateway"].types[cache.ROUTE].resources[name].message()
    return [r for vh in rc.virtual_hosts for r in vh.routes]


def test_a_route_that_cannot_be_spelled_answers_500_alone(caplog: pytest.LogCaptureFixture) -> None:
    def make(model: Any) -> Table:
        bad = Route(Match(REGEX, "/r.*"), T.to(model, "web"), rewrite=Rewrite(None, "ReplacePrefixMatch", "/x"), source="bad")
        good = Route(T.prefix("/"), T.to(model, "web"), source="good")
        return Table((ServedPort(HTTP_PORT, "HTTP", (Chain("http", (VirtualHost("*", (bad, good)),)),)),))

    snaps, _ = build(make)
    bad, good = _routes(snaps, f"gateway_api|{HTTP_PORT}|http")
    assert bad.name == "bad" and bad.match.safe_regex.regex == "/r.*" and bad.direct_response.status == 500
    assert "ReplacePrefixMatch needs a PathPrefix match" in bad.direct_response.body.inline_string
    assert good.route.cluster == f"{T.HTTP_PORT}|default|web.outbound"
    assert "cannot be translated" in caplog.text


@pytest.mark.parametrize(("ports", "error"), [
    (lambda ch: (ServedPort(1, "HTTP", (ch("a"), ch("b"))),), "an HTTP port has exactly one chain"),
    (lambda ch: (ServedPort(1, "TCP", (ch("a"),)),), "protocol 'TCP'"),
    (lambda ch: (ServedPort(1, "HTTPS", (ch("a"),)),), "has no certificate Secret"),
    (lambda ch: (ServedPort(1, "HTTPS", (ch("a", True), ch("b", True))),), "same server name '\\(default certificate\\)'"),
    (lambda ch: (ServedPort(1, "HTTPS", (ch("a", True, ("a.test", "b.test")), ch("b", True, ("B.test",)))),), "same server name 'b.test'"),
    (lambda ch: (ServedPort(1, "HTTP", (Chain("a", (VirtualHost("x.test", ()), VirtualHost("X.test", ()))),)),), "lists virtual host"),
    (lambda ch: (ServedPort(1, "HTTP", (ch("a"),)), ServedPort(1, "HTTP", (ch("a"),))), "listed twice"),
])
def test_structural_contract_errors(ports: Any, error: str) -> None:
    """What Envoy would reject as a whole is a ValueError (the hook keeps its last good resources)."""
    def chain(name: str, tls: bool = False, sni: tuple[str, ...] = ()) -> Chain:
        return Chain(name, (VirtualHost("*", ()),), server_names=sni, secret=("ns", "s") if tls else None,
                     cert_pem=b"c" if tls else b"", key_pem=b"k" if tls else b"")

    with pytest.raises(ValueError, match=error):
        translate.resources(Table(ports(chain)), _NoBuild())


class _NoBuild:
    """A context whose use means the check came too late."""

    memo: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"ctx.{name} used before the table was checked")


def test_header_changes_envoy_refuses_are_dropped(caplog: pytest.LogCaptureFixture) -> None:
    def make(model: Any) -> Table:
        changes = HeaderChanges(set=((":path", "/x"), ("Host", "h.example.com"), ("ok", "1")),
                                add=(("bad name", "v"), ("x-crlf", "a\r\nb")), remove=("host", ":authority", "X-Gone"))
        r = Route(T.prefix("/"), T.to(model, "web"), request_headers=changes, response_headers=HeaderChanges(set=((":status", "201"),)),
                  source="h")
        return Table((ServedPort(HTTP_PORT, "HTTP", (Chain("http", (VirtualHost("*", (r,)),)),)),))

    snaps, _ = build(make)
    (r,) = _routes(snaps, f"gateway_api|{HTTP_PORT}|http")
    assert [(h.header.key, h.header.value) for h in r.request_headers_to_add] == [("ok", "1")]
    assert list(r.request_headers_to_remove) == ["x-gone"]
    assert r.route.host_rewrite_literal == "h.example.com"
    assert list(r.response_headers_to_add) == []
    for name in (":path", "bad name", "x-crlf", ":authority", ":status"):
        assert f"header {name!r} cannot be modified" in caplog.text


@pytest.mark.parametrize(("protocol", "port", "redirect", "scheme", "expected_port"), [
    ("HTTP", 80, Redirect(), "", 0),  # listener port 80 on http: not written
    ("HTTP", 8080, Redirect(), "", 8080),  # the listener's port
    ("HTTPS", 443, Redirect(), "", 0),
    ("HTTPS", 8443, Redirect(), "", 8443),
    ("HTTP", 8080, Redirect(scheme="https"), "https", 0),  # a scheme: its well-known port
    ("HTTPS", 8443, Redirect(scheme="http"), "http", 0),
    ("HTTP", 8080, Redirect(scheme="https", port=443), "https", 0),
    ("HTTP", 8080, Redirect(scheme="https", port=8443), "https", 8443),
    ("HTTP", 8080, Redirect(port=80), "", 0),
    ("HTTPS", 8443, Redirect(port=80), "", 80),  # https on 80: not its well-known port, written
])
def test_redirect_ports(protocol: str, port: int, redirect: Redirect, scheme: str, expected_port: int) -> None:
    from envoy.config.route.v3 import route_components_pb2

    out = route_components_pb2.RedirectAction()
    translate._redirect(out, redirect, T.prefix("/"), ServedPort(port, protocol, ()))
    assert (out.scheme_redirect, out.port_redirect, out.response_code) == (scheme, expected_port, out.FOUND)


def test_redirect_codes_and_paths() -> None:
    from envoy.config.route.v3 import route_components_pb2 as rc

    codes = {}
    for code in (301, 302, 303, 307, 308):
        out = rc.RedirectAction()
        translate._redirect(out, Redirect(status_code=code), T.prefix("/"), ServedPort(80, "HTTP", ()))
        codes[code] = out.response_code
    assert codes == {301: rc.RedirectAction.MOVED_PERMANENTLY, 302: rc.RedirectAction.FOUND, 303: rc.RedirectAction.SEE_OTHER,
                     307: rc.RedirectAction.TEMPORARY_REDIRECT, 308: rc.RedirectAction.PERMANENT_REDIRECT}
    with pytest.raises(ValueError, match="redirect status code 304"):
        translate._redirect(rc.RedirectAction(), Redirect(status_code=304), T.prefix("/"), ServedPort(80, "HTTP", ()))
