"""The app's one Redis connection pool, and whether Redis is usable right now.

The per-user limits, the rate limiter and the answer records all use the same Redis. When one of
them sees it fail, all of them back off to their local fallbacks for REDIS_RETRY_SECONDS instead
of each paying a timeout to find out; the failure is logged once per interval, and `/readyz`
reports it.
"""

from __future__ import annotations

import logging
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis

log = logging.getLogger(__name__)

REDIS_TIMEOUT_SECONDS = 0.5
REDIS_RETRY_SECONDS = 5.0  # after a failure, use local fallbacks this long before trying again
ERROR_LOG_INTERVAL_SECONDS = 60.0
MAX_CONNECTIONS = 12  # per process (worker): limits, limiter, records, followers together
POOL_WAIT_SECONDS = 1.0  # how long a command waits for a free connection before it fails


def redis_options(url: str) -> dict[str, Any]:
    """Connection options for `redis.from_url`.

    Heroku Redis (and other managed Redis) serves `rediss://` with a self-signed certificate and
    documents that clients must not verify it; verifying would make every limit silently fall
    back to per-process counts. So `rediss://` skips verification unless the URL itself says
    otherwise (`?ssl_cert_reqs=required`, which redis-py reads from the URL and prefers).
    """
    options: dict[str, Any] = {
        "socket_timeout": REDIS_TIMEOUT_SECONDS,
        "socket_connect_timeout": REDIS_TIMEOUT_SECONDS,
    }
    parts = urlsplit(url)
    if parts.scheme == "rediss" and "ssl_cert_reqs" not in parse_qs(parts.query):
        options.update(ssl_cert_reqs="none", ssl_check_hostname=False)
    return options


class RedisConn:
    def __init__(self, url: str | None) -> None:
        # A bounded pool: under gevent every greenlet with a command in flight would otherwise
        # open a connection of its own, and a burst of requests (or resumes) would leave that
        # many connections open to Redis, which limits its clients. Past the bound, a command
        # waits for a free connection.
        self.client: redis.Redis | None = (
            redis.Redis(
                connection_pool=redis.BlockingConnectionPool.from_url(
                    url,
                    max_connections=MAX_CONNECTIONS,
                    timeout=POOL_WAIT_SECONDS,
                    **redis_options(url),
                )
            )
            if url
            else None
        )
        self._retry_at = 0.0
        self._logged_at = -ERROR_LOG_INTERVAL_SECONDS
        self.error: str | None = None  # the last failure's type, for /readyz

    def get(self) -> redis.Redis | None:
        """The client to use now, or None: no Redis, or it failed within the back-off."""
        if self.client is None or time.monotonic() < self._retry_at:
            return None
        return self.client

    def usable(self) -> bool:
        return self.get() is not None

    def failed(self, exc: Exception) -> None:
        """Someone saw Redis fail: everyone uses their fallback for the back-off."""
        now = time.monotonic()
        self._retry_at = now + REDIS_RETRY_SECONDS
        self.error = type(exc).__name__
        if now - self._logged_at >= ERROR_LOG_INTERVAL_SECONDS:
            self._logged_at = now
            log.error(
                "redis unavailable (%s): per-user limits fall back to this process", self.error
            )

    def check(self) -> bool:
        """For /readyz: ping now, whatever the back-off says."""
        if self.client is None:
            return True
        try:
            self.client.ping()
        except redis.RedisError as exc:
            self.failed(exc)
            return False
        self.error = None
        return True
