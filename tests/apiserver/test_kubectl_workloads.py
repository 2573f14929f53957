"""The real kubectl's workload commands against the in-memory API server: ``wait``, ``rollout status``,
``rollout restart``/``history``/``undo``, ``get events --watch``.

There is no kubelet here: pods are started by a runtime that gives them an IP and leaves them not Ready,
and the test plays the kubelet by writing the Ready condition through the status subresource (as
``Kubectl.set_pod_status`` does), so it decides when each pod becomes Ready and can watch the
Deployment controller keep its rolling-update bounds in between.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
import threading
import time
from collections.abc import Iterator

import pytest

from trafficmgr.apiserver import APIServer
from trafficmgr.apiserver.access import new_token
from trafficmgr.apiserver.store import now_iso
from trafficmgr.testing.cluster import Kubectl
from trafficmgr.testing.envoy import wait_for


class StartedNotReady:
    """PodRuntime: a pod gets an IP and Running, not Ready (readiness is the test's to write)."""

    def __init__(self) -> None:
        self.n = 10

    def start(self, pod: dict) -> dict | None:
        self.n += 1
        ip = f"10.77.0.{self.n % 250 + 2}"
        now = now_iso()
        return {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "192.0.2.1", "startTime": now,
                "conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": now}]}

    def stop(self, pod: dict) -> None:
        return None


@pytest.fixture(scope="module")
def server() -> Iterator[APIServer]:
    srv = APIServer(bookmark_interval=0.5, token=new_token(), workload_controllers=True,
                    pod_runtime=StartedNotReady()).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def kubectl(server: APIServer, tmp_path_factory: pytest.TempPathFactory) -> Kubectl:
    home = tmp_path_factory.mktemp("kubehome")
    return Kubectl(server.write_kubeconfig(home / "kubeconfig"), home)


