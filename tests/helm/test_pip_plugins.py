"""The chart's extraPipPackages, run for real: the rendered init container's pip command (hash-checking mode,
no dependencies, wheels only) installs a local wheel offline, and the rendered TRAFFICMGR_PLUGIN_PATH makes
trafficmgr find the plugin without letting the wheel's modules shadow the image's (issue 16 item 9)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

from tests.helm.chart import RELEASE, container, one, render

DIST, VERSION = "trafficmgr_pathplug", "0.3.0"


def _wheel(directory: Path) -> Path:
    """A pure-Python wheel holding a plugin and, like a careless or hostile package, a ``yaml`` module."""
    files = {
        "pathplug/__init__.py": 'TRAFFICMGR_REQUIRES = ">=0.1"\n',
        "yaml/__init__.py": "raise ImportError('the plugin directory shadowed the image\\'s yaml')\n",
        f"{DIST}-{VERSION}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: trafficmgr-pathplug\nVersion: {VERSION}\n",
        f"{DIST}-{VERSION}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{DIST}-{VERSION}.dist-info/entry_points.txt": "[trafficmgr.plugins]\npathplug = pathplug\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    record.append(f"{DIST}-{VERSION}.dist-info/RECORD,,")
    path = directory / f"{DIST}-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
        z.writestr(f"{DIST}-{VERSION}.dist-info/RECORD", "\n".join(record) + "\n")
    return path


def _install(tmp_path: Path, requirement: str, wheels: Path) -> tuple[subprocess.CompletedProcess[str], Path, dict[str, Any]]:
    """Run the control plane's rendered install-plugins container (paths mapped into tmp_path)."""
    objects = render({"extraPipPackages": [requirement], "extraPipArgs": ["--no-index", f"--find-links={wheels}"]})
    dep = one(objects, "Deployment", RELEASE)
    init = container(dep, "install-plugins", init=True)
    req_dir, target = tmp_path / "req", tmp_path / "plugins"
    req_dir.mkdir(parents=True, exist_ok=True)
    (req_dir / "requirements.txt").write_text(one(objects, "ConfigMap", f"{RELEASE}-pip-requirements")["data"]["requirements.txt"])
    mapping = {"/opt/trafficmgr-plugins": str(target), "/etc/trafficmgr-pip": str(req_dir)}
    argv = []
    for arg in [*init["command"], *init["args"]]:
        for old, new in mapping.items():
            arg = arg.replace(old, new)
        argv.append(arg)
    assert argv[0] == "python3"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    proc = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, timeout=120,
                          env={**env, "HOME": str(tmp_path), "PIP_CONFIG_FILE": os.devnull})
    main_env = {e["name"]: e["value"].replace("/opt/trafficmgr-plugins", str(target))
                for e in container(dep, "control-plane")["env"] if "value" in e}
    return proc, target, main_env


def test_rendered_pip_install_and_plugin_path_work(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    sha = hashlib.sha256(_wheel(wheels).read_bytes()).hexdigest()
    proc, target, main_env = _install(tmp_path, f"trafficmgr-pathplug=={VERSION} --hash=sha256:{sha}", wheels)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (target / "pathplug" / "__init__.py").exists()
    assert "PYTHONPATH" not in main_env
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRAFFICMGR_PLUGIN_PATH")}
    listed = subprocess.run([sys.executable, "-m", "trafficmgr", "plugins", "list", "--json"], capture_output=True, text=True,
                            timeout=60, env={**env, **main_env})
    assert listed.returncode == 0, listed.stderr  # the wheel's yaml did not replace the image's
    assert {r["name"]: r["version"] for r in json.loads(listed.stdout)}["pathplug"] == VERSION


def test_rendered_pip_install_refuses_a_wrong_hash_and_source_builds(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels)
    proc, target, _ = _install(tmp_path / "a", f"trafficmgr-pathplug=={VERSION} --hash=sha256:{'0' * 64}", wheels)
    assert proc.returncode != 0 and "HASHES" in proc.stderr.upper(), proc.stderr
    assert not (target / "pathplug").exists()
    sdist = wheels / "trafficmgr_pathplug-0.4.0.tar.gz"
    sdist.write_bytes(b"not a wheel")
    sha = hashlib.sha256(sdist.read_bytes()).hexdigest()
    proc, target, _ = _install(tmp_path / "b", f"trafficmgr-pathplug==0.4.0 --hash=sha256:{sha}", wheels)
    assert proc.returncode != 0, proc.stdout  # --only-binary=:all: never runs a setup.py
    assert not (target / "pathplug").exists()
