"""Resource registry and discovery documents (/version, /api, /apis, APIResourceLists)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
SUB_VERBS = ["get", "patch", "update"]


@dataclass(frozen=True)
class ResourceType:
    """One served resource: ``key`` is ``plural`` for the core group, else ``plural.group``."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    subresources: tuple[str, ...] = ()
    has_status: bool = field(default=False)
    #: a CustomResourceDefinition's ``names.singular`` (builtin kinds: the kind in lower case)
    singular_name: str = ""
    #: True for a kind a CustomResourceDefinition serves (see :mod:`.crds`)
    custom: bool = False

    @property
    def key(self) -> str:
        return self.plural if not self.group else f"{self.plural}.{self.group}"

    @property
    def api_version(self) -> str:
        return self.version if not self.group else f"{self.group}/{self.version}"

    @property
    def singular(self) -> str:
        return self.singular_name or self.kind.lower()

    @property
    def list_kind(self) -> str:
        return self.kind + "List"


def _rt(group: str, version: str, plural: str, kind: str, namespaced: bool = True,
        short: tuple[str, ...] = (), cats: tuple[str, ...] = (), subs: tuple[str, ...] = ()) -> ResourceType:
    return ResourceType(group, version, plural, kind, namespaced, short, cats, subs, "status" in subs)


