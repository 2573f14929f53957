"""Prometheus metrics of the control plane (served at the admin endpoint's ``/metrics``).

One registry per process (``REGISTRY``) so tests can read values with ``REGISTRY.get_sample_value``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from trafficmgr.core.model import GATEWAY, SIDECAR

if TYPE_CHECKING:
    from trafficmgr.core.labels import LabelRegistry

REGISTRY = CollectorRegistry(auto_describe=True)

#: Values of ``trafficmgr_xds_connected_proxies``'s ``role`` label, a fixed set (see :func:`proxy_role`):
#: ``sidecar`` the full sidecar view; ``sidecar-scoped`` any scoped or consumer sidecar view
#: (``sidecar~<id>``, one per distinct ``traffic.scope``: as many as users' labels make, so never a label
#: value); ``gateway``; ``unknown`` a node not (yet) known (its stream waits); ``other`` any other view.
#: The view of each stream is in ``proxy-status`` (``/debug/proxy-status``, column VIEW).
PROXY_ROLES = ("sidecar", "sidecar-scoped", "gateway", "unknown", "other")
#: Scoped sidecar views are named ``sidecar~<id>`` (``trafficmgr.core.translate.scopes.VIEW_PREFIX``).
_SCOPED_PREFIX = SIDECAR + "~"


def proxy_role(view: str | None) -> str:
    """The ``role`` label value of a stream resolved to ``view`` (None: unknown node): one of :data:`PROXY_ROLES`."""
    if view is None:
        return "unknown"
    if view in (SIDECAR, GATEWAY):
        return view
    return "sidecar-scoped" if view.startswith(_SCOPED_PREFIX) else "other"


#: ``label`` of ``trafficmgr_label_errors_total`` for a key no loaded plugin declares (the registry ignores
#: those, so none is counted today; the value exists so a future caller cannot mint one series per key).
UNDECLARED_LABEL = "other"


def declared_label(labels: LabelRegistry, key: str) -> str:
    """The ``label`` value of ``trafficmgr_label_errors_total`` for an error on ``key``: the declared key it
    belongs to (``traffic.port.9080`` and ``traffic.port.x`` -> ``traffic.port.<port>``), so the values are
    the loaded plugins' declared keys (a fixed set), never what users type; :data:`UNDECLARED_LABEL` else."""
    spec = labels.spec(key)
    return spec.key if spec is not None else UNDECLARED_LABEL


CONNECTED_PROXIES = Gauge(
    "trafficmgr_xds_connected_proxies", "xDS streams currently open, by role (PROXY_ROLES) and mode", ["role", "mode"],
    registry=REGISTRY,
)
RESPONSES_SENT = Counter(
    "trafficmgr_xds_responses_sent", "xDS responses sent", ["type", "mode"], registry=REGISTRY
)
NACKS = Counter("trafficmgr_xds_nacks", "xDS NACKs received", ["type"], registry=REGISTRY)
STREAMS_REFUSED = Counter(
    "trafficmgr_xds_streams_refused",
    "xDS streams refused or ended, or requests ignored, by reason (see REFUSAL_REASONS)",
    ["reason"],
    registry=REGISTRY,
)
#: Reasons of ``trafficmgr_xds_streams_refused_total`` (each starts at 0, so a dashboard sees every one):
#: ``permission`` node not authorized; ``unknown`` node not (yet) known, the stream waits; ``too_many_streams``
#: over ``--xds-max-streams-per-peer``; ``no_node_timeout`` no node named within ``--xds-node-timeout``;
#: ``no_node`` / ``bad_node`` first request without a node id / with an oversized one; ``too_large`` a
#: request over ``--xds-max-request-mib``; ``bad_request`` not a valid request; ``too_many_names`` a
#: subscription over the per-type limit; ``unknown_type`` a request (not a stream) for a type not served,
#: ignored.
REFUSAL_REASONS = (
    "permission", "unknown", "too_many_streams", "no_node_timeout", "no_node", "bad_node", "too_large",
    "bad_request", "too_many_names", "unknown_type",
)
for _reason in REFUSAL_REASONS:
    STREAMS_REFUSED.labels(_reason)
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
    "trafficmgr_snapshots_rejected",
    "Snapshots refused by the consistency gate, by role of the view (proxy_role: never the view name, one per "
    "traffic.scope; the view and the reason are in the error log line)",
    ["role"],
    registry=REGISTRY,
)
for _role in PROXY_ROLES:
    if _role != "unknown":  # a snapshot always has a view
        SNAPSHOTS_REJECTED.labels(_role)
PLUGIN_ERRORS = Counter(
    "trafficmgr_plugin_errors", "Plugin hook calls that raised (their change was skipped)", ["plugin", "hook"], registry=REGISTRY
)
LABEL_ERRORS = Counter(
    "trafficmgr_label_errors",
    "Invalid or clamped traffic.* label values seen (once per object version), by object kind and declared "
    "label key (declared_label: traffic.port.<port> for every port)",
    ["kind", "label"],
    registry=REGISTRY,
)
BUILD_ERRORS = Counter(
    "trafficmgr_build_errors",
    "Builds that raised in the sync loop (the previous snapshots stay served; the next change rebuilds everything)",
    registry=REGISTRY,
)
# -- mesh identity (trafficmgr.core.identity) ---------------------------------------------------------
CERTIFICATES_SIGNED = Counter(
    "trafficmgr_certificates_signed", "Workload certificates signed by the mesh CA (Sign RPC)", registry=REGISTRY
)
CERTIFICATE_REQUESTS_REFUSED = Counter(
    "trafficmgr_certificate_requests_refused",
    "Sign RPC requests refused, by reason (see SIGN_REFUSAL_REASONS)",
    ["reason"],
    registry=REGISTRY,
)
#: Reasons of ``trafficmgr_certificate_requests_refused_total``: ``unauthenticated`` no token, or the
#: TokenReview said no (unknown, expired, wrong audience); ``bad_request`` not the request's JSON shape;
#: ``bad_csr`` a CSR that cannot be signed (signature, key, SANs); ``not_authorized`` the caller may not ask
#: for that pod (another node, not the agent and not bound to the pod); ``pod_not_signable`` the pod is
#: absent, replaced (other uid), terminating, finished or on the host network; ``identity_mismatch`` the
#: CSR's SPIFFE ID is not the pod's; ``unavailable`` the CA is not loaded or the API server failed.
SIGN_REFUSAL_REASONS = (
    "unauthenticated", "bad_request", "bad_csr", "not_authorized", "pod_not_signable", "identity_mismatch",
    "unavailable",
)
for _reason in SIGN_REFUSAL_REASONS:
    CERTIFICATE_REQUESTS_REFUSED.labels(_reason)
CA_EXPIRY = Gauge(
    "trafficmgr_ca_expiry_timestamp_seconds",
    "When the mesh CA that signs (or a certificate above it) expires, Unix time; no issued certificate outlives it",
    registry=REGISTRY,
)
