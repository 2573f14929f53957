"""``TRAFFICMGR_PLUGIN_PATH`` (the Helm chart's ``extraPipPackages`` directory) adds plugins without letting
anything there replace a module of the image: it is appended after site-packages (issue 16 item 9)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PLUGIN = '''"""A third-party plugin installed into the plugin directory."""
TRAFFICMGR_REQUIRES = ">=0.1"
'''


def _plugin_dir(root: Path) -> Path:
    """What ``pip install --target`` leaves: a plugin module with its dist-info, plus (as a hostile or
    careless package would) a module named like one of the image's dependencies."""
    d = root / "plugins"
    (d / "pathplug").mkdir(parents=True)
    (d / "pathplug" / "__init__.py").write_text(PLUGIN)
    info = d / "trafficmgr_pathplug-0.3.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: trafficmgr-pathplug\nVersion: 0.3.0\n")
    (info / "entry_points.txt").write_text("[trafficmgr.plugins]\npathplug = pathplug\n")
    (d / "yaml").mkdir()
    (d / "yaml" / "__init__.py").write_text("raise ImportError('the plugin directory shadowed the image\\'s yaml')\n")
    return d


def _plugins_list(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trafficmgr", "plugins", "list", "--json"],
                          capture_output=True, text=True, timeout=60, env=env)


def test_plugin_path_adds_plugins_after_site_packages(tmp_path: Path) -> None:
    plugins = _plugin_dir(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRAFFICMGR_PLUGIN_PATH")}
    proc = _plugins_list({**env, "TRAFFICMGR_PLUGIN_PATH": str(plugins)})
    assert proc.returncode == 0, proc.stderr
    rows = {row["name"]: row for row in json.loads(proc.stdout)}
    assert rows["pathplug"]["version"] == "0.3.0" and rows["pathplug"]["loaded"] is True  # every installed plugin by default
    # Selecting it loads it from the plugin directory, and the image's yaml is still the real one.
    code = ("from trafficmgr.core.plugins import PluginHost; h = PluginHost.load(['lb', 'pathplug']); "
            "import sys, yaml, pathplug; "
            "print(yaml.__file__, pathplug.__file__, sorted(h.infos), sys.path[-1], sep='\\n')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**env, "TRAFFICMGR_PLUGIN_PATH": str(plugins)})
    assert out.returncode == 0, out.stderr
    yaml_file, plug_file, loaded, last = out.stdout.splitlines()
    assert not yaml_file.startswith(str(plugins)) and plug_file.startswith(str(plugins))
    assert "pathplug" in loaded and last == str(plugins)


def test_pythonpath_is_what_the_plugin_path_avoids(tmp_path: Path) -> None:
    """The same directory on PYTHONPATH (the chart's old way) shadows the image's yaml: the check above can fail."""
    plugins = _plugin_dir(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "TRAFFICMGR_PLUGIN_PATH"}
    proc = _plugins_list({**env, "PYTHONPATH": str(plugins)})
    assert proc.returncode != 0 and "shadowed the image's yaml" in proc.stderr
