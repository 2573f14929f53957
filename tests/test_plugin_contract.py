"""The plugin contract as third-party plugins meet it (docs/plugins.md, "Changes for existing plugins"):

- wrapper implementations are refused at registration;
- dependencies (``TRAFFICMGR_DEPENDS``): missing, cyclic and malformed ones are startup errors, and a
  plugin's hooks run before those of the plugins it depends on;
- ``trafficmgr_endpoints`` gets ``pairs`` that stay right after an earlier plugin removed lb_endpoints;
- hooks receive ``role`` / ``listener_name`` / ``service`` / ``port`` as arguments, with the documented
  values (``shared`` for clusters, ``gateway`` for Ingress routes, ``service=None`` for the inbound
  connection manager);
- old implementations that declare fewer arguments still run; one that reads a removed ``ctx`` field is
  isolated and the build goes on.

Probe plugins are objects passed as ``extra`` to :meth:`PluginHost.load`; they record what they receive.
"""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2

from trafficmgr.core import cache, metrics
from trafficmgr.core.model import Endpoint, Labels, Model, Service, ServicePort
from trafficmgr.core.plugins import PluginError, PluginHost, dependency_order
from trafficmgr.core.translate.builder import Builder
from trafficmgr.plugin import GATEWAY, HCM_FILTER, SHARED, SIDECAR, hookimpl
from trafficmgr.plugins.ingress.ir import INGRESS, PREFIX, Backend, Ingress, IngressPath, IngressRule

WEB_PORT = ServicePort("http", 80, 8080, "http")
WEB = Service("default", "web", (WEB_PORT,), cluster_ip="10.96.0.10")
WEB_CLUSTER = WEB.cluster_name(WEB_PORT)
WEIGHT = "traffic.endpoint.weight"


def endpoint(host: int, weight: int | None = None) -> Endpoint:
    labels = Labels({WEIGHT: weight}) if weight is not None else Labels()
    return Endpoint(f"10.244.0.{host}", 8080, pod=f"web-{host}", namespace="default", labels=labels)


def web_model(*endpoints: Endpoint, extra: dict[str, Any] | None = None) -> Model:
    return Model(services={WEB.key: WEB}, endpoints={("default", "web", "http"): endpoints or (endpoint(1),)},
                 extra=extra or {})


def resource(snaps: dict[str, cache.Snapshot], view: str, type_url: str, name: str) -> Any:
    return snaps[view].types[type_url].resources[name].message()


def hcms(listener: listener_pb2.Listener) -> list[hcm_pb2.HttpConnectionManager]:
    out = []
    for chain in listener.filter_chains:
        for f in chain.filters:
            if f.name == HCM_FILTER:
                hcm = hcm_pb2.HttpConnectionManager()
                f.typed_config.Unpack(hcm)
                out.append(hcm)
    return out


def call_order(host: PluginHost, hook: str) -> list[str]:
    """Plugin names in the order the host calls ``hook``."""
    return [impl.plugin_name for impl in host._impls(hook)]  # noqa: SLF001 - the order is what is under test


# -- wrappers ---------------------------------------------------------------------------------------------


class NewStyleWrapper:
    @hookimpl(wrapper=True)
    def trafficmgr_cluster(self, cluster: Any) -> Any:
        return (yield)


class OldStyleWrapper:
    @hookimpl(hookwrapper=True)
    def trafficmgr_cluster(self, cluster: Any) -> Any:
        yield


@pytest.mark.parametrize("plugin", [NewStyleWrapper, OldStyleWrapper], ids=["wrapper", "hookwrapper"])
def test_wrapper_implementations_are_refused(plugin: type) -> None:
    with pytest.raises(PluginError) as exc:
        PluginHost.load([], extra=[("wrapping", plugin())])
    assert str(exc.value) == (
        "plugin 'wrapping' is invalid: trafficmgr_cluster is a wrapper implementation (wrapper=True or "
        "hookwrapper=True); trafficmgr calls every implementation itself to isolate its errors, so wrappers "
        "would never run: use a plain @hookimpl")
    # Refused means not registered: nothing of it is left behind on a host that goes on.
    host = PluginHost()
    obj = plugin()
    with pytest.raises(PluginError):
        host.register("wrapping", obj)
    assert not host.pm.is_registered(obj) and host._impls("trafficmgr_cluster") == ()  # noqa: SLF001
    assert "wrapping" not in host.infos


