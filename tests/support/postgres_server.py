"""A real PostgreSQL server in a throwaway data directory on a free loopback port, for tests of
the usage ledger (Debian's `postgresql` package, installed by `scripts/setup --dev`).

PostgreSQL refuses to run as root: when the tests do, the server runs as the `postgres` user
that Debian's package creates, in a directory given to it. It can be stopped and started again
on the same data and port, as a database that goes away mid-run and comes back.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Any

import psycopg

from tests.support.processes import free_port


def _binaries() -> str:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    if not found:
        raise RuntimeError(
            "PostgreSQL is not installed: as root run scripts/setup --dev, or"
            " apt-get install --no-install-recommends postgresql"
        )
    return os.path.dirname(found[-1])


class PostgresServer:
    def __init__(self) -> None:
        self.bin = _binaries()
        self.port = free_port()
        self.directory = tempfile.mkdtemp(prefix="dify-proxy-pg-")
        self.data = os.path.join(self.directory, "data")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.process: subprocess.Popen | None = None
        self._as: dict[str, Any] = {}
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.directory, user.pw_uid, user.pw_gid)
            self._as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        subprocess.run(
            [
                f"{self.bin}/initdb",
                "--pgdata",
                self.data,
                "--username",
                "postgres",
                "--auth",
                "trust",
                "--encoding",
                "UTF8",
                "--no-sync",
            ],  # fmt: skip
            check=True,
            stdout=subprocess.DEVNULL,
            **self._as,
        )

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                f"{self.bin}/postgres",
                "-D",
                self.data,
                "-p",
                str(self.port),
                "-k",
                self.directory,
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "full_page_writes=off",
            ],  # fmt: skip
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            **self._as,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(self.url, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise
                time.sleep(0.1)

    def connect(self, **kwargs: Any) -> psycopg.Connection:
        return psycopg.connect(self.url, autocommit=True, **kwargs)

    def stop(self) -> None:
        """A fast shutdown: open connections are cut, as when a database goes away."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            self.process.wait(timeout=30)
        self.process = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
