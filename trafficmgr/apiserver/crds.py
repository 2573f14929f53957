"""CustomResourceDefinitions (``apiextensions.k8s.io/v1``) and the custom resources they serve.

Contract (what :class:`Registry` gives one :class:`~.store.Store`):

- A CRD is validated when written (name ``<plural>.<group>``, a group with a dot, ``Namespaced`` or
  ``Cluster`` scope, at least one version, exactly one storage version, an ``openAPIV3Schema`` of type
  ``object`` per served version; 422 otherwise). Its ``status`` is the server's: ``acceptedNames`` (the
  names with ``singular``/``listKind`` defaulted), conditions ``NamesAccepted`` and ``Established``
  (``lastTransitionTime`` kept while unchanged) and ``storedVersions``. A CRD whose plural, kind or short
  name another CRD of the same group already uses gets ``NamesAccepted=False`` and serves nothing.
- Once stored, each served version is a :class:`~.discovery.ResourceType` (``custom=True``) with the
  CRD's short names and categories, the ``status`` subresource when the version declares it; all served
  versions share one storage bucket (conversion ``None``: objects read at another version only get that
  ``apiVersion``). Deleting the CRD deletes its custom resources first (each a DELETED watch event), then
  closes the watches on its kinds.
- A custom resource written through the store is pruned (fields the structural schema does not declare
  are dropped, unless ``x-kubernetes-preserve-unknown-fields``; with ``fieldValidation=Strict`` they are a
  400 instead, as kube-apiserver answers), defaulted (every ``default`` of the schema, at any depth, for
  an absent field of a present object) and validated: type, ``required``, ``enum``, ``minimum``/
  ``maximum``, ``minLength``/``maxLength``, ``pattern``, ``minItems``/``maxItems``, ``nullable``,
  ``x-kubernetes-int-or-string`` -> 422 ``Invalid`` with one cause per field path. Not evaluated:
  ``x-kubernetes-validations`` (CEL), ``format``, ``oneOf``/``anyOf``/``allOf``/``not``, list uniqueness.
- With the ``status`` subresource a create cannot set ``status`` (it starts as the schema's ``status``
  ``default``, if any, as upstream Gateway API CRDs' ``Pending`` conditions); spec writes keep the stored
  status and status writes change nothing else.
- ``metadata.generation`` is 1 at creation and grows by one on a write that changes anything but
  ``metadata`` (and ``status`` when the ``status`` subresource is enabled), as for CRs on a cluster.
- :func:`table` renders ``additionalPrinterColumns`` (simple JSONPath: ``.a.b``, ``[n]``, ``[*]``,
  ``[?(@.f=="v")]``; the first result, arrays/objects as JSON, ``date`` columns as an age).
"""

from __future__ import annotations

import contextvars
import copy
import datetime as _dt
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import yaml

from .discovery import BY_KEY, ResourceType
from .errors import ApiError

CRD = BY_KEY["customresourcedefinitions.apiextensions.k8s.io"]

#: The Gateway API CRDs the project ships (package data; standard channel, written for the fields it reads).
GATEWAY_API_CRDS = Path(__file__).resolve().parent.parent / "plugins" / "gateway_api" / "crds"


def load_manifests(directory: Path) -> list[dict]:
    """The objects of every ``*.yaml`` in ``directory`` (sorted by file name); OSError when unreadable,
    ValueError for invalid YAML, a document that is not an object or no manifest at all."""
    out: list[dict] = []
    for path in sorted(directory.glob("*.yaml")):
        try:
            docs = list(yaml.safe_load_all(path.read_text()))
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: {exc}") from None
        for doc in docs:
            if doc is None:
                continue
            if not isinstance(doc, dict):
                raise ValueError(f"{path}: a document is not an object")
            out.append(doc)
    if not out:
        raise ValueError(f"no manifests in {directory}")
    return out

#: fieldValidation of the HTTP write this thread handles (Strict: unknown fields are a 400).
_VALIDATION: contextvars.ContextVar[str] = contextvars.ContextVar("field_validation", default="")


