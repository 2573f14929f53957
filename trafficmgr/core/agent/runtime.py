"""The sidecar runtime interface: how the node agent starts, finds and removes Envoy sidecars.

A runtime knows three things: where a pod's network namespace is (:meth:`Runtime.pod_network`), how to
run one Envoy inside it as the proxy uid (:meth:`Runtime.start`), and which sidecars it runs now
(:meth:`Runtime.list`, found again after an agent restart by their labels or state files). Every method
is idempotent. Implementations: ``docker`` (:mod:`.docker_runtime`), ``netns`` and ``local``
(:mod:`.netns_runtime`).
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable
from typing import Any

import attrs

#: Labels every sidecar carries (Docker labels; the state file of process runtimes holds the same keys).
LABEL_PROXY = "traffic.envoy.proxy"
LABEL_POD = "traffic.envoy.pod"
LABEL_NAMESPACE = "traffic.envoy.namespace"
LABEL_POD_UID = "traffic.envoy.pod-uid"

#: Envoy's path inside the sidecar image (where the official ``envoyproxy/envoy`` image has it).
IMAGE_ENVOY_PATH = "/usr/local/bin/envoy"


#: Envoy's options for every sidecar (besides the bootstrap): no hot restart, so sidecars of one node have
#: no shared memory or abstract sockets to clash over.
ENVOY_ARGS = ("--disable-hot-restart", "--concurrency", "2", "--log-level", "info")


class SidecarError(Exception):
    """A step failed for one pod; the agent retries it with backoff and reports it as a Warning Event."""


class RuntimeUnavailable(SidecarError):
    """The runtime itself cannot be reached (Docker daemon down): nothing can be done for any pod."""


class NetworkNotReady(SidecarError):
    """The pod's network namespace does not exist (yet): the agent waits and retries without an Event."""


class AmbiguousNetwork(SidecarError):
    """More than one network namespace (or sandbox) could be the pod's: the agent does not guess; it
    reports a ``SidecarFailed`` Event and retries with backoff (an old sandbox may still be torn down)."""


def netns_identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of a network namespace file (``/var/run/netns/x``, ``/proc/<pid>/ns/net``): equal
    for two paths of one namespace. None when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def host_netns_identities(proc_root: str = "/proc") -> set[tuple[int, int]]:
    """The namespaces no sidecar may ever be put in: the agent's own and pid 1's under ``proc_root``
    (the node's root namespace where the agent sees the host's pids, ``hostPID: true``). Capture rules
    there would redirect the node's (or the agent's) traffic. Unreadable ones are left out."""
    out = set()
    for path in ("/proc/self/ns/net", f"{proc_root}/1/ns/net"):
        ident = netns_identity(path)
        if ident is not None:
            out.add(ident)
    return out


def refuse_host_netns(path: str | None, pod: PodRef, proc_root: str = "/proc") -> None:
    """Raise :class:`SidecarError` when ``path`` is a namespace of :func:`host_netns_identities` (or None,
    which would mean "the caller's own namespace" to nsenter and iptables): the last guard before a
    runtime starts Envoy or returns a namespace the agent installs capture rules in."""
    if path is None or netns_identity(path) in host_netns_identities(proc_root):
        raise SidecarError(
            f"the network namespace {path or '(none)'} found for pod {pod.namespace}/{pod.name} is the node's "
            f"(or the agent's) own: no sidecar there, its capture rules would redirect the node's traffic "
            f"(a hostNetwork pod?)")


@attrs.frozen
class PodRef:
    """The pod a sidecar belongs to."""

    name: str
    namespace: str
    uid: str
    ip: str

    @property
    def node_id(self) -> str:
        """The Envoy node id the control plane resolves: ``<pod>.<namespace>``."""
        return f"{self.name}.{self.namespace}"


@attrs.frozen
class PodNetwork:
    """Where a pod's network lives: ``netns`` is a namespace path usable with ``nsenter --net=`` (None:
    the host's own network, local mode); ``handle`` is runtime-specific (Docker: the pause container id)."""

    netns: str | None
    handle: str = ""


