"""Meta-tests that keep the documentation and the contract honest (in the spirit of datasette's
tests/test_docs.py): the README label table matches the label registry, every hook is documented and
exercised by a test, and the README's CLI reference matches the real commands."""

from __future__ import annotations

import ast
import difflib
import inspect
import os
import re
import textwrap
import warnings
from pathlib import Path

import pytest

from tests import hookdocs
from trafficmgr import cli
from trafficmgr.core import admin, hookspecs, render
from trafficmgr.core.labels import LabelSpec
from trafficmgr.core.plugins import PluginHost, builtin_names
from trafficmgr.testing.pytest_plugin import HookCoverage

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PLUGINS_DOC = ROOT / "docs" / "plugins.md"
TESTS = ROOT / "tests"

#: Hooks no test calls yet. This set must shrink to empty: when a plugin's tests call a hook, remove it
#: here (``test_not_yet_exercised_is_current`` warns until you do).
NOT_YET_EXERCISED: set[str] = set()


def readme_section(title: str) -> str:
    """The text of ``## title`` up to the next ``## `` heading."""
    text = README.read_text()
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"README.md has no '## {title}' section"
    return m.group(1)


# -- labels ---------------------------------------------------------------------------------------

ROW = re.compile(r"^\| `(traffic\.[^`]+)` \| ([^|]+?) \| ((?:[^|\\]|\\.)+?) \|", re.M)


def builtin_specs() -> list[LabelSpec]:
    names = builtin_names()
    return PluginHost.load(names).labels.specs


def readme_labels() -> dict[str, tuple[str, str]]:
    """``{label: (On, Default)}`` from the README's label table (Default without backticks)."""
    rows: dict[str, tuple[str, str]] = {}
    for key, on, default in ROW.findall(readme_section("Labels")):
        assert key not in rows, f"{key} appears twice in the README label table"
        rows[key] = (on.strip(), default.strip().strip("`"))
    return rows


def test_readme_label_table_matches_registry() -> None:
    specs = builtin_specs()
    rows = readme_labels()
    regenerate = "\nregenerate the table with:\n  python -c \"from tests.test_docs import *; print(render.labels_markdown(builtin_specs()))\"\n"
    missing = [s.key for s in specs if s.key not in rows]
    assert not missing, f"labels missing from the README table: {missing}{regenerate}"
    unknown = sorted(set(rows) - {s.key for s in specs})
    assert not unknown, f"README documents labels no built-in plugin declares: {unknown}"
    for spec in specs:
        on, default = rows[spec.key]
        assert default == render.format_default(spec.default), f"{spec.key}: README default {default!r}{regenerate}"
        assert on == render.format_kinds(spec.kinds), f"{spec.key}: README 'On' {on!r}{regenerate}"


def test_readme_label_table_parser_sees_every_row() -> None:
    table_rows = [ln for ln in readme_section("Labels").splitlines() if ln.startswith("| `traffic.")]
    assert len(table_rows) == len(readme_labels()) == len(builtin_specs())


# -- hooks ----------------------------------------------------------------------------------------


def hookspec_names() -> list[str]:
    return sorted(
        name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
        if name.startswith("trafficmgr_") and hasattr(fn, f"{hookspecs.PROJECT}_spec")
    )


def test_hookspecs_found() -> None:
    assert "trafficmgr_cluster" in hookspec_names() and "trafficmgr_labels" in hookspec_names()


@pytest.mark.parametrize("name", hookspec_names())
def test_hookspec_has_docstring(name: str) -> None:
    doc = inspect.getdoc(getattr(hookspecs, name)) or ""
    assert len(doc) > 30, f"hookspec {name} needs a docstring saying when it is called and what it may change"


