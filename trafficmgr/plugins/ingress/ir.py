"""The Ingress IR: ``networking.k8s.io/v1`` Ingress and IngressClass objects as frozen attrs classes.

``convert_ingress`` / ``convert_class`` are the only functions that read raw Kubernetes dicts.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from typing import Any

import attrs

from trafficmgr.plugin import Model, ObjectRef, load_balancer_addresses

INGRESS = "Ingress"
INGRESS_CLASS = "IngressClass"
DEFAULT_CLASS_ANNOTATION = "ingressclass.kubernetes.io/is-default-class"
LEGACY_CLASS_ANNOTATION = "kubernetes.io/ingress.class"

EXACT, PREFIX, IMPLEMENTATION_SPECIFIC = "Exact", "Prefix", "ImplementationSpecific"
PATH_TYPES = (EXACT, PREFIX, IMPLEMENTATION_SPECIFIC)

_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
HOST_RE = re.compile(rf"^(\*\.)?{_LABEL}(\.{_LABEL})*$")
# Paths Envoy accepts in every match type (no query, fragment, whitespace or control characters).
PATH_RE = re.compile(r"^/[^\s?#\x00-\x1f\x7f]*$")


@attrs.frozen(slots=True)
class Backend:
    """A Service backend: ``port`` is a service port number (int) or name (str)."""

    service: str
    port: int | str


@attrs.frozen(slots=True)
class IngressPath:
    path: str
    path_type: str
    backend: Backend | None  # None: a resource backend or no backend (not supported; reported)


@attrs.frozen(slots=True)
class IngressRule:
    host: str  # "" = every host
    paths: tuple[IngressPath, ...] = ()


@attrs.frozen(slots=True)
class IngressTLS:
    hosts: tuple[str, ...]
    secret_name: str


@attrs.frozen(slots=True)
class Ingress:
    """One Ingress. ``class_name`` is ``spec.ingressClassName`` (or the legacy annotation), None if unset;
    ``lb_status`` is the current ``status.loadBalancer.ingress`` as (ip or hostname) strings."""

    namespace: str
    name: str
    uid: str = ""
    created: str = ""
    resource_version: str = ""
    class_name: str | None = None
    rules: tuple[IngressRule, ...] = ()
    default_backend: Backend | None = None
    tls: tuple[IngressTLS, ...] = ()
    lb_status: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()  # what convert could not understand (reported at build time)

    @property
    def ref(self) -> ObjectRef:
        return ObjectRef(INGRESS, self.namespace, self.name, self.uid, self.resource_version)

    @property
    def age_key(self) -> tuple[str, str, str]:
        """Oldest first (creationTimestamp is RFC 3339 UTC, so it sorts as text), then by name."""
        return (self.created, self.namespace, self.name)


@attrs.frozen(slots=True)
class IngressClass:
    name: str
    controller: str = ""
    default: bool = False


def _backend(raw: Mapping[str, Any] | None) -> Backend | None:
    svc = (raw or {}).get("service") or {}
    name = svc.get("name")
    port = svc.get("port") or {}
    if not name:
        return None
    if port.get("number") is not None:
        try:
            return Backend(str(name), int(port["number"]))
        except (TypeError, ValueError):
            return None
    if port.get("name"):
        return Backend(str(name), str(port["name"]))
    return None


def convert_ingress(raw: dict[str, Any], ctx: Any) -> Ingress:
    """A raw ``networking.k8s.io/v1`` Ingress -> :class:`Ingress`."""
    meta = raw.get("metadata") or {}
    spec = raw.get("spec") or {}
    problems: list[str] = []
    class_name = spec.get("ingressClassName") or (meta.get("annotations") or {}).get(LEGACY_CLASS_ANNOTATION) or None
    rules = []
    for rule in spec.get("rules") or []:
        paths = []
        for p in ((rule.get("http") or {}).get("paths") or []):
            backend = _backend(p.get("backend"))
            path = p.get("path") or "/"
            if backend is None:
                problems.append(f"path {path!r}: only service backends with a port number or name are supported")
            paths.append(IngressPath(str(path), str(p.get("pathType") or IMPLEMENTATION_SPECIFIC), backend))
        rules.append(IngressRule(str(rule.get("host") or "").lower(), tuple(paths)))
    default = spec.get("defaultBackend") or spec.get("backend")
    default_backend = _backend(default) if default else None
    if default and default_backend is None:
        problems.append("defaultBackend: only service backends with a port number or name are supported")
    tls = tuple(
        IngressTLS(tuple(str(h).lower() for h in t.get("hosts") or []), str(t.get("secretName") or ""))
        for t in spec.get("tls") or []
    )
    lb = load_balancer_addresses(raw.get("status") or {})
    return Ingress(
        namespace=meta.get("namespace") or "default", name=meta.get("name") or "", uid=meta.get("uid") or "",
        created=meta.get("creationTimestamp") or "", resource_version=meta.get("resourceVersion") or "",
        class_name=class_name, rules=tuple(rules), default_backend=default_backend, tls=tls, lb_status=lb,
        problems=tuple(problems),
    )


def convert_class(raw: dict[str, Any], ctx: Any) -> IngressClass:
    meta = raw.get("metadata") or {}
    default = (meta.get("annotations") or {}).get(DEFAULT_CLASS_ANNOTATION, "") == "true"
    return IngressClass(meta.get("name") or "", str((raw.get("spec") or {}).get("controller") or ""), default)


# -- options ---------------------------------------------------------------------------------------

DEFAULTS: dict[str, Any] = {
    "ingress_class": "traffic",
    "gateway_port": 10000,
    "gateway_address": "0.0.0.0",
    "gateway_service": "traffic-ingress",
    "gateway_namespace": os.environ.get("POD_NAMESPACE") or "default",
}


def option(options: argparse.Namespace, name: str) -> Any:
    """A gateway option from ``options`` (``trafficmgr_add_arguments``), else its default."""
    value = getattr(options, name, None)
    return DEFAULTS[name] if value is None else value


def selected_ingresses(model: Model, options: argparse.Namespace) -> list[Ingress]:
    """The Ingresses this gateway serves, oldest first: class ``--ingress-class``, and those without a
    class when that IngressClass is marked as the default class. A new list on every call: hooks that
    share one build use ``gateway.served(ctx)``."""
    table = model.extra.get(INGRESS) or {}
    if not table:
        return []
    name = option(options, "ingress_class")
    klass = (model.extra.get(INGRESS_CLASS) or {}).get(("", name))
    default = klass is not None and klass.default
    out = [i for i in table.values() if i.class_name == name or (i.class_name is None and default)]
    out.sort(key=lambda i: i.age_key)
    return out
