"""Golden-file machinery: Kubernetes manifests in -> xDS YAML out.

The manifests go through the same path as a cluster: the in-memory API server's store and its
EndpointSlice controller (so tests never hand-write EndpointSlices), the Kubernetes IR assembler, and
the builder with the selected plugins. The output is a deterministic YAML document per view.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format

from trafficmgr.core import cache
from trafficmgr.core.controlplane import kinds_of
from trafficmgr.core.kube.assemble import Assembler
from trafficmgr.core.kube.client import Kind
from trafficmgr.core.plugins import PluginHost
from trafficmgr.core.translate.builder import Builder, default_options

#: The pytest flag that rewrites golden files instead of comparing.
UPDATE_FLAG = "--update-golden"


def load_manifests(path: Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document of ``path``."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def list_items(store: Any, plural: str) -> list[dict[str, Any]]:
    """The objects of ``plural`` in ``store``; none for a kind the store does not serve (a plugin's CRD not
    installed), as the control plane's watches take it."""
    from trafficmgr.apiserver.errors import ApiError

    try:
        return store.list(plural)["items"]  # type: ignore[no-any-return]
    except ApiError as exc:
        if exc.code == 404:
            return []
        raise


def build_from_manifests(
    manifests: Iterable[dict[str, Any]],
    plugins: PluginHost | None = None,
    options: argparse.Namespace | None = None,
) -> tuple[dict[str, cache.Snapshot], list[str]]:
    """Snapshots by view for ``manifests``, plus the Warning Events (as text) the control plane raised."""
    from trafficmgr.apiserver.controllers import Controllers
    from trafficmgr.apiserver.store import Store

    plugins = plugins or PluginHost.load()
    store = Store()
    controllers = Controllers(store, endpointslices=True)
    controllers.start()
    try:
        for obj in manifests:
            ns = (obj.get("metadata") or {}).get("namespace")
            if ns and not any(n["metadata"]["name"] == ns for n in store.list("namespaces")["items"]):
                store.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
            store.create(obj)
        controllers.wait_idle()
    finally:
        controllers.stop()
    warnings: list[str] = []
    report = lambda ref, msg, reason: warnings.append(f"{reason} {ref}: {msg}")  # noqa: E731
    extra = plugins.collect("trafficmgr_watch_kinds")
    asm = Assembler(
        plugins.labels, extra,
        on_label_errors=lambda errors: warnings.extend(f"{e.reason} {e}" for e in errors),
        reporter=report,
    )
    for kind in kinds_of(plugins):
        asm.apply("RELIST", kind, list_items(store, kind.plural))
    opts = options or default_options()
    builder = Builder(plugins, opts, reporter=report)
    return builder.build(asm.model()), sorted(warnings)


def render(snapshots: dict[str, cache.Snapshot], views: Sequence[str] | None = None) -> str:
    """Deterministic YAML: ``{view: {type: [resource as dict]}}`` with empty types left out."""
    out: dict[str, Any] = {}
    for view in sorted(snapshots):
        if views is not None and view not in views:
            continue
        types: dict[str, Any] = {}
        for type_url, ts in snapshots[view].types.items():
            if ts.resources:
                types[cache.short_name(type_url)] = [
                    to_plain(json_format.MessageToDict(r.message(), preserving_proto_field_name=True))
                    for r in ts.resources.values()
                ]
        out[view] = types
    return yaml.safe_dump(out, sort_keys=True, width=120)


def to_plain(value: Any) -> Any:
    """OrderedDicts (from Any fields) -> dicts, so safe_dump can write them."""
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_plain(v) for v in value]
    return value


def check_golden(actual: str, path: Path, update: bool) -> None:
    """Compare ``actual`` with the file at ``path`` (rewrite it when ``update``); raise AssertionError with
    a unified diff on mismatch."""
    if update or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual)
        if not update:
            raise AssertionError(f"golden file {path} did not exist; written now, review and commit it")
        return
    expected = path.read_text()
    if expected != actual:
        import difflib

        diff = "".join(difflib.unified_diff(expected.splitlines(True), actual.splitlines(True), str(path), "actual", n=3))
        raise AssertionError(f"output differs from {path} (run pytest {UPDATE_FLAG} to accept):\n{diff[:20000]}")


__all__ = ["Kind", "UPDATE_FLAG", "build_from_manifests", "check_golden", "load_manifests", "render"]
