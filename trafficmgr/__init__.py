"""trafficmgr: a label-driven Envoy xDS control plane for Kubernetes.

Writing a plugin takes one module and one entry point; plugins import from ``trafficmgr.plugin`` (the
public plugin API) only::

    # myplugin.py
    from trafficmgr.plugin import LabelSpec, hookimpl, labels

    @hookimpl
    def trafficmgr_labels():
        return [LabelSpec("traffic.example.header", frozenset({labels.SERVICE}), labels.token(), "", "adds a header")]

    @hookimpl
    def trafficmgr_virtual_host(vhost, service):
        value = service.labels.value("traffic.example.header")
        if value:
            vhost.response_headers_to_add.add().header.key = value

    # pyproject.toml
    [project.entry-points."trafficmgr.plugins"]
    example = "myplugin"

The contract (every hook, when it is called, what it may change) is ``trafficmgr.core.hookspecs``,
documented in docs/plugins.md. ``hookimpl``, ``LabelSpec`` and ``labels`` are also importable from here
for plugins written before ``trafficmgr.plugin`` existed.
"""

import pluggy

from trafficmgr.core import labels
from trafficmgr.core.labels import LabelSpec

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("trafficmgr")

__all__ = ["hookimpl", "LabelSpec", "labels", "__version__"]
