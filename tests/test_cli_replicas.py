"""``proxy-status``/``config-dump`` options for several replicas (issue 20): bad values are one clear
error line; ``--discover`` finds the replica pods through the control plane Service's EndpointSlices on
the project's API server, and a replica it cannot reach is named with its error, never dropped; the merge
of several admin endpoints (``AdminServer`` over a fixed state) is sorted by node id and names replicas.

The end-to-end run with real ``serve`` processes and Envoys is tests/e2e/test_replicas_proxy_status.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from trafficmgr import cli
from trafficmgr.apiserver import APIServer
from trafficmgr.core.admin import REPLICA_HEADER, AdminServer
from trafficmgr.core.labels import LabelSpec
from trafficmgr.core.plugins import PluginInfo
from trafficmgr.testing.cluster import http_get
from trafficmgr.testing.envoy import free_port


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(("argv", "expected"), [
    (["--admin", ""], "trafficmgr: error: --admin '': an empty URL (give URLs separated by commas, e.g. "
                      "http://127.0.0.1:18080,http://127.0.0.1:18081)"),
    (["--admin", "127.0.0.1:1,,127.0.0.1:2"], "trafficmgr: error: --admin '127.0.0.1:1,,127.0.0.1:2': an empty URL"),
    (["--admin", "ftp://example.test"], "trafficmgr: error: --admin must be an http(s) URL such as "
                                        "http://127.0.0.1:18080, not 'ftp://example.test'"),
    (["--admin", "127.0.0.1:99999"], "trafficmgr: error: --admin has an invalid port: 'http://127.0.0.1:99999'"),
    (["--admin", "http://127.0.0.1:18080/debug"], "trafficmgr: error: --admin must be an http(s) URL such as "
                                                  "http://127.0.0.1:18080, not 'http://127.0.0.1:18080/debug'"),
    (["--server", "127.0.0.1:1", "--admin", "127.0.0.1:x"], "trafficmgr: error: --admin has an invalid port"),
    (["--discover", "trafficmgr", "--admin", "127.0.0.1:1"],
     "trafficmgr: error: --discover finds the replicas itself: give it or --admin/--server, not both"),
    (["--admin-port", "18080"], "trafficmgr: error: --admin-port, --kubeconfig and --context go with --discover"),
    (["--kubeconfig", "/nonexistent"], "trafficmgr: error: --admin-port, --kubeconfig and --context go with --discover"),
])
@pytest.mark.parametrize("command", [["proxy-status"], ["config-dump", "--node-id", "x.default"]])
def test_bad_replica_options_are_one_line(capsys: pytest.CaptureFixture[str], command: list[str], argv: list[str],
                                          expected: str) -> None:
    code, _, err = run(capsys, *command, *argv)
    assert code == 1
    assert one_error(err).startswith(expected)


@pytest.mark.parametrize(("argv", "expected"), [
    (["--timeout", "0"], "argument --timeout: "),
    (["--admin-port", "0"], "argument --admin-port: "),
    (["--admin-port", "http"], "argument --admin-port: "),
])
def test_bad_numbers_are_usage_errors(capsys: pytest.CaptureFixture[str], argv: list[str], expected: str) -> None:
    code, _, err = run(capsys, "proxy-status", *argv)
    assert code == 2
    assert one_error(err).startswith(f"trafficmgr proxy-status: error: {expected}")


def test_empty_node_id(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "config-dump", "--node-id", " ")
    assert code == 1
    assert one_error(err) == "trafficmgr: error: --node-id is empty; 'trafficmgr proxy-status' lists connected nodes"


# -- several admin endpoints, merged -------------------------------------------------------------------


class State:
    """An AdminState with fixed streams, named ``replica`` (or not: an older server)."""

    def __init__(self, replica: str | None, streams: list[dict[str, Any]]) -> None:
        if replica is not None:
            self.replica = replica
        self.streams = streams

    def proxy_status(self) -> list[dict[str, Any]]:
        return [{**s, **({"replica": self.replica} if hasattr(self, "replica") else {})} for s in self.streams]

    def config_dump(self, node_id: str) -> dict[str, list[Any]] | None:
        return {} if any(s["node_id"] == node_id for s in self.streams) else None

    def healthy(self) -> bool:
        return True

    def ready(self) -> tuple[bool, str]:
        return True, ""

    def nacks(self) -> list[dict[str, Any]]:
        return []

    def plugins_info(self) -> list[PluginInfo]:
        return []

    def labels(self) -> list[LabelSpec]:
        return []


def _stream(node: str, connected_at: float = 1.0) -> dict[str, Any]:
    synced = {"sent": "v1", "acked": "v1", "last_nack": None}
    return {"node_id": node, "view": "sidecar", "mode": "sotw", "connected_at": connected_at,
            **{t: synced for t in ("clusters", "endpoints", "listeners", "routes")}}


@pytest.fixture
def servers() -> Iterator[list[AdminServer]]:
    started: list[AdminServer] = []
    yield started
    for s in started:
        s.stop()


def _serve(servers: list[AdminServer], state: State) -> str:
    server = AdminServer(state, port=0)  # type: ignore[arg-type]
    server.start()
    servers.append(server)
    return server.url


def test_merge_is_sorted_and_names_every_replica(capsys: pytest.CaptureFixture[str], servers: list[AdminServer]) -> None:
    a = _serve(servers, State("cp-a", [_stream("web-2.default"), _stream("api-1.default")]))
    b = _serve(servers, State("cp-b", [_stream("web-1.default"), _stream("web-2.default", connected_at=5.0)]))
    old = _serve(servers, State(None, [_stream("db-1.default")]))  # a replica that names nothing
    dead = f"http://127.0.0.1:{free_port()}"
    code, out, err = run(capsys, "proxy-status", "--admin", f"{b},{dead}", "--server", a, "--admin", old, "--admin", b)
    assert code == 1
    assert one_error(err) == (f"trafficmgr: error: replica {dead} did not answer: cannot reach the trafficmgr admin "
                              f"endpoint at {dead}: connection refused (is 'trafficmgr serve' running? use --server)")
    lines = [line.split() for line in out.splitlines()]
    assert lines[0] == ["NODE", "ROLE", "MODE", "CDS", "EDS", "LDS", "RDS", "SDS", "REPLICA"]
    assert [(row[0], row[-1]) for row in lines[1:]] == [
        ("api-1.default", "cp-a"), ("db-1.default", old), ("web-1.default", "cp-b"),
        ("web-2.default", "cp-a"), ("web-2.default", "cp-b"),  # an Envoy moving between replicas: both rows
    ]

    # config-dump: the latest connected replica holding the node (cp-b: connected at 5.0).
    code, out, err = run(capsys, "config-dump", "--node-id", "web-2.default", "-o", "json", "--admin", f"{a},{b},{dead}")
    assert code == 0
    assert json.loads(out)["replica"] == "cp-b"
    assert one_error(err).startswith(f"trafficmgr: warning: replica {dead} did not answer: ")


def test_admin_names_the_replica_in_a_header(servers: list[AdminServer]) -> None:
    url = _serve(servers, State("cp-a", []))
    import urllib.error
    import urllib.request

    with urllib.request.urlopen(url + "/debug/proxy-status", timeout=5) as resp:  # noqa: S310 - loopback test server
        assert resp.headers[REPLICA_HEADER] == "cp-a"
    with urllib.request.urlopen(url + "/healthz", timeout=5) as resp:  # noqa: S310
        assert REPLICA_HEADER not in resp.headers, "only /debug/* names the replica"
    assert http_get(url + "/readyz")[0] == 200
    guarded = AdminServer(State("cp-b", []), port=0, token="a-token-of-sixteen-chars")  # type: ignore[arg-type]
    guarded.start()
    servers.append(guarded)
    try:
        urllib.request.urlopen(guarded.url + "/debug/proxy-status", timeout=5)  # noqa: S310
        raise AssertionError("no token: 401 expected")
    except urllib.error.HTTPError as exc:
        assert exc.code == 401 and REPLICA_HEADER not in exc.headers, "a caller without the token learns nothing"


# -- --discover against the project's API server -----------------------------------------------------


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[APIServer, Path]]:
    api = APIServer().start()
    kubeconfig = tmp_path / "kubeconfig"
    api.write_kubeconfig(str(kubeconfig))
    try:
        yield api, kubeconfig
    finally:
        api.stop()


def _replica_pods(api: APIServer, namespace: str, names: list[str]) -> None:
    store = api.store
    store.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    store.create({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "trafficmgr", "namespace": namespace},
                  "spec": {"selector": {"app": "trafficmgr"}, "ports": [{"name": "xds", "port": 18000}]}})
    for i, name in enumerate(names):
        ip = f"10.9.0.{i + 1}"
        store.create({"apiVersion": "v1", "kind": "Pod",
                      "metadata": {"name": name, "namespace": namespace, "labels": {"app": "trafficmgr"}},
                      "spec": {"nodeName": "node-1", "containers": [{"name": "cp", "image": "trafficmgr"}]}})
        # the second replica is not ready: still asked (it may hold streams)
        ready = "True" if i != 1 else "False"
        store.patch("pods", name, {"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                                              "conditions": [{"type": "Ready", "status": ready}]}},
                    namespace, patch_type="merge", subresource="status")
    api.wait_idle(5)


def test_discover_asks_every_replica_pod_and_names_each_failure(capsys: pytest.CaptureFixture[str],
                                                                cluster: tuple[APIServer, Path]) -> None:
    """The project's API server has no port-forward: every discovered pod is asked, and each failure is
    named (this proves the discovery and the per-replica errors; the port-forward itself needs a real
    kube-apiserver)."""
    api, kubeconfig = cluster
    _replica_pods(api, "traffic-system", ["trafficmgr-0", "trafficmgr-1", "trafficmgr-2"])
    code, out, err = run(capsys, "proxy-status", "--discover", "traffic-system/trafficmgr", "--kubeconfig", str(kubeconfig),
                         "--timeout", "5")
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert [line.split(" did not answer: ")[0] for line in lines] == [
        f"trafficmgr: error: replica trafficmgr-{i} (pod traffic-system/trafficmgr-{i})" for i in range(3)]
    assert all(line.endswith(" port 18080 (through the API server's port-forward): HTTP 404: the server could not find "
                             "the requested resource") for line in lines), err

    code, _, err = run(capsys, "config-dump", "--node-id", "web-1.default", "--discover", "traffic-system/trafficmgr",
                       "--kubeconfig", str(kubeconfig), "--admin-port", "18081", "--timeout", "5")
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 4 and " port 18081 " in lines[0]
    assert lines[-1] == "trafficmgr: error: unknown node id 'web-1.default'; 'trafficmgr proxy-status' lists connected nodes"


def test_discover_errors(capsys: pytest.CaptureFixture[str], cluster: tuple[APIServer, Path]) -> None:
    api, kubeconfig = cluster
    _replica_pods(api, "traffic-system", ["trafficmgr-0"])
    k = ["--kubeconfig", str(kubeconfig)]
    code, _, err = run(capsys, "proxy-status", "--discover", "traffic-system/Bad_Name", *k)
    assert code == 1 and one_error(err) == (
        "trafficmgr: error: --discover 'traffic-system/Bad_Name': Service name 'Bad_Name' is not a valid name "
        "(lower-case letters, digits and '-'; the form is [NAMESPACE/]SERVICE)")
    code, _, err = run(capsys, "proxy-status", "--discover", "a/b/c", *k)
    assert code == 1 and "namespace 'a/b' is not a valid name" in one_error(err)
    code, _, err = run(capsys, "proxy-status", "--discover", "traffic-system/nothing", *k)
    assert code == 1 and one_error(err) == (
        "trafficmgr: error: Service traffic-system/nothing has no pod endpoints (EndpointSlices labelled "
        "kubernetes.io/service-name=nothing): is the control plane running, and is that its Service?")
    # NAME alone: the kubeconfig context's namespace (default here), which has no such Service.
    code, _, err = run(capsys, "proxy-status", "--discover", "trafficmgr", *k)
    assert code == 1 and "Service default/trafficmgr has no pod endpoints" in one_error(err)
    # one replica: its failure is the command's one error line
    code, _, err = run(capsys, "proxy-status", "--discover", "traffic-system/trafficmgr", *k, "--timeout", "5")
    assert code == 1 and one_error(err).startswith("trafficmgr: error: cannot port-forward to pod traffic-system/trafficmgr-0 port 18080")
    code, _, err = run(capsys, "proxy-status", "--discover", "trafficmgr", "--kubeconfig", str(kubeconfig.parent / "missing"))
    assert code == 1 and one_error(err).startswith("trafficmgr: error: --discover: cannot load the kubeconfig: ")
