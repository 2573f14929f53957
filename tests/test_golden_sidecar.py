"""Golden: Kubernetes manifests -> sidecar xDS (core only, no feature plugins)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from trafficmgr.core.plugins import PluginHost
from trafficmgr.testing.golden import build_from_manifests, check_golden, load_manifests, render

HERE = Path(__file__).parent / "golden" / "sidecar"
CASES = sorted(p.name.removesuffix(".in.yaml") for p in HERE.glob("*.in.yaml"))


@pytest.mark.parametrize("case", CASES)
def test_sidecar_golden(case: str, update_golden: bool) -> None:
    # Feature plugins are loaded for their labels only where a case needs them; their hooks are
    # no-ops until configured, so the sidecar base translation is what is under test.
    plugins = PluginHost.load([]) if case != "bad_labels" else PluginHost.load(["lb", "circuit_breaker"])
    snaps, warnings = build_from_manifests(load_manifests(HERE / f"{case}.in.yaml"), plugins)
    for view, snap in snaps.items():
        assert snap.errors() == [], f"{view} view inconsistent"
    out = render(snaps, views=["sidecar"]) + yaml.safe_dump({"warnings": warnings}, width=200)
    check_golden(out, HERE / f"{case}.out.yaml", update_golden)


def test_deterministic() -> None:
    manifests = load_manifests(HERE / "http_tcp_direct.in.yaml")
    a, _ = build_from_manifests(manifests, PluginHost.load([]))
    # Same services (ClusterIPs are allocated in creation order), pods created in reverse order.
    services = [m for m in manifests if m["kind"] == "Service"]
    pods = [m for m in manifests if m["kind"] != "Service"]
    b, _ = build_from_manifests(services + pods[::-1], PluginHost.load([]))
    assert render(a) == render(b)


def test_inbound_listener_follows_the_option_and_stays_out_of_other_views() -> None:
    import argparse

    from trafficmgr.core import cache
    from trafficmgr.core.translate.sidecar_inbound import INBOUND_CLUSTER, INBOUND_LISTENER

    manifests = load_manifests(HERE / "pod_ports.in.yaml")

    def names(options: argparse.Namespace | None) -> dict[str, tuple[set[str], set[str]]]:
        snaps, _ = build_from_manifests(manifests, PluginHost.load([]), options)
        return {view: (set(s.types[cache.LISTENER].resources), set(s.types[cache.CLUSTER].resources)) for view, s in snaps.items()}

    default = names(None)
    assert INBOUND_LISTENER in default["sidecar"][0] and INBOUND_CLUSTER in default["sidecar"][1]
    assert INBOUND_LISTENER not in default["gateway"][0] and INBOUND_CLUSTER not in default["gateway"][1]
    base = {"sidecar_port": 10000, "sidecar_address": "0.0.0.0"}
    for options in (argparse.Namespace(**base, sidecar_inbound_port=0), argparse.Namespace(**base, explicit_proxy=True)):
        off = names(options)["sidecar"]
        assert INBOUND_LISTENER not in off[0] and INBOUND_CLUSTER not in off[1], options


def test_inbound_http_ports_follow_labels_and_endpoints_incrementally() -> None:
    from trafficmgr.core import cache
    from trafficmgr.core.model import Endpoint, Model, Service, ServicePort
    from trafficmgr.core.translate.builder import Builder
    from trafficmgr.core.translate.sidecar_inbound import INBOUND_LISTENER

    def model(protocols: dict[str, str | None], target: int = 8080) -> Model:
        services, endpoints = {}, {}
        for name, proto in protocols.items():
            svc = Service("default", name, (ServicePort("http", 80, target, proto),), cluster_ip=f"10.96.0.{len(services) + 1}")
            services[svc.key] = svc
            endpoints[("default", name, "http")] = (Endpoint("10.244.0.9", target),)
        return Model(services=services, endpoints=endpoints)

    builder = Builder(PluginHost.load([]))

    def http_chains(m: Model) -> list[int]:
        lst = builder.build(m)["sidecar"].types[cache.LISTENER].resources[INBOUND_LISTENER].message()
        assert lst.default_filter_chain.filters[0].name == "envoy.filters.network.tcp_proxy"
        # First, always: the chain that ends connections made straight to the inbound port itself.
        assert lst.filter_chains[0].name == "inbound|loop" and lst.filter_chains[0].filter_chain_match.destination_port.value == 15006
        return [c.filter_chain_match.destination_port.value for c in lst.filter_chains[1:]]

    assert http_chains(model({"a": "http", "b": "http"})) == [8080]
    assert http_chains(model({"a": "http", "b": "tcp"})) == [8080]  # still one http user of 8080
    assert http_chains(model({"a": "tcp", "b": None})) == []
    assert http_chains(model({"a": "http"}, target=9090)) == [9090]
    assert http_chains(Model()) == []
