"""The label registry: every ``traffic.*`` label, declared by the plugin that owns it.

A plugin declares its labels with :class:`LabelSpec` from ``trafficmgr_labels``. The core parses each
object's labels once per object change (:meth:`LabelRegistry.parse`). An invalid value is dropped (so its
default applies) and reported as a :class:`~trafficmgr.core.model.LabelError` (reason
``InvalidTrafficLabel``). A valid value beyond what Envoy can hold (a parser's ``ceiling``: ten-year
durations, uint32 counts) is replaced by the ceiling and reported too (reason ``TrafficConfigClamped``).

This is the one place label values are bounded: the parsers below accept only ASCII digits (no ``1e309``,
``nan``, ``inf``, unicode digits, ``1_000`` or surrounding blanks), at most :data:`MAX_DIGITS` of them, and every
integer parser has a ceiling (uint32, a duration or int64 by default), so no label value can make the
builder emit a protobuf field out of its range, which Envoy would NACK for every proxy sharing the
resource.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from trafficmgr.core.model import CLAMPED_LABEL, LabelError, Labels, ObjectRef
from trafficmgr.core.protos import MAX_DURATION_MS, UINT32_MAX

PREFIX = "traffic."
SERVICE = "Service"
POD = "Pod"
NAMESPACE = "Namespace"
WORKLOADS = frozenset({"Deployment", "StatefulSet", "DaemonSet"})
POD_AND_WORKLOADS = frozenset({POD}) | WORKLOADS
#: Ceiling of an integer label that declares none: the largest protobuf ``int64``.
INT64_MAX = 2**63 - 1
#: Digits an integer or number label may have (Kubernetes label values have at most 63 characters);
#: longer values are refused before any conversion, so parsing stays cheap whatever the input.
MAX_DIGITS = 63


@attrs.frozen(slots=True)
class Clamped:
    """What a parser function returns for a value it accepts but limits: ``value`` is used, and the label
    is reported (``TrafficConfigClamped``) with ``message``."""

    value: Any
    message: str


class Parser:
    """A value parser with a human description of what it accepts (used in errors and docs).

    ``func`` returns the parsed value, or a :class:`Clamped` for a value it limits, and raises
    ``ValueError`` for an invalid one. The other attributes describe the parser for docs and tests:
    ``kind`` (``integer``, ``number``, ``choice``, ``boolean``, ``token`` or ``custom``), the valid range
    ``minimum``..``maximum``, the ``ceiling`` above which valid values are clamped, and ``choices``.
    """

    def __init__(self, func: Callable[[str], Any], allowed: str, kind: str = "custom",
                 minimum: float | None = None, maximum: float | None = None, ceiling: int | None = None,
                 choices: tuple[str, ...] = ()) -> None:
        self.func = func
        self.allowed = allowed
        self.kind = kind
        self.minimum = minimum
        self.maximum = maximum
        self.ceiling = ceiling
        self.choices = choices
        self.case_insensitive = False  # choices: whether "ring_hash" is "RING_HASH"

    def __call__(self, raw: str) -> Any:
        """The value for ``raw`` (a clamped value already limited); ValueError when invalid."""
        return self.checked(raw)[0]

    def checked(self, raw: str) -> tuple[Any, str | None]:
        """``(value, None)``, or ``(clamped value, why)`` for a value limited to the ceiling; ValueError
        when invalid."""
        value = self.func(raw)
        if isinstance(value, Clamped):
            return value.value, value.message
        return value, None

    def __repr__(self) -> str:
        return f"Parser({self.allowed})"


_INTEGER = re.compile(r"[+-]?[0-9]+")
_PORT = re.compile(r"[1-9][0-9]{0,4}")
_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def integer(minimum: int = 0, maximum: int | None = None, unit: str = "", ceiling: int | None = None) -> Parser:
    """Whole number (ASCII digits) in ``[minimum, maximum]``.

    Without ``maximum`` every value >= ``minimum`` is valid, and a value above ``ceiling`` (default
    :data:`INT64_MAX`) is clamped to it: a larger number means "practically unlimited" and would not fit
    the protobuf field. With ``maximum``, values above it are invalid (and ``ceiling`` is ``maximum``).
    """
    if maximum is not None:
        ceiling = maximum
    elif ceiling is None:
        ceiling = INT64_MAX
    if ceiling < minimum:
        raise ValueError(f"ceiling {ceiling} is below the minimum {minimum}")
    rng = f"{minimum}..{maximum}" if maximum is not None else f">= {minimum}"
    allowed = f"an integer {rng}" + (f" ({unit})" if unit else "")
    clamp_note = "" if maximum is not None else f"; larger values are clamped to {ceiling}"
    limit = ceiling

    def parse(raw: str) -> int | Clamped:
        if len(raw) > MAX_DIGITS + 1 or not _INTEGER.fullmatch(raw):
            raise ValueError(f"must be {allowed}")
        v = int(raw)
        if v < minimum or (maximum is not None and v > maximum):
            raise ValueError(f"must be {allowed}")
        if v > limit:
            return Clamped(limit, f"{v} is larger than {limit}, the most Envoy takes; {limit} is used")
        return v

    return Parser(parse, allowed + clamp_note, "integer", minimum, maximum, ceiling)


def duration(minimum: int = 0) -> Parser:
    """Milliseconds >= ``minimum``; more than :data:`~trafficmgr.core.protos.MAX_DURATION_MS` (ten years,
    well inside the protobuf Duration range Envoy checks) is clamped to it."""
    parser = integer(minimum, unit="ms", ceiling=MAX_DURATION_MS)
    parser.allowed = f"an integer >= {minimum} (ms); more than {MAX_DURATION_MS} (10 years) is clamped to it"
    return parser


def count(minimum: int = 0, unit: str = "", ceiling: int = UINT32_MAX) -> Parser:
    """A count or rate for an Envoy ``uint32`` field (or a smaller ``ceiling``): larger values are
    clamped."""
    return integer(minimum, unit=unit, ceiling=ceiling)


def number(minimum: float = 0.0, maximum: float | None = None, unit: str = "") -> Parser:
    """Finite decimal number (ASCII, optional exponent) in ``[minimum, maximum]``; ``nan``, ``inf``,
    ``1e309`` (infinite as a float) and ``1_0`` are invalid."""
    rng = f"{minimum:g}..{maximum:g}" if maximum is not None else f">= {minimum:g}"
    allowed = f"a number {rng}" + (f" ({unit})" if unit else "")

    def parse(raw: str) -> float:
        if len(raw) > MAX_DIGITS + 1 or not _NUMBER.fullmatch(raw):
            raise ValueError(f"must be {allowed}")
        v = float(raw)
        if not math.isfinite(v) or v < minimum or (maximum is not None and v > maximum):
            raise ValueError(f"must be {allowed}")
        return v + 0.0  # -0.0 -> 0.0

    return Parser(parse, allowed, "number", minimum, maximum)


def choice(*values: str, case_insensitive: bool = True) -> Parser:
    """One of ``values`` (returned in its canonical spelling)."""
    allowed = "one of " + ", ".join(values)
    canon = {v.lower() if case_insensitive else v: v for v in values}

    def parse(raw: str) -> str:
        key = raw.lower() if case_insensitive else raw
        if key not in canon:
            raise ValueError(f"must be {allowed}")
        return canon[key]

    parser = Parser(parse, allowed, "choice", choices=tuple(values))
    parser.case_insensitive = case_insensitive
    return parser


def boolean() -> Parser:
    """``true`` or ``false`` (case-insensitive)."""
    allowed = "true or false"

    def parse(raw: str) -> bool:
        low = raw.lower()
        if low not in ("true", "false"):
            raise ValueError(f"must be {allowed}")
        return low == "true"

    return Parser(parse, allowed, "boolean", choices=("true", "false"))


# An HTTP token (RFC 9110) without ``%``: Envoy reads ``%...%`` in a header value as a substitution
# command and NACKs the route config for an unknown one (``%00``), so a token a plugin writes into a header
# value must not carry it (found by tests/test_label_properties.py with the served-by example plugin).
_TOKEN = re.compile(r"[!#$&'*+\-.^_`|~0-9A-Za-z]+")


def token(what: str = "an HTTP token") -> Parser:
    """An HTTP token (valid cookie or header name, and safe as a header value: no ``%``); an empty value
    means "not set"."""
    allowed = f"{what} (letters, digits and !#$&'*+-.^_`|~)"

    def parse(raw: str) -> str:
        if raw and not _TOKEN.fullmatch(raw):
            raise ValueError(f"must be {allowed}")
        return raw

    return Parser(parse, allowed, "token")


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

        Returns the valid values and one error per invalid label (reason ``InvalidTrafficLabel``: the value
        is left out) or clamped label (reason ``TrafficConfigClamped``: the clamped value is in). Labels no
        loaded plugin declares are ignored (they may belong to a plugin that is not selected).
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
            if not isinstance(value, str):  # a Kubernetes API server refuses these; a hand-made object may not
                errors.append(LabelError(ref, key, str(value), f"must be a string, not {type(value).__name__}"))
                continue
            if match is not None:
                port = match.group("port")
                # ASCII digits without leading zeros: "traffic.port.09080" or a unicode digit would parse as a
                # number but never match the port the core looks the label up by (silently unused).
                if not _PORT.fullmatch(port) or not 1 <= int(port) <= 65535:
                    errors.append(LabelError(ref, key, value, f"{port!r} in the key must be a port number 1..65535"))
                    continue
            try:
                values[key], clamped = spec.parse.checked(value)
            except ValueError as exc:
                errors.append(LabelError(ref, key, value, str(exc)))
                continue
            if clamped is not None:
                errors.append(LabelError(ref, key, value, clamped, CLAMPED_LABEL))
        return Labels(values), errors
