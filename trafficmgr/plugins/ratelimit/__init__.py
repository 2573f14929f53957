"""Rate limits (sidecar traffic only): bandwidth per client sidecar and local request rate.

Both filters sit in every sidecar connection manager as no-ops (so a label change only touches routes,
never the listener) and are configured per destination in the virtual host's ``typed_per_filter_config``.
The ingress gateway ignores these labels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from envoy.extensions.filters.http.bandwidth_limit.v3 import bandwidth_limit_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2

from trafficmgr.plugin import SIDECAR, UINT32_MAX, HttpFilter, LabelSpec, hookimpl, pack, percent_fraction
from trafficmgr.plugin import labels as L

if TYPE_CHECKING:
    from envoy.config.route.v3.route_components_pb2 import VirtualHost

    from trafficmgr.plugin import BuildContext, Service, ServicePort

BANDWIDTH = "traffic.rate.limit"
REQUEST_RATE = "traffic.request.rate"
ON = frozenset({L.POD, L.SERVICE})
#: Largest values sent to Envoy. Token counts are uint32; limit_kbps * 1024 must not overflow uint64 in
#: Envoy's byte arithmetic. The declarations clamp larger label values (with a TrafficConfigClamped
#: Event): they mean "unlimited" anyway.
MAX_REQUEST_RATE = UINT32_MAX
MAX_BANDWIDTH_KIBPS = 2**40


@hookimpl
def trafficmgr_labels() -> list[LabelSpec]:
    return [
        LabelSpec(BANDWIDTH, ON, L.count(unit="KiB/s", ceiling=MAX_BANDWIDTH_KIBPS), 0,
                  "bandwidth limit per client sidecar (Envoy's limit_kbps)"),
        LabelSpec(REQUEST_RATE, ON, L.count(unit="requests/s", ceiling=MAX_REQUEST_RATE), 0,
                  "local request rate limit per client sidecar; excess gets 429"),
    ]


#: HCM filter names; also the ``typed_per_filter_config`` keys (Envoy ignores any other key silently).
RATELIMIT_FILTER = "envoy.filters.http.local_ratelimit"
BANDWIDTH_FILTER = "envoy.filters.http.bandwidth_limit"
RATELIMIT_ORDER = 200
BANDWIDTH_ORDER = 300
RATELIMIT_STAT_PREFIX = "local_rate_limit"
BANDWIDTH_STAT_PREFIX = "bandwidth_limit"


def request_rate_config(rate: int) -> local_rate_limit_pb2.LocalRateLimit:
    """A token bucket of ``rate`` tokens refilled by ``rate`` every second (so a burst of ``rate``
    requests passes at once); both runtime fractions at 100 %, else Envoy never answers 429."""
    cfg = local_rate_limit_pb2.LocalRateLimit(stat_prefix=RATELIMIT_STAT_PREFIX)
    cfg.token_bucket.max_tokens = rate
    cfg.token_bucket.tokens_per_fill.value = rate
    cfg.token_bucket.fill_interval.FromSeconds(1)
    for fraction, what in ((cfg.filter_enabled, "enabled"), (cfg.filter_enforced, "enforced")):
        fraction.runtime_key = f"{RATELIMIT_STAT_PREFIX}_{what}"
        fraction.default_value.CopyFrom(percent_fraction(100, "HUNDRED"))
    return cfg


def bandwidth_config(kibps: int) -> bandwidth_limit_pb2.BandwidthLimit:
    """``kibps`` KiB/s in both directions (Envoy's ``limit_kbps`` is KiB/s; its bucket starts full)."""
    return bandwidth_limit_pb2.BandwidthLimit(
        stat_prefix=BANDWIDTH_STAT_PREFIX,
        enable_mode=bandwidth_limit_pb2.BandwidthLimit.REQUEST_AND_RESPONSE,
        limit_kbps={"value": kibps},
    )


@hookimpl
def trafficmgr_http_filters(ctx: BuildContext) -> list[HttpFilter]:
    """No-op local rate limit and bandwidth limit filters, in sidecar connection managers only."""
    if ctx.role != SIDECAR:
        return []
    return [
        # No token bucket and 0 % enabled: the filter passes everything until a vhost configures it.
        HttpFilter(RATELIMIT_FILTER, RATELIMIT_ORDER, local_rate_limit_pb2.LocalRateLimit(stat_prefix=RATELIMIT_STAT_PREFIX)),
        # enable_mode defaults to DISABLED.
        HttpFilter(BANDWIDTH_FILTER, BANDWIDTH_ORDER, bandwidth_limit_pb2.BandwidthLimit(stat_prefix=BANDWIDTH_STAT_PREFIX)),
    ]


@hookimpl
def trafficmgr_virtual_host(vhost: VirtualHost, service: Service, port: ServicePort, ctx: BuildContext) -> None:
    """Configure both filters for traffic to ``service`` (sidecar virtual hosts only; 0 = no limit)."""
    if ctx.role != SIDECAR:
        return
    rate = min(int(service.labels.value(REQUEST_RATE, 0)), MAX_REQUEST_RATE)  # the declaration clamps
    if rate > 0:
        vhost.typed_per_filter_config[RATELIMIT_FILTER].CopyFrom(pack(request_rate_config(rate)))
    kibps = min(int(service.labels.value(BANDWIDTH, 0)), MAX_BANDWIDTH_KIBPS)
    if kibps > 0:
        vhost.typed_per_filter_config[BANDWIDTH_FILTER].CopyFrom(pack(bandwidth_config(kibps)))


__all__ = ["BANDWIDTH", "BANDWIDTH_FILTER", "RATELIMIT_FILTER", "REQUEST_RATE", "bandwidth_config", "request_rate_config"]
