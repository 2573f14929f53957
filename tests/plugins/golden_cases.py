"""The golden cases of ``tests/golden/plugins`` and how they are built (every built-in plugin, the
builder's default options plus the case's ``<case>.options.yaml``)."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from trafficmgr.core.plugins import PluginHost, builtin_names
from trafficmgr.core.translate.builder import default_options

HERE = Path(__file__).resolve().parent.parent / "golden" / "plugins"
CASES = sorted(p.name.removesuffix(".in.yaml") for p in HERE.glob("*.in.yaml"))


def builtin_plugins() -> PluginHost:
    return PluginHost.load(builtin_names())


def case_options(case: str) -> argparse.Namespace:
    """The builder's default options, plus ``<case>.options.yaml`` when present."""
    options = default_options()
    extra = HERE / f"{case}.options.yaml"
    if extra.exists():
        for key, value in (yaml.safe_load(extra.read_text()) or {}).items():
            setattr(options, key, value)
    return options
