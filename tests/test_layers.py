"""The import layers of the ``trafficmgr`` package, derived from the code.

Every module of the package is parsed with :mod:`ast`; its ``import``/``from`` statements naming
``trafficmgr.*`` (module level and inside functions alike, relative imports resolved) are the edges of the
import graph. Imports under ``if TYPE_CHECKING:`` are not edges: they never run. Dynamic imports
(``importlib.import_module`` of a string, such as the CLI loading the modules of ``COMMAND_MODULES``) are
not edges either: a module loaded that way may import its loader.

The checks:

- no import cycle between modules (each is reported as ``a -> b -> a``, with the lines). Importing
  ``a.b.c`` also runs the package ``__init__`` of ``a.b``, so a cycle through a package counts too;
- no upward import between the layers of :data:`LAYERS` (a module may import its own layer or lower),
  and every module has a layer;
- plugins (``trafficmgr.plugins.*``, the plugin modules of ``examples/`` and the module ``trafficmgr plugins
  new`` writes) import from trafficmgr only the public plugin API ``trafficmgr.plugin``, their own
  package, and the built-in plugins they declare in ``TRAFFICMGR_DEPENDS``.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "trafficmgr"

#: Lowest first. ``x.*`` is the module ``x`` and everything under it; other names are one module.
LAYERS: list[tuple[str, list[str]]] = [
    ("L0 foundations", [
        "trafficmgr",  # the package __init__ only
        "trafficmgr.core",  # the (empty) package __init__
        "trafficmgr.core.model", "trafficmgr.core.labels", "trafficmgr.core.wire", "trafficmgr.core.metrics",
        "trafficmgr.core.argtypes", "trafficmgr.core.protos", "trafficmgr.core.contrib", "trafficmgr.core.corelabels",
        "trafficmgr.core.signals", "trafficmgr.core.once", "trafficmgr.core.gcpause",
        # mesh identity's leaf modules: the on-disk layout Envoy reads and SPIFFE ID helpers
        "trafficmgr.core.identity", "trafficmgr.core.identity.files", "trafficmgr.core.identity.spiffe",
        "trafficmgr.core.tlspem",  # PEM chain + key check shared by the tls and gateway_api plugins
        "trafficmgr.dashboard",  # the dashboard page's static files and their paths (the admin endpoint serves them)
    ]),
    ("L1 cache and plugin host", ["trafficmgr.core.cache", "trafficmgr.core.hookspecs", "trafficmgr.core.plugins"]),
    ("L2 Kubernetes, translation, xDS", [
        "trafficmgr.core.kube.*", "trafficmgr.core.translate.*", "trafficmgr.core.xds.*", "trafficmgr.core.access",
        "trafficmgr.core.envoy", "trafficmgr.core.bootstrap", "trafficmgr.core.render", "trafficmgr.core.admin",
        "trafficmgr.core.telemetry.*",  # the dashboard's data: reading the proxies' stats
        # the mesh CA, its signing service and the agent's client of it
        "trafficmgr.core.identity.ca", "trafficmgr.core.identity.server", "trafficmgr.core.identity.client",
    ]),
    ("L3 control plane and agent", ["trafficmgr.core.controlplane", "trafficmgr.core.agent.*", "trafficmgr.core.serve"]),
    ("L4 plugin API and plugins", ["trafficmgr.plugin", "trafficmgr.plugins.*"]),
    ("L5 API server, apps, local mode, bench, test kit", [
        "trafficmgr.apiserver.*", "trafficmgr.apps.*", "trafficmgr.local.*", "trafficmgr.bench.*", "trafficmgr.testing.*",
    ]),
    ("L6 command line", ["trafficmgr.cli.*", "trafficmgr.__main__"]),
]

PLUGIN_API = "trafficmgr.plugin"
BUILTIN_PLUGINS = "trafficmgr.plugins"
DEPENDS_ATTR = "TRAFFICMGR_DEPENDS"


class Import(NamedTuple):
    target: str  # the imported module (or the longest prefix of it that is a module of the package)
    line: int


# -- the graph --------------------------------------------------------------------------------------


def package_modules(root: Path = PACKAGE, name: str = "trafficmgr") -> dict[str, Path]:
    """Module name -> file of every module of the package at ``root``."""
    modules: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if "__pycache__" in parts:
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join((name, *parts))] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _statements(body: Iterable[ast.stmt]) -> Iterable[ast.Import | ast.ImportFrom]:
    """Every import statement in ``body`` and the blocks nested in it (functions, classes, try, with,
    ...), except the body of ``if TYPE_CHECKING:``."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _statements(node.orelse)
        else:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt):
                    yield from _statements([child])
                elif isinstance(child, ast.excepthandler | ast.match_case):
                    yield from _statements(child.body)


