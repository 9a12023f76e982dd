"""Per-user limits: request rates (Flask-Limiter), keyed by the session's `sub`, never by IP;
each user's values (their plan's, or the variables'); and the 429 every limit answers with.

Limits live in Redis when REDIS_URL is set, so they hold across workers and instances; if Redis
goes down, Flask-Limiter falls back to in-memory counting with the same limits (per process)
until it is back.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import redis
from flask import Flask, Response, current_app, g
from flask_limiter import Limiter, RateLimitExceeded

from . import metrics
from .errors import ApiError, error_response
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
    app.register_error_handler(RateLimitExceeded, _rate_limited)
    app.config.update(
        RATELIMIT_ENABLED=any(rate is not None for rate in settings.any_limit("rate_limit")),
        RATELIMIT_STORAGE_URI=settings.redis_url or "memory://",
        # The app's own connection pool: one set of Redis connections per worker, not two.
        RATELIMIT_STORAGE_OPTIONS=(
            {"connection_pool": conn.client.connection_pool} if conn.client is not None else {}
        ),
    )
    limiter.init_app(app)


# Requests refused for their own input (never sent to Dify) do not use up the user's quota.
NOT_COUNTED = frozenset({400, 413, 415})


def user_limit(name: str) -> Any:
    """The session's value of a per-user setting (`max_streams_per_user`, ...): its plan's when
    PLANS gives its plan one, else the variable's. Needs `@require_session`, which sets g.plan."""
    return current_app.config["SETTINGS"].limit(name, g.get("plan"))


def per_user(exempt_when: Callable[[], bool] = lambda: False) -> Callable[[Any], Any]:
    """Apply the user's RATE_LIMIT to a view; put it under `@require_session`, which sets the key
    and the plan. Counters are per user and per limit string, so a plan's own rate starts a
    count of its own (in Redis, as any other)."""
    return limiter.limit(
        lambda: user_limit("rate_limit"),  # None: no limit for this user
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


# A stream or upload slot frees when one of the user's own answers or uploads ends, which no
# one can foresee; a retry costs one Redis call, and answers mostly take longer than this.
SLOT_RETRY_SECONDS = 5


def over_limit(
    kind: str, code: str, reached: str, allowance: str, renews: str, retry_after: int
) -> ApiError:
    """The 429 of every per-user limit, counted by `kind`: which limit, how much the user's plan
    allows, and when it renews, with the same time in Retry-After. For instance "Daily token
    budget reached: 20000 tokens a day on the free plan; it renews at 00:00 UTC, in 5 hours."
    """
    metrics.RATE_LIMITED.labels(kind).inc()
    plan = g.get("plan")
    on_plan = f" on the {plan} plan" if plan in current_app.config["SETTINGS"].plans else ""
    return ApiError(
        429,
        code,
        f"{reached}: {allowance}{on_plan}; {renews}.",
        {"Retry-After": str(max(1, retry_after))},
    )


def in_words(seconds: int) -> str:
    """A wait as a person says it: "42 seconds", "3 minutes", "5 hours 12 minutes"."""
    if seconds < 90:
        return _counted(seconds, "second")
    minutes = math.ceil(seconds / 60)
    if minutes < 90:
        return _counted(minutes, "minute")
    hours, minutes = divmod(minutes, 60)
    words = _counted(hours, "hour")
    return f"{words} {_counted(minutes, 'minute')}" if minutes else words


def _counted(number: int, unit: str) -> str:
    return f"{number} {unit}{'' if number == 1 else 's'}"


def _rate_limited(error: RateLimitExceeded) -> Response:
    """Flask-Limiter's 429, in the same words and shape as the other limits'. The window's reset
    is read from the counter Flask-Limiter checked (in Redis when shared); with several limits
    (`20/minute;300/day`), the one that keeps the user waiting longest is the one to tell."""
    item = error.limit.limit
    retry_after = item.get_expiry()  # if the storage cannot say, a whole window is safe
    try:
        waits = [(lim.reset_at, lim.limit) for lim in limiter.current_limits if lim.breached]
    except redis.RedisError:  # Redis failed since the check
        waits = []
    if waits:
        reset_at, item = max(waits, key=lambda wait: wait[0])
        retry_after = min(item.get_expiry(), max(1, int(reset_at - time.time())))
    api_error = over_limit(
        "rate",
        "too_many_requests",
        "Request rate limit reached",
        f"{item.amount} per {_window_text(item)}",
        f"it renews in {in_words(retry_after)}",
        retry_after,
    )
    g.retry_after = api_error.headers["Retry-After"]  # see keep_explicit_retry_after
    return error_response(api_error.status, api_error.code, api_error.message, api_error.headers)


def _window_text(item: Any) -> str:
    """ "minute", "10 seconds": the window as RATE_LIMIT wrote it."""
    unit = item.GRANULARITY.name
    return unit if item.multiples == 1 else _counted(item.multiples, unit)
