"""Request latency added by mutual TLS between two sidecars (not a test; issue 18). Needs root (network
namespaces), like the netns tests.

    sudo python benchmarks/bench_mtls.py [--rounds 40] [--batch 50]

The rig of ``tests/plugins/test_mtls.py``: the in-process control plane with ``--mtls``, a client pod and a
server pod in two network namespaces joined by a veth pair, each with its own sidecar Envoy whose working
directory holds its mesh identity (a throwaway CA, :class:`trafficmgr.testing.mesh.MeshTestCA`). The
server pod runs two HTTP applications, on 8080 and 9090. The SAME two Envoys carry both modes: each port
has two Services selecting the same pod, one in the default mode (permissive: the client's sidecar speaks
mTLS to a pod with a sidecar) and one labeled ``traffic.mtls=disable`` (plaintext)::

    keep-alive      web      (8080, http)  mTLS       webplain (8080, http)  plaintext
    new connection  raw      (9090, tcp)   mTLS       rawplain (9090, tcp)   plaintext

*keep-alive*: HTTP/1.1 GETs on one connection from the client pod's namespace to the Service's ClusterIP
(captured by the client's sidecar, which keeps its upstream connection to the server's sidecar): the
per-request cost of TLS records. *new connection*: one GET per new connection to a TCP Service; the
client's sidecar opens one upstream connection per downstream connection (tcp_proxy), so every mTLS
request pays a TLS handshake between the sidecars: where mTLS costs most. Envoy's defaults resume TLS
sessions (the client keeps a session, the server issues tickets), so after the first connection these are
mostly resumed handshakes (ECDHE, no certificate sent or verified), as between two long-lived sidecars in
a mesh; the server's ``ssl.session_reused`` count is reported ("resumed"). *newconn_full*: the same
through a third Service ``rawfull`` whose client cluster is built with ``max_session_keys: 0`` (an
in-memory wrapper of the plugin's cluster hook, in this process only): every handshake a full one
(certificates sent and verified both ways), the cost of a first connection between two sidecars.

Batches alternate (plaintext, mTLS, and the order flips every round) so machine noise hits both modes
alike. Each batch's Envoy counters are read around it: every mTLS new-connection batch must show exactly
one ``ssl.handshake`` per request on the server's inbound listener and on the client's cluster, every
plaintext batch none, and the keep-alive requests must have crossed the cluster meant (all its
connections TLS, or none). A failed check exits 1, so the benchmark cannot silently measure plaintext
twice. Prints a short table, then one JSON line (last line of stdout).
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import platform
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

from trafficmgr.plugins import mtls
from trafficmgr.testing.backends import HttpBackend
from trafficmgr.testing.cluster import LocalCluster, SidecarPod
from trafficmgr.testing.manifests import join, service
from trafficmgr.testing.mesh import MeshTestCA, meshed_pod
from trafficmgr.testing.netns import available

SERVER_IP = "10.244.1.5"
TD = "cluster.local"
HTTP_PORT, TCP_PORT = 8080, 9090
#: kind -> mode -> Service name
SERVICES = {"keepalive": {"plain": "webplain", "mtls": "web"}, "newconn": {"plain": "rawplain", "mtls": "raw"},
            "newconn_full": {"plain": "rawplain", "mtls": "rawfull"}}
PORTS = {"keepalive": HTTP_PORT, "newconn": TCP_PORT, "newconn_full": TCP_PORT}
#: The Service whose client cluster keeps no TLS session (every handshake a full one).
NO_RESUMPTION = "rawfull"
INBOUND_HS = "listener.inbound.ssl.handshake"
INBOUND_REUSED = "listener.inbound.ssl.session_reused"


def cluster(kind: str, mode: str) -> str:
    return f"{PORTS[kind]}|default|{SERVICES[kind][mode]}.outbound"


def stats(pod: SidecarPod) -> dict[str, int]:
    """Every counter and gauge of the sidecar (a stat Envoy has not made yet reads as 0 via ``.get``)."""
    out: dict[str, int] = {}
    for line in pod.admin("/stats").splitlines():
        key, _, value = line.partition(": ")
        if value.strip().lstrip("-").isdigit():
            out[key] = int(value)
    return out


def percentile(sorted_ms: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    return sorted_ms[max(0, math.ceil(q / 100 * len(sorted_ms)) - 1)]


def keepalive_batch(ip: str, host: str, n: int) -> list[float]:
    """One warm-up GET then ``n`` timed GETs on one connection (run inside the client pod's namespace)."""
    conn = http.client.HTTPConnection(ip, HTTP_PORT, timeout=10)
    out = []
    try:
        for i in range(n + 1):
            start = time.perf_counter()
            conn.request("GET", "/bench", headers={"Host": host})
            resp = conn.getresponse()
            resp.read()
            took = (time.perf_counter() - start) * 1000
            if resp.status != 200:
                raise RuntimeError(f"{host}: HTTP {resp.status}")
            if i:
                out.append(took)
    finally:
        conn.close()
    return out


def newconn_batch(ip: str, host: str, n: int) -> list[float]:
    """``n`` GETs, each on a new connection, timed from connect to the last body byte."""
    out = []
    for _ in range(n):
        start = time.perf_counter()
        conn = http.client.HTTPConnection(ip, TCP_PORT, timeout=10)
        try:
            conn.request("GET", "/bench", headers={"Host": host, "Connection": "close"})
            resp = conn.getresponse()
            resp.read()
        finally:
            conn.close()
        out.append((time.perf_counter() - start) * 1000)
        if resp.status != 200:
            raise RuntimeError(f"{host}: HTTP {resp.status}")
    return out


def _no_resumption_for(service_name: str) -> None:
    """Wrap the ``mtls`` plugin's cluster hook (before the plugins are loaded) so the mTLS transport socket
    of ``service_name``'s clusters stores no TLS session: its handshakes cannot be resumed."""
    import functools

    from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

    original = mtls.trafficmgr_cluster

    @functools.wraps(original)  # keeps pluggy's hookimpl marker
    def hook(cluster: Any, service: Any, port: Any, ctx: Any) -> None:
        original(cluster, service, port, ctx)
        for match in cluster.transport_socket_matches:
            if service.name == service_name and match.name == mtls.MATCH_NAME:
                upstream = tls_pb2.UpstreamTlsContext()
                match.transport_socket.typed_config.Unpack(upstream)
                upstream.max_session_keys.value = 0
                match.transport_socket.typed_config.Pack(upstream)

    mtls.trafficmgr_cluster = hook  # type: ignore[assignment]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40, help="rounds of (plaintext, mTLS) batch pairs per kind")
    parser.add_argument("--batch", type=int, default=50, help="requests per batch")
    args = parser.parse_args()
    if args.rounds < 1 or args.batch < 1:
        parser.error("--rounds and --batch must be at least 1")
    reason = available()
    if reason:
        print(f"bench_mtls: {reason}", file=sys.stderr)
        return 2
    _no_resumption_for(NO_RESUMPTION)
    ca = MeshTestCA()
    dirs = [ca.identity_dir(f"spiffe://{TD}/ns/default/sa/client"), ca.identity_dir(f"spiffe://{TD}/ns/default/sa/web")]
    backends: list[HttpBackend] = []
    try:
        with LocalCluster([], options=argparse.Namespace(mtls=True, trust_domain=TD), client_cwd=dirs[0]) as c:
            disable = {mtls.MODE: mtls.DISABLE}
            c.apply(join(
                meshed_pod("web-1", SERVER_IP, "web", "web"),
                service("web", port=HTTP_PORT, app="web"),
                service("webplain", port=HTTP_PORT, app="web", labels=disable),
                service("raw", port=TCP_PORT, app="web", http=False, labels={f"traffic.port.{TCP_PORT}": "tcp"}),
                service("rawplain", port=TCP_PORT, app="web", http=False, labels={f"traffic.port.{TCP_PORT}": "tcp", **disable}),
                service(NO_RESUMPTION, port=TCP_PORT, app="web", http=False, labels={f"traffic.port.{TCP_PORT}": "tcp"}),
            ))
            server = c.peer_pod("web-1", SERVER_IP, cwd=dirs[1])
            backends += [c.peer_backend(server, "web", HTTP_PORT), c.peer_backend(server, "raw", TCP_PORT)]
            assert c.pod is not None
            client = c.pod
            # The TLS twins of the inbound chains: per HTTP port, and the catch-all TCP one (port 9090).
            c.wait_config(lambda: all(f'"{chain}"' in server.listener_config("inbound")
                                      for chain in (f"inbound|mtls|http|{HTTP_PORT}", "inbound|mtls|tcp")),
                          timeout=20, message="the server sidecar has no TLS twin chains")
            c.wait_config(lambda: mtls.METADATA_KEY in client.admin("/config_dump?include_eds"), timeout=20,
                          message="the client has no endpoint marked for mTLS")
            ips = {kind: {mode: c.cluster_ip(name) for mode, name in names.items()} for kind, names in SERVICES.items()}

            def run(kind: str, mode: str, n: int) -> list[float]:
                ip, name = ips[kind][mode], SERVICES[kind][mode]
                fn: Callable[[], list[float]]
                if kind == "keepalive":
                    fn = lambda: keepalive_batch(ip, f"{name}:{HTTP_PORT}", n)  # noqa: E731
                else:
                    fn = lambda: newconn_batch(ip, f"{name}:{TCP_PORT}", n)  # noqa: E731
                return client.in_ns(fn, timeout=600)

            # Warm-up (not measured): every path answers, the client's clusters have connected once.
            for kind in SERVICES:
                for mode in ("plain", "mtls"):
                    c.wait_config(lambda k=kind, m=mode: _ok(run, k, m), timeout=20, message=f"{kind}/{mode} does not answer")
            lat: dict[str, dict[str, list[float]]] = {k: {"plain": [], "mtls": []} for k in SERVICES}
            hs: dict[str, dict[str, dict[str, int]]] = {k: {m: {"server": 0, "client": 0, "resumed": 0, "requests": 0} for m in ("plain", "mtls")}
                                                       for k in SERVICES}
            failures: list[str] = []
            start = time.monotonic()
            for r in range(args.rounds):
                for kind in SERVICES:
                    for mode in (("plain", "mtls") if r % 2 == 0 else ("mtls", "plain")):
                        cs0, ss0 = stats(client), stats(server)
                        lat[kind][mode] += run(kind, mode, args.batch)
                        cs1, ss1 = stats(client), stats(server)
                        name = cluster(kind, mode)
                        d_server = ss1.get(INBOUND_HS, 0) - ss0.get(INBOUND_HS, 0)
                        d_client = cs1.get(f"cluster.{name}.ssl.handshake", 0) - cs0.get(f"cluster.{name}.ssl.handshake", 0)
                        counter = "upstream_rq_total" if kind == "keepalive" else "upstream_cx_total"
                        d_req = cs1.get(f"cluster.{name}.{counter}", 0) - cs0.get(f"cluster.{name}.{counter}", 0)
                        want_req = args.batch + (1 if kind == "keepalive" else 0)
                        h = hs[kind][mode]
                        where = f"round {r} {kind}/{mode}"
                        h["server"] += d_server
                        h["client"] += d_client
                        d_resumed = ss1.get(INBOUND_REUSED, 0) - ss0.get(INBOUND_REUSED, 0)
                        h["resumed"] += d_resumed
                        if kind == "newconn_full" and d_resumed:
                            failures.append(f"{where}: {d_resumed} TLS sessions resumed, expected full handshakes only")
                        h["requests"] += d_req
                        if d_req != want_req:
                            failures.append(f"{where}: cluster {name} {counter} +{d_req}, expected +{want_req}")
                        want_hs = args.batch if kind != "keepalive" and mode == "mtls" else 0
                        if kind != "keepalive" and (d_server != want_hs or d_client != want_hs):
                            failures.append(f"{where}: ssl.handshake server +{d_server} client +{d_client}, expected +{want_hs}")
                        if mode == "plain" and (d_server or d_client):
                            failures.append(f"{where}: plaintext batch made TLS handshakes (server +{d_server}, client +{d_client})")
            elapsed = time.monotonic() - start
            # Keep-alive: the connections the client's clusters ever opened were all TLS (mTLS) or none (plaintext).
            final = stats(client)
            conns: dict[str, dict[str, int]] = {}
            for mode in ("plain", "mtls"):
                name = cluster("keepalive", mode)
                cx, tls = final.get(f"cluster.{name}.upstream_cx_total", 0), final.get(f"cluster.{name}.ssl.handshake", 0)
                conns[mode] = {"upstream_connections": cx, "ssl_handshakes": tls}
                if cx < 1 or tls != (cx if mode == "mtls" else 0):
                    failures.append(f"keepalive/{mode}: cluster {name} opened {cx} connections with {tls} TLS handshakes")
            for kind in ("newconn", "newconn_full"):
                errors = final.get(f"cluster.{cluster(kind, 'mtls')}.ssl.connection_error", 0)
                if errors:
                    failures.append(f"{errors} TLS connection errors on the client's cluster {cluster(kind, 'mtls')}")
    finally:
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)

    result: dict[str, Any] = {"rounds": args.rounds, "batch": args.batch, "elapsed_s": round(elapsed, 1)}
    rows = []
    for kind in SERVICES:
        entry: dict[str, Any] = {}
        for mode in ("plain", "mtls"):
            data = sorted(lat[kind][mode])
            entry[mode] = {"n": len(data), "p50_ms": round(percentile(data, 50), 3), "p99_ms": round(percentile(data, 99), 3),
                           "ssl_handshakes_server": hs[kind][mode]["server"], "ssl_handshakes_client": hs[kind][mode]["client"],
                           "ssl_sessions_resumed_server": hs[kind][mode]["resumed"]}
        for q in ("p50", "p99"):
            entry[f"ratio_{q}"] = round(entry["mtls"][f"{q}_ms"] / entry["plain"][f"{q}_ms"], 2)
        if kind == "keepalive":
            entry["connections"] = conns
        result[kind] = entry
        for mode in ("plain", "mtls"):
            e = entry[mode]
            rows.append(f"{kind:12} {mode:6} {e['n']:6} {e['p50_ms']:9.3f} {e['p99_ms']:9.3f} "
                        f"{e['ssl_handshakes_server']:7} {e['ssl_handshakes_client']:7} {e['ssl_sessions_resumed_server']:7}")
        rows.append(f"{'':12} {'ratio':6} {'':6} {entry['ratio_p50']:9.2f} {entry['ratio_p99']:9.2f}")
    result.update(handshake_check="failed" if failures else "ok", failures=failures[:20],
                  python=sys.version.split()[0], machine=platform.machine(), cpus=_cpus())
    print(f"{'kind':12} {'mode':6} {'n':>6} {'p50 ms':>9} {'p99 ms':>9} {'hs srv':>7} {'hs cli':>7} {'resumed':>7}")
    print("\n".join(rows))
    for f in failures[:20]:
        print(f"CHECK FAILED: {f}", file=sys.stderr)
    print(json.dumps(result))
    return 1 if failures else 0


def _ok(run: Callable[[str, str, int], list[float]], kind: str, mode: str) -> bool:
    try:
        run(kind, mode, 1)
        return True
    except (OSError, RuntimeError, http.client.HTTPException):
        return False


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    sys.exit(main())
