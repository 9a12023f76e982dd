"""`/demo/`: a small chat page for trying the proxy from a browser (ENABLE_DEMO=1).

The page and its script live in `static/demo/`; its two SSE client packages are served unbundled
from `frontend/node_modules` (installed by `scripts/setup` with `npm ci`), and only the few files
listed in `VENDOR_FILES`: nothing else under node_modules is reachable. `/demo/dev-token` exists
only with DEV_TOKENS=1, which settings allow only against a Dify on loopback (the stand-in), and
signs with DEV_TOKEN_SECRET, never with the secret that verifies real sessions.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, abort, jsonify, send_from_directory

from . import devtokens
from .settings import Settings

PAGE_DIR = Path(__file__).resolve().parent / "static" / "demo"
NODE_MODULES = Path(__file__).resolve().parents[1] / "frontend" / "node_modules"

# URL under /demo/vendor/ -> file under frontend/node_modules. fetch-event-source's ES modules
# import each other as "./fetch" and "./parse" (no extension), which a browser resolves to
# /demo/vendor/fetch-event-source/fetch: those extensionless names are served as the .js files.
_FES = "@microsoft/fetch-event-source/lib/esm"
VENDOR_FILES = {
    "event-source-polyfill/eventsource.min.js": "event-source-polyfill/src/eventsource.min.js",
    "fetch-event-source/index.js": f"{_FES}/index.js",
    "fetch-event-source/fetch": f"{_FES}/fetch.js",
    "fetch-event-source/parse": f"{_FES}/parse.js",
}

# The page runs with no inline script or style; it may talk to any http(s) API base URL.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' http: https:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)

MISSING_PACKAGES = """<!doctype html>
<meta charset="utf-8"><title>dify-proxy demo</title>
<h1>The demo page's browser packages are not installed</h1>
<p>To install them, run <code>scripts/setup</code> (it runs <code>npm ci</code> in
<code>frontend/</code>; Node.js and npm are needed), then reload this page.</p>
"""


def packages_installed() -> bool:
    return all((NODE_MODULES / path).is_file() for path in VENDOR_FILES.values())


def create_blueprint(settings: Settings) -> Blueprint:
    """A fresh blueprint per app, so whether `/demo/dev-token` exists follows its settings."""
    bp = Blueprint("demo", __name__, url_prefix="/demo")

    @bp.after_request
    def _headers(response: Response) -> Response:
        response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        return response

    @bp.get("/")
    def page() -> Response:
        if not packages_installed():
            return Response(MISSING_PACKAGES, status=503, content_type="text/html; charset=utf-8")
        return send_from_directory(PAGE_DIR, "index.html")

    @bp.get("/static/<path:name>")
    def page_file(name: str) -> Response:
        return send_from_directory(PAGE_DIR, name)

    @bp.get("/vendor/<path:name>")
    def vendor(name: str) -> Response:
        path = VENDOR_FILES.get(name)
        if path is None:
            abort(404)
        return send_from_directory(NODE_MODULES, path)

    if settings.dev_tokens and settings.dev_token_secret:
        secret = settings.dev_token_secret

        @bp.post("/dev-token")
        def dev_token() -> Response:
            """A short-lived token for the fixed dev user, signed with the dev secret."""
            response = jsonify(access_token=devtokens.mint(secret))
            response.headers["Cache-Control"] = "no-store"
            return response

    return bp
