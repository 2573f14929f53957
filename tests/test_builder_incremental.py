"""Property: the memoizing builder, fed a sequence of model edits, produces exactly what a fresh builder
produces for each model (every view, every resource, same versions). The edits cover what the Kubernetes
layer does: services added, removed and relabeled, endpoints changed, headless services and pod
destinations, ports switched between http, tcp and blocked."""

from __future__ import annotations

from typing import Any

import attrs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trafficmgr.core.model import Endpoint, Labels, Model, Pod, Service, ServicePort
from trafficmgr.core.plugins import PluginHost
from trafficmgr.core.translate.builder import Builder, default_options
from trafficmgr.testing.golden import render

PLUGINS = PluginHost.load(["lb", "circuit_breaker", "fault", "tracing", "ratelimit"])
NAMES = ["a", "b", "c", "d"]

edit = st.one_of(
    st.tuples(st.just("service"), st.sampled_from(NAMES), st.sampled_from(["http", "tcp", None]),
              st.booleans(), st.sampled_from([{}, {"traffic.lb.policy": "RANDOM"}, {"traffic.tracing.enabled": True}]),
              st.integers(1, 2)),
    st.tuples(st.just("remove"), st.sampled_from(NAMES)),
    st.tuples(st.just("endpoints"), st.sampled_from(NAMES), st.lists(st.integers(1, 6), max_size=3, unique=True),
              st.integers(0, 128)),
    st.tuples(st.just("pod"), st.sampled_from(["p1", "p2"]), st.sampled_from(["http", "tcp", None])),
)


def apply(model: Model, e: tuple[Any, ...]) -> Model:
    services, endpoints, port_pods = dict(model.services), dict(model.endpoints), dict(model.port_pods)
    if e[0] == "service":
        _, name, proto, headless, labels, nports = e
        i = NAMES.index(name)
        ports = (ServicePort("http", 80 + i, 8080, proto), ServicePort("admin", 90 + i, 9090, proto))[:nports]
        services[("default", name)] = Service("default", name, ports,
                                              cluster_ip=None if headless else f"10.96.0.{i + 1}", headless=headless,
                                              labels=Labels(labels))
    elif e[0] == "remove":
        services.pop(("default", e[1]), None)
        endpoints.pop(("default", e[1], "http"), None)
        endpoints.pop(("default", e[1], "admin"), None)
    elif e[0] == "endpoints":
        _, name, hosts, weight = e
        endpoints[("default", name, "http")] = tuple(
            Endpoint(f"10.244.{NAMES.index(name)}.{h}", 8080, pod=f"{name}-{h}", namespace="default",
                     labels=Labels({"traffic.endpoint.weight": weight})) for h in hosts)
    else:
        _, name, proto = e
        if proto is None:
            port_pods.pop(("default", name), None)
        else:
            port_pods[("default", name)] = Pod("default", name, ip=f"10.244.9.{name[-1]}", ready=True,
                                               labels=Labels({"traffic.port.9000": proto}), uid=f"uid-{name}")
    return attrs.evolve(model, services=services, endpoints=endpoints, port_pods=port_pods)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(edit, min_size=1, max_size=3), min_size=1, max_size=10), st.booleans())
def test_incremental_builds_equal_fresh_builds(batches: list[list[tuple[Any, ...]]], collector: bool) -> None:
    """Each batch of edits is one build (as one sync cycle applies several watch events); services have
    one or two ports. ``collector``: with a Zipkin address the tracing plugin adds a shared cluster."""
    options = default_options()
    if collector:
        options.zipkin_address = "10.96.0.99:9411"
    builder = Builder(PLUGINS, options)
    model = Model()
    builder.build(model)
    for e in batches:
        for one in e:
            model = apply(model, one)
        incremental = builder.build(model)
        fresh = Builder(PLUGINS, options).build(model)
        assert render(incremental) == render(fresh), f"after {e}"
        assert {v: s.version for v, s in incremental.items()} == {v: s.version for v, s in fresh.items()}, f"after {e}"
