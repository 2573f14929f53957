"""Minimal OpenAPI v3 documents: enough for kubectl's fieldValidation probe and GVK lookups.

Schemas are permissive (``x-kubernetes-preserve-unknown-fields``) but carry strategic-merge
metadata (merge keys / strategies) on the well-known lists.
"""

from __future__ import annotations

import copy
import hashlib
import json
from functools import cache
from typing import Any

from . import gnostic
from .crds import Registry
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


def _f(typ: str, desc: str, **extra: object) -> dict:
    """A described scalar field (``intstr``: an int-or-string)."""
    if typ == "intstr":
        return {"type": "string", "format": "int-or-string", "description": desc, **extra}  # as IntOrString
    return {"type": typ, "description": desc, **extra}


def _d(sch: dict, desc: str) -> dict:
    return {**sch, "description": desc}


def _label_selector() -> dict:
    return _d(_open({"matchLabels": _d(dict(_STR_MAP), "labels an object must carry"),
                     "matchExpressions": _d(_list_of(_open()), "set-based requirements")}), "a label query")


def _pod_spec() -> dict:
    container = _open({
        "name": _f("string", "container name, unique in the pod"),
        "image": _f("string", "image reference; local mode runs the trafficmgr image's command"),
        "command": _d({"type": "array", "items": {"type": "string"}}, "entrypoint"),
        "args": _d({"type": "array", "items": {"type": "string"}}, "arguments (local mode: the bookinfo app "
                   "to run, e.g. [bookinfo, reviews])"),
        "ports": _d(_list_of(_open({"containerPort": _f("integer", "port the container listens on"),
                                    "name": _f("string", "port name (Service targetPort may refer to it)"),
                                    "protocol": _f("string", "TCP (default), UDP or SCTP")}),
                             "containerPort", "merge"), "ports the container exposes"),
        "env": _d(_list_of(_open({"name": _f("string", "variable name"), "value": _f("string", "value")}),
                           "name", "merge"), "environment variables"),
        "resources": _d(_open(), "compute resources (not enforced in local mode)"),
        "readinessProbe": _d(_open(), "readiness probe"),
        "volumeMounts": _d(_list_of(_open(), "mountPath", "merge"), "volumes mounted into the container"),
    })
    return _open({
        "containers": _d(_list_of(container, "name", "merge"), "the pod's containers"),
        "initContainers": _d(_list_of(container, "name", "merge"), "containers run to completion first"),
        "volumes": _d(_list_of(_open(), "name", "merge,retainKeys"), "volumes the containers may mount"),
        "imagePullSecrets": _d(_list_of(_open(), "name", "merge"), "registry credentials"),
        "serviceAccountName": _f("string", "the pod's service account (its identity for xDS mTLS)"),
        "nodeName": _f("string", "node the pod runs on"),
        "hostNetwork": _f("boolean", "use the node's network namespace"),
    })


def _workload_spec(kind: str) -> dict:
    props: dict = {
        "selector": _label_selector(),
        "template": _d(_open({"metadata": _object_meta(), "spec": _pod_spec()}), "the pods to create"),
        "minReadySeconds": _f("integer", "seconds a new pod must be ready to count as available"),
        "revisionHistoryLimit": _f("integer", "old ReplicaSets kept for rollback"),
    }
    if kind != "DaemonSet":
        props["replicas"] = _f("integer", "desired number of pods (default 1)")
    if kind == "Deployment":
        props["strategy"] = _d(_open({"type": _f("string", "RollingUpdate (default) or Recreate"),
                                      "rollingUpdate": _open({
                                          "maxSurge": _f("intstr", "pods above replicas during a rollout"),
                                          "maxUnavailable": _f("intstr", "pods below replicas during a rollout")})}),
                               "how pods are replaced")
        props["progressDeadlineSeconds"] = _f("integer", "seconds without progress before Progressing=False")
        props["paused"] = _f("boolean", "rollout paused")
    if kind == "StatefulSet":
        props["serviceName"] = _f("string", "governing headless Service")
    return _open(props)