@attrs.frozen
class SidecarSpec:
    """What to start: Envoy with ``config`` (a bootstrap dict) for ``pod``, as ``proxy_uid``.
    ``xds_socket``: a Unix socket path the sidecar must be able to reach (None for TCP xDS).
    ``prepare``: called with the sidecar's working directory on the node (see :meth:`Runtime.workdir`)
    after it is made and before Envoy starts (the agent writes the workload identity there); an exception
    fails the start, leaving nothing behind."""

    pod: PodRef
    config: dict[str, Any] = attrs.field(eq=False)
    proxy_uid: int = 1337
    xds_socket: str | None = None
    prepare: Callable[[str], None] | None = attrs.field(default=None, eq=False)


@attrs.frozen
class Sidecar:
    """One running (or dead) sidecar as the runtime sees it. ``status`` is human text ("Up 3 seconds"),
    ``state`` a word (``running``, ``exited``, ``created``, ...)."""

    id: str
    pod: str
    namespace: str
    pod_uid: str
    status: str
    state: str

    @property
    def running(self) -> bool:
        return self.state == "running"

    def row(self) -> dict[str, str]:
        """The ``trafficmgr proxies --json`` object."""
        return {"id": self.id, "pod": self.pod, "namespace": self.namespace, "pod_uid": self.pod_uid,
                "status": self.status, "state": self.state}


class Runtime(abc.ABC):
    """One way to run sidecars. Methods raise :class:`SidecarError` (or a subclass) for failures."""

    name: str = ""
    #: False when traffic cannot be captured with iptables (local mode: no root, explicit proxy port).
    captures_traffic: bool = True

    @abc.abstractmethod
    def list(self) -> list[Sidecar]:
        """Every sidecar this runtime runs on the node (running or not)."""

    @abc.abstractmethod
    def pod_network(self, pod: PodRef) -> PodNetwork:
        """The network of ``pod``; raises :class:`NetworkNotReady` when it is not there (yet)."""

    @abc.abstractmethod
    def start(self, spec: SidecarSpec, network: PodNetwork) -> Sidecar:
        """Start a sidecar for ``spec.pod`` in ``network`` and return it; returns the running one if there
        is already one for this pod uid. A failed start leaves nothing behind."""

    @abc.abstractmethod
    def remove(self, sidecar: Sidecar) -> None:
        """Stop and remove ``sidecar``; a sidecar already gone is not an error."""

    @abc.abstractmethod
    def workdir(self, sidecar: Sidecar) -> str:
        """The sidecar's own directory on the node, Envoy's working directory (mounted into its container
        at a fixed path by the docker runtime): relative paths of its config, such as the identity files of
        :mod:`trafficmgr.core.identity.files`, are below it. Removed with the sidecar."""

    @abc.abstractmethod
    def sidecar_netns(self, sidecar: Sidecar) -> str | None:
        """The network namespace ``sidecar`` runs in, while that namespace still exists, else None."""

    @abc.abstractmethod
    def logs(self, sidecar: Sidecar, tail: int | None = None) -> str:
        """The sidecar's log (stdout and stderr), the last ``tail`` lines if given."""

    def close(self) -> None:  # noqa: B027 - optional: a runtime without client resources keeps this no-op
        """Release client resources (sidecars keep running)."""

    def describe(self) -> str:
        """Where this runtime works, for messages (``docker at unix:///var/run/docker.sock``)."""
        return self.name


def find(sidecars: list[Sidecar], prefix: str) -> Sidecar:
    """The one sidecar whose id starts with ``prefix``; raises ``LookupError`` (none or ambiguous)."""
    matches = [s for s in sidecars if s.id.startswith(prefix)]
    if not prefix or len(matches) != 1:
        what = "no sidecar" if not matches else f"{len(matches)} sidecars"
        raise LookupError(f"{what} with an id starting with {prefix!r}")
    return matches[0]