# -- dependencies ---------------------------------------------------------------------------------------


class Resources:
    """A plugin with one contribution hook, declaring ``depends``."""

    def __init__(self, *depends: str) -> None:
        self.TRAFFICMGR_DEPENDS = depends

    @hookimpl
    def trafficmgr_resources(self) -> list[Any]:
        return []


def test_tls_without_ingress_is_refused_naming_ingress() -> None:
    with pytest.raises(PluginError) as exc:
        PluginHost.load(["tls"])
    assert str(exc.value) == ("plugin 'tls' needs plugin 'ingress', which is not selected: "
                              "add ingress to --plugins / TRAFFICMGR_PLUGINS, or deselect tls")
    assert PluginHost.load(["ingress", "tls"]).infos["tls"].depends == ("ingress",)


def test_missing_dependency_that_is_not_installed() -> None:
    with pytest.raises(PluginError, match=r"plugin 'a' needs plugin 'nowhere', which is not installed: install nowhere"):
        PluginHost.load([], extra=[("a", Resources("nowhere"))])


def test_dependency_cycle_is_refused_naming_the_cycle() -> None:
    with pytest.raises(PluginError) as exc:
        PluginHost.load([], extra=[("a", Resources("b")), ("b", Resources("a"))])
    assert str(exc.value) == "plugins depend on each other in a cycle: a -> b -> a"


@pytest.mark.parametrize("value", ["ingress", ("ingress", 3), ("",),
                                   None, 3],
                         ids=["string", "not-a-name", "empty-name", "none", "number"])
def test_malformed_depends_is_refused(value: Any) -> None:
    plugin = Resources()
    plugin.TRAFFICMGR_DEPENDS = value
    with pytest.raises(PluginError) as exc:
        PluginHost.load(["ingress"], extra=[("bad", plugin)])
    assert str(exc.value) == f"plugin 'bad': TRAFFICMGR_DEPENDS must be a tuple of plugin names, not {value!r}"


def test_dependency_order_puts_dependencies_first() -> None:
    # Names sorted the other way round, so only the dependencies can explain the order.
    plugins = {"a": Resources("m"), "m": Resources("z"), "z": Resources(), "b": Resources("z")}
    order = dependency_order(plugins)
    assert sorted(order) == sorted(plugins)
    assert order.index("z") < order.index("m") < order.index("a")
    assert order.index("z") < order.index("b")
    assert order == ["z", "m", "a", "b"]  # otherwise by name: deterministic


def test_a_plugins_hooks_run_before_those_it_depends_on() -> None:
    host = PluginHost.load(["ingress", "tls"])
    order = call_order(host, "trafficmgr_resources")
    assert order.index("tls") < order.index("ingress"), order
    # tls/ingress also sort that way by name: extras whose names sort the other way round.
    host = PluginHost.load([], extra=[("a_dependent", Resources("zz_base")), ("zz_base", Resources())])
    assert call_order(host, "trafficmgr_resources") == ["a_dependent", "zz_base"]


# -- endpoints pairs ------------------------------------------------------------------------------------


class PairsProbe:
    """Runs after every other plugin (``trylast``) and records the pairs it gets."""

    def __init__(self) -> None:
        self.seen: list[list[tuple[str, str]]] = []

    @hookimpl(trylast=True)
    def trafficmgr_endpoints(self, assignment: Any, pairs: Any) -> None:
        self.seen.append([(p.endpoint.address, p.lb_endpoint.endpoint.address.socket_address.address) for p in pairs])


