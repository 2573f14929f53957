"""Label values beyond what Envoy holds are clamped at the declaration, with a ``TrafficConfigClamped``
Event; values that only look like numbers are invalid (issue 16 item 8). The end-to-end proof against a
real Envoy is ``tests/test_label_properties.py``; these pin the individual cases."""

from __future__ import annotations

import pytest

from trafficmgr.core import labels as L
from trafficmgr.core.kube.events import EventRecorder
from trafficmgr.core.labels import LabelRegistry
from trafficmgr.core.model import CLAMPED_LABEL, INVALID_LABEL, ObjectRef
from trafficmgr.core.plugins import PluginHost, builtin_names
from trafficmgr.core.protos import MAX_DURATION_MS, UINT32_MAX

SVC = ObjectRef("Service", "default", "reviews", "u1")
POD = ObjectRef("Pod", "default", "reviews-1", "u2")


@pytest.fixture(scope="module")
def registry() -> LabelRegistry:
    return PluginHost.load(builtin_names()).labels


@pytest.mark.parametrize(
    ("ref", "key", "raw", "value"),
    [
        # The value: 1e15 ms is beyond the protobuf Duration range; Envoy NACKed the route config.
        (SVC, "traffic.hash.cookie.ttl", "999999999999999", MAX_DURATION_MS),
        (SVC, "traffic.hash.cookie.ttl", "9" * 63, MAX_DURATION_MS),
        (SVC, "traffic.request.timeout", str(MAX_DURATION_MS + 1), MAX_DURATION_MS),
        (SVC, "traffic.connection.timeout", "18446744073709551616", MAX_DURATION_MS),
        (POD, "traffic.fault.delay.time", "9223372036854775808", MAX_DURATION_MS),
        (SVC, "traffic.retries.5xx", str(UINT32_MAX + 1), UINT32_MAX),
        (SVC, "traffic.connection.max", "99999999999999999999", UINT32_MAX),
        (POD, "traffic.request.rate", "4294967296", UINT32_MAX),
        (SVC, "traffic.rate.limit", "99999999999999999999", 2**40),
    ],
)
def test_values_beyond_envoy_are_clamped_and_reported(registry: LabelRegistry, ref: ObjectRef, key: str, raw: str,
                                                      value: int) -> None:
    parsed, errors = registry.parse(ref, {key: raw})
    assert parsed.value(key) == value
    assert [(e.key, e.value, e.reason) for e in errors] == [(key, raw, CLAMPED_LABEL)]
    assert f"{value} is used" in errors[0].message


@pytest.mark.parametrize(
    ("key", "raw"),
    [
        ("traffic.hash.cookie.ttl", str(MAX_DURATION_MS)),  # the ceiling itself is not clamped
        ("traffic.retries.5xx", str(UINT32_MAX)),
        ("traffic.fault.delay.percentage", "100"),
        ("traffic.fault.delay.percentage", "-0"),
        ("traffic.fault.delay.percentage", "1e-400"),  # rounds to 0: valid, injects nothing
    ],
)
def test_values_at_the_limit_are_plain(registry: LabelRegistry, key: str, raw: str) -> None:
    parsed, errors = registry.parse(SVC, {key: raw})
    assert errors == [] and key in parsed


@pytest.mark.parametrize(
    ("key", "raw"),
    [
        ("traffic.fault.delay.percentage", "1e309"),  # float("1e309") is inf
        ("traffic.fault.delay.percentage", "nan"),
        ("traffic.fault.delay.percentage", "1_0"),  # float() takes it, Kubernetes users would not mean it
        ("traffic.fault.delay.percentage", " 5"),
        ("traffic.tracing.sampling", "Infinity"),
        ("traffic.retries.5xx", "\u0661\u0662"),  # Arabic-Indic digits: int() takes them
        ("traffic.retries.5xx", "\uff11"),  # fullwidth digit
        ("traffic.retries.5xx", "1e3"),
        ("traffic.retries.5xx", "-1"),
        ("traffic.retries.5xx", "9" * 65),  # longer than any Kubernetes label value
        ("traffic.hash.cookie.ttl", ""),
        ("traffic.hash.header.name", "%00"),  # Envoy would read % as a header-value format command
        ("traffic.port.\u0661", "http"),  # a unicode digit in the key: int() says port 1
        ("traffic.port.09080", "http"),  # would never match port 9080
        ("traffic.port.", "http"),
    ],
)
def test_lookalike_values_are_invalid(registry: LabelRegistry, key: str, raw: str) -> None:
    parsed, errors = registry.parse(SVC, {key: raw})
    assert key not in parsed
    assert [(e.key, e.reason) for e in errors] == [(key, INVALID_LABEL)]


