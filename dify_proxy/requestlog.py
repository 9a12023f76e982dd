"""One log line per request, written when the response closes, so a stream's line can say how
it ended. It never holds the query string, a token, the key or the message text."""

from __future__ import annotations

import logging
import sys
import time

from flask import Flask, Response, g, request

access_log = logging.getLogger("dify_proxy.access")


def init_app(app: Flask, level: str) -> None:
    _configure_logging(level)
    app.before_request(_start_timer)
    app.after_request(_log_when_done)


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
