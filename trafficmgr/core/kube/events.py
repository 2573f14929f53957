"""Kubernetes Events for problems with user objects (invalid labels, conflicts), written asynchronously.

Each distinct problem (object uid, reason, message) is recorded once, however often the object is
re-read or rebuilt; writing never blocks the sync loop and failures are retried a few times.

With several replicas only the leader writes (see :mod:`trafficmgr.core.kube.writer`): a follower holds
the Events it would have written, and a new leader writes each held one for which the API has no Event
with the same object uid, reason and message from trafficmgr yet (the old leader may have written it
before it died). So a problem seen while the old leader was dying is recorded once, not lost.
"""

from __future__ import annotations

import collections
import datetime as dt
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from trafficmgr.core.kube.client import KubeClient
from trafficmgr.core.kube.writer import BackgroundWriter
from trafficmgr.core.labels import LabelRegistry
from trafficmgr.core.model import INVALID_LABEL as INVALID_LABEL  # re-exported: the reason tests look for
from trafficmgr.core.model import LabelError, ObjectRef

log = logging.getLogger(__name__)

COMPONENT = "trafficmgr"
API_VERSIONS = {
    "Pod": "v1", "Service": "v1", "Secret": "v1", "Deployment": "apps/v1", "StatefulSet": "apps/v1",
    "DaemonSet": "apps/v1", "ReplicaSet": "apps/v1", "Ingress": "networking.k8s.io/v1",
}


def label_error_message(error: LabelError, registry: LabelRegistry | None) -> str:
    """``invalid value "FOO" for label traffic.lb.policy: must be one of ...; the default (X) applies``, or
    for a clamped value ``value "999..." for label traffic.hash.cookie.ttl clamped: 999... is larger ...``."""
    if error.clamped:
        return f"value {error.value!r} for label {error.key} clamped: {error.message}"
    spec = registry.spec(error.key) if registry else None
    default = ""
    if spec is not None:
        value = spec.default
        default = f"; the default ({'none' if value in (None, '') else str(value).lower() if isinstance(value, bool) else value}) applies"
    return f"invalid value {error.value!r} for label {error.key}: {error.message}{default}"


class EventRecorder(BackgroundWriter):
    """Records Warning Events on objects; deduplicates; writes from a background thread."""

    thread_name = "events"
    # A follower keeps the 5000 latest problems it saw: a new leader asks the API about each (one list
    # request per Event, from the writer thread), and older ones were most likely written by the old leader.
    max_held = 5000
    #: How many problems :meth:`recent` keeps (newest last).
    max_recent = 200

    def __init__(self, client: KubeClient | None, registry: LabelRegistry | None = None, max_remembered: int = 50000,
                 leading: Callable[[], bool] | None = None) -> None:
        super().__init__(client, max_remembered, leading)
        self.registry = registry
        self.recorded: list[tuple[ObjectRef, str, str]] = []
        self._recent: collections.deque[tuple[float, ObjectRef, str, str, str]] = collections.deque(maxlen=self.max_recent)
        self.host = socket.gethostname()

    def label_errors(self, errors: list[LabelError]) -> None:
        for e in errors:
            self.warn(e.ref, label_error_message(e, self.registry), e.reason)

    def warn(self, ref: ObjectRef, message: str, reason: str) -> None:
        """Record a Warning Event on ``ref`` unless this exact problem was already recorded."""
        if not self.offer((ref.uid or str(ref), reason, message), (ref, reason, message, "Warning")):
            return
        with self._lock:
            self.recorded.append((ref, reason, message))
            del self.recorded[:-1000]
            self._recent.append((time.time(), ref, reason, message, "Warning"))
        log.warning("%s: %s", ref, message)

    def recent(self, limit: int = 100) -> list[dict[str, Any]]:
        """The latest ``limit`` distinct problems this process saw, newest first, as the dashboard shows
        them: ``{"time", "type", "reason", "object": "Kind/ns/name", "message"}``. A follower replica has
        them too (it records what it would write), whether or not an Event was written."""
        with self._lock:
            items = list(self._recent)[-limit:] if limit > 0 else []
        return [{"time": at, "type": etype, "reason": reason, "message": message,
                 "object": f"{ref.kind}/{ref.namespace}/{ref.name}" if ref.namespace else f"{ref.kind}/{ref.name}"}
                for at, ref, reason, message, etype in reversed(items)]

    def write(self, item: tuple[ObjectRef, str, str, str]) -> None:
        self._write(*item)

    def already_written(self, item: tuple[ObjectRef, str, str, str]) -> bool:
        """True when the API has this Event already (same object, reason and message, from trafficmgr)."""
        assert self.client is not None
        ref, reason, message, _ = item
        selector = f"involvedObject.uid={ref.uid}" if ref.uid else f"involvedObject.kind={ref.kind},involvedObject.name={ref.name}"
        events = self.client.list(f"/api/v1/namespaces/{ref.namespace or 'default'}/events",
                                  {"fieldSelector": f"{selector},reason={reason}"})
        return any(e.get("message") == message[:1024] and e.get("reportingComponent") == COMPONENT
                   for e in events.get("items") or ())

    def describe(self, item: tuple[ObjectRef, str, str, str]) -> str:
        return f"an event on {item[0]}"

    def _write(self, ref: ObjectRef, reason: str, message: str, etype: str) -> None:
        assert self.client is not None
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        namespace = ref.namespace or "default"
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{ref.name}.", "namespace": namespace},
            "involvedObject": {
                "kind": ref.kind, "namespace": ref.namespace, "name": ref.name, "uid": ref.uid,
                "apiVersion": API_VERSIONS.get(ref.kind, "v1"), "resourceVersion": ref.resource_version,
            },
            "reason": reason,
            "message": message[:1024],
            "type": etype,
            "source": {"component": COMPONENT, "host": self.host},
            "reportingComponent": COMPONENT,
            "reportingInstance": self.host,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        self.client.request("POST", f"/api/v1/namespaces/{namespace}/events", body=body)
