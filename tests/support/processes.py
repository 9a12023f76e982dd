"""Real processes for integration tests: the Dify stand-in and the proxy under gunicorn."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_standin(api_key: str) -> tuple[subprocess.Popen, str]:
    """Start the stand-in on a free port; returns the process and its `/v1` base URL."""
    process = subprocess.Popen(
        [sys.executable, "-m", "dify_proxy.standin", "--port", "0", "--api-key", api_key],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    line = process.stdout.readline()
    assert line.startswith("READY "), f"stand-in did not start: {line!r}"
    return process, line.split()[1]


def start_proxy(env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen, str]:
    """Start the proxy exactly as the Procfile does; returns the process and its base URL."""
    port = free_port()
    full_env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", "/tmp"),
        "PORT": str(port),
        # Each proxy's own usage ledger, beside its log, unless the test names one.
        "USAGE_SQLITE_PATH": str(log_path.parent / f"usage-{port}.sqlite3"),
        "USAGE_OUTBOX_PATH": str(log_path.parent / f"usage-outbox-{port}.sqlite3"),
        **env,
    }
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "app:app",
                "--config",
                "gunicorn.conf.py",
                "--bind",
                f"127.0.0.1:{port}",
            ],
            cwd=ROOT,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    wait_until_up(f"{base}/healthz", process)
    return process, base


def wait_until_up(url: str, process: subprocess.Popen, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {process.returncode}")
        try:
            if requests.get(url, timeout=1).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up in {seconds} s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def children(pid: int) -> list[int]:
    """Direct children of a process (gunicorn's workers), from /proc."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def kill(pid: int) -> None:
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        pass


@contextlib.contextmanager
def run_command(
    port: int,
    root: Path = ROOT,
    env: dict[str, str] | None = None,
    last: str = "Hello there",
    args: tuple[str, ...] = (),
) -> Iterator[tuple[subprocess.Popen, str]]:
    """The README's run command (by default without a Dify key) in `root`, with `args`; yields
    it with everything it printed up to the line containing `last` once the proxy is up, and
    stops it (and its stand-in) afterwards."""
    env = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/tmp"),
        "PORT": str(port),
        **({"DIFY_API_KEY": ""} if env is None else env),
    }
    dev = subprocess.Popen(
        [sys.executable, "-m", "dify_proxy.dev", *args],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        printed = ""
        while last not in printed:
            line = dev.stdout.readline()
            assert line, f"the run command stopped printing: {printed!r}"
            printed += line
        wait_until_up(f"http://127.0.0.1:{port}/healthz", dev)
        yield dev, printed
    finally:
        os.killpg(dev.pid, signal.SIGTERM)
        dev.wait(timeout=20)