def _service_spec() -> dict:
    port = _open({"name": _f("string", "port name"), "port": _f("integer", "the Service port"),
                  "targetPort": _f("intstr", "container port number or name (default: port)"),
                  "protocol": _f("string", "TCP (default), UDP or SCTP"),
                  "appProtocol": _f("string", "application protocol hint"),
                  "nodePort": _f("integer", "node port (NodePort/LoadBalancer)")})
    return _open({
        "ports": _d(_list_of(port, "port", "merge"), "the ports the Service exposes"),
        "selector": _d(dict(_STR_MAP), "pods with these labels are the endpoints"),
        "type": _f("string", "ClusterIP (default), NodePort, LoadBalancer or ExternalName"),
        "clusterIP": _f("string", "virtual IP (allocated; None for a headless Service)"),
        "clusterIPs": _d({"type": "array", "items": {"type": "string"}}, "virtual IPs"),
        "externalName": _f("string", "DNS name of an ExternalName Service"),
        "sessionAffinity": _f("string", "None (default) or ClientIP"),
        "publishNotReadyAddresses": _f("boolean", "unready pods are endpoints too"),
    })


_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_OPEN = ""  # a field whose schema is open (any value): spec, status, Event fields, ...

# Top-level fields (besides apiVersion, kind, metadata) of each served kind, as on a real cluster, with a
# short description and a type: _OPEN, "string", "boolean", "integer" or "map" (map of strings). kubectl's
# client-side validation (used for ``kind: List`` manifests) reports any other top-level field as unknown.
_SPEC_STATUS = {"spec": ("desired state", _OPEN), "status": ("observed state (written by controllers)", _OPEN)}
_EVENT_COMMON = {"action": ("what was done", "string"), "eventTime": ("when it happened (MicroTime)", "string"),
                 "reason": ("machine-readable reason", "string"), "related": ("a second object", _OPEN),
                 "reportingInstance": ("controller instance", "string"), "series": ("recurrence data", _OPEN),
                 "type": ("Normal or Warning", "string")}
TOP_FIELDS: dict[str, dict[str, tuple[str, str]]] = {
    "v1/Namespace": _SPEC_STATUS, "v1/Pod": _SPEC_STATUS, "v1/Service": _SPEC_STATUS, "v1/Node": _SPEC_STATUS,
    "v1/Endpoints": {"subsets": ("addresses and ports of the Service's ready and not-ready endpoints", _OPEN)},
    "v1/Event": {**_EVENT_COMMON, "count": ("times this event occurred", "integer"),
                 "firstTimestamp": ("first occurrence", "string"), "lastTimestamp": ("last occurrence", "string"),
                 "involvedObject": ("the object this event is about", _OPEN),
                 "message": ("human-readable description", "string"),
                 "reportingComponent": ("controller that emitted the event", "string"),
                 "source": ("component reporting this event", _OPEN)},
    "v1/Secret": {"data": ("base64-encoded values", "map"), "stringData": ("write-only plain values", "map"),
                  "type": ("secret type, e.g. Opaque or kubernetes.io/tls", "string"),
                  "immutable": ("data cannot change", "boolean")},
    "v1/ConfigMap": {"data": ("configuration values", "map"), "binaryData": ("base64-encoded values", "map"),
                     "immutable": ("data cannot change", "boolean")},
    "v1/ServiceAccount": {"secrets": ("secrets of this account", _OPEN),
                          "imagePullSecrets": ("registry credentials", _OPEN),
                          "automountServiceAccountToken": ("mount a token into pods", "boolean")},
    "apps/v1/Deployment": _SPEC_STATUS, "apps/v1/ReplicaSet": _SPEC_STATUS, "apps/v1/StatefulSet": _SPEC_STATUS,
    "apps/v1/DaemonSet": _SPEC_STATUS,
    "discovery.k8s.io/v1/EndpointSlice": {"addressType": ("IPv4, IPv6 or FQDN", "string"),
                                          "endpoints": ("the endpoints", _OPEN), "ports": ("the ports", _OPEN)},
    "networking.k8s.io/v1/Ingress": _SPEC_STATUS,
    "networking.k8s.io/v1/IngressClass": {"spec": ("controller and parameters", _OPEN)},
    "events.k8s.io/v1/Event": {**_EVENT_COMMON, "note": ("human-readable description", "string"),
                               "regarding": ("the object this event is about", _OPEN),
                               "reportingController": ("controller that emitted the event", "string"),
                               "deprecatedCount": ("core/v1 count", "integer"),
                               "deprecatedFirstTimestamp": ("core/v1 firstTimestamp", "string"),
                               "deprecatedLastTimestamp": ("core/v1 lastTimestamp", "string"),
                               "deprecatedSource": ("core/v1 source", _OPEN)},
    "coordination.k8s.io/v1/Lease": {"spec": ("holder and timing of the lease", _OPEN)},
    "apiextensions.k8s.io/v1/CustomResourceDefinition": {
        "spec": ("group, names, scope and versions (with schemas) of the custom resource", _OPEN),
        "status": ("acceptedNames, conditions (Established, NamesAccepted), storedVersions", _OPEN)},
}


