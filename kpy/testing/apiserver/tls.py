"""A throwaway CA and serving certificate for TLS tests."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """A throwaway CA and a server certificate signed by it (PEM files)."""

    ca: Path
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        return context


def make_tls(directory: Path, host: str = "127.0.0.1") -> TlsFiles:
    """Create a CA and a certificate for ``host`` (an IP address or a DNS name) with openssl.

    For tests and the dev command: the kube source then checks the server's certificate
    against ``ca`` exactly as it checks a real API server's.
    """
    import ipaddress
    import subprocess

    try:
        ipaddress.ip_address(host)
        san = f"IP:{host}"
    except ValueError:
        san = f"DNS:{host}"
    files = TlsFiles(directory / "ca.crt", directory / "server.crt", directory / "server.key")
    ca_key = directory / "ca.key"
    csr = directory / "server.csr"
    ext = directory / "server.ext"
    ext.write_text(
        f"subjectAltName={san}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
        "keyUsage=digitalSignature,keyEncipherment\n"
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca = ["-days", "2", "-subj", "/CN=kpy-fake-apiserver-ca"]
    out = str(files.cert)
    sign = ["-CA", str(files.ca), "-CAkey", str(ca_key), "-CAcreateserial", "-days", "2"]
    commands = [
        ["openssl", "req", "-x509", *ec, *ca, "-keyout", str(ca_key), "-out", str(files.ca)],
        [
            "openssl",
            "req",
            *ec,
            "-subj",
            f"/CN={host}",
            "-keyout",
            str(files.key),
            "-out",
            str(csr),
        ],
        ["openssl", "x509", "-req", "-in", str(csr), *sign, "-extfile", str(ext), "-out", out],
    ]
    for command in commands:
        subprocess.run(command, check=True, capture_output=True)
    return files