def test_every_hookspec_is_called_by_the_suite(trafficmgr_hook_calls: HookCoverage) -> None:
    """Every hook had an implementation really called by a test of this run: the trafficmgr pytest
    plugin records the calls (``trafficmgr.testing.hookcalls``) and runs this test after all others. A
    name in a docstring or comment does not count. Judged only when the whole suite ran (with ``-k`` or
    a few files, the tests that call a hook may not have run)."""
    partial = trafficmgr_hook_calls.partial_run(TESTS)
    if partial and os.environ.get("CI"):
        pytest.fail(f"CI must run the whole suite (the hook coverage is judged on it): {partial}")
    if partial:
        pytest.skip(f"judged on a whole-suite run only: {partial}")
    uncalled = set(hookspec_names()) - trafficmgr_hook_calls.calls.called()
    missing = sorted(uncalled - NOT_YET_EXERCISED)
    skipped = trafficmgr_hook_calls.skipped
    note = f" ({len(skipped)} tests were skipped, e.g. {skipped[:3]})" if skipped else ""
    assert not missing, f"no test of this run called an implementation of {missing}{note}"


def test_not_yet_exercised_is_current(trafficmgr_hook_calls: HookCoverage) -> None:
    """``NOT_YET_EXERCISED`` names only real hooks; entries that the suite now calls are reported as a
    warning (not a failure, so a plugin's tests can land before this file is edited): remove them."""
    assert NOT_YET_EXERCISED <= set(hookspec_names()), f"not hooks: {sorted(NOT_YET_EXERCISED - set(hookspec_names()))}"
    if trafficmgr_hook_calls.partial_run(TESTS):
        return
    now_exercised = sorted(NOT_YET_EXERCISED & trafficmgr_hook_calls.calls.called())
    if now_exercised:
        warnings.warn(f"tests now exercise {now_exercised}: remove them from NOT_YET_EXERCISED in tests/test_docs.py",
                      stacklevel=1)


META_BUILD = """\
\"\"\"Names trafficmgr_route in a docstring only: the recorder must not count that.\"\"\"
from trafficmgr import hookimpl
from trafficmgr.core.model import Labels, Model, Service, ServicePort
from trafficmgr.core.plugins import PluginHost
from trafficmgr.core.translate.builder import Builder


class OnlyCluster:
    @hookimpl
    def trafficmgr_cluster(self, cluster):
        cluster.connect_timeout.FromMilliseconds(1234)


def test_build():
    svc = Service("default", "web", (ServicePort("http", 80, 80, "http"),), cluster_ip="10.96.0.1", labels=Labels({}))
    Builder(PluginHost.load([], extra=[("only", OnlyCluster())])).build(Model(services={svc.key: svc}))
"""

META_COVERAGE = """\
from pathlib import Path

import pytest


def test_0_coverage(trafficmgr_hook_calls):
    partial = trafficmgr_hook_calls.partial_run(Path(__file__).parent)
    if partial:
        pytest.skip(partial)
    calls = trafficmgr_hook_calls.calls
    print("FIRST", calls.first.get("trafficmgr_cluster"))
    assert {"trafficmgr_cluster", "trafficmgr_route"} <= calls.called(), sorted(
        {"trafficmgr_cluster", "trafficmgr_route"} - calls.called())
"""


