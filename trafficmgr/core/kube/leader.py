"""Leader election among control-plane replicas with a ``coordination.k8s.io/v1`` Lease.

Every replica watches, builds and serves xDS; only the leader writes to the API (status subresources,
Events: see :mod:`trafficmgr.core.kube.writer`). The election is the official client's
``kubernetes.leaderelection`` with its ``LeaseLock`` (the same algorithm as client-go: a candidate takes
the Lease when it is absent, released, or its record has not changed for ``leaseDurationSeconds`` as
seen by the candidate's own clock; the holder renews every ``retry_period`` and gives up when it could
not renew within ``renew_deadline``), with four things around it:

- the lock talks through *our* API client (``LeaseLock`` builds ``CoordinationV1Api()`` on the global
  default configuration, which is not the kubeconfig or in-cluster config ``serve`` loaded), with a
  request timeout, so a hung API server cannot stall a renewal past the deadline;
- ``LeaderElection.run`` returns for good once leadership is lost: :class:`LeaderElector` runs it again,
  so the replica becomes a candidate again;
- :meth:`LeaderElector.leading` is false as soon as the last successful renewal is older than
  ``renew_deadline`` (not only once the library notices), and the library's loop cannot be stopped, so
  after :meth:`LeaderElector.stop` the lock refuses every call and ``leading()`` is false;
- a graceful stop releases the Lease (empty holder), so another replica takes over at its next retry
  instead of after the lease duration (client-go's ``ReleaseOnCancel``).

Timing: a replica that dies without releasing is replaced after the lease duration plus at most two
retry periods (a candidate's clock starts when it *sees* the last renewal, and it checks once per retry
period); the old leader has stopped writing by then, since ``retry_period + renew_deadline`` is less
than the lease duration (checked by :func:`check_timing`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import attrs
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from kubernetes.leaderelection import electionconfig, leaderelection
from kubernetes.leaderelection.resourcelock.leaselock import LeaseLock
from prometheus_client import Counter, Gauge

from trafficmgr.core.metrics import REGISTRY

log = logging.getLogger(__name__)
# The library logs every retry period at INFO ("yet to finish lease_duration ..."): keep its warnings only.
logging.getLogger("leaderelection").setLevel(logging.WARNING)

DEFAULT_LEASE_SECONDS = 15
DEFAULT_LEASE_NAME = "trafficmgr"

LEADER = Gauge("trafficmgr_leader", "1 while this replica writes status and Events (it holds the leader Lease, "
               "or runs with --no-leader-election), else 0", registry=REGISTRY)
TRANSITIONS = Counter("trafficmgr_leader_transitions", "times this replica gained or lost the leader Lease",
                      ["change"], registry=REGISTRY)


@attrs.frozen(slots=True)
class LeaseTiming:
    """Lease duration (whole seconds: ``leaseDurationSeconds``), renew deadline and retry period (seconds)."""

    duration: int
    renew_deadline: float
    retry_period: float


def check_timing(duration: int, renew_deadline: float | None = None, retry_period: float | None = None) -> LeaseTiming:
    """The timing with defaults derived from ``duration`` (client-go's 15/10/2 ratios: retry period
    duration/7.5 but at least 1 s, the library's minimum; deadline 2/3 of the duration, or less for short
    leases so that deadline + retry period stays below the duration). Raises ValueError naming the rule a
    value breaks."""
    if isinstance(duration, bool) or not isinstance(duration, int) or duration < 3:
        raise ValueError(f"lease duration {duration!r}: whole seconds, at least 3")
    retry = retry_period if retry_period is not None else max(1.0, duration / 7.5)
    deadline = renew_deadline if renew_deadline is not None else min(duration * 2 / 3, (duration - retry) * 0.9)
    if retry < 1:
        raise ValueError(f"retry period {retry:g}s: at least 1 s (the official client's minimum)")
    if deadline <= 1.2 * retry:
        raise ValueError(f"renew deadline {deadline:g}s must exceed 1.2 x the retry period ({retry:g}s)")
    if retry + deadline >= duration:
        raise ValueError(f"renew deadline {deadline:g}s + retry period {retry:g}s must be less than the lease "
                         f"duration ({duration}s): a leader must stop writing before another may take over")
    return LeaseTiming(duration, deadline, retry)


def default_identity() -> str:
    """``$POD_NAME`` (the chart sets it from the downward API), else ``<hostname>-<pid>``."""
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"


class _TimeoutApi:
    """``CoordinationV1Api`` whose calls carry a request timeout."""

    def __init__(self, api: k8s.CoordinationV1Api, timeout: float) -> None:
        self._api = api
        self._timeout = timeout

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._api, name)
        return lambda *a, **kw: method(*a, _request_timeout=self._timeout, **kw)


class _Lock(LeaseLock):
    """The official LeaseLock on our API client; records successful renewals; refuses calls once stopped."""

    def __init__(self, api_client: k8s.ApiClient, name: str, namespace: str, identity: str, timeout: float,
                 stopped: threading.Event, on_renewed: Callable[[], None]) -> None:
        super().__init__(name, namespace, identity)  # type: ignore[no-untyped-call]
        self.api_instance = _TimeoutApi(k8s.CoordinationV1Api(api_client), timeout)
        self._stopped = stopped
        self._on_renewed = on_renewed
        self._problem = ""

    def get(self, name: str, namespace: str) -> tuple[bool, Any]:
        if self._stopped.is_set():
            return False, ApiException(status=0, reason="stopped")
        found, record = super().get(name, namespace)  # type: ignore[no-untyped-call]
        if not found and getattr(record, "status", None) != 404:  # e.g. 403: no RBAC for leases; say so once
            problem = f"{getattr(record, 'status', '')} {getattr(record, 'reason', record)}".strip()
            if problem != self._problem:
                log.warning("leader election: cannot read Lease %s/%s (%s); this replica does not write "
                            "status or Events until it can", namespace, name, problem)
            self._problem = problem
        else:
            self._problem = ""
        return found, record

    def create(self, name: str, namespace: str, election_record: Any) -> bool:
        if self._stopped.is_set():
            return False
        ok: bool = super().create(name, namespace, election_record)  # type: ignore[no-untyped-call]
        if ok:
            self._on_renewed()
        return ok

    def update(self, name: str, namespace: str, updated_record: Any) -> bool:
        if self._stopped.is_set():
            return False
        ok: bool = super().update(name, namespace, updated_record)  # type: ignore[no-untyped-call]
        if ok and updated_record.holder_identity == self.identity:
            self._on_renewed()
        return ok


class LeaderElector:
    """Campaigns for the Lease ``namespace/name`` from a daemon thread until :meth:`stop`.

    ``on_started``/``on_stopped`` are called (from the election threads) when leadership is gained/lost;
    :meth:`leading` is what writers check before every write."""

    def __init__(self, api_client: k8s.ApiClient, name: str, namespace: str, identity: str, timing: LeaseTiming,
                 on_started: Callable[[], None] | None = None, on_stopped: Callable[[], None] | None = None) -> None:
        self.name, self.namespace, self.identity, self.timing = name, namespace, identity, timing
        self.on_started = on_started or (lambda: None)
        self.on_stopped = on_stopped or (lambda: None)
        self._stopped = threading.Event()
        self._leading = False
        self._renewed = 0.0  # monotonic time of the last successful create/renew by this replica
        self._lock = _Lock(api_client, name, namespace, identity, timeout=max(1.0, timing.retry_period),
                           stopped=self._stopped, on_renewed=self._mark_renewed)
        self._thread: threading.Thread | None = None
        self.transitions = 0
        LEADER.set(0)

    def _mark_renewed(self) -> None:
        self._renewed = time.monotonic()

    def leading(self) -> bool:
        """True while this replica holds the Lease and renewed it within the renew deadline."""
        return (self._leading and not self._stopped.is_set()
                and time.monotonic() - self._renewed < self.timing.renew_deadline)

    def start(self) -> LeaderElector:
        self._thread = threading.Thread(target=self._run, name="leader-election", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        config = electionconfig.Config(self._lock, lease_duration=self.timing.duration,
                                       renew_deadline=self.timing.renew_deadline,
                                       retry_period=self.timing.retry_period,
                                       onstarted_leading=self._started, onstopped_leading=self._lost)
        while not self._stopped.is_set():
            try:
                leaderelection.LeaderElection(config).run()  # returns when leadership is lost
            except Exception:  # noqa: BLE001 - campaign again after a pause, never end the thread
                log.exception("leader election failed; retrying")
                self._lost()
            self._stopped.wait(self.timing.retry_period)

    def _started(self) -> None:
        if self._stopped.is_set():
            return
        self._leading = True
        self.transitions += 1
        LEADER.set(1)
        TRANSITIONS.labels(change="gained").inc()
        log.info("leader election: %s now holds Lease %s/%s", self.identity, self.namespace, self.name)
        self.on_started()

    def _lost(self) -> None:
        if not self._leading:
            return
        self._leading = False
        self.transitions += 1
        LEADER.set(0)
        TRANSITIONS.labels(change="lost").inc()
        log.warning("leader election: %s lost Lease %s/%s; not writing until it holds it again",
                    self.identity, self.namespace, self.name)
        self.on_stopped()

    def stop(self, release: bool = True) -> None:
        """Stop campaigning; when leading and ``release``, give the Lease up (empty holder) so another
        replica takes over at its next retry."""
        was_leading = self.leading()
        self._stopped.set()
        self._leading = False
        LEADER.set(0)
        if not (was_leading and release):
            return
        api = _TimeoutApi(self._lock.api_instance._api, 2.0)
        try:
            lease = api.read_namespaced_lease(self.name, self.namespace)
            if lease.spec is not None and lease.spec.holder_identity == self.identity:
                lease.spec.holder_identity = None
                lease.spec.lease_duration_seconds = 1
                api.replace_namespaced_lease(self.name, self.namespace, lease)
                log.info("leader election: released Lease %s/%s", self.namespace, self.name)
        except Exception as exc:  # noqa: BLE001 - best effort: the Lease expires anyway
            log.warning("leader election: could not release Lease %s/%s: %s", self.namespace, self.name, exc)
