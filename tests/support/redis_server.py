"""A real redis-server on a free loopback port, for tests that need limits shared for real.

With `tls=True` it serves only TLS (`rediss://`) with a throwaway self-signed certificate made
at start, as Heroku Redis does: clients cannot verify it against any authority.
"""

from __future__ import annotations

import datetime
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.processes import free_port


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A key and a certificate for a made-up host name, valid for a day."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "redis.invalid")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = directory / "redis.key", directory / "redis.crt"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


class RedisServer:
    def __init__(self, tls: bool = False) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError(
                "redis-server is not installed: as root run scripts/setup --dev, or"
                " apt-get install --no-install-recommends redis-server"
            )
        self.executable = executable
        self.tls = tls
        self.port = free_port()
        scheme = "rediss" if tls else "redis"
        self.url = f"{scheme}://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None
        self._directory: tempfile.TemporaryDirectory | None = None

    def start(self) -> None:
        args = [self.executable, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        if self.tls:
            self._directory = tempfile.TemporaryDirectory(prefix="redis-tls-")
            key, cert = self_signed_certificate(Path(self._directory.name))
            args += [
                "--port", "0",
                "--tls-port", str(self.port),
                "--tls-cert-file", str(cert),
                "--tls-key-file", str(key),
                "--tls-ca-cert-file", str(cert),
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        else:
            args += ["--port", str(self.port)]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        client = self.client()
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise
                time.sleep(0.05)

    def client(self) -> redis.Redis:
        """A client for the test's own look inside (verification off: the cert is ours)."""
        if self.tls:
            return redis.Redis.from_url(self.url, ssl_cert_reqs="none", ssl_check_hostname=False)
        return redis.Redis.from_url(self.url)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        if self._directory is not None:
            self._directory.cleanup()