def _known(name: str, modules: Iterable[str]) -> str:
    """``name`` or, if it is not a module (``import a.b.attr`` is not valid Python, but ``from a.b import
    c`` may name an attribute), the longest prefix of it that is."""
    known = set(modules)
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in known:
            return ".".join(parts[:i])
    return name


def imports_of(module: str, source: str, modules: Iterable[str], is_package: bool = False, prefix: str = "trafficmgr") -> list[Import]:
    """The imports of ``prefix`` (and below) that ``source`` (the code of ``module``) makes, TYPE_CHECKING
    blocks excluded; ``from x import y`` is an import of ``x.y`` when that is a module, else of ``x``."""
    modules = set(modules)
    found: list[Import] = []
    for node in _statements(ast.parse(source).body):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        for name in names:
            if name == prefix or name.startswith(prefix + "."):
                found.append(Import(_known(name, modules), node.lineno))
    return sorted(set(found), key=lambda i: (i.line, i.target))


def import_graph(sources: Mapping[str, str], packages: Iterable[str] = ()) -> dict[str, list[Import]]:
    """Module -> its imports of modules of ``sources`` (module name -> code); ``packages``: the modules that
    are packages (``__init__``), for relative imports."""
    packages = set(packages)
    return {m: imports_of(m, src, sources, m in packages) for m, src in sources.items()}


def real_graph() -> dict[str, list[Import]]:
    files = package_modules()
    return import_graph({m: p.read_text() for m, p in files.items()}, [m for m, p in files.items() if p.name == "__init__.py"])


# -- the checks -------------------------------------------------------------------------------------


def _with_packages(graph: Mapping[str, list[Import]]) -> dict[str, dict[str, int]]:
    """The graph as it runs: importing ``a.b.c`` runs the packages ``a`` and ``a.b`` first, unless the
    importer is inside them (then they run already). Edge -> line of the import."""
    runs: dict[str, dict[str, int]] = {m: {} for m in graph}
    for module, imports in graph.items():
        own = module.split(".")
        inside = {".".join(own[:i]) for i in range(1, len(own) + 1)}
        for imp in imports:
            if imp.target != module:
                runs[module].setdefault(imp.target, imp.line)
            parts = imp.target.split(".")
            for package in (".".join(parts[:i]) for i in range(1, len(parts))):
                if package in graph and package not in inside:
                    runs[module].setdefault(package, imp.line)
    return runs


def _components(edges: Mapping[str, Mapping[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, {})):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out)


def _shortest_cycle(start: str, members: set[str], edges: Mapping[str, Mapping[str, int]]) -> list[str]:
    """The shortest ``start -> ... -> start`` inside one component (breadth first)."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(edges[v]):
                if w not in members:
                    continue
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if w not in previous:
                    previous[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"{start} is in no cycle")  # pragma: no cover - members form a component


def find_cycles(graph: Mapping[str, list[Import]]) -> list[str]:
    """One line per import cycle: ``a (line 3) -> b (line 9) -> a``, the shortest cycle through the first
    module of each set of modules that import each other."""
    edges = _with_packages(graph)
    lines = []
    for component in _components(edges):
        cycle = _shortest_cycle(component[0], set(component), edges)
        steps = " -> ".join(f"{a} (line {edges[a][b]})" for a, b in zip(cycle, cycle[1:]))
        more = f"; {len(component)} modules in this cycle: {', '.join(component)}" if len(component) > len(cycle) - 1 else ""
        lines.append(f"{steps} -> {cycle[0]}{more}")
    return lines


def layer_of(module: str, layers: list[tuple[str, list[str]]] = LAYERS) -> int | None:
    """Index in ``layers`` of the layer ``module`` belongs to (the most specific pattern wins), None if none."""
    best: tuple[int, int] | None = None  # (specificity, layer)
    for number, (_, patterns) in enumerate(layers):
        for pattern in patterns:
            if pattern.endswith(".*"):
                base = pattern[:-2]
                if module == base or module.startswith(base + "."):
                    best = max(best or (-1, 0), (len(base), number))
            elif module == pattern:
                best = max(best or (-1, 0), (len(pattern) + 1, number))
    return None if best is None else best[1]


def find_upward_imports(graph: Mapping[str, list[Import]], layers: list[tuple[str, list[str]]] = LAYERS) -> list[str]:
    """One line per import of a higher layer, and per module without a layer."""
    problems = []
    for module in sorted(graph):
        own = layer_of(module, layers)
        if own is None:
            problems.append(f"{module} has no layer: add it to LAYERS in tests/test_layers.py")
            continue
        for imp in graph[module]:
            theirs = layer_of(imp.target, layers)
            if theirs is not None and theirs > own:
                problems.append(f"{module} ({layers[own][0]}) imports {imp.target} ({layers[theirs][0]}) at line {imp.line}")
    return problems


def declared_depends(source: str) -> tuple[str, ...]:
    """The module-level ``TRAFFICMGR_DEPENDS = (...)`` of a plugin module, () without one."""
    for node in ast.parse(source).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == DEPENDS_ATTR for t in targets) and node.value is not None:
            return tuple(ast.literal_eval(node.value))
    return ()


def plugin_violations(own_package: str, depends: Iterable[str], imports: Mapping[str, list[Import]]) -> list[str]:
    """Imports of trafficmgr by the modules of one plugin (``imports``: module -> its imports) other than
    the plugin API, the plugin's own package and the built-in plugins it depends on."""
    allowed = [PLUGIN_API, own_package, *(f"{BUILTIN_PLUGINS}.{name}" for name in depends)]
    problems = []
    for module in sorted(imports):
        for imp in imports[module]:
            if not any(imp.target == a or imp.target.startswith(a + ".") for a in allowed):
                problems.append(f"{module} imports {imp.target} at line {imp.line}: a plugin imports only {PLUGIN_API}, "
                                f"its own package and the plugins of its {DEPENDS_ATTR} ({', '.join(depends) or 'none'})")
    return problems


