"""The plugin author kit: build the Envoy resources a set of manifests produces with a given plugin set,
and run a real Envoy sidecar against them on loopback (no root, no network namespace).

The pytest fixtures in :mod:`trafficmgr.testing.pytest_plugin` (``trafficmgr_build``,
``trafficmgr_envoy``, ``trafficmgr_gateway``) wrap :func:`build` and :class:`SidecarMesh`; both also
work without pytest.

How the sidecar runs without iptables: every Service gets a loopback ClusterIP (``127.x.y.z``, chosen
when the manifest has none) and every Pod a loopback pod IP served by an :class:`HttpBackend`. The
builder's sidecar listener ``outbound`` matches filter chains on the original destination; the kit serves
one copy of it (named ``outbound@<ip>:<port>``, identical filter chains) bound on each Service's
``clusterIP:port``, so a request to ``http://<clusterIP>:<port>/`` takes exactly the chain, routes and
filters a redirected application request would take.
"""

from __future__ import annotations

import argparse
import copy
import http.client
import json
import os
import random
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs
import yaml
from google.protobuf import json_format
from google.protobuf.message import Message

from trafficmgr import hookimpl
from trafficmgr.core import cache
from trafficmgr.core import labels as L
from trafficmgr.core.plugins import PluginHost

T = TypeVar("T")

SIDECAR, GATEWAY = "sidecar", "gateway"
_SHORT = {cache.CLUSTER: "clusters", cache.ENDPOINT: "endpoints", cache.LISTENER: "listeners",
          cache.ROUTE: "routes", cache.SECRET: "secrets"}


# -- inputs ----------------------------------------------------------------------------------------


