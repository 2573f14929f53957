"""One small memo helper for every translator: results by key, each kept with the inputs it was made from."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Memo(Generic[K, V]):
    """``get(key, inputs, make, *args)`` returns the value ``make(*args)`` made for ``key`` while ``inputs``
    are unchanged.

    ``inputs`` is a tuple of everything the value depends on (IR objects, options, other products). It is
    compared with ``==``, which tries identity first, element by element: the unchanged case (the same
    objects) costs one pointer comparison per input. The tuple holds the objects themselves, so a freed
    object's reused ``id()`` can never pass for it.
    """

    __slots__ = ("name", "_entries")

    def __init__(self, name: str) -> None:
        self.name = name
        self._entries: dict[K, tuple[tuple[object, ...], V]] = {}

    def get(self, key: K, inputs: tuple[object, ...], make: Callable[..., V], *args: Any) -> V:
        entry = self._entries.get(key)
        if entry is not None and entry[0] == inputs:
            return entry[1]
        value = make(*args)
        self._entries[key] = (inputs, value)
        return value

    def peek(self, key: K) -> V | None:
        """The value last made for ``key`` (whatever its inputs), or None."""
        entry = self._entries.get(key)
        return None if entry is None else entry[1]

    def drop(self, keys: Iterable[K]) -> None:
        for key in keys:
            self._entries.pop(key, None)

    def keep_only(self, live: Callable[[K], bool]) -> None:
        """Forget every key for which ``live(key)`` is false (results nobody uses any more)."""
        for key in [k for k in self._entries if not live(k)]:
            del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Memo({self.name!r}, {len(self._entries)} entries)"