# -- the tests --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph() -> dict[str, list[Import]]:
    return real_graph()


def test_the_graph_is_read_from_the_code(graph: dict[str, list[Import]]) -> None:
    """Guards the checks below against passing on an empty or blind graph."""
    assert {"trafficmgr", "trafficmgr.cli", "trafficmgr.core.plugins", "trafficmgr.plugin"} <= set(graph)
    assert any(i.target == "trafficmgr.core.labels" for i in graph["trafficmgr"])  # `from trafficmgr.core import labels`
    assert any(i.target == "trafficmgr.cli" for i in graph["trafficmgr.__main__"])
    assert any(i.target == "trafficmgr.cli.scaffold" for i in graph["trafficmgr.cli"])  # a function-level import


def test_no_import_cycles(graph: dict[str, list[Import]]) -> None:
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_upward_imports(graph: dict[str, list[Import]]) -> None:
    problems = find_upward_imports(graph)
    assert not problems, "imports of a higher layer (see LAYERS):\n" + "\n".join(problems)


def _builtin_plugins(graph: dict[str, list[Import]]) -> dict[str, list[str]]:
    """Built-in plugin name -> its modules."""
    plugins: dict[str, list[str]] = {}
    for module in graph:
        parts = module.split(".")
        if len(parts) >= 3 and ".".join(parts[:2]) == BUILTIN_PLUGINS:
            plugins.setdefault(parts[2], []).append(module)
    return plugins


def test_builtin_plugins_import_only_the_plugin_api(graph: dict[str, list[Import]]) -> None:
    plugins = _builtin_plugins(graph)
    assert {"lb", "ingress", "tls"} <= set(plugins)
    problems = []
    for name, modules in sorted(plugins.items()):
        package = f"{BUILTIN_PLUGINS}.{name}"
        depends = declared_depends(package_modules()[package].read_text())
        problems += plugin_violations(package, depends, {m: graph[m] for m in modules})
    assert not problems, "\n".join(problems)


def _example_plugins() -> dict[str, dict[str, Path]]:
    """Top module of the plugin (entry point) of each project under examples/ -> its modules and files."""
    out: dict[str, dict[str, Path]] = {}
    for pyproject in sorted(REPO.glob("examples/*/pyproject.toml")):
        project = tomllib.loads(pyproject.read_text()).get("project", {})
        for value in project.get("entry-points", {}).get("trafficmgr.plugins", {}).values():
            top = value.split(":")[0].split(".")[0]
            package = pyproject.parent / top
            if package.is_dir():
                out[top] = package_modules(package, top)
            else:
                out[top] = {top: package.with_suffix(".py")}
    return out


def test_example_plugins_import_only_the_plugin_api() -> None:
    examples = _example_plugins()
    assert examples, "no plugin project under examples/"
    problems = []
    for top, files in examples.items():
        imports = {m: imports_of(m, f.read_text(), files, f.name == "__init__.py") for m, f in files.items()}
        problems += plugin_violations(top, declared_depends(files[top].read_text()), imports)
    assert not problems, "\n".join(problems)


