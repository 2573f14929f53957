from __future__ import annotations

import pytest

from trafficmgr.apiserver import APIServer
from trafficmgr.apiserver.access import new_token
from trafficmgr.testing.cluster import Kubectl


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    srv = APIServer(bookmark_interval=0.5, token=new_token()).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def kubectl(server: APIServer, tmp_path_factory: pytest.TempPathFactory) -> Kubectl:
    home = tmp_path_factory.mktemp("kubehome")
    kc = server.write_kubeconfig(home / "kubeconfig")
    return Kubectl(kc, home)


@pytest.fixture(scope="module")
def api(server: APIServer):
    """The official client configured as ``load_kube_config`` configures it from the kubeconfig."""
    from kubernetes import client, config

    cfg = client.Configuration()
    config.load_kube_config_from_dict(server.kubeconfig(), client_configuration=cfg)
    with client.ApiClient(cfg) as c:
        yield c
