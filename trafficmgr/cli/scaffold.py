"""``trafficmgr plugins new NAME``: write a ready-to-install plugin project.

The project (``trafficmgr-<name>/``) holds a ``pyproject.toml`` with the ``trafficmgr.plugins`` entry point
and a trafficmgr version range, a module declaring one label and implementing one hook, a test using the
kit's fixtures (``trafficmgr_build``, ``trafficmgr_envoy``) and a README. After ``pip install -e .`` its
tests pass and ``trafficmgr plugins list`` shows it. The plugin module imports trafficmgr only through the
public plugin API, :mod:`trafficmgr.plugin`.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import attrs

from trafficmgr import __version__

NAME_RE = re.compile(r"[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*")


class ScaffoldError(ValueError):
    """Bad plugin name or target directory; the message is meant for the user."""


def compatible_range(version: str = __version__) -> str:
    """The trafficmgr range a new plugin declares: this minor series for 0.x, this major otherwise."""
    parts = [int(p) for p in re.findall(r"\d+", version)[:2]] + [0, 0]
    major, minor = parts[0], parts[1]
    return f">={major}.{minor},<{major}.{minor + 1}" if major == 0 else f">={major}.{minor},<{major + 1}"


@attrs.frozen
class Names:
    """Every name derived from the plugin name ``greeting`` (or ``my-greeting``)."""

    name: str  # as given, lower case: my-greeting
    entry_point: str  # my_greeting (what --plugins and `plugins list` show)
    distribution: str  # trafficmgr-my-greeting
    module: str  # trafficmgr_my_greeting
    label: str  # traffic.my-greeting.header
    header: str  # x-my-greeting

    @classmethod
    def of(cls, name: str) -> Names:
        if not NAME_RE.fullmatch(name) or len(name) > 40:
            raise ScaffoldError(f"invalid plugin name {name!r}: use lower-case letters, digits and single '-' or '_' "
                                "between them, starting with a letter (e.g. greeting or served-by)")
        if name.startswith("trafficmgr"):
            raise ScaffoldError(f"invalid plugin name {name!r}: leave out the 'trafficmgr' prefix (it is added to the project name)")
        dashed, under = name.replace("_", "-"), name.replace("-", "_")
        return cls(name, under, f"trafficmgr-{dashed}", f"trafficmgr_{under}", f"traffic.{dashed}.header", f"x-{dashed}")


def render_files(names: Names) -> dict[str, str]:
    """Relative path -> content of every file of the project."""
    n = names
    return {
        "pyproject.toml": PYPROJECT.format(n=n, range=compatible_range()),
        f"{n.module}.py": MODULE.format(n=n, range=compatible_range()),
        f"tests/test_{n.entry_point}.py": TEST.format(n=n),
        "README.md": README.format(n=n, range=compatible_range()),
        ".gitignore": "__pycache__/\n*.egg-info/\nbuild/\ndist/\n.pytest_cache/\n",
    }


def create(name: str, directory: Path | str = ".", force: bool = False) -> Path:
    """Write the project for plugin ``name`` under ``directory``; returns the project root. Raises
    :class:`ScaffoldError` when the name is invalid or the project directory exists and is not empty
    (unless ``force``)."""
    names = Names.of(name)
    root = Path(directory) / names.distribution
    if root.exists() and any(root.iterdir()) and not force:
        raise ScaffoldError(f"{root} already exists and is not empty (use --force to overwrite its files)")
    for rel, text in render_files(names).items():
        path = root / rel
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        except OSError as exc:
            raise ScaffoldError(f"cannot write {path}: {exc.strerror or exc}") from None
    return root


# -- CLI -------------------------------------------------------------------------------------------


def setup_new(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="plugin name, e.g. greeting (project trafficmgr-greeting)")
    parser.add_argument("--directory", "-d", metavar="DIR", default=".", help="where to create the project (default: .)")
    parser.add_argument("--force", action="store_true", help="overwrite files of an existing project directory")


def run_new(args: argparse.Namespace) -> int:
    """``trafficmgr plugins new``; raises :class:`ScaffoldError` (the caller shows it as one line)."""
    root = create(args.name, args.directory, args.force)
    names = Names.of(args.name)
    print(f"Created {root} (plugin {names.entry_point!r}, label {names.label}). Next:\n"
          f"  cd {root} && pip install -e '.[test]' && pytest && trafficmgr plugins list")
    return 0


# -- templates (str.format: literal braces are doubled) ---------------------------------------------

PYPROJECT = """\
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "{n.distribution}"
version = "0.1.0"
description = "trafficmgr plugin: the {n.label} label adds an {n.header} response header"
readme = "README.md"
requires-python = ">=3.11"
# The trafficmgr versions this plugin supports: trafficmgr refuses to load it outside this range.
dependencies = ["trafficmgr{range}"]

[project.optional-dependencies]
test = ["pytest>=8"]

[project.entry-points."trafficmgr.plugins"]
{n.entry_point} = "{n.module}"

[tool.setuptools]
py-modules = ["{n.module}"]

[tool.pytest.ini_options]
testpaths = ["tests"]
"""

MODULE = '''\
"""trafficmgr plugin {n.entry_point!r}: label a Service ``{n.label}=<value>`` and every HTTP response from it
through a sidecar carries ``{n.header}: <value>``.

