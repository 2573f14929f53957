"""The gateway_api plugin's cost per build at scale, in-process (not a test).

    python benchmarks/bench_gateway_api.py [--routes 2000] [--mesh 200] [--changes 20] [--profile]

Feeds the real assembler (with every built-in plugin's watch kinds) a GatewayClass, one Gateway with
an HTTP listener (any namespace), a second HTTP listener and an HTTPS one (two certificates), ``--routes``
HTTPRoutes (each its own hostname and backend Service, spread over 10 namespaces; every tenth on the
second listener, every twentieth on the HTTPS one) and ``--mesh`` mesh routes (a Service parent), then
times the sync thread's CPU for the real :class:`Builder` per change of three kinds:

- ``pod``: a Service label change on a Service no route names (what most watch events are: the
  gateway_api plugin should cost next to nothing);
- ``route``: one HTTPRoute's backend weight changes (one route configuration should be rebuilt);
- ``mesh``: one mesh route's backend weight changes.

Prints one JSON object: per kind the CPU per build (p50/min/max, ms) and how many resources the last
build serialized (``builder.stats``), the CPU of the status hooks the control plane calls after
publishing it (``status_cpu_ms_p50``), and the first build's time.
"""

from __future__ import annotations

import argparse
import base64
import copy
import cProfile
import datetime
import json
import pstats
import statistics
import time
from typing import Any

from trafficmgr.core.kube import assemble
from trafficmgr.core.kube.assemble import Assembler
from trafficmgr.core.plugins import PluginHost
from trafficmgr.core.translate.builder import Builder, default_options

GW = "gateway.networking.k8s.io/v1"
NAMESPACES = 10


def _meta(name: str, ns: str | None, n: int) -> dict[str, Any]:
    md: dict[str, Any] = {"name": name, "uid": f"uid-{name}-{ns}", "resourceVersion": str(n), "generation": 1,
                          "creationTimestamp": "2026-01-01T00:00:00Z"}
    if ns is not None:
        md["namespace"] = ns
    return md