def _typed(desc: str, typ: str) -> dict:
    if typ == "map":
        return {"description": desc, **_STR_MAP}
    if typ:
        return {"description": desc, "type": typ}
    return {"description": desc}


def _meta_fields() -> dict:
    """ObjectMeta's fields (all of them: ``kubectl get -o yaml`` output must validate)."""
    ref_list = {"type": "array", "items": {"type": "object", "properties": {
        "apiVersion": {"type": "string"}, "kind": {"type": "string"}, "name": {"type": "string"},
        "uid": {"type": "string"}, "controller": {"type": "boolean"}, "blockOwnerDeletion": {"type": "boolean"}}}}
    managed = {"type": "array", "items": {"type": "object", "properties": {
        "manager": {"type": "string"}, "operation": {"type": "string"}, "apiVersion": {"type": "string"},
        "time": {"type": "string"}, "fieldsType": {"type": "string"}, "subresource": {"type": "string"},
        "fieldsV1": {"description": "the fields this manager owns (FieldsV1 trie)", "type": "object"}}}}
    return {
        "name": {"description": "unique within a namespace", "type": "string"},
        "generateName": {"description": "prefix of a server-generated name", "type": "string"},
        "namespace": {"description": "the namespace (empty for cluster-scoped kinds)", "type": "string"},
        "selfLink": {"type": "string"}, "uid": {"description": "set by the server", "type": "string"},
        "resourceVersion": {"description": "opaque version for optimistic concurrency", "type": "string"},
        "generation": {"description": "sequence number of spec changes", "type": "integer"},
        "creationTimestamp": {"type": "string", "format": "date-time"},
        "deletionTimestamp": {"type": "string", "format": "date-time"},
        "deletionGracePeriodSeconds": {"type": "integer"},
        "labels": {"description": "labels (trafficmgr reads the traffic.* ones)", **_STR_MAP},
        "annotations": {"description": "non-identifying metadata", **_STR_MAP},
        "ownerReferences": ref_list, "finalizers": {"type": "array", "items": {"type": "string"}},
        "managedFields": managed,
    }


def _object_meta() -> dict:
    props = _meta_fields()
    props["finalizers"] = {**props["finalizers"], "x-kubernetes-patch-strategy": "merge"}
    props["ownerReferences"] = _list_of(_open(), "uid", "merge")
    return _open(props)


