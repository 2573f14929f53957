"""Which trafficmgr hooks really ran an implementation: a recorder for test sessions.

:class:`trafficmgr.core.plugins.PluginHost` calls every implementation itself (one by one, to isolate
errors) instead of through pluggy's hook caller, so pluggy's ``add_hookcall_monitoring`` sees nothing.
While a :class:`HookCalls` recorder is active, the two places the host calls implementations are
watched instead:

- ``PluginHost._impls(hook)`` feeds ``mutate``, ``collect`` and ``call_all``: until a hook has been
  recorded, the implementations it returns are wrapped so that the hook is recorded when one of them is
  *called* (not when it is merely looked up). Once recorded, the host gets the plain list again, so a
  recorder costs a set lookup per hook call.
- ``PluginHost._load_labels`` calls each registered plugin's ``trafficmgr_labels`` directly; when it
  returns normally, every plugin with that hook was called, and ``trafficmgr_labels`` is recorded.

A hook called with no implementation registered is not recorded. Calls made in other processes (a
``trafficmgr serve`` subprocess) are not seen. Recorders nest; the patch is installed with the first
one started and removed with the last one stopped. Not thread-safe to start/stop concurrently (recording
from any thread is fine: it only adds to a dict).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

_active: list[HookCalls] = []
_originals: dict[str, Any] = {}


@attrs.define(eq=False)
class HookCalls:
    """The hooks called so far while this recorder was active: ``first[hook]`` is the value of
    :attr:`current` (the pytest plugin sets the running test's node id) when the hook was first called."""

    first: dict[str, str] = attrs.field(factory=dict)
    current: str = ""

    def called(self) -> set[str]:
        """Names of the hooks at least one implementation of which ran."""
        return set(self.first)

    def record(self, hook: str) -> None:
        self.first.setdefault(hook, self.current)

    def start(self) -> HookCalls:
        """Start recording (patches the plugin host when this is the first active recorder)."""
        if not _active:
            _install()
        _active.append(self)
        return self

    def stop(self) -> None:
        """Stop recording; the last active recorder removes the patch."""
        if self in _active:
            _active.remove(self)
        if not _active:
            _uninstall()

    def __enter__(self) -> HookCalls:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _record(hook: str) -> None:
    for recorder in _active:
        recorder.record(hook)


class _Recording:
    """A pluggy ``HookImpl`` whose ``function`` records ``hook`` before calling the real one."""

    __slots__ = ("_impl", "function")

    def __init__(self, impl: Any, hook: str) -> None:
        self._impl = impl
        fn = impl.function

        def function(*args: Any, **kwargs: Any) -> Any:
            _record(hook)
            return fn(*args, **kwargs)

        self.function: Callable[..., Any] = function

    def __getattr__(self, name: str) -> Any:
        return getattr(self._impl, name)


def _install() -> None:
    from trafficmgr.core.plugins import PluginHost

    impls = PluginHost._impls
    load_labels = PluginHost._load_labels

    def _impls(self: PluginHost, hook: str) -> tuple[Any, ...]:
        found = impls(self, hook)
        if not found or all(hook in r.first for r in _active):
            return found
        return tuple(_Recording(impl, hook) for impl in found)

    def _load_labels(self: PluginHost) -> None:
        load_labels(self)
        if any(callable(getattr(plugin, "trafficmgr_labels", None)) for _, plugin in self.pm.list_name_plugin()):
            _record("trafficmgr_labels")

    _originals.update(_impls=impls, _load_labels=load_labels)
    PluginHost._impls = _impls  # type: ignore[method-assign]
    PluginHost._load_labels = _load_labels  # type: ignore[method-assign]


def _uninstall() -> None:
    from trafficmgr.core.plugins import PluginHost

    for name, original in _originals.items():
        setattr(PluginHost, name, original)
    _originals.clear()
