"""A bounded memory of keys already seen, for "log this once" where the keys come from clients or plugins."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable


class Seen:
    """Remembers the last ``limit`` keys. :meth:`first` is True the first time a key is seen (and again
    once it was forgotten), so memory stays bounded whatever keys clients choose."""

    def __init__(self, limit: int = 1024) -> None:
        self.limit = limit
        self._keys: OrderedDict[Hashable, None] = OrderedDict()

    def first(self, key: Hashable) -> bool:
        if key in self._keys:
            self._keys.move_to_end(key)
            return False
        self._keys[key] = None
        if len(self._keys) > self.limit:
            self._keys.popitem(last=False)
        return True

    def __len__(self) -> int:
        return len(self._keys)