def load_manifests(manifests: str | Path | Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Manifests as a list of dicts (deep copies) from YAML text, a YAML file, or dicts."""
    if isinstance(manifests, Path):
        manifests = manifests.read_text()
    if isinstance(manifests, str):
        return [d for d in yaml.safe_load_all(manifests) if d]
    return [copy.deepcopy(dict(d)) for d in manifests]


def load_plugins(plugins: PluginHost | Sequence[str | object] | None) -> PluginHost:
    """A PluginHost: ``None`` loads every installed plugin; names select entry points; other items are
    plugin objects registered as extras (to test a plugin before it is installed)."""
    if isinstance(plugins, PluginHost):
        return plugins
    if plugins is None:
        return PluginHost.load()
    if isinstance(plugins, str):
        raise TypeError("plugins must be a list of names or plugin objects, e.g. ['lb'], not a string")
    names = [p for p in plugins if isinstance(p, str)]
    extra = [(getattr(p, "__name__", type(p).__name__).rsplit(".", 1)[-1], p) for p in plugins if not isinstance(p, str)]
    return PluginHost.load(names, extra=extra)


def make_options(host: PluginHost, options: argparse.Namespace | Mapping[str, Any] | None = None) -> argparse.Namespace:
    """What ``trafficmgr serve`` would pass as ``ctx.options``: the defaults of every option the loaded
    plugins add (``trafficmgr_add_arguments``), the builder's defaults, then ``options`` on top."""
    from trafficmgr.core.translate.builder import default_options

    parser = argparse.ArgumentParser(add_help=False)
    host.call_all("trafficmgr_add_arguments", parser=parser, command="serve")
    try:
        ns = parser.parse_args([])
    except SystemExit as exc:  # a plugin declared a required option
        raise ValueError(f"a plugin option is required; pass it in options= ({exc})") from None
    for key, value in vars(default_options()).items():
        setattr(ns, key, value)
    given = vars(options) if isinstance(options, argparse.Namespace) else dict(options or {})
    for key, value in given.items():
        setattr(ns, key.replace("-", "_"), value)
    return ns


# -- build results ---------------------------------------------------------------------------------


def to_dict(message: Message) -> dict[str, Any]:
    """A message as a plain dict with proto field names (``typed_config`` Anys carry ``@type``)."""
    from trafficmgr.testing.golden import to_plain

    return to_plain(json_format.MessageToDict(message, preserving_proto_field_name=True))


class View:
    """The resources of one view (``sidecar`` or ``gateway``), by type and name, as plain dicts.

    ``view.clusters["9080|default|reviews.outbound"]["lb_policy"] == "RING_HASH"``; the parsed messages
    are in ``view.messages(type)``.
    """

    def __init__(self, name: str, snapshot: cache.Snapshot) -> None:
        self.name = name
        self.snapshot = snapshot
        self._dicts: dict[str, dict[str, dict[str, Any]]] = {}

    def messages(self, type_name: str) -> dict[str, Message]:
        """Parsed messages of ``type_name`` (``clusters``, ``endpoints``, ``listeners``, ``routes``,
        ``secrets``) by resource name."""
        type_url = {v: k for k, v in _SHORT.items()}[type_name]
        return {n: r.message() for n, r in self.snapshot.types[type_url].resources.items()}

    def _of(self, type_name: str) -> dict[str, dict[str, Any]]:
        if type_name not in self._dicts:
            self._dicts[type_name] = {n: to_dict(m) for n, m in self.messages(type_name).items()}
        return self._dicts[type_name]

    @property
    def clusters(self) -> dict[str, dict[str, Any]]:
        return self._of("clusters")

    @property
    def endpoints(self) -> dict[str, dict[str, Any]]:
        """ClusterLoadAssignments by cluster name."""
        return self._of("endpoints")

    @property
    def listeners(self) -> dict[str, dict[str, Any]]:
        return self._of("listeners")

    @property
    def routes(self) -> dict[str, dict[str, Any]]:
        """RouteConfigurations by name (sidecar: ``outbound|<port>``)."""
        return self._of("routes")

    @property
    def secrets(self) -> dict[str, dict[str, Any]]:
        return self._of("secrets")

    def cluster(self, service: str, port: int, namespace: str = "default") -> dict[str, Any]:
        """The cluster of one service port (``KeyError`` listing the names when absent)."""
        name = f"{port}|{namespace}|{service}.outbound"
        if name not in self.clusters:
            raise KeyError(f"no cluster {name!r} in the {self.name} view; clusters: {sorted(self.clusters)}")
        return self.clusters[name]

    def virtual_host(self, service: str, port: int, namespace: str = "default") -> dict[str, Any]:
        """The virtual host routing to one service port (sidecar view: named ``<svc>.<ns>:<port>``)."""
        wanted = f"{service}.{namespace}:{port}"
        found = [vh for rc in self.routes.values() for vh in rc.get("virtual_hosts", []) if vh["name"] == wanted]
        if not found:
            names = sorted(vh["name"] for rc in self.routes.values() for vh in rc.get("virtual_hosts", []))
            raise KeyError(f"no virtual host {wanted!r} in the {self.name} view; virtual hosts: {names}")
        return found[0]

    def http_filters(self) -> list[list[str]]:
        """The HTTP filter names of every HTTP connection manager in this view's listeners, one list per
        connection manager (the sidecar's ``blocked`` chains and its ``inbound`` listener, which has
        only the router, left out)."""
        out: list[list[str]] = []
        for name, lst in self.listeners.items():
            if name == "inbound":
                continue
            for chain in lst.get("filter_chains", []):
                if chain.get("name", "").startswith("blocked"):
                    continue
                for f in chain.get("filters", []):
                    if f["name"] == "envoy.filters.network.http_connection_manager":
                        out.append([h["name"] for h in f["typed_config"].get("http_filters", [])])
        return out


@attrs.define
class BuildResult:
    """What a set of manifests produces: snapshots by view and the Warning Events the control plane
    would raise (as ``"<reason> <object>: <message>"`` strings, sorted)."""

    snapshots: dict[str, cache.Snapshot]
    warnings: list[str]
    plugins: PluginHost
    options: argparse.Namespace

    def view(self, name: str) -> View:
        return View(name, self.snapshots[name])

    @property
    def sidecar(self) -> View:
        return self.view(SIDECAR)

    @property
    def gateway(self) -> View:
        return self.view(GATEWAY)

    def render(self, views: Sequence[str] | None = None) -> str:
        """Deterministic YAML of the views (the golden-file format)."""
        from trafficmgr.testing.golden import render

        return render(self.snapshots, views)

    def errors(self) -> list[str]:
        """Consistency problems of every view (a dangling reference means a snapshot would not be served)."""
        return [f"{v}: {e}" for v, s in sorted(self.snapshots.items()) for e in s.errors()]


def build(
    manifests: str | Path | Iterable[Mapping[str, Any]],
    plugins: PluginHost | Sequence[str | object] | None = None,
    options: argparse.Namespace | Mapping[str, Any] | None = None,
) -> BuildResult:
    """Build every view for ``manifests`` through the same path as a cluster (API server store with its
    EndpointSlice controller, the Kubernetes assembler, the builder and the plugins' hooks).

    A Pod without ``status.podIP`` is taken as started: Running, Ready, pod IP ``10.244.0.100`` and up
    in manifest order. Services without a clusterIP get one from the API server (10.96.0.1 and up)."""
    from trafficmgr.testing.golden import build_from_manifests

    host = load_plugins(plugins)
    opts = make_options(host, options)
    objects = load_manifests(manifests)
    pods = [o for o in objects if o.get("kind") == "Pod" and not (o.get("status") or {}).get("podIP")]
    for i, pod in enumerate(pods):
        _set_running(pod, f"10.244.0.{100 + i}")
    snapshots, warnings = build_from_manifests(objects, host, opts)
    return BuildResult(snapshots, warnings, host, opts)


def _set_running(pod: dict[str, Any], ip: str) -> None:
    """What a kubelet does for a started pod: Running, Ready, a pod IP."""
    status = pod.setdefault("status", {})
    status.update({"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "192.0.2.1"})
    status.setdefault("conditions", [{"type": "Ready", "status": "True"}])


# -- a real Envoy sidecar on loopback ---------------------------------------------------------------


@attrs.frozen
class Response:
    """One HTTP response: ``status``, ``headers`` (lower-case names), ``body`` and ``elapsed`` seconds."""

    status: int
    headers: dict[str, str]
    body: bytes
    elapsed: float

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")

    def json(self) -> Any:
        return json.loads(self.body)


def _bindable(ip: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((ip, port))
        except OSError:
            return False
    return True


def _is_loopback(ip: str) -> bool:
    return ip.startswith("127.")


def _selects(selector: Mapping[str, str] | None, labels: Mapping[str, str] | None) -> bool:
    if not selector:
        return False
    return all((labels or {}).get(k) == v for k, v in selector.items())


class SidecarMesh:
    """A real Envoy sidecar serving what ``manifests`` produce with ``plugins``, on loopback.

    - ``get(service, path)`` / ``request(...)`` send HTTP to the service through the sidecar;
    - ``backends[pod name]`` is the :class:`HttpBackend` serving that pod (program statuses, delays);
      ``take_over(pod)`` stops it and returns its address, to serve the pod with another server;
    - ``apply(manifests)``, ``label(kind, name, {...})``, ``delete(kind, name)`` change the objects,
      rebuild and wait until Envoy has ACKed the new config (a NACK raises :class:`AssertionError`);
    - ``build`` is the latest :class:`BuildResult`; ``envoy`` the :class:`EnvoyProcess` (admin, stats).

    Services get a loopback ClusterIP and Pods a loopback pod IP (status Running, Ready) unless the
    manifest sets one (it must then be a 127.x address). Service ports below 1024 need root.
    """

    NODE_ID = "client-1.default"

    def __init__(
        self,
        manifests: str | Path | Iterable[Mapping[str, Any]] = (),
        plugins: PluginHost | Sequence[str | object] | None = None,
        options: argparse.Namespace | Mapping[str, Any] | None = None,
        delta: bool = False,
        workdir: Path | None = None,
    ) -> None:
        from trafficmgr.testing.envoy import ControlPlane

        self.plugins = load_plugins(plugins)
        self._rng = random.Random()
        self._block = self._pick_block()
        self.sidecar_port = self._free_port(self._ip(254))
        given = vars(options) if isinstance(options, argparse.Namespace) else dict(options or {})
        self.options = make_options(self.plugins, {**given, "sidecar_address": self._ip(254), "sidecar_port": self.sidecar_port})
        self.delta = delta
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="tm-kit-"))
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.backends: dict[str, Any] = {}
        self._served: dict[tuple[str, int], Any] = {}
        self._next_service, self._next_pod = 1, 100
        self.build: BuildResult | None = None
        self.cp = ControlPlane().start()
        self.cp.nodes[self.NODE_ID] = SIDECAR
        self.envoy: Any = None
        try:
            self.apply(manifests, wait=False)
            from trafficmgr.testing.envoy import EnvoyProcess

            self.envoy = EnvoyProcess(self.cp.bootstrap(self.NODE_ID, delta=delta), self.workdir / "envoy").start()
            self.wait_synced()
        except BaseException:
            self.close()
            raise

    # -- addresses -------------------------------------------------------------------------------

    def _pick_block(self) -> tuple[int, int]:
        # A random 127.b.c.0/24 per mesh, so parallel test runs on one machine do not collide.
        for _ in range(50):
            block = (self._rng.randint(64, 250), self._rng.randint(0, 255))
            if _bindable(f"127.{block[0]}.{block[1]}.254", 0):
                return block
        raise RuntimeError("no usable 127.x.y.0/24 block")

    def _ip(self, host: int) -> str:
        return f"127.{self._block[0]}.{self._block[1]}.{host}"

    @staticmethod
    def _free_port(ip: str) -> int:
        with socket.socket() as s:
            s.bind((ip, 0))
            return s.getsockname()[1]

    def _assign(self, obj: dict[str, Any]) -> None:
        kind, meta = obj.get("kind"), obj.setdefault("metadata", {})
        meta.setdefault("namespace", "default")
        if kind == "Service":
            spec = obj.setdefault("spec", {})
            if spec.get("type") == "ExternalName" or spec.get("clusterIP") == "None":
                return
            key = ("Service", meta["namespace"], meta["name"])
            old = (self.objects.get(key) or {}).get("spec", {}).get("clusterIP")
            if not spec.get("clusterIP"):
                if old:
                    spec["clusterIP"] = old
                else:
                    spec["clusterIP"] = self._ip(self._next_service)
                    self._next_service += 1
            if not _is_loopback(spec["clusterIP"]):
                raise ValueError(f"Service {meta['name']}: clusterIP {spec['clusterIP']} is not a loopback address; "
                                 "leave it out (the kit assigns one) or use a 127.x address")
            if os.geteuid() != 0:
                low = [p.get("port") for p in spec.get("ports") or [] if int(p.get("port", 0)) < 1024]
                if low:
                    raise ValueError(f"Service {meta['name']}: port {low[0]} needs root to bind; use ports >= 1024 in test manifests")
        elif kind == "Pod":
            status = obj.setdefault("status", {})
            key = ("Pod", meta["namespace"], meta["name"])
            if not status.get("podIP"):
                old = (self.objects.get(key) or {}).get("status", {}).get("podIP")
                if not old:
                    old = self._ip(self._next_pod)
                    self._next_pod += 1
                _set_running(obj, old)
            if not _is_loopback(status["podIP"]):
                raise ValueError(f"Pod {meta['name']}: podIP {status['podIP']} is not a loopback address; leave status out")

    def _serve_pods(self) -> None:
        """Start one HttpBackend (named after the pod) on every pod IP and port a Service targets."""
        from trafficmgr.testing.backends import HttpBackend

        services = [o for (k, _, _), o in self.objects.items() if k == "Service"]
        for (kind, ns, name), pod in sorted(self.objects.items()):
            if kind != "Pod":
                continue
            ip = pod["status"]["podIP"]
            named = {p.get("name"): p.get("containerPort") for c in (pod.get("spec") or {}).get("containers") or []
                     for p in c.get("ports") or [] if p.get("name")}
            ports: set[int] = set()
            for svc in services:
                spec = svc.get("spec") or {}
                if svc["metadata"]["namespace"] != ns or not _selects(spec.get("selector"), pod["metadata"].get("labels")):
                    continue
                for p in spec.get("ports") or []:
                    target = p.get("targetPort", p.get("port"))
                    target = named.get(target) if isinstance(target, str) else target
                    if isinstance(target, int):
                        ports.add(target)
            for port in sorted(ports):
                if (ip, port) not in self._served:
                    self._served[(ip, port)] = HttpBackend(name, ip, port).start()
                self.backends.setdefault(name, self._served[(ip, port)])

    # -- changes ---------------------------------------------------------------------------------

    def apply(self, manifests: str | Path | Iterable[Mapping[str, Any]], wait: bool = True) -> None:
        """Create or replace objects, rebuild, push; with ``wait`` block until Envoy ACKed it."""
        for obj in load_manifests(manifests):
            self._assign(obj)
            meta = obj["metadata"]
            self.objects[(obj["kind"], meta["namespace"], meta["name"])] = obj
        self._push(wait)

    def label(self, kind: str, name: str, labels: Mapping[str, str | None], namespace: str = "default",
              wait: bool = True) -> None:
        """Set (value) or remove (None) labels of one object, like ``kubectl label``."""
        obj = self._find(kind, name, namespace)
        current = obj["metadata"].setdefault("labels", {})
        for key, value in labels.items():
            if value is None:
                current.pop(key, None)
            else:
                current[key] = str(value)
        self._push(wait)

    def delete(self, kind: str, name: str, namespace: str = "default", wait: bool = True) -> None:
        obj = self._find(kind, name, namespace)
        del self.objects[(obj["kind"], namespace, name)]
        self._push(wait)

    def _find(self, kind: str, name: str, namespace: str) -> dict[str, Any]:
        for (k, ns, n), obj in self.objects.items():
            if k.lower() == kind.lower() and ns == namespace and n == name:
                return obj
        raise KeyError(f"no {kind} {namespace}/{name}; objects: {sorted(self.objects)}")

    def _push(self, wait: bool) -> None:
        from trafficmgr.testing.golden import build_from_manifests

        self._serve_pods()
        snapshots, warnings = build_from_manifests(copy.deepcopy(list(self.objects.values())), self.plugins, self.options)
        self.build = BuildResult(snapshots, warnings, self.plugins, self.options)
        self.cp.cache.set_view(SIDECAR, self._bound(snapshots[SIDECAR]))
        if wait and self.envoy is not None:
            self.wait_synced()

    def _service_addresses(self) -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        for (kind, _, _), obj in self.objects.items():
            spec = obj.get("spec") or {}
            if kind == "Service" and _is_loopback(spec.get("clusterIP") or ""):
                out.extend((spec["clusterIP"], int(p["port"])) for p in spec.get("ports") or [])
        return sorted(set(out))

    def _bound(self, snap: cache.Snapshot) -> cache.Snapshot:
        """The sidecar snapshot plus one copy of the ``outbound`` listener per Service address."""
        from trafficmgr.core.translate.sidecar_outbound import OUTBOUND_LISTENER

        listeners = dict(snap.types[cache.LISTENER].resources)
        outbound = listeners.get(OUTBOUND_LISTENER)
        if outbound is not None:
            for ip, port in self._service_addresses():
                lst: Any = outbound.message()  # an Envoy Listener (generated code without stubs)
                lst.name = f"{OUTBOUND_LISTENER}@{ip}:{port}"
                lst.address.socket_address.address = ip
                lst.address.socket_address.port_value = port
                listeners[lst.name] = cache.Resource.from_message(lst, lst.name, outbound.refs)
        types: dict[str, Any] = dict(snap.types)
        types[cache.LISTENER] = list(listeners.values())
        return cache.Snapshot.build(types)

    # -- observing -------------------------------------------------------------------------------

    def synced(self) -> bool:
        """True when Envoy ACKed the current snapshot; raises AssertionError on a NACK."""
        snap = self.cp.cache.get(SIDECAR)
        streams = self.cp.status()
        if snap is None or not streams:
            return False
        for st in streams:
            for type_url, short in _SHORT.items():
                s = st.get(short) or {}
                if s.get("last_nack"):
                    raise AssertionError(f"Envoy rejected the {short} config (NACK): {s['last_nack'].get('error')}")
                ts = snap.types[type_url]
                if ts.resources and s.get("acked") != ts.version:
                    return False
        return True

    def wait_synced(self, timeout: float = 10.0) -> None:
        """Wait until Envoy ACKed the current snapshot (AssertionError at once on a NACK)."""
        deadline = time.monotonic() + timeout
        while not self.synced():
            if self.envoy is not None:
                self.envoy._check_alive()  # noqa: SLF001 - fail fast with the log tail
            if time.monotonic() > deadline:
                raise TimeoutError(f"Envoy did not ACK the config within {timeout}s: {self.cp.status()}")
            time.sleep(0.02)

    def address(self, service: str, port: int | None = None, namespace: str = "default") -> tuple[str, int]:
        """``(clusterIP, port)`` of a service (its first port when ``port`` is None)."""
        spec = self._find("Service", service, namespace).get("spec") or {}
        ports = [int(p["port"]) for p in spec.get("ports") or []]
        if port is None:
            if not ports:
                raise KeyError(f"Service {service} has no ports")
            port = ports[0]
        return spec["clusterIP"], port

    def request(
        self,
        method: str,
        service: str,
        path: str = "/",
        port: int | None = None,
        namespace: str = "default",
        headers: Mapping[str, str] | None = None,
        body: bytes | str | None = None,
        timeout: float = 10.0,
    ) -> Response:
        """Send one request to ``service`` through the sidecar (``Host: <service>[.<ns>]:<port>``, as an
        application calling ``http://<service>:<port>/`` would)."""
        ip, port = self.address(service, port, namespace)
        hdrs = {"Host": f"{service}:{port}" if namespace == "default" else f"{service}.{namespace}:{port}"}
        hdrs.update(headers or {})
        conn = http.client.HTTPConnection(ip, port, timeout=timeout)
        start = time.monotonic()
        try:
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            data = resp.read()
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data, time.monotonic() - start)
        finally:
            conn.close()

    def take_over(self, pod: str) -> tuple[str, int]:
        """Stop the HttpBackend serving ``pod`` and return its ``(host, port)``, for a test that serves the
        pod with its own server (gRPC, WebSocket, event streams)."""
        backend = self.backends[pod]
        backend.stop()
        return backend.host, backend.port

    def get(self, service: str, path: str = "/", **kw: Any) -> Response:
        """``request("GET", service, path, ...)``."""
        return self.request("GET", service, path, **kw)

    def wait_for(self, predicate: Callable[[], T | None], timeout: float = 10.0, message: str = "") -> T:
        """Poll ``predicate`` until truthy (fails fast with Envoy's log if it died)."""
        return self.envoy.wait_for(predicate, timeout, message=message)

    def stats(self) -> dict[str, int]:
        """Envoy's counters and gauges."""
        return self.envoy.stats()

    def close(self) -> None:
        if self.envoy is not None:
            self.envoy.stop()
        for backend in self._served.values():
            backend.stop()
        self.cp.stop()

    def __enter__(self) -> SidecarMesh:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NackingPlugin:
    """Test-only plugin object: a Service labeled ``<label>=true`` gets a cluster Envoy rejects (an EDS
    cluster with ``CLUSTER_PROVIDED``), to test what happens around a NACK. Pass it to ``plugins=``."""

    def __init__(self, label: str = "traffic.test.break") -> None:
        self.label = label

    @hookimpl
    def trafficmgr_labels(self) -> list[Any]:
        return [L.LabelSpec(self.label, frozenset({L.SERVICE}), L.boolean(), False, "test only: break the cluster")]

    @hookimpl
    def trafficmgr_cluster(self, cluster: Any, service: Any, port: Any, ctx: Any) -> None:
        if service.labels.value(self.label):
            cluster.lb_policy = cluster.CLUSTER_PROVIDED


__all__ = ["BuildResult", "NackingPlugin", "Response", "SidecarMesh", "View", "build", "load_manifests",
           "load_plugins", "make_options", "to_dict"]
