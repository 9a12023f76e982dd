"""Prometheus metrics, counted across every gunicorn worker.

gunicorn.conf.py points PROMETHEUS_MULTIPROC_DIR at a fresh directory before the workers fork,
so each worker writes its samples there and `/metrics` (served by any one of them) sums them.
Without it (tests, `flask run`) the process's own registry is used.
"""

from __future__ import annotations

import hmac
import os

from flask import Blueprint, Response, current_app, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from .errors import ApiError

REQUESTS = Counter("dify_proxy_requests_total", "Requests answered", ["route", "method", "status"])
OPEN_STREAMS = Gauge(
    "dify_proxy_open_streams", "Chat streams open now", multiprocess_mode="livesum"
)
TIME_TO_FIRST_BYTE = Histogram(
    "dify_proxy_time_to_first_byte_seconds",
    "From request to Dify's first event reaching the client",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30),
)
STREAM_DURATION = Histogram(
    "dify_proxy_stream_duration_seconds",
    "How long chat streams stay open",
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200),
)
STREAM_ENDS = Counter("dify_proxy_stream_ends_total", "How streams ended", ["reason"])
UPSTREAM_ERRORS = Counter("dify_proxy_upstream_errors_total", "Failures talking to Dify", ["kind"])
TOKENS = Counter(
    "dify_proxy_tokens_total",
    "Model tokens used, from Dify's usage reports (estimated for an answer that brought none)",
)
RESUMES = Counter("dify_proxy_resumes_total", "Answers picked up again after a reconnect")
REPLAYED_EVENTS = Counter("dify_proxy_replayed_events_total", "Events sent again on resumes")
ANSWERS_ABANDONED = Counter(
    "dify_proxy_answers_abandoned_total",
    "Answers stopped because no client came back within RESUME_GRACE",
)
DRAIN = Counter(
    "dify_proxy_drain_answers_total",
    "Answers during a restart's drain: finished, ended_at_deadline, interrupted (still waiting "
    "for Dify at the deadline), refused (new questions after the worker was told to stop)",
    ["outcome"],
)
RATE_LIMITED = Counter(
    "dify_proxy_rate_limited_total", "Requests refused by a per-user limit", ["limit"]
)

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def metrics() -> Response:
    token = current_app.config["SETTINGS"].metrics_token
    if token:
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise ApiError(
                401,
                "unauthorized",
                "Metrics need the metrics token.",
                {"WWW-Authenticate": 'Bearer realm="metrics"'},
            )
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
