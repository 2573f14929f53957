"""Prometheus metrics of the control plane (served at the admin endpoint's ``/metrics``).

One registry per process (``REGISTRY``) so tests can read values with ``REGISTRY.get_sample_value``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

CONNECTED_PROXIES = Gauge(
    "trafficmgr_xds_connected_proxies", "xDS streams currently open", ["role", "mode"], registry=REGISTRY
)
RESPONSES_SENT = Counter(
    "trafficmgr_xds_responses_sent", "xDS responses sent", ["type", "mode"], registry=REGISTRY
)
NACKS = Counter("trafficmgr_xds_nacks", "xDS NACKs received", ["type"], registry=REGISTRY)
STREAMS_REFUSED = Counter(
    "trafficmgr_xds_streams_refused", "xDS streams refused (unknown or unauthorized node)", ["reason"], registry=REGISTRY
)
PUSH_TO_ACK = Histogram(
    "trafficmgr_xds_push_to_ack_seconds",
    "Time from sending a response to its ACK",
    ["type"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
BUILD_DURATION = Histogram(
    "trafficmgr_build_duration_seconds",
    "Time to build and publish snapshots after a model change",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
    registry=REGISTRY,
)
RESOURCES_SERIALIZED = Counter(
    "trafficmgr_build_resources_serialized", "Resources (re)serialized by the builder", ["type"], registry=REGISTRY
)
SNAPSHOTS_REJECTED = Counter(
    "trafficmgr_snapshots_rejected", "Snapshots refused by the consistency gate", ["view"], registry=REGISTRY
)
PLUGIN_ERRORS = Counter(
    "trafficmgr_plugin_errors", "Plugin hook calls that raised (their change was skipped)", ["plugin", "hook"], registry=REGISTRY
)
LABEL_ERRORS = Counter(
    "trafficmgr_label_errors", "Invalid traffic.* label values seen (once per object version)", ["kind", "label"], registry=REGISTRY
)
