"""dify-proxy: a Supabase-authenticated, streaming proxy in front of Dify's chat API."""

from __future__ import annotations

import logging
import sys
import time

from flask import Flask, Response, g, request

from . import chat, errors
from .auth import Verifier
from .dify import Dify
from .settings import Settings, load_settings

MAX_BODY_BYTES = 1024 * 1024

access_log = logging.getLogger("dify_proxy.access")


def create_app(settings: Settings | None = None) -> Flask:
    """Build the app; configuration is read and validated here, once, and raises ConfigError."""
    settings = settings or load_settings()
    app = Flask(__name__)
    app.config.update(SETTINGS=settings, MAX_CONTENT_LENGTH=MAX_BODY_BYTES)
    _configure_logging(settings.log_level)

    app.extensions["dify_proxy.verifier"] = Verifier(settings)
    app.extensions["dify_proxy.dify"] = Dify(settings)

    errors.register_error_handlers(app)
    app.register_blueprint(chat.bp)
    app.before_request(_start_timer)
    app.after_request(_log_when_done)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def _configure_logging(level: str) -> None:
    logger = logging.getLogger("dify_proxy")
    logger.setLevel(level)
    if not any(getattr(h, "_dify_proxy", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        handler._dify_proxy = True  # type: ignore[attr-defined]
        logger.addHandler(handler)


def _start_timer() -> None:
    g.started = time.perf_counter()


def _log_when_done(response: Response) -> Response:
    """One line per request, written when the response is closed, so a stream's line carries
    how it ended. Never the query string, a token, the key or the message text."""
    fields = {
        "method": request.method,
        "path": request.path,
        "status": response.status_code,
        "user": g.get("user_id", "-"),
    }
    started = g.get("started", time.perf_counter())
    stats = g.get("stream_stats")

    def write() -> None:
        fields["duration_ms"] = round((time.perf_counter() - started) * 1000, 1)
        if stats is not None:
            fields["end"] = stats.end
            fields["ttfb_ms"] = (
                round((stats.first_event - started) * 1000, 1) if stats.first_event else None
            )
            fields["bytes"] = stats.bytes
            fields["events"] = stats.events
        access_log.info(" ".join(f"{k}={v}" for k, v in fields.items()))

    response.call_on_close(write)
    return response
