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
from trafficmgr.core.cache import TYPE_ORDER, Resource
from trafficmgr.core.contrib import (
    ALL_CHAINS,
    ORDER_ROUTER,
    TCP_CHAINS,
    HttpFilter,
    NetworkFilter,
    ObjectStatus,
    ServiceRoutes,
    WatchKind,
)
from trafficmgr.core.labels import LabelRegistry, LabelSpec
from trafficmgr.core.once import Seen

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


#: What happens when an implementation of a hook raises (or returns something that is not what the hook
#: returns). In every case the failure is counted in ``trafficmgr_plugin_errors_total{plugin,hook}``.
#:
#: - ``ISOLATED``: the call's effect is dropped (a mutated message is restored to what it was before the
#:   call, object statuses are not written this time), the failure is logged (with its traceback, once
#:   per plugin, hook and message) and serving continues.
#: - ``LAST_GOOD``: a contribution the build depends on (filters, whole resources, port protocols): the
#:   plugin's last successful result for the same call (hook and role) is used again, so a failing plugin
#:   freezes its own part of the config instead of removing it (a gateway listener would disappear);
#:   logged like ``ISOLATED``. Before any success there is nothing to reuse: it contributes nothing.
#: - ``STARTUP``: the hook runs when a command starts (or a bootstrap is made), where leaving the
#:   plugin's part out would silently change what runs, so the failure is a :class:`PluginError` naming
#:   the plugin and the hook (the command stops with that one message).
#:
#: tests/test_plugin_failures.py holds one test per entry, with a real control plane and Envoy.
ISOLATED, LAST_GOOD, STARTUP = "isolated", "last good", "startup"
HOOK_POLICY: dict[str, str] = {
    "trafficmgr_add_arguments": STARTUP,
    "trafficmgr_labels": STARTUP,
    "trafficmgr_watch_kinds": STARTUP,
    "trafficmgr_bootstrap": STARTUP,
    "trafficmgr_port_protocols": LAST_GOOD,
    "trafficmgr_cluster": ISOLATED,
    "trafficmgr_endpoints": ISOLATED,
    "trafficmgr_virtual_host": ISOLATED,
    "trafficmgr_route": ISOLATED,
    "trafficmgr_http_connection_manager": ISOLATED,
    "trafficmgr_listener": ISOLATED,
    "trafficmgr_http_filters": LAST_GOOD,
    "trafficmgr_network_filters": LAST_GOOD,
    "trafficmgr_resources": LAST_GOOD,
    "trafficmgr_service_routes": LAST_GOOD,
    "trafficmgr_object_status": ISOLATED,
    "trafficmgr_dashboard_routes": ISOLATED,
    "trafficmgr_dashboard_endpoint_columns": ISOLATED,
}
#: Distinct failures remembered for "log once" (the oldest is forgotten first; a forgotten failure that
#: happens again is logged again). Bounded: a plugin whose error text names objects or values would
#: otherwise grow the set for as long as the process runs.
LOGGED_FAILURES_MAX = 1024


