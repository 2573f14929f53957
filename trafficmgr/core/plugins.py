"""Plugin discovery, selection and isolated hook calls.

Plugins are modules (or objects) registered through the ``trafficmgr.plugins`` entry-point group. Built-in
plugins use the same group as third-party ones. Selection (``--plugins a,b`` or ``TRAFFICMGR_PLUGINS``)
loads only the named plugins: an unselected plugin is never imported.

Version compatibility: a plugin declares the trafficmgr versions it supports with its distribution's
dependency (``dependencies = ["trafficmgr>=0.1,<0.2"]``, checked before it is imported) and/or a module
attribute ``TRAFFICMGR_REQUIRES = ">=0.1,<0.2"`` (checked when it is registered). An incompatible plugin
is refused at startup with :class:`PluginError`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import metadata
from typing import Any

import attrs
import pluggy
from google.protobuf.message import Message

from trafficmgr.core import hookspecs, metrics
from trafficmgr.core.labels import LabelRegistry

log = logging.getLogger(__name__)

GROUP = "trafficmgr.plugins"
ENV_SELECTION = "TRAFFICMGR_PLUGINS"
#: Directories appended to ``sys.path`` (after site-packages) before plugins are discovered.
ENV_PLUGIN_PATH = "TRAFFICMGR_PLUGIN_PATH"
#: Module (or object) attribute with a PEP 440 specifier of the trafficmgr versions a plugin supports.
REQUIRES_ATTR = "TRAFFICMGR_REQUIRES"
#: Module (or object) attribute naming the plugins a plugin builds on (a tuple of plugin names).
DEPENDS_ATTR = "TRAFFICMGR_DEPENDS"


class PluginError(Exception):
    """A plugin cannot be selected or loaded; the message is meant for the user."""


@attrs.frozen(slots=True)
class PluginInfo:
    """What ``trafficmgr plugins list`` shows about one plugin."""

    name: str
    module: str
    version: str
    distribution: str
    builtin: bool
    hooks: tuple[str, ...] = ()
    loaded: bool = True
    depends: tuple[str, ...] = ()


def extend_plugin_path(value: str | None = None) -> list[str]:
    """Append the directories in ``value`` (default ``$TRAFFICMGR_PLUGIN_PATH``, ``os.pathsep``-separated)
    to the **end** of ``sys.path`` (once each) and return the ones added.

    This is where the Helm chart's ``extraPipPackages`` are installed: after site-packages, so that a
    package there can add plugins but never replace a module of the image (``PYTHONPATH`` would put it
    first). Plain ``sys.path`` entries: ``.pth`` files there are not executed.
    """
    import sys

    added = []
    for entry in (os.environ.get(ENV_PLUGIN_PATH, "") if value is None else value).split(os.pathsep):
        if entry.strip():
            path = os.path.abspath(entry.strip())
            if path not in sys.path:
                sys.path.append(path)
                added.append(path)
    return added


def available() -> dict[str, metadata.EntryPoint]:
    """Installed plugin entry points by name (not imported), the ``$TRAFFICMGR_PLUGIN_PATH`` directories
    included (:func:`extend_plugin_path`); for a name found twice, the first on ``sys.path`` wins."""
    extend_plugin_path()
    found: dict[str, metadata.EntryPoint] = {}
    for ep in metadata.entry_points(group=GROUP):
        found.setdefault(ep.name, ep)
    return dict(sorted(found.items()))


BUILTIN_PACKAGE = "trafficmgr.plugins."


def is_builtin(ep: metadata.EntryPoint) -> bool:
    """True for the plugins shipped in this distribution (``trafficmgr.plugins.<name>``)."""
    return ep.value.startswith(BUILTIN_PACKAGE)


def builtin_names() -> list[str]:
    """The names of the built-in plugins, sorted."""
    return [name for name, ep in available().items() if is_builtin(ep)]


def parse_selection(text: str | None) -> list[str] | None:
    """``"lb, fault"`` -> ``["lb", "fault"]``; None or ``"all"`` -> None (every installed plugin)."""
    if text is None:
        return None
    text = text.strip()
    if text in ("", "all", "*"):
        return None if text else []
    names = [n.strip() for n in text.split(",")]
    bad = [n for n in names if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", n)]
    if bad:
        raise PluginError(f"malformed plugin selection {text!r}: {', '.join(repr(b) for b in bad)} is not a plugin name "
                          "(use a comma-separated list such as lb,fault)")
    seen: list[str] = []
    for n in names:
        if n not in seen:
            seen.append(n)
    return seen


def distribution_requirement(dist: metadata.Distribution | None) -> str | None:
    """The version specifier of ``trafficmgr`` in ``dist``'s ``Requires-Dist`` (None when it has none, or
    only under an extra)."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    if dist is None:
        return None
    for line in dist.requires or ():
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if canonicalize_name(req.name) != "trafficmgr":
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        return str(req.specifier) or None
    return None