One label declaration (``trafficmgr_labels``) and one mutate-in-place hook (``trafficmgr_virtual_host``);
nothing changes when the label is absent. It imports trafficmgr only through the public plugin API,
``trafficmgr.plugin``. The hook contract: ``trafficmgr.core.hookspecs`` and docs/plugins.md in the
trafficmgr repository.
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2

from trafficmgr.plugin import LabelSpec, hookimpl, labels

#: Checked by trafficmgr at startup, like the dependency range in pyproject.toml.
TRAFFICMGR_REQUIRES = "{range}"

LABEL = "{n.label}"
HEADER = "{n.header}"


@hookimpl
def trafficmgr_labels() -> list[LabelSpec]:
    return [
        LabelSpec(LABEL, frozenset({{labels.SERVICE}}), labels.token("a header value"), "",
                  f"adds response header {{HEADER}}: <value> to responses from the service"),
    ]


@hookimpl
def trafficmgr_virtual_host(vhost, service, port, ctx) -> None:  # noqa: ANN001 - see trafficmgr.core.hookspecs
    value = service.labels.value(LABEL)
    if not value:
        return
    if any(h.header.key == HEADER for h in vhost.response_headers_to_add):
        return  # never add it twice
    option = vhost.response_headers_to_add.add()
    option.header.key = HEADER
    option.header.value = value
    option.append_action = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
'''

TEST = '''\
"""Tests for the {n.entry_point!r} plugin, with the fixtures of trafficmgr's pytest plugin (loaded
automatically when trafficmgr is installed): ``trafficmgr_build`` builds the Envoy resources some
manifests produce, ``trafficmgr_envoy`` serves them with a real Envoy sidecar on loopback."""

from __future__ import annotations

from importlib import metadata

PLUGIN = "{n.entry_point}"
LABEL = "{n.label}"
HEADER = "{n.header}"

MANIFESTS = """
apiVersion: v1
kind: Service
metadata:
  name: shop
  labels: {{traffic.port.8080: http, {n.label}: hello}}
spec:
  selector: {{app: shop}}
  ports: [{{name: http, port: 8080}}]
---
apiVersion: v1
kind: Pod
metadata:
  name: shop-1
  labels: {{app: shop}}
spec:
  containers: [{{name: app, image: shop}}]
"""


def test_installed_plugin_is_discovered() -> None:
    names = {{ep.name for ep in metadata.entry_points(group="trafficmgr.plugins")}}
    assert PLUGIN in names, "pip install -e . registers the entry point"


def test_label_configures_the_virtual_host(trafficmgr_build) -> None:
    result = trafficmgr_build(MANIFESTS, plugins=[PLUGIN])
    assert result.warnings == []
    vhost = result.sidecar.virtual_host("shop", 8080)
    assert {{"key": HEADER, "value": "hello"}} in [h["header"] for h in vhost["response_headers_to_add"]]


def test_nothing_changes_without_the_label(trafficmgr_build) -> None:
    plain = MANIFESTS.replace(f", {{LABEL}}: hello", "")
    with_plugin = trafficmgr_build(plain, plugins=[PLUGIN]).render()
    assert with_plugin == trafficmgr_build(plain, plugins=[]).render()


def test_invalid_value_is_ignored_with_a_warning(trafficmgr_build) -> None:
    result = trafficmgr_build(MANIFESTS.replace(": hello", ": 'not a token!'"), plugins=[PLUGIN])
    assert any(LABEL in w for w in result.warnings), result.warnings
    assert "response_headers_to_add" not in result.sidecar.virtual_host("shop", 8080)


def test_header_through_a_real_envoy(trafficmgr_envoy) -> None:
    mesh = trafficmgr_envoy(MANIFESTS, plugins=[PLUGIN])
    response = mesh.get("shop", "/hello")
    assert response.status == 200
    assert response.json()["backend"] == "shop-1"  # answered by the pod's test backend
    assert response.headers[HEADER] == "hello"

    mesh.label("service", "shop", {{LABEL: None}})  # waits until Envoy has the new config
    assert HEADER not in mesh.get("shop", "/hello").headers
'''

README = """\
# {n.distribution}

A [trafficmgr](https://github.com/) plugin: label a Service `{n.label}=<value>` and every HTTP response
from it through a trafficmgr sidecar carries the header `{n.header}: <value>`.

| Label | On | Default | Values | Meaning |
|---|---|---|---|---|
| `{n.label}` | Service | `""` | an HTTP token | adds response header {n.header}: <value> |

## Install
```
pip install -e '.[test]'
trafficmgr plugins list --hooks     # {n.entry_point} ... trafficmgr_labels, trafficmgr_virtual_host
trafficmgr serve --plugins lb,{n.entry_point}
```
Supports trafficmgr `{range}` (the dependency in `pyproject.toml` and `TRAFFICMGR_REQUIRES` in
`{n.module}.py`); trafficmgr refuses to load it with any other version.

## Develop
```
pytest
```
`tests/test_{n.entry_point}.py` uses trafficmgr's pytest fixtures: `trafficmgr_build` (the Envoy resources a
set of manifests produces) and `trafficmgr_envoy` (a real Envoy sidecar on loopback, requests through
it). The hooks you can implement and what each may change are in trafficmgr's `docs/plugins.md`.
"""
