"""Start real Redis deployments on loopback for tests: TLS, Sentinel, and a 3-master Cluster.

Each function starts its own redis-server processes on free ports in a temporary directory
and returns what a test needs plus the processes to stop. Never touches a server it did not
start.
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from ports import free_port


@dataclass
class Deployment:
    url: str
    ca_file: Path | None = None
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def stop(self) -> None:
        for proc in self.processes:
            proc.terminate()
        for proc in self.processes:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def missing_binaries() -> str | None:
    for binary in ("redis-server", "redis-cli"):
        if shutil.which(binary) is None:
            return f"{binary} is not installed (CI installs redis-server and redis-tools)"
    return None


def _start(args: list[str], cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["redis-server", *args], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _wait_for_port(port: int, deadline: float = 10.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def _cli(*args: str) -> str:
    result = subprocess.run(["redis-cli", *args], capture_output=True, text=True, timeout=30,
                            check=True)
    return result.stdout


def _started(start: Callable[[Path, Deployment], None], directory: Path) -> Deployment:
    deployment = Deployment("")
    try:
        start(directory, deployment)
    except BaseException:
        deployment.stop()
        raise
    return deployment


_PLAIN = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]


def start_plain(directory: Path) -> Deployment:
    """Stops what it started if it fails half-way (see _started)."""
    return _started(_start_plain, directory)


def _start_plain(directory: Path, deployment: Deployment) -> None:
    port = free_port()
    deployment.url = f"redis://127.0.0.1:{port}/0"
    deployment.processes.append(_start(["--port", str(port), *_PLAIN], directory))
    _wait_for_port(port)


def start_persistent(directory: Path, port: int | None = None) -> Deployment:
    """A redis-server that writes every command to its append-only file in `directory`, so a
    kill and a start on the same directory and port is a restart that keeps the data."""
    port = port or free_port()

    def start(directory: Path, deployment: Deployment) -> None:
        deployment.url = f"redis://127.0.0.1:{port}/0"
        deployment.processes.append(_start(
            ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "always"], directory))
        _wait_for_port(port)

    return _started(start, directory)


def start_cluster(directory: Path) -> Deployment:
    """Stops what it started if it fails half-way (see _started)."""
    return _started(_start_cluster, directory)


def _start_cluster(directory: Path, deployment: Deployment) -> None:
    ports = [free_port(also=10000) for _ in range(3)]
    deployment.url = f"redis+cluster://127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}"
    for port in ports:
        deployment.processes.append(_start(
            ["--port", str(port), "--cluster-enabled", "yes",
             "--cluster-config-file", f"nodes-{port}.conf", *_PLAIN], directory))
    for port in ports:
        _wait_for_port(port)
    _cli("--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
         "--cluster-replicas", "0", "--cluster-yes")
    end = time.monotonic() + 20
    while "cluster_state:ok" not in _cli("-p", str(ports[0]), "cluster", "info"):
        if time.monotonic() > end:
            raise RuntimeError("the cluster did not become ready")
        time.sleep(0.1)


def start_sentinel(directory: Path) -> Deployment:
    """Stops what it started if it fails half-way (see _started)."""
    return _started(_start_sentinel, directory)


def _start_sentinel(directory: Path, deployment: Deployment) -> None:
    master, sentinel = free_port(), free_port()
    config = directory / "sentinel.conf"
    config.write_text(f"port {sentinel}\nbind 127.0.0.1\n"
                      f"sentinel monitor gateway 127.0.0.1 {master} 1\n"
                      "sentinel down-after-milliseconds gateway 5000\n")
    deployment.url = f"redis+sentinel://127.0.0.1:{sentinel}/gateway/0"
    deployment.processes.append(_start(["--port", str(master), *_PLAIN], directory))
    _wait_for_port(master)
    deployment.processes.append(_start([str(config), "--sentinel"], directory))
    _wait_for_port(sentinel)


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
                 signer: ec.EllipticCurvePrivateKey, *, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(signer, hashes.SHA256())


def _write(path: Path, *items: bytes) -> Path:
    path.write_bytes(b"".join(items))
    return path


def start_tls(directory: Path) -> Deployment:
    """Stops what it started if it fails half-way (see _started)."""
    return _started(_start_tls, directory)


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA made for this test, and a server certificate for 127.0.0.1 that it signed:
    (ca_file, cert_file, key_file)."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gateway test CA")])
    ca_cert = _certificate("gateway test CA", ca_key, ca_name, ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _certificate("127.0.0.1", key, ca_name, ca_key, ca=False)
    pem = serialization.Encoding.PEM
    ca_file = _write(directory / "ca.pem", ca_cert.public_bytes(pem))
    cert_file = _write(directory / "server.pem", cert.public_bytes(pem))
    key_file = _write(directory / "server.key", key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return ca_file, cert_file, key_file


def _start_tls(directory: Path, deployment: Deployment) -> None:
    """A Redis that speaks only TLS, with a certificate from a CA made for this test."""
    ca_file, cert_file, key_file = make_certificates(directory)
    port = free_port()
    deployment.url, deployment.ca_file = f"rediss://127.0.0.1:{port}/0", ca_file
    deployment.processes.append(_start(
        ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert_file),
         "--tls-key-file", str(key_file), "--tls-ca-cert-file", str(ca_file),
         "--tls-auth-clients", "no", *_PLAIN], directory))
    _wait_for_port(port)
