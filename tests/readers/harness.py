"""Runs every reader at once on one delivery of one recording, straight at the stand-in ("dify")
and through the proxy ("proxy"): Python readers in threads, Node readers as processes, browser
readers as concurrent promises in two Chromium pages (one per origin, so every request is
same-origin). Running them together keeps the suite's wall time near one stream's."""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

from tests.readers.python_readers import PYTHON_READERS, Event, Reading, Request
from tests.support import tokens

JS = Path(__file__).parent / "js"
NODE_READERS = ("eventsource", "eventsource-parser")
# Browser-only libraries (window, fetch, XHR, document) and Dify's web template run in real
# Chromium, where their users run them, rather than in Node under a shim.
BROWSER_READERS = ("fetch-event-source", "event-source-polyfill", "dify-handle-stream")
GET_ONLY = ("eventsource", "event-source-polyfill")  # EventSource: the proxy's GET /api/chat
READERS = (*PYTHON_READERS, *NODE_READERS, *BROWSER_READERS)
PATHS = ("dify", "proxy")
PAGE = "/_readers/"
DIFY_KEY = "app-reader-suite-secret-key-5b7e19c3"
WAIT_MS = 30_000


def chat_request(reader: str, path: str, standin_url: str, proxy_url: str, knobs: dict) -> Request:
    """The chat call `reader` makes on `path`, with only the headers its user must add."""
    if path == "dify":
        body = json.dumps(
            {
                "query": "hi",
                "user": "reader-suite",
                "response_mode": "streaming",
                "inputs": {"_standin": knobs},
            }
        )
        headers = {"Authorization": f"Bearer {DIFY_KEY}", "Content-Type": "application/json"}
        url = f"{standin_url}/chat-messages"
        if reader == "event-source-polyfill":  # it can only GET; see `_post_instead`
            return Request(f"{url}?{urlencode({'post': body})}", "GET", headers)
        return Request(url, "POST", headers, body)
    headers = {"Authorization": f"Bearer {tokens.hs256()}"}
    if reader in GET_ONLY:
        query = urlencode({"message": "hi", "inputs": json.dumps({"_standin": knobs})})
        return Request(f"{proxy_url}/api/chat?{query}", "GET", headers)
    body = json.dumps({"message": "hi", "inputs": {"_standin": knobs}})
    return Request(
        f"{proxy_url}/api/chat", "POST", {**headers, "Content-Type": "application/json"}, body
    )


DIFY_KEY = "app-reader-suite-secret-key-5b7e19c3"


def _to_reading(raw: dict) -> Reading:
    return Reading(
        [Event(e["type"], e["data"], e.get("id") or "") for e in raw["events"]], raw["ended"]
    )


def run_node(reader: str, request: Request, reconnect: bool = False) -> subprocess.Popen:
    spec = {"reader": reader, **request.as_dict(), "reconnect": reconnect}
    return subprocess.Popen(
        ["node", str(JS / "node_readers.mjs"), json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def node_reading(process: subprocess.Popen) -> Reading:
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    return _to_reading(json.loads(out))


class Browser:
    """One Chromium context serving the suite's page on any origin, with one page per origin."""

    def __init__(self, browser) -> None:
        self.context = browser.new_context()
        self.context.route(f"**{PAGE}**", self._serve)
        self.context.route("**/v1/chat-messages?*", self._post_instead)
        self.pages: dict[str, object] = {}

    def page(self, origin: str):
        if origin not in self.pages:
            page = self.context.new_page()
            page.goto(f"{origin}{PAGE}browser_readers.html")
            page.wait_for_function("window.readersReady === true", timeout=WAIT_MS)
            self.pages[origin] = page
        return self.pages[origin]

    def start(self, key: str, reader: str, request: Request) -> None:
        origin = "{0.scheme}://{0.netloc}".format(urlsplit(request.url))
        self.page(origin).evaluate(
            "([key, req]) => { (window.runs ??= {})[key] = window.runReader(req); }",
            [key, {"reader": reader, **request.as_dict()}],
        )

    def reading(self, key: str, request: Request) -> Reading:
        origin = "{0.scheme}://{0.netloc}".format(urlsplit(request.url))
        return _to_reading(self.page(origin).evaluate("(key) => window.runs[key]", key))

    def pump(self, ms: int = 20) -> None:
        next(iter(self.pages.values())).wait_for_timeout(ms)

    def close(self) -> None:
        self.context.close()

    @staticmethod
    def _serve(route) -> None:
        name = urlsplit(route.request.url).path.removeprefix(PAGE)
        if name.startswith("vendor/"):
            path = JS / "node_modules" / name.removeprefix("vendor/")
            if path.suffix != ".js" and path.with_suffix(".js").exists():
                path = path.with_suffix(".js")  # fetch-event-source's extensionless imports
        else:
            path = JS / name
        if not path.is_file():
            route.fulfill(status=404, body="not found")
            return
        kind = "text/html" if path.suffix == ".html" else "text/javascript"
        route.fulfill(status=200, body=path.read_bytes(), content_type=f"{kind}; charset=utf-8")

    @staticmethod
    def _post_instead(route) -> None:
        """Dify's chat call is a POST and EventSource can only GET: on the straight path the
        polyfill's GET leaves the browser as that POST (the body rides in the `post` query
        parameter), and the response reaches the polyfill untouched."""
        request = route.request
        split = urlsplit(request.url)
        if request.method != "GET":
            route.continue_()
            return
        body = parse_qs(split.query)["post"][0]
        route.continue_(
            url=request.url.split("?", 1)[0],
            method="POST",
            post_data=body,
            headers={**request.headers, "content-type": "application/json"},
        )


def read_all(browser: Browser, standin_url: str, proxy_url: str, knobs: dict) -> dict:
    """{(reader, path): Reading} for every reader on both paths, all streams at once."""
    requests_ = {
        (reader, path): chat_request(reader, path, standin_url, proxy_url, knobs)
        for reader in READERS
        for path in PATHS
    }
    for (reader, path), request in requests_.items():
        if reader in BROWSER_READERS:
            browser.start(f"{reader}/{path}", reader, request)
    nodes = {
        key: run_node(key[0], request)
        for key, request in requests_.items()
        if key[0] in NODE_READERS
    }
    with ThreadPoolExecutor(max_workers=len(PYTHON_READERS) * len(PATHS)) as pool:
        futures = {
            key: pool.submit(PYTHON_READERS[key[0]], request)
            for key, request in requests_.items()
            if key[0] in PYTHON_READERS
        }
        while not all(f.done() for f in futures.values()):
            browser.pump()  # Playwright's route handlers run on this thread
        readings = {key: future.result() for key, future in futures.items()}
    readings.update({key: node_reading(process) for key, process in nodes.items()})
    for key, request in requests_.items():
        if key[0] in BROWSER_READERS:
            readings[key] = browser.reading(f"{key[0]}/{key[1]}", request)
    return readings