def test_clamped_label_event_reason_and_message(registry: LabelRegistry) -> None:
    _, errors = registry.parse(SVC, {"traffic.hash.cookie.ttl": "999999999999999", "traffic.lb.policy": "FAST"})
    events = EventRecorder(None, registry)
    events.label_errors(errors)
    got = {reason: message for _, reason, message in events.recorded}
    assert got[CLAMPED_LABEL] == ("value '999999999999999' for label traffic.hash.cookie.ttl clamped: 999999999999999 is "
                                  f"larger than {MAX_DURATION_MS}, the most Envoy takes; {MAX_DURATION_MS} is used")
    assert got[INVALID_LABEL].startswith("invalid value 'FAST' for label traffic.lb.policy")


def test_parsers_describe_their_limits() -> None:
    d = L.duration()
    assert (d.kind, d.minimum, d.maximum, d.ceiling) == ("integer", 0, None, MAX_DURATION_MS)
    assert "10 years" in d.allowed
    assert L.count().ceiling == UINT32_MAX
    assert L.integer(0).ceiling == L.INT64_MAX  # every integer has a ceiling
    assert L.integer(0, 128).ceiling == 128  # a declared maximum: above it is invalid, not clamped
    with pytest.raises(ValueError, match="must be an integer 0..128"):
        L.integer(0, 128)("129")
    assert L.choice("A", "B").choices == ("A", "B")
    with pytest.raises(ValueError, match="below the minimum"):
        L.integer(5, ceiling=1)


def test_every_declared_integer_label_fits_its_protobuf_field(registry: LabelRegistry) -> None:
    """A new integer label without an explicit ceiling gets int64, which no Envoy duration or uint32
    field holds: built-in plugins must choose duration(), count() or a maximum."""
    for spec in registry.specs:
        p = spec.parse
        if p.kind == "integer":
            assert p.ceiling is not None and p.ceiling <= max(MAX_DURATION_MS, 2**40), (spec.key, p.ceiling)


# -- the scenario, end to end: API server, control plane, gateway Envoy ----------------------

GATEWAY_MANIFESTS = """
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec: {selector: {app: reviews}, ports: [{name: http, port: 9080, targetPort: 9080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-1, namespace: default, labels: {app: reviews}}
spec: {nodeName: node-1, containers: [{name: app, image: reviews, ports: [{containerPort: 9080}]}]}
status: {podIP: 127.0.16.2, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: reviews, namespace: default}
spec:
  ingressClassName: traffic
  rules:
  - http:
      paths: [{path: /, pathType: Prefix, backend: {service: {name: reviews, port: {number: 9080}}}}]
"""


@pytest.mark.envoy
def test_huge_cookie_ttl_is_clamped_on_the_gateway_and_routes_keep_updating(trafficmgr_envoy_binary: str) -> None:
    """``kubectl label svc reviews traffic.lb.policy=RING_HASH traffic.hash.cookie.name=c
    traffic.hash.cookie.ttl=999999999999999`` made the gateway NACK its ``ingress`` route configuration
    (``http.ingress_http.rds.ingress.update_rejected`` 1) and freeze route updates. Now: a
    TrafficConfigClamped Event, a ten-year cookie, no rejected update, later changes still applied."""
    import http.client

    from trafficmgr.testing.cluster import GatewayCluster

    def set_cookie(gw: GatewayCluster) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", gw.gateway_port, timeout=5)
        try:
            conn.request("GET", "/")
            resp = conn.getresponse()
            resp.read()
            return resp.getheader("set-cookie") or ""
        except OSError:
            return ""
        finally:
            conn.close()

    with GatewayCluster() as gw:
        gw.backend("reviews", "127.0.16.2", 9080)
        gw.apply(GATEWAY_MANIFESTS)
        gw.wait_config(lambda: gw.get("/")[0] == 200, message="gateway not serving reviews")
        gw.label("service", "reviews", {"traffic.lb.policy": "RING_HASH", "traffic.hash.cookie.name": "c",
                                        "traffic.hash.cookie.ttl": "999999999999999"})
        gw.wait_event("reviews", CLAMPED_LABEL, "traffic.hash.cookie.ttl")
        max_age = MAX_DURATION_MS // 1000
        gw.wait_config(lambda: f"Max-Age={max_age};" in set_cookie(gw), message=f"no cookie with Max-Age={max_age}")
        assert gw.envoy.stats().get("http.ingress_http.rds.ingress.update_rejected", 0) == 0
        # Route updates are not frozen: a later change reaches the gateway.
        gw.label("service", "reviews", {"traffic.hash.cookie.ttl": "5000"})
        gw.wait_config(lambda: "Max-Age=5;" in set_cookie(gw), message="later cookie TTL not applied")
        assert gw.cp.nacks() == [], gw.cp.nacks()
        assert gw.envoy.stats().get("http.ingress_http.rds.ingress.update_rejected", 0) == 0
        assert len(gw.events("reviews", CLAMPED_LABEL)) == 1
