"""Which pods may get a sidecar: checks of the raw Pod object the node agent makes before it captures a
pod's traffic. A pod that fails one gets no sidecar and a ``SidecarFailed`` Warning Event saying why.

The capture rules (:mod:`.iptables`) let through every connection whose socket belongs to the proxy's
uid or primary gid (``--uid-owner``/``--gid-owner`` ``proxy_uid``: Envoy's own upstream and xDS
connections), and they live in the pod's network namespace. So capture is only real when:

- **no container of the pod runs as the proxy's uid or gid** (``runAsUser``/``runAsGroup``, the
  container's own or, where it sets none, the pod's): its connections would match the exemption and
  bypass the sidecar.
- **the proxy's gid is not one of the pod's groups** (``supplementalGroups``, ``fsGroup``, which the
  kubelet adds to every container's groups). The owner match checks the primary gid only (no
  ``--suppl-groups``), but a member of a group can create a set-gid program of that group on any
  writable filesystem (``chgrp`` + ``chmod g+s``) and run it with that primary gid: membership is as
  good as the gid.
- **the pod has its own network namespace** (not ``hostNetwork: true``): otherwise the rules would be
  installed in the node's namespace and capture the whole node's traffic.

Not covered (documented gaps): a container without an explicit uid runs as its image's user, which the
agent cannot see (an image whose user is 1337 bypasses capture); a container running as root (or with
``CAP_SETUID``/``CAP_SETGID``, or ``CAP_NET_ADMIN``) can switch to the proxy uid or remove the rules.
Capture steers a cooperating application's traffic; it is no boundary against the pod's own root.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: Container lists of a Pod spec whose containers run in the pod's network namespace.
CONTAINER_LISTS = ("initContainers", "containers", "ephemeralContainers")


def _id(value: Any) -> int | None:
    """An id field as an int (None when absent or not an integer: the API server rejects those)."""
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def refusal(pod: Mapping[str, Any], proxy_uid: int) -> str | None:
    """Why the pod (a raw Pod object) must not get a sidecar whose proxy runs as uid and gid
    ``proxy_uid``, or None when it may. The text names each problem and its fix (see the module
    docstring for the rules and the gaps)."""
    spec = _mapping(pod.get("spec"))
    problems: list[str] = []
    if spec.get("hostNetwork") is True:
        problems.append(
            "the pod uses the node's network (hostNetwork: true), so the sidecar's capture rules would "
            "redirect the whole node's traffic: no sidecar for hostNetwork pods (remove hostNetwork or the "
            "traffic.envoy.enabled label)")
    pod_sc = _mapping(spec.get("securityContext"))
    fix = "use another uid/gid or run the proxy as another one (agent --proxy-uid)"
    for field in ("runAsUser", "runAsGroup"):
        what = "uid" if field == "runAsUser" else "gid"
        own = "the proxy's own uid" if what == "uid" else "the proxy's own gid"
        for kind in CONTAINER_LISTS:
            for c in spec.get(kind) or ():
                c = _mapping(c)
                c_sc = _mapping(c.get("securityContext"))
                value, source = _id(c_sc.get(field)), f"securityContext.{field}"
                if value is None:
                    value, source = _id(pod_sc.get(field)), f"the pod's securityContext.{field}"
                if value == proxy_uid:
                    problems.append(
                        f"container {c.get('name') or '?'} runs as {what} {proxy_uid} ({source}), {own}, so "
                        f"its traffic would bypass the sidecar: {fix}")
    groups = pod_sc.get("supplementalGroups")
    if isinstance(groups, list) and proxy_uid in [_id(g) for g in groups]:
        problems.append(
            f"the pod's securityContext.supplementalGroups include {proxy_uid}, the proxy's gid: a member of "
            f"that group can run a set-gid program as gid {proxy_uid} and its traffic would bypass the sidecar: {fix}")
    if _id(pod_sc.get("fsGroup")) == proxy_uid:
        problems.append(
            f"the pod's securityContext.fsGroup is {proxy_uid}, the proxy's gid (every container gets it as a "
            f"group): a member of that group can run a set-gid program as gid {proxy_uid} and its traffic would "
            f"bypass the sidecar: {fix}")
    return "; ".join(problems) if problems else None
