"""The dashboard's data: golden signals from the proxies' own Envoy stats, the service graph, proxies,
Warning Events and routes (``GET /debug/dashboard/data`` on the admin endpoint).

Contract (extend, never rename; ``null`` = no data yet)::

    {"generated": <unix s>, "source": "envoy-stats" ("none": serve --dashboard-stats-port 0), "window_s": <s>,
     "services": [{"namespace", "name", "labels": [{"key", "value", "plugin"}], "rps", "error_rate",
                   "p50_ms", "p99_ms", "upstreams": [{"pod", "address", "rps", "error_rate", <column name>: value}],
                   "traces_url"}],
     "upstream_columns": [{"name", "title"}],
     "edges": [{"from": "ns/name", "to": "ns/name", "rps", "error_rate"}],
     "proxies": [<proxy-status row> + {"last_nack": {"type", "error", "time"} | null}],
     "events": [{"time", "type": "Warning", "reason", "object": "Kind/ns/name", "message"}],
     "routes": [{"kind", "namespace", "name", "hosts", "matches", "backends", "status"}]}

- a service's ``rps``/``error_rate`` (5xx share)/``p50_ms``/``p99_ms``: what every proxy (sidecars and
  gateways) that called it counted on its outbound cluster ``<port>|<ns>|<svc>.outbound``
  (``upstream_rq_total``, ``upstream_rq_xx`` and the ``upstream_rq_time`` histogram), between the oldest
  and the newest reading of the window;
- an upstream's ``rps``/``error_rate``: what the pod's own sidecar served on its inbound HTTP side (null
  where sidecars have no inbound listener, e.g. local mode);
- ``upstream_columns``: the columns plugins add to every upstream row (hook
  ``trafficmgr_dashboard_endpoint_columns``, :mod:`.columns`), in order; each row has a value (or null)
  under each column's ``name`` (the core names none; e.g. the ``lb`` plugin's ``weight``);
- an edge ``from -> to``: the outbound cluster stats of the sidecars of ``from``'s pods (a pod in several
  Services is a caller for each) and of the gateways (``<ns>/traffic-ingress``).

Submodules: :mod:`.promtext` (parsing), :mod:`.scrape` (reading the Envoys, bounded and cached),
:mod:`.dashboard` (the document), :mod:`.columns` (plugins' upstream columns), :mod:`.routes` (plugins'
route rows).
"""

from __future__ import annotations

import argparse
import urllib.parse
from collections.abc import Callable

from trafficmgr.core.bootstrap import STATS_PORT
from trafficmgr.core.telemetry.dashboard import Target, golden_signals, proxy_rows, stats_targets
from trafficmgr.core.telemetry.routes import route_row, route_rows
from trafficmgr.core.telemetry.scrape import DEFAULT_WINDOW_S, StatsScraper

SOURCE = "envoy-stats"


def traces_url_of(options: argparse.Namespace) -> Callable[[str, str], str] | None:
    """``(namespace, name) -> URL`` of a Service's recent traces in the built-in collector's query API
    (``serve --dashboard-traces-url BASE``: ``BASE/api/v2/traces?meshService=<name>.<ns>&limit=10``, the
    query ``trafficmgr zipkin`` answers for spans of any provider); None without the option."""
    base = str(getattr(options, "dashboard_traces_url", None) or "").rstrip("/")
    if not base:
        return None

    def url(namespace: str, name: str) -> str:
        return f"{base}/api/v2/traces?" + urllib.parse.urlencode({"meshService": f"{name}.{namespace}", "limit": 10})

    return url


__all__ = ["DEFAULT_WINDOW_S", "SOURCE", "STATS_PORT", "StatsScraper", "Target", "golden_signals", "proxy_rows",
           "route_row", "route_rows", "stats_targets", "traces_url_of"]
