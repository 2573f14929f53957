"""proxy-status for a sidecar on a scoped view (issue 20: ``traffic.scope=namespace`` gives the pod a
shared view ``sidecar~<hash>``): its row still carries the identity expected from its pod's
ServiceAccount and ``mtls`` when its pod runs a sidecar under ``--mtls`` (both looked only at the view
``sidecar`` before, so a scoped sidecar showed ``-`` and ``plaintext``), and names its replica."""

from __future__ import annotations

import json
from typing import Any

from tests.identity.test_proxy_status_identity import _options, _rows, _spiffe, plane_factory  # noqa: F401 - the fixture
from trafficmgr.core.model import SIDECAR
from trafficmgr.testing.envoy import wait_for


def test_scoped_sidecar_row_has_its_identity_and_replica(plane_factory: Any, envoy_binary: str) -> None:  # noqa: F811 - the imported fixture
    plane = plane_factory(_options(xds_auth="none", mtls=True, replica_name="cp-7"))
    plane.api.store.patch("pods", "web", {"metadata": {"labels": {"traffic.scope": "namespace"}}}, "default",
                          patch_type="merge")
    wait_for(lambda: (plane.cp.resolve("web.default", "sidecar") or SIDECAR) != SIDECAR, 10,
             message="the scope label did not give web a scoped view")
    plane.envoy("web.default", "sidecar")
    plane.wait_streams({"web.default"})
    web = next(s for s in json.loads(plane.cli("proxy-status", "--json")) if s["node_id"] == "web.default")
    assert web["view"] != SIDECAR and web["view"].startswith(SIDECAR)
    assert web["identity"] == _spiffe("default", "reviews") and web["mtls"] == "mtls" and web["replica"] == "cp-7"
    row = _rows(plane.cli("proxy-status"))["web.default"]
    assert row["IDENTITY"] == f"{_spiffe('default', 'reviews')} (expected)"
    assert row["MTLS"] == "mtls" and row["REPLICA"] == "cp-7"
