"""Encoder of a Swagger 2.0 document (a JSON dict) into gnostic's ``openapi.v2.Document`` protobuf.

kubectl fetches ``/openapi/v2`` only as ``application/com.github.proto-openapi.spec.v2@v1.0+protobuf``
and decodes it with gnostic's generated Go types (github.com/google/gnostic-models, OpenAPIv2.proto);
it has no JSON fallback. Field numbers below are those of that .proto. Only the parts of Swagger this
server emits are encoded: ``swagger``, ``info``, ``consumes``/``produces``, ``paths`` (operations with
query/path/body parameters and ``200`` responses) and ``definitions`` (schemas with ``$ref``,
``type``, ``format``, ``description``, ``required``, ``properties``, ``additionalProperties``,
``items``, ``allOf`` and ``x-`` vendor extensions). Anything else raises ``ValueError`` (a bug here,
never client input: the document is built by :mod:`.openapi`).
"""

from __future__ import annotations

import json
import struct
from typing import Any

from trafficmgr.core.wire import field as wire_field
from trafficmgr.core.wire import varint


def _key(field: int, wire: int) -> bytes:
    return varint(field << 3 | wire)


_bytes = wire_field  # a length-delimited field


def _str(field: int, s: str) -> bytes:
    return _bytes(field, s.encode()) if s else b""


def _bool(field: int, v: bool) -> bytes:
    return _key(field, 0) + b"\x01" if v else b""


def _double(field: int, v: float) -> bytes:
    return _key(field, 1) + struct.pack("<d", v)


def _named_any(field: int, name: str, value: Any) -> bytes:
    """A vendor extension: ``NamedAny{name, Any{yaml}}`` (JSON is YAML, which gnostic/kube-openapi parse)."""
    return _bytes(field, _str(1, name) + _bytes(2, _str(2, json.dumps(value, sort_keys=True))))


def schema(s: dict) -> bytes:
    """Encode one Swagger schema object as ``openapi.v2.Schema``."""
    out = bytearray()
    for k, v in s.items():
        if k == "$ref":
            out += _str(1, v)
        elif k == "format":
            out += _str(2, v)
        elif k == "title":
            out += _str(3, v)
        elif k == "description":
            out += _str(4, v)
        elif k == "maximum":
            out += _double(7, float(v))
        elif k == "minimum":
            out += _double(9, float(v))
        elif k == "required":
            for r in v:
                out += _str(19, r)
        elif k == "additionalProperties":
            inner = _bytes(1, schema(v)) if isinstance(v, dict) else _bool(2, bool(v)) or _key(2, 0) + b"\x00"
            out += _bytes(21, inner)
        elif k == "type":
            out += _bytes(22, b"".join(_str(1, t) for t in ([v] if isinstance(v, str) else v)))
        elif k == "items":
            out += _bytes(23, b"".join(_bytes(1, schema(i)) for i in ([v] if isinstance(v, dict) else v)))
        elif k == "allOf":
            for sub in v:
                out += _bytes(24, schema(sub))
        elif k == "properties":
            out += _bytes(25, b"".join(_bytes(1, _str(1, n) + _bytes(2, schema(p))) for n, p in v.items()))
        elif k.startswith("x-"):
            out += _named_any(31, k, v)
        else:
            raise ValueError(f"schema key {k!r} is not encoded")
    return bytes(out)


def _parameter(p: dict) -> bytes:
    where = p["in"]
    if where == "body":
        body = (_str(1, p.get("description", "")) + _str(2, p["name"]) + _str(3, "body")
                + _bool(4, p.get("required", False)) + _bytes(5, schema(p["schema"])))
        param = _bytes(1, body)
    elif where == "query":
        q = (_bool(1, p.get("required", False)) + _str(2, "query") + _str(3, p.get("description", ""))
             + _str(4, p["name"]) + _str(6, p.get("type", "string")) + _bool(20, p.get("uniqueItems", False)))
        param = _bytes(2, _bytes(3, q))
    elif where == "path":
        q = (_bool(1, True) + _str(2, "path") + _str(3, p.get("description", "")) + _str(4, p["name"])
             + _str(5, p.get("type", "string")) + _bool(19, p.get("uniqueItems", False)))
        param = _bytes(2, _bytes(4, q))
    else:
        raise ValueError(f"parameter location {where!r} is not encoded")
    return _bytes(1, param)  # ParametersItem.parameter


def _operation(op: dict) -> bytes:
    out = bytearray()
    for t in op.get("tags", []):
        out += _str(1, t)
    out += _str(3, op.get("description", ""))
    out += _str(5, op.get("operationId", ""))
    for c in op.get("produces", []):
        out += _str(6, c)
    for c in op.get("consumes", []):
        out += _str(7, c)
    for p in op.get("parameters", []):
        out += _bytes(8, _parameter(p))
    codes = b""
    for code, resp in op.get("responses", {}).items():
        r = _str(1, resp.get("description", ""))
        if "schema" in resp:
            r += _bytes(2, _bytes(1, schema(resp["schema"])))
        codes += _bytes(1, _str(1, code) + _bytes(2, _bytes(1, r)))
    out += _bytes(9, codes)
    for k, v in op.items():
        if k.startswith("x-"):
            out += _named_any(13, k, v)
    return bytes(out)


_METHODS = {"get": 2, "put": 3, "post": 4, "delete": 5, "options": 6, "head": 7, "patch": 8}


def _path_item(item: dict) -> bytes:
    out = bytearray()
    for method, op in item.items():
        if method == "parameters":
            for p in op:
                out += _bytes(9, _parameter(p))
        else:
            out += _bytes(_METHODS[method], _operation(op))
    return bytes(out)


def document(doc: dict) -> bytes:
    """Encode a Swagger 2.0 document dict as a serialized ``openapi.v2.Document``."""
    out = bytearray(_str(1, doc["swagger"]))
    info = doc.get("info", {})
    out += _bytes(2, _str(1, info.get("title", "")) + _str(2, info.get("version", "")))
    for c in doc.get("consumes", []):
        out += _str(6, c)
    for c in doc.get("produces", []):
        out += _str(7, c)
    paths = b"".join(_bytes(2, _str(1, p) + _bytes(2, _path_item(item))) for p, item in doc.get("paths", {}).items())
    out += _bytes(8, paths)
    defs = b"".join(_bytes(1, _str(1, n) + _bytes(2, schema(s))) for n, s in doc.get("definitions", {}).items())
    out += _bytes(9, defs)
    return bytes(out)


__all__ = ["document", "schema"]
