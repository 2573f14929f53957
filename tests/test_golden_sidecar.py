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
    from trafficmgr.core.build.builder import INBOUND_CLUSTER, INBOUND_LISTENER

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
