"""``trafficmgr bench``: a scale benchmark of the whole pipeline (not a test).

Against the test API server (a subprocess, loaded with objects through its HTTP API as a cluster would be),
with the real control plane in this process and simulated Envoys in another:

1. cold build: S services x P pods, every policy plugin enabled, labels on a realistic share of services;
2. incremental change: one pod's weight label; CPU of the sync loop and resources re-serialized;
3. propagation: K simulated ADS clients (+ one real Envoy when available), 20 label changes made through
   the API: time from the API write to the last client's ACK, p50/p99, state-of-the-world and delta;
4. limit: the same push by a minimal ADS loop sending prebuilt bytes; ``overhead_ratio`` = ours / minimal;
5. memory: control-plane RSS with everything loaded and the largest K connected.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


def rss_mb(pid: int | None = None) -> float:
    with open(f"/proc/{pid or 'self'}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


class Api:
    """The test API server as a subprocess, and plain HTTP writes to it."""

    def __init__(self, workdir: Path) -> None:
        from trafficmgr.testing.envoy import free_port

        self.port = free_port()
        self.kubeconfig = workdir / "kubeconfig"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "trafficmgr.apiserver", "--port", str(self.port), "--kubeconfig", str(self.kubeconfig),
             "--history", "200000"],
            stdout=subprocess.DEVNULL, stderr=open(workdir / "apiserver.log", "wb"),
        )
        self.url = f"https://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while True:
            try:  # the server writes its kubeconfig (token, certificate) once it listens
                self._connect()
                break
            except (OSError, KeyError, TypeError):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("the test API server did not start") from None
                time.sleep(0.05)

    def _connect(self) -> None:
        """Read the token and CA from the kubeconfig and GET /version with them."""
        import base64
        import ssl

        import yaml

        cfg = yaml.safe_load(self.kubeconfig.read_text())
        self.ca = base64.b64decode(cfg["clusters"][0]["cluster"]["certificate-authority-data"]).decode()
        self.ssl_context = ssl.create_default_context(cadata=self.ca)
        self.token = cfg["users"][0]["user"]["token"]
        self.auth = {"Authorization": f"Bearer {self.token}"}
        req = urllib.request.Request(self.url + "/version", headers=self.auth)
        urllib.request.urlopen(req, timeout=1, context=self.ssl_context).read()

    def request(self, method: str, path: str, body: Any, ctype: str = "application/json") -> None:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method=method,
                                     headers={"Content-Type": ctype, **self.auth})
        urllib.request.urlopen(req, timeout=60, context=self.ssl_context).read()

    def get(self, path: str) -> Any:
        req = urllib.request.Request(self.url + path, headers=self.auth)
        return json.loads(urllib.request.urlopen(req, timeout=60, context=self.ssl_context).read())

    def count(self, path: str) -> int:
        """How many objects a list answers (``path`` a collection)."""
        return len(self.get(path)["items"])

    def cpu_seconds(self) -> float:
        """User + system CPU seconds the server process has used."""
        import os

        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def load(api: Api, services: int, pods: int, connections: int = 2, processes: int = 2,
         window: int = 16) -> dict[str, Any]:
    """Create S services (policy labels on every other one) and S*P ready pods through the API, one POST
    per object (:mod:`trafficmgr.bench.loader`), then wait until the EndpointSlice controller has caught up
    (the last Service's Endpoints list its P pods; the controller handles events in order).

    Returns ``seconds`` (creates until settled), ``first_rate``/``last_rate`` (pods created per second over
    the first and the last tenth of the pods) and ``settled_s`` (the wait after the last create)."""
    from trafficmgr.bench.loader import Loader

    t = time.perf_counter()
    loader = Loader(api.url, api.token, api.ca, connections=connections, processes=processes, window=window)
    loader.create("services", services, services, pods)
    times = loader.create("pods", services * pods, services, pods)
    created = time.perf_counter()
    last = f"/api/v1/namespaces/default/endpoints/svc-{services - 1}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            subsets = api.get(last).get("subsets") or []
        except urllib.error.HTTPError:
            subsets = []
        if sum(len(s.get("addresses") or []) for s in subsets) >= pods:
            break
        time.sleep(0.05)
    else:
        raise RuntimeError(f"the API server's EndpointSlice controller did not catch up within 600 s ({last})")
    tenth = max(1, len(times) // 10)

    def rate(part: list[float]) -> float:
        return round((len(part) - 1) / (part[-1] - part[0]), 1) if len(part) > 1 and part[-1] > part[0] else 0.0

    return {"seconds": time.perf_counter() - t, "first_rate": rate(times[:tenth]), "last_rate": rate(times[-tenth:]),
            "settled_s": round(time.perf_counter() - created, 2)}


class Clients:
    """The simulated-clients subprocess (``trafficmgr.bench.clients``)."""

    def __init__(self, target: str, count: int, delta: bool, services: int, pods: int) -> None:
        cmd = [sys.executable, "-m", "trafficmgr.bench.clients", "--target", target, "--clients", str(count),
               "--services", str(services), "--pods", str(pods)]
        if delta:
            cmd.append("--delta")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def ask(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the simulated clients exited")
        return json.loads(line)

    def close(self) -> None:
        try:
            self.ask(cmd="quit")
        except Exception:  # noqa: BLE001 - it may be gone already
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run_bench(services: int = 1000, pods: int = 10, clients: tuple[int, ...] = (100, 1000), changes: int = 20,
              with_envoy: bool = True) -> dict[str, Any]:
    """Run every phase and return the result dict (see the module docstring)."""
    from trafficmgr.bench.minimal import MinimalAds
    from trafficmgr.core.controlplane import ControlPlane
    from trafficmgr.core.kube.client import KubeClient, load_api_client
    from trafficmgr.core.plugins import PluginHost
    from trafficmgr.core.xds.server import XdsServerThread

    workdir = Path(tempfile.mkdtemp(prefix="tm-bench-"))
    result: dict[str, Any] = {"services": services, "pods": services * pods, "clients": list(clients)}
    api = Api(workdir)
    envoy = None
    cp = None
    xds = None
    done = False
    gc_pauses: _GcPauses | None = None
    guard = _MemoryGuard().start()
    try:
        loaded = load(api, services, pods)
        result["load_s"] = round(loaded["seconds"], 2)
        result["load_pods_per_s_first_last_tenth"] = [loaded["first_rate"], loaded["last_rate"]]
        _progress(result)
        rss0 = rss_mb()
        options = argparse.Namespace(xds_auth="none", sidecar_port=10000, sidecar_address="0.0.0.0",
                                     zipkin_address="127.0.0.1:9411")
        cp = ControlPlane(PluginHost.load(), options, KubeClient(load_api_client(str(api.kubeconfig))), freeze_gc=True)
        xds = XdsServerThread(cp.cache, "127.0.0.1", 0, authorizer=cp.authorize).start()
        cp.xds = xds
        t = time.perf_counter()
        cp.start_watches()
        if not cp.wait_ready(300):
            raise RuntimeError(f"control plane not ready: {cp.ready()[1]}")
        result["cold_build_s"] = round(time.perf_counter() - t, 3)
        first = cp.cache.get("sidecar")
        assert first is not None
        result["cold_build_only_s"] = round(cp.builder.stats.seconds, 3) if cp.builds == 1 else None
        result["resources"] = first.resource_count()
        result["bytes"] = sum(len(r.body) for ts in first.types.values() for r in ts.resources.values())
        result["rss_mb_after_build"] = round(rss_mb(), 1)
        result["rss_mb_model_and_snapshots"] = round(rss_mb() - rss0, 1)
        _progress(result)

        if with_envoy:
            envoy = _start_envoy(xds.port, workdir)

        # Incremental change: one pod's weight, through the API. Measured once the Envoy holds the first
        # snapshot: its initial fetch (15 MB at 10k services) runs on other threads and, measured during
        # it, the sync thread's CPU time counts the contention, not the change.
        if envoy is not None:
            result["real_envoy_synced_before_change"] = _envoy_synced(envoy, cp)
        cpu, ser = [], []
        for i in range(9):
            cp.last_cycle = {}
            api.request("PATCH", "/api/v1/namespaces/default/pods/svc-7-0",
                        {"metadata": {"labels": {"traffic.endpoint.weight": str(10 + i)}}}, "application/merge-patch+json")
            deadline = time.monotonic() + 10
            while not cp.last_cycle and time.monotonic() < deadline:
                time.sleep(0.002)
            cpu.append(cp.last_cycle.get("cpu_ms", float("nan")))
            ser.append(int(cp.last_cycle.get("serialized", -1)))
        result["incremental_cpu_ms"] = round(statistics.median(cpu), 3)
        result["incremental_cpu_ms_all"] = [round(c, 3) for c in cpu]
        result["incremental_resources_reserialized"] = statistics.median(ser)
        _progress(result)

        # Propagation, then the minimal loop with the same clients. The control plane's garbage collector
        # pauses are recorded meanwhile (a full collection over millions of objects stalls every thread).
        gc_pauses = _GcPauses().start()
        prop50: dict[str, dict[str, float]] = {"sotw": {}, "delta": {}}
        prop99: dict[str, dict[str, float]] = {"sotw": {}, "delta": {}}
        min50: dict[str, dict[str, float]] = {"sotw": {}, "delta": {}}
        ratio: dict[str, dict[str, float | None]] = {"sotw": {}, "delta": {}}
        rss_streams = 0.0
        rss_by: dict[str, float] = {}
        to_model: list[float] = []
        to_publish: list[float] = []
        to_notify: dict[str, dict[str, list[float]]] = {"sotw": {}, "delta": {}}
        builds: list[int] = []
        weight = 20
        for k in clients:
            for mode in ("sotw", "delta"):
                try:
                    sim = guard.watch(Clients(f"127.0.0.1:{xds.port}", k, mode == "delta", services, pods))
                    try:
                        ready = sim.ask(cmd="ready", timeout=180)["ready"]
                        if ready < k:
                            raise RuntimeError(f"only {ready} of {k} simulated clients got config")
                        time.sleep(3)  # let the initial burst's buffers go (the server trims after 2 s of quiet)
                        rss_streams = max(rss_streams, rss_mb())
                        rss_by[f"{mode}/{k}"] = round(rss_mb(), 1)
                        worst = []
                        for _ in range(changes):
                            cp.last_cycle = {}
                            builds_before = cp.builds
                            weight = weight % 120 + 1
                            sim.ask(cmd="drain")
                            since = time.time()
                            api.request("PATCH", "/api/v1/namespaces/default/pods/svc-11-0",
                                        {"metadata": {"labels": {"traffic.endpoint.weight": str(weight)}}},
                                        "application/merge-patch+json")
                            lat = sim.ask(cmd="wait", since=since, type="endpoints", timeout=60)["latency_ms"]
                            worst.append(max(lat) if lat else float("nan"))
                            builds.append(cp.builds - builds_before)
                            cycle = cp.last_cycle
                            if cycle:
                                to_model.append((cycle["started"] - since) * 1000)
                                to_publish.append((cycle["published"] - since) * 1000)
                                to_notify[mode].setdefault(str(k), []).append((cycle["notified"] - since) * 1000)
                        prop50[mode][str(k)] = round(_pct(worst, 0.5), 2)
                        prop99[mode][str(k)] = round(_pct(worst, 0.99), 2)
                    finally:
                        sim.close()
                    snap = cp.cache.get("sidecar")
                    assert snap is not None
                    minimal = MinimalAds(snap).start()
                    sim = guard.watch(Clients(f"127.0.0.1:{minimal.port}", k, mode == "delta", services, pods))
                    try:
                        sim.ask(cmd="ready", timeout=180)
                        worst = []
                        for i in range(changes):
                            sim.ask(cmd="drain")
                            since = time.time()
                            minimal.push(f"min-{i}")
                            lat = sim.ask(cmd="wait", since=since, type="endpoints", timeout=60)["latency_ms"]
                            worst.append(max(lat) if lat else float("nan"))
                        min50[mode][str(k)] = round(_pct(worst, 0.5), 2)
                    finally:
                        sim.close()
                        minimal.stop()
                    ratio[mode][str(k)] = round(prop50[mode][str(k)] / min50[mode][str(k)], 2) if min50[mode][str(k)] else None
                except RuntimeError as e:  # this phase failed (or the memory guard stopped it): keep the rest
                    result.setdefault("errors", []).append(f"{mode}/{k}: {e}")
                    if guard.tripped:
                        result["aborted"] = (f"{mode}/{k}: the machine's available memory fell under "
                                             f"{guard.floor_mb} MB; the simulated clients were stopped")
                        break
                _progress(result, {"propagation_p50_ms": prop50, "propagation_p99_ms": prop99, "minimal_p50_ms": min50})
            if guard.tripped:
                break
        result["propagation_p50_ms"] = prop50
        result["propagation_p99_ms"] = prop99
        result["minimal_p50_ms"] = min50
        result["overhead_ratio"] = ratio
        # Where the time goes before the push: API write -> watch event in the sync loop -> snapshot published.
        result["builds_per_change"] = statistics.median(builds) if builds else None
        result["api_write_to_event_p50_ms"] = round(_pct(to_model, 0.5), 2)
        result["api_write_to_published_p50_ms"] = round(_pct(to_publish, 0.5), 2)
        # The xDS push alone against the minimal loop: our p50 minus the time until streams were woken,
        # both of the same mode and client count.
        result["api_write_to_notified_p50_ms"] = round(_pct([t for m in to_notify.values() for ts in m.values() for t in ts], 0.5), 2)
        result["push_overhead_ratio"] = {
            mode: {k: round((prop50[mode][k] - _pct(to_notify[mode].get(k, []), 0.5)) / min50[mode][k], 2)
                   if min50[mode].get(k) and to_notify[mode].get(k) else None for k in prop50[mode]}
            for mode in prop50
        }
        result["gc_pauses_ms"] = gc_pauses.stop()
        result["rss_mb"] = round(rss_streams, 1)
        result["rss_mb_by_mode"] = rss_by
        if envoy is not None:
            result["real_envoy_synced"] = _envoy_synced(envoy, cp)
        result["nacks"] = len(xds.nacks())
        done = True
        return result
    finally:
        guard.stop()
        if gc_pauses is not None:
            gc_pauses.stop()  # idempotent: the callback must not outlive the run
        if envoy is not None:
            envoy.stop()
        if cp is not None:
            cp.stop()
        if xds is not None:
            xds.stop(0.5)
        api.stop()
        if done:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"bench: logs kept in {workdir}", file=sys.stderr)


def _progress(result: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    """What is measured so far, one JSON line on stderr (a run stopped later still leaves its figures)."""
    print("bench progress: " + json.dumps({**result, **(extra or {})}), file=sys.stderr, flush=True)


class _MemoryGuard:
    """Stops the simulated clients when the machine's available memory falls under ``floor_mb``: at 10k
    services a thousand streams need many gigabytes, and the machine is shared (the kernel's OOM killer
    would otherwise pick a process, after minutes of thrashing)."""

    def __init__(self, floor_mb: int = 2500) -> None:
        import threading

        self.floor_mb = floor_mb
        self.tripped = False
        self._clients: Clients | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-memory-guard", daemon=True)

    def start(self) -> _MemoryGuard:
        self._thread.start()
        return self

    def watch(self, clients: Clients) -> Clients:
        self._clients = clients
        if self.tripped:
            clients.proc.kill()
        return clients

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            if _available_mb() < self.floor_mb:
                self.tripped = True
                if self._clients is not None and self._clients.proc.poll() is None:
                    self._clients.proc.kill()

    def stop(self) -> None:
        self._stop.set()


def _available_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return 1 << 30


class _GcPauses:
    """Collects this process's garbage-collection pauses by generation (``gc.callbacks``)."""

    def __init__(self) -> None:
        self.pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._t0 = 0.0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.pauses[info["generation"]].append((time.perf_counter() - self._t0) * 1000)

    def start(self) -> _GcPauses:
        import gc

        gc.callbacks.append(self._callback)
        return self

    def stop(self) -> dict[str, Any]:
        """``{"gen<N>": {"count": n, "max": ms, "total": ms}}``."""
        import gc

        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)
        return {f"gen{g}": {"count": len(p), "max": round(max(p, default=0.0), 2), "total": round(sum(p), 1)}
                for g, p in self.pauses.items()}


def _start_envoy(port: int, workdir: Path) -> Any:
    from trafficmgr.core.bootstrap import bootstrap
    from trafficmgr.core.envoy import EnvoyNotFound
    from trafficmgr.testing.envoy import EnvoyProcess

    cfg = bootstrap("svc-0-0.default", "sidecar", "127.0.0.1", port, admin_port=0)
    # The sidecar listener binds 0.0.0.0:10000; the bench Envoy only needs to accept config.
    try:
        return EnvoyProcess(cfg, workdir / "envoy", wait="admin").start()
    except (EnvoyNotFound, Exception):  # noqa: BLE001 - the benchmark still runs without it
        return None


def _envoy_synced(envoy: Any, cp: Any) -> bool:
    snap = cp.cache.get("sidecar")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            dump = envoy.config_dump(include_eds=False)
            versions = {c.get("version_info") for cfg in dump.get("configs", []) for c in cfg.get("dynamic_active_clusters", [])}
            if snap is not None and snap.types[next(iter(snap.types))].version in versions:
                return True
        except Exception:  # noqa: BLE001
            pass
        time.sleep(0.2)
    return False


__all__ = ["run_bench", "rss_mb"]