def _check_item(hook: str, item: Any) -> None:
    """Raise TypeError unless ``item`` is what contribution ``hook`` returns (checked here so that a bad
    item fails its plugin's call, not the build or the command that consumes it)."""
    if hook == "trafficmgr_http_filters":
        if not isinstance(item, HttpFilter):
            raise TypeError(f"returned {type(item).__name__}, not an HttpFilter")
        if not (isinstance(item.name, str) and item.name and isinstance(item.order, int) and item.order < ORDER_ROUTER
                and isinstance(item.config, Message)):
            raise TypeError(f"returned a malformed HttpFilter (name must be a non-empty str, order an int below "
                            f"ORDER_ROUTER, config a protobuf message): {item!r}")
    elif hook == "trafficmgr_network_filters":
        if isinstance(item, HttpFilter):
            _check_item("trafficmgr_http_filters", item)
        elif not isinstance(item, NetworkFilter):
            raise TypeError(f"returned {type(item).__name__}, not a NetworkFilter or an HttpFilter")
        elif not (isinstance(item.name, str) and item.name and isinstance(item.order, int)
                  and isinstance(item.config, Message) and item.applies_to in (ALL_CHAINS, TCP_CHAINS)):
            raise TypeError(f"returned a malformed NetworkFilter (name must be a non-empty str, order an int, config a "
                            f"protobuf message, applies_to {ALL_CHAINS!r} or {TCP_CHAINS!r}): {item!r}")
    elif hook == "trafficmgr_resources":
        if not isinstance(item, Resource):
            raise TypeError(f"returned {type(item).__name__}, not a Resource (make one with ctx.resource(...))")
        if item.type_url not in TYPE_ORDER:
            raise TypeError(f"returned resource {item.name!r} of type {item.type_url}, which xDS here does not serve "
                            f"(one of: {', '.join(t.rpartition('.')[2] for t in TYPE_ORDER)})")
    elif hook == "trafficmgr_service_routes":
        if not (isinstance(item, ServiceRoutes) and isinstance(item.namespace, str) and isinstance(item.name, str)
                and isinstance(item.port, int) and isinstance(item.routes, tuple)
                and all(isinstance(r, Message) and r.DESCRIPTOR.full_name == "envoy.config.route.v3.Route" for r in item.routes)):
            raise TypeError(f"returned {item!r}, not a ServiceRoutes with str namespace/name, int port and a tuple of Route messages")
    elif hook == "trafficmgr_object_status":
        if not (isinstance(item, ObjectStatus) and isinstance(item.path, str) and isinstance(item.status, dict)):
            raise TypeError(f"returned {item!r}, not an ObjectStatus with a str path and a dict status")
    elif hook == "trafficmgr_watch_kinds":
        if not (isinstance(item, WatchKind) and all(isinstance(v, str) and v for v in (item.kind, item.api_version, item.plural))
                and callable(item.convert)):
            raise TypeError(f"returned {item!r}, not a WatchKind with kind, api_version, plural and a callable convert")
    elif hook == "trafficmgr_dashboard_endpoint_columns":
        if not (isinstance(item, Mapping) and isinstance(item.get("name"), str) and isinstance(item.get("values"), (list, tuple))):
            raise TypeError(f"returned {item!r:.200}, not a dict with a str 'name' and a list of 'values'")
    elif hook == "trafficmgr_labels":
        if not isinstance(item, LabelSpec):
            raise TypeError(f"returned {type(item).__name__}, not a LabelSpec")
    elif hook == "trafficmgr_port_protocols":
        if not (isinstance(item, (tuple, list)) and len(item) == 4 and isinstance(item[0], str) and isinstance(item[1], str)
                and isinstance(item[2], (int, str)) and isinstance(item[3], str)):
            raise TypeError(f"returned {item!r}, not a (namespace, service, port, protocol) tuple of str, str, int|str, str")


def restore(message: Message, backup: Message) -> None:
    """Make ``message`` equal to ``backup`` in place, keeping the submessage objects a caller may hold
    attached (the builder keeps a route it added to a virtual host and passes it to the route hooks after
    the virtual host hooks ran). ``message.CopyFrom(backup)`` would detach them: changes made through
    them afterwards would be lost silently. Only a repeated field whose length changed is rebuilt."""
    if message == backup:
        return
    for field in message.DESCRIPTOR.fields:
        name = field.name
        is_map = field.type == field.TYPE_MESSAGE and field.message_type is not None and field.message_type.GetOptions().map_entry
        if field.type == field.TYPE_MESSAGE and not is_map:
            if field.is_repeated:
                current, wanted = getattr(message, name), getattr(backup, name)
                if len(current) == len(wanted):
                    for a, b in zip(current, wanted):
                        restore(a, b)
                else:
                    del current[:]
                    current.extend(wanted)
            elif backup.HasField(name):
                sub = getattr(message, name)
                if not message.HasField(name):
                    sub.SetInParent()
                restore(sub, getattr(backup, name))
            elif message.HasField(name):
                message.ClearField(name)
        elif field.is_repeated:  # repeated scalars and maps
            if getattr(message, name) != getattr(backup, name):
                message.ClearField(name)
                getattr(message, name).MergeFrom(getattr(backup, name))
        elif field.has_presence:
            if backup.HasField(name):
                setattr(message, name, getattr(backup, name))
            elif message.HasField(name):
                message.ClearField(name)
        else:
            setattr(message, name, getattr(backup, name))
    if message != backup:  # e.g. unknown fields: exactness first
        message.CopyFrom(backup)