def popen(kubectl: Kubectl, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(["kubectl", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=kubectl.env)


def deployment(name: str, ns: str, replicas: int, extra_spec: str = "") -> str:
    return textwrap.dedent(f"""\
        apiVersion: apps/v1
        kind: Deployment
        metadata: {{name: {name}, namespace: {ns}}}
        spec:
          replicas: {replicas}
          selector: {{matchLabels: {{app: {name}}}}}
        {textwrap.indent(extra_spec, "  ")}
          template:
            metadata: {{labels: {{app: {name}}}}}
            spec:
              containers: [{{name: app, image: "example/{name}:1"}}]
        """)


def pods(kubectl: Kubectl, ns: str, app: str) -> list[dict]:
    return kubectl.json("get", "pods", "-n", ns, "-l", f"app={app}")["items"]


def is_ready(pod: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions") or [])


def test_wait_for_ready_follows_status_writes(kubectl: Kubectl) -> None:
    """``kubectl wait`` watches: it returns when a client writes Ready, not before, and times out with
    kubectl's message on a pod that never becomes Ready."""
    kubectl("create", "namespace", "waits")
    for name in ("w1", "w2", "w3"):
        kubectl("run", name, "-n", "waits", "--image=example/w", "--labels=app=waiter" if name != "w3" else "--labels=app=other")
    proc = popen(kubectl, "wait", "--for=condition=Ready", "pod", "-l", "app=waiter", "-n", "waits", "--timeout=40s")
    try:
        time.sleep(2)
        assert proc.poll() is None, proc.communicate()
        kubectl.set_pod_status("w1", "10.78.0.1", ready=True, namespace="waits")
        time.sleep(2)
        assert proc.poll() is None, "returned although w2 is not Ready"
        kubectl.set_pod_status("w2", "10.78.0.2", ready=False, namespace="waits")
        time.sleep(1)
        assert proc.poll() is None, "returned on Ready=False"
        kubectl.set_pod_status("w2", "10.78.0.2", ready=True, namespace="waits")
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert sorted(out.splitlines()) == ["pod/w1 condition met", "pod/w2 condition met"]
    r = kubectl.run("wait", "--for=condition=Ready", "pod/w3", "-n", "waits", "--timeout=1s", check=False)
    assert r.returncode == 1 and "timed out waiting for the condition on pods/w3" in r.stderr, r.stderr


def drive(kubectl: Kubectl, proc: subprocess.Popen[str], ns: str, app: str, replicas: int,
          min_ready: int, max_pods: int) -> tuple[str, str, set[str]]:
    """Play the kubelet until ``proc`` (a ``rollout status``) exits: make one not-Ready pod Ready at a
    time, checking the rolling-update bounds (Ready pods never below ``min_ready``, pods never above
    ``max_pods``) at every step. Returns (stdout, stderr, every pod name seen)."""
    seen: set[str] = set()
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        current = pods(kubectl, ns, app)
        seen |= {p["metadata"]["name"] for p in current}
        ready = [p for p in current if is_ready(p)]
        assert len(current) <= max_pods, [p["metadata"]["name"] for p in current]
        assert len(ready) >= min_ready, f"only {len(ready)} Ready pods: {[p['metadata']['name'] for p in current]}"
        waiting = [p for p in current if not is_ready(p)]
        if waiting:
            p = waiting[0]
            kubectl.set_pod_status(p["metadata"]["name"], p["status"]["podIP"], ready=True, namespace=ns)
        time.sleep(0.3)
    if proc.poll() is None:
        proc.kill()
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, (out, err)
    return out, err, seen


def test_rollout_status_restart_history_undo(kubectl: Kubectl) -> None:
    """A rollout as the real controller does it: ``rollout status`` waits for each new pod, ``rollout
    restart`` makes a new ReplicaSet that replaces the pods one by one within maxSurge=1/maxUnavailable=0,
    the status carries the counts and conditions the real controller reports, and ``rollout undo`` goes
    back to the first ReplicaSet (revision 3)."""
    ns, app = "rolls", "roll"
    kubectl("create", "namespace", ns)
    kubectl.apply(deployment(app, ns, 3, "strategy: {type: RollingUpdate, rollingUpdate: {maxSurge: 1, maxUnavailable: 0}}"))
    status = popen(kubectl, "rollout", "status", f"deployment/{app}", "-n", ns, "--timeout=60s")
    time.sleep(2)
    assert status.poll() is None, status.communicate()
    out, _, first = drive(kubectl, status, ns, app, 3, min_ready=0, max_pods=3)
    assert f'Waiting for deployment "{app}" rollout to finish: 0 of 3 updated replicas are available...' in out
    assert out.strip().endswith(f'deployment "{app}" successfully rolled out')
    assert len(first) == 3
    (rs1,) = kubectl.json("get", "rs", "-n", ns)["items"]

    assert kubectl("rollout", "restart", f"deployment/{app}", "-n", ns).strip() == f"deployment.apps/{app} restarted"
    d = kubectl.json("get", "deployment", app, "-n", ns)
    assert "kubectl.kubernetes.io/restartedAt" in d["spec"]["template"]["metadata"]["annotations"]
    status = popen(kubectl, "rollout", "status", f"deployment/{app}", "-n", ns, "--timeout=60s")
    out, _, seen = drive(kubectl, status, ns, app, 3, min_ready=3, max_pods=4)
    assert "new replicas have been updated" in out or "old replicas are pending termination" in out, out
    assert out.strip().endswith(f'deployment "{app}" successfully rolled out')

    now = pods(kubectl, ns, app)
    assert len(now) == 3 and not {p["metadata"]["name"] for p in now} & first
    sets = {rs["metadata"]["name"]: rs for rs in kubectl.json("get", "rs", "-n", ns)["items"]}
    assert sets[rs1["metadata"]["name"]]["spec"]["replicas"] == 0
    (rs2,) = [rs for name, rs in sets.items() if name != rs1["metadata"]["name"]]
    assert {p["metadata"]["labels"]["pod-template-hash"] for p in now} == {rs2["metadata"]["labels"]["pod-template-hash"]}
    assert rs2["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "2"
    d = kubectl.json("get", "deployment", app, "-n", ns)
    st = d["status"]
    assert st["observedGeneration"] == d["metadata"]["generation"] == 2
    assert (st["replicas"], st["updatedReplicas"], st["readyReplicas"], st["availableReplicas"]) == (3, 3, 3, 3)
    assert "unavailableReplicas" not in st
    conds = {c["type"]: c for c in st["conditions"]}
    assert (conds["Available"]["status"], conds["Available"]["reason"]) == ("True", "MinimumReplicasAvailable")
    assert (conds["Progressing"]["status"], conds["Progressing"]["reason"]) == ("True", "NewReplicaSetAvailable")
    assert conds["Progressing"]["message"] == f'ReplicaSet "{rs2["metadata"]["name"]}" has successfully progressed.'
    assert d["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "2"
    history = kubectl("rollout", "history", f"deployment/{app}", "-n", ns)
    assert [ln.split()[0] for ln in history.splitlines()[2:] if ln.strip()] == ["1", "2"]

    kubectl("rollout", "undo", f"deployment/{app}", "-n", ns)
    status = popen(kubectl, "rollout", "status", f"deployment/{app}", "-n", ns, "--timeout=60s")
    drive(kubectl, status, ns, app, 3, min_ready=3, max_pods=4)
    sets = {rs["metadata"]["name"]: rs for rs in kubectl.json("get", "rs", "-n", ns)["items"]}
    assert len(sets) == 2, sorted(sets)  # the first ReplicaSet came back, no third one
    assert sets[rs1["metadata"]["name"]]["spec"]["replicas"] == 3
    assert sets[rs1["metadata"]["name"]]["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "3"
    assert sets[rs2["metadata"]["name"]]["spec"]["replicas"] == 0


def test_rollout_status_progress_deadline(kubectl: Kubectl) -> None:
    """A rollout whose pods never become Ready ends ``rollout status`` with kubectl's deadline error."""
    kubectl("create", "namespace", "stuck")
    kubectl.apply(deployment("stuck", "stuck", 1, "progressDeadlineSeconds: 2"))
    start = time.monotonic()
    r = kubectl.run("rollout", "status", "deployment/stuck", "-n", "stuck", "--timeout=40s", check=False)
    assert r.returncode == 1 and 'error: deployment "stuck" exceeded its progress deadline' in r.stderr, r
    assert time.monotonic() - start < 15
    conds = {c["type"]: c for c in kubectl.json("get", "deployment", "stuck", "-n", "stuck")["status"]["conditions"]}
    assert (conds["Progressing"]["status"], conds["Progressing"]["reason"]) == ("False", "ProgressDeadlineExceeded")
    assert (conds["Available"]["status"], conds["Available"]["reason"]) == ("False", "MinimumReplicasUnavailable")


def test_get_events_watch_streams_new_events(kubectl: Kubectl) -> None:
    """``kubectl get events --watch-only`` prints Events created after it started: one a client creates
    and the controllers' own (ScalingReplicaSet, SuccessfulCreate)."""
    ns = "evwatch"
    kubectl("create", "namespace", ns)
    lines: list[str] = []
    proc = popen(kubectl, "get", "events", "-n", ns, "--watch-only")

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))

    threading.Thread(target=read, daemon=True).start()
    try:
        time.sleep(2)
        kubectl("create", "-f", "-", input=json.dumps({
            "apiVersion": "v1", "kind": "Event", "metadata": {"name": "hand.1", "namespace": ns},
            "involvedObject": {"kind": "Pod", "name": "somepod", "namespace": ns},
            "reason": "HandMade", "message": "written by the test", "type": "Warning"}))
        kubectl.apply(deployment("evapp", ns, 1))
        wait_for(lambda: any("HandMade" in ln for ln in lines)
                 and any("ScalingReplicaSet" in ln and "Scaled up replica set evapp-" in ln for ln in lines)
                 and any("SuccessfulCreate" in ln and "Created pod: evapp-" in ln for ln in lines), timeout=20)
    finally:
        proc.kill()
        proc.wait()
    hand = next(ln for ln in lines if "HandMade" in ln)
    assert "Warning" in hand and "pod/somepod" in hand and "written by the test" in hand


def test_rollout_pause_resume(kubectl: Kubectl) -> None:
    """A paused Deployment takes template changes without rolling them out (status observed, 0 updated);
    ``rollout resume`` rolls them out."""
    ns, app = "paused", "pz"
    kubectl("create", "namespace", ns)
    kubectl.apply(deployment(app, ns, 2))
    drive(kubectl, popen(kubectl, "rollout", "status", f"deployment/{app}", "-n", ns, "--timeout=60s"), ns, app, 2, 0, 2)
    kubectl("rollout", "pause", f"deployment/{app}", "-n", ns)
    kubectl("set", "image", f"deployment/{app}", "app=example/pz:2", "-n", ns)
    d: dict = {}

    def observed() -> bool:
        d.update(kubectl.json("get", "deployment", app, "-n", ns))
        return d["status"]["observedGeneration"] == d["metadata"]["generation"]

    wait_for(observed, timeout=10)
    assert d["status"].get("updatedReplicas", 0) == 0 and d["status"]["replicas"] == 2
    progressing = next(c for c in d["status"]["conditions"] if c["type"] == "Progressing")
    assert (progressing["status"], progressing["reason"]) == ("Unknown", "DeploymentPaused")
    assert len(kubectl.json("get", "rs", "-n", ns)["items"]) == 1
    r = kubectl.run("rollout", "status", f"deployment/{app}", "-n", ns, "--timeout=2s", check=False)
    assert r.returncode == 1 and f'Waiting for deployment "{app}" rollout to finish: 0 out of 2 new replicas' in r.stdout
    kubectl("rollout", "resume", f"deployment/{app}", "-n", ns)
    out, _, _ = drive(kubectl, popen(kubectl, "rollout", "status", f"deployment/{app}", "-n", ns, "--timeout=60s"),
                      ns, app, 2, 1, 3)
    assert out.strip().endswith(f'deployment "{app}" successfully rolled out')
    images = {p["spec"]["containers"][0]["image"] for p in pods(kubectl, ns, app)}
    assert images == {"example/pz:2"}
