"""In-memory, kubectl-compatible Kubernetes API server (tests, benchmarks, local demo mode).

Quick start::

    from trafficmgr.apiserver import APIServer
    from trafficmgr.apiserver.access import new_token
    srv = APIServer(port=0, token=new_token()).start()   # HTTPS + bearer token (None: plain HTTP, no token)
    srv.write_kubeconfig("/tmp/kubeconfig")      # mode 0600; then: KUBECONFIG=/tmp/kubeconfig kubectl get pods
    srv.store.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {...}})
    srv.stop()
"""

from .controllers import Controllers, FakePodRuntime, PodRuntime
from .errors import ApiError
from .server import APIServer
from .store import Store, Watcher, WatchEvent

__all__ = ["APIServer", "ApiError", "Controllers", "FakePodRuntime", "PodRuntime", "Store", "Watcher", "WatchEvent"]