def test_scaffolded_plugin_imports_only_the_plugin_api() -> None:
    from trafficmgr.cli import scaffold

    names = scaffold.Names.of("greeting")
    source = scaffold.render_files(names)[f"{names.module}.py"]
    imports = imports_of(names.module, source, [])
    assert [i.target for i in imports] == [PLUGIN_API]
    assert plugin_violations(names.module, declared_depends(source), {names.module: imports}) == []


# -- the checks can fail ----------------------------------------------------------------------------


TOY_LAYERS = [("low", ["pkg", "pkg.low.*"]), ("high", ["pkg.high.*"])]


def _toy(sources: dict[str, str]) -> dict[str, list[Import]]:
    return {m: imports_of(m, src, sources, m in ("pkg", "pkg.low", "pkg.high"), prefix="pkg") for m, src in sources.items()}


def test_a_cycle_is_found_and_reported() -> None:
    graph = _toy({
        "pkg": "", "pkg.low": "", "pkg.high": "",
        "pkg.low.a": "from pkg.low import b\n",
        "pkg.low.b": "import json\n\ndef f():\n    from pkg.low.c import x\n",  # function-level
        "pkg.low.c": "from . import a\n",  # relative
    })
    assert find_cycles(graph) == ["pkg.low.a (line 1) -> pkg.low.b (line 4) -> pkg.low.c (line 1) -> pkg.low.a"]


def test_type_checking_imports_are_not_edges() -> None:
    graph = _toy({
        "pkg": "", "pkg.low": "", "pkg.high": "",
        "pkg.low.a": "from pkg.low import b\n",
        "pkg.low.b": "import typing\nif typing.TYPE_CHECKING:\n    from pkg.low import a\nelse:\n    import pkg.high.h\n",
        "pkg.high.h": "",
    })
    assert find_cycles(graph) == []
    assert graph["pkg.low.b"] == [Import("pkg.high.h", 5)]  # the else branch runs


def test_a_cycle_through_a_package_init_is_found() -> None:
    sources = {"pkg": "", "pkg.high": "", "pkg.low": "from pkg.low.a import x\n", "pkg.low.a": "from pkg.low import b\n",
               "pkg.low.b": "", "pkg.high.h": "from pkg.low.a import y\n"}
    assert find_cycles(_toy(sources)) == []  # the modules of pkg.low do not run its __init__ again
    sources["pkg.low"] += "import pkg.high.h\n"  # pkg.high.h -> pkg.low.a runs pkg.low first, which imports pkg.high.h
    assert find_cycles(_toy(sources)) == ["pkg.high.h (line 1) -> pkg.low (line 2) -> pkg.high.h"]


def test_a_module_importing_its_own_package_that_imports_it_is_a_cycle() -> None:
    sources = {"pkg": "", "pkg.high": "", "pkg.low": "def f():\n    from pkg.low import a\n", "pkg.low.a": "import json\n"}
    assert find_cycles(_toy(sources)) == []
    sources["pkg.low.a"] += "from pkg.low import ERROR\n"  # the CLI registry and a command module of it, say
    assert find_cycles(_toy(sources)) == ["pkg.low (line 2) -> pkg.low.a (line 2) -> pkg.low"]


def test_an_upward_import_and_a_module_without_layer_are_reported() -> None:
    graph = _toy({"pkg": "", "pkg.low": "", "pkg.high": "", "pkg.high.h": "from pkg.low import a\n",
                  "pkg.low.a": "def f():\n    from pkg.high.h import g\n", "pkg.other": ""})
    assert find_upward_imports(graph, TOY_LAYERS) == [
        "pkg.low.a (low) imports pkg.high.h (high) at line 2",  # pkg.high.h importing pkg.low.a is fine
        "pkg.other has no layer: add it to LAYERS in tests/test_layers.py",
    ]


def test_a_plugin_importing_core_is_reported() -> None:
    source = ('from trafficmgr.plugin import hookimpl\nfrom trafficmgr.plugins.ingress import ir\n'
              'from trafficmgr.plugins.tls import certs\n\nTRAFFICMGR_DEPENDS = ("ingress",)\n\n'
              'def f():\n    from trafficmgr.core.model import Service\n')
    modules = ["trafficmgr.plugins.ingress.ir", "trafficmgr.plugins.tls.certs"]
    imports = {"trafficmgr.plugins.tls": imports_of("trafficmgr.plugins.tls", source, modules, is_package=True)}
    problems = plugin_violations("trafficmgr.plugins.tls", declared_depends(source), imports)
    assert len(problems) == 1 and problems[0].startswith("trafficmgr.plugins.tls imports trafficmgr.core.model at line 8"), problems
    undeclared = plugin_violations("trafficmgr.plugins.tls", (), imports)
    assert any("trafficmgr.plugins.ingress.ir" in p for p in undeclared)
