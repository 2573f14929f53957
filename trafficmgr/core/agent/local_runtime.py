"""The ``local`` runtime (``trafficmgr demo``): sidecars as plain Envoy processes on the host's network,
bound to the pod IP, without root.

Without iptables nothing is redirected, so each sidecar also accepts **explicit HTTP proxy** requests
on ``<pod IP>:15001`` (``curl -x http://<pod IP>:15001 http://reviews:9080/``; apps use it through
``HTTP_PROXY``). That static listener forwards every connection to the internal listener
``outbound_proxy`` that ``trafficmgr serve --explicit-proxy`` sends over LDS: the same HTTP filters
and the same virtual hosts as the redirected outbound listener, so routing, policies and blocking are
identical. (The control plane's sidecar view is shared by every sidecar and a listener address cannot
depend on the node, hence the per-sidecar static listener in front of one shared internal listener.)
"""

from __future__ import annotations

import copy
import os
from typing import Any

from trafficmgr.core.agent.netns_runtime import ProcessRuntime
from trafficmgr.core.agent.runtime import PodNetwork, Sidecar, SidecarSpec
from trafficmgr.core.translate.explicit_proxy import PROXY_LISTENER

#: The explicit proxy port on every pod IP.
PROXY_PORT = 15001
#: The internal listener (from ``trafficmgr serve --explicit-proxy``) that proxy connections go to.
INTERNAL_LISTENER = PROXY_LISTENER
PROXY_CLUSTER = "explicit_proxy"
_INTERNAL_EXT = "type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener"
_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def add_explicit_proxy(config: dict[str, Any], pod_ip: str, port: int = PROXY_PORT) -> dict[str, Any]:
    """A copy of the sidecar bootstrap ``config`` with the internal listener extension and the static
    listener ``<pod_ip>:<port>`` forwarding every request to the internal listener ``outbound_proxy``.

    The static listener is a plain HTTP hop (no request id, no tracing, no timeout: the internal
    listener's connection manager does all of that), not a TCP proxy: Envoy 1.40's tcp_proxy resets
    the client, dropping the response, when the internal side closes after ``Connection: close``
    (envoyproxy/envoy#45190)."""
    out = copy.deepcopy(config)
    exts = out.setdefault("bootstrap_extensions", [])
    if not any(e.get("name") == "envoy.bootstrap.internal_listener" for e in exts):
        exts.append({"name": "envoy.bootstrap.internal_listener", "typed_config": {"@type": _INTERNAL_EXT}})
    statics = out.setdefault("static_resources", {})
    statics.setdefault("listeners", []).append({
        "name": "explicit_proxy",
        "address": {"socket_address": {"address": pod_ip, "port_value": port}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
            "@type": _HCM, "stat_prefix": "explicit_proxy", "generate_request_id": False,
            # WebSocket upgrades and CONNECT (grpcio's and other clients' proxy tunnels) are passed on
            # to the internal listener, which routes (and for CONNECT, terminates) them.
            "upgrade_configs": [{"upgrade_type": "websocket"}, {"upgrade_type": "CONNECT"}],
            "http_filters": [{"name": "envoy.filters.http.router",
                              "typed_config": {"@type": _ROUTER, "suppress_envoy_headers": True}}],
            "route_config": {"name": "explicit_proxy", "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
                {"match": {"connect_matcher": {}}, "route": {"cluster": PROXY_CLUSTER, "timeout": "0s"}},
                {"match": {"prefix": "/"}, "route": {"cluster": PROXY_CLUSTER, "timeout": "0s"}}]}]},
        }}]}],
    })
    statics.setdefault("clusters", []).append({
        "name": PROXY_CLUSTER,
        "connect_timeout": "1s",
        # One request per internal connection: the internal listener's HCM closes connections on
        # "Connection: close", and a pooled connection closed that way would fail the next request.
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": _HTTP_OPTIONS, "common_http_protocol_options": {"max_requests_per_connection": 1},
            "explicit_http_config": {"http_protocol_options": {}}}},
        "load_assignment": {"cluster_name": PROXY_CLUSTER, "endpoints": [{"lb_endpoints": [{"endpoint": {
            "address": {"envoy_internal_address": {"server_listener_name": INTERNAL_LISTENER}}}}]}]},
    })
    return out


class LocalRuntime(ProcessRuntime):
    """Sidecar Envoys on the host network (see the module docstring); state under ``state_dir``."""

    def __init__(self, state_dir: str, envoy: str | None = None, proxy_port: int = PROXY_PORT) -> None:
        super().__init__(state_dir, envoy=envoy, use_netns=False)
        self.proxy_port = proxy_port

    def start(self, spec: SidecarSpec, network: PodNetwork) -> Sidecar:
        config = add_explicit_proxy(spec.config, spec.pod.ip, self.proxy_port)
        return super().start(SidecarSpec(spec.pod, config, spec.proxy_uid, spec.xds_socket, spec.prepare), network)

    def admin_address(self, sidecar: Sidecar) -> tuple[str, int]:
        """(address, port) of ``sidecar``'s Envoy admin, from the bootstrap it was started with (local mode:
        the pod IP, see :func:`~trafficmgr.core.agent.agent.sidecar_bootstrap`). Raises ``SidecarError``."""
        import json

        from trafficmgr.core.agent.runtime import SidecarError

        path = os.path.join(self.state_dir, sidecar.id, "envoy.json")
        try:
            with open(path, encoding="utf-8") as f:
                address = json.load(f)["admin"]["address"]["socket_address"]
            return str(address["address"]), int(address["port_value"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SidecarError(f"cannot read the admin address of sidecar {sidecar.id[:12]} from {path}: {exc}") from None

    def _envoy_binary(self) -> str:
        # No uid switch in local mode: the Envoy next to this Python is used as is (no copy for root).
        from trafficmgr.core.agent.runtime import SidecarError
        from trafficmgr.core.envoy import EnvoyNotFound, find_envoy

        try:
            return self._envoy or find_envoy()
        except EnvoyNotFound as exc:
            raise SidecarError(str(exc)) from None


def current_uid() -> int:
    """The uid sidecars run as in local mode: the demo's own (``setpriv`` to it is a no-op for root)."""
    return os.geteuid()
