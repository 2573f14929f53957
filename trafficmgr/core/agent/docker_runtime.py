"""Sidecars as Docker containers (the original's ``envoy-manager`` way), with the ``docker`` SDK.

The sidecar of pod ``P`` in namespace ``N`` is the container ``envoy_P_N`` with
``network_mode=container:<P's pause container>`` (it shares the pod's network namespace), user
``<proxy uid>:<proxy uid>``, the bootstrap inline on Envoy's command line and the labels of
:mod:`.runtime`. The pause container is found by the labels the kubelet's Docker integration puts on
it (``io.kubernetes.pod.name``/``namespace``/``uid``, ``io.kubernetes.docker.type=podsandbox``).
A Unix-socket xDS address is bind-mounted (its directory, read-only) into the sidecar. Containers are independent
of the agent: they survive its restarts.

Each sidecar has its own directory on the node, ``<state-dir>/<pod uid>/`` (:meth:`DockerRuntime.workdir`),
bind-mounted read-only at :data:`WORKDIR` and made the container's working directory: the agent writes
the pod's workload identity there (``identity/``, read by Envoy through relative SDS paths). Only that
pod's directory is mounted, so a sidecar never sees another pod's key. The Docker daemon resolves the
path on the host: an agent in a container must see ``<state-dir>`` at the same path as the host does.

The node's network namespace paths are ``/proc/<pid>/ns/net`` of host pids: the agent needs the
host's pid namespace (``hostPID: true`` in the DaemonSet).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from trafficmgr.core.agent.runtime import (
    ENVOY_ARGS,
    IMAGE_ENVOY_PATH,
    LABEL_NAMESPACE,
    LABEL_POD,
    LABEL_POD_UID,
    LABEL_PROXY,
    AmbiguousNetwork,
    NetworkNotReady,
    PodNetwork,
    PodRef,
    Runtime,
    RuntimeUnavailable,
    Sidecar,
    SidecarError,
    SidecarSpec,
    refuse_host_netns,
)

DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
K8S_POD_NAME = "io.kubernetes.pod.name"
K8S_POD_NAMESPACE = "io.kubernetes.pod.namespace"
K8S_POD_UID = "io.kubernetes.pod.uid"
K8S_CONTAINER_TYPE = "io.kubernetes.docker.type"
SANDBOX = "podsandbox"
#: Where a sidecar's own directory is mounted (read-only) in its container, and its working directory.
WORKDIR = "/var/run/trafficmgr/proxy"


def container_name(pod: str, namespace: str) -> str:
    return f"envoy_{pod}_{namespace}"


class DockerRuntime(Runtime):
    """Sidecar containers on the Docker engine at ``base_url`` running ``image``."""

    name = "docker"

    def __init__(self, base_url: str = DEFAULT_DOCKER_HOST, image: str = "", timeout: float = 20.0,
                 proc_root: str = "/proc", state_dir: str | None = None) -> None:
        from trafficmgr.core.agent.netns_runtime import DEFAULT_STATE_DIR

        self.state_dir = state_dir or DEFAULT_STATE_DIR
        self.base_url = base_url
        self.image = image
        self.timeout = timeout
        self.proc_root = proc_root
        self._api: Any = None

    def describe(self) -> str:
        return f"docker at {self.base_url}"

    # -- client -------------------------------------------------------------------------------

    def api(self) -> Any:
        """The low-level ``docker.APIClient``, made on first use (the daemon may be down at start)."""
        import docker

        if self._api is None:
            try:
                api = docker.APIClient(base_url=self.base_url, version="auto", timeout=self.timeout)
            except docker.errors.DockerException as exc:
                raise RuntimeUnavailable(f"Docker daemon at {self.base_url} unreachable: {_why(exc)}") from None
            self._api = api
        return self._api

    def _call(self, what: str, fn: Any, *args: Any, **kw: Any) -> Any:
        """Call the API; connection problems become :class:`RuntimeUnavailable`, API errors
        :class:`SidecarError` (``docker.errors.NotFound`` is re-raised for callers to handle)."""
        import docker
        import requests

        try:
            return fn(*args, **kw)
        except docker.errors.NotFound:
            raise
        except docker.errors.APIError as exc:
            raise SidecarError(f"{what}: {_why(exc)}") from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout, OSError) as exc:
            self._api = None
            raise RuntimeUnavailable(f"Docker daemon at {self.base_url} unreachable: {_why(exc)}") from None
        except docker.errors.DockerException as exc:
            raise SidecarError(f"{what}: {_why(exc)}") from None

    # -- runtime ------------------------------------------------------------------------------

    def list(self) -> list[Sidecar]:
        api = self.api()
        rows = self._call("listing sidecar containers", api.containers, all=True, filters={"label": LABEL_PROXY})
        out = []
        for row in rows:
            labels = row.get("Labels") or {}
            out.append(Sidecar(
                id=row["Id"], pod=labels.get(LABEL_POD, ""), namespace=labels.get(LABEL_NAMESPACE, ""),
                pod_uid=labels.get(LABEL_POD_UID, ""), status=row.get("Status") or "", state=row.get("State") or "",
            ))
        return sorted(out, key=lambda s: (s.namespace, s.pod, s.id))

    def pod_network(self, pod: PodRef) -> PodNetwork:
        """The network of the pod's one running pause container (matched by the kubelet's labels:
        name, namespace and uid). Refused, never guessed: two running pause containers for one pod
        (:class:`AmbiguousNetwork`: an old sandbox not removed yet), and a pause container in the node's
        network (``hostNetwork: true``: the sidecar would share the node's namespace and its capture rules
        would redirect the node's traffic; also checked by namespace identity, :func:`refuse_host_netns`)."""
        api = self.api()
        filters = {"label": [f"{K8S_POD_NAME}={pod.name}", f"{K8S_POD_NAMESPACE}={pod.namespace}",
                             f"{K8S_CONTAINER_TYPE}={SANDBOX}"], "status": "running"}
        rows = self._call("finding the pause container", api.containers, filters=filters)
        rows = [r for r in rows if (r.get("Labels") or {}).get(K8S_POD_UID, pod.uid) == pod.uid]
        if not rows:
            raise NetworkNotReady(f"no running pause container for pod {pod.namespace}/{pod.name} (yet)")
        if len(rows) > 1:
            ids = ", ".join(sorted(r["Id"][:12] for r in rows))
            raise AmbiguousNetwork(f"{len(rows)} running pause containers for pod {pod.namespace}/{pod.name} "
                                   f"({ids}): no sidecar until exactly one is left")
        sandbox = rows[0]["Id"]
        info = self._inspect(sandbox)
        if info is not None and ((info.get("HostConfig") or {}).get("NetworkMode") or "") == "host":
            raise SidecarError(f"pause container {sandbox[:12]} of pod {pod.namespace}/{pod.name} uses the node's "
                               f"network (hostNetwork): no sidecar, its capture rules would redirect the node's traffic")
        netns = self._netns_path(info)
        if netns is None:
            raise NetworkNotReady(f"pause container {sandbox[:12]} of pod {pod.namespace}/{pod.name} is not running")
        refuse_host_netns(netns, pod, self.proc_root)
        return PodNetwork(netns, sandbox)

    def _inspect(self, container: str) -> dict[str, Any] | None:
        import docker

        try:
            info: dict[str, Any] = self._call("inspecting a container", self.api().inspect_container, container)
        except docker.errors.NotFound:
            return None
        return info

    def _netns_path(self, info: dict[str, Any] | None) -> str | None:
        pid = int(((info or {}).get("State") or {}).get("Pid") or 0)
        path = f"{self.proc_root}/{pid}/ns/net"
        return path if pid and os.path.exists(path) else None

    def _netns_of(self, container: str) -> str | None:
        return self._netns_path(self._inspect(container))

    def start(self, spec: SidecarSpec, network: PodNetwork) -> Sidecar:
        import docker

        api = self.api()
        name = container_name(spec.pod.name, spec.pod.namespace)
        for s in self.list():
            if s.pod == spec.pod.name and s.namespace == spec.pod.namespace and s.pod_uid == spec.pod.uid and s.running:
                return s
        try:  # a dead or stale container holding the name
            self._call("removing an old sidecar", api.remove_container, name, force=True)
        except docker.errors.NotFound:
            pass
        if not self.image:
            raise SidecarError("no sidecar image configured (--envoy-image)")
        try:
            self._call("looking up the sidecar image", api.inspect_image, self.image)
        except docker.errors.NotFound:
            try:
                self._call(f"pulling the sidecar image {self.image}", api.pull, self.image)
            except (docker.errors.NotFound, SidecarError) as exc:
                raise SidecarError(f"sidecar image {self.image} is not on the node and cannot be pulled: {exc}") from None
        labels = {LABEL_PROXY: "true", LABEL_POD: spec.pod.name, LABEL_NAMESPACE: spec.pod.namespace,
                  LABEL_POD_UID: spec.pod.uid}
        directory = self._pod_dir(spec.pod.uid)
        shutil.rmtree(directory, ignore_errors=True)  # a dead sidecar's leftovers: start afresh
        os.makedirs(directory, mode=0o755)
        os.chmod(directory, 0o755)
        try:
            if spec.prepare is not None:
                spec.prepare(directory)
            return self._create(spec, network, name, labels, directory)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise

    def _pod_dir(self, pod_uid: str) -> str:
        if not pod_uid or "/" in pod_uid or pod_uid.startswith("."):
            raise SidecarError(f"pod uid {pod_uid!r} cannot name a directory")
        return os.path.join(self.state_dir, pod_uid)

    def workdir(self, sidecar: Sidecar) -> str:
        return self._pod_dir(sidecar.pod_uid)

    def _create(self, spec: SidecarSpec, network: PodNetwork, name: str, labels: dict[str, str], directory: str) -> Sidecar:
        api = self.api()
        # Read-only: Envoy only reads its config and identity; the agent (on the node) writes them.
        binds = {directory: {"bind": WORKDIR, "mode": "ro"}}
        if spec.xds_socket:
            sock_dir = os.path.dirname(spec.xds_socket)
            # Read-only: connect(2) to a Unix socket works through a read-only mount, and a sidecar must
            # not be able to replace the socket file (it would then serve every other sidecar's xDS).
            binds[sock_dir] = {"bind": sock_dir, "mode": "ro"}
        host_config = api.create_host_config(
            network_mode=f"container:{network.handle}", binds=binds,
            restart_policy={"Name": "on-failure", "MaximumRetryCount": 5},
        )
        command = ["--config-yaml", json.dumps(spec.config, sort_keys=True), *ENVOY_ARGS]
        created = self._call("creating the sidecar container", api.create_container, self.image, command=command,
                             entrypoint=[IMAGE_ENVOY_PATH], name=name, labels=labels, working_dir=WORKDIR,
                             user=f"{spec.proxy_uid}:{spec.proxy_uid}", host_config=host_config)
        cid = created["Id"]
        try:
            self._call("starting the sidecar container", api.start, cid)
        except BaseException:
            try:
                api.remove_container(cid, force=True)
            except Exception:  # noqa: BLE001 - best effort; the orphan sweep retries
                pass
            raise
        for s in self.list():
            if s.id == cid:
                return s
        raise SidecarError(f"sidecar container {cid[:12]} vanished right after it started")

    def remove(self, sidecar: Sidecar) -> None:
        import docker

        api = self.api()
        try:
            if sidecar.running:
                self._call("stopping the sidecar", api.stop, sidecar.id, timeout=3)
            self._call("removing the sidecar", api.remove_container, sidecar.id, force=True)
        except docker.errors.NotFound:
            pass
        if sidecar.pod_uid and not any(s.pod_uid == sidecar.pod_uid for s in self.list() if s.id != sidecar.id):
            shutil.rmtree(self._pod_dir(sidecar.pod_uid), ignore_errors=True)

    def sidecar_netns(self, sidecar: Sidecar) -> str | None:
        return self._netns_of(sidecar.id)

    def logs(self, sidecar: Sidecar, tail: int | None = None) -> str:
        import docker

        try:
            data: bytes = self._call("reading the sidecar log", self.api().logs, sidecar.id, stdout=True, stderr=True,
                              tail=tail if tail else "all")
        except docker.errors.NotFound:
            return ""
        return data.decode(errors="replace")

    def close(self) -> None:
        if self._api is not None:
            self._api.close()
            self._api = None


def _why(exc: BaseException) -> str:
    text = getattr(exc, "explanation", None) or str(exc)
    text = str(text).strip().splitlines()[0] if str(text).strip() else type(exc).__name__
    return text[:300]
