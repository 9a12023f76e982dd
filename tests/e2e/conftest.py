"""A real browser against the real thing: headless Chromium (Debian's, driven by Playwright)
opens the /demo page served by gunicorn, which talks to the Dify stand-in over loopback.

Two more origins serve a copy of the same page (stdlib http.server on other ports): one listed
in CORS_ORIGINS, one not, so cross-origin behaviour is the browser's own, preflights included.
"""

from __future__ import annotations

import base64
import json
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from dify_proxy import demo
from tests.support import processes, tokens
from tests.support.cuttable_link import CuttableLink, cuttable_link
from tests.support.standin_client import StandIn

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DIFY_KEY = "app-e2e-secret-key-7c1d9e04b2a85f36"
AUTH_COOKIE = "sb-e2etest-auth-token"
POLYFILL = "polyfill"  # the page's transport switch values
FETCH = "fetch"
WAIT_MS = 15_000
# How long the proxy keeps reading Dify for a client that left mid-answer: longer than any cut or
# reload in the tests takes to come back (the clients' reconnects wait 1 s, then 2, 4, 8).
RESUME_GRACE = 30


@dataclass
class Proxy:
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def requests_logged(self, since: int = 0) -> list[dict[str, Any]]:
        """The access log's request lines written after log offset `since`, as dicts."""
        entries = []
        for line in self.log()[since:].splitlines():
            if "dify_proxy.access" not in line:
                continue
            try:
                entry = json.loads(line)
            except ValueError:  # the older `key=value` line
                entry = dict(f.split("=", 1) for f in line.split() if "=" in f)
            entries.append({k: str(v) for k, v in entry.items()})
        return entries


@dataclass
class Origins:
    """Other origins serving a copy of the demo page: `listed` is in CORS_ORIGINS."""

    listed: str
    unlisted: str


@pytest.fixture(scope="package")
def standin() -> Iterator[StandIn]:
    process, url = processes.start_standin(DIFY_KEY)
    yield StandIn(url)
    processes.stop(process)


@pytest.fixture(scope="package")
def origin_ports() -> tuple[int, int]:
    return processes.free_port(), processes.free_port()


@pytest.fixture(scope="package")
def proxy(standin, origin_ports, tmp_path_factory) -> Iterator[Proxy]:
    if not demo.packages_installed():
        pytest.fail("frontend/node_modules is missing: run scripts/setup", pytrace=False)
    log_path = tmp_path_factory.mktemp("proxy") / "gunicorn.log"
    env = {
        "DIFY_API_KEY": DIFY_KEY,
        "DIFY_API_URL": standin.url,
        "SUPABASE_JWT_SECRET": tokens.SECRET,
        "HEARTBEAT_INTERVAL": "1",
        "ENABLE_DEMO": "1",
        "DEV_TOKENS": "1",
        "DEV_TOKEN_SECRET": "an-e2e-dev-token-secret-that-is-not-the-supabase-one",
        "CORS_ORIGINS": f"http://127.0.0.1:{origin_ports[0]}",
        "SUPABASE_AUTH_COOKIE": AUTH_COOKIE,
        "LOG_LEVEL": "INFO",
        "WEB_CONCURRENCY": "1",
        # Every test asks as the same user; the limits have tests of their own.
        "RATE_LIMIT": "10000/minute",
        "MAX_STREAMS_PER_USER": "100",
        "RESUME_GRACE": str(RESUME_GRACE),
    }
    process, url = processes.start_proxy(env, log_path)
    yield Proxy(url, log_path)
    processes.stop(process)


class _StaticHandler(SimpleHTTPRequestHandler):
    def guess_type(self, path: str) -> str:  # fetch-event-source's extensionless module names
        return "text/javascript" if "/vendor/" in str(path) else super().guess_type(path)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


def _copy_demo_page(root: Path) -> None:
    """The page as another site would host it: same files, same relative layout."""
    target = root / "demo"
    shutil.copytree(demo.PAGE_DIR, target / "static")
    (target / "static" / "index.html").rename(target / "index.html")
    for url_path, module_path in demo.VENDOR_FILES.items():
        dest = target / "vendor" / url_path
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(demo.NODE_MODULES / module_path, dest)


@pytest.fixture(scope="package")
def origins(origin_ports, proxy, tmp_path_factory) -> Iterator[Origins]:
    root = tmp_path_factory.mktemp("elsewhere")
    _copy_demo_page(root)
    servers = []
    for port in origin_ports:
        server = ThreadingHTTPServer(
            ("127.0.0.1", port), partial(_StaticHandler, directory=str(root))
        )
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
    yield Origins(*(f"http://127.0.0.1:{port}" for port in origin_ports))
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def link(proxy) -> Iterator[CuttableLink]:
    """The proxy behind a TCP relay that drops every open connection on `link.cut()`."""
    with cuttable_link(int(proxy.url.rsplit(":", 1)[1])) as link:
        yield link