def check_compatible(name: str, spec: str | None, version: str | None = None) -> None:
    """Raise :class:`PluginError` unless trafficmgr ``version`` (default: this one) satisfies ``spec``."""
    from packaging.specifiers import InvalidSpecifier, SpecifierSet
    from packaging.version import InvalidVersion, Version

    from trafficmgr import __version__

    if spec is None or not str(spec).strip():
        return
    version = version or __version__
    try:
        allowed = SpecifierSet(str(spec))
    except InvalidSpecifier:
        raise PluginError(f"plugin {name!r} declares an invalid trafficmgr version range {spec!r} "
                          "(use a PEP 440 specifier such as '>=0.1,<0.2')") from None
    try:
        ok = allowed.contains(Version(version), prereleases=True)
    except InvalidVersion:
        ok = True  # an unversioned development checkout: nothing to compare
    if not ok:
        raise PluginError(f"plugin {name!r} requires trafficmgr {allowed}, this is {version}; "
                          f"install a version of the plugin that supports trafficmgr {version}, or deselect it with --plugins")


def declared_dependencies(name: str, plugin: Any) -> tuple[str, ...]:
    """The plugin names in ``plugin.TRAFFICMGR_DEPENDS`` (:class:`PluginError` when malformed)."""
    value = getattr(plugin, DEPENDS_ATTR, ())
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) and v for v in value):
        raise PluginError(f"plugin {name!r}: {DEPENDS_ATTR} must be a tuple of plugin names, not {value!r}")
    return tuple(value)


