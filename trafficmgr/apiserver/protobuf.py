"""Decoder for Kubernetes protobuf request bodies (``application/vnd.kubernetes.protobuf``).

kubectl's typed clients (``kubectl create namespace|secret|configmap|service``) send protobuf and do
not fall back to JSON. This decodes the ``k8s\\x00`` envelope and the handful of kinds those commands
send, using hand-written field tables from k8s.io/api ``generated.proto``. Unknown fields are skipped.
"""

from __future__ import annotations

import base64
import datetime as _dt
from typing import Any

MAGIC = b"k8s\x00"

# field number -> (json name, type, repeated)
Schema = dict[int, tuple[str, str, bool]]
SCHEMAS: dict[str, Schema] = {
    "Unknown": {1: ("typeMeta", "msg:TypeMeta", False), 2: ("raw", "rawbytes", False),
                3: ("contentEncoding", "string", False), 4: ("contentType", "string", False)},
    "TypeMeta": {1: ("apiVersion", "string", False), 2: ("kind", "string", False)},
    "ObjectMeta": {1: ("name", "string", False), 2: ("generateName", "string", False),
                   3: ("namespace", "string", False), 5: ("uid", "string", False),
                   6: ("resourceVersion", "string", False), 7: ("generation", "int", False),
                   11: ("labels", "map:string", False), 12: ("annotations", "map:string", False),
                   13: ("ownerReferences", "msg:OwnerReference", True), 14: ("finalizers", "string", True)},
    "OwnerReference": {1: ("kind", "string", False), 3: ("name", "string", False), 4: ("uid", "string", False),
                       5: ("apiVersion", "string", False), 6: ("controller", "bool", False),
                       7: ("blockOwnerDeletion", "bool", False)},
    "Namespace": {1: ("metadata", "msg:ObjectMeta", False), 2: ("spec", "msg:NamespaceSpec", False)},
    "NamespaceSpec": {1: ("finalizers", "string", True)},
    "Secret": {1: ("metadata", "msg:ObjectMeta", False), 2: ("data", "map:bytes", False),
               3: ("type", "string", False), 4: ("stringData", "map:string", False),
               5: ("immutable", "bool", False)},
    "ConfigMap": {1: ("metadata", "msg:ObjectMeta", False), 2: ("data", "map:string", False),
                  3: ("binaryData", "map:bytes", False), 4: ("immutable", "bool", False)},
    "Service": {1: ("metadata", "msg:ObjectMeta", False), 2: ("spec", "msg:ServiceSpec", False)},
    "ServiceSpec": {1: ("ports", "msg:ServicePort", True), 2: ("selector", "map:string", False),
                    3: ("clusterIP", "string", False), 4: ("type", "string", False),
                    5: ("externalIPs", "string", True), 7: ("sessionAffinity", "string", False),
                    10: ("externalName", "string", False), 13: ("publishNotReadyAddresses", "bool", False),
                    18: ("clusterIPs", "string", True)},
    "ServicePort": {1: ("name", "string", False), 2: ("protocol", "string", False), 3: ("port", "int", False),
                    4: ("targetPort", "intorstr", False), 5: ("nodePort", "int", False),
                    6: ("appProtocol", "string", False)},
    "IntOrString": {1: ("type", "int", False), 2: ("intVal", "int", False), 3: ("strVal", "string", False)},
    "ServiceAccount": {1: ("metadata", "msg:ObjectMeta", False)},
    "Deployment": {1: ("metadata", "msg:ObjectMeta", False), 2: ("spec", "msg:DeploymentSpec", False)},
    "DeploymentSpec": {1: ("replicas", "pint", False), 2: ("selector", "msg:LabelSelector", False),
                       3: ("template", "msg:PodTemplateSpec", False)},
    "LabelSelector": {1: ("matchLabels", "map:string", False),
                      2: ("matchExpressions", "msg:LabelSelectorRequirement", True)},
    "LabelSelectorRequirement": {1: ("key", "string", False), 2: ("operator", "string", False),
                                 3: ("values", "string", True)},
    "PodTemplateSpec": {1: ("metadata", "msg:ObjectMeta", False), 2: ("spec", "msg:PodSpec", False)},
    "PodSpec": {2: ("containers", "msg:Container", True), 20: ("initContainers", "msg:Container", True)},
    "Container": {1: ("name", "string", False), 2: ("image", "string", False), 3: ("command", "string", True),
                  4: ("args", "string", True), 5: ("workingDir", "string", False),
                  6: ("ports", "msg:ContainerPort", True), 7: ("env", "msg:EnvVar", True),
                  14: ("imagePullPolicy", "string", False)},
    "ContainerPort": {1: ("name", "string", False), 2: ("hostPort", "int", False),
                      3: ("containerPort", "pint", False), 4: ("protocol", "string", False)},
    "EnvVar": {1: ("name", "string", False), 2: ("value", "string", False)},
    # authentication.k8s.io/v1 (kubectl create token sends a TokenRequest as protobuf)
    "TokenRequest": {1: ("metadata", "msg:ObjectMeta", False), 2: ("spec", "msg:TokenRequestSpec", False)},
    "TokenRequestSpec": {1: ("audiences", "string", True), 3: ("boundObjectRef", "msg:BoundObjectReference", False),
                         4: ("expirationSeconds", "pint", False)},
    "BoundObjectReference": {1: ("kind", "string", False), 2: ("apiVersion", "string", False),
                             3: ("name", "string", False), 4: ("uid", "string", False)},
    "TokenReview": {1: ("metadata", "msg:ObjectMeta", False), 2: ("spec", "msg:TokenReviewSpec", False)},
    "TokenReviewSpec": {1: ("token", "string", False), 2: ("audiences", "string", True)},
}