def _cert(host: str) -> tuple[bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False).sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def objects(routes: int, mesh: int) -> dict[str, list[dict[str, Any]]]:
    """Raw objects by plural, as a list would return them."""
    out: dict[str, list[dict[str, Any]]] = {"services": [], "gatewayclasses": [], "gateways": [], "httproutes": [],
                                            "secrets": [], "namespaces": []}
    for i in range(NAMESPACES):
        out["namespaces"].append({"apiVersion": "v1", "kind": "Namespace", "metadata": _meta(f"ns-{i}", None, 1)})
    for i in range(routes + mesh + 1):
        out["services"].append({"apiVersion": "v1", "kind": "Service", "metadata": _meta(f"svc-{i}", f"ns-{i % NAMESPACES}", 1),
                                "spec": {"clusterIP": f"10.96.{i // 250}.{i % 250 + 1}", "selector": {"app": f"svc-{i}"},
                                         "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})
    out["gatewayclasses"].append({"apiVersion": GW, "kind": "GatewayClass", "metadata": _meta("traffic", None, 1),
                                  "spec": {"controllerName": "trafficmgr.io/gateway-controller"}})
    certs = []
    for host in ("a.example.com", "b.example.com"):
        cert, key = _cert(host)
        name = host.split(".")[0] + "-tls"
        certs.append({"name": name})
        out["secrets"].append({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls", "metadata": _meta(name, "ns-0", 1),
                               "data": {"tls.crt": base64.b64encode(cert).decode(), "tls.key": base64.b64encode(key).decode()}})
    every = {"namespaces": {"from": "All"}}
    out["gateways"].append({"apiVersion": GW, "kind": "Gateway", "metadata": _meta("gw", "ns-0", 1), "spec": {
        "gatewayClassName": "traffic", "listeners": [
            {"name": "http", "port": 8080, "protocol": "HTTP", "allowedRoutes": every},
            {"name": "other", "port": 8081, "protocol": "HTTP", "allowedRoutes": every},
            {"name": "https", "port": 8443, "protocol": "HTTPS", "allowedRoutes": every,
             "tls": {"mode": "Terminate", "certificateRefs": certs}}]}})
    for i in range(routes):
        section = "https" if i % 20 == 0 else "other" if i % 10 == 0 else "http"
        out["httproutes"].append({"apiVersion": GW, "kind": "HTTPRoute", "metadata": _meta(f"r-{i}", f"ns-{i % NAMESPACES}", 1), "spec": {
            "parentRefs": [{"name": "gw", "namespace": "ns-0", "sectionName": section}], "hostnames": [f"h{i}.example.com"],
            "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
                       "backendRefs": [{"name": f"svc-{i}", "port": 80, "weight": 1}]},
                      {"backendRefs": [{"name": f"svc-{i}", "port": 80}]}]}})
    for k in range(mesh):
        i = routes + k
        out["httproutes"].append({"apiVersion": GW, "kind": "HTTPRoute", "metadata": _meta(f"m-{k}", f"ns-{i % NAMESPACES}", 1), "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": f"svc-{i}", "port": 80}],
            "rules": [{"backendRefs": [{"name": f"svc-{i}", "port": 80, "weight": 90},
                                       {"name": f"svc-{routes + mesh}", "port": 80, "weight": 10}]}]}})
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--routes", type=int, default=2000)
    p.add_argument("--mesh", type=int, default=200)
    p.add_argument("--changes", type=int, default=20)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    plugins = PluginHost.load()
    extra = plugins.collect("trafficmgr_watch_kinds")
    by_plural = {k.plural: k for k in (*assemble.CORE_KINDS, *extra)}
    assembler = Assembler(plugins.labels, extra)
    lists = objects(args.routes, args.mesh)
    for plural, items in lists.items():
        kinds = [k for k in (*assemble.CORE_KINDS, *extra) if k.plural == plural]
        for kind in kinds:
            assembler.apply("RELIST", kind, items)
    for kind in (*assemble.CORE_KINDS, *extra):  # every other kind: listed empty
        if kind.plural not in lists:
            assembler.apply("RELIST", kind, [])
    options = default_options()
    options.gateway_address = "127.0.0.1"
    builder = Builder(plugins, options)
    start = time.thread_time()
    builder.build(assembler.model())
    first_ms = (time.thread_time() - start) * 1000
    gateway = builder.build(assembler.model())["gateway"]
    counts = {t.split(".")[-1]: len(ts.resources) for t, ts in gateway.types.items() if ts.resources}

    spare = {"apiVersion": "v1", "kind": "Service", "metadata": _meta("unrelated", "ns-1", 1),
             "spec": {"clusterIP": "10.97.0.1", "ports": [{"name": "http", "port": 80}]}}
    route = copy.deepcopy(lists["httproutes"][args.routes // 2 + 1])
    mesh_route = copy.deepcopy(lists["httproutes"][-1]) if args.mesh else None
    profile = cProfile.Profile() if args.profile else None
    result: dict[str, Any] = {"routes": args.routes, "mesh_routes": args.mesh, "first_build_ms": round(first_ms, 1),
                              "gateway_view": counts}
    for what in ("pod", "route", "mesh"):
        if what == "mesh" and mesh_route is None:
            continue
        times: list[float] = []
        status_times: list[float] = []
        serialized = 0
        for n in range(args.changes):
            if what == "pod":
                obj, kind = copy.deepcopy(spare), assemble.SERVICE
                obj["metadata"]["labels"] = {"traffic.retries.5xx": str(1 + n % 3)}
            else:
                obj, kind = copy.deepcopy(route if what == "route" else mesh_route), by_plural["httproutes"]
                obj["spec"]["rules"][0]["backendRefs"][0]["weight"] = 2 + n
            obj["metadata"]["resourceVersion"] = str(100 + n)
            start = time.thread_time()
            if profile is not None:
                profile.enable()
            assembler.apply("MODIFIED", kind, obj)
            model = assembler.model()
            builder.build(model)
            if profile is not None:
                profile.disable()
            times.append((time.thread_time() - start) * 1000)
            serialized = builder.stats.total_serialized
            start = time.thread_time()  # what the control plane asks after publishing the build
            plugins.collect("trafficmgr_object_status", model=model, options=options)
            status_times.append((time.thread_time() - start) * 1000)
        result[what] = {"cpu_ms_p50": round(statistics.median(times), 3), "cpu_ms_min": round(min(times), 3),
                        "cpu_ms_max": round(max(times), 3), "serialized_last": serialized,
                        "status_cpu_ms_p50": round(statistics.median(status_times), 3)}
    print(json.dumps(result, indent=2))
    if profile is not None:
        pstats.Stats(profile).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