def test_hook_call_recorder_counts_calls_not_mentions(tmp_path: Path) -> None:
    """The recorder behind ``test_every_hookspec_is_called_by_the_suite``, on a two-file suite run by a
    real pytest: a hook that is only named in a docstring (``trafficmgr_route``, no implementation)
    is reported as not called, the one a plugin implements and the builder calls is credited to the
    test that called it, the coverage test runs last although it sorts first, and a ``-k`` run is not
    judged."""
    import subprocess
    import sys

    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_build.py").write_text(META_BUILD)
    (suite / "test_0_coverage.py").write_text(META_COVERAGE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    cmd = [sys.executable, "-m", "pytest", "-p", "trafficmgr.testing.pytest_plugin", "-p", "no:cacheprovider",
           "-v", "-s", "--rootdir", str(suite), str(suite)]
    whole = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    out = whole.stdout
    assert whole.returncode == 1, out + whole.stderr
    assert "AssertionError: ['trafficmgr_route']" in out, out
    assert "FIRST test_build.py::test_build" in out, out
    assert out.index("test_build.py::test_build PASSED") < out.index("test_0_coverage.py::test_0_coverage"), out
    part = subprocess.run([*cmd, "-k", "coverage"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert part.returncode == 0 and "SKIPPED (1 tests deselected)" in part.stdout, part.stdout + part.stderr


def test_hook_coverage_cannot_skip_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under CI a partial run fails the coverage check instead of skipping it (a narrowed CI command, -k or
    -m or shards, would otherwise turn the check off unnoticed); without CI it skips."""
    class Partial:
        def partial_run(self, tests: Path) -> str:
            return "1 tests deselected"

    check = test_every_hookspec_is_called_by_the_suite
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="CI must run the whole suite"):
        check(Partial())  # type: ignore[arg-type]
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="whole-suite run only"):
        check(Partial())  # type: ignore[arg-type]


# -- docs/plugins.md ------------------------------------------------------------------------------
# The Hooks reference is generated from hookspecs.py (tests/hookdocs.py); the tests below check the
# generated section is current, that hookspecs.py has what the generator needs (phase banners, a
# "Call style:" line per hook), and, independently of the generator, that every hook's signature in
# the document is the one pluggy sees.


def test_plugins_doc_hooks_section_is_generated() -> None:
    """docs/plugins.md's Hooks reference is ``hookdocs.render_hooks()``; with ``TRAFFICMGR_REGEN_DOCS=1``
    this test rewrites it instead."""
    text = PLUGINS_DOC.read_text()
    generated = hookdocs.render_hooks()
    if os.environ.get("TRAFFICMGR_REGEN_DOCS"):
        PLUGINS_DOC.write_text(hookdocs.replace_section(text, generated))
        return
    current = hookdocs.doc_section(text)
    assert current is not None, f"docs/plugins.md lost the markers {hookdocs.BEGIN} / {hookdocs.END} around the Hooks reference"
    diff = "".join(difflib.unified_diff(current.splitlines(True), generated.splitlines(True),
                                        "docs/plugins.md", "generated from hookspecs.py", n=1))
    assert current == generated, (
        "the Hooks section of docs/plugins.md differs from trafficmgr/core/hookspecs.py; regenerate it with\n"
        f"  {hookdocs.REGEN}\n{diff[:4000]}")


def test_hookdocs_sees_every_hookspec_under_a_phase_banner() -> None:
    """Every hook of hookspecs.py stands under a ``# Phase: ...`` banner (the generator finds them all)."""
    phases, unphased = hookdocs.parse()
    assert not unphased, f"hookspecs.py: {[h.name for h in unphased]} above the first '# Phase: ...' banner"
    in_phases = [h.name for p in phases for h in p.hooks]
    assert sorted(in_phases) == hookspec_names(), "hookspecs.py: the generator and pluggy see different hooks"
    assert all(p.hooks for p in phases), f"phase banners without hooks: {[p.name for p in phases if not p.hooks]}"
    assert [p.name for p in phases] == ["startup", "model", "cached mutate", "per role", "bootstrap", "after publish", "on request"]


def test_hookdocs_finds_unphased_hooks_and_unclosed_banners() -> None:
    """The generator's parser is strict: a hook above every banner and a banner without its closing
    dashed line are reported, not silently dropped."""
    dashes = "# " + "-" * 40
    source = ("from x import hookspec\n\n@hookspec\ndef trafficmgr_early() -> None:\n    \"\"\"Early.\"\"\"\n\n"
              f"{dashes}\n# Phase: late. Called late.\n{dashes}\n\n@hookspec\ndef trafficmgr_late() -> None:\n"
              "    \"\"\"Late.\"\"\"\n")
    phases, unphased = hookdocs.parse(source)
    assert [h.name for h in unphased] == ["trafficmgr_early"]
    assert [(p.name, p.text, [h.name for h in p.hooks]) for p in phases] == [("late", "Called late.", ["trafficmgr_late"])]
    with pytest.raises(ValueError, match="trafficmgr_early"):
        hookdocs.render_hooks(source)
    with pytest.raises(ValueError, match="not closed"):
        hookdocs.parse(f"{dashes}\n# Phase: open. Never closed.\n\nx = 1\n")


CALL_STYLE = re.compile(r"^Call style: (mutate|contribute|setup); errors are (isolated|not isolated)\b", re.M)


@pytest.mark.parametrize("name", hookspec_names())
def test_hookspec_docstring_has_a_call_style_line(name: str) -> None:
    """Every hookspec says how it is called and whether its errors are isolated, in one line the docs
    show; the return annotation agrees (mutate and setup hooks return None, contribute hooks a list)."""
    fn = getattr(hookspecs, name)
    m = CALL_STYLE.search(inspect.getdoc(fn) or "")
    assert m, f"hookspec {name}: the docstring needs a line 'Call style: mutate|contribute|setup; errors are [not ]isolated...'"
    returns = _normalized(str(inspect.signature(fn).return_annotation))
    if m.group(1) == "contribute":
        assert returns.startswith("list["), f"hookspec {name} contributes but returns {returns}"
    else:
        assert returns == "None", f"hookspec {name} is a {m.group(1)} hook but returns {returns}"


@pytest.mark.parametrize("name", sorted(hookdocs.EXAMPLES))
def test_plugins_doc_hook_examples_use_the_hooks_arguments(name: str) -> None:
    """Each generated example is a ``@hookimpl`` of its hook declaring only arguments the hook has (an
    implementation naming another argument is refused at registration)."""
    assert name in hookspec_names(), f"tests/hookdocs.py has an example for {name}, which is not a hook"
    defs = [n for n in ast.parse(hookdocs.EXAMPLES[name]).body if isinstance(n, ast.FunctionDef)]
    assert [d.name for d in defs] == [name], f"the example of {name} must define exactly that function"
    assert [ast.unparse(d) for d in defs[0].decorator_list] == ["hookimpl"]
    declared = [a.arg for a in defs[0].args.args]
    allowed = list(inspect.signature(getattr(hookspecs, name)).parameters)
    assert set(declared) <= set(allowed), f"the example of {name} declares {declared}; the hook has {allowed}"


def _normalized(annotation: str) -> str:
    return ast.unparse(ast.parse(annotation, mode="eval").body)


def spec_signature(name: str) -> tuple[list[tuple[str, str]], str]:
    """``([(param, annotation)], return annotation)`` of a hookspec, annotations normalized."""
    sig = inspect.signature(getattr(hookspecs, name))
    params = [(p.name, _normalized(str(p.annotation))) for p in sig.parameters.values()]
    return params, _normalized(str(sig.return_annotation))


def documented_signatures() -> dict[str, tuple[list[tuple[str, str]], str]]:
    """Every ``def trafficmgr_*(...) -> ...`` line that opens a python code block right under a
    ``#### trafficmgr_*`` heading of docs/plugins.md."""
    text = PLUGINS_DOC.read_text()
    out: dict[str, tuple[list[tuple[str, str]], str]] = {}
    for m in re.finditer(r"^#### (trafficmgr_\w+)\n```python\n(def .*)\n```", text, re.M):
        name, line = m.group(1), m.group(2)
        fn = ast.parse(line.rstrip(":") + ":\n    pass").body[0]
        assert isinstance(fn, ast.FunctionDef) and fn.name == name, f"docs/plugins.md: heading {name} has signature {line!r}"
        params = [(a.arg, ast.unparse(a.annotation) if a.annotation else "") for a in fn.args.args]
        out[name] = (params, ast.unparse(fn.returns) if fn.returns else "")
    return out


def test_plugins_doc_documents_every_hook_with_its_signature() -> None:
    """Independent of the generator: the signatures in the document are pluggy's (``inspect``)."""
    documented = documented_signatures()
    missing = sorted(set(hookspec_names()) - set(documented))
    assert not missing, f"docs/plugins.md has no '#### <hook>' section with a signature block for {missing}; run {hookdocs.REGEN}"
    stale = sorted(set(documented) - set(hookspec_names()))
    assert not stale, f"docs/plugins.md documents hooks that do not exist: {stale}; run {hookdocs.REGEN}"
    for name in hookspec_names():
        assert documented[name] == spec_signature(name), (
            f"docs/plugins.md: {name} signature differs from trafficmgr/core/hookspecs.py (run {hookdocs.REGEN})\n"
            f"  docs: {documented[name]}\n  spec: {spec_signature(name)}")


def test_plugins_doc_signature_parser_sees_every_section() -> None:
    headings = re.findall(r"^#### (trafficmgr_\w+)\s*$", PLUGINS_DOC.read_text(), re.M)
    assert len(headings) == len(documented_signatures()) == len(hookspec_names())


def test_plugins_doc_examples_are_valid_python() -> None:
    """Every python block of docs/plugins.md parses (signature lines as a def; blocks inside list items
    are indented)."""
    blocks = [textwrap.dedent(b) for b in re.findall(r"```python\n(.*?)```", PLUGINS_DOC.read_text(), re.S)]
    assert len(blocks) >= 10, "docs/plugins.md lost its python examples (or the pattern no longer finds them)"
    for block in blocks:
        signature = block.startswith("def ") and block.count("\n") == 1
        source = block.rstrip() + ":\n    pass\n" if signature else block
        ast.parse(source)


def test_plugins_doc_imports_only_the_public_plugin_api() -> None:
    """Plugins import from ``trafficmgr.plugin``: the guide never shows an import of ``trafficmgr.core``
    (it names old ones only in prose), and every name its examples import exists there."""
    from trafficmgr import plugin

    text = PLUGINS_DOC.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    for block in blocks:
        assert not re.search(r"^\s*(from|import) trafficmgr\.core", block, re.M), f"docs/plugins.md example imports trafficmgr.core:\n{block}"
        for m in re.finditer(r"^from trafficmgr\.plugin import (.+)$", block, re.M):
            names = [n.strip() for n in m.group(1).split(",")]
            assert set(names) <= set(plugin.__all__), f"docs/plugins.md imports {sorted(set(names) - set(plugin.__all__))} from trafficmgr.plugin"
    assert re.search(r"^from trafficmgr\.plugin import ", text, re.M), "the quick start shows the trafficmgr.plugin import"


def test_plugins_doc_names_every_public_plugin_api_name() -> None:
    """Every name ``trafficmgr.plugin`` exports is mentioned (in backticks) in docs/plugins.md."""
    from trafficmgr import plugin

    text = PLUGINS_DOC.read_text()
    missing = [n for n in plugin.__all__ if f"`{n}`" not in text]
    assert not missing, f"docs/plugins.md does not mention these names of trafficmgr.plugin: {missing}"


def test_readme_points_at_plugins_doc() -> None:
    assert "docs/plugins.md" in readme_section("Plugins")


# -- CLI reference --------------------------------------------------------------------------------

HEADING = re.compile(r"^### `trafficmgr ([a-z][a-z -]*)`\s*$", re.M)


def readme_commands() -> dict[str, str]:
    """``{"plugins list": section text}`` for every ``### `trafficmgr ...` `` heading."""
    section = readme_section("CLI reference")
    heads = list(HEADING.finditer(section))
    return {m.group(1).strip(): section[m.end(): heads[i + 1].start() if i + 1 < len(heads) else len(section)]
            for i, m in enumerate(heads)}


def real_commands() -> dict[str, object]:
    """Leaf commands of the parser as built for a plain ``trafficmgr --help`` (no argv: no plugin options)."""
    cli.load_command_modules()
    return cli.command_paths(cli.build_parser())


def test_cli_reference_matches_commands() -> None:
    documented, real = set(readme_commands()), set(real_commands())
    assert not real - documented, f"commands missing from the README's CLI reference: {sorted(real - documented)}"
    assert not documented - real, f"README documents commands that do not exist: {sorted(documented - real)}"


def test_cli_reference_documents_every_option() -> None:
    sections = readme_commands()
    for path, parser in real_commands().items():
        for action in parser._actions:  # noqa: SLF001
            longs = [o for o in action.option_strings if o.startswith("--")]
            if not longs or longs[0] in ("--help", "--log-level"):
                continue
            assert any(o in sections[path] for o in longs), f"README: 'trafficmgr {path}' does not mention {longs[0]}"


def test_admin_routes_documented() -> None:
    text = README.read_text()
    for route in admin.ROUTES:
        assert f"`{route}" in text, f"README does not mention the admin route {route}"
