"""A thin raw-JSON layer over the official ``kubernetes`` client (config, auth, TLS come from it).

Objects stay plain dicts here; only :mod:`trafficmgr.core.kube.assemble` turns them into the IR.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import attrs
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from trafficmgr.core import gcpause

__all__ = ["ApiException", "KubeClient", "Kind", "load_api_client"]


@attrs.frozen(slots=True)
class Kind:
    """A watched Kubernetes kind."""

    kind: str
    api_version: str
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None = None) -> str:
        group, _, version = self.api_version.rpartition("/")
        base = f"/apis/{group}/{version}" if group else f"/api/{version}"
        if self.namespaced and namespace:
            return f"{base}/namespaces/{namespace}/{self.plural}"
        return f"{base}/{self.plural}"


#: Connections the API client keeps open at most. The official client's default (5 x CPUs: 10 on two cores) is
#: below what the control plane holds at once (one watch stream per watched kind, ~14 with every plugin, plus
#: the leader elector and the status and Event writers): past it urllib3 discards connections, and each
#: list page then pays a new TLS handshake.
CONNECTION_POOL_SIZE = 32


def load_api_client(kubeconfig: str | None = None, context: str | None = None) -> k8s.ApiClient:
    """In-cluster config when running in a pod (and no kubeconfig is given), else the kubeconfig."""
    configuration = k8s.Configuration()
    configuration.connection_pool_maxsize = max(configuration.connection_pool_maxsize, CONNECTION_POOL_SIZE)
    if kubeconfig is None:
        try:
            k8s_config.load_incluster_config(client_configuration=configuration)
            return k8s.ApiClient(configuration)
        except k8s_config.ConfigException:
            pass
    k8s_config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration)
    return k8s.ApiClient(configuration)


class KubeClient:
    """Raw JSON list/watch/create/patch through the official client's ApiClient."""

    def __init__(self, api_client: k8s.ApiClient) -> None:
        self.api = api_client

    @property
    def host(self) -> str:
        host: str = self.api.configuration.host
        return host

    def _call(self, method: str, path: str, query: dict[str, Any] | None = None, body: Any = None,
              content_type: str = "application/json", timeout: Any = 30) -> Any:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        params = self.api.param_serialize(
            method, path, query_params=list((query or {}).items()), header_params=headers, body=body,
            auth_settings=["BearerToken"],
        )
        resp = self.api.call_api(*params, _request_timeout=timeout)
        if not 200 <= resp.status <= 299:
            resp.read()
            raise ApiException(http_resp=resp)
        return resp

    def request(self, method: str, path: str, query: dict[str, Any] | None = None, body: Any = None,
                content_type: str = "application/json", timeout: Any = 30) -> dict[str, Any]:
        """One request; returns the decoded JSON body. Raises ApiException for non-2xx answers."""
        resp = self._call(method, path, query, body, content_type, timeout)
        data = resp.read()
        return json.loads(data) if data else {}

    def list(self, path: str, query: dict[str, Any] | None = None, timeout: Any = 60) -> dict[str, Any]:
        """A list's decoded body. The body is read, then decoded with the garbage collector held off
        (:mod:`~trafficmgr.core.gcpause`): a 100k-pod list is ~3 million new objects, all kept, and the
        collections their allocation would trigger scan them all again and again for nothing."""
        resp = self._call("GET", path, query, timeout=timeout)
        data = resp.read()
        if not data:
            return {}
        with gcpause.paused():
            decoded: dict[str, Any] = json.loads(data)
        return decoded

    def watch(self, path: str, query: dict[str, Any], timeout: float) -> Iterator[dict[str, Any]]:
        """Stream watch events (dicts with ``type`` and ``object``) until the server ends the stream."""
        q = {**query, "watch": "true"}
        resp = self._call("GET", path, q, timeout=(10, timeout))
        raw = resp.response
        try:
            buf = b""
            for chunk in raw.stream(65536, decode_content=True):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)
            if buf.strip():
                yield json.loads(buf)
        finally:
            raw.release_conn()
