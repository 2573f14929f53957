"""The Hooks reference of docs/plugins.md, generated from ``trafficmgr/core/hookspecs.py``.

The section between ``<!-- hooks:begin -->`` and ``<!-- hooks:end -->`` is :func:`render_hooks`: for each
phase banner of hookspecs.py (``# Phase: <name>. <text>`` between two dashed comment lines) a ``###``
heading, and for each hook under it a ``####`` heading, its signature (as written in hookspecs.py) in a
python block, its docstring (reST markup turned into Markdown) and the example below, if any.
``tests/test_docs.py`` fails when the file differs; ``TRAFFICMGR_REGEN_DOCS=1 python -m pytest
tests/test_docs.py`` rewrites the section.

The examples live here (hookspecs.py is code, not a place for them); ``tests/test_docs.py`` checks that
each one parses and declares only arguments its hook has.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import attrs

from trafficmgr.core import hookspecs

HOOKSPECS = Path(hookspecs.__file__)
BEGIN = "<!-- hooks:begin -->"
END = "<!-- hooks:end -->"
REGEN = "TRAFFICMGR_REGEN_DOCS=1 python -m pytest tests/test_docs.py"

_DASHES = re.compile(r"^# -{20,}\s*$")
_PHASE = re.compile(r"^# Phase: ([^.]+)\.\s*(.*)$")


@attrs.frozen
class Hook:
    name: str
    signature: str  # one line: ``def name(arg: Annotation, ...) -> Return``
    doc: str  # the docstring, cleaned (reST)
    line: int


@attrs.frozen
class Phase:
    name: str  # "startup", "cached mutate", ...
    text: str  # the rest of the banner, one line
    line: int
    hooks: tuple[Hook, ...] = ()


def _banners(lines: list[str]) -> list[tuple[int, str, str]]:
    """``(line number, name, text)`` of every phase banner: a ``# Phase: <name>. <text>`` comment (its
    text may continue on further comment lines) right after a dashed comment line."""
    found = []
    for i, line in enumerate(lines):
        m = _PHASE.match(line)
        if not m or i == 0 or not _DASHES.match(lines[i - 1]):
            continue
        text = [m.group(2).strip()]
        j = i + 1
        while j < len(lines) and lines[j].startswith("#") and not _DASHES.match(lines[j]):
            text.append(lines[j].lstrip("#").strip())
            j += 1
        if j == len(lines) or not _DASHES.match(lines[j]):
            raise ValueError(f"{HOOKSPECS.name}:{i + 1}: the phase banner is not closed by a dashed comment line")
        found.append((i + 1, m.group(1).strip(), " ".join(t for t in text if t)))
    return found


def _is_hookspec(fn: ast.FunctionDef) -> bool:
    return fn.name.startswith("trafficmgr_") and any(
        isinstance(d, ast.Name) and d.id == "hookspec" or isinstance(d, ast.Call) and getattr(d.func, "id", "") == "hookspec"
        for d in fn.decorator_list)


def signature(fn: ast.FunctionDef) -> str:
    """``def name(a: A, b: B) -> R`` with the annotations as written (``from __future__ import annotations``)."""
    params = [f"{a.arg}: {ast.unparse(a.annotation)}" if a.annotation else a.arg for a in fn.args.args]
    returns = f" -> {ast.unparse(fn.returns)}" if fn.returns else ""
    return f"def {fn.name}({', '.join(params)}){returns}"


def parse(source: str | None = None) -> tuple[list[Phase], list[Hook]]:
    """The phases of hookspecs.py in source order with their hooks, and the hooks above every banner."""
    source = HOOKSPECS.read_text() if source is None else source
    banners = _banners(source.splitlines())
    hooks = [Hook(node.name, signature(node), ast.get_docstring(node) or "", node.lineno)
             for node in ast.parse(source).body if isinstance(node, ast.FunctionDef) and _is_hookspec(node)]
    phases = []
    for i, (line, name, text) in enumerate(banners):
        end = banners[i + 1][0] if i + 1 < len(banners) else float("inf")
        phases.append(Phase(name, text, line, tuple(h for h in hooks if line < h.line < end)))
    unphased = [h for h in hooks if not banners or h.line < banners[0][0]]
    return phases, unphased


# -- reST docstrings -> Markdown ---------------------------------------------------------------------------

_ROLE = re.compile(r":(?:class|func|meth|attr|data|mod|exc|obj):`(~?)([^`]+)`")


def markdown(doc: str) -> str:
    """The docstring as Markdown: reST literals (double backticks) and roles (``:class:`~a.B```, shown
    as ``B``) become code spans; the ``Call style:`` line starts in bold."""
    text = _ROLE.sub(lambda m: f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`", doc)
    text = re.sub(r"``([^`]+)``", r"`\1`", text)
    return re.sub(r"^Call style:", "**Call style:**", text, flags=re.M)


# -- examples ------------------------------------------------------------------------------------------

#: One example implementation per hook (optional). Each is checked: it parses and its
#: ``def trafficmgr_*`` declares only arguments of that hook.
EXAMPLES: dict[str, str] = {
    "trafficmgr_add_arguments": '''
@hookimpl
def trafficmgr_add_arguments(parser, command):
    if command == "serve":
        parser.add_argument("--greeting-default", default="", help="x-greeting for unlabelled services")
''',
    "trafficmgr_labels": '''
@hookimpl
def trafficmgr_labels():
    return [LabelSpec("traffic.greeting.header", frozenset({labels.SERVICE}), labels.token(), "", "adds x-greeting")]
''',
    "trafficmgr_watch_kinds": '''
@hookimpl
def trafficmgr_watch_kinds():
    return [WatchKind("ConfigMap", "v1", "configmaps", lambda raw, ctx: raw["data"], label_selector="greeting=true")]
''',
    "trafficmgr_port_protocols": '''
@hookimpl
def trafficmgr_port_protocols(model):
    return [(ns, name, "http", "http") for (ns, name) in model.extra.get("ConfigMap", {})]
''',
    "trafficmgr_cluster": '''
@hookimpl
def trafficmgr_cluster(cluster, service):
    if service.labels.value("traffic.greeting.slow"):
        cluster.connect_timeout.FromMilliseconds(5000)
''',
    "trafficmgr_endpoints": '''
@hookimpl
def trafficmgr_endpoints(pairs):
    for pair in pairs:
        canary = pair.endpoint.labels.value("traffic.greeting.canary")
        pair.lb_endpoint.load_balancing_weight.value = 10 if canary else 90
''',
    "trafficmgr_virtual_host": '''
@hookimpl
def trafficmgr_virtual_host(vhost, service):
    value = service.labels.value("traffic.greeting.header")
    if value and not any(h.header.key == "x-greeting" for h in vhost.response_headers_to_add):
        h = vhost.response_headers_to_add.add()
        h.header.key, h.header.value = "x-greeting", value
''',
    "trafficmgr_route": '''
@hookimpl
def trafficmgr_route(route, service):
    ms = service.labels.value("traffic.greeting.timeout")
    if ms:
        route.route.timeout.FromMilliseconds(ms)
''',
    "trafficmgr_http_connection_manager": '''
@hookimpl
def trafficmgr_http_connection_manager(hcm, listener_name, service):
    if listener_name == "outbound" and service is not None and service.labels.value("traffic.greeting.xff"):
        hcm.use_remote_address.value = True
''',
    "trafficmgr_listener": '''
@hookimpl
def trafficmgr_listener(listener, role, listener_name):
    if role == GATEWAY and listener_name == "ingress":
        listener.per_connection_buffer_limit_bytes.value = 1 << 20
''',
    "trafficmgr_http_filters": '''
@hookimpl
def trafficmgr_http_filters(role, ctx):
    if role == SIDECAR and any(s.labels.value(LABEL) for s in ctx.model.services.values()):
        return [HttpFilter("envoy.filters.http.lua", ORDER_DEFAULT, lua_pb2.Lua())]
    return []
''',
    "trafficmgr_resources": '''
@hookimpl
def trafficmgr_resources(role, ctx):
    if role != SIDECAR:
        return []
    return [ctx.resource(cluster_pb2.Cluster(name="greeting-collector", type=cluster_pb2.Cluster.STATIC), "greeting-collector")]
''',
    "trafficmgr_bootstrap": '''
@hookimpl
def trafficmgr_bootstrap(bootstrap, role):
    bootstrap.setdefault("stats_config", {})["stats_tags"] = [{"tag_name": "greeting", "fixed_value": role}]
''',
    "trafficmgr_object_status": '''
@hookimpl
def trafficmgr_object_status(model):
    return [ObjectStatus(f"/apis/example.com/v1/namespaces/{ns}/greetings/{n}/status", {"ready": True}, g.resource_version)
            for (ns, n), g in model.extra.get("Greeting", {}).items() if not g.ready]
''',
    "trafficmgr_dashboard_routes": '''
@hookimpl
def trafficmgr_dashboard_routes(model):
    return [{"kind": "HTTPRoute", "namespace": ns, "name": n, "hosts": list(g.hosts), "matches": ["PathPrefix /"],
             "backends": [f"{g.service}:80"], "status": "Accepted" if g.ready else "waiting"}
            for (ns, n), g in model.extra.get("Greeting", {}).items()]
''',
    "trafficmgr_dashboard_endpoint_columns": '''
@hookimpl
def trafficmgr_dashboard_endpoint_columns(endpoints):
    return [{"name": "greeting", "title": "greeting", "values": [ep.labels.value("traffic.greeting.canary") for ep in endpoints]}]
''',
}


# -- rendering -----------------------------------------------------------------------------------------


def render_hooks(source: str | None = None) -> str:
    """The generated Hooks reference (what goes between the markers, without them)."""
    phases, unphased = parse(source)
    if unphased:
        raise ValueError(f"hooks above every phase banner of {HOOKSPECS.name}: {[h.name for h in unphased]}")
    out: list[str] = [f"<!-- generated from trafficmgr/core/hookspecs.py by tests/hookdocs.py: do not edit; run {REGEN} -->"]
    for phase in phases:
        out += ["", f"### Phase: {phase.name}", phase.text]
        for hook in phase.hooks:
            out += ["", f"#### {hook.name}", "```python", hook.signature, "```", markdown(hook.doc)]
            example = EXAMPLES.get(hook.name)
            if example:
                out += ["", "Example:", "```python", example.strip("\n"), "```"]
    return "\n".join(out) + "\n"


def doc_section(text: str) -> str | None:
    """What docs/plugins.md holds between the markers (None without both markers, in order)."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        return None
    return text[start + len(BEGIN):end].removeprefix("\n")


def replace_section(text: str, generated: str) -> str:
    """``text`` with the marked section replaced by ``generated``."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"docs/plugins.md needs the markers {BEGIN} and {END} (in that order) around the Hooks reference")
    return text[:start + len(BEGIN)] + "\n" + generated + text[end:]
