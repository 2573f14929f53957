"""``trafficmgr demo``'s Prometheus: a real ``prometheus`` (Debian package) behind the Service
``prometheus``, queried through the gateway as the original README does (``/api/v1/...`` on the ingress),
scraping real Envoys (the gateway and the client pod's sidecar) and the control plane with the chart's
scrape configuration; discovery follows pods as they change. Without the binary the demo says how to get
it. Under ``CI`` a missing ``prometheus`` fails these tests (``.ci/run`` installs it)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from tests.local.test_demo import request
from trafficmgr.testing.cluster import Kubectl
from trafficmgr.testing.envoy import free_port, wait_for
from trafficmgr.testing.prereq import missing

pytestmark = [pytest.mark.envoy, pytest.mark.slow]

READY_TIMEOUT_S = 120.0
REVIEWS = "9080|default|reviews"
PORTS = ("http", "https", "admin", "xds", "serve_admin", "zipkin", "api")


@attrs.define
class Demo:
    proc: subprocess.Popen[str]
    state: Path
    ports: dict[str, int]
    pod_net: str
    lines: list[str] = attrs.field(factory=list)
    kubeconfig: str = ""

    def query(self, promql: str) -> list[dict[str, Any]]:
        """``GET /api/v1/query`` through the gateway: the result vector (fails on an error answer)."""
        status, _, body = request("127.0.0.1", self.ports["http"], "127.0.0.1",
                                  "/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        assert status == 200, (status, body[:300])
        data = json.loads(body)
        assert data["status"] == "success", data
        return data["data"]["result"]  # type: ignore[no-any-return]

    def targets(self) -> list[dict[str, Any]]:
        status, _, body = request("127.0.0.1", self.ports["http"], "127.0.0.1", "/api/v1/targets?state=active")
        assert status == 200, (status, body[:300])
        return json.loads(body)["data"]["activeTargets"]  # type: ignore[no-any-return]

    def pod_ip(self, app: str) -> str:
        pods = Kubectl(self.kubeconfig).json("get", "pods", "-l", f"app={app}")["items"]
        ips = [p["status"]["podIP"] for p in pods if p["status"].get("podIP") and not p["metadata"].get("deletionTimestamp")]
        assert len(ips) == 1, ips
        return ips[0]


def start_demo(state: Path, env: dict[str, str] | None = None) -> Demo:
    a, b = random.randrange(100, 200), random.randrange(0, 254)
    ports = {name: free_port() for name in PORTS}
    argv = [sys.executable, "-m", "trafficmgr", "demo", "--state-dir", str(state),
            *[arg for name in PORTS for arg in (f"--{name.replace('_', '-')}-port", str(ports[name]))],
            "--pod-cidr", f"127.{a}.{b}.0/24", "--service-cidr", f"127.{a}.{b + 1}.0/24"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env)
    d = Demo(proc, state.resolve(), ports, f"127.{a}.{b}.")

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            d.lines.append(line.rstrip("\n"))

    threading.Thread(target=read, daemon=True).start()
    return d


def stop_demo(d: Demo) -> None:
    if d.proc.poll() is None:
        d.proc.send_signal(signal.SIGTERM)
        try:
            d.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(d.proc.pid, signal.SIGKILL)
            d.proc.wait(10)
    subprocess.run([sys.executable, "-m", "trafficmgr", "proxies", "--runtime", "local", "--state-dir",
                    str(d.state / "sidecars"), "--remove-all"], capture_output=True, timeout=60)
    from trafficmgr.local.processes import kill_leftovers

    kill_leftovers(str(d.state))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    if shutil.which("prometheus") is None:
        missing("prometheus not installed (apt install prometheus)")
    if shutil.which("kubectl") is None:
        missing("kubectl not installed")
    d = start_demo(tmp_path_factory.mktemp("demo-prom") / "state")
    try:
        wait_for(lambda: any(ln.startswith("export KUBECONFIG=") for ln in d.lines) or d.proc.poll() is not None,
                 READY_TIMEOUT_S, 0.2)
        assert d.proc.poll() is None, "demo exited:\n" + "\n".join(d.lines)
        d.kubeconfig = next(ln for ln in d.lines if ln.startswith("export KUBECONFIG="))[len("export KUBECONFIG="):]
        yield d
    finally:
        stop_demo(d)


def test_ready_line_names_prometheus(demo: Demo) -> None:
    ready = next(ln for ln in demo.lines if ln.startswith("ready"))
    assert f"http://127.0.0.1:{demo.ports['http']}/api/v1/query" in ready, ready
    assert f"http://{demo.pod_net}2:9090" in ready, ready
    assert not [ln for ln in demo.lines if "apt install prometheus" in ln]


def test_queries_through_the_gateway_see_sidecar_and_gateway_envoys(demo: Demo) -> None:
    """The README's runtime-metrics walkthrough: traffic through the gateway and from the client pod's
    sidecar, then the seed README's query through the gateway returns both Envoys' counters."""
    client, gateway = demo.pod_ip("client"), f"{demo.pod_net}1"
    for _ in range(5):
        assert request("127.0.0.1", demo.ports["http"], "127.0.0.1", "/reviews/0")[0] == 200
        assert request(client, 15001, "reviews:9080", "http://reviews:9080/reviews/0")[0] == 200

    def counters() -> dict[str, tuple[str, str, float]]:
        result = demo.query(f'envoy_cluster_outbound_upstream_rq_completed{{envoy_cluster_name="{REVIEWS}"}}')
        return {r["metric"]["instance"]: (r["metric"]["job"], r["metric"].get("pod", ""), float(r["value"][1])) for r in result}

    def both() -> dict[str, tuple[str, str, float]] | None:
        seen = counters()
        done = seen.get(f"{client}:8900", ("", "", 0.0))[2] >= 5 and seen.get(f"{gateway}:8900", ("", "", 0.0))[2] >= 5
        return seen if done else None

    seen = wait_for(both, 40, 1.0, f"Prometheus never had both Envoys' {REVIEWS} counters")
    job, pod, _ = seen[f"{client}:8900"]
    assert job == "envoy" and pod.startswith("client-"), seen
    assert seen[f"{gateway}:8900"][:2] == ("envoy-gateway", "traffic-ingress")
    # the seed README's form, selecting the ingress pod by instance
    one = demo.query(f"envoy_cluster_outbound_upstream_rq_completed{{instance='{gateway}:8900', envoy_cluster_name='{REVIEWS}'}}")
    assert len(one) == 1 and float(one[0]["value"][1]) >= 5, one


def test_control_plane_is_scraped_and_names_are_listed(demo: Demo) -> None:
    up = wait_for(lambda: demo.query('up{job="trafficmgr"} == 1') or None, 30, 1.0, "the control plane is never up")
    assert up[0]["metric"]["instance"] == f"127.0.0.1:{demo.ports['serve_admin']}", up
    status, _, body = request("127.0.0.1", demo.ports["http"], "127.0.0.1", "/api/v1/label/__name__/values")
    names = json.loads(body)["data"]
    assert status == 200 and "envoy_cluster_outbound_upstream_rq_completed" in names
    assert any(n.startswith("trafficmgr_") for n in names), names[:50]
    # Only Envoy stats-only listeners and the control plane's /metrics are scraped (no pod without sidecar).
    scraped = {(t["labels"]["job"], t["scrapeUrl"].split("/", 3)[3]) for t in demo.targets()}
    assert scraped <= {("envoy", "stats/prometheus"), ("envoy-gateway", "stats/prometheus"), ("trafficmgr", "metrics")}, scraped


def test_discovery_follows_pods(demo: Demo) -> None:
    """A sidecar started after Prometheus becomes a target (file discovery rewritten on the Pod change),
    and its pod IP's stats answer; removing the sidecar (annotation emptied) drops the target."""
    kubectl = Kubectl(demo.kubeconfig)
    kubectl("label", "deployment", "details-v1", "traffic.envoy.enabled=true")

    def target() -> dict[str, Any] | None:
        found = [t for t in demo.targets() if t["labels"]["job"] == "envoy" and t["labels"].get("pod", "").startswith("details-v1-")]
        return found[0] if found and found[0]["health"] == "up" else None

    t = wait_for(target, 60, 1.0, "the details sidecar never became an up target")
    assert t["labels"]["instance"] == f"{demo.pod_ip('details')}:8900"
    kubectl("label", "deployment", "details-v1", "traffic.envoy.enabled-")
    wait_for(lambda: not [x for x in demo.targets() if x["labels"]["job"] == "envoy"
                          and x["labels"].get("pod", "").startswith("details-v1-")], 60, 1.0, "target never dropped")


def test_stop_leaves_no_prometheus(demo: Demo) -> None:
    demo.proc.send_signal(signal.SIGTERM)
    assert demo.proc.wait(20) == 0
    left = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if str(demo.state).encode() in cmd and b"prometheus" in cmd:
                left.append(cmd)
    assert left == []


def test_without_prometheus_the_demo_says_how_to_get_it(tmp_path: Path) -> None:
    """PATH without ``prometheus`` (only openssl, for the API server's certificate; Envoy is found next to
    Python): one line naming the package, and the demo carries on."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    openssl = shutil.which("openssl")
    if openssl is None:
        missing("openssl not installed")
    (bindir / "openssl").symlink_to(openssl)
    d = start_demo(tmp_path / "state", env={**os.environ, "PATH": str(bindir)})
    try:
        line = wait_for(lambda: next((ln for ln in d.lines if "apt install prometheus" in ln), None) or d.proc.poll(),
                        60, 0.2, "no line about prometheus")
        assert isinstance(line, str) and "prometheus is not installed" in line, d.lines
        assert d.proc.poll() is None, d.lines
        assert not (d.state / "prometheus").exists()
    finally:
        stop_demo(d)
