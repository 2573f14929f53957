from __future__ import annotations

import pytest

from trafficmgr.apiserver import APIServer
from trafficmgr.testing.cluster import Kubectl


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    srv = APIServer(bookmark_interval=0.5).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def kubectl(server: APIServer, tmp_path_factory: pytest.TempPathFactory) -> Kubectl:
    home = tmp_path_factory.mktemp("kubehome")
    kc = server.write_kubeconfig(home / "kubeconfig")
    return Kubectl(kc, home)


@pytest.fixture(scope="module")
def api(server: APIServer):
    from kubernetes import client

    cfg = client.Configuration()
    cfg.host = server.url
    with client.ApiClient(cfg) as c:
        yield c
