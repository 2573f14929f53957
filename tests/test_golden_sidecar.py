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
