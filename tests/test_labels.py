"""The label registry: parsing, ranges, kinds, patterns and the error messages users see."""

from __future__ import annotations

import pytest

from trafficmgr.core import labels as L
from trafficmgr.core.labels import LabelRegistry, LabelSpec
from trafficmgr.core.model import ObjectRef
from trafficmgr.core.plugins import PluginHost

SVC = ObjectRef("Service", "default", "reviews", "u1")
POD = ObjectRef("Pod", "default", "reviews-1", "u2")


@pytest.fixture(scope="module")
def registry() -> LabelRegistry:
    return PluginHost.load().labels


@pytest.mark.parametrize(
    ("ref", "key", "raw", "value"),
    [
        (SVC, "traffic.lb.policy", "ring_hash", "RING_HASH"),  # case-insensitive, canonical spelling
        (SVC, "traffic.fault.delay.percentage", "12.5", 12.5),
        (SVC, "traffic.fault.abort.status", "505", 505),
        (POD, "traffic.endpoint.weight", "0", 0),
        (POD, "traffic.envoy.enabled", "TRUE", True),
        (SVC, "traffic.port.9080", "HTTP", "http"),
        (SVC, "traffic.hash.cookie.name", "session", "session"),
        (SVC, "traffic.hash.cookie.name", "", ""),  # empty: not set, no error
    ],
)
def test_valid_values(registry: LabelRegistry, ref: ObjectRef, key: str, raw: str, value: object) -> None:
    parsed, errors = registry.parse(ref, {key: raw})
    assert errors == []
    assert parsed.value(key) == value


@pytest.mark.parametrize(
    ("ref", "key", "raw", "message"),
    [
        (SVC, "traffic.lb.policy", "FASTEST", "must be one of ROUND_ROBIN, LEAST_REQUEST, RING_HASH, RANDOM, MAGLEV"),
        (POD, "traffic.endpoint.weight", "129", "must be an integer 0..128"),
        (SVC, "traffic.fault.delay.percentage", "nan", "must be a number 0..100"),
        (SVC, "traffic.connection.timeout", "0", "must be an integer >= 1 (ms)"),
        (SVC, "traffic.port.70000", "http", "'70000' in the key must be a port number 1..65535"),
        (SVC, "traffic.endpoint.weight", "10", "not used on a Service (allowed on: DaemonSet, Deployment, Pod, StatefulSet)"),
        (SVC, "traffic.hash.header.name", "x y", "must be a header name"),
    ],
)
def test_invalid_values_are_dropped_with_a_clear_message(registry: LabelRegistry, ref: ObjectRef, key: str, raw: str,
                                                          message: str) -> None:
    parsed, errors = registry.parse(ref, {key: raw, "traffic.tracing.enabled": "true", "app": "x"})
    assert key not in parsed
    assert parsed.value("traffic.tracing.enabled") is True  # the other labels still count
    assert len(errors) == 1 and errors[0].key == key and errors[0].value == raw
    assert message in errors[0].message


def test_unknown_traffic_labels_and_other_labels_are_ignored(registry: LabelRegistry) -> None:
    parsed, errors = registry.parse(SVC, {"traffic.not.a.label": "x", "app": "reviews"})
    assert len(parsed) == 0 and errors == []


def test_a_key_declared_twice_is_an_error_naming_both_plugins() -> None:
    reg = LabelRegistry([LabelSpec("traffic.x", frozenset({L.SERVICE}), L.boolean(), False, "x", plugin="a")])
    with pytest.raises(ValueError, match="declared by both 'a' and 'b'"):
        reg.add(LabelSpec("traffic.x", frozenset({L.SERVICE}), L.boolean(), False, "x", plugin="b"))


def test_a_label_value_that_is_not_a_string_is_an_error_not_a_crash() -> None:
    """A YAML ``yes`` unquoted is a boolean: a real API server refuses it, a hand-made object may carry it."""
    from trafficmgr.core.model import ObjectRef
    from trafficmgr.core.plugins import PluginHost

    registry = PluginHost.load(["lb", "accesslog"]).labels
    parsed, errors = registry.parse(ObjectRef("Service", "default", "web"),
                                    {"traffic.accesslog": True, "traffic.lb.policy": 3, "traffic.port.80": "http"})  # type: ignore[dict-item]
    assert dict(parsed) == {"traffic.port.80": "http"}
    assert sorted((e.key, e.message) for e in errors) == [("traffic.accesslog", "must be a string, not bool"),
                                                         ("traffic.lb.policy", "must be a string, not int")]
