"""Kubernetes Events for problems with user objects (invalid labels, conflicts), written asynchronously.

Each distinct problem (object uid, reason, message) is recorded once, however often the object is
re-read or rebuilt; writing never blocks the sync loop and failures are retried a few times.
"""

from __future__ import annotations

import datetime as dt
import logging
import queue
import socket
import threading
from collections import OrderedDict

from trafficmgr.core.kube.client import KubeClient
from trafficmgr.core.labels import LabelRegistry
from trafficmgr.core.model import LabelError, ObjectRef

log = logging.getLogger(__name__)

COMPONENT = "trafficmgr"
INVALID_LABEL = "InvalidTrafficLabel"
API_VERSIONS = {
    "Pod": "v1", "Service": "v1", "Secret": "v1", "Deployment": "apps/v1", "StatefulSet": "apps/v1",
    "DaemonSet": "apps/v1", "ReplicaSet": "apps/v1", "Ingress": "networking.k8s.io/v1",
}


def label_error_message(error: LabelError, registry: LabelRegistry | None) -> str:
    """``invalid value "FOO" for label traffic.lb.policy: must be one of ...; the default (X) applies``."""
    spec = registry.spec(error.key) if registry else None
    default = ""
    if spec is not None:
        value = spec.default
        default = f"; the default ({'none' if value in (None, '') else str(value).lower() if isinstance(value, bool) else value}) applies"
    return f"invalid value {error.value!r} for label {error.key}: {error.message}{default}"


class EventRecorder:
    """Records Warning Events on objects; deduplicates; writes from a background thread."""

    def __init__(self, client: KubeClient | None, registry: LabelRegistry | None = None, max_remembered: int = 50000) -> None:
        self.client = client
        self.registry = registry
        self._seen: OrderedDict[tuple[str, str, str], None] = OrderedDict()
        self._max = max_remembered
        self._queue: queue.Queue[tuple[ObjectRef, str, str, str, int] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.recorded: list[tuple[ObjectRef, str, str]] = []
        self.host = socket.gethostname()

    def start(self) -> None:
        if self.client is not None and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="events", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=5)
            self._thread = None

    def label_errors(self, errors: list[LabelError]) -> None:
        for e in errors:
            self.warn(e.ref, label_error_message(e, self.registry), INVALID_LABEL)

    def warn(self, ref: ObjectRef, message: str, reason: str) -> None:
        """Record a Warning Event on ``ref`` unless this exact problem was already recorded."""
        key = (ref.uid or str(ref), reason, message)
        with self._lock:
            if key in self._seen:
                return
            self._seen[key] = None
            if len(self._seen) > self._max:
                self._seen.popitem(last=False)
            self.recorded.append((ref, reason, message))
            del self.recorded[:-1000]
        log.warning("%s: %s", ref, message)
        if self._thread is not None:
            self._queue.put((ref, reason, message, "Warning", 0))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            ref, reason, message, etype, attempt = item
            try:
                self._write(ref, reason, message, etype)
            except Exception as exc:  # noqa: BLE001 - the API may be down: retry a few times
                if attempt < 5:
                    threading.Timer(0.5 * 2**attempt, self._queue.put, [(ref, reason, message, etype, attempt + 1)]).start()
                else:
                    log.warning("could not record event on %s: %s", ref, exc)

    def _write(self, ref: ObjectRef, reason: str, message: str, etype: str) -> None:
        assert self.client is not None
        now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
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