def dependency_order(plugins: Mapping[str, Any], installed: Iterable[str] = ()) -> list[str]:
    """Plugin names with every plugin after the plugins it depends on (else by name).

    pluggy calls the implementation registered last first, so registering in this order runs a plugin's
    hooks before those of the plugins it builds on. A dependency that is not among ``plugins`` or a cycle
    is a :class:`PluginError` naming the fix."""
    deps = {name: declared_dependencies(name, plugin) for name, plugin in plugins.items()}
    installed = set(installed)
    for name, needs in sorted(deps.items()):
        missing = [d for d in needs if d not in plugins]
        if missing:
            absent = [d for d in missing if d not in installed]
            how = (f"install {', '.join(absent)}" if absent else
                   f"add {', '.join(missing)} to --plugins / {ENV_SELECTION}, or deselect {name}")
            raise PluginError(f"plugin {name!r} needs plugin{'s' if len(missing) > 1 else ''} "
                              f"{', '.join(repr(m) for m in missing)}, which {'is' if len(missing) == 1 else 'are'} "
                              f"not {'installed' if absent else 'selected'}: {how}")
    order: list[str] = []
    state: dict[str, int] = {}  # 1: visiting, 2: done

    def visit(name: str, path: tuple[str, ...]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise PluginError(f"plugins depend on each other in a cycle: {' -> '.join((*path, name))}")
        state[name] = 1
        for dep in sorted(deps[name]):
            visit(dep, (*path, name))
        state[name] = 2
        order.append(name)

    for name in sorted(plugins):
        visit(name, ())
    return order


def _hook_names(plugin: Any) -> tuple[str, ...]:
    return tuple(sorted(n for n in dir(plugin) if n.startswith("trafficmgr_") and callable(getattr(plugin, n, None))))


class PluginHost:
    """The loaded plugins, their labels, and hook calls with per-plugin error isolation."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        for name in self.hook_names():
            opts = getattr(self.pm.hook, name).spec.opts
            # The host calls implementations one by one (error isolation): pluggy's own result
            # semantics would silently not apply.
            if opts.get("firstresult") or opts.get("historic"):
                raise RuntimeError(f"hookspec {name} must not be firstresult or historic")
        self.infos: dict[str, PluginInfo] = {}
        self.labels = LabelRegistry()
        self._logged: set[tuple[str, str, str]] = set()

    @classmethod
    def load(
        cls,
        selection: Sequence[str] | str | None = None,
        extra: Iterable[tuple[str, Any]] = (),
    ) -> PluginHost:
        """Load the selected entry-point plugins (all when ``selection`` is None) plus ``extra``
        ``(name, plugin object)`` pairs. Raises :class:`PluginError` for unknown names or import errors."""
        if selection is None:
            selection = os.environ.get(ENV_SELECTION)
        names = parse_selection(selection) if isinstance(selection, str) or selection is None else list(selection)
        eps = available()
        if names is not None:
            unknown = [n for n in names if n not in eps]
            if unknown:
                raise PluginError(
                    f"unknown plugin{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                    f"available: {', '.join(eps) or '(none installed)'}"
                )
        host = cls()
        loaded: dict[str, tuple[Any, metadata.EntryPoint]] = {}
        for name, ep in eps.items():
            if names is not None and name not in names:
                continue
            dist = ep.dist
            if getattr(dist, "name", "") != "trafficmgr":
                check_compatible(name, distribution_requirement(dist))
            try:
                plugin = ep.load()
            except Exception as exc:  # noqa: BLE001 - any import error is the plugin's fault
                raise PluginError(f"plugin {name!r} ({ep.value}) failed to import: {exc}") from exc
            loaded[name] = (plugin, ep)
        extras = dict(extra)
        everything = {**{n: p for n, (p, _) in loaded.items()}, **extras}
        for name in dependency_order(everything, installed=eps.keys()):
            if name in extras:
                host.register(name, extras[name], version="", distribution="", builtin=False)
                continue
            plugin, ep = loaded[name]
            dist = ep.dist
            host.register(
                name,
                plugin,
                version=getattr(dist, "version", "") or "",
                distribution=getattr(dist, "name", "") or "",
                builtin=is_builtin(ep),
            )
        from trafficmgr import __version__
        from trafficmgr.core import corelabels

        host.register("core", corelabels, version=__version__, distribution="trafficmgr", builtin=True)
        host._load_labels()
        return host

    def register(self, name: str, plugin: Any, version: str = "", distribution: str = "", builtin: bool = False) -> None:
        """Register one plugin object under ``name``; unknown ``trafficmgr_*`` hooks, wrapper
        implementations and an unsupported trafficmgr version (:data:`REQUIRES_ATTR`) are errors."""
        check_compatible(name, getattr(plugin, REQUIRES_ATTR, None))
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
            for caller in self.pm.get_hookcallers(plugin) or ():
                for impl in caller.get_hookimpls():
                    if impl.plugin is plugin and (impl.hookwrapper or impl.wrapper):
                        raise pluggy.PluginValidationError(plugin, (
                            f"{caller.name} is a wrapper implementation (wrapper=True or hookwrapper=True); trafficmgr "
                            "calls every implementation itself to isolate its errors, so wrappers would never run: "
                            "use a plain @hookimpl"))
        except pluggy.PluginValidationError as exc:
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            raise PluginError(f"plugin {name!r} is invalid: {exc}") from exc
        module = getattr(plugin, "__name__", type(plugin).__module__)
        self.infos[name] = PluginInfo(name, module, version, distribution, builtin, _hook_names(plugin),
                                      depends=declared_dependencies(name, plugin))

    def _load_labels(self) -> None:
        for name, plugin in self.pm.list_name_plugin():
            impl = getattr(plugin, "trafficmgr_labels", None)
            if impl is None:
                continue
            for spec in impl() or ():
                try:
                    self.labels.add(attrs.evolve(spec, plugin=name))
                except ValueError as exc:
                    raise PluginError(str(exc)) from exc

    # -- hook calls -----------------------------------------------------------------------------

    def _impls(self, hook: str) -> list[pluggy.HookImpl]:
        # pluggy calls the last registered implementation first (LIFO, then tryfirst/trylast).
        return list(reversed(getattr(self.pm.hook, hook).get_hookimpls()))

    def _failed(self, plugin: str, hook: str, exc: BaseException, what: str) -> None:
        metrics.PLUGIN_ERRORS.labels(plugin=plugin, hook=hook).inc()
        key = (plugin, hook, f"{type(exc).__name__}: {exc}")
        if key not in self._logged:
            self._logged.add(key)
            log.error("plugin %r hook %s failed for %s, its change was skipped: %s", plugin, hook, what, key[2], exc_info=exc)

    def mutate(self, hook: str, message: Message, what: str = "", lazy: Mapping[str, Callable[[], Any]] | None = None,
               **kwargs: Any) -> None:
        """Call a mutate-in-place hook on ``message`` (the argument not named in ``kwargs``); a plugin that
        raises has its change undone. ``lazy`` arguments are computed per implementation that declares them,
        after the previous implementation ran."""
        for impl in self._impls(hook):
            backup = type(message)()
            backup.CopyFrom(message)
            try:
                impl.function(*[kwargs[a] if a in kwargs else lazy[a]() if lazy and a in lazy else message
                                for a in impl.argnames])
            except Exception as exc:  # noqa: BLE001 - isolation is the contract
                message.CopyFrom(backup)
                self._failed(impl.plugin_name, hook, exc, what or message.DESCRIPTOR.name)

    def collect(self, hook: str, what: str = "", **kwargs: Any) -> list[Any]:
        """Call a contribution hook; returns the concatenated items of every plugin that succeeded."""
        items: list[Any] = []
        for impl in self._impls(hook):
            try:
                result: Any = impl.function(*[kwargs[a] for a in impl.argnames])
            except Exception as exc:  # noqa: BLE001 - isolation is the contract
                self._failed(impl.plugin_name, hook, exc, what or hook)
                continue
            if result:
                items.extend(result)
        return items

    def call_all(self, hook: str, **kwargs: Any) -> None:
        """Call a hook that returns nothing and mutates plain Python data (bootstrap, argparse)."""
        for impl in self._impls(hook):
            impl.function(*[kwargs[a] for a in impl.argnames])

    def hook_names(self) -> list[str]:
        return sorted(n for n in dir(self.pm.hook) if n.startswith("trafficmgr_"))
