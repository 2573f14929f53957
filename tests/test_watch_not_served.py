"""A watched kind the API server does not serve (a plugin's CRD not installed: the gateway_api plugin's
kinds on a cluster without the Gateway API CRDs) is taken as empty and does not keep the control plane
from being ready; it is listed again, so objects appear once the kind is served."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from trafficmgr.apiserver import APIServer
from trafficmgr.core.controlplane import ControlPlane
from trafficmgr.core.kube.client import ApiException, Kind, KubeClient, load_api_client
from trafficmgr.core.kube.watch import Watcher
from trafficmgr.core.plugins import PluginHost
from trafficmgr.plugin import WatchKind, hookimpl


class UnservedKindPlugin:
    """Test plugin: watches a kind no API server here serves."""

    @hookimpl
    def trafficmgr_watch_kinds(self) -> list[WatchKind]:
        return [WatchKind("Widget", "example.com/v1", "widgets", lambda raw, ctx: raw)]


def test_control_plane_is_ready_without_the_kind(tmp_path: Path) -> None:
    api = APIServer().start()
    cp = None
    try:
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        host = PluginHost.load(["lb"], extra=[("unserved", UnservedKindPlugin())])
        cp = ControlPlane(host, argparse.Namespace(), KubeClient(load_api_client(str(kubeconfig))))
        cp.start_watches()
        assert cp.wait_ready(10), cp.ready()[1]
        (w,) = [w for w in cp.watchers if w.kind.plural == "widgets"]
        assert w.not_served and w.synced.is_set()
    finally:
        if cp is not None:
            cp.stop()
        api.stop()


def test_watcher_lists_again_until_served(tmp_path: Path) -> None:
    """Served after a while (a stand-in client answers 404, then a list): the objects arrive."""
    calls: list[str] = []
    events: list[tuple[str, Any]] = []

    class Flaky:
        host = "test"

        def list(self, path: str, query: dict[str, Any]) -> dict[str, Any]:
            calls.append(path)
            if len(calls) < 3:
                raise ApiException(status=404, reason="Not Found")
            return {"metadata": {"resourceVersion": "5"}, "items": [{"metadata": {"name": "w1"}}]}

        def watch(self, path: str, query: dict[str, Any], timeout: float) -> Any:
            time.sleep(0.05)
            return iter(())

    w = Watcher(Flaky(), Kind("Widget", "example.com/v1", "widgets"), lambda t, k, o: events.append((t, o)),  # type: ignore[arg-type]
                not_served_retry=0.05)
    w.start()
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(o for t, o in events if t == "RELIST"):
            time.sleep(0.02)
    finally:
        w.stop()  # (Watcher.join is not usable: its _stop Event shadows Thread's)
    assert events[0] == ("RELIST", [])  # synced, empty, while not served
    assert ("RELIST", [{"metadata": {"name": "w1"}}]) in events
    assert not w.not_served
