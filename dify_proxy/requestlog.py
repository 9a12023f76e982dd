"""Per-request observability: a request id, one JSON log line, and the request counter.

The line is written when the response closes, so a stream's line can say how it ended. It
never holds the query string, a token, the key or the message text. Logs are one JSON object per
line so a log drain can index them; every line written while serving a request carries its id.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import uuid

from flask import Flask, Response, g, has_request_context, request

from . import metrics

access_log = logging.getLogger("dify_proxy.access")

# Accept a caller's id only if it is short and plain: it is echoed and logged verbatim.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is None and has_request_context():
            request_id = g.get("request_id")
        if request_id:
            entry["request_id"] = request_id
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def init_app(app: Flask, level: str) -> None:
    _configure_logging(level)
    app.before_request(_start)
    app.after_request(_finish)


def _configure_logging(level: str) -> None:
    logger = logging.getLogger("dify_proxy")
    logger.setLevel(level)
    if not any(getattr(h, "_dify_proxy", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.formatter = JsonFormatter()
        handler.formatter.converter = time.gmtime
        handler._dify_proxy = True  # type: ignore[attr-defined]
        logger.addHandler(handler)


def _start() -> None:
    g.started = time.perf_counter()
    given = request.headers.get("X-Request-ID", "")
    g.request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def _finish(response: Response) -> Response:
    request_id = g.get("request_id") or uuid.uuid4().hex
    response.headers["X-Request-ID"] = request_id
    route = request.url_rule.rule if request.url_rule else "unmatched"
    fields = {
        "method": request.method,
        "path": request.path,
        "status": response.status_code,
        "user": g.get("user_id"),
        "pid": os.getpid(),  # which worker: a resume may land on another one
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
            if stats.replayed is not None:
                fields["resumed"] = True
                fields["replayed"] = stats.replayed
        metrics.REQUESTS.labels(route, fields["method"], fields["status"]).inc()
        access_log.info("request", extra={"fields": fields, "request_id": request_id})

    response.call_on_close(write)
    return response
