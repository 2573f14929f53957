"""Workload certificates of the node agent's sidecars (``agent --mesh-identity``).

For every sidecar the agent makes an EC P-256 key on the node, asks the control plane's signing
service for a certificate naming the pod's SPIFFE ID (:mod:`trafficmgr.core.identity.client`: the
agent's own token, the pod's namespace/name/uid; the control plane checks that the pod runs on this
agent's node with that ServiceAccount) and writes key, chain and trust bundle into the sidecar's own
directory (:mod:`trafficmgr.core.identity.files`, ``identity/``, owned by the proxy uid, 0400) before
Envoy starts; Envoy reads them through file-based SDS and picks up every later change without a restart.

- Renewal at half-life of the current certificate (read from ``identity/cert.pem``, so a restarted agent
  adopting running sidecars renews them on time). A trust bundle change rewrites every ``bundle.pem``
  (same key and chain) and renews nothing.
- A failed renewal is retried with capped, jittered exponential backoff and reported as a Warning Event
  ``CertificateRenewalFailed`` on the pod; the current certificate stays in place (Envoy keeps serving
  it) until a new one arrives, even past its expiry (then peers refuse it: the Event said so before).
- The trust bundle is the ConfigMap ``trafficmgr-trust-bundle`` (key ``ca.crt``) in ``--mesh-ca-namespace``,
  watched: a change rewrites every sidecar's ``identity/bundle.pem`` (same key and chain) and triggers a
  renewal. The signing service's TLS certificate is verified against it.
- The directory goes with the sidecar (the runtime removes it); :meth:`IdentityManager.forget` first, so
  a renewal in flight never writes into a removed directory.

The key never leaves the node; the control plane sees only the CSR. What protects one sidecar's key from
another is the runtime: see :mod:`.netns_runtime` (shared filesystem and uid: not protected) and
:mod:`.docker_runtime` (only the pod's own directory is mounted).
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import attrs

from trafficmgr.core.agent.runtime import PodRef, SidecarError
from trafficmgr.core.identity import BUNDLE_CONFIGMAP, BUNDLE_KEY, client, files, spiffe
from trafficmgr.core.kube.client import Kind, KubeClient
from trafficmgr.core.kube.events import EventRecorder
from trafficmgr.core.kube.watch import Watcher
from trafficmgr.core.model import ObjectRef

log = logging.getLogger(__name__)

#: The Warning Event reason of a failed renewal.
REASON_RENEWAL_FAILED = "CertificateRenewalFailed"
#: The ConfigMap the control plane publishes the trust bundle in (its namespace), and its key.
CONFIG_MAP = Kind("ConfigMap", "v1", "configmaps")
#: The shortest time between two renewals of one certificate (a signer issuing nearly expired ones).
MIN_RENEWAL_S = 5.0


@attrs.define
class IdentityConfig:
    """The ``agent --mesh-identity`` options."""

    ca_address: str  # host:port of the signing service
    token_file: str  # the agent's projected ServiceAccount token (re-read per call)
    ca_server_name: str | None = None
    trust_domain: str = "cluster.local"
    ca_namespace: str = "trafficmgr"
    timeout_s: float = 10.0
    min_backoff_s: float = 1.0
    max_backoff_s: float = 60.0


@attrs.define
class _Entry:
    sidecar_id: str
    workdir: str
    pod: PodRef
    spiffe_id: str
    ref: ObjectRef
    not_after: float = 0.0  # epoch seconds of the current certificate's expiry (0: none)
    due: float = 0.0  # when to renew next (epoch seconds)
    failures: int = 0


def _written(workdir: str) -> dt.datetime:
    """When the current identity below ``workdir`` was written (its ``..data`` directory's mtime); now
    when unknown (a renewal is then due at half of what is left)."""
    import os

    try:
        return dt.datetime.fromtimestamp(os.stat(os.path.join(workdir, files.DIRECTORY, files.CERT)).st_mtime, dt.UTC)
    except OSError:
        return dt.datetime.now(dt.UTC)


def backoff(failures: int, lo: float, hi: float, rand: Callable[[], float] = random.random) -> float:
    """Seconds before retry number ``failures`` (1, 2, ...): ``lo * 2**(failures-1)`` capped at ``hi``, then
    jittered down by up to half (sidecars failing together do not retry together)."""
    base = min(hi, lo * 2 ** min(failures - 1, 30))
    return float(base * (0.5 + rand() / 2))


class IdentityManager:
    """Issues, tracks and renews the sidecars' certificates (see the module docstring)."""

    def __init__(self, kube: KubeClient, config: IdentityConfig, events: EventRecorder, proxy_uid: int | None) -> None:
        self.kube = kube
        self.config = config
        self.events = events
        self.proxy_uid = proxy_uid
        self.signer = client.SignClient(config.ca_address, config.token_file, config.ca_server_name, config.timeout_s)
        self._bundle: bytes | None = None
        self._bundle_changed = False
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()  # entries, bundle
        self._write_lock = threading.Lock()  # one writer of identity files at a time (vs forget)
        self._wake = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.watcher: Watcher | None = None
        self.renewals = 0
        self.failures = 0

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> IdentityManager:
        self.watcher = Watcher(self.kube, CONFIG_MAP, self._on_configmap, namespace=self.config.ca_namespace,
                               field_selector=f"metadata.name={BUNDLE_CONFIGMAP}")
        self.watcher.start()
        self._thread = threading.Thread(target=self._loop, name="identity", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self.watcher is not None:
            self.watcher.stop()
        with self._wake:
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=15)

    def synced(self) -> bool:
        return self.watcher is not None and self.watcher.synced.is_set()

    def bundle(self) -> bytes | None:
        with self._lock:
            return self._bundle

    def describe_bundle(self) -> str:
        return f"ConfigMap {self.config.ca_namespace}/{BUNDLE_CONFIGMAP}"

    # -- the trust bundle ---------------------------------------------------------------------

    def _on_configmap(self, etype: str, kind: Kind, obj: Any) -> None:
        objs = obj if etype == "RELIST" else [] if etype == "DELETED" else [obj]
        found = next((o for o in objs if (o.get("metadata") or {}).get("name") == BUNDLE_CONFIGMAP), None)
        if etype == "DELETED" and (obj.get("metadata") or {}).get("name") != BUNDLE_CONFIGMAP:
            return
        text = ((found or {}).get("data") or {}).get(BUNDLE_KEY) or ""
        if not text:
            # Deleted or emptied: keep the last bundle (proxies keep trusting what they trust), say so.
            if self._bundle is not None:
                log.warning("%s is gone or has no %s: keeping the last trust bundle", self.describe_bundle(), BUNDLE_KEY)
            return
        data = text.encode()
        try:
            client.load_certs(data, self.describe_bundle())
        except client.IdentityError as exc:
            log.error("%s: keeping the last trust bundle", exc)
            return
        with self._wake:
            if data == self._bundle:
                return
            first = self._bundle is None
            self._bundle = data
            if not first:
                # Rewrite every sidecar's bundle.pem (same key and chain). No renewal: the roots change
                # at rotation steps 1 and 3, and certificates of the current signer stay valid (step 2
                # switches the signer; certificates move to it at their half-life).
                self._bundle_changed = True
            self._wake.notify_all()
        log.info("trust bundle %s from %s", "loaded" if first else "changed", self.describe_bundle())

    # -- per sidecar --------------------------------------------------------------------------

    def spiffe_id(self, pod: PodRef, service_account: str) -> str:
        return spiffe.spiffe_id(self.config.trust_domain, pod.namespace, service_account)

    def issue(self, pod: PodRef, service_account: str) -> client.Issued:
        """A fresh key and certificate for ``pod``; raises :class:`SidecarError`."""
        bundle = self.bundle()
        if bundle is None:
            raise SidecarError(f"no trust bundle yet ({self.describe_bundle()} not found: is the control plane "
                               f"running with --mesh-identity?)")
        try:
            return self.signer.issue(self.spiffe_id(pod, service_account), (pod.namespace, pod.name, pod.uid), bundle)
        except client.IdentityError as exc:
            raise SidecarError(f"workload certificate: {exc}") from None

    def prepare(self, pod: PodRef, service_account: str) -> Callable[[str], None]:
        """The ``SidecarSpec.prepare`` of a new sidecar: writes a fresh identity into its directory."""

        def write(workdir: str) -> None:
            issued = self.issue(pod, service_account)
            files.write(workdir, issued.key_pem, issued.chain_pem, self.bundle() or issued.bundle_pem, self.proxy_uid)
            log.info("certificate for %s/%s (%s) valid until %s", pod.namespace, pod.name,
                     self.spiffe_id(pod, service_account), f"{issued.not_after:%Y-%m-%dT%H:%M:%SZ}")

        return write

    def tracked(self, sidecar_id: str) -> bool:
        with self._lock:
            return sidecar_id in self._entries

    def track(self, sidecar_id: str, workdir: str, pod: PodRef, service_account: str, ref: ObjectRef) -> None:
        """Renew ``sidecar_id``'s certificate from now on. Its current one is read from ``workdir`` (a new
        sidecar's, or a running one adopted after an agent restart); none, unreadable or for another
        identity: renewed at once."""
        wanted = self.spiffe_id(pod, service_account)
        entry = _Entry(sidecar_id, workdir, pod, wanted, ref)
        chain = files.read_chain(workdir)
        leaf = client.validity(chain) if chain else None
        if leaf is not None and chain is not None and client.leaf_uris(chain) == [wanted]:
            not_before, not_after = leaf
            entry.not_after = not_after.timestamp()
            entry.due = client.renew_at(not_before, not_after, _written(workdir)).timestamp()
        with self._wake:
            if sidecar_id in self._entries:
                return
            self._entries[sidecar_id] = entry
            self._wake.notify_all()

    def forget(self, sidecar_id: str) -> None:
        """Stop renewing (the sidecar is being removed); waits for a write in progress."""
        with self._write_lock, self._lock:
            self._entries.pop(sidecar_id, None)

    def renew_now(self, sidecar_id: str | None = None) -> None:
        """Renew one sidecar's certificate (every one's when None) now."""
        with self._wake:
            for sid, entry in self._entries.items():
                if sidecar_id is None or sid == sidecar_id:
                    entry.due = 0.0
            self._wake.notify_all()

    def entries(self) -> dict[str, tuple[str, float, float, int]]:
        """sidecar id -> (SPIFFE ID, expiry, next renewal, failures in a row) (epoch seconds)."""
        with self._lock:
            return {sid: (e.spiffe_id, e.not_after, e.due, e.failures) for sid, e in self._entries.items()}

    # -- the renewal loop ---------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._wake:
                now = time.time()
                due = [e for e in self._entries.values() if e.due <= now]
                rewrite = self._bundle_changed
                self._bundle_changed = False
                if not due and not rewrite:
                    nxt = min((e.due for e in self._entries.values()), default=now + 60)
                    self._wake.wait(timeout=max(0.05, min(60.0, nxt - now)))
                    continue
                due = [attrs.evolve(e) for e in due]  # copies: worked on without the lock
            try:
                if rewrite:
                    self._rewrite_bundles()
                for entry in due:
                    if self._stop.is_set():
                        return
                    self._renew(entry)
            except Exception:  # the loop must survive anything
                log.exception("certificate renewal pass failed; retrying")
                time.sleep(1)

    def _rewrite_bundles(self) -> None:
        """Every sidecar's ``identity/bundle.pem`` := the current bundle (same key and chain)."""
        bundle = self.bundle()
        if bundle is None:
            return
        with self._lock:
            entries = list(self._entries.values())
        for entry in entries:
            key = client.current_key(entry.workdir)
            chain = files.read_chain(entry.workdir)
            if key is None or chain is None:
                continue  # no identity yet: the renewal writes one
            with self._write_lock:
                if self.tracked(entry.sidecar_id):
                    files.write(entry.workdir, key, chain, bundle, self.proxy_uid)

    def _renew(self, entry: _Entry) -> None:
        service_account = spiffe.parse(entry.spiffe_id)
        try:
            issued = self.issue(entry.pod, service_account[2] if service_account else "default")
        except SidecarError as exc:
            self._failed(entry, str(exc))
            return
        with self._write_lock:
            with self._lock:
                live = self._entries.get(entry.sidecar_id)
            if live is None:
                return  # removed meanwhile
            files.write(entry.workdir, issued.key_pem, issued.chain_pem, self.bundle() or issued.bundle_pem, self.proxy_uid)
            with self._lock:
                live.not_after = issued.not_after.timestamp()
                live.due = max(issued.renew_at().timestamp(), time.time() + MIN_RENEWAL_S)
                live.failures = 0
        self.renewals += 1
        log.info("renewed the certificate of %s/%s (%s): valid until %s, next renewal %s", entry.pod.namespace,
                 entry.pod.name, entry.spiffe_id, f"{issued.not_after:%Y-%m-%dT%H:%M:%SZ}",
                 f"{issued.renew_at():%Y-%m-%dT%H:%M:%SZ}")

    def _failed(self, entry: _Entry, message: str) -> None:
        self.failures += 1
        with self._lock:
            live = self._entries.get(entry.sidecar_id)
            if live is None:
                return
            live.failures += 1
            delay = backoff(live.failures, self.config.min_backoff_s, self.config.max_backoff_s)
            live.due = time.time() + delay
            not_after = live.not_after
        left = ("the current certificate expires at "
                f"{dt.datetime.fromtimestamp(not_after, dt.UTC):%Y-%m-%dT%H:%M:%SZ}" if not_after
                else "no current certificate")
        # The message holds no delay or count: the recorder writes one Event per distinct problem.
        self.events.warn(entry.ref, f"renewing the certificate for {entry.spiffe_id} failed: {message}; {left} "
                                    f"(kept until then; retrying with backoff)", REASON_RENEWAL_FAILED)
        log.info("certificate renewal of %s/%s: retry in %.1fs", entry.pod.namespace, entry.pod.name, delay)
