"""The chart's Gateway API wiring: the ports the gateway proxies bind for Gateway listeners are exposed
(container, Service, NetworkPolicy), low ports work without root, and the control plane may write status."""

from __future__ import annotations

from tests.helm.chart import RELEASE, container, one, pod_spec, render, run_helm


def test_gateway_api_ports_are_exposed_everywhere_they_must_be() -> None:
    objects = render({"gateway": {"gatewayAPIPorts": [8080, 8443]}})
    gw = one(objects, "Deployment", f"{RELEASE}-gateway")
    ports = {p["name"]: p["containerPort"] for p in container(gw, "envoy")["ports"]}
    assert ports["gw-8080"] == 8080 and ports["gw-8443"] == 8443
    svc = {p["name"]: (p["port"], p["targetPort"]) for p in one(objects, "Service", "traffic-ingress")["spec"]["ports"]}
    assert svc["gw-8080"] == (8080, "gw-8080") and svc["gw-8443"] == (8443, "gw-8443")
    policy = one(objects, "NetworkPolicy", f"{RELEASE}-gateway")
    public = [r for r in policy["spec"]["ingress"] if "from" not in r]
    assert {p["port"] for r in public for p in r["ports"]} == {10000, 8080, 8443}
    # No port below 1024: no sysctl.
    assert "sysctls" not in pod_spec(gw)["securityContext"]


def test_ports_below_1024_get_the_unprivileged_port_sysctl_not_root() -> None:
    gw = one(render({"gateway": {"gatewayAPIPorts": [80, 443]}}), "Deployment", f"{RELEASE}-gateway")
    sc = pod_spec(gw)["securityContext"]
    assert sc["sysctls"] == [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1337
    assert "add" not in container(gw, "envoy")["securityContext"]["capabilities"]


def test_bad_ports_are_refused_by_the_schema() -> None:
    for bad in ([0], [70000], [8080, 8080], ["80"]):
        proc = run_helm("template", RELEASE, values={"gateway": {"gatewayAPIPorts": bad}}, check=False)
        assert proc.returncode != 0 and "gatewayAPIPorts" in proc.stderr, (bad, proc.stderr)
