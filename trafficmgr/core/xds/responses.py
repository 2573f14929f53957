"""Nonces and the caches that let streams in the same state share one response.

A nonce only has to be unique within a stream, so a response that many streams get alike (the same
version, the same subscription, the same transition) carries one derived nonce and is encoded once:
:func:`token` names such a shared case. The caches here are module-wide (bounded) and shared by every
stream of every server in the process.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

from trafficmgr.core.cache import Bounded, Resource, TypeSet


class Nonces:
    """Per-stream nonces of one server: ``<prefix>-<counter>``. The random prefix (also the start of
    every shared nonce) keeps a restarted server's nonces apart from the previous one's."""

    __slots__ = ("prefix", "_counter")

    def __init__(self) -> None:
        self.prefix = os.urandom(3).hex()
        self._counter = itertools.count(1)

    def fresh(self) -> str:
        """A nonce no other response of this server has."""
        return f"{self.prefix}-{next(self._counter):x}"


def token(key: Any) -> str:
    """A short token for a hashable key, in nonces: equal keys, equal tokens. A collision within one
    stream is caught where nonces are chosen (it then costs only a per-stream nonce)."""
    return f"{hash(key) & 0xFFFFFFFF:x}"


def names_tag(names: frozenset[str] | None) -> str:
    """The token of a subscription."""
    return "all" if names is None else "n" + token(names)


#: One shared object per distinct subscription (see :func:`intern_names`). Bounded by the names held too:
#: clients choose the sets, and a closed stream's sets must not stay here at 4096 x 4 MiB requests.
NAME_SETS: Bounded[frozenset[str], frozenset[str]] = Bounded(4096, 1_000_000, len)


def intern_names(names: frozenset[str]) -> frozenset[str]:
    """One shared object per distinct subscription: a thousand sidecars asking for the same thousand
    endpoint names hold one set (and one copy of the strings), not a thousand. Equal sets also hit the
    response-body cache by identity first."""
    canonical = NAME_SETS.get(names)
    return canonical if canonical is not None else NAME_SETS.put(names, names)


#: Delta messages shared by the streams in the same state, by (shared key, nonce): first answers hold
#: every resource, hence the byte bound too. It must hold one first answer of every type at once, else the
#: streams of a connect wave evict each other's and every stream encodes (and gRPC buffers) a copy of its
#: own: at 10k services x 10 endpoints the four first answers are 16.4 MB (clusters 2.9, endpoints 4.4,
#: listeners 7.3, routes 1.9), and with a 16 MiB bound 1000 streams peaked at 1.2 GB
#: (``benchmarks/bench_streams_memory.py``). 96 MiB holds them for meshes up to ~50k services.
DELTA_MESSAGES: Bounded[Any, bytes] = Bounded(64, 96 << 20, len)
#: What changed between two type set versions, shared by every stream in sync with the older one.
TRANSITIONS: Bounded[tuple[str, str, str], list[tuple[str, Resource | None]]] = Bounded(32)


def transition(old: TypeSet, new: TypeSet) -> list[tuple[str, Resource | None]]:
    """What changed from ``old`` to ``new`` (``None`` = removed), computed once and shared by every stream
    that was in sync with ``old``: a push to N streams costs O(resources + N x changes), not O(N x resources)."""
    key = (new.type_url, old.version, new.version)
    changes = TRANSITIONS.get(key)
    if changes is None:
        before, after = old.resources, new.resources
        changes = [(n, r) for n, r in after.items() if before.get(n) is not r]
        changes += [(n, None) for n in before if n not in after]
        TRANSITIONS.put(key, changes)
    return changes
