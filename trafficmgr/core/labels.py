"""The label registry: every ``traffic.*`` label, declared by the plugin that owns it.

A plugin declares its labels with :class:`LabelSpec` from ``trafficmgr_labels``. The core parses each
object's labels once per object change (:meth:`LabelRegistry.parse`). An invalid value is dropped (so its
default applies) and reported as a :class:`~trafficmgr.core.model.LabelError`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from trafficmgr.core.model import LabelError, Labels, ObjectRef

PREFIX = "traffic."
SERVICE = "Service"
POD = "Pod"
WORKLOADS = frozenset({"Deployment", "StatefulSet", "DaemonSet"})
POD_AND_WORKLOADS = frozenset({POD}) | WORKLOADS


class Parser:
    """A value parser with a human description of what it accepts (used in errors and docs)."""

    def __init__(self, func: Callable[[str], Any], allowed: str) -> None:
        self.func = func
        self.allowed = allowed

    def __call__(self, raw: str) -> Any:
        return self.func(raw)

    def __repr__(self) -> str:
        return f"Parser({self.allowed})"


def integer(minimum: int = 0, maximum: int | None = None, unit: str = "") -> Parser:
    """Whole number in ``[minimum, maximum]``."""
    rng = f"{minimum}..{maximum}" if maximum is not None else f">= {minimum}"
    allowed = f"an integer {rng}" + (f" ({unit})" if unit else "")

    def parse(raw: str) -> int:
        if not re.fullmatch(r"[+-]?\d+", raw.strip()):
            raise ValueError(f"must be {allowed}")
        v = int(raw)
        if v < minimum or (maximum is not None and v > maximum):
            raise ValueError(f"must be {allowed}")
        return v

    return Parser(parse, allowed)


def number(minimum: float = 0.0, maximum: float | None = None, unit: str = "") -> Parser:
    """Finite decimal number in ``[minimum, maximum]``."""
    rng = f"{minimum:g}..{maximum:g}" if maximum is not None else f">= {minimum:g}"
    allowed = f"a number {rng}" + (f" ({unit})" if unit else "")

    def parse(raw: str) -> float:
        try:
            v = float(raw)
        except ValueError:
            raise ValueError(f"must be {allowed}") from None
        if not math.isfinite(v) or v < minimum or (maximum is not None and v > maximum):
            raise ValueError(f"must be {allowed}")
        return v

    return Parser(parse, allowed)


def choice(*values: str, case_insensitive: bool = True) -> Parser:
    """One of ``values`` (returned in its canonical spelling)."""
    allowed = "one of " + ", ".join(values)
    canon = {v.lower() if case_insensitive else v: v for v in values}

    def parse(raw: str) -> str:
        key = raw.lower() if case_insensitive else raw
        if key not in canon:
            raise ValueError(f"must be {allowed}")
        return canon[key]

    return Parser(parse, allowed)


def boolean() -> Parser:
    """``true`` or ``false`` (case-insensitive)."""
    allowed = "true or false"

    def parse(raw: str) -> bool:
        low = raw.lower()
        if low not in ("true", "false"):
            raise ValueError(f"must be {allowed}")
        return low == "true"

    return Parser(parse, allowed)


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def token(what: str = "an HTTP token") -> Parser:
    """An HTTP token (valid cookie or header name); an empty value means "not set"."""
    allowed = f"{what} (letters, digits and !#$%&'*+-.^_`|~)"

    def parse(raw: str) -> str:
        if raw and not _TOKEN.fullmatch(raw):
            raise ValueError(f"must be {allowed}")
        return raw

    return Parser(parse, allowed)


@attrs.frozen(slots=True)
class LabelSpec:
    """Declaration of one label.

    ``key`` is exact (``traffic.lb.policy``) or has one ``<port>`` placeholder (``traffic.port.<port>``),
    which matches a port number 1..65535. ``kinds`` are the object kinds it may stand on. ``parse``
    raises ``ValueError`` with a message saying what is allowed. ``plugin`` is filled in by the registry.
    """

    key: str
    kinds: frozenset[str]
    parse: Parser
    default: Any
    doc: str
    plugin: str = ""

    @property
    def is_pattern(self) -> bool:
        return "<" in self.key

    @property
    def allowed(self) -> str:
        return self.parse.allowed


class LabelRegistry:
    """All labels of the loaded plugins; parses an object's raw labels into :class:`Labels`."""

    def __init__(self, specs: Iterable[LabelSpec] = ()) -> None:
        self._exact: dict[str, LabelSpec] = {}
        self._patterns: list[tuple[re.Pattern[str], LabelSpec]] = []
        for spec in specs:
            self.add(spec)

    def add(self, spec: LabelSpec) -> None:
        """Register ``spec``; a key declared twice is an error naming both plugins."""
        other = self._exact.get(spec.key) or next((s for _, s in self._patterns if s.key == spec.key), None)
        if other is not None:
            raise ValueError(f"label {spec.key} declared by both {other.plugin!r} and {spec.plugin!r}")
        if spec.is_pattern:
            prefix, _, suffix = spec.key.partition("<port>")
            rx = re.compile(re.escape(prefix) + r"(?P<port>[^.]*)" + re.escape(suffix) + r"\Z")
            self._patterns.append((rx, spec))
        else:
            self._exact[spec.key] = spec

    @property
    def specs(self) -> list[LabelSpec]:
        """Every declared label, sorted by key."""
        return sorted([*self._exact.values(), *(s for _, s in self._patterns)], key=lambda s: s.key)

    def spec(self, key: str) -> LabelSpec | None:
        """The spec a concrete key belongs to (``traffic.port.9080`` -> ``traffic.port.<port>``)."""
        if key in self._exact:
            return self._exact[key]
        for rx, spec in self._patterns:
            if rx.match(key):
                return spec
        return None

    def parse(self, ref: ObjectRef, raw: Mapping[str, str] | None) -> tuple[Labels, list[LabelError]]:
        """Parse the ``traffic.*`` labels of one object of kind ``ref.kind``.

        Returns the valid values and one error per invalid label. Labels no loaded plugin declares are
        ignored (they may belong to a plugin that is not selected).
        """
        values: dict[str, Any] = {}
        errors: list[LabelError] = []
        for key, value in (raw or {}).items():
            if not key.startswith(PREFIX):
                continue
            spec = self._exact.get(key)
            match = None
            if spec is None:
                for rx, candidate in self._patterns:
                    match = rx.match(key)
                    if match:
                        spec = candidate
                        break
                if spec is None:
                    continue
            if ref.kind not in spec.kinds:
                errors.append(LabelError(ref, key, value, f"not used on a {ref.kind} (allowed on: {', '.join(sorted(spec.kinds))})"))
                continue
            if match is not None:
                port = match.group("port")
                if not port.isdigit() or not 1 <= int(port) <= 65535:
                    errors.append(LabelError(ref, key, value, f"{port!r} in the key must be a port number 1..65535"))
                    continue
            try:
                values[key] = spec.parse(value)
            except ValueError as exc:
                errors.append(LabelError(ref, key, value, str(exc)))
        return Labels(values), errors
