"""A throwaway PKI for TLS on loopback: a CA and one certificate (for 127.0.0.1, ::1 and
localhost, usable as server and client) made with the ``openssl`` command, so `kvship
bench --tls` and the tests need no extra Python package. Never for production keys."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

SAN = "subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost"


@dataclass(frozen=True)
class Pki:
    ca: str  # the CA certificate (tls_ca)
    cert: str  # the daemon certificate (tls_cert), signed by the CA
    key: str  # its private key (tls_key), mode 0600

    def flags(self) -> list[str]:
        return ["--tls-cert", self.cert, "--tls-key", self.key, "--tls-ca", self.ca]


def _openssl(*args: str, cwd: Path) -> None:
    if shutil.which("openssl") is None:
        raise RuntimeError("TLS test certificates need the openssl command (apt install openssl)")
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(directory: Path, name: str = "kvship-test") -> Pki:
    """A new CA and a certificate it signed, in ``directory`` (EC P-256, 1 day)."""
    directory.mkdir(parents=True, exist_ok=True)
    d = directory
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", f"{name}-ca.key", "-out", f"{name}-ca.pem",
             "-days", "1", "-subj", f"/CN={name} CA", cwd=d)  # fmt: skip
    _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}", cwd=d)  # fmt: skip
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{name}-ca.pem",
             "-CAkey", f"{name}-ca.key", "-CAcreateserial", "-out", f"{name}.pem",
             "-days", "1", "-extfile", _ext(d, name), cwd=d)  # fmt: skip
    for key in (d / f"{name}.key", d / f"{name}-ca.key"):
        key.chmod(0o600)
    return Pki(str(d / f"{name}-ca.pem"), str(d / f"{name}.pem"), str(d / f"{name}.key"))


def _ext(directory: Path, name: str) -> str:
    path = directory / f"{name}.ext"
    path.write_text(f"{SAN}\nbasicConstraints=CA:FALSE\n")
    return path.name
