"""A minimal synchronous ADS client for protocol tests (a thread reads responses into a queue)."""

from __future__ import annotations

import queue
import threading
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from trafficmgr.core import wire

_SERVICE = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"
_END = object()


class AdsClient:
    """One ADS stream. ``send(**fields)`` a request, ``recv()`` the next response (parsed, with ``.raw``)."""

    def __init__(self, port: int, delta: bool = False, node_id: str = "node-1", node_cluster: str = "test") -> None:
        self.delta = delta
        self.node = base_pb2.Node(id=node_id, cluster=node_cluster)
        self.first = True
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        method = _SERVICE + ("DeltaAggregatedResources" if delta else "StreamAggregatedResources")
        rpc = self.channel.stream_stream(method, request_serializer=lambda m: m.SerializeToString())
        self._requests: queue.Queue[Any] = queue.Queue()
        self._responses: queue.Queue[Any] = queue.Queue()
        self.call = rpc(iter(self._requests.get, _END))
        self.error: grpc.RpcError | None = None
        self.raw: dict[str, bytes] = {}  # nonce -> response bytes as received
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for raw in self.call:
                self._responses.put(raw)
        except grpc.RpcError as exc:
            self.error = exc
            self._responses.put(exc)
        self._responses.put(_END)

    def send(self, **fields: Any) -> None:
        cls = discovery_pb2.DeltaDiscoveryRequest if self.delta else discovery_pb2.DiscoveryRequest
        error = fields.pop("error", None)
        msg = cls(**fields)
        if error is not None:
            msg.error_detail.code = 13
            msg.error_detail.message = error
        if self.first:
            msg.node.CopyFrom(self.node)
            self.first = False
        self._requests.put(msg)

    def recv(self, timeout: float = 3.0) -> Any:
        item = self._responses.get(timeout=timeout)
        if item is _END:
            raise EOFError("stream ended")
        if isinstance(item, grpc.RpcError):
            raise item
        cls = discovery_pb2.DeltaDiscoveryResponse if self.delta else discovery_pb2.DiscoveryResponse
        msg = cls.FromString(item)
        self.raw[msg.nonce] = item
        return msg

    def silent(self, timeout: float = 0.3) -> bool:
        """True if nothing arrives within ``timeout``."""
        try:
            item = self._responses.get(timeout=timeout)
        except queue.Empty:
            return True
        self._responses.put(item)
        return False

    def ack(self, resp: Any, **fields: Any) -> None:
        """ACK ``resp`` (same type; SotW also echoes its version and names given in ``fields``)."""
        if self.delta:
            self.send(type_url=resp.type_url, response_nonce=resp.nonce, **fields)
        else:
            self.send(type_url=resp.type_url, response_nonce=resp.nonce, version_info=resp.version_info, **fields)

    def close(self) -> None:
        self._requests.put(_END)
        self.channel.close()


    def body_without_nonce(self, resp: Any) -> bytes:
        """The response bytes as received, minus the trailing nonce field the server appends."""
        raw = self.raw[resp.nonce]
        suffix = wire.field_str(5, resp.nonce)
        assert raw.endswith(suffix)
        return raw[: -len(suffix)]
