"""Test certificates made with the real ``openssl`` CLI: a test CA and leaf certificates signed by it,
plus a TLS client that reports which certificate a server presented."""

from __future__ import annotations

import base64
import socket
import ssl
import subprocess
from pathlib import Path

import attrs


@attrs.frozen
class Cert:
    cert: str  # PEM
    key: str  # PEM
    serial: int


@attrs.frozen
class CA:
    cert_path: Path
    key_path: Path

    @property
    def pem(self) -> str:
        return self.cert_path.read_text()


def _run(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_ca(directory: Path, name: str = "trafficmgr test CA", days: int = 36500) -> CA:
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "ca.crt", directory / "ca.key"
    _run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", str(days), "-subj", f"/CN={name}",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return CA(cert, key)


def make_leaf(ca: CA, directory: Path, hosts: list[str], serial: int, days: int = 36500, rsa: bool = False) -> Cert:
    """A server certificate for ``hosts`` (SANs; the first is the CN) with a chosen serial number."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = directory / f"leaf-{serial}"
    key, csr, crt, ext = (Path(f"{stem}.{s}") for s in ("key", "csr", "crt", "ext"))
    newkey = ["-newkey", "rsa:2048"] if rsa else ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
    _run("req", *newkey, "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={hosts[0]}")
    ext.write_text("subjectAltName=" + ",".join(f"DNS:{h}" for h in hosts) + "\nextendedKeyUsage=serverAuth\n")
    _run("x509", "-req", "-in", str(csr), "-CA", str(ca.cert_path), "-CAkey", str(ca.key_path), "-set_serial", str(serial),
         "-days", str(days), "-out", str(crt), "-extfile", str(ext))
    return Cert(crt.read_text(), key.read_text(), serial)


def secret_yaml(name: str, cert: str, key: str, namespace: str = "default") -> str:
    """A ``kubernetes.io/tls`` Secret manifest."""
    b64 = lambda s: base64.b64encode(s.encode()).decode()  # noqa: E731
    return (f"apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: {namespace}}}\n"
            f"type: kubernetes.io/tls\ndata:\n  tls.crt: {b64(cert)}\n  tls.key: {b64(key)}\n")


def serial_of_der(der: bytes) -> int:
    """The serial number of a DER certificate (parsed with ``openssl x509``)."""
    out = subprocess.run(["openssl", "x509", "-inform", "DER", "-noout", "-serial"], input=der, capture_output=True,
                         check=True, timeout=30).stdout.decode()
    return int(out.strip().split("=", 1)[1], 16)


def tls_handshake(host: str, port: int, server_name: str | None, cafile: str, alpn: tuple[str, ...] = ("h2", "http/1.1"),
                  timeout: float = 3.0) -> tuple[int, str | None]:
    """Connect with SNI ``server_name`` and verify the chain against ``cafile`` (and the name when
    given); returns (serial of the presented certificate, negotiated ALPN)."""
    ctx = ssl.create_default_context(cafile=cafile)
    if server_name is None:
        ctx.check_hostname = False
    ctx.set_alpn_protocols(list(alpn))
    with socket.create_connection((host, port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_name) as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return serial_of_der(der), tls.selected_alpn_protocol()


def https_get(host: str, port: int, server_name: str, path: str, cafile: str, timeout: float = 3.0) -> tuple[int, str]:
    """An HTTP/1.1 GET over TLS with SNI and Host ``server_name``; returns (status, body)."""
    import http.client

    ctx = ssl.create_default_context(cafile=cafile)

    class _Conn(http.client.HTTPSConnection):
        def connect(self) -> None:
            raw = socket.create_connection((host, port), timeout=timeout)
            self.sock = ctx.wrap_socket(raw, server_hostname=server_name)

    conn = _Conn(server_name, port, timeout=timeout, context=ctx)
    try:
        conn.request("GET", path, headers={"Host": server_name})
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()
