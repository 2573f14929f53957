"""Property: the memoizing builder, fed a sequence of model edits, produces exactly what a fresh builder
produces for each model (every view, every resource, same versions). The edits cover what the Kubernetes
layer does: services added, removed and relabeled, endpoints changed, headless services and pod
destinations, ports switched between http, tcp and blocked."""

from __future__ import annotations

from typing import Any

import attrs
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trafficmgr.core.model import Endpoint, Labels, Model, Pod, Service, ServicePort
from trafficmgr.core.plugins import PluginHost
from trafficmgr.core.translate.builder import Builder, default_options
from trafficmgr.testing.golden import render
from trafficmgr.testing.manifests import pod, service

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


# -- the same property through the Kubernetes layer, at a size where the incremental path skips most ---------

N_SERVICES = 24  # every edit touches at most a few of them: the rest must be skipped, not compared


def _svc_obj(i: int, labels: dict[str, str], cluster_ip: bool = True) -> dict[str, Any]:
    obj: dict[str, Any] = yaml.safe_load(service(f"s{i}", labels=labels, namespace=f"ns{i % 3}"))
    obj["metadata"]["uid"] = f"uid-s{i}"
    obj["spec"]["clusterIP"] = f"10.96.1.{i + 1}" if cluster_ip else "None"
    return obj


def _pod_obj(i: int, j: int, labels: dict[str, str]) -> dict[str, Any]:
    obj: dict[str, Any] = yaml.safe_load(pod(f"s{i}-{j}", f"10.245.{i}.{j + 1}", f"s{i}", labels=labels, namespace=f"ns{i % 3}"))
    obj["metadata"]["uid"] = f"uid-s{i}-{j}"
    return obj


def _slice_obj(i: int, pods: list[int]) -> dict[str, Any]:
    ns = f"ns{i % 3}"
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": f"s{i}-abc", "namespace": ns, "labels": {"kubernetes.io/service-name": f"s{i}"}},
            "ports": [{"name": "http", "port": 9080}],
            "endpoints": [{"addresses": [f"10.245.{i}.{j + 1}"], "conditions": {"ready": True},
                           "targetRef": {"kind": "Pod", "namespace": ns, "name": f"s{i}-{j}"}} for j in pods]}


kube_edit = st.one_of(
    st.tuples(st.just("weight"), st.integers(0, N_SERVICES - 1), st.integers(0, 2), st.integers(1, 100)),
    st.tuples(st.just("pods"), st.integers(0, N_SERVICES - 1), st.lists(st.integers(0, 3), max_size=4, unique=True)),
    st.tuples(st.just("labels"), st.integers(0, N_SERVICES - 1),
              st.sampled_from([{}, {"traffic.lb.policy": "RANDOM"}, {"traffic.port.9080": "tcp"},
                               {"traffic.port.9080": "http", "traffic.request.timeout": "1500"}]), st.booleans()),
    st.tuples(st.just("delete"), st.integers(0, N_SERVICES - 1)),
    st.tuples(st.just("port_pod"), st.sampled_from(["solo-a", "solo-b", "s1"]), st.sampled_from(["http", "tcp", None])),
    st.tuples(st.just("namespace"), st.integers(0, 2), st.sampled_from([{}, {"traffic.mtls": "strict"}])),
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(kube_edit, min_size=1, max_size=4), min_size=1, max_size=8))
def test_builds_from_the_assembler_delta_equal_fresh_builds(batches: list[list[tuple[Any, ...]]]) -> None:
    """Watch events -> Assembler -> Builder with the model's delta, against a fresh Builder given the same
    model with ``delta=None`` (which compares every destination): the same snapshots after every batch,
    while the incremental path examined only the destinations the batch touched."""
    from trafficmgr.core.kube import assemble
    from trafficmgr.core.kube.assemble import Assembler

    asm = Assembler(PLUGINS.labels)
    asm.apply("RELIST", assemble.NAMESPACE, [{"metadata": {"name": f"ns{k}", "uid": f"ns{k}"}} for k in range(3)])
    asm.apply("RELIST", assemble.SERVICE, [_svc_obj(i, {}) for i in range(N_SERVICES)])
    asm.apply("RELIST", assemble.POD, [_pod_obj(i, j, {}) for i in range(N_SERVICES) for j in range(3)])
    asm.apply("RELIST", assemble.ENDPOINT_SLICE, [_slice_obj(i, [0, 1, 2]) for i in range(N_SERVICES)])
    builder = Builder(PLUGINS, default_options())
    builder.build(asm.model())
    for batch in batches:
        touched = set()
        for e in batch:
            if e[0] == "weight":
                _, i, j, w = e
                asm.apply("MODIFIED", assemble.POD, _pod_obj(i, j, {"traffic.endpoint.weight": str(w)}))
            elif e[0] == "pods":
                _, i, pods = e
                for j in range(4):
                    asm.apply("MODIFIED" if j in pods else "DELETED", assemble.POD, _pod_obj(i, j, {}))
                asm.apply("MODIFIED", assemble.ENDPOINT_SLICE, _slice_obj(i, pods))
            elif e[0] == "labels":
                _, i, labels, cluster_ip = e
                asm.apply("MODIFIED", assemble.SERVICE, _svc_obj(i, labels, cluster_ip))
            elif e[0] == "delete":
                asm.apply("DELETED", assemble.SERVICE, _svc_obj(e[1], {}))
            elif e[0] == "port_pod":
                _, name, proto = e
                obj = yaml.safe_load(pod(name, f"10.246.0.{len(name)}", name, namespace="ns1",
                                         labels={"traffic.port.9000": proto} if proto else {}))
                asm.apply("MODIFIED", assemble.POD, obj)
            else:
                _, k, labels = e
                asm.apply("MODIFIED", assemble.NAMESPACE, {"metadata": {"name": f"ns{k}", "uid": f"ns{k}", "labels": labels}})
            touched.add(e[1])
        model = asm.model()
        assert model.delta is not None
        incremental = builder.build(model)
        fresh = Builder(PLUGINS, default_options()).build(attrs.evolve(model, delta=None))
        assert render(incremental) == render(fresh), f"after {batch}"
        assert {v: s.version for v, s in incremental.items()} == {v: s.version for v, s in fresh.items()}, f"after {batch}"
        assert builder.services.examined <= 2 * len(touched), (builder.services.examined, batch)
