"""``trafficmgr proxy-status`` and ``config-dump`` across control-plane replicas (issue 20): three real
``trafficmgr serve`` processes against the project's API server, each named (``--replica-name`` for two,
``$POD_NAME`` for the third), and six real sidecar Envoys on loopback, two connected to each replica
(each from its own pod IP, so ``--xds-auth peer-ip`` admits it as its pod).

1. ``proxy-status --admin A,B --admin C`` lists all six, each with the replica its Envoy is connected to
   (the ``REPLICA`` column; ``--json`` rows carry ``replica``), sorted by node id;
2. ``config-dump --node-id N`` is answered by the replica holding N's stream (``replica:``);
3. one replica SIGKILLed: ``proxy-status`` still prints the other four rows, names the dead replica
   with its error on stderr and exits 1; ``config-dump`` of a node whose Envoy was on the dead replica
   (now connected nowhere) comes from a live replica, with a warning naming the dead one; an unknown
   node is an error that names the dead replica too.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from trafficmgr import cli
from trafficmgr.apiserver import APIServer
from trafficmgr.core.bootstrap import bootstrap
from trafficmgr.testing.cluster import http_get
from trafficmgr.testing.envoy import EnvoyProcess, free_port, wait_for

REPLICAS = ("cp-a", "cp-b", "cp-c")
PER_REPLICA = 2
TYPES = ("CDS", "EDS", "LDS", "RDS")


def _block() -> str:
    """A random ``127.b.c`` block whose addresses are free here (parallel runs do not collide)."""
    rng = random.Random()
    for _ in range(50):
        prefix = f"127.{rng.randint(64, 250)}.{rng.randint(0, 255)}"
        with socket.socket() as s:
            try:
                s.bind((f"{prefix}.1", 0))
            except OSError:
                continue
        return prefix
    raise RuntimeError("no free 127.x.y.0/24 block")


class Serve:
    """One ``trafficmgr serve`` replica as a subprocess. The last replica is named by ``$POD_NAME``
    (what the chart sets), the others by ``--replica-name``."""

    def __init__(self, name: str, kubeconfig: Path, workdir: Path, by_env: bool) -> None:
        self.name = name
        self.xds_port, self.admin_port = free_port(), free_port()
        self.log_path = workdir / f"serve-{name}.log"
        self.cmd = [sys.executable, "-m", "trafficmgr", "serve", "--kubeconfig", str(kubeconfig),
                    "--xds-address", "127.0.0.1", "--xds-port", str(self.xds_port), "--admin-port", str(self.admin_port),
                    *([] if by_env else ["--replica-name", name])]
        self.env = {k: v for k, v in os.environ.items() if k != "POD_NAME"}
        if by_env:
            self.env["POD_NAME"] = name
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Serve:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        return self

    def wait_ready(self) -> None:
        def ready() -> bool:
            assert self.proc is not None and self.proc.poll() is None, f"serve {self.name} exited:\n{self.log()}"
            try:
                return http_get(self.admin + "/readyz", 1)[0] == 200
            except OSError:
                return False

        wait_for(ready, 60, message=f"serve {self.name} not ready")

    def kill(self) -> None:
        assert self.proc is not None and self.proc.poll() is None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _table(out: str) -> dict[str, dict[str, str]]:
    """proxy-status table rows by node (cells cut at the header's column starts)."""
    lines = out.splitlines()
    header = lines[0]
    titles = header.split()
    starts = [header.index(t) for t in titles]
    rows = {}
    for line in lines[1:]:
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        rows[cells[0]] = dict(zip(titles, cells, strict=True))
    return rows


@pytest.fixture
def mesh(tmp_path: Path, envoy_binary: str) -> Iterator[dict[str, Any]]:
    prefix = _block()
    api = APIServer().start()
    kubeconfig = tmp_path / "kubeconfig"
    api.write_kubeconfig(str(kubeconfig))
    store = api.store
    replicas = [Serve(name, kubeconfig, tmp_path, by_env=i == len(REPLICAS) - 1) for i, name in enumerate(REPLICAS)]
    envoys: list[EnvoyProcess] = []
    # node id -> the replica its Envoy is connected to
    placement: dict[str, Serve] = {}
    try:
        store.create({"apiVersion": "v1", "kind": "Service",
                      "metadata": {"name": "reviews", "namespace": "default", "labels": {"traffic.port.9080": "http"}},
                      "spec": {"selector": {"app": "reviews"}, "ports": [{"name": "http", "port": 9080}]}})
        clients = []
        for i in range(len(REPLICAS) * PER_REPLICA):
            name, ip = f"client-{i}", f"{prefix}.{10 + i}"
            store.create({"apiVersion": "v1", "kind": "Pod",
                          "metadata": {"name": name, "namespace": "default",
                                       "labels": {"app": "client", "traffic.envoy.enabled": "true"}},
                          "spec": {"nodeName": "node-1", "containers": [{"name": "app", "image": "app"}]}})
            store.patch("pods", name, {"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                                                  "conditions": [{"type": "Ready", "status": "True"}]}},
                        "default", patch_type="merge", subresource="status")
            clients.append((name, ip))
        api.wait_idle(5)
        for r in replicas:
            r.start()
        for r in replicas:
            r.wait_ready()
        for i, (name, ip) in enumerate(clients):
            serve = replicas[i % len(replicas)]
            config = bootstrap(f"{name}.default", "sidecar", "127.0.0.1", serve.xds_port, admin_port=0,
                               delta=i % 2 == 1, xds_source_address=ip)
            envoy = EnvoyProcess(config, tmp_path / name, timeout=40)
            envoys.append(envoy)
            envoy.start()
            placement[f"{name}.default"] = serve
        yield {"replicas": replicas, "placement": placement, "envoys": envoys}
    finally:
        for envoy in envoys:
            envoy.stop()
        for r in replicas:
            r.stop()
        api.stop()


def test_proxy_status_and_config_dump_across_three_replicas(capsys: pytest.CaptureFixture[str], mesh: dict[str, Any]) -> None:
    replicas: list[Serve] = mesh["replicas"]
    placement: dict[str, Serve] = mesh["placement"]
    admin = ["--admin", f"{replicas[0].admin},{replicas[1].admin}", "--admin", replicas[2].admin]

    # 1. every Envoy, each with the replica it is connected to.
    def synced() -> dict[str, dict[str, str]] | None:
        code, out, err = run(capsys, "proxy-status", *admin)
        assert code == 0, err
        rows = _table(out)
        done = set(rows) == set(placement) and all(r[t] == "SYNCED" for r in rows.values() for t in TYPES)
        return rows if done else None

    try:
        rows = wait_for(synced, 40, 0.5)
    except TimeoutError:
        raise AssertionError(f"not every Envoy synced: {run(capsys, 'proxy-status', *admin)}") from None
    assert {node: row["REPLICA"] for node, row in rows.items()} == {node: r.name for node, r in placement.items()}
    assert list(rows) == sorted(placement), "rows are sorted by node id"
    assert {r.name for r in placement.values()} == set(REPLICAS), "each replica holds streams"

    code, out, _ = run(capsys, "proxy-status", *admin, "--json")
    streams = json.loads(out)
    assert code == 0 and [s["node_id"] for s in streams] == sorted(placement)
    assert all(s["replica"] == placement[s["node_id"]].name for s in streams)

    # 2. config-dump asks the replica holding the stream.
    for node in ("client-1.default", "client-5.default"):
        code, out, err = run(capsys, "config-dump", "--node-id", node, *admin, "--type", "listeners")
        assert code == 0, err
        dump = yaml.safe_load(out)
        assert dump["node_id"] == node and dump["view"] == "sidecar" and dump["replica"] == placement[node].name
        assert [lst["name"] for lst in dump["resources"]["listeners"]], "the node's listeners"

    # 3. one replica gone: its error is shown, the others' rows stay.
    dead = replicas[1]
    dead.kill()
    code, out, err = run(capsys, "proxy-status", *admin)
    assert code == 1
    assert err == (f"trafficmgr: error: replica {dead.admin} did not answer: cannot reach the trafficmgr admin endpoint "
                   f"at {dead.admin}: connection refused (is 'trafficmgr serve' running? use --server)\n")
    rows = _table(out)
    assert {node: row["REPLICA"] for node, row in rows.items()} == \
        {node: r.name for node, r in placement.items() if r is not dead}

    orphan = next(node for node, r in placement.items() if r is dead)
    code, out, err = run(capsys, "config-dump", "--node-id", orphan, *admin, "--type", "clusters")
    assert code == 0, err
    dump = yaml.safe_load(out)
    assert dump["node_id"] == orphan and dump["view"] is None, "no replica holds its stream now"
    assert dump["replica"] == replicas[0].name, "answered by the first live replica that knows the pod"
    assert err.startswith(f"trafficmgr: warning: replica {dead.admin} did not answer: ")

    code, out, err = run(capsys, "config-dump", "--node-id", "ghost.default", *admin)
    assert code == 1 and out == ""
    assert err.splitlines() == [
        f"trafficmgr: error: replica {dead.admin} did not answer: cannot reach the trafficmgr admin endpoint at "
        f"{dead.admin}: connection refused (is 'trafficmgr serve' running? use --server)",
        "trafficmgr: error: unknown node id 'ghost.default'; 'trafficmgr proxy-status' lists connected nodes",
    ]
