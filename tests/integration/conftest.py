"""The real thing: gunicorn running the app (as the Procfile does) against the Dify stand-in,
both over loopback, so streaming, timing, disconnects and chunk boundaries are real."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.support import processes, tokens
from tests.support.redis_server import RedisServer
from tests.support.standin_client import StandIn

DIFY_KEY = "app-integration-secret-key-3f9a7c21d4e8"
HEARTBEAT = 0.5
READ_TIMEOUT = 3


@dataclass
class Proxy:
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def chat(
        self, body: dict, token: str | None = None, headers: dict | None = None
    ) -> requests.Response:
        headers = {"Authorization": f"Bearer {token or tokens.hs256()}", **(headers or {})}
        return requests.post(
            f"{self.url}/api/chat", json=body, headers=headers, stream=True, timeout=30
        )


@pytest.fixture(scope="session")
def standin() -> Iterator[StandIn]:
    process, url = processes.start_standin(DIFY_KEY)
    yield StandIn(url)
    processes.stop(process)


@pytest.fixture(scope="session")
def proxy(standin, tmp_path_factory) -> Iterator[Proxy]:
    log_path = tmp_path_factory.mktemp("proxy") / "gunicorn.log"
    env = {
        "DIFY_API_KEY": DIFY_KEY,
        "DIFY_API_URL": standin.url,
        "SUPABASE_JWT_SECRET": tokens.SECRET,
        "HEARTBEAT_INTERVAL": str(HEARTBEAT),
        "DIFY_READ_TIMEOUT": str(READ_TIMEOUT),
        "LOG_LEVEL": "DEBUG",
        "WEB_CONCURRENCY": "2",
        # The suite asks many questions as one user; the limits have tests of their own.
        "RATE_LIMIT": "10000/minute",
        "MAX_STREAMS_PER_USER": "100",
        # A gone client's answer stops at once, as before resumes (they have tests of their own).
        "RESUME_GRACE": "0",
    }
    process, url = processes.start_proxy(env, log_path)
    yield Proxy(url, log_path)
    processes.stop(process)


@pytest.fixture(autouse=True)
def _fresh_call_log(request):
    if "standin" in request.fixturenames:
        request.getfixturevalue("standin").reset()


@pytest.fixture
def redis_server():
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def start_proxy(standin, tmp_path):
    """Start proxies (instances) with extra environment; all stopped after the test."""
    started = []

    def start(**env: str) -> Proxy:
        log_path = tmp_path / f"gunicorn-{len(started)}.log"
        process, url = processes.start_proxy(
            {
                "DIFY_API_KEY": DIFY_KEY,
                "DIFY_API_URL": standin.url,
                "SUPABASE_JWT_SECRET": tokens.SECRET,
                "HEARTBEAT_INTERVAL": "0.5",
                "WEB_CONCURRENCY": "2",
                "LOG_LEVEL": "DEBUG",
                # A closed stream frees its slot at once (resumes have tests of their own).
                "RESUME_GRACE": "0",
                **env,
            },
            log_path,
        )
        started.append(process)
        proxy = Proxy(url, log_path)
        proxy.process = process
        return proxy

    yield start
    for process in started:
        processes.stop(process)


def scenario(**knobs) -> dict:
    """A chat body asking the stand-in for a particular behaviour."""
    return {"message": "hi", "inputs": {"_standin": knobs}}
