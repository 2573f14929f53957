"""A userspace kube-proxy for local mode: each Service ClusterIP:port is a real listening socket.

Local ClusterIPs come from 127.2.0.0/16, where any address binds without setup; a connection to
``<ClusterIP>:<port>`` is forwarded to the next ready endpoint of that port (round robin over the
Service's EndpointSlices), like kube-proxy's old userspace mode. No ready endpoint: the connection is
closed at once. Apps without a sidecar reach Services this way (their names through the
``<SERVICE>_SERVICE_HOST`` variables the local kubelet sets); so does ``traffic.port.<port>=direct``
(Envoy sends such traffic to the ClusterIP). Ports below 1024 need root: without it they are skipped
with one log line.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading

from trafficmgr.apiserver.discovery import BY_KEY
from trafficmgr.apiserver.store import Store, WatchEvent

log = logging.getLogger(__name__)

SERVICES, SLICES = BY_KEY["services"], BY_KEY["endpointslices.discovery.k8s.io"]
Key = tuple[str, str, str]  # namespace, service, port name


class _Listener:
    def __init__(self, proxy: KubeProxy, ip: str, port: int, key: Key) -> None:
        self.proxy, self.key = proxy, key
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((ip, port))
            self.sock.listen(128)
        except OSError:
            self.sock.close()
            raise
        self.sock.settimeout(0.5)
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._accept, name=f"kube-proxy {ip}:{port}", daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self.proxy.forward, args=(conn, self.key), daemon=True).start()

    def close(self) -> None:
        self.closed.set()
        self.sock.close()


class KubeProxy:
    """Keeps one listener per ClusterIP:port of the store's Services (see the module docstring)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._listeners: dict[tuple[str, int], _Listener] = {}
        self._endpoints: dict[Key, list[tuple[str, int]]] = {}
        self._rr: dict[Key, itertools.count[int]] = {}
        self._skipped: set[tuple[str, int]] = set()
        self._dirty = threading.Event()
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="kube-proxy", daemon=True)

    def start(self) -> KubeProxy:
        self.store.subscribe(self._on_event)
        self._dirty.set()
        self._thread.start()
        return self

    def close(self) -> None:
        self._closing.set()
        self._dirty.set()
        self.store.unsubscribe(self._on_event)
        self._thread.join(2)
        for lst in self._listeners.values():
            lst.close()
        self._listeners.clear()

    def _on_event(self, ev: WatchEvent) -> None:
        if ev.rt in (SERVICES, SLICES):
            self._dirty.set()

    def _loop(self) -> None:
        while True:
            self._dirty.wait()
            if self._closing.is_set():
                return
            self._dirty.clear()
            try:
                self.sync()
            except Exception:  # noqa: BLE001 - keep proxying with the previous table
                log.exception("kube-proxy sync failed")

    def sync(self) -> None:
        """Recompute listeners and endpoints from the store."""
        services, _ = self.store.list_raw(SERVICES, None)
        slices, _ = self.store.list_raw(SLICES, None)
        wanted: dict[tuple[str, int], Key] = {}
        for svc in services:
            spec = svc.get("spec") or {}
            ip = spec.get("clusterIP")
            if not ip or ip == "None":
                continue
            for p in spec.get("ports") or []:
                if p.get("protocol", "TCP") == "TCP" and p.get("port"):
                    wanted[(ip, int(p["port"]))] = (svc["metadata"]["namespace"], svc["metadata"]["name"], p.get("name") or "")
        endpoints: dict[Key, list[tuple[str, int]]] = {}
        for sl in slices:
            md = sl["metadata"]
            svc_name = (md.get("labels") or {}).get("kubernetes.io/service-name")
            if not svc_name:
                continue
            for port in sl.get("ports") or []:
                key = (md["namespace"], svc_name, port.get("name") or "")
                for ep in sl.get("endpoints") or []:
                    if (ep.get("conditions") or {}).get("ready", True):
                        endpoints.setdefault(key, []).extend((a, int(port["port"])) for a in ep.get("addresses") or [])
        with self._lock:
            self._endpoints = {k: sorted(v) for k, v in endpoints.items()}
        for addr in list(self._listeners):
            if wanted.get(addr) != self._listeners[addr].key:
                self._listeners.pop(addr).close()
        for addr, key in wanted.items():
            if addr in self._listeners or self._closing.is_set():
                continue
            try:
                self._listeners[addr] = _Listener(self, addr[0], addr[1], key)
            except OSError as exc:
                if addr not in self._skipped:
                    self._skipped.add(addr)
                    log.warning("kube-proxy: cannot listen on %s:%d for service %s/%s: %s", addr[0], addr[1],
                                key[0], key[1], exc.strerror or exc)

    def endpoints(self, key: Key) -> list[tuple[str, int]]:
        with self._lock:
            return list(self._endpoints.get(key, ()))

    def forward(self, conn: socket.socket, key: Key) -> None:
        """Connect ``conn`` to the next ready endpoint of ``key`` and copy bytes both ways."""
        eps = self.endpoints(key)
        upstream = None
        with self._lock:
            counter = self._rr.setdefault(key, itertools.count())
        for _ in range(len(eps)):
            ip, port = eps[next(counter) % len(eps)]
            try:
                upstream = socket.create_connection((ip, port), timeout=2)
                break
            except OSError:
                continue
        if upstream is None:
            conn.close()
            return
        upstream.settimeout(None)
        conn.settimeout(None)
        t = threading.Thread(target=_pump, args=(upstream, conn), daemon=True)
        t.start()
        _pump(conn, upstream)
        t.join()
        conn.close()
        upstream.close()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


__all__ = ["KubeProxy"]
