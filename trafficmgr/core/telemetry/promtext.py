"""Reading Envoy's ``/stats/prometheus`` text into the few numbers the dashboard needs.

Envoy's tag extraction splits a cluster named ``<port>|<ns>|<svc>.outbound`` at its first dot, so the
sidecar's outbound cluster stats come out as ``envoy_cluster_outbound_upstream_rq_total{envoy_cluster_name=
"9080|default|reviews"}``; the plain form ``envoy_cluster_upstream_rq_total{envoy_cluster_name=
"9080|default|reviews.outbound"}`` (other tag settings) is read the same way. Everything else is ignored.
"""

from __future__ import annotations

import math
import re

import attrs

#: The stat-name filter sent to Envoy (``/stats/prometheus?usedonly&filter=...``): only the outbound
#: clusters' request counters, response classes and request-time histograms, and the inbound HTTP
#: connection manager's response classes (Envoy's own names: ``upstream_rq_5xx`` becomes
#: ``upstream_rq_xx{envoy_response_code_class="5"}`` only in the output). Keeps a scrape small with
#: thousands of clusters.
STATS_FILTER = r"^cluster\..*\.outbound\.upstream_rq_(total|[1-5]xx|time)$|^http\.inbound_http\.downstream_rq_[1-5]xx$"

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
_OUTBOUND_PREFIX = "envoy_cluster_outbound_"
_CLUSTER_PREFIX = "envoy_cluster_"
INBOUND_PREFIX = "inbound_http"


@attrs.define
class ClusterStats:
    """Cumulative counters of one cluster as one proxy saw them."""

    rq_total: float = 0.0
    rq_5xx: float = 0.0
    #: cumulative histogram buckets of ``upstream_rq_time`` (milliseconds): upper bound -> count
    buckets: dict[float, float] = attrs.field(factory=dict)


@attrs.define
class Reading:
    """One scrape of one proxy: outbound clusters by name (``<port>|<ns>|<svc>.outbound``) and the
    inbound HTTP side (``inbound_total``/``inbound_5xx``: requests this proxy's pod served; None when the
    proxy has no inbound HTTP connection manager, e.g. local mode)."""

    clusters: dict[str, ClusterStats] = attrs.field(factory=dict)
    inbound_total: float | None = None
    inbound_5xx: float | None = None


def _labels(text: str | None) -> dict[str, str]:
    if not text:
        return {}
    return {k: v.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\") for k, v in _LABEL.findall(text)}


def _cluster_metric(name: str, labels: dict[str, str]) -> tuple[str, str] | None:
    """``(cluster, metric)`` for an outbound cluster stat (metric without the ``envoy_cluster_`` prefix)."""
    cluster = labels.get("envoy_cluster_name")
    if cluster is None:
        return None
    if name.startswith(_OUTBOUND_PREFIX) and cluster.count("|") == 2 and not cluster.endswith(".outbound"):
        return cluster + ".outbound", name[len(_OUTBOUND_PREFIX):]
    if name.startswith(_CLUSTER_PREFIX) and cluster.endswith(".outbound") and cluster.count("|") == 2:
        return cluster, name[len(_CLUSTER_PREFIX):]
    return None


def parse(text: str) -> Reading:
    """The :class:`Reading` in one ``/stats/prometheus`` answer (unparsable lines are skipped)."""
    reading = Reading()
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        m = _LINE.match(line)
        if m is None:
            continue
        name, label_text, value_text = m.groups()
        try:
            value = float(value_text)
        except ValueError:
            continue
        if math.isnan(value):
            continue
        labels = _labels(label_text)
        if name == "envoy_http_downstream_rq_xx" and labels.get("envoy_http_conn_manager_prefix") == INBOUND_PREFIX:
            reading.inbound_total = (reading.inbound_total or 0.0) + value
            if labels.get("envoy_response_code_class") == "5":
                reading.inbound_5xx = (reading.inbound_5xx or 0.0) + value
            elif reading.inbound_5xx is None:
                reading.inbound_5xx = 0.0
            continue
        found = _cluster_metric(name, labels)
        if found is None:
            continue
        cluster, metric = found
        stats = reading.clusters.get(cluster)
        if stats is None:
            stats = reading.clusters[cluster] = ClusterStats()
        if metric == "upstream_rq_total":
            stats.rq_total = value
        elif metric == "upstream_rq_xx":
            if labels.get("envoy_response_code_class") == "5":
                stats.rq_5xx = value
        elif metric == "upstream_rq_time_bucket":
            le = labels.get("le", "")
            try:
                bound = math.inf if le == "+Inf" else float(le)
            except ValueError:
                continue
            stats.buckets[bound] = value
    return reading


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """The ``q`` quantile (0..1) of a cumulative histogram (upper bound -> count), interpolated linearly
    inside the bucket as Prometheus' ``histogram_quantile`` does; None without observations. A quantile
    in the ``+Inf`` bucket is reported as the largest finite bound."""
    if not buckets:
        return None
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds[-1] == math.inf else max(buckets.values())
    if total <= 0:
        return None
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == math.inf:
                return prev_bound
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return prev_bound