@contextmanager
def field_validation(mode: str | None) -> Iterator[None]:
    """Writes inside the block use ``mode`` (``Strict``, ``Warn``, ``Ignore``; others: as ``Warn``)."""
    token = _VALIDATION.set(mode or "")
    try:
        yield
    finally:
        _VALIDATION.reset(token)


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@attrs.frozen
class CustomType:
    """One served version of a CRD: its resource type, schema and printer columns."""

    rt: ResourceType
    crd: str  # the CRD's name, <plural>.<group>
    schema: dict
    columns: tuple[dict, ...]


def _version_key(v: str) -> tuple[int, int, int, str]:
    """Kubernetes' version priority: GA > beta > alpha, higher numbers first, then other names."""
    m = re.fullmatch(r"v(\d+)(?:(alpha|beta)(\d+))?", v)
    if not m:
        return (3, 0, 0, v)
    stage = {"alpha": 2, "beta": 1, None: 0}[m.group(2)]
    return (stage, -int(m.group(1)), -int(m.group(3) or 0), v)


# ---- CRD validation and status ---------------------------------------------------------------------

def _crd_invalid(name: str, errors: list[tuple[str, str]]) -> ApiError:
    msgs = [f"{path}: {msg}" for path, msg in errors]
    text = msgs[0] if len(msgs) == 1 else "[" + ", ".join(msgs) + "]"
    causes = [{"reason": "FieldValueInvalid", "message": msg, "field": path} for path, msg in errors]
    return ApiError(422, "Invalid", f'CustomResourceDefinition.apiextensions.k8s.io "{name}" is invalid: {text}',
                    {"name": name, "group": CRD.group, "kind": CRD.kind, "causes": causes})


def validate_crd(obj: dict) -> None:
    """Raise 422 for a CRD this server cannot serve (see the module docstring)."""
    name = obj["metadata"].get("name", "")
    spec = obj.get("spec")
    errors: list[tuple[str, str]] = []
    if not isinstance(spec, dict):
        raise _crd_invalid(name, [("spec", "Required value")])
    group = spec.get("group")
    names = spec["names"] if isinstance(spec.get("names"), dict) else {}
    plural, kind = names.get("plural"), names.get("kind")
    if not isinstance(group, str) or not group:
        errors.append(("spec.group", "Required value"))
    elif "." not in group:
        errors.append(("spec.group", f'Invalid value: "{group}": should be a domain with at least one dot'))
    if not isinstance(plural, str) or not plural:
        errors.append(("spec.names.plural", "Required value"))
    elif not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", plural):
        errors.append(("spec.names.plural", f'Invalid value: "{plural}": a lowercase RFC 1123 label'))
    if not isinstance(kind, str) or not kind:
        errors.append(("spec.names.kind", "Required value"))
    if isinstance(group, str) and isinstance(plural, str) and name != f"{plural}.{group}":
        errors.append(("metadata.name", f'Invalid value: "{name}": must be spec.names.plural+"."+spec.group'))
    if spec.get("scope") not in ("Namespaced", "Cluster"):
        errors.append(("spec.scope", f'Unsupported value: "{spec.get("scope")}": supported values: '
                                     '"Cluster", "Namespaced"'))
    versions = spec.get("versions")
    if not isinstance(versions, list) or not versions:
        errors.append(("spec.versions", "Invalid value: must have exactly one version marked as storage version"))
        versions = []
    seen: set[str] = set()
    storage = 0
    for i, v in enumerate(versions):
        p = f"spec.versions[{i}]"
        if not isinstance(v, dict) or not isinstance(v.get("name"), str) or not v["name"]:
            errors.append((f"{p}.name", "Required value"))
            continue
        if v["name"] in seen:
            errors.append((f"{p}.name", f'Duplicate value: "{v["name"]}"'))
        seen.add(v["name"])
        storage += bool(v.get("storage"))
        sch = (v.get("schema") or {}).get("openAPIV3Schema")
        if v.get("served") and not isinstance(sch, dict):
            errors.append((f"{p}.schema.openAPIV3Schema", "Required value: schemas are required"))
        elif isinstance(sch, dict) and sch.get("type") != "object":
            errors.append((f"{p}.schema.openAPIV3Schema.type", 'Unsupported value: must be "object" at the root'))
        for j, col in enumerate(v.get("additionalPrinterColumns") or []):
            if not isinstance(col, dict) or not col.get("name") or not col.get("jsonPath"):
                errors.append((f"{p}.additionalPrinterColumns[{j}]", "Required value: name and jsonPath"))
            elif col.get("type") not in ("integer", "number", "string", "boolean", "date"):
                errors.append((f"{p}.additionalPrinterColumns[{j}].type",
                               f'Unsupported value: "{col.get("type")}"'))
    if versions and storage != 1:
        errors.append(("spec.versions", "Invalid value: must have exactly one version marked as storage version"))
    if errors:
        raise _crd_invalid(name, errors)


