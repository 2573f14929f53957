"""Golden: Kubernetes manifests -> xDS with every built-in plugin loaded (one case per feature scenario).

Cases are ``tests/golden/plugins/<feature>_<scenario>.in.yaml``; the expected output (``.out.yaml``) is
the sidecar view, the gateway view when it has listeners, and the Warning Events. Regenerate with
``pytest --update-golden`` and review the diff. An optional ``<case>.options.yaml`` (a mapping) sets
control-plane options for that case (for example ``zipkin_address``), over the builder's defaults.
"""

from __future__ import annotations

import pytest
import yaml

from tests.plugins.golden_cases import CASES, HERE, builtin_plugins, case_options
from trafficmgr.core import cache
from trafficmgr.testing.golden import build_from_manifests, check_golden, load_manifests, render


@pytest.mark.parametrize("case", CASES)
def test_plugins_golden(case: str, update_golden: bool) -> None:
    snaps, warnings = build_from_manifests(load_manifests(HERE / f"{case}.in.yaml"), builtin_plugins(), case_options(case))
    for view, snap in snaps.items():
        assert snap.errors() == [], f"{view} view inconsistent"
    views = ["sidecar"]
    if snaps["gateway"].types[cache.LISTENER].resources:
        views.append("gateway")
    out = render(snaps, views=views) + yaml.safe_dump({"warnings": warnings}, width=200)
    check_golden(out, HERE / f"{case}.out.yaml", update_golden)


def test_cases_found() -> None:
    assert CASES, f"no golden cases under {HERE}"