def test_endpoint_pairs_stay_matched_after_an_earlier_plugin_removed_one() -> None:
    probe = PairsProbe()
    host = PluginHost.load(["lb"], extra=[("probe", probe)])
    assert call_order(host, "trafficmgr_endpoints") == ["lb", "probe"], "the probe must run after lb"
    snaps = Builder(host).build(web_model(endpoint(1), endpoint(2, weight=0), endpoint(3, weight=7)))
    assert probe.seen == [[("10.244.0.1", "10.244.0.1"), ("10.244.0.3", "10.244.0.3")]]
    cla = resource(snaps, SIDECAR, cache.ENDPOINT, WEB_CLUSTER)
    built = [(lb.endpoint.address.socket_address.address, lb.load_balancing_weight.value) for lb in cla.endpoints[0].lb_endpoints]
    assert built == [("10.244.0.1", 100), ("10.244.0.3", 7)]


class FirstRemover:
    """An implementation without ``pairs`` that removes the first lb_endpoint (runs first)."""

    @hookimpl(tryfirst=True)
    def trafficmgr_endpoints(self, assignment: Any) -> None:
        del assignment.endpoints[0].lb_endpoints[0]


def test_endpoint_pairs_are_matched_by_address_when_a_plugin_without_pairs_removed_one_first() -> None:
    """The first ``pairs`` are made after a removal by an implementation that never asked for pairs:
    zipping with ``endpoints`` would shift every pair by one."""
    probe = PairsProbe()
    host = PluginHost.load([], extra=[("remover", FirstRemover()), ("probe", probe)])
    assert call_order(host, "trafficmgr_endpoints") == ["remover", "probe"]
    Builder(host).build(web_model(endpoint(1), endpoint(2), endpoint(3)))
    assert probe.seen == [[("10.244.0.2", "10.244.0.2"), ("10.244.0.3", "10.244.0.3")]]


# -- arguments: role, listener_name, service, port ------------------------------------------------------


class ArgumentsProbe:
    """Records the arguments of every build hook it implements."""

    def __init__(self) -> None:
        self.calls: dict[str, list[tuple[Any, ...]]] = {}

    def _record(self, hook: str, *args: Any) -> None:
        self.calls.setdefault(hook, []).append(args)

    @hookimpl
    def trafficmgr_cluster(self, cluster: Any, service: Any, port: Any, role: str, ctx: Any) -> None:
        self._record("cluster", cluster.name, service.name, port.name, role, ctx.role)

    @hookimpl
    def trafficmgr_endpoints(self, assignment: Any, role: str, ctx: Any) -> None:
        self._record("endpoints", assignment.cluster_name, role, ctx.role)

    @hookimpl
    def trafficmgr_virtual_host(self, vhost: Any, service: Any, role: str) -> None:
        self._record("virtual_host", vhost.name, service.name, role)

    @hookimpl
    def trafficmgr_route(self, route: Any, service: Any, port: Any, role: str) -> None:
        self._record("route", route.route.cluster, service.name, port.name, role)

    @hookimpl
    def trafficmgr_http_connection_manager(self, hcm: Any, role: str, listener_name: str, service: Any, port: Any) -> None:
        self._record("hcm", role, listener_name, service.name if service else None, port.name if port else None)

    @hookimpl
    def trafficmgr_listener(self, listener: Any, role: str, listener_name: str) -> None:
        self._record("listener", listener.name, role, listener_name)

    @hookimpl
    def trafficmgr_http_filters(self, role: str, ctx: Any) -> list[Any]:
        self._record("http_filters", role, ctx.role)
        return []

    @hookimpl
    def trafficmgr_resources(self, role: str, model: Any, ctx: Any) -> list[Any]:
        self._record("resources", role, model is ctx.model)
        return []