@pytest.fixture(scope="package")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing, and the browser tests drive it: as root run"
            " scripts/setup --dev, or apt-get install --no-install-recommends chromium",
            pytrace=False,
        )
    from playwright.sync_api import sync_playwright

    playwright = sync_playwright().start()
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
    yield browser
    browser.close()
    playwright.stop()


@pytest.fixture
def context(browser):
    """A fresh profile per test: no cookies, no cache."""
    context = browser.new_context()
    context.set_default_timeout(WAIT_MS)
    yield context
    context.close()


@pytest.fixture(autouse=True)
def _fresh_call_log(request):
    if "standin" in request.fixturenames:
        request.getfixturevalue("standin").reset()


@dataclass
class DemoPage:
    """The /demo page in a browser tab, and what the tab sent and received."""

    page: Any
    requests: list[Any] = field(default_factory=list)
    failed: list[Any] = field(default_factory=list)

    @classmethod
    def new(cls, context) -> DemoPage:
        demo_page = cls(context.new_page())
        demo_page.page.on("request", lambda r: demo_page.requests.append(r))
        demo_page.page.on("requestfailed", lambda r: demo_page.failed.append(r))
        return demo_page

    def open(self, site: str, transport: str, auth: str = "bearer", api: str | None = None):
        query = f"transport={transport}&auth={auth}" + (f"&api={api}" if api else "")
        self.page.goto(f"{site}/demo/?{query}")
        self.page.wait_for_selector("body[data-ready]")
        return self

    def reload(self):
        self.page.reload()
        self.page.wait_for_selector("body[data-ready]")
        return self

    def use_token(self, token: str) -> None:
        self.page.fill("#token", token)

    def ask(self, question: str = "hi", **knobs: Any) -> None:
        self.page.fill("#inputs", json.dumps({"_standin": knobs}))
        self.page.fill("#message", question)
        self.page.click("#send")

    def answer(self) -> str:
        return self.page.text_content("#transcript .turn:last-child .answer") or ""

    def turns(self) -> list[tuple[str, str]]:
        """Every question on the page with its answer, in order."""
        return [
            (
                turn.locator(".question").text_content() or "",
                turn.locator(".answer").text_content() or "",
            )
            for turn in self.page.locator("#transcript .turn").all()
        ]

    def form(self):
        """The form under the last answer, once a paused run shows it."""
        return self.page.locator("#transcript .turn:last-child form.human-input")

    def answer_form(self, comment: str, action: str = "approve") -> None:
        form = self.form()
        form.locator("textarea[name=comment]").fill(comment)
        form.locator(f"button[value={action}]").click()

    def status(self) -> tuple[str, str]:
        element = self.page.locator("#status")
        return element.get_attribute("data-state") or "", element.text_content() or ""

    def wait_for_answer_text(self) -> str:
        self.page.wait_for_function(
            "() => document.querySelector('#transcript .turn:last-child .answer')"
            "?.textContent.length > 0"
        )
        return self.answer()

    def pause(self, seconds: float) -> None:
        """Wait with the browser's events flowing (a plain time.sleep would hold them back)."""
        self.page.wait_for_timeout(seconds * 1000)

    def wait_for(self, predicate, seconds: float = 10.0):
        """Poll `predicate()` until it returns something truthy; returns the last value."""
        deadline = time.monotonic() + seconds
        while True:
            value = predicate()
            if value or time.monotonic() > deadline:
                return value
            self.pause(0.05)

    def wait_until(self, *states: str) -> tuple[str, str]:
        self.page.wait_for_function(
            "states => states.includes(document.querySelector('#status').dataset.state)",
            arg=list(states),
        )
        return self.status()

    def chat_requests(self, method: str | None = None) -> list[Any]:
        return [
            r
            for r in self.requests
            if r.url.split("?")[0].endswith("/api/chat") and method in (None, r.method)
        ]

    def resumes(self) -> list[tuple[Any, str]]:
        """The chat requests that named an event id (the polyfill's `lastEventId` query
        parameter, fetch-event-source's `Last-Event-ID` header), each with that id."""
        found = []
        for request in self.chat_requests():
            query = parse_qs(urlsplit(request.url).query)
            event_id = request.headers.get("last-event-id") or query.get("lastEventId", [""])[0]
            if event_id:
                found.append((request, event_id))
        return found


@pytest.fixture
def demo_page(context, proxy) -> DemoPage:
    return DemoPage.new(context)


def cookie_value(token: str) -> str:
    """`@supabase/ssr`'s cookie: `base64-` and the base64url of the session JSON."""
    session = json.dumps({"access_token": token, "token_type": "bearer", "expires_in": 3600})
    return "base64-" + base64.urlsafe_b64encode(session.encode()).decode().rstrip("=")
