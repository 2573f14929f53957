"""In-memory, kubectl-compatible Kubernetes API server (tests, benchmarks, local demo mode).

Quick start::

    from trafficmgr.apiserver import APIServer
    srv = APIServer(port=0).start()
    srv.write_kubeconfig("/tmp/kubeconfig")      # then: KUBECONFIG=/tmp/kubeconfig kubectl get pods
    srv.store.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {...}})
    srv.stop()
"""

from .controllers import Controllers, FakePodRuntime, PodRuntime
from .errors import ApiError
from .server import APIServer
from .store import Store, Watcher, WatchEvent

__all__ = ["APIServer", "ApiError", "Controllers", "FakePodRuntime", "PodRuntime", "Store", "Watcher", "WatchEvent"]