RESOURCES: list[ResourceType] = [
    _rt("", "v1", "namespaces", "Namespace", False, ("ns",), (), ("status",)),
    _rt("", "v1", "pods", "Pod", True, ("po",), ("all",), ("status",)),
    _rt("", "v1", "services", "Service", True, ("svc",), ("all",), ("status",)),
    _rt("", "v1", "endpoints", "Endpoints", True, ("ep",)),
    _rt("", "v1", "events", "Event", True, ("ev",)),
    _rt("", "v1", "secrets", "Secret", True),
    _rt("", "v1", "configmaps", "ConfigMap", True, ("cm",)),
    _rt("", "v1", "nodes", "Node", False, ("no",), (), ("status",)),
    _rt("", "v1", "serviceaccounts", "ServiceAccount", True, ("sa",)),
    _rt("apps", "v1", "deployments", "Deployment", True, ("deploy",), ("all",), ("status", "scale")),
    _rt("apps", "v1", "replicasets", "ReplicaSet", True, ("rs",), ("all",), ("status", "scale")),
    _rt("apps", "v1", "statefulsets", "StatefulSet", True, ("sts",), ("all",), ("status", "scale")),
    _rt("apps", "v1", "daemonsets", "DaemonSet", True, ("ds",), ("all",), ("status",)),
    _rt("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True),
    _rt("networking.k8s.io", "v1", "ingresses", "Ingress", True, ("ing",), (), ("status",)),
    _rt("networking.k8s.io", "v1", "ingressclasses", "IngressClass", False),
    _rt("events.k8s.io", "v1", "events", "Event", True, ("ev",)),
    _rt("coordination.k8s.io", "v1", "leases", "Lease", True),
    _rt("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition", False,
        ("crd", "crds"), ("api-extensions",), ("status",)),
]

BY_KEY: dict[str, ResourceType] = {r.key: r for r in RESOURCES}
BY_GVR: dict[tuple[str, str, str], ResourceType] = {(r.group, r.version, r.plural): r for r in RESOURCES}
BY_GVK: dict[tuple[str, str], ResourceType] = {(r.api_version, r.kind): r for r in RESOURCES}

#: Create-only APIs that are answered, not stored (:mod:`.tokens`): listed in discovery, absent from
#: RESOURCES (no store bucket, no OpenAPI paths, no generic verbs). (group, version) -> APIResource entries.
VIRTUAL: dict[tuple[str, str], list[dict]] = {
    ("authentication.k8s.io", "v1"): [{"name": "tokenreviews", "singularName": "tokenreview", "namespaced": False,
                                       "kind": "TokenReview", "verbs": ["create"]}],
}
#: Create-only subresources, listed after their resource: a ServiceAccount's TokenRequest.
VIRTUAL_SUBS: dict[str, list[dict]] = {
    "serviceaccounts": [{"name": "serviceaccounts/token", "singularName": "", "namespaced": True,
                         "group": "authentication.k8s.io", "version": "v1", "kind": "TokenRequest",
                         "verbs": ["create"]}],
}

GROUP_VERSIONS: dict[str, list[str]] = {}
for _r in RESOURCES:
    GROUP_VERSIONS.setdefault(_r.group, [])
    if _r.version not in GROUP_VERSIONS[_r.group]:
        GROUP_VERSIONS[_r.group].append(_r.version)


def resolve(name: str) -> ResourceType:
    """Resolve a resource key, plural, kind, short name or ``apiVersion/Kind``; raise KeyError if unknown.

    Ambiguous names (``events``, ``Event``) resolve to the core group.
    """
    if name in BY_KEY:
        return BY_KEY[name]
    low = name.lower()
    for r in RESOURCES:
        if low in (r.plural, r.singular, r.singular + "s") or low in r.short_names or low == r.key:
            return r
    if "/" in name:
        api_version, _, kind = name.rpartition("/")
        if (api_version, kind) in BY_GVK:
            return BY_GVK[(api_version, kind)]
    raise KeyError(name)


def version_info() -> dict:
    return {
        "major": "1", "minor": "32", "gitVersion": "v1.32.0", "gitCommit": "trafficmgr",
        "gitTreeState": "clean", "buildDate": "2024-12-11T00:00:00Z", "goVersion": "go1.23.3",
        "compiler": "gc", "platform": "linux/amd64",
    }


def api_versions(server_address: str) -> dict:
    return {
        "kind": "APIVersions", "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    }


def _served_group_versions(extra: Sequence[ResourceType] = ()) -> dict[str, list[str]]:
    out = {g: list(v) for g, v in GROUP_VERSIONS.items()}
    for group, version in VIRTUAL:
        if version not in out.setdefault(group, []):
            out[group].append(version)
    for r in extra:  # custom resources: their CRD's versions, in the CRD's order of priority
        if r.version not in out.setdefault(r.group, []):
            out[r.group].append(r.version)
    return out


def api_group_list(extra: Sequence[ResourceType] = ()) -> dict:
    """APIGroupList of the builtin groups and those of ``extra`` (custom resource types)."""
    groups = []
    for group, versions in _served_group_versions(extra).items():
        if not group:
            continue
        gvs = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        groups.append({"name": group, "versions": gvs, "preferredVersion": gvs[0]})
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


def api_group(group: str, extra: Sequence[ResourceType] = ()) -> dict | None:
    served = _served_group_versions(extra)
    if group not in served or not group:
        return None
    gvs = [{"groupVersion": f"{group}/{v}", "version": v} for v in served[group]]
    return {"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": gvs, "preferredVersion": gvs[0]}


def api_resource_list(group: str, version: str, extra: Sequence[ResourceType] = ()) -> dict | None:
    """APIResourceList for ``group/version`` (builtin kinds and those of ``extra``) or None if not served."""
    gv = version if not group else f"{group}/{version}"
    rts = [r for r in [*RESOURCES, *extra] if r.group == group and r.version == version]
    if not rts and (group, version) not in VIRTUAL:
        return None
    out = [dict(e) for e in VIRTUAL.get((group, version), [])]
    for r in rts:
        entry = {
            "name": r.plural, "singularName": r.singular, "namespaced": r.namespaced, "kind": r.kind,
            "verbs": list(VERBS), "storageVersionHash": r.kind[:8] if not r.custom else r.key[:8],
        }
        if r.short_names:
            entry["shortNames"] = list(r.short_names)
        if r.categories:
            entry["categories"] = list(r.categories)
        out.append(entry)
        for sub in r.subresources:
            se = {"name": f"{r.plural}/{sub}", "singularName": "", "namespaced": r.namespaced,
                  "kind": r.kind, "verbs": list(SUB_VERBS)}
            if sub == "scale":
                se.update(group="autoscaling", version="v1", kind="Scale")
            out.append(se)
        out.extend(dict(e) for e in VIRTUAL_SUBS.get(r.plural, []) if not r.group)
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": out}
