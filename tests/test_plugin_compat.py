"""Plugin version compatibility: a plugin declares the trafficmgr versions it supports (its distribution's
``Requires-Dist: trafficmgr ...`` and/or ``TRAFFICMGR_REQUIRES``); an incompatible one is refused at
startup with a clear message, before it can fail later. Plugins are real installed distributions
(dist-info + entry point on ``sys.path``), discovered through ``importlib.metadata`` as pip-installed ones."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from trafficmgr import __version__
from trafficmgr.core.plugins import PluginError, PluginHost, available, check_compatible, distribution_requirement

MODULE = '''
from trafficmgr import hookimpl
{extra}

@hookimpl
def trafficmgr_cluster(cluster, service, port, ctx):
    pass
'''


def install_fake(site: Path, name: str, requires: list[str], module_extra: str = "") -> None:
    """A minimal installed distribution ``tm-<name>`` with entry point ``<name>`` = module ``tm_<name>``."""
    module = f"tm_{name}"
    (site / f"{module}.py").write_text(MODULE.format(extra=module_extra))
    info = site / f"tm_{name}-1.0.dist-info"
    info.mkdir()
    lines = ["Metadata-Version: 2.1", f"Name: tm-{name}", "Version: 1.0", *(f"Requires-Dist: {r}" for r in requires)]
    (info / "METADATA").write_text("\n".join(lines) + "\n")
    (info / "entry_points.txt").write_text(f"[trafficmgr.plugins]\n{name} = {module}\n")


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("TRAFFICMGR_PLUGINS", raising=False)
    return tmp_path


def test_check_compatible_messages() -> None:
    check_compatible("p", ">=0.1,<0.2", "0.1.5")
    check_compatible("p", None, "9.9")
    check_compatible("p", "", "9.9")
    with pytest.raises(PluginError) as exc:
        check_compatible("p", ">=0.2", "0.1.0")
    assert str(exc.value).startswith("plugin 'p' requires trafficmgr >=0.2, this is 0.1.0;")
    with pytest.raises(PluginError, match="invalid trafficmgr version range 'soon'"):
        check_compatible("p", "soon", "0.1.0")
    check_compatible("p", ">=0.1", "0.2.0rc1")  # a pre-release of a newer trafficmgr still counts as newer


def test_distribution_requirement_reads_requires_dist(site: Path) -> None:
    from importlib import metadata

    install_fake(site, "a", ["requests>=2", "trafficmgr>=0.1,<0.2", "trafficmgr<0; extra == 'dev'"])
    install_fake(site, "b", ["Trafficmgr (>=9)"])
    install_fake(site, "c", [])
    assert distribution_requirement(metadata.distribution("tm-a")) == "<0.2,>=0.1"
    assert distribution_requirement(metadata.distribution("tm-b")) == ">=9"
    assert distribution_requirement(metadata.distribution("tm-c")) is None


def test_incompatible_requires_dist_refused_before_import(site: Path) -> None:
    install_fake(site, "old", ["trafficmgr<0.1"], module_extra="raise SystemExit('must not be imported')")
    assert "old" in available()
    with pytest.raises(PluginError) as exc:
        PluginHost.load(["old"])
    assert str(exc.value).startswith(f"plugin 'old' requires trafficmgr <0.1, this is {__version__}")
    assert "tm_old" not in sys.modules
    # Deselected, it is neither imported nor checked: startup succeeds.
    assert "old" not in PluginHost.load(["lb"]).infos


def test_incompatible_module_attribute_refused(site: Path) -> None:
    install_fake(site, "future", [], module_extra="TRAFFICMGR_REQUIRES = '>=99'")
    with pytest.raises(PluginError, match=rf"plugin 'future' requires trafficmgr >=99, this is {__version__}"):
        PluginHost.load(["future"])


def test_compatible_plugins_load(site: Path) -> None:
    lo = __version__.split(".")
    spec = f">={lo[0]}.{lo[1]},<{int(lo[0]) + 1}"
    install_fake(site, "good", [f"trafficmgr{spec}"], module_extra=f"TRAFFICMGR_REQUIRES = '{spec}'")
    install_fake(site, "plain", ["trafficmgr"])
    host = PluginHost.load(["good", "plain"])
    assert {"good", "plain"} <= set(host.infos)
    assert host.infos["good"].hooks == ("trafficmgr_cluster",)


def test_extra_plugin_objects_are_checked_too() -> None:
    class Future:
        TRAFFICMGR_REQUIRES = ">=99"

    with pytest.raises(PluginError, match="plugin 'future' requires trafficmgr >=99"):
        PluginHost.load([], extra=[("future", Future())])


def test_cli_refuses_at_startup_with_one_clear_line(site: Path) -> None:
    install_fake(site, "old", ["trafficmgr<0.1"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    env.pop("TRAFFICMGR_PLUGINS", None)
    proc = subprocess.run([sys.executable, "-m", "trafficmgr", "labels"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"trafficmgr: error: plugin 'old' requires trafficmgr <0.1, this is {__version__}; install a version of the "
        f"plugin that supports trafficmgr {__version__}, or deselect it with --plugins"
    ]
    ok = subprocess.run([sys.executable, "-m", "trafficmgr", "labels", "--plugins", "lb"], capture_output=True, text=True,
                        env=env, timeout=60)
    assert ok.returncode == 0 and "traffic.lb.policy" in ok.stdout