def accepted_names(spec: dict) -> dict:
    """``status.acceptedNames`` of a valid CRD spec (singular and listKind defaulted)."""
    names = spec["names"]
    out = {"plural": names["plural"], "singular": names.get("singular") or names["kind"].lower(),
           "kind": names["kind"], "listKind": names.get("listKind") or names["kind"] + "List"}
    if names.get("shortNames"):
        out["shortNames"] = list(names["shortNames"])
    if names.get("categories"):
        out["categories"] = list(names["categories"])
    return out


def _condition(old: list[dict], ctype: str, status: str, reason: str, message: str) -> dict:
    prev = next((c for c in old if isinstance(c, dict) and c.get("type") == ctype), None)
    when = prev.get("lastTransitionTime") if prev and prev.get("status") == status else None
    return {"type": ctype, "status": status, "lastTransitionTime": when or _now(), "reason": reason,
            "message": message}


# ---- schema: prune, default, validate ----------------------------------------------------------------

_TYPES: dict[str, tuple[type, ...]] = {"object": (dict,), "array": (list,), "string": (str,), "integer": (int,),
                                       "number": (int, float), "boolean": (bool,)}


def _type_name(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    return "array" if isinstance(v, list) else "object"


def _shown(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (str, int, float, bool)) or v is None else _type_name(v)


@attrs.define
class _Walk:
    errors: list[tuple[str, str, str]] = attrs.field(factory=list)  # (path, reason, message)
    unknown: list[str] = attrs.field(factory=list)

    def bad(self, path: str, reason: str, msg: str) -> None:
        self.errors.append((path, reason, msg))


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _walk(value: Any, sch: dict, path: str, w: _Walk) -> Any:
    """Prune/default ``value`` in place (it is a fresh copy) and record errors; returns the value."""
    if value is None:
        if not sch.get("nullable"):
            typ = sch.get("type")
            if typ:
                w.bad(path, "FieldValueTypeInvalid",
                      f'Invalid value: "null": {path} in body must be of type {typ}: "null"')
        return value
    if sch.get("x-kubernetes-int-or-string"):
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            w.bad(path, "FieldValueTypeInvalid", f'Invalid value: "{_type_name(value)}": {path} in body must be '
                  f'of type integer or string: "{_type_name(value)}"')
        return value
    typ = sch.get("type")
    if typ in _TYPES:
        ok = isinstance(value, _TYPES[typ]) and not (typ in ("integer", "number") and isinstance(value, bool))
        if typ == "integer" and isinstance(value, float) and value.is_integer():
            ok = True
        if not ok:
            w.bad(path, "FieldValueTypeInvalid", f'Invalid value: "{_type_name(value)}": {path} in body must be '
                  f'of type {typ}: "{_type_name(value)}"')
            return value
    if "enum" in sch and value not in sch["enum"]:
        allowed = ", ".join(json.dumps(e) for e in sch["enum"])
        w.bad(path, "FieldValueNotSupported", f"Unsupported value: {_shown(value)}: supported values: {allowed}")
    if isinstance(value, dict):
        _walk_object(value, sch, path, w)
    elif isinstance(value, list):
        if "maxItems" in sch and len(value) > sch["maxItems"]:
            w.bad(path, "FieldValueTooMany", f"Too many: {len(value)}: must have at most {sch['maxItems']} items")
        if "minItems" in sch and len(value) < sch["minItems"]:
            w.bad(path, "FieldValueInvalid", f"Invalid value: {len(value)}: {path} in body should have at least "
                  f"{sch['minItems']} items")
        items = sch.get("items")
        if isinstance(items, dict):
            for i, item in enumerate(value):
                value[i] = _walk(item, items, f"{path}[{i}]", w)
    elif isinstance(value, str):
        too_long = "maxLength" in sch and len(value) > sch["maxLength"]
        if too_long:
            w.bad(path, "FieldValueTooLong", f"Too long: may not be longer than {sch['maxLength']}")
        if "minLength" in sch and len(value) < sch["minLength"]:
            w.bad(path, "FieldValueInvalid", f"Invalid value: {_shown(value)}: {path} in body should be at least "
                  f"{sch['minLength']} chars long")
        # Python's re backtracks (Go's RE2 does not): a pattern runs only on a value within its maxLength, so a
        # long value cannot make a schema's nested quantifiers take quadratic (or worse) time.
        if "pattern" in sch and not too_long:
            try:
                matched = re.search(sch["pattern"], value) is not None
            except re.error:
                matched = True  # a Go-only pattern: not checked here
            if not matched:
                w.bad(path, "FieldValueInvalid", f"Invalid value: {_shown(value)}: {path} in body should match "
                      f"'{sch['pattern']}'")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in sch and (value < sch["minimum"] or (sch.get("exclusiveMinimum") and value == sch["minimum"])):
            w.bad(path, "FieldValueInvalid", f"Invalid value: {value}: {path} in body should be greater than or "
                  f"equal to {sch['minimum']}")
        if "maximum" in sch and (value > sch["maximum"] or (sch.get("exclusiveMaximum") and value == sch["maximum"])):
            w.bad(path, "FieldValueInvalid", f"Invalid value: {value}: {path} in body should be less than or "
                  f"equal to {sch['maximum']}")
    return value


def _walk_object(value: dict, sch: dict, path: str, w: _Walk) -> None:
    props = sch.get("properties") or {}
    extra = sch.get("additionalProperties")
    keep = bool(sch.get("x-kubernetes-preserve-unknown-fields")) or extra is True
    for k in list(value):
        if k in props:
            value[k] = _walk(value[k], props[k], _join(path, k), w)
        elif isinstance(extra, dict):
            value[k] = _walk(value[k], extra, f"{path}[{k}]", w)
        elif not keep and (props or sch.get("type") == "object"):
            w.unknown.append(_join(path, k))
            del value[k]
    for k, p in props.items():
        if k not in value and isinstance(p, dict) and "default" in p:
            value[k] = _walk(copy.deepcopy(p["default"]), p, _join(path, k), w)
    for r in sch.get("required") or []:
        if r not in value:
            w.bad(_join(path, r), "FieldValueRequired", "Required value")


# ---- printer columns --------------------------------------------------------------------------------

_SEGMENT = re.compile(r"""\.([A-Za-z0-9_\-]+)|\[(\*|-?\d+)\]|\[\?\(@((?:\.[A-Za-z0-9_\-]+)+)\s*==\s*(?:"([^"]*)"|'([^']*)')\)\]""")


def json_path(obj: Any, expr: str) -> list[Any]:
    """Values of a simple JSONPath (``.a.b``, ``[n]``, ``[*]``, ``[?(@.f=="v")]``; ``{}`` optional)."""
    expr = expr.strip()
    if expr.startswith("{") and expr.endswith("}"):
        expr = expr[1:-1].strip()
    if expr.startswith("$"):
        expr = expr[1:]
    cur = [obj]
    pos = 0
    while pos < len(expr):
        m = _SEGMENT.match(expr, pos)
        if m is None:
            return []
        pos = m.end()
        nxt: list[Any] = []
        for v in cur:
            if m.group(1) is not None:
                if isinstance(v, dict) and m.group(1) in v:
                    nxt.append(v[m.group(1)])
            elif m.group(2) is not None:
                if isinstance(v, list):
                    if m.group(2) == "*":
                        nxt.extend(v)
                    else:
                        i = int(m.group(2))
                        if -len(v) <= i < len(v):
                            nxt.append(v[i])
            elif isinstance(v, list):
                want = m.group(4) if m.group(4) is not None else m.group(5)
                field = m.group(3)[1:].split(".")
                for item in v:
                    got: Any = item
                    for f in field:
                        got = got.get(f) if isinstance(got, dict) else None
                    if got is not None and str(got) == want:
                        nxt.append(item)
        cur = nxt
    return cur


def _cell(col: dict, obj: dict, age: Any) -> Any:
    found = json_path(obj, col["jsonPath"])
    if not found or found[0] is None:
        return None
    v = found[0]
    typ = col.get("type", "string")
    if typ == "date":
        return age(v) if isinstance(v, str) else None
    if typ == "string":
        return v if isinstance(v, str) else json.dumps(v, separators=(",", ":"))
    if typ == "integer":
        return v if isinstance(v, int) and not isinstance(v, bool) else None
    if typ == "number":
        return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None
    if typ == "boolean":
        return v if isinstance(v, bool) else None
    return None


# ---- the registry -----------------------------------------------------------------------------------

class Registry:
    """The custom resource types one store serves (thread-safe; the store calls it under its lock)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._types: dict[tuple[str, str, str], CustomType] = {}  # (group, version, plural)
        self._by_crd: dict[str, list[CustomType]] = {}
        self._generation = 0  # grows with every change of the served types (OpenAPI caches key on it)
        #: OpenAPI documents of the custom kinds (see openapi._cached), valid for one ``generation``
        self.cache: dict[Any, Any] = {}

    @property
    def generation(self) -> int:
        return self._generation

    def types(self) -> list[ResourceType]:
        """Every served custom resource type, by group, then version priority."""
        with self._lock:
            cts = list(self._types.values())
        cts.sort(key=lambda c: (c.rt.group, _version_key(c.rt.version), c.rt.plural))
        return [c.rt for c in cts]

    def custom(self, rt: ResourceType) -> CustomType | None:
        with self._lock:
            return self._types.get((rt.group, rt.version, rt.plural))

    def by_gvr(self, group: str, version: str, plural: str) -> ResourceType | None:
        with self._lock:
            ct = self._types.get((group, version, plural))
        return ct.rt if ct else None

    def by_gvk(self, api_version: str, kind: str) -> ResourceType | None:
        group, _, version = api_version.rpartition("/")
        with self._lock:
            for ct in self._types.values():
                if ct.rt.group == group and ct.rt.version == version and ct.rt.kind == kind:
                    return ct.rt
        return None

    def resolve(self, name: str) -> ResourceType | None:
        """A custom type by ``plural.group``, plural, singular, kind, short name or ``apiVersion/Kind``
        (the highest-priority version)."""
        low = name.lower()
        for rt in self.types():
            if low in (rt.key, rt.plural, rt.singular, rt.kind.lower()) or low in rt.short_names:
                return rt
        if "/" in name:
            api_version, _, kind = name.rpartition("/")
            return self.by_gvk(api_version, kind)
        return None

    def types_of(self, crd_name: str) -> list[ResourceType]:
        with self._lock:
            return [c.rt for c in self._by_crd.get(crd_name, [])]

    # ---- writes (called by the store) ------------------------------------------------------------

    def prepare(self, rt: ResourceType, obj: dict, old: dict | None, subresource: str | None = None) -> None:
        """Before a write commits: validate a CRD and compute its status, or prune/default/validate a
        custom resource and set its generation (see the module docstring). Raises ApiError."""
        if rt.key == CRD.key:
            if subresource is None:
                self._prepare_crd(obj, old)
        elif rt.custom:
            self._prepare_cr(rt, obj, old, subresource)

    def _conflicts(self, name: str, spec: dict) -> str | None:
        names = accepted_names(spec)
        mine = {names["plural"], names["singular"], names["kind"].lower(), *names.get("shortNames", [])}
        with self._lock:
            for other, cts in self._by_crd.items():
                if other == name or not cts or cts[0].rt.group != spec["group"]:
                    continue
                rt = cts[0].rt
                theirs = {rt.plural, rt.singular, rt.kind.lower(), *rt.short_names}
                clash = sorted(mine & theirs)
                if clash:
                    return f'"{clash[0]}" is already in use'
        return None

    def _prepare_crd(self, obj: dict, old: dict | None) -> None:
        validate_crd(obj)
        spec = obj["spec"]
        md = obj["metadata"]
        if old is not None:
            ospec = old.get("spec") or {}
            if ospec.get("group") != spec.get("group"):
                raise _crd_invalid(md["name"], [("spec.group", "Invalid value: field is immutable")])
            if ospec.get("scope") != spec.get("scope"):
                raise _crd_invalid(md["name"], [("spec.scope", "Invalid value: field is immutable")])
            md["generation"] = (old["metadata"].get("generation") or 1) + (spec != ospec)
        else:
            md["generation"] = 1
        prev = (old or {}).get("status") or {}
        conds = prev.get("conditions") or []
        conflict = self._conflicts(md["name"], spec)
        stored = list(prev.get("storedVersions") or [])
        storage = next(v["name"] for v in spec["versions"] if v.get("storage"))
        if storage not in stored:
            stored.append(storage)
        if conflict:
            status = {"conditions": [
                _condition(conds, "NamesAccepted", "False", "NameConflict", conflict),
                _condition(conds, "Established", "False", "NotAccepted", "not all names are accepted")],
                "acceptedNames": {"plural": "", "kind": ""}, "storedVersions": stored}
        else:
            status = {"conditions": [
                _condition(conds, "NamesAccepted", "True", "NoConflicts", "no conflicts found"),
                _condition(conds, "Established", "True", "InitialNamesAccepted",
                           "the initial names have been accepted")],
                "acceptedNames": accepted_names(spec), "storedVersions": stored}
        obj["status"] = status

    def _prepare_cr(self, rt: ResourceType, obj: dict, old: dict | None, subresource: str | None) -> None:
        ct = self.custom(rt)
        if ct is None:  # the CRD went away between routing and writing
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        w = _Walk()
        props = ct.schema.get("properties") or {}
        if old is None and rt.has_status:
            obj.pop("status", None)  # as kube-apiserver: a create cannot set the status of such a kind ...
            sst = props.get("status")
            if isinstance(sst, dict) and "default" in sst:  # ... which starts as its schema's default
                obj["status"] = _walk(copy.deepcopy(sst["default"]), sst, "status", w)
        keep = bool(ct.schema.get("x-kubernetes-preserve-unknown-fields"))
        fields = ["status"] if subresource == "status" else [
            k for k in obj if k not in ("apiVersion", "kind", "metadata") and not (k == "status" and rt.has_status)]
        for k in fields:
            if k not in obj:
                continue
            if subresource == "status":
                obj[k] = copy.deepcopy(obj[k])  # the status write's object shares the stored dicts
            if k in props:
                obj[k] = _walk(obj[k], props[k], k, w)
            elif not keep:
                w.unknown.append(k)
                del obj[k]
        if subresource is None:
            for k, p in props.items():
                if k not in obj and k not in ("metadata", "apiVersion", "kind") and isinstance(p, dict) \
                        and "default" in p and not (k == "status" and rt.has_status):
                    obj[k] = _walk(copy.deepcopy(p["default"]), p, k, w)
            for r in ct.schema.get("required") or []:
                if r not in obj and r not in ("metadata", "apiVersion", "kind"):
                    w.bad(r, "FieldValueRequired", "Required value")
        name = obj["metadata"].get("name", "")
        if w.unknown and _VALIDATION.get() == "Strict":
            shown = ", ".join(f'unknown field "{u}"' for u in w.unknown)
            raise ApiError(400, "BadRequest", f'{rt.kind} in version "{rt.version}" cannot be handled as a '
                           f"{rt.kind}: strict decoding error: {shown}")
        if w.errors:
            msgs = [f"{p}: {m}" for p, _, m in w.errors]
            text = msgs[0] if len(msgs) == 1 else "[" + ", ".join(msgs) + "]"
            causes = [{"reason": r, "message": m, "field": p} for p, r, m in w.errors]
            raise ApiError(422, "Invalid", f'{rt.kind}.{rt.group} "{name}" is invalid: {text}',
                           {"name": name, "group": rt.group, "kind": rt.kind, "causes": causes})
        if subresource is None:
            md = obj["metadata"]
            if old is None:
                md["generation"] = 1
            else:
                skip = ("metadata", "status") if rt.has_status else ("metadata",)
                changed = ({k: v for k, v in obj.items() if k not in skip}
                           != {k: v for k, v in old.items() if k not in skip})
                md["generation"] = (old["metadata"].get("generation") or 1) + changed

    def committed(self, etype: str, crd: dict) -> tuple[list[ResourceType], list[ResourceType]]:
        """After a CRD event: (re)register its served versions; returns (types added, types removed)."""
        name = crd["metadata"]["name"]
        with self._lock:
            before = self._by_crd.pop(name, [])
            for ct in before:
                self._types.pop((ct.rt.group, ct.rt.version, ct.rt.plural), None)
            after: list[CustomType] = []
            est = next((c for c in (crd.get("status") or {}).get("conditions") or []
                        if c.get("type") == "Established"), None)
            if etype != "DELETED" and est is not None and est.get("status") == "True":
                after = _types_of(crd, {(c.rt.version): c for c in before})
                for ct in after:
                    self._types[(ct.rt.group, ct.rt.version, ct.rt.plural)] = ct
                self._by_crd[name] = after
            if after != before:  # a status- or metadata-only change keeps the OpenAPI documents
                self._generation += 1
        kept = {c.rt for c in after}
        return [c.rt for c in after if c.rt not in {b.rt for b in before}], [b.rt for b in before if b.rt not in kept]

    def table(self, rt: ResourceType, age: Any) -> tuple[list[tuple[str, str, int]], Any] | None:
        """(columns (name, type, priority), row function) of a custom type (its ``additionalPrinterColumns``,
        else Name and Age), None for a builtin. ``age(timestamp)`` renders ``date`` cells."""
        ct = self.custom(rt)
        if ct is None:
            return None
        extra = list(ct.columns) or [{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]
        cols = [("Name", "string", 0)] + [(c["name"], c.get("type", "string"), int(c.get("priority") or 0))
                                          for c in extra]

        def row(o: dict) -> list[Any]:
            return [o["metadata"]["name"], *(_cell(c, o, age) for c in extra)]

        return cols, row


def _types_of(crd: dict, previous: dict[str, CustomType]) -> list[CustomType]:
    spec = crd["spec"]
    names = accepted_names(spec)
    out = []
    for v in spec["versions"]:
        if not v.get("served"):
            continue
        subs = tuple(s for s in ("status",) if s in (v.get("subresources") or {}))
        rt = ResourceType(spec["group"], v["name"], names["plural"], names["kind"], spec["scope"] == "Namespaced",
                          tuple(names.get("shortNames") or ()), tuple(names.get("categories") or ()), subs,
                          "status" in subs, names["singular"], True)
        prev = previous.get(v["name"])
        if prev is not None and prev.rt == rt:
            rt = prev.rt  # the same object: watches and history keep matching it
        schema = (v.get("schema") or {}).get("openAPIV3Schema") or {"type": "object"}
        out.append(CustomType(rt, crd["metadata"]["name"], schema, tuple(v.get("additionalPrinterColumns") or ())))
    return out


__all__ = ["CRD", "GATEWAY_API_CRDS", "CustomType", "Registry", "accepted_names", "field_validation", "json_path",
           "load_manifests", "validate_crd"]
