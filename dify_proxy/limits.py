"""Per-user request rate limits (Flask-Limiter), keyed by the session's `sub`, never by IP.

Limits live in Redis when REDIS_URL is set, so they hold across workers and instances; if Redis
goes down, Flask-Limiter falls back to in-memory counting with the same limits (per process)
until it is back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Flask, Response, current_app, g
from flask_limiter import Limiter

from . import metrics
from .errors import ApiError
from .redisconn import RedisConn
from .settings import Settings

# Fixed windows, not moving ones: the in-memory storage sweeps every key it holds every 10 ms
# under a lock per key, and for moving windows that sweep alone took 65% of a worker's CPU with
# 5,000 users in the benchmark's hold mode (6% with fixed windows; see the issue note).
limiter = Limiter(
    key_func=lambda: g.user_id,
    headers_enabled=True,
    in_memory_fallback_enabled=True,
    # The limit is counted after the view (see `per_user`); if Redis stops answering by then,
    # the answer is good and must not become a 500. The failed count is logged instead.
    swallow_errors=True,
    strategy="fixed-window",
    key_prefix="dify-proxy",
)


def init_app(app: Flask, settings: Settings, conn: RedisConn) -> None:
    # Registered before Flask-Limiter's own hook, so it runs after it (Flask runs after-request
    # functions in reverse order).
    app.after_request(keep_explicit_retry_after)
    app.config.update(
        RATELIMIT_ENABLED=settings.rate_limit is not None,
        RATELIMIT_STORAGE_URI=settings.redis_url or "memory://",
        # The app's own connection pool: one set of Redis connections per worker, not two.
        RATELIMIT_STORAGE_OPTIONS=(
            {"connection_pool": conn.client.connection_pool} if conn.client is not None else {}
        ),
    )
    limiter.init_app(app)


# Requests refused for their own input (never sent to Dify) do not use up the user's quota.
NOT_COUNTED = frozenset({400, 413, 415})


def per_user(exempt_when: Callable[[], bool] = lambda: False) -> Callable[[Any], Any]:
    """Apply RATE_LIMIT to a view; put it under `@require_session`, which sets the key."""
    return limiter.limit(
        lambda: current_app.config["SETTINGS"].rate_limit,  # None: the limiter is disabled
        exempt_when=exempt_when,
        deduct_when=lambda response: response.status_code not in NOT_COUNTED,
    )


def keep_explicit_retry_after(response: Response) -> Response:
    """Flask-Limiter sets Retry-After to its own window's reset on every response of a limited
    route, 200s included, and would replace the Retry-After of a 429 that is not ours to time
    (Dify's, or a stream or token limit's). Keep it only on the answers it belongs to."""
    retry_after = g.get("retry_after")
    if retry_after is not None:
        response.headers["Retry-After"] = retry_after
    elif response.status_code not in (429, 503):
        response.headers.pop("Retry-After", None)
    return response


def over_limit(kind: str, code: str, message: str, retry_after: str = "5") -> ApiError:
    """The 429 of one of the per-user limits (streams, uploads, tokens), counted by `kind`."""
    metrics.RATE_LIMITED.labels(kind).inc()
    return ApiError(429, code, message, {"Retry-After": retry_after})