def _items(hook: str, result: Any) -> list[Any]:
    """The items of a contribution hook's result (None or a list/tuple), each checked."""
    if result is None:
        return []
    if not isinstance(result, (list, tuple)):
        raise TypeError(f"returned {type(result).__name__}, not a list")
    for item in result:
        _check_item(hook, item)
    return list(result)


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
        self._logged = Seen(LOGGED_FAILURES_MAX)
        # LAST_GOOD hooks: (hook, plugin, what) -> that call's last successful items (bounded by
        # plugins x hooks x roles).
        self._last_good: dict[tuple[str, str, str], list[Any]] = {}
        self._impl_cache: dict[str, tuple[pluggy.HookImpl, ...]] = {}

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
                raise PluginError(f"plugin {name!r} ({ep.value}) failed to import: {type(exc).__name__}: {exc} "
                                  f"(install what it needs, or deselect it with --plugins / {ENV_SELECTION})") from exc
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
        self._impl_cache.clear()
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
            try:
                specs = _items("trafficmgr_labels", impl())
            except Exception as exc:  # noqa: BLE001 - a startup hook: reported as the plugin's error
                raise self._startup_error(name, "trafficmgr_labels", exc) from exc
            for spec in specs:
                try:
                    self.labels.add(attrs.evolve(spec, plugin=name))
                except ValueError as exc:
                    raise PluginError(str(exc)) from exc

    # -- hook calls -----------------------------------------------------------------------------

    def _impls(self, hook: str) -> tuple[pluggy.HookImpl, ...]:
        # pluggy calls the last registered implementation first (LIFO, then tryfirst/trylast). Cached per
        # hook (a build calls mutate hooks ~5 times per service; :meth:`register` clears the cache).
        impls = self._impl_cache.get(hook)
        if impls is None:
            impls = self._impl_cache[hook] = tuple(reversed(getattr(self.pm.hook, hook).get_hookimpls()))
        return impls

    def _failed(self, plugin: str, hook: str, exc: BaseException, what: str) -> None:
        """An isolated failure: counted every time, logged (with the traceback) once per distinct message."""
        metrics.PLUGIN_ERRORS.labels(plugin=plugin, hook=hook).inc()
        key = (plugin, hook, f"{type(exc).__name__}: {str(exc)[:500]}")
        if not self._logged.first(key):
            return
        log.error("plugin %r hook %s failed for %s (serving continues; counted in "
                  "trafficmgr_plugin_errors_total): %s", plugin, hook, what, key[2], exc_info=exc)

    @staticmethod
    def _startup_error(plugin: str, hook: str, exc: BaseException) -> PluginError:
        """The error of a startup hook, counted and worded for the user (the traceback is logged at debug)."""
        metrics.PLUGIN_ERRORS.labels(plugin=plugin, hook=hook).inc()
        log.debug("plugin %r hook %s failed", plugin, hook, exc_info=exc)
        return PluginError(f"plugin {plugin!r} failed in {hook}: {type(exc).__name__}: {str(exc)[:500]} "
                           f"(fix or upgrade the plugin, or deselect it with --plugins / {ENV_SELECTION})")

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
            except (Exception, SystemExit) as exc:  # noqa: BLE001 - isolation is the contract (sys.exit() in a plugin too)
                restore(message, backup)
                self._failed(impl.plugin_name, hook, exc, what or message.DESCRIPTOR.name)

    def collect(self, hook: str, what: str = "", **kwargs: Any) -> list[Any]:
        """Call a contribution hook; returns the concatenated items of every plugin, in call order.

        A plugin that raises, or returns anything but a list of the hook's item type, has failed; by the
        hook's :data:`HOOK_POLICY`: its items are left out (:data:`ISOLATED`), its last successful items
        for the same ``what`` are used (:data:`LAST_GOOD`), or :class:`PluginError` is raised
        (:data:`STARTUP`: ``trafficmgr_watch_kinds``). The ``convert``/``keep`` functions
        of a plugin's :class:`WatchKind` are isolated the same way (hook label
        ``trafficmgr_watch_kinds.convert`` / ``.keep``): the object is ignored / none are kept."""
        policy = HOOK_POLICY.get(hook, ISOLATED)
        items: list[Any] = []
        for impl in self._impls(hook):
            key = (hook, impl.plugin_name, what)
            try:
                got = _items(hook, impl.function(*[kwargs[a] for a in impl.argnames]))
            except (Exception, SystemExit) as exc:  # noqa: BLE001 - isolation is the contract (sys.exit() in a plugin too)
                if policy == STARTUP:
                    raise self._startup_error(impl.plugin_name, hook, exc) from exc
                last = self._last_good.get(key) if policy == LAST_GOOD else None
                self._failed(impl.plugin_name, hook, exc, (what or hook) + (
                    f", its previous {len(last)} item(s) are used again" if last is not None else ""))
                items.extend(last or ())
                continue
            if policy == LAST_GOOD:
                self._last_good[key] = got
            if hook == "trafficmgr_watch_kinds":
                got = [self._guard_watch_kind(impl.plugin_name, wk) for wk in got]
            items.extend(got)
        return items

    def _guard_watch_kind(self, plugin: str, wk: WatchKind) -> WatchKind:
        convert, keep = wk.convert, wk.keep

        def guarded_convert(raw: dict[str, Any], ctx: Any) -> Any:
            try:
                return convert(raw, ctx)
            except Exception as exc:  # noqa: BLE001 - one object must not stop the watch
                md = raw.get("metadata") or {} if isinstance(raw, dict) else {}
                self._failed(plugin, "trafficmgr_watch_kinds.convert", exc,
                             f"{wk.kind} {md.get('namespace') or ''}/{md.get('name') or ''} (the object is ignored)")
                return None

        def guarded_keep(extra: Mapping[str, Mapping[tuple[str, str], Any]]) -> Any:
            try:
                assert keep is not None
                return keep(extra)
            except Exception as exc:  # noqa: BLE001 - a filter must not stop the build
                self._failed(plugin, "trafficmgr_watch_kinds.keep", exc, f"{wk.kind} (none of its objects are kept)")
                return ()

        return attrs.evolve(wk, convert=guarded_convert, keep=guarded_keep if keep is not None else None)

    def call_all(self, hook: str, **kwargs: Any) -> None:
        """Call a setup hook that returns nothing and mutates plain Python data (bootstrap, argparse).

        These are :data:`STARTUP` hooks: a plugin that raises stops the call with :class:`PluginError`
        naming the plugin and the hook (a bootstrap is then not made; the CLI prints the one message and
        exits 1). An option that clashes with another one (argparse's "conflicting option string") is
        reported the same way, naming the plugin that added it last."""
        for impl in self._impls(hook):
            try:
                impl.function(*[kwargs[a] for a in impl.argnames])
            except Exception as exc:  # noqa: BLE001 - reported as the plugin's startup error
                raise self._startup_error(impl.plugin_name, hook, exc) from exc

    def hook_names(self) -> list[str]:
        return sorted(n for n in dir(self.pm.hook) if n.startswith("trafficmgr_"))