def _kind_schema(rt: ResourceType) -> dict:
    props: dict = {
        "apiVersion": {"type": "string", "description": "versioned schema of this object"},
        "kind": {"type": "string", "description": "the kind of this object"},
        "metadata": {"allOf": [{"$ref": "#/components/schemas/" + _META}],
                     "description": "standard object metadata"},
    }
    for name, (desc, typ) in TOP_FIELDS[f"{rt.api_version}/{rt.kind}"].items():
        props[name] = {"description": desc, **_open()} if not typ else _typed(desc, typ)
    if rt.kind == "Pod":
        props["spec"] = _pod_spec()
    elif rt.kind in ("Deployment", "ReplicaSet", "StatefulSet", "DaemonSet"):
        props["spec"] = _workload_spec(rt.kind)
    elif rt.kind == "Service":
        props["spec"] = _service_spec()
    if "status" in props:
        props["status"] = _open({"conditions": _list_of(_open(), "type", "merge")})
    for name in ("spec", "status"):
        if name in props:
            props[name]["description"] = TOP_FIELDS[f"{rt.api_version}/{rt.kind}"][name][0]
    return {"type": "object", "properties": props, "x-kubernetes-preserve-unknown-fields": True,
            "description": f"{rt.kind} ({rt.api_version}), as served by trafficmgr's local API server",
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


def _cached(custom: Registry | None, key: Any, build: Any) -> Any:
    """``build()`` memoized on ``custom`` until its served types change (builtin documents: ``@cache``)."""
    if custom is None:
        return build()
    cache_ = custom.cache
    gen = custom.generation
    if cache_.get("generation") != gen:
        cache_.clear()
        cache_["generation"] = gen
    if key not in cache_:
        document = build()
        if custom.generation != gen:  # the types changed while building: do not keep a stale document
            return document
        cache_[key] = document
    return cache_[key]


def _custom_name(rt: ResourceType) -> str:
    """A custom kind's schema name, as kube-apiserver names it (``io.k8s.networking.gateway.v1.HTTPRoute``)."""
    return ".".join(reversed(rt.group.split("."))) + f".{rt.version}.{rt.kind}"


def _custom_schema(custom: Registry, rt: ResourceType, meta_ref: str, v2: bool = False) -> dict:
    """A custom kind's schema: its CRD's ``openAPIV3Schema`` with apiVersion, kind and metadata typed (v2:
    reduced to what Swagger 2.0 and gnostic carry)."""
    ct = custom.custom(rt)
    sch: dict[str, Any] = copy.deepcopy(ct.schema if ct else {"type": "object"})
    if v2:
        sch = _v2_schema(sch)
    props = sch.setdefault("properties", {})
    props["apiVersion"] = {"type": "string", "description": "versioned schema of this object"}
    props["kind"] = {"type": "string", "description": "the kind of this object"}
    props["metadata"] = ({"$ref": meta_ref, "description": "standard object metadata"} if v2 else
                         {"allOf": [{"$ref": meta_ref}], "description": "standard object metadata"})
    sch.setdefault("description", f"{rt.kind} ({rt.api_version}), a custom resource")
    sch["x-kubernetes-group-version-kind"] = [_gvk(rt)]
    return sch


_V2_KEYS = {"type", "format", "description", "title", "maximum", "minimum", "required", "properties", "items",
            "additionalProperties"}


def _v2_schema(sch: Any) -> Any:
    """Keep what Swagger 2.0 (as gnostic encodes it) carries: types, structure, descriptions, ``x-`` keys."""
    if not isinstance(sch, dict):
        return sch
    out: dict = {}
    for k, v in sch.items():
        if k == "properties" and isinstance(v, dict):
            out[k] = {n: _v2_schema(p) for n, p in v.items()}
        elif k in ("items", "additionalProperties") and isinstance(v, dict):
            out[k] = _v2_schema(v)
        elif k == "additionalProperties" and isinstance(v, bool):
            out[k] = v
        elif k in _V2_KEYS - {"properties", "items", "additionalProperties"} or (
                k.startswith("x-kubernetes-") and k != "x-kubernetes-validations"):
            out[k] = v
    if "x-kubernetes-int-or-string" in out:
        out.pop("type", None)
        out["format"] = "int-or-string"
    return out


def _custom_gv_document(custom: Registry, group: str, version: str) -> bytes | None:
    rts = [r for r in custom.types() if r.group == group and r.version == version]
    if not rts:
        return None
    return _gv_doc(rts, group, version, lambda rt: (_custom_name(rt), _custom_schema(
        custom, rt, "#/components/schemas/" + _META)))


@cache
def gv_document(group: str, version: str) -> bytes | None:
    """Encoded OpenAPI v3 document for one builtin group/version, or None if not served."""
    rts = [r for r in RESOURCES if r.group == group and r.version == version]
    if not rts:
        return None
    return _gv_doc(rts, group, version, lambda rt: (_schema_name(rt), _kind_schema(rt)))


def _gv_doc(rts: list[ResourceType], group: str, version: str, schema_of: Any) -> bytes:
    paths: dict = {}
    schemas: dict = {_META: _object_meta()}
    base = "/" + _gv_path(group, version)
    for rt in rts:
        name, schemas[name] = schema_of(rt)
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
def _builtin_root_paths() -> dict:
    paths = {}
    for group, versions in GROUP_VERSIONS.items():
        for v in versions:
            p = _gv_path(group, v)
            digest = hashlib.sha512(gv_document(group, v) or b"").hexdigest()[:32].upper()
            paths[p] = {"serverRelativeURL": f"/openapi/v3/{p}?hash={digest}"}
    return paths


def root_document(custom: Registry | None = None) -> bytes:
    """``/openapi/v3`` discovery: group/version paths with hashed serverRelativeURLs (builtin groups and
    those of ``custom``'s established CRDs)."""
    def build() -> bytes:
        paths = dict(_builtin_root_paths())
        for rt in custom.types() if custom is not None else []:
            p = _gv_path(rt.group, rt.version)
            if p in paths:
                continue
            doc = document_for_path(p, custom) or b""
            digest = hashlib.sha512(doc).hexdigest()[:32].upper()
            paths[p] = {"serverRelativeURL": f"/openapi/v3/{p}?hash={digest}"}
        return json.dumps({"paths": paths}).encode()
    return _cached(custom, "root", build)  # type: ignore[no-any-return]


def document_for_path(path: str, custom: Registry | None = None) -> bytes | None:
    """Document for ``api/v1`` or ``apis/<group>/<version>``; None if unknown."""
    parts = path.strip("/").split("/")
    if len(parts) == 2 and parts[0] == "api":
        return gv_document("", parts[1])
    if len(parts) == 3 and parts[0] == "apis":
        doc = gv_document(parts[1], parts[2])
        if doc is None and custom is not None:
            return _cached(custom, ("gv", parts[1], parts[2]),  # type: ignore[no-any-return]
                           lambda: _custom_gv_document(custom, parts[1], parts[2]))
        return doc
    return None


# ---- /openapi/v2 (Swagger 2.0) ---------------------------------------------------------------------

V2_PROTOBUF = "application/com.github.proto-openapi.spec.v2@v1.0+protobuf"
# The answer's Content-Type, as kube-apiserver sends it (Go's mime parser, which kubectl uses, refuses "@").
V2_PROTOBUF_ALT = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf"


def _v2_kind(rt: ResourceType) -> dict:
    """A kind's Swagger schema: every top-level field known (others are "unknown field" to kubectl's
    client-side validation), metadata typed, spec/status and the like open (any value validates)."""
    props: dict = {"apiVersion": {"type": "string", "description": "versioned schema of this object"},
                   "kind": {"type": "string", "description": "the kind of this object"},
                   "metadata": {"$ref": f"#/definitions/{_META}", "description": "standard object metadata"}}
    for name, (desc, typ) in TOP_FIELDS[f"{rt.api_version}/{rt.kind}"].items():
        props[name] = _typed(desc, typ)
    return {"type": "object", "properties": props,
            "description": f"{rt.kind} ({rt.api_version}), as served by trafficmgr's local API server",
            "x-kubernetes-group-version-kind": [_gvk(rt)]}


def _v2_op(rt: ResourceType, op_id: str, action: str, ref: str, body: bool) -> dict:
    params = [{"name": p, "in": "query", "type": "string", "uniqueItems": True} for p in _QUERY_PARAMS]
    if body:
        params.insert(0, {"name": "body", "in": "body", "required": True, "schema": {"$ref": ref}})
    op: dict = {"tags": [rt.group or "core"], "operationId": op_id, "produces": ["application/json"],
                "parameters": params, "responses": {"200": {"description": "OK", "schema": {"$ref": ref}}},
                "x-kubernetes-action": action, "x-kubernetes-group-version-kind": _gvk(rt)}
    if body:
        op["consumes"] = ["application/json", "application/yaml"]
    return op


@cache
def v2_document() -> dict:
    """The whole builtin API as one Swagger 2.0 document (what ``/openapi/v2`` serves without CRDs)."""
    return _v2_doc(RESOURCES, lambda rt: (_schema_name(rt), _v2_kind(rt)))


def v2_document_with(custom: Registry) -> dict:
    """The Swagger 2.0 document with ``custom``'s kinds added."""
    def build() -> dict:
        rts = custom.types()
        if not rts:
            return v2_document()
        doc = _v2_doc(rts, lambda rt: (_custom_name(rt), _custom_schema(custom, rt, f"#/definitions/{_META}",
                                                                          v2=True)))
        base = v2_document()
        return {**base, "paths": {**base["paths"], **doc["paths"]},
                "definitions": {**base["definitions"], **doc["definitions"]}}
    return _cached(custom, "v2", build)  # type: ignore[no-any-return]


def _v2_doc(rts: list[ResourceType], schema_of: Any) -> dict:
    defs: dict = {_META: {"type": "object", "properties": _meta_fields(),
                          "description": "metadata every persisted object has"}}
    paths: dict = {}
    for rt in rts:
        name, defs[name] = schema_of(rt)
        ref = f"#/definitions/{name}"
        base = "/" + _gv_path(rt.group, rt.version)
        ns = "/namespaces/{namespace}" if rt.namespaced else ""
        coll = f"{base}{ns}/{rt.plural}"
        path_params = [{"name": "namespace", "in": "path", "type": "string"}] if rt.namespaced else []
        paths[coll] = {"get": _v2_op(rt, f"list{rt.kind}", "list", ref, False),
                       "post": _v2_op(rt, f"create{rt.kind}", "post", ref, True),
                       "parameters": path_params}
        paths[coll + "/{name}"] = {
            "get": _v2_op(rt, f"read{rt.kind}", "get", ref, False),
            "put": _v2_op(rt, f"replace{rt.kind}", "put", ref, True),
            # No PATCH operations: kubectl's client-side apply/diff pick the patch type and the strategic
            # merge keys from the PATCH operation it finds for a kind here, and these open schemas lack
            # the merge keys; without one it uses its compiled-in types (complete for every served kind).
            "delete": _v2_op(rt, f"delete{rt.kind}", "delete", ref, False),
            "parameters": [{"name": "name", "in": "path", "type": "string"}, *path_params],
        }
    return {"swagger": "2.0", "info": {"title": "Kubernetes", "version": "v1.32.0"},
            "consumes": ["application/json", "application/yaml"], "produces": ["application/json"],
            "paths": paths, "definitions": defs}


@cache
def v2_json() -> bytes:
    return json.dumps(v2_document()).encode()


@cache
def v2_protobuf() -> bytes:
    return gnostic.document(v2_document())


def v2_for_accept(accept: str, custom: Registry | None = None) -> tuple[bytes, str] | None:
    """``/openapi/v2`` body and content type for an ``Accept`` header: gnostic protobuf when asked for
    (what kubectl asks for), else JSON; None (answer 406) when the header admits neither. ``custom``: the
    store's CRDs, whose kinds are added."""
    with_custom = custom is not None and bool(custom.types())
    ranges = [r.split(";")[0].strip().lower() for r in accept.split(",")] if accept.strip() else ["*/*"]
    for r in ranges:
        if r in (V2_PROTOBUF.lower(), V2_PROTOBUF_ALT.lower()):
            if with_custom:
                assert custom is not None
                return _cached(custom, "v2pb", lambda: gnostic.document(v2_document_with(custom))), V2_PROTOBUF_ALT
            return v2_protobuf(), V2_PROTOBUF_ALT
        if r in ("application/json", "application/*", "*/*"):
            if with_custom:
                assert custom is not None
                return _cached(custom, "v2json", lambda: json.dumps(v2_document_with(custom)).encode()), \
                    "application/json"
            return v2_json(), "application/json"
    return None
