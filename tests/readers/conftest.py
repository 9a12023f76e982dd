"""The real-reader suite's processes: the Dify stand-in with the recordings stored, the proxy
under real gunicorn with a 1 s heartbeat, and headless Chromium for the browser-only readers."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.readers import recordings
from tests.readers.harness import DIFY_KEY
from tests.support import processes, tokens
from tests.support.standin_client import StandIn

JS = Path(__file__).parent / "js"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]


@dataclass
class Proxy:
    url: str
    log_path: Path


@pytest.fixture(scope="package")
def standin() -> Iterator[StandIn]:
    process, url = processes.start_standin(DIFY_KEY)
    standin = StandIn(url)
    for name in recordings.RECORDINGS:
        requests.put(
            f"{standin.root}/_standin/recordings/{name}", data=recordings.body(name), timeout=5
        ).raise_for_status()
    yield standin
    processes.stop(process)


@pytest.fixture(scope="package")
def proxy(standin, tmp_path_factory) -> Iterator[Proxy]:
    if not (JS / "node_modules" / ".package-lock.json").exists():
        pytest.fail("tests/readers/js/node_modules is missing: run scripts/setup --dev")
    log_path = tmp_path_factory.mktemp("readers") / "gunicorn.log"
    env = {
        "DIFY_API_KEY": DIFY_KEY,
        "DIFY_API_URL": standin.url,
        "SUPABASE_JWT_SECRET": tokens.SECRET,
        "HEARTBEAT_INTERVAL": "1",
        "LOG_LEVEL": "WARNING",
        "WEB_CONCURRENCY": "1",
        "RATE_LIMIT": "10000/minute",
        "MAX_STREAMS_PER_USER": "100",
    }
    process, url = processes.start_proxy(env, log_path)
    yield Proxy(url, log_path)
    processes.stop(process)


@pytest.fixture(scope="package")
def browser():
    from playwright.sync_api import sync_playwright

    playwright = sync_playwright().start()
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
    yield browser
    browser.close()
    playwright.stop()
