"""The local "kubelet": runs the pods of Deployments as local processes, each on its own pod IP.

It is the API server's :class:`~trafficmgr.apiserver.PodRuntime`: the ReplicaSet controller calls
:meth:`LocalKubelet.start` for each pod it creates and :meth:`LocalKubelet.stop` after one is deleted.

- **Pod IP**: the next free address of ``pod_cidr`` (default 127.1.0.0/16: every 127.0.0.0/8 address
  binds without setup), so every pod can listen on its container ports (9080) like in a cluster.
- **Containers**: a container of the ``trafficmgr`` image runs its ``args`` as a ``trafficmgr`` command
  line (the image's entrypoint), through :mod:`trafficmgr.cli.container`, which makes binds to
  ``0.0.0.0`` bind the pod IP; a container with ``command`` runs ``command + args`` as is. Other images
  cannot run locally: the pod stays Pending with a reason.
- **Environment**: the container's ``env`` (``value`` and the usual ``fieldRef`` paths), ``POD_NAME``,
  ``POD_NAMESPACE``, ``POD_IP``, ``HOSTNAME``, ``<SERVICE>_SERVICE_HOST``/``_PORT`` for the Services of
  the pod's namespace that exist when it starts (as Kubernetes does; apps resolve service names with
  them and the ClusterIPs are served by :mod:`trafficmgr.local.kubeproxy`), and
  ``HTTP_PROXY=http://<pod IP>:15001``: the explicit proxy port of the pod's sidecar, which exists only
  while the pod is Envoy-enabled (apps that find it closed call directly).
- **Status**: Running with its IP at once; Ready when every process runs and every declared TCP
  container port accepts connections. A process that exits is restarted with backoff (restartCount).
  A condition's ``lastTransitionTime`` changes only when its status does; ``startTime`` is the pod's.
- **Events** as a kubelet records them: ``Started``, ``BackOff`` (an exit, with its code), ``Killing``,
  ``Failed`` (a container that cannot run here, e.g. ``ImageNotLocal``).
- **Logs**: each container's output goes to ``<state dir>/pods/<ns>_<pod>/<container>.log`` (appended
  across restarts); :meth:`LocalKubelet.log_file` names it for the API server's ``pods/log``
  (``kubectl logs``).

Processes run in their own sessions and are recorded under ``<state dir>/pods`` (pid files), so a
demo that was killed hard can remove them on its next start (:func:`kill_leftovers`).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import attrs

from trafficmgr.apiserver.discovery import BY_KEY
from trafficmgr.apiserver.errors import ApiError
from trafficmgr.apiserver.store import Store, now_iso
from trafficmgr.local import processes

log = logging.getLogger(__name__)

PODS, SERVICES, EVENTS = BY_KEY["pods"], BY_KEY["services"], BY_KEY["events"]
NODE_NAME = "local"
PROXY_PORT = 15001
#: Where the trafficmgr image's containers come from: any registry/tag of an image named ``trafficmgr``.
_IMAGE_RE = re.compile(r"^(?:.*/)?trafficmgr(?::[\w.-]+)?(?:@sha256:[0-9a-f]+)?$")
_MAX_BACKOFF_S = 10.0


def is_trafficmgr_image(image: str) -> bool:
    """True for ``trafficmgr``, ``trafficmgr:0.1.0``, ``registry.example/x/trafficmgr:tag``."""
    return bool(_IMAGE_RE.match(image or ""))


def service_env(services: list[dict[str, Any]]) -> dict[str, str]:
    """``<NAME>_SERVICE_HOST`` / ``<NAME>_SERVICE_PORT`` (first port) for ClusterIP Services, as
    Kubernetes sets them (name upper-cased, ``-`` -> ``_``)."""
    env: dict[str, str] = {}
    for svc in services:
        spec = svc.get("spec") or {}
        ip = spec.get("clusterIP")
        ports = spec.get("ports") or []
        if not ip or ip == "None" or not ports:
            continue
        name = svc["metadata"]["name"].upper().replace("-", "_")
        env[f"{name}_SERVICE_HOST"] = ip
        env[f"{name}_SERVICE_PORT"] = str(ports[0].get("port"))
    return env


@attrs.define(eq=False)
class _Container:
    name: str
    argv: list[str]
    env: dict[str, str]
    ports: list[int]
    log_path: str
    pid_path: str
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: str = ""


@attrs.define(eq=False)
class _Pod:
    namespace: str
    name: str
    uid: str
    ip: str
    directory: str
    containers: list[_Container]
    ready: bool = False
    gone: bool = False
    reported: tuple[bool, int] = (False, 0)
    started: str = attrs.field(factory=now_iso)
    transitions: dict[str, tuple[str, str]] = attrs.field(factory=dict)  # condition -> (status, since)


class LocalKubelet:
    """Runs controller-created pods as processes (see the module docstring). Thread-safe."""

    def __init__(self, store: Store, state_dir: str, pod_cidr: str = "127.1.0.0/16", node_name: str = NODE_NAME,
                 reserved: tuple[str, ...] = (), python: str = sys.executable) -> None:
        self.store = store
        self.state_dir = os.path.abspath(state_dir)
        self.pods_dir = os.path.join(self.state_dir, "pods")
        self.net = ipaddress.IPv4Network(pod_cidr)
        self.node_name = node_name
        self.python = python
        self._reserved = set(reserved)
        self._pods: dict[str, _Pod] = {}  # by uid
        self._events: dict[tuple[str, str, str, str], str] = {}  # (pod uid, container, reason, message) -> Event
        self._next = 2
        self._lock = threading.RLock()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._monitor, name="kubelet", daemon=True)

    # -- lifecycle ----------------------------------------------------------------------------

    def attach(self) -> LocalKubelet:
        """Schedule every new pod on this node (an admission hook: ``spec.nodeName``) and start monitoring."""
        self.store.add_admission(self._schedule)
        self._thread.start()
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Stop every pod process (SIGTERM, then SIGKILL after ``timeout``)."""
        self._closing.set()
        with self._lock:
            pods = list(self._pods.values())
            self._pods.clear()
        procs = [c.proc for p in pods for c in p.containers if c.proc is not None]
        processes.terminate_all(procs, timeout)
        for p in pods:
            for c in p.containers:
                _remove(c.pid_path)
        self._thread.join(2)

    def _schedule(self, rt: Any, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        if rt is PODS and old is None:
            spec = obj.setdefault("spec", {})
            spec.setdefault("nodeName", self.node_name)

    # -- PodRuntime ---------------------------------------------------------------------------

    def start(self, pod: dict[str, Any]) -> dict[str, Any] | None:
        """Start the pod's containers on a new pod IP; returns its (not yet Ready) status."""
        if self._closing.is_set():
            return None
        md, spec = pod["metadata"], pod.get("spec") or {}
        ns, name, uid = md.get("namespace", "default"), md["name"], md["uid"]
        containers = spec.get("containers") or []
        for c in containers:
            if not c.get("command") and not is_trafficmgr_image(c.get("image", "")):
                why = (f"image {c.get('image')!r} cannot run in local mode: only containers of the trafficmgr image "
                       "(args = a trafficmgr command line) or with an explicit command run as local processes")
                log.warning("pod %s/%s: %s", ns, name, why)
                self._event(ns, name, uid, "Failed", f"Error: ImageNotLocal: {why}", c.get("name") or "main", "Warning")
                return {"phase": "Pending", "conditions": [
                    {"type": "PodScheduled", "status": "True", "lastTransitionTime": now_iso()},
                    {"type": "Ready", "status": "False", "reason": "ImageNotLocal", "message": why,
                     "lastTransitionTime": now_iso()}]}
        with self._lock:
            ip = self._allocate()
            directory = os.path.join(self.pods_dir, f"{ns}_{name}")
            os.makedirs(directory, exist_ok=True)
            services, _ = self.store.list_raw(SERVICES, ns)
            record = _Pod(ns, name, uid, ip, directory, [])
            for c in containers:
                cname = c.get("name") or "main"
                record.containers.append(_Container(
                    cname, self._argv(c, ip, directory), self._env(pod, c, ip, services),
                    [int(p["containerPort"]) for p in c.get("ports") or [] if p.get("containerPort")
                     and p.get("protocol", "TCP") == "TCP"],
                    os.path.join(directory, f"{cname}.log"), os.path.join(directory, f"{cname}.pid"),
                ))
            self._pods[uid] = record
            for c in record.containers:
                self._spawn(record, c)
        for c in record.containers:
            self._started_event(record, c)
        log.info("pod %s/%s started on %s", ns, name, ip)
        return self._status(record)

    def log_file(self, pod: dict[str, Any], container: str) -> str | None:
        """The file this kubelet writes ``container``'s output to, for a pod it runs (looked up by the
        pod's uid in its own records, never built from the request); None for any other pod. The file
        may not exist yet. Serves the pod ``log`` subresource (:mod:`trafficmgr.apiserver.podlogs`)."""
        with self._lock:
            record = self._pods.get(pod["metadata"].get("uid", ""))
            if record is None:
                return None
            return next((c.log_path for c in record.containers if c.name == container), None)

    def stop(self, pod: dict[str, Any]) -> None:
        """Stop the processes of a deleted pod (in the background: the controller does not wait)."""
        with self._lock:
            record = self._pods.pop(pod["metadata"]["uid"], None)
            for key in [k for k in self._events if k[0] == pod["metadata"]["uid"]]:
                del self._events[key]
        if record is None:
            return
        record.gone = True

        def reap() -> None:
            processes.terminate_all([c.proc for c in record.containers if c.proc is not None], 5.0)
            for c in record.containers:
                _remove(c.pid_path)
                self._event(record.namespace, record.name, record.uid, "Killing", f"Stopping container {c.name}", c.name)
            log.info("pod %s/%s stopped", record.namespace, record.name)

        threading.Thread(target=reap, name=f"stop-{record.name}", daemon=True).start()

    # -- internals ----------------------------------------------------------------------------

    def _allocate(self) -> str:
        used = {p.ip for p in self._pods.values()} | self._reserved
        size = self.net.num_addresses
        for _ in range(size):
            n, self._next = self._next, self._next + 1
            if self._next >= size - 1:
                self._next = 2
            ip = str(self.net.network_address + n)
            if ip not in used:
                return ip
        raise ApiError(500, "InternalError", f"no free pod IP left in {self.net}")

    def _argv(self, container: dict[str, Any], ip: str, directory: str) -> list[str]:
        args = [str(a) for a in container.get("args") or []]
        if container.get("command"):
            return [str(a) for a in container["command"]] + args
        return [self.python, "-m", "trafficmgr.cli.container", "--ip", ip, "--dir", directory, "--", *args]

    def _env(self, pod: dict[str, Any], container: dict[str, Any], ip: str, services: list[dict[str, Any]]) -> dict[str, str]:
        md = pod["metadata"]
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and k != "KUBECONFIG"}
        env.update(service_env(services))
        fields = {"metadata.name": md["name"], "metadata.namespace": md.get("namespace", "default"),
                  "status.podIP": ip, "status.hostIP": "127.0.0.1", "spec.nodeName": self.node_name,
                  "metadata.uid": md["uid"]}
        proxy = f"http://{ip}:{PROXY_PORT}"
        env.update({"POD_NAME": md["name"], "POD_NAMESPACE": fields["metadata.namespace"], "POD_IP": ip,
                    "HOSTNAME": md["name"], "NODE_NAME": self.node_name, "PYTHONUNBUFFERED": "1",
                    "HTTP_PROXY": proxy, "http_proxy": proxy})
        for item in container.get("env") or []:
            if "value" in item:
                env[item["name"]] = str(item["value"])
            else:
                path = (((item.get("valueFrom") or {}).get("fieldRef")) or {}).get("fieldPath", "")
                if path in fields:
                    env[item["name"]] = fields[path]
        return env

    def _spawn(self, pod: _Pod, c: _Container) -> None:
        with open(c.log_path, "ab") as logf:
            try:
                c.proc = subprocess.Popen(c.argv, env=c.env, cwd=pod.directory, stdin=subprocess.DEVNULL,
                                          stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as exc:
                c.proc = None
                logf.write(f"cannot start {c.argv[0]}: {exc}\n".encode())
                c.next_start = time.monotonic() + _MAX_BACKOFF_S
                return
        c.started_at = now_iso()
        processes.write_pid(c.pid_path, c.proc.pid)

    def _started_event(self, pod: _Pod, c: _Container) -> None:
        if c.proc is not None:
            self._event(pod.namespace, pod.name, pod.uid, "Started", f"Started container {c.name}", c.name)
        else:
            self._event(pod.namespace, pod.name, pod.uid, "Failed", f"Error: cannot start container {c.name} "
                        f"(see {c.log_path})", c.name, "Warning")

    def _event(self, ns: str, name: str, uid: str, reason: str, message: str, container: str,
               type_: str = "Normal") -> None:
        """Record a core/v1 Event about a pod's container, as the kubelet does (``kubectl describe pod``,
        ``kubectl get events``). A repeat (same pod, container, reason and message: a crash loop) counts up
        the first one's ``count`` and ``lastTimestamp``, so a pod has a bounded number of Events."""
        now = now_iso()
        key = (uid, container, reason, message)
        with self._lock:
            known = self._events.get(key)
        if known is not None:
            try:
                cur = self.store.get_raw(EVENTS, known, ns)
                self.store.patch(EVENTS, known, {"count": int(cur.get("count") or 1) + 1, "lastTimestamp": now},
                                 namespace=ns)
                return
            except ApiError:
                pass  # deleted meanwhile: record it anew
        event_name = f"{name}.{os.urandom(8).hex()}"
        try:
            self.store.create({
                "apiVersion": "v1", "kind": "Event",
                "metadata": {"name": event_name, "namespace": ns},
                "involvedObject": {"apiVersion": "v1", "kind": "Pod", "name": name, "namespace": ns, "uid": uid,
                                   "fieldPath": f"spec.containers{{{container}}}"},
                "reason": reason, "message": message, "type": type_, "count": 1,
                "firstTimestamp": now, "lastTimestamp": now,
                "source": {"component": "kubelet", "host": self.node_name},
                "reportingComponent": "kubelet", "reportingInstance": self.node_name,
            }, namespace=ns, resource=EVENTS)
        except ApiError as exc:  # e.g. the namespace is being deleted
            log.debug("event %s for pod %s/%s: %s", reason, ns, name, exc)
            return
        with self._lock:
            if uid in self._pods:  # a stopped pod's (Killing) are not repeated
                self._events[key] = event_name

    def _monitor(self) -> None:
        while not self._closing.wait(0.2):
            with self._lock:
                pods = list(self._pods.values())
            for pod in pods:
                try:
                    self._check(pod)
                except Exception:  # noqa: BLE001 - the monitor must survive anything
                    log.exception("pod %s/%s: check failed", pod.namespace, pod.name)

    def _check(self, pod: _Pod) -> None:
        now = time.monotonic()
        running = True
        for c in pod.containers:
            if c.proc is not None and c.proc.poll() is not None:
                code = c.proc.returncode
                c.proc = None
                c.restarts += 1
                delay = min(_MAX_BACKOFF_S, 0.5 * 2 ** (c.restarts - 1))
                c.next_start = now + delay
                log.warning("pod %s/%s container %s exited with %s; restarting in %.1fs (log: %s)",
                            pod.namespace, pod.name, c.name, code, delay, c.log_path)
                self._event(pod.namespace, pod.name, pod.uid, "BackOff", f"Back-off restarting failed container "
                            f"{c.name} in pod {pod.name}_{pod.namespace}({pod.uid}) (exit code {code})", c.name, "Warning")
            if c.proc is None:
                running = False
                if now >= c.next_start and not self._closing.is_set() and not pod.gone:
                    with self._lock:
                        spawned = not pod.gone
                        if spawned:
                            self._spawn(pod, c)
                    if spawned:
                        self._started_event(pod, c)
        ready = running and all(_port_open(pod.ip, port) for c in pod.containers for port in c.ports)
        state = (ready, sum(c.restarts for c in pod.containers))
        if state != pod.reported and not pod.gone:
            pod.reported, pod.ready = state, ready
            try:
                self.store.patch(PODS, pod.name, {"status": self._status(pod)}, namespace=pod.namespace,
                                 subresource="status")
            except ApiError:
                pass  # deleted meanwhile: stop() follows

    def _condition(self, pod: _Pod, type_: str, ok: bool) -> dict[str, Any]:
        """A pod condition whose ``lastTransitionTime`` changes only when its status does."""
        flag = "True" if ok else "False"
        prev = pod.transitions.get(type_)
        if prev is None or prev[0] != flag:
            prev = pod.transitions[type_] = (flag, now_iso())
        cond = {"type": type_, "status": flag, "lastTransitionTime": prev[1]}
        if not ok and type_ in ("Ready", "ContainersReady"):
            cond["reason"] = "ContainersNotReady"
            waiting = [c.name for c in pod.containers if c.proc is None or not pod.ready]
            cond["message"] = f"containers with unready status: [{' '.join(waiting)}]"
        return cond

    def _status(self, pod: _Pod) -> dict[str, Any]:
        return {
            "phase": "Running", "podIP": pod.ip, "podIPs": [{"ip": pod.ip}], "hostIP": "127.0.0.1",
            "startTime": pod.started,
            "conditions": [self._condition(pod, "PodScheduled", True), self._condition(pod, "Initialized", True),
                           self._condition(pod, "ContainersReady", pod.ready), self._condition(pod, "Ready", pod.ready)],
            "containerStatuses": [{
                "name": c.name, "image": "", "ready": pod.ready, "started": c.proc is not None,
                "restartCount": c.restarts,
                "state": {"running": {"startedAt": c.started_at}} if c.proc is not None
                else {"waiting": {"reason": "CrashLoopBackOff"}},
            } for c in pod.containers],
        }


def _port_open(ip: str, port: int) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=0.2):
            return True
    except OSError:
        return False


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


__all__ = ["LocalKubelet", "NODE_NAME", "is_trafficmgr_image", "service_env"]