def test_sidecar_hooks_get_role_listener_name_service_and_port() -> None:
    probe = ArgumentsProbe()
    Builder(PluginHost.load([], extra=[("probe", probe)])).build(web_model())
    calls = probe.calls
    assert calls["cluster"] == [(WEB_CLUSTER, "web", "http", SHARED, SHARED)]
    assert calls["endpoints"] == [(WEB_CLUSTER, SHARED, SHARED)]
    assert calls["virtual_host"] == [("web.default:80", "web", SIDECAR)]
    assert calls["route"] == [(WEB_CLUSTER, "web", "http", SIDECAR)]
    # The outbound chain of web:80 names its service; the inbound connection manager is shared.
    assert sorted(calls["hcm"], key=str) == [(SIDECAR, "inbound", None, None), (SIDECAR, "outbound", "web", "http")]
    assert sorted(calls["listener"]) == [("inbound", SIDECAR, "inbound"), ("outbound", SIDECAR, "outbound")]
    assert calls["http_filters"] == [(SIDECAR, SIDECAR)]
    assert calls["resources"] == [(SIDECAR, True), (GATEWAY, True)]


def test_ingress_routes_get_role_gateway() -> None:
    probe = ArgumentsProbe()
    ingress = Ingress("default", "web", class_name="traffic",
                      rules=(IngressRule("", (IngressPath("/", PREFIX, Backend("web", 80)),)),))
    model = web_model(extra={INGRESS: {("default", "web"): ingress}})
    snaps = Builder(PluginHost.load(["ingress"], extra=[("probe", probe)])).build(model)
    assert "ingress" in snaps[GATEWAY].types[cache.LISTENER].resources, "the Ingress was not served"
    assert sorted(probe.calls["route"]) == [(WEB_CLUSTER, "web", "http", GATEWAY), (WEB_CLUSTER, "web", "http", SIDECAR)]
    assert (GATEWAY, "ingress", None, None) in probe.calls["hcm"]
    assert ("ingress", GATEWAY, "ingress") in probe.calls["listener"]


# -- old implementations ---------------------------------------------------------------------------------


class OldStyle:
    """Declares fewer arguments than the hooks now have (valid, pluggy passes them by name)."""

    @hookimpl
    def trafficmgr_cluster(self, cluster: Any, service: Any) -> None:
        cluster.connect_timeout.FromSeconds(7)

    @hookimpl
    def trafficmgr_resources(self, ctx: Any) -> list[Any]:
        return []


class ReadsRemovedContextField:
    """Reads ``ctx.service``, which no longer exists, after changing the message."""

    @hookimpl
    def trafficmgr_http_connection_manager(self, hcm: Any, ctx: Any) -> None:
        hcm.use_remote_address.value = True
        if ctx.service is not None:
            hcm.server_name = ctx.service.name


def errors(plugin: str, hook: str) -> float:
    return metrics.PLUGIN_ERRORS.labels(plugin=plugin, hook=hook)._value.get()  # noqa: SLF001


def test_old_style_implementation_with_fewer_arguments_still_runs() -> None:
    before = errors("old", "trafficmgr_cluster"), errors("old", "trafficmgr_resources")
    snaps = Builder(PluginHost.load([], extra=[("old", OldStyle())])).build(web_model())
    assert resource(snaps, SIDECAR, cache.CLUSTER, WEB_CLUSTER).connect_timeout.seconds == 7
    assert (errors("old", "trafficmgr_cluster"), errors("old", "trafficmgr_resources")) == before


def test_reading_a_removed_context_field_is_isolated() -> None:
    hook = "trafficmgr_http_connection_manager"
    before = errors("oldctx", hook)
    host = PluginHost.load([], extra=[("oldctx", ReadsRemovedContextField()), ("old", OldStyle())])
    snaps = Builder(host).build(web_model())
    # Outbound chain and inbound connection manager: two calls, two errors, both changes undone.
    assert errors("oldctx", hook) - before == 2
    for name in ("outbound", "inbound"):
        managers = hcms(resource(snaps, SIDECAR, cache.LISTENER, name))
        assert managers and not any(m.HasField("use_remote_address") for m in managers), name
    # The build went on: other plugins' changes and every resource are there.
    assert resource(snaps, SIDECAR, cache.CLUSTER, WEB_CLUSTER).connect_timeout.seconds == 7
    assert snaps[SIDECAR].errors() == []
