"""Minimal OpenAPI v3 documents: enough for kubectl's fieldValidation probe and GVK lookups.

Schemas are permissive (``x-kubernetes-preserve-unknown-fields``) but carry strategic-merge
metadata (merge keys / strategies) on the well-known lists.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache

from .discovery import GROUP_VERSIONS, RESOURCES, ResourceType

_QUERY_PARAMS = ["fieldValidation", "fieldManager", "dryRun", "force", "pretty"]


def _gv_path(group: str, version: str) -> str:
    return f"api/{version}" if not group else f"apis/{group}/{version}"


def _schema_name(rt: ResourceType) -> str:
    group = rt.group or "core"
    rev = ".".join(reversed(group.split("."))) if "." in group else group
    prefix = "io.k8s.api." + rev.replace("io.k8s.", "") if rt.group else "io.k8s.api.core"
    return f"{prefix}.{rt.version}.{rt.kind}"


def _gvk(rt: ResourceType) -> dict:
    return {"group": rt.group, "version": rt.version, "kind": rt.kind}


def _list_of(item: dict, merge_key: str | None = None, strategy: str | None = None) -> dict:
    sch: dict = {"type": "array", "items": item}
    if merge_key:
        sch["x-kubernetes-patch-merge-key"] = merge_key
        sch["x-kubernetes-list-type"] = "map"
        sch["x-kubernetes-list-map-keys"] = [merge_key]
    if strategy:
        sch["x-kubernetes-patch-strategy"] = strategy
    return sch


def _open(props: dict | None = None) -> dict:
    sch: dict = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    if props:
        sch["properties"] = props
    return sch


def _pod_spec() -> dict:
    container = _open({
        "name": {"type": "string"},
        "ports": _list_of(_open(), "containerPort", "merge"),
        "env": _list_of(_open(), "name", "merge"),
        "volumeMounts": _list_of(_open(), "mountPath", "merge"),
    })
    return _open({
        "containers": _list_of(container, "name", "merge"),
        "initContainers": _list_of(container, "name", "merge"),
        "volumes": _list_of(_open(), "name", "merge,retainKeys"),
        "imagePullSecrets": _list_of(_open(), "name", "merge"),
    })


def _object_meta() -> dict:
    return _open({
        "name": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "finalizers": {"type": "array", "items": {"type": "string"}, "x-kubernetes-patch-strategy": "merge"},
        "ownerReferences": _list_of(_open(), "uid", "merge"),
    })


def _kind_schema(rt: ResourceType) -> dict:
    props: dict = {
        "apiVersion": {"type": "string"},
        "kind": {"type": "string"},
        "metadata": {"allOf": [{"$ref": "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}]},
    }
    if rt.kind == "Pod":
        props["spec"] = _pod_spec()
    elif rt.kind in ("Deployment", "ReplicaSet", "StatefulSet", "DaemonSet"):
        props["spec"] = _open({"template": _open({"metadata": _object_meta(), "spec": _pod_spec()})})
    elif rt.kind == "Service":
        props["spec"] = _open({"ports": _list_of(_open(), "port", "merge")})
    else:
        props["spec"] = _open()
    props["status"] = _open({"conditions": _list_of(_open(), "type", "merge")})
    return {"type": "object", "properties": props, "x-kubernetes-preserve-unknown-fields": True,
            "x-kubernetes-group-version-kind": [_gvk(rt)]}


def _op(rt: ResourceType, op_id: str, action: str, ref: str, body: bool, patch: bool = False) -> dict:
    params = [{"name": p, "in": "query", "schema": {"type": "string", "uniqueItems": True}} for p in _QUERY_PARAMS]
    op: dict = {
        "operationId": op_id, "tags": [rt.group or "core"],
        "x-kubernetes-action": action, "x-kubernetes-group-version-kind": _gvk(rt),
        "parameters": params,
        "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": {"$ref": ref}}}}},
    }
    if body:
        ctype = ["application/json"]
        if patch:
            ctype = ["application/json-patch+json", "application/merge-patch+json",
                     "application/apply-patch+yaml"]
        op["requestBody"] = {"content": {c: {"schema": {"$ref": ref}} for c in ctype}, "required": True}
    return op


@cache
def gv_document(group: str, version: str) -> bytes | None:
    """Encoded OpenAPI v3 document for one group/version, or None if not served."""
    rts = [r for r in RESOURCES if r.group == group and r.version == version]
    if not rts:
        return None
    paths: dict = {}
    schemas: dict = {"io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta": _object_meta()}
    base = "/" + _gv_path(group, version)
    for rt in rts:
        name = _schema_name(rt)
        schemas[name] = _kind_schema(rt)
        ref = f"#/components/schemas/{name}"
        ns = "/namespaces/{namespace}" if rt.namespaced else ""
        coll = f"{base}{ns}/{rt.plural}"
        paths[coll] = {
            "get": _op(rt, f"list{rt.kind}", "list", ref, False),
            "post": _op(rt, f"create{rt.kind}", "post", ref, True),
        }
        paths[coll + "/{name}"] = {
            "get": _op(rt, f"read{rt.kind}", "get", ref, False),
            "put": _op(rt, f"replace{rt.kind}", "put", ref, True),
            "patch": _op(rt, f"patch{rt.kind}", "patch", ref, True, patch=True),
            "delete": _op(rt, f"delete{rt.kind}", "delete", ref, False),
        }
        for sub in rt.subresources:
            paths[coll + "/{name}/" + sub] = {
                "get": _op(rt, f"read{rt.kind}{sub.title()}", "get", ref, False),
                "put": _op(rt, f"replace{rt.kind}{sub.title()}", "put", ref, True),
                "patch": _op(rt, f"patch{rt.kind}{sub.title()}", "patch", ref, True, patch=True),
            }
    doc = {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.32.0"},
           "paths": paths, "components": {"schemas": schemas}}
    return json.dumps(doc).encode()


@cache
def root_document() -> bytes:
    """``/openapi/v3`` discovery: group/version paths with hashed serverRelativeURLs."""
    paths = {}
    for group, versions in GROUP_VERSIONS.items():
        for v in versions:
            p = _gv_path(group, v)
            digest = hashlib.sha512(gv_document(group, v) or b"").hexdigest()[:32].upper()
            paths[p] = {"serverRelativeURL": f"/openapi/v3/{p}?hash={digest}"}
    return json.dumps({"paths": paths}).encode()


def document_for_path(path: str) -> bytes | None:
    """Document for ``api/v1`` or ``apis/<group>/<version>``; None if unknown."""
    parts = path.strip("/").split("/")
    if len(parts) == 2 and parts[0] == "api":
        return gv_document("", parts[1])
    if len(parts) == 3 and parts[0] == "apis":
        return gv_document(parts[1], parts[2])
    return None
