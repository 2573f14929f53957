"""Local mode's pods under the real kubectl: ``logs`` (``-c``, ``--tail``, ``--limit-bytes``, ``-f``, the
errors), ``wait`` on the Ready condition the local kubelet writes, and ``rollout restart`` really
restarting the pods' processes.

The API server and the local kubelet are wired as ``trafficmgr demo`` wires them (``_start_api``), with
real processes writing to their log files; no Envoy is needed, so this does not start the whole demo.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from trafficmgr.apiserver import APIServer
from trafficmgr.apiserver.access import new_token
from trafficmgr.local.kubelet import LocalKubelet
from trafficmgr.testing.cluster import Kubectl
from trafficmgr.testing.envoy import wait_for
from trafficmgr.testing.prereq import missing

# each container prints "<name> line <n>" every 0.1 s
TALKER = "import sys, time\nfor i in range(1, 100000):\n    print(sys.argv[1], 'line', i, flush=True)\n    time.sleep(0.1)\n"


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Kubectl, Path]]:
    if shutil.which("kubectl") is None:
        missing("kubectl not installed")
    state = tmp_path_factory.mktemp("local")
    api = APIServer(workload_controllers=True, service_cidr=f"127.{random.randrange(100, 200)}.3.0/24", token=new_token())
    kubelet = LocalKubelet(api.store, str(state), f"127.{random.randrange(100, 200)}.{random.randrange(0, 250)}.0/24").attach()
    api.controllers.runtime = kubelet
    api.start()
    try:
        yield Kubectl(api.write_kubeconfig(state / "kubeconfig"), state), state
    finally:
        api.stop()
        kubelet.close(3.0)


def talker(name: str) -> str:
    """A Deployment of one pod with two containers running TALKER (a JSON manifest)."""
    containers = [{"name": c, "image": "local", "command": [sys.executable, "-c", TALKER, c]} for c in ("main", "second")]
    return json.dumps({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
                       "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                                "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": containers}}}})


def pids(state: Path, pod: str) -> dict[str, int]:
    d = state / "pods" / f"default_{pod}"
    return {c: int((d / f"{c}.pid").read_text().strip()) for c in ("main", "second")}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_logs_wait_and_restart(local: tuple[Kubectl, Path]) -> None:
    kubectl, state = local
    kubectl.apply(talker("talker"))
    wait_for(lambda: kubectl.json("get", "pods", "-l", "app=talker")["items"], timeout=20)
    r = kubectl.run("wait", "--for=condition=Ready", "pod", "-l", "app=talker", "--timeout=30s")
    assert r.stdout.strip().endswith("condition met")
    (pod,) = [p["metadata"]["name"] for p in kubectl.json("get", "pods", "-l", "app=talker")["items"]]
    conds = {c["type"]: c for c in kubectl.json("get", "pod", pod)["status"]["conditions"]}
    assert conds["Ready"]["status"] == conds["ContainersReady"]["status"] == "True"
    wait_for(lambda: "main line 5\n" in kubectl("logs", pod, "-c", "main"), timeout=20)

    # the default container (the first), with kubectl's note; every line is the main container's
    r = kubectl.run("logs", pod)
    assert 'Defaulted container "main" out of: main, second' in r.stderr
    lines = r.stdout.splitlines()
    assert lines[:3] == ["main line 1", "main line 2", "main line 3"] and all(ln.startswith("main line ") for ln in lines)
    second = kubectl("logs", pod, "-c", "second").splitlines()
    assert second[0] == "second line 1" and all(ln.startswith("second line ") for ln in second)
    tail = kubectl("logs", pod, "-c", "main", "--tail=2").splitlines()
    assert len(tail) == 2 and int(tail[1].split()[-1]) == int(tail[0].split()[-1]) + 1 and int(tail[0].split()[-1]) >= 5
    assert kubectl("logs", pod, "-c", "main", "--tail=0") == ""
    assert kubectl("logs", pod, "-c", "main", "--limit-bytes=7") == "main li"
    assert kubectl("logs", "deployment/talker", "-c", "second", "--tail=1").startswith("second line ")

    # -f streams what is written after it started
    proc = subprocess.Popen(["kubectl", "logs", "-f", pod, "-c", "main", "--tail=1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=kubectl.env)
    try:
        assert proc.stdout is not None
        got = [proc.stdout.readline().strip() for _ in range(8)]
    finally:
        proc.kill()
        proc.wait()
    numbers = [int(ln.split()[-1]) for ln in got]
    assert numbers == list(range(numbers[0], numbers[0] + 8)), got

    # errors, with the real servers' texts
    r = kubectl.run("logs", pod, "-c", "nope", check=False)
    assert r.returncode == 1 and f"container nope is not valid for pod {pod}" in r.stderr, r.stderr
    r = kubectl.run("logs", pod, "-c", "main", "--previous", check=False)
    assert r.returncode == 1 and f'previous terminated container "main" in pod "{pod}" not found' in r.stderr
    r = kubectl.run("logs", pod, "-c", "main", "--timestamps", check=False)
    assert r.returncode == 1 and "--timestamps is not supported" in r.stderr
    kubectl.apply(textwrap.dedent("""\
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: notlocal}
        spec:
          selector: {matchLabels: {app: notlocal}}
          template:
            metadata: {labels: {app: notlocal}}
            spec: {containers: [{name: web, image: nginx}]}
        """))
    wait_for(lambda: kubectl.json("get", "pods", "-l", "app=notlocal")["items"], timeout=20)
    (other,) = [p["metadata"]["name"] for p in kubectl.json("get", "pods", "-l", "app=notlocal")["items"]]
    r = kubectl.run("logs", other, check=False)
    assert r.returncode == 1 and f'container "web" in pod "{other}" is waiting to start: ImageNotLocal' in r.stderr, r.stderr
    assert "Error: ImageNotLocal: image 'nginx' cannot run in local mode" in kubectl("describe", "pod", other)
    r = kubectl.run("logs", "no-such-pod", check=False)
    assert r.returncode == 1 and 'pods "no-such-pod" not found' in r.stderr

    # a crashed container: Ready goes False and True again (kubectl wait sees both through its watch); only
    # the conditions whose status changed get a new lastTransitionTime, startTime stays
    before = kubectl.json("get", "pod", pod)["status"]
    time.sleep(1.1)  # transition times have seconds precision
    unready = subprocess.Popen(["kubectl", "wait", "--for=condition=Ready=false", f"pod/{pod}", "--timeout=20s"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=kubectl.env)
    time.sleep(1)
    os.kill(pids(state, pod)["main"], signal.SIGKILL)
    assert unready.wait(20) == 0, unready.communicate()
    kubectl("wait", "--for=condition=Ready", f"pod/{pod}", "--timeout=20s")
    after = kubectl.json("get", "pod", pod)["status"]
    times = [{c["type"]: c["lastTransitionTime"] for c in st["conditions"]} for st in (before, after)]
    assert times[0]["PodScheduled"] == times[1]["PodScheduled"] and times[0]["Initialized"] == times[1]["Initialized"]
    assert times[1]["Ready"] > times[0]["Ready"] and times[1]["ContainersReady"] > times[0]["ContainersReady"]
    assert before["startTime"] == after["startTime"]
    assert {c["name"]: c["restartCount"] for c in after["containerStatuses"]} == {"main": 1, "second": 0}
    # the kubelet's Events about it, as `kubectl describe pod` lists them
    events = kubectl.json("get", "events", "--field-selector", f"involvedObject.name={pod}")["items"]
    seen = [(e["type"], e["reason"], e["involvedObject"]["fieldPath"], e["message"]) for e in events]
    assert ("Normal", "Started", "spec.containers{second}", "Started container second") in seen
    # a repeat counts up (a crash loop does not pile up Events)
    assert [e["count"] for e in events if e["involvedObject"]["fieldPath"] == "spec.containers{main}"
            and e["reason"] == "Started"] == [2]
    assert any(t == "Warning" and r == "BackOff" and "container main" in m and "exit code -9" in m for t, r, f, m in seen), seen
    assert "Back-off restarting failed container main" in kubectl("describe", "pod", pod)

    # rollout restart: a new pod with new processes, then the old pod's processes end
    old = pids(state, pod)
    assert all(alive(p) for p in old.values())
    follower = subprocess.Popen(["kubectl", "logs", "-f", pod, "-c", "second", "--tail=0"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=kubectl.env)
    assert follower.stdout is not None
    first_followed = follower.stdout.readline()  # streaming before the restart
    kubectl("rollout", "restart", "deployment/talker")
    r = kubectl.run("rollout", "status", "deployment/talker", "--timeout=60s")
    assert r.stdout.strip().endswith('deployment "talker" successfully rolled out')
    (new,) = [p["metadata"]["name"] for p in kubectl.json("get", "pods", "-l", "app=talker")["items"]]
    assert new != pod
    fresh = pids(state, new)
    assert all(alive(p) for p in fresh.values()) and not set(fresh.values()) & set(old.values())
    wait_for(lambda: not any(alive(p) for p in old.values()), timeout=15)
    wait_for(lambda: sorted(e["message"] for e in kubectl.json(
        "get", "events", "--field-selector", f"involvedObject.name={pod},reason=Killing")["items"])
        == ["Stopping container main", "Stopping container second"], timeout=10)
    try:  # -f on the replaced pod ends (0) once the pod is deleted
        assert follower.wait(15) == 0
    finally:
        if follower.poll() is None:
            follower.kill()
    followed = [first_followed.strip(), *follower.communicate()[0].splitlines()]
    assert all(ln.startswith("second line ") for ln in followed), followed
    wait_for(lambda: kubectl("logs", new, "-c", "main").startswith("main line 1\n"), timeout=20)
    r = kubectl.run("logs", pod, check=False)
    assert r.returncode == 1 and f'pods "{pod}" not found' in r.stderr