class ProtobufError(ValueError):
    """The body is not decodable protobuf for a supported kind."""


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(buf):
            raise ProtobufError("truncated varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def _fields(buf: bytes) -> list[tuple[int, int, Any]]:
    out, i = [], 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wt = key >> 3, key & 7
        val: int | bytes
        if wt == 0:
            val, i = _varint(buf, i)
        elif wt == 2:
            n, i = _varint(buf, i)
            val, i = buf[i:i + n], i + n
        elif wt == 1:
            val, i = buf[i:i + 8], i + 8
        elif wt == 5:
            val, i = buf[i:i + 4], i + 4
        else:
            raise ProtobufError(f"unsupported wire type {wt}")
        out.append((num, wt, val))
    return out


def _decode(buf: bytes, schema_name: str) -> dict:
    schema = SCHEMAS[schema_name]
    obj: dict[str, Any] = {}
    for num, _wt, val in _fields(buf):
        if num not in schema:
            continue
        name, typ, repeated = schema[num]
        if typ == "string":
            v: Any = val.decode()
        elif typ == "rawbytes":
            v = val
        elif typ in ("int", "pint"):
            v = val - (1 << 64) if val >= 1 << 63 else val
        elif typ == "bool":
            v = bool(val)
        elif typ.startswith("map:"):
            kv = {n: x for n, _, x in _fields(val)}
            k = kv.get(1, b"").decode()
            raw = kv.get(2, b"")
            obj.setdefault(name, {})[k] = base64.b64encode(raw).decode() if typ == "map:bytes" else raw.decode()
            continue
        elif typ == "intorstr":
            ios = _decode(val, "IntOrString")
            v = ios.get("strVal", "") if ios.get("type") == 1 else ios.get("intVal", 0)
        elif typ == "time":
            secs = {n: x for n, _, x in _fields(val)}.get(1, 0)
            v = _dt.datetime.fromtimestamp(secs, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        elif typ.startswith("msg:"):
            v = _decode(val, typ[4:])
        else:
            continue
        if repeated:
            obj.setdefault(name, []).append(v)
        elif v not in ("", 0, False) or typ in ("intorstr", "pint") or isinstance(v, dict):
            obj[name] = v
    return obj


def decode(body: bytes) -> dict:
    """Decode a protobuf-encoded object into its JSON dict form; raises ProtobufError."""
    if not body.startswith(MAGIC):
        raise ProtobufError("missing k8s protobuf magic prefix")
    env = _decode(body[len(MAGIC):], "Unknown")
    tm = env.get("typeMeta") or {}
    kind = tm.get("kind", "")
    if kind not in SCHEMAS or "metadata" not in SCHEMAS[kind].get(1, ("",))[0]:
        raise ProtobufError(f"protobuf bodies for kind {kind!r} are not supported; use JSON")
    obj = _decode(env.get("raw", b""), kind)
    obj = {"apiVersion": tm.get("apiVersion", "v1"), "kind": kind, **obj}
    return obj
